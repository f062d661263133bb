// CPU kernel of yolo_kernels::tal_assign (schema in yolo_kernels/library.py): the task-aligned
// assigner of the anchor-free family without a [batch, boxes, points] tensor.
//
// The dense assigner (reference.assign) scores every box against every point. Here each box scans
// only the cells inside it (its sides raised to the size floor), so the work is the boxes' areas
// and the memory O(bs * boxes * topk + points):
//   1. decode every point's predicted box (pixels);
//   2. per box: metric = score^alpha * CIoU^beta of each candidate (0 elsewhere) and its top-k,
//      selected as torch.topk selects on the CPU (topk_select), so that the zero-metric points a
//      box with fewer than k positive candidates is filled with are the original's; the picks that
//      are candidates of the box are kept;
//   3. per image: a point kept by one box goes to it; a point kept by several goes to the box of
//      highest CIoU over every box it is a candidate of (the first on ties); the second cut
//      (topk2, selected the same way); each box's alignments normalised by its best CIoU over its
//      best metric.
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

namespace yolo_kernels {
namespace anchor_free {
namespace {

// A box's geometry in pixels: corners, the candidate window (sides raised to the floor) and label.
struct GtBox {
  float x1, y1, x2, y2;
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
  const float* pred;  // [bs, 4, A] predicted boxes, pixels: x1, y1, x2, y2 rows per image
  const float* px;    // [A] point centres, pixels
  const float* py;
  const std::vector<GtBox>& gt;  // [bs * m]

  bool candidate(const GtBox& g, int64_t p) const {
    return g.valid && strictly_inside(g.lo_x, g.hi_x, px[p]) && strictly_inside(g.lo_y, g.hi_y, py[p]);
  }

  float overlap(const GtBox& g, int64_t b, int64_t p) const {
    const float* q = pred + b * 4 * layout.points + p;
    const int64_t A = layout.points;
    return clamp_nonnegative(ciou_values<float>(g.x1, g.y1, g.x2, g.y2, q[0], q[A], q[2 * A], q[3 * A]));
  }

  // IoU >= CIoU: an upper bound of the overlap for no arctangent
  float iou(const GtBox& g, int64_t b, int64_t p) const {
    const float* q = pred + b * 4 * layout.points + p;
    const int64_t A = layout.points;
    return iou_xyxy<float, float>(g.x1, g.y1, g.x2, g.y2, q[0], q[A], q[2 * A], q[3 * A]).iou;
  }

  // iou() of n consecutive points from p (the loop vectorises over the structure-of-arrays boxes)
  void iou_run(const GtBox& g, int64_t b, int64_t p, int64_t n, float* out) const {
    const int64_t A = layout.points;
    const float *x1 = pred + b * 4 * A + p, *y1 = x1 + A, *x2 = x1 + 2 * A, *y2 = x1 + 3 * A;
    for (int64_t q = 0; q < n; ++q)
      out[q] = iou_xyxy<float, float>(g.x1, g.y1, g.x2, g.y2, x1[q], y1[q], x2[q], y2[q]).iou;
  }

