"""The fused YOLO losses in Triton: every shape is known from the input shapes (no host sync).

Both families (``FAMILY``: the archive YOLOv3 loss, the YOLOv5-style one) share the kernels; they
differ in ``math.match``, ``math.predicted_box``, ``math.box_iou``'s constants, the objectness
weights and the batch-size factor. The cells of all layers are numbered end to end (global cell
index = the layer's offset + its flat cell index), and so are the candidate pairs: per layer a
fixed capacity in pair order (YOLOv3: ``na * nt``, anchor-major; YOLOv5: ``5 * na * nt``, the
five cell blocks, each anchor-major), with an unmatched key instead of compaction.

Launch cost rules the design: on a GPU each launch costs microseconds of host and driver time,
more than most of these kernels run, so a loss call is a fixed handful of launches whatever the
layers hold (``test_triton.py`` counts them). The per-layer kernels serve up to ``MAX_LAYERS``
layers per launch: pointer arguments per layer slot (``p0_ptr`` .. ``p3_ptr``), and the strides and
sizes of every layer in a small device table (``layer_table``, built once per layout):

1. one memset: every cell's objectness target and the value-check flags;
2. ``_match_kernel``: match each candidate (clamped cell), gather its row, compute the IoU-family
   value and its gradient w.r.t. the 4 box logits (dual numbers) and the class BCE; write its
   global cell as the sort key (``total_cells`` when unmatched) and per-program partial sums
   (pairs, ``1 - IoU``, class BCE); check the target rows (first layer) and the anchors, never
   matching a row that fails;
3. one ``torch.sort(..., stable=True)`` of all keys groups the candidates by cell, in pair order
   within a cell, and ``torch.searchsorted`` gives each group's first position;
4. ``_objectness_target_kernel``: the last candidate of each group writes the cell's objectness
   target: from its own IoU (the last pair in pair order wins, deterministically), or with
   ``sort_obj_iou`` from the group's highest IoU;
5. ``_objectness_kernel``: every cell's objectness BCE (a partial sum per program) and, with a
   gradient, every row of the gradient: zeros and the objectness term, with p's layout;
6. ``_finalize_kernel`` (one program): the loss items, the per-layer objectness means and the box
   and class gradient scales from the partial sums (the scales depend on the pair counts, which
   only the device knows), and the flag the optional value assertion reads;
7. ``_pair_grad_kernel``: the last candidate of each group adds the box and class terms of the
   group's candidates (in pair order) to its cell's row: duplicates are summed without atomics,
   and each candidate is visited once, so the pass is O(P · nc).

Reductions are two-stage and fixed (per-program partials, then one program in a fixed order), so
results are bitwise reproducible. Offsets are int64 (a batch-64, 640x640 ``p`` has more than 2^31
bytes).

Every launch goes through ``launch.launch`` with keyword arguments; ``launch.record_launches`` captures them
instead of running them, which is how the compile gate (``compile_gate.py``) derives each kernel's
signature from this launcher rather than from a hand-written list.

Float kernel arguments are typed float64 (annotations) and converted once to the compute dtype
(``math.as_compute``): a float64 ``p`` gets its hyperparameters exactly, float32 math rounds each
once (a plain Python float argument is float32, which cost float64 runs their last digits).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import triton
import triton.language as tl

from ..anchor.options import LossOptions
from ..config import compute_dtype
from ..validate import MAX_BOX_SIZE as _MAX_BOX_SIZE
from .launch import ALIGN, carve
from .launch import cdiv as _cdiv
from .launch import contiguous_strides as _contiguous_strides
from .launch import dense as _dense
from .launch import launch as _launch
from .math import YOLOV3, YOLOV5, as_compute, bce_with_logits, box_iou, match

KINDS = {"iou": 0, "giou": 1, "diou": 2, "ciou": 3}
FAMILIES = {"yolov3": YOLOV3.value, "yolov5": YOLOV5.value}
#: Candidate blocks per (anchor, target): one cell (YOLOv3); the cell and four neighbours (YOLOv5).
BLOCKS = {"yolov3": 1, "yolov5": 5}
#: Fixed block sizes (one compiled variant per kernel and option set, whatever ``nc`` is).
BLOCK_PAIRS = 64  # candidate pairs per program of the match kernels
BLOCK_CLASSES = 32  # class channels per step of the class loops
BLOCK_CELLS = 128  # cells per program of the objectness kernel
#: Layers per launch of the per-layer kernels (pointer arguments p0..p3 and so on); more layers
#: take more launches.
MAX_LAYERS = 4
#: Entries per layer in the layer table (``layer_table``, read by ``_layer_row``).
LAYER_FIELDS = tl.constexpr(16)
#: The largest normalised box w or h (``validate.MAX_BOX_SIZE``), as a constexpr for the kernels.
MAX_BOX_SIZE = tl.constexpr(_MAX_BOX_SIZE)


@triton.jit
def _pick(i, a0, a1, a2, a3):
    """``a<i>`` for ``i`` in 0..3: one of the per-layer pointer arguments of a launch."""
    return tl.where(i == 0, a0, tl.where(i == 1, a1, tl.where(i == 2, a2, a3)))


@triton.jit
def _program_layer(programs_per_layer, layer_base):
    """``(slot, program within the layer, layer)`` of this program in a launch over several layers,
    ``programs_per_layer`` each; ``slot`` picks the layer's pointer arguments (``_pick``)."""
    program = tl.program_id(0).to(tl.int64)
    slot = program // programs_per_layer
    return slot, program - slot * programs_per_layer, layer_base + slot


@triton.jit
def _layer_strides(layer_table_ptr, layer, FIRST: tl.constexpr):
    """Five strides (b, a, y, x, c) of a layer from the layer table (``layer_table``): ``FIRST`` 0
    for ``p``'s, 5 for its gradient's."""
    row = layer_table_ptr + LAYER_FIELDS * layer + FIRST
    return tl.load(row), tl.load(row + 1), tl.load(row + 2), tl.load(row + 3), tl.load(row + 4)


@triton.jit
def _layer_sizes(layer_table_ptr, layer):
    """``(na, ny, nx, cells, first global cell, anchors of the layers before)`` of a layer."""
    row = layer_table_ptr + LAYER_FIELDS * layer + 10
    return tl.load(row), tl.load(row + 1), tl.load(row + 2), tl.load(row + 3), tl.load(row + 4), tl.load(row + 5)


