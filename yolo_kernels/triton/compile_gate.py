"""Compile every Triton kernel specialisation the loss launches, for real GPU targets, with no GPU.

    python -m yolo_kernels.triton.compile_gate                  # sm_80 and sm_90, all specialisations
    python -m yolo_kernels.triton.compile_gate --arch 90 --jobs 4

The Triton interpreter (how the tests run the kernels without a GPU) accepts code that the
compiler rejects, so passing interpreter tests says nothing about a GPU. This gate runs the real
launchers (``anchor_loss.fused_loss``; ``anchor_free_loss.assign``, ``detection_loss`` and
``loss_backward``) under ``record_launches`` over a grid of options, dtypes and layouts; each
recorded launch goes through Triton's own argument binder (the code that types and specialises
arguments at a real launch) for the target, and every distinct result is compiled to
a cubin with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))``. Triton ships
``ptxas``: no CUDA toolkit and no GPU are needed. A specialisation without float64 tensors also
fails when its Triton IR holds float64 values (a silent promotion that costs speed on a GPU).

The grid: both loss families x every box loss x focal on/off x ``nc == 1`` / ``nc > 1`` x
fp16/bf16/fp32/fp64 ``p`` x with/without gradient (with: the op's one pass and the eager
autograd's forward + backward) x (yolov3) mean/sum or (yolov5) plain /
``sort_obj_iou`` with a ``balance`` tensor, on a contiguous ``p``; plus, for every family and dtype,
a non-contiguous ``p`` (no unit channel stride) and a layer whose sizes are all 1 (Triton
specialises integer arguments equal to 1); plus the gradient statistics (``compute_stats``) for
both families x focal on/off x ``nc`` 1 / 80 x every dtype x with/without gradient. The
anchor-free family: every dtype x ``reg_max`` 16 / 1 x second cut off/on x class weights off/on x
forward and backward, the default exponents (alpha 0.5, beta 6: a square root and squarings) and
general ones, ``nc`` 1, strided head outputs, and one point per level.
Block sizes are fixed constants of the kernel modules, so these cover every block size the
launchers pick.

Must run with the interpreter off (``TRITON_INTERPRET`` unset or ``0``): under the interpreter
``@triton.jit`` yields interpreted functions, which cannot be compiled.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import functools
import importlib
import itertools
import multiprocessing
import os
import sys
import time

import torch

from ..anchor.options import BOX_LOSSES, FAMILIES

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
DEFAULT_ARCHS = (80, 90)


@dataclasses.dataclass
class Job:
    """One distinct compilation: a kernel with the signature, constexprs and attributes its launch
    gets, and the specialisations of the loss that produce it."""

    kernel_name: str
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict
    labels: list
    module: str = "yolo_kernels.triton.anchor_loss"


def _case_inputs(dtype, nc, layout):
    """Small ``p``, targets and anchors of one layer for a launch-recording run (values unused)."""
    if layout == "ones":
        bs, na, ny, nx, nt = 1, 1, 1, 1, 1
    else:
        bs, na, ny, nx, nt = 2, 3, 5, 7, 6
    no = nc + 5
    if layout == "strided":  # the head's view before ``.contiguous()``: channel stride ny * nx
        p = torch.zeros(bs, na, no, ny, nx, dtype=dtype).permute(0, 1, 3, 4, 2)
    else:
        p = torch.zeros(bs, na, ny, nx, no, dtype=dtype)
    targets = torch.tensor([[0, 0, 0.5, 0.5, 0.2, 0.3]] * nt, dtype=torch.float32)
    anchors = torch.ones(na, 2)
    return [p], targets, [anchors]


#: Each family's own axis of kernel variants: the yolov3 loss's two reductions; the yolov5 loss
#: (only "mean") plain, or with sort_obj_iou and a balance tensor.
VARIANTS = {"yolov3": ("reduction=mean", "reduction=sum"), "yolov5": ("reduction=mean", "sort_obj_iou+balance")}


def _run_anchor_free(boxes, scores, grids, targets, options, class_weights):
    """The anchor-free launchers of one call: assignment, forward loss, backward."""
    from . import anchor_free_loss

    assigned = anchor_free_loss.assign(boxes, scores, grids, *targets, options)
    anchor_free_loss.detection_loss(boxes, scores, grids, assigned, options, class_weights)
    grad_out = torch.ones(3, dtype=torch.promote_types(scores.dtype, torch.float32))
    anchor_free_loss.loss_backward(grad_out, boxes, scores, grids, assigned, options, class_weights, True, True)


def _run_anchor(module, kwargs):
    """The anchor launchers of one case: the op's (``fused_loss``: with ``compute_grad`` the gradient
    in the forward passes) and, with a gradient, the eager autograd's (``loss_forward``, then
    ``loss_backward``: the gradient written in backward, scaled by the loss's gradient)."""
    module.fused_loss(**kwargs)
    if kwargs["compute_grad"]:
        forward_kwargs = {k: v for k, v in kwargs.items() if k != "compute_grad"}
        *_, saved = module.loss_forward(**forward_kwargs)
        module.loss_backward(saved, kwargs["p"], torch.ones(1, dtype=saved.plan.dtype))


