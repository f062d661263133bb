// CPU kernels of yolo_kernels::detection_loss, detection_loss_with_grad and
// detection_loss_backward (schemas in yolo_kernels/library.py): the anchor-free family's loss given
// an assignment (tal_assign's), and its gradient, written once: in the forward pass for the
// gradient the caller expects backward to bring (detection_loss_with_grad: the trainer's
// loss.sum() brings the batch size), or in backward for the gradient it brings. Calls without
// backward, as validation, write none.
//
// The class term is dense: BCE(x, t) = softplus(x) - t x, with t zero but at the assigned points'
// classes, so the forward pass sums softplus over every logit (one read) and subtracts t x at the
// assigned points; the gradient is scale * sigmoid(x) over every logit (with the loss: from the same
// exp, in the same pass over the row), fixed up at those points while the row is in cache.
// The box terms (CIoU, DFL or L1) live only at the assigned points: they read those points' bins.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/Optional.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <type_traits>
#include <vector>

#include "anchor_free/detection_math.h"
#include "anchor_free/op_args.h"
#include "common/checks.h"
#include "common/grad_pool.h"
#include "common/parallel.h"
#include "common/stream_store.h"

namespace yolo_kernels {
namespace anchor_free {
namespace {

struct Gains {
  double box, cls, dfl;
};

// What the kernels share: the tensors (contiguous) and their sizes.
struct Problem {
  Layout L;
  at::Tensor boxes, scores, gt_labels, gt_boxes, assigned, target, class_weights;
  int64_t bs, R, nc, m;
};

Problem check_problem(const at::Tensor& boxes, const at::Tensor& scores, const at::Tensor& gt_labels,
                      const at::Tensor& gt_boxes, const at::Tensor& assigned, const at::Tensor& target_scores,
                      const c10::optional<at::Tensor>& class_weights, at::IntArrayRef grids,
                      at::ArrayRef<double> strides) {
  Problem P;
  P.L = check_predictions(boxes, scores, grids, strides);
  P.bs = boxes.size(0), P.R = boxes.size(1) / 4, P.nc = scores.size(1), P.m = gt_boxes.size(1);
  check_targets(gt_labels, gt_boxes, P.bs);
  const auto S_type = boxes.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(assigned.scalar_type() == at::kInt && assigned.dim() == 2 && assigned.size(0) == P.bs &&
                  assigned.size(1) == P.L.points,
              "assigned: expected an int32 tensor of shape [", P.bs, ", ", P.L.points, "], got ",
              assigned.scalar_type(), " ", assigned.sizes());
  TORCH_CHECK(target_scores.scalar_type() == S_type && target_scores.sizes() == assigned.sizes(),
              "target_scores: expected a ", S_type, " tensor of shape ", assigned.sizes(), ", got ",
              target_scores.scalar_type(), " ", target_scores.sizes());
  P.boxes = boxes.contiguous(), P.scores = scores.contiguous();
  P.gt_labels = gt_labels.contiguous(), P.gt_boxes = gt_boxes.contiguous();
  P.assigned = assigned.contiguous(), P.target = target_scores.contiguous();
  const int32_t* a = P.assigned.data_ptr<int32_t>();
  const int64_t* labels = P.gt_labels.data_ptr<int64_t>();
  for (int64_t b = 0; b < P.bs; ++b)
    for (int64_t p = 0; p < P.L.points; ++p) {
      const int32_t box = a[b * P.L.points + p];
      TORCH_CHECK(box >= -1 && box < P.m, "assigned: expected box indices in [-1, ", P.m, "), got ", box,
                  " at point ", b * P.L.points + p);
      // an assigned box's class names the score row of its class term (a negative one counts as 0,
      // as the original's clamp takes it)
      TORCH_CHECK_VALUE(box < 0 || labels[b * P.m + box] < P.nc, "gt_labels: expected classes below ", P.nc,
                        " for the assigned boxes, got ", labels[b * P.m + std::max(box, 0)], " at image ", b,
                        ", box ", box);
    }
  if (class_weights.has_value()) {
    TORCH_CHECK(class_weights->numel() == P.nc, "class_weights: expected ", P.nc, " weights, got shape ",
                class_weights->sizes());
    P.class_weights = class_weights->to(at::kCPU, S_type).contiguous().view({P.nc});
  } else {
    P.class_weights = at::ones({P.nc}, boxes.options().dtype(S_type));
  }
  return P;
}

// The loss's normaliser: the target scores' sum, at least 1.
template <typename S>
S target_norm(const Problem& P) {
  const S* t = P.target.data_ptr<S>();
  double sum = 0.0;
  for (int64_t i = 0; i < P.bs * P.L.points; ++i) sum += double(t[i]);
  return S(std::max(sum, 1.0));
}

// The assigned points of one image, gathered: their box logits as rows x[c * n + q] (channel c,
// point q; read row by row, in point order, so the reads of a row move forward), decoded, and
// per point the box term (1 - CIoU), the distance term (DFL, or L1 with reg_max 1), and what the
// gradient needs: d(1 - CIoU) / d distance per side, the DFL's bins and weights per side.
// (Decoding every point of the image in place instead, block by block, with the gradient rows
// written whole, costs more even at 300 boxes, where ~30% of the points are assigned: +35% for the
// loss, the exponentials of the decode and the gradient at the points not assigned.)
template <typename S>
struct AssignedPoints {
  int64_t n = 0;
  std::vector<int64_t> point, box;
  std::vector<S> t;                        // target score
  std::vector<S> x, dist, log_norm;        // [4R * n], [4 * n], [4 * n]
  std::vector<S> box_term, dist_term;      // [n]
  std::vector<S> d_ciou;                   // [4 * n]: d (1 - CIoU) / d distance s
  std::vector<S> w_left, w_right, d_l1;    // [4 * n]: DFL weights; d L1 / d distance s (reg_max 1)
  std::vector<int32_t> left;               // [4 * n]: the DFL's left bin
  std::vector<std::pair<int64_t, int64_t>> runs;  // the gather's runs of points (first, last)

