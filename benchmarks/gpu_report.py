"""One command for a GPU machine: correctness, speed, memory, sync-freedom and CUDA-graph capture of
the Triton loss, written to ``benchmarks/results/gpu-<card>.json`` and ``.md``.

    bash benchmarks/gpu_report.sh [--out DIR]       # on a bare GPU machine: build in place, then this
    python benchmarks/gpu_report.py                 # batches 16 64, images 416 640
    python benchmarks/gpu_report.py --batch 16 --img 416 --quick

Exits 1 when a parity check is out of its limits, a host sync happens or a captured graph differs
from eager (2 without a usable GPU). The files are rewritten after every section, so a run cut
short keeps what it measured; the speed shapes the targets name come first, and no new shape
starts after ``--budget-s`` seconds.

Sections:
* parity: triton vs the reference on CUDA, float32 and bfloat16 ``p``, default options and a set
  with CIoU, focal, sum reduction, label smoothing and gr (max relative error of the loss items
  and of the gradients; bf16 against the reference on the same values upcast);
* speed: forward + backward medians of the reference, ``torch.compile(reference)`` and triton,
  taken in turns with the L2 cache evicted before each call (``bench.time_interleaved``: the
  device synchronised around each timed call), YOLOv3 shapes, 10 targets per image;
* the DRAM floor: bytes that must move (the gradient written once, the objectness logit of every
  cell read once) over the device-to-device copy bandwidth measured in the same run, and each
  provider's ratio to it;
* peak memory beyond the inputs, from the caching allocator;
* no host sync: forward + backward under ``torch.cuda.set_sync_debug_mode("error")``;
* CUDA graphs: forward + backward captured once and replayed, results identical to eager; and a
  whole training step (network, loss, backward, optimizer) captured and replayed like eager steps;
* train_step: a whole training step (YOLOv3 network, loss, backward, SGD) with the original loss,
  the reference, triton and a stand-in of the loss's floor, eager and captured in a CUDA graph:
  step time, images/s, the loss's share of the step, host syncs per step (``train_step.py``);
* anchor_free: the anchor-free family's triton backend (``gpu_anchor_free.py``): parity, no host
  sync, graph capture, speed and peak memory against the reference (and the original, where
  ultralytics is importable) at batch 16, 640, 80 / 365 classes, 10 / 300 / 1,000 boxes per image
  and an xView-like batch of 128.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import re
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # the source tree, installed or not (no pytest needed)
sys.path.insert(0, HERE)  # its sibling gpu_anchor_free.py, however it is run

import gpu_anchor_free  # noqa: E402
import train_step  # noqa: E402

import yolo_kernels as yk  # noqa: E402
from yolo_kernels.bench import (  # noqa: E402
    kernel_profile,
    percentile,
    spread_ms,
    time_interleaved,
    yolov3_inputs,
    yolov5_inputs,
)
from yolo_kernels.yolov5 import DEFAULT_HYP_V5, YOLOV5_STRIDES  # noqa: E402

#: Parity limits (max relative error against the reference): bf16 gradients are rounded to bf16.
TOLERANCES = {"float32": {"loss": 1e-5, "grad": 1e-4}, "bfloat16": {"loss": 1e-5, "grad": 1e-2}}
#: Option sets checked for parity besides the defaults: every kernel constexpr path on the GPU.
PARITY_OPTIONS = [{}, {"box_loss": "ciou", "fl_gamma": 1.5, "reduction": "sum", "label_smoothing": 0.1, "gr": 0.5}]
#: The same for the YOLOv5-style loss (YOLOv5s's heads at the report's image size).
YOLOV5_PARITY_OPTIONS = [{}, {"sort_obj_iou": True, "gr": 0.5, "fl_gamma": 1.5, "label_smoothing": 0.1}]


def floor_bytes(p) -> int:
    """Bytes a fused loss must move: write the gradient once, read every cell's objectness once."""
    grad = sum(x.numel() * x.element_size() for x in p)
    objectness = sum(x[..., 4].numel() * x.element_size() for x in p)
    return grad + objectness


