// The anchor-based families' box: the predicted box of a row of logits and its IoU family against
// a target (docs/semantics.md, docs/yolov5.md), on values or duals, one pair at a time or as
// vectorised rows. Every formula follows yolo_kernels/anchor/reference.py operation by operation.
// Plain C++17 (no ATen).
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>

#include "math/dual.h"
#include "math/fast_math.h"

namespace yolo_kernels {

enum class BoxKind { kIoU, kGIoU, kDIoU, kCIoU };
// The loss family: the archive YOLOv3 loss, or the YOLOv5-style ComputeLoss. They differ in the
// matching, the predicted box, box_iou's constants, and the per-layer weights (fused_loss_kernel).
enum class Family { kYOLOv3, kYOLOv5 };

// box_iou's small constants: added to the union, the enclosing area and diagonal (eps) and to
// CIoU's alpha denominator (alpha_eps). YOLOv3: 1e-16 and 0; YOLOv5: 1e-7 and 1e-7.
template <typename T>
struct BoxEps {
  T eps, alpha_eps;
  static BoxEps of(Family family) {
    return family == Family::kYOLOv5 ? BoxEps{T(1e-7), T(1e-7)} : BoxEps{T(1e-16), T(0)};
  }
};

// ---------------------------------------------------------------------------------------------
// bbox_iou of a predicted centre-xywh box (px, py, pw, ph) against a target (tx, ty, tw, th).
template <typename S, typename T>
S box_iou(const S& px, const S& py, const S& pw, const S& ph, T tx, T ty, T tw, T th, BoxKind kind,
          BoxEps<T> e = BoxEps<T>::of(Family::kYOLOv3)) {
  const S b1_x1 = px - pw / T(2), b1_x2 = px + pw / T(2);
  const S b1_y1 = py - ph / T(2), b1_y2 = py + ph / T(2);
  const S b2_x1 = S(tx - tw / T(2)), b2_x2 = S(tx + tw / T(2));
  const S b2_y1 = S(ty - th / T(2)), b2_y2 = S(ty + th / T(2));

  const S inter = clamp_min(min2(b1_x2, b2_x2) - max2(b1_x1, b2_x1), T(0)) *
                  clamp_min(min2(b1_y2, b2_y2) - max2(b1_y1, b2_y1), T(0));
  const S w1 = b1_x2 - b1_x1, h1 = b1_y2 - b1_y1;
  const S w2 = b2_x2 - b2_x1, h2 = b2_y2 - b2_y1;
  const S uni = (w1 * h1 + e.eps) + w2 * h2 - inter;
  const S iou = inter / uni;
  if (kind == BoxKind::kIoU) return iou;

  const S cw = max2(b1_x2, b2_x2) - min2(b1_x1, b2_x1);  // enclosing box
  const S ch = max2(b1_y2, b2_y2) - min2(b1_y1, b2_y1);
  if (kind == BoxKind::kGIoU) {
    const S c_area = cw * ch + e.eps;
    return iou - (c_area - uni) / c_area;
  }
  const S c2 = cw * cw + ch * ch + e.eps;
  const S dx = (b2_x1 + b2_x2) - (b1_x1 + b1_x2), dy = (b2_y1 + b2_y2) - (b1_y1 + b1_y2);
  const S rho2 = dx * dx / T(4) + dy * dy / T(4);
  if (kind == BoxKind::kDIoU) return iou - rho2 / c2;
  const S da = atan_(w2 / h2) - atan_(w1 / (h1 + T(1e-16)));  // + 1e-16: no 0/0 when w, h underflow
  const S v = da * da * T(4.0 / (M_PI * M_PI));
  const S alpha = detach(v / (((T(1) - iou) + v) + e.alpha_eps));  // no gradient through alpha (as the original)
  return iou - (rho2 / c2 + v * alpha);
}

// The predicted box of a row's logits, with the logits as the dual variables 0..3. YOLOv3:
// sigmoid(x, y), exp(w, h).clamp(max=1e3) * anchor. YOLOv5: 2 sigmoid(x, y) - 0.5,
// (2 sigmoid(w, h))^2 * anchor.
template <typename T>
std::array<Dual<T, 4>, 4> predicted_box(const T* logits, T aw, T ah, Family family = Family::kYOLOv3) {
  std::array<Dual<T, 4>, 4> box;
  if (family == Family::kYOLOv5) {
    const T anchor[2] = {aw, ah};
    for (int i = 0; i < 4; ++i) {
      const T s = T(1) / (T(1) + std::exp(-logits[i])), ds = s * (T(1) - s);
      if (i < 2) {
        box[i] = Dual<T, 4>::variable(s * T(2) - T(0.5), i, T(2) * ds);
      } else {
        const T s2 = s * T(2);
        box[i] = Dual<T, 4>::variable(s2 * s2 * anchor[i - 2], i, T(4) * s2 * ds * anchor[i - 2]);
      }
    }
    return box;
  }
  for (int i = 0; i < 2; ++i) {
    const T s = T(1) / (T(1) + std::exp(-logits[i]));
    box[i] = Dual<T, 4>::variable(s, i, s * (T(1) - s));
  }
  const T anchor[2] = {aw, ah};
  for (int i = 0; i < 2; ++i) {
    const T e = std::exp(std::min(logits[2 + i], T(30)));  // exp(30) >> 1e3: same values, no inf
    const bool passes = !(e > T(1e3));  // clamp(max=1e3) keeps a NaN (a NaN logit: a NaN loss)
    box[2 + i] = Dual<T, 4>::variable((passes ? e : T(1e3)) * anchor[i], 2 + i, passes ? e * anchor[i] : T(0));
  }
  return box;
}

// The box terms of many pairs at once (float), in a loop the compiler vectorises across pairs:
// the same forward-mode duals as box_iou<Dual<float, 4>>, spelled as plain floats with selects
// instead of branches, exp by the polynomial of exp_nonpositive and atan (CIoU) by the polynomial
// of atan_poly. Inputs and outputs are structure-of-arrays: logits x0..x3, anchors aw/ah and
// targets tx/ty/tw/th in, the IoU-family value and its derivatives d0..d3 with respect to the
// logits out. Both families: the predicted box and the small constants follow Family.
// The arrays of box_iou_rows: inputs x0..th, outputs v, d0..d3; separate, non-overlapping.
struct BoxRows {
  const float *x0, *x1, *x2, *x3, *aw, *ah, *tx, *ty, *tw, *th;
  float *v, *d0, *d1, *d2, *d3;
};

template <BoxKind kind, Family family>
inline void box_iou_rows_kind(int64_t n, const float* __restrict__ x0, const float* __restrict__ x1,
                              const float* __restrict__ x2, const float* __restrict__ x3, const float* __restrict__ aw,
                              const float* __restrict__ ah, const float* __restrict__ tx, const float* __restrict__ ty,
                              const float* __restrict__ tw, const float* __restrict__ th, float* __restrict__ v,
                              float* __restrict__ d0, float* __restrict__ d1, float* __restrict__ d2,
                              float* __restrict__ d3) {
  constexpr bool kV5 = family == Family::kYOLOv5;
  constexpr float eps = kV5 ? 1e-7f : 1e-16f, alpha_eps = kV5 ? 1e-7f : 0.0f;
  for (int64_t i = 0; i < n; ++i) {
    // predicted box. YOLOv3: sigmoid(xy) (stable form), exp(wh).clamp(max=1e3) * anchor.
    // YOLOv5: 2 sigmoid(xy) - 0.5, (2 sigmoid(wh))^2 * anchor.
    const float ex = exp_nonpositive(-std::abs(x0[i])), ey = exp_nonpositive(-std::abs(x1[i]));
    const float ix = 1.0f / (1.0f + ex), iy = 1.0f / (1.0f + ey);
    const float s0 = x0[i] >= 0.0f ? ix : ex * ix, s1 = x1[i] >= 0.0f ? iy : ey * iy;
    float sx, sy, pw, ph, dsx, dsy, dpw, dph;
    if constexpr (kV5) {
      const float ew = exp_nonpositive(-std::abs(x2[i])), eh = exp_nonpositive(-std::abs(x3[i]));
      const float iw = 1.0f / (1.0f + ew), ih = 1.0f / (1.0f + eh);
      const float s2 = x2[i] >= 0.0f ? iw : ew * iw, s3 = x3[i] >= 0.0f ? ih : eh * ih;
      sx = s0 * 2.0f - 0.5f, sy = s1 * 2.0f - 0.5f;
      dsx = 2.0f * (s0 * (1.0f - s0)), dsy = 2.0f * (s1 * (1.0f - s1));
      const float w2x = s2 * 2.0f, h2x = s3 * 2.0f;
      pw = w2x * w2x * aw[i], ph = h2x * h2x * ah[i];
      dpw = 4.0f * w2x * (s2 * (1.0f - s2)) * aw[i], dph = 4.0f * h2x * (s3 * (1.0f - s3)) * ah[i];
    } else {
      sx = s0, sy = s1;
      const float ew = exp_capped(x2[i]), eh = exp_capped(x3[i]);
      // clamp(max=1e3) keeps a NaN, as torch.clamp does (a NaN logit: a NaN loss)
      pw = (ew > 1e3f ? 1e3f : ew) * aw[i], ph = (eh > 1e3f ? 1e3f : eh) * ah[i];
      dpw = ew <= 1e3f ? ew * aw[i] : 0.0f, dph = eh <= 1e3f ? eh * ah[i] : 0.0f;
      dsx = sx * (1.0f - sx), dsy = sy * (1.0f - sy);
    }
    const Lanes4 b1_x1{sx - pw / 2.0f, dsx, 0.0f, -dpw / 2.0f, 0.0f}, b1_x2{sx + pw / 2.0f, dsx, 0.0f, dpw / 2.0f, 0.0f};
    const Lanes4 b1_y1{sy - ph / 2.0f, 0.0f, dsy, 0.0f, -dph / 2.0f}, b1_y2{sy + ph / 2.0f, 0.0f, dsy, 0.0f, dph / 2.0f};
    const Lanes4 b2_x1{tx[i] - tw[i] / 2.0f, 0, 0, 0, 0}, b2_x2{tx[i] + tw[i] / 2.0f, 0, 0, 0, 0};
    const Lanes4 b2_y1{ty[i] - th[i] / 2.0f, 0, 0, 0, 0}, b2_y2{ty[i] + th[i] / 2.0f, 0, 0, 0, 0};
    const Lanes4 inter = lanes_mul(lanes_clamp0(lanes_sub(lanes_min(b1_x2, b2_x2), lanes_max(b1_x1, b2_x1))),
                                   lanes_clamp0(lanes_sub(lanes_min(b1_y2, b2_y2), lanes_max(b1_y1, b2_y1))));
    const Lanes4 w1 = lanes_sub(b1_x2, b1_x1), h1 = lanes_sub(b1_y2, b1_y1);
    const Lanes4 w2 = lanes_sub(b2_x2, b2_x1), h2 = lanes_sub(b2_y2, b2_y1);
    Lanes4 uni = lanes_add_const(lanes_mul(w1, h1), eps);
    uni = lanes_sub({uni.v + lanes_mul(w2, h2).v, uni.d0, uni.d1, uni.d2, uni.d3}, inter);
    const Lanes4 iou = lanes_div(inter, uni);
    Lanes4 r = iou;
    if constexpr (kind != BoxKind::kIoU) {
      const Lanes4 cw = lanes_sub(lanes_max(b1_x2, b2_x2), lanes_min(b1_x1, b2_x1));
      const Lanes4 ch = lanes_sub(lanes_max(b1_y2, b2_y2), lanes_min(b1_y1, b2_y1));
      if constexpr (kind == BoxKind::kGIoU) {
        const Lanes4 c_area = lanes_add_const(lanes_mul(cw, ch), eps);
        r = lanes_sub(iou, lanes_div(lanes_sub(c_area, uni), c_area));
      } else {  // DIoU, CIoU
        Lanes4 c2 = lanes_mul(cw, cw);
        const Lanes4 ch2 = lanes_mul(ch, ch);
        c2 = {c2.v + ch2.v + eps, c2.d0 + ch2.d0, c2.d1 + ch2.d1, c2.d2 + ch2.d2, c2.d3 + ch2.d3};
        const Lanes4 sx1 = {b1_x1.v + b1_x2.v, b1_x1.d0 + b1_x2.d0, b1_x1.d1 + b1_x2.d1, b1_x1.d2 + b1_x2.d2,
                            b1_x1.d3 + b1_x2.d3};
        const Lanes4 sy1 = {b1_y1.v + b1_y2.v, b1_y1.d0 + b1_y2.d0, b1_y1.d1 + b1_y2.d1, b1_y1.d2 + b1_y2.d2,
                            b1_y1.d3 + b1_y2.d3};
        const Lanes4 dx = lanes_sub({b2_x1.v + b2_x2.v, 0, 0, 0, 0}, sx1);
        const Lanes4 dy = lanes_sub({b2_y1.v + b2_y2.v, 0, 0, 0, 0}, sy1);
        const Lanes4 dx2 = lanes_mul(dx, dx), dy2 = lanes_mul(dy, dy);
        const Lanes4 rho2 = {dx2.v / 4.0f + dy2.v / 4.0f, dx2.d0 / 4.0f + dy2.d0 / 4.0f, dx2.d1 / 4.0f + dy2.d1 / 4.0f,
                             dx2.d2 / 4.0f + dy2.d2 / 4.0f, dx2.d3 / 4.0f + dy2.d3 / 4.0f};
        r = lanes_sub(iou, lanes_div(rho2, c2));
        if constexpr (kind == BoxKind::kCIoU) {
          // v = 4 / pi^2 (atan(w2 / h2) - atan(w1 / (h1 + 1e-16)))^2; alpha carries no gradient
          const Lanes4 u = lanes_div(w1, lanes_add_const(h1, 1e-16f));
          const float g = 1.0f / (1.0f + u.v * u.v);
          const Lanes4 da = {atan_poly(w2.v / h2.v) - atan_poly(u.v), -u.d0 * g, -u.d1 * g, -u.d2 * g, -u.d3 * g};
          const Lanes4 da2 = lanes_mul(da, da);
          const float k = float(4.0 / (M_PI * M_PI));
          const Lanes4 v = {da2.v * k, da2.d0 * k, da2.d1 * k, da2.d2 * k, da2.d3 * k};
          const float alpha = v.v / (((1.0f - iou.v) + v.v) + alpha_eps);
          r = lanes_sub(r, {v.v * alpha, v.d0 * alpha, v.d1 * alpha, v.d2 * alpha, v.d3 * alpha});
        }
      }
    }
    v[i] = r.v, d0[i] = r.d0, d1[i] = r.d1, d2[i] = r.d2, d3[i] = r.d3;
  }
}

template <Family family>
inline void box_iou_rows_family(int64_t n, const BoxRows& rows, BoxKind kind) {
#define YOLO_KERNELS_BOX_ROWS rows.x0, rows.x1, rows.x2, rows.x3, rows.aw, rows.ah, rows.tx, rows.ty, rows.tw, rows.th, \
                              rows.v, rows.d0, rows.d1, rows.d2, rows.d3
  if (kind == BoxKind::kIoU) return box_iou_rows_kind<BoxKind::kIoU, family>(n, YOLO_KERNELS_BOX_ROWS);
  if (kind == BoxKind::kGIoU) return box_iou_rows_kind<BoxKind::kGIoU, family>(n, YOLO_KERNELS_BOX_ROWS);
  if (kind == BoxKind::kDIoU) return box_iou_rows_kind<BoxKind::kDIoU, family>(n, YOLO_KERNELS_BOX_ROWS);
  box_iou_rows_kind<BoxKind::kCIoU, family>(n, YOLO_KERNELS_BOX_ROWS);
#undef YOLO_KERNELS_BOX_ROWS
}

// box_iou_rows_family of either family, compiled once per ISA (math/rows.cpp).
void box_iou_rows(int64_t n, const BoxRows& rows, BoxKind kind, Family family);

}  // namespace yolo_kernels
