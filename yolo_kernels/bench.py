"""The main job: time the YOLO loss (forward + backward) with every available backend.

    python -m yolo_kernels.bench                                  # this machine's device, batch 16, 416
    python -m yolo_kernels.bench --batch 1 16 64 --json out.json --plot out.png
    python -m yolo_kernels.bench --targets 10 100 500 --plot scaling.png   # dense scenes
    python -m yolo_kernels.bench --loss yolov5 --img 640          # the YOLOv5-style loss
    python -m yolo_kernels.bench --loss yolov8 --img 640 --targets 10 300   # the anchor-free loss
    python -m yolo_kernels.bench --device cuda --img 416 640 --dtype bfloat16

Inputs are head outputs ``p`` (``--loss yolov3``: the shipped yolov3's three heads through
``compute_loss``; ``--loss yolov5``: YOLOv5s's P3-P5 heads and anchors through ``YOLOv5Loss``;
``--loss yolov8``: a YOLOv8 head's box-bin and class logits (80 classes, ``reg_max`` 16, strides
8-32) through ``yolov8.DetectionLoss``; random logits with the heads' initial objectness bias, since
the loss's cost does not depend on the values) and random targets (10 per image unless ``--targets``
says otherwise). The providers are timed side by side in one run, in turns (floor, provider A,
provider B, floor, A, B, ...), each call after the caches were evicted (a training step evicts them
too), next to the floor (zero-filling existing buffers of ``p``'s size, which writing the gradient
costs at least). Every backend's loss and gradients are compared with the reference on the same
inputs, and its peak extra memory is measured: on CUDA from the caching allocator's peak, on CPU
from the profiler's memory timeline (every ATen allocation, and the C++ backend's pooled gradients).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import types
from collections.abc import Callable
from typing import Any

import torch

from ._cli import check_backends, check_device, check_matplotlib, nonnegative_int, positive_int, threads_note
from .anchor import yolov3 as loss_api
from .anchor.yolov5 import YOLOV5_ANCHORS, YOLOV5_STRIDES, YOLOv5Loss
from .anchor_free import backends as anchor_free_backends
from .anchor_free.yolov8 import DetectionLoss
from .models import Darknet

__all__ = [
    "yolov3_inputs",
    "yolov5_inputs",
    "yolov8_inputs",
    "LOSSES",
    "time_call",
    "time_interleaved",
    "percentile",
    "peak_extra_bytes",
    "run",
    "format_table",
    "plot",
    "main",
]

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_MODELS: dict[str, Darknet] = {}


def yolov3_inputs(
    batch: int,
    img: int = 416,
    targets_per_image: int = 10,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    cfg: str = "yolov3",
):
    """``(model, p, targets)``: the model (for its anchors and hyperparameters), head outputs
    ``p`` as leaves requiring grad, and ``targets [batch * targets_per_image, 6]``."""
    if cfg not in _MODELS:
        _MODELS[cfg] = Darknet(cfg)
    model = _MODELS[cfg].to(device)
    g = torch.Generator().manual_seed(seed)
    p = []
    for j in model.yolo_layers:
        head = model.module_list[j]
        n = img // head.stride
        x = torch.randn(batch, head.na, n, n, head.no, generator=g) * 0.5
        x[..., 4] -= 4.5  # the head's initial objectness bias
        p.append(x.to(device=device, dtype=dtype).requires_grad_())
    return model, p, _random_targets(batch, targets_per_image, model.nc, g).to(device)


def _random_targets(batch: int, targets_per_image: int, nc: int, g: torch.Generator) -> torch.Tensor:
    """``[batch * targets_per_image, 6]`` targets: uniform centres, sizes 2%..52% of the image."""
    nt = batch * targets_per_image
    boxes = torch.rand(nt, 4, generator=g)
    boxes[:, 2:] = boxes[:, 2:] * 0.5 + 0.02
    classes = torch.randint(0, nc, (nt, 1), generator=g).float()
    image = torch.arange(batch).repeat_interleave(targets_per_image)[:, None].float()
    return torch.cat((image, classes, boxes), 1)


def yolov5_inputs(
    batch: int,
    img: int = 640,
    targets_per_image: int = 10,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    nc: int = 80,
):
    """``(anchors, p, targets)`` for the YOLOv5-style loss: YOLOv5s's P3-P5 anchors (pixels), head
    outputs ``p [batch, 3, img / s, img / s, nc + 5]`` for strides 8, 16, 32 (leaves requiring
    grad) and ``targets [batch * targets_per_image, 6]``, drawn as ``yolov3_inputs`` draws them."""
    g = torch.Generator().manual_seed(seed)
    p = []
    for s in YOLOV5_STRIDES:
        x = torch.randn(batch, 3, img // s, img // s, nc + 5, generator=g) * 0.5
        x[..., 4] -= 4.5
        p.append(x.to(device=device, dtype=dtype).requires_grad_())
    return YOLOV5_ANCHORS, p, _random_targets(batch, targets_per_image, nc, g).to(device)


class _DetectHead(torch.nn.Module):
    """What the anchor-free loss reads of an ultralytics Detect head."""

    def __init__(self, nc: int, reg_max: int, strides: tuple[float, ...]):
        super().__init__()
        self.nc, self.reg_max = nc, reg_max
        self.register_buffer("stride", torch.tensor(strides))
        self.bias = torch.nn.Parameter(torch.zeros(1))  # the original loss reads the device of a parameter


class _DetectModel(torch.nn.Module):
    """A detection model as the anchor-free loss sees it: ``model[-1]`` the head, ``args`` the gains."""

    def __init__(self, nc: int, reg_max: int, strides: tuple[float, ...]):
        super().__init__()
        self.model = torch.nn.ModuleList([_DetectHead(nc, reg_max, strides)])
        self.args = types.SimpleNamespace(box=7.5, cls=0.5, dfl=1.5)  # ultralytics' default gains


YOLOV8_STRIDES = (8.0, 16.0, 32.0)


def yolov8_inputs(
    batch: int,
    img: int = 640,
    targets_per_image: int = 10,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    nc: int = 80,
    reg_max: int = 16,
):
    """``(model, p, feats, targets)`` for the anchor-free loss: a model with a YOLOv8 head's ``nc``,
    ``reg_max`` and strides 8, 16, 32; head outputs ``p = [boxes [batch, 4 * reg_max, A], scores
    [batch, nc, A]]`` (leaves requiring grad, A the points of the three levels); ``feats`` (the
    feature maps, for their shapes) and the ultralytics batch dict of ``targets_per_image`` boxes per
    image, drawn as ``yolov3_inputs`` draws them."""
    g = torch.Generator().manual_seed(seed)
    grids = [(-(-img // int(s)), -(-img // int(s))) for s in YOLOV8_STRIDES]
    a = sum(ny * nx for ny, nx in grids)
    boxes = torch.randn(batch, 4 * reg_max, a, generator=g)
    scores = torch.randn(batch, nc, a, generator=g) * 2 - 2
    p = [x.to(device=device, dtype=dtype).requires_grad_() for x in (boxes, scores)]
    feats = [torch.zeros(batch, 1, ny, nx, device=device, dtype=dtype) for ny, nx in grids]
    t = _random_targets(batch, targets_per_image, nc, g).to(device)
    targets = {"batch_idx": t[:, 0], "cls": t[:, 1:2], "bboxes": t[:, 2:]}
    return _DetectModel(nc, reg_max, YOLOV8_STRIDES).to(device), p, feats, targets


def yolov8_backends(device: torch.device) -> list[str]:
    """The anchor-free family's backends that run on ``device`` (triton on CPU tensors is the
    interpreter, a test tool: not timed)."""
    return [
        n
        for n, b in anchor_free_backends.BACKENDS.items()
        if b.unavailable_reason(device) is None and not (n == "triton" and device.type == "cpu")
    ]


#: The suffix of a provider that also computes the gradient statistics (``--stats``).
STATS_SUFFIX = "+stats"


def _loss_calls(family: str, batch, img, targets_per_image, seed, dtype, device, names):
    """``(p, targets, {provider: call(p) -> (loss, items)})`` for a loss family; a provider is a
    backend name, with ``STATS_SUFFIX`` when it also computes the gradient statistics."""
    split = {n: (n.removesuffix(STATS_SUFFIX), n.endswith(STATS_SUFFIX)) for n in names}
    if family == "yolov3":
        model, p, targets = yolov3_inputs(batch, img, targets_per_image, seed, dtype, device)

        def call(q, backend, stats):
            return loss_api.compute_loss(q, targets, model, backend=backend, stats=stats)[:2]

        return p, targets, {n: lambda q, b=b, st=st: call(q, b, st) for n, (b, st) in split.items()}
    if family == "yolov8":
        if any(st for _, st in split.values()):
            raise ValueError("stats: the yolov8 loss has no gradient statistics")
        model, p, feats, targets = yolov8_inputs(batch, img, targets_per_image, seed, dtype, device)
        crits = {b: DetectionLoss(model, backend=b) for b, _ in split.values()}

        def call8(q, crit):  # the trainer backpropagates the components' sum
            loss, items = crit({"boxes": q[0], "scores": q[1], "feats": feats}, targets)
            return loss.sum(), torch.stack(list(items.values()))

        return p, targets, {n: lambda q, c=crits[b]: call8(q, c) for n, (b, _) in split.items()}
    anchors, p, targets = yolov5_inputs(batch, img, targets_per_image, seed, dtype, device)
    crits = {
        b: YOLOv5Loss(anchors, YOLOV5_STRIDES, p[0].shape[-1] - 5, backend=b).to(device) for b, _ in split.values()
    }
    return p, targets, {n: lambda q, c=crits[b], st=st: c(q, targets, stats=st)[:2] for n, (b, st) in split.items()}


#: The loss families the bench times (``--loss``).
LOSSES = ("yolov3", "yolov5", "yolov8")


def time_call(fn: Callable[[], Any], repeats: int, warmup: int, device: torch.device) -> list[float]:
    """Wall-clock milliseconds of ``fn()`` over ``repeats`` runs after ``warmup`` runs (CUDA synchronised)."""
    return time_interleaved({"fn": fn}, repeats, warmup, device)["fn"]


#: Bytes written between timed calls to push the previous call's data out of the caches.
EVICT_BYTES = 64 * 2**20


def time_interleaved(
    fns: dict[str, Callable[[], Any]],
    repeats: int,
    warmup: int,
    device: torch.device,
    evict_bytes: int = EVICT_BYTES,
    before: Callable[[], Any] | None = None,
) -> dict[str, list[float]]:
    """Wall-clock milliseconds per call of each function, taken in turns (A, B, C, A, B, C, ...) so
    that drifts of a shared machine hit every function alike. Before each timed call, untimed:
    ``before()`` (e.g. dropping the previous call's gradients, whose release would otherwise be
    charged to the next function), then the caches are evicted by writing ``evict_bytes``. CUDA
    work is synchronised."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    scratch = torch.empty(max(evict_bytes, 1), dtype=torch.uint8, device=device) if evict_bytes else None
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            if before is not None:
                before()
            if scratch is not None:
                scratch.fill_(1)
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times[name].append((time.perf_counter() - start) * 1e3)
    return times


