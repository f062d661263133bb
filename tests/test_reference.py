"""The oracle against hand-worked values and an independent scalar implementation (tests/naive.py)."""

import math

import naive
import pytest
import torch
from helpers import duck_model, make_p, make_targets, random_anchors

import yolo_kernels as yk
from yolo_kernels.anchor.options import LossOptions

R = yk.reference
LOG2 = math.log(2.0)


def sig(x):
    return 1 / (1 + math.exp(-x))


def one_layer(ny=2, nx=2, na=1, nc=1, bs=1):
    return torch.zeros(bs, na, ny, nx, nc + 5, dtype=torch.float64)


def items(p, targets, anchors, **options):
    p = [p] if isinstance(p, torch.Tensor) else p
    _, li = R.loss(p, targets, anchors, LossOptions(**{"nc": p[0].shape[-1] - 5, **options}))
    return li.tolist()


# ---------------------------------------------------------------- worked out by hand


def test_one_target_one_layer_by_hand():
    # grid 2x2, one anchor 1x1 (grid units); target centre (0.25, 0.75), size 0.5 x 0.5 of the image
    p = one_layer()
    p[0, 0, 1, 0, :4] = torch.tensor([0.4, -0.2, 0.1, -0.3], dtype=torch.float64)
    p[0, 0, 1, 0, 4] = 2.0
    targets = torch.tensor([[0, 0, 0.25, 0.75, 0.5, 0.5]], dtype=torch.float64)
    anchors = [torch.tensor([[1.0, 1.0]], dtype=torch.float64)]
    # scaled: gx = 0.5, gy = 1.5, gw = gh = 1 -> cell (gj, gi) = (1, 0), offsets (0.5, 0.5); wh_iou = 1 > 0.2
    px, py = sig(0.4), sig(-0.2)
    pw, ph = math.exp(0.1), math.exp(-0.3)
    # predicted box corners vs target corners [0, 1] x [0, 1]
    l1, r1, t1, b1 = px - pw / 2, px + pw / 2, py - ph / 2, py + ph / 2
    inter = (min(r1, 1) - max(l1, 0)) * (min(b1, 1) - max(t1, 0))
    union = pw * ph + 1e-16 + 1.0 - inter
    c_area = (max(r1, 1) - min(l1, 0)) * (max(b1, 1) - min(t1, 0)) + 1e-16
    giou = inter / union - (c_area - union) / c_area
    lbox = 3.54 * (1 - giou)
    # objectness: 4 cells; the matched one has target giou (gr = 1), logit 2; the others logit 0, target 0
    lobj = 64.3 * (-(giou * math.log(sig(2.0)) + (1 - giou) * math.log(1 - sig(2.0))) + 3 * LOG2) / 4
    got = items(p, targets, anchors)
    assert got == pytest.approx([lbox, lobj, 0.0, lbox + lobj], rel=1e-12)


def test_duplicate_pairs_last_wins_and_both_count():
    # two targets in the same cell with different sizes: both box terms count, the last sets tobj
    p = one_layer(nc=3)
    targets = torch.tensor([[0, 2, 0.3, 0.3, 0.5, 0.5], [0, 1, 0.2, 0.4, 0.4, 0.6]], dtype=torch.float64)
    anchors = [torch.tensor([[1.0, 1.0]], dtype=torch.float64)]
    # logits 0: predicted box centre (0.5, 0.5), size 1x1 in cell (0, 0)
    gious = []
    for _, _, x, y, w, h in targets.tolist():
        gious.append(naive.box_iou((0.5, 0.5, 1.0, 1.0), (x * 2, y * 2, w * 2, h * 2), "giou"))
    lbox = 3.54 * ((1 - gious[0]) + (1 - gious[1])) / 2
    lobj = 64.3 * LOG2  # every logit is 0: BCE(0, y) = log 2 whatever the target
    lcls = 37.4 * LOG2  # BCE(0, .) = log 2 for all 2 x 3 class entries
    got = items(p, targets, anchors)
    assert got == pytest.approx([lbox, lobj, lcls, lbox + lobj + lcls], rel=1e-12)

    # the objectness target is the *last* pair's giou: visible with a non-zero objectness logit
    p[0, 0, 0, 0, 4] = 1.5
    cells = 4
    expect = 64.3 * (naive.bce(1.5, gious[1]) + 3 * LOG2) / cells
    assert items(p, targets, anchors)[1] == pytest.approx(expect, rel=1e-12)
    swapped = targets.flip(0)
    expect_swapped = 64.3 * (naive.bce(1.5, gious[0]) + 3 * LOG2) / cells
    assert items(p, swapped, anchors)[1] == pytest.approx(expect_swapped, rel=1e-12)


