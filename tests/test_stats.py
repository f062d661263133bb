"""Gradient statistics (``stats=True``): every statistic of every backend against the reference,
which takes them by autograd one loss component at a time, on both loss families."""

import pytest
import torch
from helpers import duck_model, fused_backends, make_p, make_targets, random_anchors

import yolo_kernels as yk
from yolo_kernels.anchor.backends import run_backend
from yolo_kernels.anchor.options import LossOptions
from yolo_kernels.stats import COMPONENTS, LossStats

BACKENDS = [pytest.param("reference", "cpu", id="reference"), *fused_backends()]


def problem(case, nc=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    nas, grids = [3, 2], [(6, 5), (3, 3)]
    anchors = random_anchors(nas, g, lo=0.5, hi=3.0)
    p = make_p(2, nas, grids, nc, g)
    targets = make_targets(8, 2, nc, g)
    if case == "duplicates":
        targets = torch.cat((targets, targets[:3], targets[:1]))
    if case == "unmatched":  # far thinner than any anchor: no anchor of any layer takes them
        targets[:3, 4:6] = torch.tensor([0.002, 0.9])
    if case == "empty":
        targets = targets[:0]
    return p, targets, anchors


def stats_of(backend, device, p, targets, anchors, options, balance=None, validate=True):
    q = [x.detach().to(device).clone().requires_grad_() for x in p]
    b = balance.to(device) if balance is not None else None
    loss, items, _, st = run_backend(q, targets.to(device), anchors, options, backend, validate, b, stats=True)
    loss.backward()
    return loss, st, [x.grad.cpu() for x in q]


def assert_same_stats(st, ref):
    torch.testing.assert_close(st.grad_norm.cpu(), ref.grad_norm, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(st.grad_max.cpu(), ref.grad_max, rtol=1e-4, atol=1e-7)
    for name in ("num_pairs", "num_duplicates", "unmatched_targets", "nonfinite"):
        assert torch.equal(getattr(st, name).cpu(), getattr(ref, name)), name


@pytest.mark.parametrize("backend, device", BACKENDS)
@pytest.mark.parametrize("family", yk.FAMILIES)
@pytest.mark.parametrize("case", ["plain", "duplicates", "unmatched", "empty", "nc1", "focal_gr"])
def test_every_statistic_equals_the_reference(backend, device, family, case):
    nc = 1 if case == "nc1" else 4
    p, targets, anchors = problem(case, nc=nc)
    extra = dict(fl_gamma=1.5, gr=0.4, label_smoothing=0.1) if case == "focal_gr" else {}
    options = LossOptions(nc=nc, family=family, **extra)
    balance = torch.tensor([3.0, 0.5]) if family == "yolov5" else None
    _, ref, ref_grads = stats_of("reference", "cpu", p, targets, anchors, options, balance)
    _, st, grads = stats_of(backend, device, p, targets, anchors, options, balance)
    assert_same_stats(st, ref)
    # the statistics are those of the gradient the backend returned, split by channel
    for i, g in enumerate(grads):
        parts = (g[..., :4], g[..., 4:5], g[..., 5:])
        norms = torch.stack([x.double().norm() for x in parts]).float()
        torch.testing.assert_close(st.grad_norm[i].cpu(), norms, rtol=1e-4, atol=1e-6)
        maxima = torch.stack([x.abs().amax() if x.numel() else x.new_zeros(()) for x in parts])
        torch.testing.assert_close(st.grad_max[i].cpu(), maxima, rtol=1e-4, atol=1e-7)
    if case == "empty":
        assert st.num_pairs.tolist() == [0, 0] and st.grad_norm[:, [0, 2]].abs().max() == 0
    if case == "duplicates":
        assert (st.num_duplicates > 0).any()
    if case == "unmatched":
        assert int(st.unmatched_targets) >= 3 and "target(s) matched no anchor" in st.problems()[-1]
    if case == "nc1":
        assert st.grad_norm[:, 2].abs().max() == 0


@pytest.mark.parametrize("backend, device", BACKENDS)
def test_nonfinite_inputs_are_flagged(backend, device):
    p, targets, anchors = problem("plain")
    options = LossOptions(nc=4)
    _, st, _ = stats_of(backend, device, p, targets, anchors, options)
    assert not bool(st.nonfinite) and not any("non-finite" in m for m in st.problems())
    for bad in (float("nan"), float("inf"), -float("inf")):
        q = [x.clone() for x in p]
        q[1][0, 0, 1, 1, 4] = bad  # an objectness logit of layer 1
        loss, st, _ = stats_of(backend, device, q, targets, anchors, options, validate=False)
        assert bool(st.nonfinite), bad
        assert "non-finite" in st.problems()[0]


def test_stats_false_costs_nothing_and_returns_two_values():
    p, targets, anchors = problem("plain")
    model = duck_model(anchors, 4, hyp=dict(yk.DEFAULT_HYP))
    assert len(yk.compute_loss(p, targets, model, backend="reference")) == 2
    loss, items, st = yk.compute_loss(p, targets, model, backend="reference", stats=True)
    assert isinstance(st, LossStats) and st.num_layers == 2
    with pytest.raises(TypeError, match="stats: expected a bool"):
        yk.compute_loss(p, targets, model, stats="yes")


def test_module_apis_return_stats():
    p, targets, anchors = problem("plain")
    crit = yk.YOLOv3Loss([a * 8 for a in anchors], [8, 8], 4, backend="reference")
    loss, items, st = crit(p, targets, stats=True)
    assert st.grad_norm.shape == (2, 3) and st.num_pairs.dtype == torch.int64
    crit5 = yk.YOLOv5Loss([a * 8 for a in anchors], [8, 16], 4, balance=[1.0, 1.0], backend="reference")
    loss, items, st = crit5(p, targets, stats=True)
    assert items.shape == (3,) and st.unmatched_targets.dtype == torch.int64
    summary = st.summary()
    assert set(summary) >= {"unmatched_targets", "nonfinite", "grad_norm/0/box", "grad_max/1/cls"}
    assert COMPONENTS == ("box", "obj", "cls")
