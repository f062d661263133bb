"""The Triton kernels compile for real GPUs (sm_80, sm_90) in every specialisation the launcher can
produce, checked without a GPU by ``yolo_kernels.triton.compile_gate``; and the gate itself reports
what it should. Each check runs in a subprocess with the interpreter off: in this test process
``TRITON_INTERPRET=1`` makes every ``@triton.jit`` function an interpreted one."""

import os
import subprocess
import sys
import textwrap

import pytest

import yolo_kernels as yk
from yolo_kernels.triton import IMPORT_ERROR, SUPPORTED_TRITON, triton_version_problem

pytestmark = pytest.mark.skipif(IMPORT_ERROR is not None, reason=f"triton backend unavailable: {IMPORT_ERROR}")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_compiled(args, **kwargs):
    env = dict(os.environ, TRITON_INTERPRET="0")
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, **kwargs)


def test_every_kernel_specialisation_compiles_for_sm80_and_sm90():
    result = run_compiled(["-m", "yolo_kernels.triton.compile_gate", "--arch", "80", "90"], timeout=1800)
    print(result.stdout[-20000:], result.stderr[-5000:])
    assert result.returncode == 0, result.stdout[-20000:] + result.stderr[-5000:]
    assert "FAILED" not in result.stdout
    summary = result.stdout.strip().splitlines()[-1]
    assert summary.startswith("compile gate (triton") and "sm_80" in summary and "sm_90" in summary


BROKEN_KERNELS = """
import triton
import triton.language as tl
from yolo_kernels.triton.math import as_compute

SCALE = 2.0  # not a constexpr: the compiler refuses to read it, the interpreter does not mind


@triton.jit
def reads_a_plain_global(x_ptr, n, BLOCK: tl.constexpr):
    k = tl.arange(0, BLOCK)
    tl.store(x_ptr + k, tl.load(x_ptr + k, mask=k < n) * SCALE, mask=k < n)


@triton.jit
def promotes_to_float64(x_ptr, n, BLOCK: tl.constexpr):
    k = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + k, mask=k < n)
    tl.store(x_ptr + k, tl.maximum(x, 1e-38), mask=k < n)  # below float32's normal range: a float64 literal


@triton.jit
def fine(x_ptr, n, BLOCK: tl.constexpr):
    k = tl.arange(0, BLOCK)
    tl.store(x_ptr + k, tl.load(x_ptr + k, mask=k < n) * 2.0, mask=k < n)


@triton.jit
def uses_a_float64_argument(x_ptr, n, s: tl.float64, BLOCK: tl.constexpr):
    k = tl.arange(0, BLOCK)
    tl.store(x_ptr + k, tl.load(x_ptr + k, mask=k < n) * s, mask=k < n)  # float64 math on float32 data


@triton.jit
def converts_a_float64_argument(x_ptr, n, s: tl.float64, BLOCK: tl.constexpr):
    k = tl.arange(0, BLOCK)
    tl.store(x_ptr + k, tl.load(x_ptr + k, mask=k < n) * as_compute(s, tl.float32), mask=k < n)
"""

CHECK = """
import sys
import torch
sys.path.insert(0, sys.argv[1])
import broken
from triton.backends.compiler import GPUTarget
from triton.compiler import make_backend
from yolo_kernels.triton import compile_gate

backend = make_backend(GPUTarget("cuda", 90, 32))
x = torch.zeros(8)
names = ("reads_a_plain_global", "promotes_to_float64", "fine")
for name in names + ("uses_a_float64_argument", "converts_a_float64_argument"):
    kernel = getattr(broken, name)
    arguments = dict(x_ptr=x, n=5, BLOCK=8, **({"s": 0.1} if "argument" in name else {}))
    job = compile_gate.Job(name, *compile_gate._bind(kernel, arguments, backend), [name])
    print(f"== {name}: {compile_gate.compile_job(job, 90, kernel=kernel)}")
"""


def test_gate_reports_what_the_interpreter_accepts(tmp_path):
    (tmp_path / "broken.py").write_text(BROKEN_KERNELS)
    (tmp_path / "check.py").write_text(CHECK)
    result = run_compiled([str(tmp_path / "check.py"), str(tmp_path)], timeout=600)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    plain, promoted, fine, argument, converted = out.split("== ")[1:]
    assert "Cannot access global variable SCALE" in plain
    assert "float64 arithmetic" in promoted and "f64" in promoted
    assert fine.strip() == "fine: None"
    assert "float64 arithmetic" in argument and "arith.mulf" in argument
    assert converted.strip() == "converts_a_float64_argument: None"