def copy_bandwidth(device, nbytes=1 << 30) -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write counted)."""
    import triton.testing

    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src))
    return 2 * nbytes / (ms * 1e-3)


def rel_err(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def cuda_inputs(batch, img, dtype=torch.float32):
    model, p, targets = yolov3_inputs(batch, img)
    model = model.cuda()
    return model, [x.detach().cuda().to(dtype).requires_grad_() for x in p], targets.cuda()


def forward_backward(p, targets, model, backend=None, loss_fn=None):
    for x in p:
        x.grad = None
    loss, items = loss_fn(p, targets, model) if loss_fn else yk.compute_loss(p, targets, model, backend=backend)
    loss.backward()
    return loss, items


def _criterion(model, options: dict, backend: str):
    hyp = dict(model.hyp, fl_gamma=options.get("fl_gamma", model.hyp["fl_gamma"]))
    extra = {k: options[k] for k in ("box_loss", "reduction", "label_smoothing") if k in options}
    criterion = yk.YOLOv3Loss.from_model(
        model, hyp=hyp, giou_ratio=options.get("gr", model.gr), backend=backend, **extra
    )
    return criterion.cuda()  # anchors on the device: no host-to-device copy per call


def _parity_row(fast, ref, p, targets, batch, img, options) -> dict:
    """One parity row: criterion ``fast`` on ``p`` against ``ref`` on the same values in float32."""
    _, items = forward_backward(p, targets, None, loss_fn=lambda q, t, m: fast(q, t))
    grads = [x.grad.clone() for x in p]
    up = [x.detach().float().requires_grad_() for x in p]
    _, ref_items = forward_backward(up, targets, None, loss_fn=lambda q, t, m: ref(q, t))
    name = str(p[0].dtype).replace("torch.", "")
    row = {
        "dtype": name,
        "batch": batch,
        "img": img,
        "options": options,
        "loss_rel_err": rel_err(items, ref_items),
        "grad_rel_err": max(rel_err(g.float(), r.grad) for g, r in zip(grads, up)),
    }
    limits = TOLERANCES[name]
    row["passed"] = row["loss_rel_err"] <= limits["loss"] and row["grad_rel_err"] <= limits["grad"]
    return row


def parity(batch, img):
    """Triton vs the reference (float32 on the same values) for float32 and bfloat16 ``p``."""
    rows = []
    for options in PARITY_OPTIONS:
        for dtype in (torch.float32, torch.bfloat16):
            model, p, targets = cuda_inputs(batch, img, dtype)
            fast, ref = _criterion(model, options, "triton"), _criterion(model, options, "reference")
            rows.append(_parity_row(fast, ref, p, targets, batch, img, options or "defaults"))
    return rows


def _yolov5_criterion(anchors, options: dict, backend: str, autobalance=False):
    hyp = {**DEFAULT_HYP_V5, **{k: options[k] for k in ("fl_gamma", "label_smoothing") if k in options}}
    extra = {k: options[k] for k in ("gr", "sort_obj_iou") if k in options}
    return yk.YOLOv5Loss(anchors, YOLOV5_STRIDES, 80, hyp=hyp, backend=backend, autobalance=autobalance, **extra).cuda()


def parity_yolov5(batch, img):
    """The YOLOv5-style loss: triton vs the reference, float32 and bfloat16 ``p``."""
    rows = []
    for options in YOLOV5_PARITY_OPTIONS:
        for dtype in (torch.float32, torch.bfloat16):
            anchors, p, targets = yolov5_inputs(batch, img, dtype=dtype, device="cuda")
            fast, ref = _yolov5_criterion(anchors, options, "triton"), _yolov5_criterion(anchors, options, "reference")
            rows.append(_parity_row(fast, ref, p, targets, batch, img, {"family": "yolov5", **options}))
    return rows


def no_sync_yolov5_check(batch, img):
    """The YOLOv5-style loss with ``autobalance`` (whose original syncs per layer) never syncs."""
    anchors, p, targets = yolov5_inputs(batch, img, device="cuda")
    crit = _yolov5_criterion(anchors, {}, "triton", autobalance=True)
    forward_backward(p, targets, None, loss_fn=lambda q, t, m: crit(q, t))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        forward_backward(p, targets, None, loss_fn=lambda q, t, m: crit(q, t))
        return "passed"
    except RuntimeError as error:
        return f"FAILED: {error}"
    finally:
        torch.cuda.set_sync_debug_mode("default")


def speed(batch, img, bandwidth, quick=False, rounds=25):
    """Forward + backward of each provider side by side, with the DRAM floor of these shapes."""
    model, p, targets = cuda_inputs(batch, img)
    floor_ms = floor_bytes(p) / bandwidth * 1e3
    providers = {
        "reference": lambda: forward_backward(p, targets, model, "reference"),
        "triton": lambda: forward_backward(p, targets, model, "triton"),
    }
    if not quick:
        compiled = torch.compile(yk.reference.compute_loss)
        providers["torch.compile(reference)"] = lambda: forward_backward(p, targets, model, loss_fn=compiled)
    peaks, warmup_s = {}, {}
    for name, fn in providers.items():
        t0 = time.perf_counter()
        fn()  # warm-up (kernel and graph compilation)
        fn()
        torch.cuda.synchronize()
        warmup_s[name] = time.perf_counter() - t0
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        peaks[name] = (torch.cuda.max_memory_allocated() - base) / 2**20
    # in turns, the L2 cache evicted before each call (a training step evicts it too), the previous
    # gradients released untimed
    times = time_interleaved(
        providers,
        rounds,
        0,
        torch.device("cuda"),
        evict_bytes=256 * 2**20,
        before=lambda: [setattr(x, "grad", None) for x in p],
    )
    rows = []
    for name, values in times.items():
        spread = spread_ms(values)
        rows.append(
            {
                "provider": name,
                "batch": batch,
                "img": img,
                **spread,
                "x_dram_floor": spread["median_ms"] / floor_ms,
                "peak_extra_mb": peaks[name],
                "warmup_s": warmup_s[name],
            }
        )
    ref = rows[0]["median_ms"]
    for r in rows:
        r["speedup_vs_reference"] = ref / r["median_ms"]
    return rows, floor_ms


def no_sync_check(batch, img):
    """A training step's loss, and the same with the gradient statistics on, never syncs."""
    model, p, targets = cuda_inputs(batch, img)

    def with_stats(q, t, m):
        loss, items, stats = yk.compute_loss(q, t, m, backend="triton", stats=True)
        return loss, items

    for fn in (None, with_stats):  # compile the kernels first
        forward_backward(p, targets, model, "triton", loss_fn=fn)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        forward_backward(p, targets, model, "triton")
        forward_backward(p, targets, model, "triton", loss_fn=with_stats)
        return "passed"
    except RuntimeError as error:
        return f"FAILED: {error}"
    finally:
        torch.cuda.set_sync_debug_mode("default")


