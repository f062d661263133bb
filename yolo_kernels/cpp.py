"""The C++ CPU backend: loads ``yolo_kernels._C`` (which registers the ``torch.ops.yolo_kernels``
ops of ``csrc/``), registers their fake implementations and the autograd of ``fused_loss``, and
wraps them as the ``"cpp"`` backend.

Autograd: ``fused_loss`` computes the gradient of the loss in its forward pass; backward only
scales it by ``grad_output`` (and skips the multiply when that is 1); ``loss_items`` is a result
(detached, as the original's). The gradient buffers
come from the extension's pool (see ``pool_stats``): when autograd frees them their memory goes
back to the pool, so the next step reuses memory that is already paged in.
"""

from __future__ import annotations

from typing import Any

import torch

from .config import BackendUnavailableError, LossOptions

__all__ = [
    "LOAD_ERROR",
    "BUILD_HINT",
    "CppBackend",
    "build_info",
    "pool_stats",
    "pool_clear",
    "pool_set_limit",
    "pool_set_enabled",
]

BUILD_HINT = (
    "build the C++ extension against the installed torch from the source tree with "
    "`pip install --no-build-isolation -e .` (or `make install`; needs a C++17 compiler and ninja; "
    "an extension built against another torch version fails to import and must be rebuilt)"
)

try:
    from . import _C

    LOAD_ERROR: str | None = None
except (ImportError, OSError) as error:  # e.g. not built, or built against another torch: the package
    # works without it, and backend="cpp" / `python -m yolo_kernels.info` say how to build it
    _C = None
    LOAD_ERROR = f"yolo_kernels._C could not be imported ({error})"


def _require_extension() -> Any:
    if _C is None:
        raise BackendUnavailableError(f"{LOAD_ERROR}; {BUILD_HINT}")
    return _C


def build_info() -> dict:
    """Compiler, flags and parallel backend of the compiled extension."""
    return _require_extension().build_info()


def pool_stats() -> dict:
    """The CPU gradient pool: ``enabled``, ``cached_bytes``, ``cached_buffers``, ``limit_bytes``, ``hits``,
    ``misses``."""
    return _require_extension().pool_stats()


def pool_clear() -> None:
    """Free every buffer the gradient pool holds."""
    _require_extension().pool_clear()


def pool_set_limit(nbytes: int) -> None:
    """The most bytes the pool keeps (default 4 GiB, or ``YOLO_KERNELS_GRAD_POOL_MB``)."""
    _require_extension().pool_set_limit(int(nbytes))


def pool_set_enabled(enabled: bool) -> None:
    """Turn the pool off (fresh allocations every call) or on."""
    _require_extension().pool_set_enabled(bool(enabled))


def _is_eager(t: torch.Tensor) -> bool:
    """A real CPU tensor outside tracing, whose value may be read (reading it while tracing would guard on data)."""
    return (
        type(t) is torch.Tensor
        and t.device.type == "cpu"
        and not torch._is_functional_tensor(t)
        and not torch.compiler.is_compiling()
    )


