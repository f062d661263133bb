// Argument checks shared by the CPU kernels of the yolo_kernels ops: each names the argument, what
// was expected and what came (TORCH_CHECK raises a RuntimeError with that message).
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <string>

#include "loss_math.h"

namespace yolo_kernels {

inline BoxKind parse_box_kind(c10::string_view name) {
  if (name == "giou") return BoxKind::kGIoU;
  if (name == "iou") return BoxKind::kIoU;
  if (name == "diou") return BoxKind::kDIoU;
  if (name == "ciou") return BoxKind::kCIoU;
  TORCH_CHECK(false, "box_loss: expected one of 'giou', 'iou', 'diou', 'ciou', got '", std::string(name), "'");
}

inline Reduction parse_reduction(c10::string_view name) {
  if (name == "mean") return Reduction::kMean;
  if (name == "sum") return Reduction::kSum;
  TORCH_CHECK(false, "reduction: expected 'mean' or 'sum', got '", std::string(name), "'");
}

inline Family parse_family(c10::string_view name) {
  if (name == "yolov3") return Family::kYOLOv3;
  if (name == "yolov5") return Family::kYOLOv5;
  TORCH_CHECK(false, "family: expected 'yolov3' or 'yolov5', got '", std::string(name), "'");
}

inline at::ScalarType opmath_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

inline void check_cpu_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, ": expected a CPU tensor, got device ", t.device());
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), name, ": expected a floating-point tensor, got ",
              t.scalar_type());
}

inline void check_targets(const at::Tensor& targets) {
  check_cpu_float(targets, "targets");
  TORCH_CHECK(targets.dim() == 2 && targets.size(1) == 6,
              "targets: expected shape [nt, 6] (image, class, x, y, w, h), got ", targets.sizes());
}

inline void check_anchors(const at::Tensor& anchors, const std::string& name) {
  check_cpu_float(anchors, name.c_str());
  TORCH_CHECK(anchors.dim() == 2 && anchors.size(1) == 2 && anchors.size(0) >= 1, name,
              ": expected shape [na, 2] with na >= 1, got ", anchors.sizes());
}

template <typename T>
inline void check_finite_option(T value, const char* name) {
  TORCH_CHECK(std::isfinite(value), name, ": expected a finite number, got ", value);
}

// Every value check the loss relies on, on the targets converted to T (a few rows).
template <typename T>
inline void check_target_values(const T* t, int64_t nt, int64_t bs, int64_t nc) {
  for (int64_t k = 0; k < nt; ++k) {
    const T* r = t + 6 * k;
    TORCH_CHECK(r[0] >= 0 && r[0] < T(bs) && r[0] == std::trunc(r[0]), "targets[", k,
                ", 0] (image index): expected an integer in [0, ", bs, "), got ", r[0]);
    TORCH_CHECK(r[1] >= 0 && r[1] < T(nc) && r[1] == std::trunc(r[1]), "targets[", k,
                ", 1] (class): expected an integer in [0, ", nc, "), got ", r[1]);
    TORCH_CHECK(std::isfinite(r[2]) && std::isfinite(r[3]), "targets[", k,
                ", 2:4] (box centre): expected finite values, got ", r[2], ", ", r[3]);
    TORCH_CHECK(std::isfinite(r[4]) && std::isfinite(r[5]) && r[4] > 0 && r[5] > 0, "targets[", k,
                ", 4:6] (box size): expected finite values > 0, got ", r[4], ", ", r[5]);
  }
}

template <typename T>
inline void check_anchor_values(const T* a, int64_t na, const std::string& name) {
  for (int64_t i = 0; i < 2 * na; ++i) {
    TORCH_CHECK(std::isfinite(a[i]) && a[i] > 0, name, ": expected finite sizes > 0, got ", a[i], " at row ",
                i / 2);
  }
}

}  // namespace yolo_kernels
