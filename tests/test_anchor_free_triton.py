"""The anchor-free family's Triton backend against the reference: the assignment itself, gradients
for any output gradient, float64 gradcheck with the assignment held, half-precision inputs, and
the assigner's linear work. Under the interpreter on CPU (with the reference taking CUDA's
``torch.topk`` order among equal metrics, the order the kernels keep), and on CUDA when present.
Parity with the live original is in ``test_yolov8.py`` (every backend); the kernels' compilation
for real GPUs in ``test_compile_gate.py``."""

from __future__ import annotations

import pytest
import torch
from anchor_free_cases import StandIn, grids_for, make_batch, make_preds
from helpers import count_loop_iterations

from yolo_kernels import yolov8
from yolo_kernels.anchor_free import reference
from yolo_kernels.anchor_free.options import DetectionOptions
from yolo_kernels.triton import IMPORT_ERROR, interpreter_active

if IMPORT_ERROR is not None:
    pytest.skip(f"no usable triton: {IMPORT_ERROR}", allow_module_level=True)

from yolo_kernels.triton import anchor_free_loss

DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(not interpreter_active(), reason="TRITON_INTERPRET=1 not set")),
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")),
]


def first_on_ties(metric: torch.Tensor, k: int) -> torch.Tensor:
    """CUDA's ``torch.topk`` set: the values above the k-th, then the lowest indices equal to it."""
    return torch.sort(metric, dim=-1, descending=True, stable=True).indices[..., :k]


@pytest.fixture
def cuda_topk(monkeypatch):
    """The reference selecting as on CUDA, wherever it runs."""
    monkeypatch.setattr(reference, "topk_indices", first_on_ties)


def to(device, preds, batch):
    preds = {k: [f.to(device) for f in v] if k == "feats" else v.to(device) for k, v in preds.items()}
    return preds, {k: v.to(device) for k, v in batch.items()}


def reference_assignment(preds, batch, options):
    grids = [tuple(f.shape[2:]) for f in preds["feats"]]
    return reference.assignment_of(
        preds["boxes"], preds["scores"], grids, batch["batch_idx"], batch["cls"].view(-1), batch["bboxes"], options
    )


def triton_assignment(preds, batch, options):
    grids = [tuple(f.shape[2:]) for f in preds["feats"]]
    return anchor_free_loss.assign(
        preds["boxes"], preds["scores"], grids, batch["batch_idx"], batch["cls"].view(-1), batch["bboxes"], options
    )


def crowded_corner_batch(gen, nc):
    """Boxes over the first cells (where CUDA's topk fills a box's picks up with candidates of
    metric 0), duplicates, nested boxes, tiny and zero-size boxes, a padding row."""
    rows = [
        (0, 0.05, 0.05, 0.1, 0.1),
        (0, 0.05, 0.05, 0.1, 0.1),  # the same box again
        (0, 0.08, 0.06, 0.3, 0.2),
        (0, 0.5, 0.5, 0.9, 0.9),
        (0, 0.5, 0.5, 0.2, 0.3),  # inside the previous one
        (0, 0.7, 0.3, 0.0, 0.0),  # zero size: the floor finds it points
        (1, 0.0, 0.0, 0.0, 0.0),  # padding (an all-zero row)
        (1, 0.3, 0.6, 0.004, 0.003),
        (1, 0.98, 0.98, 0.1, 0.1),
    ]
    t = torch.tensor(rows, dtype=torch.float32)
    cls = torch.randint(0, nc, (t.shape[0], 1), generator=gen).float()
    return {"batch_idx": t[:, 0], "cls": cls, "bboxes": t[:, 1:]}