def test_target_at_x_one_gets_offset_one_in_last_cell():
    p = one_layer(ny=2, nx=3)
    targets = torch.tensor([[0, 0, 1.0, 0.0, 0.3, 0.5]], dtype=torch.float64)
    anchors = [torch.tensor([[1.0, 1.0]], dtype=torch.float64)]
    m = R.match((2, 3), targets, anchors[0], 0.2, torch.float64)
    assert (m.gi.tolist(), m.gj.tolist()) == ([2], [0])  # gx = 3.0 -> 3, clamped to nx - 1 = 2
    assert m.tbox.tolist() == [[1.0, 0.0, pytest.approx(0.9), 1.0]]
    giou = naive.box_iou((0.5, 0.5, 1.0, 1.0), (1.0, 0.0, 0.9, 1.0), "giou")
    lbox = items(p, targets, anchors)[0]
    assert lbox == pytest.approx(3.54 * (1 - giou), rel=1e-12)


def test_target_matching_no_anchor_adds_only_objectness():
    p = one_layer()
    p[..., 4] = torch.tensor([[-1.0, 0.5], [2.0, -3.0]], dtype=torch.float64)
    # target 0.05 x 0.05 of a 2x2 grid = 0.1 x 0.1 cells vs anchor 1x1: wh_iou = 0.01 < 0.2
    targets = torch.tensor([[0, 0, 0.5, 0.5, 0.05, 0.05]], dtype=torch.float64)
    anchors = [torch.tensor([[1.0, 1.0]], dtype=torch.float64)]
    assert R.match((2, 2), targets, anchors[0], 0.2, torch.float64).b.numel() == 0
    lobj = 64.3 * sum(-math.log(1 - sig(x)) for x in (-1.0, 0.5, 2.0, -3.0)) / 4
    assert items(p, targets, anchors) == pytest.approx([0.0, lobj, 0.0, lobj], rel=1e-12)


def test_sum_reduction_by_hand():
    p = one_layer(nc=2, bs=2)
    targets = torch.tensor([[1, 1, 0.25, 0.25, 0.5, 0.5]], dtype=torch.float64)
    anchors = [torch.tensor([[1.0, 1.0]], dtype=torch.float64)]
    giou = naive.box_iou((0.5, 0.5, 1.0, 1.0), (0.5, 0.5, 1.0, 1.0), "giou")  # identical boxes
    lbox = 3.54 * (1 - giou) * 3.0 / 1
    lobj = 64.3 * (8 * LOG2) * 3.0 / 2  # 2 images x 4 cells, all BCE(0, .) = log 2; x 3 / bs
    lcls = 37.4 * (2 * LOG2) * 3.0 / (1 * 2)
    got = items(p, targets, anchors, reduction="sum")
    assert got == pytest.approx([lbox, lobj, lcls, lbox + lobj + lcls], rel=1e-12)


def test_wh_iou_and_smooth_bce():
    iou = R.wh_iou(torch.tensor([[2.0, 3.0]]), torch.tensor([[1.0, 6.0], [2.0, 3.0]]))
    assert iou.tolist() == [[pytest.approx(3 / (6 + 6 - 3)), 1.0]]
    assert R.smooth_BCE(0.2) == (0.9, 0.1)
    assert R.smooth_BCE(0.0) == (1.0, 0.0)


