// The row loops of the CPU kernels (math/bce.h, anchor/box.h, anchor_free/detection_math.h),
// compiled once in this file for AVX-512, AVX2 and the baseline, the version picked at load time by the CPU (GCC/Clang function multi-versioning on
// x86-64 ELF: 16, 8 or 4 lanes). `flatten` compiles the whole body into each clone. Results are
// bitwise identical on every path (tests/test_isa_identity.py): the loops are element-wise or
// use fixed lanes, and -ffp-contract=off keeps the compiler from fusing multiplies and adds.
#include "anchor/box.h"
#include "anchor_free/detection_math.h"
#include "math/bce.h"

#if defined(__x86_64__) && defined(__ELF__) && defined(__has_attribute) && !defined(YOLO_KERNELS_NO_ISA_CLONES)
#if __has_attribute(target_clones)
#define YOLO_KERNELS_ISA_CLONES __attribute__((target_clones("avx512f", "arch=haswell", "default")))
#endif
#endif
#ifndef YOLO_KERNELS_ISA_CLONES
#define YOLO_KERNELS_ISA_CLONES
#endif

namespace yolo_kernels {

YOLO_KERNELS_ISA_CLONES __attribute__((noinline, flatten)) void bce_row(const float* x, float* loss, float* grad,
                                                                       int64_t n, float y, float w, float gamma) {
  bce_const_target_row<float>(x, loss, grad, n, y, w, gamma);
}

YOLO_KERNELS_ISA_CLONES __attribute__((noinline, flatten)) void bce_rows_summed(const float* x, float* grad,
                                                                               int64_t rows, int64_t n, float y,
                                                                               float w, double* row_loss,
                                                                               float* scratch) {
  bce_const_target_rows_summed(x, grad, rows, n, y, w, row_loss, scratch);
}

YOLO_KERNELS_ISA_CLONES __attribute__((noinline, flatten)) void bce_row(const float* x, const float* y, float* loss,
                                                                       float* grad, int64_t n, float w, float gamma) {
  bce_target_row<float>(x, y, loss, grad, n, w, gamma);
}

YOLO_KERNELS_ISA_CLONES __attribute__((noinline, flatten)) void box_iou_rows(int64_t n, const BoxRows& rows,
                                                                            BoxKind kind, Family family) {
  if (family == Family::kYOLOv5) return box_iou_rows_family<Family::kYOLOv5>(n, rows, kind);
  box_iou_rows_family<Family::kYOLOv3>(n, rows, kind);
}

namespace anchor_free {

YOLO_KERNELS_ISA_CLONES __attribute__((noinline, flatten)) double softplus_row_sum(const float* x, int64_t n) {
  return softplus_row_sum_products<false>(x, n);
}

YOLO_KERNELS_ISA_CLONES __attribute__((noinline, flatten)) void sigmoid_row_scaled(const float* x, float* out,
                                                                                  int64_t n, float scale) {
  sigmoid_row_scaled_generic(x, out, n, scale);
}

YOLO_KERNELS_ISA_CLONES __attribute__((noinline, flatten)) double softplus_sigmoid_row(const float* x, int64_t n,
                                                                                      float* out, float scale) {
  return softplus_row_sum_products<true>(x, n, out, scale);
}

YOLO_KERNELS_ISA_CLONES __attribute__((noinline, flatten)) void decode_block_f32(const float* x, int64_t row_stride,
                                                                                int64_t reg_max, int64_t n,
                                                                                int64_t block, float* dist,
                                                                                float* log_norm,
                                                                                const float* ahead,
                                                                                int64_t ahead_n) {
  decode_block<float, float>(x, row_stride, reg_max, n, block, dist, log_norm, ahead, ahead_n);
}

YOLO_KERNELS_ISA_CLONES __attribute__((noinline, flatten)) void overlap_row(const float* g, const float* x1,
                                                                           const float* y1, const float* x2,
                                                                           const float* y2, const float* angle,
                                                                           int64_t n, float* out) {
  overlap_row_generic(g, x1, y1, x2, y2, angle, n, out);
}

YOLO_KERNELS_ISA_CLONES __attribute__((noinline, flatten)) void overlap_gt_row(const float* gx1, const float* gy1,
                                                                              const float* gx2, const float* gy2,
                                                                              const float* g_angle, int64_t n,
                                                                              const float* q, float* out) {
  overlap_gt_row_generic(gx1, gy1, gx2, gy2, g_angle, n, q, out);
}

YOLO_KERNELS_ISA_CLONES __attribute__((noinline, flatten)) void score_power_approx_row(const float* x, int64_t n,
                                                                                      float alpha, float* out) {
  score_power_approx_row_generic(x, n, alpha, out);
}

YOLO_KERNELS_ISA_CLONES __attribute__((noinline, flatten)) void box_angle_row(const float* x1, const float* y1,
                                                                             const float* x2, const float* y2,
                                                                             int64_t n, float* out) {
  box_angle_row_generic(x1, y1, x2, y2, n, out);
}

YOLO_KERNELS_ISA_CLONES __attribute__((noinline, flatten)) void bin_gradient_row(
    const float* x, const float* log_norm, const float* dist, const float* t, const float* d_ciou,
    const int32_t* left, const float* wl, const float* wr, int64_t n, int32_t j, float d_box, float d_dist,
    float* out) {
  bin_gradient_row_generic(x, log_norm, dist, t, d_ciou, left, wl, wr, n, j, d_box, d_dist, out);
}

}  // namespace anchor_free

}  // namespace yolo_kernels
