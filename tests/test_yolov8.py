"""The anchor-free family (yolo_kernels.yolov8) against the live original, ultralytics 8.4.190:
loss values, loss items and gradients of every backend, on stand-in and real heads, edge cases."""

from __future__ import annotations

import copy

import pytest
import torch
from anchor_free_cases import StandIn, assert_same, grids_for, make_batch, make_preds, original, run

from yolo_kernels import yolov8
from yolo_kernels.anchor_free import reference
from yolo_kernels.anchor_free.backends import BACKENDS
from yolo_kernels.anchor_free.options import DetectionOptions
from yolo_kernels.triton import interpreter_active

FAST = [
    name for name, b in BACKENDS.items() if name != "reference" and b.unavailable_reason(torch.device("cpu")) is None
]
ALL = ["reference", *FAST]


def compare(model, preds, batch, backend, tal_topk=10, tal_topk2=None, **tol):
    ours = yolov8.DetectionLoss(model, tal_topk=tal_topk, tal_topk2=tal_topk2, backend=backend)
    theirs = original().v8DetectionLoss(model, tal_topk=tal_topk, tal_topk2=tal_topk2)
    expected = run(theirs, preds, batch)
    assert_same(expected, run(ours, preds, batch), **tol)
    return expected


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("reg_max", [16, 1])
@pytest.mark.parametrize("hw", [(64, 64), (96, 64)])
def test_matches_original(backend, reg_max, hw, gen):
    model = StandIn(nc=7, reg_max=reg_max)
    preds = make_preds(3, grids_for(*hw), 7, reg_max, gen)
    loss, items, _ = compare(model, preds, make_batch([4, 6, 3], 7, gen), backend)
    assert loss[0] > 0 and loss[2] > 0  # boxes were assigned: the comparison covers the box terms


CASES = {
    "no targets": lambda g: make_batch([0, 0], 5, g),
    "an empty image": lambda g: make_batch([3, 0], 5, g),
    "tiny boxes": lambda g: make_batch([5, 5], 5, g, lo=0.0005, hi=0.01),
    "large boxes": lambda g: make_batch([3, 2], 5, g, lo=0.7, hi=1.0),
    "300 boxes in one image": lambda g: make_batch([300, 2], 5, g, lo=0.01, hi=0.2),
}


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("case", sorted(CASES))
def test_edge_cases(backend, case, gen):
    if backend == "triton" and case == "300 boxes in one image" and interpreter_active():
        pytest.skip("minutes under the Triton interpreter; test_anchor_free_triton.py crowds images at smaller sizes")
    model = StandIn(nc=5)
    preds = make_preds(2, grids_for(64, 64), 5, 16, gen)
    compare(model, preds, CASES[case](gen), backend)


@pytest.mark.parametrize("backend", ALL)
def test_borders_duplicates_zero_sizes_and_padding_rows(backend, gen):
    """Boxes on and past the borders, the same box twice (same and other class), a zero-size box
    (a valid box: the 16-pixel floor finds it points), an all-zero row (padding for the original)."""
    model = StandIn(nc=5)
    preds = make_preds(2, grids_for(64, 64), 5, 16, gen)
    rows = [
        [0, 1, 0.0, 0.0, 0.3, 0.3],
        [0, 2, 1.0, 1.0, 0.4, 0.2],
        [0, 3, 0.5, 0.5, 0.3, 0.3],
        [0, 3, 0.5, 0.5, 0.3, 0.3],
        [0, 4, 0.5, 0.5, 0.3, 0.3],
        [1, 0, 0.4, 0.6, 0.0, 0.0],
        [1, 1, 0.0, 0.0, 0.0, 0.0],
        [1, 4, 0.2, 0.9, 0.25, 0.5],
    ]
    t = torch.tensor(rows, dtype=torch.float32)
    batch = {"batch_idx": t[:, 0], "cls": t[:, 1:2], "bboxes": t[:, 2:]}
    compare(model, preds, batch, backend)


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("nc", [1, 3])
def test_one_class_and_the_last_class(backend, nc, gen):
    model = StandIn(nc=nc)
    preds = make_preds(2, grids_for(64, 96), nc, 16, gen)
    batch = make_batch([4, 3], nc, gen)
    batch["cls"].fill_(nc - 1)
    compare(model, preds, batch, backend)


@pytest.mark.parametrize("backend", ALL)
def test_class_weights_gains_and_topk(backend, gen):
    model = StandIn(nc=4, reg_max=8, box=2.0, cls=1.25, dfl=0.5)
    model.class_weights = torch.tensor([0.5, 1.0, 2.0, 3.0])
    preds = make_preds(2, grids_for(64, 64), 4, 8, gen)
    batch = make_batch([6, 5], 4, gen)
    compare(model, preds, batch, backend, tal_topk=4, tal_topk2=2)
    compare(model, preds, batch, backend, tal_topk=13)


