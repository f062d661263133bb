"""The anchor-free family's cost on the CPU: the original (ultralytics ``v8DetectionLoss``) and every
backend of ``yolo_kernels.yolov8`` side by side, forward + backward, with the floor.

    python benchmarks/anchor_free.py --batch 16 --boxes 10 300 --repeats 3 [--threads 1] [--parts]
        [--providers cpp ...] [--md F]

A YOLOv8s head at 640 (strides 8/16/32: 8,400 points, 80 classes, ``reg_max`` 16), random logits,
``--boxes`` random boxes per image. Calls are taken in turns (original, reference, ...), the caches
evicted before each (``yolo_kernels.bench.time_interleaved``); the medians in ms with p20-p80. The
floor is this family's unavoidable traffic: ``boxes`` and ``scores`` read once and their gradients
written once, timed as a copy of both. Peak extra memory: the CPU profiler's allocations during one
call (``yolo_kernels.bench.peak_extra_bytes``). ``--parts`` adds cpp's two steps timed alone in the
same turns: the assigner (``tal_assign``, with the targets' padding) and the loss with its gradient
(``detection_loss_with_grad`` of that assignment, as the trainer's eager step runs it).
``--providers`` times only the named providers (and the floor): e.g. cpp without the original's
seconds-long calls between its turns.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
os.environ.setdefault("YOLO_OFFLINE", "1")

from anchor_free_cases import StandIn, grids_for, make_batch, make_preds

from yolo_kernels import yolov8
from yolo_kernels.anchor_free.backends import CppBackend
from yolo_kernels.anchor_free.validate import check_problem, parse_preds
from yolo_kernels.bench import machine_line, peak_extra_bytes, percentile, time_interleaved, yolov8_backends


def providers(model):
    out = {}
    try:
        from ultralytics.utils.loss import v8DetectionLoss

        out["original"] = v8DetectionLoss(model)
    except ImportError:
        pass
    for name in yolov8_backends(torch.device("cpu")):
        out[name] = yolov8.DetectionLoss(model, backend=name)
    return out


def step(criterion, preds, batch):
    loss, _ = criterion(preds, batch)
    loss.sum().backward()


def cpp_parts(model, preds, batch) -> dict:
    """cpp's assigner and its loss with the gradient, each callable alone (empty without the extension)."""
    backend = CppBackend()
    if backend.unavailable_reason(preds["boxes"].device) is not None:
        return {}
    criterion = yolov8.DetectionLoss(model, backend="cpp")
    options = criterion.options
    problem = check_problem(parse_preds(preds), batch, options)
    labels, gt_boxes, grids, strides, assigned, target = backend.assign(problem, options)
    expected = [float(problem.boxes.shape[0])] * 3  # the gradient the trainer's loss.sum() brings

    def loss_with_grad():
        return torch.ops.yolo_kernels.detection_loss_with_grad(
            problem.boxes.detach(), problem.scores.detach(), labels, gt_boxes, assigned, target,
            criterion.class_weights, grids, strides, *options.gains(), expected,
        )  # fmt: skip

    return {"cpp: assigner": lambda: backend.assign(problem, options), "cpp: loss with gradient": loss_with_grad}


def measure(
    batch_size: int, boxes: int, repeats: int, seed: int = 0, parts: bool = False, only: list[str] | None = None
) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    model = StandIn(nc=80, reg_max=16)
    preds = make_preds(batch_size, grids_for(640, 640), 80, 16, g)
    for key in ("boxes", "scores"):
        preds[key].requires_grad_(True)
    batch = make_batch([boxes] * batch_size, 80, g, lo=0.01, hi=0.3)

    def drop_grads():
        preds["boxes"].grad = preds["scores"].grad = None

    chosen = {name: c for name, c in providers(model).items() if only is None or name in only}
    calls = {name: (lambda c=c: step(c, preds, batch)) for name, c in chosen.items()}
    if parts:
        calls.update(cpp_parts(model, preds, batch))
    sink = {k: torch.empty_like(preds[k]) for k in ("boxes", "scores")}
    calls["floor"] = lambda: [sink[k].copy_(preds[k].detach()) for k in sink]
    times = time_interleaved(calls, repeats, warmup=1, device=torch.device("cpu"), before=drop_grads)
    floor = percentile(times["floor"], 0.5)
    rows = []
    for name, ts in times.items():
        drop_grads()
        peak = peak_extra_bytes(calls[name], torch.device("cpu")) if name != "floor" else 0
        med = percentile(ts, 0.5)
        rows.append(
            dict(
                provider=name,
                batch=batch_size,
                boxes=boxes,
                ms=med,
                p20=percentile(ts, 0.2),
                p80=percentile(ts, 0.8),
                x_floor=med / floor,
                peak_mb=peak / 2**20,
            )
        )
    return rows


def table(rows: list[dict]) -> str:
    head = "| batch | boxes/image | provider | ms (p20-p80) | x floor | peak extra MB |\n|---|---|---|---|---|---|\n"
    return head + "".join(
        f"| {r['batch']} | {r['boxes']} | {r['provider']} | {r['ms']:.1f} ({r['p20']:.1f}-{r['p80']:.1f}) | "
        f"{r['x_floor']:.1f} | {r['peak_mb']:.0f} |\n"
        for r in rows
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--boxes", type=int, nargs="+", default=[10, 300])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--parts", action="store_true", help="also time cpp's assigner and loss alone")
    ap.add_argument("--providers", nargs="+", default=None, help="time only these (original, reference, cpp)")
    ap.add_argument("--md", default=None, help="also write the table to this markdown file")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = [r for n in args.boxes for r in measure(args.batch, n, args.repeats, parts=args.parts, only=args.providers)]
    text = f"{machine_line(torch.device('cpu'), torch.get_num_threads())}\n\n{table(rows)}"
    print(text)
    if args.md:
        with open(args.md, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