  // flatten: the dual-number CIoU's helpers (iou_xyxy, centre_term, Dual's operators) inlined into
  // the per-point loop; left to itself the compiler calls them, ~10% of the loss at 300 boxes
  template <typename In>
  __attribute__((flatten)) void build(const Problem& P, int64_t b) {
    const Layout& L = P.L;
    const int64_t A = L.points, R = P.R, C = 4 * R;
    const int32_t* assigned = P.assigned.data_ptr<int32_t>() + b * A;
    const S* target = P.target.data_ptr<S>() + b * A;
    point.clear(), box.clear(), t.clear();
    for (int64_t p = 0; p < A; ++p)
      if (assigned[p] >= 0) point.push_back(p), box.push_back(assigned[p]), t.push_back(target[p]);
    n = int64_t(point.size());
    x.resize(size_t(C * n)), dist.resize(size_t(4 * n)), log_norm.resize(size_t(4 * n));
    box_term.resize(size_t(n)), dist_term.resize(size_t(n)), d_ciou.resize(size_t(4 * n));
    w_left.resize(size_t(4 * n)), w_right.resize(size_t(4 * n)), d_l1.resize(size_t(4 * n));
    left.resize(size_t(4 * n));
    const In* xb = P.boxes.data_ptr<In>() + b * C * A;
    // the rows are A logits apart, so each point's C logits are C misses of their own: a row's
    // lines are asked for kRowsAhead rows before they are read (many misses in flight, not one),
    // once per run of points in a 16-point group (not once per point), and a few at a time as
    // the row kRowsAhead before is read (a burst of requests would wait for free miss buffers)
    constexpr int64_t kRowsAhead = 8, kGroup = 16, kChunk = 64;
    runs.clear();  // (first, last) points of each group's run
    for (int64_t q = 0; q < n; ++q)
      if (q == 0 || point[q] / kGroup != point[q - 1] / kGroup)
        runs.emplace_back(point[q], point[q]);
      else
        runs.back().second = point[q];
    const auto ask = [&](int64_t c, size_t t) {
      __builtin_prefetch(xb + c * A + runs[t].first), __builtin_prefetch(xb + c * A + runs[t].second);
    };
    for (int64_t c = 0; c < std::min(kRowsAhead, C); ++c)
      for (size_t t = 0; t < runs.size(); ++t) ask(c, t);
    for (int64_t c = 0; c < C; ++c) {
      size_t t = 0;
      for (int64_t q0 = 0; q0 < n; q0 += kChunk) {
        const int64_t q1 = std::min(n, q0 + kChunk);
        for (; c + kRowsAhead < C && t < runs.size() && runs[t].first <= point[q1 - 1]; ++t) ask(c + kRowsAhead, t);
        for (int64_t q = q0; q < q1; ++q) x[c * n + q] = S(xb[c * A + point[q]]);
      }
    }
    decode<S, S>(x.data(), n, R, n, n, dist.data(), log_norm.data());
    const float* gt = P.gt_boxes.data_ptr<float>() + b * P.m * 4;
    const S image_w = S(L.nx(0)) * S(L.strides[0]), image_h = S(L.ny(0)) * S(L.strides[0]);
    const S top = S(R - 1) - S(kDflMargin);
    int64_t l = 0;
    for (int64_t q = 0; q < n; ++q) {
      const int64_t p = point[q];
      while (l + 1 < L.levels() && L.offsets[l + 1] <= p) ++l;  // points in order: levels in order
      const int64_t cell = p - L.offsets[l];
      const S st = S(L.strides[l]);
      const S cx = S(cell % L.nx(l)) + S(0.5), cy = S(cell / L.nx(l)) + S(0.5);
      const float* g = gt + box[q] * 4;
      const S tx1 = S(g[0]) / st, ty1 = S(g[1]) / st, tx2 = S(g[2]) / st, ty2 = S(g[3]) / st;  // grid units
      using D = Dual<S, 4>;
      const D l_ = D::variable(dist[0 * n + q], 0, S(1)), t_ = D::variable(dist[1 * n + q], 1, S(1));
      const D r_ = D::variable(dist[2 * n + q], 2, S(1)), b_ = D::variable(dist[3 * n + q], 3, S(1));
      const D ciou = ciou_xyxy<D, S>(cx - l_, cy - t_, r_ + cx, b_ + cy, tx1, ty1, tx2, ty2);  // + commutes
      box_term[q] = S(1) - ciou.v;
      const S sides[4] = {cx - tx1, cy - ty1, tx2 - cx, ty2 - cy};
      S sum = S(0);
      for (int s = 0; s < 4; ++s) {
        d_ciou[s * n + q] = -ciou.d[s];
        if (R > 1) {
          const S tgt = std::min(std::max(sides[s], S(0)), top);
          const int32_t lb = int32_t(tgt);
          const S wl = S(lb + 1) - tgt, wr = S(1) - wl;
          left[s * n + q] = lb, w_left[s * n + q] = wl, w_right[s * n + q] = wr;
          const S* xs = x.data() + s * R * n;
          sum += -((xs[lb * n + q] - log_norm[s * n + q]) * wl + (xs[(lb + 1) * n + q] - log_norm[s * n + q]) * wr);
        } else {  // L1 of the distances as fractions of the image (x sides by width, y sides by height)
          const S side = s % 2 == 0 ? image_w : image_h;
          const S diff = dist[s * n + q] * st / side - sides[s] * st / side;
          sum += std::abs(diff);
          d_l1[s * n + q] = diff > S(0) ? st / side : (diff < S(0) ? -st / side : S(0));
        }
      }
      dist_term[q] = sum / S(4);
    }
  }

