// exp, log1p and atan by polynomials: branch-free, no library calls, so loops over them vectorise.
// Plain C++17 (no ATen).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace yolo_kernels {

// exp and log1p by polynomials (float: a few ulp; double: the C library) on arguments where they
// are well conditioned: exp on [-87, 0], log1p on [0, 1] through log1p(e) = 2 atanh(e / (2 + e)).
// Branch-free and without library calls, so loops over them vectorise. The polynomials' steps are
// fused multiply-adds (std::fma: one rounding, the same bits on every instruction set; one
// instruction where the CPU has FMA, which every clone of math/rows.cpp but the baseline's
// assumes); the build's -ffp-contract=off keeps the compiler from fusing anything else.
inline float exp_nonpositive(float x) {
  x = std::max(x, -87.0f);  // below: 2^n would leave the normal range; the result is ~1e-38 either way
  // round to nearest by adding and subtracting 1.5 * 2^23 (a library call would block vectorisation)
  const float shifted = std::fma(x, 1.44269504088896341f, 12582912.0f);
  const float n = shifted - 12582912.0f;
  const float r = std::fma(-n, 1.42860682030941723212e-6f, std::fma(-n, 0.693145751953125f, x));  // x - n ln2
  float p = 1.0f / 5040.0f;
  p = std::fma(p, r, 1.0f / 720.0f);
  p = std::fma(p, r, 1.0f / 120.0f);
  p = std::fma(p, r, 1.0f / 24.0f);
  p = std::fma(p, r, 1.0f / 6.0f);
  p = std::fma(p, r, 0.5f);
  p = std::fma(p, r, 1.0f);
  p = std::fma(p, r, 1.0f);
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
  p = std::fma(p, s2, 1.0f / 13.0f);
  p = std::fma(p, s2, 1.0f / 11.0f);
  p = std::fma(p, s2, 1.0f / 9.0f);
  p = std::fma(p, s2, 1.0f / 7.0f);
  p = std::fma(p, s2, 1.0f / 5.0f);
  p = std::fma(p, s2, 1.0f / 3.0f);
  p = std::fma(p, s2, 1.0f);
  return 2.0f * s * p;
}
inline double log1p_unit(double e) { return std::log1p(e); }

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

// arctan of a float as the nearest float to the exact value but where that lies within ~1e-12
// (relative) of a rounding boundary: the reduction of atan_poly and its odd series to u^33 in
// double (truncation below 1e-13), rounded once. Branch-free and without library calls (loops over
// it vectorise), with the same bits on every instruction set (no fused steps). The C library's
// atanf is within an ulp of it (the same in ~99% of floats); atan_poly is ~25% an ulp or more off.
inline float atan_via_double(float x) {
  const double t = std::fabs(double(x));
  const bool big = t > 1.0;
  const double r0 = big ? 1.0 / t : t;  // 1 / inf = 0: atan(+-inf) = +-pi/2
  const bool mid = r0 > 0.41421356237309503;
  const double u = mid ? (r0 - 1.0) / (r0 + 1.0) : r0;
  const double u2 = u * u;
  double q = 1.0 / 33.0;
  for (int k = 31; k >= 1; k -= 2) q = 1.0 / double(k) - q * u2;
  double r = u * q + (mid ? M_PI / 4 : 0.0);
  r = big ? M_PI / 2 - r : r;
  return float(std::copysign(r, double(x)));
}

}  // namespace yolo_kernels
