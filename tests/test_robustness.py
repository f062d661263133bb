"""Extreme and half-precision inputs, autocast training steps, fuzzed malformed input to the
registered ops, and determinism, on every backend that runs here."""

import pytest
import torch
from helpers import make_p, make_targets, random_anchors
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import yolo_kernels as yk
from yolo_kernels.anchor.options import LossOptions

FUSED = [b for b in ("cpp", "triton") if b in yk.available_backends("cpu")]
ALL = ["reference"] + FUSED


def run(backend, p, targets, anchors, options):
    q = [x.clone().requires_grad_() for x in p]
    loss, items, _, _ = yk.loss.resolve_backend(backend, q[0].device).loss(q, targets, anchors, options)
    loss.backward()
    return items, [x.grad for x in q]


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("box_loss", ["giou", "iou", "diou", "ciou"])
@pytest.mark.parametrize("magnitude", [1e4, 80.0])
def test_extreme_logits_give_finite_loss_and_gradients(backend, box_loss, magnitude, gen):
    anchors = random_anchors([2, 3], gen)
    targets = make_targets(6, 2, 4, gen)
    signs = [torch.randint(0, 2, (2, na, 3, 3, 9), generator=gen) * 2.0 - 1 for na in (2, 3)]
    for p in (
        [s * magnitude for s in signs],
        [torch.full_like(s, magnitude) for s in signs],
        [torch.full_like(s, -magnitude) for s in signs],
    ):
        for fl_gamma in (0.0, 1.5):
            items, grads = run(backend, p, targets, anchors, LossOptions(nc=4, box_loss=box_loss, fl_gamma=fl_gamma))
            assert torch.isfinite(items).all() and all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_finite_where_float32_is(backend, dtype, gen):
    anchors = random_anchors([3], gen)
    targets = make_targets(8, 2, 6, gen)
    limit = 6e4 if dtype == torch.float16 else 1e4
    for scale in (1.0, 20.0, limit):
        p32 = [(torch.randn(2, 3, 4, 4, 11, generator=gen) * scale).clamp(-limit, limit)]
        ph = [x.to(dtype) for x in p32]
        items32, _ = run("reference", [x.float() for x in ph], targets, anchors, LossOptions(nc=6))
        items, grads = run(backend, ph, targets, anchors, LossOptions(nc=6))
        assert torch.isfinite(items32).all()
        assert torch.isfinite(items).all() and torch.isfinite(grads[0].float()).all()
        torch.testing.assert_close(items, items32, rtol=1e-4, atol=1e-4 * float(items32.abs().max()))


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_autocast_training_steps_stay_finite(backend):
    torch.manual_seed(0)
    model = yk.models.Darknet("yolov3-tiny")
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.937)
    images = torch.rand(2, 3, 64, 64)
    targets = torch.tensor([[0, 3, 0.5, 0.5, 0.4, 0.3], [1, 7, 0.2, 0.7, 0.2, 0.2], [1, 7, 0.21, 0.7, 0.2, 0.2]])
    losses = []
    for _ in range(3):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            p = model(images)
        assert p[0].dtype == torch.bfloat16
        loss, items = yk.compute_loss(p, targets, model, backend=backend)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        assert torch.isfinite(items).all()
        assert all(torch.isfinite(w.grad).all() for w in model.parameters() if w.grad is not None)
        losses.append(float(loss.detach()))
    assert losses[-1] != losses[0]


@pytest.mark.parametrize("backend", ALL)
def test_bitwise_deterministic_runs(backend, gen):
    anchors = random_anchors([3, 2], gen)
    p = make_p(2, [3, 2], [(5, 4), (3, 3)], 7, gen)
    targets = make_targets(9, 2, 7, gen)
    targets = torch.cat((targets, targets[:4]))
    first = run(backend, p, targets, anchors, LossOptions(nc=7, gr=0.7))
    second = run(backend, p, targets, anchors, LossOptions(nc=7, gr=0.7))
    assert torch.equal(first[0], second[0]) and all(torch.equal(a, b) for a, b in zip(first[1], second[1]))


# ------------------------------------------------------------------ fuzzing the registered ops

shapes = st.lists(st.integers(0, 4), min_size=0, max_size=6).map(tuple)
dtypes = st.sampled_from([torch.float32, torch.float64, torch.float16, torch.int64, torch.bool, torch.uint8])


