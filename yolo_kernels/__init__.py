"""yolo_kernels: the YOLOv3 and YOLOv5-style training losses with fused kernels, their pure-PyTorch
oracle and the YOLOv3 model.

import yolo_kernels as yk
loss, loss_items = yk.compute_loss(p, targets, model)          # ultralytics/yolov3 (archive) drop-in
crit = yk.YOLOv3Loss(anchors, strides, num_classes)            # the same as a module
compute_loss = yk.yolov5.ComputeLoss(model)                    # ultralytics/yolov5 drop-in
crit = yk.YOLOv5Loss(anchors, strides, num_classes)            # the same as a module
"""

from . import cpp, integrations, loss, models, ops, reference, stats, triton, yolov5
from .anchor.options import BOX_LOSSES, DEFAULT_HYP, FAMILIES, REDUCTIONS, LossOptions
from .anchor.yolov3 import YOLOv3Loss, available_backends, build_targets, compute_loss
from .anchor.yolov5 import YOLOv5Loss
from .config import BackendUnavailableError, MissingHyperparameterError

__version__ = "0.1.0"

__all__ = [
    "BOX_LOSSES",
    "DEFAULT_HYP",
    "FAMILIES",
    "REDUCTIONS",
    "BackendUnavailableError",
    "LossOptions",
    "MissingHyperparameterError",
    "YOLOv3Loss",
    "YOLOv5Loss",
    "available_backends",
    "build_targets",
    "compute_loss",
    "cpp",
    "integrations",
    "loss",
    "models",
    "ops",
    "reference",
    "stats",
    "triton",
    "yolov5",
]
