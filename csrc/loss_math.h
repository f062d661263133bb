// Element math of the YOLO losses shared by the CPU kernels: the IoU family on values or on dual
// numbers (value + gradient), BCE-with-logits with pos_weight and focal factor, and target matching,
// for both loss families (docs/semantics.md, docs/yolov5.md).
// Plain C++17 (no ATen): every formula follows yolo_kernels/reference.py operation by operation.
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

namespace yolo_kernels {

enum class BoxKind { kIoU, kGIoU, kDIoU, kCIoU };
enum class Reduction { kMean, kSum };
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
// Forward-mode dual numbers: a value and its partial derivatives with respect to N inputs. The
// box loss is written once over a scalar type S and instantiated with Dual<T, 4> to get the
// gradient with respect to the four box logits. min/max split the gradient evenly on ties and
// clamps pass it at the boundary, as PyTorch's autograd does.
template <typename T, int N>
struct Dual {
  T v;
  std::array<T, N> d;
  Dual(T value = T(0)) : v(value) { d.fill(T(0)); }  // a constant
  static Dual variable(T value, int i, T derivative) {
    Dual x(value);
    x.d[i] = derivative;
    return x;
  }
};

template <typename T, int N>
Dual<T, N> operator+(const Dual<T, N>& a, const Dual<T, N>& b) {
  Dual<T, N> r(a.v + b.v);
  for (int i = 0; i < N; ++i) r.d[i] = a.d[i] + b.d[i];
  return r;
}
template <typename T, int N>
Dual<T, N> operator-(const Dual<T, N>& a, const Dual<T, N>& b) {
  Dual<T, N> r(a.v - b.v);
  for (int i = 0; i < N; ++i) r.d[i] = a.d[i] - b.d[i];
  return r;
}
template <typename T, int N>
Dual<T, N> operator*(const Dual<T, N>& a, const Dual<T, N>& b) {
  Dual<T, N> r(a.v * b.v);
  for (int i = 0; i < N; ++i) r.d[i] = a.d[i] * b.v + a.v * b.d[i];
  return r;
}
template <typename T, int N>
Dual<T, N> operator/(const Dual<T, N>& a, const Dual<T, N>& b) {
  Dual<T, N> r(a.v / b.v);
  for (int i = 0; i < N; ++i) r.d[i] = (a.d[i] - r.v * b.d[i]) / b.v;
  return r;
}
template <typename T, int N>
Dual<T, N> operator+(const Dual<T, N>& a, T b) { return a + Dual<T, N>(b); }
template <typename T, int N>
Dual<T, N> operator-(const Dual<T, N>& a, T b) { return a - Dual<T, N>(b); }
template <typename T, int N>
Dual<T, N> operator-(T a, const Dual<T, N>& b) { return Dual<T, N>(a) - b; }
template <typename T, int N>
Dual<T, N> operator*(const Dual<T, N>& a, T b) { return a * Dual<T, N>(b); }
template <typename T, int N>
Dual<T, N> operator/(const Dual<T, N>& a, T b) { return a / Dual<T, N>(b); }

template <typename T, int N>
T value(const Dual<T, N>& x) { return x.v; }
inline float value(float x) { return x; }
inline double value(double x) { return x; }

template <typename T, int N>
Dual<T, N> min2(const Dual<T, N>& a, const Dual<T, N>& b) {
  if (a.v == b.v) {
    Dual<T, N> r(a.v);
    for (int i = 0; i < N; ++i) r.d[i] = (a.d[i] + b.d[i]) / T(2);
    return r;
  }
  return a.v < b.v ? a : b;
}
template <typename T, int N>
Dual<T, N> max2(const Dual<T, N>& a, const Dual<T, N>& b) {
  if (a.v == b.v) return min2(a, b);
  return a.v > b.v ? a : b;
}
template <typename T>
T min2(T a, T b) { return a < b ? a : b; }
template <typename T>
T max2(T a, T b) { return a > b ? a : b; }

// clamp(x, min=lo): the gradient passes where x >= lo
template <typename T, int N>
Dual<T, N> clamp_min(const Dual<T, N>& x, T lo) { return x.v >= lo ? x : Dual<T, N>(lo); }
template <typename T>
T clamp_min(T x, T lo) { return x >= lo ? x : lo; }

template <typename T, int N>
Dual<T, N> atan_(const Dual<T, N>& x) {
  Dual<T, N> r(std::atan(x.v));
  const T g = T(1) / (T(1) + x.v * x.v);
  for (int i = 0; i < N; ++i) r.d[i] = x.d[i] * g;
  return r;
}
template <typename T>
T atan_(T x) { return std::atan(x); }

template <typename T, int N>
Dual<T, N> detach(const Dual<T, N>& x) { return Dual<T, N>(x.v); }
template <typename T>
T detach(T x) { return x; }

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

// The sum of squares and the largest magnitude of x[0 .. n) times `scale`, in eight interleaved
// lanes that the compiler vectorises (a fixed order: the same result on every run and thread
// count); the largest magnitude propagates NaN.
template <typename T>
inline void scaled_sq_max(const T* x, int64_t n, T scale, double& sq, double& mx) {
  T s[8] = {0, 0, 0, 0, 0, 0, 0, 0}, m[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int l = 0; l < 8; ++l) {
      const T v = x[i + l] * scale, a = v < T(0) ? -v : v;
      s[l] += v * v;
      m[l] = (a > m[l] || a != a) ? a : m[l];
    }
  for (; i < n; ++i) {
    const T v = x[i] * scale, a = v < T(0) ? -v : v;
    s[0] += v * v;
    m[0] = (a > m[0] || a != a) ? a : m[0];
  }
  double total = 0.0;
  for (int l = 0; l < 8; ++l) {
    total += double(s[l]);
    if (double(m[l]) > mx || m[l] != m[l]) mx = double(m[l]);
  }
  sq += total;
}

// ---------------------------------------------------------------------------------------------
// exp and log1p by polynomials (float: a few ulp; double: the C library) on arguments where they
// are well conditioned: exp on [-87, 0], log1p on [0, 1] through log1p(e) = 2 atanh(e / (2 + e)).
// Branch-free and without library calls, so loops over them vectorise.
inline float exp_nonpositive(float x) {
  x = std::max(x, -87.0f);  // below: 2^n would leave the normal range; the result is ~1e-38 either way
  // round to nearest by adding and subtracting 1.5 * 2^23 (a library call would block vectorisation)
  const float shifted = x * 1.44269504088896341f + 12582912.0f;
  const float n = shifted - 12582912.0f;
  const float r = (x - n * 0.693145751953125f) - n * 1.42860682030941723212e-6f;  // x - n ln2, two parts
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  // 2^n, n in [-126, 0]: n is the low bits of `shifted` (its exponent is that of 1.5 * 2^23), so
  // no float-to-int conversion (undefined for a NaN x, whose p is NaN and so is the result);
  // unsigned arithmetic: defined for any bits
  uint32_t shifted_bits;
  std::memcpy(&shifted_bits, &shifted, sizeof(shifted_bits));
  const uint32_t bits = (shifted_bits - 0x4B400000u + 127u) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}
inline double exp_nonpositive(double x) { return std::exp(x); }

inline float log1p_unit(float e) {  // log1p(e) for e in [0, 1]
  const float s = e / (2.0f + e), s2 = s * s;
  float p = 1.0f / 15.0f;
  p = p * s2 + 1.0f / 13.0f;
  p = p * s2 + 1.0f / 11.0f;
  p = p * s2 + 1.0f / 9.0f;
  p = p * s2 + 1.0f / 7.0f;
  p = p * s2 + 1.0f / 5.0f;
  p = p * s2 + 1.0f / 3.0f;
  p = p * s2 + 1.0f;
  return 2.0f * s * p;
}
inline double log1p_unit(double e) { return std::log1p(e); }

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

// The box terms of many pairs at once (float), in a loop the compiler vectorises across pairs:
// the same forward-mode duals as box_iou<Dual<float, 4>>, spelled as plain floats with selects
// instead of branches, exp by the polynomial of exp_nonpositive and atan (CIoU) by the polynomial
// of atan_poly. Inputs and outputs are structure-of-arrays: logits x0..x3, anchors aw/ah and
// targets tx/ty/tw/th in, the IoU-family value and its derivatives d0..d3 with respect to the
// logits out. Both families: the predicted box and the small constants follow Family.
struct Lanes4 {
  float v, d0, d1, d2, d3;
};
inline Lanes4 lanes_sub(Lanes4 a, Lanes4 b) { return {a.v - b.v, a.d0 - b.d0, a.d1 - b.d1, a.d2 - b.d2, a.d3 - b.d3}; }
inline Lanes4 lanes_mul(Lanes4 a, Lanes4 b) {
  return {a.v * b.v, a.d0 * b.v + a.v * b.d0, a.d1 * b.v + a.v * b.d1, a.d2 * b.v + a.v * b.d2,
          a.d3 * b.v + a.v * b.d3};
}
inline Lanes4 lanes_div(Lanes4 a, Lanes4 b) {
  const float v = a.v / b.v;
  return {v, (a.d0 - v * b.d0) / b.v, (a.d1 - v * b.d1) / b.v, (a.d2 - v * b.d2) / b.v, (a.d3 - v * b.d3) / b.v};
}
inline Lanes4 lanes_add_const(Lanes4 a, float c) { return {a.v + c, a.d0, a.d1, a.d2, a.d3}; }
// min / max with the gradient split evenly on ties (as PyTorch's autograd and min2/max2 above)
inline Lanes4 lanes_pick(Lanes4 a, Lanes4 b, float wa) {
  const float wb = 1.0f - wa;
  return {wa * a.v + wb * b.v, wa * a.d0 + wb * b.d0, wa * a.d1 + wb * b.d1, wa * a.d2 + wb * b.d2,
          wa * a.d3 + wb * b.d3};
}
inline Lanes4 lanes_min(Lanes4 a, Lanes4 b) {
  Lanes4 r = lanes_pick(a, b, a.v < b.v ? 1.0f : (a.v == b.v ? 0.5f : 0.0f));
  r.v = a.v < b.v ? a.v : b.v;  // exact, not a weighted sum
  return r;
}
inline Lanes4 lanes_max(Lanes4 a, Lanes4 b) {
  Lanes4 r = lanes_pick(a, b, a.v > b.v ? 1.0f : (a.v == b.v ? 0.5f : 0.0f));
  r.v = a.v > b.v ? a.v : b.v;
  return r;
}
inline Lanes4 lanes_clamp0(Lanes4 a) {  // clamp(min=0): the gradient passes where a >= 0
  const float keep = a.v >= 0.0f ? 1.0f : 0.0f;
  return {a.v >= 0.0f ? a.v : 0.0f, keep * a.d0, keep * a.d1, keep * a.d2, keep * a.d3};
}
inline float exp_capped(float x) {  // exp(min(x, 30)) by exp_nonpositive: no library call
  const float c = std::min(x, 30.0f);
  return c <= 0.0f ? exp_nonpositive(c) : 1.0f / exp_nonpositive(-c);
}

// arctan by argument reduction (|x| > 1 -> 1/x, then x -> (x - 1)/(x + 1) past tan(pi/8)) and an
// odd series to u^23 (|u| <= 0.4143: truncation below 1e-10), branch-free: vectorises.
inline float atan_poly(float x) {
  const float t = x < 0.0f ? -x : x;
  const bool big = t > 1.0f;
  const float r0 = big ? 1.0f / (t > 1e-30f ? t : 1e-30f) : t;
  const bool mid = r0 > 0.41421356237309503f;
  const float u = mid ? (r0 - 1.0f) / (r0 + 1.0f) : r0;
  const float u2 = u * u;
  float q = 1.0f / 23.0f;
  q = -q * u2 + 1.0f / 21.0f;
  q = -q * u2 + 1.0f / 19.0f;
  q = -q * u2 + 1.0f / 17.0f;
  q = -q * u2 + 1.0f / 15.0f;
  q = -q * u2 + 1.0f / 13.0f;
  q = -q * u2 + 1.0f / 11.0f;
  q = -q * u2 + 1.0f / 9.0f;
  q = -q * u2 + 1.0f / 7.0f;
  q = -q * u2 + 1.0f / 5.0f;
  q = -q * u2 + 1.0f / 3.0f;
  q = -q * u2 + 1.0f;
  float r = u * q + (mid ? float(M_PI / 4) : 0.0f);
  r = big ? float(M_PI / 2) - r : r;
  return x < 0.0f ? -r : r;
}

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

// ---------------------------------------------------------------------------------------------
// Target matching of one layer (docs/semantics.md, docs/yolov5.md). YOLOv3: every (anchor, target)
// with wh_iou > threshold (iou_t), anchor-major. YOLOv5: every (anchor, target) whose wh ratios r
// have max(r, 1/r) < threshold (anchor_t), in five blocks (the centre cell, then the neighbour to
// the left, above, to the right, below where the target's position allows it), each anchor-major.
template <typename T>
struct Pair {
  int64_t b, a, gj, gi, cls;
  T tbox[4];
  T anch[2];
};

// A matched pair by reference: the target's row, the anchor, and the cell block (0: the target's
// own cell; YOLOv5 1-4: the neighbour to the left, above, to the right, below). Eight bytes, where
// the expanded Pair takes 64: matching thousands of targets writes little memory. pair_of expands it.
struct PairRef {
  int32_t target;
  int16_t anchor;
  int16_t block;
  PairRef() {}  // left unset: match sizes its output to the most pairs there can be without writing it
  PairRef(int64_t t, int64_t a, int b) : target(int32_t(t)), anchor(int16_t(a)), block(int16_t(b)) {}
};

// The cell offsets of the blocks: the cell is that of (gx - ox, gy - oy).
template <typename T>
constexpr T kBlockOffsets[5][2] = {{T(0), T(0)}, {T(0.5), T(0)}, {T(0), T(0.5)}, {T(-0.5), T(0)}, {T(0), T(-0.5)}};

// trunc toward zero then clamp == trunc of the clamped value, without integer overflow
template <typename T>
inline int64_t grid_index(T v, int64_t n) {
  return static_cast<int64_t>(std::min(std::max(v, T(0)), T(n - 1)));
}

// The cell (gi, gj) of block `block` of a target centred at (gx, gy) in grid units, clamped to the grid.
template <typename T>
inline std::array<int64_t, 2> block_cell(T gx, T gy, int block, int64_t ny, int64_t nx) {
  return {grid_index(gx - kBlockOffsets<T>[block][0], nx), grid_index(gy - kBlockOffsets<T>[block][1], ny)};
}

// The pair a PairRef stands for, on a grid of ny x nx cells (targets and anchors as for match).
template <typename T>
inline Pair<T> pair_of(const T* targets, const T* anchors, int64_t ny, int64_t nx, PairRef r) {
  const T* t = targets + 6 * int64_t(r.target);
  const T sx = T(nx), sy = T(ny), gx = t[2] * sx, gy = t[3] * sy;
  Pair<T> p;
  p.b = static_cast<int64_t>(t[0]);
  p.cls = static_cast<int64_t>(t[1]);
  p.a = r.anchor;
  const auto cell = block_cell(gx, gy, r.block, ny, nx);
  p.gi = cell[0], p.gj = cell[1];
  p.tbox[0] = gx - T(p.gi);  // relative to the clamped cell
  p.tbox[1] = gy - T(p.gj);
  p.tbox[2] = t[4] * sx;
  p.tbox[3] = t[5] * sy;
  p.anch[0] = anchors[2 * r.anchor];
  p.anch[1] = anchors[2 * r.anchor + 1];
  return p;
}

// targets: [nt, 6] contiguous rows (image, class, x, y, w, h), nt < 2^31; anchors: [na, 2]
// contiguous, na < 2^15. The pairs, in pair order, replace the contents of `pairs` (its memory is
// reused). matched_targets, when given ([nt], zeroed by the caller), is set to 1 for every target
// that some anchor matched. Branch-free: every candidate is written at the next free place, which
// advances when it matches (a matched-or-not branch mispredicts on half the candidates).
template <typename T>
void match(const T* targets, int64_t nt, const T* anchors, int64_t na, int64_t ny, int64_t nx, T threshold,
           Family family, std::vector<PairRef>& pairs, char* matched_targets = nullptr) {
  const T sx = T(nx), sy = T(ny);
  int64_t n = 0;
  if (family == Family::kYOLOv3) {
    pairs.resize(na * nt + 1);
    PairRef* out = pairs.data();
    for (int64_t a = 0; a < na; ++a) {
      const T aw = anchors[2 * a], ah = anchors[2 * a + 1];
      for (int64_t k = 0; k < nt; ++k) {
        const T* t = targets + 6 * k;
        const T gw = t[4] * sx, gh = t[5] * sy;
        const T inter = std::min(aw, gw) * std::min(ah, gh);
        const T iou = inter / (aw * ah + gw * gh - inter);
        const bool hit = iou > threshold;
        out[n] = PairRef(k, a, 0);
        n += hit;
        if (matched_targets) matched_targets[k] |= char(hit);
      }
    }
    pairs.resize(n);
    return;
  }
  // YOLOv5: the fit of each (anchor, target), then the five blocks in order
  std::vector<char> fits(na * nt);
  for (int64_t a = 0; a < na; ++a)
    for (int64_t k = 0; k < nt; ++k) {
      const T* t = targets + 6 * k;
      const T rw = t[4] * sx / anchors[2 * a], rh = t[5] * sy / anchors[2 * a + 1];
      const T worst = std::max(std::max(rw, T(1) / rw), std::max(rh, T(1) / rh));
      fits[a * nt + k] = worst < threshold;
      if (matched_targets && fits[a * nt + k]) matched_targets[k] = 1;
    }
  auto frac = [](T v) { return v - std::floor(v); };  // v % 1 (exact)
  pairs.resize(5 * na * nt + 1);
  PairRef* out = pairs.data();
  for (int block = 0; block < 5; ++block)
    for (int64_t a = 0; a < na; ++a)
      for (int64_t k = 0; k < nt; ++k) {
        const T* t = targets + 6 * k;
        const T gx = t[2] * sx, gy = t[3] * sy, fx = sx - gx, fy = sy - gy;
        const bool in_block = block == 0   ? true
                              : block == 1 ? (frac(gx) < T(0.5)) & (gx > T(1))
                              : block == 2 ? (frac(gy) < T(0.5)) & (gy > T(1))
                              : block == 3 ? (frac(fx) < T(0.5)) & (fx > T(1))
                                           : (frac(fy) < T(0.5)) & (fy > T(1));
        out[n] = PairRef(k, a, block);
        n += int(fits[a * nt + k] != 0) & int(in_block);
      }
  pairs.resize(n);
}

}  // namespace yolo_kernels