def anchor_free_specialisations():
    """``(label, run)`` for every case of the anchor-free grid: ``run()`` calls the launchers
    (assignment, forward loss, backward) on small inputs of that case."""
    from ..anchor_free.options import DetectionOptions

    cases = [
        (dtype, reg_max, topk2, weights, 5, "contiguous", (0.5, 6.0))
        for dtype in DTYPES
        for reg_max in (16, 1)
        for topk2 in (None, 1)
        for weights in (False, True)
    ]
    cases += [(dtype, 16, None, False, 1, "contiguous", (0.5, 6.0)) for dtype in DTYPES]  # nc 1
    cases += [(dtype, 16, None, False, 5, "contiguous", (1.0, 2.5)) for dtype in DTYPES]  # general powers
    cases += [(dtype, 16, None, False, 5, layout, (0.5, 6.0)) for dtype in DTYPES for layout in ("strided", "ones")]
    for dtype, reg_max, topk2, weights, nc, layout, (alpha, beta) in cases:
        bs, grids = (1, ((1, 1), (1, 1))) if layout == "ones" else (2, ((4, 6), (2, 3)))
        a = sum(ny * nx for ny, nx in grids)
        if layout == "strided":  # channels outermost: the point stride is not 1
            boxes = torch.zeros(4 * reg_max, bs, a, dtype=dtype).permute(1, 0, 2)
            scores = torch.zeros(nc, bs, a, dtype=dtype).permute(1, 0, 2)
        else:
            boxes = torch.zeros(bs, 4 * reg_max, a, dtype=dtype)
            scores = torch.zeros(bs, nc, a, dtype=dtype)
        options = DetectionOptions(
            nc=nc, reg_max=reg_max, strides=(8.0, 16.0), topk=10, topk2=topk2, alpha=alpha, beta=beta
        )
        class_weights = torch.ones(nc) if weights else None
        targets = (torch.zeros(3), torch.zeros(3), torch.full((3, 4), 0.25))
        label = (
            f"anchor_free p={str(dtype).replace('torch.', '')} reg_max={reg_max} topk2={topk2} "
            f"class_weights={weights} nc={nc} layout={layout} alpha={alpha} beta={beta}"
        )

        yield label, functools.partial(_run_anchor_free, boxes, scores, grids, targets, options, class_weights)