@pytest.mark.parametrize("backend", ALL)
def test_gains_are_read_at_every_call(backend, gen):
    """The original reads ``model.args.box/cls/dfl`` when it is called (the trainer may change them)."""
    model = StandIn(nc=3)
    preds = make_preds(1, grids_for(64, 64), 3, 16, gen)
    batch = make_batch([3], 3, gen)
    ours = yolov8.DetectionLoss(model, backend=backend)
    theirs = original().v8DetectionLoss(model)
    model.args.box, model.args.cls = 1.0, 3.0
    assert_same(run(theirs, preds, batch), run(ours, preds, batch))


@pytest.mark.parametrize("backend", ALL)
def test_e2e_loss_and_its_schedule(backend, gen):
    """One-to-many (top-10) and one-to-one (top-7, top-1) mixed 0.8 / 0.2, then as ``update()``
    moves the weights; the items are the one-to-one branch's."""
    model = StandIn(nc=4, reg_max=1, epochs=5)
    grids = grids_for(64, 64)
    preds = {"one2many": make_preds(2, grids, 4, 1, gen), "one2one": make_preds(2, grids, 4, 1, gen)}
    batch = make_batch([5, 4], 4, gen)
    ours, theirs = yolov8.E2ELoss(model, backend=backend), original().E2ELoss(model)
    for _ in range(3):
        assert_same(run(theirs, preds, batch), run(ours, preds, batch))
        theirs.update(), ours.update()
        assert (ours.o2m, ours.o2o) == (theirs.o2m, theirs.o2o)


@pytest.mark.parametrize("cfg", ["yolov8n.yaml", "yolo11n.yaml", "yolo26n.yaml"])
def test_real_heads(cfg, gen):
    """Models built from the original's yaml files (no weights): the head's real outputs, the
    criterion the model itself builds (``init_criterion``) against ours, every backend."""
    original()
    from ultralytics.cfg import get_cfg
    from ultralytics.nn.tasks import DetectionModel

    torch.manual_seed(0)
    model = DetectionModel(cfg, nc=6, verbose=False)
    model.args = get_cfg()
    model.train()
    preds = model(torch.randn(2, 3, 96, 64, generator=gen))
    preds = (
        {k: {kk: vv.detach() if kk != "feats" else vv for kk, vv in v.items()} for k, v in preds.items()}
        if ("one2one" in preds)
        else {k: v.detach() if k != "feats" else v for k, v in preds.items()}
    )
    batch = make_batch([5, 3], 6, gen)
    theirs = model.init_criterion()
    expected = run(theirs, preds, batch)
    for backend in ALL:
        ours = (yolov8.E2ELoss if "one2one" in preds else yolov8.DetectionLoss)(model, backend=backend)
        assert_same(expected, run(ours, preds, batch))


def test_accepts_the_eval_mode_tuple_and_a_parallel_wrapper(gen):
    model = StandIn(nc=3)
    preds = make_preds(1, grids_for(64, 64), 3, 16, gen)
    batch = make_batch([2], 3, gen)
    ours = yolov8.DetectionLoss(torch.nn.DataParallel(model), backend="reference")
    a, _ = ours(preds, batch)
    b, _ = ours((torch.zeros(1), preds), batch)
    assert torch.equal(a, b)


