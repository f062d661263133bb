"""The anchor-free family's section of the GPU report (``gpu_report.py --only anchor_free``): the
Triton backend of ``yolo_kernels.yolov8`` on CUDA against the reference (and ultralytics' original,
when it is importable on the GPU machine).

* parity: ``DetectionLoss`` (YOLOv8s head at 640, 80 classes, ``reg_max`` 16, class weights) and
  ``E2ELoss`` (a YOLO26-like head, ``reg_max`` 1) in float32 and bfloat16 against the reference
  (bfloat16 against the reference on the same values upcast): max relative error of the loss
  components and of the gradients;
* no host sync: forward + backward under ``torch.cuda.set_sync_debug_mode("error")``;
* CUDA graph: forward + backward captured once and replayed equals eager;
* device time: the kernels of one forward + backward of triton and the reference (count, summed
  device time, the longest) at the two shapes the targets name, against the DRAM floor: what a
  captured graph takes, without the host's time;
* speed and peak memory: forward + backward of each provider in turns, the L2 cache evicted before
  each call, at batch 16, 640 with 80 and 365 classes and 10 / 300 / 1,000 boxes per image, and an
  xView-like batch (128 images, 60 classes, a few images of ~5,000 boxes); the family's DRAM floor
  (``boxes`` and ``scores`` read once, their gradients written once) over the device copy
  bandwidth. A provider that runs out of memory is reported so, not skipped.

Every function takes the device and the fast backend's name, so that the logic runs on the CPU too
(``test_gpu_report.py``, with the cpp backend).
"""

from __future__ import annotations

import functools
import time
import types

import torch

from yolo_kernels import yolov8
from yolo_kernels.bench import kernel_profile, percentile, spread_ms, time_interleaved, yolov8_inputs

#: Parity limits (max relative error against the reference): bf16 gradients are rounded to bf16.
TOLERANCES = {"float32": {"loss": 1e-5, "grad": 1e-4}, "bfloat16": {"loss": 1e-5, "grad": 1e-2}}
#: (batch, img, nc, boxes per image) of the speed table; "xview" is the crowded batch.
SPEED_SHAPES = [(16, 640, 80, 10), (16, 640, 80, 300), (16, 640, 365, 300), (16, 640, 80, 1000), "xview"]
#: The shapes whose device time the targets name: 10 boxes (against the DRAM floor) and 300 boxes
#: with 365 classes (at most 1 ms).
DEVICE_SHAPES = [(16, 640, 80, 10), (16, 640, 365, 300)]


def _rel(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))


def original_loss(model, e2e=False):
    """ultralytics' own loss for ``model``, or ``None`` where the package is not importable."""
    try:
        from ultralytics.utils.loss import E2ELoss, v8DetectionLoss
    except Exception:  # not installed on the GPU machine (no package registry there)
        return None
    return E2ELoss(model) if e2e else v8DetectionLoss(model)


def _run(criterion, p, feats, targets, e2e=False):
    """Forward + backward of ``loss.sum()`` (the trainer's), on fresh gradients: loss and grads."""
    for x in p:
        x.grad = None
    preds = {"boxes": p[0], "scores": p[1], "feats": feats}
    if e2e:
        preds = {"one2many": preds, "one2one": {k: v.detach() if k != "feats" else v for k, v in preds.items()}}
        preds["one2one"]["boxes"].requires_grad_(True)
        preds["one2one"]["scores"].requires_grad_(True)
    loss, _ = criterion(preds, targets)
    loss.sum().backward()
    return loss.detach(), [x.grad for x in p]


def _criterion(model, backend: str, e2e: bool):
    return yolov8.E2ELoss(model, backend=backend) if e2e else yolov8.DetectionLoss(model, backend=backend)


def _e2e_model(model):
    model.args = types.SimpleNamespace(box=7.5, cls=0.5, dfl=1.5, epochs=100)
    return model


