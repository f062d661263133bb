"""The anchor-free family (ultralytics' YOLOv8 / YOLO11 / YOLO26 detection loss) in Triton.

Every shape is known from the input shapes (no host sync, no data-dependent allocation), and the
assigner's memory is ``O(targets · topk + bs · points)``: no ``[bs, boxes, points]`` tensor.

The targets are taken flat, as the batch holds them, stably sorted by image (one ``torch.sort``);
``torch.searchsorted`` gives each image's first target. Target ``t`` below is a position in that
order; the image's targets keep their input order, which is the original's padded order.

0. ``_targets_kernel``: each target's pixel corners (the original's float32 arithmetic), class,
   padding flag and image, in that order.
1. ``_decode_kernel``: every point's predicted box in pixels (float32, as the original's assigner
   sees it), ``[bs, A, 4]``; it also initialises the points' claims, owners and best keys.
2. ``_topk_kernel``, one program per target: it visits only the cells of its candidate window on
   each level (the box, sides raised to the size floor) and scores each candidate,
   ``sigmoid(class logit) ** alpha * CIoU.clamp(0) ** beta``; its ``topk`` best are kept in
   registers, ordered by (metric, lower point index first). That is the set CUDA's ``torch.topk``
   returns over all points (the elements above the k-th value, then the first ones equal to it):
   where fewer than ``topk`` candidates have a positive metric, the rest are the lowest-indexed
   points of metric 0, so the first ``topk`` points are ranked too (with metric 0 unless they are
   candidates). Picks that are candidates of the box count; each adds one claim to its point
   (an integer atomic: deterministic).
   While it scans, every candidate pair folds ``(CIoU, box)`` into its point's best key (an
   atomic max of ``CIoU bits << 32 | inverted box``: deterministic).
3. ``_resolve_kernel``, one program per target: a pick claimed once is the box's; a pick claimed
   by several boxes goes to the box of highest CIoU among all the image's boxes (the first on
   ties; the image's first box where every CIoU is 0, as the original's argmax), which may be one
   that did not pick it: read from the point's best key, no search. Every claimant finds the
   same winner and writes the same values (the point's owner, metric and CIoU). The whole
   assignment is linear in the candidate pairs.
4. ``_finish_kernel``, one program per target: with ``topk2`` the box keeps its ``topk2`` best
   points (same order as step 2); then the box's largest metric and CIoU over its points.
5. ``_target_kernel``: per point its target score ``metric · box CIoU max / (box metric max +
   1e-9)`` and a partial sum per program; ``_score_sum_kernel`` (one program) adds them: their
   total, at least 1, normalises the losses.
6. ``_class_loss_kernel`` and ``_box_loss_kernel``: the class BCE over every point and class, and
   CIoU and DFL (or L1) over the assigned points; partial sums per program in forward. Backward
   runs the same two kernels with ``GRAD``: the gradient written once, already scaled by the
   output's gradient read on the device (no sync, no second pass), zeros where a point has none.
   ``_loss_total_kernel`` (one program) turns forward's partial sums into the three components.

A training call is then one sort, one search and ten launches in the assignment and forward, two
launches in backward, and a handful of allocations (buffers carved from one allocation per
dtype): on a GPU each launch or small tensor operation costs microseconds of host time and a few
of device time, which at batch 16 add up to a sizeable share of the loss's DRAM floor (~40-50 µs).

Reductions are per-program partials added by one program in a fixed order: bitwise reproducible.
The kernels that decide the assignment (``_topk_kernel``, ``_resolve_kernel``) and the targets'
corners are compiled without fused multiply-adds and divide with IEEE rounding, so that their CIoU
and metrics round as the original's separate torch operations do: a pick can then differ from the
original's only where ``exp``, ``atan`` (a polynomial) or a power differ by an ulp. Launches go through
``launch.launch`` with keyword arguments (the compile gate records them).
"""

from __future__ import annotations

import dataclasses
import functools

import torch
import triton
import triton.language as tl

from ..anchor_free.options import DetectionOptions
from ..config import compute_dtype
from .launch import carve
from .launch import cdiv as _cdiv
from .launch import launch as _launch
from .math import (
    as_compute,
    atan,
    bce_with_logits,
    d_add,
    d_atan,
    d_clamp0,
    d_div,
    d_max,
    d_min,
    d_mul,
    d_scale,
    d_sub,
    div_exact,
)

__all__ = ["Assignment", "assign", "detection_loss", "loss_backward", "TOPK_LIMIT"]

BLOCK_WINDOW = 128  # candidate points per step of a box's window
BLOCK_POINTS = 128  # points per program of the per-point kernels
BLOCK_CLS_POINTS = 128  # points per program of the class loss
BLOCK_CLS_CLASSES = 16  # classes per program of the class loss
TOPK_LIMIT = 64  # the largest topk / topk2 the kernels keep in registers
BLOCK_TOTALS = 1024  # partial sums per step of the one-program totals (their loops are serial)
# constants read inside the kernels (module globals must be constexpr there)
ASSIGN_EPS = tl.constexpr(1e-9)
CIOU_EPS = tl.constexpr(1e-7)
DFL_MARGIN = tl.constexpr(0.01)
#: The rank of a NaN metric: above every real one, as CUDA's topk ranks NaN.
NAN_RANK = tl.constexpr(1.0e30)
#: Inactive top-k slots: never the smallest.
NEVER_MIN = tl.constexpr(3.0e38)
INT_BIG = tl.constexpr(2147483647)


# ----------------------------------------------------------------------------------------------
# element math
# ----------------------------------------------------------------------------------------------


@triton.jit
def _ciou(ax1, ay1, ax2, ay2, bx1, by1, bx2, by2, COMPUTE_DTYPE: tl.constexpr):
    """CIoU of xyxy boxes a and b (heights + eps), the original's order of operations, exact
    divisions (the value decides the assignment)."""
    aw = ax2 - ax1
    ah = ay2 - ay1 + CIOU_EPS
    bw = bx2 - bx1
    bh = by2 - by1 + CIOU_EPS
    iw = tl.maximum(tl.minimum(ax2, bx2) - tl.maximum(ax1, bx1), 0.0)
    ih = tl.maximum(tl.minimum(ay2, by2) - tl.maximum(ay1, by1), 0.0)
    inter = iw * ih
    union = aw * ah + bw * bh - inter + CIOU_EPS
    iou = div_exact(inter, union, COMPUTE_DTYPE)
    cw = tl.maximum(ax2, bx2) - tl.minimum(ax1, bx1)
    ch = tl.maximum(ay2, by2) - tl.minimum(ay1, by1)
    c2 = cw * cw + ch * ch + CIOU_EPS
    dx = bx1 + bx2 - ax1 - ax2
    dy = by1 + by2 - ay1 - ay2
    rho2 = (dx * dx + dy * dy) / 4.0
    da = atan(div_exact(bw, bh, COMPUTE_DTYPE)) - atan(div_exact(aw, ah, COMPUTE_DTYPE))
    v = (4.0 / (3.141592653589793 * 3.141592653589793)) * (da * da)
    alpha = div_exact(v, 1.0 - iou + v + CIOU_EPS, COMPUTE_DTYPE)
    return iou - (div_exact(rho2, c2, COMPUTE_DTYPE) + v * alpha)


@triton.jit
def _score_power(logit, alpha, ALPHA_IS_HALF: tl.constexpr, COMPUTE_DTYPE: tl.constexpr):
    """``sigmoid(logit) ** alpha`` as torch computes it (``1 / (1 + exp(-x))``; power 0.5 a square
    root, as torch's pow takes it)."""
    score = div_exact(1.0, 1.0 + tl.exp(-logit), COMPUTE_DTYPE)
    if ALPHA_IS_HALF:
        if COMPUTE_DTYPE == tl.float64:
            power = tl.sqrt(score)  # float64's square root is correctly rounded
        else:
            power = tl.sqrt_rn(score)  # float32's tl.sqrt is an approximation
    else:
        safe = tl.where(score > 0, score, 1.0)
        power = tl.where(score > 0, tl.exp(as_compute(alpha, COMPUTE_DTYPE) * tl.log(safe)), 0.0)
    return power


@triton.jit
def _overlap_power(overlap, beta, BETA_INT: tl.constexpr, COMPUTE_DTYPE: tl.constexpr):
    """``overlap ** beta`` of a float32 overlap, rounded to float32 (the original's float32
    overlaps take their power in float32), in the compute dtype. An integer ``beta`` (``BETA_INT``
    >= 0) by squaring (float64 products rounded once when the compute dtype is float64)."""
    y = overlap.to(COMPUTE_DTYPE)
    if BETA_INT >= 0:
        r = tl.full(y.shape, 1.0, COMPUTE_DTYPE)
        base = y
        for bit in tl.static_range(6):
            if (BETA_INT >> bit) & 1:
                r = r * base
            base = base * base
    else:
        safe = tl.where(y > 0, y, 1.0)
        r = tl.where(y > 0, tl.exp(as_compute(beta, COMPUTE_DTYPE) * tl.log(safe)), 0.0)
    return r.to(tl.float32).to(COMPUTE_DTYPE)