def cuda_graph_check(batch, img):
    """Forward + backward of the triton loss (value checks on) captured once and replayed: the
    replay equals eager, and its time against an eager call shows what host and launch costs."""
    model, p, targets = cuda_inputs(batch, img)
    eager_loss, _ = forward_backward(p, targets, model, "triton")
    eager = [eager_loss.detach().clone()] + [x.grad.clone() for x in p]
    # the eager graph holds the leaves' AccumulateGrad nodes, made on the default stream: capture on
    # another stream must not meet them (autograd would synchronise with that stream mid-capture)
    del eager_loss
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            forward_backward(p, targets, model, "triton")
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    for x in p:
        x.grad = None
    with torch.cuda.graph(graph):
        loss, _ = yk.compute_loss(p, targets, model, backend="triton")
        loss.backward()
    graph.replay()
    torch.cuda.synchronize()
    replayed = [loss.detach()] + [x.grad for x in p]
    if not all(torch.equal(a, b) for a, b in zip(eager, replayed)):
        return "FAILED: replay differs from eager"
    replay_ms, eager_ms = [], []
    for _ in range(20):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        graph.replay()
        torch.cuda.synchronize()
        replay_ms.append((time.perf_counter() - t0) * 1e3)
        t0 = time.perf_counter()
        forward_backward(p, targets, model, "triton")
        torch.cuda.synchronize()
        eager_ms.append((time.perf_counter() - t0) * 1e3)
    return (
        f"replay identical to eager; forward + backward at batch {batch}, {img}: "
        f"{percentile(eager_ms, 0.5):.3f} ms eager, {percentile(replay_ms, 0.5):.3f} ms replayed "
        "(medians of 20, L2 warm; the difference is host and launch time)"
    )