@contextlib.contextmanager
def _without_profiler_banner():
    """The CPU profiler's C++ side prints a ``USDT: ... profiler_start`` / ``profiler_stop`` line to
    the process's stderr on every start and stop. Catch what it writes to file descriptor 2 and
    pass on every other line (a real error still shows)."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no real stderr (e.g. captured): nothing to filter
        yield
        return
    with tempfile.TemporaryFile(mode="w+b") as caught:
        os.dup2(caught.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            caught.seek(0)
            rest = [line for line in caught.read().decode(errors="replace").splitlines(True) if "USDT:" not in line]
            if rest:
                sys.stderr.write("".join(rest))


def peak_extra_bytes(fn: Callable[[], Any], device: torch.device) -> int:
    """Peak memory allocated by ``fn()`` beyond what existed before it."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler._memory_profiler import Action

    with (
        _without_profiler_banner(),
        torch.profiler.profile(
            activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True
        ) as prof,
    ):
        fn()
    current = peak = 0
    for _, action, _, size in prof._memory_profile().timeline:
        if action == Action.CREATE:
            current += size
        elif action == Action.DESTROY:
            current -= size
        peak = max(peak, current)
    return peak


def kernel_profile(call: Callable[[], Any], device: torch.device, warmup: int = 3, top: int = 10) -> dict[str, Any]:
    """The device kernels of one ``call()`` after ``warmup`` calls (``torch.profiler``): their
    count, their summed device time in ms (what a captured graph would take, without the host)
    and the ``top`` longest by name, ``{name: [launches, µs]}``. On a CPU device there are no
    device kernels: zeros."""
    for _ in range(warmup):
        call()
    if device.type != "cuda":
        return {"device_kernels": 0, "device_ms": 0.0, "top": {}}
    from collections import Counter

    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        call()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    names, times = Counter(), Counter()
    for e in kernels:
        names[e.name[:60]] += 1
        times[e.name[:60]] += e.device_time if hasattr(e, "device_time") else e.cuda_time
    return {
        "device_kernels": len(kernels),
        "device_ms": round(sum(times.values()) / 1e3, 4),
        "top": {name: [names[name], round(us, 1)] for name, us in times.most_common(top)},
    }


