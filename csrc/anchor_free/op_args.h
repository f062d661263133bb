// The arguments the anchor-free family's ops share (tal_assign, detection_loss and its backward):
// the layout of the points over the levels, and the checks of the prediction and target tensors,
// each naming the argument, what was expected and what came.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

namespace yolo_kernels {
namespace anchor_free {

// The points of every level in order: level l is an ny x nx grid of stride strides[l] whose points
// start at offsets[l] (row-major cells).
struct Layout {
  std::vector<int64_t> grids;  // ny0, nx0, ny1, nx1, ...
  std::vector<double> strides;
  std::vector<int64_t> offsets;
  int64_t points = 0;
  int64_t levels() const { return int64_t(strides.size()); }
  int64_t ny(int64_t l) const { return grids[2 * l]; }
  int64_t nx(int64_t l) const { return grids[2 * l + 1]; }
};

inline Layout check_layout(at::IntArrayRef grids, at::ArrayRef<double> strides) {
  TORCH_CHECK(!strides.empty() && grids.size() == 2 * strides.size(),
              "grids: expected (ny, nx) of each of the ", strides.size(), " levels (", 2 * strides.size(),
              " ints), got ", grids.size(), " ints");
  Layout L{grids.vec(), strides.vec(), {}, 0};
  for (size_t l = 0; l < strides.size(); ++l) {
    TORCH_CHECK(grids[2 * l] >= 1 && grids[2 * l + 1] >= 1, "grids: expected positive sizes, got ", grids[2 * l],
                " x ", grids[2 * l + 1], " at level ", l);
    TORCH_CHECK(strides[l] > 0 && std::isfinite(strides[l]), "strides: expected positive finite strides, got ",
                strides[l], " at level ", l);
    L.offsets.push_back(L.points);
    L.points += grids[2 * l] * grids[2 * l + 1];
  }
  return L;
}

// boxes [bs, 4 * reg_max, A] and scores [bs, nc, A] of one floating dtype on the CPU, A the points
// of the grids.
inline Layout check_predictions(const at::Tensor& boxes, const at::Tensor& scores, at::IntArrayRef grids,
                                at::ArrayRef<double> strides) {
  const Layout L = check_layout(grids, strides);
  for (const auto* t : {&boxes, &scores}) {
    const char* name = t == &boxes ? "boxes" : "scores";
    TORCH_CHECK(t->device().is_cpu(), name, ": expected a CPU tensor, got device ", t->device());
    TORCH_CHECK(at::isFloatingType(t->scalar_type()), name, ": expected a floating-point tensor, got ",
                t->scalar_type());
    TORCH_CHECK(t->dim() == 3 && t->size(2) == L.points, name, ": expected shape [bs, channels, ", L.points,
                "] (the points of the grids), got ", t->sizes());
  }
  TORCH_CHECK(boxes.size(1) >= 4 && boxes.size(1) % 4 == 0, "boxes: expected 4 * reg_max channels, got ",
              boxes.size(1));
  TORCH_CHECK(scores.size(0) == boxes.size(0) && scores.size(1) >= 1,
              "scores: expected shape [", boxes.size(0), ", nc >= 1, ", L.points, "], got ", scores.sizes());
  TORCH_CHECK(scores.scalar_type() == boxes.scalar_type(), "scores: expected the dtype of boxes (",
              boxes.scalar_type(), "), got ", scores.scalar_type());
  return L;
}

// gt_labels [bs, m] int64 and gt_boxes [bs, m, 4] float32 pixel xyxy (all-zero rows: padding).
inline void check_targets(const at::Tensor& gt_labels, const at::Tensor& gt_boxes, int64_t bs) {
  TORCH_CHECK(gt_boxes.device().is_cpu() && gt_labels.device().is_cpu(),
              "gt_labels, gt_boxes: expected CPU tensors, got devices ", gt_labels.device(), ", ", gt_boxes.device());
  TORCH_CHECK(gt_boxes.scalar_type() == at::kFloat && gt_boxes.dim() == 3 && gt_boxes.size(0) == bs &&
                  gt_boxes.size(2) == 4,
              "gt_boxes: expected a float32 tensor of shape [", bs, ", m, 4], got ", gt_boxes.scalar_type(), " ",
              gt_boxes.sizes());
  TORCH_CHECK(gt_labels.scalar_type() == at::kLong && gt_labels.dim() == 2 && gt_labels.size(0) == bs &&
                  gt_labels.size(1) == gt_boxes.size(1),
              "gt_labels: expected an int64 tensor of shape [", bs, ", ", gt_boxes.size(1), "], got ",
              gt_labels.scalar_type(), " ", gt_labels.sizes());
}

}  // namespace anchor_free
}  // namespace yolo_kernels