def cuda_tests(limit_s: float) -> str:
    """The test suite's CUDA cases (``pytest tests -k cuda``) in a subprocess: its summary line, or
    FAILED with the failures' names; a run cut short by ``limit_s`` says so (not a failure)."""
    import subprocess

    command = [sys.executable, "-m", "pytest", "tests", "-k", "cuda", "-q", "-p", "no:cacheprovider"]
    try:
        done = subprocess.run(
            command, cwd=os.path.dirname(HERE), capture_output=True, text=True, timeout=limit_s, check=False
        )
    except subprocess.TimeoutExpired as stopped:
        out = stopped.stdout.decode() if isinstance(stopped.stdout, bytes) else (stopped.stdout or "")
        progress = out.strip().splitlines()[-1:] or ["no output"]
        return f"incomplete: stopped after {limit_s:.0f} s (progress: {progress[0][:200]})"
    lines = done.stdout.strip().splitlines()
    summary = lines[-1] if lines else done.stderr.strip()[-300:]
    if done.returncode == 0:
        return summary
    failed = [line for line in lines if line.startswith("FAILED")][:10]
    return "FAILED: " + summary + ("; " + "; ".join(failed) if failed else "")


def launch_profile(batch, img):
    """Device kernels per forward + backward call of each provider (``bench.kernel_profile``): at
    common sizes each launch costs more host and driver time than its kernel takes on the GPU."""
    model, p, targets = cuda_inputs(batch, img)
    device = p[0].device
    return {
        provider: kernel_profile(functools.partial(forward_backward, p, targets, model, provider), device)
        for provider in ("reference", "triton")
    }


def host_profile(batch, img, calls=50):
    """Where a triton forward + backward call spends its host time: calls issued back to back
    (the GPU, faster than the host here, waits on it), then again under cProfile for the functions
    that take the most own time, in microseconds per call (the profiler adds its own overhead)."""
    import cProfile
    import pstats

    model, p, targets = cuda_inputs(batch, img)
    for _ in range(5):
        forward_backward(p, targets, model, "triton")
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        forward_backward(p, targets, model, "triton")
    host_us = (time.perf_counter() - t0) / calls * 1e6
    torch.cuda.synchronize()
    wall_us = (time.perf_counter() - t0) / calls * 1e6
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        forward_backward(p, targets, model, "triton")
    profiler.disable()
    torch.cuda.synchronize()
    rows = sorted(pstats.Stats(profiler).stats.items(), key=lambda kv: -kv[1][2])[:15]
    top = {
        f"{name} ({os.path.basename(path)}:{line})": round(own / calls * 1e6, 1)
        for (path, line, name), (_, _, own, _, _) in rows
    }
    return {"host_us_per_call": round(host_us, 1), "wall_us_per_call": round(wall_us, 1), "top_own_us": top}


def train_step_graph_check(batch=8, img=256):
    """A whole training step (yolov3-tiny forward, triton loss, backward, SGD step) captured in a
    CUDA graph and replayed: the losses of replayed steps equal eager steps from the same state."""
    from yolo_kernels.train import SyntheticShapes, build_model

    torch.manual_seed(0)
    model = build_model("yolov3-tiny", 6).cuda()
    images, targets = (t.cuda() for t in SyntheticShapes(6).batch(batch, img, torch.Generator().manual_seed(0)))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)  # stateless: replays restart from the same state

    def step():
        optimizer.zero_grad(set_to_none=False)
        loss, _ = yk.compute_loss(model(images), targets, model, backend="triton", validate=False)
        loss.backward()
        optimizer.step()
        return loss

    # deterministic convolutions: otherwise two eager runs from one state differ after a step or two
    saved = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        return _train_step_graph(step, model, state)
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved


