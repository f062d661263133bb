// CPU kernels of the yolo_kernels ops (schemas in csrc/ops.cpp, semantics in docs/semantics.md and
// yolo_kernels/reference.py).
//
// fused_loss makes one pass over each layer's cells and writes the gradient of the loss with
// respect to p once: zeros plus the objectness term for every row, then the box and class terms
// added to the matched rows in pair order (duplicates summed). Work is split into fixed chunks
// (one (image, anchor) plane, one pair) whose partial sums are added in a fixed order, so results
// are bitwise identical across runs and thread counts. Math is float32 (float64 for float64 p);
// the gradient is written in p's dtype, with p's strides when p is dense (the permuted view of
// the head's conv output included), from a pool of reused buffers (grad_pool.h).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ExpandUtils.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include "grad_pool.h"
#include "loss_math.h"

namespace yolo_kernels {
namespace {

BoxKind parse_box_kind(c10::string_view name) {
  if (name == "giou") return BoxKind::kGIoU;
  if (name == "iou") return BoxKind::kIoU;
  if (name == "diou") return BoxKind::kDIoU;
  if (name == "ciou") return BoxKind::kCIoU;
  TORCH_CHECK(false, "box_loss: expected one of 'giou', 'iou', 'diou', 'ciou', got '", std::string(name), "'");
}

Reduction parse_reduction(c10::string_view name) {
  if (name == "mean") return Reduction::kMean;
  if (name == "sum") return Reduction::kSum;
  TORCH_CHECK(false, "reduction: expected 'mean' or 'sum', got '", std::string(name), "'");
}

at::ScalarType opmath_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

void check_cpu_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, ": expected a CPU tensor, got device ", t.device());
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), name, ": expected a floating-point tensor, got ",
              t.scalar_type());
}

void check_targets(const at::Tensor& targets) {
  check_cpu_float(targets, "targets");
  TORCH_CHECK(targets.dim() == 2 && targets.size(1) == 6,
              "targets: expected shape [nt, 6] (image, class, x, y, w, h), got ", targets.sizes());
}

void check_anchors(const at::Tensor& anchors, const std::string& name) {
  check_cpu_float(anchors, name.c_str());
  TORCH_CHECK(anchors.dim() == 2 && anchors.size(1) == 2 && anchors.size(0) >= 1, name,
              ": expected shape [na, 2] with na >= 1, got ", anchors.sizes());
}

template <typename T>
void check_finite_option(T value, const char* name) {
  TORCH_CHECK(std::isfinite(value), name, ": expected a finite number, got ", value);
}

// Every value check the loss relies on, on the targets converted to T (a few rows).
template <typename T>
void check_target_values(const T* t, int64_t nt, int64_t bs, int64_t nc) {
  for (int64_t k = 0; k < nt; ++k) {
    const T* r = t + 6 * k;
    TORCH_CHECK(r[0] >= 0 && r[0] < T(bs) && r[0] == std::trunc(r[0]), "targets[", k,
                ", 0] (image index): expected an integer in [0, ", bs, "), got ", r[0]);
    TORCH_CHECK(r[1] >= 0 && r[1] < T(nc) && r[1] == std::trunc(r[1]), "targets[", k,
                ", 1] (class): expected an integer in [0, ", nc, "), got ", r[1]);
    TORCH_CHECK(std::isfinite(r[2]) && std::isfinite(r[3]), "targets[", k,
                ", 2:4] (box centre): expected finite values, got ", r[2], ", ", r[3]);
    TORCH_CHECK(std::isfinite(r[4]) && std::isfinite(r[5]) && r[4] > 0 && r[5] > 0, "targets[", k,
                ", 4:6] (box size): expected finite values > 0, got ", r[4], ", ", r[5]);
  }
}

