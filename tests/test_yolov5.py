"""The YOLOv5-style loss family: the reference against a local re-statement of the original
(``original_yolov5.py``), every fused backend against the reference, the ops, the drop-in
``ComputeLoss`` and the ``YOLOv5Loss`` module."""

import itertools

import original_yolov5 as original
import pytest
import torch
import torch.nn as nn
from helpers import fused_backends, make_p, make_targets, option_id, random_anchors

import yolo_kernels as yk
from yolo_kernels import library, reference
from yolo_kernels.anchor.backends import run_backend
from yolo_kernels.anchor.options import LossOptions
from yolo_kernels.config import MissingHyperparameterError
from yolo_kernels.yolov5 import DEFAULT_HYP_V5, ComputeLoss, YOLOv5Loss, default_balance

# yolov5s's anchors (pixels) and strides
ANCHORS_PX = [[10, 13, 16, 30, 33, 23], [30, 61, 62, 45, 59, 119], [116, 90, 156, 198, 373, 326]]
STRIDES = [8, 16, 32]
HYP = {**DEFAULT_HYP_V5, "label_smoothing": 0.0}


def grid_anchors(img=128):
    """``[nl, na, 2]`` anchors in grid units and the grids of a square image of ``img`` pixels."""
    a = torch.tensor(ANCHORS_PX, dtype=torch.float32).view(3, 3, 2) / torch.tensor(STRIDES).view(-1, 1, 1)
    return a, [(img // s, img // s) for s in STRIDES]


def edge_targets(bs, nc, nx):
    """Targets on every edge of the neighbour rule for an ``nx``-wide grid: integer positions (both
    neighbours), fractions of exactly 0.5 (none), positions at or just past one cell from either
    edge, x and y at 0 and 1 (the neighbour is the clamped centre cell), and a duplicate."""
    xs = [4.0 / nx, 4.5 / nx, 1.0 / nx, 1.25 / nx, (nx - 1.0) / nx, (nx - 1.5) / nx, 0.0, 1.0, 0.37]
    rows = []
    for k, x in enumerate(xs):
        y = xs[(k * 4 + 3) % len(xs)]
        rows.append([k % bs, k % nc, x, y, 0.05 + 0.04 * (k % 5), 0.08 + 0.03 * (k % 4)])
    rows.append(list(rows[2]))  # a duplicate target
    return torch.tensor(rows, dtype=torch.float32)


def fixed_problem(bs=2, nc=4, img=128, seed=0, nt=12):
    anchors, grids = grid_anchors(img)
    g = torch.Generator().manual_seed(seed)
    p = make_p(bs, [3, 3, 3], grids, nc, g)
    targets = torch.cat((edge_targets(bs, nc, grids[0][1]), make_targets(nt, bs, nc, g, lo=0.05, hi=0.9)))
    return p, targets, anchors


def small_problem(bs=2, nc=5, seed=0, nl=2):
    """``nl`` layers (8x8, 4x4, 2x2) and nine targets (six on the edges of the neighbour rule, one
    of them duplicated): small enough for the Triton interpreter, whose cost grows with the
    candidates."""
    anchors, grids = grid_anchors(64)
    g = torch.Generator().manual_seed(seed)
    p = make_p(bs, [3] * nl, grids[:nl], nc, g)
    edges = edge_targets(bs, nc, grids[0][1])[[0, 1, 2, 6, 7, 9]]
    return p, torch.cat((edges, make_targets(3, bs, nc, g, lo=0.1, hi=0.9))), list(anchors[:nl])


# ----------------------------------------------------------------- reference against the original


@pytest.mark.parametrize("img", [128, 160])
def test_matching_equals_the_original_build_targets(img):
    p, targets, anchors = fixed_problem(img=img)
    tcls, tbox, indices, anch = original.build_targets(p, targets, anchors, 4.0)
    for i, pi in enumerate(p):
        m = reference.match_yolov5(tuple(pi.shape[2:4]), targets, anchors[i], 4.0)
        assert m.b.numel() > 0
        for ours, theirs in zip((m.b, m.a, m.gj, m.gi), indices[i]):
            assert torch.equal(ours, theirs)
        assert torch.equal(m.tbox, tbox[i]) and torch.equal(m.anch, anch[i]) and torch.equal(m.tcls, tcls[i])


def test_matching_neighbours_on_the_edges():
    """One target per rule on an 8-wide grid, with the original's cells (centre, left, up, right, down)."""
    anchors = torch.tensor([[1.0, 1.0]])

    def cells(x, y):
        t = torch.tensor([[0, 0, x / 8, y / 8, 1 / 8, 1 / 8]])
        m = reference.match_yolov5((8, 8), t, anchors, 4.0)
        return list(zip(m.gi.tolist(), m.gj.tolist()))

    assert cells(4.25, 4.75) == [(4, 4), (3, 4), (4, 5)]  # left (x frac < .5), down (y frac > .5)
    assert cells(4.5, 4.5) == [(4, 4)]  # fractions of exactly 0.5: no neighbour
    assert cells(4.0, 4.0) == [(4, 4), (3, 4), (4, 3), (4, 4), (4, 4)]  # integers: both ways in x and y
    # x = 1 is not > 1: no left; the "right" block of an integer x truncates x + 0.5 to its own cell
    assert cells(1.0, 6.5) == [(1, 6), (1, 6)]
    assert cells(8.0, 0.0) == [(7, 0), (7, 0), (7, 0)]  # the edges: neighbours clamped onto the centre cell
    m = reference.match_yolov5((8, 8), torch.tensor([[0, 0, 1.0, 0.5, 0.1, 0.1]]), anchors, 4.0)
    assert m.tbox[:, 0].tolist() == [1.0] * 4  # offsets from the clamped cell, as the original


def test_matching_anchor_ratio_threshold():
    anchors = torch.tensor([[1.0, 1.0], [4.0, 4.0]])
    t = torch.tensor([[0, 0, 0.5, 0.5, 3.9 / 8, 1.0 / 8], [0, 0, 0.55, 0.55, 4.0 / 8, 1.0 / 8]])
    m = reference.match_yolov5((8, 8), t, anchors, 4.0)
    # ratio 3.9 < 4 fits anchor 0; ratio exactly 4 does not (strict); anchor 1: ratios 1/4.1.., 4 / 4
    assert [(a, k) for a, k in zip(m.a.tolist(), m.gi.tolist())][:1] == [(0, 4)]
    assert all(a == 0 for a in m.a.tolist())


OPTION_SETS = [
    {},
    {"gr": 0.5},
    {"gr": 1.5},  # the original mixes only when gr < 1
    {"sort_obj_iou": True},
    {"sort_obj_iou": True, "gr": 0.25},
    {"label_smoothing": 0.1, "cls_pw": 2.0, "obj_pw": 0.5},
]


@pytest.mark.parametrize("options", OPTION_SETS, ids=option_id)
@pytest.mark.parametrize("nc", [1, 4])
def test_reference_equals_the_original(options, nc):
    p, targets, anchors = fixed_problem(nc=nc)
    targets[:, 1] = targets[:, 1] % nc
    hyp = {**HYP, **{k: v for k, v in options.items() if k in HYP}}
    gr, sort = options.get("gr", 1.0), options.get("sort_obj_iou", False)
    q = [x.clone().requires_grad_() for x in p]
    loss, items = original.compute_loss(q, targets, anchors, hyp, nc, [4.0, 1.0, 0.4], gr=gr, sort_obj_iou=sort)
    loss.backward()
    crit = YOLOv5Loss(list(anchors), [1, 1, 1], nc, hyp=hyp, gr=gr, sort_obj_iou=sort, backend="reference")
    r = [x.clone().requires_grad_() for x in p]
    ours, our_items = crit(r, targets)
    ours.backward()
    torch.testing.assert_close(ours, loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(our_items, items, rtol=1e-6, atol=1e-7)
    for a, b in zip(r, q):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6 * float(b.grad.abs().max()))


def test_four_layers_use_the_original_balance():
    assert default_balance(3) == [4.0, 1.0, 0.4]
    assert default_balance(4) == [4.0, 1.0, 0.25, 0.06]
    assert default_balance(5) == [4.0, 1.0, 0.25, 0.06, 0.02]
    with pytest.raises(ValueError, match="covers 1 to 5 layers, got 6"):
        default_balance(6)
    g = torch.Generator().manual_seed(3)
    anchors = random_anchors([3, 3, 3, 3], g, lo=0.5, hi=4.0)
    p = make_p(2, [3, 3, 3, 3], [(16, 16), (8, 8), (4, 4), (2, 2)], 3, g)
    targets = make_targets(12, 2, 3, g, lo=0.05, hi=0.6)
    loss, items = original.compute_loss(p, targets, torch.stack(anchors), HYP, 3, default_balance(4))
    ours, our_items = YOLOv5Loss(anchors, [1] * 4, 3, backend="reference")(p, targets)
    torch.testing.assert_close(ours, loss, rtol=1e-6, atol=0)


# ------------------------------------------------------------------------- fused against reference

FUSED_OPTIONS = OPTION_SETS + [
    {"fl_gamma": 1.5},
    {"fl_gamma": 2.0, "label_smoothing": 0.2, "sort_obj_iou": True},
    {"box_loss": "giou"},
    {"box_loss": "diou", "anchor_t": 2.0},
    {"box_loss": "iou", "anchor_t": 10.0},
]


def _loss_items_grads(backend, device, p, targets, anchors, options, balance):
    q = [x.detach().to(device).clone().requires_grad_() for x in p]
    b = balance.to(device) if balance is not None else None
    loss, items, layer_obj, _ = run_backend(q, targets.to(device), anchors, options, backend, True, b)
    loss.backward()
    return torch.cat((loss.detach(), items, layer_obj)).cpu(), [x.grad.cpu() for x in q]


def assert_fused_matches_reference(backend, device, p, targets, anchors, options, balance=None, rtol_grad=1e-4):
    up = [x.float() if x.dtype in (torch.float16, torch.bfloat16) else x for x in p]
    values, grads = _loss_items_grads(backend, device, p, targets, anchors, options, balance)
    ref_values, ref_grads = _loss_items_grads("reference", "cpu", up, targets, anchors, options, balance)
    torch.testing.assert_close(values, ref_values, rtol=1e-5, atol=1e-5 * float(ref_values.abs().max()))
    for g, r in zip(grads, ref_grads):
        assert g.dtype == p[0].dtype
        torch.testing.assert_close(g.to(r.dtype), r, rtol=rtol_grad, atol=rtol_grad * float(r.abs().max()))


@pytest.mark.parametrize("backend, device", fused_backends())
@pytest.mark.parametrize("options", FUSED_OPTIONS, ids=option_id)
def test_fused_equals_reference(backend, device, options):
    p, targets, anchors = small_problem(nc=5)
    o = LossOptions(nc=5, family="yolov5", **{"box_loss": "ciou", "box": 0.05, "cls": 0.5, "obj": 1.0, **options})
    assert_fused_matches_reference(backend, device, p, targets, anchors, o, torch.tensor([4.0, 0.7]))


@pytest.mark.parametrize("backend, device", fused_backends())
@pytest.mark.parametrize(
    "case", ["empty", "nc1", "one_pair_sorted", "three_layers", "four_layers", "duplicates", "no_balance"]
)
def test_fused_edge_cases(backend, device, case):
    g = torch.Generator().manual_seed(11)
    nc = 1 if case == "nc1" else 3
    nas, grids = (
        ([3, 2, 3, 1], [(6, 6), (3, 4), (2, 2), (1, 1)]) if case == "four_layers" else ([3, 3], [(6, 6), (3, 3)])
    )
    anchors = random_anchors(nas, g, lo=0.5, hi=3.0)
    p = make_p(2, nas, grids, nc, g)
    targets = make_targets(6, 2, nc, g, lo=0.05, hi=0.6)
    options = dict(nc=nc, family="yolov5", box_loss="ciou")
    if case == "empty":
        targets = targets[:0]
    if case == "duplicates":
        targets = torch.cat((targets, targets, targets[:2]))
        options["sort_obj_iou"] = True
    if case == "one_pair_sorted":  # the original crashes here (a 0-d IoU after squeeze)
        anchors = [torch.tensor([[1.0, 1.0], [9.0, 9.0], [0.1, 0.1]]), torch.tensor([[50.0, 50.0]] * 3)]
        targets = torch.tensor([[1, 0, 0.5 + 0.5 / 6, 0.5 + 0.5 / 6, 1 / 6, 1 / 6]])  # one fit, x = y = 3.5
        options["sort_obj_iou"] = True
        assert reference.match_yolov5((6, 6), targets, anchors[0], 4.0).b.numel() == 1
    if case == "three_layers":  # YOLOv5s's heads and anchors, the default balance
        p, targets, anchors = small_problem(nc=nc, nl=3)
        nas = [3, 3, 3]
    balance = None if case == "no_balance" else torch.rand(len(nas), generator=g) + 0.5
    if case == "three_layers":
        balance = torch.tensor(default_balance(3))
    assert_fused_matches_reference(backend, device, p, targets, anchors, LossOptions(**options), balance)


# -------------------------------------------------------------------------------------- the ops


@pytest.mark.skipif(library.LOAD_ERROR is not None, reason="the C++ extension is not built")
def test_match_and_box_iou_ops_equal_the_reference():
    p, targets, anchors = fixed_problem()
    for i, pi in enumerate(p):
        ny, nx = pi.shape[2:4]
        indices, tbox, anch, tcls = yk.ops.match(targets, anchors[i], ny, nx, 4.0, family="yolov5")
        m = reference.match_yolov5((ny, nx), targets, anchors[i], 4.0)
        assert torch.equal(indices, torch.stack((m.b, m.a, m.gj, m.gi), 1))
        assert torch.equal(tbox, m.tbox) and torch.equal(anch, m.anch) and torch.equal(tcls, m.tcls)
        ps = pi[m.b, m.a, m.gj, m.gi].detach().double().requires_grad_()
        for kind in yk.BOX_LOSSES:
            iou, grad = yk.ops.box_iou(ps, m.tbox.double(), m.anch.double(), kind, family="yolov5")
            want = reference.box_iou(
                reference.predicted_box(ps, m.anch.double(), "yolov5"), m.tbox.double(), kind, "yolov5"
            )
            (want_grad,) = torch.autograd.grad(want.sum(), ps)
            torch.testing.assert_close(iou, want.detach(), rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(grad, want_grad[:, :4], rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------------------ the drop-in


class Detect(nn.Module):
    """What ComputeLoss reads of yolov5's Detect: na, nc, nl, anchors (grid units), stride."""

    def __init__(self, nc, anchors_px=ANCHORS_PX, strides=STRIDES):
        super().__init__()
        self.nc, self.nl, self.na = nc, len(anchors_px), len(anchors_px[0]) // 2
        self.stride = torch.tensor(strides, dtype=torch.float32)
        a = torch.tensor(anchors_px, dtype=torch.float32).view(self.nl, -1, 2)
        self.register_buffer("anchors", a / self.stride.view(-1, 1, 1))
        self.m = nn.ModuleList(nn.Conv2d(4, self.na * (nc + 5), 1) for _ in strides)


class TinyYOLOv5(nn.Module):
    def __init__(self, nc, **detect):
        super().__init__()
        self.model = nn.Sequential(nn.Conv2d(3, 4, 1), Detect(nc, **detect))


def test_compute_loss_drop_in_equals_the_original():
    p, targets, anchors = fixed_problem(nc=4)
    model = TinyYOLOv5(4)
    model.hyp = dict(HYP, lr0=0.01, anchors=3)  # train.py's hyp carries more keys
    compute_loss = ComputeLoss(model, backend="reference")
    assert (compute_loss.na, compute_loss.nc, compute_loss.nl, compute_loss.gr) == (3, 4, 3, 1.0)
    assert compute_loss.sort_obj_iou is False and compute_loss.balance == [4.0, 1.0, 0.4]
    for gr, sort in [(1.0, False), (0.5, True)]:
        compute_loss.gr, compute_loss.sort_obj_iou = gr, sort
        loss, items = compute_loss(p, targets)
        want, want_items = original.compute_loss(p, targets, anchors, HYP, 4, [4.0, 1.0, 0.4], gr=gr, sort_obj_iou=sort)
        assert loss.shape == (1,) and items.shape == (3,)
        torch.testing.assert_close(loss, want, rtol=1e-6, atol=0)
        torch.testing.assert_close(items, want_items, rtol=1e-6, atol=1e-7)


def test_compute_loss_attributes_of_the_original():
    p, targets, anchors = fixed_problem(nc=4)
    model = TinyYOLOv5(4)
    model.hyp = dict(HYP, label_smoothing=0.1)
    compute_loss = ComputeLoss(model, backend="reference")
    assert (compute_loss.cp, compute_loss.cn) == pytest.approx((0.95, 0.05))
    want = original.build_targets(p, targets, anchors, HYP["anchor_t"])
    got = compute_loss.build_targets(p, targets)
    for w_layer, g_layer in zip(zip(*want), zip(*got)):
        tcls, tbox, ind, anch = g_layer
        assert torch.equal(tcls, w_layer[0]) and torch.equal(tbox, w_layer[1]) and torch.equal(anch, w_layer[3])
        assert all(torch.equal(a, b) for a, b in zip(ind, w_layer[2]))
    compute_loss.balance = [1.0, 2.0, 3.0]
    assert compute_loss.balance == [1.0, 2.0, 3.0]
    loss, _ = compute_loss(p, targets)
    want_loss, _ = original.compute_loss(p, targets, anchors, dict(HYP, label_smoothing=0.1), 4, [1.0, 2.0, 3.0])
    torch.testing.assert_close(loss, want_loss, rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="balance: expected 3 weights"):
        compute_loss.balance = [1.0]


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_compute_loss_reads_hyp_from_the_wrapper_and_detect_from_the_model(backend):
    model = TinyYOLOv5(3)
    wrapper = nn.DataParallel(model)  # CPU: a plain wrapper; train.py sets hyp on it
    wrapper.hyp = dict(HYP)
    assert not hasattr(model, "hyp")
    compute_loss = ComputeLoss(wrapper, backend=backend)
    p, targets, anchors = fixed_problem(nc=3)
    loss, items = compute_loss([x.requires_grad_() for x in p], targets)
    loss.backward()
    want, _ = original.compute_loss(p, targets, anchors, HYP, 3, [4.0, 1.0, 0.4])
    torch.testing.assert_close(loss.detach(), want, rtol=1e-5, atol=0)


def test_autobalance_follows_the_original_without_a_sync():
    p, targets, anchors = fixed_problem(nc=3)
    model = TinyYOLOv5(3)
    model.hyp = dict(HYP)
    compute_loss = ComputeLoss(model, autobalance=True, backend="reference")
    assert compute_loss.ssi == 1
    balance = [4.0, 1.0, 0.4]
    for step in range(3):
        q = [x * (1 + 0.1 * step) for x in p]
        loss, items = compute_loss(q, targets)
        want, _ = original.compute_loss(q, targets, anchors, HYP, 3, balance)
        torch.testing.assert_close(loss, want, rtol=1e-6, atol=0)
        # the original's update: per layer with the unweighted objectness BCE, then / balance[ssi]
        obj = [nn.BCEWithLogitsLoss()(x[..., 4], _tobj(q, targets, anchors, i)).item() for i, x in enumerate(q)]
        balance = [b * 0.9999 + 0.0001 / o for b, o in zip(balance, obj)]
        balance = [b / balance[1] for b in balance]
        assert compute_loss.balance == pytest.approx(balance, rel=1e-6)
    assert isinstance(compute_loss.loss.balance_weights, torch.Tensor)


def _tobj(p, targets, anchors, i):
    """The original's objectness target of layer i (gr = 1, no sorting)."""
    _, tbox, indices, anch = original.build_targets(p, targets, anchors, HYP["anchor_t"])
    b, a, gj, gi = indices[i]
    tobj = torch.zeros(p[i].shape[:4])
    pxy, pwh = p[i][b, a, gj, gi][:, :2].sigmoid() * 2 - 0.5, (p[i][b, a, gj, gi][:, 2:4].sigmoid() * 2) ** 2 * anch[i]
    iou = original.bbox_iou_xywh(torch.cat((pxy, pwh), 1), tbox[i]).squeeze(1)
    tobj[b, a, gj, gi] = iou.detach().clamp(0)
    return tobj


def test_compute_loss_errors_name_what_is_wrong():
    model = TinyYOLOv5(3)
    with pytest.raises(TypeError, match="expected a 'hyp' attribute"):
        ComputeLoss(model)
    model.hyp = {k: v for k, v in HYP.items() if k != "anchor_t"}
    with pytest.raises(MissingHyperparameterError, match=r"missing loss hyperparameter\(s\) \['anchor_t'\]"):
        ComputeLoss(model)
    plain = nn.Linear(2, 2)
    plain.hyp = dict(HYP)
    with pytest.raises(TypeError, match="Detect module"):
        ComputeLoss(plain)
    model = TinyYOLOv5(3, strides=[8, 32, 64])
    model.hyp = dict(HYP)
    with pytest.raises(ValueError, match="stride-16 layer"):
        ComputeLoss(model, autobalance=True)
    with pytest.raises(ValueError, match="reduction: the yolov5 loss has only 'mean'"):
        LossOptions(nc=3, family="yolov5", reduction="sum")
    with pytest.raises(ValueError, match="family: expected one of"):
        LossOptions(nc=3, family="yolov4")
    with pytest.raises(ValueError, match=r"balance: expected 3 weights \(one per layer\), got 2"):
        YOLOv5Loss(ANCHORS_PX, STRIDES, 3, balance=[1.0, 2.0])


def test_module_api_in_pixels_equals_the_drop_in():
    p, targets, _ = fixed_problem(nc=4)
    model = TinyYOLOv5(4)
    model.hyp = dict(HYP)
    crit = YOLOv5Loss([torch.tensor(a).view(-1, 2) for a in ANCHORS_PX], STRIDES, 4, backend="reference")
    for a, b in zip(crit(p, targets), ComputeLoss(model, backend="reference")(p, targets)):
        torch.testing.assert_close(a, b)
    assert "sort_obj_iou=False" in repr(crit)


@pytest.mark.skipif(library.LOAD_ERROR is not None, reason="the C++ extension is not built")
def test_every_option_combination_of_the_cpp_backend_small():
    """A cheap sweep: box kinds x focal x sort x gr on one tiny problem (CPU only)."""
    g = torch.Generator().manual_seed(9)
    anchors = random_anchors([3, 3], g, lo=0.5, hi=3.0)
    p = make_p(2, [3, 3], [(5, 4), (3, 2)], 4, g)
    targets = make_targets(8, 2, 4, g, lo=0.05, hi=0.6)
    for box, gamma, sort, gr in itertools.product(yk.BOX_LOSSES, (0.0, 1.5), (False, True), (0.0, 0.7, 1.0)):
        o = LossOptions(nc=4, family="yolov5", box_loss=box, fl_gamma=gamma, sort_obj_iou=sort, gr=gr)
        assert_fused_matches_reference("cpp", "cpu", p, targets, anchors, o, torch.tensor([3.0, 0.5]))
