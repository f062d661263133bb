"""One-call integrations of the fused loss into other projects' training code.

``yolo_kernels.integrations.ultralytics``: the ``ultralytics`` package's detection criterion and
ultralytics/yolov3 (archive branch, v8)'s ``compute_loss``.
"""

from . import ultralytics

__all__ = ["ultralytics"]