  // d loss / d x into g[c * n + q], for the box term's and the distance term's scales (times t).
  void gradient(int64_t R, S d_box, S d_dist, std::vector<S>& g) const {
    g.resize(size_t(4 * R * n));
    for (int64_t s = 0; s < 4; ++s) {
      const S* ds = dist.data() + s * n;
      const S* ln = log_norm.data() + s * n;
      const S* dc = d_ciou.data() + s * n;
      if (R == 1) {
        for (int64_t q = 0; q < n; ++q) g[s * n + q] = t[q] * (d_box * dc[q] + d_dist / S(4) * d_l1[s * n + q]);
        continue;
      }
      const int32_t* lb = left.data() + s * n;
      const S *wl = w_left.data() + s * n, *wr = w_right.data() + s * n;
      for (int64_t j = 0; j < R; ++j)
        bin_gradient_row(x.data() + (s * R + j) * n, ln, ds, t.data(), dc, lb, wl, wr, n, int32_t(j), d_box, d_dist,
                         g.data() + (s * R + j) * n);
    }
  }
};

// A row of logits as float/double for the row loops (half and bfloat16 converted into buf).
template <typename S, typename In>
const S* row_as(const In* x, int64_t n, std::vector<S>& buf) {
  if constexpr (std::is_same_v<S, In>) {
    return x;
  } else {
    buf.resize(size_t(n));
    for (int64_t i = 0; i < n; ++i) buf[i] = S(x[i]);
    return buf.data();
  }
}

// d loss / d (each component's sum over the points) for the components' gradient g: the gains,
// over the normaliser.
template <typename S>
struct Scales {
  S box, cls, dist;
  static Scales of(const double* g, Gains gains, S norm) {
    return {S(g[0] * gains.box) / norm, S(g[1] * gains.cls) / norm, S(g[2] * gains.dfl) / norm};
  }
};

// The assigned points of each class row of an image, in point order, with their target scores:
// the class term's targets (t at a point's assigned class, 0 elsewhere) as lists, so that the
// class-row pass subtracts t x and fixes up the gradient while the row is in cache (point by point
// after it, each of those was a miss of its own in a plane far from the last). Built from the
// image's assigned points (assigned_terms).
template <typename S>
struct ClassTargets {
  std::vector<int64_t> begin;  // [nc + 1]: class c's entries are [begin[c], begin[c + 1])
  std::vector<int64_t> point;
  std::vector<S> t;

