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

// Group the pairs by (image, anchor) plane with a stable counting sort: O(P), pair order kept
// within a plane. Each plane task then handles its own pairs, next to the rows it writes.
template <typename scalar_t, typename T>
void group_by_plane(Layer<scalar_t, T>& L) {
  const int64_t planes = L.bs * L.na, P = int64_t(L.pairs.size());
  auto plane_of = [&](PairRef r) { return int64_t(L.targets[6 * int64_t(r.target)]) * L.na + r.anchor; };
  L.plane_start.assign(planes + 1, 0);
  for (const auto r : L.pairs) ++L.plane_start[plane_of(r) + 1];
  for (int64_t k = 0; k < planes; ++k) L.plane_start[k + 1] += L.plane_start[k];
  std::vector<int64_t> fill(L.plane_start.begin(), L.plane_start.end() - 1);
  L.by_plane.resize(P);
  for (int64_t j = 0; j < P; ++j) L.by_plane[fill[plane_of(L.pairs[j])]++] = int32_t(j);
}

// Start loading one row of p (its box, objectness and class logits): into L1 (kLocality 3), or
// into L2 (2) for a row needed later.
template <int kLocality = 3, typename scalar_t>
inline void prefetch_row(const scalar_t* row, int64_t no, int64_t step) {
  for (int64_t c = 0; c < no; c += 64 / int64_t(sizeof(scalar_t))) __builtin_prefetch(row + c * step, 0, kLocality);
}

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

// One thread's working set for the planes it handles, reused from plane to plane and from call to
// call (thread-local: freeing and re-faulting these pages every call costs more than their use). A
// plane's matched cells ("groups": the cells with at least one pair, in cell order) hold their
// pairs in `pairs[group_start[g] .. group_start[g + 1])`, in pair order.
template <typename T>
struct PlaneScratch {
  std::vector<uint64_t> keys, keys_swap;         // the radix sort by cell: (cell << 32) | pair
  std::vector<Pair<T>> pairs;                    // the plane's pairs by cell
  std::vector<int64_t> group_start, group_cell;  // [G + 1], [G]
  std::vector<int64_t> group_row;                // [G]: the offset of a group's row of p in its plane
  std::vector<T> box_x, box_term;                // [G * 4]: a group's box logits; its summed box gradient
  std::vector<T> obj_x, obj_y, obj_loss, obj_grad;  // [G]: a group's objectness logit, target, BCE, gradient
  std::vector<T> obj_neg, obj_neg_grad;          // [G]: its objectness BCE against 0 (swapped out); unused gradient
  std::vector<T> cls_x, cls_loss, cls_grad;      // [G * nc]: class logits, BCE against cn (or scratch), its gradient
  std::vector<double> cell_neg;                  // [G]: a cell's class BCE against cn, summed over classes
  std::vector<T> iou, diou;                      // [P], [4 * P]: a pair's IoU; d IoU / d box logit c at [c * P + k]
  std::vector<T> hit_x, hit_loss, hit_grad;      // [P]: its class's logit, BCE against cp and its gradient
  std::vector<T> own_neg, own_grad;              // [P]: its class's BCE against cn (swapped out); bce_row's gradient of it, unused
  std::vector<float> soa;                        // the pairs' box inputs and outputs as arrays (float)
  std::vector<T> xs, loss, grad;                 // [cells]: the plane's objectness logits, their BCE (or scratch), its gradient

  // Sized for planes of `cells` cells.
  void prepare(int64_t cells) {
    xs.resize(cells), loss.resize(cells), grad.resize(cells);
  }
  // Give the memory back after a call that needed much of it (a huge plane or thousands of pairs).
  void trim() {
    constexpr size_t kKeepBytes = size_t(16) << 20;
    const size_t bytes = sizeof(T) * (cls_x.capacity() + cls_loss.capacity() + cls_grad.capacity()) +
                         sizeof(uint64_t) * (keys.capacity() + keys_swap.capacity()) + sizeof(Pair<T>) * pairs.capacity() +
                         sizeof(float) * soa.capacity();
    if (bytes > kKeepBytes) *this = PlaneScratch();
  }
};

// Two per thread: the plane being handled and the next one, grouped ahead (NextPlaneRows).
template <typename T>
std::array<PlaneScratch<T>, 2>& thread_scratch() {
  static thread_local std::array<PlaneScratch<T>, 2> scratch;
  return scratch;
}