def test_launches_are_recorded_with_keyword_arguments_not_run(gen):
    from helpers import make_p, make_targets, random_anchors

    from yolo_kernels.triton import anchor_loss as triton_loss
    from yolo_kernels.triton.launch import record_launches

    p = make_p(2, [3], [(4, 5)], 7, gen)
    with record_launches() as launches:
        triton_loss.fused_loss(p, make_targets(4, 2, 7, gen), random_anchors([3], gen), yk.LossOptions(nc=7))
    names = [launch.kernel.fn.__name__ for launch in launches]
    assert names == [
        "_match_kernel",
        "_objectness_target_kernel",
        "_objectness_kernel",
        "_finalize_kernel",
        "_pair_grad_kernel",
    ]
    for launch in launches:
        options = {"enable_fp_fusion"} & set(launch.arguments)  # launch options, not kernel arguments
        assert set(launch.arguments) - options == set(launch.kernel.arg_names)
    match = launches[names.index("_match_kernel")]
    assert match.arguments["enable_fp_fusion"] is False  # test_matching_arithmetic_is_exact_in_ptx


MATCH_PTX = """
import torch
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from yolo_kernels.triton import math as tmath


@triton.jit
def probe(t_ptr, out_ptr, n, grid_h, grid_w, threshold, FAMILY: tl.constexpr, BLOCK: tl.constexpr):
    k = tl.arange(0, BLOCK)
    m = k < n
    ok, b, c, gj, gi, tx, ty, gw, gh = tmath.match(t_ptr + 6 * k, 1.5, 2.5, grid_h, grid_w, threshold, m, k % 5,
                                                 tl.float32, FAMILY)
    tl.store(out_ptr + k, ok.to(tl.float32) + gj + gi + tx + ty + gw + gh, mask=m)


signature = {"t_ptr": "*fp32", "out_ptr": "*fp32", "n": "i32", "grid_h": "i32", "grid_w": "i32", "threshold": "fp32",
             "FAMILY": "constexpr", "BLOCK": "constexpr"}
for family in (0, 1):
    for fusion in (False, True):
        src = ASTSource(probe, signature, {"FAMILY": family, "BLOCK": 64})
        ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"enable_fp_fusion": fusion}).asm["ptx"]
        print(f"family={family} fusion={fusion} fma={'fma.rn.f32' in ptx} approx_div={'div.full.f32' in ptx}")
"""


def test_matching_arithmetic_is_exact_in_ptx(tmp_path):
    """The match decisions (``x * nx`` near a cell edge or a half, the size ratios, wh_iou at the
    threshold) see the same float32 roundings as the reference on a GPU: no approximate division
    and, with the launch option the launcher passes, no fused multiply-add. A GPU showed both: the
    contraction of ``nx - x * nx`` matched neighbour cells the reference does not."""
    (tmp_path / "match_ptx.py").write_text(MATCH_PTX)
    result = run_compiled([str(tmp_path / "match_ptx.py")], timeout=600)
    assert result.returncode == 0, result.stderr[-5000:]
    lines = result.stdout.split()
    for family in (0, 1):
        assert f"family={family} fusion=False fma=False approx_div=False" in result.stdout, result.stdout
    # the check can fail: with fusion on, the compiler contracts the multiply-adds
    assert any(line == "fma=True" for line in lines), result.stdout


@pytest.mark.parametrize(
    "version, ok",
    [
        ("3.6.0", True),
        ("3.7.1", True),
        ("3.9.2+git1234", True),
        ("3.5.1", False),
        ("3.10.0", False),
        ("4.0.0", False),
        ("nightly", False),
    ],
)
def test_triton_version_range(version, ok):
    problem = triton_version_problem(version)
    assert (problem is None) == ok
    if not ok:
        lo, hi = SUPPORTED_TRITON
        assert version in problem and f"{lo[0]}.{lo[1]} to {hi[0]}.{hi[1]}" in problem


def test_unsupported_triton_makes_the_backend_unavailable_with_the_reason(tmp_path):
    """A stand-in ``triton`` 3.5.0 package: importing yolo_kernels works, the backend says why not."""
    fake = tmp_path / "triton"
    fake.mkdir()
    (fake / "__init__.py").write_text("__version__ = '3.5.0'\n")
    code = textwrap.dedent("""
        import torch, yolo_kernels as yk
        print('available:', yk.available_backends())
        try:
            yk.loss.resolve_backend('triton', torch.device('cpu'))
        except yk.BackendUnavailableError as error:
            print('error:', error)
    """)
    env = dict(os.environ, PYTHONPATH=str(tmp_path), TRITON_INTERPRET="1")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "'triton'" not in result.stdout.splitlines()[0]
    assert "triton 3.5.0 is installed; the triton backend supports triton 3.6 to 3.9" in result.stdout
