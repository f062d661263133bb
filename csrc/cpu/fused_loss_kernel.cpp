// CPU kernel of yolo_kernels::fused_loss (schema in yolo_kernels/library.py, semantics in docs/semantics.md and
// yolo_kernels/reference.py).
//
// fused_loss makes one pass over each layer's cells and writes the gradient of the loss with
// respect to p once: zeros plus the objectness term for every row, and for each matched cell the
// box and class terms of all its pairs (duplicates summed in pair order). The class BCE is
// evaluated once per matched cell, not once per pair: pairs on one cell share its logits and
// differ in one class only. Work is split into fixed chunks (one (image, anchor) plane, one pair)
// whose partial sums are added in a fixed order, so results are bitwise identical across runs and
// thread counts. Math is float32 (float64 for float64 p);
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/ExpandUtils.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstring>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "anchor/match.h"
#include "anchor/op_args.h"
#include "common/grad_pool.h"
#include "cpu/anchor/params.h"
#include "cpu/anchor/plane_pass.h"

namespace yolo_kernels {
namespace anchor_fused {

// Every plane of every layer in one parallel region. The threads take the planes from a shared
// counter, the costliest first by an estimate of the work (cells plus pairs): the layers' planes
// differ in size by 16x and crowded images hold most of the pairs, and a static split by the same
// estimate left a thread waiting where the estimate was off (every target of 16 images in four of
// them: 4.3-4.6 ms static, 3.3-4.2 ms now; uniform images: the same). A thread takes its next plane
// before it streams out the current one, so that the next plane's reads are requested during the
// writes (NextPlaneRows; batch 16 at 416, 10 / 100 / 500 targets per image: 2.26 / 2.69 / 4.36 ms
// without, 1.89 / 2.37 / 3.98 ms with, the same run). Each plane's sums are kept apart and added per
// layer in plane order afterwards, so the results do not depend on which thread ran a plane, or on
// the thread count.
template <typename scalar_t, typename T>
std::vector<LayerSums> all_planes(const std::vector<Layer<scalar_t, T>>& layers, const Options& o, int64_t nc,
                                  bool want_stats) {
  constexpr int64_t kPairCost = 8;  // a pair's work in cells' (measured: ~100 ns against ~12 ns a cell)
  std::vector<std::pair<int64_t, int64_t>> tasks;  // (layer, plane)
  std::vector<int64_t> cost;
  int64_t max_cells = 1, no = layers[0].no;
  bool staged = false;
  for (int64_t i = 0; i < int64_t(layers.size()); ++i) {
    const auto& L = layers[i];
    max_cells = std::max(max_cells, L.ny * L.nx);
    staged = staged || L.block_rows();
    for (int64_t k = 0; k < L.bs * L.na; ++k) {
      tasks.emplace_back(i, k);
      cost.push_back(L.ny * L.nx + kPairCost * (L.plane_start[k + 1] - L.plane_start[k]));
    }
  }
  std::vector<int64_t> order(tasks.size());
  for (size_t t = 0; t < order.size(); ++t) order[t] = int64_t(t);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return cost[a] > cost[b]; });
  std::vector<LayerSums> partial(tasks.size());
  std::atomic<int64_t> next{0};
  const int64_t n_tasks = int64_t(tasks.size());
  const int64_t runs = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n_tasks));
  at::parallel_for(0, runs, 1, [&](int64_t run_begin, int64_t run_end) {
    auto& scratch = thread_scratch<T>();
    for (auto& s : scratch) s.prepare(max_cells);
    // whole gradient rows, streamed out when full; allocated per call (a thread-local block measured
    // 10-20% slower in the streaming pass of a 52 x 52 layer)
    std::vector<scalar_t> staging(staged ? staging_rows(no) * no : 0, scalar_t(0));
    // each plane is taken, and its pairs grouped, one plane ahead: its rows are requested while the
    // current plane's gradient streams out
    auto take = [&](PlaneScratch<T>& s) {
      const int64_t i = next.fetch_add(1, std::memory_order_relaxed);
      if (i >= n_tasks) return int64_t(-1);
      group_by_cell(layers[tasks[order[i]].first], tasks[order[i]].second, s);
      return order[i];
    };
    for (int64_t run = run_begin; run < run_end; ++run) {
      int cur = 0;
      for (int64_t t = take(scratch[cur]); t >= 0;) {
        const int64_t u = take(scratch[1 - cur]);
        const NextPlaneRows<scalar_t, T> ahead =
            u >= 0 ? NextPlaneRows<scalar_t, T>(layers[tasks[u].first], tasks[u].second, scratch[1 - cur])
                   : NextPlaneRows<scalar_t, T>();
        partial[t] = plane_pass(layers[tasks[t].first], tasks[t].second, o, nc, want_stats, scratch[cur], staging,
                                ahead);
        t = u, cur = 1 - cur;
      }
    }
    stream_fence();
    for (auto& s : scratch) s.trim();
  });
  std::vector<LayerSums> sums(layers.size());
  for (size_t t = 0; t < tasks.size(); ++t) {
    auto& total_sums = sums[tasks[t].first];
    const auto& p = partial[t];
    total_sums.box += p.box, total_sums.obj += p.obj, total_sums.cls += p.cls;
    total_sums.stats.merge(p.stats);
  }
  return sums;
}

using FusedResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>>;

template <typename scalar_t>
FusedResult fused_loss_impl(const std::vector<at::Tensor>& p, const at::Tensor& targets,
                            const std::vector<at::Tensor>& anchors, const std::vector<double>& balance,
                            const Options& o, bool compute_stats, bool compute_grad) {
  using T = at::opmath_type<scalar_t>;  // float for half/bfloat16/float, double for double
  static_assert(std::is_same<T, float>::value || std::is_same<T, double>::value, "opmath");
  const auto T_type = c10::CppTypeToScalarType<T>::value;
  const int64_t nl = int64_t(p.size()), bs = p[0].size(0), no = p[0].size(4), nc = no - 5;
  const at::Tensor t = targets.to(T_type).contiguous();
  const int64_t nt = t.size(0);
  check_target_values(t.data_ptr<T>(), nt, bs, nc);
  for (const auto& a : anchors) check_pair_capacity(nt, a.size(0));

  std::vector<at::Tensor> grads(nl);
  // the calling thread's layers, kept from call to call with their pair buffers: allocated afresh,
  // those would be faulted in page by page on every step
  static thread_local std::vector<Layer<scalar_t, T>> layer_cache;
  layer_cache.resize(nl);
  std::vector<Layer<scalar_t, T>>& layers = layer_cache;
  std::vector<at::Tensor> anchor_values(nl);
  for (int64_t i = 0; i < nl; ++i) {
    auto& L = layers[i];
    L.g = nullptr, L.box_scale = L.cls_scale = L.obj_scale = T(0);  // only the buffers carry over from a call
    L.p = p[i].data_ptr<scalar_t>();
    L.targets = t.data_ptr<T>();
    for (int d = 0; d < 5; ++d) L.ps[d] = p[i].stride(d);
    L.bs = bs, L.na = p[i].size(1), L.ny = p[i].size(2), L.nx = p[i].size(3), L.no = no;
    anchor_values[i] = anchors[i].to(T_type).contiguous();
    check_anchor_values(anchor_values[i].data_ptr<T>(), L.na, "anchors[" + std::to_string(i) + "]");
    L.anchors = anchor_values[i].data_ptr<T>();
    if (compute_grad) {
      // p's own layout when it is dense (so the head's backward needs no copy), else the dense
      // layout closest to it: the rule of empty_like, which the fake implementation uses
      const auto strides = p[i].is_non_overlapping_and_dense() ? p[i].strides().vec()
                                                                : at::infer_dense_strides(p[i].sizes(), p[i].strides());
      grads[i] = pooled_empty_strided(p[i].sizes(), strides, p[i].scalar_type());
      L.g = grads[i].data_ptr<scalar_t>();
      for (int d = 0; d < 5; ++d) L.gs[d] = grads[i].stride(d);
      if (!L.block_rows()) stream_zero_tensor(grads[i]);  // else the objectness pass writes whole rows
    } else {
      grads[i] = at::empty({0}, p[i].options());
    }
  }

  // matching and grouping: the layers are independent, one task each; with statistics each
  // layer also marks the targets it matched
  std::vector<std::vector<char>> matched(compute_stats ? nl : 0, std::vector<char>(nt, 0));
  at::parallel_for(0, nl, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      auto& L = layers[i];
      match<T>(t.data_ptr<T>(), nt, anchor_values[i].data_ptr<T>(), L.na, L.ny, L.nx, T(o.match_threshold()), o.family,
               L.pairs, compute_stats ? matched[i].data() : nullptr);
      group_by_plane(L);
    }
  });
  int64_t n_total = 0;
  for (const auto& L : layers) n_total += int64_t(L.pairs.size());

  const bool sum_red = o.reduction == Reduction::kSum;
  // the YOLOv5 loss is the sum of the terms times the batch size: folded into the gradient's scales
  const double out_scale = o.family == Family::kYOLOv5 ? double(bs) : 1.0;
  double lbox = 0.0, lobj = 0.0, lcls = 0.0;
  at::Tensor layer_obj = at::empty({nl}, T_type);
  // per layer: sum of squares (box, obj, cls), largest magnitude (box, obj, cls), pairs, duplicates;
  // a last row: the targets no layer matched, then zeros
  at::Tensor stats = at::zeros({compute_stats ? nl + 1 : 0, 8}, T_type);
  if (compute_stats) {
    int64_t unmatched = 0;
    for (int64_t k = 0; k < nt; ++k) {
      bool any = false;
      for (int64_t i = 0; i < nl; ++i) any = any || matched[i][k];
      unmatched += !any;
    }
    stats.data_ptr<T>()[8 * nl] = T(unmatched);
  }
  std::vector<double> box_scales(nl, 0.0), cls_scales(nl, 0.0), obj_scales(nl, 0.0);
  for (int64_t i = 0; i < nl; ++i) {
    auto& L = layers[i];
    const int64_t P = int64_t(L.pairs.size());
    if (P > 0) {
      box_scales[i] = sum_red ? o.box * 3.0 / double(n_total) : o.box / double(P);
      cls_scales[i] = sum_red ? o.cls * 3.0 / double(n_total * nc) : o.cls / double(P * nc);
      L.box_scale = T(box_scales[i] * out_scale), L.cls_scale = T(cls_scales[i] * out_scale);
    }
    const double n_cells = double(L.bs * L.na * L.ny * L.nx);
    obj_scales[i] = (sum_red ? o.obj * 3.0 / double(bs) : o.obj / n_cells) * balance[i];
    L.obj_scale = T(obj_scales[i] * out_scale);
  }
  const std::vector<LayerSums> layer_sums = all_planes(layers, o, nc, compute_stats);
  for (int64_t i = 0; i < nl; ++i) {
    const auto& L = layers[i];
    const LayerSums& sums = layer_sums[i];
    if (compute_stats) {
      T* row = stats.data_ptr<T>() + 8 * i;
      for (int k = 0; k < 3; ++k) row[k] = T(sums.stats.sq[k]), row[3 + k] = T(sums.stats.max[k]);
      row[6] = T(sums.stats.pairs), row[7] = T(sums.stats.pairs - sums.stats.cells);
    }
    lbox += box_scales[i] * sums.box;
    lobj += obj_scales[i] * sums.obj;
    layer_obj.data_ptr<T>()[i] = T(sums.obj / double(L.bs * L.na * L.ny * L.nx));
    if (nc > 1) lcls += cls_scales[i] * sums.cls;
  }
  at::Tensor items = at::empty({4}, T_type);
  T* it = items.data_ptr<T>();
  it[0] = T(lbox), it[1] = T(lobj), it[2] = T(lcls);
  it[3] = it[0] + it[1] + it[2];
  at::Tensor loss = at::empty({1}, T_type);
  loss.data_ptr<T>()[0] = T(double(it[3]) * out_scale);
  for (auto& L : layers) {  // give back the memory of an exceptional call (hundreds of thousands of pairs)
    if (L.pairs.capacity() * sizeof(PairRef) > (size_t(16) << 20)) L = Layer<scalar_t, T>();
  }
  return {loss, items, layer_obj, stats, grads};
}

