"""Shared test inputs: random layers and targets, and an ultralytics-style duck-typed model."""

from __future__ import annotations

import types

import torch

import yolo_kernels as yk


def make_targets(nt, bs, nc, generator=None, lo=0.02, hi=0.6, dtype=torch.float32):
    g = generator
    b = torch.randint(0, bs, (nt, 1), generator=g).to(dtype)
    c = torch.randint(0, nc, (nt, 1), generator=g).to(dtype)
    xy = torch.rand(nt, 2, generator=g, dtype=dtype)
    wh = torch.rand(nt, 2, generator=g, dtype=dtype) * (hi - lo) + lo
    return torch.cat((b, c, xy, wh), 1)


def make_p(bs, nas, grids, nc, generator=None, dtype=torch.float32, scale=1.0):
    return [
        (torch.randn(bs, na, ny, nx, nc + 5, generator=generator, dtype=torch.float64) * scale).to(dtype)
        for na, (ny, nx) in zip(nas, grids)
    ]


def random_anchors(nas, generator=None, lo=0.3, hi=4.0):
    return [torch.rand(na, 2, generator=generator) * (hi - lo) + lo for na in nas]


def duck_model(anchor_vecs, nc, hyp=None, gr=1.0):
    """An object shaped like ultralytics' Darknet as far as the loss is concerned (no nn.Module)."""
    heads = [types.SimpleNamespace(anchor_vec=a) for a in anchor_vecs]
    module_list = [types.SimpleNamespace() for _ in range(2)] + heads  # heads not at index 0
    return types.SimpleNamespace(
        hyp=dict(yk.DEFAULT_HYP if hyp is None else hyp),
        gr=gr,
        nc=nc,
        yolo_layers=list(range(2, 2 + len(heads))),
        module_list=module_list,
    )


# ------------------------------------------------- the fused backends against the reference


def fused_backends():
    """``(backend, device)`` of every fused backend that can run here, as pytest params: cpp on CPU,
    triton under the interpreter on CPU (``TRITON_INTERPRET=1``) and on CUDA when there is a GPU
    (the ``cpu_and_cuda()`` pattern of torchvision's op tests)."""
    import pytest

    from yolo_kernels import library
    from yolo_kernels.triton import IMPORT_ERROR, interpreter_active

    no_triton = IMPORT_ERROR is not None
    return [
        pytest.param("cpp", "cpu", id="cpp", marks=pytest.mark.skipif(library.LOAD_ERROR is not None, reason="no ext")),
        pytest.param(
            "triton",
            "cpu",
            id="triton-interpreter",
            marks=pytest.mark.skipif(no_triton or not interpreter_active(), reason="TRITON_INTERPRET=1 not set"),
        ),
        pytest.param(
            "triton",
            "cuda",
            id="triton-cuda",
            marks=pytest.mark.skipif(no_triton or not torch.cuda.is_available(), reason="no CUDA device"),
        ),
    ]


def run(backend, device, p, targets, anchors, options, grad=True):
    """The drop-in on a duck-typed model with ``options``: ``(loss, items, grads)`` back on the CPU."""
    q = [x.detach().to(device).clone().requires_grad_(grad) for x in p]
    hyp = options.as_hyp()
    model = duck_model([a.to(device) for a in anchors], options.nc, hyp=hyp, gr=options.gr)
    extra = dict(box_loss=options.box_loss, reduction=options.reduction, label_smoothing=options.label_smoothing)
    loss, items = yk.compute_loss(q, targets.to(device), model, backend=backend, **extra)
    if grad:
        loss.backward()
    return loss.detach().cpu(), items.cpu(), [x.grad.cpu() if x.grad is not None else None for x in q]


def assert_matches_reference(backend, device, p, targets, anchors, options, rtol_loss=1e-5, rtol_grad=1e-4):
    """``backend`` equals the reference on the CPU (on the same values upcast to float32 for half
    precision ``p``): loss items to ``rtol_loss``, gradients to ``rtol_grad`` of their largest entry."""
    _, items, grads = run(backend, device, p, targets, anchors, options)
    up = [x.float() if x.dtype in (torch.float16, torch.bfloat16) else x for x in p]
    _, ref_items, ref_grads = run("reference", "cpu", up, targets, anchors, options)
    torch.testing.assert_close(items, ref_items, rtol=rtol_loss, atol=rtol_loss * float(ref_items.abs().max()))
    for g, r in zip(grads, ref_grads):
        assert g.dtype == p[0].dtype and g.shape == r.shape
        torch.testing.assert_close(g.to(r.dtype), r, rtol=rtol_grad, atol=rtol_grad * float(r.abs().max()))
    return items, grads


OPTION_SETS = [
    {},
    {"gr": 0.0},
    {"gr": 0.35, "cls_pw": 2.0, "obj_pw": 0.5},
    {"fl_gamma": 1.5},
    {"fl_gamma": 2.0, "label_smoothing": 0.1},
    {"label_smoothing": 0.2},
    {"reduction": "sum"},
    {"reduction": "sum", "fl_gamma": 1.5, "box_loss": "ciou"},
    {"box_loss": "iou"},
    {"box_loss": "diou", "iou_t": 0.1},
    {"box_loss": "ciou"},
]

LAYOUTS = [  # (anchors per layer, non-square grids)
    ([3], [(5, 7)]),
    ([3, 2], [(4, 6), (8, 3)]),
    ([2, 3, 1], [(3, 3), (6, 5), (2, 9)]),
    ([1, 2, 4, 3], [(2, 2), (4, 3), (7, 8), (1, 5)]),
]


def option_id(options: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in options.items()) or "default"


def count_loop_iterations(monkeypatch, module) -> list[int]:
    """Count the loop iterations of the kernels of ``module`` under the Triton interpreter (which
    runs them as Python) by shadowing ``range`` there: append a 0 to the returned list before each
    measured call; the iterations of the call accumulate in its last entry."""
    import builtins

    counted: list[int] = []

    def counting_range(*args):
        r = builtins.range(*args)
        counted[-1] += len(r)
        return r

    monkeypatch.setattr(module, "range", counting_range, raising=False)
    return counted
