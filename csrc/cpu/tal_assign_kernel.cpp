// CPU kernel of yolo_kernels::tal_assign (schema in yolo_kernels/library.py): the task-aligned
// assigner of the anchor-free family without a [batch, boxes, points] tensor.
//
// The dense assigner (reference.assign) scores every box against every point. Here each box scans
// only the cells inside it (its sides raised to the size floor), so the work is the boxes' areas
// and the memory O(bs * boxes * topk + points):
//   1. decode the predicted box (pixels) and its aspect angle of every point some box has as a
//      candidate;
//   2. per box: metric = score^alpha * CIoU^beta of each candidate (0 elsewhere) and its top-k,
//      selected as torch.topk selects on the CPU (topk_select), so that the zero-metric points a
//      box with fewer than k positive candidates is filled with are the original's; the picks that
//      are candidates of the box are kept. Every candidate's CIoU is computed (arithmetic only:
//      the angles' arctangents were taken once per point and per box); the exact score power only
//      for the candidates an upper bound of the metric cannot rule out (top_candidates);
//   3. per image: a point kept by one box goes to it; a point kept by several goes to the box of
//      highest CIoU over every box it is a candidate of (the first on ties); the second cut
//      (topk2, selected the same way); each box's alignments normalised by its best CIoU over its
//      best metric.
// With at least as many images as threads, an image's three steps run in one task (its decoded
// boxes are still in cache when its boxes read them); otherwise each step is split over the threads.
// Returns per point the box it is assigned to (-1: none) and its target score.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/Optional.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <utility>
#include <vector>

#include "anchor_free/detection_math.h"
#include "anchor_free/op_args.h"
#include "common/parallel.h"

namespace yolo_kernels {
namespace anchor_free {
namespace {

// A box's geometry in pixels: corners, aspect angle (box_angle), the candidate window (sides raised
// to the floor) and label.
struct GtBox {
  float x1, y1, x2, y2, angle;
  float lo_x, lo_y, hi_x, hi_y;
  int64_t label;
  bool valid;  // an all-zero row (xyxy sum not positive) is padding
};

// The cells of level l whose centre (i + 0.5) * stride can be strictly inside the box's candidate
// window (the exact test is Assigner::candidate); empty (i0 > i1) when none.
struct Window {
  int64_t i0, i1, j0, j1;
};
inline Window cell_window(const GtBox& g, const Layout& L, int64_t l) {
  const float st = float(L.strides[l]);
  return {std::max<int64_t>(0, int64_t(std::floor(g.lo_x / st - 0.5f))),
          std::min<int64_t>(L.nx(l) - 1, int64_t(std::ceil(g.hi_x / st - 0.5f))),
          std::max<int64_t>(0, int64_t(std::floor(g.lo_y / st - 0.5f))),
          std::min<int64_t>(L.ny(l) - 1, int64_t(std::ceil(g.hi_y / st - 0.5f)))};
}

// The rows of the decoded predictions per image: the box corners (pixels) and the aspect angle.
constexpr int64_t kPredRows = 5;
// The decode asks for the rows of the run this many runs ahead of the one it decodes.
constexpr size_t kRunsAhead = 2;
// Copies of n floats go 16 at a time (no scalar tail): they read and write up to kChunk - 1 past n.
constexpr int64_t kChunk = 16;
inline void copy_chunks(const float* src, int64_t n, float* dst) {
  for (int64_t q = 0; q < n; q += kChunk) std::memcpy(dst + q, src + q, kChunk * sizeof(float));
}

// Every vector of a scratch set resized to n elements.
template <typename... V>
void resize_all(int64_t n, V&... v) {
  (v.resize(size_t(n)), ...);
}

template <typename S>
struct Pick {
  int64_t point;
  S metric;
  float overlap;  // CIoU clamped at 0
};

inline bool strictly_inside(float lo, float hi, float p) {
  return (p - lo > float(kAssignEps)) && (hi - p > float(kAssignEps));
}

template <typename S>
struct Assigner {
  const Layout& layout;
  int64_t bs, m, nc, k;
  S alpha;
  float beta;
  const float* pred;  // [bs, kPredRows, A] predicted boxes, pixels: x1, y1, x2, y2, angle rows per image
  const float* px;    // [A] point centres, pixels
  const float* py;
  const std::vector<GtBox>& gt;  // [bs * m]
  Window* cells;                 // [bs * m * levels]: each box's candidate cells on each level (candidate_cells)

  bool candidate(const GtBox& g, int64_t p) const {
    return g.valid && strictly_inside(g.lo_x, g.hi_x, px[p]) && strictly_inside(g.lo_y, g.hi_y, py[p]);
  }

  S score_power(S x) const { return anchor_free::score_power(x, alpha); }
  template <typename In>
  S score_power(const In* scores, int64_t b, int64_t label, int64_t p) const {
    return score_power(S(scores[(b * nc + label) * layout.points + p]));
  }
  // overlap^beta in float, as the original's float overlaps take their power; beta 6 (the
  // original's) as a product in double rounded once to float (the float pow's value, for no call)
  S overlap_power(float ov) const {
    if (beta == 6.0f) {
      const double o2 = double(ov) * double(ov);
      return S(float(o2 * o2 * o2));
    }
    return S(beta == 2.0f ? ov * ov : std::pow(ov, beta));
  }

