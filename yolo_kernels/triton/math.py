"""Element math shared by the Triton kernels: stable BCE pieces, atan, and forward-mode dual numbers
for the IoU family (value and derivatives with respect to the four box logits, as separate values).

No libdevice: everything is written with ``tl.exp`` / ``tl.log`` / arithmetic, so the kernels run on
Triton 3.6 to 3.9 and under the CPU interpreter.

Rules that keep the compiler and the interpreter in agreement (the compile gate,
``python -m yolo_kernels.triton.compile_gate``, checks them for real GPU targets):

* module globals read inside ``@triton.jit`` code are ``tl.constexpr`` (``PI`` below);
* float kernel arguments are annotated ``tl.float64`` and enter the math through ``as_compute``;
* every float literal lies in float32's normal range (>= 2**-126 in magnitude): the compiler types
  a smaller literal such as ``1e-38`` as float64, which then turns float32 math into float64;
* values carried through a loop keep one dtype (they start as ``tl.zeros(..., dtype=...)`` of the
  compute dtype and only absorb values of that dtype).
"""

import triton
import triton.language as tl

PI = tl.constexpr(3.141592653589793)
#: The loss families (constexpr ``FAMILY`` of the kernels): the archive YOLOv3 loss, the YOLOv5-style one.
YOLOV3 = tl.constexpr(0)
YOLOV5 = tl.constexpr(1)


@triton.jit
def as_compute(value, COMPUTE_DTYPE: tl.constexpr):
    """A float kernel argument in the compute dtype. The kernels type their float arguments as
    float64 (an annotation): a float64 ``p`` then gets the hyperparameters exactly, and float32 math
    gets each one rounded once here (a Python float would enter as float32 and cost float64 math
    its last digits). Under the interpreter the argument stays a Python float: the product keeps
    the tensor's dtype."""
    return (value * tl.full([], 1.0, COMPUTE_DTYPE)).to(COMPUTE_DTYPE)


@triton.jit
def div_exact(x, y, COMPUTE_DTYPE: tl.constexpr):
    """``x / y`` rounded to nearest, as PyTorch and the C++ backend divide. Triton's float32 ``/``
    compiles to an approximate division (``div.full.f32``, up to 2 ulp off): harmless in the loss,
    wrong in a matching decision (``wh_iou > iou_t``, the YOLOv5 size ratios), which must agree
    with the reference on every pair."""
    if COMPUTE_DTYPE == tl.float32:
        return tl.math.div_rn(x, y)
    return x / y


@triton.jit
def log1p_unit(e):
    """log1p(e) for e in [0, 1] as 2 atanh(e / (2 + e)): accurate for tiny e too."""
    s = e / (2.0 + e)
    s2 = s * s
    q = 1.0 / 15.0
    q = q * s2 + 1.0 / 13.0
    q = q * s2 + 1.0 / 11.0
    q = q * s2 + 1.0 / 9.0
    q = q * s2 + 1.0 / 7.0
    q = q * s2 + 1.0 / 5.0
    q = q * s2 + 1.0 / 3.0
    q = q * s2 + 1.0
    return 2.0 * s * q


@triton.jit
def sigmoid(x):
    """1 / (1 + exp(-x)) without overflowing exp for very negative x."""
    e = tl.exp(-tl.abs(x))
    inv = 1.0 / (1.0 + e)
    return tl.where(x >= 0, inv, e * inv)