template <typename T>
void check_anchor_values(const T* a, int64_t na, const std::string& name) {
  for (int64_t i = 0; i < 2 * na; ++i) {
    TORCH_CHECK(std::isfinite(a[i]) && a[i] > 0, name, ": expected finite sizes > 0, got ", a[i], " at row ",
                i / 2);
  }
}

// ------------------------------------------------------------------------------------- match

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> match_cpu(const at::Tensor& targets,
                                                                     const at::Tensor& anchors, int64_t ny,
                                                                     int64_t nx, double iou_t) {
  check_targets(targets);
  check_anchors(anchors, "anchors");
  TORCH_CHECK(ny >= 1 && nx >= 1, "ny, nx: expected a non-empty grid, got ", ny, " x ", nx);
  check_finite_option(iou_t, "iou_t");
  const auto T_type = opmath_type(targets.scalar_type());
  const at::Tensor t = targets.to(T_type).contiguous();
  const at::Tensor a = anchors.to(T_type).contiguous();
  at::Tensor indices, tbox, anch, tcls;
  AT_DISPATCH_FLOATING_TYPES(T_type, "yolo_kernels::match", [&] {
    using T = scalar_t;
    const int64_t nt = t.size(0), na = a.size(0);
    for (int64_t k = 0; k < nt; ++k) {
      const T* r = t.data_ptr<T>() + 6 * k;
      TORCH_CHECK(std::isfinite(r[0]) && std::isfinite(r[1]) && std::isfinite(r[2]) && std::isfinite(r[3]) &&
                      std::isfinite(r[4]) && std::isfinite(r[5]),
                  "targets[", k, "]: expected finite values");
    }
    check_anchor_values(a.data_ptr<T>(), na, "anchors");
    const auto pairs = match_layer<T>(t.data_ptr<T>(), nt, a.data_ptr<T>(), na, ny, nx, T(iou_t));
    const int64_t P = int64_t(pairs.size());
    indices = at::empty({P, 4}, at::kLong);
    tbox = at::empty({P, 4}, T_type);
    anch = at::empty({P, 2}, T_type);
    tcls = at::empty({P}, at::kLong);
    auto* ind = indices.data_ptr<int64_t>();
    for (int64_t j = 0; j < P; ++j) {
      const auto& q = pairs[j];
      ind[4 * j] = q.b, ind[4 * j + 1] = q.a, ind[4 * j + 2] = q.gj, ind[4 * j + 3] = q.gi;
      std::copy(q.tbox, q.tbox + 4, tbox.data_ptr<T>() + 4 * j);
      std::copy(q.anch, q.anch + 2, anch.data_ptr<T>() + 2 * j);
      tcls.data_ptr<int64_t>()[j] = q.cls;
    }
  });
  return {indices, tbox, anch, tcls};
}

// ----------------------------------------------------------------------------------- box_iou

std::tuple<at::Tensor, at::Tensor> box_iou_cpu(const at::Tensor& ps, const at::Tensor& tbox, const at::Tensor& anch,
                                               c10::string_view box_loss) {
  check_cpu_float(ps, "ps");
  check_cpu_float(tbox, "tbox");
  check_cpu_float(anch, "anch");
  TORCH_CHECK(ps.dim() == 2 && ps.size(1) >= 4, "ps: expected shape [P, >= 4], got ", ps.sizes());
  const int64_t P = ps.size(0);
  TORCH_CHECK(tbox.dim() == 2 && tbox.size(0) == P && tbox.size(1) == 4, "tbox: expected shape [", P,
              ", 4], got ", tbox.sizes());
  TORCH_CHECK(anch.dim() == 2 && anch.size(0) == P && anch.size(1) == 2, "anch: expected shape [", P,
              ", 2], got ", anch.sizes());
  const BoxKind kind = parse_box_kind(box_loss);
  const auto T_type = opmath_type(ps.scalar_type());
  const at::Tensor x = ps.narrow(1, 0, 4).to(T_type).contiguous();
  const at::Tensor tb = tbox.to(T_type).contiguous(), an = anch.to(T_type).contiguous();
  at::Tensor iou = at::empty({P}, T_type), grad = at::empty({P, 4}, T_type);
  AT_DISPATCH_FLOATING_TYPES(T_type, "yolo_kernels::box_iou", [&] {
    using T = scalar_t;
    const T *xp = x.data_ptr<T>(), *tp = tb.data_ptr<T>(), *ap = an.data_ptr<T>();
    T *ip = iou.data_ptr<T>(), *gp = grad.data_ptr<T>();
    at::parallel_for(0, P, 64, [&](int64_t begin, int64_t end) {
      for (int64_t j = begin; j < end; ++j) {
        const auto box = predicted_box<T>(xp + 4 * j, ap[2 * j], ap[2 * j + 1]);
        const T* t = tp + 4 * j;
        const auto r = box_iou(box[0], box[1], box[2], box[3], t[0], t[1], t[2], t[3], kind);
        ip[j] = r.v;
        std::copy(r.d.begin(), r.d.end(), gp + 4 * j);
      }
    });
  });
  return {iou, grad};
}