@triton.jit
def _pair(
    points_ptr,
    pred_ptr,
    logit_ptr,
    stride_scores_a,
    p,
    mask,
    lo_x,
    lo_y,
    hi_x,
    hi_y,
    gx1,
    gy1,
    gx2,
    gy2,
    alpha,
    beta,
    ALPHA_IS_HALF: tl.constexpr,
    BETA_INT: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
):
    """One (box, point) pair of the assigner: whether the point is a candidate (its centre more
    than 1e-9 inside the floored box ``lo``/``hi``), the CIoU of the box ``g`` and the point's
    predicted box (clamped at 0; 0 for a non-candidate) and the metric (0 for a non-candidate).

    ``points_ptr``: ``[A, 3]`` cell centre (grid units) and stride; ``pred_ptr``: the image's
    ``[A, 4]`` predicted boxes (pixels, float32); ``logit_ptr``: the image's row of the box's
    class in ``scores`` (``stride_scores_a`` apart); ``p``: point indices; ``mask``: lanes in use."""
    cx = tl.load(points_ptr + p * 3, mask=mask, other=0.0)
    cy = tl.load(points_ptr + p * 3 + 1, mask=mask, other=0.0)
    st = tl.load(points_ptr + p * 3 + 2, mask=mask, other=1.0)
    px = cx * st
    py = cy * st
    inside = (px - lo_x > ASSIGN_EPS) & (py - lo_y > ASSIGN_EPS) & (hi_x - px > ASSIGN_EPS) & (hi_y - py > ASSIGN_EPS)
    inside = inside & mask
    b1 = tl.load(pred_ptr + p * 4, mask=inside, other=0.0)
    b2 = tl.load(pred_ptr + p * 4 + 1, mask=inside, other=0.0)
    b3 = tl.load(pred_ptr + p * 4 + 2, mask=inside, other=0.0)
    b4 = tl.load(pred_ptr + p * 4 + 3, mask=inside, other=0.0)
    raw = _ciou(gx1, gy1, gx2, gy2, b1, b2, b3, b4, tl.float32)
    # clamp(0), which keeps a NaN (a GPU's max would drop it)
    overlap = tl.where(inside, tl.where(raw != raw, raw, tl.maximum(raw, 0.0)), 0.0)
    logit = tl.load(logit_ptr + p * stride_scores_a, mask=inside, other=0.0).to(COMPUTE_DTYPE)
    metric = _score_power(logit, alpha, ALPHA_IS_HALF, COMPUTE_DTYPE) * _overlap_power(
        overlap, beta, BETA_INT, COMPUTE_DTYPE
    )
    metric = tl.where(inside, metric, 0.0)
    return inside, overlap, metric


@triton.jit
def _box_key(overlap, t):
    """A (box, point) pair's key for the resolution: the CIoU's bits above (a float >= 0 orders as
    its bits; NaN above all), the box below, inverted so that the first box wins a tie."""
    return (overlap.to(tl.int32, bitcast=True).to(tl.int64) << 32) | (INT_BIG - t.to(tl.int64))


@triton.jit
def _rank(metric):
    """The value the top-k orders by: the metric, NaN above everything."""
    return tl.where(metric != metric, NAN_RANK, metric)


@triton.jit
def _kth(buf_r, buf_i, active):
    """The worst kept entry: the smallest rank, the highest point index among equal ranks."""
    kv = tl.min(tl.where(active, buf_r, NEVER_MIN), axis=0)
    ki = tl.max(tl.where(active & (buf_r == kv), buf_i, -INT_BIG), axis=0)
    return kv, ki


@triton.jit
def _merge_top(buf_r, buf_i, buf_m, buf_o, buf_c, active, r, idx, metric, overlap, cand, lanes):
    """Merge a block of ranked points (``r`` rank, ``idx`` point index, ``lanes`` in use) into the
    kept entries (``buf_*``, the ``active`` slots): while some point beats the worst kept one, the
    block's best replaces it. Entries are unique (point indices are), so the result is the top-k
    of everything merged so far, whatever the order of the blocks."""
    kv, ki = _kth(buf_r, buf_i, active)
    above = lanes & ((r > kv) | ((r == kv) & (idx < ki)))
    n_above = tl.sum(above.to(tl.int32), axis=0)
    while n_above > 0:
        mv = tl.max(tl.where(above, r, -1.0), axis=0)
        mi = tl.min(tl.where(above & (r == mv), idx, INT_BIG), axis=0)
        sel = above & (idx == mi)
        mm = tl.sum(tl.where(sel, metric, 0.0), axis=0)
        mo = tl.sum(tl.where(sel, overlap, 0.0), axis=0)
        mc = tl.max(tl.where(sel, cand, 0), axis=0)
        slot = active & (buf_r == kv) & (buf_i == ki)
        buf_r = tl.where(slot, mv, buf_r)
        buf_i = tl.where(slot, mi, buf_i)
        buf_m = tl.where(slot, mm, buf_m)
        buf_o = tl.where(slot, mo, buf_o)
        buf_c = tl.where(slot, mc, buf_c)
        kv, ki = _kth(buf_r, buf_i, active)
        above = above & (idx != mi) & ((r > kv) | ((r == kv) & (idx < ki)))
        n_above = tl.sum(above.to(tl.int32), axis=0)
    return buf_r, buf_i, buf_m, buf_o, buf_c


@triton.jit
def _floored_box(gt_ptr, t, size_floor, COMPUTE_DTYPE: tl.constexpr):
    """Target ``t``'s pixel box and its candidate region: sides below ``size_floor`` raised to it
    about the centre (float32, as the original), returned in the compute dtype for the inside test."""
    gx1 = tl.load(gt_ptr + t * 4)
    gy1 = tl.load(gt_ptr + t * 4 + 1)
    gx2 = tl.load(gt_ptr + t * 4 + 2)
    gy2 = tl.load(gt_ptr + t * 4 + 3)
    floor = as_compute(size_floor, tl.float32)
    ccx = (gx1 + gx2) / 2.0
    ccy = (gy1 + gy2) / 2.0
    w = gx2 - gx1
    h = gy2 - gy1
    w = tl.where(w < floor, floor, w)
    h = tl.where(h < floor, floor, h)
    lo_x = (ccx - w / 2.0).to(COMPUTE_DTYPE)
    lo_y = (ccy - h / 2.0).to(COMPUTE_DTYPE)
    hi_x = (ccx + w / 2.0).to(COMPUTE_DTYPE)
    hi_y = (ccy + h / 2.0).to(COMPUTE_DTYPE)
    return gx1, gy1, gx2, gy2, lo_x, lo_y, hi_x, hi_y


@triton.jit
def _window(levels_ptr, level_strides_ptr, lvl, lo_x, lo_y, hi_x, hi_y):
    """The cells of level ``lvl`` whose centre may lie inside ``lo``/``hi`` (one cell of slack on
    each side; the exact test is ``_pair``'s): first column and row, width, height, the level's
    first point and its column count."""
    ny = tl.load(levels_ptr + lvl * 3)
    nx = tl.load(levels_ptr + lvl * 3 + 1)
    offset = tl.load(levels_ptr + lvl * 3 + 2)
    st = tl.load(level_strides_ptr + lvl).to(tl.float32)
    fx0 = lo_x.to(tl.float32) / st - 1.5
    fy0 = lo_y.to(tl.float32) / st - 1.5
    fx1 = hi_x.to(tl.float32) / st + 1.5
    fy1 = hi_y.to(tl.float32) / st + 1.5
    # clamp before converting (a NaN box gets no window: its comparisons are all false)
    fx0 = tl.minimum(tl.maximum(fx0, 0.0), nx.to(tl.float32))
    fy0 = tl.minimum(tl.maximum(fy0, 0.0), ny.to(tl.float32))
    fx1 = tl.minimum(tl.maximum(fx1, 0.0), nx.to(tl.float32))
    fy1 = tl.minimum(tl.maximum(fy1, 0.0), ny.to(tl.float32))
    x0 = fx0.to(tl.int32)
    y0 = fy0.to(tl.int32)
    x1 = tl.minimum(fx1.to(tl.int32) + 1, nx)
    y1 = tl.minimum(fy1.to(tl.int32) + 1, ny)
    w = tl.maximum(x1 - x0, 0)
    h = tl.maximum(y1 - y0, 0)
    return x0, y0, w, h, offset, nx


@triton.jit
def _window_points(j, x0, y0, w, h, offset, nx, num_pseudo):
    """The points of window cells ``j`` (row-major in the ``w`` x ``h`` window at column ``x0``,
    row ``y0`` of a level starting at point ``offset``, ``nx`` columns wide) and which lanes count:
    inside the window, and not among the first ``num_pseudo`` points (ranked separately)."""
    w_safe = tl.maximum(w, 1)
    p = offset + (y0 + j // w_safe) * nx + (x0 + j % w_safe)
    return p, (j < w * h) & (p >= num_pseudo)


# ----------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _targets_kernel(
    order_ptr,
    sorted_image_ptr,
    bboxes_ptr,
    stride_bboxes_n,
    stride_bboxes_c,
    cls_ptr,
    stride_cls,
    gt_ptr,
    label_ptr,
    valid_ptr,
    image_ptr,
    num_targets,
    image_w: tl.float32,
    image_h: tl.float32,
    BLOCK: tl.constexpr,
):
    """The targets in image order, as the assigner reads them: one launch for what a dozen tensor
    operations did. Compiled without fused multiply-adds: the corners round as the original's
    separate operations (``xywh * size``, then ``centre -/+ size / 2``, in float32).

    Args:
        order_ptr: ``[n]`` int64, the input row of each target in image order (a stable sort).
        sorted_image_ptr: ``[n]`` the sorted image indices (the batch's ``batch_idx`` dtype).
        bboxes_ptr: the batch's ``[n, 4]`` normalised xywh (any float dtype and strides).
        cls_ptr: the batch's ``[n]`` classes (any dtype; ``stride_cls`` apart).
        gt_ptr: out, ``[n, 4]`` float32 pixel xyxy; label_ptr, valid_ptr, image_ptr: out, ``[n]``
            int32: the class (truncated, as ``.to(int32)``), whether the box is not all zeros (the
            original's padding test: corners summing above 0), the image.
        num_targets: ``n``; image_w, image_h: the image's size in pixels.
    """
    t = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = t < num_targets
    row = tl.load(order_ptr + t, mask=mask, other=0)
    box = bboxes_ptr + row * stride_bboxes_n
    x = tl.load(box, mask=mask, other=0.0).to(tl.float32) * image_w
    y = tl.load(box + stride_bboxes_c, mask=mask, other=0.0).to(tl.float32) * image_h
    half_w = tl.load(box + 2 * stride_bboxes_c, mask=mask, other=0.0).to(tl.float32) * image_w / 2.0
    half_h = tl.load(box + 3 * stride_bboxes_c, mask=mask, other=0.0).to(tl.float32) * image_h / 2.0
    x1 = x - half_w
    y1 = y - half_h
    x2 = x + half_w
    y2 = y + half_h
    out = gt_ptr + t * 4
    tl.store(out, x1, mask=mask)
    tl.store(out + 1, y1, mask=mask)
    tl.store(out + 2, x2, mask=mask)
    tl.store(out + 3, y2, mask=mask)
    tl.store(label_ptr + t, tl.load(cls_ptr + row * stride_cls, mask=mask, other=0).to(tl.int32), mask=mask)
    tl.store(valid_ptr + t, ((((x1 + y1) + x2) + y2) > 0.0).to(tl.int32), mask=mask)
    tl.store(image_ptr + t, tl.load(sorted_image_ptr + t, mask=mask, other=0).to(tl.int32), mask=mask)


