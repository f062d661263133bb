"""The anchor-free loss family: ultralytics' YOLOv8 / YOLO11 / YOLO26 detection loss.

``options`` (what a head and the hyperparameters fix), ``reference`` (the plain PyTorch oracle),
``validate`` (the input checks), ``backends`` (the registry). The public drop-ins live in
``yolo_kernels.yolov8``.
"""
