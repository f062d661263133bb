"""The op ``torch.ops.yolo_kernels.fused_loss`` from the anchor families' side: their options
passed one by one in the schema's order, and read back (its schema, fake and autograd live in
``library.py``; its CUDA kernel, the Triton launcher, registers itself in ``triton/__init__.py``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .options import LossOptions

__all__ = ["OP_SCALARS", "fused_loss_op", "options_from_op"]

#: The op's scalar arguments after ``balance``, in schema order: (name, how to read it from LossOptions).
OP_SCALARS: tuple[tuple[str, Callable[[LossOptions], Any]], ...] = (
    ("family", lambda o: o.family),
    ("gr", lambda o: o.objectness_gr),
    ("box", lambda o: o.box),
    ("cls", lambda o: o.cls),
    ("cls_pw", lambda o: o.cls_pw),
    ("obj", lambda o: o.obj),
    ("obj_pw", lambda o: o.obj_pw),
    ("iou_t", lambda o: o.iou_t),
    ("anchor_t", lambda o: o.anchor_t),
    ("fl_gamma", lambda o: o.fl_gamma),
    ("label_smoothing", lambda o: o.label_smoothing),
    ("box_loss", lambda o: o.box_loss),
    ("reduction", lambda o: o.reduction),
    ("sort_obj_iou", lambda o: o.sort_obj_iou),
)


def fused_loss_op(p, targets, anchors, options: LossOptions, compute_grad: bool, balance=None, compute_stats=False):
    """``torch.ops.yolo_kernels.fused_loss`` with the options of ``options`` (the op's schema
    takes them one by one, in ``OP_SCALARS`` order)."""
    scalars = [read(options) for _, read in OP_SCALARS]
    op = torch.ops.yolo_kernels.fused_loss
    return op(list(p), targets, list(anchors), balance, *scalars, compute_stats, compute_grad)


def options_from_op(p, *scalars) -> LossOptions:
    """The ``LossOptions`` of an op call: the inverse of ``fused_loss_op``'s unpacking."""
    return LossOptions(nc=p[0].shape[-1] - 5, **dict(zip((name for name, _ in OP_SCALARS), scalars)))


def _register_triton_cuda_kernel() -> None:
    """The Triton launcher as the CUDA kernel of ``fused_loss`` (when Triton is usable)."""
    from . import triton as triton_backend

    if triton_backend.launcher is None:
        return
    launcher = triton_backend.launcher

    @torch.library.register_kernel("yolo_kernels::fused_loss", "cuda")
    def _fused_loss_cuda(p, targets, anchors, balance, *scalars_and_flags):
        *scalars, compute_stats, compute_grad = scalars_and_flags
        # the op checks the values, as the CPU op does (here with one device-side assertion)
        options = options_from_op(p, *scalars)
        return launcher(p, targets, anchors, options, compute_grad, balance, compute_stats, check_values=True)