@triton.jit
def _decode_kernel(
    boxes_ptr,
    stride_boxes_b,
    stride_boxes_c,
    stride_boxes_a,
    points_ptr,
    pred_ptr,
    claims_ptr,
    owner_ptr,
    best_ptr,
    num_points,
    total,
    REG_MAX: tl.constexpr,
    REG_PAD: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Predicted boxes in pixels for the assigner, and the per-point state of the assignment
    initialised (here rather than by three fill launches).

    Args:
        boxes_ptr: the head's ``[bs, 4 * REG_MAX, A]`` distance logits (any strides).
        points_ptr: ``[A, 3]`` cell centre x, y (grid units) and stride, compute dtype.
        pred_ptr: out, ``[bs, A, 4]`` float32 xyxy pixels: ``(centre -/+ distance) * stride``,
            computed in the compute dtype and rounded (the original's ``.to(float32)``).
        claims_ptr, owner_ptr, best_ptr: out, ``[bs, A]``: claims 0 (int32), owners -1 (int32),
            best keys -1 (int64).
        num_points: ``A``; total: ``bs * A``.
        REG_MAX: bins per side (1: the distances themselves); REG_PAD: a power of two >= REG_MAX.
    """
    q = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = q < total
    tl.store(claims_ptr + q, tl.zeros([BLOCK], dtype=tl.int32), mask=mask)
    tl.store(owner_ptr + q, tl.full([BLOCK], -1, dtype=tl.int32), mask=mask)
    tl.store(best_ptr + q, tl.full([BLOCK], -1, dtype=tl.int64), mask=mask)
    b = q // num_points
    p = q % num_points
    cx = tl.load(points_ptr + p * 3, mask=mask, other=0.0)
    cy = tl.load(points_ptr + p * 3 + 1, mask=mask, other=0.0)
    st = tl.load(points_ptr + p * 3 + 2, mask=mask, other=1.0)
    base = boxes_ptr + b * stride_boxes_b + p * stride_boxes_a
    d0 = _distance(base, stride_boxes_c, 0, mask, REG_MAX, REG_PAD, COMPUTE_DTYPE)
    d1 = _distance(base, stride_boxes_c, 1, mask, REG_MAX, REG_PAD, COMPUTE_DTYPE)
    d2 = _distance(base, stride_boxes_c, 2, mask, REG_MAX, REG_PAD, COMPUTE_DTYPE)
    d3 = _distance(base, stride_boxes_c, 3, mask, REG_MAX, REG_PAD, COMPUTE_DTYPE)
    out = pred_ptr + q * 4
    tl.store(out, ((cx - d0) * st).to(tl.float32), mask=mask)
    tl.store(out + 1, ((cy - d1) * st).to(tl.float32), mask=mask)
    tl.store(out + 2, ((cx + d2) * st).to(tl.float32), mask=mask)
    tl.store(out + 3, ((cy + d3) * st).to(tl.float32), mask=mask)


@triton.jit
def _side_logits(base, stride_c, side, mask, REG_MAX: tl.constexpr, REG_PAD: tl.constexpr, COMPUTE_DTYPE: tl.constexpr):
    """One side's ``[BLOCK, REG_PAD]`` logits (-inf in the padding bins) and the bins' indices."""
    bins = tl.arange(0, REG_PAD)
    ptrs = base[:, None] + (side * REG_MAX + bins)[None, :] * stride_c
    m2 = mask[:, None] & (bins < REG_MAX)[None, :]
    x = tl.load(ptrs, mask=m2, other=float("-inf")).to(COMPUTE_DTYPE)
    return x, bins, m2


@triton.jit
def _softmax_rows(x, m2):
    """Row softmax of ``x`` (``-inf`` in masked bins; a row with every bin masked gives 0s)."""
    mx = tl.max(x, axis=1)
    mx = tl.where(mx == float("-inf"), 0.0, mx)
    e = tl.where(m2, tl.exp(x - mx[:, None]), 0.0)
    s = tl.sum(e, axis=1)
    s = tl.where(s == 0, 1.0, s)
    return e / s[:, None], mx, s


@triton.jit
def _distance(base, stride_c, side, mask, REG_MAX: tl.constexpr, REG_PAD: tl.constexpr, COMPUTE_DTYPE: tl.constexpr):
    """One side's distance (grid units): the mean bin of its softmax, or the value (REG_MAX 1)."""
    if REG_MAX == 1:
        d = tl.load(base + side * stride_c, mask=mask, other=0.0).to(COMPUTE_DTYPE)
    else:
        x, bins, m2 = _side_logits(base, stride_c, side, mask, REG_MAX, REG_PAD, COMPUTE_DTYPE)
        prob, _, _ = _softmax_rows(x, m2)
        d = tl.sum(prob * bins.to(COMPUTE_DTYPE)[None, :], axis=1)
    return d


@triton.jit(do_not_specialize=["num_points", "k", "num_pseudo"])
def _topk_kernel(
    gt_ptr,
    label_ptr,
    image_ptr,
    valid_ptr,
    scores_ptr,
    stride_scores_b,
    stride_scores_c,
    stride_scores_a,
    pred_ptr,
    points_ptr,
    levels_ptr,
    level_strides_ptr,
    claims_ptr,
    best_ptr,
    top_index_ptr,
    top_metric_ptr,
    top_overlap_ptr,
    num_points,
    num_levels,
    k,
    num_pseudo,
    alpha: tl.float64,
    beta: tl.float64,
    size_floor: tl.float64,
    ALPHA_IS_HALF: tl.constexpr,
    BETA_INT: tl.constexpr,
    K_PAD: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Per target (one program each): its ``k`` best points and their claims.

    Args:
        gt_ptr: ``[n, 4]`` float32 pixel xyxy targets, sorted by image; label_ptr, image_ptr,
            valid_ptr: ``[n]`` int32 class, image, and whether the box is real (xyxy sum > 0).
        scores_ptr: the head's ``[bs, nc, A]`` class logits (any strides).
        pred_ptr: ``[bs, A, 4]`` float32 pixel predicted boxes (``_decode_kernel``).
        points_ptr: ``[A, 3]`` centre (grid units) and stride; levels_ptr: ``[L, 3]`` int32 ny,
            nx, first point; level_strides_ptr: ``[L]`` strides.
        claims_ptr: ``[bs, A]`` int32, zeroed: +1 per box that keeps the point as a candidate.
        best_ptr: ``[bs, A]`` int64, -1 filled: per point the largest ``(CIoU bits << 32) |
            (INT_BIG - t)`` of the boxes it is a candidate of (an atomic max: deterministic), so
            that a contested point's box of highest CIoU, first on ties, is read, not searched.
        top_index_ptr: out ``[n, K_PAD]`` int32: the kept points that are candidates, -1 elsewhere.
        top_metric_ptr, top_overlap_ptr: out ``[n, K_PAD]`` their metric (compute dtype) and
            CIoU (float32).
        k: ``min(topk, A)``; num_pseudo: ``min(K_PAD, A)``: the first points, ranked whether
            candidates or not (they are the zeros CUDA's topk fills up with).
        alpha, beta: the metric's exponents; size_floor: the smallest side of the candidate
            region (pixels). ALPHA_IS_HALF: alpha == 0.5; BETA_INT: beta as an int in [0, 63], or -1.
    """
    t = tl.program_id(0)
    b = tl.load(image_ptr + t)
    label = tl.load(label_ptr + t)
    valid = tl.load(valid_ptr + t) != 0
    gx1, gy1, gx2, gy2, lo_x, lo_y, hi_x, hi_y = _floored_box(gt_ptr, t, size_floor, COMPUTE_DTYPE)
    pred_image = pred_ptr + b.to(tl.int64) * num_points * 4
    logit_row = scores_ptr + b.to(tl.int64) * stride_scores_b + label.to(tl.int64) * stride_scores_c

    slots = tl.arange(0, K_PAD)
    active = slots < k
    buf_r = tl.full([K_PAD], -1.0, COMPUTE_DTYPE)
    buf_i = -2 - slots
    buf_m = tl.zeros([K_PAD], COMPUTE_DTYPE)
    buf_o = tl.zeros([K_PAD], tl.float32)
    buf_c = tl.zeros([K_PAD], tl.int32)

    # the first points, ranked whatever they are (metric 0 unless candidates)
    lanes = tl.arange(0, BLOCK)
    p = lanes
    pmask = p < num_pseudo
    cand, overlap, metric = _pair(
        points_ptr, pred_image, logit_row, stride_scores_a, p, pmask & valid, lo_x, lo_y, hi_x, hi_y,
        gx1, gy1, gx2, gy2, alpha, beta, ALPHA_IS_HALF, BETA_INT, COMPUTE_DTYPE,
    )  # fmt: skip
    buf_r, buf_i, buf_m, buf_o, buf_c = _merge_top(
        buf_r, buf_i, buf_m, buf_o, buf_c, active, _rank(metric), p, metric, overlap, cand.to(tl.int32), pmask
    )
    best_image = best_ptr + b.to(tl.int64) * num_points
    tl.atomic_max(best_image + p, _box_key(overlap, t), mask=cand, sem="relaxed")
    if valid:
        for lvl in range(num_levels):
            x0, y0, w, h, offset, nx = _window(levels_ptr, level_strides_ptr, lvl, lo_x, lo_y, hi_x, hi_y)
            for start in range(0, w * h, BLOCK):
                p, mask = _window_points(
                    start + lanes, x0, y0, w, h, offset, nx, num_pseudo
                )  # the first points were ranked above
                cand, overlap, metric = _pair(
                    points_ptr, pred_image, logit_row, stride_scores_a, p, mask, lo_x, lo_y, hi_x, hi_y,
                    gx1, gy1, gx2, gy2, alpha, beta, ALPHA_IS_HALF, BETA_INT, COMPUTE_DTYPE,
                )  # fmt: skip
                tl.atomic_max(best_image + p, _box_key(overlap, t), mask=cand, sem="relaxed")
                lanes_in = mask & cand  # non-candidates rank 0: only the first points can be among the kept
                buf_r, buf_i, buf_m, buf_o, buf_c = _merge_top(
                    buf_r, buf_i, buf_m, buf_o, buf_c, active, _rank(metric), p, metric, overlap, cand.to(tl.int32),
                    lanes_in,
                )  # fmt: skip
    keep = active & (buf_c != 0) & (buf_i >= 0)
    out = t.to(tl.int64) * K_PAD + slots
    tl.store(top_index_ptr + out, tl.where(keep, buf_i, -1))
    tl.store(top_metric_ptr + out, buf_m)
    tl.store(top_overlap_ptr + out, buf_o)
    tl.atomic_add(claims_ptr + b.to(tl.int64) * num_points + buf_i, 1, mask=keep, sem="relaxed")


@triton.jit(do_not_specialize=["num_points"])
def _resolve_kernel(
    gt_ptr,
    label_ptr,
    image_ptr,
    valid_ptr,
    image_start_ptr,
    scores_ptr,
    stride_scores_b,
    stride_scores_c,
    stride_scores_a,
    pred_ptr,
    points_ptr,
    claims_ptr,
    best_ptr,
    top_index_ptr,
    top_metric_ptr,
    top_overlap_ptr,
    owner_ptr,
    point_metric_ptr,
    point_overlap_ptr,
    num_points,
    alpha: tl.float64,
    beta: tl.float64,
    size_floor: tl.float64,
    ALPHA_IS_HALF: tl.constexpr,
    BETA_INT: tl.constexpr,
    K_PAD: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
):
    """Per target: each kept point's owner. Claimed once: this box. Claimed several times: the
    image's box of highest CIoU with the point's predicted box (0 where not a candidate; the first
    on ties), read from ``best_ptr``; where every CIoU is 0, the image's first box (the original's
    argmax over all boxes). Every claimant finds the same owner and writes the same values.

    Args (as ``_topk_kernel``'s, and):
        image_start_ptr: ``[bs + 1]`` int32, image b's targets are ``[start[b], start[b + 1])``.
        best_ptr: ``[bs, A]`` int64, per point the largest ``(CIoU bits << 32) | (INT_BIG - box)``
            over the boxes it is a candidate of (``_topk_kernel``).
        owner_ptr: ``[bs, A]`` int32, -1 filled: out, the owning target.
        point_metric_ptr, point_overlap_ptr: ``[bs, A]``: out, the owner's metric and CIoU there.
    """
    t = tl.program_id(0)
    slots = tl.arange(0, K_PAD)
    out = t.to(tl.int64) * K_PAD + slots
    p = tl.load(top_index_ptr + out)
    kept = p >= 0
    b = tl.load(image_ptr + t)
    point = b.to(tl.int64) * num_points + tl.where(kept, p, 0)
    claims = tl.load(claims_ptr + point, mask=kept, other=0)
    owner = tl.full([K_PAD], 0, tl.int32) + t
    metric = tl.load(top_metric_ptr + out)
    overlap = tl.load(top_overlap_ptr + out)
    contested = kept & (claims > 1)
    if tl.max(contested.to(tl.int32), axis=0) > 0:
        key = tl.load(best_ptr + point, mask=contested, other=0)
        positive = (key >> 32) > 0  # a CIoU above 0 (or NaN): its box; else the image's first box
        first = tl.load(image_start_ptr + b)
        best_g = tl.where(positive, INT_BIG - (key & 0xFFFFFFFF).to(tl.int32), first)
        # the winner's own metric and CIoU at the point
        wx1, wy1, wx2, wy2, lo_x, lo_y, hi_x, hi_y = _floored_box(gt_ptr, best_g, size_floor, COMPUTE_DTYPE)
        w_label = tl.load(label_ptr + best_g)
        w_valid = tl.load(valid_ptr + best_g) != 0
        logit_row = scores_ptr + b.to(tl.int64) * stride_scores_b + w_label.to(tl.int64) * stride_scores_c
        pred_image = pred_ptr + b.to(tl.int64) * num_points * 4
        _, w_overlap, w_metric = _pair(
            points_ptr, pred_image, logit_row, stride_scores_a, p, contested & w_valid, lo_x, lo_y, hi_x, hi_y,
            wx1, wy1, wx2, wy2, alpha, beta, ALPHA_IS_HALF, BETA_INT, COMPUTE_DTYPE,
        )  # fmt: skip
        owner = tl.where(contested, best_g, owner)
        metric = tl.where(contested, w_metric, metric)
        overlap = tl.where(contested, w_overlap, overlap)
    tl.store(owner_ptr + point, owner, mask=kept)
    tl.store(point_metric_ptr + point, metric, mask=kept)
    tl.store(point_overlap_ptr + point, overlap, mask=kept)


@triton.jit(do_not_specialize=["num_points", "k2", "num_pseudo"])
def _finish_kernel(
    gt_ptr,
    image_ptr,
    valid_ptr,
    levels_ptr,
    level_strides_ptr,
    owner_ptr,
    point_metric_ptr,
    point_overlap_ptr,
    box_metric_ptr,
    box_overlap_ptr,
    num_points,
    num_levels,
    k2,
    num_pseudo,
    size_floor: tl.float64,
    SECOND_CUT: tl.constexpr,
    K_PAD: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Per target: with ``SECOND_CUT`` it keeps its ``k2`` best points (``min(topk2, A)``, the
    order of ``_topk_kernel``, the first ``num_pseudo`` points ranked whether its own or not) and
    disowns the rest; then its largest metric and CIoU over the points it owns.

    Args (as ``_resolve_kernel``'s, and): box_metric_ptr, box_overlap_ptr: out ``[n]``.
    """
    t = tl.program_id(0)
    b = tl.load(image_ptr + t)
    valid = tl.load(valid_ptr + t) != 0
    _, _, _, _, lo_x, lo_y, hi_x, hi_y = _floored_box(gt_ptr, t, size_floor, COMPUTE_DTYPE)
    image = b.to(tl.int64) * num_points
    lanes = tl.arange(0, BLOCK)
    kv = tl.full([], -1.0, COMPUTE_DTYPE)
    ki = INT_BIG
    if SECOND_CUT:
        slots = tl.arange(0, K_PAD)
        active = slots < k2
        buf_r = tl.full([K_PAD], -1.0, COMPUTE_DTYPE)
        buf_i = -2 - slots
        buf_m = tl.zeros([K_PAD], COMPUTE_DTYPE)
        buf_o = tl.zeros([K_PAD], tl.float32)
        buf_c = tl.zeros([K_PAD], tl.int32)
        p = lanes
        pmask = p < num_pseudo
        own = tl.load(owner_ptr + image + p, mask=pmask, other=-1) == t
        metric = tl.where(own, tl.load(point_metric_ptr + image + p, mask=own, other=0.0), 0.0)
        buf_r, buf_i, buf_m, buf_o, buf_c = _merge_top(
            buf_r, buf_i, buf_m, buf_o, buf_c, active, _rank(metric), p, metric, metric.to(tl.float32),
            own.to(tl.int32), pmask,
        )  # fmt: skip
        if valid:
            for lvl in range(num_levels):
                x0, y0, w, h, offset, nx = _window(levels_ptr, level_strides_ptr, lvl, lo_x, lo_y, hi_x, hi_y)
                for start in range(0, w * h, BLOCK):
                    p, mask = _window_points(start + lanes, x0, y0, w, h, offset, nx, num_pseudo)
                    own = mask & (tl.load(owner_ptr + image + p, mask=mask, other=-1) == t)
                    metric = tl.load(point_metric_ptr + image + p, mask=own, other=0.0)
                    buf_r, buf_i, buf_m, buf_o, buf_c = _merge_top(
                        buf_r, buf_i, buf_m, buf_o, buf_c, active, _rank(metric), p, metric,
                        metric.to(tl.float32), own.to(tl.int32), own,
                    )  # fmt: skip
        kv, ki = _kth(buf_r, buf_i, active)
    # the points it keeps: its largest metric and CIoU (NaN propagates, as amax)
    best_m = tl.zeros([BLOCK], COMPUTE_DTYPE)
    best_o = tl.zeros([BLOCK], tl.float32)
    p = lanes
    pmask = p < num_pseudo
    own = pmask & (tl.load(owner_ptr + image + p, mask=pmask, other=-1) == t)
    best_m, best_o = _keep_and_max(
        owner_ptr, point_metric_ptr, point_overlap_ptr, image, p, own, kv, ki, best_m, best_o, SECOND_CUT
    )
    if valid:
        for lvl in range(num_levels):
            x0, y0, w, h, offset, nx = _window(levels_ptr, level_strides_ptr, lvl, lo_x, lo_y, hi_x, hi_y)
            for start in range(0, w * h, BLOCK):
                p, mask = _window_points(start + lanes, x0, y0, w, h, offset, nx, num_pseudo)
                own = mask & (tl.load(owner_ptr + image + p, mask=mask, other=-1) == t)
                best_m, best_o = _keep_and_max(
                    owner_ptr, point_metric_ptr, point_overlap_ptr, image, p, own, kv, ki, best_m, best_o, SECOND_CUT
                )
    # the largest, plus the sum of the NaN lanes (0 when there are none, NaN when there are)
    bm = tl.max(tl.where(best_m != best_m, 0.0, best_m), axis=0) + tl.sum(
        tl.where(best_m != best_m, best_m, 0.0), axis=0
    )
    bo = tl.max(tl.where(best_o != best_o, 0.0, best_o), axis=0) + tl.sum(
        tl.where(best_o != best_o, best_o, 0.0), axis=0
    )
    tl.store(box_metric_ptr + t, bm)
    tl.store(box_overlap_ptr + t, bo)


@triton.jit
def _keep_and_max(
    owner_ptr, point_metric_ptr, point_overlap_ptr, image, p, own, kv, ki, best_m, best_o, SECOND_CUT: tl.constexpr
):
    """Of the points ``own`` (owned by the box): drop those below the second cut's k-th entry
    (``kv``, ``ki``), and fold the rest's metric and CIoU into running maxima (NaN kept)."""
    metric = tl.load(point_metric_ptr + image + p, mask=own, other=0.0)
    overlap = tl.load(point_overlap_ptr + image + p, mask=own, other=0.0)
    if SECOND_CUT:
        r = _rank(metric)
        keep = (r > kv) | ((r == kv) & (p <= ki))
        tl.store(owner_ptr + image + p, tl.full(p.shape, -1, tl.int32), mask=own & ~keep)
        own = own & keep
    metric = tl.where(own, metric, 0.0)
    overlap = tl.where(own, overlap, 0.0)
    # NaN sticks (a GPU's max drops it; torch's amax keeps it)
    best_m = tl.where((metric != metric) | (best_m != best_m), best_m + metric, tl.maximum(best_m, metric))
    best_o = tl.where((overlap != overlap) | (best_o != best_o), best_o + overlap, tl.maximum(best_o, overlap))
    return best_m, best_o


@triton.jit
def _target_kernel(
    owner_ptr,
    point_metric_ptr,
    box_metric_ptr,
    box_overlap_ptr,
    target_ptr,
    partial_ptr,
    total,
    COMPUTE_DTYPE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Per point its target score, ``metric * box CIoU max / (box metric max + 1e-9)`` where owned
    (0 elsewhere), and the block's sum (``partial_ptr[program]``).

    Args: owner_ptr ``[bs, A]`` int32 (-1: none); point_metric_ptr ``[bs, A]``; box_metric_ptr,
    box_overlap_ptr ``[n]``; target_ptr out ``[bs, A]`` compute dtype; total: ``bs * A``."""
    q = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = q < total
    owner = tl.load(owner_ptr + q, mask=mask, other=-1)
    fg = owner >= 0
    g = tl.where(fg, owner, 0)
    metric = tl.load(point_metric_ptr + q, mask=fg, other=0.0)
    bm = tl.load(box_metric_ptr + g, mask=fg, other=0.0)
    bo = tl.load(box_overlap_ptr + g, mask=fg, other=0.0).to(COMPUTE_DTYPE)
    target = tl.where(fg, metric * bo / (bm + ASSIGN_EPS), 0.0)
    tl.store(target_ptr + q, target, mask=mask)
    tl.store(partial_ptr + tl.program_id(0), tl.sum(target, axis=0))


@triton.jit
def _score_sum_kernel(partial_ptr, num_partials, score_sum_ptr, COMPUTE_DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    """One program: ``max(sum of the target scores, 1)``, the losses' normaliser, from
    ``_target_kernel``'s partial sums in a fixed order (bitwise reproducible)."""
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], dtype=COMPUTE_DTYPE)
    for s in range(0, num_partials, BLOCK):
        acc += tl.load(partial_ptr + s + offs, mask=s + offs < num_partials, other=0.0).to(COMPUTE_DTYPE)
    tl.store(score_sum_ptr, tl.maximum(tl.sum(acc, axis=0), 1.0))


@triton.jit
def _loss_total_kernel(
    box_partial_ptr,
    num_box_partials,
    cls_partial_ptr,
    num_cls_partials,
    score_sum_ptr,
    out_ptr,
    box_gain: tl.float64,
    cls_gain: tl.float64,
    dfl_gain: tl.float64,
    COMPUTE_DTYPE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One program: the components ``[box, cls, dfl]`` from the loss kernels' partial sums (in a
    fixed order), each over the normaliser and times its gain.

    Args:
        box_partial_ptr: ``[num_box_partials, 2]`` (box term, distance term); cls_partial_ptr:
            ``[num_cls_partials]``; score_sum_ptr: the normaliser; out_ptr: out, ``[3]``.
        box_gain, cls_gain, dfl_gain: the gains.
    """
    offs = tl.arange(0, BLOCK)
    box = tl.zeros([BLOCK], dtype=COMPUTE_DTYPE)
    dist = tl.zeros([BLOCK], dtype=COMPUTE_DTYPE)
    for s in range(0, num_box_partials, BLOCK):
        m = s + offs < num_box_partials
        box += tl.load(box_partial_ptr + 2 * (s + offs), mask=m, other=0.0).to(COMPUTE_DTYPE)
        dist += tl.load(box_partial_ptr + 2 * (s + offs) + 1, mask=m, other=0.0).to(COMPUTE_DTYPE)
    cls = tl.zeros([BLOCK], dtype=COMPUTE_DTYPE)
    for s in range(0, num_cls_partials, BLOCK):
        cls += tl.load(cls_partial_ptr + s + offs, mask=s + offs < num_cls_partials, other=0.0).to(COMPUTE_DTYPE)
    score_sum = tl.load(score_sum_ptr).to(COMPUTE_DTYPE)
    tl.store(out_ptr, tl.sum(box, axis=0) / score_sum * as_compute(box_gain, COMPUTE_DTYPE))
    tl.store(out_ptr + 1, tl.sum(cls, axis=0) / score_sum * as_compute(cls_gain, COMPUTE_DTYPE))
    tl.store(out_ptr + 2, tl.sum(dist, axis=0) / score_sum * as_compute(dfl_gain, COMPUTE_DTYPE))


@triton.jit(do_not_specialize=["num_points", "nc"])
def _class_loss_kernel(
    scores_ptr,
    stride_scores_b,
    stride_scores_c,
    stride_scores_a,
    grad_ptr,
    stride_grad_b,
    stride_grad_c,
    stride_grad_a,
    owner_ptr,
    target_ptr,
    label_ptr,
    class_weight_ptr,
    score_sum_ptr,
    grad_out_ptr,
    stride_grad_out,
    partial_ptr,
    num_points,
    nc,
    cls_gain: tl.float64,
    HAS_WEIGHTS: tl.constexpr,
    GRAD: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    """The class BCE of a ``[BLOCK_C, BLOCK_P]`` tile of image ``program_id(2)``: the target is
    the point's score at its owner's class, 0 elsewhere, times ``class_weight[c]`` when given.
    Forward (``GRAD`` off): the tile's sum in ``partial_ptr[program]``. Backward (``GRAD``): the
    tile of the gradient, ``w (sigmoid(x) - target) * cls_gain * grad_out[1] / score_sum``, in
    ``grad_ptr``'s dtype and strides (no loss sum).

    Args: scores_ptr/grad_ptr ``[bs, nc, A]`` with their strides; owner_ptr ``[bs, A]`` int32;
    target_ptr ``[bs, A]``; label_ptr ``[n]`` int32; class_weight_ptr ``[nc]``; score_sum_ptr:
    the normalisation (a 0-d device tensor); grad_out_ptr: the components' gradient ``[3]``
    (``stride_grad_out`` apart); cls_gain: the class gain."""
    pid_p = tl.program_id(0)
    pid_c = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    pmask = p < num_points
    cmask = c < nc
    m2 = cmask[:, None] & pmask[None, :]
    x = tl.load(
        scores_ptr + b * stride_scores_b + c[:, None].to(tl.int64) * stride_scores_c + p[None, :] * stride_scores_a,
        mask=m2,
        other=0.0,
    ).to(COMPUTE_DTYPE)
    owner = tl.load(owner_ptr + b * num_points + p, mask=pmask, other=-1)
    fg = owner >= 0
    label = tl.load(label_ptr + tl.where(fg, owner, 0), mask=fg, other=-1)
    target = tl.load(target_ptr + b * num_points + p, mask=fg, other=0.0)
    y = tl.where(c[:, None] == label[None, :], target[None, :], 0.0)
    loss, dloss = bce_with_logits(x, y, 1.0, 0.0, False)
    if HAS_WEIGHTS:
        w = tl.load(class_weight_ptr + c, mask=cmask, other=0.0).to(COMPUTE_DTYPE)[:, None]
        loss = loss * w
        dloss = dloss * w
    if GRAD:
        scale = (
            as_compute(cls_gain, COMPUTE_DTYPE)
            * tl.load(grad_out_ptr + stride_grad_out).to(COMPUTE_DTYPE)
            / tl.load(score_sum_ptr).to(COMPUTE_DTYPE)
        )
        ptrs = grad_ptr + b * stride_grad_b + c[:, None].to(tl.int64) * stride_grad_c + p[None, :] * stride_grad_a
        tl.store(ptrs, (dloss * scale).to(grad_ptr.dtype.element_ty), mask=m2)
    else:
        pid = (tl.program_id(2) * tl.num_programs(1) + pid_c) * tl.num_programs(0) + pid_p
        tl.store(partial_ptr + pid, tl.sum(tl.sum(tl.where(m2, loss, 0.0), axis=1), axis=0))


@triton.jit(do_not_specialize=["num_points"])
def _box_loss_kernel(
    boxes_ptr,
    stride_boxes_b,
    stride_boxes_c,
    stride_boxes_a,
    grad_ptr,
    stride_grad_b,
    stride_grad_c,
    stride_grad_a,
    points_ptr,
    owner_ptr,
    target_ptr,
    gt_ptr,
    score_sum_ptr,
    grad_out_ptr,
    stride_grad_out,
    partial_ptr,
    num_points,
    image_w: tl.float64,
    image_h: tl.float64,
    box_gain: tl.float64,
    dfl_gain: tl.float64,
    REG_MAX: tl.constexpr,
    REG_PAD: tl.constexpr,
    GRAD: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """CIoU and DFL (or, ``REG_MAX`` 1, L1 in image fractions) of the assigned points among
    ``BLOCK`` points of image ``program_id(1)``, each weighted by its target score.
    Forward: the block's two sums in ``partial_ptr[2 * program]`` and ``[2 * program + 1]``.
    Backward (``GRAD``): every row of the block's gradient (zeros where not assigned), scaled by
    ``gain * grad_out[0 or 2] / score_sum``, in ``grad_ptr``'s dtype and strides.

    Args: boxes_ptr/grad_ptr ``[bs, 4 * REG_MAX, A]``; points_ptr ``[A, 3]``; owner_ptr, target_ptr
    ``[bs, A]``; gt_ptr ``[n, 4]`` float32 pixel xyxy; image_w, image_h: pixels (the L1 branch's
    fractions); box_gain, dfl_gain: the gains."""
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    extent_x = as_compute(image_w, COMPUTE_DTYPE)
    extent_y = as_compute(image_h, COMPUTE_DTYPE)
    p = pid * BLOCK + tl.arange(0, BLOCK)
    pmask = p < num_points
    owner = tl.load(owner_ptr + b * num_points + p, mask=pmask, other=-1)
    fg = owner >= 0
    g = tl.where(fg, owner, 0)
    weight = tl.load(target_ptr + b * num_points + p, mask=fg, other=0.0)
    cx = tl.load(points_ptr + p * 3, mask=pmask, other=0.0)
    cy = tl.load(points_ptr + p * 3 + 1, mask=pmask, other=0.0)
    st = tl.load(points_ptr + p * 3 + 2, mask=pmask, other=1.0)
    # the target box in grid units (the original divides the float32 pixel box by the stride)
    tx1 = tl.load(gt_ptr + g * 4, mask=fg, other=0.0).to(COMPUTE_DTYPE) / st
    ty1 = tl.load(gt_ptr + g * 4 + 1, mask=fg, other=0.0).to(COMPUTE_DTYPE) / st
    tx2 = tl.load(gt_ptr + g * 4 + 2, mask=fg, other=0.0).to(COMPUTE_DTYPE) / st
    ty2 = tl.load(gt_ptr + g * 4 + 3, mask=fg, other=0.0).to(COMPUTE_DTYPE) / st
    base = boxes_ptr + b * stride_boxes_b + p * stride_boxes_a
    d0 = _distance(base, stride_boxes_c, 0, fg, REG_MAX, REG_PAD, COMPUTE_DTYPE)
    d1 = _distance(base, stride_boxes_c, 1, fg, REG_MAX, REG_PAD, COMPUTE_DTYPE)
    d2 = _distance(base, stride_boxes_c, 2, fg, REG_MAX, REG_PAD, COMPUTE_DTYPE)
    d3 = _distance(base, stride_boxes_c, 3, fg, REG_MAX, REG_PAD, COMPUTE_DTYPE)
    ciou, c0, c1, c2, c3 = _ciou_dual(cx, cy, d0, d1, d2, d3, tx1, ty1, tx2, ty2)
    sides0 = cx - tx1
    sides1 = cy - ty1
    sides2 = tx2 - cx
    sides3 = ty2 - cy
    if GRAD:
        score_sum = tl.load(score_sum_ptr).to(COMPUTE_DTYPE)
        g_box = as_compute(box_gain, COMPUTE_DTYPE) * tl.load(grad_out_ptr).to(COMPUTE_DTYPE) / score_sum
        g_dist = (
            as_compute(dfl_gain, COMPUTE_DTYPE)
            * tl.load(grad_out_ptr + 2 * stride_grad_out).to(COMPUTE_DTYPE)
            / score_sum
        )
        wb = tl.where(fg, -weight * g_box, 0.0)  # d loss / d ciou
        wd = tl.where(fg, weight * g_dist, 0.0)
        out = grad_ptr + b * stride_grad_b + p * stride_grad_a
        sbc, sgc, ex, ey = stride_boxes_c, stride_grad_c, extent_x, extent_y
        _side_grad(base, out, sbc, sgc, 0, pmask, fg, d0, c0 * wb, sides0, wd, st, ex, REG_MAX, REG_PAD, COMPUTE_DTYPE)
        _side_grad(base, out, sbc, sgc, 1, pmask, fg, d1, c1 * wb, sides1, wd, st, ey, REG_MAX, REG_PAD, COMPUTE_DTYPE)
        _side_grad(base, out, sbc, sgc, 2, pmask, fg, d2, c2 * wb, sides2, wd, st, ex, REG_MAX, REG_PAD, COMPUTE_DTYPE)
        _side_grad(base, out, sbc, sgc, 3, pmask, fg, d3, c3 * wb, sides3, wd, st, ey, REG_MAX, REG_PAD, COMPUTE_DTYPE)
    else:
        box = tl.where(fg, (1.0 - ciou) * weight, 0.0)
        sbc, ex, ey = stride_boxes_c, extent_x, extent_y
        dist = _side_loss(base, sbc, 0, fg, d0, sides0, st, ex, REG_MAX, REG_PAD, COMPUTE_DTYPE)
        dist += _side_loss(base, sbc, 1, fg, d1, sides1, st, ey, REG_MAX, REG_PAD, COMPUTE_DTYPE)
        dist += _side_loss(base, sbc, 2, fg, d2, sides2, st, ex, REG_MAX, REG_PAD, COMPUTE_DTYPE)
        dist += _side_loss(base, sbc, 3, fg, d3, sides3, st, ey, REG_MAX, REG_PAD, COMPUTE_DTYPE)
        dist = tl.where(fg, dist / 4.0 * weight, 0.0)
        program = b * tl.num_programs(0) + pid
        tl.store(partial_ptr + 2 * program, tl.sum(box, axis=0))
        tl.store(partial_ptr + 2 * program + 1, tl.sum(dist, axis=0))


@triton.jit
def _ciou_dual(cx, cy, left, top, right, bottom, tx1, ty1, tx2, ty2):
    """CIoU of the predicted box ``(cx - left, cy - top, cx + right, cy + bottom)`` against the
    target, and its derivatives with respect to the four distances (the aspect term's weight held
    constant, as the original detaches it)."""
    z = tl.zeros_like(left)
    one = z + 1.0
    # the prediction's corners as duals over (left, top, right, bottom)
    x1 = (cx - left, -one, z, z, z)
    y1 = (cy - top, z, -one, z, z)
    x2 = (cx + right, z, z, one, z)
    y2 = (cy + bottom, z, z, z, one)
    w1 = d_sub(*x2, *x1)
    h1 = d_sub(*y2, *y1)
    h1 = (h1[0] + CIOU_EPS, h1[1], h1[2], h1[3], h1[4])
    w2 = tx2 - tx1
    h2 = ty2 - ty1 + CIOU_EPS
    iw = d_clamp0(*d_sub(*d_min(*x2, tx2, z, z, z, z), *d_max(*x1, tx1, z, z, z, z)))
    ih = d_clamp0(*d_sub(*d_min(*y2, ty2, z, z, z, z), *d_max(*y1, ty1, z, z, z, z)))
    inter = d_mul(*iw, *ih)
    a1 = d_mul(*w1, *h1)
    union = d_sub(a1[0] + w2 * h2, a1[1], a1[2], a1[3], a1[4], *inter)
    union = (union[0] + CIOU_EPS, union[1], union[2], union[3], union[4])
    iou = d_div(*inter, *union)
    cw = d_sub(*d_max(*x2, tx2, z, z, z, z), *d_min(*x1, tx1, z, z, z, z))
    ch = d_sub(*d_max(*y2, ty2, z, z, z, z), *d_min(*y1, ty1, z, z, z, z))
    c2 = d_add(*d_mul(*cw, *cw), *d_mul(*ch, *ch))
    c2 = (c2[0] + CIOU_EPS, c2[1], c2[2], c2[3], c2[4])
    dx = d_sub(*d_sub(tx1 + tx2 + z, z, z, z, z, *x1), *x2)
    dy = d_sub(*d_sub(ty1 + ty2 + z, z, z, z, z, *y1), *y2)
    rho2 = d_scale(*d_add(*d_mul(*dx, *dx), *d_mul(*dy, *dy)), 0.25)
    da = d_sub(atan(w2 / h2) + z, z, z, z, z, *d_atan(*d_div(*w1, *h1)))
    v = d_scale(*d_mul(*da, *da), 4.0 / (3.141592653589793 * 3.141592653589793))
    alpha = v[0] / (1.0 - iou[0] + v[0] + CIOU_EPS)
    return d_sub(*iou, *d_add(*d_div(*rho2, *c2), *d_scale(*v, alpha)))


@triton.jit
def _side_loss(
    base,
    stride_c,
    side,
    fg,
    dist,
    target,
    st,
    extent,
    REG_MAX: tl.constexpr,
    REG_PAD: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
):
    """One side's distance loss: DFL against the two bins around ``target`` (clamped to
    ``[0, REG_MAX - 1.01]``), or (``REG_MAX`` 1) ``|dist - target| * stride / extent``."""
    if REG_MAX == 1:
        loss = tl.abs(dist * st / extent - target * st / extent)
    else:
        x, bins, m2 = _side_logits(base, stride_c, side, fg, REG_MAX, REG_PAD, COMPUTE_DTYPE)
        target = tl.minimum(tl.maximum(target, 0.0), REG_MAX - 1 - DFL_MARGIN)
        left = target.to(tl.int32)
        w_left = (left + 1).to(COMPUTE_DTYPE) - target
        w_right = 1.0 - w_left
        _, mx, s = _softmax_rows(x, m2)
        lse = mx + tl.log(s)
        # (masked rows, all -inf, pick 0: no inf * 0 in lanes that are discarded anyway)
        x_left = tl.sum(tl.where(m2 & (bins[None, :] == left[:, None]), x, 0.0), axis=1)
        x_right = tl.sum(tl.where(m2 & (bins[None, :] == left[:, None] + 1), x, 0.0), axis=1)
        loss = -((x_left - lse) * w_left + (x_right - lse) * w_right)
    return loss


@triton.jit
def _side_grad(
    base, out, stride_c, stride_grad_c, side, pmask, fg, dist, d_dist, target, w_dist, st, extent,
    REG_MAX: tl.constexpr, REG_PAD: tl.constexpr, COMPUTE_DTYPE: tl.constexpr,
):  # fmt: skip
    """One side's gradient rows: ``d_dist`` (the box loss's derivative with respect to the side's
    distance) through the softmax mean, plus the DFL's (or L1's) own, times ``w_dist``
    (``weight * gain * grad_out / score_sum``, 0 where not assigned). Stores every bin."""
    if REG_MAX == 1:
        diff = dist * st / extent - target * st / extent
        sign = tl.where(diff > 0, 1.0, tl.where(diff < 0, -1.0, 0.0))
        grad = tl.where(fg, d_dist + w_dist * sign * st / extent / 4.0, 0.0)
        tl.store(out + side * stride_grad_c, grad.to(out.dtype.element_ty), mask=pmask)
    else:
        x, bins, m2 = _side_logits(base, stride_c, side, fg, REG_MAX, REG_PAD, COMPUTE_DTYPE)
        prob, _, _ = _softmax_rows(x, m2)
        target = tl.minimum(tl.maximum(target, 0.0), REG_MAX - 1 - DFL_MARGIN)
        left = target.to(tl.int32)
        w_left = (left + 1).to(COMPUTE_DTYPE) - target
        w_right = 1.0 - w_left
        onehot = tl.where(bins[None, :] == left[:, None], w_left[:, None], 0.0) + tl.where(
            bins[None, :] == left[:, None] + 1, w_right[:, None], 0.0
        )
        d_dfl = (prob * (w_left + w_right)[:, None] - onehot) * (w_dist / 4.0)[:, None]
        d_mean = prob * (bins.to(COMPUTE_DTYPE)[None, :] - dist[:, None]) * d_dist[:, None]
        grad = tl.where(fg[:, None], d_dfl + d_mean, 0.0)
        ptrs = out[:, None] + (side * REG_MAX + bins)[None, :] * stride_grad_c
        tl.store(ptrs, grad.to(out.dtype.element_ty), mask=pmask[:, None] & (bins < REG_MAX)[None, :])


# ----------------------------------------------------------------------------------------------
# the launcher
# ----------------------------------------------------------------------------------------------


def _next_power_of_2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


@functools.lru_cache(maxsize=64)
def _device_constant(values: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small constant tensor on the device, copied there once: a copy per call would make the
    host wait for the device (and cannot be captured in a CUDA graph)."""
    return torch.tensor(values, dtype=dtype, device=device)


