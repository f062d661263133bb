"""Builds ``yolo_kernels._C`` from ``csrc/`` (kernels, no Python) and ``python/src/`` (the pybind11
entry point) with torch's BuildExtension (ninja when present), against the torch that is installed.

The extension is optional: the package works without it (the reference and Triton backends), and
``python -m yolo_kernels.info`` says what is missing. It is skipped, with a message, when:

* ``YOLO_KERNELS_NO_EXT=1`` is set;
* torch cannot be imported at build time (``pip install .`` with build isolation: the isolated
  build environment has no torch; use ``pip install --no-build-isolation .`` to build against yours);
* there is no C++ compiler, or the compilation fails.

``YOLO_KERNELS_REQUIRE_EXT=1`` turns a skipped or failed build into an error (the development
install and CI set it). ``YOLO_KERNELS_DEBUG=1`` builds with ``-O0 -g``; ``YOLO_KERNELS_SANITIZE=1``
with AddressSanitizer and UndefinedBehaviorSanitizer (run with the sanitizer runtimes preloaded:
``make sanitize``).
"""

import glob
import os
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
MIN_TORCH = "2.4"
REQUIRED = os.environ.get("YOLO_KERNELS_REQUIRE_EXT") == "1"


def _skip(reason: str):
    if REQUIRED:
        raise RuntimeError(f"yolo_kernels: the C++ extension is required (YOLO_KERNELS_REQUIRE_EXT=1) but {reason}")
    print(f"yolo_kernels: building without the C++ extension: {reason}", file=sys.stderr)
    return [], {}


def _sources():
    kernels = sorted(glob.glob(os.path.join("csrc", "**", "*.cpp"), recursive=True))
    bindings = sorted(glob.glob(os.path.join("python", "src", "*.cpp")))
    return kernels, bindings


def _compiler() -> str | None:
    for name in filter(None, (os.environ.get("CXX"), "c++", "g++", "clang++")):
        path = shutil.which(name.split()[0])
        if path:
            return path
    return None


def _flags():
    debug = os.environ.get("YOLO_KERNELS_DEBUG") == "1"
    # -ffp-contract=off: no fused multiply-add, so float results match the reference's op order
    # -fno-trapping-math: lets the compiler vectorise branch-free selects (no change to results)
    # -fno-math-errno: sqrt without the errno branch, so loops over it vectorise (no change to results)
    flags = ["-std=c++17", "-ffp-contract=off", "-fno-trapping-math", "-fno-math-errno"]
    flags += ["-O0", "-g"] if debug else ["-O3", "-g0"]
    link = []
    # at::parallel_for is an inline OpenMP region in torch's Linux builds: -fopenmp gives it threads.
    # Apple clang has no -fopenmp; there the kernels run on one thread (results are identical).
    if sys.platform.startswith("linux"):
        flags.append("-fopenmp")
        link.append("-fopenmp")
    if os.environ.get("YOLO_KERNELS_SANITIZE") == "1":
        sanitize = ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined", "-fno-omit-frame-pointer"]
        # one code path (no ifunc-dispatched ISA clones) under the sanitizers
        flags = [f for f in flags if not f.startswith(("-O", "-g"))] + ["-O1", "-g", "-DYOLO_KERNELS_NO_ISA_CLONES"]
        flags += sanitize
        link += sanitize
    return flags, link


def extension_modules():
    kernels, bindings = _sources()
    if not kernels:
        return [], {}
    if os.environ.get("YOLO_KERNELS_NO_EXT") == "1":
        return _skip("YOLO_KERNELS_NO_EXT=1 is set")
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError as error:
        return _skip(
            f"torch cannot be imported at build time ({error}); install torch first and build with "
            "`pip install --no-build-isolation .`"
        )
    version = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
    if version < tuple(int(x) for x in MIN_TORCH.split(".")):
        return _skip(f"it needs torch >= {MIN_TORCH}, found {torch.__version__}")
    if _compiler() is None:
        return _skip("no C++ compiler found (set CXX, or install g++ / clang++)")

    class OptionalBuildExtension(BuildExtension):
        """A failed compilation leaves a pure-Python install (unless the extension is required)."""

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as error:
                if REQUIRED:
                    raise
                print(
                    f"yolo_kernels: the C++ extension failed to build ({error}); installing without it. "
                    "`python -m yolo_kernels.info` shows what is available.",
                    file=sys.stderr,
                )

    flags, link = _flags()
    ext = CppExtension(
        "yolo_kernels._C",
        kernels + bindings,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={"cxx": flags},
        extra_link_args=link,
        define_macros=[("YOLO_KERNELS_CXX_FLAGS", '"' + " ".join(flags) + '"')],
    )
    return [ext], {"build_ext": OptionalBuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)}


ext_modules, cmdclass = extension_modules()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
