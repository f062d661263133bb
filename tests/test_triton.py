"""What is specific to the Triton launcher: the gradient's layout, the no-gradient path, and the
linear cost of matching and duplicates (under the interpreter). Its parity with the reference is
in ``test_fused_loss.py``, its building blocks in ``test_triton_math.py``, its compilation for
real GPUs in ``test_compile_gate.py``. Under the interpreter on CPU, and on CUDA when present."""

import pytest
import torch
from helpers import make_p, make_targets, random_anchors

from yolo_kernels.config import LossOptions
from yolo_kernels.triton import interpreter_active
from yolo_kernels.triton import loss as triton_loss

DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(not interpreter_active(), reason="TRITON_INTERPRET=1 not set")),
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")),
]


@pytest.mark.parametrize("device", DEVICES)
def test_gradient_keeps_the_layout_of_p(device, gen):
    nc, na, ny, nx, bs = 4, 2, 3, 4, 2
    conv = torch.randn(bs, na * (nc + 5), ny, nx, generator=gen, device=device)
    p = conv.view(bs, na, nc + 5, ny, nx).permute(0, 1, 3, 4, 2)  # the head's view: channel stride ny * nx
    anchors = [a.to(device) for a in random_anchors([na], gen)]
    targets = make_targets(5, bs, nc, gen).to(device)
    _, _, _, _, grads = triton_loss.fused_loss([p], targets, anchors, LossOptions(nc=nc))
    assert grads[0].stride() == p.stride()


@pytest.mark.parametrize("device", DEVICES)
def test_without_gradient_no_gradient_is_allocated(device, gen):
    p = [x.to(device) for x in make_p(1, [2], [(3, 3)], 2, gen)]
    targets = make_targets(3, 1, 2, gen).to(device)
    anchors = [a.to(device) for a in random_anchors([2], gen)]
    _, items, _, _, grads = triton_loss.fused_loss(p, targets, anchors, LossOptions(nc=2), compute_grad=False)
    _, items_grad, _, _, _ = triton_loss.fused_loss(p, targets, anchors, LossOptions(nc=2), compute_grad=True)
    assert grads[0].numel() == 0 and torch.equal(items, items_grad)


@pytest.mark.skipif(not interpreter_active(), reason="counts the interpreter's loop iterations")
def test_matching_and_duplicates_are_linear_in_the_pairs(monkeypatch):
    """Loop iterations of every kernel, counted by shadowing ``range`` in the kernels' module (the
    interpreter runs the kernels as Python): 4x the targets must cost about 4x, not 16x. Targets
    are spread over a large grid, so the winning pairs grow with the targets (the case where a
    per-winner scan of all candidates is quadratic), and clustered, so that duplicates abound."""
    import builtins

    iterations = []

    def counting_range(*args):
        r = builtins.range(*args)
        iterations[-1] += len(r)
        return r

    monkeypatch.setattr(triton_loss, "range", counting_range, raising=False)
    g = torch.Generator().manual_seed(0)
    anchors = [torch.ones(3, 2)]  # every target matches every anchor: P = 3 nt pairs
    p = make_p(2, [3], [(32, 32)], 3, g)
    for nt in (128, 512):
        iterations.append(0)
        spread = make_targets(nt // 2, 2, 3, g, lo=0.02, hi=0.04)
        clustered = spread.clone()
        clustered[:, 2:4] = 0.5 + 0.01 * torch.rand(nt // 2, 2, generator=g)  # a handful of cells
        triton_loss.fused_loss(p, torch.cat((spread, clustered)), anchors, LossOptions(nc=3))
    small, large = iterations
    assert large <= 4.5 * small, iterations
    # per pair: one step of its group's box walk and one of its class walk; per winner one class chunk
    assert large <= 3 * (3 * 512) + 64, iterations
