// CPU kernel of yolo_kernels::fused_loss (schema in csrc/ops.cpp, semantics in docs/semantics.md and
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
#include <cmath>
#include <cstring>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "checks.h"
#include "grad_pool.h"
#include "loss_math.h"
#include "stream_store.h"

namespace yolo_kernels {
namespace {

struct Options {
  double gr, giou, cls, cls_pw, obj, obj_pw, threshold, fl_gamma, label_smoothing;
  BoxKind box;
  Reduction reduction;
  Family family;
  bool sort_obj_iou;  // the highest IoU of a cell sets its objectness target (else its last pair)
};

// One layer's view of p and its gradient, its matched pairs and their per-pair results.
template <typename scalar_t, typename T>
struct Layer {
  const scalar_t* p = nullptr;
  int64_t ps[5] = {};
  scalar_t* g = nullptr;
  int64_t gs[5] = {};
  int64_t bs = 0, na = 0, ny = 0, nx = 0, no = 0;
  std::vector<Pair<T>> pairs;
  std::vector<int64_t> plane_start;  // [bs * na + 1]: the pairs of plane k are by_plane[plane_start[k] ..]
  std::vector<int64_t> by_plane;     // pair indices grouped by (image, anchor) plane, pair order kept
  T box_scale = 0, cls_scale = 0;    // d loss / d (1 - iou), d loss / d class BCE

