"""The anchor-free family's C++ ops one by one (``pad_targets``, ``tal_assign``, ``detection_loss`` and
its backward): the padded targets and the assignment against the reference, float64 gradcheck of the loss with the
assignment held, half precision against the reference on the same values upcast, ``opcheck``, the
assigner's memory, bad arguments. The whole loss against the original is in test_yolov8.py."""

from __future__ import annotations

import pytest
import torch
from anchor_free_cases import StandIn, grids_for, make_batch, make_preds, run

from yolo_kernels import library, yolov8
from yolo_kernels.anchor_free import reference
from yolo_kernels.anchor_free.options import DetectionOptions
from yolo_kernels.bench import peak_extra_bytes

pytestmark = pytest.mark.skipif(library.LOAD_ERROR is not None, reason="the C++ extension is not built")
OPS = torch.ops.yolo_kernels


def targets_of(preds, batch, options, grids):
    """The padded targets the backend passes to the ops (reference.pad_targets)."""
    image_hw = reference.image_size(grids, options.strides, preds["scores"].dtype, torch.device("cpu"))
    labels, boxes = reference.pad_targets(
        batch["batch_idx"], batch["cls"], batch["bboxes"], preds["boxes"].shape[0], image_hw.flip(0)
    )
    return labels.squeeze(-1).long(), boxes


@pytest.mark.parametrize(
    "counts, image_hw, dtype",
    [
        ([3, 0, 5], (640.0, 640.0), torch.float32),  # an image without boxes
        ([0, 0], (320.0, 480.0), torch.float32),  # no boxes at all: m = 0
        ([7], (256.0, 416.0), torch.float64),  # float64 targets: through float32 as the reference
        ([2, 9, 1, 4], (96.0, 160.0), torch.float32),
    ],
)
def test_pad_targets_matches_the_reference(counts, image_hw, dtype, gen):
    batch = make_batch(counts, 80, gen, dtype=dtype)
    perm = torch.randperm(sum(counts), generator=gen)  # images interleaved: the slots follow input order
    batch = {k: v[perm] for k, v in batch.items()}
    batch["bboxes"][:1] = 0.0  # a zero box stays a zero row (not padding to the ops, a box of size 0)
    bs = len(counts)
    h, w = image_hw
    labels, boxes = OPS.pad_targets(batch["batch_idx"], batch["cls"], batch["bboxes"], bs, 80, w, h)
    want_labels, want_boxes = reference.pad_targets(
        batch["batch_idx"], batch["cls"], batch["bboxes"], bs, torch.tensor([w, h])
    )
    assert labels.dtype == torch.int64 and boxes.dtype == torch.float32
    assert torch.equal(labels, want_labels.squeeze(-1).long()) and torch.equal(boxes, want_boxes)


@pytest.mark.parametrize(
    "column, row, value, message",
    [
        ("batch_idx", 1, 2.0, r"batch\['batch_idx'\]: expected integers in \[0, 2\), got 2.0 at row 1"),
        ("batch_idx", 0, 0.5, r"batch\['batch_idx'\]: expected integers in \[0, 2\), got 0.5 at row 0"),
        ("cls", 2, float("nan"), r"batch\['cls'\]: expected integers in \[0, 3\), got nan at row 2"),
        ("x", 1, float("inf"), r"box centre x, y\): expected finite values, got \[inf, 0.5\] at row 1"),
        ("w", 0, 40.0, r"box w, h\): expected finite sizes in \[0, 2\] .*pixels\?\), got \[40.0, 0.5\] at row 0"),
        ("w", 2, -1e-05, r"box w, h\): .*, got \[-1e-05, 0.5\] at row 2"),
    ],
)
def test_pad_targets_names_the_first_bad_value(column, row, value, message):
    """The op checks the values (even with validate=False) with the messages of validate.py."""
    batch_idx, cls, bboxes = torch.tensor([0.0, 1.0, 1.0]), torch.tensor([0.0, 2.0, 1.0]), torch.full((3, 4), 0.5)
    target = {"batch_idx": (batch_idx, None), "cls": (cls, None), "x": (bboxes, 0), "w": (bboxes, 2)}[column]
    if target[1] is None:
        target[0][row] = value
    else:
        target[0][row, target[1]] = value
    with pytest.raises(ValueError, match=message):
        OPS.pad_targets(batch_idx, cls, bboxes, 2, 3, 64.0, 64.0)
    with pytest.raises(RuntimeError, match=r"bboxes: expected shape \[3, 4\]"):
        OPS.pad_targets(batch_idx, cls, bboxes[:, :3], 2, 3, 64.0, 64.0)


