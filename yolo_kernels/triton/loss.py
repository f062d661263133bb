"""The fused YOLO losses in Triton: every shape is known from the input shapes (no host sync).

Both families (``FAMILY``: the archive YOLOv3 loss, the YOLOv5-style one) share the kernels; they
differ in ``math.match``, ``math.predicted_box``, ``math.box_iou``'s constants, the objectness
weights and the batch-size factor. Per layer, with a fixed capacity of candidate pairs in pair
order (YOLOv3: ``na * nt``, anchor-major; YOLOv5: ``5 * na * nt``, the five cell blocks, each
anchor-major) and a validity mask instead of compaction:

1. ``_match_kernel``: match each candidate (clamped cell), gather its row, compute the IoU-family
   value and its gradient w.r.t. the 4 box logits (dual numbers) and the summed class BCE; write
   its cell as a sort key (``num_cells`` when unmatched).
2. ``torch.sort(..., stable=True)`` of the keys groups the candidates by cell, in pair order
   within a cell; ``torch.searchsorted`` gives each group's first position. O(P log P) for P
   candidates, on the device, no sync.
3. ``_objectness_target_kernel``: the last candidate of each group writes the cell's objectness
   target into ``tobj``: from its own IoU (the last pair in pair order wins, deterministically),
   or with ``sort_obj_iou`` from the group's highest IoU.
4. ``_objectness_kernel``: every cell's objectness BCE (a partial sum per program) and, with a
   gradient, every row of the gradient: zeros and the objectness term, with p's layout.
5. ``_pair_grad_kernel``: the last candidate of each group adds the box and class terms of the
   group's candidates (in pair order) to its cell's row: duplicates are summed without atomics,
   and each candidate is visited once, so the whole pass is O(P · nc).

Reductions are two-stage and fixed (per-program partials, then ``torch.sum``), so results are
bitwise reproducible. Offsets are int64 (a batch-64, 640x640 ``p`` has more than 2^31 bytes).

Every launch goes through ``_launch`` with keyword arguments; ``record_launches`` captures them
instead of running them, which is how the compile gate (``compile_gate.py``) derives each kernel's
signature from this launcher rather than from a hand-written list.

Float hyperparameters are float32 kernel arguments (Triton's type for a Python float); with a
float64 ``p`` the math runs in float64 and those scalars enter it as their float32 values.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Iterator
from typing import Any

import torch
import triton
import triton.language as tl

from ..config import LossOptions
from ..reference import compute_dtype
from .math import YOLOV3, YOLOV5, bce_with_logits, box_iou, match

KINDS = {"iou": 0, "giou": 1, "diou": 2, "ciou": 3}
FAMILIES = {"yolov3": YOLOV3.value, "yolov5": YOLOV5.value}
#: Candidate blocks per (anchor, target): one cell (YOLOv3); the cell and four neighbours (YOLOv5).
BLOCKS = {"yolov3": 1, "yolov5": 5}
#: Fixed block sizes (one compiled variant per kernel and option set, whatever ``nc`` is).
BLOCK_PAIRS = 64  # candidate pairs per program of the match kernels
BLOCK_CLASSES = 32  # class channels per step of the class loops
BLOCK_CELLS = 128  # cells per program of the objectness kernel
BLOCK_CHANNELS = 32  # gradient channels per step of the objectness kernel's row writes


@triton.jit(do_not_specialize=["num_targets"])
def _match_kernel(
    p_ptr,
    p_stride_b,
    p_stride_a,
    p_stride_y,
    p_stride_x,
    p_stride_c,
    targets_ptr,
    anchors_ptr,
    num_targets,
    num_anchors,
    num_candidates,
    grid_h,
    grid_w,
    num_classes,
    num_cells,
    threshold,
    cls_pos,
    cls_neg,
    cls_pos_weight,
    focal_gamma,
    valid_ptr,
    key_ptr,
    iou_ptr,
    iou_grad_ptr,
    cls_loss_ptr,
    cls_ptr,
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
    """Match, box IoU with its gradient, class BCE and the cell (sort key) of ``BLOCK_PAIRS`` candidates.

    Args:
        p_ptr, p_stride_*: one layer's ``p [bs, na, ny, nx, 5 + nc]`` and its strides (elements).
        targets_ptr: ``[nt, 6]`` rows ``(image, class, x, y, w, h)`` (normalised), compute dtype.
        anchors_ptr: ``[na, 2]`` anchor sizes in grid units, compute dtype.
        num_targets, num_anchors, grid_h, grid_w, num_classes: ``nt``, ``na``, ``ny``, ``nx``, ``nc``.
        num_candidates: ``blocks * na * nt`` (blocks: 1 for YOLOv3, 5 for YOLOv5).
        num_cells: ``bs * na * ny * nx``, the sort key of an unmatched candidate.
        threshold: ``iou_t`` (YOLOv3: matched when wh-IoU > it) or ``anchor_t`` (YOLOv5: matched
            when the worst wh ratio < it).
        cls_pos, cls_neg: the class targets after label smoothing.
        cls_pos_weight, focal_gamma: the class BCE's ``pos_weight`` and focal gamma.
        valid_ptr .. cls_ptr: per candidate outputs ``[num_candidates]`` (``iou_grad_ptr``:
            ``[num_candidates, 4]``): matched flag (int8), flat cell index or ``num_cells`` when
            unmatched (int64), IoU, d IoU / d box logits, summed class BCE, class id (int64).
        matched_target_ptr: with ``STATS``, ``[nt]`` int8 flags (shared by the layers): set to 1 for
            each target a candidate matched (every writer stores the same value).
        FAMILY: ``math.YOLOV3`` or ``math.YOLOV5``.
        BOX_KIND: 0 IoU, 1 GIoU, 2 DIoU, 3 CIoU. FOCAL: focal class BCE. HAS_CLS: ``nc > 1``.
        COMPUTE_DTYPE: float32, or float64 for a float64 ``p``.
    """
    pid = tl.program_id(0).to(tl.int64)
    k = pid * BLOCK_PAIRS + tl.arange(0, BLOCK_PAIRS)  # candidate = (block * na + anchor) * nt + target
    in_range = k < num_candidates
    row = k // num_targets  # launched only when nt > 0
    j = k - row * num_targets
    block = row // num_anchors
    a = row - block * num_anchors
    aw = tl.load(anchors_ptr + 2 * a, mask=in_range, other=1.0).to(COMPUTE_DTYPE)
    ah = tl.load(anchors_ptr + 2 * a + 1, mask=in_range, other=1.0).to(COMPUTE_DTYPE)
    valid, bi, ci, gj, gi, tx, ty, gw, gh = match(
        targets_ptr + 6 * j, aw, ah, grid_h, grid_w, threshold, in_range, block, COMPUTE_DTYPE, FAMILY
    )

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
    tl.store(valid_ptr + k, valid.to(tl.int8), mask=in_range)
    tl.store(key_ptr + k, tl.where(valid, cell, num_cells), mask=in_range)
    tl.store(iou_ptr + k, iou.to(COMPUTE_DTYPE), mask=in_range)
    tl.store(iou_grad_ptr + 4 * k, d0.to(COMPUTE_DTYPE), mask=in_range)
    tl.store(iou_grad_ptr + 4 * k + 1, d1.to(COMPUTE_DTYPE), mask=in_range)
    tl.store(iou_grad_ptr + 4 * k + 2, d2.to(COMPUTE_DTYPE), mask=in_range)
    tl.store(iou_grad_ptr + 4 * k + 3, d3.to(COMPUTE_DTYPE), mask=in_range)
    tl.store(cls_loss_ptr + k, cls_loss, mask=in_range)
    tl.store(cls_ptr + k, ci, mask=in_range)
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
    gr,
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
        num_candidates, num_cells: the candidate capacity and ``bs * na * ny * nx``.
        gr: the IoU ratio of the objectness target.
    """
    i = tl.program_id(0).to(tl.int64)
    won, cell = _is_group_end(sorted_key_ptr, i, num_candidates, num_cells)
    if won:
        best = tl.maximum(tl.load(iou_ptr + tl.load(order_ptr + i)).to(COMPUTE_DTYPE), 0.0)
        if SORT_OBJ_IOU:
            for j in range(tl.load(group_start_ptr + i), i):
                best = tl.maximum(best, tl.load(iou_ptr + tl.load(order_ptr + j)).to(COMPUTE_DTYPE))
        tl.store(tobj_ptr + cell, ((1.0 - gr) + gr * best).to(COMPUTE_DTYPE))