@triton.jit
def bce_with_logits(x, y, pos_weight, gamma, FOCAL: tl.constexpr):
    """BCE with logits (pos_weight; focal factor alpha_t (1 - p_t)^gamma, alpha 0.25, when FOCAL):
    the element loss and its derivative with respect to x."""
    e = tl.exp(-tl.abs(x))
    l1p = log1p_unit(e)
    inv = 1.0 / (1.0 + e)
    sig = tl.where(x >= 0, inv, e * inv)
    neg_log_sig = l1p + tl.maximum(-x, 0.0)
    neg_log_1msig = l1p + tl.maximum(x, 0.0)
    loss = pos_weight * y * neg_log_sig + (1.0 - y) * neg_log_1msig
    grad = sig * (1.0 - y + pos_weight * y) - pos_weight * y
    if FOCAL:
        p_t = y * sig + (1.0 - y) * (1.0 - sig)
        alpha_t = y * 0.25 + (1.0 - y) * 0.75
        one_m_pt = 1.0 - p_t
        safe = tl.where(one_m_pt > 0, one_m_pt, 1.0)  # log(0) guard; those lanes are zeroed below
        mod = tl.where(one_m_pt > 0, tl.exp(gamma * tl.log(safe)), 0.0)
        dmod = tl.where(one_m_pt > 0, gamma * tl.exp((gamma - 1.0) * tl.log(safe)), 0.0)
        dmod = dmod * -((2.0 * y - 1.0) * sig * (1.0 - sig))
        grad = alpha_t * (grad * mod + loss * dmod)
        loss = loss * alpha_t * mod
    return loss, grad


@triton.jit
def atan(x):
    """arctan by argument reduction (|x| > 1 -> 1/x, then x -> (x - 1)/(x + 1)) and a series."""
    t = tl.abs(x)
    big = t > 1.0
    t = tl.where(big, 1.0 / tl.maximum(t, 1e-30), t)
    mid = t > 0.41421356237309503
    u = tl.where(mid, (t - 1.0) / (t + 1.0), t)
    u2 = u * u
    q = 1.0 / 23.0
    q = -q * u2 + 1.0 / 21.0
    q = -q * u2 + 1.0 / 19.0
    q = -q * u2 + 1.0 / 17.0
    q = -q * u2 + 1.0 / 15.0
    q = -q * u2 + 1.0 / 13.0
    q = -q * u2 + 1.0 / 11.0
    q = -q * u2 + 1.0 / 9.0
    q = -q * u2 + 1.0 / 7.0
    q = -q * u2 + 1.0 / 5.0
    q = -q * u2 + 1.0 / 3.0
    q = -q * u2 + 1.0
    r = u * q + tl.where(mid, PI / 4, 0.0)
    r = tl.where(big, PI / 2 - r, r)
    return tl.where(x < 0, -r, r)


# Dual numbers: (v, d0, d1, d2, d3) = a value and its derivatives with respect to the 4 box logits.
@triton.jit
def d_add(av, a0, a1, a2, a3, bv, b0, b1, b2, b3):
    return av + bv, a0 + b0, a1 + b1, a2 + b2, a3 + b3


@triton.jit
def d_sub(av, a0, a1, a2, a3, bv, b0, b1, b2, b3):
    return av - bv, a0 - b0, a1 - b1, a2 - b2, a3 - b3


@triton.jit
def d_mul(av, a0, a1, a2, a3, bv, b0, b1, b2, b3):
    return av * bv, a0 * bv + av * b0, a1 * bv + av * b1, a2 * bv + av * b2, a3 * bv + av * b3


@triton.jit
def d_div(av, a0, a1, a2, a3, bv, b0, b1, b2, b3):
    v = av / bv
    return v, (a0 - v * b0) / bv, (a1 - v * b1) / bv, (a2 - v * b2) / bv, (a3 - v * b3) / bv


@triton.jit
def d_scale(av, a0, a1, a2, a3, c):
    return av * c, a0 * c, a1 * c, a2 * c, a3 * c


@triton.jit
def d_min(av, a0, a1, a2, a3, bv, b0, b1, b2, b3):
    """min with the gradient split evenly on ties (as PyTorch's autograd)."""
    wa = tl.where(av < bv, 1.0, tl.where(av == bv, 0.5, 0.0))
    wb = 1.0 - wa
    return tl.minimum(av, bv), wa * a0 + wb * b0, wa * a1 + wb * b1, wa * a2 + wb * b2, wa * a3 + wb * b3


