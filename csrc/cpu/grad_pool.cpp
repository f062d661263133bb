#include "common/grad_pool.h"

#include <c10/core/Allocator.h>
#include <c10/core/impl/alloc_cpu.h>

#include <atomic>
#include <cstdlib>
#include <map>
#include <mutex>
#include <vector>

namespace yolo_kernels {
namespace {

int64_t default_limit() {
  // YOLO_KERNELS_GRAD_POOL_MB overrides the default of 4 GiB.
  if (const char* mb = std::getenv("YOLO_KERNELS_GRAD_POOL_MB")) return std::atoll(mb) * (int64_t(1) << 20);
  return int64_t(4) << 30;
}

class GradPool {
 public:
  void* acquire(size_t nbytes) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto it = free_.find(nbytes);
      if (it != free_.end() && !it->second.empty()) {
        void* ptr = it->second.back();
        it->second.pop_back();
        cached_ -= nbytes;
        ++hits_;
        return ptr;
      }
      ++misses_;
    }
    return c10::alloc_cpu(nbytes);
  }

  void release(void* ptr, size_t nbytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (cached_ + int64_t(nbytes) > limit_) {
      // Sizes that changed (multi-scale training) go first; then this buffer if still too big.
      trim_locked(limit_ - int64_t(nbytes), nbytes);
    }
    if (cached_ + int64_t(nbytes) > limit_) {
      c10::free_cpu(ptr);
      return;
    }
    free_[nbytes].push_back(ptr);
    cached_ += nbytes;
  }

  GradPoolStats stats() {
    std::lock_guard<std::mutex> lock(mutex_);
    int64_t buffers = 0;
    for (auto& kv : free_) buffers += int64_t(kv.second.size());
    return {cached_, buffers, limit_, hits_, misses_};
  }

  void clear() {
    std::lock_guard<std::mutex> lock(mutex_);
    trim_locked(0, 0);
  }

  void set_limit(int64_t limit) {
    std::lock_guard<std::mutex> lock(mutex_);
    limit_ = limit < 0 ? 0 : limit;
    trim_locked(limit_, 0);
  }

  std::atomic<bool> enabled{true};

 private:
  // Free cached buffers until at most `target` bytes stay, keeping buffers of size `keep` last.
  void trim_locked(int64_t target, size_t keep) {
    for (int pass = 0; pass < 2 && cached_ > target; ++pass) {
      for (auto it = free_.begin(); it != free_.end() && cached_ > target;) {
        if (pass == 0 && it->first == keep) {
          ++it;
          continue;
        }
        while (!it->second.empty() && cached_ > target) {
          c10::free_cpu(it->second.back());
          it->second.pop_back();
          cached_ -= int64_t(it->first);
        }
        it = it->second.empty() ? free_.erase(it) : std::next(it);
      }
    }
  }

  std::mutex mutex_;
  std::map<size_t, std::vector<void*>> free_;
  int64_t cached_ = 0;
  int64_t limit_ = default_limit();
  int64_t hits_ = 0;
  int64_t misses_ = 0;
};

// Never destroyed: tensors may release their buffers during interpreter shutdown.
GradPool& pool() {
  static GradPool* instance = new GradPool();
  return *instance;
}

}  // namespace

at::Tensor pooled_empty_strided(at::IntArrayRef sizes, at::IntArrayRef strides, at::ScalarType dtype) {
  const auto options = at::TensorOptions().dtype(dtype).device(at::kCPU);
  int64_t span = 1;  // elements the strided layout touches
  for (size_t i = 0; i < sizes.size(); ++i) {
    if (sizes[i] == 0) return at::empty_strided(sizes, strides, options);
    span += (sizes[i] - 1) * strides[i];
  }
  if (!pool().enabled) return at::empty_strided(sizes, strides, options);
  const size_t nbytes = size_t(span) * at::elementSize(dtype);
  void* ptr = pool().acquire(nbytes);
  // Tell the profiler (profile_memory=True) about the buffer's life, as ATen's allocator would.
  c10::reportMemoryUsageToProfiler(ptr, int64_t(nbytes), 0, 0, c10::Device(c10::DeviceType::CPU));
  return at::from_blob(
      ptr, sizes, strides,
      [nbytes](void* p) {
        c10::reportMemoryUsageToProfiler(p, -int64_t(nbytes), 0, 0, c10::Device(c10::DeviceType::CPU));
        pool().release(p, nbytes);
      },
      options);
}

GradPoolStats grad_pool_stats() { return pool().stats(); }
void grad_pool_clear() { pool().clear(); }
void grad_pool_set_limit(int64_t limit_bytes) { pool().set_limit(limit_bytes); }
void grad_pool_set_enabled(bool enabled) {
  pool().enabled = enabled;
  if (!enabled) pool().clear();
}
bool grad_pool_enabled() { return pool().enabled; }

}  // namespace yolo_kernels
