// Element math of the anchor-free family (ultralytics YOLOv8 / YOLO11 / YOLO26 detection loss)
// shared by its CPU kernels (tal_assign_kernel.cpp, detection_loss_kernel.cpp): CIoU of xyxy boxes
// on values or dual numbers, the distribution decode of one side, the order the assigner ranks
// candidates by. Every formula follows yolo_kernels/anchor_free/reference.py operation by operation.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "math/dual.h"       // Dual, min2/max2, clamp_min, atan_, detach
#include "math/bce.h"        // the 16-lane product sums of softplus (YkFloat16, log1p_nonnegative)
#include "math/fast_math.h"  // exp_nonpositive

namespace yolo_kernels {
namespace anchor_free {

constexpr double kCiouEps = 1e-7;    // bbox_iou's eps (heights, union, enclosing diagonal, alpha)
constexpr double kAssignEps = 1e-9;  // the assigner's eps (inside-box margin, metric normalisation)
constexpr double kDflMargin = 0.01;  // distance targets stop at reg_max - 1 - margin

// IoU of xyxy box a against xyxy box b as reference.bbox_ciou computes it on the way to CIoU
// (heights + eps), with the widths and heights CIoU's other terms use. S is a value type or
// Dual<T, N>; b is constant.
template <typename S, typename T>
struct IouParts {
  S iou, aw, ah;
  T bw, bh;
};
template <typename S, typename T>
IouParts<S, T> iou_xyxy(const S& ax1, const S& ay1, const S& ax2, const S& ay2, T bx1, T by1, T bx2, T by2) {
  const T eps = T(kCiouEps);
  const S aw = ax2 - ax1, ah = (ay2 - ay1) + eps;
  const T bw = bx2 - bx1, bh = (by2 - by1) + eps;
  const S inter = clamp_min(min2(ax2, S(bx2)) - max2(ax1, S(bx1)), T(0)) *
                  clamp_min(min2(ay2, S(by2)) - max2(ay1, S(by1)), T(0));
  const S uni = ((aw * ah + bw * bh) - inter) + eps;
  return {inter / uni, aw, ah, bw, bh};
}

// CIoU's centre term: the squared centre distance over the enclosing box's squared diagonal.
template <typename S, typename T>
S centre_term(const S& ax1, const S& ay1, const S& ax2, const S& ay2, T bx1, T by1, T bx2, T by2) {
  const T eps = T(kCiouEps);
  const S cw = max2(ax2, S(bx2)) - min2(ax1, S(bx1));
  const S ch = max2(ay2, S(by2)) - min2(ay1, S(by1));
  const S c2 = (cw * cw + ch * ch) + eps;
  const S dx = ((S(bx1 + bx2) - ax1) - ax2), dy = ((S(by1 + by2) - ay1) - ay2);
  const S rho2 = (dx * dx + dy * dy) / T(4);
  return rho2 / c2;
}

// CIoU from its parts: the IoU, the centre term and da, the difference of the boxes' aspect angles
// atan(w / h) (b's less a's); the aspect term's weight alpha detached.
template <typename S, typename T>
S ciou_from_parts(const S& iou, const S& centre, const S& da) {
  const T eps = T(kCiouEps);
  const S v = da * da * T(4.0 / (M_PI * M_PI));
  const S alpha = detach(v / (((T(1) - iou) + v) + eps));
  return iou - (centre + v * alpha);
}

// The arctangent of CIoU's aspect angles: of float32 boxes (the original's) atan_via_double's, the
// nearest float (the C library's atanf, ~17 ns a call, was a third of the assigner's decode and
// differs from it in ~1% of floats by an ulp), of double ones the C library's.
inline float aspect_atan(float x) { return atan_via_double(x); }
inline double aspect_atan(double x) { return std::atan(x); }
template <typename T, int N>
Dual<T, N> aspect_atan(const Dual<T, N>& x) {
  return atan_by(x, [](T v) { return aspect_atan(v); });
}

// Complete IoU of xyxy box a against xyxy box b, as reference.bbox_ciou(a, b): the IoU less the
// centre distance and aspect terms (both >= 0, so CIoU <= IoU).
template <typename S, typename T>
S ciou_xyxy(const S& ax1, const S& ay1, const S& ax2, const S& ay2, T bx1, T by1, T bx2, T by2) {
  const IouParts<S, T> u = iou_xyxy<S, T>(ax1, ay1, ax2, ay2, bx1, by1, bx2, by2);
  const S centre = centre_term<S, T>(ax1, ay1, ax2, ay2, bx1, by1, bx2, by2);
  const S da = S(aspect_atan(u.bw / u.bh)) - aspect_atan(u.aw / u.ah);
  return ciou_from_parts<S, T>(u.iou, centre, da);
}

// A box's aspect angle as ciou_xyxy computes it (the width over the height + eps): a property of
// one box, so the assigner (float32 boxes) computes it once per box and per point rather than
// twice per (box, point) pair.
inline float box_angle(float x1, float y1, float x2, float y2) {
  return aspect_atan((x2 - x1) / ((y2 - y1) + float(kCiouEps)));
}
inline void box_angle_row_generic(const float* x1, const float* y1, const float* x2, const float* y2, int64_t n,
                                  float* out) {
  for (int64_t q = 0; q < n; ++q) out[q] = box_angle(x1[q], y1[q], x2[q], y2[q]);
}

// CIoU of plain values with both boxes' angles given (box_angle's): ciou_xyxy's bits, and no
// library call, so loops over it vectorise.
template <typename T>
T ciou_values(T ax1, T ay1, T ax2, T ay2, T a_angle, T bx1, T by1, T bx2, T by2, T b_angle) {
  const T iou = iou_xyxy<T, T>(ax1, ay1, ax2, ay2, bx1, by1, bx2, by2).iou;
  const T centre = centre_term<T, T>(ax1, ay1, ax2, ay2, bx1, by1, bx2, by2);
  return ciou_from_parts<T, T>(iou, centre, b_angle - a_angle);
}

// clamp(min=0) as torch computes it: a NaN stays NaN.
template <typename T>
inline T clamp_nonnegative(T x) {
  return x < T(0) ? T(0) : x;
}

// The distances (grid units) of n consecutive points: side s of point q is the mean of the softmax
// of its reg_max bins over 0..reg_max-1 (bin j of side s at x[(s * reg_max + j) * row_stride + q]),
// or the value itself when reg_max is 1. Writes dist[s * block + q] and, when log_norm is given,
// the log of each softmax's normaliser (max + log sum exp). Points go kDecodeBlock at a time, the
// loops over them vectorise; the assigner and the loss decode with the same operations (the same
// bits). `ahead` (rows at the same stride, `ahead_n` points wide: the caller's next points) has its
// lines asked for a row at a time as the rows of x are exponentiated, so that they arrive while
// these are decoded (asked for in one burst, the requests would wait for free miss buffers).
constexpr int64_t kDecodeBlock = 256;
// Asks for every line of x[r * row_stride + q], r < rows, q < n.
template <typename In>
inline void prefetch_rows(const In* x, int64_t row_stride, int64_t rows, int64_t n) {
  constexpr int64_t kLine = 64 / int64_t(sizeof(In));
  for (int64_t r = 0; r < rows && n > 0; ++r) {
    const In* row = x + r * row_stride;
    for (int64_t q = 0; q < n; q += kLine) __builtin_prefetch(row + q);
    __builtin_prefetch(row + n - 1);
  }
}
template <typename T, typename In>
inline void decode_block(const In* x, int64_t row_stride, int64_t reg_max, int64_t n, int64_t block, T* dist,
                         T* log_norm, const In* ahead = nullptr, int64_t ahead_n = 0) {
  for (int64_t q0 = 0; q0 < n; q0 += kDecodeBlock) {
    const int64_t m = std::min(kDecodeBlock, n - q0);
    // the 4 * reg_max rows are far apart (row_stride): ask for all their lines at once rather than
    // meeting one miss after another
    prefetch_rows(x + q0, row_stride, 4 * reg_max, m);
    for (int64_t s = 0; s < 4; ++s) {
      const In* xs = x + s * reg_max * row_stride + q0;
      T* d = dist + s * block + q0;
      T* ln = log_norm != nullptr ? log_norm + s * block + q0 : nullptr;
      if (reg_max == 1) {
        if (ahead != nullptr) prefetch_rows(ahead + s * row_stride, row_stride, 1, ahead_n);
        for (int64_t q = 0; q < m; ++q) d[q] = T(xs[q]);
        if (ln != nullptr)
          for (int64_t q = 0; q < m; ++q) ln[q] = T(0);
        continue;
      }
      T mx[kDecodeBlock], sum[kDecodeBlock], mean[kDecodeBlock];
      for (int64_t q = 0; q < m; ++q) mx[q] = T(xs[q]), sum[q] = T(0), mean[q] = T(0);
      for (int64_t j = 1; j < reg_max; ++j)
        for (int64_t q = 0; q < m; ++q) {
          const T v = T(xs[j * row_stride + q]);
          mx[q] = (v > mx[q] || v != v) ? v : mx[q];  // NaN wins: every bin of the side is NaN after it
        }
      for (int64_t j = 0; j < reg_max; ++j) {
        if (ahead != nullptr) prefetch_rows(ahead + (s * reg_max + j) * row_stride, row_stride, 1, ahead_n);
        for (int64_t q = 0; q < m; ++q) {
          const T e = exp_nonpositive(T(xs[j * row_stride + q]) - mx[q]);
          sum[q] += e;
          mean[q] += e * T(j);
        }
      }
      for (int64_t q = 0; q < m; ++q) d[q] = mean[q] / sum[q];
      if (ln != nullptr)
        for (int64_t q = 0; q < m; ++q) ln[q] = mx[q] + std::log(sum[q]);
    }
  }
}

// max that keeps a NaN (torch's amax / argmax treat NaN as the largest value).
template <typename T>
inline T nan_max(T a, T b) {
  return (std::isnan(a) || a >= b) ? a : b;
}

// The dense class term over a row of n logits, whose targets are all 0 but a few (fixed up by the
// caller): sum of softplus(x) = BCE(x, 0), and the gradient scale * sigmoid(x). Element-wise into a
// block, summed in 16 fixed lanes (the same bits on every instruction set), double across blocks.
// + (x - x): a NaN or infinite logit makes the sum non-finite, as PyTorch's BCE is.
constexpr int64_t kRowBlock = 1024;
template <typename T>
inline double softplus_row_sum_generic(const T* x, int64_t n) {
  double total = 0.0;
  T tmp[kRowBlock];
  for (int64_t c0 = 0; c0 < n; c0 += kRowBlock) {
    const int64_t len = std::min(kRowBlock, n - c0);
    for (int64_t c = 0; c < len; ++c) {
      const T v = x[c0 + c];
      tmp[c] = (std::max(v, T(0)) + log1p_unit(exp_nonpositive(-std::abs(v)))) + (v - v);
    }
    T lanes[16] = {};
    int64_t c = 0;
    for (; c + 16 <= len; c += 16)
      for (int l = 0; l < 16; ++l) lanes[l] += tmp[c + l];
    for (int l = 0; c < len; ++c, ++l) lanes[l] += tmp[c];
    double block = 0.0;
    for (int l = 0; l < 16; ++l) block += double(lanes[l]);
    total += block;
  }
  return total;
}
// The same sum for float rows with one logarithm per 7 logits instead of one per logit:
// softplus(x) = max(x, 0) + log1p(e), e = exp(-|x|) in (0, 1], and the log1p terms of 7 logits are
// summed as the log of the product of their (1 + e) (kept as 1 + s: s' = s + e + s e), in 16 fixed
// lanes (as bce_const_target_rows_summed). With kGrad, the same pass writes g[c] = scale *
// sigmoid(x[c]) from the same e (the formula of sigmoid_row_scaled_generic: the same bits), so a
// row is read and exponentiated once for the loss and its gradient.
template <bool kGrad>
inline double softplus_row_sum_products(const float* x, int64_t n, float* g = nullptr, float scale = 0.0f) {
  constexpr int64_t span = kSumLanes * kSumPerLane;
  alignas(64) float e[kRowBlock + kSumLanes];
  alignas(64) float lin[kRowBlock + kSumLanes];
  alignas(64) float prods[(kRowBlock / span + 1) * kSumLanes];
  double total = 0.0;
  // the products' logs, summed in 16 double lanes (a single running double sum would be a chain of
  // dependent adds, one per 7 logits: a quarter of the row's time)
  YkDouble16 log_lanes = {};
  for (int64_t c0 = 0; c0 < n; c0 += kRowBlock) {
    const int64_t len = std::min(kRowBlock, n - c0), padded = (len + kSumLanes - 1) / kSumLanes * kSumLanes;
    for (int64_t c = 0; c < len; ++c) {
      const float v = x[c0 + c];
      e[c] = exp_nonpositive(-std::abs(v));
      lin[c] = std::max(v, 0.0f) + (v - v);  // + (x - x): a NaN or infinite logit, a non-finite sum
      if constexpr (kGrad) {
        const float inv = 1.0f / (1.0f + e[c]);
        g[c0 + c] = (v >= 0.0f ? inv : e[c] * inv) * scale;
      }
    }
    for (int64_t c = len; c < padded; ++c) e[c] = 0.0f, lin[c] = 0.0f;  // 1 + 0: no effect
    int64_t np = 0;
    YkFloat16 lin_sum = {};
    for (int64_t g0 = 0; g0 < padded; g0 += span) {
      YkFloat16 prod = {};
      for (int64_t c = g0; c < std::min(padded, g0 + span); c += kSumLanes) {
        YkFloat16 ev, lv;
        std::memcpy(&ev, e + c, sizeof(ev));
        std::memcpy(&lv, lin + c, sizeof(lv));
        prod = prod + ev + prod * ev;
        lin_sum += lv;
      }
      std::memcpy(prods + np, &prod, sizeof(prod));
      np += kSumLanes;
    }
    for (int64_t i = 0; i < np; ++i) prods[i] = float(log1p_nonnegative(prods[i]));
    for (int64_t i = 0; i < np; i += kSumLanes) {
      YkFloat16 v;
      std::memcpy(&v, prods + i, sizeof(v));
      log_lanes += __builtin_convertvector(v, YkDouble16);
    }
    total += double(lanes_tree(lin_sum, [](YkFloat16 a, YkFloat16 b) { return a + b; }));
  }
  double logs = 0.0;
  for (int l = 0; l < kSumLanes; ++l) logs += log_lanes[l];
  return total + logs;
}
// sigmoid(x) from e = exp(-|x|): 1 / (1 + e) for x >= 0, e / (1 + e) below (no overflow).
template <typename T>
inline T sigmoid_stable(T x) {
  const T e = exp_nonpositive(-std::abs(x));
  const T inv = T(1) / (T(1) + e);
  return x >= T(0) ? inv : e * inv;
}
template <typename T>
inline void sigmoid_row_scaled_generic(const T* x, T* out, int64_t n, T scale) {
  for (int64_t c = 0; c < n; ++c) out[c] = sigmoid_stable(x[c]) * scale;
}
// The box logits' gradient of bin j of one side over n assigned points: through the softmax mean
// (the distance, into the box term with d_ciou[q] = d(1 - CIoU)/d distance) and through the DFL
// (bins left[q] and left[q] + 1 with weights wl[q], wr[q]), each point weighted by its target
// score t[q]: out[q] = d loss / d x[q] for the components' scales d_box and d_dist.
template <typename T>
inline void bin_gradient_row_generic(const T* x, const T* log_norm, const T* dist, const T* t, const T* d_ciou,
                                     const int32_t* left, const T* wl, const T* wr, int64_t n, int32_t j, T d_box,
                                     T d_dist, T* out) {
  for (int64_t q = 0; q < n; ++q) {
    const T pj = exp_nonpositive(x[q] - log_norm[q]);
    const T dfl = d_dist / T(4) * t[q];
    T v = d_box * t[q] * d_ciou[q] * pj * (T(j) - dist[q]) + dfl * pj * (wl[q] + wr[q]);
    v -= left[q] == j ? dfl * wl[q] : T(0);
    v -= left[q] + 1 == j ? dfl * wr[q] : T(0);
    out[q] = v;
  }
}

// The assigner's overlaps, CIoU clamped at 0 (the ground truth as box a, the prediction as b), from
// the boxes and their angles (box_angle): of gt box g (x1, y1, x2, y2, angle) against n predicted
// boxes (SoA rows), and of n gt boxes (SoA rows) against one predicted box q (x1, y1, x2, y2, angle).
// No library call: the loops vectorise, with the same bits one at a time or in rows.
template <typename T>
inline T assigner_overlap(const T* g, T x1, T y1, T x2, T y2, T angle) {
  return clamp_nonnegative(ciou_values<T>(g[0], g[1], g[2], g[3], g[4], x1, y1, x2, y2, angle));
}
template <typename T>
inline void overlap_row_generic(const T* g, const T* x1, const T* y1, const T* x2, const T* y2, const T* angle,
                                int64_t n, T* out) {
  for (int64_t q = 0; q < n; ++q) out[q] = assigner_overlap<T>(g, x1[q], y1[q], x2[q], y2[q], angle[q]);
}
template <typename T>
inline void overlap_gt_row_generic(const T* gx1, const T* gy1, const T* gx2, const T* gy2, const T* g_angle,
                                   int64_t n, const T* q, T* out) {
  for (int64_t t = 0; t < n; ++t) {
    const T g[5] = {gx1[t], gy1[t], gx2[t], gy2[t], g_angle[t]};
    out[t] = assigner_overlap<T>(g, q[0], q[1], q[2], q[3], q[4]);
  }
}
// The assigner's score^alpha of a logit as the original computes it (torch's sigmoid, 1 / (1 +
// exp(-x)); its pow(x, 0.5) is sqrt), and an approximation for the bounds of its pruning: the
// sigmoid from exp_nonpositive(-|x|) (the loss's formula; a few ulp from the library's, which the
// bounds' margin covers), whose loops vectorise.
template <typename T>
inline T score_power(T x, T alpha) {
  const T score = T(1) / (T(1) + std::exp(-x));
  return alpha == T(0.5) ? std::sqrt(score) : std::pow(score, alpha);
}
template <typename T>
inline T score_power_approx(T x, T alpha) {
  const T score = sigmoid_stable(x);
  return alpha == T(0.5) ? std::sqrt(score) : std::pow(score, alpha);
}
template <typename T>
inline void score_power_approx_row_generic(const T* x, int64_t n, T alpha, T* out) {
  if (alpha == T(0.5))  // the branch out of the loop: it vectorises
    for (int64_t q = 0; q < n; ++q) out[q] = score_power_approx(x[q], T(0.5));
  else
    for (int64_t q = 0; q < n; ++q) out[q] = score_power_approx(x[q], alpha);
}

// float rows: compiled once per instruction set in math/rows.cpp
void overlap_row(const float* g, const float* x1, const float* y1, const float* x2, const float* y2,
                 const float* angle, int64_t n, float* out);
void overlap_gt_row(const float* gx1, const float* gy1, const float* gx2, const float* gy2, const float* g_angle,
                    int64_t n, const float* q, float* out);
void score_power_approx_row(const float* x, int64_t n, float alpha, float* out);
void box_angle_row(const float* x1, const float* y1, const float* x2, const float* y2, int64_t n, float* out);
inline void score_power_approx_row(const double* x, int64_t n, double alpha, double* out) {
  score_power_approx_row_generic(x, n, alpha, out);
}
void bin_gradient_row(const float* x, const float* log_norm, const float* dist, const float* t, const float* d_ciou,
                      const int32_t* left, const float* wl, const float* wr, int64_t n, int32_t j, float d_box,
                      float d_dist, float* out);
inline void bin_gradient_row(const double* x, const double* log_norm, const double* dist, const double* t,
                             const double* d_ciou, const int32_t* left, const double* wl, const double* wr, int64_t n,
                             int32_t j, double d_box, double d_dist, double* out) {
  bin_gradient_row_generic(x, log_norm, dist, t, d_ciou, left, wl, wr, n, j, d_box, d_dist, out);
}
void decode_block_f32(const float* x, int64_t row_stride, int64_t reg_max, int64_t n, int64_t block, float* dist,
                      float* log_norm, const float* ahead = nullptr, int64_t ahead_n = 0);
double softplus_row_sum(const float* x, int64_t n);
void sigmoid_row_scaled(const float* x, float* out, int64_t n, float scale);
// softplus_row_sum and sigmoid_row_scaled of one row in one pass (float: one exp per logit)
double softplus_sigmoid_row(const float* x, int64_t n, float* out, float scale);
inline double softplus_row_sum(const double* x, int64_t n) { return softplus_row_sum_generic(x, n); }
inline void sigmoid_row_scaled(const double* x, double* out, int64_t n, double scale) {
  sigmoid_row_scaled_generic(x, out, n, scale);
}
inline double softplus_sigmoid_row(const double* x, int64_t n, double* out, double scale) {
  sigmoid_row_scaled_generic(x, out, n, scale);
  return softplus_row_sum_generic(x, n);
}

// decode_block, in float math through its per-instruction-set build (half and bfloat16 rows
// converted to float first, kDecodeBlock points at a time: the build without FMA calls the
// library's fma per step), in double math as the template.
template <typename T, typename In>
inline void decode(const In* x, int64_t row_stride, int64_t reg_max, int64_t n, int64_t block, T* dist, T* log_norm,
                   const In* ahead = nullptr, int64_t ahead_n = 0) {
  if constexpr (std::is_same_v<T, float> && std::is_same_v<In, float>) {
    decode_block_f32(x, row_stride, reg_max, n, block, dist, log_norm, ahead, ahead_n);
  } else if constexpr (std::is_same_v<T, float>) {
    if (ahead != nullptr) prefetch_rows(ahead, row_stride, 4 * reg_max, ahead_n);
    static thread_local std::vector<float> rows;  // the thread's, kept from call to call
    rows.resize(size_t(4 * reg_max * kDecodeBlock));
    for (int64_t q0 = 0; q0 < n; q0 += kDecodeBlock) {
      const int64_t m = std::min(kDecodeBlock, n - q0);
      for (int64_t r = 0; r < 4 * reg_max; ++r)
        for (int64_t q = 0; q < m; ++q) rows[r * m + q] = float(x[r * row_stride + q0 + q]);
      decode_block_f32(rows.data(), m, reg_max, m, block, dist + q0, log_norm != nullptr ? log_norm + q0 : nullptr);
    }
  } else {
    decode_block<T, In>(x, row_stride, reg_max, n, block, dist, log_norm, ahead, ahead_n);
  }
}

}  // namespace anchor_free
}  // namespace yolo_kernels
