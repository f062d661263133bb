"""The base of the anchor-based loss modules (``YOLOv3Loss``, ``YOLOv5Loss``): per-layer anchors
kept as grid-unit buffers with their strides, and the options."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn

from ..config import is_real_number
from .options import LossOptions, as_anchor_list

__all__ = ["AnchoredLoss"]


class AnchoredLoss(nn.Module):
    """What the loss modules share: per-layer anchors given in pixels with their strides, kept as
    grid-unit buffers (``model.to(device)`` moves them), and the options."""

    options: LossOptions

    def _set_anchors(self, anchors: Sequence[Any], strides: Sequence[float]) -> None:
        anchors = as_anchor_list(anchors)
        strides = list(strides) if isinstance(strides, (list, tuple)) else strides
        if not isinstance(strides, list) or len(strides) != len(anchors):
            raise ValueError(f"strides: expected {len(anchors)} strides (one per anchor set), got {strides!r}")
        for i, s in enumerate(strides):
            if not is_real_number(s) or not s > 0:
                raise ValueError(f"strides[{i}]: expected a positive number, got {s!r}")
        self.strides = [float(s) for s in strides]
        #: the strides the grids of ``p`` are checked against (one image size), or None: no check
        self.grid_strides: list[float] | None = list(self.strides)
        for i, (a, s) in enumerate(zip(anchors, self.strides)):
            self.register_buffer(f"anchor_vec{i}", a.detach().to(torch.float32) / s, persistent=False)
        self.nl = len(anchors)

    @property
    def anchor_vecs(self) -> list[torch.Tensor]:
        """Per-layer anchors in grid units (pixels / stride)."""
        return [getattr(self, f"anchor_vec{i}") for i in range(self.nl)]

    @property
    def nc(self) -> int:
        return self.options.nc