def parity(device: torch.device, fast: str = "triton", batch: int = 4, img: int = 640) -> list[dict]:
    """Rows ``{case, dtype, loss_rel_err, grad_rel_err, passed}`` of the fast backend against the
    reference on ``device``."""
    rows = []
    cases = [("DetectionLoss, nc 80, reg_max 16, class weights", 80, 16, False), ("E2ELoss, reg_max 1", 80, 1, True)]
    for label, nc, reg_max, e2e in cases:
        for dtype in (torch.float32, torch.bfloat16):
            model, p, feats, targets = yolov8_inputs(batch, img, 30, 0, dtype, device, nc=nc, reg_max=reg_max)
            if e2e:
                _e2e_model(model)
            else:
                model.class_weights = torch.rand(nc, generator=torch.Generator().manual_seed(1)) + 0.5
            loss, grads = _run(_criterion(model, fast, e2e), p, feats, targets, e2e)
            grads = [g.clone() for g in grads]
            up = [x.detach().float().requires_grad_(True) for x in p]
            ref_loss, ref_grads = _run(
                _criterion(model, "reference", e2e), up, [f.float() for f in feats], targets, e2e
            )
            tol = TOLERANCES["float32" if dtype == torch.float32 else "bfloat16"]
            loss_err = _rel(loss, ref_loss)
            grad_err = max(_rel(g, r) for g, r in zip(grads, ref_grads))
            rows.append(
                {
                    "case": label,
                    "dtype": str(dtype).replace("torch.", ""),
                    "batch": batch,
                    "img": img,
                    "loss_rel_err": loss_err,
                    "grad_rel_err": grad_err,
                    "passed": loss_err <= tol["loss"] and grad_err <= tol["grad"],
                }
            )
    return rows


def no_sync(device: torch.device, fast: str = "triton", batch: int = 16, img: int = 640) -> str:
    """Forward + backward (and the E2E loss) with host syncs turned into errors."""
    model, p, feats, targets = yolov8_inputs(batch, img, 30, 0, torch.float32, device)
    criterion = yolov8.DetectionLoss(model, backend=fast)
    e2e = yolov8.E2ELoss(_e2e_model(yolov8_inputs(batch, img, 30, 0, torch.float32, device)[0]), backend=fast)
    _run(criterion, p, feats, targets)
    _run(e2e, p, feats, targets, e2e=True)
    if device.type != "cuda":
        return "not applicable (no CUDA device)"
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _run(criterion, p, feats, targets)
        _run(e2e, p, feats, targets, e2e=True)
        return "passed"
    except RuntimeError as error:
        return f"FAILED: {error}"
    finally:
        torch.cuda.set_sync_debug_mode("default")


def cuda_graph(device: torch.device, fast: str = "triton", batch: int = 16, img: int = 640) -> str:
    """Forward + backward captured once and replayed: equal to eager, and the replay's time."""
    if device.type != "cuda":
        return "not applicable (no CUDA device)"
    model, p, feats, targets = yolov8_inputs(batch, img, 30, 0, torch.float32, device)
    criterion = yolov8.DetectionLoss(model, backend=fast, validate=False)
    eager_loss, eager_grads = _run(criterion, p, feats, targets)
    eager = [eager_loss.clone()] + [g.clone() for g in eager_grads]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            _run(criterion, p, feats, targets)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    for x in p:
        x.grad = None
    with torch.cuda.graph(graph):
        loss, _ = criterion({"boxes": p[0], "scores": p[1], "feats": feats}, targets)
        loss.sum().backward()
    graph.replay()
    torch.cuda.synchronize()
    replayed = [loss.detach()] + [x.grad for x in p]
    if not all(torch.equal(a, b) for a, b in zip(eager, replayed)):
        return "FAILED: replay differs from eager"
    times = []
    for _ in range(20):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        graph.replay()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return f"replay identical to eager; {percentile(times, 0.5):.3f} ms per replay at batch {batch}, {img} (L2 warm)"


