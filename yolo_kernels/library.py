"""The ``torch.ops.yolo_kernels`` ops on the Python side, in one place.

* The schemas of ``match``, ``box_iou``, ``bce_with_logits`` and ``fused_loss`` are defined here
  (``torch.library``), so the ops exist in every installation, with or without the C++ extension.
* The compiled extension ``yolo_kernels._C`` registers their CPU kernels (``csrc/cpu/*.cpp``,
  ``TORCH_LIBRARY_IMPL``) when it loads. Without it (not built, or built against another torch)
  ``LOAD_ERROR`` says why, and the ops have no CPU kernel.
* Their fake implementations (shapes for ``torch.compile``) and autograd: ``fused_loss``'s is the
  rule of ``autograd.py`` (the gradient is computed in the forward pass, backward scales it by
  ``grad_output``; ``loss_items`` is a result, detached, as the original's). The Triton launcher
  registers itself as the CUDA kernel of ``fused_loss`` (``triton/__init__.py``); the anchor
  families pass their options to it one by one (``anchor/fused_op.py``).
"""

from __future__ import annotations

from typing import Any

import torch

from .autograd import scale_gradients
from .config import BackendUnavailableError, compute_dtype

__all__ = [
    "BUILD_HINT",
    "LOAD_ERROR",
    "SCHEMAS",
    "require_extension",
]

BUILD_HINT = (
    "to build it, install the torch you use first, then from the source tree "
    "`pip install -v --no-build-isolation .` (needs a C++17 compiler; -v shows the build, or why it "
    "was skipped; an extension built against another torch version must be rebuilt the same way)"
)


#: The ops' schemas, in one place (the kernels follow them argument by argument).
SCHEMAS = {
    # Target matching of one layer: pairs (in the family's pair order) of targets [nt, 6] with
    # anchors [na, 2] (grid units) on an ny x nx grid; threshold is iou_t (yolov3) or anchor_t
    # (yolov5). Returns indices [P, 4] (b, a, gj, gi; long), tbox [P, 4], anch [P, 2], tcls [P] (long).
    "match": 'match(Tensor targets, Tensor anchors, int ny, int nx, float threshold, str family="yolov3") -> '
    "(Tensor, Tensor, Tensor, Tensor)",
    # The IoU family of the boxes the family predicts from rows of logits ps [P, >= 4] with anchors
    # anch against tbox [P, 4]: iou [P] and d iou / d ps[:, :4] [P, 4].
    "box_iou": 'box_iou(Tensor ps, Tensor tbox, Tensor anch, str box_loss, str family="yolov3") -> (Tensor, Tensor)',
    # Element-wise BCE with logits (pos_weight, focal gamma; gamma 0 = plain): loss and d loss / d x.
    "bce_with_logits": "bce_with_logits(Tensor x, Tensor y, float pos_weight, float gamma) -> (Tensor, Tensor)",
    # The whole loss of a family over all layers in one pass: loss [1], loss_items [4] = (lbox,
    # lobj, lcls, their sum), layer_obj [nl] (each layer's mean objectness BCE, unweighted), with
    # compute_stats the gradient statistics stats [nl + 1, 8] (row i < nl, layer i: sums of squares
    # of d loss / d p over the box, objectness and class channels, their largest magnitudes, matched
    # pairs, pairs sharing a cell with a later pair; row nl: the number of targets no layer matched,
    # then zeros; without compute_stats [0, 8]) and, when compute_grad, d loss / d p[i] for every
    # layer (laid out with p[i]'s strides when dense). balance [nl] (or None: ones) weighs each
    # layer's objectness term; gr is the IoU ratio mixed into the objectness target; box, cls and obj
    # the gains of the three terms; iou_t the yolov3 matching threshold and anchor_t the yolov5 one
    # (each family reads its own); the yolov5 loss is the sum times the batch size. Only loss is
    # differentiable: its backward scales the gradients.
    "fused_loss": "fused_loss(Tensor[] p, Tensor targets, Tensor[] anchors, Tensor? balance, str family, "
    "float gr, float box, float cls, float cls_pw, float obj, float obj_pw, float iou_t, float anchor_t, "
    "float fl_gamma, "
    "float label_smoothing, str box_loss, str reduction, bool sort_obj_iou, bool compute_stats, "
    "bool compute_grad) -> (Tensor, Tensor, Tensor, Tensor, Tensor[])",
    # The anchor-free family (yolo_kernels.yolov8; docs/anchor_free.md). Predictions boxes
    # [bs, 4 * reg_max, A] and scores [bs, nc, A] over the points of the levels (grids: ny, nx of
    # each level, flat; strides in pixels); targets per image gt_labels [bs, m] (int64) and
    # gt_boxes [bs, m, 4] (float32 pixel xyxy, all-zero rows padding).
    # An ultralytics batch's targets (batch_idx [n], cls [n], normalised xywh bboxes [n, 4]) per image
    # for the ops below: gt_labels [bs, m] and gt_boxes [bs, m, 4], scaled by the image size (pixels),
    # m the most boxes of one image, each image's boxes in input order (reference.pad_targets). The
    # values are checked as anchor_free/validate.py checks them (ids in [0, bs) and [0, nc), ...).
    "pad_targets": "pad_targets(Tensor batch_idx, Tensor cls, Tensor bboxes, int bs, int nc, float image_w, "
    "float image_h) -> (Tensor, Tensor)",
    # The task-aligned assigner: per point the box it is assigned to (int32, -1: none) and its
    # target score (float32, float64 for float64 predictions); topk2 None: no second cut; boxes'
    # sides below size_floor (pixels) are raised to it when searching their points.
    "tal_assign": "tal_assign(Tensor boxes, Tensor scores, Tensor gt_labels, Tensor gt_boxes, int[] grids, "
    "float[] strides, int topk, int? topk2, float alpha, float beta, float size_floor) -> (Tensor, Tensor)",
    # The loss of an assignment: [box, cls, dfl] with the gains applied (float32 for half inputs);
    # differentiable in boxes and scores (its backward is detection_loss_backward).
    "detection_loss": "detection_loss(Tensor boxes, Tensor scores, Tensor gt_labels, Tensor gt_boxes, "
    "Tensor assigned, Tensor target_scores, Tensor? class_weights, int[] grids, float[] strides, float box, "
    "float cls, float dfl) -> Tensor",
    # The same loss and, in the same passes, the gradients d (grad . loss) / d boxes and d / d scores
    # for the components' gradient grad (3 values) that the caller expects backward to bring (the
    # eager autograd of the cpp backend; not differentiable itself).
    "detection_loss_with_grad": "detection_loss_with_grad(Tensor boxes, Tensor scores, Tensor gt_labels, "
    "Tensor gt_boxes, Tensor assigned, Tensor target_scores, Tensor? class_weights, int[] grids, float[] strides, "
    "float box, float cls, float dfl, float[] grad) -> (Tensor, Tensor, Tensor)",
    # d loss / d boxes and d loss / d scores for the components' gradient grad [3], written once.
    "detection_loss_backward": "detection_loss_backward(Tensor grad, Tensor boxes, Tensor scores, "
    "Tensor gt_labels, Tensor gt_boxes, Tensor assigned, Tensor target_scores, Tensor? class_weights, "
    "int[] grids, float[] strides, float box, float cls, float dfl) -> (Tensor, Tensor)",
}

