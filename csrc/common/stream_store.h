// Streaming (cache-bypassing) stores for the gradient, which is written once and not read back soon.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace yolo_kernels {

// Stores that bypass the cache (SSE2 non-temporal) where the destination is 16-byte aligned: the
// gradient is written once and not read back soon, and ordinary stores would first read every
// line from memory (doubling the traffic of the pass that dominates the loss's cost). The body
// writes whole 64-byte lines, four stores per iteration: each line's write-combining buffer fills
// at once, and the loop's speed does not hang on where the compiler happens to place it.
inline void stream_store(char* dst, const char* src, size_t n) {
#if defined(__SSE2__)
  const size_t head = std::min(n, size_t((64 - (reinterpret_cast<uintptr_t>(dst) & 63)) & 63));
  std::memcpy(dst, src, head);
  dst += head, src += head, n -= head;
  for (; n >= 64; n -= 64, dst += 64, src += 64) {
    const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src));
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 16));
    const __m128i c = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 32));
    const __m128i d = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 48));
    _mm_stream_si128(reinterpret_cast<__m128i*>(dst), a);
    _mm_stream_si128(reinterpret_cast<__m128i*>(dst + 16), b);
    _mm_stream_si128(reinterpret_cast<__m128i*>(dst + 32), c);
    _mm_stream_si128(reinterpret_cast<__m128i*>(dst + 48), d);
  }
#endif
  std::memcpy(dst, src, n);
}

inline void stream_zero(char* dst, size_t n) {
#if defined(__SSE2__)
  const size_t head = std::min(n, size_t((16 - (reinterpret_cast<uintptr_t>(dst) & 15)) & 15));
  std::memset(dst, 0, head);
  dst += head, n -= head;
  for (; n >= 16; n -= 16, dst += 16) _mm_stream_si128(reinterpret_cast<__m128i*>(dst), _mm_setzero_si128());
#endif
  std::memset(dst, 0, n);
}

inline void stream_fence() {
#if defined(__SSE2__)
  _mm_sfence();
#endif
}

// Zero a dense tensor's memory in parallel chunks.
inline void stream_zero_tensor(const at::Tensor& t) {
  char* base = static_cast<char*>(t.data_ptr());
  const int64_t bytes = t.numel() * t.element_size(), chunk = 1 << 16;
  at::parallel_for(0, (bytes + chunk - 1) / chunk, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) stream_zero(base + c * chunk, size_t(std::min(chunk, bytes - c * chunk)));
    stream_fence();
  });
}


}  // namespace yolo_kernels
