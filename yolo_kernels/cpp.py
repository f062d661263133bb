"""The C++ CPU backend (``"cpp"``): an adapter over ``torch.ops.yolo_kernels.fused_loss`` (whose
registration lives in ``library.py``), plus the extension's build information and its gradient
pool.

The gradient buffers come from the extension's pool (see ``pool_stats``): when autograd frees them
their memory goes back to the pool, so the next step reuses memory that is already paged in.
"""

from __future__ import annotations

import torch

from .autograd import FusedLoss
from .library import BUILD_HINT, cpu_kernels_unavailable_reason, fused_loss_op, require_extension

__all__ = [
    "BUILD_HINT",
    "CppBackend",
    "build_info",
    "pool_stats",
    "pool_clear",
    "pool_set_limit",
    "pool_set_enabled",
]


def build_info() -> dict:
    """Compiler, flags and parallel backend of the compiled extension."""
    return require_extension().build_info()


def pool_stats() -> dict:
    """The CPU gradient pool: ``enabled``, ``cached_bytes``, ``cached_buffers``, ``limit_bytes``, ``hits``,
    ``misses``."""
    return require_extension().pool_stats()


def pool_clear() -> None:
    """Free every buffer the gradient pool holds."""
    require_extension().pool_clear()


def pool_set_limit(nbytes: int) -> None:
    """The most bytes the pool keeps (default 4 GiB, or ``YOLO_KERNELS_GRAD_POOL_MB``)."""
    require_extension().pool_set_limit(int(nbytes))


def pool_set_enabled(enabled: bool) -> None:
    """Turn the pool off (fresh allocations every call) or on."""
    require_extension().pool_set_enabled(bool(enabled))


def _op_below_autograd(p, targets, anchors, options, compute_grad, balance, compute_stats):
    """The op straight to its CPU kernel: FusedLoss provides the autograd, not the registered layer."""
    with torch._C._AutoDispatchBelowAutograd():
        return fused_loss_op(p, targets, anchors, options, compute_grad, balance, compute_stats)


class CppBackend:
    """Fused C++ kernels on CPU tensors (fp16/bf16/fp32/fp64 ``p``)."""

    name = "cpp"
    #: The op checks the target and anchor values (ValueError, the messages of ``validate``) in the
    #: pass that converts the targets, even with ``validate=False``: ``run_backend`` skips its own.

    def checks_values(self, device: torch.device) -> bool:
        return True

    def unavailable_reason(self, device: torch.device | None) -> str | None:
        return cpu_kernels_unavailable_reason(device)

    def loss(self, p, targets, anchors, options, balance=None, stats=False, validate=True):
        """``validate`` changes nothing: the op always checks the values (``checks_values``)."""
        require_extension()
        compute_grad = torch.is_grad_enabled() and any(x.requires_grad for x in p)
        if compute_grad and not torch.compiler.is_compiling():
            return FusedLoss.apply(_op_below_autograd, options, balance, stats, targets, anchors, *p)
        # traced, or no gradient: the op's own autograd
        loss, items, layer_obj, grad_stats, _ = fused_loss_op(
            p, targets, anchors, options, compute_grad, balance, stats
        )
        return loss, items, layer_obj, grad_stats