def specialisations():
    """``(label, kwargs of anchor_loss.fused_loss)`` for every case of the gate's grid."""
    from ..anchor.options import LossOptions

    cases = [
        (family, box, gamma, nc, dtype, grad, variant, "contiguous")
        for family in FAMILIES
        for box, gamma, nc, dtype, grad, variant in itertools.product(
            BOX_LOSSES, (0.0, 1.5), (1, 80), DTYPES, (True, False), VARIANTS[family]
        )
    ]
    cases += [
        (family, "giou", 0.0, 80, dtype, True, "reduction=mean", layout)
        for family in FAMILIES
        for dtype in DTYPES
        for layout in ("strided", "ones")
    ]
    # the gradient statistics (compute_stats): their kernel variants, with and without a gradient
    stats_cases = [
        (family, "ciou", gamma, nc, dtype, grad, "reduction=mean", "stats")
        for family in FAMILIES
        for gamma in (0.0, 1.5)
        for nc in (1, 80)
        for dtype in DTYPES
        for grad in (True, False)
    ]
    for family, box, gamma, nc, dtype, grad, variant, layout in cases + stats_cases:
        stats = layout == "stats"
        layout = "contiguous" if stats else layout
        p, targets, anchors = _case_inputs(dtype, nc, layout)
        sort_and_balance = variant == "sort_obj_iou+balance"
        options = LossOptions(
            nc=nc,
            family=family,
            box_loss=box,
            fl_gamma=gamma,
            reduction="sum" if variant == "reduction=sum" else "mean",
            sort_obj_iou=sort_and_balance,
        )
        balance = torch.ones(len(p)) if sort_and_balance else None
        label = (
            f"family={family} box_loss={box} fl_gamma={gamma} nc={nc} p={str(dtype).replace('torch.', '')} "
            f"grad={grad} {variant} layout={layout} stats={stats}"
        )
        kwargs = dict(
            p=p,
            targets=targets,
            anchors=anchors,
            options=options,
            compute_grad=grad,
            balance=balance,
            compute_stats=stats,
        )
        yield label, kwargs


def _bind(kernel, arguments, backend):
    """Triton's own typing and specialisation of a launch's arguments for ``backend``'s target."""
    from triton.runtime.jit import create_function_from_signature

    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, launch_options = binder(**arguments)
    options, signature, constexprs, attrs = kernel._pack_args(
        backend, launch_options, bound, specialization, launch_options
    )
    return signature, constexprs, attrs, options.__dict__


