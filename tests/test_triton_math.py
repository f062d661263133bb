"""The Triton building blocks one by one (``yolo_kernels/triton/math.py``: ``bce_with_logits``,
``predicted_box`` + ``box_iou`` with their dual-number gradients, ``match``, ``atan``), each run
through a small probe kernel and compared with PyTorch / the reference: under the interpreter on
CPU, on CUDA when present."""

import pytest
import torch

import yolo_kernels as yk
from yolo_kernels.triton import IMPORT_ERROR, interpreter_active

pytestmark = pytest.mark.skipif(IMPORT_ERROR is not None, reason=f"triton backend unavailable: {IMPORT_ERROR}")

if IMPORT_ERROR is None:
    import triton
    import triton.language as tl

    from yolo_kernels.triton import math as tmath

    @triton.jit
    def _bce_probe(x_ptr, y_ptr, loss_ptr, grad_ptr, n, pos_weight, gamma, FOCAL: tl.constexpr, BLOCK: tl.constexpr):
        k = tl.arange(0, BLOCK)
        m = k < n
        loss, grad = tmath.bce_with_logits(
            tl.load(x_ptr + k, mask=m, other=0.0), tl.load(y_ptr + k, mask=m, other=0.0), pos_weight, gamma, FOCAL
        )
        tl.store(loss_ptr + k, loss, mask=m)
        tl.store(grad_ptr + k, grad, mask=m)

    @triton.jit
    def _box_iou_probe(
        x_ptr, anchor_ptr, tbox_ptr, out_ptr, n, KIND: tl.constexpr, FAMILY: tl.constexpr, BLOCK: tl.constexpr
    ):
        k = tl.arange(0, BLOCK)
        m = k < n
        x0 = tl.load(x_ptr + 4 * k, mask=m, other=0.0)
        x1 = tl.load(x_ptr + 4 * k + 1, mask=m, other=0.0)
        x2 = tl.load(x_ptr + 4 * k + 2, mask=m, other=0.0)
        x3 = tl.load(x_ptr + 4 * k + 3, mask=m, other=0.0)
        tx = tl.load(tbox_ptr + 4 * k, mask=m, other=0.5)
        ty = tl.load(tbox_ptr + 4 * k + 1, mask=m, other=0.5)
        tw = tl.load(tbox_ptr + 4 * k + 2, mask=m, other=1.0)
        th = tl.load(tbox_ptr + 4 * k + 3, mask=m, other=1.0)
        aw = tl.load(anchor_ptr + 2 * k, mask=m, other=1.0)
        ah = tl.load(anchor_ptr + 2 * k + 1, mask=m, other=1.0)
        v, d0, d1, d2, d3 = tmath.box_iou(x0, x1, x2, x3, aw, ah, tx, ty, tw, th, KIND, FAMILY)
        tl.store(out_ptr + 5 * k, v, mask=m)
        tl.store(out_ptr + 5 * k + 1, d0, mask=m)
        tl.store(out_ptr + 5 * k + 2, d1, mask=m)
        tl.store(out_ptr + 5 * k + 3, d2, mask=m)
        tl.store(out_ptr + 5 * k + 4, d3, mask=m)

    @triton.jit
    def _match_probe(
        t_ptr, anchor_ptr, block_ptr, out_ptr, n, grid_h, grid_w, threshold, FAMILY: tl.constexpr, BLOCK: tl.constexpr
    ):
        k = tl.arange(0, BLOCK)
        m = k < n
        aw = tl.load(anchor_ptr + 2 * k, mask=m, other=1.0)
        ah = tl.load(anchor_ptr + 2 * k + 1, mask=m, other=1.0)
        block = tl.load(block_ptr + k, mask=m, other=0)
        ok, b, c, gj, gi, tx, ty, gw, gh = tmath.match(
            t_ptr + 6 * k, aw, ah, grid_h, grid_w, threshold, m, block, tl.float32, FAMILY
        )
        row = out_ptr + 9 * k
        tl.store(row, ok.to(tl.float32), mask=m)
        tl.store(row + 1, b.to(tl.float32), mask=m)
        tl.store(row + 2, c.to(tl.float32), mask=m)
        tl.store(row + 3, gj.to(tl.float32), mask=m)
        tl.store(row + 4, gi.to(tl.float32), mask=m)
        tl.store(row + 5, tx, mask=m)
        tl.store(row + 6, ty, mask=m)
        tl.store(row + 7, gw, mask=m)
        tl.store(row + 8, gh, mask=m)

    @triton.jit
    def _atan_probe(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
        k = tl.arange(0, BLOCK)
        m = k < n
        tl.store(out_ptr + k, tmath.atan(tl.load(x_ptr + k, mask=m, other=0.0)), mask=m)


DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(not interpreter_active(), reason="TRITON_INTERPRET=1 not set")),
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("pos_weight, gamma", [(1.0, 0.0), (2.5, 0.0), (1.0, 1.5), (0.7, 2.0)])
def test_bce_with_logits(device, pos_weight, gamma, gen):
    x = torch.cat((torch.randn(100, generator=gen) * 6, torch.tensor([0.0, 30.0, -30.0, 1e4, -1e4])))
    y = torch.rand(x.numel(), generator=gen).round()
    y[::3] = 0.05  # smoothed targets too
    loss, grad = torch.empty_like(x), torch.empty_like(x)
    args = [t.to(device) for t in (x, y, loss, grad)]
    _bce_probe[(1,)](*args, x.numel(), pos_weight, gamma, FOCAL=gamma > 0, BLOCK=128)
    xr = x.double().requires_grad_()
    bce = torch.nn.BCEWithLogitsLoss(reduction="none", pos_weight=torch.tensor(pos_weight, dtype=torch.float64))
    want = yk.reference.FocalLoss(bce, gamma=gamma)(xr, y.double()) if gamma > 0 else bce(xr, y.double())
    want.sum().backward()
    torch.testing.assert_close(args[2].cpu().double(), want.detach(), rtol=2e-6, atol=1e-6)
    torch.testing.assert_close(args[3].cpu().double(), xr.grad, rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("family", yk.FAMILIES)
@pytest.mark.parametrize("kind", yk.BOX_LOSSES)
def test_predicted_box_and_box_iou_with_gradient(device, kind, family, gen):
    n = 64
    x = torch.randn(n, 4, generator=gen) * 1.5
    anchors = torch.rand(n, 2, generator=gen) * 3 + 0.3
    tbox = torch.cat((torch.rand(n, 2, generator=gen), torch.rand(n, 2, generator=gen) * 3 + 0.2), 1)
    out = torch.empty(n, 5)
    args = [t.to(device) for t in (x, anchors, tbox, out)]
    kernels = yk.triton.anchor_loss
    _box_iou_probe[(1,)](*args, n, KIND=kernels.KINDS[kind], FAMILY=kernels.FAMILIES[family], BLOCK=64)
    xr = x.double().requires_grad_()
    if family == "yolov5":  # written out here, independent of reference.predicted_box
        pxy = xr[:, :2].sigmoid() * 2 - 0.5
        pwh = (xr[:, 2:4].sigmoid() * 2) ** 2 * anchors.double()
    else:
        pxy = xr[:, :2].sigmoid()
        pwh = torch.exp(xr[:, 2:4].clamp(max=30)).clamp(max=1e3) * anchors.double()
    iou = yk.reference.box_iou(torch.cat((pxy, pwh), 1), tbox.double(), kind, family)
    iou.sum().backward()
    got = args[3].cpu().double()
    torch.testing.assert_close(got[:, 0], iou.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[:, 1:], xr.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_match(device, gen):
    n, ny, nx, iou_t = 40, 5, 7, 0.2
    t = torch.cat(
        (
            torch.randint(0, 3, (n, 2), generator=gen).float(),
            torch.rand(n, 2, generator=gen) * 1.2 - 0.1,
            torch.rand(n, 2, generator=gen) * 0.6 + 0.01,
        ),
        1,
    )
    t[0, 2:4] = torch.tensor([1.0, 1.0])  # the far edge: the last cell, offset 1.0
    anchors = torch.rand(n, 2, generator=gen) * 3 + 0.2
    out = torch.empty(n, 9)
    args = [v.to(device) for v in (t, anchors, torch.zeros(n, dtype=torch.int64), out)]
    _match_probe[(1,)](*args, n, ny, nx, iou_t, FAMILY=0, BLOCK=64, enable_fp_fusion=False)
    got = args[3].cpu()
    gw, gh = t[:, 4] * nx, t[:, 5] * ny
    inter = torch.min(anchors[:, 0], gw) * torch.min(anchors[:, 1], gh)
    wh_iou = inter / (anchors.prod(1) + gw * gh - inter)
    gi = (t[:, 2] * nx).clamp(0, nx - 1).long()
    gj = (t[:, 3] * ny).clamp(0, ny - 1).long()
    assert torch.equal(got[:, 0].bool(), wh_iou > iou_t)
    assert (
        torch.equal(got[:, 1:3], t[:, :2]) and torch.equal(got[:, 3].long(), gj) and torch.equal(got[:, 4].long(), gi)
    )
    torch.testing.assert_close(got[:, 5], t[:, 2] * nx - gi)
    torch.testing.assert_close(got[:, 6], t[:, 3] * ny - gj)
    torch.testing.assert_close(got[:, 7:], torch.stack((gw, gh), 1))
    assert got[0, 3] == ny - 1 and got[0, 4] == nx - 1 and got[0, 5] == 1.0


@pytest.mark.parametrize("device", DEVICES)
def test_atan(device):
    x = torch.cat((torch.linspace(-50, 50, 401), torch.tensor([0.0, 1e-30, 1e30, -1e30, 0.41421356, 2.4142135])))
    out = torch.empty_like(x, device=device)
    _atan_probe[(1,)](x.to(device), out, x.numel(), BLOCK=512)
    torch.testing.assert_close(out.cpu().double(), torch.atan(x.double()), rtol=0, atol=2e-7)


@pytest.mark.parametrize("device", DEVICES)
def test_match_yolov5(device, gen):
    """Lane k holds block k // nt of target k % nt: the matched lanes, in order, are the
    reference's pairs (one anchor), neighbour cells and edges included."""
    nt, ny, nx, anchor_t = 12, 6, 8, 4.0
    t = torch.cat(
        (
            torch.randint(0, 3, (nt, 2), generator=gen).float(),
            torch.rand(nt, 2, generator=gen),
            torch.rand(nt, 2, generator=gen) * 0.6 + 0.01,
        ),
        1,
    )
    t[0, 2:4] = torch.tensor([1.0, 0.0])  # the edges
    t[1, 2:4] = torch.tensor([4.0 / nx, 2.5 / ny])  # an integer x (both x neighbours), a .5 fraction in y
    t[2, 2:4] = torch.tensor([1.0 / nx, (ny - 1.0) / ny])  # exactly one cell from an edge
    anchor = torch.tensor([[1.5, 1.0]])
    out = torch.empty(5 * nt, 9)
    block = torch.arange(5 * nt) // nt
    lanes = (t.repeat(5, 1), anchor.repeat(5 * nt, 1), block, out)
    args = [v.to(device) for v in lanes]
    _match_probe[(1,)](*args, 5 * nt, ny, nx, anchor_t, FAMILY=1, BLOCK=64, enable_fp_fusion=False)
    got = args[3].cpu()
    got = got[got[:, 0].bool()]
    want = yk.reference.match_yolov5((ny, nx), t, anchor, anchor_t)
    assert got.shape[0] == want.b.numel() > nt
    assert torch.equal(got[:, 1].long(), want.b) and torch.equal(got[:, 2].long(), want.tcls)
    assert torch.equal(got[:, 3].long(), want.gj) and torch.equal(got[:, 4].long(), want.gi)
    torch.testing.assert_close(got[:, 5:], want.tbox, rtol=0, atol=0)