@functools.lru_cache(maxsize=32)
def _geometry(grids: tuple, strides: tuple, device: torch.device, dtype: torch.dtype):
    """``points [A, 3]`` (cell centre x, y in grid units, stride; ``dtype``), ``levels [L, 3]``
    int32 (ny, nx, first point) and ``level_strides [L]``: built once per head layout and device."""
    rows, levels, offset = [], [], 0
    for (ny, nx), stride in zip(grids, strides):
        ys, xs = torch.meshgrid(
            torch.arange(ny, dtype=torch.float64), torch.arange(nx, dtype=torch.float64), indexing="ij"
        )
        rows.append(torch.stack((xs.reshape(-1) + 0.5, ys.reshape(-1) + 0.5, torch.full((ny * nx,), stride)), -1))
        levels.append((ny, nx, offset))
        offset += ny * nx
    points = torch.cat(rows).to(device=device, dtype=dtype).contiguous()
    levels_t = torch.tensor(levels, dtype=torch.int32, device=device)
    level_strides = torch.tensor(strides, dtype=dtype, device=device)
    return points, levels_t, level_strides


@dataclasses.dataclass
class Assignment:
    """The assignment of one call (device tensors; ``t`` is a target's position in image order).

    ``owner [bs, A]`` int32: the target a point is assigned to, -1 where none; ``target [bs, A]``:
    its target score (compute dtype); ``score_sum``: ``max(sum of target scores, 1)``, 0-d;
    ``gt [n, 4]`` float32 pixel xyxy, ``labels [n]`` int32, ``order [n]``: the input row of each
    target; ``image_start [bs + 1]``: image b's targets are ``[start[b], start[b + 1])``."""

    owner: torch.Tensor
    target: torch.Tensor
    score_sum: torch.Tensor
    gt: torch.Tensor
    labels: torch.Tensor
    order: torch.Tensor
    image_start: torch.Tensor

    def slots(self) -> torch.Tensor:
        """``[bs, A]`` int64: the assigned box as its index among its image's targets (-1: none)."""
        owner = self.owner.long()
        bs = owner.shape[0]
        image = torch.arange(bs, device=owner.device).view(-1, 1)
        return torch.where(owner >= 0, owner - self.image_start[:bs].long()[image], -1)


