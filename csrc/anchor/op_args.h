// The anchor-based ops' arguments: the option strings parsed, the targets and anchors checked
// (each check names the argument, what was expected and what came; the value checks have the
// messages of yolo_kernels/anchor/validate.py).
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <string>

#include "anchor/box.h"
#include "common/checks.h"

namespace yolo_kernels {

enum class Reduction { kMean, kSum };

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

// Every value check the loss relies on, on the targets converted to T: column by column, naming the
// first bad row, with the messages of yolo_kernels/validate.py (ValueError).
template <typename T>
inline void check_target_values(const T* t, int64_t nt, int64_t bs, int64_t nc) {
  auto integral_in = [](T v, int64_t hi) { return v >= 0 && v < T(hi) && v == std::trunc(v); };
  for (int64_t k = 0; k < nt; ++k)
    TORCH_CHECK_VALUE(integral_in(t[6 * k], bs), "targets[:, 0] (image index): expected integers in [0, ", bs,
                      "), got ", py_float(t[6 * k]), " at row ", k);
  for (int64_t k = 0; k < nt; ++k)
    TORCH_CHECK_VALUE(integral_in(t[6 * k + 1], nc), "targets[:, 1] (class): expected integers in [0, ", nc,
                      "), got ", py_float(t[6 * k + 1]), " at row ", k);
  for (int64_t k = 0; k < nt; ++k)
    TORCH_CHECK_VALUE(std::isfinite(t[6 * k + 2]) && std::isfinite(t[6 * k + 3]),
                      "targets[:, 2:4] (box centre x, y): expected finite values, got ",
                      py_pair(t[6 * k + 2], t[6 * k + 3]), " at row ", k);
  for (int64_t k = 0; k < nt; ++k) {  // sizes of 0 match nothing; MAX_BOX_SIZE in validate.py says why 2
    const T w = t[6 * k + 4], h = t[6 * k + 5];
    TORCH_CHECK_VALUE(w >= 0 && h >= 0 && w <= T(kMaxBoxSize) && h <= T(kMaxBoxSize),  // false for NaN
                      "targets[:, 4:6] (box w, h): expected finite sizes in [0, 2] as fractions of the image "
                      "(normalised; boxes in pixels?), got ",
                      py_pair(w, h), " at row ", k);
  }
}

// match writes pairs as PairRef (32-bit target, 16-bit anchor indices), at most 5 * na * nt of
// them, counted in 32 bits.
inline void check_pair_capacity(int64_t nt, int64_t na) {
  TORCH_CHECK(na < (int64_t(1) << 15) && 5 * na * nt < (int64_t(1) << 31), "targets: expected fewer than ",
              ((int64_t(1) << 31) - 1) / (5 * na), " targets with ", na, " anchors (and fewer than 2^15 anchors), got ",
              nt);
}

template <typename T>
inline void check_anchor_values(const T* a, int64_t na, const std::string& name) {
  for (int64_t i = 0; i < na; ++i) {
    const bool ok = std::isfinite(a[2 * i]) && std::isfinite(a[2 * i + 1]) && a[2 * i] > 0 && a[2 * i + 1] > 0;
    TORCH_CHECK_VALUE(ok, name, ": expected finite sizes > 0, got ", py_pair(a[2 * i], a[2 * i + 1]), " at row ", i);
  }
}

}  // namespace yolo_kernels
