// CPU kernels of yolo_kernels::detection_loss and detection_loss_backward (schemas in
// yolo_kernels/library.py): the anchor-free family's loss given an assignment (tal_assign's), and
// its gradient, computed in backward already scaled by grad_output (the gradient is written once;
// calls without backward, as validation, write none).
//
// The class term is dense: BCE(x, t) = softplus(x) - t x, with t zero but at the assigned points'
// classes, so the forward pass sums softplus over every logit (one read) and subtracts t x at the
// assigned points; backward writes scale * sigmoid(x) over every logit and fixes up those points.
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
#include "common/grad_pool.h"

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
  for (int64_t i = 0; i < P.bs * P.L.points; ++i)
    TORCH_CHECK(a[i] >= -1 && a[i] < P.m, "assigned: expected box indices in [-1, ", P.m, "), got ", a[i],
                " at point ", i);
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

  template <typename In>
  void build(const Problem& P, int64_t b) {
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
    for (int64_t c = 0; c < C; ++c)
      for (int64_t q = 0; q < n; ++q) x[c * n + q] = S(xb[c * A + point[q]]);
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

template <typename In, typename S>
at::Tensor forward(const Problem& P, Gains gains) {
  const int64_t A = P.L.points, bs = P.bs, nc = P.nc;
  const S* w = P.class_weights.data_ptr<S>();
  const In* xs = P.scores.data_ptr<In>();
  // the dense class term: softplus summed per row (rows in a fixed order: deterministic)
  std::vector<double> rows(size_t(bs * nc));
  at::parallel_for(0, bs * nc, 1, [&](int64_t begin, int64_t end) {
    std::vector<S> buf;
    for (int64_t r = begin; r < end; ++r) rows[r] = softplus_row_sum(row_as<S>(xs + r * A, A, buf), A);
  });
  // the assigned points: - t x of the class term, the box and distance terms weighted by t
  std::vector<std::array<double, 3>> images(static_cast<size_t>(bs));
  const int64_t* labels = P.gt_labels.data_ptr<int64_t>();
  at::parallel_for(0, bs, 1, [&](int64_t begin, int64_t end) {
    AssignedPoints<S> pts;
    for (int64_t b = begin; b < end; ++b) {
      pts.template build<In>(P, b);
      std::array<double, 3> sum = {0.0, 0.0, 0.0};
      for (int64_t q = 0; q < pts.n; ++q) {
        const S t = pts.t[q];
        const int64_t label = std::max<int64_t>(labels[b * P.m + pts.box[q]], 0);
        sum[1] -= double(w[label] * S(xs[(b * nc + label) * A + pts.point[q]]) * t);
        sum[0] += double(pts.box_term[q] * t);
        sum[2] += double(pts.dist_term[q] * t);
      }
      images[b] = sum;
    }
  });
  double box = 0.0, cls = 0.0, dist = 0.0;
  for (int64_t r = 0; r < bs * nc; ++r) cls += double(w[r % nc]) * rows[r];
  for (const auto& s : images) box += s[0], cls += s[1], dist += s[2];
  const double norm = double(target_norm<S>(P));
  at::Tensor out = at::empty({3}, P.boxes.options().dtype(P.target.scalar_type()));
  S* o = out.data_ptr<S>();
  o[0] = S(box / norm) * S(gains.box);
  o[1] = S(cls / norm) * S(gains.cls);
  o[2] = S(dist / norm) * S(gains.dfl);
  return out;
}

template <typename In, typename S>
std::tuple<at::Tensor, at::Tensor> backward(const at::Tensor& grad, const Problem& P, Gains gains) {
  const int64_t A = P.L.points, bs = P.bs, nc = P.nc, C = 4 * P.R;
  const at::Tensor g = grad.to(at::kCPU, at::kDouble).contiguous();
  TORCH_CHECK(g.numel() == 3, "grad: expected the 3 components' gradient, got shape ", grad.sizes());
  const double* gd = g.data_ptr<double>();
  const S norm = target_norm<S>(P);
  const S d_box = S(gd[0] * gains.box) / norm, d_cls = S(gd[1] * gains.cls) / norm, d_dist = S(gd[2] * gains.dfl) / norm;
  const S* w = P.class_weights.data_ptr<S>();
  const In* xs = P.scores.data_ptr<In>();
  // pooled: the buffers autograd frees after the step come back already paged in (grad_pool.h)
  at::Tensor grad_scores = pooled_empty_strided({bs, nc, A}, {nc * A, A, 1}, P.scores.scalar_type());
  In* gs = grad_scores.data_ptr<In>();
  at::parallel_for(0, bs * nc, 1, [&](int64_t begin, int64_t end) {
    std::vector<S> buf, out;
    for (int64_t r = begin; r < end; ++r) {
      const S scale = d_cls * w[r % nc];
      if constexpr (std::is_same_v<S, In>) {
        sigmoid_row_scaled(xs + r * A, gs + r * A, A, scale);
      } else {
        out.resize(size_t(A));
        sigmoid_row_scaled(row_as<S>(xs + r * A, A, buf), out.data(), A, scale);
        for (int64_t i = 0; i < A; ++i) gs[r * A + i] = In(out[i]);
      }
    }
  });
  at::Tensor grad_boxes = pooled_empty_strided({bs, C, A}, {C * A, A, 1}, P.boxes.scalar_type());
  In* gb = grad_boxes.data_ptr<In>();
  const int64_t* labels = P.gt_labels.data_ptr<int64_t>();
  at::parallel_for(0, bs, 1, [&](int64_t begin, int64_t end) {
    AssignedPoints<S> pts;
    std::vector<S> g;
    for (int64_t b = begin; b < end; ++b) {
      pts.template build<In>(P, b);
      pts.gradient(P.R, d_box, d_dist, g);
      for (int64_t c = 0; c < C; ++c) {  // each row: zero but at the assigned points
        In* row = gb + (b * C + c) * A;
        std::fill(row, row + A, In(0));
        for (int64_t q = 0; q < pts.n; ++q) row[pts.point[q]] = In(g[c * pts.n + q]);
      }
      for (int64_t q = 0; q < pts.n; ++q) {  // the class term at the assigned class: (sigmoid - t)
        const int64_t label = std::max<int64_t>(labels[b * P.m + pts.box[q]], 0);
        const int64_t at_ = (b * nc + label) * A + pts.point[q];
        const S x = S(xs[at_]);
        S sig;
        sigmoid_row_scaled(&x, &sig, 1, S(1));
        gs[at_] = In(d_cls * w[label] * (sig - pts.t[q]));
      }
    }
  });
  return {grad_boxes, grad_scores};
}

at::Tensor detection_loss_cpu(const at::Tensor& boxes, const at::Tensor& scores, const at::Tensor& gt_labels,
                              const at::Tensor& gt_boxes, const at::Tensor& assigned, const at::Tensor& target_scores,
                              const c10::optional<at::Tensor>& class_weights, at::IntArrayRef grids,
                              at::ArrayRef<double> strides, double box, double cls, double dfl) {
  const Problem P = check_problem(boxes, scores, gt_labels, gt_boxes, assigned, target_scores, class_weights, grids,
                                  strides);
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, boxes.scalar_type(), "yolo_kernels::detection_loss", [&] {
    if constexpr (std::is_same_v<scalar_t, double>)
      out = forward<scalar_t, double>(P, {box, cls, dfl});
    else
      out = forward<scalar_t, float>(P, {box, cls, dfl});
  });
  return out;
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
  m.impl("detection_loss_backward", &anchor_free::detection_loss_backward_cpu);
}

}  // namespace yolo_kernels