def op_args(preds, labels, gt_boxes, options, grids):
    flat = [n for g in grids for n in g]
    return (preds["boxes"], preds["scores"], labels, gt_boxes, flat, list(options.strides))


def assign_both(preds, batch, options, grids):
    labels, gt_boxes = targets_of(preds, batch, options, grids)
    args = op_args(preds, labels, gt_boxes, options, grids)
    assigned, target = OPS.tal_assign(
        *args, options.topk, options.second_cut, options.alpha, options.beta, options.size_floor
    )
    expected = reference.assignment_of(
        preds["boxes"], preds["scores"], grids, batch["batch_idx"], batch["cls"], batch["bboxes"], options
    )
    return (assigned, target), expected


def assert_same_assignment(ours, expected):
    assigned, target = ours
    assert torch.equal(assigned >= 0, expected.fg)
    assert torch.equal(assigned.clamp(min=0)[expected.fg], expected.gt_index[expected.fg])
    torch.testing.assert_close(target, expected.scores.sum(-1).to(target.dtype), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    "counts, topk, topk2, lo, hi",
    [
        ([4, 0, 9], 10, None, 0.02, 0.5),  # an image without boxes
        ([40, 25], 10, None, 0.01, 0.3),  # crowded: points claimed by several boxes
        ([30, 12], 7, 1, 0.02, 0.4),  # the one-to-one branch's second cut
        ([20], 13, 4, 0.05, 0.9),  # large boxes, another top-k and cut
        ([6, 3], 10, None, 0.001, 0.01),  # tiny boxes: fewer candidates than topk (the floor finds some)
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tal_assign_matches_the_dense_assigner(counts, topk, topk2, lo, hi, dtype, gen):
    grids = grids_for(96, 128)
    options = DetectionOptions(nc=5, reg_max=16, strides=(8.0, 16.0, 32.0), topk=topk, topk2=topk2)
    preds = make_preds(len(counts), grids, 5, 16, gen, dtype=dtype)
    batch = make_batch(counts, 5, gen, lo=lo, hi=hi)
    ours, expected = assign_both(preds, batch, options, grids)
    assert ours[0].dtype == torch.int32 and ours[1].dtype == (dtype if dtype == torch.float64 else torch.float32)
    assert_same_assignment(ours, expected)


@pytest.mark.parametrize(
    "counts, topk, topk2, lo, hi",
    [
        ([60, 25], 10, None, 0.01, 0.3),  # crowded: contested points, pruned candidates
        ([40], 7, 1, 0.02, 0.5),  # the one-to-one branch's second cut
        ([8, 0, 30], 13, None, 0.001, 0.05),  # tiny boxes: fewer candidates than topk
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tal_assign_matches_the_dense_assigner_on_a_large_grid(counts, topk, topk2, lo, hi, dtype, gen):
    """At topk * 64 <= points (any real image size) the top-k is a heap selection and the kernel scores
    exactly only the candidates its metric's bound cannot rule out: the same assignment as the dense
    assigner's."""
    grids = grids_for(256, 320)  # 1,680 points
    assert topk * 64 <= sum(ny * nx for ny, nx in grids)
    options = DetectionOptions(nc=5, reg_max=16, strides=(8.0, 16.0, 32.0), topk=topk, topk2=topk2)
    preds = make_preds(len(counts), grids, 5, 16, gen, dtype=dtype)
    batch = make_batch(counts, 5, gen, lo=lo, hi=hi)
    ours, expected = assign_both(preds, batch, options, grids)
    assert_same_assignment(ours, expected)


def test_tal_assign_duplicates_and_padding_rows(gen):
    """Identical boxes tie on every CIoU: the first takes the shared points; an all-zero row is padding."""
    grids = grids_for(64, 64)
    options = DetectionOptions(nc=3, reg_max=16, strides=(8.0, 16.0, 32.0))
    preds = make_preds(2, grids, 3, 16, gen)
    batch = make_batch([4, 3], 3, gen, lo=0.1, hi=0.5)
    batch["bboxes"][1] = batch["bboxes"][0]
    batch["cls"][1] = batch["cls"][0]
    batch["bboxes"][5] = 0.0  # a padding row inside the batch
    ours, expected = assign_both(preds, batch, options, grids)
    assert_same_assignment(ours, expected)
    assert not (ours[0][0] == 1).any()  # the duplicate loses every shared point to the first


def test_tal_assign_reg_max_one_and_one_level(gen):
    grids = [(10, 12)]
    options = DetectionOptions(nc=2, reg_max=1, strides=(16.0,))
    preds = make_preds(2, grids, 2, 1, gen)
    batch = make_batch([5, 7], 2, gen, lo=0.05, hi=0.6)
    ours, expected = assign_both(preds, batch, options, grids)
    assert_same_assignment(ours, expected)


@pytest.mark.parametrize("reg_max", [16, 1])
def test_detection_loss_float64_gradient_equals_the_reference(reg_max, gen):
    """With the assignment held (the op's, given to both): the gradient of every component, the box
    component's CIoU with its detached aspect weight (as the original) included, equals the
    reference's autograd in float64. (The gradcheck of the class and distance components is the
    family suite's, test_families.py.)"""
    grids = [(4, 4), (2, 2)]
    options = DetectionOptions(nc=3, reg_max=reg_max, strides=(8.0, 16.0))
    preds = make_preds(2, grids, 3, reg_max, gen, dtype=torch.float64)
    batch = make_batch([3, 2], 3, gen, lo=0.2, hi=0.6, dtype=torch.float64)
    labels, gt_boxes = targets_of(preds, batch, options, grids)
    assigned, target = OPS.tal_assign(
        *op_args(preds, labels, gt_boxes, options, grids), 10, None, 0.5, 6.0, options.size_floor
    )
    assert (assigned >= 0).sum() > 3
    flat, strides = [n for g in grids for n in g], list(options.strides)
    weights = torch.tensor([0.5, 2.0, 1.0], dtype=torch.float64)

    def loss(boxes, scores, gains=(7.5, 0.5, 1.5)):
        return OPS.detection_loss(boxes, scores, labels, gt_boxes, assigned, target, weights, flat, strides, *gains)

    boxes = preds["boxes"].clone().requires_grad_(True)
    scores = preds["scores"].clone().requires_grad_(True)

    fixed = reference.assignment_of(
        preds["boxes"], preds["scores"], grids, batch["batch_idx"], batch["cls"], batch["bboxes"], options
    )
    assert_same_assignment((assigned, target), fixed)
    # held: the op's own target scores (they equal the reference's at 1e-5: the assigners' float32
    # CIoU may differ by an ulp, e.g. in an arctangent), so that 1e-9 measures the loss alone
    held_scores = torch.nn.functional.one_hot(labels.gather(1, fixed.gt_index).clamp(min=0), 3) * target[..., None]
    fixed = fixed._replace(scores=held_scores.to(fixed.scores.dtype))
    for grad_out in (torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.3, -2.0, 5.0])):
        want = torch.autograd.grad(
            reference.loss(
                boxes, scores, grids, batch["batch_idx"], batch["cls"], batch["bboxes"], options, weights, fixed
            ),
            (boxes, scores),
            grad_out.double(),
        )
        got = torch.autograd.grad(loss(boxes, scores), (boxes, scores), grad_out.double())
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)


def test_deterministic_at_any_thread_count(gen):
    """The same bits with one thread and with several (fixed summation orders, per-image work)."""
    model = StandIn(nc=6)
    preds = make_preds(3, grids_for(96, 128), 6, 16, gen)
    batch = make_batch([40, 5, 25], 6, gen, lo=0.01, hi=0.4)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, max(2, threads)):
            torch.set_num_threads(n)
            results.append(run(yolov8.DetectionLoss(model, backend="cpp"), preds, batch))
    finally:
        torch.set_num_threads(threads)
    (l1, i1, g1), (l2, i2, g2) = results
    assert torch.equal(l1, l2) and i1 == i2
    assert all(torch.equal(a, b) for a, b in zip(g1, g2))