  // The gradient of each (image, anchor) plane is one contiguous block of whole rows (p contiguous).
  bool block_rows() const { return g != nullptr && gs[4] == 1 && gs[3] == no && gs[2] == nx * no; }
  int64_t row_offset(const Pair<T>& q) const { return q.b * ps[0] + q.a * ps[1] + q.gj * ps[2] + q.gi * ps[3]; }
  int64_t grad_row_offset(const Pair<T>& q) const {
    return q.b * gs[0] + q.a * gs[1] + q.gj * gs[2] + q.gi * gs[3];
  }
};

// Group the pairs by (image, anchor) plane with a stable counting sort: O(P), pair order kept
// within a plane. Each plane task then handles its own pairs, next to the rows it writes.
template <typename scalar_t, typename T>
void group_by_plane(Layer<scalar_t, T>& L) {
  const int64_t planes = L.bs * L.na, P = int64_t(L.pairs.size());
  L.plane_start.assign(planes + 1, 0);
  for (const auto& q : L.pairs) ++L.plane_start[q.b * L.na + q.a + 1];
  for (int64_t k = 0; k < planes; ++k) L.plane_start[k + 1] += L.plane_start[k];
  std::vector<int64_t> fill(L.plane_start.begin(), L.plane_start.end() - 1);
  L.by_plane.resize(P);
  for (int64_t j = 0; j < P; ++j) L.by_plane[fill[L.pairs[j].b * L.na + L.pairs[j].a]++] = j;
}

// Start loading a pair's whole row of p (its box logits now, its class logits in cell_terms later).
template <typename scalar_t, typename T>
inline void prefetch_row(const Layer<scalar_t, T>& L, const Pair<T>& q) {
  const scalar_t* row = L.p + L.row_offset(q);
  for (int64_t c = 0; c < L.no; c += 64 / int64_t(sizeof(scalar_t))) __builtin_prefetch(row + c * L.ps[4]);
}

// One matched pair of a plane: its cell within the plane, its index, and its box results.
template <typename T>
struct PlanePair {
  int64_t cell, pair;
  T iou;
  T diou[4];  // d iou / d logits 0..3
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

// Scratch rows of one thread for cell_terms.
template <typename T>
struct CellScratch {
  std::vector<T> x, loss, grad, total_grad;
  explicit CellScratch(int64_t nc) : x(nc), loss(nc), grad(nc), total_grad(nc) {}
};

template <typename T>
using Group = typename std::vector<PlanePair<T>>::const_iterator;

// The pairs [first, last) of one cell: returns the sum of their class BCEs
// and, when `out` is given, adds their box and class gradient terms to the cell's gradient row
// (element stride `step`); with `stats`, adds those terms to its statistics. The class BCE of the
// row against the negative target is evaluated once; each pair then swaps in its own class's
// positive term.
template <typename scalar_t, typename T>
double cell_terms(const Layer<scalar_t, T>& L, Group<T> first, Group<T> last, const Options& o, int64_t nc,
                  CellScratch<T>& s, scalar_t* out, int64_t step, GradStats* stats) {
  if (out || stats) {
    T acc[4] = {0, 0, 0, 0};
    for (Group<T> q = first; q != last; ++q)
      for (int k = 0; k < 4; ++k) acc[k] += q->diou[k];
    for (int k = 0; k < 4; ++k) {
      const T term = -L.box_scale * acc[k];  // the row is zero there before: this is the entry
      if (out) out[k * step] = scalar_t(T(out[k * step]) + term);
      if (stats) stats->add(kBox, double(term));
    }
  }
  if (nc <= 1) return 0.0;
  const scalar_t* src = L.p + L.row_offset(L.pairs[first->pair]) + 5 * L.ps[4];
  if (L.ps[4] == 1) {
    for (int64_t c = 0; c < nc; ++c) s.x[c] = T(src[c]);
  } else {
    for (int64_t c = 0; c < nc; ++c) s.x[c] = T(src[c * L.ps[4]]);
  }
  const T cp = T(1.0 - 0.5 * o.label_smoothing), cn = T(0.5 * o.label_smoothing);
  bce_row(s.x.data(), s.loss.data(), s.grad.data(), nc, cn, T(o.cls_pw), T(o.fl_gamma));
  const double negatives = sum4(s.loss.data(), nc);
  const T count = T(last - first);
  const bool terms = out || stats;
  if (terms) {  // every pair pushes every class toward cn ...
    for (int64_t c = 0; c < nc; ++c) s.total_grad[c] = count * s.grad[c];
  }
  double total = 0.0;
  for (Group<T> q = first; q != last; ++q) {
    const int64_t c = L.pairs[q->pair].cls;
    const auto hit = bce_with_logits<T>(s.x[c], cp, T(o.cls_pw), T(o.fl_gamma));
    total += negatives - double(s.loss[c]) + double(hit.loss);
    if (terms) s.total_grad[c] += hit.grad - s.grad[c];  // ... but its own class toward cp
  }
  if (out) {
    scalar_t* cls = out + 5 * step;
    for (int64_t c = 0; c < nc; ++c) cls[c * step] = scalar_t(T(cls[c * step]) + L.cls_scale * s.total_grad[c]);
  }
  if (stats) scaled_sq_max(s.total_grad.data(), nc, L.cls_scale, stats->sq[kCls], stats->max[kCls]);
  return total;
}

// Sums of the element losses of one layer, each added over planes in plane order.
struct LayerSums {
  double box = 0.0, obj = 0.0, cls = 0.0;
  GradStats stats;  // filled when the caller asks for statistics
};

// The box IoU terms of one plane's pairs, given in cell order by `order` (cell, pair): appends
// each pair with its IoU and d IoU / d logits to `matched` and returns the sum of (1 - IoU). Float
// math runs the vectorised box_iou_rows over the pairs gathered as arrays (`soa`), double the
// scalar duals. A function of its own, not inlined: the plane loop's memory-bound passes compile
// the same whatever this one holds.
template <typename scalar_t, typename T>
__attribute__((noinline)) double plane_box_terms(const Layer<scalar_t, T>& L, const Options& o,
                                                 const std::vector<std::pair<int64_t, int64_t>>& order,
                                                 std::vector<float>& soa, std::vector<PlanePair<T>>& matched) {
  constexpr int64_t kAhead = 4;  // rows are scattered over the plane: fetch a few pairs ahead
  const int64_t count = int64_t(order.size());
  double box_sum = 0.0;
  if constexpr (std::is_same<T, float>::value) {
    // gather the plane's pairs as arrays, then one vectorised pass
    soa.resize(15 * count);
    float* a = soa.data();
    for (int64_t k = 0; k < count; ++k) {
      if (k + kAhead < count) prefetch_row(L, L.pairs[order[k + kAhead].second]);
      const auto& q = L.pairs[order[k].second];
      const scalar_t* src = L.p + L.row_offset(q);
      for (int c = 0; c < 4; ++c) a[c * count + k] = float(src[c * L.ps[4]]);
      a[4 * count + k] = float(q.anch[0]), a[5 * count + k] = float(q.anch[1]);
      for (int c = 0; c < 4; ++c) a[(6 + c) * count + k] = float(q.tbox[c]);
    }
    const BoxRows rows{a, a + count, a + 2 * count, a + 3 * count, a + 4 * count, a + 5 * count,
                       a + 6 * count, a + 7 * count, a + 8 * count, a + 9 * count, a + 10 * count,
                       a + 11 * count, a + 12 * count, a + 13 * count, a + 14 * count};
    box_iou_rows(count, rows, o.box, o.family);
    for (int64_t k = 0; k < count; ++k) {
      const T v = T(rows.v[k]);
      matched.push_back({order[k].first, order[k].second, v,
                         {T(rows.d0[k]), T(rows.d1[k]), T(rows.d2[k]), T(rows.d3[k])}});
      box_sum += double(T(1) - v);
    }
  } else {
    const BoxEps<T> box_eps = BoxEps<T>::of(o.family);
    for (int64_t k = 0; k < count; ++k) {
      if (k + kAhead < count) prefetch_row(L, L.pairs[order[k + kAhead].second]);
      const auto& q = L.pairs[order[k].second];
      const scalar_t* src = L.p + L.row_offset(q);
      const T logits[4] = {T(src[0]), T(src[L.ps[4]]), T(src[2 * L.ps[4]]), T(src[3 * L.ps[4]])};
      const auto box = predicted_box<T>(logits, q.anch[0], q.anch[1], o.family);
      const auto r =
          box_iou(box[0], box[1], box[2], box[3], q.tbox[0], q.tbox[1], q.tbox[2], q.tbox[3], o.box, box_eps);
      matched.push_back({order[k].first, order[k].second, r.v, {r.d[0], r.d[1], r.d[2], r.d[3]}});
      box_sum += double(T(1) - r.v);
    }
  }
  return box_sum;
}

// Everything of one layer, one (image, anchor) plane per task. Per plane: the plane's pairs
// grouped by cell (stable: pair order within a cell; the last pair of a cell sets its objectness
// target) and the box IoU and its gradient for each of them, in that order; the objectness logits
// gathered and their vectorised zero-target BCE, recomputed at the matched cells; then, with a
// gradient, the plane's rows written once (zeros, the objectness term, and cell_terms for the
// matched cells): streamed from a cache-resident staging block when the plane is one contiguous
// block of rows, else into the pre-zeroed gradient. Without a gradient only the sums are taken.
template <typename scalar_t, typename T>
LayerSums layer_pass(const Layer<scalar_t, T>& L, const Options& o, T grad_scale, int64_t nc, bool want_stats) {
  const int64_t planes = L.bs * L.na, cells = L.ny * L.nx, no = L.no;
  const bool block_rows = L.block_rows();
  const T gr = T(o.gr);
  std::vector<LayerSums> partial(planes);
  at::parallel_for(0, planes, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> xs(cells), loss(cells), grad(cells);
    std::vector<PlanePair<T>> matched;
    std::vector<float> soa;                          // the plane's pairs as arrays for box_iou_rows
    std::vector<std::pair<int64_t, int64_t>> order;  // (cell, pair) of the plane's pairs
    CellScratch<T> scratch(std::max<int64_t>(nc, 1));
    const int64_t staging_rows = std::max<int64_t>(1, 4096 / no);
    std::vector<scalar_t> staging(block_rows ? staging_rows * no : 0, scalar_t(0));
    for (int64_t plane = begin; plane < end; ++plane) {
      const int64_t b = plane / L.na, a = plane % L.na;
      matched.clear();
      // the plane's pairs in cell order (stable: pair order within a cell), so that their rows are
      // read in address order, and grouped by cell as the later passes need
      const int64_t first = L.plane_start[plane], count = L.plane_start[plane + 1] - first;
      order.resize(count);
      for (int64_t k = 0; k < count; ++k) {
        const int64_t j = L.by_plane[first + k];
        order[k] = {L.pairs[j].gj * L.nx + L.pairs[j].gi, j};
      }
      std::stable_sort(order.begin(), order.end(), [](const auto& x, const auto& y) { return x.first < y.first; });
      const double box_sum = plane_box_terms(L, o, order, soa, matched);
      const auto matched_end = matched.cend();
      auto group_end = [&](Group<T> g) {
        Group<T> e = g;
        while (e != matched_end && e->cell == g->cell) ++e;
        return e;
      };

      const scalar_t* pp = L.p + b * L.ps[0] + a * L.ps[1] + 4 * L.ps[4];
      for (int64_t y = 0; y < L.ny; ++y) {
        const scalar_t* px = pp + y * L.ps[2];
        T* xy = xs.data() + y * L.nx;
        for (int64_t x = 0; x < L.nx; ++x) {
          __builtin_prefetch(px + (x + 16) * L.ps[3]);
          xy[x] = T(px[x * L.ps[3]]);
        }
      }
      bce_row(xs.data(), loss.data(), grad.data(), cells, T(0), T(o.obj_pw), T(o.fl_gamma));
      for (Group<T> g = matched.cbegin(); g != matched_end;) {
        const Group<T> last = group_end(g);
        // the last pair wins the cell, or with sort_obj_iou the highest (clamped) IoU: only its value matters
        T won = std::max(std::prev(last)->iou, T(0));
        if (o.sort_obj_iou)
          for (Group<T> q = g; q != last; ++q) won = std::max(won, q->iou);
        const T target = (T(1) - gr) + gr * won;
        const auto lg = bce_with_logits<T>(xs[g->cell], target, T(o.obj_pw), T(o.fl_gamma));
        loss[g->cell] = lg.loss;
        grad[g->cell] = lg.grad;
        g = last;
      }
      const double obj_sum = sum4(loss.data(), cells);
      GradStats stats;
      GradStats* st = want_stats ? &stats : nullptr;
      if (st) {
        scaled_sq_max(grad.data(), cells, grad_scale, stats.sq[kObj], stats.max[kObj]);
        stats.pairs = count;
      }

      double cls_sum = 0.0;
      Group<T> group = matched.cbegin();
      scalar_t* gp = L.g ? L.g + b * L.gs[0] + a * L.gs[1] : nullptr;
      if (gp && block_rows) {
        for (int64_t k0 = 0; k0 < cells; k0 += staging_rows) {
          const int64_t rows = std::min(staging_rows, cells - k0);
          for (int64_t r = 0; r < rows; ++r) staging[r * no + 4] = scalar_t(grad[k0 + r] * grad_scale);
          const Group<T> chunk_first = group;
          for (; group != matched_end && group->cell < k0 + rows;) {
            const Group<T> last = group_end(group);
            cls_sum += cell_terms(L, group, last, o, nc, scratch, staging.data() + (group->cell - k0) * no, 1, st);
            stats.cells += 1;
            group = last;
          }
          stream_store(reinterpret_cast<char*>(gp + k0 * no), reinterpret_cast<const char*>(staging.data()),
                       sizeof(scalar_t) * rows * no);
          for (int64_t r = 0; r < rows; ++r) staging[r * no + 4] = scalar_t(0);
          for (Group<T> q = chunk_first; q != group; ++q)
            std::memset(static_cast<void*>(staging.data() + (q->cell - k0) * no), 0, sizeof(scalar_t) * no);
        }
      } else {
        if (gp) {
          scalar_t* obj = gp + 4 * L.gs[4];
          for (int64_t y = 0; y < L.ny; ++y)
            for (int64_t x = 0; x < L.nx; ++x)
              obj[y * L.gs[2] + x * L.gs[3]] = scalar_t(grad[y * L.nx + x] * grad_scale);
        }
        for (; group != matched_end;) {
          const Group<T> last = group_end(group);
          scalar_t* row = gp ? L.g + L.grad_row_offset(L.pairs[group->pair]) : nullptr;
          cls_sum += cell_terms(L, group, last, o, nc, scratch, row, L.gs[4], st);
          stats.cells += 1;
          group = last;
        }
      }
      partial[plane] = {box_sum, obj_sum, cls_sum, stats};
    }
    stream_fence();
  });
  LayerSums total;
  for (const auto& s : partial) {
    total.box += s.box, total.obj += s.obj, total.cls += s.cls;
    total.stats.merge(s.stats);
  }
  return total;
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