def _tl_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _metric_constants(options: DetectionOptions) -> dict:
    beta = options.beta
    beta_int = int(beta) if beta == int(beta) and 0 <= beta < 64 else -1
    return dict(ALPHA_IS_HALF=options.alpha == 0.5, BETA_INT=beta_int)


def assign(boxes, scores, grids, batch_idx, cls, bboxes, options: DetectionOptions) -> Assignment:
    """The task-aligned assignment (docs/anchor_free.md, step 4) of the head's ``boxes``
    ``[bs, 4 * reg_max, A]`` and ``scores`` ``[bs, nc, A]`` for the batch's targets (``batch_idx``
    ``[n]``, ``cls`` ``[n]``, ``bboxes`` ``[n, 4]`` normalised xywh, checked by the caller)."""
    device = scores.device
    bs, nc, a = scores.shape
    dtype = compute_dtype(scores.dtype)
    if max(options.topk, options.topk2 or 0) > TOPK_LIMIT:
        raise ValueError(
            f"topk: the triton backend keeps at most {TOPK_LIMIT} points per box, got topk={options.topk}, "
            f"topk2={options.topk2}"
        )
    points, levels, level_strides = _geometry(tuple(grids), options.strides, device, dtype)
    n = batch_idx.shape[0]
    image = batch_idx.reshape(-1)
    sorted_image, order = torch.sort(image, stable=True)
    starts = _device_constant(tuple(range(bs + 1)), image.dtype, device)
    image_start = torch.searchsorted(sorted_image, starts, out_int32=True)

    total = bs * a
    k_pad = max(_next_power_of_2(max(options.topk, options.topk2 or 1)), 16)
    blocks = _cdiv(total, BLOCK_POINTS)
    # the kernels' buffers from four allocations (each costs microseconds of host time): int32,
    # int64 (the best keys), float32 (overlaps, decoded boxes, the targets' corners) and the compute
    # dtype (metrics, targets; float32 too, except for float64 predictions); they live as long as
    # the assignment (~40 B per point)
    target_rows = dict(labels=(n,), valid=(n,), images=(n,))
    ints = carve(dict(claims=(bs, a), owner=(bs, a), top_index=(n, k_pad), **target_rows), torch.int32, device)
    one = max(n, 1)
    floats = dict(
        point_overlap=(bs, a), box_overlap=(one,), pred=(bs if n else 0, a, 4), top_overlap=(n, k_pad), gt=(n, 4)
    )
    reals = dict(
        point_metric=(bs, a), target=(bs, a), partial=(blocks,), box_metric=(one,), top_metric=(n, k_pad), score_sum=()
    )
    if dtype == torch.float32:
        buffers = carve(dict(floats, **reals), torch.float32, device)
    else:
        buffers = dict(carve(floats, torch.float32, device), **carve(reals, dtype, device))
    claims, owner, top_index = ints["claims"], ints["owner"], ints["top_index"]
    gt, labels, valid, images = buffers["gt"], ints["labels"], ints["valid"], ints["images"]
    if n:  # the targets in image order, as the kernels read them (pixel corners: the original's arithmetic)
        ny0, nx0 = grids[0]
        cls_flat = cls.reshape(-1)
        _launch(
            _targets_kernel, (_cdiv(n, BLOCK_POINTS),), order_ptr=order, sorted_image_ptr=sorted_image,
            bboxes_ptr=bboxes, stride_bboxes_n=bboxes.stride(0), stride_bboxes_c=bboxes.stride(1), cls_ptr=cls_flat,
            stride_cls=cls_flat.stride(0), gt_ptr=gt, label_ptr=labels, valid_ptr=valid, image_ptr=images,
            num_targets=n, image_w=float(nx0 * options.strides[0]), image_h=float(ny0 * options.strides[0]),
            BLOCK=BLOCK_POINTS, enable_fp_fusion=False,
        )  # fmt: skip
        best = torch.empty((bs, a), dtype=torch.int64, device=device)  # initialised by _decode_kernel
    else:
        owner.fill_(-1)  # the only state _target_kernel reads
        best = None
    point_metric, point_overlap, target = buffers["point_metric"], buffers["point_overlap"], buffers["target"]
    partial, box_metric, box_overlap = buffers["partial"], buffers["box_metric"], buffers["box_overlap"]
    common = dict(num_points=a, COMPUTE_DTYPE=_tl_dtype(dtype))
    metric = dict(alpha=options.alpha, beta=options.beta, size_floor=options.size_floor, **_metric_constants(options))
    sc = dict(scores_ptr=scores, stride_scores_b=scores.stride(0), stride_scores_c=scores.stride(1),
              stride_scores_a=scores.stride(2))  # fmt: skip
    if n:
        pred = buffers["pred"]
        reg_max = options.reg_max
        _launch(
            _decode_kernel, (blocks,), boxes_ptr=boxes, stride_boxes_b=boxes.stride(0),
            stride_boxes_c=boxes.stride(1), stride_boxes_a=boxes.stride(2), points_ptr=points, pred_ptr=pred,
            claims_ptr=claims, owner_ptr=owner, best_ptr=best, total=total, REG_MAX=reg_max,
            REG_PAD=_next_power_of_2(reg_max), BLOCK=BLOCK_POINTS, **common,
        )  # fmt: skip
        top_metric, top_overlap = buffers["top_metric"], buffers["top_overlap"]
        per_target = dict(gt_ptr=gt, label_ptr=labels, image_ptr=images, valid_ptr=valid)
        tops = dict(top_index_ptr=top_index, top_metric_ptr=top_metric, top_overlap_ptr=top_overlap)
        geometry = dict(levels_ptr=levels, level_strides_ptr=level_strides, num_levels=len(grids))
        _launch(
            _topk_kernel, (n,), **per_target, **sc, pred_ptr=pred, points_ptr=points, **geometry, claims_ptr=claims,
            best_ptr=best, **tops, k=min(options.topk, a), num_pseudo=min(k_pad, a), **metric, K_PAD=k_pad,
            BLOCK=BLOCK_WINDOW, enable_fp_fusion=False, **common,
        )  # fmt: skip
        _launch(
            _resolve_kernel, (n,), **per_target, image_start_ptr=image_start, **sc, pred_ptr=pred, points_ptr=points,
            claims_ptr=claims, best_ptr=best, **tops, owner_ptr=owner, point_metric_ptr=point_metric,
            point_overlap_ptr=point_overlap, **metric, K_PAD=k_pad, enable_fp_fusion=False, **common,
        )  # fmt: skip
        second = options.second_cut
        _launch(
            _finish_kernel, (n,), gt_ptr=gt, image_ptr=images, valid_ptr=valid, **geometry, owner_ptr=owner,
            point_metric_ptr=point_metric, point_overlap_ptr=point_overlap, box_metric_ptr=box_metric,
            box_overlap_ptr=box_overlap, k2=min(second or 1, a), num_pseudo=min(k_pad, a),
            size_floor=options.size_floor, SECOND_CUT=second is not None, K_PAD=k_pad, BLOCK=BLOCK_WINDOW,
            **common,
        )  # fmt: skip
    _launch(
        _target_kernel, (blocks,), owner_ptr=owner, point_metric_ptr=point_metric, box_metric_ptr=box_metric,
        box_overlap_ptr=box_overlap, target_ptr=target, partial_ptr=partial, total=total,
        COMPUTE_DTYPE=_tl_dtype(dtype), BLOCK=BLOCK_POINTS,
    )  # fmt: skip
    score_sum = buffers["score_sum"]
    _launch(
        _score_sum_kernel, (1,), partial_ptr=partial, num_partials=blocks, score_sum_ptr=score_sum,
        COMPUTE_DTYPE=_tl_dtype(dtype), BLOCK=BLOCK_TOTALS,
    )  # fmt: skip
    return Assignment(owner, target, score_sum, gt, labels, order, image_start)


