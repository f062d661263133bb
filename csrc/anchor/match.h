// Target matching of one layer for both anchor-based families. Plain C++17 (no ATen).
#pragma once

#include <array>
#include <cmath>
#include <cstdint>
#include <vector>

#include "anchor/box.h"

namespace yolo_kernels {

// Target matching of one layer (docs/semantics.md, docs/yolov5.md). YOLOv3: every (anchor, target)
// with wh_iou > threshold (iou_t), anchor-major. YOLOv5: every (anchor, target) whose wh ratios r
// have max(r, 1/r) < threshold (anchor_t), in five blocks (the centre cell, then the neighbour to
// the left, above, to the right, below where the target's position allows it), each anchor-major.
template <typename T>
struct Pair {
  int64_t b, a, gj, gi, cls;
  T tbox[4];
  T anch[2];
};

// A matched pair by reference: the target's row, the anchor, and the cell block (0: the target's
// own cell; YOLOv5 1-4: the neighbour to the left, above, to the right, below). Eight bytes, where
// the expanded Pair takes 64: matching thousands of targets writes little memory. pair_of expands it.
struct PairRef {
  int32_t target;
  int16_t anchor;
  int16_t block;
  PairRef() {}  // left unset: match sizes its output to the most pairs there can be without writing it
  PairRef(int64_t t, int64_t a, int b) : target(int32_t(t)), anchor(int16_t(a)), block(int16_t(b)) {}
};

// The cell offsets of the blocks: the cell is that of (gx - ox, gy - oy).
template <typename T>
constexpr T kBlockOffsets[5][2] = {{T(0), T(0)}, {T(0.5), T(0)}, {T(0), T(0.5)}, {T(-0.5), T(0)}, {T(0), T(-0.5)}};

// trunc toward zero then clamp == trunc of the clamped value, without integer overflow
template <typename T>
inline int64_t grid_index(T v, int64_t n) {
  return static_cast<int64_t>(std::min(std::max(v, T(0)), T(n - 1)));
}

// The cell (gi, gj) of block `block` of a target centred at (gx, gy) in grid units, clamped to the grid.
template <typename T>
inline std::array<int64_t, 2> block_cell(T gx, T gy, int block, int64_t ny, int64_t nx) {
  return {grid_index(gx - kBlockOffsets<T>[block][0], nx), grid_index(gy - kBlockOffsets<T>[block][1], ny)};
}

// The pair a PairRef stands for, on a grid of ny x nx cells (targets and anchors as for match).
template <typename T>
inline Pair<T> pair_of(const T* targets, const T* anchors, int64_t ny, int64_t nx, PairRef r) {
  const T* t = targets + 6 * int64_t(r.target);
  const T sx = T(nx), sy = T(ny), gx = t[2] * sx, gy = t[3] * sy;
  Pair<T> p;
  p.b = static_cast<int64_t>(t[0]);
  p.cls = static_cast<int64_t>(t[1]);
  p.a = r.anchor;
  const auto cell = block_cell(gx, gy, r.block, ny, nx);
  p.gi = cell[0], p.gj = cell[1];
  p.tbox[0] = gx - T(p.gi);  // relative to the clamped cell
  p.tbox[1] = gy - T(p.gj);
  p.tbox[2] = t[4] * sx;
  p.tbox[3] = t[5] * sy;
  p.anch[0] = anchors[2 * r.anchor];
  p.anch[1] = anchors[2 * r.anchor + 1];
  return p;
}

// targets: [nt, 6] contiguous rows (image, class, x, y, w, h), nt < 2^31; anchors: [na, 2]
// contiguous, na < 2^15. The pairs, in pair order, replace the contents of `pairs` (its memory is
// reused). matched_targets, when given ([nt], zeroed by the caller), is set to 1 for every target
// that some anchor matched. Branch-free: every candidate is written at the next free place, which
// advances when it matches (a matched-or-not branch mispredicts on half the candidates).
template <typename T>
void match(const T* targets, int64_t nt, const T* anchors, int64_t na, int64_t ny, int64_t nx, T threshold,
           Family family, std::vector<PairRef>& pairs, char* matched_targets = nullptr) {
  const T sx = T(nx), sy = T(ny);
  int64_t n = 0;
  if (family == Family::kYOLOv3) {
    pairs.resize(na * nt + 1);
    PairRef* out = pairs.data();
    for (int64_t a = 0; a < na; ++a) {
      const T aw = anchors[2 * a], ah = anchors[2 * a + 1];
      for (int64_t k = 0; k < nt; ++k) {
        const T* t = targets + 6 * k;
        const T gw = t[4] * sx, gh = t[5] * sy;
        const T inter = std::min(aw, gw) * std::min(ah, gh);
        const T iou = inter / (aw * ah + gw * gh - inter);
        const bool hit = iou > threshold;
        out[n] = PairRef(k, a, 0);
        n += hit;
        if (matched_targets) matched_targets[k] |= char(hit);
      }
    }
    pairs.resize(n);
    return;
  }
  // YOLOv5: the fit of each (anchor, target), then the five blocks in order
  std::vector<char> fits(na * nt);
  for (int64_t a = 0; a < na; ++a)
    for (int64_t k = 0; k < nt; ++k) {
      const T* t = targets + 6 * k;
      const T rw = t[4] * sx / anchors[2 * a], rh = t[5] * sy / anchors[2 * a + 1];
      const T worst = std::max(std::max(rw, T(1) / rw), std::max(rh, T(1) / rh));
      fits[a * nt + k] = worst < threshold;
      if (matched_targets && fits[a * nt + k]) matched_targets[k] = 1;
    }
  auto frac = [](T v) { return v - std::floor(v); };  // v % 1 (exact)
  pairs.resize(5 * na * nt + 1);
  PairRef* out = pairs.data();
  for (int block = 0; block < 5; ++block)
    for (int64_t a = 0; a < na; ++a)
      for (int64_t k = 0; k < nt; ++k) {
        const T* t = targets + 6 * k;
        const T gx = t[2] * sx, gy = t[3] * sy, fx = sx - gx, fy = sy - gy;
        const bool in_block = block == 0   ? true
                              : block == 1 ? (frac(gx) < T(0.5)) & (gx > T(1))
                              : block == 2 ? (frac(gy) < T(0.5)) & (gy > T(1))
                              : block == 3 ? (frac(fx) < T(0.5)) & (fx > T(1))
                                           : (frac(fy) < T(0.5)) & (fy > T(1));
        out[n] = PairRef(k, a, block);
        n += int(fits[a * nt + k] != 0) & int(in_block);
      }
  pairs.resize(n);
}

}  // namespace yolo_kernels
