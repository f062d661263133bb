// Element math of the anchor-free family (ultralytics YOLOv8 / YOLO11 / YOLO26 detection loss)
// shared by its CPU kernels (tal_assign_kernel.cpp, detection_loss_kernel.cpp): CIoU of xyxy boxes
// on values or dual numbers, the distribution decode of one side, the order the assigner ranks
// candidates by. Every formula follows yolo_kernels/anchor_free/reference.py operation by operation.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "loss_math.h"  // Dual, min2/max2, clamp_min, atan_, detach, exp_nonpositive

namespace yolo_kernels {
namespace anchor_free {

constexpr double kCiouEps = 1e-7;    // bbox_iou's eps (heights, union, enclosing diagonal, alpha)
constexpr double kAssignEps = 1e-9;  // the assigner's eps (inside-box margin, metric normalisation)
constexpr double kDflMargin = 0.01;  // distance targets stop at reg_max - 1 - margin

// Complete IoU of xyxy box a against xyxy box b, as reference.bbox_ciou(a, b): heights carry
// + eps, the aspect term's weight alpha is detached. S is a value type or Dual<T, N> (a's corners
// as dual variables give the gradient with respect to them); b is constant.
template <typename S, typename T>
S ciou_xyxy(const S& ax1, const S& ay1, const S& ax2, const S& ay2, T bx1, T by1, T bx2, T by2) {
  const T eps = T(kCiouEps);
  const S aw = ax2 - ax1, ah = (ay2 - ay1) + eps;
  const T bw = bx2 - bx1, bh = (by2 - by1) + eps;
  const S inter = clamp_min(min2(ax2, S(bx2)) - max2(ax1, S(bx1)), T(0)) *
                  clamp_min(min2(ay2, S(by2)) - max2(ay1, S(by1)), T(0));
  const S uni = ((aw * ah + bw * bh) - inter) + eps;
  const S iou = inter / uni;
  const S cw = max2(ax2, S(bx2)) - min2(ax1, S(bx1));
  const S ch = max2(ay2, S(by2)) - min2(ay1, S(by1));
  const S c2 = (cw * cw + ch * ch) + eps;
  const S dx = ((S(bx1 + bx2) - ax1) - ax2), dy = ((S(by1 + by2) - ay1) - ay2);
  const S rho2 = (dx * dx + dy * dy) / T(4);
  const S da = S(atan_(bw / bh)) - atan_(aw / ah);
  const S v = da * da * T(4.0 / (M_PI * M_PI));
  const S alpha = detach(v / (((T(1) - iou) + v) + eps));
  return iou - (rho2 / c2 + v * alpha);
}

// On plain values (the assigner: the ground truth as a, the prediction as b).
template <typename T>
T ciou_values(T ax1, T ay1, T ax2, T ay2, T bx1, T by1, T bx2, T by2) {
  return ciou_xyxy<T, T>(ax1, ay1, ax2, ay2, bx1, by1, bx2, by2);
}

// clamp(min=0) as torch computes it: a NaN stays NaN.
template <typename T>
inline T clamp_nonnegative(T x) {
  return x < T(0) ? T(0) : x;
}

// The distances (grid units) of n consecutive points: side s of point q is the mean of the softmax
// of its reg_max bins over 0..reg_max-1 (bin j of side s at x[(s * reg_max + j) * row_stride + q]),
// or the value itself when reg_max is 1. Writes dist[s * block + q] and, when log_norm is given,
// the log of each softmax's normaliser (max + log sum exp). The loops over q vectorise; the assigner
// decodes blocks of points, the loss single points, with the same operations (the same bits).
constexpr int64_t kDecodeBlock = 64;
template <typename T, typename In>
inline void decode_block(const In* x, int64_t row_stride, int64_t reg_max, int64_t n, int64_t block, T* dist,
                         T* log_norm) {
  for (int64_t s = 0; s < 4; ++s) {
    const In* xs = x + s * reg_max * row_stride;
    T* d = dist + s * block;
    if (reg_max == 1) {
      for (int64_t q = 0; q < n; ++q) d[q] = T(xs[q]);
      if (log_norm != nullptr)
        for (int64_t q = 0; q < n; ++q) log_norm[s * block + q] = T(0);
      continue;
    }
    T mx[kDecodeBlock], sum[kDecodeBlock], mean[kDecodeBlock];
    for (int64_t q = 0; q < n; ++q) mx[q] = T(xs[q]), sum[q] = T(0), mean[q] = T(0);
    for (int64_t j = 1; j < reg_max; ++j)
      for (int64_t q = 0; q < n; ++q) {
        const T v = T(xs[j * row_stride + q]);
        mx[q] = (v > mx[q] || v != v) ? v : mx[q];  // NaN wins: every bin of the side is NaN after it
      }
    for (int64_t j = 0; j < reg_max; ++j)
      for (int64_t q = 0; q < n; ++q) {
        const T e = exp_nonpositive(T(xs[j * row_stride + q]) - mx[q]);
        sum[q] += e;
        mean[q] += e * T(j);
      }
    for (int64_t q = 0; q < n; ++q) d[q] = mean[q] / sum[q];
    if (log_norm != nullptr)
      for (int64_t q = 0; q < n; ++q) log_norm[s * block + q] = mx[q] + std::log(sum[q]);
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
template <typename T>
inline void sigmoid_row_scaled_generic(const T* x, T* out, int64_t n, T scale) {
  for (int64_t c = 0; c < n; ++c) {
    const T e = exp_nonpositive(-std::abs(x[c]));
    const T inv = T(1) / (T(1) + e);
    out[c] = (x[c] >= T(0) ? inv : e * inv) * scale;
  }
}
// float rows: compiled once per instruction set in math/rows.cpp
void decode_block_f32(const float* x, int64_t row_stride, int64_t reg_max, int64_t n, int64_t block, float* dist,
                      float* log_norm);
double softplus_row_sum(const float* x, int64_t n);
void sigmoid_row_scaled(const float* x, float* out, int64_t n, float scale);
inline double softplus_row_sum(const double* x, int64_t n) { return softplus_row_sum_generic(x, n); }
inline void sigmoid_row_scaled(const double* x, double* out, int64_t n, double scale) {
  sigmoid_row_scaled_generic(x, out, n, scale);
}

// decode_block, through its per-instruction-set build for float predictions.
template <typename T, typename In>
inline void decode(const In* x, int64_t row_stride, int64_t reg_max, int64_t n, int64_t block, T* dist, T* log_norm) {
  if constexpr (std::is_same_v<T, float> && std::is_same_v<In, float>)
    decode_block_f32(x, row_stride, reg_max, n, block, dist, log_norm);
  else
    decode_block<T, In>(x, row_stride, reg_max, n, block, dist, log_norm);
}

}  // namespace anchor_free
}  // namespace yolo_kernels
