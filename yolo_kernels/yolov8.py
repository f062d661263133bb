"""``yolo_kernels.yolov8``: the stable import path of the anchor-free drop-ins (``DetectionLoss``,
``E2ELoss``), which live in ``anchor_free/yolov8.py``. Every name of that module is reachable here."""

from __future__ import annotations

from typing import Any

from .anchor_free import yolov8 as _module
from .anchor_free.yolov8 import *  # noqa: F403 (the face re-exports the module's public names)

__all__ = _module.__all__


def __getattr__(name: str) -> Any:
    return getattr(_module, name)