// --------------------------------------------------------------------------- bce_with_logits

std::tuple<at::Tensor, at::Tensor> bce_with_logits_cpu(const at::Tensor& x, const at::Tensor& y, double pos_weight,
                                                       double gamma) {
  check_cpu_float(x, "x");
  check_cpu_float(y, "y");
  TORCH_CHECK(x.sizes() == y.sizes(), "y: expected the shape of x ", x.sizes(), ", got ", y.sizes());
  check_finite_option(pos_weight, "pos_weight");
  check_finite_option(gamma, "gamma");
  TORCH_CHECK(pos_weight > 0 && gamma >= 0, "pos_weight, gamma: expected pos_weight > 0 and gamma >= 0, got ",
              pos_weight, ", ", gamma);
  const auto T_type = opmath_type(x.scalar_type());
  const at::Tensor xc = x.to(T_type).contiguous(), yc = y.to(T_type).contiguous();
  at::Tensor loss = at::empty(x.sizes(), T_type), grad = at::empty(x.sizes(), T_type);
  AT_DISPATCH_FLOATING_TYPES(T_type, "yolo_kernels::bce_with_logits", [&] {
    using T = scalar_t;
    const T *xp = xc.data_ptr<T>(), *yp = yc.data_ptr<T>();
    T *lp = loss.data_ptr<T>(), *gp = grad.data_ptr<T>();
    at::parallel_for(0, xc.numel(), 4096, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const auto r = bce_with_logits<T>(xp[i], yp[i], T(pos_weight), T(gamma));
        lp[i] = r.loss;
        gp[i] = r.grad;
      }
    });
  });
  return {loss, grad};
}

// -------------------------------------------------------------------------------- fused_loss

struct Options {
  double gr, giou, cls, cls_pw, obj, obj_pw, iou_t, fl_gamma, label_smoothing;
  BoxKind box;
  Reduction reduction;
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
  std::vector<T> iou;            // [P]
  std::vector<T> diou;           // [P, 4]: d iou / d logits 0..3
  std::vector<double> cls_loss;  // [P]: the pair's summed class BCE
  std::vector<T> cls_grad;       // [P, nc]: d BCE / d class logits
  std::vector<std::pair<int64_t, T>> tobj;  // (cell, target), sorted by cell, last pair per cell
  std::vector<std::pair<int64_t, int64_t>> by_cell;  // (cell, pair), sorted by cell, pair order kept
  T box_scale = 0, cls_scale = 0;                    // d loss / d (1 - iou), d loss / d class BCE

