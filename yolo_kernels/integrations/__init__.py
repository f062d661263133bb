"""One-call integrations of the fused loss into other projects' training code.

``yolo_kernels.integrations.ultralytics``: ultralytics/yolov3 (archive branch, v8).
"""