ASSIGN_CASES = {
    "random": dict(topk=10, topk2=None, batch=lambda g, nc: make_batch([4, 6], nc, g)),
    "crowded corner": dict(topk=10, topk2=None, batch=crowded_corner_batch),
    "second cut": dict(topk=7, topk2=1, batch=lambda g, nc: make_batch([5, 3], nc, g, lo=0.1, hi=0.6)),
    "second cut, crowded": dict(topk=4, topk2=2, batch=crowded_corner_batch),
    "many boxes": dict(topk=10, topk2=None, batch=lambda g, nc: make_batch([40, 1], nc, g, lo=0.02, hi=0.3)),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", sorted(ASSIGN_CASES))
@pytest.mark.parametrize("score_shift", [-2.0, -30.0])
def test_assignment_equals_the_reference(device, case, score_shift, gen, cuda_topk):
    """The points assigned, their boxes and target scores. A score shift of -30 makes most metrics
    tiny and many exactly 0 in float32: the fill-up with points of metric 0 decides picks."""
    spec = ASSIGN_CASES[case]
    nc = 3
    options = DetectionOptions(nc=nc, reg_max=8, strides=(8.0, 16.0, 32.0), topk=spec["topk"], topk2=spec["topk2"])
    preds, batch = to(
        device, make_preds(2, grids_for(64, 96), nc, 8, gen, score_shift=score_shift), spec["batch"](gen, nc)
    )
    expected = reference_assignment(preds, batch, options)
    actual = triton_assignment(preds, batch, options)
    fg = actual.owner >= 0
    target = actual.target
    expected_target = expected.scores.amax(-1)
    # fg differs only where the target score is 0 (the fill-up's zeros, which weigh nothing)
    assert torch.equal(fg & (target > 0), expected.fg & (expected_target > 0))
    both = fg & expected.fg & (expected_target > 0)
    assert torch.equal(actual.slots()[both], expected.gt_index[both])
    torch.testing.assert_close(target, expected_target.to(target.dtype), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(actual.score_sum, expected.scores.sum().clamp(min=1).to(target.dtype))


def loss_and_grads(backend, model, preds, batch, grad_out, **kwargs):
    boxes = preds["boxes"].detach().clone().requires_grad_(True)
    scores = preds["scores"].detach().clone().requires_grad_(True)
    criterion = yolov8.DetectionLoss(model, backend=backend, **kwargs)
    loss, items = criterion({"boxes": boxes, "scores": scores, "feats": preds["feats"]}, batch)
    (loss * grad_out).sum().backward()
    return loss.detach(), boxes.grad, scores.grad


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reg_max", [16, 1])
def test_gradients_for_any_output_gradient(device, reg_max, gen, cuda_topk):
    """Backward reads the components' gradient on the device: a GradScaler's scale, per-component
    weights, zero for a component."""
    model = StandIn(nc=4, reg_max=reg_max, box=5.0, cls=0.7, dfl=2.0)
    preds, batch = to(device, make_preds(2, grids_for(64, 64), 4, reg_max, gen), make_batch([3, 5], 4, gen))
    for grad_out in ([65536.0, 65536.0, 65536.0], [0.5, -2.0, 3.0], [1.0, 0.0, 0.0]):
        g = torch.tensor(grad_out, device=device)
        expected = loss_and_grads("reference", model, preds, batch, g)
        actual = loss_and_grads("triton", model, preds, batch, g)
        torch.testing.assert_close(actual[0], expected[0], rtol=1e-5, atol=1e-6)
        for e, a in zip(expected[1:], actual[1:]):
            torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4 * float(e.abs().max().clamp(min=1e-30)))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_against_the_reference_on_the_same_values_upcast(device, dtype, gen, cuda_topk):
    model = StandIn(nc=3)
    preds, batch = to(device, make_preds(2, grids_for(64, 64), 3, 16, gen, dtype=dtype), make_batch([4, 2], 3, gen))
    upcast = {k: [f.float() for f in v] if k == "feats" else v.float() for k, v in preds.items()}
    ones = torch.ones(3, device=device)
    expected = loss_and_grads("reference", model, upcast, batch, ones)
    actual = loss_and_grads("triton", model, preds, batch, ones)
    assert actual[0].dtype == torch.float32 and actual[1].dtype == dtype and actual[2].dtype == dtype
    torch.testing.assert_close(actual[0], expected[0], rtol=1e-5, atol=1e-6)
    for e, a in zip(expected[1:], actual[1:]):  # the gradient rounded once to the input's dtype
        torch.testing.assert_close(a.float(), e, rtol=1e-2, atol=1e-2 * float(e.abs().max()))


def float64_problem(device, reg_max, gen):
    nc, grids = 2, [(2, 3), (1, 2)]
    preds = make_preds(1, grids, nc, reg_max, gen, dtype=torch.float64)
    batch = {
        "batch_idx": torch.zeros(2),
        "cls": torch.tensor([0.0, 1.0]),
        "bboxes": torch.tensor([[0.4, 0.5, 0.5, 0.8], [0.7, 0.4, 0.4, 0.5]]),
    }
    return grids, *to(device, preds, batch)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reg_max", [4, 1])
def test_float64_gradcheck_with_the_assignment_held(device, reg_max, gen):
    """The class BCE and DFL (L1) terms for a fixed assignment against finite differences. (CIoU's
    aspect weight is a constant of the original's gradient, which finite differences cannot hold:
    the CIoU term is checked against the reference's autograd in float64 below.)"""
    from yolo_kernels.triton import _AnchorFreeLoss

    grids, preds, batch = float64_problem(device, reg_max, gen)
    options = DetectionOptions(nc=2, reg_max=reg_max, strides=(8.0, 16.0), box=0.0, cls=0.5, dfl=1.5, topk=3)
    assigned = triton_assignment(preds, batch, options)
    assert bool((assigned.owner >= 0).any())
    weights = torch.tensor([0.7, 1.3], dtype=torch.float64, device=device)

    def f(boxes, scores):
        return _AnchorFreeLoss.apply(boxes, scores, grids, assigned, options, weights)

    inputs = (preds["boxes"].clone().requires_grad_(True), preds["scores"].clone().requires_grad_(True))
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reg_max", [4, 1])
def test_float64_gradient_equals_the_reference(device, reg_max, gen, cuda_topk):
    model = StandIn(nc=2, reg_max=reg_max, strides=(8, 16))
    model.class_weights = torch.tensor([0.7, 1.3])
    _, preds, batch = float64_problem(device, reg_max, gen)
    grad_out = torch.tensor([0.3, 1.7, -0.9], dtype=torch.float64, device=device)
    expected = loss_and_grads("reference", model, preds, batch, grad_out, tal_topk=3)
    actual = loss_and_grads("triton", model, preds, batch, grad_out, tal_topk=3)
    assert actual[0].dtype == torch.float64
    torch.testing.assert_close(actual[0], expected[0], rtol=1e-9, atol=1e-12)
    for e, a in zip(expected[1:], actual[1:]):
        torch.testing.assert_close(a, e, rtol=1e-8, atol=1e-8 * float(e.abs().max()))


@pytest.mark.parametrize("device", DEVICES)
def test_forward_only_writes_no_gradient(device, gen, monkeypatch):
    model = StandIn(nc=3)
    preds, batch = to(device, make_preds(1, grids_for(32, 32), 3, 16, gen), make_batch([2], 3, gen))
    calls = []
    monkeypatch.setattr(anchor_free_loss, "loss_backward", lambda *a, **k: calls.append(a))
    preds["boxes"].requires_grad_(True)
    with torch.no_grad():
        loss, _ = yolov8.DetectionLoss(model, backend="triton")(preds, batch)
    assert loss.grad_fn is None and not calls


def test_topk_above_the_register_limit_is_a_clear_error(gen):
    model = StandIn(nc=2)
    preds, batch = make_preds(1, grids_for(32, 32), 2, 16, gen), make_batch([1], 2, gen)
    criterion = yolov8.DetectionLoss(model, tal_topk=anchor_free_loss.TOPK_LIMIT + 1, backend="triton")
    if not interpreter_active():
        pytest.skip("the triton backend runs on CPU tensors only under the interpreter")
    with pytest.raises(ValueError, match="topk: the triton backend keeps at most"):
        criterion(preds, batch)


@pytest.mark.skipif(not interpreter_active(), reason="counts the interpreter's loop iterations")
def test_assignment_work_is_linear_in_the_boxes(monkeypatch, gen):
    """Loop iterations of the assigner's kernels, counted by shadowing ``range`` in their module
    (the interpreter runs the kernels as Python): 4x the boxes (of the same sizes, crowding the
    same image) must cost about 4x, not 16x: no kernel searches all boxes per point."""
    counted = count_loop_iterations(monkeypatch, anchor_free_loss)
    options = DetectionOptions(nc=2, reg_max=4, strides=(8.0, 16.0, 32.0))
    preds = make_preds(1, grids_for(96, 96), 2, 4, gen)
    for n in (8, 32):
        counted.append(0)
        batch = make_batch([n], 2, gen, lo=0.05, hi=0.15)
        triton_assignment(preds, batch, options)
    small, large = counted
    assert small > 0 and large <= 4 * small * 1.5, (small, large)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_call_is_a_fixed_handful_of_launches_operations_and_allocations(dtype, gen):
    """On a GPU each launch or small tensor operation costs microseconds of host time and a few
    of device time (at batch 16 their sum is a sizeable share of the loss's DRAM floor): the
    assignment is one sort, one search and seven launches, the forward loss three launches, the
    backward two, whatever the targets; buffers come from one allocation per dtype. Counted with
    the kernels recorded, not run."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from yolo_kernels.triton.launch import record_launches

    free = {"view", "slice", "select", "reshape", "_reshape_alias", "detach", "as_strided", "alias", "unsqueeze"}

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket.__name__ not in free:
                self.ops.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    options = DetectionOptions(nc=3, reg_max=4, strides=(8.0, 16.0, 32.0))
    grids = grids_for(64, 64)
    preds = make_preds(2, grids, 3, 4, gen)
    boxes, scores = preds["boxes"].to(dtype), preds["scores"].to(dtype)
    batch = make_batch([3, 5], 3, gen)
    targets = (batch["batch_idx"], batch["cls"].view(-1), batch["bboxes"])
    with record_launches():
        anchor_free_loss.assign(boxes, scores, grids, *targets, options)  # the cached geometry and constants
    with record_launches() as launches, Count() as count:
        assigned = anchor_free_loss.assign(boxes, scores, grids, *targets, options)
    allocations = 3 if dtype == torch.float32 else 4  # int32, int64 (best keys), float32, float64
    assert len(launches) == 7 and sorted(count.ops) == ["empty"] * allocations + ["searchsorted", "sort"]
    with record_launches() as launches, Count() as count:
        anchor_free_loss.detection_loss(boxes, scores, grids, assigned, options)
    assert len(launches) == 3 and count.ops == ["empty"] * 3
    grad_out = torch.ones(3, dtype=dtype)
    with record_launches() as launches, Count() as count:
        anchor_free_loss.loss_backward(grad_out, boxes, scores, grids, assigned, options, None, True, True)
    assert len(launches) == 2 and sorted(count.ops) == ["empty", "empty_like", "empty_like"]


def test_auto_picks_triton_on_cuda_tensors():
    from yolo_kernels.anchor_free.backends import AUTO_ORDER, REGISTRY

    assert AUTO_ORDER["cuda"] == ("triton",)
    if torch.cuda.is_available():
        assert REGISTRY.resolve("auto", torch.device("cuda")).name == "triton"


@pytest.mark.parametrize("device", DEVICES)
def test_strided_head_outputs_are_read_in_place_and_get_gradients_of_their_layout(device, gen, cuda_topk):
    """Head outputs whose point stride is not 1 (points outermost): the same loss and gradients
    as their contiguous copies, the gradients with the inputs' strides."""
    model = StandIn(nc=3, reg_max=4)
    preds, batch = to(device, make_preds(2, grids_for(64, 64), 3, 4, gen), make_batch([3, 2], 3, gen))
    strided = dict(preds)
    for key in ("boxes", "scores"):
        strided[key] = preds[key].permute(2, 0, 1).contiguous().permute(1, 2, 0)
        assert strided[key].stride(2) != 1
    ones = torch.ones(3, device=device)
    expected = loss_and_grads("triton", model, preds, batch, ones)
    boxes = strided["boxes"].detach().requires_grad_(True)
    scores = strided["scores"].detach().requires_grad_(True)
    loss, _ = yolov8.DetectionLoss(model, backend="triton")({**strided, "boxes": boxes, "scores": scores}, batch)
    loss.sum().backward()
    torch.testing.assert_close(loss.detach(), expected[0], rtol=1e-6, atol=0)
    for leaf, e in ((boxes, expected[1]), (scores, expected[2])):
        assert leaf.grad.stride() == leaf.stride()
        torch.testing.assert_close(leaf.grad, e, rtol=1e-6, atol=1e-9)
