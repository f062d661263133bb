"""The anchor-based loss families: the YOLOv3 archive loss (``compute_loss``) and the YOLOv5-style
``ComputeLoss``, which share matching structure, backends and ops (``options.family`` picks).

``options`` (hyperparameters and what is read from a model), ``reference`` (the plain PyTorch
oracle), ``validate`` (the input checks), ``backends`` (the registry and ``run_backend``),
``module`` (the loss modules' base), ``yolov3`` and ``yolov5`` (the public APIs, imported as
``yolo_kernels.loss`` / ``yolo_kernels.yolov5``).
"""