def _class_loss(scores, grad, assigned: Assignment, class_weights, grad_out, partial, cls_gain: float) -> None:
    bs, nc, a = scores.shape
    dtype = compute_dtype(scores.dtype)
    weights = class_weights if class_weights is not None else assigned.target  # unread without HAS_WEIGHTS
    _launch(
        _class_loss_kernel, (_cdiv(a, BLOCK_CLS_POINTS), _cdiv(nc, BLOCK_CLS_CLASSES), bs),
        scores_ptr=scores, stride_scores_b=scores.stride(0), stride_scores_c=scores.stride(1),
        stride_scores_a=scores.stride(2), grad_ptr=grad, stride_grad_b=grad.stride(0), stride_grad_c=grad.stride(1),
        stride_grad_a=grad.stride(2), owner_ptr=assigned.owner, target_ptr=assigned.target,
        label_ptr=assigned.labels, class_weight_ptr=weights, score_sum_ptr=assigned.score_sum,
        grad_out_ptr=grad_out, stride_grad_out=grad_out.stride(0), partial_ptr=partial, num_points=a, nc=nc,
        cls_gain=cls_gain, HAS_WEIGHTS=class_weights is not None, GRAD=grad.numel() > 0 and partial.numel() == 0,
        COMPUTE_DTYPE=_tl_dtype(dtype), BLOCK_C=BLOCK_CLS_CLASSES, BLOCK_P=BLOCK_CLS_POINTS,
    )  # fmt: skip