  template <typename In>
  S metric(const In* scores, int64_t b, int64_t label, int64_t p, float ov) const {
    return score_power(scores, b, label, p) * overlap_power(ov);
  }
};

// The k best of a row of (metric, point) entries as torch.topk selects them on the CPU: the same
// standard-library algorithm with the same comparator (NaN first, then the larger), so equal
// metrics (the zeros a box with fewer than k positive candidates is filled with) are taken as the
// original takes them. With k * 64 <= points torch runs partial_sort, whose heap selection passes
// over every entry past the first k that is not above the heap's least: `row` holds the first k
// points and, after them, only the entries of positive metric. Otherwise (small grids) nth_element
// over every point: `row` holds all of them. The selected entries end up in row[0, k).
using Entry = std::pair<double, int64_t>;
inline bool topk_before(const Entry& x, const Entry& y) {
  return (std::isnan(x.first) && !std::isnan(y.first)) || x.first > y.first;
}
inline bool topk_partial(int64_t k, int64_t points) { return k * 64 <= points; }
inline void topk_select(std::vector<Entry>& row, int64_t k, int64_t points) {
  if (topk_partial(k, points))
    std::partial_sort(row.begin(), row.begin() + k, row.end(), topk_before);
  else
    std::nth_element(row.begin(), row.begin() + k - 1, row.end(), topk_before);
}

// The indices of k of the largest of v[0, n) (k <= n; any of equal values), kept in a small sorted
// buffer: a scan whose test (v above the buffer's least) soon fails, where a selection algorithm's
// comparisons each go either way (a branch miss apiece).
inline void largest_k(const double* v, int64_t n, int64_t k, std::vector<std::pair<double, int64_t>>& buf,
                      std::vector<int64_t>& out) {
  buf.clear();
  for (int64_t c = 0; c < n; ++c) {
    if (int64_t(buf.size()) == k && !(v[c] > buf.back().first)) continue;
    if (int64_t(buf.size()) == k) buf.pop_back();
    auto at = buf.end();
    while (at != buf.begin() && (at - 1)->first < v[c]) --at;
    buf.insert(at, {v[c], c});
  }
  out.resize(buf.size());
  for (size_t t = 0; t < buf.size(); ++t) out[t] = buf[t].second;
}

// Step 2 for box g of image b: the points of its top-k that are its candidates, into picks.
//
// The candidates' overlaps (CIoU) are exact and cheap: the boxes' aspect angles were computed once
// per point and per box (box_angle), so a row of overlaps is arithmetic that vectorises. The score
// power (the C library's exp, as the original's sigmoid) is not: an upper bound of the metric,
// ub = score_power_approx * overlap^beta, within a few ulp of it, ranks the candidates instead. tau,
// the k-th largest exact metric of the k candidates of largest ub, is at most the k-th largest of
// all, so a candidate whose ub (with a margin for its rounding) is below tau cannot be in the top-k
// and its exact metric is not computed. The selection over the scored entries equals the selection
// over all when the k-th largest is unique and positive (the top-k set is then the same whatever
// the order the heap saw the entries in); otherwise (ties, zeros, NaN) every candidate is scored and
// the selection runs as the original's.
template <typename S>
struct BoxScratch {
  std::vector<int64_t> point;                       // the candidates, in increasing point order (the heap's)
  std::vector<float> x1, y1, x2, y2, angle;         // their predicted boxes (pixels), gathered (+ kChunk slack)
  std::vector<float> overlap;                       // CIoU clamped at 0
  std::vector<S> logit, sp_approx, overlap_power;  // score logits; score^alpha approximated; overlap^beta
  std::vector<double> ub, metric;                   // upper bound; exact metric (once scored)
  std::vector<double> most;                         // the largest ub of each of k groups of candidates
  std::vector<int64_t> reach;                       // the candidates that may have one of the k largest ub
  std::vector<double> reach_ub;                     // and their ub
  std::vector<uint8_t> scored;
  std::vector<int64_t> idx;                         // a list of candidates
  std::vector<std::pair<double, int64_t>> top;      // largest_k's buffer
  std::vector<int64_t> done;                        // the candidates scored, in the order they were
  std::vector<Entry> row;                           // the heap's row
  std::vector<const void*> ahead;                   // a later box's score lines (score_lines)
};

// The exact metrics of the candidates w.idx that lack them (Assigner::metric's bits).
template <typename S>
void score_listed(const Assigner<S>& a, BoxScratch<S>& w) {
  for (const int64_t c : w.idx) {
    if (w.scored[c]) continue;
    w.metric[c] = double(a.score_power(w.logit[c]) * w.overlap_power[c]);
    w.scored[c] = 1;
    w.done.push_back(c);
  }
}

// The candidate cells of box g on level l: a rectangle, as Assigner::candidate's test of a point's
// x depends on its column only and that of its y on its row only. Empty (i0 > i1 or j0 > j1) when none.
template <typename S>
Window candidate_cells(const Assigner<S>& a, const GtBox& g, int64_t l) {
  const Layout& L = a.layout;
  const int64_t nx = L.nx(l), off = L.offsets[l];
  Window w = cell_window(g, L, l);
  while (w.i0 <= w.i1 && !strictly_inside(g.lo_x, g.hi_x, a.px[off + w.i0])) ++w.i0;
  while (w.i1 >= w.i0 && !strictly_inside(g.lo_x, g.hi_x, a.px[off + w.i1])) --w.i1;
  while (w.j0 <= w.j1 && !strictly_inside(g.lo_y, g.hi_y, a.py[off + w.j0 * nx])) ++w.j0;
  while (w.j1 >= w.j0 && !strictly_inside(g.lo_y, g.hi_y, a.py[off + w.j1 * nx])) --w.j1;
  return w;
}

// The lines of box r's candidate score logits (its label's plane), into `lines`: far from the last
// box's, they miss the caches, so a box asks for those of a later box while it gathers its own
// (a few at a time: a burst of requests would wait for free miss buffers).
template <typename S, typename In>
void score_lines(const Assigner<S>& a, const In* scores, int64_t r, std::vector<const void*>& lines) {
  lines.clear();
  const Layout& L = a.layout;
  const GtBox& g = a.gt[r];
  if (!g.valid) return;
  const In* plane = scores + ((r / a.m) * a.nc + g.label) * L.points;
  for (int64_t l = 0; l < L.levels(); ++l) {
    const Window& c = a.cells[r * L.levels() + l];
    for (int64_t j = c.j0; c.i0 <= c.i1 && j <= c.j1; ++j) {
      const In* run = plane + L.offsets[l] + j * L.nx(l);
      lines.push_back(run + c.i0), lines.push_back(run + c.i1);
    }
  }
}

template <typename S, typename In>
int64_t top_candidates(const Assigner<S>& a, const In* scores, int64_t r, int64_t ahead, Pick<S>* picks,
                       BoxScratch<S>& w) {
  const Layout& L = a.layout;
  const int64_t b = r / a.m;
  const GtBox& g = a.gt[r];
  const Window* cells = a.cells + r * L.levels();
  const int64_t k = a.k, A = L.points;
  const bool partial = topk_partial(k, L.points);
  const int64_t head = partial ? k : L.points;  // the points that enter the row whatever their metric
  const In* score_row = scores + (b * a.nc + g.label) * A;
  const float* pb = a.pred + b * kPredRows * A;
  int64_t n = 0;
  for (int64_t l = 0; l < L.levels(); ++l) {
    const Window& c = cells[l];
    if (c.i0 <= c.i1) n += (c.j1 - c.j0 + 1) * (c.i1 - c.i0 + 1);
  }
  resize_all(n + kChunk, w.point, w.x1, w.y1, w.x2, w.y2, w.angle, w.overlap, w.logit, w.sp_approx, w.overlap_power,
             w.ub, w.metric, w.reach, w.reach_ub);
  w.scored.assign(size_t(n), 0);
  w.done.clear();
  // the candidates row by row: consecutive points, their predicted boxes copied in chunks; box
  // `ahead`'s score lines asked for along the way
  if (ahead >= 0) score_lines(a, scores, ahead, w.ahead);
  size_t asked = 0;
  int64_t o = 0;
  for (int64_t l = 0; l < L.levels(); ++l) {
    const Window& c = cells[l];
    const int64_t len = c.i1 - c.i0 + 1;
    for (int64_t j = c.j0; len > 0 && j <= c.j1; ++j, o += len) {
      const int64_t p0 = L.offsets[l] + j * L.nx(l) + c.i0;
      for (const size_t stop = std::min(w.ahead.size(), asked + 2); asked < stop; ++asked) __builtin_prefetch(w.ahead[asked]);
      for (int64_t q = 0; q < len; ++q) w.point[o + q] = p0 + q, w.logit[o + q] = S(score_row[p0 + q]);
      copy_chunks(pb + p0, len, w.x1.data() + o), copy_chunks(pb + A + p0, len, w.y1.data() + o);
      copy_chunks(pb + 2 * A + p0, len, w.x2.data() + o), copy_chunks(pb + 3 * A + p0, len, w.y2.data() + o);
      copy_chunks(pb + 4 * A + p0, len, w.angle.data() + o);
    }
  }
  for (; asked < w.ahead.size(); ++asked) __builtin_prefetch(w.ahead[asked]);
  const float gq[5] = {g.x1, g.y1, g.x2, g.y2, g.angle};
  overlap_row(gq, w.x1.data(), w.y1.data(), w.x2.data(), w.y2.data(), w.angle.data(), n, w.overlap.data());
  score_power_approx_row(w.logit.data(), n, a.alpha, w.sp_approx.data());
  bool finite = true;
  for (int64_t c = 0; c < n; ++c) {
    w.overlap_power[c] = a.overlap_power(w.overlap[c]);
    w.ub[c] = double(w.sp_approx[c]) * double(w.overlap_power[c]);
    finite &= !std::isnan(w.ub[c]);
  }
  const bool prune = partial && n > k && finite;
  double tau = 0.0;
  if (prune) {
    // the k of largest ub (any k would do; these give the largest tau). They are at or above the
    // least of the maxima of k disjoint groups of candidates (k distinct candidates reach it: a
    // lower bound of the k-th largest); with every k-th candidate in a group, each group spans the
    // box and few candidates reach it: largest_k (a branchy scan) runs over those only
    w.most.assign(size_t(k), -INFINITY);
    for (int64_t c = 0, t = 0; c < n; ++c, t = t + 1 == k ? 0 : t + 1) w.most[t] = std::max(w.most[t], w.ub[c]);
    const double lower = *std::min_element(w.most.begin(), w.most.end());
    int64_t reach = 0;
    for (int64_t c = 0; c < n; ++c) {  // stored whatever the test says, counted where it passes
      w.reach[reach] = c, w.reach_ub[reach] = w.ub[c];
      reach += w.ub[c] >= lower;
    }
    largest_k(w.reach_ub.data(), reach, k, w.top, w.idx);
    for (int64_t& c : w.idx) c = w.reach[c];
    score_listed(a, w);
    tau = INFINITY;  // the least of their metrics; NaN if one is NaN (then nothing is pruned)
    for (const int64_t c : w.idx) tau = std::isnan(tau) || std::isnan(w.metric[c]) ? NAN : std::min(tau, w.metric[c]);
  }
  // ub's rounding (the approximate score power's few ulp, scaled by alpha; the metric's float product)
  const double margin = 1.0 + 1e-5 * std::max(1.0, std::abs(double(a.alpha)));
  for (bool pruned = prune && tau > 0.0;; pruned = false) {  // false for a NaN tau
    // the candidates scored: the first k points, and those whose ub reaches tau (stored whatever
    // the test says, counted where it passes: no branch to mispredict)
    w.idx.resize(size_t(n));
    int64_t listed = 0;
    for (int64_t c = 0; c < n; ++c) {
      w.idx[listed] = c;
      listed += !pruned || w.point[c] < head || !(w.ub[c] * margin < tau);
    }
    w.idx.resize(size_t(listed));
    score_listed(a, w);
    std::sort(w.done.begin(), w.done.end());  // point order, as the heap selection visits them
    std::vector<Entry>& row = w.row;
    row.assign(size_t(head), Entry(0.0, 0));
    for (int64_t p = 0; p < head; ++p) row[p].second = p;
    for (const int64_t c : w.done) {
      const int64_t p = w.point[c];
      const double metric = w.metric[c];
      if (p < head)
        row[p].first = metric;
      else if (!(metric <= 0.0))  // positive or NaN: the only entries that can enter the heap
        row.emplace_back(metric, p);
    }
    topk_select(row, k, L.points);
    if (!pruned) break;
    // the k-th largest: unique and positive, or every candidate is scored and the selection rerun
    double kth = INFINITY;
    for (int64_t t = 0; t < k; ++t) kth = std::isnan(row[t].first) ? NAN : std::min(kth, row[t].first);
    int64_t equal = 0;
    for (const auto& e : row) equal += e.first == kth;
    const bool unique = kth > 0.0 && equal == 1;  // false for NaN
    if (unique) break;
  }
  int64_t picked = 0;
  for (int64_t t = 0; t < k; ++t) {  // the original keeps the top-k points that are candidates
    const int64_t p = w.row[t].second;
    if (!a.candidate(g, p)) continue;
    // a candidate in the top-k was scored (the first k points always are; the others entered the
    // row only so), and the candidates are in point order
    const int64_t c = std::lower_bound(w.point.begin(), w.point.begin() + n, p) - w.point.begin();
    TORCH_INTERNAL_ASSERT(c < n && w.point[c] == p && w.scored[c]);
    picks[picked++] = Pick<S>{p, S(w.row[t].first), w.overlap[c]};
  }
  return picked;
}

// Step 3's buffers, kept from image to image by a thread (per point: only `claims` is read
// before it is written, and it is cleared again point by point after use).
template <typename S>
struct ResolveScratch {
  std::vector<uint8_t> claims;   // [A]: how many boxes kept the point (0, 1, 2: several)
  std::vector<Pick<S>> first;    // [A]: the first claimer's pick of the point
  std::vector<int32_t> owner;    // [A]: and its box
  std::vector<int64_t> touched;  // the points claimed, in index order
  std::vector<float> win[4];     // the boxes' candidate windows as arrays
};

// Step 3 for image b: resolve, cut, normalise; writes assigned[A] and target[A].
template <typename S, typename In>
void resolve_image(const Assigner<S>& a, const In* scores, int64_t b, const Pick<S>* picks, const int64_t* counts,
                   c10::optional<int64_t> topk2, int32_t* assigned, S* target, ResolveScratch<S>& r) {
  const int64_t A = a.layout.points, m = a.m;
  const GtBox* gt = a.gt.data() + b * m;
  std::fill(assigned, assigned + A, -1);
  std::fill(target, target + A, S(0));
  if (int64_t(r.claims.size()) != A) r.claims.assign(size_t(A), 0);
  resize_all(A, r.first, r.owner);
  std::vector<uint8_t>& claims = r.claims;
  std::vector<Pick<S>>& first = r.first;
  std::vector<int32_t>& owner = r.owner;
  for (int64_t g = 0; g < m; ++g) {
    const Pick<S>* pg = picks + g * a.k;
    for (int64_t t = 0; t < counts[g]; ++t) {
      const int64_t p = pg[t].point;
      if (claims[p] == 0) first[p] = pg[t], owner[p] = int32_t(g);
      claims[p] = uint8_t(std::min(claims[p] + 1, 2));
    }
  }
  // the points claimed, in index order: a scan of the claims (A bytes) rather than a sort
  std::vector<int64_t>& touched = r.touched;
  touched.clear();
  for (int64_t p = 0; p < A; ++p)
    if (claims[p] != 0) touched.push_back(p);
  // the boxes' candidate windows as arrays (lo_x, lo_y, hi_x, hi_y; padding: no point inside)
  std::vector<float>* win = r.win;
  for (int64_t i = 0; i < 4; ++i) win[i].resize(size_t(m));
  for (int64_t g = 0; g < m; ++g) {
    const bool valid = gt[g].valid;
    win[0][g] = valid ? gt[g].lo_x : INFINITY, win[1][g] = valid ? gt[g].lo_y : INFINITY;
    win[2][g] = gt[g].hi_x, win[3][g] = gt[g].hi_y;
  }
  std::vector<uint8_t> inside(static_cast<size_t>(m));
  std::vector<int64_t> hits;  // the boxes a contested point is inside, their boxes gathered, their overlaps
  std::vector<float> hx1, hy1, hx2, hy2, hangle, hov;
  // the box each touched point goes to, with its metric and CIoU there
  std::vector<Pick<S>> won(touched.size());
  std::vector<int32_t> winner(touched.size());
  std::vector<int64_t> per_box(m + 1, 0);
  for (size_t t = 0; t < touched.size(); ++t) {
    const int64_t p = touched[t];
    if (claims[p] == 1) {
      winner[t] = owner[p], won[t] = first[p];
    } else {  // argmax over every box of the CIoU (0 where not a candidate); NaN wins, first on ties
      const float x = a.px[p], y = a.py[p], eps = float(kAssignEps);
      for (int64_t g = 0; g < m; ++g)  // a.candidate over every box at once (vectorises)
        inside[g] = (x - win[0][g] > eps) & (win[2][g] - x > eps) & (y - win[1][g] > eps) & (win[3][g] - y > eps);
      hits.clear();
      const uint8_t* in = inside.data();
      for (const uint8_t* hit = in; (hit = static_cast<const uint8_t*>(std::memchr(hit, 1, in + m - hit))); ++hit)
        hits.push_back(hit - in);  // memchr: a fast scan
      const int64_t nh = int64_t(hits.size());
      resize_all(nh, hx1, hy1, hx2, hy2, hangle, hov);
      for (int64_t h = 0; h < nh; ++h) {
        const GtBox& q = gt[hits[h]];
        hx1[h] = q.x1, hy1[h] = q.y1, hx2[h] = q.x2, hy2[h] = q.y2, hangle[h] = q.angle;
      }
      const float* pq = a.pred + b * kPredRows * A + p;
      const float q5[5] = {pq[0], pq[A], pq[2 * A], pq[3 * A], pq[4 * A]};
      overlap_gt_row(hx1.data(), hy1.data(), hx2.data(), hy2.data(), hangle.data(), nh, q5, hov.data());
      // the boxes it is not inside have CIoU 0 (box 0's too when it is not inside), never above
      int32_t best = 0;
      float best_ov = 0.0f;
      for (int64_t h = 0; h < nh; ++h) {
        const float ov = hov[h];
        if (hits[h] == 0)
          best_ov = ov;
        else if (!std::isnan(best_ov) && (std::isnan(ov) || ov > best_ov))
          best = int32_t(hits[h]), best_ov = ov;
      }
      const GtBox& w = gt[best];
      const bool cand = a.candidate(w, p);
      winner[t] = best;
      won[t] = Pick<S>{p, cand ? a.metric(scores, b, w.label, p, best_ov) : S(0), cand ? best_ov : 0.0f};
    }
    ++per_box[winner[t] + 1];
    claims[p] = 0;  // cleared for the next image
  }
  for (int64_t g = 0; g < m; ++g) per_box[g + 1] += per_box[g];
  std::vector<Pick<S>> lists(touched.size());  // per box, its points in index order
  {
    std::vector<int64_t> fill(per_box.begin(), per_box.end() - 1);
    for (size_t t = 0; t < touched.size(); ++t) lists[fill[winner[t]]++] = won[t];
  }
  std::vector<Entry> row;
  for (int64_t g = 0; g < m; ++g) {
    Pick<S>* begin = lists.data() + per_box[g];
    int64_t n = per_box[g + 1] - per_box[g];
    if (n == 0) continue;
    if (topk2.has_value()) {  // each box keeps its topk2 best positives, selected as torch.topk does
      const int64_t k2 = std::min(*topk2, A);
      const int64_t head = topk_partial(k2, A) ? k2 : A;
      row.assign(size_t(head), Entry(0.0, 0));
      for (int64_t p = 0; p < head; ++p) row[p].second = p;
      for (int64_t t = 0; t < n; ++t) {  // metric * positive: the box's positives, in point order
        const int64_t p = begin[t].point;
        if (p < head)
          row[p].first = double(begin[t].metric);
        else if (!(begin[t].metric <= S(0)))
          row.emplace_back(double(begin[t].metric), p);
      }
      topk_select(row, k2, A);
      std::vector<uint8_t> kept_flag(size_t(n), 0);
      for (int64_t t = 0; t < k2; ++t) {
        const int64_t p = row[t].second;
        const Pick<S>* hit = std::lower_bound(begin, begin + n, p, [](const Pick<S>& q, int64_t v) { return q.point < v; });
        if (hit != begin + n && hit->point == p) kept_flag[hit - begin] = 1;
      }
      int64_t kept = 0;
      for (int64_t t = 0; t < n; ++t)
        if (kept_flag[t]) begin[kept++] = begin[t];
      n = kept;
    }
    S best_metric = S(0);
    float best_ov = 0.0f;
    for (int64_t t = 0; t < n; ++t) best_metric = nan_max(best_metric, begin[t].metric), best_ov = nan_max(best_ov, begin[t].overlap);
    for (int64_t t = 0; t < n; ++t) {
      const int64_t p = begin[t].point;
      assigned[p] = int32_t(g);
      target[p] = begin[t].metric * S(best_ov) / (best_metric + S(kAssignEps));
    }
  }
}

template <typename In, typename S>
void assign(const at::Tensor& boxes, const at::Tensor& scores, const at::Tensor& gt_labels, const at::Tensor& gt_boxes,
            const Layout& L, int64_t k, c10::optional<int64_t> topk2, double alpha, double beta, double size_floor,
            at::Tensor& assigned, at::Tensor& target) {
  const int64_t bs = boxes.size(0), A = L.points, R = boxes.size(1) / 4, nc = scores.size(1), m = gt_boxes.size(1);
  // 1. point centres and the predicted boxes of the points some box may take, in pixels
  std::vector<float> px(A), py(A);
  // the scratch that grows with the inputs is ATen memory, so that the profiler (and the memory
  // tests and benchmarks that read it) sees every byte of it
  // written where needed, read there only; kChunk floats of slack for copy_chunks
  const at::Tensor pred_buf = at::empty({bs * kPredRows * A + kChunk}, at::kFloat);
  float* const pred = pred_buf.data_ptr<float>();
  for (int64_t l = 0; l < L.levels(); ++l)
    for (int64_t j = 0; j < L.ny(l); ++j)
      for (int64_t i = 0; i < L.nx(l); ++i) {
        const int64_t p = L.offsets[l] + j * L.nx(l) + i;
        px[p] = float((S(i) + S(0.5)) * S(L.strides[l]));
        py[p] = float((S(j) + S(0.5)) * S(L.strides[l]));
      }
  // the boxes' geometry (as reference.candidates_in_boxes), labels checked
  std::vector<GtBox> gt(size_t(bs * m));
  const float* gb = gt_boxes.data_ptr<float>();
  const int64_t* gl = gt_labels.data_ptr<int64_t>();
  const float floor_px = float(size_floor);
  for (int64_t r = 0; r < bs * m; ++r) {
    const float* q = gb + 4 * r;
    GtBox g{q[0], q[1], q[2], q[3], box_angle(q[0], q[1], q[2], q[3]), 0, 0, 0, 0, gl[r],
            ((q[0] + q[1]) + q[2]) + q[3] > 0.0f};
    const float cx = (q[0] + q[2]) / 2.0f, cy = (q[1] + q[3]) / 2.0f;
    float w = q[2] - q[0], h = q[3] - q[1];
    w = w < floor_px ? floor_px : w, h = h < floor_px ? floor_px : h;
    g.lo_x = cx - w / 2.0f, g.hi_x = cx + w / 2.0f, g.lo_y = cy - h / 2.0f, g.hi_y = cy + h / 2.0f;
    TORCH_CHECK_VALUE(!g.valid || (g.label >= 0 && g.label < nc), "gt_labels: expected classes in [0, ", nc,
                      "), got ", g.label, " at image ", r / m, ", box ", r % m);
    gt[r] = g;
  }
  const at::Tensor cells_buf = at::empty({int64_t(bs * m * L.levels() * sizeof(Window))}, at::kByte);
  Window* const cells = reinterpret_cast<Window*>(cells_buf.data_ptr<uint8_t>());
  const Assigner<S> a{L, bs, m, nc, k, S(alpha), float(beta), pred, px.data(), py.data(), gt, cells};
  // only the candidates of some box need their box decoded (few when boxes are few)
  const at::Tensor needed_buf = at::zeros({bs, A}, at::kByte);
  uint8_t* const needed = needed_buf.data_ptr<uint8_t>();
  const auto mark_needed = [&](int64_t b) {
    for (int64_t g = 0; g < m; ++g) {
      if (!gt[b * m + g].valid) continue;  // its cells are never read
      for (int64_t l = 0; l < L.levels(); ++l) {
        const Window w = a.cells[(b * m + g) * L.levels() + l] = candidate_cells(a, gt[b * m + g], l);
        for (int64_t j = w.j0; w.i0 <= w.i1 && j <= w.j1; ++j) {
          uint8_t* row = needed + b * A + L.offsets[l] + j * L.nx(l);
          std::fill(row + w.i0, row + w.i1 + 1, uint8_t(1));
        }
      }
    }
  };
  const In* xb = boxes.data_ptr<In>();
  using Runs = std::vector<std::pair<int64_t, int64_t>>;
  const auto decode_level = [&](int64_t b, int64_t l, std::vector<S>& dist, Runs& runs) {
    dist.resize(size_t(4) * kDecodeBlock);
    const S st = S(L.strides[l]);
    const int64_t level_end = L.offsets[l] + L.ny(l) * L.nx(l);
    const uint8_t* need = needed + b * A;
    runs.clear();  // runs of needed points (first, length), at most a block each
    for (int64_t p0 = L.offsets[l]; p0 < level_end;) {
      if (!need[p0]) {
        ++p0;
        continue;
      }
      // a run goes on over gaps shorter than a cache line of floats: those lines are read anyway
      int64_t n = 1;
      for (int64_t gap = 0; n + gap < kDecodeBlock && p0 + n + gap < level_end && gap < 16;)
        if (need[p0 + n + gap])
          n += gap + 1, gap = 0;
        else
          ++gap;
      runs.emplace_back(p0, n);
      p0 += n;
    }
    const In* x = xb + b * 4 * R * A;
    // decoded in whole vectors (a run of a few points would otherwise go through the loops' scalar
    // tails); the points past the run, still in the rows, are decoded and not used
    const auto width = [&](int64_t p0, int64_t n) { return std::min({(n + 15) / 16 * 16, kDecodeBlock, A - p0}); };
    // the first runs' rows asked for before the first is decoded (the later ones along the way)
    for (size_t t = 0; t < std::min(runs.size(), kRunsAhead); ++t)
      prefetch_rows(x + runs[t].first, A, 4 * R, width(runs[t].first, runs[t].second));
    for (size_t t = 0; t < runs.size(); ++t) {
      const auto [p0, n] = runs[t];
      // the lines of a later run's 4 * R rows are asked for as this run's rows are decoded
      const size_t next = t + kRunsAhead;
      const In* ahead = next < runs.size() ? x + runs[next].first : nullptr;
      decode<S, In>(x + p0, A, R, width(p0, n), kDecodeBlock, dist.data(), nullptr, ahead,
                    ahead != nullptr ? width(runs[next].first, runs[next].second) : 0);
      for (int64_t q = 0; q < n; ++q) {
        const int64_t p = p0 + q, cell = p - L.offsets[l];
        const S cx = S(cell % L.nx(l)) + S(0.5), cy = S(cell / L.nx(l)) + S(0.5);
        float* o = pred + b * kPredRows * A + p;
        o[0] = float((cx - dist[0 * kDecodeBlock + q]) * st);
        o[A] = float((cy - dist[1 * kDecodeBlock + q]) * st);
        o[2 * A] = float((cx + dist[2 * kDecodeBlock + q]) * st);
        o[3 * A] = float((cy + dist[3 * kDecodeBlock + q]) * st);
      }
      float* o = pred + b * kPredRows * A + p0;
      box_angle_row(o, o + A, o + 2 * A, o + 3 * A, n, o + 4 * A);
    }
  };
  const In* sc = scores.data_ptr<In>();
  const at::Tensor picks_buf = at::empty({int64_t(bs * m * k * sizeof(Pick<S>))}, at::kByte);
  Pick<S>* const picks = reinterpret_cast<Pick<S>*>(picks_buf.data_ptr<uint8_t>());
  const at::Tensor counts_buf = at::zeros({bs * m}, at::kLong);
  int64_t* const counts = counts_buf.data_ptr<int64_t>();
  const auto box_top_k = [&](int64_t r, BoxScratch<S>& scratch) {
    // the box two ahead, if of this image (its cells are computed with the image's)
    const int64_t ahead = r + 2 < bs * m && (r + 2) / m == r / m ? r + 2 : -1;
    if (gt[r].valid) counts[r] = top_candidates(a, sc, r, ahead, picks + r * k, scratch);
  };
  int32_t* out = assigned.data_ptr<int32_t>();
  S* tgt = target.data_ptr<S>();
  const auto resolve = [&](int64_t b, ResolveScratch<S>& scratch) {
    resolve_image(a, sc, b, picks + b * m * k, counts + b * m, topk2, out + b * A, tgt + b * A, scratch);
  };
  if (bs >= at::get_num_threads()) {
    // an image a task, its steps one after another: its predicted boxes (kPredRows * A floats) are still
    // in cache when its boxes read them; the images handed out as threads free up (their costs
    // differ with their boxes' number and areas)
    struct ImageScratch {
      std::vector<S> dist;
      Runs runs;
      BoxScratch<S> boxes;
      ResolveScratch<S> resolve;
    };
    // the images by their cost, the sum of their boxes' candidate windows' areas, costliest first
    std::vector<double> cost(size_t(bs), 0.0);
    for (int64_t r = 0; r < bs * m; ++r)
      if (gt[r].valid) cost[r / m] += double(gt[r].hi_x - gt[r].lo_x) * double(gt[r].hi_y - gt[r].lo_y);
    for (double& c : cost) c = std::isfinite(c) ? c : 0.0;  // a non-finite box: no order among NaNs
    std::vector<int64_t> order(static_cast<size_t>(bs));
    for (int64_t b = 0; b < bs; ++b) order[b] = b;
    std::stable_sort(order.begin(), order.end(), [&](int64_t i, int64_t j) { return cost[i] > cost[j]; });
    parallel_tasks<ImageScratch>(bs, [&](int64_t b, ImageScratch& scratch) {
      mark_needed(b);
      for (int64_t l = 0; l < L.levels(); ++l) decode_level(b, l, scratch.dist, scratch.runs);
      for (int64_t r = b * m; r < (b + 1) * m; ++r) box_top_k(r, scratch.boxes);
      resolve(b, scratch.resolve);
    }, order.data());
    return;
  }
  // fewer images than threads: each step split finer (levels, boxes) over the threads
  at::parallel_for(0, bs, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) mark_needed(b);
  });
  at::parallel_for(0, bs * L.levels(), 1, [&](int64_t begin, int64_t end) {
    std::vector<S> dist;
    Runs runs;
    for (int64_t task = begin; task < end; ++task) decode_level(task / L.levels(), task % L.levels(), dist, runs);
  });
  at::parallel_for(0, bs * m, 1, [&](int64_t begin, int64_t end) {
    BoxScratch<S> scratch;
    for (int64_t r = begin; r < end; ++r) box_top_k(r, scratch);
  });
  at::parallel_for(0, bs, 1, [&](int64_t begin, int64_t end) {
    ResolveScratch<S> scratch;
    for (int64_t b = begin; b < end; ++b) resolve(b, scratch);
  });
}

std::tuple<at::Tensor, at::Tensor> tal_assign_cpu(const at::Tensor& boxes, const at::Tensor& scores,
                                                  const at::Tensor& gt_labels, const at::Tensor& gt_boxes,
                                                  at::IntArrayRef grids, at::ArrayRef<double> strides, int64_t topk,
                                                  c10::optional<int64_t> topk2, double alpha, double beta,
                                                  double size_floor) {
  const Layout L = check_predictions(boxes, scores, grids, strides);
  check_targets(gt_labels, gt_boxes, boxes.size(0));
  TORCH_CHECK(topk >= 1, "topk: expected a positive int, got ", topk);
  TORCH_CHECK(!topk2.has_value() || *topk2 >= 1, "topk2: expected a positive int or None, got ", *topk2);
  TORCH_CHECK(std::isfinite(alpha) && std::isfinite(beta), "alpha, beta: expected finite numbers, got ", alpha, ", ",
              beta);
  TORCH_CHECK(std::isfinite(size_floor) && size_floor >= 0, "size_floor: expected a finite size >= 0, got ",
              size_floor);
  const auto S_type = boxes.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t bs = boxes.size(0);
  at::Tensor assigned = at::empty({bs, L.points}, boxes.options().dtype(at::kInt));
  at::Tensor target = at::empty({bs, L.points}, boxes.options().dtype(S_type));
  const at::Tensor x = boxes.contiguous(), s = scores.contiguous();
  const at::Tensor labels = gt_labels.contiguous(), gtb = gt_boxes.contiguous();
  const int64_t k = std::min(topk, L.points);
  if (gt_boxes.size(1) == 0 || L.points == 0) {
    assigned.fill_(-1);
    target.zero_();
    return {assigned, target};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "yolo_kernels::tal_assign", [&] {
    if (S_type == at::kDouble)
      assign<scalar_t, double>(x, s, labels, gtb, L, k, topk2, alpha, beta, size_floor, assigned, target);
    else
      assign<scalar_t, float>(x, s, labels, gtb, L, k, topk2, alpha, beta, size_floor, assigned, target);
  });
  return {assigned, target};
}

}  // namespace
}  // namespace anchor_free

TORCH_LIBRARY_IMPL(yolo_kernels, CPU, m) { m.impl("tal_assign", &anchor_free::tal_assign_cpu); }

}  // namespace yolo_kernels
