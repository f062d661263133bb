"""The anchor-free family's backends and its registry (``dispatch.resolve_backend`` picks one).

A backend here has ``name``, ``unavailable_reason(device)`` and
``loss(problem, options, class_weights) -> [box, cls, dfl]`` (gains applied, differentiable with
respect to ``problem.boxes`` and ``problem.scores``).
"""

from __future__ import annotations

from typing import Any

import torch

from . import reference
from .options import DetectionOptions
from .validate import Problem

__all__ = ["AUTO_ORDER", "BACKENDS", "ReferenceBackend"]


class ReferenceBackend:
    """Plain PyTorch (``yolo_kernels.anchor_free.reference``): any device, any floating dtype."""

    name = "reference"

    def unavailable_reason(self, device: torch.device | None) -> str | None:
        return None

    def loss(self, problem: Problem, options: DetectionOptions, class_weights: torch.Tensor | None) -> torch.Tensor:
        return reference.loss(
            problem.boxes,
            problem.scores,
            problem.grids,
            problem.batch_idx,
            problem.cls,
            problem.bboxes,
            options,
            class_weights,
        )


BACKENDS: dict[str, Any] = {"reference": ReferenceBackend()}
#: What ``backend="auto"`` tries first, by device type, before the reference.
AUTO_ORDER: dict[str, tuple[str, ...]] = {}
