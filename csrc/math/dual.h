// Forward-mode dual numbers (a value and its partial derivatives) for the box losses' gradients,
// on scalars (Dual<T, N>) and as plain-float lanes that vectorise across pairs (Lanes4).
// Plain C++17 (no ATen).
#pragma once

#include <algorithm>
#include <array>
#include <cmath>

namespace yolo_kernels {

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

// arctan of a dual number whose value is value(x.v) (an arctangent: std::atan, or another
// rounding of it); the derivative 1 / (1 + x^2)
template <typename T, int N, typename F>
Dual<T, N> atan_by(const Dual<T, N>& x, F value) {
  Dual<T, N> r(value(x.v));
  const T g = T(1) / (T(1) + x.v * x.v);
  for (int i = 0; i < N; ++i) r.d[i] = x.d[i] * g;
  return r;
}
template <typename T, int N>
Dual<T, N> atan_(const Dual<T, N>& x) {
  return atan_by(x, [](T v) { return std::atan(v); });
}
template <typename T>
T atan_(T x) { return std::atan(x); }

template <typename T, int N>
Dual<T, N> detach(const Dual<T, N>& x) { return Dual<T, N>(x.v); }
template <typename T>
T detach(T x) { return x; }

// Lanes4: Dual<float, 4> as a plain struct of floats, for loops the compiler vectorises across
// pairs (the box rows): selects instead of branches.
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

}  // namespace yolo_kernels