def _train_step_graph(step, model, state):
    eager = [step().detach().clone() for _ in range(3)]
    model.load_state_dict(state)
    again = [step().detach().clone() for _ in range(3)]
    model.load_state_dict(state)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on a side stream, as capture requires
        step()
    torch.cuda.current_stream().wait_stream(side)
    model.load_state_dict(state)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = step()
    model.load_state_dict(state)  # in place: the graph's parameters and buffers
    replayed = []
    for _ in range(3):
        graph.replay()
        replayed.append(static_loss.detach().clone())
    torch.cuda.synchronize()
    spread = max(float(((a - b).abs() / b.abs()).max()) for a, b in zip(again, eager))
    close = all(torch.allclose(a, b, rtol=1e-4) for a, b in zip(eager, replayed))
    if close:
        return f"training step replays like eager (eager vs eager: max rel diff {spread:.1e})"
    return f"FAILED: eager {eager} vs replayed {replayed} (eager vs eager: max rel diff {spread:.1e})"


def _format_options(options) -> str:
    return options if isinstance(options, str) else ", ".join(f"{k}={v}" for k, v in options.items())


def markdown(report) -> str:
    lines = [
        f"# Triton loss on {report['device']}",
        "",
        f"{report['versions']}",
        "",
        f"Install: {report.get('install', 'not recorded')}",
        "",
        "## Parity vs the reference",
        "",
        "| dtype | options | batch | img | loss rel err | grad rel err | within limits |",
        "|---|---|---|---|---|---|---|",
    ]
    parity_rows = report.get("parity", [])
    if isinstance(parity_rows, str):  # the section failed: its error stands in for the table
        lines.append(f"| {parity_rows} |||||||")
        parity_rows = []
    for r in parity_rows:
        lines.append(
            f"| {r['dtype']} | {_format_options(r.get('options', 'defaults'))} | {r['batch']} | {r['img']} | "
            f"{r['loss_rel_err']:.1e} | {r['grad_rel_err']:.1e} | {'yes' if r.get('passed', True) else 'NO'} |"
        )
    if "copy_bandwidth_gbs" in report:
        lines += [
            "",
            f"## Forward + backward (copy bandwidth {report['copy_bandwidth_gbs']:.0f} GB/s)",
            "",
            "| provider | batch | img | median ms | p20-p80 ms | x DRAM floor | vs reference | peak extra MB |",
            "|---|---|---|---|---|---|---|---|",
        ]
    for r in report.get("speed", []):
        lines.append(
            f"| {r['provider']} | {r['batch']} | {r['img']} | {r['median_ms']:.3f} | "
            f"{r['p20_ms']:.3f}-{r['p80_ms']:.3f} | {r['x_dram_floor']:.2f} | "
            f"{r['speedup_vs_reference']:.1f}x | {r['peak_extra_mb']:.1f} |"
        )
    lines += [
        "",
        f"No host sync (set_sync_debug_mode('error')): {report.get('no_sync', 'not run')}",
        f"No host sync, YOLOv5-style loss with autobalance: {report.get('no_sync_yolov5', 'not run')}",
        f"CUDA graph capture: {report.get('cuda_graph', 'not run')}",
        f"CUDA graph of a whole training step: {report.get('train_step_graph', 'not run')}",
        f"Test suite, CUDA cases (`pytest tests -k cuda`): {report.get('cuda_tests', 'not run')}",
        "",
    ]
    launches = report.get("launches")
    if isinstance(launches, dict):
        lines += ["## Device kernels per forward + backward call", ""]
        lines += ["| provider | kernels | device ms (sum of kernel times) |", "|---|---|---|"]
        lines += [f"| {k} | {v['device_kernels']} | {v['device_ms']:.3f} |" for k, v in launches.items()]
        top = launches.get("triton", {}).get("top", {})
        if top and all(isinstance(v, list) for v in top.values()):
            lines += ["", "Triton call, the kernels that take the most device time:", ""]
            lines += ["| kernel | launches | device µs |", "|---|---|---|"]
            lines += [f"| `{name}` | {n} | {us:.1f} |" for name, (n, us) in top.items()]
        lines += [""]
    elif launches is not None:
        lines += [f"Device kernels per call: {launches}", ""]
    host = report.get("host")
    if isinstance(host, dict):
        lines += ["## Host time of a triton forward + backward call", ""]
        lines += [
            f"{host['host_us_per_call']:.0f} µs per call issued back to back "
            f"({host['wall_us_per_call']:.0f} µs until the GPU finished). Own time by function (cProfile):",
            "",
            "| function | µs per call |",
            "|---|---|",
        ]
        lines += [f"| `{name}` | {us:.1f} |" for name, us in host["top_own_us"].items()]
        lines += [""]
    elif host is not None:
        lines += [f"Host time: {host}", ""]
    if "anchor_free" in report:
        lines += gpu_anchor_free.markdown(report["anchor_free"])
    steps = report.get("train_step")
    if steps is not None:
        lines += ["## Training step (network, loss, backward, SGD; `train_step.py`)", ""]
        lines += [train_step.markdown(steps) if isinstance(steps, list) else f"Training step: {steps}", ""]
    problems = failures(report)
    scope = f" (only {', '.join(report['only'])} run)" if report.get("only") else ""
    lines += [f"Result{scope}: " + ("all checks passed" if not problems else "FAILED: " + "; ".join(problems)), ""]
    return "\n".join(lines)