@st.composite
def tensors(draw):
    shape, dtype = draw(shapes), draw(dtypes)
    t = torch.randn(shape) * draw(st.sampled_from([0.0, 1.0, 1e30, float("nan")]))
    t = t.abs() if draw(st.booleans()) else t
    return t.to(dtype) if dtype.is_floating_point else t.abs().clamp(max=3).to(dtype)


def _call(fn):
    try:
        fn()
    except (RuntimeError, TypeError, ValueError, NotImplementedError) as error:
        assert str(error), "an error without a message"


fuzz = settings(derandomize=True, max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))


@pytest.mark.skipif("cpp" not in FUSED, reason="the C++ extension is not built")
@fuzz
@given(tensors(), tensors(), st.integers(-2, 5), st.integers(-2, 5), st.floats(allow_nan=True))
def test_fuzz_match(targets, anchors, ny, nx, iou_t):
    _call(lambda: torch.ops.yolo_kernels.match(targets, anchors, ny, nx, iou_t))
    _call(lambda: torch.ops.yolo_kernels.match(targets, anchors, ny, nx, iou_t, "yolov5"))


@pytest.mark.skipif("cpp" not in FUSED, reason="the C++ extension is not built")
@fuzz
@given(
    tensors(), tensors(), tensors(), st.sampled_from(["giou", "ciou", "bad", ""]), tensors(), st.floats(), st.floats()
)
def test_fuzz_box_iou_and_bce(ps, tbox, anch, kind, y, pos_weight, gamma):
    _call(lambda: torch.ops.yolo_kernels.box_iou(ps, tbox, anch, kind))
    _call(lambda: torch.ops.yolo_kernels.bce_with_logits(ps, y, pos_weight, gamma))


@pytest.mark.skipif("cpp" not in FUSED, reason="the C++ extension is not built")
@fuzz
@given(
    st.lists(tensors(), max_size=3),
    tensors(),
    st.lists(tensors(), max_size=3),
    st.floats(-1, 2),
    st.sampled_from(["giou", "iou", "x"]),
    st.sampled_from(["mean", "sum", "none"]),
    st.booleans(),
    st.sampled_from(["yolov3", "yolov5", "v4"]),
    st.booleans(),
)
def test_fuzz_fused_loss(p, targets, anchors, gr, box_loss, reduction, compute_grad, family, sort_obj_iou):
    _call(
        lambda: torch.ops.yolo_kernels.fused_loss(
            p,
            targets,
            anchors,
            None,
            family,
            gr,
            3.54,
            37.4,
            1.0,
            64.3,
            1.0,
            0.2,
            0.0,
            0.0,
            box_loss,
            reduction,
            sort_obj_iou,
            compute_grad,  # compute_stats
            compute_grad,
        )
    )


@pytest.mark.skipif("cpp" not in FUSED, reason="the C++ extension is not built")
@fuzz
@given(
    st.integers(1, 3),
    st.integers(1, 3),
    st.integers(1, 4),
    st.integers(1, 4),
    st.integers(1, 4),
    st.lists(st.tuples(*[st.one_of(st.floats(-2, 5), st.sampled_from([float("nan"), float("inf")]))] * 6), max_size=5),
)
def test_fuzz_fused_loss_well_shaped_with_bad_values(bs, na, ny, nx, nc, rows):
    """Well-formed shapes, arbitrary target values: a clear error or a finite result, never garbage."""
    p = [torch.randn(bs, na, ny, nx, nc + 5)]
    targets = torch.tensor(rows, dtype=torch.float32).reshape(-1, 6)
    anchors = [torch.rand(na, 2) + 0.1]
    try:
        loss, items, _, stats, grads = torch.ops.yolo_kernels.fused_loss(
            p,
            targets,
            anchors,
            None,
            "yolov3",
            1.0,
            3.54,
            37.4,
            1.0,
            64.3,
            1.0,
            0.2,
            4.0,
            0.0,
            0.0,
            "giou",
            "mean",
            False,
            True,
            True,
        )
    except ValueError as error:  # the value checks (TORCH_CHECK_VALUE)
        assert "targets[:, " in str(error)
        return
    assert torch.isfinite(items).all() and torch.isfinite(grads[0]).all()