@pytest.mark.parametrize("kind", ["iou", "giou", "diou", "ciou"])
def test_bbox_iou_xywh_and_corners_agree_with_naive(kind, gen):
    b1 = torch.rand(4, 7, generator=gen, dtype=torch.float64) + 0.2
    b2 = torch.rand(7, 4, generator=gen, dtype=torch.float64) + 0.2
    flags = dict(GIoU=kind == "giou", DIoU=kind == "diou", CIoU=kind == "ciou")
    got = R.bbox_iou(b1, b2, x1y1x2y2=False, **flags)
    want = [naive.box_iou(b1[:, k].tolist(), b2[k].tolist(), kind) for k in range(7)]
    assert got.tolist() == pytest.approx(want, rel=1e-12, abs=1e-12)

    def corners(xywh):
        x, y, w, h = xywh
        return torch.stack((x - w / 2, y - h / 2, x + w / 2, y + h / 2))

    got_corners = R.bbox_iou(corners(b1), corners(b2.t()).t(), x1y1x2y2=True, **flags)
    assert torch.allclose(got_corners, got, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- against the scalar implementation

OPTION_SETS = [
    {},
    {"gr": 0.3},
    {"gr": 0.0, "cls_pw": 2.0, "obj_pw": 0.5},
    {"fl_gamma": 1.5},
    {"label_smoothing": 0.1},
    {"reduction": "sum"},
    {"reduction": "sum", "fl_gamma": 2.0, "label_smoothing": 0.2},
    {"box_loss": "iou"},
    {"box_loss": "diou", "iou_t": 0.1},
    {"box_loss": "ciou", "gr": 0.5},
]


@pytest.mark.parametrize("options", OPTION_SETS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
@pytest.mark.parametrize("nc", [1, 4])
def test_loss_matches_scalar_implementation(options, nc, gen):
    nas, grids = [3, 2], [(3, 4), (5, 2)]
    anchors = random_anchors(nas, gen, lo=0.3, hi=2.5)
    p = make_p(2, nas, grids, nc, gen, dtype=torch.float64)
    targets = make_targets(9, 2, nc, gen, dtype=torch.float64)
    targets[0, 2:4] = torch.tensor([1.0, 0.0], dtype=torch.float64)  # edge coordinates
    targets = torch.cat((targets, targets[3:5]))  # exact duplicates
    got = items(p, targets, [a.double() for a in anchors], **options)
    want = naive.loss(
        [x.tolist() for x in p], targets.tolist(), [a.double().tolist() for a in anchors], nc=nc, **options
    )
    assert got == pytest.approx(list(want), rel=1e-10, abs=1e-12)


def test_no_targets(gen):
    p = make_p(2, [3], [(4, 4)], 3, gen, dtype=torch.float64)
    anchors = random_anchors([3], gen)
    for reduction in ("mean", "sum"):
        got = items(p, torch.zeros(0, 6, dtype=torch.float64), anchors, reduction=reduction)
        want = naive.loss([p[0].tolist()], [], [anchors[0].tolist()], nc=3, reduction=reduction)
        assert got == pytest.approx(list(want), rel=1e-12)
        assert got[0] == got[2] == 0.0


# ---------------------------------------------------------------- build_targets


def test_build_targets_pair_order_and_outputs(gen):
    anchors = [torch.tensor([[1.0, 1.0], [2.0, 2.0], [1.5, 1.0]])]
    model = duck_model(anchors, nc=5)
    p = make_p(2, [3], [(4, 6)], 5, gen)
    targets = make_targets(6, 2, 5, gen, lo=0.2, hi=0.4)
    tcls, tbox, indices, anch = yk.build_targets(p, targets, model)
    b, a, gj, gi = indices[0]
    assert a.tolist() == sorted(a.tolist())  # anchor-major
    pairs = naive.match(targets.tolist(), anchors[0].tolist(), 4, 6, 0.2)
    assert len(pairs) == b.numel() > 0
    assert [(q[0], q[1], q[2], q[3], q[6]) for q in pairs] == list(
        zip(b.tolist(), a.tolist(), gj.tolist(), gi.tolist(), tcls[0].tolist())
    )
    assert torch.allclose(tbox[0], torch.tensor([q[4] for q in pairs]), atol=1e-6)
    assert torch.equal(anch[0], anchors[0][a])
    assert all(x.dtype == torch.long for x in (b, a, gj, gi, tcls[0]))


def test_build_targets_empty():
    anchors = [torch.tensor([[1.0, 1.0]])]
    p = [torch.zeros(1, 1, 2, 2, 6)]
    tcls, tbox, indices, anch = yk.build_targets(p, torch.zeros(0, 6), duck_model(anchors, nc=1))
    assert tcls[0].shape == (0,) and tbox[0].shape == (0, 4) and anch[0].shape == (0, 2)
    assert all(x.shape == (0,) for x in indices[0])


# ---------------------------------------------------------------- gradients

# gr = 0 keeps the objectness target constant: with gr > 0 it depends on p through the detached IoU,
# which finite differences would see and autograd (by definition) does not. CIoU's alpha is
# detached for the same reason, so it is checked against the scalar implementation's values only.
GRAD_OPTION_SETS = [
    {"gr": 0.0},
    {"gr": 0.0, "fl_gamma": 1.5, "cls_pw": 1.7, "obj_pw": 0.6},
    {"gr": 0.0, "reduction": "sum", "label_smoothing": 0.1},
    {"gr": 0.0, "box_loss": "iou"},
    {"gr": 0.0, "box_loss": "diou", "reduction": "sum"},
]


@pytest.mark.parametrize("options", GRAD_OPTION_SETS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_gradcheck_whole_loss(options, gen):
    nas, grids, nc = [2, 3], [(2, 3), (3, 2)], 3
    anchors = random_anchors(nas, gen, lo=0.5, hi=2.0)
    p = [x.requires_grad_() for x in make_p(2, nas, grids, nc, gen, dtype=torch.float64)]
    targets = make_targets(5, 2, nc, gen, lo=0.2, hi=0.6, dtype=torch.float64)
    targets = torch.cat((targets, targets[:1]))
    opts = LossOptions(nc=nc, **options)
    assert sum(R.match(g, targets, a, opts.iou_t, torch.float64).b.numel() for g, a in zip(grids, anchors)) > 0
    assert torch.autograd.gradcheck(lambda *ps: R.loss(list(ps), targets, anchors, opts)[0], p)


def test_gradient_dtype_and_half_inputs(gen):
    nas, grids, nc = [3], [(4, 4)], 4
    anchors = random_anchors(nas, gen)
    p32 = make_p(2, nas, grids, nc, gen)
    targets = make_targets(5, 2, nc, gen)
    opts = LossOptions(nc=nc)
    for dtype in (torch.float16, torch.bfloat16):
        ph = [x.to(dtype).requires_grad_() for x in p32]
        loss, li = R.loss(ph, targets, anchors, opts)
        assert loss.dtype == li.dtype == torch.float32
        loss.backward()
        assert ph[0].grad.dtype == dtype and torch.isfinite(ph[0].grad.float()).all()
        up = [x.detach().float().requires_grad_() for x in ph]  # the same values upcast
        loss_up, _ = R.loss(up, targets, anchors, opts)
        loss_up.backward()
        assert torch.allclose(loss, loss_up, rtol=1e-6)
        assert torch.allclose(ph[0].grad.float(), up[0].grad, rtol=1e-2, atol=1e-2 * up[0].grad.abs().max())


def test_float64_stays_float64(gen):
    p = [x.requires_grad_() for x in make_p(1, [1], [(2, 2)], 1, gen, dtype=torch.float64)]
    loss, li = R.loss(p, make_targets(2, 1, 1, gen, dtype=torch.float64), [torch.ones(1, 2)], LossOptions(nc=1))
    assert loss.dtype == li.dtype == torch.float64 and loss.shape == (1,) and li.shape == (4,)
    loss.backward()
    assert p[0].grad.dtype == torch.float64


def test_non_contiguous_p_equals_contiguous(gen):
    nc, na, ny, nx = 3, 2, 3, 5
    conv = torch.randn(2, na * (nc + 5), ny, nx, generator=gen)
    p_view = [conv.view(2, na, nc + 5, ny, nx).permute(0, 1, 3, 4, 2)]  # the head's layout, not contiguous
    assert not p_view[0].is_contiguous()
    targets = make_targets(6, 2, nc, gen)
    anchors = random_anchors([na], gen)
    opts = LossOptions(nc=nc)
    a = R.loss(p_view, targets, anchors, opts)[1]
    b = R.loss([p_view[0].contiguous()], targets, anchors, opts)[1]
    assert torch.equal(a, b)


def test_extreme_logits_give_finite_loss_and_grad(gen):
    nas, nc = [3], 5
    anchors = random_anchors(nas, gen)
    targets = make_targets(6, 2, nc, gen)
    for sign in (1.0, -1.0):
        p = [(torch.randn(2, 3, 4, 4, nc + 5, generator=gen).sign() * 1e4 * sign).requires_grad_()]
        loss, _ = R.loss(p, targets, anchors, LossOptions(nc=nc))
        loss.backward()
        assert torch.isfinite(loss).all() and torch.isfinite(p[0].grad).all()
