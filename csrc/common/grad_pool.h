// A pool of CPU gradient buffers. Tensors handed out by pooled_empty_strided give their memory
// back to the pool when their storage dies (a DataPtr deleter), so a training loop that
// allocates the same gradient sizes every step reuses memory that is already faulted in instead
// of paying glibc's page faults on every fresh large allocation (docs/design.md, "CPU").
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace yolo_kernels {

struct GradPoolStats {
  int64_t cached_bytes;    // memory held for reuse
  int64_t cached_buffers;
  int64_t limit_bytes;     // the most the pool keeps; beyond it released buffers are freed
  int64_t hits;            // allocations served from the pool
  int64_t misses;          // allocations that needed fresh memory
};

// An uninitialised CPU tensor with the given sizes and strides whose memory comes from the pool.
at::Tensor pooled_empty_strided(at::IntArrayRef sizes, at::IntArrayRef strides, at::ScalarType dtype);

GradPoolStats grad_pool_stats();
void grad_pool_clear();                      // free every cached buffer
void grad_pool_set_limit(int64_t limit_bytes);  // also trims the cache to the new limit
void grad_pool_set_enabled(bool enabled);    // disabled: plain at::empty_strided
bool grad_pool_enabled();

}  // namespace yolo_kernels
