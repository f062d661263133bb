// CPU kernel of yolo_kernels::bce_with_logits (schema in yolo_kernels/library.py): element-wise BCE and its gradient.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "common/checks.h"
#include "math/bce.h"

namespace yolo_kernels {
namespace {

std::tuple<at::Tensor, at::Tensor> bce_with_logits_cpu(const at::Tensor& x, const at::Tensor& y, double pos_weight,
                                                       double gamma) {
  check_cpu_float(x, "x");
  check_cpu_float(y, "y");
  TORCH_CHECK(x.sizes() == y.sizes(), "y: expected the shape of x ", x.sizes(), ", got ", y.sizes());
  check_finite_option(pos_weight, "pos_weight");
  check_finite_option(gamma, "gamma");
  TORCH_CHECK(pos_weight > 0 && gamma >= 0, "pos_weight, gamma: expected pos_weight > 0 and gamma >= 0, got ",
              pos_weight, ", ", gamma);
  const auto T_type = opmath_type(x.scalar_type());
  const at::Tensor xc = x.to(T_type).contiguous(), yc = y.to(T_type).contiguous();
  at::Tensor loss = at::empty(x.sizes(), T_type), grad = at::empty(x.sizes(), T_type);
  AT_DISPATCH_FLOATING_TYPES(T_type, "yolo_kernels::bce_with_logits", [&] {
    using T = scalar_t;
    const T *xp = xc.data_ptr<T>(), *yp = yc.data_ptr<T>();
    T *lp = loss.data_ptr<T>(), *gp = grad.data_ptr<T>();
    // the row loop (float: its per-instruction-set build in math/rows.cpp)
    at::parallel_for(0, xc.numel(), 4096, [&](int64_t begin, int64_t end) {
      bce_row(xp + begin, yp + begin, lp + begin, gp + begin, end - begin, T(pos_weight), T(gamma));
    });
  });
  return {loss, grad};
}

}  // namespace

TORCH_LIBRARY_IMPL(yolo_kernels, CPU, m) { m.impl("bce_with_logits", &bce_with_logits_cpu); }

}  // namespace yolo_kernels
