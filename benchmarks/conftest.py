import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

from yolo_kernels.bench import yolov3_inputs, yolov5_inputs, yolov8_inputs

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def bench_batches():
    """Batch sizes to measure: YK_BENCH_BATCHES="1,16,64" (default); the test run uses a small one."""
    return [int(b) for b in os.environ.get("YK_BENCH_BATCHES", "1,16,64").split(",")]


def bench_imgs():
    """Image sizes: 416, and 640 on a GPU (YK_BENCH_IMGS overrides)."""
    default = "416,640" if DEVICE == "cuda" else "416"
    return [int(i) for i in os.environ.get("YK_BENCH_IMGS", default).split(",")]


def bench_targets():
    """Targets per image: YK_BENCH_TARGETS="10,100,500" (default; 100 and 500 are dense scenes)."""
    return [int(t) for t in os.environ.get("YK_BENCH_TARGETS", "10,100,500").split(",")]


@pytest.fixture(
    scope="module",
    params=[(b, i, t) for i in bench_imgs() for b in bench_batches() for t in bench_targets()],
    ids=lambda bit: f"batch{bit[0]}-img{bit[1]}-targets{bit[2]}",
)
def yolov3_batch(request):
    batch, img, targets_per_image = request.param
    return yolov3_inputs(batch, img, targets_per_image, device=DEVICE)


def bench_imgs_yolov5():
    """Image sizes of the YOLOv5-style loss: 640, its default (YK_BENCH_IMGS_V5 overrides)."""
    return [int(i) for i in os.environ.get("YK_BENCH_IMGS_V5", "640").split(",")]


@pytest.fixture(
    scope="module",
    params=[(b, i, t) for i in bench_imgs_yolov5() for b in bench_batches() for t in bench_targets()],
    ids=lambda bit: f"batch{bit[0]}-img{bit[1]}-targets{bit[2]}",
)
def yolov5_batch(request):
    """``(anchors, p, targets)``: YOLOv5s's heads (strides 8, 16, 32) and anchors."""
    batch, img, targets_per_image = request.param
    return yolov5_inputs(batch, img, targets_per_image, device=DEVICE)


def bench_imgs_yolov8():
    """Image sizes of the anchor-free loss: 640, its default (YK_BENCH_IMGS_V8 overrides)."""
    return [int(i) for i in os.environ.get("YK_BENCH_IMGS_V8", "640").split(",")]


@pytest.fixture(
    scope="module",
    params=[(b, i, t) for i in bench_imgs_yolov8() for b in bench_batches() for t in bench_targets()],
    ids=lambda bit: f"batch{bit[0]}-img{bit[1]}-targets{bit[2]}",
)
def yolov8_batch(request):
    """``(model, p, feats, targets)``: a YOLOv8 head (80 classes, reg_max 16, strides 8, 16, 32)."""
    batch, img, targets_per_image = request.param
    return yolov8_inputs(batch, img, targets_per_image, device=DEVICE)