def percentile(xs: list[float], q: float) -> float:
    """The ``q`` quantile of ``xs`` (nearest rank)."""
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


def spread_ms(values: list[float]) -> dict[str, float]:
    """``{median_ms, p20_ms, p80_ms}`` of timings in ms: how the reports quote a provider."""
    return {"median_ms": percentile(values, 0.5), "p20_ms": percentile(values, 0.2), "p80_ms": percentile(values, 0.8)}


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def _step(call, p):
    def step():
        loss, _ = call(p)
        loss.backward()

    return step


def _drop_grads(p) -> None:
    for x in p:
        x.grad = None


def _measure_batch(
    batch, img, targets_per_image, backends, dtype, device, repeats, warmup, seed, progress, family="yolov3"
):
    names = list(dict.fromkeys(["reference", *backends]))
    p, targets, calls = _loss_calls(family, batch, img, targets_per_image, seed, DTYPES[dtype], device, names)
    up = [x.detach().float().requires_grad_() for x in p]  # the reference on the same values, upcast
    ref_loss, ref_items = calls["reference"](up)
    ref_loss.backward()

    buffers = [torch.empty_like(x) for x in p]
    steps = {"floor": lambda: [b.zero_() for b in buffers]}
    steps.update({name: _step(calls[name], p) for name in backends})
    times = time_interleaved(steps, repeats, warmup, device, before=lambda: _drop_grads(p))
    rows = [{"provider": "floor", "times": times["floor"], "peak_extra_bytes": 0}]
    progress()
    for name in backends:
        for x in p:
            x.grad = None
        peak = peak_extra_bytes(steps[name], device)
        for x in p:
            x.grad = None
        loss, items = calls[name](p)
        loss.backward()
        err = max([_rel_err(items, ref_items)] + [_rel_err(x.grad.float(), r.grad) for x, r in zip(p, up)])
        rows.append(
            {
                "provider": name,
                "times": times[name],
                "loss": float(loss.detach()),
                "max_rel_err": err,
                "peak_extra_bytes": peak,
            }
        )
        for x in p:
            x.grad = None
        progress()

    floor_ms = statistics.median(rows[0]["times"])
    ref_ms = next((statistics.median(r["times"]) for r in rows if r["provider"] == "reference"), None)
    for r in rows:
        times = r.pop("times")
        r["median_ms"] = statistics.median(times)
        r["p20_ms"], r["p80_ms"] = percentile(times, 0.2), percentile(times, 0.8)
        r["x_floor"] = r["median_ms"] / floor_ms
        r["speedup_vs_reference"] = ref_ms / r["median_ms"] if ref_ms and r["provider"] != "floor" else None
        r["peak_extra_mb"] = r.pop("peak_extra_bytes") / 2**20
        r.setdefault("max_rel_err", None)
        r.update(
            family=family, batch=batch, img=img, targets_per_image=targets_per_image, dtype=dtype, device=str(device)
        )
    return rows