@triton.jit(do_not_specialize=["num_targets", "layer_base"])
def _match_kernel(
    p0_ptr,
    p1_ptr,
    p2_ptr,
    p3_ptr,
    anchors0_ptr,
    anchors1_ptr,
    anchors2_ptr,
    anchors3_ptr,
    layer_table_ptr,
    layer_base,
    targets_ptr,
    num_targets,
    batch_size,
    num_classes,
    total_cells,
    match_programs,
    threshold: tl.float64,
    cls_pos: tl.float64,
    cls_neg: tl.float64,
    cls_pos_weight: tl.float64,
    focal_gamma: tl.float64,
    key_ptr,
    iou_ptr,
    iou_grad_ptr,
    cls_ptr,
    partial_ptr,
    flags_ptr,
    matched_target_ptr,
    FAMILY: tl.constexpr,
    BOX_KIND: tl.constexpr,
    FOCAL: tl.constexpr,
    HAS_CLS: tl.constexpr,
    STATS: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
    BLOCK_PAIRS: tl.constexpr,
    BLOCK_CLASSES: tl.constexpr,
):
    """Match, box IoU with its gradient, class BCE and the cell (sort key) of ``BLOCK_PAIRS``
    candidates, their partial sums, and the value checks of the targets and anchors. One launch
    serves up to four layers: ``match_programs`` programs per layer.

    Args:
        p<i>_ptr, anchors<i>_ptr: layer ``layer_base + i``'s ``p [bs, na, ny, nx, 5 + nc]`` and its
            ``[na, 2]`` anchor sizes in grid units (compute dtype); a launch with fewer layers
            repeats the first in the unused slots.
        layer_table_ptr, layer_base: the layer table (strides and sizes of every layer) and the
            index of this launch's first layer.
        targets_ptr: ``[nt, 6]`` rows ``(image, class, x, y, w, h)`` (normalised), compute dtype.
        num_targets, batch_size, num_classes: ``nt``, ``bs``, ``nc``.
        total_cells: the cells of all layers, the sort key of an unmatched candidate.
        match_programs: programs per layer (the most any layer needs).
        threshold: ``iou_t`` (YOLOv3: matched when wh-IoU > it) or ``anchor_t`` (YOLOv5: matched
            when the worst wh ratio < it).
        cls_pos, cls_neg: the class targets after label smoothing.
        cls_pos_weight, focal_gamma: the class BCE's ``pos_weight`` and focal gamma.
        key_ptr, iou_ptr, iou_grad_ptr, cls_ptr: per candidate outputs (all layers, in layer
            order): global cell or ``total_cells`` when unmatched (int32 or int64), IoU,
            d IoU / d box logits (``[., 4]``), class id (int32).
        partial_ptr: per program ``[3]``: matched pairs, sum of ``1 - IoU``, sum of the class BCE.
        flags_ptr: the value checks, set to 1 where one fails (zero-initialised): image index,
            class, box centre, box size, anchors. A failing target row is never matched, so a bad
            image index or a non-finite box cannot address memory outside ``p``. The first layer
            checks the target rows; every layer its anchors.
        matched_target_ptr: with ``STATS``, ``[nt]`` int8 flags (shared by the layers): set to 1 for
            each target a candidate matched (every writer stores the same value).
        FAMILY: ``math.YOLOV3`` or ``math.YOLOV5``.
        BOX_KIND: 0 IoU, 1 GIoU, 2 DIoU, 3 CIoU. FOCAL: focal class BCE. HAS_CLS: ``nc > 1``.
        COMPUTE_DTYPE: float32, or float64 for a float64 ``p``.
    """
    threshold = as_compute(threshold, COMPUTE_DTYPE)
    cls_pos = as_compute(cls_pos, COMPUTE_DTYPE)
    cls_neg = as_compute(cls_neg, COMPUTE_DTYPE)
    cls_pos_weight = as_compute(cls_pos_weight, COMPUTE_DTYPE)
    focal_gamma = as_compute(focal_gamma, COMPUTE_DTYPE)
    local, pid, layer = _program_layer(match_programs, layer_base)
    p_ptr = _pick(local, p0_ptr, p1_ptr, p2_ptr, p3_ptr)
    anchors_ptr = _pick(local, anchors0_ptr, anchors1_ptr, anchors2_ptr, anchors3_ptr)
    p_stride_b, p_stride_a, p_stride_y, p_stride_x, p_stride_c = _layer_strides(layer_table_ptr, layer, 0)
    num_anchors, grid_h, grid_w, layer_cells, cell_offset, anchor_offset = _layer_sizes(layer_table_ptr, layer)
    if FAMILY == YOLOV5:  # candidate blocks per (anchor, target): the cell and four neighbours
        blocks = 5
    else:
        blocks = 1
    num_candidates = blocks * num_anchors * num_targets
    candidate_offset = blocks * num_targets * anchor_offset
    check_rows = tl.where(layer == 0, num_targets, 0)
    lanes = tl.arange(0, BLOCK_PAIRS)
    if pid == 0:  # the anchors, once per layer (also with no targets)
        for a0 in range(0, 2 * num_anchors, BLOCK_PAIRS):
            m_a = a0 + lanes < 2 * num_anchors
            size = tl.load(anchors_ptr + a0 + lanes, mask=m_a, other=1.0).to(COMPUTE_DTYPE)
            bad = m_a & ~((size > 0.0) & ((size - size) == 0.0))  # x - x is NaN for inf and NaN
            tl.store(flags_ptr + 4 + lanes * 0, tl.full([BLOCK_PAIRS], 1.0, COMPUTE_DTYPE), mask=bad)
    k = pid * BLOCK_PAIRS + lanes  # candidate = (block * na + anchor) * nt + target
    in_range = k < num_candidates
    row = k // tl.maximum(num_targets, 1)
    j = k - row * num_targets
    block = row // num_anchors
    a = row - block * num_anchors
    aw = tl.load(anchors_ptr + 2 * a, mask=in_range, other=1.0).to(COMPUTE_DTYPE)
    ah = tl.load(anchors_ptr + 2 * a + 1, mask=in_range, other=1.0).to(COMPUTE_DTYPE)
    valid, bi, ci, gj, gi, tx, ty, gw, gh = match(
        targets_ptr + 6 * j, aw, ah, grid_h, grid_w, threshold, in_range, block, COMPUTE_DTYPE, FAMILY
    )
    # the value checks of the target row (each row once: its first candidate, in the first layer)
    t_row = targets_ptr + 6 * j
    b = tl.load(t_row, mask=in_range, other=0.0).to(COMPUTE_DTYPE)
    c = tl.load(t_row + 1, mask=in_range, other=0.0).to(COMPUTE_DTYPE)
    x = tl.load(t_row + 2, mask=in_range, other=0.0).to(COMPUTE_DTYPE)
    y = tl.load(t_row + 3, mask=in_range, other=0.0).to(COMPUTE_DTYPE)
    w = tl.load(t_row + 4, mask=in_range, other=1.0).to(COMPUTE_DTYPE)
    h = tl.load(t_row + 5, mask=in_range, other=1.0).to(COMPUTE_DTYPE)
    ok_image = (b >= 0.0) & (b < batch_size) & (b == tl.floor(b))
    ok_class = (c >= 0.0) & (c < num_classes) & (c == tl.floor(c))
    ok_xy = ((x - x) == 0.0) & ((y - y) == 0.0)
    # sizes in [0, MAX_BOX_SIZE] (validate.py: 0 matches nothing; pixel boxes are rejected); false for NaN
    ok_wh = (w >= 0.0) & (h >= 0.0) & (w <= MAX_BOX_SIZE) & (h <= MAX_BOX_SIZE)
    checked = in_range & (k < check_rows)
    one = tl.full([BLOCK_PAIRS], 1.0, COMPUTE_DTYPE)
    tl.store(flags_ptr + lanes * 0, one, mask=checked & ~ok_image)
    tl.store(flags_ptr + 1 + lanes * 0, one, mask=checked & ~ok_class)
    tl.store(flags_ptr + 2 + lanes * 0, one, mask=checked & ~ok_xy)
    tl.store(flags_ptr + 3 + lanes * 0, one, mask=checked & ~ok_wh)
    valid = valid & ok_image & ok_class & ok_xy & ok_wh

    base = p_ptr + bi * p_stride_b + a * p_stride_a + gj * p_stride_y + gi * p_stride_x
    x0 = tl.load(base, mask=valid, other=0.0).to(COMPUTE_DTYPE)
    x1 = tl.load(base + p_stride_c, mask=valid, other=0.0).to(COMPUTE_DTYPE)
    x2 = tl.load(base + 2 * p_stride_c, mask=valid, other=0.0).to(COMPUTE_DTYPE)
    x3 = tl.load(base + 3 * p_stride_c, mask=valid, other=0.0).to(COMPUTE_DTYPE)
    iou, d0, d1, d2, d3 = box_iou(x0, x1, x2, x3, aw, ah, tx, ty, gw, gh, BOX_KIND, FAMILY)
    iou = tl.where(valid, iou, 0.0)

    cls_loss = tl.zeros([BLOCK_PAIRS], dtype=COMPUTE_DTYPE)
    if HAS_CLS:
        offs_c = tl.arange(0, BLOCK_CLASSES)
        for c0 in range(0, num_classes, BLOCK_CLASSES):
            cc = c0 + offs_c
            m = valid[:, None] & (cc < num_classes)[None, :]
            xc = tl.load(base[:, None] + (5 + cc)[None, :] * p_stride_c, mask=m, other=0.0).to(COMPUTE_DTYPE)
            yc = tl.where(cc[None, :] == ci[:, None], cls_pos, cls_neg).to(COMPUTE_DTYPE)
            lc, _ = bce_with_logits(xc, yc, cls_pos_weight, focal_gamma, FOCAL)
            cls_loss += tl.sum(tl.where(m, lc, 0.0), axis=1).to(COMPUTE_DTYPE)

    cell = ((bi * num_anchors + a) * grid_h + gj) * grid_w + gi
    slot = candidate_offset + k
    key = tl.where(valid, cell_offset + cell, total_cells)
    tl.store(key_ptr + slot, key.to(key_ptr.dtype.element_ty), mask=in_range)
    tl.store(iou_ptr + slot, iou.to(COMPUTE_DTYPE), mask=in_range)
    tl.store(iou_grad_ptr + 4 * slot, d0.to(COMPUTE_DTYPE), mask=in_range)
    tl.store(iou_grad_ptr + 4 * slot + 1, d1.to(COMPUTE_DTYPE), mask=in_range)
    tl.store(iou_grad_ptr + 4 * slot + 2, d2.to(COMPUTE_DTYPE), mask=in_range)
    tl.store(iou_grad_ptr + 4 * slot + 3, d3.to(COMPUTE_DTYPE), mask=in_range)
    tl.store(cls_ptr + slot, ci.to(tl.int32), mask=in_range)
    # per-program partial sums (reduced in a fixed order by _finalize_kernel: reproducible)
    part = partial_ptr + 3 * (layer * match_programs + pid)
    tl.store(part, tl.sum(valid.to(COMPUTE_DTYPE), axis=0))
    tl.store(part + 1, tl.sum(tl.where(valid, 1.0 - iou, 0.0), axis=0).to(COMPUTE_DTYPE))
    tl.store(part + 2, tl.sum(tl.where(valid, cls_loss, 0.0), axis=0).to(COMPUTE_DTYPE))
    if STATS:
        tl.store(matched_target_ptr + j, tl.full([BLOCK_PAIRS], 1, tl.int8), mask=valid)