def collect_jobs(arch: int) -> list[Job]:
    """The distinct compilations of every specialisation, for ``sm_<arch>``."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    from . import anchor_loss as triton_loss
    from .launch import record_launches

    backend = make_backend(GPUTarget("cuda", arch, 32))
    jobs: dict[str, Job] = {}
    runs = [(label, functools.partial(_run_anchor, triton_loss, kwargs)) for label, kwargs in specialisations()]
    for label, run_case in runs + list(anchor_free_specialisations()):
        with record_launches() as launches:
            run_case()
        for launch in launches:
            if not hasattr(launch.kernel, "params"):
                raise RuntimeError(
                    "compile_gate: the kernels are interpreted functions (TRITON_INTERPRET=1); "
                    "run the gate with TRITON_INTERPRET=0"
                )
            signature, constexprs, attrs, options = _bind(launch.kernel, launch.arguments, backend)
            name = launch.kernel.fn.__name__
            key = repr((name, sorted(signature.items()), sorted(constexprs.items(), key=str), sorted(attrs.items())))
            if key not in jobs:
                jobs[key] = Job(name, signature, constexprs, attrs, options, [], launch.kernel.fn.__module__)
            jobs[key].labels.append(label)
    return list(jobs.values())


def _describe(error: BaseException) -> str:
    """The error and its causes, innermost last: Triton wraps the real message (e.g. "Cannot access
    global variable ...") in a CompilationError per enclosing call site."""
    parts, seen = [], set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        parts.append(f"{type(error).__name__}: {error}".strip())
        error = error.__cause__ or error.__context__
    return "\n-- caused by --\n".join(parts)


def compile_job(job: Job, arch: int, kernel=None) -> str | None:
    """Compile one job to a cubin for ``sm_<arch>``: ``None``, or what went wrong. ``kernel``
    defaults to the kernel of the job's module named by the job."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = kernel if kernel is not None else getattr(importlib.import_module(job.module), job.kernel_name)
    try:
        compiled = triton.compile(
            ASTSource(kernel, job.signature, job.constexprs, job.attrs),
            target=GPUTarget("cuda", arch, 32),
            options=job.options,
        )
    except Exception as error:
        return _describe(error)
    if not compiled.asm.get("cubin"):
        return "no cubin produced"
    # A float literal outside float32's normal range or a float64 argument silently promotes math
    # to float64: it compiles, but runs at a fraction of the speed on most GPUs.
    if "*fp64" not in job.signature.values():
        lines = float64_lines(compiled.asm.get("ttir", ""), job.signature)
        if lines:
            return "float64 arithmetic in a specialisation without float64 tensors:\n" + "\n".join(lines[:5])
    return None


def float64_lines(ttir: str, signature: dict) -> list[str]:
    """The lines of Triton IR that compute in float64, except what float64 scalar arguments need:
    the function's signature and each argument's one conversion to float32 (``math.as_compute``)."""
    arguments = [name for name, kind in signature.items() if kind == "fp64"]
    allowed = tuple(f"arith.truncf %{name} : f64 to f32" for name in arguments)
    return [
        line.strip()
        for line in ttir.splitlines()
        if "f64" in line and not line.lstrip().startswith("tt.func") and not any(a in line for a in allowed)
    ]


_JOBS: dict[int, list[Job]] = {}  # per arch; set before the pool forks, so workers get it for free


def _compile_indexed(work: tuple[int, int]) -> tuple[int, int, str | None]:
    arch, index = work
    return arch, index, compile_job(_JOBS[arch][index], arch)


def _kernels_never_launched(jobs: list[Job]) -> list[str]:
    from triton.runtime.jit import JITFunction

    from . import anchor_free_loss, anchor_loss

    defined = {  # the kernels of the kernel modules (named *_kernel), not the helpers they call
        f"{module.__name__.rsplit('.', 1)[-1]}.{name}"
        for module in (anchor_loss, anchor_free_loss)
        for name, value in vars(module).items()
        if isinstance(value, JITFunction) and name.endswith("_kernel") and value.fn.__module__ == module.__name__
    }
    launched = {f"{job.module.rsplit('.', 1)[-1]}.{job.kernel_name}" for job in jobs}
    return sorted(defined - launched)


def run(archs=DEFAULT_ARCHS, n_workers: int | None = None, out=sys.stdout) -> int:
    """Compile every job for every arch; print each failure with its kernel, specialisations and
    message. Returns the number of failures (a kernel of a kernel module that the grid never
    launches counts as one)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("compile_gate: TRITON_INTERPRET=1 is set; run the gate with TRITON_INTERPRET=0")
    import triton

    start = time.perf_counter()
    _JOBS.clear()
    _JOBS.update({arch: collect_jobs(arch) for arch in archs})
    work = [(arch, i) for arch in archs for i in range(len(_JOBS[arch]))]
    failures = []
    # fork: the workers inherit the imported kernels and the jobs; they run no torch ops
    context = multiprocessing.get_context("fork")
    with concurrent.futures.ProcessPoolExecutor(n_workers or os.cpu_count() or 1, mp_context=context) as pool:
        for arch, index, error in pool.map(_compile_indexed, work):
            if error is not None:
                failures.append((_JOBS[arch][index], arch, error))
    for job, arch, error in failures:
        shown = job.labels[:3] + ([f"... and {len(job.labels) - 3} more"] if len(job.labels) > 3 else [])
        print(f"FAILED {job.kernel_name} on sm_{arch}", file=out)
        print(f"  signature: {job.signature}", file=out)
        print(f"  constexprs: {job.constexprs}", file=out)
        print("  specialisations: " + "; ".join(shown), file=out)
        print("  " + error.strip().replace("\n", "\n  "), file=out)
    missing = _kernels_never_launched(_JOBS[archs[0]]) if archs else []
    for name in missing:
        message = "defined but never launched by the gate's grid (extend the grid)"
        print(f"FAILED {name}: {message}", file=out)
    counts = ", ".join(f"sm_{arch}: {len(jobs)}" for arch, jobs in _JOBS.items())
    print(
        f"compile gate (triton {triton.__version__}): {len(work) - len(failures)} of {len(work)} kernel "
        f"specialisations compiled ({counts}) in {time.perf_counter() - start:.0f} s",
        file=out,
    )
    return len(failures) + len(missing)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--arch",
        type=int,
        nargs="+",
        default=list(DEFAULT_ARCHS),
        help="CUDA compute capabilities to compile for (80 = A100, 90 = H100/H200)",
    )
    parser.add_argument("--jobs", type=int, default=None, help="parallel compilations (default: CPU count)")
    args = parser.parse_args(argv)
    from . import IMPORT_ERROR

    if IMPORT_ERROR is not None:  # the gate compiles with triton itself: nothing to do without it
        parser.error(f"the compile gate needs a supported triton: {IMPORT_ERROR}")
    return 1 if run(args.arch, args.jobs) else 0


if __name__ == "__main__":
    sys.exit(main())
