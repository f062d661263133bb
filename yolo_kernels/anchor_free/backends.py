"""The anchor-free family's backends and its registry (``REGISTRY.resolve`` picks one).

A backend here has ``name``, ``unavailable_reason(device)`` and
``loss(problem, options, class_weights) -> [box, cls, dfl]`` (gains applied, differentiable with
respect to ``problem.boxes`` and ``problem.scores``).
"""

from __future__ import annotations

import torch

from ..dispatch import Registry
from ..library import cpu_kernels_unavailable_reason, require_extension
from . import reference
from .options import DetectionOptions
from .validate import Problem

__all__ = ["AUTO_ORDER", "BACKENDS", "REGISTRY", "CppBackend", "ReferenceBackend"]


class ReferenceBackend:
    """Plain PyTorch (``yolo_kernels.anchor_free.reference``): any device, any floating dtype."""

    name = "reference"

    def unavailable_reason(self, device: torch.device | None) -> str | None:
        return None

    def loss(self, problem: Problem, options: DetectionOptions, class_weights: torch.Tensor | None) -> torch.Tensor:
        return reference.loss(
            problem.boxes,
            problem.scores,
            problem.grids,
            problem.batch_idx,
            problem.cls,
            problem.bboxes,
            options,
            class_weights,
        )


class CppBackend:
    """Fused C++ kernels on CPU tensors (fp16/bf16/fp32/fp64): ``torch.ops.yolo_kernels.tal_assign``
    (the assigner, memory O(bs * boxes * topk + points)) and ``detection_loss`` (whose backward
    writes the gradients once, scaled by ``grad_output``)."""

    name = "cpp"

    def unavailable_reason(self, device: torch.device | None) -> str | None:
        return cpu_kernels_unavailable_reason(device)

    def loss(self, problem: Problem, options: DetectionOptions, class_weights: torch.Tensor | None) -> torch.Tensor:
        require_extension()
        ops = torch.ops.yolo_kernels
        boxes, scores = problem.boxes, problem.scores
        grids = [n for grid in problem.grids for n in grid]
        strides = list(options.strides)
        image_hw = reference.image_size(problem.grids, strides, scores.dtype, scores.device)
        labels, gt_boxes = reference.pad_targets(
            problem.batch_idx, problem.cls, problem.bboxes, boxes.shape[0], image_hw.flip(0)
        )
        labels = labels.squeeze(-1).long()
        assigned, target = ops.tal_assign(
            boxes.detach(), scores.detach(), labels, gt_boxes, grids, strides, options.topk, options.second_cut,
            options.alpha, options.beta, options.size_floor,
        )  # fmt: skip
        return ops.detection_loss(
            boxes, scores, labels, gt_boxes, assigned, target, class_weights, grids, strides, *options.gains()
        )


REGISTRY = Registry(
    family="anchor_free",
    backends={"reference": ReferenceBackend(), "cpp": CppBackend()},
    auto_order={"cpu": ("cpp",)},
)
BACKENDS = REGISTRY.backends
#: What ``backend="auto"`` tries first, by device type, before the reference.
AUTO_ORDER = REGISTRY.auto_order