@pytest.mark.parametrize("reg_max", [16, 1])
def test_float64_gradcheck(reg_max, gen, monkeypatch):
    """The differentiable part in float64, DFL and L1 branches: the assignment and CIoU's aspect
    weight (constants of the gradient, as in the original) held at their values at the inputs."""
    options = DetectionOptions(nc=3, reg_max=reg_max, strides=(8.0, 16.0))
    grids = [(4, 4), (2, 2)]
    preds = make_preds(2, grids, 3, reg_max, gen, dtype=torch.float64)
    batch = make_batch([3, 2], 3, gen, lo=0.2, hi=0.6, dtype=torch.float64)
    targets = (batch["batch_idx"], batch["cls"], batch["bboxes"])
    fixed = reference.assignment_of(preds["boxes"], preds["scores"], grids, *targets, options)
    ciou, weight = reference.bbox_ciou, reference._aspect_weight
    held = []  # the loss's CIoU weight at the inputs, recorded by the first call below
    monkeypatch.setattr(reference, "_aspect_weight", lambda iou, v, eps: held.append(weight(iou, v, eps)) or held[0])
    reference.loss(preds["boxes"], preds["scores"], grids, *targets, options, assignment=fixed)
    monkeypatch.setattr(reference, "bbox_ciou", lambda a, b, eps=reference.CIOU_EPS: ciou(a, b, eps, held[0]))

    def f(boxes, scores):
        return reference.loss(boxes, scores, grids, *targets, options, assignment=fixed)

    boxes = preds["boxes"].requires_grad_(True)
    scores = preds["scores"].requires_grad_(True)
    assert f(boxes, scores)[0] > 0
    assert torch.autograd.gradcheck(f, (boxes, scores), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", ALL)
def test_unsorted_targets_are_placed_by_image(backend, gen):
    """The trainer collates targets image by image; given in another order the loss is the same
    (the original's padding assumes the order and misplaces them: a deliberate difference)."""
    model = StandIn(nc=3)
    preds = make_preds(3, grids_for(64, 64), 3, 16, gen)
    batch = make_batch([3, 2, 4], 3, gen)
    perm = torch.randperm(9, generator=gen)
    shuffled = {k: v[perm] for k, v in batch.items()}
    ours = yolov8.DetectionLoss(model, backend=backend)
    a, b = run(ours, preds, batch), run(ours, preds, shuffled)
    assert torch.equal(a[0], b[0])


def test_the_model_is_not_modified(gen):
    model = StandIn(nc=3)
    before = copy.deepcopy(model.state_dict())
    yolov8.DetectionLoss(model)(make_preds(1, grids_for(64, 64), 3, 16, gen), make_batch([2], 3, gen))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_apply_patches_the_package_criterion_and_revert_restores_it():
    original()
    from ultralytics.cfg import get_cfg
    from ultralytics.nn.tasks import DetectionModel, SegmentationModel

    import yolo_kernels.integrations.ultralytics as yku

    before = DetectionModel.init_criterion
    try:
        assert yku.apply(backend="reference") == [yku._PACKAGE_NAME]
        assert yku.apply(backend="reference") == []  # idempotent
        for cfg, kind in (("yolov8n.yaml", yolov8.DetectionLoss), ("yolo26n.yaml", yolov8.E2ELoss)):
            model = DetectionModel(cfg, nc=3, verbose=False)
            model.args = get_cfg()
            assert type(model.init_criterion()) is kind
        seg = SegmentationModel("yolov8n-seg.yaml", nc=3, verbose=False)
        seg.args = get_cfg()
        assert type(seg.init_criterion()).__module__.startswith("ultralytics.")  # other tasks keep theirs
    finally:
        assert yku._PACKAGE_NAME in yku.revert()
    assert DetectionModel.init_criterion is before and not yku.is_applied()


def _bad(preds, batch, what):
    preds, batch = dict(preds), {k: v.clone() for k, v in batch.items()}
    if what == "class id":
        batch["cls"][1] = 3
    elif what == "image id":
        batch["batch_idx"][-1] = 2
    elif what == "pixel boxes":
        batch["bboxes"][0, 2:] = torch.tensor([40.0, 30.0])
    elif what == "channels":
        preds["boxes"] = preds["boxes"][:, :-1]
    elif what == "missing key":
        del preds["scores"]
    elif what == "bboxes shape":
        batch["bboxes"] = batch["bboxes"][:, :3]
    return preds, batch


@pytest.mark.parametrize(
    "what, error, message",
    [
        ("class id", ValueError, r"batch\['cls'\]: expected integers in \[0, 3\), got 3.0 at row 1"),
        ("image id", ValueError, r"batch\['batch_idx'\]: expected integers in \[0, 2\), got 2.0 at row 4"),
        ("pixel boxes", ValueError, r"boxes in pixels\?\), got \[40.0, 30.0\] at row 0"),
        ("channels", ValueError, r"preds\['boxes'\]: expected shape \[bs, 4 \* reg_max = 64"),
        ("missing key", KeyError, r"preds: expected the key 'scores'"),
        ("bboxes shape", ValueError, r"batch\['bboxes'\]: expected shape \[n, 4\]"),
    ],
)
@pytest.mark.parametrize("backend", ALL)
def test_bad_input_is_a_clear_error(what, error, message, backend, gen):
    """The same error from every backend (the cpp op checks the target values itself, in C++)."""
    model = StandIn(nc=3)
    preds, batch = _bad(make_preds(2, grids_for(64, 64), 3, 16, gen), make_batch([2, 3], 3, gen), what)
    with pytest.raises(error, match=message):
        yolov8.DetectionLoss(model, backend=backend)(preds, batch)


def test_construction_errors():
    model = StandIn(nc=3)
    with pytest.raises(ValueError, match=r"backend: expected 'auto' or one of \[.*'reference'.*\], got"):
        yolov8.DetectionLoss(model, backend="triton" if "triton" not in BACKENDS else "cudaa")
    with pytest.raises(ValueError, match="topk2: expected a positive int, got 0"):
        yolov8.DetectionLoss(model, tal_topk2=0)
    del model.args
    with pytest.raises(AttributeError, match="model.args: expected the training hyperparameters"):
        yolov8.DetectionLoss(model)
    with pytest.raises(TypeError, match="expected an ultralytics detection model"):
        yolov8.DetectionLoss(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_predictions_give_a_nonfinite_loss(backend, value, gen):
    model = StandIn(nc=3)
    preds = make_preds(1, grids_for(64, 64), 3, 16, gen)
    batch = make_batch([3], 3, gen)
    theirs = original().v8DetectionLoss(model)
    for key in ("boxes", "scores"):
        bad = dict(preds)
        bad[key] = preds[key].clone()
        bad[key][0, 0, :].fill_(value)  # every point: assigned ones included
        want = theirs(bad, batch)[0]
        got = yolov8.DetectionLoss(model, backend=backend)(bad, batch)[0]
        assert torch.equal(torch.isfinite(got), torch.isfinite(want)), (key, got, want)
        assert not torch.isfinite(got).all()
