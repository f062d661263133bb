// CPU kernel of yolo_kernels::box_iou (schema in yolo_kernels/library.py): the IoU family and its gradient.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "anchor/box.h"
#include "anchor/op_args.h"

namespace yolo_kernels {
namespace {

std::tuple<at::Tensor, at::Tensor> box_iou_cpu(const at::Tensor& ps, const at::Tensor& tbox, const at::Tensor& anch,
                                               c10::string_view box_loss, c10::string_view family_name) {
  check_cpu_float(ps, "ps");
  check_cpu_float(tbox, "tbox");
  check_cpu_float(anch, "anch");
  TORCH_CHECK(ps.dim() == 2 && ps.size(1) >= 4, "ps: expected shape [P, >= 4], got ", ps.sizes());
  const int64_t P = ps.size(0);
  TORCH_CHECK(tbox.dim() == 2 && tbox.size(0) == P && tbox.size(1) == 4, "tbox: expected shape [", P,
              ", 4], got ", tbox.sizes());
  TORCH_CHECK(anch.dim() == 2 && anch.size(0) == P && anch.size(1) == 2, "anch: expected shape [", P,
              ", 2], got ", anch.sizes());
  const BoxKind kind = parse_box_kind(box_loss);
  const Family family = parse_family(family_name);
  const auto T_type = opmath_type(ps.scalar_type());
  const at::Tensor x = ps.narrow(1, 0, 4).to(T_type).contiguous();
  const at::Tensor tb = tbox.to(T_type).contiguous(), an = anch.to(T_type).contiguous();
  at::Tensor iou = at::empty({P}, T_type), grad = at::empty({P, 4}, T_type);
  AT_DISPATCH_FLOATING_TYPES(T_type, "yolo_kernels::box_iou", [&] {
    using T = scalar_t;
    const T *xp = x.data_ptr<T>(), *tp = tb.data_ptr<T>(), *ap = an.data_ptr<T>();
    T *ip = iou.data_ptr<T>(), *gp = grad.data_ptr<T>();
    at::parallel_for(0, P, 64, [&](int64_t begin, int64_t end) {
      for (int64_t j = begin; j < end; ++j) {
        const auto box = predicted_box<T>(xp + 4 * j, ap[2 * j], ap[2 * j + 1], family);
        const T* t = tp + 4 * j;
        const auto r = box_iou(box[0], box[1], box[2], box[3], t[0], t[1], t[2], t[3], kind, BoxEps<T>::of(family));
        ip[j] = r.v;
        std::copy(r.d.begin(), r.d.end(), gp + 4 * j);
      }
    });
  });
  return {iou, grad};
}

}  // namespace

TORCH_LIBRARY_IMPL(yolo_kernels, CPU, m) { m.impl("box_iou", &box_iou_cpu); }

}  // namespace yolo_kernels
