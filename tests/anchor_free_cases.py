"""Inputs for the anchor-free family's tests: random head outputs and ultralytics-style batches, a
stand-in detection model, and the live original (``ultralytics==8.4.190``) when it is installed."""

from __future__ import annotations

import os
import types

import pytest
import torch
import torch.nn as nn

os.environ.setdefault("YOLO_OFFLINE", "1")  # the original must never reach for weights or settings online


def original():
    """``ultralytics.utils.loss`` of the pinned release, or skip (requirements-ultralytics.txt)."""
    loss = pytest.importorskip("ultralytics.utils.loss", reason="ultralytics (requirements-ultralytics.txt) missing")
    import ultralytics

    if ultralytics.__version__ != "8.4.190":
        pytest.skip(f"the tests compare with ultralytics 8.4.190, found {ultralytics.__version__}")
    return loss


def hyp(**gains):
    """The trainer's args as far as the loss reads them."""
    return types.SimpleNamespace(**{"box": 7.5, "cls": 0.5, "dfl": 1.5, "epochs": 100, **gains})


class Head(nn.Module):
    """The attributes of ultralytics' Detect head that the loss reads."""

    def __init__(self, nc: int, reg_max: int, strides):
        super().__init__()
        self.nc, self.reg_max = nc, reg_max
        self.register_buffer("stride", torch.tensor(strides, dtype=torch.float32))
        self.weight = nn.Parameter(torch.zeros(1))


class StandIn(nn.Module):
    """A detection model as the loss sees it: ``model[-1]`` the head, ``args`` the gains."""

    def __init__(self, nc: int = 5, reg_max: int = 16, strides=(8, 16, 32), **gains):
        super().__init__()
        self.model = nn.ModuleList([nn.Identity(), Head(nc, reg_max, strides)])
        self.args = hyp(**gains)


def grids_for(height: int, width: int, strides=(8, 16, 32)):
    return [(-(-height // int(s)), -(-width // int(s))) for s in strides]


def make_preds(bs, grids, nc, reg_max, generator, dtype=torch.float32, score_shift=-2.0):
    """A Detect head's training output: random box-bin and class logits, feature maps for shapes."""
    a = sum(ny * nx for ny, nx in grids)
    boxes = torch.randn(bs, 4 * reg_max, a, generator=generator, dtype=torch.float64)
    if reg_max == 1:  # distances in grid units, as a trained head gives (positive, a few cells)
        boxes = boxes.abs() * 2 + 0.5
    scores = torch.randn(bs, nc, a, generator=generator, dtype=torch.float64) * 2 + score_shift
    feats = [torch.zeros(bs, 1, ny, nx, dtype=dtype) for ny, nx in grids]
    return {"boxes": boxes.to(dtype), "scores": scores.to(dtype), "feats": feats}


def make_batch(counts, nc, generator, lo=0.02, hi=0.5, dtype=torch.float32):
    """An ultralytics batch with ``counts[i]`` boxes in image ``i`` (images in order, as collated)."""
    idx = torch.cat([torch.full((k,), float(i)) for i, k in enumerate(counts)]) if sum(counts) else torch.zeros(0)
    n = idx.shape[0]
    cls = torch.randint(0, nc, (n, 1), generator=generator).to(dtype)
    xy = torch.rand(n, 2, generator=generator, dtype=dtype)
    wh = torch.rand(n, 2, generator=generator, dtype=dtype) * (hi - lo) + lo
    return {"batch_idx": idx.to(dtype), "cls": cls, "bboxes": torch.cat((xy, wh), 1)}


def run(criterion, preds, batch):
    """``criterion(preds, batch)`` on fresh leaves: the loss, the items as floats, the gradients of
    ``loss.sum()`` (what the trainer backpropagates) with respect to every boxes/scores tensor."""
    leaves = []

    def fresh(d):
        out = dict(d)
        for key in ("boxes", "scores"):
            out[key] = d[key].detach().clone().requires_grad_(True)
            leaves.append(out[key])
        return out

    preds = {k: fresh(v) for k, v in preds.items()} if "one2one" in preds else fresh(preds)
    loss, items = criterion(preds, batch)
    loss.sum().backward()
    grads = [t.grad if t.grad is not None else torch.zeros_like(t) for t in leaves]
    return loss.detach(), {k: float(v) for k, v in items.items()}, grads


def assert_same(expected, actual, rtol=1e-5, grad_rtol=1e-4):
    """Loss within ``rtol`` (relative, per component), gradients within ``grad_rtol`` of their
    largest magnitude, the same item names and values."""
    (le, ie, ge), (la, ia, ga) = expected, actual
    assert le.dtype == la.dtype and le.shape == la.shape
    torch.testing.assert_close(la, le, rtol=rtol, atol=rtol * float(le.abs().max().clamp(min=1e-30)))
    assert list(ia) == list(ie)
    for k in ie:
        assert abs(ia[k] - ie[k]) <= rtol * max(abs(ie[k]), 1e-12) + 1e-12, (k, ia[k], ie[k])
    for e, a in zip(ge, ga):
        scale = float(e.abs().max().clamp(min=1e-30))
        torch.testing.assert_close(a.to(e.dtype), e, rtol=grad_rtol, atol=grad_rtol * scale)
