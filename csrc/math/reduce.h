// Reductions of the gradient statistics. Plain C++17 (no ATen).
#pragma once

#include <cmath>
#include <cstdint>

namespace yolo_kernels {

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

}  // namespace yolo_kernels
