// BCE with logits (pos_weight, focal factor): element values and derivatives, and the row loops
// over logits that share a target (the vectorised rows are compiled per ISA in math/rows.cpp).
// Plain C++17 (no ATen).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "math/fast_math.h"

namespace yolo_kernels {

// BCE with logits, pos_weight w, optional focal factor alpha_t * (1 - p_t)^gamma (alpha 0.25):
// the element loss and its derivative with respect to the logit x. Without the focal factor it is
// branch-free and calls no library function (rows of it vectorise: bce_const_target_row).
template <typename T>
struct LossGrad {
  T loss;
  T grad;
};

template <typename T>
inline LossGrad<T> bce_with_logits(T x, T y, T w, T gamma) {
  const T e = exp_nonpositive(-std::abs(x));  // in (0, 1]: no overflow for any x
  const T l = log1p_unit(e);
  const T inv = T(1) / (T(1) + e);
  const T sig = x >= T(0) ? inv : e * inv;
  const T neg_log_sig = l + std::max(-x, T(0));    // -log(sigmoid(x))
  const T neg_log_1msig = l + std::max(x, T(0));   // -log(1 - sigmoid(x))
  const T wy = w * y;
  // + (x - x): 0 for a finite x, NaN for NaN or +-inf, whose loss PyTorch's formula leaves
  // non-finite (-inf + inf) even where this form would give a finite one (a training loop stops
  // on a non-finite loss; a finite one would train on a NaN gradient)
  const T loss = wy * neg_log_sig + (T(1) - y) * neg_log_1msig + (x - x);
  const T grad = sig * (T(1) - y + wy) - wy;
  if (gamma <= T(0)) return {loss, grad};
  const T alpha = T(0.25);
  const T p_t = y * sig + (T(1) - y) * (T(1) - sig);
  const T alpha_t = y * alpha + (T(1) - y) * (T(1) - alpha);
  const T one_m_pt = T(1) - p_t;
  const T mod = std::pow(one_m_pt, gamma);
  const T dp_t = (T(2) * y - T(1)) * sig * (T(1) - sig);
  const T dmod = gamma * std::pow(one_m_pt, gamma - T(1)) * -dp_t;
  return {loss * alpha_t * mod, alpha_t * (grad * mod + loss * dmod)};
}

// ---------------------------------------------------------------------------------------------
// loss[i], grad[i] of BCE(x[i], y) for one target y shared by a row of logits (the objectness of
// the cells whose target is 0, the classes of a matched cell), pos_weight w, focal gamma (0: plain).
// Vectorised for gamma == 0 and for y == 0; focal with y != 0 takes the scalar path.
template <typename T>
void bce_const_target_row(const T* x, T* loss, T* grad, int64_t n, T y, T w, T gamma) {
  if (gamma > T(0) && y != T(0)) {
    for (int64_t i = 0; i < n; ++i) {
      const auto r = bce_with_logits<T>(x[i], y, w, gamma);
      loss[i] = r.loss;
      grad[i] = r.grad;
    }
    return;
  }
  if (gamma > T(0)) {  // y == 0: alpha_t = 0.75, 1 - p_t = sigmoid(x)
    for (int64_t i = 0; i < n; ++i) {
      const T e = exp_nonpositive(-std::abs(x[i]));
      const T l = log1p_unit(e);
      const T inv = T(1) / (T(1) + e);
      const T sig = x[i] >= T(0) ? inv : e * inv;
      const T bce = l + std::max(x[i], T(0));                               // -log(1 - sigmoid)
      const T mod = exp_nonpositive(-gamma * (l + std::max(-x[i], T(0))));  // sigmoid^gamma
      loss[i] = T(0.75) * bce * mod + (x[i] - x[i]);  // non-finite x: non-finite loss (bce_with_logits)
      grad[i] = T(0.75) * mod * (sig + bce * gamma * (T(1) - sig));
    }
    return;
  }
  for (int64_t i = 0; i < n; ++i) {
    const auto r = bce_with_logits(x[i], y, w, T(0));  // no focal factor: the branch folds away
    loss[i] = r.loss;
    grad[i] = r.grad;
  }
}

// The same over a row of float logits: compiled once, for AVX-512, AVX2 and the baseline, in
// math/rows.cpp (the entry points of the row loops are declared here, defined there).
void bce_row(const float* x, float* loss, float* grad, int64_t n, float y, float w, float gamma);
static inline void bce_row(const double* x, double* loss, double* grad, int64_t n, double y, double w, double gamma) {
  bce_const_target_row<double>(x, loss, grad, n, y, w, gamma);
}

// BCE(x, y) summed over rows of logits that share a target y and pos_weight w, without the focal
// factor (the class logits of matched cells, against the negative target): for row r of `rows`
// rows of n logits, grad[r * n + c] = d BCE / d x as bce_row gives it, and row_loss[r] = the sum
// over c of BCE(x[r * n + c], y). With e = exp(-|x|) in (0, 1],
//   BCE = (1 - y + w y) log1p(e) + w y max(-x, 0) + (1 - y) max(x, 0),
// and a row's log1p terms are summed as one log1p of the product of the (1 + e), instead of a
// log1p per logit. The product is kept as 1 + s (s' = s + e + s e: no precision lost to small e),
// in 16 fixed lanes (lane c % 16) of at most 7 logits each (below 2^112 once the lanes are
// combined). The lanes do not depend on the vector width (generic vectors of 16), so every
// instruction set gives the same bits. `scratch` holds bce_rows_summed_scratch(rows, n) floats.
typedef float YkFloat16 __attribute__((vector_size(64)));
typedef int32_t YkInt16 __attribute__((vector_size(64)));
typedef double YkDouble16 __attribute__((vector_size(128)));
// The 16 lanes of v combined by `op` in a fixed tree (lane l with lane l + h, h = 8, 4, 2, 1), by
// whole-vector shuffles (only lane 0 of the result is kept).
template <typename Op>
inline float lanes_tree(YkFloat16 v, Op op) {
  const YkInt16 h8 = {8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7};
  const YkInt16 h4 = {4, 5, 6, 7, 0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3};
  const YkInt16 h2 = {2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1};
  const YkInt16 h1 = {1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0};
  v = op(v, __builtin_shuffle(v, h8));
  v = op(v, __builtin_shuffle(v, h4));
  v = op(v, __builtin_shuffle(v, h2));
  v = op(v, __builtin_shuffle(v, h1));
  return v[0];
}
// log(1 + s) for s >= 0 (any float), branch-free: log1p_unit(s) up to 1, above it the exponent of
// 1 + s plus log1p_unit of its mantissa less one.
inline double log1p_nonnegative(float s) {
  const float v = 1.0f + s;
  int32_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  const int32_t k = (bits >> 23) - 127;
  bits = (bits & 0x007fffff) | (127 << 23);
  float m;
  std::memcpy(&m, &bits, sizeof(m));
  const bool small = s <= 1.0f;
  return double(small ? 0 : k) * 0.69314718055994530942 + double(log1p_unit(small ? s : m - 1.0f));
}
constexpr int64_t kSumLanes = 16, kSumPerLane = 7;  // lanes, and the logits a lane multiplies before a log
// The floats of scratch bce_rows_summed needs for `rows` rows of n logits.
inline int64_t bce_rows_summed_scratch(int64_t rows, int64_t n) {
  return rows * n + rows * ((n + kSumLanes * kSumPerLane - 1) / (kSumLanes * kSumPerLane));
}
inline void bce_const_target_rows_summed(const float* x, float* grad, int64_t rows, int64_t n, float y, float w,
                                         double* row_loss, float* scratch) {
  const float wy = w * y, g_sig = 1.0f - y + wy, k_pos = 1.0f - y;
  const int64_t span = kSumLanes * kSumPerLane, folds = (n + span - 1) / span;
  float* e_all = scratch;              // [rows * n]: exp(-|x|)
  float* prods = scratch + rows * n;  // [rows * folds]: the products less one, then their logs
  for (int64_t c = 0; c < rows * n; ++c) {  // element-wise over every row: vectorises like bce_row, the same grad
    const float e = exp_nonpositive(-std::abs(x[c]));
    const float inv = 1.0f / (1.0f + e);
    grad[c] = (x[c] >= 0.0f ? inv : e * inv) * g_sig - wy;
    e_all[c] = e;
  }
  const YkFloat16 zero = {};
  const YkInt16 lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
  for (int64_t r = 0; r < rows; ++r) {  // each row's products and its linear terms
    const float* xr = x + r * n;
    const float* er = e_all + r * n;
    YkFloat16 lin = zero;  // the w y max(-x, 0) + (1 - y) max(x, 0) terms
    for (int64_t f = 0; f < folds; ++f) {
      YkFloat16 prod = zero;
      for (int64_t c = f * span; c < std::min(n, (f + 1) * span); c += kSumLanes) {
        YkFloat16 xv = zero, ev = zero;  // a short last vector is padded with zeros (no effect)
        if (r * n + c + kSumLanes <= rows * n) {  // a whole vector, the lanes past the row masked
          std::memcpy(&xv, xr + c, sizeof(xv));
          std::memcpy(&ev, er + c, sizeof(ev));
          if (c + kSumLanes > n) {
            const YkInt16 keep = lane < YkInt16{} + int32_t(n - c);
            xv = keep ? xv : zero, ev = keep ? ev : zero;
          }
        } else {  // the end of the last row
          for (int64_t l = 0; c + l < n; ++l) xv[l] = xr[c + l], ev[l] = er[c + l];
        }
        prod = prod + ev + prod * ev;
        // + (x - x): a NaN or infinite logit makes the row's sum non-finite (bce_with_logits)
        lin += (xv > zero ? xv * k_pos : zero) + (xv < zero ? -xv * wy : zero) + (xv - xv);
      }
      prods[r * folds + f] = lanes_tree(prod, [](YkFloat16 p, YkFloat16 q) { return p + q + p * q; });
    }
    row_loss[r] = double(lanes_tree(lin, [](YkFloat16 p, YkFloat16 q) { return p + q; }));
  }
  for (int64_t i = 0; i < rows * folds; ++i) prods[i] = float(log1p_nonnegative(prods[i]));  // vectorises across rows
  for (int64_t r = 0; r < rows; ++r) {
    double log_sum = 0.0;
    for (int64_t f = 0; f < folds; ++f) log_sum += double(prods[r * folds + f]);
    row_loss[r] += double(g_sig) * log_sum;
  }
}
void bce_rows_summed(const float* x, float* grad, int64_t rows, int64_t n, float y, float w, double* row_loss,
                     float* scratch);  // bce_const_target_rows_summed, compiled once per ISA (math/rows.cpp)

// loss[i], grad[i] of BCE(x[i], y[i]): a target per logit (the objectness of the matched cells).
// Vectorised without the focal factor; with it, the scalar path.
template <typename T>
void bce_target_row(const T* x, const T* y, T* loss, T* grad, int64_t n, T w, T gamma) {
  if (gamma > T(0)) {
    for (int64_t i = 0; i < n; ++i) {
      const auto r = bce_with_logits<T>(x[i], y[i], w, gamma);
      loss[i] = r.loss;
      grad[i] = r.grad;
    }
    return;
  }
  for (int64_t i = 0; i < n; ++i) {
    const auto r = bce_with_logits(x[i], y[i], w, T(0));
    loss[i] = r.loss;
    grad[i] = r.grad;
  }
}
void bce_row(const float* x, const float* y, float* loss, float* grad, int64_t n, float w,
             float gamma);  // bce_target_row<float>, compiled once per ISA (math/rows.cpp)
static inline void bce_row(const double* x, const double* y, double* loss, double* grad, int64_t n, double w,
                           double gamma) {
  bce_target_row<double>(x, y, loss, grad, n, w, gamma);
}

}  // namespace yolo_kernels
