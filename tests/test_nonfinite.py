"""Non-finite predictions give a non-finite loss, on every backend, family, dtype and code path.

A training loop stops on ``if not torch.isfinite(loss)``; a finite loss over a NaN gradient would
train on it instead. The reference (PyTorch's own BCE, clamp and sigmoid) is the oracle: for each
channel of ``p`` (the objectness of a matched and of an unmatched cell, the class logits and each
box logit of a matched cell) and each of NaN, +inf and -inf, a backend's loss value is finite
exactly when the reference's is, and a NaN anywhere always gives a non-finite loss. Each code path
of the CPU kernels is taken: the summed rows (float, 16 classes or more, no focal factor), the
per-element rows (fewer classes), the focal factor, label smoothing, float64, half precision and
``stats=True``.
"""

import functools

import pytest
import torch
from helpers import fused_backends

import yolo_kernels as yk
from yolo_kernels.anchor.backends import run_backend
from yolo_kernels.anchor.options import LossOptions

NAN, INF = float("nan"), float("inf")
GRIDS, NAS = [(6, 5), (3, 4)], [2, 2]
# anchors in grid units: target 0 has anchor 0's size in layer 0, so that anchor matches it there
# in both families (wh IoU 1 > iou_t, size ratio 1 < anchor_t)
ANCHORS = [torch.tensor([[1.5, 2.0], [3.0, 1.0]]), torch.tensor([[0.8, 1.2], [2.0, 2.5]])]
OWN_CLASS = 1
# (name, channel or None for the class logits, whether the cell is the matched one)
PLACES = [
    ("obj_matched", 4, True),
    ("obj_unmatched", 4, False),
    ("cls_own", 5 + OWN_CLASS, True),
    ("cls_other", 5, True),
    ("box_x", 0, True),
    ("box_y", 1, True),
    ("box_w", 2, True),
    ("box_h", 3, True),
]
# (name, dtype, nc, options): each takes a different code path of the CPU kernels
PATHS = [
    ("rows_summed", torch.float32, 20, {}),
    ("per_element", torch.float32, 4, {}),
    ("focal", torch.float32, 20, {"fl_gamma": 1.5}),
    ("focal_few_classes", torch.float32, 4, {"fl_gamma": 2.0}),
    ("smoothing_pw", torch.float32, 20, {"label_smoothing": 0.1, "cls_pw": 2.0, "obj_pw": 0.5}),
    ("float64", torch.float64, 20, {}),
    ("float16", torch.float16, 20, {}),
    ("bfloat16", torch.bfloat16, 4, {}),
]


def problem(dtype, nc):
    g = torch.Generator().manual_seed(3)
    p = [
        torch.randn(2, na, ny, nx, nc + 5, generator=g, dtype=torch.float64).to(dtype)
        for na, (ny, nx) in zip(NAS, GRIDS)
    ]
    ny, nx = GRIDS[0]
    targets = torch.tensor(
        [
            [0, OWN_CLASS, 0.5, 0.5, float(ANCHORS[0][0, 0]) / nx, float(ANCHORS[0][0, 1]) / ny],
            [0, 0, 0.2, 0.3, 0.3, 0.25],
        ]
    )
    matched_cell = (0, 0, int(0.5 * ny), int(0.5 * nx))  # image, anchor, gj, gi in layer 0
    unmatched_cell = (1, 1, 1, 1)  # image 1 (no targets) of layer 1
    return p, targets, matched_cell, unmatched_cell


def loss_of(backend, device, p, targets, options, stats):
    q = [x.detach().to(device).clone().requires_grad_() for x in p]
    loss, items, _, st = run_backend(q, targets.to(device), ANCHORS, options, backend, True, stats=stats)
    loss.backward()
    if stats and not finite(loss):
        assert bool(st.nonfinite), "a non-finite loss is flagged by its statistics"
    return loss.detach().cpu(), items.detach().cpu()


def finite(x):
    return bool(torch.isfinite(x).all())


def poisoned(p, matched, unmatched, channel, on_matched, bad):
    q = [x.clone() for x in p]
    layer, cell = (0, matched) if on_matched else (1, unmatched)
    q[layer][cell + (channel,)] = bad
    return q


@functools.cache
def reference_finite(family, path_name, place, bad):
    """Whether the reference's loss and total item are finite (on the values upcast to float32)."""
    _, dtype, nc, extra = next(x for x in PATHS if x[0] == path_name)
    options = LossOptions(nc=nc, family=family, **extra)
    p, targets, matched, unmatched = problem(dtype, nc)
    _, channel, on_matched = next(x for x in PLACES if x[0] == place)
    q = poisoned(p, matched, unmatched, channel, on_matched, bad)
    up = [x.float() if x.dtype in (torch.float16, torch.bfloat16) else x for x in q]
    loss, items = loss_of("reference", "cpu", up, targets, options, False)
    return finite(loss), finite(items[3])


@pytest.mark.parametrize("family", yk.FAMILIES)
@pytest.mark.parametrize("place", [x[0] for x in PLACES])
def test_reference_nan_gives_nan_loss(family, place):
    for path in PATHS:
        assert reference_finite(family, path[0], place, NAN) == (False, False), path[0]


@pytest.mark.parametrize("backend, device", fused_backends())
@pytest.mark.parametrize("family", yk.FAMILIES)
@pytest.mark.parametrize("path", PATHS, ids=[x[0] for x in PATHS])
@pytest.mark.parametrize("stats", [False, True], ids=["loss", "stats"])
def test_nonfinite_prediction_gives_nonfinite_loss(backend, device, family, path, stats):
    interpreted = {("rows_summed", "yolov3"), ("rows_summed", "yolov5"), ("focal", "yolov3"), ("float64", "yolov3")}
    if device == "cpu" and backend == "triton" and ((path[0], family) not in interpreted or stats):
        pytest.skip("the interpreter runs four cases without statistics (its cost grows with each call)")
    path_name, dtype, nc, extra = path
    options = LossOptions(nc=nc, family=family, **extra)
    p, targets, matched, unmatched = problem(dtype, nc)
    loss, _ = loss_of(backend, device, p, targets, options, stats)
    assert finite(loss), "the clean problem gives a finite loss"
    for place, channel, on_matched in PLACES:
        for bad in (NAN, INF, -INF):
            q = poisoned(p, matched, unmatched, channel, on_matched, bad)
            loss, items = loss_of(backend, device, q, targets, options, stats)
            ref = reference_finite(family, path_name, place, bad)
            where = f"{place} = {bad}: {backend} loss {loss.tolist()}, reference finite: {ref[0]}"
            assert (finite(loss), finite(items[3])) == ref, where
