"""The anchor-free family's backends and its registry (``REGISTRY.resolve`` picks one).

A backend here has ``name``, ``unavailable_reason(device)`` and
``loss(problem, options, class_weights, expected_grad=None) -> [box, cls, dfl]`` (gains applied,
differentiable with respect to ``problem.boxes`` and ``problem.scores``). ``expected_grad`` is the
gradient the caller's own arithmetic will bring to each component in backward when the trainer
backpropagates ``loss.sum()`` (the batch size, times a branch's weight): a backend may compute the
gradient for it in the forward pass, and must give the right one for any other.
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

    def checks_values(self, device: torch.device) -> bool:
        return False  # DetectionLoss's checks (validate) cover it

    def loss(self, problem: Problem, options: DetectionOptions, class_weights, expected_grad=None) -> torch.Tensor:
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


def _is_expected(grad: torch.Tensor, expected: float) -> bool:
    """Whether the components' gradient is ``expected`` in each: read where reading is free (a real
    CPU tensor, not while tracing)."""
    readable = type(grad) is torch.Tensor and grad.device.type == "cpu" and not torch.compiler.is_compiling()
    return readable and grad.tolist() == [expected] * 3


class _LossWithGradient(torch.autograd.Function):
    """Eager autograd of the cpp backend: forward runs ``detection_loss_with_grad``, which writes
    the gradients for the components' gradient the caller expects in the same passes as the loss
    (the class logits read and exponentiated once for both); backward hands them over when that is
    the gradient it brings (the trainer's ``loss.sum()``: no work at all), and otherwise computes
    the right ones with ``detection_loss_backward``."""

    @staticmethod
    def forward(ctx, boxes, scores, labels, gt_boxes, assigned, target, class_weights, grids, strides, gains, expected):
        ops = torch.ops.yolo_kernels
        loss, grad_boxes, grad_scores = ops.detection_loss_with_grad(
            boxes, scores, labels, gt_boxes, assigned, target, class_weights, grids, strides, *gains, [expected] * 3
        )
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(grad_boxes, grad_scores, boxes, scores, labels, gt_boxes, assigned, target, class_weights)
        ctx.constants = grids, strides, gains, expected
        return loss

    @staticmethod
    def backward(ctx, grad):
        if grad is None:
            return (None,) * 11
        grad_boxes, grad_scores, *inputs = ctx.saved_tensors
        grids, strides, gains, expected = ctx.constants
        if not _is_expected(grad, expected):
            grad_boxes, grad_scores = torch.ops.yolo_kernels.detection_loss_backward(
                grad, *inputs, grids, strides, *gains
            )
        wanted = ctx.needs_input_grad
        return (grad_boxes if wanted[0] else None, grad_scores if wanted[1] else None) + (None,) * 9


class CppBackend:
    """Fused C++ kernels on CPU tensors (fp16/bf16/fp32/fp64): ``torch.ops.yolo_kernels.tal_assign``
    (the assigner, memory O(bs * boxes * topk + points)) and the loss with its gradient written once
    (``detection_loss_with_grad`` in eager training, else ``detection_loss``, whose backward
    computes it)."""

    name = "cpp"

    def unavailable_reason(self, device: torch.device | None) -> str | None:
        return cpu_kernels_unavailable_reason(device)

    def checks_values(self, device: torch.device) -> bool:
        """``pad_targets`` checks the target values (ValueError, the messages of ``validate``) in the
        pass that lays them out, even with ``validate=False``: DetectionLoss skips its own."""
        return True

    def assign(self, problem: Problem, options: DetectionOptions):
        """The assignment step alone: ``(labels, gt_boxes, grids, strides, assigned, target)``, the
        padded targets and the ops' flat arguments with ``tal_assign``'s output (what ``loss``
        passes on to the loss op; ``benchmarks/anchor_free.py --parts`` times the two apart)."""
        require_extension()
        boxes, scores = problem.boxes, problem.scores
        grids = [n for grid in problem.grids for n in grid]
        strides = list(options.strides)
        image_h, image_w = reference.image_size(problem.grids, strides, scores.dtype, scores.device).tolist()
        labels, gt_boxes = torch.ops.yolo_kernels.pad_targets(
            problem.batch_idx, problem.cls, problem.bboxes, boxes.shape[0], options.nc, image_w, image_h
        )
        assigned, target = torch.ops.yolo_kernels.tal_assign(
            boxes.detach(), scores.detach(), labels, gt_boxes, grids, strides, options.topk, options.second_cut,
            options.alpha, options.beta, options.size_floor,
        )  # fmt: skip
        return labels, gt_boxes, grids, strides, assigned, target

    def loss(self, problem: Problem, options: DetectionOptions, class_weights, expected_grad=None) -> torch.Tensor:
        ops = torch.ops.yolo_kernels
        boxes, scores = problem.boxes, problem.scores
        labels, gt_boxes, grids, strides, assigned, target = self.assign(problem, options)
        wants_grad = torch.is_grad_enabled() and (boxes.requires_grad or scores.requires_grad)
        if wants_grad and expected_grad is not None and not torch.compiler.is_compiling():
            return _LossWithGradient.apply(
                boxes, scores, labels, gt_boxes, assigned, target, class_weights, grids, strides, options.gains(),
                float(expected_grad),
            )  # fmt: skip
        # traced, forward only, or no expectation: the op's registered autograd (gradient in backward)
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
