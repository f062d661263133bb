// The compiled module yolo_kernels._C: loading it registers the ops (csrc/); these bindings add
// build information and the control of the CPU gradient pool.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <string>

#include "common/grad_pool.h"

#ifndef YOLO_KERNELS_CXX_FLAGS
#define YOLO_KERNELS_CXX_FLAGS "unknown"
#endif

namespace {

std::string parallel_backend() {
#if AT_PARALLEL_OPENMP
  return "OpenMP";
#elif AT_PARALLEL_NATIVE
  return "native thread pool";
#else
  return "unknown";
#endif
}

pybind11::dict build_info() {
  pybind11::dict info;
#if defined(__clang__)
  info["compiler"] = std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  info["compiler"] = std::string("gcc ") + __VERSION__;
#else
  info["compiler"] = std::string("unknown");
#endif
  info["flags"] = std::string(YOLO_KERNELS_CXX_FLAGS);
  info["parallel_backend"] = parallel_backend();
  info["torch_parallel_info"] = at::get_parallel_info();
  return info;
}

pybind11::dict pool_stats() {
  const auto s = yolo_kernels::grad_pool_stats();
  pybind11::dict d;
  d["enabled"] = yolo_kernels::grad_pool_enabled();
  d["cached_bytes"] = s.cached_bytes;
  d["cached_buffers"] = s.cached_buffers;
  d["limit_bytes"] = s.limit_bytes;
  d["hits"] = s.hits;
  d["misses"] = s.misses;
  return d;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "yolo_kernels C++ CPU kernels (ops registered under torch.ops.yolo_kernels)";
  m.def("build_info", &build_info, "Compiler, flags and parallel backend of this build");
  m.def("pool_stats", &pool_stats, "State of the CPU gradient buffer pool");
  m.def("pool_clear", &yolo_kernels::grad_pool_clear, "Free every buffer the pool holds");
  m.def("pool_set_limit", &yolo_kernels::grad_pool_set_limit, "Most bytes the pool keeps", pybind11::arg("bytes"));
  m.def("pool_set_enabled", &yolo_kernels::grad_pool_set_enabled, "Turn the pool on or off",
        pybind11::arg("enabled"));
}
