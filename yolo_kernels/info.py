"""What this installation can run, and why not: ``python -m yolo_kernels.info``.

Prints the versions, every backend's availability on each device type present (with the reason
and the fix when it is missing) and what ``backend="auto"`` picks, for each loss family, and the
C++ extension's build. ``report()`` returns the same as a dict (``backends`` and ``auto`` are the
anchor-based families'; ``families`` holds every family's).
"""

from __future__ import annotations

import json
import platform
import sys
from typing import Any

import torch

from . import __version__, cpp, library
from . import triton as triton_backend
from .anchor.backends import REGISTRY as ANCHOR_REGISTRY
from .anchor_free.backends import REGISTRY as ANCHOR_FREE_REGISTRY

#: The loss families as the report names them, with their registries.
FAMILIES = {
    "anchor-based (compute_loss, yolov5.ComputeLoss)": ANCHOR_REGISTRY,
    "anchor-free (yolov8.DetectionLoss, E2ELoss)": ANCHOR_FREE_REGISTRY,
}


def _devices() -> list[torch.device]:
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    return devices


def report() -> dict[str, Any]:
    """Versions, per-device backend availability (``None`` = available, else the reason), the
    backend ``auto`` picks per device, and the extension's build info (or why it is missing)."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    families = {}
    for family, registry in FAMILIES.items():
        backends, auto = {}, {}
        for device in _devices():
            backends[device.type] = {name: b.unavailable_reason(device) for name, b in registry.backends.items()}
            ready = [n for n in registry.auto_order.get(device.type, ()) if backends[device.type][n] is None]
            auto[device.type] = ready[0] if ready else "reference"
        families[family] = {"backends": backends, "auto": auto}
    anchor = families[next(iter(FAMILIES))]
    return {
        "yolo_kernels": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
        "triton": triton_version,
        "triton_supported": "{}.{} to {}.{}".format(
            *triton_backend.SUPPORTED_TRITON[0], *triton_backend.SUPPORTED_TRITON[1]
        ),
        "triton_interpreter": triton_backend.interpreter_active(),
        "backends": anchor["backends"],
        "auto": anchor["auto"],
        "families": families,
        "cpp_build": cpp.build_info() if library.LOAD_ERROR is None else library.LOAD_ERROR,
    }


def format_report(info: dict[str, Any]) -> str:
    lines = [
        f"yolo_kernels {info['yolo_kernels']} (Python {info['python']}, {info['platform']})",
        f"torch {info['torch']}" + (f", CUDA {info['cuda']}" if info["cuda"] else ", no CUDA device"),
        f"triton {info['triton'] or 'not installed'} (the triton backend supports {info['triton_supported']})"
        + (", interpreter on (TRITON_INTERPRET=1)" if info["triton_interpreter"] else ""),
    ]
    for family, entry in info["families"].items():
        lines.append(f"{family}:")
        for device, reasons in entry["backends"].items():
            lines.append(f"  {device}: backend='auto' uses '{entry['auto'][device]}'")
            for name, reason in reasons.items():
                lines.append(f"    {name:<10} " + ("available" if reason is None else f"unavailable: {reason}"))
    build = info["cpp_build"]
    if isinstance(build, dict):
        lines.append(f"C++ extension: {build['compiler']}, {build['flags']}, {build['parallel_backend']}")
    else:
        lines.append(f"C++ extension: not loaded: {build}")
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    info = report()
    print(json.dumps(info, indent=2, default=str) if "--json" in argv else format_report(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
