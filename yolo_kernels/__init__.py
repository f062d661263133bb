"""yolo_kernels: the YOLO training losses (YOLOv3 archive, YOLOv5-style, the ultralytics
package's anchor-free YOLOv8 / YOLO11 / YOLO26) with fused kernels, their pure-PyTorch oracles and
the YOLOv3 model.

import yolo_kernels as yk
loss, loss_items = yk.compute_loss(p, targets, model)          # ultralytics/yolov3 (archive) drop-in
crit = yk.YOLOv3Loss(anchors, strides, num_classes)            # the same as a module
compute_loss = yk.yolov5.ComputeLoss(model)                    # ultralytics/yolov5 drop-in
crit = yk.YOLOv5Loss(anchors, strides, num_classes)            # the same as a module
criterion = yk.yolov8.DetectionLoss(model)                     # ultralytics v8DetectionLoss drop-in
yk.integrations.ultralytics.apply()                            # the ultralytics trainer uses them
"""

from . import cpp, integrations, loss, models, ops, reference, stats, triton, yolov5, yolov8
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
    "yolov8",
]