  // a counting sort of the points (in point order) by their box's class (below nc: check_problem;
  // a negative one counts as class 0, as the original's clamp takes it)
  void build(const AssignedPoints<S>& pts, const int64_t* labels, int64_t nc) {
    begin.assign(size_t(nc + 1), 0);
    for (int64_t q = 0; q < pts.n; ++q) ++begin[std::max<int64_t>(labels[pts.box[q]], 0) + 1];
    for (int64_t c = 0; c < nc; ++c) begin[c + 1] += begin[c];
    point.resize(size_t(pts.n)), t.resize(size_t(pts.n));
    std::vector<int64_t> fill(begin.begin(), begin.end() - 1);
    for (int64_t q = 0; q < pts.n; ++q) {
      const int64_t e = fill[std::max<int64_t>(labels[pts.box[q]], 0)]++;
      point[e] = pts.point[q], t[e] = pts.t[q];
    }
  }
};

// The dense class rows (bs * nc of them, in a fixed order: deterministic): with `sums`, each row's
// class term sum(softplus(x)) - sum over its assigned points of t x (unweighted); with `gs`,
// d loss / d x = d_cls * w * (sigmoid(x) - t) written over the row (t zero but at its assigned
// points, fixed up after the row is written, still in cache). One pass, one exp per logit
// (softplus_sigmoid_row).
template <typename In, typename S>
void class_rows(const Problem& P, const std::vector<ClassTargets<S>>& targets, double* sums, In* gs, S d_cls) {
  const int64_t A = P.L.points, nc = P.nc;
  const S* w = P.class_weights.data_ptr<S>();
  const In* xs = P.scores.data_ptr<In>();
  at::parallel_for(0, P.bs * nc, 1, [&](int64_t begin, int64_t end) {
    std::vector<S> buf, out, at, sig;  // at, sig: the row's logits at its assigned points, their sigmoids
    for (int64_t r = begin; r < end; ++r) {
      const S* x = row_as<S>(xs + r * A, A, buf);
      const ClassTargets<S>& image = targets[r / nc];
      const int64_t e0 = image.begin[r % nc], n = image.begin[r % nc + 1] - e0;
      const int64_t* point = image.point.data() + e0;
      const S* t = image.t.data() + e0;
      S* g = nullptr;
      if constexpr (std::is_same_v<S, In>) {
        g = gs != nullptr ? gs + r * A : nullptr;
      } else if (gs != nullptr) {
        out.resize(size_t(A));
        g = out.data();
      }
      const S scale = d_cls * w[r % nc];
      double row_sum = 0.0;
      if (g == nullptr)
        row_sum = softplus_row_sum(x, A);
      else if (sums != nullptr)
        row_sum = softplus_sigmoid_row(x, A, g, scale);
      else
        sigmoid_row_scaled(x, g, A, scale);
      // the assigned points, after the row's pass (in cache then; read before it, their scattered
      // lines would break the pass's stream)
      at.resize(size_t(n));
      for (int64_t i = 0; i < n; ++i) at[i] = x[point[i]];
      if (sums != nullptr) {
        double tx = 0.0;
        for (int64_t i = 0; i < n; ++i) tx += double(at[i] * t[i]);
        sums[r] = row_sum - tx;
      }
      if (g == nullptr) continue;
      // their gradient d_cls * w * (sigmoid - t), the sigmoids in one call of the row loop
      sig.resize(size_t(n));
      sigmoid_row_scaled(at.data(), sig.data(), n, S(1));
      for (int64_t i = 0; i < n; ++i) g[point[i]] = scale * (sig[i] - t[i]);
      if constexpr (!std::is_same_v<S, In>)
        for (int64_t i = 0; i < A; ++i) gs[r * A + i] = In(out[i]);
    }
  });
}

// The box gradient rows of an image are streamed past the cache when fewer than one point in this
// many is assigned (assigned_terms).
constexpr int64_t kStreamBelow = 8;

// The assigned points of every image (one image a task): with `images`, the sums of their box and
// distance terms (weighted by t); with `gb`, the gradient of the box logits (rows zero but at the
// assigned points); per image, the targets of its class rows (whose pass, class_rows, comes after).
template <typename In, typename S>
void assigned_terms(const Problem& P, std::array<double, 2>* images, In* gb, Scales<S> d,
                    std::vector<ClassTargets<S>>& targets) {
  const int64_t A = P.L.points, C = 4 * P.R;
  struct Scratch {
    AssignedPoints<S> pts;
    std::vector<S> g;
    std::vector<In> staging;  // a box gradient row
  };
  parallel_tasks<Scratch>(P.bs, [&](int64_t b, Scratch& scratch) {  // images of different costs: as threads free up
    AssignedPoints<S>& pts = scratch.pts;
    std::vector<S>& g = scratch.g;
    pts.template build<In>(P, b);
    targets[b].build(pts, P.gt_labels.data_ptr<int64_t>() + b * P.m, P.nc);
    if (images != nullptr) {
      std::array<double, 2> sum = {0.0, 0.0};
      for (int64_t q = 0; q < pts.n; ++q) {
        sum[0] += double(pts.box_term[q] * pts.t[q]);
        sum[1] += double(pts.dist_term[q] * pts.t[q]);
      }
      images[b] = sum;
    }
    if (gb == nullptr) return;
    pts.gradient(P.R, d.box, d.dist, g);
    // each row: zero but at the assigned points. With few of them (most of each row zero), composed
    // in a staging row (in cache, zero between rows) and streamed out past the cache: a fill in place
    // would first read each line of the rows from memory (the 34 MB of box gradient at batch 16,
    // 640: 1.0-1.4 ms filled, 0.6-0.8 ms streamed; the loss at 10 boxes -10%). With many (at 300
    // boxes, ~30% of the points) the staging row's extra writes and the streamed rows beside the
    // gather of the next image's logits cost more (+6%): filled in place (the same values either way)
    const bool stream = pts.n * kStreamBelow < A;
    std::vector<In>& staging = scratch.staging;
    if (stream && int64_t(staging.size()) != A) staging.assign(size_t(A), In(0));
    for (int64_t c = 0; c < C; ++c) {
      In* row = gb + (b * C + c) * A;
      if (!stream) {
        std::fill(row, row + A, In(0));
        for (int64_t q = 0; q < pts.n; ++q) row[pts.point[q]] = In(g[c * pts.n + q]);
        continue;
      }
      for (int64_t q = 0; q < pts.n; ++q) staging[pts.point[q]] = In(g[c * pts.n + q]);
      stream_store(reinterpret_cast<char*>(row), reinterpret_cast<const char*>(staging.data()), sizeof(In) * size_t(A));
      for (int64_t q = 0; q < pts.n; ++q) staging[pts.point[q]] = In(0);
    }
    if (stream) stream_fence();
  });
}

// The gradients' buffers, pooled: the buffers autograd frees after the step come back already
// paged in (grad_pool.h).
inline std::tuple<at::Tensor, at::Tensor> gradient_buffers(const Problem& P) {
  const int64_t A = P.L.points, C = 4 * P.R;
  return {pooled_empty_strided({P.bs, C, A}, {C * A, A, 1}, P.boxes.scalar_type()),
          pooled_empty_strided({P.bs, P.nc, A}, {P.nc * A, A, 1}, P.scores.scalar_type())};
}

// The loss [box, cls, dfl] and, for the components' gradient `grad` (3 values, or null: none),
// d loss / d boxes and d loss / d scores in the same passes (empty tensors without `grad`).
template <typename In, typename S>
std::tuple<at::Tensor, at::Tensor, at::Tensor> forward(const Problem& P, Gains gains, const double* grad) {
  const int64_t bs = P.bs, nc = P.nc;
  const S norm = target_norm<S>(P);
  const Scales<S> d = grad != nullptr ? Scales<S>::of(grad, gains, norm) : Scales<S>{};
  at::Tensor grad_boxes = P.boxes.new_empty({0}), grad_scores = P.scores.new_empty({0});
  if (grad != nullptr) std::tie(grad_boxes, grad_scores) = gradient_buffers(P);
  In* gb = grad != nullptr ? grad_boxes.data_ptr<In>() : nullptr;
  In* gs = grad != nullptr ? grad_scores.data_ptr<In>() : nullptr;
  std::vector<std::array<double, 2>> images(static_cast<size_t>(bs));
  std::vector<ClassTargets<S>> targets(static_cast<size_t>(bs));
  assigned_terms<In, S>(P, images.data(), gb, d, targets);
  std::vector<double> rows(size_t(bs * nc));
  class_rows<In, S>(P, targets, rows.data(), gs, d.cls);
  const S* w = P.class_weights.data_ptr<S>();
  double box = 0.0, cls = 0.0, dist = 0.0;
  for (int64_t r = 0; r < bs * nc; ++r) cls += double(w[r % nc]) * rows[r];
  for (const auto& s : images) box += s[0], dist += s[1];
  at::Tensor out = at::empty({3}, P.boxes.options().dtype(P.target.scalar_type()));
  S* o = out.data_ptr<S>();
  o[0] = S(box / double(norm)) * S(gains.box);
  o[1] = S(cls / double(norm)) * S(gains.cls);
  o[2] = S(dist / double(norm)) * S(gains.dfl);
  return {out, grad_boxes, grad_scores};
}

template <typename In, typename S>
std::tuple<at::Tensor, at::Tensor> backward(const at::Tensor& grad, const Problem& P, Gains gains) {
  const at::Tensor g = grad.to(at::kCPU, at::kDouble).contiguous();
  TORCH_CHECK(g.numel() == 3, "grad: expected the 3 components' gradient, got shape ", grad.sizes());
  const Scales<S> d = Scales<S>::of(g.data_ptr<double>(), gains, target_norm<S>(P));
  auto [grad_boxes, grad_scores] = gradient_buffers(P);
  std::vector<ClassTargets<S>> targets(static_cast<size_t>(P.bs));
  assigned_terms<In, S>(P, nullptr, grad_boxes.data_ptr<In>(), d, targets);
  class_rows<In, S>(P, targets, nullptr, grad_scores.data_ptr<In>(), d.cls);
  return {grad_boxes, grad_scores};
}

// The forward of both forward ops, dispatched on the predictions' dtype (math in float, double for double).
std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_cpu(const Problem& P, Gains gains, const double* grad) {
  std::tuple<at::Tensor, at::Tensor, at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, P.boxes.scalar_type(), "yolo_kernels::detection_loss", [&] {
    if constexpr (std::is_same_v<scalar_t, double>)
      out = forward<scalar_t, double>(P, gains, grad);
    else
      out = forward<scalar_t, float>(P, gains, grad);
  });
  return out;
}

at::Tensor detection_loss_cpu(const at::Tensor& boxes, const at::Tensor& scores, const at::Tensor& gt_labels,
                              const at::Tensor& gt_boxes, const at::Tensor& assigned, const at::Tensor& target_scores,
                              const c10::optional<at::Tensor>& class_weights, at::IntArrayRef grids,
                              at::ArrayRef<double> strides, double box, double cls, double dfl) {
  const Problem P = check_problem(boxes, scores, gt_labels, gt_boxes, assigned, target_scores, class_weights, grids,
                                  strides);
  return std::get<0>(forward_cpu(P, {box, cls, dfl}, nullptr));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> detection_loss_with_grad_cpu(
    const at::Tensor& boxes, const at::Tensor& scores, const at::Tensor& gt_labels, const at::Tensor& gt_boxes,
    const at::Tensor& assigned, const at::Tensor& target_scores, const c10::optional<at::Tensor>& class_weights,
    at::IntArrayRef grids, at::ArrayRef<double> strides, double box, double cls, double dfl,
    at::ArrayRef<double> grad) {
  const Problem P = check_problem(boxes, scores, gt_labels, gt_boxes, assigned, target_scores, class_weights, grids,
                                  strides);
  TORCH_CHECK(grad.size() == 3, "grad: expected the 3 components' gradient, got ", grad.size(), " values");
  for (size_t k = 0; k < 3; ++k) check_finite_option(grad[k], "grad");
  return forward_cpu(P, {box, cls, dfl}, grad.data());
}

std::tuple<at::Tensor, at::Tensor> detection_loss_backward_cpu(
    const at::Tensor& grad, const at::Tensor& boxes, const at::Tensor& scores, const at::Tensor& gt_labels,
    const at::Tensor& gt_boxes, const at::Tensor& assigned, const at::Tensor& target_scores,
    const c10::optional<at::Tensor>& class_weights, at::IntArrayRef grids, at::ArrayRef<double> strides, double box,
    double cls, double dfl) {
  const Problem P = check_problem(boxes, scores, gt_labels, gt_boxes, assigned, target_scores, class_weights, grids,
                                  strides);
  std::tuple<at::Tensor, at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, boxes.scalar_type(),
                                  "yolo_kernels::detection_loss_backward", [&] {
                                    if constexpr (std::is_same_v<scalar_t, double>)
                                      out = backward<scalar_t, double>(grad, P, {box, cls, dfl});
                                    else
                                      out = backward<scalar_t, float>(grad, P, {box, cls, dfl});
                                  });
  return out;
}

}  // namespace
}  // namespace anchor_free

TORCH_LIBRARY_IMPL(yolo_kernels, CPU, m) {
  m.impl("detection_loss", &anchor_free::detection_loss_cpu);
  m.impl("detection_loss_with_grad", &anchor_free::detection_loss_with_grad_cpu);
  m.impl("detection_loss_backward", &anchor_free::detection_loss_backward_cpu);
}

}  // namespace yolo_kernels
