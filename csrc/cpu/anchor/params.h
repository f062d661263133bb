// The fused anchor loss on the CPU (cpu/fused_loss_kernel.cpp), its parameters and sums: the
// options of a call, one layer's view of p and of its gradient with its pairs, the per-plane sums
// and gradient statistics.
#pragma once

#include <cmath>
#include <cstdint>
#include <vector>

#include "anchor/box.h"
#include "anchor/match.h"
#include "anchor/op_args.h"

namespace yolo_kernels {
namespace anchor_fused {

// The options of a call: the gains box / cls / obj of the three terms, the BCE pos_weights, each
// family's matching threshold under its own name (iou_t: yolov3, anchor_t: yolov5), the focal
// gamma, label smoothing, the IoU kind of the box term.
struct Options {
  double gr, box, cls, cls_pw, obj, obj_pw, iou_t, anchor_t, fl_gamma, label_smoothing;
  BoxKind box_kind;
  Reduction reduction;
  Family family;
  bool sort_obj_iou;  // the highest IoU of a cell sets its objectness target (else its last pair)

  double match_threshold() const { return family == Family::kYOLOv5 ? anchor_t : iou_t; }
};

// One layer's view of p and its gradient, its matched pairs and their per-pair results.
template <typename scalar_t, typename T>
struct Layer {
  const scalar_t* p = nullptr;
  int64_t ps[5] = {};
  scalar_t* g = nullptr;
  int64_t gs[5] = {};
  int64_t bs = 0, na = 0, ny = 0, nx = 0, no = 0;
  const T* targets = nullptr;        // [nt, 6] (as T), what the pairs refer to
  const T* anchors = nullptr;        // [na, 2] (as T)
  std::vector<PairRef> pairs;        // in pair order
  std::vector<int64_t> plane_start;  // [bs * na + 1]: the pairs of plane k are by_plane[plane_start[k] ..]
  std::vector<int32_t> by_plane;     // pair indices grouped by (image, anchor) plane, pair order kept
  T box_scale = 0, cls_scale = 0;    // d loss / d (1 - iou), d loss / d class BCE
  T obj_scale = 0;                   // d loss / d objectness BCE

  // The gradient of each (image, anchor) plane is one contiguous block of whole rows (p contiguous).
  bool block_rows() const { return g != nullptr && gs[4] == 1 && gs[3] == no && gs[2] == nx * no; }
  // The first element of an (image, anchor) plane in p.
  const scalar_t* plane_p(int64_t plane) const { return p + (plane / na) * ps[0] + (plane % na) * ps[1]; }
};

// The sum of x[0 .. n) in double, in four interleaved chains so that the adds overlap (a fixed
// order: the result does not depend on threads or runs).
template <typename T>
double sum4(const T* x, int64_t n) {
  double lanes[4] = {0.0, 0.0, 0.0, 0.0};
  int64_t k = 0;
  for (; k + 4 <= n; k += 4)
    for (int l = 0; l < 4; ++l) lanes[l] += double(x[k + l]);
  for (; k < n; ++k) lanes[0] += double(x[k]);
  return (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]);
}

// Gradient statistics of one part of a layer (docs/design.md, "Gradient statistics"): per
// component (box channels 0-3, objectness 4, classes 5...) the sum of squares of d loss / d p and
// the largest magnitude (NaN-propagating, so a NaN entry shows), and the matched-cell counts.
struct GradStats {
  double sq[3] = {0.0, 0.0, 0.0};
  double max[3] = {0.0, 0.0, 0.0};
  int64_t pairs = 0, cells = 0;  // matched pairs, distinct matched cells
  void add(int component, double v) {
    sq[component] += v * v;
    const double a = std::abs(v);
    if (a > max[component] || a != a) max[component] = a;
  }
  void merge(const GradStats& o) {
    for (int k = 0; k < 3; ++k) {
      sq[k] += o.sq[k];
      if (o.max[k] > max[k] || o.max[k] != o.max[k]) max[k] = o.max[k];
    }
    pairs += o.pairs, cells += o.cells;
  }
};
enum Component { kBox = 0, kObj = 1, kCls = 2 };

// Sums of the element losses of one layer, each added over planes in plane order.
struct LayerSums {
  double box = 0.0, obj = 0.0, cls = 0.0;
  GradStats stats;  // filled when the caller asks for statistics
};

}  // namespace anchor_fused
}  // namespace yolo_kernels
