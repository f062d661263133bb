"""``yolo_kernels.reference``: the stable import path of the anchor-based families' oracle (plain
PyTorch), which lives in ``anchor/reference.py``. Every name of that module is reachable here. (The
anchor-free family's oracle is ``yolo_kernels.anchor_free.reference``.)"""

from __future__ import annotations

from typing import Any

from .anchor import reference as _module
from .anchor.reference import *  # noqa: F403 (the face re-exports the module's public names)

__all__ = _module.__all__


def __getattr__(name: str) -> Any:
    return getattr(_module, name)