  // The gradient of each (image, anchor) plane is one contiguous block of whole rows (p contiguous).
  bool block_rows() const { return g != nullptr && gs[4] == 1 && gs[3] == no && gs[2] == nx * no; }
  int64_t row_offset(const Pair<T>& q) const { return q.b * ps[0] + q.a * ps[1] + q.gj * ps[2] + q.gi * ps[3]; }
  int64_t grad_row_offset(const Pair<T>& q) const {
    return q.b * gs[0] + q.a * gs[1] + q.gj * gs[2] + q.gi * gs[3];
  }
};

template <typename scalar_t, typename T>
void pair_terms(Layer<scalar_t, T>& L, const Options& o, int64_t nc) {
  const int64_t P = int64_t(L.pairs.size());
  L.iou.resize(P);
  L.diou.resize(4 * P);
  L.cls_loss.assign(P, 0.0);
  if (nc > 1) L.cls_grad.resize(P * nc);
  const T cp = T(1.0 - 0.5 * o.label_smoothing), cn = T(0.5 * o.label_smoothing);
  at::parallel_for(0, P, 16, [&](int64_t begin, int64_t end) {
    std::vector<T> row(L.no), loss(nc);
    for (int64_t j = begin; j < end; ++j) {
      const auto& q = L.pairs[j];
      const scalar_t* src = L.p + L.row_offset(q);
      for (int64_t c = 0; c < L.no; ++c) row[c] = T(src[c * L.ps[4]]);
      const auto box = predicted_box<T>(row.data(), q.anch[0], q.anch[1]);
      const auto r = box_iou(box[0], box[1], box[2], box[3], q.tbox[0], q.tbox[1], q.tbox[2], q.tbox[3], o.box);
      L.iou[j] = r.v;
      std::copy(r.d.begin(), r.d.end(), L.diou.begin() + 4 * j);
      if (nc > 1) {
        T* grad = L.cls_grad.data() + j * nc;
        bce_const_target_row<T>(row.data() + 5, loss.data(), grad, nc, cn, T(o.cls_pw), T(o.fl_gamma));
        const auto hit = bce_with_logits<T>(row[5 + q.cls], cp, T(o.cls_pw), T(o.fl_gamma));
        loss[q.cls] = hit.loss;
        grad[q.cls] = hit.grad;
        double sum = 0.0;
        for (int64_t c = 0; c < nc; ++c) sum += double(loss[c]);
        L.cls_loss[j] = sum;
      }
    }
  });
  // Objectness targets: the last pair on each cell wins (stable sort keeps pair order per cell).
  std::vector<std::pair<int64_t, T>> cells(P);
  for (int64_t j = 0; j < P; ++j) {
    const auto& q = L.pairs[j];
    const T score = T(1.0 - o.gr) + T(o.gr) * std::max(L.iou[j], T(0));
    cells[j] = {((q.b * L.na + q.a) * L.ny + q.gj) * L.nx + q.gi, score};
  }
  L.by_cell.resize(P);
  for (int64_t j = 0; j < P; ++j) L.by_cell[j] = {cells[j].first, j};
  std::stable_sort(L.by_cell.begin(), L.by_cell.end(), [](const auto& x, const auto& y) { return x.first < y.first; });
  L.tobj.clear();
  for (int64_t k = 0; k < P; ++k) {
    if (k + 1 < P && L.by_cell[k + 1].first == L.by_cell[k].first) continue;
    L.tobj.push_back(cells[L.by_cell[k].second]);
  }
}

// Add the box and class terms of pair j to its gradient row (element stride `step`).
template <typename scalar_t, typename T>
inline void add_pair_terms(const Layer<scalar_t, T>& L, int64_t j, int64_t nc, scalar_t* row, int64_t step) {
  for (int k = 0; k < 4; ++k) {
    scalar_t& gk = row[k * step];
    gk = scalar_t(T(gk) - L.box_scale * L.diou[4 * j + k]);
  }
  for (int64_t c = 0; nc > 1 && c < nc; ++c) {
    scalar_t& gc = row[(5 + c) * step];
    gc = scalar_t(T(gc) + L.cls_scale * L.cls_grad[j * nc + c]);
  }
}

