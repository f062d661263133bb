"""Builds ``yolo_kernels._C`` from ``csrc/`` (kernels, no Python) and ``python/src/`` (the pybind11
entry point) with torch's BuildExtension and ninja. Nothing is compiled while ``csrc/`` has no
sources: the package is then pure Python (the reference backend).

Environment: ``YOLO_KERNELS_NO_EXT=1`` skips the extension; ``YOLO_KERNELS_DEBUG=1`` builds with
``-O0 -g``; ``YOLO_KERNELS_SANITIZE=1`` builds with AddressSanitizer and UndefinedBehaviorSanitizer
(run it with the sanitizer runtimes preloaded: ``make sanitize``).
"""

import glob
import os

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
MIN_TORCH = "2.4"


def _sources():
    kernels = sorted(glob.glob(os.path.join("csrc", "**", "*.cpp"), recursive=True))
    bindings = sorted(glob.glob(os.path.join("python", "src", "*.cpp")))
    return kernels, bindings


def extension_modules():
    kernels, bindings = _sources()
    if not kernels or os.environ.get("YOLO_KERNELS_NO_EXT") == "1":
        return [], {}
    import torch
    from packaging.version import Version
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    if Version(torch.__version__).release < Version(MIN_TORCH).release:
        raise RuntimeError(f"yolo_kernels needs torch >= {MIN_TORCH} to build its extension, found {torch.__version__}")
    debug = os.environ.get("YOLO_KERNELS_DEBUG") == "1"
    # -ffp-contract=off: no fused multiply-add, so float results match the reference's op order
    # -fopenmp: at::parallel_for is an inline OpenMP region (torch's CPU builds use OpenMP)
    # -fno-trapping-math: lets the compiler vectorise branch-free selects (no change to results)
    flags = ["-std=c++17", "-ffp-contract=off", "-fno-trapping-math", "-fopenmp"] + (["-O0", "-g"] if debug else ["-O3", "-g0"])
    link = ["-fopenmp"]
    if os.environ.get("YOLO_KERNELS_SANITIZE") == "1":
        sanitize = ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined", "-fno-omit-frame-pointer"]
        flags = [f for f in flags if not f.startswith(("-O", "-g"))] + ["-O1", "-g"] + sanitize
        link += sanitize
    ext = CppExtension(
        "yolo_kernels._C",
        kernels + bindings,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={"cxx": flags},
        extra_link_args=link,
        define_macros=[("YOLO_KERNELS_CXX_FLAGS", '"' + " ".join(flags) + '"')],
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extension_modules()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
