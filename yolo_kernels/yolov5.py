"""``yolo_kernels.yolov5``: the stable import path of the YOLOv5-style loss (``ComputeLoss``,
``YOLOv5Loss``), which lives in ``anchor/yolov5.py``. Every name of that module is reachable here."""

from __future__ import annotations

from typing import Any

from .anchor import yolov5 as _module
from .anchor.yolov5 import *  # noqa: F403 (the face re-exports the module's public names)

__all__ = _module.__all__


def __getattr__(name: str) -> Any:
    return getattr(_module, name)