@triton.jit
def d_max(av, a0, a1, a2, a3, bv, b0, b1, b2, b3):
    wa = tl.where(av > bv, 1.0, tl.where(av == bv, 0.5, 0.0))
    wb = 1.0 - wa
    return tl.maximum(av, bv), wa * a0 + wb * b0, wa * a1 + wb * b1, wa * a2 + wb * b2, wa * a3 + wb * b3


@triton.jit
def d_clamp0(av, a0, a1, a2, a3):
    """clamp(min=0): the gradient passes where the value is >= 0."""
    keep = av >= 0
    return (
        tl.where(keep, av, 0.0),
        tl.where(keep, a0, 0.0),
        tl.where(keep, a1, 0.0),
        tl.where(keep, a2, 0.0),
        tl.where(keep, a3, 0.0),
    )


@triton.jit
def d_atan(av, a0, a1, a2, a3):
    g = 1.0 / (1.0 + av * av)
    return atan(av), a0 * g, a1 * g, a2 * g, a3 * g


@triton.jit
def match(t_row_ptr, aw, ah, grid_h, grid_w, threshold, mask, block, COMPUTE_DTYPE: tl.constexpr, FAMILY: tl.constexpr):
    """Target matching of (target, anchor) pairs (docs/semantics.md "Matching", docs/yolov5.md):
    loads the target rows ``(image, class, x, y, w, h)`` at ``t_row_ptr`` and returns ``(matched,
    image, class, gj, gi, tx, ty, gw, gh)``: whether the pair matches, the image and class ids
    and the clamped cell (int64), and the box target (offsets within the cell, size in grid units).

    YOLOv3: matched when wh_iou > ``threshold`` (``iou_t``); ``block`` is 0. YOLOv5: the pair fits
    when ``max(r, 1 / r) < threshold`` (``anchor_t``) for the w and h ratios, and ``block`` (0..4:
    the centre cell, the neighbour left, above, right, below) must be allowed by the position."""
    b = tl.load(t_row_ptr, mask=mask, other=0.0).to(COMPUTE_DTYPE)
    c = tl.load(t_row_ptr + 1, mask=mask, other=0.0).to(COMPUTE_DTYPE)
    gx = tl.load(t_row_ptr + 2, mask=mask, other=0.0).to(COMPUTE_DTYPE) * grid_w
    gy = tl.load(t_row_ptr + 3, mask=mask, other=0.0).to(COMPUTE_DTYPE) * grid_h
    gw = tl.load(t_row_ptr + 4, mask=mask, other=1.0).to(COMPUTE_DTYPE) * grid_w
    gh = tl.load(t_row_ptr + 5, mask=mask, other=1.0).to(COMPUTE_DTYPE) * grid_h
    if FAMILY == YOLOV5:
        rw = div_exact(gw, aw, COMPUTE_DTYPE)
        rh = div_exact(gh, ah, COMPUTE_DTYPE)
        worst = tl.maximum(
            tl.maximum(rw, div_exact(1.0, rw, COMPUTE_DTYPE)), tl.maximum(rh, div_exact(1.0, rh, COMPUTE_DTYPE))
        )
        far_x = grid_w - gx
        far_y = grid_h - gy
        left = ((gx - tl.floor(gx)) < 0.5) & (gx > 1.0)
        up = ((gy - tl.floor(gy)) < 0.5) & (gy > 1.0)
        right = ((far_x - tl.floor(far_x)) < 0.5) & (far_x > 1.0)
        down = ((far_y - tl.floor(far_y)) < 0.5) & (far_y > 1.0)
        allowed = (block == 0) | ((block == 1) & left) | ((block == 2) & up) | ((block == 3) & right)
        allowed = allowed | ((block == 4) & down)
        matched = mask & (worst < threshold) & allowed
        ox = tl.where(block == 1, 0.5, tl.where(block == 3, -0.5, 0.0))
        oy = tl.where(block == 2, 0.5, tl.where(block == 4, -0.5, 0.0))
        cx = gx - ox
        cy = gy - oy
    else:
        inter = tl.minimum(aw, gw) * tl.minimum(ah, gh)
        matched = mask & (div_exact(inter, aw * ah + gw * gh - inter, COMPUTE_DTYPE) > threshold)
        cx = gx
        cy = gy
    # trunc toward zero then clamp == trunc of the clamped value
    gi = tl.minimum(tl.maximum(cx, 0.0), grid_w - 1.0).to(tl.int64)
    gj = tl.minimum(tl.maximum(cy, 0.0), grid_h - 1.0).to(tl.int64)
    tx = gx - gi.to(COMPUTE_DTYPE)
    ty = gy - gj.to(COMPUTE_DTYPE)
    return matched, b.to(tl.int64), c.to(tl.int64), gj, gi, tx, ty, gw, gh


