"""The C++ row functions give bitwise identical results on every instruction set the extension
clones them for (AVX-512, AVX2 with FMA (Haswell's set) and the x86-64 baseline, whose fused
multiply-adds are the C library's; picked at load time by the CPU), as the
docs claim: a small program built with the extension's own compiler flags runs each row function
compiled for each target on the same inputs, and the outputs must agree bit for bit."""

import os
import platform
import shutil
import subprocess
import sys

import pytest

import yolo_kernels as yk
from yolo_kernels import library

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.skipif(
    not (sys.platform.startswith("linux") and platform.machine() in ("x86_64", "AMD64")) or library.LOAD_ERROR,
    reason="x86-64 Linux with the C++ extension built (the only place the ISA clones exist)",
)

PROGRAM = r"""
#include <cstdio>
#include <cstring>
#include <vector>
#include "anchor/box.h"
#include "anchor_free/detection_math.h"
#include "math/bce.h"
using namespace yolo_kernels;

// Every row function the extension clones per instruction set, over one set of inputs; the
// results are printed as the bits of each float (or double).
static void print_bits(const char* what, const std::vector<float>& v) {
  std::printf("%s", what);
  for (float f : v) {
    unsigned u;
    std::memcpy(&u, &f, sizeof(u));
    std::printf(" %08x", u);
  }
  std::printf("\n");
}
static void print_bits(const char* what, const std::vector<double>& v) {
  std::printf("%s", what);
  for (double d : v) {
    unsigned long long u;
    std::memcpy(&u, &d, sizeof(u));
    std::printf(" %016llx", u);
  }
  std::printf("\n");
}

#define ROWS_BODY                                                                                     \
  const int64_t n = int64_t(x.size());                                                                \
  std::vector<float> loss(n), grad(n);                                                                \
  const float params[4][3] = {{0.0f, 1.0f, 0.0f}, {0.05f, 2.5f, 0.0f}, {0.0f, 1.0f, 1.5f}, {0.9f, 1.0f, 1.5f}}; \
  for (const auto& q : params) {                                                                      \
    bce_const_target_row<float>(x.data(), loss.data(), grad.data(), n, q[0], q[1], q[2]);             \
    print_bits("const_loss", loss), print_bits("const_grad", grad);                                   \
    bce_target_row<float>(x.data(), y.data(), loss.data(), grad.data(), n, q[1], q[2]);               \
    print_bits("target_loss", loss), print_bits("target_grad", grad);                                 \
    if (q[2] != 0.0f) continue; /* no focal factor: the summed rows */                                \
    for (const int64_t cols : {int64_t(77), int64_t(337)}) { /* a tail; several products a row */     \
      const int64_t rows = n / cols;                                                                  \
      std::vector<float> g(rows * cols), scratch(bce_rows_summed_scratch(rows, cols));                \
      std::vector<double> row_loss(rows);                                                             \
      bce_const_target_rows_summed(x.data(), g.data(), rows, cols, q[0], q[1], row_loss.data(),       \
                                   scratch.data());                                                   \
      print_bits("summed_grad", g), print_bits("summed_loss", row_loss);                              \
    }                                                                                                 \
  }                                                                                                   \
  print_bits("softplus_sum", std::vector<double>{anchor_free::softplus_row_sum_products<false>(x.data(), n)}); \
  std::vector<float> sig(n), fused_sig(n);                                                            \
  anchor_free::sigmoid_row_scaled_generic<float>(x.data(), sig.data(), n, 0.37f);                      \
  print_bits("sigmoid_scaled", sig);                                                                  \
  const double fused_sum = anchor_free::softplus_row_sum_products<true>(x.data(), n, fused_sig.data(), 0.37f); \
  print_bits("softplus_sigmoid_sum", std::vector<double>{fused_sum});                                 \
  print_bits("softplus_sigmoid_grad", fused_sig);                                                     \
  { /* the anchor-free box decode (4 sides x 16 bins of 77 points) and a bin's gradient row */        \
    const int64_t np = 77;                                                                            \
    std::vector<float> dist(4 * np), lnorm(4 * np), t(np), dc(np), wl(np), wr(np), gr(np);             \
    std::vector<int32_t> left(np);                                                                    \
    std::vector<float> xb(64 * np);                                                                   \
    for (int64_t i = 0; i < 64 * np; ++i) xb[i] = x[i % n] * 0.3f;                                    \
    anchor_free::decode_block<float, float>(xb.data(), np, 16, np, np, dist.data(), lnorm.data());    \
    print_bits("decode_dist", dist), print_bits("decode_lognorm", lnorm);                             \
    for (int64_t q = 0; q < np; ++q)                                                                  \
      t[q] = y[q], dc[q] = y[q + 1] - 0.5f, left[q] = int32_t(q % 15), wl[q] = y[q + 2], wr[q] = 1.0f - y[q + 2]; \
    anchor_free::bin_gradient_row_generic<float>(xb.data(), lnorm.data(), dist.data(), t.data(), dc.data(), \
                                                 left.data(), wl.data(), wr.data(), np, 3, 0.7f, 1.3f, gr.data()); \
    print_bits("bin_gradient", gr);                                                                   \
  }                                                                                                   \
  { /* the assigner's overlaps (CIoU from the boxes and their angles) of a gt box against predicted \
       boxes, of gt boxes against one predicted box, and its approximate score powers */             \
    std::vector<float> px1(n), py1(n), px2(n), py2(n), pa(n), ov(n), sp(n);                           \
    for (int64_t i = 0; i < n; ++i)                                                                   \
      px1[i] = 100.0f + 20.0f * b[0][i], py1[i] = 100.0f + 20.0f * b[1][i],                           \
      px2[i] = px1[i] + 10.0f * b[8][i], py2[i] = py1[i] + 10.0f * b[9][i],                           \
      pa[i] = anchor_free::box_angle(px1[i], py1[i], px2[i], py2[i]);                                  \
    anchor_free::box_angle_row_generic(px1.data(), py1.data(), px2.data(), py2.data(), n, sp.data());     \
    print_bits("box_angle", sp); /* the row of angles (the assigner's decode) and one at a time */   \
    print_bits("box_angle_each", pa);                                                                 \
    const float g[5] = {90.0f, 95.0f, 160.0f, 170.0f, anchor_free::box_angle(90.0f, 95.0f, 160.0f, 170.0f)}; \
    anchor_free::overlap_row_generic<float>(g, px1.data(), py1.data(), px2.data(), py2.data(), pa.data(), n, \
                                            ov.data());                                               \
    print_bits("assigner_overlap", ov);                                                               \
    for (int64_t i = 0; i < n; ++i) /* the per-pair formula, its arctangents taken in place */        \
      ov[i] = anchor_free::clamp_nonnegative(anchor_free::ciou_xyxy<float, float>(                    \
          g[0], g[1], g[2], g[3], px1[i], py1[i], px2[i], py2[i]));                                   \
    print_bits("assigner_overlap_per_pair", ov);                                                      \
    anchor_free::overlap_gt_row_generic<float>(px1.data(), py1.data(), px2.data(), py2.data(), pa.data(), n, \
                                               g, ov.data());                                         \
    print_bits("assigner_overlap_gts", ov);                                                           \
    for (const float alpha : {0.5f, 1.5f}) {                                                          \
      anchor_free::score_power_approx_row_generic<float>(x.data(), n, alpha, sp.data());              \
      print_bits("score_power_approx", sp);                                                           \
    }                                                                                                 \
  }                                                                                                   \
  std::vector<float> out[5];                                                                          \
  for (auto& o : out) o.resize(n);                                                                    \
  const BoxRows rows{b[0].data(), b[1].data(), b[2].data(), b[3].data(), b[4].data(),                 \
                     b[5].data(), b[6].data(), b[7].data(), b[8].data(), b[9].data(),                 \
                     out[0].data(), out[1].data(), out[2].data(), out[3].data(), out[4].data()};      \
  for (BoxKind kind : {BoxKind::kIoU, BoxKind::kGIoU, BoxKind::kDIoU, BoxKind::kCIoU}) {              \
    box_iou_rows_family<Family::kYOLOv3>(n, rows, kind);                                              \
    for (const auto& o : out) print_bits("box_v3", o);                                                \
    box_iou_rows_family<Family::kYOLOv5>(n, rows, kind);                                              \
    for (const auto& o : out) print_bits("box_v5", o);                                                \
  }

using Vec = std::vector<float>;
__attribute__((target("avx512f"), noinline, flatten)) void run_avx512(const Vec& x, const Vec& y, const Vec* b) {
  ROWS_BODY
}
__attribute__((target("arch=haswell"), noinline, flatten)) void run_avx2(const Vec& x, const Vec& y, const Vec* b) {
  ROWS_BODY
}
__attribute__((noinline, flatten)) void run_baseline(const Vec& x, const Vec& y, const Vec* b) { ROWS_BODY }

int main(int argc, char** argv) {
  const char* isa = argv[1];
  const int64_t n = 1000 + 13;  // a tail past every vector width
  std::vector<float> x(n), y(n), b[10];
  unsigned s = 12345u;
  auto uniform = [&]() { s = s * 1664525u + 1013904223u; return float(s >> 8) / float(1u << 24); };
  for (int64_t i = 0; i < n; ++i) x[i] = (uniform() - 0.5f) * 40.0f, y[i] = uniform();
  x[0] = 0.0f, x[1] = -0.0f, x[2] = 1e-30f, x[3] = -100.0f, x[4] = 100.0f, x[5] = 88.5f;
  for (auto& v : b) v.resize(n);
  for (int64_t i = 0; i < n; ++i) {
    for (int c = 0; c < 4; ++c) b[c][i] = (uniform() - 0.5f) * 6.0f;         // box logits
    b[4][i] = 0.2f + 4.0f * uniform(), b[5][i] = 0.2f + 4.0f * uniform();  // anchors
    b[6][i] = uniform(), b[7][i] = uniform();                               // target centre in the cell
    b[8][i] = 0.1f + 8.0f * uniform(), b[9][i] = 0.1f + 8.0f * uniform();  // target size
  }
  if (std::strcmp(isa, "avx512f") == 0) {
    if (!__builtin_cpu_supports("avx512f")) return 3;
    run_avx512(x, y, b);
  } else if (std::strcmp(isa, "avx2") == 0) {
    if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma")) return 3;
    run_avx2(x, y, b);
  } else {
    run_baseline(x, y, b);
  }
  return 0;
}
"""


