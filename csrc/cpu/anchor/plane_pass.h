// The fused anchor loss on the CPU: the pass over one (image, anchor) plane — its rows prefetched,
// the matched rows gathered, the box and class terms of its pairs, the objectness of every cell,
// the gradient streamed out once.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "common/stream_store.h"
#include "cpu/anchor/grouping.h"
#include "cpu/anchor/params.h"
#include "math/bce.h"
#include "math/reduce.h"

namespace yolo_kernels {
namespace anchor_fused {

// Start loading one row of p (its box, objectness and class logits): into L1 (kLocality 3), or
// into L2 (2) for a row needed later.
template <int kLocality = 3, typename scalar_t>
inline void prefetch_row(const scalar_t* row, int64_t no, int64_t step) {
  for (int64_t c = 0; c < no; c += 64 / int64_t(sizeof(scalar_t))) __builtin_prefetch(row + c * step, 0, kLocality);
}


// The elements of p a plane reads, requested into L2 while the thread's previous plane streams its
// gradient out: its matched cells' rows (gathered first), then the objectness logit of every cell.
// The plane's own reads then wait on L2 instead of memory, and memory serves them while it
// absorbs the writes (issued a share per chunk of the previous plane's sweep).
template <typename scalar_t, typename T>
struct NextPlaneRows {
  const Layer<scalar_t, T>* L = nullptr;  // none: nothing to request
  const scalar_t* plane_p = nullptr;
  const std::vector<int64_t>* rows = nullptr;  // its matched cells' row offsets (group_row)
  int64_t total = 0, issued = 0;               // requests: matched rows, then cells
  int64_t x = 0, offset = 0;                   // the next cell to request: its column, its row's offset

  NextPlaneRows() = default;
  NextPlaneRows(const Layer<scalar_t, T>& layer, int64_t plane, const PlaneScratch<T>& s)
      : L(&layer),
        plane_p(layer.plane_p(plane)),
        rows(&s.group_row),
        total(int64_t(s.group_row.size()) + layer.ny * layer.nx) {}

