"""The Triton (GPU) backend: fused kernels in ``loss.py`` (element math in ``math.py``).

On CUDA tensors it is what ``backend="auto"`` picks. On CPU tensors it runs only under the Triton
interpreter (``TRITON_INTERPRET=1`` set before ``triton`` is imported), which is how the tests
check it on machines without a GPU. When the compiled extension is loaded, the kernels are also
registered as the CUDA implementation of ``torch.ops.yolo_kernels.fused_loss``.
"""

from __future__ import annotations

import os
import re

import torch

from ..config import LossOptions

#: The Triton releases the kernels are compiled and tested with (the compile gate), inclusive.
SUPPORTED_TRITON = ((3, 6), (3, 9))


def triton_version_problem(version: str) -> str | None:
    """Why a Triton version cannot be used, or ``None`` when it is in ``SUPPORTED_TRITON``."""
    (lo_major, lo_minor), (hi_major, hi_minor) = SUPPORTED_TRITON
    wanted = f"{lo_major}.{lo_minor} to {hi_major}.{hi_minor}"
    match = re.match(r"(\d+)\.(\d+)", version)
    if match is None:
        return f"triton {version!r} has an unreadable version; the triton backend supports triton {wanted}"
    if not SUPPORTED_TRITON[0] <= (int(match[1]), int(match[2])) <= SUPPORTED_TRITON[1]:
        return (
            f"triton {version} is installed; the triton backend supports triton {wanted} "
            f"(install one with `pip install 'triton>={lo_major}.{lo_minor},<{hi_major}.{hi_minor + 1}'`)"
        )
    return None


try:
    import triton
except ImportError as error:  # optional dependency
    triton = None
    IMPORT_ERROR: str | None = f"triton could not be imported ({error}); install it with `pip install triton`"
else:
    IMPORT_ERROR = triton_version_problem(getattr(triton, "__version__", "unknown"))

if IMPORT_ERROR is None:
    from . import loss as _loss
else:  # never import the kernels with an unsupported triton: the backend says why instead
    _loss = None

__all__ = ["TritonBackend", "IMPORT_ERROR", "SUPPORTED_TRITON", "interpreter_active", "triton_version_problem"]


def interpreter_active() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


class _TritonFusedLoss(torch.autograd.Function):
    """Autograd of the fused Triton loss: backward only scales the gradients computed in forward."""

    @staticmethod
    def forward(ctx, options: LossOptions, targets, anchors, *p):
        loss, items, grads = _loss.fused_loss(p, targets, anchors, options, True)
        ctx.save_for_backward(*grads)
        ctx.mark_non_differentiable(items)
        return loss, items

    @staticmethod
    def backward(ctx, grad_loss, grad_items):
        grads = ctx.saved_tensors
        if grad_loss is None:
            return (None, None, None) + (None,) * len(grads)
        # no `== 1` shortcut: reading grad_loss would synchronise with the device
        return (None, None, None, *[g * grad_loss.to(g.dtype) for g in grads])


class TritonBackend:
    """Fused Triton kernels on CUDA tensors (fp16/bf16/fp32 ``p``; fp64 computed in fp64)."""

    name = "triton"

    def unavailable_reason(self, device: torch.device | None) -> str | None:
        if _loss is None:
            return IMPORT_ERROR
        if device is None:  # "can it run anywhere here?"
            ok = torch.cuda.is_available() or interpreter_active()
            return None if ok else "no CUDA device (CPU tensors run only under TRITON_INTERPRET=1)"
        if device.type == "cuda" or (device.type == "cpu" and interpreter_active()):
            return None
        return f"the triton backend runs on CUDA tensors (CPU tensors only under TRITON_INTERPRET=1), got {device}"

    def loss(self, p, targets, anchors, options):
        compute_grad = torch.is_grad_enabled() and any(x.requires_grad for x in p)
        if compute_grad:
            return _TritonFusedLoss.apply(options, targets, anchors, *p)
        loss, items, _ = _loss.fused_loss(p, targets, anchors, options, False)
        return loss, items


def _register_cuda_kernel() -> None:
    """Make the kernels the CUDA implementation of the op whose schema the extension defines."""
    if _loss is None or not hasattr(torch.ops.yolo_kernels, "fused_loss"):
        return

    @torch.library.register_kernel("yolo_kernels::fused_loss", "cuda")
    def _fused_loss_cuda(
        p,
        targets,
        anchors,
        gr,
        giou,
        cls,
        cls_pw,
        obj,
        obj_pw,
        iou_t,
        fl_gamma,
        label_smoothing,
        box_loss,
        reduction,
        compute_grad,
    ):
        options = LossOptions(
            nc=p[0].shape[-1] - 5,
            gr=gr,
            giou=giou,
            cls=cls,
            cls_pw=cls_pw,
            obj=obj,
            obj_pw=obj_pw,
            iou_t=iou_t,
            fl_gamma=fl_gamma,
            label_smoothing=label_smoothing,
            box_loss=box_loss,
            reduction=reduction,
        )
        return _loss.fused_loss(p, targets, anchors, options, compute_grad)
