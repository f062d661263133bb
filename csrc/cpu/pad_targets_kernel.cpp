// CPU kernel of yolo_kernels::pad_targets (schema in yolo_kernels/library.py): an ultralytics batch's
// targets (one row per box, its image in batch_idx) checked and laid out per image for the
// anchor-free ops, as reference.pad_targets lays them out (the same bits), in one pass instead of a
// score of small tensor ops and NumPy checks (their fixed costs were ~7% of a whole call with few
// boxes).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <vector>

#include "common/checks.h"

namespace yolo_kernels {
namespace anchor_free {
namespace {

// The values the loss relies on, each check's first bad row named, with the messages of
// yolo_kernels/anchor_free/validate.py (ValueError): image and class ids integers in range, box
// centres finite, sizes finite in [0, kMaxBoxSize] (normalised). b, c: n values; t: n rows of 4.
void check_target_values(const double* b, const double* c, const double* t, int64_t n, int64_t bs, int64_t nc) {
  const auto integral_in = [](double v, int64_t hi) { return v >= 0 && v < double(hi) && v == std::trunc(v); };
  for (int64_t i = 0; i < n; ++i)
    TORCH_CHECK_VALUE(integral_in(b[i], bs), "batch['batch_idx']: expected integers in [0, ", bs, "), got ",
                      py_float(b[i]), " at row ", i);
  for (int64_t i = 0; i < n; ++i)
    TORCH_CHECK_VALUE(integral_in(c[i], nc), "batch['cls']: expected integers in [0, ", nc, "), got ",
                      py_float(c[i]), " at row ", i);
  for (int64_t i = 0; i < n; ++i)
    TORCH_CHECK_VALUE(std::isfinite(t[4 * i]) && std::isfinite(t[4 * i + 1]),
                      "batch['bboxes'][:, 0:2] (box centre x, y): expected finite values, got ",
                      py_pair(t[4 * i], t[4 * i + 1]), " at row ", i);
  for (int64_t i = 0; i < n; ++i) {
    const double w = t[4 * i + 2], h = t[4 * i + 3];
    TORCH_CHECK_VALUE(w >= 0 && h >= 0 && w <= kMaxBoxSize && h <= kMaxBoxSize,  // false for NaN; inf is above
                      "batch['bboxes'][:, 2:4] (box w, h): expected finite sizes in [0, 2] as fractions of the "
                      "image (normalised xywh; boxes in pixels?), got ",
                      py_pair(w, h), " at row ", i);
  }
}

// gt_labels [bs, m] (int64) and gt_boxes [bs, m, 4] (float32 pixel xyxy; all-zero rows: padding),
// m the most boxes of one image; an image's boxes in their input order. A box's normalised xywh
// is scaled by the image size (image_w, image_h) in float32 and turned to corners as
// reference.xywh_to_xyxy does (x - w / 2, x + w / 2). The values are checked first.
std::tuple<at::Tensor, at::Tensor> pad_targets_cpu(const at::Tensor& batch_idx, const at::Tensor& cls,
                                                   const at::Tensor& bboxes, int64_t bs, int64_t nc, double image_w,
                                                   double image_h) {
  const int64_t n = batch_idx.numel();
  TORCH_CHECK(batch_idx.device().is_cpu() && cls.device().is_cpu() && bboxes.device().is_cpu(),
              "batch_idx, cls, bboxes: expected CPU tensors, got devices ", batch_idx.device(), ", ", cls.device(),
              ", ", bboxes.device());
  TORCH_CHECK(bs >= 1, "bs: expected a batch size of at least 1, got ", bs);
  TORCH_CHECK(cls.numel() == n, "cls: expected ", n, " values (as batch_idx), got shape ", cls.sizes());
  TORCH_CHECK(bboxes.dim() == 2 && bboxes.size(0) == n && bboxes.size(1) == 4,
              "bboxes: expected shape [", n, ", 4] (normalised x, y, w, h), got ", bboxes.sizes());
  TORCH_CHECK(nc >= 1, "nc: expected at least one class, got ", nc);
  // every input read once, as double (exact for every float dtype and for ids in range)
  const at::Tensor bi = batch_idx.reshape(-1).to(at::kDouble).contiguous();
  const at::Tensor cl = cls.reshape(-1).to(at::kDouble).contiguous();
  const at::Tensor bb = bboxes.to(at::kDouble).contiguous();
  const double *im = bi.data_ptr<double>(), *lb = cl.data_ptr<double>(), *bx = bb.data_ptr<double>();
  check_target_values(im, lb, bx, n, bs, nc);
  // as the reference: image ids (whole, in range) as int64, labels and boxes through float32
  std::vector<int64_t> slot(static_cast<size_t>(n)), count(static_cast<size_t>(bs), 0);
  for (int64_t i = 0; i < n; ++i) slot[i] = count[int64_t(im[i])]++;
  const int64_t m = n == 0 ? 0 : *std::max_element(count.begin(), count.end());
  at::Tensor gt_labels = at::zeros({bs, m}, at::kLong);
  at::Tensor gt_boxes = at::zeros({bs, m, 4}, at::kFloat);
  int64_t* gl = gt_labels.data_ptr<int64_t>();
  float* gb = gt_boxes.data_ptr<float>();
  const float w = float(image_w), h = float(image_h);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t r = int64_t(im[i]) * m + slot[i];
    gl[r] = int64_t(float(lb[i]));
    const float x = float(bx[4 * i]) * w, y = float(bx[4 * i + 1]) * h, half_w = float(bx[4 * i + 2]) * w / 2.0f,
                half_h = float(bx[4 * i + 3]) * h / 2.0f;
    gb[4 * r] = x - half_w, gb[4 * r + 1] = y - half_h, gb[4 * r + 2] = x + half_w, gb[4 * r + 3] = y + half_h;
  }
  return {gt_labels, gt_boxes};
}

}  // namespace
}  // namespace anchor_free

TORCH_LIBRARY_IMPL(yolo_kernels, CPU, m) { m.impl("pad_targets", &anchor_free::pad_targets_cpu); }

}  // namespace yolo_kernels