@triton.jit
def _is_group_end(sorted_key_ptr, i, num_candidates, num_cells):
    """Whether sorted position ``i`` holds a matched candidate that is the last of its cell's group."""
    key = tl.load(sorted_key_ptr + i, mask=i < num_candidates, other=num_cells)
    next_key = tl.load(sorted_key_ptr + i + 1, mask=i + 1 < num_candidates, other=num_cells)
    return (key < num_cells) & (key != next_key), key


@triton.jit(do_not_specialize=["num_candidates"])
def _objectness_target_kernel(
    sorted_key_ptr,
    order_ptr,
    group_start_ptr,
    iou_ptr,
    tobj_ptr,
    num_candidates,
    num_cells,
    gr: tl.float64,
    SORT_OBJ_IOU: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
):
    """One program per sorted position: the last candidate of each cell's group writes the cell's
    objectness target ``(1 - gr) + gr * clamp(iou, 0)`` into ``tobj_ptr``, with its own IoU (the
    last pair in pair order wins) or, with ``SORT_OBJ_IOU``, the group's highest IoU.

    Args:
        sorted_key_ptr, order_ptr: the candidates' keys sorted (stable) and the sorting permutation.
        group_start_ptr: per sorted position, the first position of its key's group.
        iou_ptr: the candidates' IoUs (candidate order), written by ``_match_kernel``.
        tobj_ptr: ``[num_cells]`` objectness targets, zero-initialised.
        num_candidates, num_cells: the candidates and the cells of all layers (global cell keys).
        gr: the IoU ratio of the objectness target.
    """
    gr = as_compute(gr, COMPUTE_DTYPE)
    i = tl.program_id(0).to(tl.int64)
    won, cell = _is_group_end(sorted_key_ptr, i, num_candidates, num_cells)
    if won:
        best = tl.maximum(tl.load(iou_ptr + tl.load(order_ptr + i)).to(COMPUTE_DTYPE), 0.0)
        if SORT_OBJ_IOU:
            for j in range(tl.load(group_start_ptr + i), i):
                best = tl.maximum(best, tl.load(iou_ptr + tl.load(order_ptr + j)).to(COMPUTE_DTYPE))
        tl.store(tobj_ptr + cell, ((1.0 - gr) + gr * best).to(COMPUTE_DTYPE))