  std::vector<at::Tensor> grads(nl);
  std::vector<Layer<scalar_t, T>> layers(nl);
  std::vector<at::Tensor> anchor_values(nl);
  for (int64_t i = 0; i < nl; ++i) {
    auto& L = layers[i];
    L.p = p[i].data_ptr<scalar_t>();
    for (int d = 0; d < 5; ++d) L.ps[d] = p[i].stride(d);
    L.bs = bs, L.na = p[i].size(1), L.ny = p[i].size(2), L.nx = p[i].size(3), L.no = no;
    anchor_values[i] = anchors[i].to(T_type).contiguous();
    check_anchor_values(anchor_values[i].data_ptr<T>(), L.na, "anchors[" + std::to_string(i) + "]");
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
      L.pairs = match<T>(t.data_ptr<T>(), nt, anchor_values[i].data_ptr<T>(), L.na, L.ny, L.nx, T(o.threshold),
                         o.family, compute_stats ? matched[i].data() : nullptr);
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
  for (int64_t i = 0; i < nl; ++i) {
    auto& L = layers[i];
    const int64_t P = int64_t(L.pairs.size());
    double box_scale = 0.0, cls_scale = 0.0;
    if (P > 0) {
      box_scale = sum_red ? o.giou * 3.0 / double(n_total) : o.giou / double(P);
      cls_scale = sum_red ? o.cls * 3.0 / double(n_total * nc) : o.cls / double(P * nc);
      L.box_scale = T(box_scale * out_scale), L.cls_scale = T(cls_scale * out_scale);
    }
    const double n_cells = double(L.bs * L.na * L.ny * L.nx);
    const double obj_scale = (sum_red ? o.obj * 3.0 / double(bs) : o.obj / n_cells) * balance[i];
    const LayerSums sums = layer_pass(L, o, T(obj_scale * out_scale), nc, compute_stats);
    if (compute_stats) {
      T* row = stats.data_ptr<T>() + 8 * i;
      for (int k = 0; k < 3; ++k) row[k] = T(sums.stats.sq[k]), row[3 + k] = T(sums.stats.max[k]);
      row[6] = T(sums.stats.pairs), row[7] = T(sums.stats.pairs - sums.stats.cells);
    }
    lbox += box_scale * sums.box;
    lobj += obj_scale * sums.obj;
    layer_obj.data_ptr<T>()[i] = T(sums.obj / n_cells);
    if (nc > 1) lcls += cls_scale * sums.cls;
  }
  at::Tensor items = at::empty({4}, T_type);
  T* it = items.data_ptr<T>();
  it[0] = T(lbox), it[1] = T(lobj), it[2] = T(lcls);
  it[3] = it[0] + it[1] + it[2];
  at::Tensor loss = at::empty({1}, T_type);
  loss.data_ptr<T>()[0] = T(double(it[3]) * out_scale);
  return {loss, items, layer_obj, stats, grads};
}

FusedResult fused_loss_cpu(at::TensorList p_list, const at::Tensor& targets, at::TensorList anchor_list,
                           const std::optional<at::Tensor>& balance, c10::string_view family, double gr, double giou,
                           double cls, double cls_pw, double obj, double obj_pw, double threshold, double fl_gamma,
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
    check_anchors(anchors[i], "anchors[" + std::to_string(i) + "]");
    TORCH_CHECK(p[i].size(1) == anchors[i].size(0), name, ": expected dim 1 = ", anchors[i].size(0),
                " anchors, got ", p[i].size(1));
  }
  const double values[] = {gr, giou, cls, cls_pw, obj, obj_pw, threshold, fl_gamma, label_smoothing};
  const char* names[] = {"gr", "giou", "cls", "cls_pw", "obj", "obj_pw", "threshold", "fl_gamma", "label_smoothing"};
  for (int k = 0; k < 9; ++k) check_finite_option(values[k], names[k]);
  TORCH_CHECK(cls_pw > 0 && obj_pw > 0, "cls_pw, obj_pw: expected positive pos_weights, got ", cls_pw, ", ", obj_pw);
  TORCH_CHECK(fl_gamma >= 0, "fl_gamma: expected >= 0, got ", fl_gamma);
  const Options o{gr,
                  giou,
                  cls,
                  cls_pw,
                  obj,
                  obj_pw,
                  threshold,
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

}  // namespace

TORCH_LIBRARY_IMPL(yolo_kernels, CPU, m) { m.impl("fused_loss", &fused_loss_cpu); }

}  // namespace yolo_kernels
