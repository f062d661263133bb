"""Property-based parity: random layouts, classes, anchors, targets (edges, duplicates, tiny and huge
boxes, none), both loss families and every option; the fused backends equal the reference and stay finite.

CI runs a derandomised, bounded profile; HYPOTHESIS_PROFILE=long runs many more examples:
    HYPOTHESIS_PROFILE=long .venv/bin/python -m pytest tests/test_properties.py
"""

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import yolo_kernels as yk
from yolo_kernels.anchor.options import LossOptions

settings.register_profile(
    "ci",
    derandomize=True,
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "long", max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
TRITON_EXAMPLES = 40 if os.environ.get("HYPOTHESIS_PROFILE") == "long" else 8

coordinate = st.one_of(st.sampled_from([0.0, 1.0, 0.5]), st.floats(0.0, 1.0))
size = st.one_of(st.sampled_from([1e-4, 1.0, 1.5]), st.floats(1e-3, 1.0))


@st.composite
def problems(draw, max_layers=4, max_anchors=5, max_classes=100, max_batch=3):
    nl = draw(st.integers(1, max_layers))
    nas = [draw(st.integers(1, max_anchors)) for _ in range(nl)]
    grids = [(draw(st.integers(1, 6)), draw(st.integers(1, 6))) for _ in range(nl)]
    nc = draw(st.sampled_from([1, 2, 5, max_classes]))
    bs = draw(st.integers(1, max_batch))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    anchors = [torch.rand(na, 2, generator=g) * draw(st.sampled_from([0.5, 2.0, 8.0])) + 0.05 for na in nas]
    scale = draw(st.sampled_from([0.5, 2.0, 6.0]))
    p = [torch.randn(bs, na, ny, nx, nc + 5, generator=g) * scale for na, (ny, nx) in zip(nas, grids)]
    rows = draw(
        st.lists(
            st.tuples(st.integers(0, bs - 1), st.integers(0, nc - 1), coordinate, coordinate, size, size), max_size=10
        )
    )
    rows += draw(st.lists(st.sampled_from(rows), max_size=3)) if rows else []  # duplicates
    targets = torch.tensor(rows, dtype=torch.float32).reshape(-1, 6)
    family = draw(st.sampled_from(yk.FAMILIES))
    options = LossOptions(
        family=family,
        anchor_t=draw(st.sampled_from([4.0, 2.0, 10.0])),
        sort_obj_iou=draw(st.booleans()),
        nc=nc,
        gr=draw(st.sampled_from([0.0, 0.5, 1.0])),
        cls_pw=draw(st.sampled_from([1.0, 0.5, 2.5])),
        obj_pw=draw(st.sampled_from([1.0, 0.7, 3.0])),
        iou_t=draw(st.sampled_from([0.2, 0.05, 0.5])),
        fl_gamma=draw(st.sampled_from([0.0, 1.5, 2.0])),
        label_smoothing=draw(st.sampled_from([0.0, 0.1])),
        box_loss=draw(st.sampled_from(yk.BOX_LOSSES)),
        reduction=draw(st.sampled_from(yk.REDUCTIONS)) if family == "yolov3" else "mean",
    )
    balance = torch.rand(nl, generator=g) * 4 if family == "yolov5" and draw(st.booleans()) else None
    return p, targets, anchors, options, balance


def loss_and_grads(backend, p, targets, anchors, options, balance):
    q = [x.clone().requires_grad_() for x in p]
    loss, items, layer_obj, _ = yk.loss.resolve_backend(backend, q[0].device).loss(
        q, targets, anchors, options, balance
    )
    loss.backward()
    return torch.cat((items, layer_obj)), [x.grad for x in q]


def check_parity(backend, problem):
    p, targets, anchors, options, balance = problem
    yk.anchor.validate.check_inputs(p, targets, anchors, options)
    items, grads = loss_and_grads(backend, p, targets, anchors, options, balance)
    ref_items, ref_grads = loss_and_grads("reference", p, targets, anchors, options, balance)
    assert torch.isfinite(items).all() and all(torch.isfinite(g).all() for g in grads)
    torch.testing.assert_close(items, ref_items, rtol=1e-5, atol=1e-5 * float(ref_items.abs().max()) + 1e-6)
    scale = max(float(r.abs().max()) for r in ref_grads)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-4 * scale + 1e-7)


@given(problems())
def test_cpp_equals_reference(problem):
    check_parity("cpp", problem)


@pytest.mark.skipif("triton" not in yk.available_backends("cpu"), reason="needs TRITON_INTERPRET=1")
@settings(max_examples=TRITON_EXAMPLES)
@given(problems(max_layers=2, max_anchors=3, max_classes=20, max_batch=2))
def test_triton_equals_reference(problem):
    check_parity("triton", problem)
