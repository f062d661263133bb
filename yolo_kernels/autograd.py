"""The autograd rule of the anchor families' fused op: gradient in forward, scaled in backward.

The op (``torch.ops.yolo_kernels.fused_loss``) computes the gradient of the loss with respect to
``p`` in its forward pass (``compute_grad``), so backward only scales it by ``grad_output``
(``scale_gradients``): its registered autograd (``library.py``) applies the rule where the op is
traced, and ``FusedLoss`` applies it in the cpp backend's eager calls (on the CPU the usual
``grad_output`` of 1 is read for free, so the gradient is handed over as it is). The Triton
backend's eager calls write the gradient in backward instead (``triton._AnchorLoss``): reading
``grad_output`` on a GPU would synchronise, and there the kernels read it themselves.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["FusedLoss", "scale_gradients"]


def _readable_one(t: torch.Tensor) -> bool:
    """Whether ``t`` is a real CPU tensor holding exactly 1. Only read where reading is free: not on a
    device (that would synchronise), not while tracing (that would guard on data)."""
    eager_cpu = (
        type(t) is torch.Tensor
        and t.device.type == "cpu"
        and not torch._is_functional_tensor(t)
        and not torch.compiler.is_compiling()
    )
    return eager_cpu and t.numel() == 1 and t.item() == 1.0


def scale_gradients(grads, grad_output: torch.Tensor | None) -> list[torch.Tensor | None]:
    """The backward of every fused backend: d loss / d p[i] (computed in forward) times
    ``grad_output``. For the usual ``loss.backward()`` on the CPU (``grad_output`` is 1) the saved
    gradients are returned as they are: no p-sized multiply, and no copy, since autograd releases
    the saved tensors before a leaf takes its ``.grad``."""
    if grad_output is None:
        return [None] * len(grads)
    if _readable_one(grad_output):
        return list(grads)
    same = all(g.dtype == grad_output.dtype and g.device == grad_output.device for g in grads)
    if same and grad_output.numel() == 1 and _FOREACH_MUL_TENSOR:  # one launch for all layers
        return list(torch._foreach_mul(list(grads), grad_output.reshape(())))
    return [g * grad_output.to(g.dtype) for g in grads]


#: ``torch._foreach_mul(tensors, scalar_tensor)`` (not in every torch the package supports).
_FOREACH_MUL_TENSOR = hasattr(torch.ops.aten._foreach_mul, "Tensor")


class FusedLoss(torch.autograd.Function):
    """Eager autograd around a fused implementation ``impl(p, targets, anchors, options,
    compute_grad, balance, compute_stats) -> (loss, loss_items, layer_obj, stats, grads)``: forward
    runs it with the gradient, backward applies ``scale_gradients``. (The registered autograd of
    the op has the same contract and serves tracing; this one costs a fraction of its Python
    overhead per eager call.)"""

    @staticmethod
    def forward(ctx, impl: Callable, options, balance, compute_stats: bool, targets, anchors, *p):
        loss, items, layer_obj, stats, grads = impl(p, targets, anchors, options, True, balance, compute_stats)
        ctx.set_materialize_grads(False)  # no zeros made for the outputs that get no gradient
        ctx.save_for_backward(*grads)
        ctx.mark_non_differentiable(items, layer_obj, stats)
        return loss, items, layer_obj, stats

    @staticmethod
    def backward(ctx, grad_loss, grad_items, grad_layer_obj, grad_stats):
        return (None,) * 6 + tuple(scale_gradients(ctx.saved_tensors, grad_loss))
