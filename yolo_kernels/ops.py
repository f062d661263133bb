"""The fused ops one by one (``torch.ops.yolo_kernels.*``), with the schemas of ``library.SCHEMAS``.

Each runs on the device of its inputs (CPU: the C++ kernels of ``yolo_kernels._C``). They check
their inputs with ``RuntimeError``s; the public loss API validates before calling them.
"""

from __future__ import annotations

import torch

from .anchor.fused_op import fused_loss_op
from .anchor.options import LossOptions
from .library import require_extension

__all__ = ["match", "box_iou", "bce_with_logits", "fused_loss"]


def match(
    targets: torch.Tensor, anchors: torch.Tensor, ny: int, nx: int, threshold: float = 0.2, family: str = "yolov3"
):
    """Target matching of one layer: ``(indices [P, 4] = (b, a, gj, gi), tbox [P, 4], anch [P, 2], tcls [P])``,
    pairs in the family's order; ``anchors [na, 2]`` in grid units; ``threshold`` is ``iou_t``
    (yolov3) or ``anchor_t`` (yolov5)."""
    require_extension()
    return torch.ops.yolo_kernels.match(targets, anchors, int(ny), int(nx), float(threshold), family)


def box_iou(ps: torch.Tensor, tbox: torch.Tensor, anch: torch.Tensor, box_loss: str = "giou", family: str = "yolov3"):
    """IoU-family of the boxes the family predicts from logits ``ps [P, >= 4]`` and anchors
    ``anch [P, 2]`` against ``tbox [P, 4]``: ``(iou [P], d iou / d ps[:, :4] [P, 4])``."""
    require_extension()
    return torch.ops.yolo_kernels.box_iou(ps, tbox, anch, box_loss, family)


def bce_with_logits(x: torch.Tensor, y: torch.Tensor, pos_weight: float = 1.0, gamma: float = 0.0):
    """Element-wise BCE with logits (``pos_weight``; focal when ``gamma > 0``): ``(loss, d loss / d x)``."""
    require_extension()
    return torch.ops.yolo_kernels.bce_with_logits(x, y, float(pos_weight), float(gamma))


def fused_loss(p, targets, anchors, options: LossOptions, compute_grad: bool = True, balance=None):
    """The whole loss in one call: ``(loss [1], loss_items [4], layer_obj [nl], stats [0, 8] (none
    asked for: ``yolo_kernels.stats`` reads the op's full form), [d loss / d p[i]])``;
    ``loss`` is differentiable with respect to ``p`` (its backward only scales the gradients
    computed here). ``balance [nl]``: per-layer objectness weights (``None``: ones)."""
    require_extension()
    return fused_loss_op(p, targets, anchors, options, compute_grad, balance)
