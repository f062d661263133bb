"""yolo_kernels: the YOLOv3 training loss with fused kernels, its pure-PyTorch oracle and the model.

import yolo_kernels as yk
loss, loss_items = yk.compute_loss(p, targets, model)          # ultralytics drop-in
crit = yk.YOLOv3Loss(anchors, strides, num_classes)            # the same as a module
"""

from . import integrations, models, ops, reference
from .config import (
    BOX_LOSSES,
    DEFAULT_HYP,
    REDUCTIONS,
    BackendUnavailableError,
    LossOptions,
    MissingHyperparameterError,
)
from .loss import YOLOv3Loss, available_backends, build_targets, compute_loss

__version__ = "0.1.0"

__all__ = [
    "BOX_LOSSES",
    "DEFAULT_HYP",
    "REDUCTIONS",
    "BackendUnavailableError",
    "LossOptions",
    "MissingHyperparameterError",
    "YOLOv3Loss",
    "available_backends",
    "build_targets",
    "compute_loss",
    "integrations",
    "models",
    "ops",
    "reference",
]