// Stores that bypass the cache (SSE2 non-temporal) where the destination is 16-byte aligned: the
// gradient is written once and not read back soon, and ordinary stores would first read every
// line from memory (doubling the traffic of the pass that dominates the loss's cost).
inline void stream_store(char* dst, const char* src, size_t n) {
#if defined(__SSE2__)
  const size_t head = std::min(n, size_t((16 - (reinterpret_cast<uintptr_t>(dst) & 15)) & 15));
  std::memcpy(dst, src, head);
  dst += head, src += head, n -= head;
  for (; n >= 16; n -= 16, dst += 16, src += 16)
    _mm_stream_si128(reinterpret_cast<__m128i*>(dst), _mm_loadu_si128(reinterpret_cast<const __m128i*>(src)));
#endif
  std::memcpy(dst, src, n);
}

inline void stream_zero(char* dst, size_t n) {
#if defined(__SSE2__)
  const size_t head = std::min(n, size_t((16 - (reinterpret_cast<uintptr_t>(dst) & 15)) & 15));
  std::memset(dst, 0, head);
  dst += head, n -= head;
  for (; n >= 16; n -= 16, dst += 16) _mm_stream_si128(reinterpret_cast<__m128i*>(dst), _mm_setzero_si128());
#endif
  std::memset(dst, 0, n);
}

inline void stream_fence() {
#if defined(__SSE2__)
  _mm_sfence();
#endif
}

// Zero a dense tensor's memory in parallel chunks.
void stream_zero_tensor(const at::Tensor& t) {
  char* base = static_cast<char*>(t.data_ptr());
  const int64_t bytes = t.numel() * t.element_size(), chunk = 1 << 16;
  at::parallel_for(0, (bytes + chunk - 1) / chunk, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) stream_zero(base + c * chunk, size_t(std::min(chunk, bytes - c * chunk)));
    stream_fence();
  });
}

