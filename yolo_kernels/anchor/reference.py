"""The oracle: the YOLOv3 loss of ultralytics/yolov3 (archive branch, v8) and the YOLOv5-style
``ComputeLoss`` (ultralytics/yolov5 v7.0, yolov3 master) in plain PyTorch (docs/semantics.md,
docs/yolov5.md).

Every fast backend is tested against these functions. They are written to be read, not to be
fast, but they are no slower than the original. Differences from the original, all deliberate:

* the two crashes on modern PyTorch are gone (a CPU ``arange`` indexed by a CUDA mask, a long
  tensor clamped with float bounds); the cell indices are clamped into the grid and the box
  offsets are taken from the clamped cell, as the original meant;
* duplicates (several pairs on one ``(image, anchor, gj, gi)``): the last pair in pair order sets
  the objectness target, on every device (the original is undefined on CUDA);
* ``exp`` of the w/h logits is capped before the ``clamp(max=1e3)`` (same values), so huge
  logits give a zero gradient there instead of the original's NaN; likewise CIoU's
  ``atan(w / h)`` of the predicted box divides by ``h + 1e-16`` (no 0/0 when both underflow);
* half-precision ``p`` is upcast: all arithmetic is float32 (float64 for float64 ``p``) and the
  gradient comes back in ``p``'s dtype;
* the loss options the original hard-codes (reduction, box-loss kind, label smoothing) are
  arguments.

The YOLOv5-style family (``options.family == "yolov5"``) shares the structure and differs in the
pieces named in docs/yolov5.md: ``match_yolov5``, ``predicted_box(..., family="yolov5")``, the
constants of ``box_iou`` (``eps = 1e-7``), the objectness target and balance, and the batch-size
factor. Its deliberate differences from the original are listed there.

The functions here do not validate their inputs; ``yolo_kernels.compute_loss(...,
backend="reference")`` does, then calls ``loss``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
import torch.nn as nn

from ..config import compute_dtype
from .options import LossOptions, model_anchors, model_options

__all__ = [
    "wh_iou",
    "bbox_iou",
    "predicted_box",
    "box_iou",
    "smooth_BCE",
    "FocalLoss",
    "LayerTargets",
    "match",
    "match_yolov5",
    "ratio_fits",
    "anchor_fits",
    "unmatched_targets",
    "loss_terms",
    "gradient_stats",
    "build_targets",
    "last_pair_mask",
    "loss",
    "compute_loss",
    "compute_dtype",
]


def wh_iou(wh1: torch.Tensor, wh2: torch.Tensor) -> torch.Tensor:
    """IoU of boxes sharing a centre, from sizes only: ``[N, 2]`` x ``[M, 2]`` -> ``[N, M]``."""
    wh1 = wh1[:, None]  # [N, 1, 2]
    wh2 = wh2[None]  # [1, M, 2]
    inter = torch.min(wh1, wh2).prod(2)
    return inter / (wh1.prod(2) + wh2.prod(2) - inter)


def bbox_iou(box1, box2, x1y1x2y2=True, GIoU=False, DIoU=False, CIoU=False, eps=1e-16, alpha_eps=0.0):
    """IoU (or GIoU / DIoU / CIoU) of ``box1`` (``[4]`` or ``[4, n]``, coordinates first) with
    ``box2`` (``[n, 4]``), element by element; the original's signature and constants.

    Boxes are corners ``(x1, y1, x2, y2)`` when ``x1y1x2y2`` else centre ``(x, y, w, h)``. ``eps``
    is added to the union, the enclosing area and diagonal (YOLOv3: 1e-16; YOLOv5: 1e-7, which
    also adds it to CIoU's ``alpha`` denominator: ``alpha_eps``).
    """
    box2 = box2.t()
    if x1y1x2y2:
        b1_x1, b1_y1, b1_x2, b1_y2 = box1[0], box1[1], box1[2], box1[3]
        b2_x1, b2_y1, b2_x2, b2_y2 = box2[0], box2[1], box2[2], box2[3]
    else:
        b1_x1, b1_x2 = box1[0] - box1[2] / 2, box1[0] + box1[2] / 2
        b1_y1, b1_y2 = box1[1] - box1[3] / 2, box1[1] + box1[3] / 2
        b2_x1, b2_x2 = box2[0] - box2[2] / 2, box2[0] + box2[2] / 2
        b2_y1, b2_y2 = box2[1] - box2[3] / 2, box2[1] + box2[3] / 2

    inter = (torch.min(b1_x2, b2_x2) - torch.max(b1_x1, b2_x1)).clamp(0) * (
        torch.min(b1_y2, b2_y2) - torch.max(b1_y1, b2_y1)
    ).clamp(0)
    w1, h1 = b1_x2 - b1_x1, b1_y2 - b1_y1
    w2, h2 = b2_x2 - b2_x1, b2_y2 - b2_y1
    union = (w1 * h1 + eps) + w2 * h2 - inter
    iou = inter / union
    if not (GIoU or DIoU or CIoU):
        return iou

    cw = torch.max(b1_x2, b2_x2) - torch.min(b1_x1, b2_x1)  # enclosing box
    ch = torch.max(b1_y2, b2_y2) - torch.min(b1_y1, b2_y1)
    if GIoU:
        c_area = cw * ch + eps
        return iou - (c_area - union) / c_area
    c2 = cw**2 + ch**2 + eps  # enclosing diagonal squared
    rho2 = ((b2_x1 + b2_x2) - (b1_x1 + b1_x2)) ** 2 / 4 + ((b2_y1 + b2_y2) - (b1_y1 + b1_y2)) ** 2 / 4
    if DIoU:
        return iou - rho2 / c2
    # + 1e-16: a predicted box whose w and h both underflow to 0 gives atan(0) instead of 0/0 = NaN
    v = (4 / math.pi**2) * torch.pow(torch.atan(w2 / h2) - torch.atan(w1 / (h1 + 1e-16)), 2)
    with torch.no_grad():
        alpha = v / ((1 - iou + v) + alpha_eps)
    return iou - (rho2 / c2 + v * alpha)


def predicted_box(ps: torch.Tensor, anch: torch.Tensor, family: str = "yolov3") -> torch.Tensor:
    """The centre-xywh boxes predicted by the box logits ``ps[:, 0:4]`` with anchors ``anch [P, 2]``.

    yolov3: ``sigmoid(xy)`` within the cell and ``exp(wh).clamp(max=1e3) * anchor`` (the logit
    capped at 30 first: the same values, and a zero rather than a NaN gradient for huge logits).
    yolov5: ``2 sigmoid(xy) - 0.5`` (reaching into the neighbour cells) and ``(2 sigmoid(wh))^2 * anchor``.
    """
    if family == "yolov5":
        s = ps[:, :4].sigmoid()
        return torch.cat((s[:, :2] * 2 - 0.5, (s[:, 2:4] * 2) ** 2 * anch), 1)
    return torch.cat((ps[:, :2].sigmoid(), ps[:, 2:4].clamp(max=30.0).exp().clamp(max=1e3) * anch), 1)


#: ``bbox_iou``'s ``eps`` and ``alpha_eps`` per family.
BOX_EPS = {"yolov3": (1e-16, 0.0), "yolov5": (1e-7, 1e-7)}


def box_iou(pbox: torch.Tensor, tbox: torch.Tensor, kind: str = "giou", family: str = "yolov3") -> torch.Tensor:
    """``bbox_iou`` of centre-xywh ``pbox [P, 4]`` against ``tbox [P, 4]`` for a ``kind`` of
    ``BOX_LOSSES``, with the constants of ``family``."""
    eps, alpha_eps = BOX_EPS[family]
    kinds = dict(GIoU=kind == "giou", DIoU=kind == "diou", CIoU=kind == "ciou")
    return bbox_iou(pbox.t(), tbox, x1y1x2y2=False, eps=eps, alpha_eps=alpha_eps, **kinds)


def smooth_BCE(eps: float = 0.1) -> tuple[float, float]:
    """Positive and negative BCE targets with label smoothing ``eps``."""
    return 1.0 - 0.5 * eps, 0.5 * eps


class FocalLoss(nn.Module):
    """Focal loss around a ``BCEWithLogitsLoss``: element loss x ``alpha_t * (1 - p_t) ** gamma``."""

    def __init__(self, loss_fcn: nn.BCEWithLogitsLoss, gamma: float = 1.5, alpha: float = 0.25):
        super().__init__()
        self.loss_fcn = loss_fcn
        self.gamma = gamma
        self.alpha = alpha
        self.reduction = loss_fcn.reduction
        self.loss_fcn.reduction = "none"  # the factor applies element by element

    def forward(self, pred: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
        loss = self.loss_fcn(pred, true)
        pred_prob = torch.sigmoid(pred)
        p_t = true * pred_prob + (1 - true) * (1 - pred_prob)
        alpha_factor = true * self.alpha + (1 - true) * (1 - self.alpha)
        loss = loss * alpha_factor * (1.0 - p_t) ** self.gamma
        if self.reduction == "mean":
            return loss.mean()
        if self.reduction == "sum":
            return loss.sum()
        return loss


class LayerTargets(NamedTuple):
    """The matched pairs of one layer, in pair order (``P`` pairs)."""

    b: torch.Tensor  # [P] image index
    a: torch.Tensor  # [P] anchor index
    gj: torch.Tensor  # [P] cell row, clamped into the grid
    gi: torch.Tensor  # [P] cell column, clamped into the grid
    tbox: torch.Tensor  # [P, 4] (x offset in the cell, y offset, w, h), grid units
    anch: torch.Tensor  # [P, 2] the pair's anchor, grid units
    tcls: torch.Tensor  # [P] class index


def _on_grid(grid: tuple[int, int], targets: torch.Tensor, anchor_vec: torch.Tensor, dtype):
    """``(t, anchor_vec, scale, gxy, gwh)``: targets and anchors in ``dtype`` on the targets'
    device, the grid's ``(nx, ny)`` and the targets' centres and sizes in grid units."""
    ny, nx = grid
    t = targets.to(dtype)
    anchor_vec = anchor_vec.to(device=t.device, dtype=dtype)
    scale = torch.tensor([nx, ny], device=t.device, dtype=dtype)
    return t, anchor_vec, scale, t[:, 2:4] * scale, t[:, 4:6] * scale


def _pairs(grid, t, anchor_vec, a, k, cell, gxy, gwh, dtype) -> LayerTargets:
    """The pairs of anchors ``a`` and targets ``k`` whose cells are at grid positions ``cell``:
    truncated toward zero and clamped into the grid (== trunc of the clamped value, no int
    overflow), the box target taken relative to the clamped cell."""
    ny, nx = grid
    gi = cell[:, 0].clamp(0, nx - 1).long()
    gj = cell[:, 1].clamp(0, ny - 1).long()
    tbox = torch.cat((gxy - torch.stack((gi, gj), 1).to(dtype), gwh), 1)
    return LayerTargets(t[k, 0].long(), a, gj, gi, tbox, anchor_vec[a], t[k, 1].long())


def match(
    grid: tuple[int, int], targets: torch.Tensor, anchor_vec: torch.Tensor, iou_t: float, dtype=torch.float32
) -> LayerTargets:
    """Match ``targets [nt, 6]`` to the anchors ``anchor_vec [na, 2]`` of one layer with grid ``(ny, nx)``.

    Pairs are every (anchor, target) with ``wh_iou > iou_t``, anchor-major then target order.
    """
    t, anchor_vec, _, gxy, gwh = _on_grid(grid, targets, anchor_vec, dtype)
    a, k = (wh_iou(anchor_vec, gwh) > iou_t).nonzero(as_tuple=True)  # row-major: anchor-major order
    return _pairs(grid, t, anchor_vec, a, k, gxy[k], gxy[k], gwh[k], dtype)


def ratio_fits(anchor_vec: torch.Tensor, gwh: torch.Tensor, anchor_t: float) -> torch.Tensor:
    """``[na, nt]``: the yolov5 test, ``max(r, 1 / r) < anchor_t`` for both ratios ``r`` of the
    target sizes ``gwh [nt, 2]`` to the anchors ``anchor_vec [na, 2]`` (grid units)."""
    r = gwh[None] / anchor_vec[:, None]  # [na, nt, 2]
    return torch.max(r, 1 / r).amax(2) < anchor_t


#: The cell offsets of the yolov5 matching's five blocks: the centre cell, then the neighbour to
#: the left, above, to the right and below (subtracted from the grid position before truncation).
NEIGHBOUR_OFFSETS = ((0.0, 0.0), (0.5, 0.0), (0.0, 0.5), (-0.5, 0.0), (0.0, -0.5))


def match_yolov5(
    grid: tuple[int, int], targets: torch.Tensor, anchor_vec: torch.Tensor, anchor_t: float, dtype=torch.float32
) -> LayerTargets:
    """The yolov5 matching of ``targets [nt, 6]`` to one layer's anchors ``anchor_vec [na, 2]``.

    A (target, anchor) pair fits when ``max(r, 1 / r) < anchor_t`` for both ratios ``r`` of the
    target's w, h to the anchor's. A fitting pair goes to its cell and to the neighbour to the
    left / above when the fractional part of x / y is ``< 0.5`` and x / y ``> 1``, to the right /
    below by the same rule measured from the far edge (``nx - x``, ``ny - y``). Pairs come in five
    blocks (centre, left, up, right, down), each anchor-major then in target order; cells are
    truncated and clamped into the grid, and the box target is the position relative to the
    clamped cell (the original clamps its index tensor in place before taking the offsets).
    """
    t, anchor_vec, scale, gxy, gwh = _on_grid(grid, targets, anchor_vec, dtype)
    fits = ratio_fits(anchor_vec, gwh, anchor_t)  # [na, nt]
    far = scale - gxy  # distance to the far edge
    near_ok = (gxy % 1 < 0.5) & (gxy > 1)  # [nt, 2]: left (x), up (y)
    far_ok = (far % 1 < 0.5) & (far > 1)  # [nt, 2]: right (x), down (y)
    blocks = torch.stack((torch.ones_like(near_ok[:, 0]), near_ok[:, 0], near_ok[:, 1], far_ok[:, 0], far_ok[:, 1]))
    block, a, k = (blocks[:, None, :] & fits[None]).nonzero(as_tuple=True)  # row-major: the original's order
    offsets = torch.tensor(NEIGHBOUR_OFFSETS, device=t.device, dtype=dtype)[block]
    return _pairs(grid, t, anchor_vec, a, k, gxy[k] - offsets, gxy[k], gwh[k], dtype)


def match_layer(grid, targets, anchor_vec, options: LossOptions, dtype) -> LayerTargets:
    """The matching of ``options.family`` for one layer."""
    if options.family == "yolov5":
        return match_yolov5(grid, targets, anchor_vec, options.anchor_t, dtype)
    return match(grid, targets, anchor_vec, options.iou_t, dtype)


def build_targets(p: Sequence[torch.Tensor], targets: torch.Tensor, model: Any):
    """The original's outputs ``(tcls, tbox, indices, anch)``, one entry per layer of ``p``."""
    options = model_options(model)
    anchors = model_anchors(model)
    tcls, tbox, indices, anch = [], [], [], []
    for pi, anchor_vec in zip(p, anchors):
        m = match(tuple(pi.shape[2:4]), targets, anchor_vec, options.iou_t, compute_dtype(pi.dtype))
        tcls.append(m.tcls)
        tbox.append(m.tbox)
        indices.append((m.b, m.a, m.gj, m.gi))
        anch.append(m.anch)
    return tcls, tbox, indices, anch


def last_pair_mask(b, a, gj, gi, shape, iou: torch.Tensor | None = None) -> torch.Tensor:
    """True for the pairs that set their cell's objectness target: the last pair on each cell, or
    with ``iou`` given (``sort_obj_iou``) the pair of the highest ``iou`` (ties: the last of them)."""
    _, na, ny, nx = shape
    cell = ((b * na + a) * ny + gj) * nx + gi
    order = torch.arange(cell.numel(), device=cell.device)
    if iou is not None:  # rank the pairs by iou, stable: the pair order breaks ties
        rank = torch.empty_like(order)
        rank[torch.sort(iou, stable=True).indices] = order
        order = rank
    cells, inverse = torch.unique(cell, return_inverse=True)
    last = torch.full((cells.numel(),), -1, dtype=order.dtype, device=cell.device)
    last.scatter_reduce_(0, inverse, order, reduce="amax")
    return last[inverse] == order


class LossTerms(NamedTuple):
    """The three terms of the loss after their gains (``[1]`` each, differentiable), the factor of
    their sum (the batch size for the yolov5 family, else 1), each layer's mean objectness BCE and
    each layer's (matched pairs, pairs sharing a cell with a later pair)."""

    lbox: torch.Tensor
    lobj: torch.Tensor
    lcls: torch.Tensor
    out_scale: int
    layer_obj: torch.Tensor
    counts: list


def loss_terms(
    p: Sequence[torch.Tensor],
    targets: torch.Tensor,
    anchors: Sequence[torch.Tensor],
    options: LossOptions,
    balance: torch.Tensor | None = None,
) -> LossTerms:
    """The terms of the loss of ``options.family`` (see ``loss``), before they are summed."""
    dtype = compute_dtype(p[0].dtype)
    device = p[0].device
    yolov5 = options.family == "yolov5"
    sum_reduction = options.reduction == "sum"
    red = options.reduction

    pos_weight = dict(device=device, dtype=dtype)
    bce_cls = nn.BCEWithLogitsLoss(pos_weight=torch.tensor([options.cls_pw], **pos_weight), reduction=red)
    bce_obj = nn.BCEWithLogitsLoss(pos_weight=torch.tensor([options.obj_pw], **pos_weight), reduction=red)
    if options.fl_gamma > 0:
        bce_cls, bce_obj = FocalLoss(bce_cls, options.fl_gamma), FocalLoss(bce_obj, options.fl_gamma)
    cp, cn = smooth_BCE(options.label_smoothing)
    gr = options.objectness_gr

    lbox = torch.zeros(1, device=device, dtype=dtype)
    lobj = torch.zeros(1, device=device, dtype=dtype)
    lcls = torch.zeros(1, device=device, dtype=dtype)
    layer_obj, counts = [], []
    n_pairs = 0
    for i, (pi, anchor_vec) in enumerate(zip(p, anchors)):
        pi = pi.to(dtype)
        m = match_layer(tuple(pi.shape[2:4]), targets, anchor_vec, options, dtype)
        tobj = torch.zeros_like(pi[..., 4])
        n = m.b.shape[0]
        cells = torch.stack((m.b, m.a, m.gj, m.gi)).unique(dim=1).shape[1] if n else 0
        counts.append((n, n - cells))  # pairs, pairs that share a cell with a later pair
        if n:
            n_pairs += n
            ps = pi[m.b, m.a, m.gj, m.gi]
            iou = box_iou(predicted_box(ps, m.anch, options.family), m.tbox, options.box_loss, options.family)
            lbox += (1.0 - iou).sum() if sum_reduction else (1.0 - iou).mean()

            score = iou.detach().clamp(0)
            last = last_pair_mask(m.b, m.a, m.gj, m.gi, tobj.shape, score if options.sort_obj_iou else None)
            score = (1.0 - gr) + gr * score
            tobj[m.b[last], m.a[last], m.gj[last], m.gi[last]] = score[last]

            if options.nc > 1:
                t = torch.full_like(ps[:, 5:], cn)
                t[torch.arange(n, device=device), m.tcls] = cp
                lcls += bce_cls(ps[:, 5:], t)
        obj_i = bce_obj(pi[..., 4], tobj)
        layer_obj.append((obj_i / tobj.numel() if sum_reduction else obj_i).detach().reshape(1))  # the mean
        lobj += obj_i if balance is None else obj_i * balance[i].to(dtype)

    lbox *= options.box
    lobj *= options.obj
    lcls *= options.cls
    if sum_reduction:
        gain = 3.0
        lobj *= gain / p[0].shape[0]
        if n_pairs:
            lcls *= gain / n_pairs / options.nc
            lbox *= gain / n_pairs
    out_scale = p[0].shape[0] if yolov5 else 1  # the yolov5 loss is the sum times the batch size
    return LossTerms(lbox, lobj, lcls, out_scale, torch.cat(layer_obj), counts)


def loss(
    p: Sequence[torch.Tensor],
    targets: torch.Tensor,
    anchors: Sequence[torch.Tensor],
    options: LossOptions,
    balance: torch.Tensor | None = None,
    return_layer_obj: bool = False,
):
    """The loss of ``options.family`` of ``p`` (per-layer ``[bs, na, ny, nx, nc + 5]`` logits) against ``targets``.

    ``anchors[i]`` is layer ``i``'s anchors in grid units. ``balance [nl]`` weighs each layer's
    objectness term (the yolov5 loss's per-layer balance; ``None``: 1 for every layer). Returns
    ``(loss [1], loss_items [4])`` with ``loss_items = (lbox, lobj, lcls, lbox + lobj + lcls)``,
    detached; ``loss`` is that sum, times the batch size for the yolov5 family. With
    ``return_layer_obj`` also ``layer_obj [nl]``: each layer's objectness BCE (mean, unweighted,
    detached), what the yolov5 ``autobalance`` reads.
    """
    t = loss_terms(p, targets, anchors, options, balance)
    total = t.lbox + t.lobj + t.lcls
    items = torch.cat((t.lbox, t.lobj, t.lcls, total)).detach()
    total = total * t.out_scale if t.out_scale != 1 else total
    if return_layer_obj:
        return total, items, t.layer_obj
    return total, items


def gradient_stats(
    p: Sequence[torch.Tensor],
    targets: torch.Tensor,
    anchors: Sequence[torch.Tensor],
    options: LossOptions,
    balance: torch.Tensor | None = None,
) -> torch.Tensor:
    """The gradient statistics of the loss (docs/design.md, "Gradient statistics"), by autograd
    one component at a time: ``[nl + 1, 8]``, per layer the sums of squares of d loss / d p[i] of
    the box, objectness and class terms, their largest magnitudes, matched pairs, duplicate pairs;
    in the last row the number of targets no layer matched, then zeros (the op's layout).

    Each component's gradient is taken alone (the objectness target's IoU is detached, so the box
    term's gradient lives in channels 0-3, the objectness term's in channel 4 and the class term's
    in 5...); the statistics are taken over those channels."""
    dtype = compute_dtype(p[0].dtype)
    q = [x.detach().to(dtype).requires_grad_() for x in p]
    with torch.enable_grad():
        t = loss_terms(q, targets, anchors, options, balance)
        rows = [[] for _ in q]
        for k, (term, channels) in enumerate(((t.lbox, slice(0, 4)), (t.lobj, slice(4, 5)), (t.lcls, slice(5, None)))):
            if term.requires_grad:
                grads = torch.autograd.grad(term.sum() * t.out_scale, q, allow_unused=True, retain_graph=k < 2)
            else:  # no pairs, or nc == 1: the term is a constant zero
                grads = [None] * len(q)
            for i, (g, x) in enumerate(zip(grads, q)):
                g = (torch.zeros_like(x) if g is None else g)[..., channels]
                rows[i].append((g.pow(2).sum(), g.abs().amax() if g.numel() else g.new_zeros(())))
    out = []
    for (n, dup), components in zip(t.counts, rows):
        sq = [s for s, _ in components]
        mx = [m for _, m in components]
        out.append(torch.stack([*sq, *mx, sq[0].new_tensor(float(n)), sq[0].new_tensor(float(dup))]))
    last = torch.zeros(8, dtype=dtype, device=q[0].device)
    last[0] = unmatched_targets(p, targets, anchors, options)
    return torch.cat((torch.stack(out), last[None])).detach()


def anchor_fits(grid: tuple[int, int], targets: torch.Tensor, anchor_vec: torch.Tensor, options: LossOptions, dtype):
    """``[na, nt]``: whether each (anchor, target) passes the family's matching test on a layer
    with grid ``(ny, nx)`` (yolov3: wh-IoU > ``iou_t``; yolov5: wh ratio < ``anchor_t``)."""
    _, anchor_vec, _, _, gwh = _on_grid(grid, targets, anchor_vec, dtype)
    if options.family == "yolov5":
        return ratio_fits(anchor_vec, gwh, options.anchor_t)
    return wh_iou(anchor_vec, gwh) > options.iou_t


def unmatched_targets(p: Sequence[torch.Tensor], targets: torch.Tensor, anchors, options: LossOptions) -> torch.Tensor:
    """How many targets no anchor of any layer matched (they contribute nothing to the loss): an
    int64 scalar on the targets' device, computed without a host sync."""
    dtype = compute_dtype(p[0].dtype)
    matched = torch.zeros(targets.shape[0], dtype=torch.bool, device=targets.device)
    for pi, anchor_vec in zip(p, anchors):
        matched |= anchor_fits(tuple(pi.shape[2:4]), targets, anchor_vec, options, dtype).any(0)
    return (~matched).sum()


def compute_loss(p: Sequence[torch.Tensor], targets: torch.Tensor, model: Any, **options: Any):
    """The original's ``compute_loss(p, targets, model)``; ``options`` override ``LossOptions`` fields
    (``box_loss``, ``reduction``, ``label_smoothing``)."""
    return loss(p, targets, model_anchors(model), model_options(model, **options))
