"""The anchor-free family (ultralytics YOLOv8 / YOLO11 / YOLO26 detection loss) in plain PyTorch:
the oracle every fast backend of this family is checked against.

Semantics (docs/anchor_free.md has the full statement):

* anchor points are the cell centres ``(x + 0.5, y + 0.5)`` of every level, in grid units, level
  after level; ``boxes`` holds per point four distances (left, top, right, bottom) as ``reg_max``
  logits each (their softmax's mean is the distance, in grid units), or the distances themselves
  when ``reg_max == 1``;
* targets are padded per image in the order they come, scaled from normalised xywh to pixel xyxy
  by the image size (``grid[0] * strides[0]``); a box whose xyxy sum is not positive (an all-zero
  row) is padding;
* the task-aligned assigner (``assign``): a point is a candidate of a box when its centre lies
  strictly inside the box after sides below ``size_floor`` are raised to it about the centre; the
  metric ``score ** alpha * CIoU.clamp(0) ** beta`` (score: the sigmoid of the box class's logit);
  each box keeps its ``topk`` best; a point kept by several boxes goes to the box with the highest
  CIoU over all boxes (the first on ties); with ``topk2`` each box then keeps its ``topk2`` best;
  target scores are ``metric * max CIoU / max metric`` per box;
* the losses are normalised by ``max(sum of target scores, 1)``: CIoU (eps 1e-7, alpha detached)
  and DFL (targets clamped to ``[0, reg_max - 1.01]``) or L1 (in image fractions) over the
  assigned points, each weighted by its target score; class BCE over every point and class.

Everything runs in the dtype of the predictions, as the original does, except the assigner's
boxes, which are float32 (the original's default-dtype target tensor).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .options import DetectionOptions

__all__ = [
    "Assignment",
    "anchor_points",
    "assign",
    "assignment_of",
    "bbox_ciou",
    "candidates_in_boxes",
    "decode_boxes",
    "dfl_loss",
    "image_size",
    "loss",
    "pad_targets",
    "topk_indices",
]

CIOU_EPS = 1e-7  # bbox_iou's eps
ASSIGN_EPS = 1e-9  # the assigner's eps (inside-box test, metric normalisation)
DFL_MARGIN = 0.01  # distance targets stop at reg_max - 1 - margin, so the right bin exists


def anchor_points(
    grids: Sequence[tuple[int, int]], strides: Sequence[float], dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cell centres ``[A, 2]`` (x, y in grid units) of every level in order, and each one's stride
    ``[A, 1]``."""
    points, point_strides = [], []
    for (ny, nx), stride in zip(grids, strides):
        xs = torch.arange(nx, device=device).to(dtype) + 0.5
        ys = torch.arange(ny, device=device).to(dtype) + 0.5
        yy, xx = torch.meshgrid(ys, xs, indexing="ij")
        points.append(torch.stack((xx, yy), -1).view(-1, 2))
        point_strides.append(torch.full((ny * nx, 1), stride, dtype=dtype, device=device))
    return torch.cat(points), torch.cat(point_strides)