// The pairs of `plane`, expanded, ordered by cell with pair order kept within a cell (stable), and
// grouped by cell. O(P): the cells' keys sorted (by insertion for a few pairs, else by radix),
// then each pair expanded once, in cell order.
template <typename scalar_t, typename T>
void group_by_cell(const Layer<scalar_t, T>& L, int64_t plane, PlaneScratch<T>& s) {
  const int64_t first = L.plane_start[plane], n = L.plane_start[plane + 1] - first, cells = L.ny * L.nx;
  const PairRef* refs = L.pairs.data();
  const int32_t* order = L.by_plane.data() + first;
  s.keys.resize(n), s.pairs.resize(n);
  for (int64_t k = 0; k < n; ++k) {  // (cell << 32) | k: sorting the keys sorts by cell, stably
    const PairRef r = refs[order[k]];
    const T* t = L.targets + 6 * int64_t(r.target);
    const auto cell = block_cell(t[2] * T(L.nx), t[3] * T(L.ny), r.block, L.ny, L.nx);  // as pair_of
    s.keys[k] = (uint64_t(cell[1] * L.nx + cell[0]) << 32) | uint64_t(k);
  }
  if (n <= 16) {
    std::sort(s.keys.begin(), s.keys.end());  // distinct keys: no order to keep
  } else {
    // LSD radix sort, kRadixBits of the cell a pass: O(n) a pass and no pass over the plane's
    // cells (a counting sort by cell cleared and summed 2.7k counters a 52 x 52 plane)
    constexpr int kRadixBits = 6;
    constexpr int64_t kBuckets = int64_t(1) << kRadixBits;
    s.keys_swap.resize(n);
    for (int shift = 32; (int64_t(1) << (shift - 32)) < cells; shift += kRadixBits) {
      int64_t count[kBuckets + 1] = {};
      for (int64_t k = 0; k < n; ++k) ++count[((s.keys[k] >> shift) & (kBuckets - 1)) + 1];
      for (int64_t c = 0; c < kBuckets; ++c) count[c + 1] += count[c];
      for (int64_t k = 0; k < n; ++k) s.keys_swap[count[(s.keys[k] >> shift) & (kBuckets - 1)]++] = s.keys[k];
      s.keys.swap(s.keys_swap);
    }
  }
  s.group_start.clear(), s.group_cell.clear(), s.group_row.clear();
  for (int64_t k = 0; k < n; ++k) {
    s.pairs[k] = pair_of(L.targets, L.anchors, L.ny, L.nx, refs[order[s.keys[k] & 0xffffffffu]]);
    const int64_t c = int64_t(s.keys[k] >> 32);
    if (k == 0 || c != s.group_cell.back()) {
      s.group_start.push_back(k), s.group_cell.push_back(c);
      s.group_row.push_back(s.pairs[k].gj * L.ps[2] + s.pairs[k].gi * L.ps[3]);
    }
  }
  s.group_start.push_back(n);
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
    box_iou_rows(n, rows, o.box, o.family);
    for (int64_t k = 0; k < n; ++k) box_sum += double(T(1) - s.iou[k]);
  } else {
    const BoxEps<T> box_eps = BoxEps<T>::of(o.family);
    for (int64_t g = 0; g < G; ++g)
      for (int64_t k = s.group_start[g]; k < s.group_start[g + 1]; ++k) {
        const auto& q = s.pairs[k];
        const auto box = predicted_box<T>(&s.box_x[4 * g], q.anch[0], q.anch[1], o.family);
        const auto r =
            box_iou(box[0], box[1], box[2], box[3], q.tbox[0], q.tbox[1], q.tbox[2], q.tbox[3], o.box, box_eps);
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
      match<T>(t.data_ptr<T>(), nt, anchor_values[i].data_ptr<T>(), L.na, L.ny, L.nx, T(o.threshold), o.family,
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
      box_scales[i] = sum_red ? o.giou * 3.0 / double(n_total) : o.giou / double(P);
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
    TORCH_CHECK(p[i].size(2) * p[i].size(3) < (int64_t(1) << 31), name,  // a cell index is sorted as 32 bits
                ": expected fewer than 2^31 cells per grid (ny * nx), got ", p[i].size(2), " x ", p[i].size(3));
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
