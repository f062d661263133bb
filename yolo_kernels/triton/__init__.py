"""The Triton (GPU) backend (``"triton"``) of both loss families: an adapter over the launcher
``anchor_loss.fused_loss`` (the anchor families' kernels in ``anchor_loss.py``), which
``library.py`` also registers as the CUDA kernel of ``torch.ops.yolo_kernels.fused_loss``, and one
over ``anchor_free_loss.assign`` / ``detection_loss`` / ``loss_backward`` (the anchor-free
family's kernels in ``anchor_free_loss.py``). Element math in ``math.py``, the launch helper and
its recorder in ``launch.py``.

On CUDA tensors it is what ``backend="auto"`` picks. On CPU tensors it runs only under the Triton
interpreter (``TRITON_INTERPRET=1`` set before ``triton`` is imported), which is how the tests
check it on machines without a GPU.
"""

from __future__ import annotations

import os
import re

import torch

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
    IMPORT_ERROR: str | None = (
        f"triton could not be imported ({error}); on Linux with a CUDA GPU install it with "
        "`pip install 'triton>=3.6,<3.10'`"
    )
else:
    IMPORT_ERROR = triton_version_problem(getattr(triton, "__version__", "unknown"))

if IMPORT_ERROR is None:
    from . import anchor_free_loss as _anchor_free
    from . import anchor_loss as _loss

    #: ``fused_loss(p, targets, anchors, options, compute_grad, balance=None, compute_stats=False)``, or
    #: None without a usable Triton.
    launcher = _loss.fused_loss
else:  # never import the kernels with an unsupported triton: the backend says why instead
    _loss = None
    _anchor_free = None
    launcher = None

__all__ = [
    "AnchorFreeTritonBackend",
    "TritonBackend",
    "IMPORT_ERROR",
    "SUPPORTED_TRITON",
    "interpreter_active",
    "launcher",
    "triton_version_problem",
]


def interpreter_active() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _unavailable_reason(device: torch.device | None) -> str | None:
    # the device first: where there is no GPU, installing triton would not help
    if device is None:  # "can it run anywhere here?"
        if not (torch.cuda.is_available() or interpreter_active()):
            return "no CUDA device (the triton backend runs on CUDA GPUs)"
    elif not (device.type == "cuda" or (device.type == "cpu" and interpreter_active())):
        return f"the triton backend runs on CUDA tensors (CPU tensors only under TRITON_INTERPRET=1), got {device}"
    return IMPORT_ERROR if _loss is None else None


class TritonBackend:
    """The anchor families' fused Triton kernels on CUDA tensors (fp16/bf16/fp32 ``p``; fp64
    computed in fp64)."""

    name = "triton"

    def unavailable_reason(self, device: torch.device | None) -> str | None:
        return _unavailable_reason(device)

    def checks_values(self, device: torch.device) -> bool:
        """On CUDA the kernels check the target and anchor values (one device-side assertion, no
        host sync), so ``run_backend`` skips its own checks there; on CPU (the interpreter) the
        Python checks run, which name the first bad row."""
        return device.type == "cuda"

    def loss(self, p, targets, anchors, options, balance=None, stats=False, validate=False):
        """``validate``: assert the values on the device (``checks_values``)."""
        if torch.is_grad_enabled() and any(x.requires_grad for x in p):
            return _AnchorLoss.apply(options, balance, stats, validate, targets, anchors, *p)
        loss, items, layer_obj, grad_stats, _ = _loss.loss_forward(
            p, targets, anchors, options, balance, stats, check_values=validate
        )
        return loss, items, layer_obj, grad_stats