def _opmath(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


if _C is not None:

    @torch.library.register_fake("yolo_kernels::match")
    def _match_fake(targets, anchors, ny, nx, iou_t):
        n_pairs = torch.library.get_ctx().new_dynamic_size()
        dtype = _opmath(targets.dtype)
        return (
            targets.new_empty(n_pairs, 4, dtype=torch.long),
            targets.new_empty(n_pairs, 4, dtype=dtype),
            targets.new_empty(n_pairs, 2, dtype=dtype),
            targets.new_empty(n_pairs, dtype=torch.long),
        )

    @torch.library.register_fake("yolo_kernels::box_iou")
    def _box_iou_fake(ps, tbox, anch, box_loss):
        dtype = _opmath(ps.dtype)
        return ps.new_empty(ps.shape[0], dtype=dtype), ps.new_empty(ps.shape[0], 4, dtype=dtype)

    @torch.library.register_fake("yolo_kernels::bce_with_logits")
    def _bce_fake(x, y, pos_weight, gamma):
        dtype = _opmath(x.dtype)
        return x.new_empty(x.shape, dtype=dtype), x.new_empty(x.shape, dtype=dtype)

    @torch.library.register_fake("yolo_kernels::fused_loss")
    def _fused_loss_fake(p, targets, anchors, *options_and_flag):
        compute_grad = options_and_flag[-1]
        dtype = _opmath(p[0].dtype)
        grads = [torch.empty_like(x) if compute_grad else x.new_empty(0) for x in p]
        return p[0].new_empty(1, dtype=dtype), p[0].new_empty(4, dtype=dtype), grads

    def _fused_loss_setup(ctx, inputs, output):
        ctx.set_materialize_grads(False)  # the other outputs get none: no p-sized zeros in backward
        ctx.save_for_backward(*output[2])
        ctx.compute_grad = inputs[-1]
        ctx.n_layers = len(inputs[0])

    def _fused_loss_backward(ctx, grad_loss, grad_items, grad_grads):
        # Only `loss` is differentiable; loss_items and the gradients are results, not functions of p.
        no_grad = ([None] * ctx.n_layers, None, [None] * ctx.n_layers) + (None,) * 12
        if grad_loss is None:
            return no_grad
        if not ctx.compute_grad:
            raise RuntimeError("yolo_kernels::fused_loss: called with compute_grad=False, so it has no gradient")
        grads = ctx.saved_tensors
        if _is_eager(grad_loss) and grad_loss.item() == 1.0:
            grad_p = list(grads)  # saved tensors are released before AccumulateGrad runs: no copy
        else:
            grad_p = [g * grad_loss.to(g.dtype) for g in grads]
        return (grad_p,) + no_grad[1:]

    torch.library.register_autograd("yolo_kernels::fused_loss", _fused_loss_backward, setup_context=_fused_loss_setup)


def fused_loss(p, targets, anchors, options: LossOptions, compute_grad: bool):
    """``torch.ops.yolo_kernels.fused_loss`` with the scalar options of ``options``."""
    o = options
    return torch.ops.yolo_kernels.fused_loss(
        list(p),
        targets,
        list(anchors),
        o.gr,
        o.giou,
        o.cls,
        o.cls_pw,
        o.obj,
        o.obj_pw,
        o.iou_t,
        o.fl_gamma,
        o.label_smoothing,
        o.box_loss,
        o.reduction,
        compute_grad,
    )


class _FusedLoss(torch.autograd.Function):
    """Eager autograd around the op: the same contract as the op's registered autograd (backward
    only scales the saved gradients), with a fraction of its Python overhead per call."""

    @staticmethod
    def forward(ctx, options: LossOptions, targets, anchors, *p):
        with torch._C._AutoDispatchBelowAutograd():  # straight to the kernel: no Python autograd layer
            loss, items, grads = fused_loss(p, targets, anchors, options, True)
        ctx.save_for_backward(*grads)  # released before AccumulateGrad runs: leaf p steals them, no copy
        ctx.mark_non_differentiable(items)
        return loss, items

    @staticmethod
    def backward(ctx, grad_loss, grad_items):
        grads = ctx.saved_tensors
        if grad_loss is not None and grad_loss.item() == 1.0:
            grad_p = grads
        else:
            grad_p = [None] * len(grads) if grad_loss is None else [g * grad_loss.to(g.dtype) for g in grads]
        return (None, None, None, *grad_p)


class CppBackend:
    """Fused C++ kernels on CPU tensors (fp16/bf16/fp32/fp64 ``p``)."""

    name = "cpp"

    def unavailable_reason(self, device: torch.device | None) -> str | None:
        if _C is None:
            return f"{LOAD_ERROR}; {BUILD_HINT}"
        if device is not None and device.type != "cpu":
            return f"the cpp backend runs on CPU tensors, got {device}"
        return None

    def loss(self, p, targets, anchors, options):
        _require_extension()
        compute_grad = torch.is_grad_enabled() and any(x.requires_grad for x in p)
        if compute_grad and not torch.compiler.is_compiling():
            return _FusedLoss.apply(options, targets, anchors, *p)
        loss, items, _ = fused_loss(p, targets, anchors, options, compute_grad)  # traced: the op's own autograd
        return loss, items
