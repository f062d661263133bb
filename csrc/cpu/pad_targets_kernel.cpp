// CPU kernel of yolo_kernels::pad_targets (schema in yolo_kernels/library.py): an ultralytics batch's
// targets (one row per box, its image in batch_idx) laid out per image for the anchor-free ops, as
// reference.pad_targets lays them out (the same bits) in one pass instead of a score of small tensor
// ops (their fixed costs were a few percent of a whole call with few boxes).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <vector>

namespace yolo_kernels {
namespace anchor_free {
namespace {

// gt_labels [bs, m] (int64) and gt_boxes [bs, m, 4] (float32 pixel xyxy; all-zero rows: padding),
// m the most boxes of one image; an image's boxes in their input order. A box's normalised xywh
// is scaled by the image size (image_w, image_h) in float32 and turned to corners as
// reference.xywh_to_xyxy does (x - w / 2, x + w / 2).
std::tuple<at::Tensor, at::Tensor> pad_targets_cpu(const at::Tensor& batch_idx, const at::Tensor& cls,
                                                   const at::Tensor& bboxes, int64_t bs, double image_w,
                                                   double image_h) {
  const int64_t n = batch_idx.numel();
  TORCH_CHECK(batch_idx.device().is_cpu() && cls.device().is_cpu() && bboxes.device().is_cpu(),
              "batch_idx, cls, bboxes: expected CPU tensors, got devices ", batch_idx.device(), ", ", cls.device(),
              ", ", bboxes.device());
  TORCH_CHECK(bs >= 1, "bs: expected a batch size of at least 1, got ", bs);
  TORCH_CHECK(cls.numel() == n, "cls: expected ", n, " values (as batch_idx), got shape ", cls.sizes());
  TORCH_CHECK(bboxes.dim() == 2 && bboxes.size(0) == n && bboxes.size(1) == 4,
              "bboxes: expected shape [", n, ", 4] (normalised x, y, w, h), got ", bboxes.sizes());
  // as the reference: image indices truncated to int64, labels and boxes through float32
  const at::Tensor image = batch_idx.reshape(-1).to(at::kLong).contiguous();
  const at::Tensor label = cls.reshape(-1).to(at::kFloat).contiguous();
  const at::Tensor box = bboxes.to(at::kFloat).contiguous();
  const int64_t* im = image.data_ptr<int64_t>();
  std::vector<int64_t> slot(static_cast<size_t>(n)), count(static_cast<size_t>(bs), 0);
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(im[i] >= 0 && im[i] < bs, "batch_idx: expected images in [0, ", bs, "), got ", im[i], " at row ", i);
    slot[i] = count[im[i]]++;
  }
  const int64_t m = n == 0 ? 0 : *std::max_element(count.begin(), count.end());
  at::Tensor gt_labels = at::zeros({bs, m}, at::kLong);
  at::Tensor gt_boxes = at::zeros({bs, m, 4}, at::kFloat);
  int64_t* gl = gt_labels.data_ptr<int64_t>();
  float* gb = gt_boxes.data_ptr<float>();
  const float* lb = label.data_ptr<float>();
  const float* bx = box.data_ptr<float>();
  const float w = float(image_w), h = float(image_h);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t r = im[i] * m + slot[i];
    gl[r] = int64_t(lb[i]);
    const float x = bx[4 * i] * w, y = bx[4 * i + 1] * h, half_w = bx[4 * i + 2] * w / 2.0f,
                half_h = bx[4 * i + 3] * h / 2.0f;
    gb[4 * r] = x - half_w, gb[4 * r + 1] = y - half_h, gb[4 * r + 2] = x + half_w, gb[4 * r + 3] = y + half_h;
  }
  return {gt_labels, gt_boxes};
}

}  // namespace
}  // namespace anchor_free

TORCH_LIBRARY_IMPL(yolo_kernels, CPU, m) { m.impl("pad_targets", &anchor_free::pad_targets_cpu); }

}  // namespace yolo_kernels