@triton.jit
def predicted_box(x0, x1, x2, x3, aw, ah, FAMILY: tl.constexpr):
    """The box the logits x0..x3 predict with anchor (aw, ah): ``(sx, sy, pw, ph, dsx, dsy, dpw,
    dph)`` = centre within the cell, size, and each one's derivative with respect to its own logit.

    YOLOv3: ``sigmoid(xy)``, ``exp(wh).clamp(max=1e3) * anchor`` (exp capped at e^30: same values,
    and a zero rather than a NaN gradient for huge logits). YOLOv5: ``2 sigmoid(xy) - 0.5``,
    ``(2 sigmoid(wh))^2 * anchor``."""
    sx = sigmoid(x0)
    sy = sigmoid(x1)
    if FAMILY == YOLOV5:
        sw = sigmoid(x2)
        sh = sigmoid(x3)
        return (
            sx * 2.0 - 0.5,
            sy * 2.0 - 0.5,
            4.0 * sw * sw * aw,
            4.0 * sh * sh * ah,
            2.0 * sx * (1 - sx),
            2.0 * sy * (1 - sy),
            8.0 * sw * sw * (1 - sw) * aw,
            8.0 * sh * sh * (1 - sh) * ah,
        )
    # selects, not tl.minimum: on the GPU minimum returns the other operand of a NaN, and a NaN
    # logit must give a NaN box (and loss) as torch.clamp gives
    ew = tl.exp(tl.where(x2 > 30.0, 30.0, x2))
    eh = tl.exp(tl.where(x3 > 30.0, 30.0, x3))
    pw = tl.where(ew > 1e3, 1e3, ew) * aw
    ph = tl.where(eh > 1e3, 1e3, eh) * ah
    dpw = tl.where(ew <= 1e3, ew * aw, 0.0)
    dph = tl.where(eh <= 1e3, eh * ah, 0.0)
    return sx, sy, pw, ph, sx * (1 - sx), sy * (1 - sy), dpw, dph