def test_forward_only_writes_no_gradient(gen, monkeypatch):
    """Validation calls (no_grad) run the loss without its backward."""
    calls = []
    backward = library._detection_loss_backward
    monkeypatch.setattr(library, "_detection_loss_backward", lambda *a: calls.append(1) or backward(*a))
    model = StandIn(nc=3)
    preds = make_preds(1, grids_for(64, 64), 3, 16, gen)
    batch = make_batch([3], 3, gen)
    with torch.no_grad():
        loss, _ = yolov8.DetectionLoss(model, backend="cpp")(preds, batch)
    assert loss.requires_grad is False and torch.isfinite(loss).all() and calls == []


def _ops_called(fn) -> set[str]:
    """The yolo_kernels ops that ``fn()`` calls, from the profiler's events."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {e.name for e in prof.events() if e.name.startswith("yolo_kernels::")}


def test_the_trainers_gradient_is_written_with_the_loss(gen):
    """With the trainer's loss.sum() (the batch size reaches each component, times the branch
    weight under E2ELoss) the gradient comes from the forward pass, bit for bit what the backward
    op gives for that gradient; any other gradient runs the backward op and is still right."""
    model = StandIn(nc=4)
    preds = make_preds(3, grids_for(64, 96), 4, 16, gen)
    batch = make_batch([4, 0, 6], 4, gen)
    criterion = yolov8.DetectionLoss(model, backend="cpp")
    leaves = [preds[k].clone().requires_grad_(True) for k in ("boxes", "scores")]

    def step(scale):
        loss, _ = criterion({"boxes": leaves[0], "scores": leaves[1], "feats": preds["feats"]}, batch)
        (loss * scale).sum().backward()

    assert "yolo_kernels::detection_loss_backward" not in _ops_called(lambda: step(1.0))
    fast = [t.grad.clone() for t in leaves]
    for t in leaves:
        t.grad = None
    assert "yolo_kernels::detection_loss_backward" in _ops_called(lambda: step(1.0 + 2**-10))
    slow = [t.grad / (1.0 + 2**-10) for t in leaves]
    for f, g in zip(fast, slow):
        torch.testing.assert_close(f, g, rtol=1e-5, atol=1e-6 * float(g.abs().max()))
    # the same bits as the backward op for the trainer's gradient (3 = the batch size)
    options = criterion.options
    grids = grids_for(64, 96)
    labels, gt_boxes = targets_of(preds, batch, options, grids)
    args = op_args(preds, labels, gt_boxes, options, grids)
    assigned, target = OPS.tal_assign(*args, 10, None, 0.5, 6.0, 16.0)
    rest = (labels, gt_boxes, assigned, target, None, *args[4:], *options.gains())
    want = OPS.detection_loss_backward(torch.full((3,), 3.0), *args[:2], *rest)
    assert all(torch.equal(f, w) for f, w in zip(fast, want))
    # E2ELoss: both branches' gradients from their forward passes
    e2e = yolov8.E2ELoss(model, backend="cpp")
    two = {"one2many": preds, "one2one": {k: v.clone() if torch.is_tensor(v) else v for k, v in preds.items()}}
    for branch in two.values():
        branch["boxes"].requires_grad_(True), branch["scores"].requires_grad_(True)
    e2e.update()  # weights that are not round numbers
    assert "yolo_kernels::detection_loss_backward" not in _ops_called(lambda: e2e(two, batch)[0].sum().backward())


def test_opcheck(gen):
    grids = [(4, 6), (2, 3)]
    options = DetectionOptions(nc=3, reg_max=4, strides=(8.0, 16.0))
    preds = make_preds(2, grids, 3, 4, gen)
    batch = make_batch([3, 2], 3, gen, lo=0.2, hi=0.6)
    labels, gt_boxes = targets_of(preds, batch, options, grids)
    args = op_args(preds, labels, gt_boxes, options, grids)
    assign_args = (*args, 10, None, 0.5, 6.0, 16.0)
    assigned, target = OPS.tal_assign(*assign_args)
    boxes, scores = (t.clone().requires_grad_(True) for t in args[:2])
    loss_args = (boxes, scores, labels, gt_boxes, assigned, target, None, *args[4:], 7.5, 0.5, 1.5)
    utils = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    pad_args = (batch["batch_idx"], batch["cls"], batch["bboxes"], 2, 3, 48.0, 32.0)
    torch.library.opcheck(OPS.pad_targets.default, pad_args, test_utils=utils)
    torch.library.opcheck(OPS.tal_assign.default, assign_args, test_utils=utils)
    torch.library.opcheck(OPS.detection_loss.default, loss_args, test_utils=utils)
    # the backward op has no derivative of its own (a second derivative is an error): plain inputs
    backward_args = (torch.ones(3), *args[:2], *loss_args[2:6], torch.rand(3), *loss_args[7:])
    torch.library.opcheck(OPS.detection_loss_backward.default, backward_args, test_utils=utils)
    # the forward with its gradient is not differentiable itself (the cpp backend's Function is): plain inputs
    with_grad_args = (*args[:2], *loss_args[2:], [3.0, 3.0, 3.0])
    torch.library.opcheck(OPS.detection_loss_with_grad.default, with_grad_args, test_utils=utils)
    loss = OPS.detection_loss(*loss_args)
    (grad_boxes,) = torch.autograd.grad(loss.sum(), boxes, create_graph=True)
    with pytest.raises(RuntimeError, match="a second derivative .* is not supported"):
        grad_boxes.sum().backward()


def test_the_assigner_allocates_no_boxes_by_points_tensor(gen):
    """The dense assigner holds several [bs, boxes, points] tensors; tal_assign's memory is
    O(bs * boxes * topk + bs * points): here under a tenth of one dense float tensor."""
    grids = grids_for(320, 320)
    options = DetectionOptions(nc=8, reg_max=16, strides=(8.0, 16.0, 32.0))
    preds = make_preds(2, grids, 8, 16, gen)
    batch = make_batch([200, 200], 8, gen, lo=0.01, hi=0.2)
    labels, gt_boxes = targets_of(preds, batch, options, grids)
    args = (*op_args(preds, labels, gt_boxes, options, grids), 10, None, 0.5, 6.0, 16.0)
    points = preds["boxes"].shape[2]
    dense = 2 * 200 * points * 4
    peak = peak_extra_bytes(lambda: OPS.tal_assign(*args), torch.device("cpu"))
    assert peak < dense / 10, (peak, dense)


@pytest.mark.parametrize(
    "change, pattern",
    [
        (lambda a: {"scores": a["scores"][:, :, :-1]}, r"scores: expected shape \[bs, channels, \d+\]"),
        (lambda a: {"boxes": a["boxes"][:, :-1]}, r"boxes: expected 4 \* reg_max channels, got 63"),
        (lambda a: {"scores": a["scores"].double()}, r"scores: expected the dtype of boxes"),
        (lambda a: {"grids": a["grids"][:-1]}, r"grids: expected \(ny, nx\) of each of the 3 levels"),
        (lambda a: {"gt_boxes": a["gt_boxes"].double()}, r"gt_boxes: expected a float32 tensor"),
        (lambda a: {"gt_labels": a["gt_labels"].int()}, r"gt_labels: expected an int64 tensor"),
        (lambda a: {"gt_labels": a["gt_labels"] + 10}, r"gt_labels: expected classes in \[0, 3\), got 1[0-2]"),
    ],
)
def test_bad_arguments_name_the_argument(change, pattern, gen):
    grids = grids_for(64, 64)
    options = DetectionOptions(nc=3, reg_max=16, strides=(8.0, 16.0, 32.0))
    preds = make_preds(1, grids, 3, 16, gen)
    labels, gt_boxes = targets_of(preds, make_batch([2], 3, gen), options, grids)
    names = ("boxes", "scores", "gt_labels", "gt_boxes", "grids", "strides")
    a = dict(zip(names, op_args(preds, labels, gt_boxes, options, grids)))
    a.update(change(a))
    with pytest.raises((RuntimeError, ValueError), match=pattern):
        OPS.tal_assign(*a.values(), 10, None, 0.5, 6.0, 16.0)


def test_loss_names_an_assigned_box_whose_class_is_out_of_range(gen):
    """The loss reads the score row of each assigned box's class: a class past nc is named, not read
    out of bounds (the assigner checks its own boxes; an assignment given by the caller is checked
    here)."""
    grids = grids_for(64, 64)
    options = DetectionOptions(nc=3, reg_max=16, strides=(8.0, 16.0, 32.0))
    preds = make_preds(1, grids, 3, 16, gen)
    labels, gt_boxes = targets_of(preds, make_batch([2], 3, gen, lo=0.2, hi=0.5), options, grids)
    args = op_args(preds, labels, gt_boxes, options, grids)
    assigned, target = OPS.tal_assign(*args, 10, None, 0.5, 6.0, 16.0)
    assert (assigned >= 0).any()
    flat, strides = [n for g in grids for n in g], list(options.strides)
    loss_args = (preds["boxes"], preds["scores"], labels + 10, gt_boxes, assigned, target, None, flat, strides)
    for op, extra in ((OPS.detection_loss, ()), (OPS.detection_loss_with_grad, ([1.0, 1.0, 1.0],))):
        with pytest.raises(ValueError, match=r"gt_labels: expected classes below 3 for the assigned boxes, got 1[0-2]"):
            op(*loss_args, 7.5, 0.5, 1.5, *extra)
