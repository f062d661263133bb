"""The loss side by side: original, reference, torch.compile(reference), each fused backend, the floor.

    make bench          # pytest benchmarks --benchmark-only (batch 1, 16, 64; image 416, and 640 on GPU)
    pytest benchmarks --benchmark-only --benchmark-json=out.json && python benchmarks/compare.py out.json

One test per measured thing: provider x mode (forward, forward+backward) x batch x image x targets
per image (10, 100, 500: dense scenes are where matching and duplicates cost), plus the
components alone (matching, box loss, objectness) so that a regression can be located, and the
YOLOv5-style loss (``test_yolov5_*``: YOLOv5s's heads at 640, YK_BENCH_IMGS_V5) and the anchor-free
loss (``test_yolov8_*``: a YOLOv8 head at 640, YK_BENCH_IMGS_V8; the original is ultralytics'
``v8DetectionLoss`` where the package is installed) against their floors. The floor
is zero-filling existing buffers of p's size (what writing the gradient costs at least); fresh
zeros_like shows what a new gradient-sized allocation costs under the default glibc allocator.
``benchmark.extra_info`` records shapes, dtype, device, threads and versions. No timing is asserted.
YK_BENCH_BATCHES / YK_BENCH_IMGS / YK_BENCH_TARGETS choose the sizes; YK_BENCH_COMPILE=0 skips
torch.compile.
"""

import os

import original
import pytest
import torch

import yolo_kernels as yk
from conftest import DEVICE
from yolo_kernels import bench, yolov8
from yolo_kernels.anchor.options import model_anchors

MODES = ["forward+backward", "forward"]
# triton on CPU tensors is the interpreter (a test tool): not timed
BACKENDS = [b for b in yk.available_backends(DEVICE) if not (b == "triton" and DEVICE == "cpu")]
COMPILE = os.environ.get("YK_BENCH_COMPILE", "1") != "0"


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _record(benchmark, p, **extra):
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    device = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu"
    benchmark.extra_info.update(
        shapes=[list(x.shape) for x in p],
        dtype=str(p[0].dtype),
        device=device,
        threads=torch.get_num_threads(),
        torch=torch.__version__,
        triton=triton_version,
        **extra,
    )


def make_step(loss_fn, p, mode):
    def step():
        for x in p:
            x.grad = None
        loss, _ = loss_fn()
        if mode == "forward+backward":
            loss.backward()
        _sync()

    return step


@pytest.mark.parametrize("mode", MODES)
def test_original(benchmark, yolov3_batch, mode):
    model, p, targets = yolov3_batch
    _record(benchmark, p, mode=mode)
    benchmark(make_step(lambda: original.compute_loss(p, targets, model), p, mode))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_backend(benchmark, yolov3_batch, backend, mode):
    model, p, targets = yolov3_batch
    _record(benchmark, p, mode=mode)
    benchmark(make_step(lambda: yk.compute_loss(p, targets, model, backend=backend), p, mode))


@pytest.mark.skipif(not COMPILE, reason="YK_BENCH_COMPILE=0")
@pytest.mark.parametrize("mode", MODES)
def test_compiled_reference(benchmark, yolov3_batch, mode):
    model, p, targets = yolov3_batch
    compiled = torch.compile(yk.reference.compute_loss)
    _record(benchmark, p, mode=mode)
    benchmark(make_step(lambda: compiled(p, targets, model), p, mode))


def test_floor_zero_fill(benchmark, yolov3_batch):
    _, p, _ = yolov3_batch
    buffers = [torch.empty_like(x) for x in p]
    _record(benchmark, p)
    benchmark(lambda: ([b.zero_() for b in buffers], _sync()))


def test_fresh_zeros_like(benchmark, yolov3_batch):
    _, p, _ = yolov3_batch
    _record(benchmark, p)
    benchmark(lambda: ([torch.zeros_like(x) for x in p], _sync()))


# ------------------------------------------------------------------ components

COMPONENT_IMPLS = ["reference"] + (["cpp"] if "cpp" in BACKENDS and DEVICE == "cpu" else [])


@pytest.mark.parametrize("impl", COMPONENT_IMPLS)
def test_component_matching(benchmark, yolov3_batch, impl):
    model, p, targets = yolov3_batch
    anchors = model_anchors(model)
    grids = [tuple(x.shape[2:4]) for x in p]
    if impl == "reference":
        fn = lambda: [yk.reference.match(g, targets, a, 0.2) for g, a in zip(grids, anchors)]  # noqa: E731
    else:
        fn = lambda: [yk.ops.match(targets, a, *g, 0.2) for g, a in zip(grids, anchors)]  # noqa: E731
    _record(benchmark, p, component="matching")
    benchmark(fn)


@pytest.mark.parametrize("impl", COMPONENT_IMPLS)
def test_component_box_loss(benchmark, yolov3_batch, impl):
    model, p, targets = yolov3_batch
    m = yk.reference.match(tuple(p[2].shape[2:4]), targets, model_anchors(model)[2], 0.2)
    ps = p[2].detach()[m.b, m.a, m.gj, m.gi]
    if impl == "reference":

        def fn():
            x = ps[:, :4].clone().requires_grad_()
            pbox = torch.cat((x[:, :2].sigmoid(), x[:, 2:].exp().clamp(max=1e3) * m.anch), 1)
            (1 - yk.reference.box_iou(pbox, m.tbox)).mean().backward()
    else:
        fn = lambda: yk.ops.box_iou(ps, m.tbox, m.anch, "giou")  # noqa: E731
    _record(benchmark, p, component="box loss (largest layer)", pairs=int(m.b.numel()))
    benchmark(fn)


