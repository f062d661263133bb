"""The main job: time the YOLOv3 loss (forward + backward) with every available backend.

    python -m yolo_kernels.bench                       # YOLOv3 at 416, batch 16, 10 targets/image
    python -m yolo_kernels.bench --cfg yolov3-tiny --img 320 --batch 4 --repeats 5

It builds the Darknet model, runs it once on a batch of synthetic images to get realistic head
outputs ``p`` (the loss's input), draws synthetic targets, then times forward + backward of the
loss for each backend, side by side in one run, next to the floor (zero-filling buffers of
``p``'s size, which a fused loss must at least do for its gradient). Each backend's loss and
gradients are compared with the reference on the same inputs.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from typing import Any, Callable

import torch

from . import loss as loss_api
from .models import Darknet

__all__ = ["synthetic_batch", "time_call", "run", "format_table", "main"]

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def synthetic_batch(model: Darknet, batch: int, img: int, targets_per_image: int, dtype: torch.dtype, seed: int = 0):
    """Head outputs of ``model`` on random images (as leaves requiring grad) and random targets."""
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(batch, 3, img, img, generator=g)
    model.train()
    with torch.no_grad():
        p = [x.to(dtype).requires_grad_() for x in model(images)]
    nt = batch * targets_per_image
    boxes = torch.rand(nt, 4, generator=g)
    boxes[:, 2:] = boxes[:, 2:] * 0.5 + 0.02  # widths/heights 2%..52% of the image
    targets = torch.cat(
        (
            torch.arange(batch).repeat_interleave(targets_per_image)[:, None].float(),
            torch.randint(0, model.nc, (nt, 1), generator=g).float(),
            boxes,
        ),
        1,
    )
    return p, targets


def time_call(fn: Callable[[], Any], repeats: int, warmup: int) -> list[float]:
    """Wall-clock milliseconds of ``fn()`` over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def _percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


def _forward_backward(name: str, p, targets, model):
    def step():
        for x in p:
            x.grad = None
        loss, _ = loss_api.compute_loss(p, targets, model, backend=name)
        loss.backward()

    return step


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def run(cfg="yolov3", img=416, batch=16, targets_per_image=10, backends=None, dtype="float32",
        repeats=20, warmup=3, seed=0) -> list[dict[str, Any]]:  # fmt: skip
    """Rows of ``{provider, median_ms, p20_ms, p80_ms, x_floor, speedup_vs_reference, loss, max_rel_err}``."""
    torch.manual_seed(seed)
    model = Darknet(cfg, img_size=img)
    p, targets = synthetic_batch(model, batch, img, targets_per_image, DTYPES[dtype], seed)
    names = backends or loss_api.available_backends(p[0].device)

    # The reference's loss and gradients on the same inputs, to check every backend against.
    for x in p:
        x.grad = None
    ref_loss, ref_items = loss_api.compute_loss(p, targets, model, backend="reference")
    ref_loss.backward()
    ref_grads = [x.grad.clone() for x in p]

    rows = []
    buffers = [torch.empty_like(x) for x in p]
    floor = time_call(lambda: [b.zero_() for b in buffers], repeats, warmup)
    rows.append({"provider": "floor", "times": floor})
    for name in names:
        step = _forward_backward(name, p, targets, model)
        times = time_call(step, repeats, warmup)
        for x in p:
            x.grad = None
        loss, items = loss_api.compute_loss(p, targets, model, backend=name)
        loss.backward()
        err = max([_rel_err(items, ref_items)] + [_rel_err(x.grad, g) for x, g in zip(p, ref_grads)])
        rows.append({"provider": name, "times": times, "loss": float(loss.detach()), "max_rel_err": err})

    floor_ms = statistics.median(floor)
    ref_ms = next((statistics.median(r["times"]) for r in rows if r["provider"] == "reference"), None)
    for r in rows:
        times = r.pop("times")
        r["median_ms"] = statistics.median(times)
        r["p20_ms"], r["p80_ms"] = _percentile(times, 0.2), _percentile(times, 0.8)
        r["x_floor"] = r["median_ms"] / floor_ms
        r["speedup_vs_reference"] = ref_ms / r["median_ms"] if ref_ms and r["provider"] != "floor" else None
        r.update(cfg=cfg, img=img, batch=batch, dtype=dtype, device=str(p[0].device))
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    head = ["provider", "median ms", "p20-p80 ms", "x floor", "vs reference", "loss", "max rel err"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        cells = [
            r["provider"],
            f"{r['median_ms']:.2f}",
            f"{r['p20_ms']:.2f}-{r['p80_ms']:.2f}",
            f"{r['x_floor']:.1f}",
            f"{r['speedup_vs_reference']:.2f}x" if r["speedup_vs_reference"] else "-",
            f"{r['loss']:.4f}" if "loss" in r else "-",
            f"{r['max_rel_err']:.1e}" if "max_rel_err" in r else "-",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def machine_line(threads: int) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {threads} threads, torch {torch.__version__}, Python {platform.python_version()}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m yolo_kernels.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cfg", default="yolov3", help="cfg path or shipped name (default yolov3)")
    parser.add_argument("--img", type=int, default=416, help="image size in pixels (default 416)")
    parser.add_argument("--batch", type=int, default=16, help="batch size (default 16)")
    parser.add_argument("--targets-per-image", type=int, default=10)
    parser.add_argument("--backends", nargs="+", help="backends to time (default: all available)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="dtype of p")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = run(args.cfg, args.img, args.batch, args.targets_per_image, args.backends, args.dtype,
               args.repeats, args.warmup, args.seed)  # fmt: skip
    print(f"YOLOv3 loss, forward + backward: {args.cfg} at {args.img}, batch {args.batch}, "
          f"{args.targets_per_image} targets/image, p {args.dtype}, medians of {args.repeats} runs")  # fmt: skip
    print(f"machine: {machine_line(torch.get_num_threads())}")
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