  template <typename In>
  S score_power(const In* scores, int64_t b, int64_t label, int64_t p) const {
    const S x = S(scores[(b * nc + label) * layout.points + p]);
    const S score = S(1) / (S(1) + std::exp(-x));
    return alpha == S(0.5) ? std::sqrt(score) : std::pow(score, alpha);  // torch's pow(x, 0.5) is sqrt
  }
  S overlap_power(float ov) const { return S(beta == 2.0f ? ov * ov : std::pow(ov, beta)); }

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

// Step 2 for box g of image b: the points of its top-k that are its candidates, into picks.
//
// The exact metric costs an arctangent and two powers; the IoU (>= CIoU) bounds it for far less.
// tau, the k-th largest metric of the k candidates of largest IoU, is at most the k-th largest of
// all, so a candidate whose IoU^beta is below tau cannot be in the top-k and is not scored. The
// selection over the scored entries equals the selection over all when the k-th largest is unique
// and positive (the top-k set is then the same whatever the order the heap saw the entries in);
// otherwise (ties, zeros, NaN) every candidate is scored and the selection runs as the original's.
struct Candidate {
  int64_t point;
  float iou;
  double metric;       // set once scored
  double score_power;  // score^alpha, set once computed (< 0: not yet)
  bool scored;
};

template <typename S, typename In>
int64_t top_candidates(const Assigner<S>& a, const In* scores, int64_t b, const GtBox& g, Pick<S>* picks,
                       std::vector<Entry>& row, std::vector<Candidate>& cands, std::vector<int64_t>& order,
                       std::vector<float>& ious) {
  const Layout& L = a.layout;
  const int64_t k = a.k;
  const bool partial = topk_partial(k, L.points);
  const int64_t head = partial ? k : L.points;  // the points that enter the row whatever their metric
  cands.clear();
  for (int64_t l = 0; l < L.levels(); ++l) {
    const int64_t nx = L.nx(l), off = L.offsets[l];
    const Window w = cell_window(g, L, l);
    for (int64_t j = w.j0; j <= w.j1; ++j) {
      // a.candidate along the row: the cells that pass are consecutive (the test is monotone in x)
      const int64_t row = off + j * nx;
      int64_t i0 = w.i0, i1 = w.i1;
      while (i0 <= i1 && !a.candidate(g, row + i0)) ++i0;
      while (i1 >= i0 && !a.candidate(g, row + i1)) --i1;
      if (i0 > i1) continue;
      ious.resize(size_t(i1 - i0 + 1));
      a.iou_run(g, b, row + i0, i1 - i0 + 1, ious.data());
      for (int64_t i = i0; i <= i1; ++i)  // in increasing point order, as the heap selection visits them
        cands.push_back(Candidate{row + i, ious[i - i0], 0.0, -1.0, false});
    }
  }
  auto score_power = [&](Candidate& c) {
    if (c.score_power < 0.0) c.score_power = double(a.score_power(scores, b, g.label, c.point));
    return c.score_power;
  };
  auto score = [&](Candidate& c) {
    if (!c.scored) {  // Assigner::metric, with the score's power computed once
      c.metric = double(S(score_power(c)) * a.overlap_power(a.overlap(g, b, c.point)));
      c.scored = true;
    }
    return c.metric;
  };
  // the bound needs a metric that grows with score and overlap (the original's alpha 0.5, beta 6)
  float iou_floor = -1.0f;  // candidates at or below it (past the first k points) are not scored
  double tau = 0.0;
  const int64_t n_cands = int64_t(cands.size());
  if (partial && n_cands > k && a.alpha >= S(0) && a.beta > 0.0f) {
    order.resize(size_t(n_cands));
    for (int64_t t = 0; t < n_cands; ++t) order[t] = t;
    std::nth_element(order.begin(), order.begin() + (k - 1), order.end(), [&](int64_t x, int64_t y) {
      return cands[x].iou > cands[y].iou || (std::isnan(cands[x].iou) && !std::isnan(cands[y].iou));
    });
    tau = INFINITY;
    for (int64_t t = 0; t < k; ++t) tau = std::min(tau, score(cands[order[t]]));  // NaN: no pruning
    // an IoU within this factor of the root is not trusted to be below it after rounding
    constexpr double kBoundMargin = 1.0 + 1e-5;
    if (tau > 0.0) iou_floor = float(std::pow(tau, 1.0 / double(a.beta)) / kBoundMargin);
  }
  for (bool pruned = iou_floor >= 0.0f;; pruned = false) {
    row.assign(size_t(head), Entry(0.0, 0));
    for (int64_t p = 0; p < head; ++p) row[p].second = p;
    for (auto& c : cands) {
      if (c.point >= head && pruned) {
        if (c.iou <= iou_floor) continue;  // IoU^beta (score 1) below tau; false for NaN
        if (a.beta == 6.0f) {  // with its score: score^alpha IoU^6 (a margin for IoU^6's rounding) below tau
          const double i2 = double(c.iou) * double(c.iou);
          if (score_power(c) * (i2 * i2 * i2) * 1.00001 < tau) continue;
        }
      }
      const double metric = score(c);
      if (c.point < head)
        row[c.point].first = metric;
      else if (!(metric <= 0.0))  // positive or NaN: the only entries that can enter the heap
        row.emplace_back(metric, c.point);
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
  int64_t n = 0;
  for (int64_t t = 0; t < k; ++t) {  // the original keeps the top-k points that are candidates
    const int64_t p = row[t].second;
    if (!a.candidate(g, p)) continue;
    picks[n++] = Pick<S>{p, S(row[t].first), a.overlap(g, b, p)};
  }
  return n;
}

// Step 3 for image b: resolve, cut, normalise; writes assigned[A] and target[A].
template <typename S, typename In>
void resolve_image(const Assigner<S>& a, const In* scores, int64_t b, const Pick<S>* picks, const int64_t* counts,
                   c10::optional<int64_t> topk2, int32_t* assigned, S* target) {
  const int64_t A = a.layout.points, m = a.m;
  const GtBox* gt = a.gt.data() + b * m;
  std::fill(assigned, assigned + A, -1);
  std::fill(target, target + A, S(0));
  std::vector<uint8_t> claims(A, 0);
  std::vector<Pick<S>> first(A);   // the first claimer's pick of the point
  std::vector<int32_t> owner(A);
  std::vector<int64_t> touched;
  for (int64_t g = 0; g < m; ++g) {
    const Pick<S>* pg = picks + g * a.k;
    for (int64_t t = 0; t < counts[g]; ++t) {
      const int64_t p = pg[t].point;
      if (claims[p] == 0) touched.push_back(p), first[p] = pg[t], owner[p] = int32_t(g);
      claims[p] = uint8_t(std::min(claims[p] + 1, 2));
    }
  }
  std::sort(touched.begin(), touched.end());
  // the boxes' candidate windows as arrays (lo_x, lo_y, hi_x, hi_y; padding: no point inside)
  std::vector<float> win[4];
  for (auto& w : win) w.resize(size_t(m));
  for (int64_t g = 0; g < m; ++g) {
    const bool valid = gt[g].valid;
    win[0][g] = valid ? gt[g].lo_x : INFINITY, win[1][g] = valid ? gt[g].lo_y : INFINITY;
    win[2][g] = gt[g].hi_x, win[3][g] = gt[g].hi_y;
  }
  std::vector<uint8_t> inside(static_cast<size_t>(m));
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
      int32_t best = 0;
      float best_ov = inside[0] ? a.overlap(gt[0], b, p) : 0.0f;
      const uint8_t* in = inside.data();
      for (const uint8_t* hit = in + 1; (hit = static_cast<const uint8_t*>(std::memchr(hit, 1, in + m - hit)));
           ++hit) {  // the boxes it is inside (memchr: a fast scan); the others' CIoU is 0, never above box 0's
        const int64_t g = hit - in;
        const float ov = a.overlap(gt[g], b, p);
        if (!std::isnan(best_ov) && (std::isnan(ov) || ov > best_ov)) best = int32_t(g), best_ov = ov;
      }
      const GtBox& w = gt[best];
      const bool cand = a.candidate(w, p);
      winner[t] = best;
      won[t] = Pick<S>{p, cand ? a.metric(scores, b, w.label, p, best_ov) : S(0), cand ? best_ov : 0.0f};
    }
    ++per_box[winner[t] + 1];
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
  // 1. point centres and every point's predicted box, in pixels
  std::vector<float> px(A), py(A);
  // the scratch that grows with the inputs is ATen memory, so that the profiler (and the memory
  // tests and benchmarks that read it) sees every byte of it
  const at::Tensor pred_buf = at::empty({bs, 4, A}, at::kFloat);  // written where needed, read there only
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
    GtBox g{q[0], q[1], q[2], q[3], 0, 0, 0, 0, gl[r], ((q[0] + q[1]) + q[2]) + q[3] > 0.0f};
    const float cx = (q[0] + q[2]) / 2.0f, cy = (q[1] + q[3]) / 2.0f;
    float w = q[2] - q[0], h = q[3] - q[1];
    w = w < floor_px ? floor_px : w, h = h < floor_px ? floor_px : h;
    g.lo_x = cx - w / 2.0f, g.hi_x = cx + w / 2.0f, g.lo_y = cy - h / 2.0f, g.hi_y = cy + h / 2.0f;
    TORCH_CHECK_VALUE(!g.valid || (g.label >= 0 && g.label < nc), "gt_labels: expected classes in [0, ", nc,
                      "), got ", g.label, " at image ", r / m, ", box ", r % m);
    gt[r] = g;
  }
  // only the points some box may take need their box decoded (few when boxes are few)
  const at::Tensor needed_buf = at::zeros({bs, A}, at::kByte);
  uint8_t* const needed = needed_buf.data_ptr<uint8_t>();
  at::parallel_for(0, bs, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b)
      for (int64_t g = 0; g < m; ++g) {
        if (!gt[b * m + g].valid) continue;
        for (int64_t l = 0; l < L.levels(); ++l) {
          const Window w = cell_window(gt[b * m + g], L, l);
          for (int64_t j = w.j0; w.i0 <= w.i1 && j <= w.j1; ++j) {
            uint8_t* row = needed + b * A + L.offsets[l] + j * L.nx(l);
            std::fill(row + w.i0, row + w.i1 + 1, uint8_t(1));
          }
        }
      }
  });
  const In* xb = boxes.data_ptr<In>();
  at::parallel_for(0, bs * L.levels(), 1, [&](int64_t begin, int64_t end) {
    std::vector<S> dist(size_t(4) * kDecodeBlock);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / L.levels(), l = task % L.levels();
      const S st = S(L.strides[l]);
      const int64_t level_end = L.offsets[l] + L.ny(l) * L.nx(l);
      const uint8_t* need = needed + b * A;
      for (int64_t p0 = L.offsets[l]; p0 < level_end;) {  // runs of needed points, at most a block each
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
        // decoded in whole vectors (a run of a few points would otherwise go through the loops'
        // scalar tails); the points past the run, still in the rows, are decoded and not used
        const int64_t n_vec = std::min({(n + 15) / 16 * 16, kDecodeBlock, A - p0});
        decode<S, In>(xb + b * 4 * R * A + p0, A, R, n_vec, kDecodeBlock, dist.data(), nullptr);
        for (int64_t q = 0; q < n; ++q) {
          const int64_t p = p0 + q, cell = p - L.offsets[l];
          const S cx = S(cell % L.nx(l)) + S(0.5), cy = S(cell / L.nx(l)) + S(0.5);
          float* o = pred + b * 4 * A + p;
          o[0] = float((cx - dist[0 * kDecodeBlock + q]) * st);
          o[A] = float((cy - dist[1 * kDecodeBlock + q]) * st);
          o[2 * A] = float((cx + dist[2 * kDecodeBlock + q]) * st);
          o[3 * A] = float((cy + dist[3 * kDecodeBlock + q]) * st);
        }
        p0 += n;
      }
    }
  });
  const Assigner<S> a{L, bs, m, nc, k, S(alpha), float(beta), pred, px.data(), py.data(), gt};
  // 2. each box's top-k
  const In* sc = scores.data_ptr<In>();
  const at::Tensor picks_buf = at::empty({int64_t(bs * m * k * sizeof(Pick<S>))}, at::kByte);
  Pick<S>* const picks = reinterpret_cast<Pick<S>*>(picks_buf.data_ptr<uint8_t>());
  const at::Tensor counts_buf = at::zeros({bs * m}, at::kLong);
  int64_t* const counts = counts_buf.data_ptr<int64_t>();
  at::parallel_for(0, bs * m, 1, [&](int64_t begin, int64_t end) {
    std::vector<Entry> row;
    std::vector<Candidate> cands;
    std::vector<int64_t> order;
    std::vector<float> ious;
    for (int64_t r = begin; r < end; ++r)
      if (gt[r].valid)
        counts[r] = top_candidates(a, sc, r / m, gt[r], picks + r * k, row, cands, order, ious);
  });
  // 3. per image: resolve, cut, normalise
  int32_t* out = assigned.data_ptr<int32_t>();
  S* tgt = target.data_ptr<S>();
  at::parallel_for(0, bs, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b)
      resolve_image(a, sc, b, picks + b * m * k, counts + b * m, topk2, out + b * A, tgt + b * A);
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
