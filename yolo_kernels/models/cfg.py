"""Darknet ``.cfg`` files: parsing into module definitions and writing them back.

A module definition is a dict with ``'type'`` (the block name) and the block's fields:
``anchors`` as a float ``[n, 2]`` numpy array, ``layers``/``from``/``mask`` (and a multi-kernel
``size``) as int lists, other numbers as int or float, everything else as a stripped string.
The first definition is the ``[net]`` block (training settings, not checked).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

__all__ = ["SUPPORTED_FIELDS", "parse_model_cfg", "parse_cfg_text", "format_cfg"]

#: Fields accepted in layer blocks (those of ultralytics/yolov3's parser); others are rejected.
SUPPORTED_FIELDS = frozenset(
    [
        "type",
        "batch_normalize",
        "filters",
        "size",
        "stride",
        "pad",
        "activation",
        "layers",
        "groups",
        "from",
        "mask",
        "anchors",
        "classes",
        "num",
        "jitter",
        "ignore_thresh",
        "truth_thresh",
        "random",
        "stride_x",
        "stride_y",
        "weights_type",
        "weights_normalization",
        "scale_x_y",
        "beta_nms",
        "nms_kind",
        "iou_loss",
        "iou_normalizer",
        "cls_normalizer",
        "iou_thresh",
        "probability",
    ]
)
_INT_LIST_FIELDS = ("from", "layers", "mask")


def _number_or_string(text: str) -> Any:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _parse_value(key: str, text: str, where: str) -> Any:
    try:
        if key == "anchors":
            return np.array([float(x) for x in text.split(",") if x.strip()], dtype=np.float64).reshape(-1, 2)
        if key in _INT_LIST_FIELDS or (key == "size" and "," in text):
            return [int(x) for x in text.split(",") if x.strip()]
    except ValueError as e:
        raise ValueError(f"{where}: cannot parse {key}={text!r}: {e}") from None
    return _number_or_string(text)


def parse_cfg_text(text: str, source: str = "<cfg text>") -> list[dict[str, Any]]:
    """Parse Darknet cfg text into module definitions (``[net]`` first)."""
    mdefs: list[dict[str, Any]] = []
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        where = f"{source}:{lineno}"
        if line.startswith("["):
            if not line.endswith("]"):
                raise ValueError(f"{where}: expected a block header like [convolutional], got {line!r}")
            block = {"type": line[1:-1].strip()}
            if block["type"] == "convolutional":
                block["batch_normalize"] = 0  # absent means no batch norm
            mdefs.append(block)
            continue
        if "=" not in line:
            raise ValueError(f"{where}: expected 'key=value', got {line!r}")
        if not mdefs:
            raise ValueError(f"{where}: 'key=value' line before any [block] header")
        key, value = (s.strip() for s in line.split("=", 1))
        mdefs[-1][key] = _parse_value(key, value, where)

    if not mdefs:
        raise ValueError(f"{source}: no [blocks] found")
    unsupported = sorted({k for block in mdefs[1:] for k in block} - SUPPORTED_FIELDS)
    if unsupported:
        raise ValueError(f"{source}: unsupported fields {unsupported}; supported: {sorted(SUPPORTED_FIELDS)}")
    return mdefs


def parse_model_cfg(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Parse the Darknet cfg file at ``path`` (``.cfg`` appended when missing)."""
    path = os.fspath(path)
    if not path.endswith(".cfg") and not os.path.exists(path):
        path += ".cfg"
    if not os.path.isfile(path):
        raise FileNotFoundError(f"cfg: no such file {path!r}")
    with open(path, encoding="utf-8") as f:
        return parse_cfg_text(f.read(), source=path)


def _format_value(value: Any) -> str:
    if isinstance(value, np.ndarray):
        return ",  ".join(",".join(f"{x:g}" for x in pair) for pair in value.reshape(-1, 2))
    if isinstance(value, (list, tuple)):
        return ",".join(str(x) for x in value)
    if isinstance(value, float):
        return repr(value)
    return str(value)


def format_cfg(mdefs: list[dict[str, Any]]) -> str:
    """Darknet cfg text for module definitions; ``parse_cfg_text(format_cfg(d)) == d``."""
    blocks = []
    for block in mdefs:
        lines = [f"[{block['type']}]"]
        lines += [f"{k}={_format_value(v)}" for k, v in block.items() if k != "type"]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n"