def test_row_functions_are_bitwise_identical_across_instruction_sets(tmp_path):
    compiler = shutil.which(os.environ.get("CXX", "c++").split()[0]) or shutil.which("g++")
    if compiler is None:
        pytest.skip("no C++ compiler")
    flags = [f for f in yk.cpp.build_info()["flags"].split() if f != "-fopenmp"]
    source, binary = tmp_path / "isa.cpp", tmp_path / "isa"
    source.write_text(PROGRAM)
    include = os.path.join(ROOT, "csrc")
    build = subprocess.run(
        [compiler, *flags, f"-I{include}", str(source), "-o", str(binary)], capture_output=True, text=True
    )
    assert build.returncode == 0, build.stderr[-3000:]
    outputs = {}
    for isa in ("baseline", "avx2", "avx512f"):
        run = subprocess.run([str(binary), isa], capture_output=True, text=True)
        if run.returncode == 3:  # this CPU lacks the instruction set
            continue
        assert run.returncode == 0, run.stderr[-2000:]
        outputs[isa] = run.stdout.splitlines()
    if len(outputs) < 2:
        pytest.skip("this CPU has neither AVX2 nor AVX-512: one instruction set, nothing to compare")
    reference = outputs.pop("baseline")
    # every function printed something (the assigner's rows: 7 lines)
    assert len(reference) == 4 * 4 + 2 * 2 * 2 + 2 + 5 + 7 + 4 * 2 * 5
    # the one-pass softplus sum and sigmoid are the two separate rows' bits
    bits = {line.split()[0]: line.split()[1:] for line in reference}
    assert bits["softplus_sigmoid_sum"] == bits["softplus_sum"]
    assert bits["softplus_sigmoid_grad"] == bits["sigmoid_scaled"]
    # the assigner's CIoU from angles taken once per box is the per-pair formula's
    assert bits["assigner_overlap"] == bits["assigner_overlap_per_pair"]
    # the decode's row of angles is box_angle's taken one at a time
    assert bits["box_angle"] == bits["box_angle_each"]
    for isa, lines in outputs.items():
        differing = [i for i, (a, b) in enumerate(zip(lines, reference)) if a != b]
        assert not differing and len(lines) == len(reference), (
            f"{isa} differs from the baseline in output line(s) {differing[:5]} "
            f"({reference[differing[0]].split()[0] if differing else ''})"
        )
