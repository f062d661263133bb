"""The anchor-free loss family: ultralytics' YOLOv8 / YOLO11 / YOLO26 detection loss.

``options`` (what a head and the hyperparameters fix), ``reference`` (the plain PyTorch oracle),
``validate`` (the input checks), ``backends`` (the registry), ``yolov8`` (the drop-ins, imported
as ``yolo_kernels.yolov8``).
"""
