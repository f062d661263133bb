"""The shipped architectures: yolov3, yolov3-spp and yolov3-tiny generated in code (any number of
classes), and Darknet's own cfg files packaged in ``models/cfg/`` (yolov3, yolov3-spp, yolov3-tiny,
yolov3-1cls, yolov4).

Each generator returns module definitions in the form ``parse_model_cfg`` gives (``[net]``
first); the tests prove them equal to the packaged Darknet files.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import numpy as np

from .cfg import format_cfg

__all__ = [
    "SHIPPED",
    "CFG_DIR",
    "packaged_cfg_names",
    "packaged_cfg_path",
    "shipped_cfg",
    "yolov3",
    "yolov3_spp",
    "yolov3_tiny",
]

#: Darknet's cfg files shipped with the package.
CFG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cfg")


def packaged_cfg_names() -> list[str]:
    """Names of the packaged cfg files (without ``.cfg``)."""
    return sorted(f[: -len(".cfg")] for f in os.listdir(CFG_DIR) if f.endswith(".cfg"))


def packaged_cfg_path(name: str) -> str:
    """The path of a packaged cfg file, e.g. ``packaged_cfg_path("yolov4")``."""
    if name not in packaged_cfg_names():
        raise ValueError(f"name: expected one of the packaged cfgs {packaged_cfg_names()}, got {name!r}")
    return os.path.join(CFG_DIR, name + ".cfg")


YOLOV3_ANCHORS = [(10, 13), (16, 30), (33, 23), (30, 61), (62, 45), (59, 119), (116, 90), (156, 198), (373, 326)]
TINY_ANCHORS = [(10, 14), (23, 27), (37, 58), (81, 82), (135, 169), (344, 319)]


def _net(batch: int, subdivisions: int, size: int) -> dict[str, Any]:
    return {
        "type": "net",
        "batch": batch,
        "subdivisions": subdivisions,
        "width": size,
        "height": size,
        "channels": 3,
        "momentum": 0.9,
        "decay": 0.0005,
        "angle": 0,
        "saturation": 1.5,
        "exposure": 1.5,
        "hue": 0.1,
        "learning_rate": 0.001,
        "burn_in": 1000,
        "max_batches": 500200,
        "policy": "steps",
        "steps": "400000,450000",
        "scales": ".1,.1",
    }


def _conv(filters: int, size: int, stride: int = 1) -> dict[str, Any]:
    return {
        "type": "convolutional",
        "batch_normalize": 1,
        "filters": filters,
        "size": size,
        "stride": stride,
        "pad": 1,
        "activation": "leaky",
    }


def _head_conv(na: int, nc: int) -> dict[str, Any]:
    """The 1x1 linear conv feeding a YOLO layer: ``na * (nc + 5)`` outputs, bias, no batch norm."""
    return {
        "type": "convolutional",
        "batch_normalize": 0,
        "size": 1,
        "stride": 1,
        "pad": 1,
        "filters": na * (nc + 5),
        "activation": "linear",
    }


def _yolo(mask: list[int], anchors: list[tuple[int, int]], nc: int) -> dict[str, Any]:
    return {
        "type": "yolo",
        "mask": mask,
        "anchors": np.array(anchors, dtype=np.float64),
        "classes": nc,
        "num": len(anchors),
        "jitter": 0.3,
        "ignore_thresh": 0.7,
        "truth_thresh": 1,
        "random": 1,
    }


def _darknet53() -> list[dict[str, Any]]:
    """The 75-layer Darknet-53 backbone: stages of residual blocks (1x1 squeeze, 3x3, shortcut)."""
    defs = [_conv(32, 3)]
    for filters, blocks in ((64, 1), (128, 2), (256, 8), (512, 8), (1024, 4)):
        defs.append(_conv(filters, 3, stride=2))
        for _ in range(blocks):
            defs += [
                _conv(filters // 2, 1),
                _conv(filters, 3),
                {"type": "shortcut", "from": [-3], "activation": "linear"},
            ]
    return defs


def _spp() -> list[dict[str, Any]]:
    """Spatial pyramid pooling: max-pools of 5, 9, 13 concatenated with their input."""
    pool = lambda k: {"type": "maxpool", "stride": 1, "size": k}  # noqa: E731
    return [
        pool(5),
        {"type": "route", "layers": [-2]},
        pool(9),
        {"type": "route", "layers": [-4]},
        pool(13),
        {"type": "route", "layers": [-1, -3, -5, -6]},
    ]


def _yolov3(nc: int, spp: bool, net: dict[str, Any]) -> list[dict[str, Any]]:
    defs = [net, *_darknet53()]
    # the backbone outputs concatenated into the upsampled paths (0-based module_list indices)
    stride16_out, stride8_out = 61, 36
    for scale, (filters, mask) in enumerate(((512, [6, 7, 8]), (256, [3, 4, 5]), (128, [0, 1, 2]))):
        if scale:  # upsample the previous scale's features and concat with the backbone's
            route_from = stride16_out if scale == 1 else stride8_out
            defs += [
                {"type": "route", "layers": [-4]},
                _conv(filters, 1),
                {"type": "upsample", "stride": 2},
                {"type": "route", "layers": [-1, route_from]},
            ]
        neck = [_conv(filters, 1), _conv(filters * 2, 3), _conv(filters, 1)]
        if spp and scale == 0:
            neck += _spp() + [_conv(filters, 1)]
        neck += [_conv(filters * 2, 3), _conv(filters, 1), _conv(filters * 2, 3)]
        defs += neck + [_head_conv(len(mask), nc), _yolo(mask, YOLOV3_ANCHORS, nc)]
    return defs


def yolov3(nc: int = 80) -> list[dict[str, Any]]:
    """YOLOv3 (Darknet-53, three scales, strides 32/16/8)."""
    return _yolov3(nc, spp=False, net=_net(16, 1, 416))


def yolov3_spp(nc: int = 80) -> list[dict[str, Any]]:
    """YOLOv3 with spatial pyramid pooling in the stride-32 neck."""
    return _yolov3(nc, spp=True, net=_net(64, 16, 608))


def yolov3_tiny(nc: int = 80) -> list[dict[str, Any]]:
    """YOLOv3-tiny: a 7-conv max-pool backbone and two scales (strides 32/16)."""
    defs = [_net(1, 1, 416)]
    for filters in (16, 32, 64, 128, 256):
        defs += [_conv(filters, 3), {"type": "maxpool", "size": 2, "stride": 2}]
    defs += [_conv(512, 3), {"type": "maxpool", "size": 2, "stride": 1}, _conv(1024, 3)]
    defs += [_conv(256, 1), _conv(512, 3), _head_conv(3, nc), _yolo([3, 4, 5], TINY_ANCHORS, nc)]
    defs += [
        {"type": "route", "layers": [-4]},
        _conv(128, 1),
        {"type": "upsample", "stride": 2},
        {"type": "route", "layers": [-1, 8]},
        _conv(256, 3),
        _head_conv(3, nc),
        _yolo([1, 2, 3], TINY_ANCHORS, nc),
    ]  # mask 1,2,3 as in Darknet's own file
    return defs


SHIPPED: dict[str, Callable[[int], list[dict[str, Any]]]] = {
    "yolov3": yolov3,
    "yolov3-spp": yolov3_spp,
    "yolov3-tiny": yolov3_tiny,
}


def shipped_cfg(name: str, nc: int = 80) -> str:
    """Darknet cfg text of a shipped architecture (e.g. to write it to a file)."""
    if name not in SHIPPED:
        raise ValueError(f"name: expected one of {sorted(SHIPPED)}, got {name!r}")
    return format_cfg(SHIPPED[name](nc))