def _box_loss(boxes, grad, grids, assigned: Assignment, options: DetectionOptions, grad_out, partial) -> None:
    bs, _, a = boxes.shape
    dtype = compute_dtype(boxes.dtype)
    points, _, _ = _geometry(tuple(grids), options.strides, boxes.device, dtype)
    ny0, nx0 = grids[0]
    _launch(
        _box_loss_kernel, (_cdiv(a, BLOCK_POINTS), bs),
        boxes_ptr=boxes, stride_boxes_b=boxes.stride(0), stride_boxes_c=boxes.stride(1),
        stride_boxes_a=boxes.stride(2), grad_ptr=grad, stride_grad_b=grad.stride(0), stride_grad_c=grad.stride(1),
        stride_grad_a=grad.stride(2), points_ptr=points, owner_ptr=assigned.owner, target_ptr=assigned.target,
        gt_ptr=assigned.gt, score_sum_ptr=assigned.score_sum, grad_out_ptr=grad_out,
        stride_grad_out=grad_out.stride(0), partial_ptr=partial, num_points=a,
        image_w=float(nx0 * options.strides[0]), image_h=float(ny0 * options.strides[0]), box_gain=options.box,
        dfl_gain=options.dfl, REG_MAX=options.reg_max, REG_PAD=_next_power_of_2(options.reg_max),
        GRAD=partial.numel() == 0, COMPUTE_DTYPE=_tl_dtype(dtype), BLOCK=BLOCK_POINTS,
    )  # fmt: skip


