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
