// CPU kernel of yolo_kernels::match (schema in yolo_kernels/library.py; semantics in docs/semantics.md).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "anchor/match.h"
#include "anchor/op_args.h"

namespace yolo_kernels {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> match_cpu(const at::Tensor& targets,
                                                                     const at::Tensor& anchors, int64_t ny,
                                                                     int64_t nx, double threshold,
                                                                     c10::string_view family_name) {
  check_targets(targets);
  check_anchors(anchors, "anchors");
  TORCH_CHECK(ny >= 1 && nx >= 1, "ny, nx: expected a non-empty grid, got ", ny, " x ", nx);
  check_finite_option(threshold, "threshold");
  const Family family = parse_family(family_name);
  const auto T_type = opmath_type(targets.scalar_type());
  const at::Tensor t = targets.to(T_type).contiguous();
  const at::Tensor a = anchors.to(T_type).contiguous();
  at::Tensor indices, tbox, anch, tcls;
  AT_DISPATCH_FLOATING_TYPES(T_type, "yolo_kernels::match", [&] {
    using T = scalar_t;
    const int64_t nt = t.size(0), na = a.size(0);
    for (int64_t k = 0; k < nt; ++k) {
      const T* r = t.data_ptr<T>() + 6 * k;
      TORCH_CHECK(std::isfinite(r[0]) && std::isfinite(r[1]) && std::isfinite(r[2]) && std::isfinite(r[3]) &&
                      std::isfinite(r[4]) && std::isfinite(r[5]),
                  "targets[", k, "]: expected finite values");
    }
    check_anchor_values(a.data_ptr<T>(), na, "anchors");
    check_pair_capacity(nt, na);
    std::vector<PairRef> pairs;
    match<T>(t.data_ptr<T>(), nt, a.data_ptr<T>(), na, ny, nx, T(threshold), family, pairs);
    const int64_t P = int64_t(pairs.size());
    indices = at::empty({P, 4}, at::kLong);
    tbox = at::empty({P, 4}, T_type);
    anch = at::empty({P, 2}, T_type);
    tcls = at::empty({P}, at::kLong);
    auto* ind = indices.data_ptr<int64_t>();
    for (int64_t j = 0; j < P; ++j) {
      const auto q = pair_of(t.data_ptr<T>(), a.data_ptr<T>(), ny, nx, pairs[j]);
      ind[4 * j] = q.b, ind[4 * j + 1] = q.a, ind[4 * j + 2] = q.gj, ind[4 * j + 3] = q.gi;
      std::copy(q.tbox, q.tbox + 4, tbox.data_ptr<T>() + 4 * j);
      std::copy(q.anch, q.anch + 2, anch.data_ptr<T>() + 2 * j);
      tcls.data_ptr<int64_t>()[j] = q.cls;
    }
  });
  return {indices, tbox, anch, tcls};
}

}  // namespace

TORCH_LIBRARY_IMPL(yolo_kernels, CPU, m) { m.impl("match", &match_cpu); }

}  // namespace yolo_kernels