def detection_loss(boxes, scores, grids, assigned: Assignment, options: DetectionOptions, class_weights=None):
    """The three gained components ``[box, cls, dfl]`` of an assignment (forward only: no gradient
    is written), in ``promote(dtype, float32)``."""
    bs, nc, a = scores.shape
    dtype = compute_dtype(scores.dtype)
    device = scores.device
    none = torch.empty(0, 0, 0, dtype=scores.dtype, device=device)
    work = carve(
        dict(
            grad_out=(3,),  # unread in forward
            cls_partial=(bs * _cdiv(nc, BLOCK_CLS_CLASSES) * _cdiv(a, BLOCK_CLS_POINTS),),
            box_partial=(bs * _cdiv(a, BLOCK_POINTS), 2),
        ),
        dtype,
        device,
    )
    grad_out, cls_partial, box_partial = work["grad_out"], work["cls_partial"], work["box_partial"]
    weights = None if class_weights is None else class_weights.to(device=device, dtype=dtype).contiguous()
    _class_loss(scores, none, assigned, weights, grad_out, cls_partial, options.cls)
    _box_loss(boxes, none, grids, assigned, options, grad_out, box_partial)
    out = torch.empty(3, dtype=dtype, device=device)  # promote(dtype, float32): the compute dtype
    box_gain, cls_gain, dfl_gain = options.gains()
    _launch(
        _loss_total_kernel, (1,), box_partial_ptr=box_partial, num_box_partials=box_partial.shape[0],
        cls_partial_ptr=cls_partial, num_cls_partials=cls_partial.shape[0], score_sum_ptr=assigned.score_sum,
        out_ptr=out, box_gain=float(box_gain), cls_gain=float(cls_gain), dfl_gain=float(dfl_gain),
        COMPUTE_DTYPE=_tl_dtype(dtype), BLOCK=BLOCK_TOTALS,
    )  # fmt: skip
    return out


def loss_backward(
    grad_out,
    boxes,
    scores,
    grids,
    assigned: Assignment,
    options: DetectionOptions,
    class_weights,
    need_boxes,
    need_scores,
):
    """The gradients of ``detection_loss``'s components with respect to ``boxes`` and ``scores``
    for the components' gradient ``grad_out`` ``[3]`` (read on the device: no sync), each written
    once, in its input's dtype and layout (``None`` where not needed)."""
    dtype = compute_dtype(scores.dtype)
    device = scores.device
    grad_out = grad_out.to(dtype)
    none = torch.empty(0, dtype=dtype, device=device)
    grad_boxes = grad_scores = None
    if need_scores:
        grad_scores = torch.empty_like(scores)
        weights = None if class_weights is None else class_weights.to(device=device, dtype=dtype).contiguous()
        _class_loss(scores, grad_scores, assigned, weights, grad_out, none, options.cls)
    if need_boxes:
        grad_boxes = torch.empty_like(boxes)
        _box_loss(boxes, grad_boxes, grids, assigned, options, grad_out, none)
    return grad_boxes, grad_scores