// Objectness over every cell, one (image, anchor) plane per task. Returns the sum of the element
// losses (one partial per plane, added in order). Per plane: gather the objectness logits,
// evaluate the vectorised zero-target BCE, recompute the few matched cells with their target;
// then, with a gradient, write the plane's rows (zeros and the objectness term): streamed from a
// cache-resident staging block when the plane is one contiguous block of rows, else into the
// pre-zeroed gradient.
template <typename scalar_t, typename T>
double objectness_pass(const Layer<scalar_t, T>& L, const Options& o, T grad_scale, int64_t nc) {
  const int64_t planes = L.bs * L.na, cells = L.ny * L.nx, no = L.no;
  const bool block_rows = L.block_rows();
  std::vector<double> partial(planes, 0.0);
  at::parallel_for(0, planes, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> xs(cells), loss(cells), grad(cells);
    const int64_t staging_rows = std::max<int64_t>(1, 4096 / no);
    std::vector<scalar_t> staging(block_rows ? staging_rows * no : 0, scalar_t(0));
    for (int64_t plane = begin; plane < end; ++plane) {
      const int64_t b = plane / L.na, a = plane % L.na;
      const scalar_t* pp = L.p + b * L.ps[0] + a * L.ps[1] + 4 * L.ps[4];
      for (int64_t y = 0; y < L.ny; ++y) {
        const scalar_t* px = pp + y * L.ps[2];
        T* xy = xs.data() + y * L.nx;
        for (int64_t x = 0; x < L.nx; ++x) {
          __builtin_prefetch(px + (x + 16) * L.ps[3]);
          xy[x] = T(px[x * L.ps[3]]);
        }
      }
      bce_const_target_row<T>(xs.data(), loss.data(), grad.data(), cells, T(0), T(o.obj_pw), T(o.fl_gamma));
      auto next = std::lower_bound(L.tobj.begin(), L.tobj.end(), plane * cells,
                                   [](const auto& e, int64_t cell) { return e.first < cell; });
      for (; next != L.tobj.end() && next->first < (plane + 1) * cells; ++next) {
        const int64_t k = next->first - plane * cells;
        const auto lg = bce_with_logits<T>(xs[k], next->second, T(o.obj_pw), T(o.fl_gamma));
        loss[k] = lg.loss;
        grad[k] = lg.grad;
      }
      double sum = 0.0;
      for (int64_t k = 0; k < cells; ++k) sum += double(loss[k]);
      partial[plane] = sum;
      if (!L.g) continue;

      scalar_t* gp = L.g + b * L.gs[0] + a * L.gs[1];
      if (block_rows) {
        // The matched rows get their box and class terms in the staging block, in pair order.
        auto pair = std::lower_bound(L.by_cell.begin(), L.by_cell.end(), plane * cells,
                                     [](const auto& e, int64_t cell) { return e.first < cell; });
        for (int64_t k0 = 0; k0 < cells; k0 += staging_rows) {
          const int64_t rows = std::min(staging_rows, cells - k0);
          for (int64_t r = 0; r < rows; ++r) staging[r * no + 4] = scalar_t(grad[k0 + r] * grad_scale);
          const auto first = pair;
          for (; pair != L.by_cell.end() && pair->first < plane * cells + k0 + rows; ++pair)
            add_pair_terms(L, pair->second, nc, staging.data() + (pair->first - plane * cells - k0) * no, 1);
          stream_store(reinterpret_cast<char*>(gp + k0 * no), reinterpret_cast<const char*>(staging.data()),
                       sizeof(scalar_t) * rows * no);
          for (int64_t r = 0; r < rows; ++r) staging[r * no + 4] = scalar_t(0);
          for (auto q = first; q != pair; ++q)
            std::memset(static_cast<void*>(staging.data() + (q->first - plane * cells - k0) * no), 0,
                        sizeof(scalar_t) * no);
        }
      } else {
        scalar_t* obj = gp + 4 * L.gs[4];
        for (int64_t y = 0; y < L.ny; ++y)
          for (int64_t x = 0; x < L.nx; ++x)
            obj[y * L.gs[2] + x * L.gs[3]] = scalar_t(grad[y * L.nx + x] * grad_scale);
      }
    }
    stream_fence();
  });
  double total = 0.0;
  for (double s : partial) total += s;
  return total;
}