def run(
    batches=(16,),
    imgs=(416,),
    backends=None,
    dtype="float32",
    device=None,
    repeats=20,
    warmup=3,
    seed=0,
    progress: Callable[[], None] = lambda: None,
    targets=(10,),
    losses=("yolov3",),
    stats=False,
) -> list[dict[str, Any]]:
    """Rows with ``provider, family, batch, img, targets_per_image, dtype, device, median_ms, p20_ms,
    p80_ms, x_floor, speedup_vs_reference, peak_extra_mb, max_rel_err, loss``: one per provider,
    loss family, batch, image size and number of targets per image. With ``stats`` every fused
    backend is also timed with the gradient statistics on (provider ``<backend>+stats``)."""
    for family in losses:
        if family not in LOSSES:
            raise ValueError(f"losses: expected names from {LOSSES}, got {family!r}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    timed = {}
    for family in losses:
        if family == "yolov8":  # the anchor-free family's own backends
            names = backends if backends is not None else yolov8_backends(device)
            missing = [n for n in names if n not in yolov8_backends(device)]
            if missing:
                raise ValueError(
                    f"backends: the yolov8 loss has no {missing} backend on {device}; it has {yolov8_backends(device)}"
                )
            if stats:
                raise ValueError("stats: the yolov8 loss has no gradient statistics")
            timed[family] = list(names)
            continue
        names = backends
        if names is None:
            names = [b for b in loss_api.available_backends(device) if not (b == "triton" and device.type == "cpu")]
        for name in names:
            loss_api.resolve_backend(name, device)  # a clear error now, not after the first batch
        if stats:
            names = [*names, *(b + STATS_SUFFIX for b in names if b != "reference")]
        timed[family] = list(names)
    rows = []
    for family in losses:
        for img in imgs:
            for batch in batches:
                for n in targets:
                    rows += _measure_batch(
                        batch, img, n, timed[family], dtype, device, repeats, warmup, seed, progress, family
                    )
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    head = [
        "provider",
        "loss",
        "batch",
        "img",
        "targets/img",
        "median ms (p20-p80)",
        "x floor",
        "vs reference",
        "peak extra MB",
        "max rel err",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        cells = [
            r["provider"],
            r.get("family", "yolov3"),
            str(r["batch"]),
            str(r["img"]),
            str(r.get("targets_per_image", 10)),
            f"{r['median_ms']:.2f} ({r['p20_ms']:.2f}-{r['p80_ms']:.2f})",
            f"{r['x_floor']:.2f}",
            f"{r['speedup_vs_reference']:.1f}x" if r["speedup_vs_reference"] else "-",
            f"{r['peak_extra_mb']:.1f}" if r["provider"] != "floor" else "-",
            f"{r['max_rel_err']:.1e}" if r["max_rel_err"] is not None else "-",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: str) -> None:
    """Median ms per provider (log axes) against the batch size, one panel per image size; or, when
    the rows span several numbers of targets per image, against that number, one panel per batch
    and image size."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("--plot needs matplotlib: pip install matplotlib (or yolo_kernels[plot])") from None
    by_targets = len({r.get("targets_per_image", 10) for r in rows}) > 1
    x_key, x_label = ("targets_per_image", "targets per image") if by_targets else ("batch", "batch size")
    panels = sorted(
        {(r["batch"], r["img"]) if by_targets else (None, r["img"]) for r in rows}, key=lambda bi: (bi[1], bi[0] or 0)
    )
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    for ax, (batch, img) in zip(axes[0], panels):
        mine = [r for r in rows if r["img"] == img and (batch is None or r["batch"] == batch)]
        for provider in dict.fromkeys(r["provider"] for r in mine):
            pts = sorted((r.get(x_key, 10), r["median_ms"]) for r in mine if r["provider"] == provider)
            ax.plot(
                [x for x, _ in pts],
                [m for _, m in pts],
                marker="o",
                label=provider,
                linestyle="--" if provider == "floor" else "-",
            )
        ax.set_xscale("log")
        ax.set_yscale("log")
        # the measured sizes as plain numbers (a log axis would label 1, 2 as 10^0, 2x10^0)
        xs = sorted({r.get(x_key, 10) for r in mine})
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.minorticks_off()
        ax.set_xlabel(x_label)
        ax.set_ylabel("forward + backward, median ms")
        where = f"batch {batch}, {img}x{img}" if by_targets else f"{img}x{img}"
        family = "/".join(dict.fromkeys(r.get("family", "yolov3") for r in mine))
        ax.set_title(f"{family} loss, {where} ({rows[0]['device']}, {rows[0]['dtype']})")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def machine_line(device: torch.device, threads: int) -> str:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
        except (OSError, StopIteration):
            pass
        name = f"{name}, {threads} thread{'s' if threads != 1 else ''}"
    return f"{name}, torch {torch.__version__}, Python {platform.python_version()}"


class _Progress:
    """A one-line progress bar on stderr, silent when stderr is not a terminal."""

    def __init__(self, total: int):
        self.total, self.done = total, 0
        self.enabled = sys.stderr.isatty()

    def __call__(self) -> None:
        self.done += 1
        if self.enabled:
            filled = int(30 * self.done / self.total)
            print(f"\r[{'#' * filled}{'.' * (30 - filled)}] {self.done}/{self.total}", end="", file=sys.stderr)
            if self.done == self.total:
                print(file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m yolo_kernels.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda if available, else cpu")
    parser.add_argument("--batch", type=positive_int, nargs="+", default=[16], help="batch sizes (default 16)")
    parser.add_argument(
        "--img", type=positive_int, nargs="+", default=[416], help="image sizes in pixels (default 416)"
    )
    parser.add_argument(
        "--targets",
        type=nonnegative_int,
        nargs="+",
        default=[10],
        help="targets per image (default 10; e.g. 10 100 500 for dense scenes)",
    )
    parser.add_argument("--loss", nargs="+", choices=LOSSES, default=["yolov3"], help="loss families (default yolov3)")
    parser.add_argument(
        "--backends",
        nargs="+",
        metavar="BACKEND",
        help=f"backends to time, of {sorted(loss_api.BACKENDS)} (default: every one available on the device)",
    )
    parser.add_argument(
        "--stats", action="store_true", help="also time each fused backend with stats=True (provider <backend>+stats)"
    )
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="dtype of p (default float32)")
    parser.add_argument(
        "--threads", type=positive_int, help="CPU threads (torch.set_num_threads; default: torch's, OMP_NUM_THREADS)"
    )
    parser.add_argument("--repeats", type=positive_int, default=20, help="timed calls per provider (default 20)")
    parser.add_argument("--warmup", type=nonnegative_int, default=3, help="untimed calls first (default 3)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random predictions and targets (default 0)")
    parser.add_argument("--json", metavar="FILE", help="write the rows as JSON")
    parser.add_argument("--plot", metavar="FILE.png", help="plot ms vs batch per provider (needs matplotlib)")
    args = parser.parse_args(argv)
    device = check_device(parser, args.device) if args.device else None
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.backends:
        check_backends(parser, args.backends, device, "--backends")
        if "auto" in args.backends:
            parser.error("--backends: name the backends to time ('auto' is not one)")
    if args.plot:
        check_matplotlib(parser)
    if args.threads:
        torch.set_num_threads(args.threads)
    default = [b for b in loss_api.available_backends(device) if not (b == "triton" and device.type == "cpu")]

    def providers(family: str) -> int:  # per measured size: the floor and each timed provider
        if family == "yolov8":
            return 1 + len(args.backends or yolov8_backends(device))
        timed = args.backends or default
        return 1 + len(timed) + (sum(b != "reference" for b in timed) if args.stats else 0)

    machine = machine_line(device, torch.get_num_threads())
    print(
        f"{'/'.join(args.loss)} loss, forward + backward, p {args.dtype}, medians of {args.repeats} interleaved runs, "
        "caches evicted before each call"
    )
    print(f"machine: {machine}")
    if device.type == "cpu":
        print(threads_note(torch.get_num_threads()))
    sys.stdout.flush()  # the header before the progress bar
    if "yolov8" in args.loss and (args.stats or any(b not in yolov8_backends(device) for b in args.backends or [])):
        parser.error(f"--loss yolov8: its backends on {device.type} are {yolov8_backends(device)}, without --stats")
    sizes = len(args.batch) * len(args.img) * len(args.targets)
    progress = _Progress(sum(providers(f) for f in args.loss) * sizes)
    rows = run(
        args.batch,
        args.img,
        args.backends,
        args.dtype,
        device,
        args.repeats,
        args.warmup,
        args.seed,
        progress,
        targets=args.targets,
        losses=args.loss,
        stats=args.stats,
    )
    print(format_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "rows": rows}, f, indent=2)
    if args.plot:
        plot(rows, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
