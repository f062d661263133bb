"""How much of a training step is the loss? A real step with each loss, side by side.

    python benchmarks/train_step.py                                  # CUDA: the three cases below
    python benchmarks/train_step.py --cases yolov3:16x416 --steps 20
    python benchmarks/train_step.py --device cpu --cases yolov3:2x128 --cfg yolov3-tiny --steps 3

A step is what a trainer runs: the Darknet network's forward (under bf16 autocast on CUDA with
``--amp``, the default there, as mixed-precision trainers run it), the loss on the network's heads,
backward, an SGD step. The losses, called in turns (one step of each, then again): the original
(``original.py``'s YOLOv3 ``compute_loss``; for the YOLOv5-style loss the repository's
transcription of yolov5's ``ComputeLoss`` in ``tests/original_yolov5.py``), the reference, the fused
backend of the device (triton on CUDA, cpp on the CPU), and a stand-in: one kernel in forward
(a zero loss) and one memset of the heads' gradients in backward, i.e. the step with a loss that
costs no more than its own floor. The loss's share of a step is ``(step - stand-in step) / step``.

Cases (``--cases``, ``loss:BATCHxIMG``): YOLOv3's loss at batch 16, 416 and batch 64, 640 on the
YOLOv3 network, and the YOLOv5-style loss (``YOLOv5Loss`` set up as yolov5's ``train.py`` does) at
batch 16, 640 on the same network: its three heads have YOLOv5s's shapes (3 anchors x 85 channels
at strides 8, 16, 32); the network itself is heavier than YOLOv5s, so the loss's share of a
YOLOv5s step would be larger than the one shown.

Per case and loss: the median step time (eager, ms, with p20-p80), images/s, the loss's share,
host syncs per step (CUDA: counted with ``torch.cuda.set_sync_debug_mode("warn")`` over one
step), and on CUDA the median of the whole step captured in a CUDA graph and replayed (the
capture PyTorch offers for a whole step; a loss that syncs cannot be captured, which is said, and
is not tried; the graphs are timed one after the other, each released before the next, since
each keeps a whole step's activations). A loss that runs out of memory or fails is reported as
such, and the others still run.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
import warnings

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # the source tree, installed or not
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))  # original_yolov5.py

import original  # noqa: E402
import original_yolov5  # noqa: E402

import yolo_kernels as yk  # noqa: E402
from yolo_kernels.bench import percentile  # noqa: E402
from yolo_kernels.train import SyntheticShapes, _yolov5_criterion, build_model  # noqa: E402

CUDA_CASES = ("yolov3:16x416", "yolov3:64x640", "yolov5:16x640")
CPU_CASES = ("yolov3:2x128",)
NUM_CLASSES = 80


class _StandIn(torch.autograd.Function):
    """A loss that costs its floor only: forward one kernel (a zero of the loss's shape), backward
    one memset (the heads' gradients, zeros, carved from one buffer)."""

    @staticmethod
    def forward(ctx, *p):
        ctx.shapes = [(x.shape, x.dtype) for x in p]
        return p[0].new_zeros(1, dtype=torch.float32)

    @staticmethod
    def backward(ctx, grad):
        sizes = [shape.numel() for shape, _ in ctx.shapes]
        buffer = grad.new_zeros(sum(sizes), dtype=ctx.shapes[0][1])
        return tuple(g.view(shape) for g, (shape, _) in zip(buffer.split(sizes), ctx.shapes))


def stand_in(p, targets):
    return _StandIn.apply(*p)


def fused_backend(device: torch.device) -> str:
    return "triton" if device.type == "cuda" else "cpp"


def criteria(loss: str, model, img: int, device: torch.device) -> dict:
    """``{name: fn(p, targets) -> loss [1]}`` for the case's loss: original, reference, the fused
    backend, stand-in."""
    fused = fused_backend(device)
    if loss == "yolov3":
        out = {
            "original": lambda p, t: original.compute_loss(p, t, model)[0],
            "reference": lambda p, t: yk.compute_loss(p, t, model, backend="reference")[0],
            fused: lambda p, t: yk.compute_loss(p, t, model, backend=fused, validate=False)[0],
        }
    else:
        ours = {name: _yolov5_criterion(model, img, name) for name in ("reference", fused)}
        crit = ours["reference"]
        grid_anchors = torch.stack(list(crit.anchor_vecs)).to(device)  # grid units, as the original takes them
        hyp, nc, balance = dict(crit.hyp), crit.nc, crit.balance

        def original_v5(p, t):
            return original_yolov5.compute_loss(p, t, grid_anchors, hyp, nc, balance)[0]

        out = {"original": original_v5}
        out.update({name: (lambda p, t, c=c: c(p, t)[0]) for name, c in ours.items()})
    out["stand-in"] = stand_in
    return out


@dataclasses.dataclass
class Case:
    loss: str
    batch: int
    img: int

    @classmethod
    def parse(cls, text: str) -> Case:
        try:
            loss, shape = text.split(":")
            batch, img = (int(v) for v in shape.split("x"))
        except ValueError:
            raise ValueError(f"--cases: expected LOSS:BATCHxIMG (e.g. yolov3:16x416), got {text!r}") from None
        if loss not in ("yolov3", "yolov5"):
            raise ValueError(f"--cases: the loss is yolov3 or yolov5, got {loss!r} in {text!r}")
        return cls(loss, batch, img)

    @property
    def label(self) -> str:
        return f"{self.loss}:{self.batch}x{self.img}"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_step(model, optimizer, images, targets, loss_fn, amp: bool):
    device = images.device

    def step():
        optimizer.zero_grad(set_to_none=False)  # in place: a captured graph keeps the same buffers
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp, cache_enabled=False):
            p = model(images)
        loss = loss_fn(p, targets)
        loss.sum().backward()
        optimizer.step()
        return loss

    return step


def count_syncs(step, device: torch.device) -> int | None:
    """Host syncs in one step (CUDA only: ``set_sync_debug_mode`` warns on each)."""
    if device.type != "cuda":
        return None
    _sync(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    _sync(device)
    return sum("synchroniz" in str(w.message) for w in caught)


def _describe(error: BaseException) -> str:
    if isinstance(error, torch.OutOfMemoryError):
        return "out of memory"
    first = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__}: {first[:120]}"


def _release(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def capture(step, device: torch.device):
    """``(replay, None)``: the step captured in a CUDA graph, or ``(None, why)``."""
    if device.type != "cuda":
        return None, "CUDA only"
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up on a side stream, as capture requires
            step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
    except Exception as error:  # a loss that syncs (or allocates from the host) cannot be captured
        torch.cuda.synchronize()
        return None, f"cannot be captured: {_describe(error)}"
    return graph.replay, None


def time_in_turns(calls: dict, steps: int, device: torch.device) -> dict[str, list[float]]:
    """Each call once per round, in turns, the device synchronised around each: ms per call."""
    times = {name: [] for name in calls}
    for _ in range(steps):
        for name, call in calls.items():
            _sync(device)
            t0 = time.perf_counter()
            call()
            _sync(device)
            times[name].append((time.perf_counter() - t0) * 1e3)
    return times


def measure_case(case: Case, device: torch.device, steps: int, cfg: str, amp: bool, graphs: bool) -> list[dict]:
    """The rows of one case: one per loss."""
    torch.manual_seed(0)
    model = build_model(cfg, NUM_CLASSES).to(device)
    images, targets = SyntheticShapes(NUM_CLASSES).batch(case.batch, case.img, torch.Generator().manual_seed(0))
    images, targets = images.to(device), targets.to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-6, momentum=0.9)
    losses = criteria(case.loss, model, case.img, device)
    steps_by_loss = {name: make_step(model, optimizer, images, targets, fn, amp) for name, fn in losses.items()}
    rows = {name: {"case": case.label, "loss": name} for name in losses}
    runnable = {}
    for name, step in steps_by_loss.items():
        try:
            step()  # warm-up: kernels compiled, tables built, allocator primed
            rows[name]["syncs"] = count_syncs(step, device)
            runnable[name] = step
        except Exception as error:  # out of memory, or a loss that fails here: the others still run
            rows[name]["error"] = _describe(error)
            _release(device)
    eager = time_in_turns(runnable, steps, device)
    captured = {}
    for name, step in runnable.items() if graphs else ():
        syncs = rows[name].get("syncs")
        if syncs:  # a capture would fail on the first sync (and trying can upset the device's state)
            rows[name]["graph"] = f"cannot be captured: {syncs} host syncs per step"
            continue
        # one graph at a time: each keeps a memory pool of a whole step's activations
        replay, why = capture(step, device)
        if replay is None:
            rows[name]["graph"] = why
        else:
            captured[name] = time_in_turns({name: replay}, steps, device)[name]
        del replay
        _release(device)
    base = percentile(eager["stand-in"], 0.5) if "stand-in" in eager else None
    base_graph = percentile(captured["stand-in"], 0.5) if "stand-in" in captured else None
    for name, times in eager.items():
        ms = percentile(times, 0.5)
        row = rows[name]
        row.update(ms=ms, p20=percentile(times, 0.2), p80=percentile(times, 0.8), images_per_s=case.batch / ms * 1e3)
        if base is not None and name != "stand-in":
            row["loss_share"] = (ms - base) / ms
        if name in captured:
            row["graph_ms"] = percentile(captured[name], 0.5)
            if base_graph is not None and name != "stand-in":
                row["graph_loss_share"] = (row["graph_ms"] - base_graph) / row["graph_ms"]
    return list(rows.values())


def report(device: torch.device, cases=None, steps: int = 15, cfg: str = "yolov3", amp=None, graphs=True) -> list:
    """Every case's rows (``measure_case``); a case that fails becomes one row saying why."""
    amp = device.type == "cuda" if amp is None else amp
    cases = [Case.parse(c) if isinstance(c, str) else c for c in (cases or default_cases(device))]
    rows = []
    for case in cases:
        try:
            rows += measure_case(case, device, steps, cfg, amp, graphs)
        except torch.OutOfMemoryError:  # the network alone
            rows.append({"case": case.label, "loss": "all", "error": "out of memory"})
        _release(device)
    return rows


def default_cases(device: torch.device) -> tuple[str, ...]:
    return CUDA_CASES if device.type == "cuda" else CPU_CASES


def _pct(v) -> str:
    return "" if v is None else f"{100 * v:.1f}%"


def markdown(rows: list[dict]) -> str:
    lines = [
        "| case | loss | step ms (p20-p80) | images/s | loss share | host syncs | graph step ms | loss share (graph) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['case']} | {r['loss']} | {r['error']} | | | | | |")
            continue
        syncs = "n/a" if r.get("syncs") is None else str(r["syncs"])
        graph = f"{r['graph_ms']:.2f}" if "graph_ms" in r else r.get("graph", "")
        lines.append(
            f"| {r['case']} | {r['loss']} | {r['ms']:.2f} ({r['p20']:.2f}-{r['p80']:.2f}) | {r['images_per_s']:.0f} | "
            f"{_pct(r.get('loss_share'))} | {syncs} | {graph} | {_pct(r.get('graph_loss_share'))} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--cases", nargs="+", help=f"LOSS:BATCHxIMG (default on CUDA: {' '.join(CUDA_CASES)})")
    parser.add_argument("--steps", type=int, default=15, help="timed steps per loss (in turns)")
    parser.add_argument("--cfg", default="yolov3", help="the Darknet network (yolo_kernels/models/cfg)")
    parser.add_argument(
        "--amp", action=argparse.BooleanOptionalAction, default=None, help="bf16 autocast (CUDA default)"
    )
    parser.add_argument("--no-graphs", action="store_true", help="skip the captured steps")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    try:
        cases = [Case.parse(c) for c in args.cases or default_cases(device)]
    except ValueError as error:
        parser.error(str(error))
    rows = report(device, cases, args.steps, args.cfg, args.amp, not args.no_graphs)
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