class _AnchorLoss(torch.autograd.Function):
    """Eager autograd of the anchor families' Triton loss: forward computes the loss, its items and
    statistics and writes no gradient; backward writes each layer's gradient once, already scaled
    by the loss's gradient as the kernels read it on the device (no sync, no second pass over the
    gradient: the trainer's ``loss.backward()``, a GradScaler's scale and ``loss * 0.5`` cost the
    same)."""

    @staticmethod
    def forward(ctx, options, balance, compute_stats, check_values, targets, anchors, *p):
        loss, items, layer_obj, stats, saved = _loss.loss_forward(
            p, targets, anchors, options, balance, compute_stats, check_values
        )
        ctx.saved = saved
        ctx.save_for_backward(*p)
        ctx.set_materialize_grads(False)  # no zeros made for the outputs that get no gradient
        ctx.mark_non_differentiable(items, layer_obj, stats)
        return loss, items, layer_obj, stats

    @staticmethod
    def backward(ctx, grad_loss, grad_items, grad_layer_obj, grad_stats):
        p = ctx.saved_tensors
        if grad_loss is None:
            return (None,) * (6 + len(p))
        grads = _loss.loss_backward(ctx.saved, p, grad_loss)
        return (None,) * 6 + tuple(g if wanted else None for g, wanted in zip(grads, ctx.needs_input_grad[6:]))


class _AnchorFreeLoss(torch.autograd.Function):
    """Autograd of the anchor-free Triton loss: forward computes the components only (no gradient
    written); backward writes each gradient once, scaled by the components' gradient as the kernels
    read it on the device (no sync, any gradient: the trainer's ``loss.sum()``, a GradScaler's
    scale, E2ELoss's branch weights)."""

    @staticmethod
    def forward(ctx, boxes, scores, grids, assigned, options, class_weights):
        ctx.save_for_backward(boxes, scores)
        ctx.constants = grids, assigned, options, class_weights
        ctx.set_materialize_grads(False)
        return _anchor_free.detection_loss(boxes, scores, grids, assigned, options, class_weights)

    @staticmethod
    def backward(ctx, grad):
        if grad is None:
            return (None,) * 6
        boxes, scores = ctx.saved_tensors
        grids, assigned, options, class_weights = ctx.constants
        need_boxes, need_scores = ctx.needs_input_grad[:2]
        grad_boxes, grad_scores = _anchor_free.loss_backward(
            grad, boxes, scores, grids, assigned, options, class_weights, need_boxes, need_scores
        )
        return grad_boxes, grad_scores, None, None, None, None


class AnchorFreeTritonBackend:
    """The anchor-free family's Triton kernels on CUDA tensors (fp16/bf16/fp32 math in float32,
    fp64 in fp64): the assigner (memory O(targets * topk + bs * points), no host sync) and the loss,
    whose gradient backward writes once."""

    name = "triton"

    def unavailable_reason(self, device: torch.device | None) -> str | None:
        return _unavailable_reason(device)

    def checks_values(self, device: torch.device) -> bool:
        return False  # DetectionLoss's device-side asserts (validate) cover it

    def loss(self, problem, options, class_weights, expected_grad=None) -> torch.Tensor:
        """``expected_grad`` is not needed: backward reads the components' gradient on the device."""
        boxes, scores = problem.boxes, problem.scores
        assigned = _anchor_free.assign(
            boxes.detach(), scores.detach(), problem.grids, problem.batch_idx, problem.cls, problem.bboxes, options
        )
        if torch.is_grad_enabled() and (boxes.requires_grad or scores.requires_grad):
            return _AnchorFreeLoss.apply(boxes, scores, problem.grids, assigned, options, class_weights)
        return _anchor_free.detection_loss(boxes, scores, problem.grids, assigned, options, class_weights)


def _register() -> None:
    """The backends in the families' registries (``auto`` picks them on CUDA tensors) and, with a
    usable Triton, the anchor launcher as the CUDA kernel of ``torch.ops.yolo_kernels.fused_loss``."""
    from ..anchor.backends import REGISTRY
    from ..anchor.fused_op import options_from_op
    from ..anchor_free.backends import REGISTRY as ANCHOR_FREE_REGISTRY

    REGISTRY.register(TritonBackend(), auto_on=("cuda",))
    ANCHOR_FREE_REGISTRY.register(AnchorFreeTritonBackend(), auto_on=("cuda",))
    if launcher is None:
        return

    @torch.library.register_kernel("yolo_kernels::fused_loss", "cuda")
    def _fused_loss_cuda(p, targets, anchors, balance, *scalars_and_flags):
        *scalars, compute_stats, compute_grad = scalars_and_flags
        # the op checks the values, as the CPU op does (here with one device-side assertion)
        options = options_from_op(p, *scalars)
        return launcher(p, targets, anchors, options, compute_grad, balance, compute_stats, check_values=True)


_register()
