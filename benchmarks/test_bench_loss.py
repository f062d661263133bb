"""The loss side by side: original, reference, each fused backend, the floor.

    make bench          # = pytest benchmarks --benchmark-only ... (batch 16 and 64, YOLOv3 at 416)

Modes: forward + backward (a training step's loss), and forward alone. The floor is zero-filling
existing buffers of p's size (what writing the gradient costs at least); fresh zeros_like shows
what a new gradient-sized allocation costs under the default glibc allocator (page faults).
Ratios (x floor, speed-up over the original) come from the medians of one run; no timing is
asserted.
"""

import pytest
import torch

import original
import yolo_kernels as yk


MODES = ["forward+backward", "forward"]


def make_step(loss_fn, p, mode):
    def step():
        for x in p:
            x.grad = None
        loss, _ = loss_fn()
        if mode == "forward+backward":
            loss.backward()

    return step


def _record(benchmark, p):
    benchmark.extra_info.update(
        shapes=[list(x.shape) for x in p], dtype=str(p[0].dtype), threads=torch.get_num_threads(),
        torch=torch.__version__,
    )  # fmt: skip


@pytest.mark.parametrize("mode", MODES)
def test_original(benchmark, yolov3_batch, mode):
    model, p, targets = yolov3_batch
    _record(benchmark, p)
    benchmark(make_step(lambda: original.compute_loss(p, targets, model), p, mode))


@pytest.mark.parametrize("mode", MODES)
# triton on CPU tensors is the interpreter (a test tool): not timed
@pytest.mark.parametrize("backend", [b for b in yk.available_backends("cpu") if b != "triton"])
def test_backend(benchmark, yolov3_batch, backend, mode):
    model, p, targets = yolov3_batch
    _record(benchmark, p)
    benchmark(make_step(lambda: yk.compute_loss(p, targets, model, backend=backend), p, mode))


def test_floor_zero_fill(benchmark, yolov3_batch):
    _, p, _ = yolov3_batch
    buffers = [torch.empty_like(x) for x in p]
    _record(benchmark, p)
    benchmark(lambda: [b.zero_() for b in buffers])


def test_fresh_zeros_like(benchmark, yolov3_batch):
    _, p, _ = yolov3_batch
    _record(benchmark, p)
    benchmark(lambda: [torch.zeros_like(x) for x in p])


def test_original_and_reference_agree(yolov3_batch):
    """The baseline is timed only because it computes the same loss (no duplicates-order issue on CPU)."""
    model, p, targets = yolov3_batch
    a = original.compute_loss(p, targets, model)[1]
    b = yk.compute_loss(p, targets, model, backend="reference")[1]
    assert torch.allclose(a, b, rtol=1e-5)