@triton.jit
def _cell_coords(cell, num_anchors, grid_h, grid_w):
    """``(image, anchor, y, x)`` of flat cell index(es) ``cell`` (``((image * na + anchor) * ny + y) * nx + x``)."""
    x = cell % grid_w
    y = (cell // grid_w) % grid_h
    anchor = (cell // (grid_w * grid_h)) % num_anchors
    return cell // (grid_w * grid_h * num_anchors), anchor, y, x


@triton.jit
def _cell_rows(
    image,
    anchor,
    y,
    x,
    p_ptr,
    p_stride_b,
    p_stride_a,
    p_stride_y,
    p_stride_x,
    grad_ptr,
    grad_stride_b,
    grad_stride_a,
    grad_stride_y,
    grad_stride_x,
):
    """Pointers to the rows of ``p`` and of its gradient at cell(s) ``(image, anchor, y, x)``, each
    tensor with its own strides."""
    p_row = p_ptr + image * p_stride_b + anchor * p_stride_a + y * p_stride_y + x * p_stride_x
    g_row = grad_ptr + image * grad_stride_b + anchor * grad_stride_a + y * grad_stride_y + x * grad_stride_x
    return p_row, g_row


@triton.jit(do_not_specialize=["layer_base"])
def _objectness_kernel(
    p0_ptr,
    p1_ptr,
    p2_ptr,
    p3_ptr,
    grad0_ptr,
    grad1_ptr,
    grad2_ptr,
    grad3_ptr,
    layer_table_ptr,
    layer_base,
    tobj_ptr,
    partial_ptr,
    layer_ptr,
    obj_stats_ptr,
    balance_ptr,
    grad_output_ptr,
    obj_programs,
    batch_size,
    obj_pos_weight: tl.float64,
    focal_gamma: tl.float64,
    obj_gain: tl.float64,
    out_scale: tl.float64,
    FOCAL: tl.constexpr,
    SUM_REDUCTION: tl.constexpr,
    HAS_BALANCE: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    GRAD_OUTPUT: tl.constexpr,
    STATS: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
    BLOCK_CELLS: tl.constexpr,
):
    """The objectness BCE of ``BLOCK_CELLS`` cells and, with ``WRITE_GRAD``, the objectness channel of
    their gradient rows (the launcher zeroes the gradient with a memset beforehand: that writes at
    the copy bandwidth, where this kernel's row writes of zeros ran ~17x slower on an H200).
    One launch serves up to four layers, ``obj_programs`` programs each (the most any layer needs:
    programs past a layer's cells write zero partials, so ``_finalize_kernel`` reads one
    fixed-size block per layer).

    Args:
        p<i>_ptr, grad<i>_ptr: layer ``layer_base + i``'s ``p`` and its zeroed gradient (p's dtype;
            its strides in the layer table; unused without ``WRITE_GRAD``).
        layer_table_ptr, layer_base: the layer table and this launch's first layer.
        tobj_ptr: objectness targets of the cells of all layers (compute dtype).
        partial_ptr: ``[layers, obj_programs]`` partial loss sums, reduced by ``_finalize_kernel``.
        layer_ptr: ``[layers, 2]``: each layer's program 0 writes its cell count and loss scale.
        obj_stats_ptr: with ``STATS``, per program the sum of squares and the largest magnitude of
            the objectness gradient of its cells (``[layers, obj_programs, 2]``, compute dtype).
        balance_ptr: with ``HAS_BALANCE``, the per-layer objectness weights (device, compute
            dtype): the gradient is also scaled by the layer's.
        grad_output_ptr: with ``GRAD_OUTPUT`` (backward), the loss's gradient (one value, read on the
            device: no host sync): the written gradient is d loss / d p times it.
        batch_size: ``bs``.
        obj_pos_weight, focal_gamma: the objectness BCE's ``pos_weight`` and focal gamma.
        obj_gain: ``obj``; a layer's BCE sum enters the loss times ``obj / cells`` (mean) or
            ``3 obj / bs`` (sum).
        out_scale: the factor of the returned loss and of the gradients (YOLOv5: the batch size).
    """
    obj_pos_weight = as_compute(obj_pos_weight, COMPUTE_DTYPE)
    focal_gamma = as_compute(focal_gamma, COMPUTE_DTYPE)
    obj_gain = as_compute(obj_gain, COMPUTE_DTYPE)
    out_scale = as_compute(out_scale, COMPUTE_DTYPE)
    local, pid, layer = _program_layer(obj_programs, layer_base)
    p_ptr = _pick(local, p0_ptr, p1_ptr, p2_ptr, p3_ptr)
    grad_ptr = _pick(local, grad0_ptr, grad1_ptr, grad2_ptr, grad3_ptr)
    p_stride_b, p_stride_a, p_stride_y, p_stride_x, p_stride_c = _layer_strides(layer_table_ptr, layer, 0)
    grad_stride_b, grad_stride_a, grad_stride_y, grad_stride_x, grad_stride_c = _layer_strides(
        layer_table_ptr, layer, 5
    )
    num_anchors, grid_h, grid_w, num_cells, cell_offset, anchor_offset = _layer_sizes(layer_table_ptr, layer)
    cells = num_cells.to(COMPUTE_DTYPE)
    if SUM_REDUCTION:
        obj_loss_scale = obj_gain * 3.0 / batch_size
    else:
        obj_loss_scale = obj_gain / cells
    obj_grad_scale = (obj_loss_scale * out_scale).to(COMPUTE_DTYPE)
    if pid == 0:
        tl.store(layer_ptr + 2 * layer, cells)
        tl.store(layer_ptr + 2 * layer + 1, obj_loss_scale.to(COMPUTE_DTYPE))
    # programs walk the (image, anchor) planes of the layer, BLOCK_CELLS positions y * nx + x of
    # one plane each: one division per cell
    plane_cells = grid_h * grid_w
    plane_blocks = (plane_cells + BLOCK_CELLS - 1) // BLOCK_CELLS
    plane = pid // plane_blocks
    image = plane // num_anchors
    s = (pid - plane * plane_blocks) * BLOCK_CELLS + tl.arange(0, BLOCK_CELLS)
    m = (s < plane_cells) & (plane < batch_size * num_anchors)
    cell = plane * plane_cells + s
    y = s // grid_w
    p_row, g_row = _cell_rows(
        image,
        plane - image * num_anchors,
        y,
        s - y * grid_w,
        p_ptr,
        p_stride_b,
        p_stride_a,
        p_stride_y,
        p_stride_x,
        grad_ptr,
        grad_stride_b,
        grad_stride_a,
        grad_stride_y,
        grad_stride_x,
    )
    logit = tl.load(p_row + 4 * p_stride_c, mask=m, other=0.0).to(COMPUTE_DTYPE)
    target = tl.load(tobj_ptr + cell_offset + cell, mask=m, other=0.0)
    loss, grad = bce_with_logits(logit, target, obj_pos_weight, focal_gamma, FOCAL)
    slot = layer * obj_programs + pid
    tl.store(partial_ptr + slot, tl.sum(tl.where(m, loss, 0.0), axis=0).to(COMPUTE_DTYPE))
    if WRITE_GRAD or STATS:
        g_obj = grad * obj_grad_scale
        if HAS_BALANCE:
            g_obj = g_obj * tl.load(balance_ptr + layer).to(COMPUTE_DTYPE)
        if GRAD_OUTPUT:  # backward (never with STATS): the statistics are of d loss / d p
            g_obj = g_obj * tl.load(grad_output_ptr).to(COMPUTE_DTYPE)
    if STATS:
        g_in = tl.where(m, g_obj, 0.0)
        stats = obj_stats_ptr + 2 * slot
        tl.store(stats, tl.sum(g_in * g_in, axis=0).to(COMPUTE_DTYPE))
        tl.store(stats + 1, tl.max(tl.abs(g_in), axis=0).to(COMPUTE_DTYPE))
    if WRITE_GRAD:  # the launcher zeroed the gradient (a memset): only the objectness channel is written
        tl.store(g_row + 4 * grad_stride_c, g_obj.to(grad_ptr.dtype.element_ty), mask=m)


@triton.jit
def _finalize_kernel(
    match_partial_ptr,
    obj_partial_ptr,
    layer_ptr,
    balance_ptr,
    flags_ptr,
    loss_ptr,
    items_ptr,
    layer_obj_ptr,
    scales_ptr,
    counts_ptr,
    ok_ptr,
    num_layers,
    match_programs,
    obj_programs,
    num_flags,
    num_classes,
    box_gain: tl.float64,
    cls_gain: tl.float64,
    out_scale: tl.float64,
    SUM_REDUCTION: tl.constexpr,
    HAS_CLS: tl.constexpr,
    HAS_BALANCE: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One program: the loss from the partial sums of every layer, in a fixed order, and the
    per-layer gradient scales of the box and class terms (they depend on the pair counts, which
    only the device knows). Replaces a few dozen small tensor operations, and their launches.

    Args:
        match_partial_ptr: ``[layers, match_programs, 3]`` from ``_match_kernel``.
        obj_partial_ptr: ``[layers, obj_programs]`` from ``_objectness_kernel``.
        layer_ptr: ``[layers, 2]`` cell count and objectness loss scale, from ``_objectness_kernel``.
        balance_ptr: with ``HAS_BALANCE``, ``[layers]`` objectness weights.
        flags_ptr: ``[num_flags]`` value-check flags from ``_match_kernel``.
        loss_ptr, items_ptr, layer_obj_ptr: outputs ``[1]``, ``[4]`` (box, obj, cls, sum), ``[layers]``
            (mean objectness BCE per layer).
        scales_ptr: output ``[layers, 2]``: box and class gradient gains over the pair count.
        counts_ptr: output ``[layers]``: matched pairs per layer.
        ok_ptr: output ``[1]``: 1 when every value check passed, else 0.
        box_gain, cls_gain: ``giou`` and ``cls`` times the reduction gain (1, or 3 with ``sum``).
        out_scale: the factor of the returned loss and of the gradients (YOLOv5: the batch size).
    """
    box_gain = as_compute(box_gain, COMPUTE_DTYPE)
    cls_gain = as_compute(cls_gain, COMPUTE_DTYPE)
    out_scale = as_compute(out_scale, COMPUTE_DTYPE)
    offs = tl.arange(0, BLOCK)
    zero = tl.zeros([BLOCK], dtype=COMPUTE_DTYPE)
    total_acc = zero
    for layer in range(0, num_layers):
        for s in range(0, match_programs, BLOCK):
            rows = match_partial_ptr + 3 * (layer * match_programs + s + offs)
            total_acc += tl.load(rows, mask=s + offs < match_programs, other=0.0).to(COMPUTE_DTYPE)
    total = tl.sum(total_acc, axis=0)
    box_acc = zero
    obj_acc = zero
    cls_acc = zero
    for layer in range(0, num_layers):
        count_acc = zero
        box_sum_acc = zero
        cls_sum_acc = zero
        for s in range(0, match_programs, BLOCK):
            m = s + offs < match_programs
            rows = match_partial_ptr + 3 * (layer * match_programs + s + offs)
            count_acc += tl.load(rows, mask=m, other=0.0).to(COMPUTE_DTYPE)
            box_sum_acc += tl.load(rows + 1, mask=m, other=0.0).to(COMPUTE_DTYPE)
            cls_sum_acc += tl.load(rows + 2, mask=m, other=0.0).to(COMPUTE_DTYPE)
        obj_sum_acc = zero
        for s in range(0, obj_programs, BLOCK):
            m = s + offs < obj_programs
            partial = tl.load(obj_partial_ptr + layer * obj_programs + s + offs, mask=m, other=0.0)
            obj_sum_acc += partial.to(COMPUTE_DTYPE)
        count = tl.sum(count_acc, axis=0)
        if SUM_REDUCTION:
            pairs = total
        else:
            pairs = count
        safe = tl.maximum(pairs, 1.0)
        box_scale = tl.where(pairs > 0.0, box_gain / safe, 0.0)
        if HAS_CLS:
            cls_scale = tl.where(pairs > 0.0, cls_gain / (safe * num_classes), 0.0)
        else:
            cls_scale = box_scale * 0.0
        obj_sum = tl.sum(obj_sum_acc, axis=0)
        cells = tl.load(layer_ptr + 2 * layer).to(COMPUTE_DTYPE)
        obj_scale = tl.load(layer_ptr + 2 * layer + 1).to(COMPUTE_DTYPE)
        if HAS_BALANCE:
            obj_sum_w = obj_sum * tl.load(balance_ptr + layer).to(COMPUTE_DTYPE)
        else:
            obj_sum_w = obj_sum
        # one lane carries the layer's terms: the accumulators stay vectors of one dtype
        first = offs == 0
        box_acc += tl.where(first, box_scale * tl.sum(box_sum_acc, axis=0), 0.0)
        obj_acc += tl.where(first, obj_scale * obj_sum_w, 0.0)
        cls_acc += tl.where(first, cls_scale * tl.sum(cls_sum_acc, axis=0), 0.0)
        tl.store(layer_obj_ptr + layer, (obj_sum / cells).to(COMPUTE_DTYPE))
        tl.store(scales_ptr + 2 * layer, (box_scale * out_scale).to(COMPUTE_DTYPE))
        tl.store(scales_ptr + 2 * layer + 1, (cls_scale * out_scale).to(COMPUTE_DTYPE))
        tl.store(counts_ptr + layer, count.to(COMPUTE_DTYPE))
    lbox = tl.sum(box_acc, axis=0)
    lobj = tl.sum(obj_acc, axis=0)
    lcls = tl.sum(cls_acc, axis=0)
    total_loss = lbox + lobj + lcls
    tl.store(items_ptr, lbox.to(COMPUTE_DTYPE))
    tl.store(items_ptr + 1, lobj.to(COMPUTE_DTYPE))
    tl.store(items_ptr + 2, lcls.to(COMPUTE_DTYPE))
    tl.store(items_ptr + 3, total_loss.to(COMPUTE_DTYPE))
    tl.store(loss_ptr, (total_loss * out_scale).to(COMPUTE_DTYPE))
    flags = tl.load(flags_ptr + offs, mask=offs < num_flags, other=0.0)
    tl.store(ok_ptr, (tl.max(flags, axis=0) == 0.0).to(COMPUTE_DTYPE))


@triton.jit(do_not_specialize=["num_candidates", "layer_base"])
def _pair_grad_kernel(
    p0_ptr,
    p1_ptr,
    p2_ptr,
    p3_ptr,
    grad0_ptr,
    grad1_ptr,
    grad2_ptr,
    grad3_ptr,
    layer_table_ptr,
    layer_base,
    launch_layers,
    num_layers,
    sorted_key_ptr,
    order_ptr,
    group_start_ptr,
    iou_grad_ptr,
    cls_ptr,
    scale_ptr,
    grad_output_ptr,
    pair_stats_ptr,
    num_candidates,
    total_cells,
    num_classes,
    cls_pos: tl.float64,
    cls_neg: tl.float64,
    cls_pos_weight: tl.float64,
    focal_gamma: tl.float64,
    FOCAL: tl.constexpr,
    HAS_CLS: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    GRAD_OUTPUT: tl.constexpr,
    STATS: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
    BLOCK_CLASSES: tl.constexpr,
):
    """One program per sorted position: the last candidate of each cell's group adds the box and
    class gradient terms of every candidate of the group (in pair order) to the cell's row
    (``WRITE_GRAD``) and, with ``STATS``, writes their sums of squares and largest magnitudes to
    ``pair_stats_ptr`` (``[positions, 4]``: box, box, class, class; zero-initialised).

    Args:
        p<i>_ptr, grad<i>_ptr, layer_table_ptr, layer_base: as in ``_objectness_kernel``.
        launch_layers, num_layers: the layers of this launch and of the loss: the groups of other
            launches' layers are left to them.
        sorted_key_ptr, order_ptr: the candidates' keys sorted (stable) and the sorting permutation.
        group_start_ptr: per sorted position, the first position of its key's group.
        iou_grad_ptr, cls_ptr: written by ``_match_kernel`` (candidate order).
        scale_ptr: ``[layers, 2]`` device scalars (compute dtype, from ``_finalize_kernel``): the box
            and class gains over the pair count.
        grad_output_ptr: with ``GRAD_OUTPUT``, as in ``_objectness_kernel``.
        num_candidates, total_cells: the candidates and the cells of all layers.
        Other scalars as in ``_match_kernel``.
    """
    cls_pos = as_compute(cls_pos, COMPUTE_DTYPE)
    cls_neg = as_compute(cls_neg, COMPUTE_DTYPE)
    cls_pos_weight = as_compute(cls_pos_weight, COMPUTE_DTYPE)
    focal_gamma = as_compute(focal_gamma, COMPUTE_DTYPE)
    i = tl.program_id(0).to(tl.int64)
    won, key = _is_group_end(sorted_key_ptr, i, num_candidates, total_cells)
    key = key.to(tl.int64)
    layer = key * 0  # the layer whose cells hold the key: the last whose first cell is <= it
    for other in range(1, num_layers):
        layer += (key >= tl.load(layer_table_ptr + LAYER_FIELDS * other + 14)).to(tl.int64)
    local = layer - layer_base
    if won & (local >= 0) & (local < launch_layers):
        p_stride_b, p_stride_a, p_stride_y, p_stride_x, p_stride_c = _layer_strides(layer_table_ptr, layer, 0)
        grad_stride_b, grad_stride_a, grad_stride_y, grad_stride_x, grad_stride_c = _layer_strides(
            layer_table_ptr, layer, 5
        )
        num_anchors, grid_h, grid_w, layer_cells, cell_offset, anchor_offset = _layer_sizes(layer_table_ptr, layer)
        cell = key - cell_offset
        p_ptr = _pick(local, p0_ptr, p1_ptr, p2_ptr, p3_ptr)
        grad_ptr = _pick(local, grad0_ptr, grad1_ptr, grad2_ptr, grad3_ptr)
        first = tl.load(group_start_ptr + i)
        box_scale = tl.load(scale_ptr + 2 * layer)
        cls_scale = tl.load(scale_ptr + 2 * layer + 1)
        if GRAD_OUTPUT:  # backward (never with STATS), as in _objectness_kernel
            grad_output = tl.load(grad_output_ptr).to(COMPUTE_DTYPE)
            box_scale = box_scale * grad_output
            cls_scale = cls_scale * grad_output
        image, anchor, y, x = _cell_coords(cell, num_anchors, grid_h, grid_w)
        p_row, g_row = _cell_rows(
            image,
            anchor,
            y,
            x,
            p_ptr,
            p_stride_b,
            p_stride_a,
            p_stride_y,
            p_stride_x,
            grad_ptr,
            grad_stride_b,
            grad_stride_a,
            grad_stride_y,
            grad_stride_x,
        )
        four = tl.arange(0, 4)
        acc = tl.zeros([4], dtype=COMPUTE_DTYPE)
        for j in range(first, i + 1):
            q = tl.load(order_ptr + j)
            acc += tl.load(iou_grad_ptr + 4 * q + four).to(COMPUTE_DTYPE)
        g_box = g_row + four * grad_stride_c
        box_terms = -box_scale * acc  # the row is zero there before: these are the entries
        if WRITE_GRAD:
            tl.store(g_box, (tl.load(g_box).to(COMPUTE_DTYPE) + box_terms).to(grad_ptr.dtype.element_ty))
        if STATS:
            tl.store(pair_stats_ptr + 4 * i, tl.sum(box_terms * box_terms, axis=0).to(COMPUTE_DTYPE))
            tl.store(pair_stats_ptr + 4 * i + 1, tl.max(tl.abs(box_terms), axis=0).to(COMPUTE_DTYPE))
        if HAS_CLS:
            cls_sq = tl.zeros([BLOCK_CLASSES], dtype=COMPUTE_DTYPE)
            cls_max = tl.zeros([BLOCK_CLASSES], dtype=COMPUTE_DTYPE)
            count = (i + 1 - first).to(COMPUTE_DTYPE)
            offs_c = tl.arange(0, BLOCK_CLASSES)
            for c0 in range(0, num_classes, BLOCK_CLASSES):
                cc = c0 + offs_c
                mc = cc < num_classes
                xc = tl.load(p_row + (5 + cc) * p_stride_c, mask=mc, other=0.0).to(COMPUTE_DTYPE)
                # sum over the group of d BCE(x, y_pair): target cls_neg except at the pair's class
                y_neg = tl.zeros([BLOCK_CLASSES], dtype=COMPUTE_DTYPE) + cls_neg
                y_pos = tl.zeros([BLOCK_CLASSES], dtype=COMPUTE_DTYPE) + cls_pos
                _, g_neg = bce_with_logits(xc, y_neg, cls_pos_weight, focal_gamma, FOCAL)
                _, g_pos = bce_with_logits(xc, y_pos, cls_pos_weight, focal_gamma, FOCAL)
                hits = tl.zeros([BLOCK_CLASSES], dtype=COMPUTE_DTYPE)
                for j in range(first, i + 1):
                    cls_q = tl.load(cls_ptr + tl.load(order_ptr + j))
                    hits += (cc == cls_q).to(COMPUTE_DTYPE)
                cls_terms = tl.where(mc, cls_scale * (count * g_neg + hits * (g_pos - g_neg)), 0.0)
                if WRITE_GRAD:
                    g_cls = g_row + (5 + cc) * grad_stride_c
                    old = tl.load(g_cls, mask=mc, other=0.0).to(COMPUTE_DTYPE)
                    tl.store(g_cls, (old + cls_terms).to(grad_ptr.dtype.element_ty), mask=mc)
                cls_sq += cls_terms * cls_terms
                cls_max = tl.maximum(cls_max, tl.abs(cls_terms))
            if STATS:
                tl.store(pair_stats_ptr + 4 * i + 2, tl.sum(cls_sq, axis=0).to(COMPUTE_DTYPE))
                tl.store(pair_stats_ptr + 4 * i + 3, tl.max(cls_max, axis=0).to(COMPUTE_DTYPE))


def _layer_slots(table: torch.Tensor, base: int, end: int, **per_layer: list) -> dict:
    """The layer arguments of a launch over layers ``base .. end - 1`` (at most ``MAX_LAYERS``):
    ``<name>0_ptr`` .. ``<name>3_ptr`` for each list of per-layer tensors (unused slots repeat the
    first: never read, the programs stop at the layers), the layer table and ``layer_base``."""
    slots = {
        f"{name}{i}_ptr": tensors[base + min(i, end - base - 1)]
        for name, tensors in per_layer.items()
        for i in range(MAX_LAYERS)
    }
    return dict(slots, layer_table_ptr=table, layer_base=base)


_TABLES: dict[tuple, tuple[torch.Tensor, list[tuple[int, ...]]]] = {}


def layer_table(p) -> tuple[torch.Tensor, list[tuple[int, ...]]]:
    """The layer table and the strides of each layer's gradient.

    The table is ``[layers, LAYER_FIELDS]`` int64 on ``p``'s device, a row per layer: the strides
    of ``p`` and of its gradient, ``na, ny, nx``, the cells, the first global cell and the anchors
    of the layers before. A gradient has ``p``'s strides when ``p`` is dense (the head's view and
    a contiguous tensor alike: what ``torch.empty_like`` keeps), else contiguous ones. Both depend
    on shapes and strides only, so they are built (one copy to the device) once per layout and
    kept: a warmed-up step makes no copy, and can be captured in a CUDA graph."""
    layout = tuple((tuple(x.shape), x.stride()) for x in p)
    key = (p[0].device, layout)
    entry = _TABLES.get(key)
    if entry is None:
        rows, cells, anchors, grad_strides = [], 0, 0, []
        for shape, p_strides in layout:
            bs, na, ny, nx = shape[:4]
            g_strides = p_strides if _dense(shape, p_strides) else _contiguous_strides(shape)
            grad_strides.append(g_strides)
            rows.append([*p_strides, *g_strides, na, ny, nx, bs * na * ny * nx, cells, anchors])
            cells, anchors = cells + bs * na * ny * nx, anchors + na
        table = torch.tensor(rows, dtype=torch.int64)
        if p[0].device.type == "cuda":  # pinned: an asynchronous copy, no host sync
            if torch.cuda.is_current_stream_capturing():  # a replay would copy from freed memory
                raise RuntimeError(
                    "yolo_kernels (triton): the first call with these shapes of p is being captured in a "
                    "CUDA graph; run one eager call first (it compiles the kernels and builds the layer table)"
                )
            table = table.pin_memory().to(p[0].device, non_blocking=True)
        else:
            table = table.to(p[0].device)
        if len(_TABLES) >= 64:
            _TABLES.clear()
        entry = _TABLES[key] = (table, grad_strides)
    return entry


#: Slots of the value-check flags (``_match_kernel``): image index, class, box centre, box size, anchors.
NUM_FLAGS = 5
BLOCK_FINALIZE = 1024  # partials per step of the finalize kernel: its loops are serial, so few steps


def value_check_message(batch_size: int, nc: int) -> str:
    """The message of the device-side value check: one assertion for all checks (each costs a
    launch), and short (CUDA takes under 255 characters)."""
    return (
        f"yolo_kernels: device-side value checks failed: expected targets[:, 0] integers in [0, {batch_size}), "
        f"[:, 1] integers in [0, {nc}), [:, 2:6] finite with w, h in [0, 2], anchors finite > 0 (bad rows are not "
        "matched); a CPU copy names the row"
    )


@dataclasses.dataclass
class _Plan:
    """The sizes of one call, from the shapes and options alone (no device work)."""

    options: LossOptions
    device: torch.device
    dtype: torch.dtype  # the compute dtype
    tl_dtype: Any
    bs: int
    nc: int
    nl: int
    nt: int
    n_cells: list[int]  # per layer: cells of all images and anchors
    n_cand: list[int]  # per layer: candidate pairs (blocks x anchors x targets)
    cell_offsets: list[int]  # per layer: its first global cell key
    match_programs: int
    obj_programs: int
    table: torch.Tensor  # the layer table (layer_table)
    grad_strides: list[tuple[int, ...]]
    groups: list[tuple[int, int]]  # the launches' layer ranges, at most MAX_LAYERS each

    @property
    def total_cells(self) -> int:
        return sum(self.n_cells)

    @property
    def total_cand(self) -> int:
        return sum(self.n_cand)

    @property
    def out_scale(self) -> float:
        """The YOLOv5 loss is the sum of the terms times the batch size."""
        return float(self.bs) if self.options.family == "yolov5" else 1.0

    @property
    def class_targets(self) -> dict:
        cls_pos, cls_neg = (float(v) for v in self.options.smooth_targets)
        return dict(cls_pos=cls_pos, cls_neg=cls_neg)


def _plan(p, nt: int, options: LossOptions) -> _Plan:
    dtype = compute_dtype(p[0].dtype)
    bs, nl = p[0].shape[0], len(p)
    # the layers' cells and candidates, laid end to end: one sort groups the candidates of every layer
    n_cells = [bs * x.shape[1] * x.shape[2] * x.shape[3] for x in p]
    n_cand = [BLOCKS[options.family] * x.shape[1] * nt for x in p]
    table, grad_strides = layer_table(p)
    return _Plan(
        options=options,
        device=p[0].device,
        dtype=dtype,
        tl_dtype=tl.float64 if dtype == torch.float64 else tl.float32,
        bs=bs,
        nc=p[0].shape[4] - 5,
        nl=nl,
        nt=nt,
        n_cells=n_cells,
        n_cand=n_cand,
        cell_offsets=[sum(n_cells[:i]) for i in range(nl)],
        match_programs=max(_cdiv(n, BLOCK_PAIRS) for n in n_cand + [1]),
        obj_programs=max(bs * x.shape[1] * _cdiv(x.shape[2] * x.shape[3], BLOCK_CELLS) for x in p),  # per plane
        table=table,
        grad_strides=grad_strides,
        groups=[(base, min(nl, base + MAX_LAYERS)) for base in range(0, nl, MAX_LAYERS)],
    )


@dataclasses.dataclass
class _Workspace:
    """Every tensor the kernels write, carved from as few allocations as possible."""

    work: torch.Tensor  # the zeroed buffer (a stand-in for pointers a constexpr leaves unread)
    grads: list  # d loss / d p[i] (p itself stands in without a gradient: never written)
    tobj: torch.Tensor  # [total_cells] objectness targets, zeroed
    flags: torch.Tensor  # [NUM_FLAGS] value-check flags, zeroed
    key: torch.Tensor  # [total_cand] a candidate's global cell key (total_cells: unmatched)
    iou: torch.Tensor  # [total_cand]
    iou_grad: torch.Tensor  # [total_cand, 4]
    cls: torch.Tensor  # [total_cand] a candidate's class
    match_partial: torch.Tensor  # [nl, match_programs, 3]
    obj_partial: torch.Tensor  # [nl, obj_programs]
    layer_info: torch.Tensor  # [nl, 2]
    scales: torch.Tensor  # [nl, 2] box and class gradient scales (_finalize_kernel)
    counts: torch.Tensor  # [nl] matched pairs
    ok: torch.Tensor  # [1] the value checks' verdict
    matched_targets: torch.Tensor | None  # [nt] (statistics only)
    obj_stats: torch.Tensor  # [nl or 0, obj_programs, 2]


def _grad_starts(p) -> list[int]:
    """Where each layer's gradient starts in a buffer of them all (128-byte aligned), and the end."""
    starts = [0]
    for x in p:
        starts.append(starts[-1] + _cdiv(x.numel(), ALIGN) * ALIGN)
    return starts


def _gradient_views(plan: _Plan, p, buffer: torch.Tensor, starts: list[int]) -> list:
    """Each layer's gradient as a view of ``buffer`` with the strides ``layer_table`` chose."""
    return [buffer.as_strided(x.shape, st, start) for x, st, start in zip(p, plan.grad_strides, starts)]


def _workspace(plan: _Plan, p, compute_grad: bool, compute_stats: bool) -> _Workspace:
    """One memset: the gradients (with ``compute_grad``, when p is in the compute dtype; else a
    second one), the objectness targets of every cell, then the value-check flags; the kernels then
    write only the objectness channel and the matched rows of the gradient. Each piece starts on a
    128-byte boundary: the same pointer alignment (one compiled specialisation) whatever the shapes."""
    device, dtype, total_cells, total_cand = plan.device, plan.dtype, plan.total_cells, plan.total_cand
    starts = _grad_starts(p) if compute_grad else [0]
    grad_numel = starts[-1]
    shared = p[0].dtype == dtype
    work = torch.zeros((grad_numel if shared else 0) + total_cells + NUM_FLAGS, dtype=dtype, device=device)
    if compute_grad:
        buffer = work if shared else torch.zeros(grad_numel, dtype=p[0].dtype, device=device)
        grads = _gradient_views(plan, p, buffer, starts)
    else:
        grads = list(p)
    first = grad_numel if shared else 0
    nl = plan.nl
    # the buffers the kernels fill: one allocation of the compute dtype, one of integers
    real = carve(
        dict(
            iou=(total_cand,),
            iou_grad=(total_cand, 4),
            match_partial=(nl, plan.match_programs, 3),
            obj_partial=(nl, plan.obj_programs),
            layer_info=(nl, 2),
            scales=(nl, 2),
            counts=(nl,),
            ok=(1,),
            obj_stats=(nl if compute_stats else 0, plan.obj_programs, 2),
        ),
        dtype,
        device,
    )
    if total_cells < 2**31 - 1:  # int32 keys: one integer allocation for the keys and the classes
        integers = carve(dict(key=(total_cand,), cls=(total_cand,)), torch.int32, device)
    else:
        integers = dict(
            key=torch.empty(total_cand, dtype=torch.int64, device=device),
            cls=torch.empty(total_cand, dtype=torch.int32, device=device),
        )
    return _Workspace(
        work=work,
        grads=grads,
        tobj=work[first : first + total_cells],
        flags=work[first + total_cells :],
        matched_targets=torch.zeros(plan.nt, dtype=torch.int8, device=device) if compute_stats else None,
        **integers,
        **real,
    )


def _launch_match(plan: _Plan, ws: _Workspace, p, t, anchors, compute_stats: bool) -> None:
    o, has_cand = plan.options, plan.total_cand > 0
    for base, end in plan.groups:
        _launch(
            _match_kernel,
            ((end - base) * plan.match_programs,),
            # no fused multiply-add: a cell or neighbour decision (x * nx near an integer or a
            # half) must see the rounded product, as the reference does; the GPU fused
            # ``nx - x * nx`` and matched pairs the reference does not (measured on H200)
            enable_fp_fusion=False,
            **_layer_slots(plan.table, base, end, p=p, anchors=anchors),
            targets_ptr=t if plan.nt else ws.work,  # a small real tensor stands in where unread
            num_targets=plan.nt,
            batch_size=plan.bs,
            num_classes=plan.nc,
            total_cells=plan.total_cells,
            match_programs=plan.match_programs,
            threshold=float(o.match_threshold),
            **plan.class_targets,
            cls_pos_weight=float(o.cls_pw),
            focal_gamma=float(o.fl_gamma),
            key_ptr=ws.key if has_cand else ws.work,
            iou_ptr=ws.iou if has_cand else ws.work,
            iou_grad_ptr=ws.iou_grad if has_cand else ws.work,
            cls_ptr=ws.cls if has_cand else ws.work,
            partial_ptr=ws.match_partial,
            flags_ptr=ws.flags,
            matched_target_ptr=ws.matched_targets if compute_stats else ws.flags,  # unread without STATS
            FAMILY=FAMILIES[o.family],
            BOX_KIND=KINDS[o.box_loss],
            FOCAL=o.fl_gamma > 0,
            HAS_CLS=plan.nc > 1,
            STATS=compute_stats,
            COMPUTE_DTYPE=plan.tl_dtype,
            BLOCK_PAIRS=BLOCK_PAIRS,
            BLOCK_CLASSES=BLOCK_CLASSES,
        )


def _group_by_cell(plan: _Plan, ws: _Workspace):
    """``(sorted keys, order, group starts)``: the candidates grouped by cell, in pair order within a
    cell (a stable sort), unmatched ones last; then each matched cell's objectness target."""
    sorted_key, order = torch.sort(ws.key, stable=True)
    groups = (sorted_key, order, torch.searchsorted(sorted_key, sorted_key))
    _launch(
        _objectness_target_kernel,
        (plan.total_cand,),
        sorted_key_ptr=sorted_key,
        order_ptr=order,
        group_start_ptr=groups[2],
        iou_ptr=ws.iou,
        tobj_ptr=ws.tobj,
        num_candidates=plan.total_cand,
        num_cells=plan.total_cells,
        gr=float(plan.options.objectness_gr),
        SORT_OBJ_IOU=plan.options.sort_obj_iou,
        COMPUTE_DTYPE=plan.tl_dtype,
    )
    return groups


def _launch_objectness(
    plan: _Plan, ws: _Workspace, p, balance, compute_grad: bool, compute_stats: bool, grad_output=None
) -> None:
    """``grad_output`` (backward): the loss's gradient on the device, which the written gradient is
    scaled by."""
    o = plan.options
    for base, end in plan.groups:
        _launch(
            _objectness_kernel,
            ((end - base) * plan.obj_programs,),
            **_layer_slots(plan.table, base, end, p=p, grad=ws.grads),
            tobj_ptr=ws.tobj,
            partial_ptr=ws.obj_partial,
            layer_ptr=ws.layer_info,
            obj_stats_ptr=ws.obj_stats if compute_stats else ws.obj_partial,  # unread without STATS
            balance_ptr=balance if balance is not None else ws.obj_partial,  # unread without HAS_BALANCE
            grad_output_ptr=grad_output if grad_output is not None else ws.obj_partial,  # unread without GRAD_OUTPUT
            obj_programs=plan.obj_programs,
            batch_size=plan.bs,
            obj_pos_weight=float(o.obj_pw),
            focal_gamma=float(o.fl_gamma),
            obj_gain=float(o.obj),
            out_scale=plan.out_scale,
            FOCAL=o.fl_gamma > 0,
            SUM_REDUCTION=o.reduction == "sum",
            HAS_BALANCE=balance is not None,
            WRITE_GRAD=compute_grad,
            GRAD_OUTPUT=grad_output is not None,
            STATS=compute_stats,
            COMPUTE_DTYPE=plan.tl_dtype,
            BLOCK_CELLS=BLOCK_CELLS,
        )


def _finalize(plan: _Plan, ws: _Workspace, balance, check_values: bool):
    """``(loss, items, layer_obj, scales, counts)``: the sums in a fixed order, each layer's
    gradient scales and pair counts; with ``check_values`` one device-side assertion."""
    o = plan.options
    dtype, device, nl = plan.dtype, plan.device, plan.nl
    # the outputs: separate tensors (a trainer may scale the loss in place, as the YOLOv3 archive's
    # train.py does, which a view of a shared buffer would not allow under autograd)
    loss = torch.empty(1, dtype=dtype, device=device)
    items = torch.empty(4, dtype=dtype, device=device)
    layer_obj = torch.empty(nl, dtype=dtype, device=device)
    scales, counts, ok = ws.scales, ws.counts, ws.ok
    gain = 3.0 if o.reduction == "sum" else 1.0
    _launch(
        _finalize_kernel,
        (1,),
        match_partial_ptr=ws.match_partial,
        obj_partial_ptr=ws.obj_partial,
        layer_ptr=ws.layer_info,
        balance_ptr=balance if balance is not None else ws.layer_info,  # unread without HAS_BALANCE
        flags_ptr=ws.flags,
        loss_ptr=loss,
        items_ptr=items,
        layer_obj_ptr=layer_obj,
        scales_ptr=scales,
        counts_ptr=counts,
        ok_ptr=ok,
        num_layers=nl,
        match_programs=plan.match_programs,
        obj_programs=plan.obj_programs,
        num_flags=NUM_FLAGS,
        num_classes=plan.nc,
        box_gain=float(o.box * gain),
        cls_gain=float(o.cls * gain),
        out_scale=plan.out_scale,
        SUM_REDUCTION=o.reduction == "sum",
        HAS_CLS=plan.nc > 1,
        HAS_BALANCE=balance is not None,
        COMPUTE_DTYPE=plan.tl_dtype,
        BLOCK=BLOCK_FINALIZE,
    )
    if check_values:
        torch._assert_async(ok, value_check_message(plan.bs, plan.nc))
    return loss, items, layer_obj, scales, counts


def _launch_pair_grad(
    plan: _Plan, ws: _Workspace, p, groups, scales, pair_stats, compute_grad, compute_stats, grad_output=None
):
    o = plan.options
    sorted_key, order, group_start = groups
    for base, end in plan.groups:
        _launch(
            _pair_grad_kernel,
            (plan.total_cand,),
            **_layer_slots(plan.table, base, end, p=p, grad=ws.grads),
            launch_layers=end - base,
            num_layers=plan.nl,
            sorted_key_ptr=sorted_key,
            order_ptr=order,
            group_start_ptr=group_start,
            iou_grad_ptr=ws.iou_grad,
            cls_ptr=ws.cls,
            scale_ptr=scales,
            grad_output_ptr=grad_output if grad_output is not None else scales,  # unread without GRAD_OUTPUT
            pair_stats_ptr=pair_stats if compute_stats else scales,  # unread without STATS
            num_candidates=plan.total_cand,
            total_cells=plan.total_cells,
            num_classes=plan.nc,
            **plan.class_targets,
            cls_pos_weight=float(o.cls_pw),
            focal_gamma=float(o.fl_gamma),
            FOCAL=o.fl_gamma > 0,
            HAS_CLS=plan.nc > 1,
            WRITE_GRAD=compute_grad,
            GRAD_OUTPUT=grad_output is not None,
            STATS=compute_stats,
            COMPUTE_DTYPE=plan.tl_dtype,
            BLOCK_CLASSES=BLOCK_CLASSES,
        )


def _statistics(plan: _Plan, ws: _Workspace, groups, counts, pair_stats) -> torch.Tensor:
    """The op's layout: a row per layer (``_layer_stats``), then the unmatched targets."""
    rows = [
        _layer_stats(
            ws.obj_stats[i], pair_stats, counts[i], groups, plan.cell_offsets[i], plan.n_cells[i], plan.total_cells
        )
        for i in range(plan.nl)
    ]
    unmatched = (ws.matched_targets == 0).sum().to(plan.dtype).reshape(1)
    last = torch.cat((unmatched, counts.new_zeros(7)))
    return torch.cat((torch.stack(rows), last[None]))


@dataclasses.dataclass
class Saved:
    """What ``loss_backward`` needs of a forward call: its plan and the match's device buffers
    (the grouping by cell, the pairs' IoU gradients and classes, the objectness targets) and the
    per-layer gradient scales. A few bytes per cell and candidate; no gradient-sized tensor."""

    plan: _Plan
    ws: _Workspace
    groups: tuple | None
    scales: torch.Tensor
    balance: torch.Tensor | None


def _forward(p, targets, anchors, options, compute_grad, balance, compute_stats, check_values):
    """``fused_loss``'s outputs (the gradients ``None`` without ``compute_grad``) and the ``Saved``
    state of the call."""
    device = p[0].device
    plan = _plan(p, targets.shape[0], options)
    t = targets.to(device=device, dtype=plan.dtype).contiguous()
    if balance is not None:
        balance = balance.to(device=device, dtype=plan.dtype).contiguous()
    anchors = [a.to(device=device, dtype=plan.dtype).contiguous() for a in anchors]
    ws = _workspace(plan, p, compute_grad, compute_stats)

    _launch_match(plan, ws, p, t, anchors, compute_stats)
    groups = _group_by_cell(plan, ws) if plan.total_cand else None
    _launch_objectness(plan, ws, p, balance, compute_grad, compute_stats)
    loss, items, layer_obj, scales, counts = _finalize(plan, ws, balance, check_values)
    pair_stats = torch.zeros(plan.total_cand, 4, dtype=plan.dtype, device=device) if compute_stats else None
    if (compute_grad or compute_stats) and plan.total_cand:
        _launch_pair_grad(plan, ws, p, groups, scales, pair_stats, compute_grad, compute_stats)

    grads = ws.grads if compute_grad else None
    if compute_stats:
        stats = _statistics(plan, ws, groups, counts, pair_stats)
    else:
        stats = torch.empty(0, 8, dtype=plan.dtype, device=device)
    # without p's stand-ins: a loss kept alive after backward must not keep the network's outputs
    kept = dataclasses.replace(ws, grads=[])
    return (loss, items, layer_obj, stats, grads), Saved(plan, kept, groups, scales, balance)


def fused_loss(
    p,
    targets,
    anchors,
    options: LossOptions,
    compute_grad: bool = True,
    balance=None,
    compute_stats=False,
    check_values=False,
):
    """``(loss [1], loss_items [4], layer_obj [nl], stats [nl + 1, 8] or [0, 8], [d loss / d p[i]])``
    (the op's outputs; ``stats``: per layer the sums of squares and largest magnitudes of the
    box / objectness / class gradient, matched pairs, duplicate pairs; last row: unmatched targets) for
    float16/bfloat16/float32 ``p`` (math in float32; float64 ``p`` in float64) on the device of
    ``p`` (CUDA, or CPU under ``TRITON_INTERPRET=1``). ``balance [nl]`` (a device tensor, or
    ``None``: ones) weighs each layer's objectness term. ``check_values``: assert on the device
    (``torch._assert_async``, no host sync) that the target and anchor values are valid; the
    kernels never match a row that fails, so memory stays in bounds either way.

    No host sync, and few launches (each costs microseconds of host and driver time, more than the
    kernels themselves at common sizes): one memset, sort, search and launch of each kernel for up
    to ``MAX_LAYERS`` layers. The steps: the plan (sizes), the workspace (one zeroed buffer), the
    match, the grouping by cell, the objectness pass, the finalisation (sums and scales), the
    matched rows' gradients, the statistics.

    With ``compute_grad`` the gradient is written in the forward passes: the op's contract
    (``torch.ops.yolo_kernels.fused_loss``, whose registered autograd scales it in backward). The
    eager autograd writes it in backward instead, once, already scaled (``loss_forward`` /
    ``loss_backward``)."""
    loss, items, layer_obj, stats, grads = _forward(
        p, targets, anchors, options, compute_grad, balance, compute_stats, check_values
    )[0]
    return loss, items, layer_obj, stats, grads if grads is not None else [x.new_empty(0) for x in p]


def loss_forward(p, targets, anchors, options: LossOptions, balance=None, compute_stats=False, check_values=False):
    """The forward of the eager autograd (``triton.AnchorLoss``): ``(loss, items, layer_obj, stats,
    saved)`` as ``fused_loss`` computes them, with no gradient written, and the state
    ``loss_backward`` reads. Training and forward-only calls (validation) cost the same here."""
    outputs, saved = _forward(p, targets, anchors, options, False, balance, compute_stats, check_values)
    return (*outputs[:4], saved)


def loss_backward(saved: Saved, p, grad_output: torch.Tensor) -> list:
    """``[d loss / d p[i] * grad_output]``: the gradient of each layer written once, already scaled
    by the loss's gradient (``grad_output``: its one value on p's device, read by the kernels, so
    any value costs the same and the host never waits): one memset of the gradients, then the
    objectness channel of every row and the matched rows, as ``fused_loss`` writes them."""
    plan = saved.plan
    starts = _grad_starts(p)
    buffer = torch.zeros(starts[-1], dtype=p[0].dtype, device=plan.device)
    ws = dataclasses.replace(saved.ws, grads=_gradient_views(plan, p, buffer, starts))
    _launch_objectness(plan, ws, p, saved.balance, True, False, grad_output)
    if plan.total_cand:
        _launch_pair_grad(plan, ws, p, saved.groups, saved.scales, None, True, False, grad_output)
    return ws.grads


def _layer_stats(obj_stats, pair_stats, n_pairs, groups, cell_offset, n_cells, total_cells) -> torch.Tensor:
    """One layer's ``[8]`` statistics from the kernels' per-program / per-position values: device
    reductions only (no sync). ``pair_stats`` holds every layer's group ends (zeros elsewhere)."""
    zero = n_pairs.new_zeros(())
    if groups is not None:  # distinct matched cells of this layer: the group ends among the sorted keys
        sorted_key = groups[0]
        following = torch.cat((sorted_key[1:], sorted_key.new_full((1,), total_cells)))
        in_layer = (sorted_key >= cell_offset) & (sorted_key < cell_offset + n_cells)
        cells = (in_layer & (sorted_key != following)).sum().to(n_pairs.dtype)
        mine = torch.where(in_layer[:, None], pair_stats, 0.0)  # not a product: a NaN elsewhere stays there
        box_sq, cls_sq = mine[:, 0].sum(), mine[:, 2].sum()
        box_max, cls_max = mine[:, 1].amax(), mine[:, 3].amax()
    else:
        cells = box_sq = cls_sq = box_max = cls_max = zero
    obj_sq, obj_max = obj_stats[:, 0].sum(), obj_stats[:, 1].amax()
    return torch.stack((box_sq, obj_sq, cls_sq, box_max, obj_max, cls_max, n_pairs, n_pairs - cells))