@triton.jit
def box_iou(x0, x1, x2, x3, aw, ah, tx, ty, tw, th, KIND: tl.constexpr, FAMILY: tl.constexpr):
    """IoU-family (KIND 0 iou, 1 giou, 2 diou, 3 ciou) of the box the family predicts from logits
    x0..x3 with anchor (aw, ah) against the centre-xywh target: (value, d/dx0, d/dx1, d/dx2, d/dx3).
    The small constant of the union, enclosing area and diagonal is 1e-16 (YOLOv3) or 1e-7
    (YOLOv5, which adds it to CIoU's alpha denominator too)."""
    z = tl.zeros_like(x0)  # not x0 * 0.0: NaN for an infinite logit, whose box is finite
    eps = 1e-7 if FAMILY == YOLOV5 else 1e-16
    alpha_eps = 1e-7 if FAMILY == YOLOV5 else 0.0
    sx, sy, pw, ph, dsx, dsy, dpw, dph = predicted_box(x0, x1, x2, x3, aw, ah, FAMILY)
    # corners of the prediction (duals) and of the target (constants)
    l1v, l1a, l1b, l1c, l1d = sx - pw / 2, dsx, z, -dpw / 2, z
    r1v, r1a, r1b, r1c, r1d = sx + pw / 2, dsx, z, dpw / 2, z
    t1v, t1a, t1b, t1c, t1d = sy - ph / 2, z, dsy, z, -dph / 2
    b1v, b1a, b1b, b1c, b1d = sy + ph / 2, z, dsy, z, dph / 2
    l2 = tx - tw / 2
    r2 = tx + tw / 2
    t2 = ty - th / 2
    b2 = ty + th / 2
    # intersection, union, iou
    iw = d_sub(*d_min(r1v, r1a, r1b, r1c, r1d, r2 + z, z, z, z, z), *d_max(l1v, l1a, l1b, l1c, l1d, l2 + z, z, z, z, z))
    ih = d_sub(*d_min(b1v, b1a, b1b, b1c, b1d, b2 + z, z, z, z, z), *d_max(t1v, t1a, t1b, t1c, t1d, t2 + z, z, z, z, z))
    inter = d_mul(*d_clamp0(*iw), *d_clamp0(*ih))
    w1 = d_sub(r1v, r1a, r1b, r1c, r1d, l1v, l1a, l1b, l1c, l1d)
    h1 = d_sub(b1v, b1a, b1b, b1c, b1d, t1v, t1a, t1b, t1c, t1d)
    w2 = r2 - l2
    h2 = b2 - t2
    a1 = d_mul(*w1, *h1)
    union = d_sub(a1[0] + eps + w2 * h2, a1[1], a1[2], a1[3], a1[4], *inter)
    iou = d_div(*inter, *union)
    if KIND == 0:
        return iou
    cw = d_sub(*d_max(r1v, r1a, r1b, r1c, r1d, r2 + z, z, z, z, z), *d_min(l1v, l1a, l1b, l1c, l1d, l2 + z, z, z, z, z))
    ch = d_sub(*d_max(b1v, b1a, b1b, b1c, b1d, b2 + z, z, z, z, z), *d_min(t1v, t1a, t1b, t1c, t1d, t2 + z, z, z, z, z))
    if KIND == 1:
        c_area = d_mul(*cw, *ch)
        c_area = (c_area[0] + eps, c_area[1], c_area[2], c_area[3], c_area[4])
        return d_sub(*iou, *d_div(*d_sub(*c_area, *union), *c_area))
    c2 = d_add(*d_mul(*cw, *cw), *d_mul(*ch, *ch))
    c2 = (c2[0] + eps, c2[1], c2[2], c2[3], c2[4])
    dx = d_sub((l2 + r2) + z, z, z, z, z, *d_add(l1v, l1a, l1b, l1c, l1d, r1v, r1a, r1b, r1c, r1d))
    dy = d_sub((t2 + b2) + z, z, z, z, z, *d_add(t1v, t1a, t1b, t1c, t1d, b1v, b1a, b1b, b1c, b1d))
    rho2 = d_add(*d_scale(*d_mul(*dx, *dx), 0.25), *d_scale(*d_mul(*dy, *dy), 0.25))
    diou = d_sub(*iou, *d_div(*rho2, *c2))
    if KIND == 2:
        return diou
    h1_safe = (h1[0] + 1e-16, h1[1], h1[2], h1[3], h1[4])  # no 0/0 when w and h underflow
    da = d_sub((atan(w2 / h2)) + z, z, z, z, z, *d_atan(*d_div(*w1, *h1_safe)))
    v = d_scale(*d_mul(*da, *da), 4.0 / (PI * PI))
    alpha = v[0] / (((1.0 - iou[0]) + v[0]) + alpha_eps)  # no gradient through alpha (as the original)
    return d_sub(*diou, *d_scale(*v, alpha))