def _xview_inputs(device, seed=0):
    """128 images at 640, 60 classes: four images of ~5,000 small boxes, the rest 20 to 200."""
    batch, nc = 128, 60
    model, p, feats, _ = yolov8_inputs(batch, 640, 1, seed, torch.float32, device, nc=nc)
    g = torch.Generator().manual_seed(seed)
    counts = [5000, 4967, 4500, 4000] + torch.randint(20, 200, (batch - 4,), generator=g).tolist()
    image = torch.repeat_interleave(torch.arange(batch), torch.tensor(counts)).float()
    n = image.shape[0]
    wh = torch.rand(n, 2, generator=g) * 0.02 + 0.003
    xy = torch.rand(n, 2, generator=g)
    targets = {
        "batch_idx": image.to(device),
        "cls": torch.randint(0, nc, (n, 1), generator=g).float().to(device),
        "bboxes": torch.cat((xy, wh), 1).to(device),
    }
    return model, p, feats, targets, "128 x 640, 60 classes, xView-like (4 images of 4,000-5,000 boxes)"


def _speed_shape(device: torch.device, shape, bandwidth: float, fast: str, rounds: int) -> list[dict]:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if shape == "xview":
        model, p, feats, targets, label = _xview_inputs(device)
    else:
        batch, img, nc, boxes = shape
        model, p, feats, targets = yolov8_inputs(batch, img, boxes, 0, torch.float32, device, nc=nc)
        label = f"{batch} x {img}, {nc} classes, {boxes} boxes/image"
    floor_ms = 2 * sum(x.numel() * x.element_size() for x in p) / bandwidth * 1e3
    providers = {name: yolov8.DetectionLoss(model, backend=name) for name in ("reference", fast)}
    original = original_loss(model)
    if original is not None:
        providers = {"original": original, **providers}

    def drop_grads():
        for x in p:
            x.grad = None

    rows, calls, peaks = [], {}, {}
    for name, criterion in providers.items():
        call = functools.partial(_run, criterion, p, feats, targets)
        try:
            call()
            sync()
            base = torch.cuda.memory_allocated() if device.type == "cuda" else 0
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            call()
            sync()
            peaks[name] = (torch.cuda.max_memory_allocated() - base) / 2**20 if device.type == "cuda" else 0.0
            calls[name] = call
        except torch.OutOfMemoryError:
            rows.append({"shape": label, "provider": name, "oom": True})
            drop_grads()
            torch.cuda.empty_cache()
    times = time_interleaved(calls, rounds, 0, device, evict_bytes=256 * 2**20, before=drop_grads)
    for name, values in times.items():
        spread = spread_ms(values)
        rows.append(
            {
                "shape": label,
                "provider": name,
                **spread,
                "x_dram_floor": spread["median_ms"] / floor_ms,
                "peak_extra_mb": peaks[name],
                "floor_ms": floor_ms,
            }
        )
    return rows


def device_time(device: torch.device, bandwidth: float, fast: str = "triton", shapes=None) -> list[dict]:
    """Rows ``{shape, provider, device_kernels, device_ms, x_dram_floor, top}``: the device kernels
    of one forward + backward (``bench.kernel_profile``) of ``fast`` and the reference, the sum of
    their times against the family's DRAM floor (``bandwidth`` in bytes/s)."""
    rows = []
    for batch, img, nc, boxes in shapes or DEVICE_SHAPES:
        model, p, feats, targets = yolov8_inputs(batch, img, boxes, 0, torch.float32, device, nc=nc)
        floor_ms = 2 * sum(x.numel() * x.element_size() for x in p) / bandwidth * 1e3
        for name in ("reference", fast):
            criterion = yolov8.DetectionLoss(model, backend=name)
            profile = kernel_profile(functools.partial(_run, criterion, p, feats, targets), device)
            label = f"{batch} x {img}, {nc} classes, {boxes} boxes/image"
            rows.append(dict(shape=label, provider=name, x_dram_floor=profile["device_ms"] / floor_ms, **profile))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def speed(device: torch.device, bandwidth: float, fast: str = "triton", shapes=None, rounds: int = 10, budget_s=None):
    """Rows ``{shape, provider, median_ms, p20_ms, p80_ms, x_dram_floor, peak_extra_mb}``; a provider
    out of memory gives ``oom: True``. ``bandwidth`` in bytes/s (the floor's)."""
    rows, start = [], time.perf_counter()
    for shape in shapes or SPEED_SHAPES:
        if budget_s is not None and time.perf_counter() - start > budget_s:
            rows.append({"shape": str(shape), "provider": "-", "skipped": f"the {budget_s:.0f} s budget was spent"})
            continue
        rows += _speed_shape(device, shape, bandwidth, fast, rounds)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def report(device: torch.device, bandwidth: float, fast: str = "triton", budget_s: float | None = None) -> dict:
    """All of it: ``{parity, no_sync, cuda_graph, device, speed}`` (a part that raised gives its error)."""
    out = {}
    for key, fn in (
        ("parity", lambda: parity(device, fast)),
        ("no_sync", lambda: no_sync(device, fast)),
        ("cuda_graph", lambda: cuda_graph(device, fast)),
        ("device", lambda: device_time(device, bandwidth, fast)),
        ("speed", lambda: speed(device, bandwidth, fast, budget_s=budget_s)),
    ):
        try:
            out[key] = fn()
        except Exception as error:
            out[key] = f"FAILED: {type(error).__name__}: {error}"
    return out