# Kept for the life of the process: the ops exist as long as this object does.
_LIBRARY = torch.library.Library("yolo_kernels", "DEF")
for _schema in SCHEMAS.values():
    _LIBRARY.define(_schema)


def _load_extension() -> tuple[Any, str | None]:
    """``(module, None)``, or ``(None, why it is missing)`` in words a pip user can act on."""
    import importlib
    import importlib.util

    if importlib.util.find_spec(f"{__package__}._C") is None:
        # no compiled file at all: importing it would only report a "partially initialized module"
        return None, (
            "yolo_kernels was installed without its C++ extension (an isolated `pip install` build, "
            "YOLO_KERNELS_NO_EXT=1, or no C++ compiler at install time)"
        )
    try:
        return importlib.import_module(f"{__package__}._C"), None
    except (ImportError, OSError) as error:  # e.g. built against another torch: an undefined symbol
        return None, f"the C++ extension yolo_kernels._C is installed but failed to load ({error})"


# the package works without the extension; backend="cpp" and `python -m yolo_kernels.info` say why
_C, LOAD_ERROR = _load_extension()


def require_extension() -> Any:
    """The compiled extension, or a ``BackendUnavailableError`` saying why it is missing and how to build it."""
    if _C is None:
        raise BackendUnavailableError(f"{LOAD_ERROR}; {BUILD_HINT}")
    return _C


def cpu_kernels_unavailable_reason(device: torch.device | None) -> str | None:
    """Why the ops' CPU kernels cannot run on ``device`` (no extension, or not a CPU device), or None:
    the availability of every family's ``cpp`` backend."""
    if LOAD_ERROR is not None:
        return f"{LOAD_ERROR}; {BUILD_HINT}"
    if device is not None and device.type != "cpu":
        return f"the cpp backend runs on CPU tensors, got {device}"
    return None


# The fakes and the autograd exist with or without the extension, as the schemas do.


@torch.library.register_fake("yolo_kernels::match")
def _match_fake(targets, anchors, ny, nx, threshold, family="yolov3"):
    n_pairs = torch.library.get_ctx().new_dynamic_size()
    dtype = compute_dtype(targets.dtype)
    return (
        targets.new_empty(n_pairs, 4, dtype=torch.long),
        targets.new_empty(n_pairs, 4, dtype=dtype),
        targets.new_empty(n_pairs, 2, dtype=dtype),
        targets.new_empty(n_pairs, dtype=torch.long),
    )