def failures(report) -> list[str]:
    """What makes the report fail: parity out of limits, a host sync, a capture that differs."""
    out = [
        f"parity {r['dtype']} {_format_options(r.get('options', 'defaults'))}: loss {r['loss_rel_err']:.1e}, "
        f"grad {r['grad_rel_err']:.1e}"
        for r in report.get("parity", [])
        if isinstance(r, dict) and not r.get("passed", True)
    ]
    for key in ("no_sync", "no_sync_yolov5", "cuda_graph", "train_step_graph", "cuda_tests"):
        if str(report.get(key, "")).startswith("FAILED"):
            out.append(f"{key}: {report[key]}")
    if "anchor_free" in report:
        out += gpu_anchor_free.failures(report["anchor_free"])
    if "error" in report:
        out.append(f"error: {report['error']}")
    return out


def report_stem(out_dir: str, device_name: str) -> str:
    """``<out_dir>/gpu-<card>``, the card's name lower-cased with runs of other characters as ``-``."""
    return os.path.join(out_dir, "gpu-" + re.sub(r"[^A-Za-z0-9]+", "-", device_name).strip("-").lower())


def write_report(report, out_dir: str) -> str:
    """Write ``gpu-<card>.json`` and ``.md`` (called after every section: a cut-short run keeps what it measured)."""
    os.makedirs(out_dir, exist_ok=True)
    stem = report_stem(out_dir, report["device"])
    with open(stem + ".json", "w") as f:
        json.dump(report, f, indent=2)
    with open(stem + ".md", "w") as f:
        f.write(markdown(report))
    return stem


def speed_order(batches, imgs) -> list[tuple[int, int]]:
    """The speed shapes, the two the targets name first (smallest batch at the smallest image: the
    speed-up over the reference; largest at the largest: the DRAM floor), then the others."""
    shapes = [(b, i) for i in imgs for b in batches]
    first = [(min(batches), min(imgs)), (max(batches), max(imgs))]
    return list(dict.fromkeys(first + shapes))


#: The report's sections, in the order they run ("speed": every shape of --batch x --img).
SECTIONS = (
    "parity",
    "no_sync",
    "no_sync_yolov5",
    "cuda_graph",
    "train_step_graph",
    "launches",
    "host",
    "anchor_free",
    "speed",
    "train_step",
    "cuda_tests",
)