FusedResult fused_loss_cpu(at::TensorList p_list, const at::Tensor& targets, at::TensorList anchor_list,
                           const std::optional<at::Tensor>& balance, c10::string_view family, double gr, double box,
                           double cls, double cls_pw, double obj, double obj_pw, double iou_t, double anchor_t,
                           double fl_gamma,
                           double label_smoothing, c10::string_view box_loss, c10::string_view reduction,
                           bool sort_obj_iou, bool compute_stats, bool compute_grad) {
  const std::vector<at::Tensor> p = p_list.vec(), anchors = anchor_list.vec();
  TORCH_CHECK(!p.empty(), "p: expected at least one layer, got an empty list");
  TORCH_CHECK(p.size() == anchors.size(), "p: expected ", anchors.size(), " layers (one per anchor set), got ",
              p.size());
  check_targets(targets);
  for (size_t i = 0; i < p.size(); ++i) {
    const std::string name = "p[" + std::to_string(i) + "]";
    check_cpu_float(p[i], name.c_str());
    TORCH_CHECK(p[i].dim() == 5, name, ": expected a 5-D tensor [bs, na, ny, nx, nc + 5], got shape ",
                p[i].sizes());
    TORCH_CHECK(p[i].size(4) >= 6, name, ": expected last dim nc + 5 >= 6, got ", p[i].size(4));
    TORCH_CHECK(p[i].scalar_type() == p[0].scalar_type(), name, ": expected dtype ", p[0].scalar_type(),
                " (as p[0]), got ", p[i].scalar_type());
    TORCH_CHECK(p[i].size(0) == p[0].size(0) && p[i].size(4) == p[0].size(4), name,
                ": expected batch size and last dim of p[0] ", p[0].size(0), ", ", p[0].size(4), ", got ",
                p[i].size(0), ", ", p[i].size(4));
    TORCH_CHECK(p[i].size(0) >= 1 && p[i].size(2) >= 1 && p[i].size(3) >= 1, name,
                ": expected a non-empty batch and grid, got shape ", p[i].sizes());
    TORCH_CHECK(p[i].size(2) * p[i].size(3) < (int64_t(1) << 31), name,  // a cell index is sorted as 32 bits
                ": expected fewer than 2^31 cells per grid (ny * nx), got ", p[i].size(2), " x ", p[i].size(3));
    check_anchors(anchors[i], "anchors[" + std::to_string(i) + "]");
    TORCH_CHECK(p[i].size(1) == anchors[i].size(0), name, ": expected dim 1 = ", anchors[i].size(0),
                " anchors, got ", p[i].size(1));
  }
  const double values[] = {gr, box, cls, cls_pw, obj, obj_pw, iou_t, anchor_t, fl_gamma, label_smoothing};
  const char* names[] = {"gr",  "box",      "cls",      "cls_pw",         "obj",
                         "obj_pw", "iou_t", "anchor_t", "fl_gamma", "label_smoothing"};
  for (int k = 0; k < 10; ++k) check_finite_option(values[k], names[k]);
  TORCH_CHECK(cls_pw > 0 && obj_pw > 0, "cls_pw, obj_pw: expected positive pos_weights, got ", cls_pw, ", ", obj_pw);
  TORCH_CHECK(fl_gamma >= 0, "fl_gamma: expected >= 0, got ", fl_gamma);
  const Options o{gr,
                  box,
                  cls,
                  cls_pw,
                  obj,
                  obj_pw,
                  iou_t,
                  anchor_t,
                  fl_gamma,
                  label_smoothing,
                  parse_box_kind(box_loss),
                  parse_reduction(reduction),
                  parse_family(family),
                  sort_obj_iou};
  std::vector<double> weights(p.size(), 1.0);
  if (balance.has_value()) {
    const at::Tensor& w = *balance;
    check_cpu_float(w, "balance");
    TORCH_CHECK(w.dim() == 1 && w.size(0) == int64_t(p.size()), "balance: expected shape [", p.size(),
                "] (one weight per layer), got ", w.sizes());
    const at::Tensor w64 = w.to(at::kDouble).contiguous();
    for (size_t i = 0; i < p.size(); ++i) {
      weights[i] = w64.data_ptr<double>()[i];
      TORCH_CHECK(std::isfinite(weights[i]), "balance[", i, "]: expected a finite weight, got ", weights[i]);
    }
  }

  FusedResult out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p[0].scalar_type(), "yolo_kernels::fused_loss", [&] {
    out = fused_loss_impl<scalar_t>(p, targets, anchors, weights, o, compute_stats, compute_grad);
  });
  return out;
}

}  // namespace anchor_fused

TORCH_LIBRARY_IMPL(yolo_kernels, CPU, m) { m.impl("fused_loss", &anchor_fused::fused_loss_cpu); }

}  // namespace yolo_kernels