def image_size(
    grids: Sequence[tuple[int, int]], strides: Sequence[float], dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """The image's (height, width) in pixels: the first level's grid times its stride."""
    return torch.tensor(grids[0], dtype=dtype, device=device) * strides[0]


def xywh_to_xyxy(b: torch.Tensor) -> torch.Tensor:
    half = b[..., 2:] / 2
    return torch.cat((b[..., :2] - half, b[..., :2] + half), -1)


def pad_targets(
    batch_idx: torch.Tensor, cls: torch.Tensor, bboxes: torch.Tensor, bs: int, image_wh: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Targets per image, in their order: labels ``[bs, m, 1]`` and pixel xyxy boxes ``[bs, m, 4]``
    (float32), ``m`` the most boxes of one image; the rest is zeros (padding)."""
    n = batch_idx.shape[0]
    device = bboxes.device
    if n == 0:
        return torch.zeros(bs, 0, 1, device=device), torch.zeros(bs, 0, 4, device=device)
    image = batch_idx.view(-1).long()
    counts = torch.bincount(image, minlength=bs)
    starts = torch.cumsum(counts, 0) - counts
    # a target's slot in its image: its rank among that image's targets, in input order
    order = torch.argsort(image, stable=True)
    slot = torch.empty_like(image)
    slot[order] = torch.arange(n, device=device) - starts[image[order]]
    m = int(counts.max())
    labels = torch.zeros(bs, m, 1, device=device)
    boxes = torch.zeros(bs, m, 4, device=device)
    labels[image, slot] = cls.view(-1, 1).to(labels.dtype)
    boxes[image, slot] = bboxes.to(boxes.dtype)
    scale = torch.cat((image_wh, image_wh)).to(boxes.dtype)
    return labels, xywh_to_xyxy(boxes * scale)


def decode_boxes(points: torch.Tensor, distances: torch.Tensor, reg_max: int) -> torch.Tensor:
    """xyxy boxes ``[bs, A, 4]`` (grid units) from ``distances`` ``[bs, A, 4 * reg_max]``: the mean
    of each side's softmax over the bins (``reg_max > 1``) or the value itself."""
    if reg_max > 1:
        bs, a, _ = distances.shape
        bins = torch.arange(reg_max, dtype=distances.dtype, device=distances.device)
        distances = distances.view(bs, a, 4, reg_max).softmax(3).matmul(bins)
    lt, rb = distances.chunk(2, -1)
    return torch.cat((points - lt, points + rb), -1)


@torch.no_grad()
def _aspect_weight(iou: torch.Tensor, v: torch.Tensor, eps: float) -> torch.Tensor:
    return v / (1 - iou + v + eps)


def bbox_ciou(
    box1: torch.Tensor, box2: torch.Tensor, eps: float = CIOU_EPS, alpha: torch.Tensor | None = None
) -> torch.Tensor:
    """Complete IoU of xyxy boxes ``[..., 4]``, shape ``[..., 1]``; heights carry ``+ eps``. The
    aspect term's weight ``alpha`` is a constant of the gradient: computed (detached) from the
    boxes, or given (to hold it at another point's value, as a gradcheck must)."""
    ax1, ay1, ax2, ay2 = box1.chunk(4, -1)
    bx1, by1, bx2, by2 = box2.chunk(4, -1)
    aw, ah = ax2 - ax1, ay2 - ay1 + eps
    bw, bh = bx2 - bx1, by2 - by1 + eps
    inter = (ax2.minimum(bx2) - ax1.maximum(bx1)).clamp(0) * (ay2.minimum(by2) - ay1.maximum(by1)).clamp(0)
    union = aw * ah + bw * bh - inter + eps
    iou = inter / union
    cw = ax2.maximum(bx2) - ax1.minimum(bx1)
    ch = ay2.maximum(by2) - ay1.minimum(by1)
    c2 = cw.pow(2) + ch.pow(2) + eps
    rho2 = ((bx1 + bx2 - ax1 - ax2).pow(2) + (by1 + by2 - ay1 - ay2).pow(2)) / 4
    v = (4 / math.pi**2) * ((bw / bh).atan() - (aw / ah).atan()).pow(2)
    if alpha is None:
        alpha = _aspect_weight(iou, v, eps)
    return iou - (rho2 / c2 + v * alpha)


def candidates_in_boxes(points: torch.Tensor, gt_boxes: torch.Tensor, size_floor: float) -> torch.Tensor:
    """``[bs, m, A]``: point centre strictly inside the box (by more than eps), sides below
    ``size_floor`` raised to it about the box centre. ``points`` and boxes in pixels."""
    centre = (gt_boxes[..., :2] + gt_boxes[..., 2:]) / 2
    size = gt_boxes[..., 2:] - gt_boxes[..., :2]
    size = torch.where(size < size_floor, torch.full_like(size, size_floor), size)
    half = size / 2
    lo, hi = (centre - half).unsqueeze(2), (centre + half).unsqueeze(2)
    inside = (points - lo > ASSIGN_EPS) & (hi - points > ASSIGN_EPS)
    return inside.all(-1)


def topk_indices(metric: torch.Tensor, k: int) -> torch.Tensor:
    """The indices of the ``k`` largest along the last dim, as the original takes them
    (``torch.topk`` on the tensor's device). Which of equal values come back is the device's
    choice: CUDA's topk returns the lowest indices among values equal to the k-th (the triton
    backend's order), the CPU's follows its ``partial_sort`` / ``nth_element`` (the cpp backend's).
    Tests of the triton backend under the CPU interpreter replace this function with CUDA's rule."""
    return metric.topk(k, dim=-1).indices


class Assignment(NamedTuple):
    """The assigner's result per image and point: ``fg`` (assigned), ``gt_index`` (the box, 0 where
    not assigned), ``boxes`` ``[bs, A, 4]`` (the box, pixels), ``scores`` ``[bs, A, nc]`` (the
    normalised alignment at the box's class, 0 elsewhere)."""

    fg: torch.Tensor
    gt_index: torch.Tensor
    boxes: torch.Tensor
    scores: torch.Tensor


@torch.no_grad()
def assign(
    scores: torch.Tensor,
    pred_boxes: torch.Tensor,
    points: torch.Tensor,
    gt_labels: torch.Tensor,
    gt_boxes: torch.Tensor,
    gt_valid: torch.Tensor,
    options: DetectionOptions,
) -> Assignment:
    """The task-aligned assignment (dense: ``[bs, m, A]`` tensors; the oracle, not the lean one).

    ``scores`` ``[bs, A, nc]`` probabilities; ``pred_boxes`` ``[bs, A, 4]`` and ``points``
    ``[A, 2]`` in pixels; ``gt_labels`` ``[bs, m, 1]``, ``gt_boxes`` ``[bs, m, 4]`` pixel xyxy,
    ``gt_valid`` ``[bs, m]`` bool."""
    bs, a, nc = scores.shape
    m = gt_boxes.shape[1]
    if m == 0:
        return Assignment(
            torch.zeros(bs, a, dtype=torch.bool, device=scores.device),
            torch.zeros(bs, a, dtype=torch.long, device=scores.device),
            torch.zeros_like(pred_boxes),
            torch.zeros_like(scores),
        )
    valid = gt_valid.unsqueeze(-1)  # [bs, m, 1]
    inside = candidates_in_boxes(points, gt_boxes, options.size_floor)
    candidate = inside & valid
    b, g, p = candidate.nonzero(as_tuple=True)
    label = gt_labels[b, g, 0].long()
    ciou = bbox_ciou(gt_boxes[b, g], pred_boxes[b, p]).squeeze(-1).clamp(0)
    metric_values = scores[b, p, label].pow(options.alpha) * ciou.pow(options.beta)
    overlaps = torch.zeros(bs, m, a, dtype=pred_boxes.dtype, device=scores.device)
    metric = torch.zeros(bs, m, a, dtype=metric_values.dtype, device=scores.device)
    overlaps[b, g, p] = ciou
    metric[b, g, p] = metric_values

    # top-k per box (over all points: non-candidates have metric 0 and are masked out below)
    k = min(options.topk, a)
    top = topk_indices(metric, k)
    picked = torch.zeros(bs, m, a, dtype=torch.int32, device=scores.device)
    picked.scatter_add_(-1, top, torch.ones_like(top, dtype=torch.int32))
    positive = (picked == 1) & inside & valid

    # a point kept by several boxes goes to the box of highest CIoU over all boxes (first on ties)
    claims = positive.sum(1, keepdim=True)
    best = overlaps.argmax(1, keepdim=True)
    best_onehot = torch.zeros_like(positive).scatter_(1, best, True)
    positive = torch.where(claims > 1, best_onehot, positive)

    if options.second_cut is not None:
        kept = topk_indices(metric * positive, min(options.second_cut, a))
        positive = positive & torch.zeros_like(positive).scatter_(-1, kept, True)

    fg = positive.any(1)
    gt_index = positive.to(torch.uint8).argmax(1)
    target_boxes = torch.gather(gt_boxes, 1, gt_index.unsqueeze(-1).expand(-1, -1, 4))
    target_labels = torch.gather(gt_labels.long().squeeze(-1), 1, gt_index).clamp(0)

    # normalise: per box, metric * (its best CIoU) / (its best metric); per point, over its boxes
    metric = metric * positive
    best_metric = metric.amax(-1, keepdim=True)
    best_overlap = (overlaps * positive).amax(-1, keepdim=True)
    norm = (metric * best_overlap / (best_metric + ASSIGN_EPS)).amax(1)  # [bs, A]
    target_scores = F.one_hot(target_labels, nc).to(scores.dtype) * (fg * norm).unsqueeze(-1)
    return Assignment(fg, gt_index, target_boxes, target_scores)


def dfl_loss(logits: torch.Tensor, target: torch.Tensor, reg_max: int) -> torch.Tensor:
    """Distribution focal loss per point ``[n, 1]``: cross-entropy of the four sides' ``reg_max``
    bins (``logits`` ``[n, 4 * reg_max]``) against the two bins around each target distance,
    weighted linearly, averaged over the sides. ``target`` ``[n, 4]`` in grid units."""
    target = target.clamp(0, reg_max - 1 - DFL_MARGIN)
    left = target.long()
    w_left = (left + 1) - target
    w_right = 1 - w_left
    logp = F.log_softmax(logits.reshape(-1, 4, reg_max), dim=-1)
    pick_left = logp.gather(-1, left.unsqueeze(-1)).squeeze(-1)
    pick_right = logp.gather(-1, (left + 1).unsqueeze(-1)).squeeze(-1)
    return -(pick_left * w_left + pick_right * w_right).mean(-1, keepdim=True)


class _Frame(NamedTuple):
    distances: torch.Tensor  # [bs, A, 4 * reg_max]
    logits: torch.Tensor  # [bs, A, nc]
    points: torch.Tensor  # [A, 2] grid units
    point_strides: torch.Tensor  # [A, 1]
    image_hw: torch.Tensor  # [2] pixels
    gt_labels: torch.Tensor  # [bs, m, 1]
    gt_boxes: torch.Tensor  # [bs, m, 4] pixel xyxy
    pred_boxes: torch.Tensor  # [bs, A, 4] grid units, differentiable


def _frame(boxes, scores, grids, batch_idx, cls, bboxes, options: DetectionOptions) -> _Frame:
    distances = boxes.permute(0, 2, 1).contiguous()
    logits = scores.permute(0, 2, 1).contiguous()
    dtype, bs = logits.dtype, logits.shape[0]
    points, point_strides = anchor_points(grids, options.strides, dtype, logits.device)
    image_hw = image_size(grids, options.strides, dtype, logits.device)
    gt_labels, gt_boxes = pad_targets(batch_idx, cls, bboxes, bs, image_hw.flip(0))
    pred_boxes = decode_boxes(points, distances, options.reg_max)
    return _Frame(distances, logits, points, point_strides, image_hw, gt_labels, gt_boxes, pred_boxes)


def _assign_frame(f: _Frame, options: DetectionOptions) -> Assignment:
    return assign(
        f.logits.detach().sigmoid(),
        (f.pred_boxes.detach() * f.point_strides).to(f.gt_boxes.dtype),
        f.points * f.point_strides,
        f.gt_labels,
        f.gt_boxes,
        f.gt_boxes.sum(-1) > 0,  # an all-zero row is padding
        options,
    )


def assignment_of(boxes, scores, grids, batch_idx, cls, bboxes, options: DetectionOptions) -> Assignment:
    """The assignment ``loss`` computes for these inputs (to hold it fixed, e.g. for gradcheck)."""
    return _assign_frame(_frame(boxes, scores, grids, batch_idx, cls, bboxes, options), options)


def loss(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    grids: Sequence[tuple[int, int]],
    batch_idx: torch.Tensor,
    cls: torch.Tensor,
    bboxes: torch.Tensor,
    options: DetectionOptions,
    class_weights: torch.Tensor | None = None,
    assignment: Assignment | None = None,
) -> torch.Tensor:
    """The three gained components ``[box, cls, dfl]`` (not yet times the batch size).

    ``boxes`` ``[bs, 4 * reg_max, A]`` and ``scores`` ``[bs, nc, A]`` (the head's training output),
    ``grids`` the ``(ny, nx)`` of each level, targets as the ultralytics batch: ``batch_idx``
    ``[n]``, ``cls`` ``[n]`` or ``[n, 1]``, ``bboxes`` ``[n, 4]`` normalised xywh.

    The assignment is a constant of the gradient (the original computes it without gradient), but
    its target scores move with the predictions; ``assignment`` (``assignment_of`` the same
    inputs) holds it fixed, which makes the loss differentiable for ``gradcheck``."""
    f = _frame(boxes, scores, grids, batch_idx, cls, bboxes, options)
    assigned = assignment if assignment is not None else _assign_frame(f, options)
    distances, logits, points, point_strides, image_hw, pred_boxes = (
        f.distances, f.logits, f.points, f.point_strides, f.image_hw, f.pred_boxes,
    )  # fmt: skip
    dtype = logits.dtype
    score_sum = assigned.scores.sum().clamp(min=1)

    bce = F.binary_cross_entropy_with_logits(logits, assigned.scores.to(dtype), reduction="none")
    if class_weights is not None:
        bce = bce * class_weights.view(1, 1, -1)
    cls_loss = bce.sum() / score_sum

    fg = assigned.fg.nonzero(as_tuple=True)
    weight = assigned.scores[fg].sum(-1, keepdim=True)
    target_boxes = assigned.boxes / point_strides  # grid units
    ciou = bbox_ciou(pred_boxes[fg], target_boxes[fg])
    box_loss = ((1.0 - ciou) * weight).sum() / score_sum
    sides = torch.cat((points - target_boxes[..., :2], target_boxes[..., 2:] - points), -1)  # l, t, r, b
    if options.uses_dfl:
        sides = sides.clamp(0, options.reg_max - 1 - DFL_MARGIN)
        dist_loss = (dfl_loss(distances[fg], sides[fg], options.reg_max) * weight).sum() / score_sum
    else:
        # L1 of the distances as fractions of the image (x sides by width, y sides by height)
        per_side = torch.cat((image_hw.flip(0), image_hw.flip(0)))
        pred_frac = distances * point_strides / per_side
        target_frac = sides * point_strides / per_side
        l1 = F.l1_loss(pred_frac[fg], target_frac[fg], reduction="none").mean(-1, keepdim=True)
        dist_loss = (l1 * weight).sum() / score_sum
    # the original collects the components in a float32 vector: float16/bfloat16 come out float32
    out_dtype = torch.promote_types(dtype, torch.float32)
    gains = torch.tensor(options.gains(), dtype=out_dtype, device=logits.device)
    return torch.stack((box_loss, cls_loss, dist_loss)).to(out_dtype) * gains
