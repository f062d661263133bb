"""The fused YOLOv3 loss in Triton: every shape is known from the input shapes (no host sync).

Per layer, with a fixed capacity of ``na * nt`` candidate pairs in pair order (anchor-major) and a
validity mask instead of compaction:

1. ``_pair_kernel``: match each candidate (wh_iou > iou_t, clamped cell), gather its row, compute
   the IoU-family value and its gradient w.r.t. the 4 box logits (dual numbers), the summed class
   BCE, and claim its cell with an int32 ``atomic_max`` of the pair index: the *last* pair wins,
   deterministically (max does not depend on the order the atomics land in).
2. ``_tobj_kernel``: each winning pair writes its objectness target into the per-cell ``tobj``.
3. ``_objectness_kernel``: every cell's objectness BCE (a partial sum per program) and, with a
   gradient, every row of the gradient: zeros and the objectness term, with p's layout.
4. ``_pair_grad_kernel``: each winning pair adds the box and class terms of *all* pairs of its cell
   (a fixed-order scan over the candidates) to its row: duplicates are summed without atomics.

Reductions are two-stage and fixed (per-program partials, then ``torch.sum``), so results are
bitwise reproducible. Offsets are int64 (a batch-64, 640x640 ``p`` has more than 2^31 bytes).

Pointers/strides: ``p`` and the gradient are addressed as ``b*s0 + a*s1 + y*s2 + x*s3 + c*s4``
with their own strides; candidate arrays are dense ``[na * nt]``. Constexprs: ``KIND`` (0 iou,
1 giou, 2 diou, 3 ciou), ``FOCAL``, ``HAS_CLS`` (nc > 1), ``WRITE_GRAD``, block sizes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..config import LossOptions
from .math import bce_with_logits, box_iou_dual

KINDS = {"iou": 0, "giou": 1, "diou": 2, "ciou": 3}


@triton.jit
def _pair_kernel(
    p_ptr, s0, s1, s2, s3, s4,
    t_ptr, anchors_ptr, nt, na, ny, nx, nc, iou_t, gr, cp, cn, cls_pw, gamma,
    valid_ptr, cell_ptr, score_ptr, iou_ptr, diou_ptr, cls_loss_ptr, cls_ptr, winner_ptr,
    KIND: tl.constexpr, FOCAL: tl.constexpr, HAS_CLS: tl.constexpr, CDT: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0).to(tl.int64)
    k = pid * BLOCK_P + tl.arange(0, BLOCK_P)  # candidate = a * nt + target
    in_range = k < na * nt
    a = k // tl.maximum(nt, 1)
    j = k - a * nt
    aw = tl.load(anchors_ptr + 2 * a, mask=in_range, other=1.0).to(CDT)
    ah = tl.load(anchors_ptr + 2 * a + 1, mask=in_range, other=1.0).to(CDT)
    row = t_ptr + 6 * j
    b = tl.load(row, mask=in_range, other=0.0).to(CDT)
    c = tl.load(row + 1, mask=in_range, other=0.0).to(CDT)
    gx = tl.load(row + 2, mask=in_range, other=0.0).to(CDT) * nx
    gy = tl.load(row + 3, mask=in_range, other=0.0).to(CDT) * ny
    gw = tl.load(row + 4, mask=in_range, other=1.0).to(CDT) * nx
    gh = tl.load(row + 5, mask=in_range, other=1.0).to(CDT) * ny
    inter = tl.minimum(aw, gw) * tl.minimum(ah, gh)
    valid = in_range & (inter / (aw * ah + gw * gh - inter) > iou_t)
    # trunc toward zero then clamp == trunc of the clamped value
    gi = tl.minimum(tl.maximum(gx, 0.0), nx - 1.0).to(tl.int64)
    gj = tl.minimum(tl.maximum(gy, 0.0), ny - 1.0).to(tl.int64)
    bi = b.to(tl.int64)
    ci = c.to(tl.int64)
    tx = gx - gi.to(CDT)
    ty = gy - gj.to(CDT)

    base = p_ptr + bi * s0 + a * s1 + gj * s2 + gi * s3
    x0 = tl.load(base, mask=valid, other=0.0).to(CDT)
    x1 = tl.load(base + s4, mask=valid, other=0.0).to(CDT)
    x2 = tl.load(base + 2 * s4, mask=valid, other=0.0).to(CDT)
    x3 = tl.load(base + 3 * s4, mask=valid, other=0.0).to(CDT)
    iou, d0, d1, d2, d3 = box_iou_dual(x0, x1, x2, x3, aw, ah, tx, ty, gw, gh, KIND)
    iou = tl.where(valid, iou, 0.0)

    cls_loss = tl.zeros([BLOCK_P], dtype=CDT)
    if HAS_CLS:
        offs_c = tl.arange(0, BLOCK_C)
        for c0 in range(0, nc, BLOCK_C):
            cc = c0 + offs_c
            m = valid[:, None] & (cc < nc)[None, :]
            xc = tl.load(base[:, None] + (5 + cc)[None, :] * s4, mask=m, other=0.0).to(CDT)
            yc = tl.where(cc[None, :] == ci[:, None], cp, cn)
            lc, _ = bce_with_logits(xc, yc, cls_pw, gamma, FOCAL)
            cls_loss += tl.sum(tl.where(m, lc, 0.0), axis=1)

    cell = ((bi * na + a) * ny + gj) * nx + gi
    tl.store(valid_ptr + k, valid.to(tl.int8), mask=in_range)
    tl.store(cell_ptr + k, cell, mask=in_range)
    tl.store(score_ptr + k, (1.0 - gr) + gr * tl.maximum(iou, 0.0), mask=in_range)
    tl.store(iou_ptr + k, iou, mask=in_range)
    tl.store(diou_ptr + 4 * k, d0, mask=in_range)
    tl.store(diou_ptr + 4 * k + 1, d1, mask=in_range)
    tl.store(diou_ptr + 4 * k + 2, d2, mask=in_range)
    tl.store(diou_ptr + 4 * k + 3, d3, mask=in_range)
    tl.store(cls_loss_ptr + k, cls_loss, mask=in_range)
    tl.store(cls_ptr + k, ci, mask=in_range)
    tl.atomic_max(winner_ptr + cell, k.to(tl.int32), mask=valid)


@triton.jit
def _tobj_kernel(valid_ptr, cell_ptr, score_ptr, winner_ptr, tobj_ptr, n_cand, BLOCK_P: tl.constexpr):
    k = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    m = k < n_cand
    valid = tl.load(valid_ptr + k, mask=m, other=0) != 0
    cell = tl.load(cell_ptr + k, mask=m, other=0)
    won = valid & (tl.load(winner_ptr + cell, mask=valid, other=-1) == k.to(tl.int32))
    tl.store(tobj_ptr + cell, tl.load(score_ptr + k, mask=won, other=0.0), mask=won)


@triton.jit
def _objectness_kernel(
    p_ptr, s0, s1, s2, s3, s4, g_ptr, g0, g1, g2, g3, g4,
    tobj_ptr, partial_ptr, n_cells, na, ny, nx, no, obj_pw, gamma, grad_scale,
    FOCAL: tl.constexpr, WRITE_GRAD: tl.constexpr, CDT: tl.constexpr, BLOCK: tl.constexpr, BLOCK_NO: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0).to(tl.int64)
    cell = pid * BLOCK + tl.arange(0, BLOCK)
    m = cell < n_cells
    x = cell % nx
    y = (cell // nx) % ny
    a = (cell // (nx * ny)) % na
    b = cell // (nx * ny * na)
    logit = tl.load(p_ptr + b * s0 + a * s1 + y * s2 + x * s3 + 4 * s4, mask=m, other=0.0).to(CDT)
    target = tl.load(tobj_ptr + cell, mask=m, other=0.0)
    loss, grad = bce_with_logits(logit, target, obj_pw, gamma, FOCAL)
    tl.store(partial_ptr + pid, tl.sum(tl.where(m, loss, 0.0), axis=0))
    if WRITE_GRAD:
        ch = tl.arange(0, BLOCK_NO)
        rows = g_ptr + b * g0 + a * g1 + y * g2 + x * g3
        values = tl.where(ch[None, :] == 4, (grad * grad_scale)[:, None], 0.0)
        tl.store(rows[:, None] + ch[None, :] * g4, values.to(g_ptr.dtype.element_ty), mask=m[:, None] & (ch < no)[None, :])


@triton.jit
def _pair_grad_kernel(
    p_ptr, s0, s1, s2, s3, s4, g_ptr, g0, g1, g2, g3, g4,
    valid_ptr, cell_ptr, diou_ptr, cls_ptr, winner_ptr, scale_ptr,
    n_cand, na, ny, nx, nc, cp, cn, cls_pw, gamma,
    FOCAL: tl.constexpr, HAS_CLS: tl.constexpr, CDT: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    j = tl.program_id(0).to(tl.int64)
    valid = tl.load(valid_ptr + j) != 0
    cell = tl.load(cell_ptr + j)
    won = valid & (tl.load(winner_ptr + cell, mask=valid, other=-1) == j.to(tl.int32))
    if won:
        box_scale = tl.load(scale_ptr)
        cls_scale = tl.load(scale_ptr + 1)
        x = cell % nx
        y = (cell // nx) % ny
        a = (cell // (nx * ny)) % na
        b = cell // (nx * ny * na)
        g_row = g_ptr + b * g0 + a * g1 + y * g2 + x * g3
        p_row = p_ptr + b * s0 + a * s1 + y * s2 + x * s3
        # all pairs of this cell, scanned in candidate order
        offs = tl.arange(0, BLOCK_Q)
        acc = tl.zeros([4], dtype=CDT)
        four = tl.arange(0, 4)
        n_same = tl.zeros([BLOCK_Q], dtype=CDT)
        for q0 in range(0, n_cand, BLOCK_Q):
            q = q0 + offs
            mq = q < n_cand
            same = mq & (tl.load(valid_ptr + q, mask=mq, other=0) != 0) & (tl.load(cell_ptr + q, mask=mq, other=-1) == cell)
            d = tl.load(diou_ptr + 4 * q[:, None] + four[None, :], mask=same[:, None], other=0.0)
            acc += tl.sum(d, axis=0)
            n_same += same.to(CDT)
        g_box = g_row + four * g4
        tl.store(g_box, (tl.load(g_box).to(CDT) - box_scale * acc).to(g_ptr.dtype.element_ty))
        if HAS_CLS:
            count = tl.sum(n_same, axis=0)
            offs_c = tl.arange(0, BLOCK_C)
            for c0 in range(0, nc, BLOCK_C):
                cc = c0 + offs_c
                mc = cc < nc
                xc = tl.load(p_row + (5 + cc) * s4, mask=mc, other=0.0).to(CDT)
                # sum over the cell's pairs of d BCE(x, y_pair): target cn everywhere but the pair's class
                _, g_neg = bce_with_logits(xc, cn + xc * 0.0, cls_pw, gamma, FOCAL)
                _, g_pos = bce_with_logits(xc, cp + xc * 0.0, cls_pw, gamma, FOCAL)
                hits = tl.zeros([BLOCK_C], dtype=CDT)
                for q0 in range(0, n_cand, BLOCK_Q):
                    q = q0 + offs
                    mq = q < n_cand
                    same = mq & (tl.load(valid_ptr + q, mask=mq, other=0) != 0) & (tl.load(cell_ptr + q, mask=mq, other=-1) == cell)
                    cls_q = tl.load(cls_ptr + q, mask=same, other=-1)
                    hits += tl.sum((same[:, None] & (cls_q[:, None] == cc[None, :])).to(CDT), axis=0)
                total = count * g_neg + hits * (g_pos - g_neg)
                g_cls = g_row + (5 + cc) * g4
                old = tl.load(g_cls, mask=mc, other=0.0).to(CDT)
                tl.store(g_cls, (old + cls_scale * total).to(g_ptr.dtype.element_ty), mask=mc)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def fused_loss(p, targets, anchors, options: LossOptions, compute_grad: bool = True):
    """``(loss [1], loss_items [4], [d loss / d p[i]])`` for float16/bfloat16/float32 ``p`` (math in
    float32; float64 ``p`` in float64) on the device of ``p`` (CUDA, or CPU under
    ``TRITON_INTERPRET=1``). No host sync: every shape follows from the input shapes."""
    o = options
    device = p[0].device
    dtype = torch.float64 if p[0].dtype == torch.float64 else torch.float32
    cdt = tl.float64 if dtype == torch.float64 else tl.float32
    bs, no = p[0].shape[0], p[0].shape[4]
    nc = no - 5
    t = targets.to(device=device, dtype=dtype).contiguous()
    nt = t.shape[0]
    kind, focal, has_cls = KINDS[o.box_loss], o.fl_gamma > 0, nc > 1
    cp, cn = o.smooth_targets
    block_c = min(128, _next_pow2(max(nc, 2)))
    sum_red = o.reduction == "sum"

    layers = []
    for pi, anchor_vec in zip(p, anchors):
        na, ny, nx = pi.shape[1], pi.shape[2], pi.shape[3]
        n_cand, n_cells = na * nt, bs * na * ny * nx
        cand = dict(
            valid=torch.empty(n_cand, dtype=torch.int8, device=device),
            cell=torch.empty(n_cand, dtype=torch.int64, device=device),
            score=torch.empty(n_cand, dtype=dtype, device=device),
            iou=torch.empty(n_cand, dtype=dtype, device=device),
            diou=torch.empty(n_cand, 4, dtype=dtype, device=device),
            cls_loss=torch.empty(n_cand, dtype=dtype, device=device),
            cls=torch.empty(n_cand, dtype=torch.int64, device=device),
        )
        winner = torch.full((n_cells,), -1, dtype=torch.int32, device=device)
        tobj = torch.zeros(n_cells, dtype=dtype, device=device)
        if n_cand:
            block_p = 64
            _pair_kernel[(triton.cdiv(n_cand, block_p),)](
                pi, *pi.stride(), t, anchor_vec.to(device=device, dtype=dtype).contiguous(), nt, na, ny, nx, nc,
                o.iou_t, o.gr, cp, cn, o.cls_pw, o.fl_gamma,
                cand["valid"], cand["cell"], cand["score"], cand["iou"], cand["diou"], cand["cls_loss"], cand["cls"],
                winner, KIND=kind, FOCAL=focal, HAS_CLS=has_cls, CDT=cdt, BLOCK_P=block_p, BLOCK_C=block_c,
            )  # fmt: skip
            _tobj_kernel[(triton.cdiv(n_cand, block_p),)](
                cand["valid"], cand["cell"], cand["score"], winner, tobj, n_cand, BLOCK_P=block_p
            )
        layers.append((pi, na, ny, nx, n_cand, n_cells, cand, winner, tobj))

    # pair counts and the scales of the box and class terms: device tensors, no sync
    counts = [layer[6]["valid"].sum(dtype=dtype) for layer in layers]
    n_total = torch.stack(counts).sum()
    grads, lbox, lobj, lcls = [], 0.0, 0.0, 0.0
    for (pi, na, ny, nx, n_cand, n_cells, cand, winner, tobj), n_i in zip(layers, counts):
        n_pairs = n_total if sum_red else n_i
        safe = n_pairs.clamp(min=1.0)
        gain = 3.0 if sum_red else 1.0
        box_scale = torch.where(n_pairs > 0, o.giou * gain / safe, 0.0)
        cls_scale = torch.where(n_pairs > 0, o.cls * gain / (safe * nc), 0.0) if has_cls else torch.zeros_like(safe)
        obj_scale = o.obj * 3.0 / bs if sum_red else o.obj / n_cells
        if n_cand:
            lbox = lbox + box_scale * torch.where(cand["valid"] != 0, 1.0 - cand["iou"], 0.0).sum()
            if has_cls:
                lcls = lcls + cls_scale * cand["cls_loss"].sum()

        grad = torch.empty_like(pi) if compute_grad else pi.new_empty(0)
        block = 128
        n_prog = triton.cdiv(n_cells, block)
        partial = torch.empty(n_prog, dtype=dtype, device=device)
        g_strides = grad.stride() if compute_grad else (0,) * 5
        _objectness_kernel[(n_prog,)](
            pi, *pi.stride(), grad, *g_strides, tobj, partial, n_cells, na, ny, nx, no, o.obj_pw, o.fl_gamma,
            obj_scale, FOCAL=focal, WRITE_GRAD=compute_grad, CDT=cdt, BLOCK=block, BLOCK_NO=_next_pow2(no),
        )  # fmt: skip
        lobj = lobj + obj_scale * partial.sum()
        if compute_grad and n_cand:
            scales = torch.stack((box_scale, cls_scale)).to(dtype)
            _pair_grad_kernel[(n_cand,)](
                pi, *pi.stride(), grad, *g_strides, cand["valid"], cand["cell"], cand["diou"], cand["cls"], winner,
                scales, n_cand, na, ny, nx, nc, cp, cn, o.cls_pw, o.fl_gamma,
                FOCAL=focal, HAS_CLS=has_cls, CDT=cdt, BLOCK_Q=64, BLOCK_C=block_c,
            )  # fmt: skip
        grads.append(grad)

    zero = torch.zeros((), dtype=dtype, device=device)
    items = torch.stack([zero + lbox, zero + lobj, zero + lcls])
    items = torch.cat((items, items.sum().reshape(1)))
    return items[3:].clone(), items, grads