def selected(key: str, only) -> bool:
    """Whether section ``key`` (``speed_<batch>x<img>`` belongs to "speed") runs under ``--only``."""
    return not only or ("speed" if key.startswith("speed_") else key) in only


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--img", type=int, nargs="+", default=[416, 640])
    parser.add_argument("--quick", action="store_true", help="skip torch.compile(reference)")
    parser.add_argument("--out", default=os.path.join(HERE, "results"), help="folder for gpu-<card>.json and .md")
    parser.add_argument(
        "--tests-s",
        type=float,
        default=150.0,
        help="run the test suite's CUDA cases (pytest -k cuda) last, for at most this many seconds (0: skip)",
    )
    parser.add_argument(
        "--only",
        nargs="+",
        choices=SECTIONS,
        help="run only these sections (default: all): e.g. 'launches host speed' to measure a change in "
        "well under a minute of device time, then the whole report once",
    )
    parser.add_argument(
        "--budget-s",
        type=float,
        default=420.0,
        help="start no new speed shape after this many seconds (default 420: a 10-minute lease)",
    )
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_report: no CUDA device; run it on a GPU machine", file=sys.stderr)
        return 2
    import triton

    reason = yk.loss.BACKENDS["triton"].unavailable_reason(torch.device("cuda"))
    if reason is not None:
        print(f"gpu_report: the triton backend cannot run here: {reason}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    device = torch.device("cuda")
    report = {
        "device": torch.cuda.get_device_name(device),
        "versions": f"torch {torch.__version__}, triton {triton.__version__}, Python {platform.python_version()}",
        "install": os.environ.get("YK_INSTALL", "not installed by gpu_report.sh (run from the source tree)"),
        "only": args.only,
    }

    def section(key, fn, *fn_args):
        if not selected(key, args.only):
            return
        t0 = time.perf_counter()
        try:
            report[key] = fn(*fn_args)
        except Exception as error:
            report[key] = f"FAILED: {type(error).__name__}: {error}"
            if key in ("parity", "speed"):
                report.setdefault("error", f"{key}: {type(error).__name__}: {error}")
        report.setdefault("seconds", {})[key] = round(time.perf_counter() - t0, 1)
        write_report(report, args.out)
        print(f"gpu_report: {key} done in {report['seconds'][key]:.0f} s", flush=True)

    section("parity", lambda b, i: parity(b, i) + parity_yolov5(b, i), args.batch[0], args.img[0])
    section("no_sync", no_sync_check, args.batch[0], args.img[0])
    section("no_sync_yolov5", no_sync_yolov5_check, args.batch[0], args.img[0])
    section("cuda_graph", cuda_graph_check, args.batch[0], args.img[0])
    section("train_step_graph", train_step_graph_check)
    section("launches", launch_profile, args.batch[0], args.img[0])
    section("host", host_profile, args.batch[0], args.img[0])
    bandwidth = copy_bandwidth(device)
    report["copy_bandwidth_gbs"] = bandwidth / 1e9
    section("anchor_free", gpu_anchor_free.report, device, bandwidth, "triton", args.budget_s / 2)
    report["speed"], report["floor_ms"] = [], {}
    for batch, img in speed_order(args.batch, args.img) if selected("speed", args.only) else ():
        key = f"speed_{batch}x{img}"
        if time.perf_counter() - start > args.budget_s:
            report[key] = f"skipped: the {args.budget_s:.0f} s budget was spent"
            write_report(report, args.out)
            continue

        def measure(batch=batch, img=img):
            rows, floor_ms = speed(batch, img, bandwidth, args.quick)
            report["speed"] += rows
            report["floor_ms"][f"{batch}x{img}"] = floor_ms
            return "measured"

        section(key, measure)
    # after the speed shapes: whole networks take the most device time and memory of any section
    section("train_step", train_step.report, device, None, 10)
    if args.tests_s > 0:
        section("cuda_tests", cuda_tests, args.tests_s)
    report["total_seconds"] = round(time.perf_counter() - start, 1)
    stem = write_report(report, args.out)
    print(markdown(report))
    print(f"written: {stem}.json, {stem}.md")
    return 1 if failures(report) else 0


if __name__ == "__main__":
    sys.exit(main())
