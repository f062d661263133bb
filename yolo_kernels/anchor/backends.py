"""The anchor-based families' backends, their registry, and the one call the public API makes.

A backend here has ``name``, ``unavailable_reason(device)``,
``checks_values(device) -> bool`` (whether it checks the target and anchor values itself on that
device; ``run_backend`` then skips its own pass) and
``loss(p, targets, anchors, options, balance=None, stats=False, validate=True) -> (loss,
loss_items, layer_obj, grad_stats)`` (``grad_stats``: the op's ``[nl + 1, 8]`` statistics, or None).

The public APIs (``yolov3.py``, ``yolov5.py``) call ``run_backend`` and nothing below it.
"""

from __future__ import annotations

import torch

from ..autograd import FusedLoss
from ..dispatch import Registry
from ..library import cpu_kernels_unavailable_reason, require_extension
from ..stats import LossStats
from . import reference
from .fused_op import fused_loss_op
from .options import LossOptions
from .validate import check_inputs

__all__ = [
    "AUTO_ORDER",
    "BACKENDS",
    "REGISTRY",
    "CppBackend",
    "ReferenceBackend",
    "available_backends",
    "check_backend_name",
    "resolve_backend",
    "run_backend",
]


class ReferenceBackend:
    """Plain PyTorch (``yolo_kernels.reference``): any device, any floating dtype."""

    name = "reference"

    def unavailable_reason(self, device: torch.device | None) -> str | None:
        return None

    def checks_values(self, device: torch.device) -> bool:
        return False  # run_backend's checks (validate) cover it

    def loss(self, p, targets, anchors, options, balance=None, stats=False, validate=True):
        loss, items, layer_obj = reference.loss(p, targets, anchors, options, balance, return_layer_obj=True)
        grad_stats = reference.gradient_stats(p, targets, anchors, options, balance) if stats else None
        return loss, items, layer_obj, grad_stats


def _op_below_autograd(p, targets, anchors, options, compute_grad, balance, compute_stats):
    """The op straight to its CPU kernel: FusedLoss provides the autograd, not the registered layer."""
    with torch._C._AutoDispatchBelowAutograd():
        return fused_loss_op(p, targets, anchors, options, compute_grad, balance, compute_stats)


class CppBackend:
    """Fused C++ kernels on CPU tensors (fp16/bf16/fp32/fp64 ``p``): ``torch.ops.yolo_kernels.fused_loss``."""

    name = "cpp"

    def checks_values(self, device: torch.device) -> bool:
        """The op checks the target and anchor values (ValueError, the messages of ``validate``) in
        the pass that converts the targets, even with ``validate=False``: ``run_backend`` skips its own."""
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


#: The registry of both anchor-based families (they share every backend; ``options.family`` picks).
#: The Triton backend registers itself (``triton/__init__.py``), for ``auto`` on CUDA tensors.
REGISTRY = Registry(
    family="anchor",
    backends={"reference": ReferenceBackend(), "cpp": CppBackend()},
    auto_order={"cpu": ("cpp",)},
)
BACKENDS = REGISTRY.backends
#: What ``backend="auto"`` tries, by device type, before falling back to the reference.
AUTO_ORDER = REGISTRY.auto_order
available_backends = REGISTRY.available
check_backend_name = REGISTRY.check_name
resolve_backend = REGISTRY.resolve


def first_device(p) -> torch.device:
    if isinstance(p, (list, tuple)) and p and isinstance(p[0], torch.Tensor):
        return p[0].device
    return torch.device("cpu")


def run_backend(
    p,
    targets,
    anchors,
    options: LossOptions,
    backend: str,
    validate: bool,
    balance=None,
    stats: bool = False,
    strides=None,
):
    """Check the inputs, pick the backend, run it: ``(loss, loss_items, layer_obj, LossStats or None)``.
    ``strides`` (per layer, optional): the grids of ``p`` must fit one image size at them."""
    if not isinstance(stats, bool):
        raise TypeError(f"stats: expected a bool, got {type(stats).__name__}")
    device = first_device(p)
    anchors = [a.to(device=device) for a in anchors]
    impl = resolve_backend(backend, device)
    # a backend that checks the target and anchor values itself on this device skips the Python pass
    own_checks = impl.checks_values(device)
    p = check_inputs(p, targets, anchors, options, validate and not own_checks, strides)
    loss, items, layer_obj, grad_stats = impl.loss(p, targets, anchors, options, balance, stats, validate=validate)
    if not stats:
        return loss, items, layer_obj, None
    return loss, items, layer_obj, LossStats(grad_stats, loss.detach())