@triton.jit
def _cell_rows(
    cell,
    num_anchors,
    grid_h,
    grid_w,
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
    """Pointers to the rows of ``p`` and of its gradient at flat cell index(es) ``cell``
    (``((image * na + anchor) * ny + y) * nx + x``), each tensor with its own strides."""
    x = cell % grid_w
    y = (cell // grid_w) % grid_h
    a = (cell // (grid_w * grid_h)) % num_anchors
    b = cell // (grid_w * grid_h * num_anchors)
    p_row = p_ptr + b * p_stride_b + a * p_stride_a + y * p_stride_y + x * p_stride_x
    g_row = grad_ptr + b * grad_stride_b + a * grad_stride_a + y * grad_stride_y + x * grad_stride_x
    return p_row, g_row


@triton.jit
def _objectness_kernel(
    p_ptr,
    p_stride_b,
    p_stride_a,
    p_stride_y,
    p_stride_x,
    p_stride_c,
    grad_ptr,
    grad_stride_b,
    grad_stride_a,
    grad_stride_y,
    grad_stride_x,
    grad_stride_c,
    tobj_ptr,
    partial_ptr,
    obj_stats_ptr,
    balance_ptr,
    layer,
    num_cells,
    num_anchors,
    grid_h,
    grid_w,
    num_outputs,
    obj_pos_weight,
    focal_gamma,
    obj_scale,
    FOCAL: tl.constexpr,
    HAS_BALANCE: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    STATS: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
    BLOCK_CELLS: tl.constexpr,
    BLOCK_CHANNELS: tl.constexpr,
):
    """The objectness BCE of ``BLOCK_CELLS`` cells and, with ``WRITE_GRAD``, their gradient rows.

    Args:
        p_ptr, p_stride_*: one layer's ``p`` and its strides (elements).
        grad_ptr, grad_stride_*: its gradient (p's dtype and layout); unused without ``WRITE_GRAD``.
        tobj_ptr: ``[bs * na * ny * nx]`` objectness targets (compute dtype).
        partial_ptr: one partial loss sum per program (compute dtype), reduced by the caller.
        obj_stats_ptr: with ``STATS``, per program the sum of squares and the largest magnitude of
            the objectness gradient of its cells (``[programs, 2]``, compute dtype).
        balance_ptr, layer: with ``HAS_BALANCE``, the per-layer objectness weights (device, compute
            dtype) and this layer's index: the gradient is also scaled by ``balance[layer]``.
        num_cells, num_anchors, grid_h, grid_w, num_outputs: ``bs * na * ny * nx``, ``na``, ``ny``,
            ``nx``, ``5 + nc``.
        obj_pos_weight, focal_gamma: the objectness BCE's ``pos_weight`` and focal gamma.
        obj_scale: the gain that turns the element gradient into d loss / d logit.
    """
    pid = tl.program_id(0).to(tl.int64)
    cell = pid * BLOCK_CELLS + tl.arange(0, BLOCK_CELLS)
    m = cell < num_cells
    p_row, g_row = _cell_rows(
        cell,
        num_anchors,
        grid_h,
        grid_w,
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
    target = tl.load(tobj_ptr + cell, mask=m, other=0.0)
    loss, grad = bce_with_logits(logit, target, obj_pos_weight, focal_gamma, FOCAL)
    tl.store(partial_ptr + pid, tl.sum(tl.where(m, loss, 0.0), axis=0).to(COMPUTE_DTYPE))
    if WRITE_GRAD or STATS:
        g_obj = grad * obj_scale
        if HAS_BALANCE:
            g_obj = g_obj * tl.load(balance_ptr + layer).to(COMPUTE_DTYPE)
    if STATS:
        g_in = tl.where(m, g_obj, 0.0)
        tl.store(obj_stats_ptr + 2 * pid, tl.sum(g_in * g_in, axis=0).to(COMPUTE_DTYPE))
        tl.store(obj_stats_ptr + 2 * pid + 1, tl.max(tl.abs(g_in), axis=0).to(COMPUTE_DTYPE))
    if WRITE_GRAD:
        g_obj = g_obj[:, None]
        # rows are written whole (zeros and the objectness term): the gradient is written once
        for c0 in range(0, num_outputs, BLOCK_CHANNELS):
            ch = c0 + tl.arange(0, BLOCK_CHANNELS)
            values = tl.where(ch[None, :] == 4, g_obj, 0.0)
            mask = m[:, None] & (ch < num_outputs)[None, :]
            tl.store(g_row[:, None] + ch[None, :] * grad_stride_c, values.to(grad_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["num_candidates"])
def _pair_grad_kernel(
    p_ptr,
    p_stride_b,
    p_stride_a,
    p_stride_y,
    p_stride_x,
    p_stride_c,
    grad_ptr,
    grad_stride_b,
    grad_stride_a,
    grad_stride_y,
    grad_stride_x,
    grad_stride_c,
    sorted_key_ptr,
    order_ptr,
    group_start_ptr,
    iou_grad_ptr,
    cls_ptr,
    scale_ptr,
    pair_stats_ptr,
    num_candidates,
    num_cells,
    num_anchors,
    grid_h,
    grid_w,
    num_classes,
    cls_pos,
    cls_neg,
    cls_pos_weight,
    focal_gamma,
    FOCAL: tl.constexpr,
    HAS_CLS: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    STATS: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
    BLOCK_CLASSES: tl.constexpr,
):
    """One program per sorted position: the last candidate of each cell's group adds the box and
    class gradient terms of every candidate of the group (in pair order) to the cell's row
    (``WRITE_GRAD``) and, with ``STATS``, writes their sums of squares and largest magnitudes to
    ``pair_stats_ptr`` (``[positions, 4]``: box, box, class, class; zero-initialised).

    Args:
        p_ptr, p_stride_*, grad_ptr, grad_stride_*: as in ``_objectness_kernel``.
        sorted_key_ptr, order_ptr: the candidates' keys sorted (stable) and the sorting permutation.
        group_start_ptr: per sorted position, the first position of its key's group.
        iou_grad_ptr, cls_ptr: written by ``_match_kernel`` (candidate order).
        scale_ptr: ``[2]`` device scalars (compute dtype): the box and class gains over the pair count.
        num_candidates, num_cells: the candidate capacity and ``bs * na * ny * nx``.
        Other scalars as in ``_match_kernel``.
    """
    i = tl.program_id(0).to(tl.int64)
    won, cell = _is_group_end(sorted_key_ptr, i, num_candidates, num_cells)
    if won:
        first = tl.load(group_start_ptr + i)
        box_scale = tl.load(scale_ptr)
        cls_scale = tl.load(scale_ptr + 1)
        p_row, g_row = _cell_rows(
            cell,
            num_anchors,
            grid_h,
            grid_w,
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


@dataclasses.dataclass
class Launch:
    """One recorded kernel launch: the kernel, its grid and its keyword arguments."""

    kernel: Any
    grid: tuple
    arguments: dict


_RECORDER: contextvars.ContextVar[list | None] = contextvars.ContextVar("yolo_kernels_triton_recorder", default=None)


def _launch(kernel, grid: tuple, **arguments) -> None:
    recorded = _RECORDER.get()
    if recorded is not None:
        recorded.append(Launch(kernel, grid, arguments))
        return
    kernel[grid](**arguments)


@contextlib.contextmanager
def record_launches() -> Iterator[list[Launch]]:
    """Within the block, ``fused_loss`` records its launches (kernel, grid, arguments) instead of
    running them: it then runs on any tensors, with no GPU (its outputs are left uninitialised)."""
    launches: list[Launch] = []
    token = _RECORDER.set(launches)
    try:
        yield launches
    finally:
        _RECORDER.reset(token)


def _strides(prefix: str, t: torch.Tensor) -> dict:
    return {f"{prefix}_stride_{axis}": s for axis, s in zip("bayxc", t.stride())}


@dataclasses.dataclass
class _Candidates:
    """Per-candidate buffers of one layer, written by ``_match_kernel``."""

    valid: torch.Tensor
    key: torch.Tensor
    iou: torch.Tensor
    iou_grad: torch.Tensor
    cls_loss: torch.Tensor
    cls: torch.Tensor

    @classmethod
    def empty(cls, n: int, dtype: torch.dtype, device: torch.device) -> _Candidates:
        def new(*shape, dt=dtype):
            return torch.empty(*shape, dtype=dt, device=device)

        return cls(new(n, dt=torch.int8), new(n, dt=torch.int64), new(n), new(n, 4), new(n), new(n, dt=torch.int64))


@dataclasses.dataclass
class _LayerState:
    """What the first pass over a layer leaves for the second: its shapes, candidates, their
    grouping by cell (``None`` without candidates) and the objectness targets."""

    p: torch.Tensor
    na: int
    ny: int
    nx: int
    n_cand: int
    n_cells: int
    cand: _Candidates
    groups: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None  # sorted keys, order, group starts
    tobj: torch.Tensor


def fused_loss(p, targets, anchors, options: LossOptions, compute_grad: bool = True, balance=None, compute_stats=False):
    """``(loss [1], loss_items [4], layer_obj [nl], stats [nl + 1, 8] or [0, 8], [d loss / d p[i]])``
    (the op's outputs; ``stats``: per layer the sums of squares and largest magnitudes of the
    box / objectness / class gradient, matched pairs, duplicate pairs; last row: unmatched targets) for
    float16/bfloat16/float32 ``p`` (math in float32; float64 ``p`` in float64) on the device of
    ``p`` (CUDA, or CPU under ``TRITON_INTERPRET=1``). ``balance [nl]`` (a device tensor, or
    ``None``: ones) weighs each layer's objectness term. No host sync: every shape follows from
    the input shapes."""
    o = options
    device = p[0].device
    dtype = compute_dtype(p[0].dtype)
    tl_dtype = tl.float64 if dtype == torch.float64 else tl.float32
    bs, no = p[0].shape[0], p[0].shape[4]
    nc = no - 5
    t = targets.to(device=device, dtype=dtype).contiguous()
    nt = t.shape[0]
    focal, has_cls = o.fl_gamma > 0, nc > 1
    cls_pos, cls_neg = (float(v) for v in o.smooth_targets)
    sum_red = o.reduction == "sum"
    out_scale = float(bs) if o.family == "yolov5" else 1.0  # the YOLOv5 loss is the sum times the batch size
    if balance is not None:
        balance = balance.to(device=device, dtype=dtype).contiguous()
    scalars = dict(cls_pos_weight=float(o.cls_pw), focal_gamma=float(o.fl_gamma))
    matched_targets = torch.zeros(nt if compute_stats else 0, dtype=torch.int8, device=device)

    layers = []
    for pi, anchor_vec in zip(p, anchors):
        na, ny, nx = pi.shape[1], pi.shape[2], pi.shape[3]
        n_cand, n_cells = BLOCKS[o.family] * na * nt, bs * na * ny * nx
        cand = _Candidates.empty(n_cand, dtype, device)
        tobj = torch.zeros(n_cells, dtype=dtype, device=device)
        groups = None
        if n_cand:
            _launch(
                _match_kernel,
                (triton.cdiv(n_cand, BLOCK_PAIRS),),
                p_ptr=pi,
                **_strides("p", pi),
                targets_ptr=t,
                anchors_ptr=anchor_vec.to(device=device, dtype=dtype).contiguous(),
                num_targets=nt,
                num_anchors=na,
                num_candidates=n_cand,
                grid_h=ny,
                grid_w=nx,
                num_classes=nc,
                num_cells=n_cells,
                threshold=float(o.match_threshold),
                cls_pos=cls_pos,
                cls_neg=cls_neg,
                **scalars,
                valid_ptr=cand.valid,
                key_ptr=cand.key,
                iou_ptr=cand.iou,
                iou_grad_ptr=cand.iou_grad,
                cls_loss_ptr=cand.cls_loss,
                cls_ptr=cand.cls,
                matched_target_ptr=matched_targets if compute_stats else cand.valid,  # unread without STATS
                FAMILY=FAMILIES[o.family],
                BOX_KIND=KINDS[o.box_loss],
                FOCAL=focal,
                HAS_CLS=has_cls,
                STATS=compute_stats,
                COMPUTE_DTYPE=tl_dtype,
                BLOCK_PAIRS=BLOCK_PAIRS,
                BLOCK_CLASSES=BLOCK_CLASSES,
            )
            # group the candidates by cell, in pair order within a cell (stable), unmatched ones last
            sorted_key, order = torch.sort(cand.key, stable=True)
            groups = (sorted_key, order, torch.searchsorted(sorted_key, sorted_key))
            _launch(
                _objectness_target_kernel,
                (n_cand,),
                sorted_key_ptr=sorted_key,
                order_ptr=order,
                group_start_ptr=groups[2],
                iou_ptr=cand.iou,
                tobj_ptr=tobj,
                num_candidates=n_cand,
                num_cells=n_cells,
                gr=float(o.objectness_gr),
                SORT_OBJ_IOU=o.sort_obj_iou,
                COMPUTE_DTYPE=tl_dtype,
            )
        layers.append(_LayerState(pi, na, ny, nx, n_cand, n_cells, cand, groups, tobj))

    # pair counts and the scales of the box and class terms: device tensors, no sync
    counts = [layer.cand.valid.sum(dtype=dtype) for layer in layers]
    n_total = torch.stack(counts).sum()
    grads, lbox, lobj, lcls, layer_obj, layer_stats = [], 0.0, 0.0, 0.0, [], []
    for index, (layer, n_i) in enumerate(zip(layers, counts)):
        pi, na, ny, nx, n_cand, n_cells = layer.p, layer.na, layer.ny, layer.nx, layer.n_cand, layer.n_cells
        cand, groups, tobj = layer.cand, layer.groups, layer.tobj
        n_pairs = n_total if sum_red else n_i
        safe = n_pairs.clamp(min=1.0)
        gain = 3.0 if sum_red else 1.0
        box_scale = torch.where(n_pairs > 0, o.giou * gain / safe, 0.0)
        cls_scale = torch.where(n_pairs > 0, o.cls * gain / (safe * nc), 0.0) if has_cls else torch.zeros_like(safe)
        obj_scale = o.obj * 3.0 / bs if sum_red else o.obj / n_cells
        if n_cand:
            lbox = lbox + box_scale * torch.where(cand.valid != 0, 1.0 - cand.iou, 0.0).sum()
            if has_cls:
                lcls = lcls + cls_scale * cand.cls_loss.sum()

        grad = torch.empty_like(pi) if compute_grad else pi.new_empty(0)
        n_prog = triton.cdiv(n_cells, BLOCK_CELLS)
        partial = torch.empty(n_prog, dtype=dtype, device=device)
        obj_stats = torch.empty(n_prog if compute_stats else 0, 2, dtype=dtype, device=device)
        # without a gradient the kernel never touches grad_ptr: p's strides stand in for its own
        grad_strides = _strides("grad", grad if compute_grad else pi)
        _launch(
            _objectness_kernel,
            (n_prog,),
            p_ptr=pi,
            **_strides("p", pi),
            grad_ptr=grad if compute_grad else pi,
            **grad_strides,
            tobj_ptr=tobj,
            partial_ptr=partial,
            obj_stats_ptr=obj_stats if compute_stats else partial,  # unread without STATS
            balance_ptr=balance if balance is not None else partial,  # unread without HAS_BALANCE
            layer=index,
            num_cells=n_cells,
            num_anchors=na,
            grid_h=ny,
            grid_w=nx,
            num_outputs=no,
            obj_pos_weight=float(o.obj_pw),
            focal_gamma=float(o.fl_gamma),
            obj_scale=float(obj_scale * out_scale),
            FOCAL=focal,
            HAS_BALANCE=balance is not None,
            WRITE_GRAD=compute_grad,
            STATS=compute_stats,
            COMPUTE_DTYPE=tl_dtype,
            BLOCK_CELLS=BLOCK_CELLS,
            BLOCK_CHANNELS=BLOCK_CHANNELS,
        )
        obj_sum = partial.sum()
        layer_obj.append(obj_sum / n_cells)
        lobj = lobj + obj_scale * (obj_sum if balance is None else obj_sum * balance[index])
        pair_stats = torch.zeros(n_cand if compute_stats else 0, 4, dtype=dtype, device=device)
        if (compute_grad or compute_stats) and n_cand:
            scales = (torch.stack((box_scale, cls_scale)) * out_scale).to(dtype)
            sorted_key, order, group_start = groups
            _launch(
                _pair_grad_kernel,
                (n_cand,),
                p_ptr=pi,
                **_strides("p", pi),
                grad_ptr=grad,
                **grad_strides,
                sorted_key_ptr=sorted_key,
                order_ptr=order,
                group_start_ptr=group_start,
                iou_grad_ptr=cand.iou_grad,
                cls_ptr=cand.cls,
                scale_ptr=scales,
                pair_stats_ptr=pair_stats if compute_stats else scales,  # unread without STATS
                num_candidates=n_cand,
                num_cells=n_cells,
                num_anchors=na,
                grid_h=ny,
                grid_w=nx,
                num_classes=nc,
                cls_pos=cls_pos,
                cls_neg=cls_neg,
                **scalars,
                FOCAL=focal,
                HAS_CLS=has_cls,
                WRITE_GRAD=compute_grad,
                STATS=compute_stats,
                COMPUTE_DTYPE=tl_dtype,
                BLOCK_CLASSES=BLOCK_CLASSES,
            )
        if compute_stats:
            layer_stats.append(_layer_stats(obj_stats, pair_stats, n_i, groups, n_cells))
        grads.append(grad)

    zero = torch.zeros((), dtype=dtype, device=device)
    items = torch.stack([zero + lbox, zero + lobj, zero + lcls])
    items = torch.cat((items, items.sum().reshape(1)))
    if compute_stats:  # the op's layout: a row per layer, then the unmatched targets
        last = torch.cat(((matched_targets == 0).sum().to(dtype).reshape(1), zero.new_zeros(7)))
        stats = torch.cat((torch.stack(layer_stats), last[None]))
    else:
        stats = torch.empty(0, 8, dtype=dtype, device=device)
    return items[3:] * out_scale, items, torch.stack(layer_obj).to(dtype), stats, grads


def _layer_stats(obj_stats, pair_stats, n_pairs, groups, n_cells) -> torch.Tensor:
    """One layer's ``[8]`` statistics from the kernels' per-program / per-position values: device
    reductions only (no sync)."""
    zero = n_pairs.new_zeros(())
    if groups is not None:  # distinct matched cells: the group ends among the sorted keys
        sorted_key = groups[0]
        following = torch.cat((sorted_key[1:], sorted_key.new_full((1,), n_cells)))
        cells = ((sorted_key < n_cells) & (sorted_key != following)).sum().to(n_pairs.dtype)
    else:
        cells = zero
    box_sq = pair_stats[:, 0].sum() if pair_stats.numel() else zero
    cls_sq = pair_stats[:, 2].sum() if pair_stats.numel() else zero
    box_max = pair_stats[:, 1].amax() if pair_stats.numel() else zero
    cls_max = pair_stats[:, 3].amax() if pair_stats.numel() else zero
    obj_sq, obj_max = obj_stats[:, 0].sum(), obj_stats[:, 1].amax()
    return torch.stack((box_sq, obj_sq, cls_sq, box_max, obj_max, cls_max, n_pairs, n_pairs - cells))