@pytest.mark.parametrize("impl", COMPONENT_IMPLS)
def test_component_objectness(benchmark, yolov3_batch, impl):
    _, p, _ = yolov3_batch
    logits = [x.detach()[..., 4] for x in p]
    targets = [torch.zeros_like(x) for x in logits]
    if impl == "reference":

        def fn():
            for x, y in zip(logits, targets):
                x = x.clone().requires_grad_()
                torch.nn.functional.binary_cross_entropy_with_logits(x, y).backward()
    else:
        fn = lambda: [yk.ops.bce_with_logits(x, y) for x, y in zip(logits, targets)]  # noqa: E731
    _record(benchmark, p, component="objectness BCE")
    benchmark(fn)


def test_original_and_reference_agree(yolov3_batch):
    """The baseline is timed only because it computes the same loss. Where pairs share a cell, the
    original's objectness target is whichever write ``index_put_`` keeps, which is unspecified
    once it runs in parallel (dense scenes): there lobj is only compared loosely."""
    model, p, targets = yolov3_batch
    a = original.compute_loss(p, targets, model)[1]
    b = yk.compute_loss(p, targets, model, backend="reference")[1]
    assert torch.allclose(a[[0, 2]], b[[0, 2]], rtol=1e-5)
    _, _, indices, _ = yk.build_targets(p, targets, model)
    shared = any(torch.stack(ix).unique(dim=1).shape[1] < ix[0].numel() for ix in indices)
    assert torch.allclose(a, b, rtol=1e-3 if shared else 1e-5)


def test_fused_backends_agree_with_reference(yolov3_batch):
    model, p, targets = yolov3_batch
    want = yk.compute_loss(p, targets, model, backend="reference")[1]
    for backend in BACKENDS:
        assert torch.allclose(yk.compute_loss(p, targets, model, backend=backend)[1], want, rtol=1e-5)


# ------------------------------------------------------------------ the YOLOv5-style loss

YOLOV5_PROVIDERS = list(dict.fromkeys(["reference", *BACKENDS]))


def _yolov5_loss(anchors, p, backend):
    from yolo_kernels.yolov5 import YOLOV5_STRIDES

    return yk.YOLOv5Loss(anchors, YOLOV5_STRIDES, p[0].shape[-1] - 5, backend=backend).to(p[0].device)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend", YOLOV5_PROVIDERS)
def test_yolov5_backend(benchmark, yolov5_batch, backend, mode):
    anchors, p, targets = yolov5_batch
    crit = _yolov5_loss(anchors, p, backend)
    _record(benchmark, p, mode=mode, loss="yolov5")
    benchmark(make_step(lambda: crit(p, targets), p, mode))


def test_yolov5_floor_zero_fill(benchmark, yolov5_batch):
    _, p, _ = yolov5_batch
    buffers = [torch.empty_like(x) for x in p]
    _record(benchmark, p, loss="yolov5")
    benchmark(lambda: ([b.zero_() for b in buffers], _sync()))


def test_yolov5_fused_backends_agree_with_reference(yolov5_batch):
    anchors, p, targets = yolov5_batch
    want = _yolov5_loss(anchors, p, "reference")(p, targets)[1]
    for backend in BACKENDS:
        assert torch.allclose(_yolov5_loss(anchors, p, backend)(p, targets)[1], want, rtol=1e-5)


# ------------------------------------------------------------------ the anchor-free (YOLOv8) loss

YOLOV8_PROVIDERS = bench.yolov8_backends(torch.device(DEVICE))


def _ultralytics_loss():
    try:
        from ultralytics.utils.loss import v8DetectionLoss
    except ImportError:
        pytest.skip("ultralytics is not installed (the original of the anchor-free loss)")
    return v8DetectionLoss


def _yolov8_step(crit, p, feats, targets, mode):
    def loss_fn():  # the trainer backpropagates the components' sum
        loss, items = crit({"boxes": p[0], "scores": p[1], "feats": feats}, targets)
        return loss.sum(), items

    return make_step(loss_fn, p, mode)


@pytest.mark.parametrize("mode", MODES)
def test_yolov8_original(benchmark, yolov8_batch, mode):
    model, p, feats, targets = yolov8_batch
    crit = _ultralytics_loss()(model)
    _record(benchmark, p, mode=mode, loss="yolov8")
    benchmark(_yolov8_step(crit, p, feats, targets, mode))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend", YOLOV8_PROVIDERS)
def test_yolov8_backend(benchmark, yolov8_batch, backend, mode):
    model, p, feats, targets = yolov8_batch
    crit = yolov8.DetectionLoss(model, backend=backend)
    _record(benchmark, p, mode=mode, loss="yolov8")
    benchmark(_yolov8_step(crit, p, feats, targets, mode))


def test_yolov8_floor_zero_fill(benchmark, yolov8_batch):
    _, p, _, _ = yolov8_batch
    buffers = [torch.empty_like(x) for x in p]
    _record(benchmark, p, loss="yolov8")
    benchmark(lambda: ([b.zero_() for b in buffers], _sync()))


def test_yolov8_backends_agree_with_the_original(yolov8_batch):
    model, p, feats, targets = yolov8_batch
    preds = {"boxes": p[0], "scores": p[1], "feats": feats}
    want = _ultralytics_loss()(model)(preds, targets)[0]
    for backend in YOLOV8_PROVIDERS:
        got = yolov8.DetectionLoss(model, backend=backend)(preds, targets)[0]
        assert torch.allclose(got, want, rtol=1e-5), (backend, got, want)
