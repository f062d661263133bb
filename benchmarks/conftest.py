import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

import yolo_kernels as yk  # noqa: E402


def bench_batches():
    """Batch sizes to measure: YK_BENCH_BATCHES="16,64" (default); the test run uses a small one."""
    return [int(b) for b in os.environ.get("YK_BENCH_BATCHES", "16,64").split(",")]


def yolov3_inputs(batch, img=416, targets_per_image=10, seed=0):
    """YOLOv3-shaped head outputs (no network run: the loss's cost does not depend on the values)."""
    g = torch.Generator().manual_seed(seed)
    model = yk.models.Darknet("yolov3")
    p = []
    for j in model.yolo_layers:
        head = model.module_list[j]
        n = img // head.stride
        x = torch.randn(batch, head.na, n, n, head.no, generator=g) * 0.5
        x[..., 4] -= 4.5  # the head's initial objectness bias
        p.append(x.requires_grad_())
    nt = batch * targets_per_image
    boxes = torch.rand(nt, 4, generator=g)
    boxes[:, 2:] = boxes[:, 2:] * 0.5 + 0.02
    classes = torch.randint(0, model.nc, (nt, 1), generator=g).float()
    image = torch.arange(batch).repeat_interleave(targets_per_image)[:, None].float()
    return model, p, torch.cat((image, classes, boxes), 1)


@pytest.fixture(scope="module", params=bench_batches(), ids=lambda b: f"batch{b}")
def yolov3_batch(request):
    return yolov3_inputs(request.param)
