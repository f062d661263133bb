// The fused anchor loss on the CPU: its pairs grouped by (image, anchor) plane, and within a plane
// by cell (counting and radix sorts), in each thread's reused working set.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu/anchor/params.h"

namespace yolo_kernels {
namespace anchor_fused {

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

}  // namespace anchor_fused
}  // namespace yolo_kernels
