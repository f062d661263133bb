// Argument checks shared by the CPU kernels of every family: each names the argument, what
// was expected and what came (TORCH_CHECK raises a RuntimeError with that message, TORCH_CHECK_VALUE
// a ValueError).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

namespace yolo_kernels {

inline at::ScalarType opmath_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

inline void check_cpu_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, ": expected a CPU tensor, got device ", t.device());
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), name, ": expected a floating-point tensor, got ",
              t.scalar_type());
}

template <typename T>
inline void check_finite_option(T value, const char* name) {
  TORCH_CHECK(std::isfinite(value), name, ": expected a finite number, got ", value);
}

// The largest normalised box width or height accepted (yolo_kernels/validate.py, MAX_BOX_SIZE).
constexpr double kMaxBoxSize = 2.0;

// A number as Python prints float(f"{v:.7g}"): at most seven significant digits, the shortest form
// that reads back, "2.0" rather than "2", exponent form below 1e-4 and from 1e16 (the messages of
// the value checks are the same from this kernel and from yolo_kernels/validate.py).
inline std::string py_float(double v) {
  if (std::isnan(v)) return "nan";
  if (std::isinf(v)) return v > 0 ? "inf" : "-inf";
  char buf[64];
  std::snprintf(buf, sizeof(buf), "%.7g", v);
  const double r = std::strtod(buf, nullptr);
  int digits = 1;
  for (; digits < 17; ++digits) {
    std::snprintf(buf, sizeof(buf), "%.*e", digits - 1, r);
    if (std::strtod(buf, nullptr) == r) break;
  }
  const int exponent = std::atoi(std::strchr(buf, 'e') + 1);
  if (exponent < -4 || exponent >= 16) return buf;
  std::snprintf(buf, sizeof(buf), "%.*f", std::max(digits - 1 - exponent, 1), r);
  return buf;
}

inline std::string py_pair(double a, double b) { return "[" + py_float(a) + ", " + py_float(b) + "]"; }

}  // namespace yolo_kernels
