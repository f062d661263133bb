"""``yolo_kernels.loss``: the stable import path of the YOLOv3 archive family's public API
(``compute_loss``, ``YOLOv3Loss``, ``build_targets``, the backend names), which lives in
``anchor/yolov3.py``. Every name of that module is reachable here."""

from __future__ import annotations

from typing import Any

from .anchor import yolov3 as _module
from .anchor.yolov3 import *  # noqa: F403 (the face re-exports the module's public names)

__all__ = _module.__all__


def __getattr__(name: str) -> Any:
    return getattr(_module, name)