@torch.library.register_fake("yolo_kernels::box_iou")
def _box_iou_fake(ps, tbox, anch, box_loss, family="yolov3"):
    dtype = compute_dtype(ps.dtype)
    return ps.new_empty(ps.shape[0], dtype=dtype), ps.new_empty(ps.shape[0], 4, dtype=dtype)


@torch.library.register_fake("yolo_kernels::bce_with_logits")
def _bce_fake(x, y, pos_weight, gamma):
    dtype = compute_dtype(x.dtype)
    return x.new_empty(x.shape, dtype=dtype), x.new_empty(x.shape, dtype=dtype)


@torch.library.register_fake("yolo_kernels::fused_loss")
def _fused_loss_fake(p, targets, anchors, balance, *scalars_and_flags):
    compute_stats, compute_grad = scalars_and_flags[-2:]
    dtype = compute_dtype(p[0].dtype)
    grads = [torch.empty_like(x) if compute_grad else x.new_empty(0) for x in p]
    new = p[0].new_empty
    stats = new(len(p) + 1 if compute_stats else 0, 8, dtype=dtype)
    return new(1, dtype=dtype), new(4, dtype=dtype), new(len(p), dtype=dtype), stats, grads


def _fused_loss_setup(ctx, inputs, output):
    ctx.set_materialize_grads(False)  # the other outputs get none: no p-sized zeros in backward
    ctx.save_for_backward(*output[4])
    ctx.compute_grad = inputs[-1]
    ctx.n_layers = len(inputs[0])
    ctx.n_inputs = len(inputs)


def _fused_loss_backward(ctx, grad_loss, grad_items, grad_layer_obj, grad_stats, grad_grads):
    # Only `loss` is differentiable; the items, statistics and gradients are results, not functions of p.
    no_grad = ([None] * ctx.n_layers, None, [None] * ctx.n_layers) + (None,) * (ctx.n_inputs - 3)
    if grad_loss is None:
        return no_grad
    if not ctx.compute_grad:
        raise RuntimeError("yolo_kernels::fused_loss: called with compute_grad=False, so it has no gradient")
    return (scale_gradients(ctx.saved_tensors, grad_loss),) + no_grad[1:]


torch.library.register_autograd("yolo_kernels::fused_loss", _fused_loss_backward, setup_context=_fused_loss_setup)


@torch.library.register_fake("yolo_kernels::pad_targets")
def _pad_targets_fake(batch_idx, cls, bboxes, bs, nc, image_w, image_h):
    m = torch.library.get_ctx().new_dynamic_size()  # the most boxes of one image: data-dependent
    return batch_idx.new_empty(bs, m, dtype=torch.int64), batch_idx.new_empty(bs, m, 4, dtype=torch.float32)


@torch.library.register_fake("yolo_kernels::tal_assign")
def _tal_assign_fake(boxes, scores, gt_labels, gt_boxes, grids, strides, topk, topk2, alpha, beta, size_floor):
    bs, a = boxes.shape[0], boxes.shape[2]
    return boxes.new_empty(bs, a, dtype=torch.int32), boxes.new_empty(bs, a, dtype=compute_dtype(boxes.dtype))


@torch.library.register_fake("yolo_kernels::detection_loss")
def _detection_loss_fake(boxes, scores, *rest):
    return boxes.new_empty(3, dtype=compute_dtype(boxes.dtype))


@torch.library.register_fake("yolo_kernels::detection_loss_with_grad")
def _detection_loss_with_grad_fake(boxes, scores, *rest):
    return boxes.new_empty(3, dtype=compute_dtype(boxes.dtype)), torch.empty_like(boxes), torch.empty_like(scores)


@torch.library.register_fake("yolo_kernels::detection_loss_backward")
def _detection_loss_backward_fake(grad, boxes, scores, *rest):
    return torch.empty_like(boxes), torch.empty_like(scores)


def _detection_loss_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:6], inputs[6])
    ctx.scalars = inputs[7:]


def _detection_loss_backward(ctx, grad):
    # the assignment and the targets are constants of the gradient (the original computes them without one)
    boxes, scores, gt_labels, gt_boxes, assigned, target_scores, class_weights = ctx.saved_tensors
    grad_boxes, grad_scores = torch.ops.yolo_kernels.detection_loss_backward(
        grad, boxes, scores, gt_labels, gt_boxes, assigned, target_scores, class_weights, *ctx.scalars
    )
    return (grad_boxes, grad_scores) + (None,) * 10


torch.library.register_autograd(
    "yolo_kernels::detection_loss", _detection_loss_backward, setup_context=_detection_loss_setup
)


def _no_double_backward(ctx, grad_boxes, grad_scores):
    raise RuntimeError(
        "yolo_kernels::detection_loss: a second derivative (backward with create_graph=True through the "
        "loss) is not supported; the loss's gradient is computed by its own kernel"
    )


torch.library.register_autograd(
    "yolo_kernels::detection_loss_backward", _no_double_backward, setup_context=lambda ctx, inputs, output: None
)