  // Request up to the share `done / of` of everything.
  void issue(int64_t done, int64_t of) {
    if (L == nullptr) return;
    const int64_t G = int64_t(rows->size()), upto = std::min(total, (total * done + of - 1) / of);
    for (; issued < std::min(upto, G); ++issued) prefetch_row<2>(plane_p + (*rows)[issued], L->no, L->ps[4]);
    for (; issued < upto; ++issued) {
      __builtin_prefetch(plane_p + offset + 4 * L->ps[4], 0, 2);
      offset += L->ps[3];
      if (++x == L->nx) x = 0, offset += L->ps[2] - L->nx * L->ps[3];
    }
  }
};

// The logits of the plane's matched cells, in cell (address) order, rows requested a few ahead:
// box logits into box_x, the objectness logit into obj_x, class logits into cls_x.
template <typename scalar_t, typename T>
void gather_matched(const Layer<scalar_t, T>& L, const scalar_t* plane_p, int64_t nc, PlaneScratch<T>& s) {
  constexpr int64_t kAhead = 8;  // rows
  const int64_t G = int64_t(s.group_cell.size()), step = L.ps[4];
  s.box_x.resize(4 * G), s.obj_x.resize(G);
  s.cls_x.resize(nc > 1 ? G * nc : 0);
  auto row_of = [&](int64_t g) { return plane_p + s.group_row[g]; };
  for (int64_t g = 0; g < std::min(G, kAhead); ++g) prefetch_row(row_of(g), L.no, step);
  for (int64_t g = 0; g < G; ++g) {
    if (g + kAhead < G) prefetch_row(row_of(g + kAhead), L.no, step);
    const scalar_t* row = row_of(g);
    for (int c = 0; c < 4; ++c) s.box_x[4 * g + c] = T(row[c * step]);
    s.obj_x[g] = T(row[4 * step]);
    if (nc <= 1) continue;
    T* dst = s.cls_x.data() + g * nc;
    const scalar_t* src = row + 5 * step;
    if (step == 1) {
      for (int64_t c = 0; c < nc; ++c) dst[c] = T(src[c]);
    } else {
      for (int64_t c = 0; c < nc; ++c) dst[c] = T(src[c * step]);
    }
  }
}

// The IoU-family value and its gradient for each pair of the plane (in `order`), from the box
// logits of its cell: returns the sum of (1 - IoU). Float math runs the vectorised box_iou_rows over
// the pairs as arrays, double the scalar duals. A function of its own, not inlined: the plane
// loop's memory-bound passes compile the same whatever this one holds.
template <typename scalar_t, typename T>
__attribute__((noinline)) double plane_box_terms(const Layer<scalar_t, T>& L, const Options& o,
                                                 PlaneScratch<T>& s) {
  const int64_t n = int64_t(s.pairs.size()), G = int64_t(s.group_cell.size());
  s.iou.resize(n), s.diou.resize(4 * n);
  double box_sum = 0.0;
  if constexpr (std::is_same<T, float>::value) {
    s.soa.resize(10 * n);  // the inputs; the outputs go straight to iou and diou
    float* a = s.soa.data();
    for (int64_t g = 0; g < G; ++g)
      for (int64_t k = s.group_start[g]; k < s.group_start[g + 1]; ++k) {
        const auto& q = s.pairs[k];
        for (int c = 0; c < 4; ++c) a[c * n + k] = s.box_x[4 * g + c];
        a[4 * n + k] = q.anch[0], a[5 * n + k] = q.anch[1];
        for (int c = 0; c < 4; ++c) a[(6 + c) * n + k] = q.tbox[c];
      }
    float* d = s.diou.data();
    const BoxRows rows{a,         a + n,     a + 2 * n,    a + 3 * n, a + 4 * n, a + 5 * n,
                       a + 6 * n, a + 7 * n, a + 8 * n,    a + 9 * n, s.iou.data(), d,
                       d + n,     d + 2 * n, d + 3 * n};
    box_iou_rows(n, rows, o.box_kind, o.family);
    for (int64_t k = 0; k < n; ++k) box_sum += double(T(1) - s.iou[k]);
  } else {
    const BoxEps<T> box_eps = BoxEps<T>::of(o.family);
    for (int64_t g = 0; g < G; ++g)
      for (int64_t k = s.group_start[g]; k < s.group_start[g + 1]; ++k) {
        const auto& q = s.pairs[k];
        const auto box = predicted_box<T>(&s.box_x[4 * g], q.anch[0], q.anch[1], o.family);
        const auto r =
            box_iou(box[0], box[1], box[2], box[3], q.tbox[0], q.tbox[1], q.tbox[2], q.tbox[3], o.box_kind, box_eps);
        s.iou[k] = r.v;
        for (int c = 0; c < 4; ++c) s.diou[c * n + k] = r.d[c];
        box_sum += double(T(1) - r.v);
      }
  }
  return box_sum;
}

// The class terms of the plane's matched cells: returns the sum over pairs of their class BCEs
// and, with `terms`, leaves in cls_grad each cell's d (summed class BCE) / d class logits. The BCE
// of every class logit against the negative target cn is taken once for all matched cells (per
// cell: its gradient row and its sum); each pair then swaps in its own class's positive term
// (pairs on one cell share its logits and differ in one class only).
template <typename scalar_t, typename T>
double plane_class_terms(const Layer<scalar_t, T>& L, const Options& o, int64_t nc, bool terms,
                         PlaneScratch<T>& s) {
  const int64_t G = int64_t(s.group_cell.size());
  const int64_t n = int64_t(s.pairs.size());
  s.cls_grad.resize(G * nc), s.cell_neg.resize(G);
  s.hit_x.resize(n), s.hit_loss.resize(n), s.hit_grad.resize(n), s.own_neg.resize(n), s.own_grad.resize(n);
  const T cp = T(1.0 - 0.5 * o.label_smoothing), cn = T(0.5 * o.label_smoothing);
  for (int64_t g = 0; g < G; ++g)
    for (int64_t k = s.group_start[g]; k < s.group_start[g + 1]; ++k) s.hit_x[k] = s.cls_x[g * nc + s.pairs[k].cls];
  bool summed = false;
  if constexpr (std::is_same<T, float>::value) {
    // a log per cell instead of a log1p per class (bce_rows_summed; measured 0.72 against 1.29 ns a
    // class logit at 80 classes); below 16 classes its per-cell work costs more than it saves
    summed = o.fl_gamma == 0.0 && nc >= 16;
    if (summed) {
      s.cls_loss.resize(bce_rows_summed_scratch(G, nc));
      bce_rows_summed(s.cls_x.data(), s.cls_grad.data(), G, nc, cn, T(o.cls_pw), s.cell_neg.data(),
                      s.cls_loss.data());
      bce_row(s.hit_x.data(), s.own_neg.data(), s.own_grad.data(), n, cn, T(o.cls_pw), T(0));
    }
  }
  if (!summed) {
    s.cls_loss.resize(G * nc);
    bce_row(s.cls_x.data(), s.cls_loss.data(), s.cls_grad.data(), G * nc, cn, T(o.cls_pw), T(o.fl_gamma));
    for (int64_t g = 0; g < G; ++g) {
      s.cell_neg[g] = sum4(s.cls_loss.data() + g * nc, nc);
      for (int64_t k = s.group_start[g]; k < s.group_start[g + 1]; ++k)
        s.own_neg[k] = s.cls_loss[g * nc + s.pairs[k].cls];
    }
  }
  bce_row(s.hit_x.data(), s.hit_loss.data(), s.hit_grad.data(), n, cp, T(o.cls_pw), T(o.fl_gamma));
  double total = 0.0;
  for (int64_t g = 0; g < G; ++g) {
    T* grad = s.cls_grad.data() + g * nc;
    const int64_t first = s.group_start[g], last = s.group_start[g + 1];
    // every pair pushes every class toward cn, but its own class toward cp
    for (int64_t k = first; k < last; ++k) total += s.cell_neg[g] - double(s.own_neg[k]) + double(s.hit_loss[k]);
    if (!terms) continue;
    const T count = T(last - first);
    for (int64_t k = first; k < last; ++k) s.hit_grad[k] -= grad[s.pairs[k].cls];  // before the row is scaled
    for (int64_t c = 0; c < nc; ++c) grad[c] *= count;
    for (int64_t k = first; k < last; ++k) grad[s.pairs[k].cls] += s.hit_grad[k];
  }
  return total;
}

// The rows of a staging block: 16 KB, resident in L1 while it fills.
inline int64_t staging_rows(int64_t no) { return std::max<int64_t>(1, 4096 / no); }

// Everything of one (image, anchor) plane of a layer, whose pairs `s` holds grouped by cell
// (group_by_cell: stable, so the last pair of a cell sets its objectness target): the matched
// cells' logits gathered; the box IoU and its gradient for every pair, the matched cells'
// objectness targets and class BCE; the objectness logits of every cell and their vectorised BCE;
// then, with a gradient, the plane's rows written once (zeros, the objectness term, the matched
// cells' box and class terms): streamed from a cache-resident staging block (`staging`, chunk rows,
// zero outside what a chunk writes) when the plane is one contiguous block of rows, else into the
// pre-zeroed gradient. Without a gradient only the sums are taken. While its rows go out, the
// rows the thread's next plane will read are requested (`next`).
template <typename scalar_t, typename T>
LayerSums plane_pass(const Layer<scalar_t, T>& L, int64_t plane, const Options& o, int64_t nc, bool want_stats,
                     PlaneScratch<T>& s, std::vector<scalar_t>& staging, NextPlaneRows<scalar_t, T> next) {
  const int64_t cells = L.ny * L.nx, no = L.no;
  const int64_t chunk = staging_rows(no);
  const bool block_rows = L.block_rows() && !staging.empty();
  const T gr = T(o.gr), grad_scale = L.obj_scale;
  const int64_t b = plane / L.na, a = plane % L.na;
  const scalar_t* plane_p = L.plane_p(plane);
  const int64_t n = int64_t(s.pairs.size()), G = int64_t(s.group_cell.size());
  gather_matched(L, plane_p, nc, s);
  const double box_sum = plane_box_terms(L, o, s);
  s.obj_y.resize(G), s.obj_loss.resize(G), s.obj_grad.resize(G);
  for (int64_t g = 0; g < G; ++g) {
    const int64_t first = s.group_start[g], last = s.group_start[g + 1];
    // the last pair wins the cell, or with sort_obj_iou the highest (clamped) IoU: only its value matters
    T won = std::max(s.iou[last - 1], T(0));
    if (o.sort_obj_iou)
      for (int64_t k = first; k < last; ++k) won = std::max(won, s.iou[k]);
    s.obj_y[g] = (T(1) - gr) + gr * won;
  }
  bce_row(s.obj_x.data(), s.obj_y.data(), s.obj_loss.data(), s.obj_grad.data(), G, T(o.obj_pw), T(o.fl_gamma));
  scalar_t* gp = L.g ? L.g + b * L.gs[0] + a * L.gs[1] : nullptr;
  const bool terms = gp != nullptr || want_stats;
  s.box_term.resize(4 * G);
  if (terms) {
    for (int64_t g = 0; g < G; ++g) {
      T acc[4] = {0, 0, 0, 0};
      for (int64_t k = s.group_start[g]; k < s.group_start[g + 1]; ++k)
        for (int c = 0; c < 4; ++c) acc[c] += s.diou[c * n + k];
      for (int c = 0; c < 4; ++c) s.box_term[4 * g + c] = -L.box_scale * acc[c];
    }
  }
  const double cls_sum = nc > 1 ? plane_class_terms(L, o, nc, terms, s) : 0.0;
  GradStats stats;
  if (want_stats) {
    stats.pairs = n, stats.cells = G;
    for (int64_t g = 0; g < G; ++g) {
      for (int c = 0; c < 4; ++c) stats.add(kBox, double(s.box_term[4 * g + c]));
      if (nc > 1)
        scaled_sq_max(s.cls_grad.data() + g * nc, nc, L.cls_scale, stats.sq[kCls], stats.max[kCls]);
    }
  }

  // a matched cell's box and class entries (the objectness entry is written with the others)
  auto write_terms = [&](int64_t g, scalar_t* row, int64_t step) {
    for (int c = 0; c < 4; ++c) row[c * step] = scalar_t(s.box_term[4 * g + c]);
    if (nc <= 1) return;
    const T* grad = s.cls_grad.data() + g * nc;
    scalar_t* cls = row + 5 * step;
    if (step == 1) {  // the staging block: a loop the compiler vectorises
      for (int64_t c = 0; c < nc; ++c) cls[c] = scalar_t(L.cls_scale * grad[c]);
    } else {
      for (int64_t c = 0; c < nc; ++c) cls[c * step] = scalar_t(L.cls_scale * grad[c]);
    }
  };
  // every objectness logit of the plane, then their vectorised BCE (the matched cells' from above)
  for (int64_t y = 0; y < L.ny; ++y) {
    const scalar_t* py = plane_p + y * L.ps[2] + 4 * L.ps[4];
    T* xy = s.xs.data() + y * L.nx;
    for (int64_t x = 0; x < L.nx; ++x) {
      __builtin_prefetch(py + (x + 16) * L.ps[3]);
      xy[x] = T(py[x * L.ps[3]]);
    }
  }
  double obj_sum = 0.0;
  bool summed = false;
  if constexpr (std::is_same<T, float>::value) {
    // the plane's sum as in plane_class_terms (a log per 112 cells, not a log1p per cell); the
    // matched cells' BCE against 0 then swapped for theirs
    summed = o.fl_gamma == 0.0;
    if (summed) {
      s.loss.resize(bce_rows_summed_scratch(1, cells));
      bce_rows_summed(s.xs.data(), s.grad.data(), 1, cells, T(0), T(o.obj_pw), &obj_sum, s.loss.data());
      s.obj_neg.resize(G), s.obj_neg_grad.resize(G);
      bce_row(s.obj_x.data(), s.obj_neg.data(), s.obj_neg_grad.data(), G, T(0), T(o.obj_pw), T(0));
      for (int64_t g = 0; g < G; ++g) obj_sum += double(s.obj_loss[g]) - double(s.obj_neg[g]);
    }
  }
  if (!summed) {
    s.loss.resize(cells);
    bce_row(s.xs.data(), s.loss.data(), s.grad.data(), cells, T(0), T(o.obj_pw), T(o.fl_gamma));
    for (int64_t g = 0; g < G; ++g) s.loss[s.group_cell[g]] = s.obj_loss[g];
    obj_sum = sum4(s.loss.data(), cells);
  }
  for (int64_t g = 0; g < G; ++g) s.grad[s.group_cell[g]] = s.obj_grad[g];
  if (want_stats) scaled_sq_max(s.grad.data(), cells, grad_scale, stats.sq[kObj], stats.max[kObj]);

  // the plane's rows, chunk by chunk
  int64_t g = 0;
  for (int64_t k0 = 0; k0 < cells; k0 += chunk) {
    const int64_t rows = std::min(chunk, cells - k0);
    next.issue(k0 + rows, cells);
    const T* grad = s.grad.data() + k0;
    const int64_t chunk_first = g;
    while (g < G && s.group_cell[g] < k0 + rows) ++g;
    if (gp && block_rows) {
      for (int64_t r = 0; r < rows; ++r) staging[r * no + 4] = scalar_t(grad[r] * grad_scale);
      for (int64_t q = chunk_first; q < g; ++q) write_terms(q, staging.data() + (s.group_cell[q] - k0) * no, 1);
      stream_store(reinterpret_cast<char*>(gp + k0 * no), reinterpret_cast<const char*>(staging.data()),
                   sizeof(scalar_t) * rows * no);
      for (int64_t r = 0; r < rows; ++r) staging[r * no + 4] = scalar_t(0);
      for (int64_t q = chunk_first; q < g; ++q)
        std::memset(static_cast<void*>(staging.data() + (s.group_cell[q] - k0) * no), 0, sizeof(scalar_t) * no);
    } else if (gp) {
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t cell = k0 + r;
        gp[(cell / L.nx) * L.gs[2] + (cell % L.nx) * L.gs[3] + 4 * L.gs[4]] = scalar_t(grad[r] * grad_scale);
      }
      for (int64_t q = chunk_first; q < g; ++q) {
        const int64_t cell = s.group_cell[q];
        write_terms(q, gp + (cell / L.nx) * L.gs[2] + (cell % L.nx) * L.gs[3], L.gs[4]);
      }
    }
  }
  return {box_sum, obj_sum, cls_sum, stats};
}

}  // namespace anchor_fused
}  // namespace yolo_kernels