template <typename scalar_t>
std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>> fused_loss_impl(const std::vector<at::Tensor>& p,
                                                                const at::Tensor& targets,
                                                                const std::vector<at::Tensor>& anchors,
                                                                const Options& o, bool compute_grad) {
  using T = at::opmath_type<scalar_t>;  // float for half/bfloat16/float, double for double
  static_assert(std::is_same<T, float>::value || std::is_same<T, double>::value, "opmath");
  const auto T_type = c10::CppTypeToScalarType<T>::value;
  const int64_t nl = int64_t(p.size()), bs = p[0].size(0), no = p[0].size(4), nc = no - 5;
  const at::Tensor t = targets.to(T_type).contiguous();
  const int64_t nt = t.size(0);
  check_target_values(t.data_ptr<T>(), nt, bs, nc);

  std::vector<at::Tensor> grads(nl);
  std::vector<Layer<scalar_t, T>> layers(nl);
  int64_t n_total = 0;
  for (int64_t i = 0; i < nl; ++i) {
    auto& L = layers[i];
    L.p = p[i].data_ptr<scalar_t>();
    for (int d = 0; d < 5; ++d) L.ps[d] = p[i].stride(d);
    L.bs = bs, L.na = p[i].size(1), L.ny = p[i].size(2), L.nx = p[i].size(3), L.no = no;
    const at::Tensor a = anchors[i].to(T_type).contiguous();
    check_anchor_values(a.data_ptr<T>(), L.na, "anchors[" + std::to_string(i) + "]");
    L.pairs = match_layer<T>(t.data_ptr<T>(), nt, a.data_ptr<T>(), L.na, L.ny, L.nx, T(o.iou_t));
    n_total += int64_t(L.pairs.size());
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

  const bool sum_red = o.reduction == Reduction::kSum;
  double lbox = 0.0, lobj = 0.0, lcls = 0.0;
  for (int64_t i = 0; i < nl; ++i) {
    auto& L = layers[i];
    const int64_t P = int64_t(L.pairs.size());
    pair_terms(L, o, nc);
    if (P > 0) {
      const double box_scale = sum_red ? o.giou * 3.0 / double(n_total) : o.giou / double(P);
      const double cls_scale = sum_red ? o.cls * 3.0 / double(n_total * nc) : o.cls / double(P * nc);
      L.box_scale = T(box_scale), L.cls_scale = T(cls_scale);
      double box_sum = 0.0, cls_sum = 0.0;
      for (int64_t j = 0; j < P; ++j) {
        box_sum += double(T(1) - L.iou[j]);
        cls_sum += L.cls_loss[j];
      }
      lbox += box_scale * box_sum;
      if (nc > 1) lcls += cls_scale * cls_sum;
    }
    const double n_cells = double(L.bs * L.na * L.ny * L.nx);
    const double obj_scale = sum_red ? o.obj * 3.0 / double(bs) : o.obj / n_cells;
    lobj += obj_scale * objectness_pass(L, o, T(obj_scale), nc);
    if (L.g && !L.block_rows()) {
      // Other layouts: the box and class terms go to the matched rows after the pass, in pair order.
      for (int64_t j = 0; j < P; ++j) add_pair_terms(L, j, nc, L.g + L.grad_row_offset(L.pairs[j]), L.gs[4]);
    }
  }
  at::Tensor items = at::empty({4}, T_type);
  T* it = items.data_ptr<T>();
  it[0] = T(lbox), it[1] = T(lobj), it[2] = T(lcls);
  it[3] = it[0] + it[1] + it[2];
  at::Tensor loss = at::empty({1}, T_type);
  loss.data_ptr<T>()[0] = it[3];
  return {loss, items, grads};
}

std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>> fused_loss_cpu(
    at::TensorList p_list, const at::Tensor& targets, at::TensorList anchor_list, double gr, double giou,
    double cls, double cls_pw, double obj, double obj_pw, double iou_t, double fl_gamma, double label_smoothing,
    c10::string_view box_loss, c10::string_view reduction, bool compute_grad) {
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
  const double values[] = {gr, giou, cls, cls_pw, obj, obj_pw, iou_t, fl_gamma, label_smoothing};
  const char* names[] = {"gr", "giou", "cls", "cls_pw", "obj", "obj_pw", "iou_t", "fl_gamma", "label_smoothing"};
  for (int k = 0; k < 9; ++k) check_finite_option(values[k], names[k]);
  TORCH_CHECK(cls_pw > 0 && obj_pw > 0, "cls_pw, obj_pw: expected positive pos_weights, got ", cls_pw, ", ", obj_pw);
  TORCH_CHECK(fl_gamma >= 0, "fl_gamma: expected >= 0, got ", fl_gamma);
  const Options o{gr,     giou,     cls,           cls_pw, obj, obj_pw, iou_t, fl_gamma, label_smoothing,
                  parse_box_kind(box_loss), parse_reduction(reduction)};

  std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p[0].scalar_type(), "yolo_kernels::fused_loss", [&] {
    out = fused_loss_impl<scalar_t>(p, targets, anchors, o, compute_grad);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(yolo_kernels, CPU, m) {
  m.impl("match", &match_cpu);
  m.impl("box_iou", &box_iou_cpu);
  m.impl("bce_with_logits", &bce_with_logits_cpu);
  m.impl("fused_loss", &fused_loss_cpu);
}

}  // namespace yolo_kernels