def failures(section) -> list[str]:
    """What in the section fails the report: parity out of limits, a sync, a differing replay."""
    if not isinstance(section, dict):
        return [f"anchor_free: {section}"] if str(section).startswith("FAILED") else []
    out = [
        f"anchor_free parity {r['case']} {r['dtype']}: loss {r['loss_rel_err']:.1e}, grad {r['grad_rel_err']:.1e}"
        for r in section.get("parity", [])
        if isinstance(r, dict) and not r["passed"]
    ]
    for key in ("parity", "no_sync", "cuda_graph", "device", "speed"):
        if isinstance(section.get(key), str) and section[key].startswith("FAILED"):
            out.append(f"anchor_free {key}: {section[key]}")
    return out


def _table(header: str, rows, render) -> list[str]:
    """A markdown table: the header, its rule, a line per row (``render``), or the section's error
    in one line when ``rows`` is a string."""
    columns = header.count("|") - 1
    lines = [header, "|" + "---|" * columns]
    if isinstance(rows, str):
        return lines + [f"| {rows} " + "|" * columns]
    return lines + [render(r) for r in rows]


def _parity_line(r) -> str:
    return (
        f"| {r['case']} | {r['dtype']} | {r['batch']} | {r['img']} | {r['loss_rel_err']:.1e} | "
        f"{r['grad_rel_err']:.1e} | {'yes' if r['passed'] else 'NO'} |"
    )


def _device_line(r) -> str:
    longest = ", ".join(f"`{name}` {n}, {us:.1f}" for name, (n, us) in list(r["top"].items())[:3])
    return (
        f"| {r['shape']} | {r['provider']} | {r['device_kernels']} | {r['device_ms']:.3f} | "
        f"{r['x_dram_floor']:.2f} | {longest} |"
    )


def _speed_line(r) -> str:
    if r.get("oom"):
        return f"| {r['shape']} | {r['provider']} | out of memory | | | |"
    if "skipped" in r:
        return f"| {r['shape']} | - | {r['skipped']} | | | |"
    return (
        f"| {r['shape']} | {r['provider']} | {r['median_ms']:.3f} | {r['p20_ms']:.3f}-{r['p80_ms']:.3f} | "
        f"{r['x_dram_floor']:.2f} | {r['peak_extra_mb']:.1f} |"
    )


def markdown(section) -> list[str]:
    lines = ["## The anchor-free family (yolo_kernels.yolov8, triton backend)", ""]
    if not isinstance(section, dict):
        return lines + [str(section), ""]
    header = "| case | dtype | batch | img | loss rel err | grad rel err | within limits |"
    lines += _table(header, section.get("parity", []), _parity_line)
    lines += [
        "",
        f"No host sync: {section.get('no_sync', 'not run')}",
        f"CUDA graph capture: {section.get('cuda_graph', 'not run')}",
        "",
        "Device time of one forward + backward (the kernels' sum, `torch.profiler`):",
        "",
    ]
    header = "| shape | provider | device kernels | device ms | x DRAM floor | longest kernels (launches, µs) |"
    lines += _table(header, section.get("device", []), _device_line)
    lines.append("")
    header = "| shape | provider | median ms | p20-p80 ms | x DRAM floor | peak extra MB |"
    lines += _table(header, section.get("speed", []), _speed_line)
    return lines + [""]
