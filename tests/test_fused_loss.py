"""The op ``fused_loss`` in every fused backend against the reference, one suite parametrised by
backend and device (``helpers.fused_backends``: cpp on CPU, triton under the interpreter, triton
on CUDA): every option, 1-4 layers, duplicates, edge coordinates, empty targets, strided ``p``,
half and double precision, extreme logits, determinism, the backward contract and gradcheck.
Backend-specific behaviour lives in ``test_cpp.py`` and ``test_triton.py``."""

import pytest
import torch
from helpers import (
    LAYOUTS,
    OPTION_SETS,
    assert_matches_reference,
    duck_model,
    fused_backends,
    make_p,
    make_targets,
    option_id,
    random_anchors,
    run,
)

import yolo_kernels as yk
from yolo_kernels.anchor.options import LossOptions

pytestmark = pytest.mark.parametrize("backend, device", fused_backends())


@pytest.mark.parametrize("options", OPTION_SETS, ids=option_id)
@pytest.mark.parametrize("nc", [1, 80])
def test_parity_every_option(backend, device, options, nc, gen):
    nas, grids = LAYOUTS[2]
    anchors = random_anchors(nas, gen, lo=0.3, hi=3.0)
    p = make_p(3, nas, grids, nc, gen)
    targets = make_targets(12, 3, nc, gen)
    targets[0, 2:4] = torch.tensor([1.0, 0.0])  # the far edges: the last cell, offset 1.0
    targets[1, 2:4] = torch.tensor([0.0, 1.0])
    targets = torch.cat((targets, targets[4:7]))  # exact duplicates
    assert_matches_reference(backend, device, p, targets, anchors, LossOptions(nc=nc, **options))


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda layout: f"{len(layout[0])}layers")
def test_parity_layer_counts_and_grids(backend, device, layout, gen):
    nas, grids = layout
    anchors = random_anchors(nas, gen)
    p = make_p(2, nas, grids, 5, gen, scale=2.0)
    assert_matches_reference(backend, device, p, make_targets(9, 2, 5, gen), anchors, LossOptions(nc=5))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_empty_targets_and_no_match(backend, device, reduction, gen):
    nas, grids, nc = [3, 2], [(4, 4), (2, 3)], 4
    anchors = [torch.tensor([[3.0, 3.0], [4.0, 2.0], [2.0, 4.0]]), torch.tensor([[1.5, 1.5], [2.0, 1.0]])]
    p = make_p(2, nas, grids, nc, gen)
    options = LossOptions(nc=nc, reduction=reduction)
    items, _ = assert_matches_reference(backend, device, p, torch.zeros(0, 6), anchors, options)
    assert items[0] == 0 and items[2] == 0
    tiny = torch.tensor([[0, 1, 0.5, 0.5, 0.01, 0.01], [1, 2, 0.2, 0.9, 0.02, 0.015]])  # match no anchor
    assert sum(len(yk.reference.match(g, tiny, a, 0.2).b) for a, g in zip(anchors, grids)) == 0
    items, _ = assert_matches_reference(backend, device, p, tiny, anchors, options)
    assert items[0] == 0 and items[2] == 0


def test_duplicates_last_pair_wins_and_gradients_sum(backend, device, gen):
    nc = 3
    anchors = [torch.tensor([[1.0, 1.0]])]
    p = make_p(1, [1], [(2, 2)], nc, gen)
    # same cell, different sizes: the last pair sets the objectness target; every pair's terms count
    targets = torch.tensor([[0, 2, 0.3, 0.3, 0.5, 0.5], [0, 1, 0.2, 0.4, 0.4, 0.6], [0, 1, 0.2, 0.4, 0.4, 0.6]])
    assert_matches_reference(backend, device, p, targets, anchors, LossOptions(nc=nc))
    assert_matches_reference(backend, device, p, targets.flip(0), anchors, LossOptions(nc=nc, gr=0.5))


def test_float64_with_the_iou_in_the_objectness_target(backend, device):
    """gr > 0: the objectness target depends on p through the detached IoU, so gradcheck does not
    apply (the family suite gradchecks gr = 0); float64 against the reference to 1e-9."""
    g = torch.Generator().manual_seed(7)
    nas, grids, nc = [2, 3], [(2, 3), (3, 2)], 3
    anchors = random_anchors(nas, g, lo=0.5, hi=2.0)
    targets = make_targets(5, 2, nc, g, lo=0.2, hi=0.6, dtype=torch.float64)
    targets = torch.cat((targets, targets[:1]))
    p = make_p(2, nas, grids, nc, g, dtype=torch.float64)
    assert_matches_reference(backend, device, p, targets, anchors, LossOptions(nc=nc), 1e-10, 1e-9)


def test_non_contiguous_p_and_gradient_layout(backend, device, gen):
    nc, na, ny, nx, bs = 6, 3, 5, 4, 2
    conv = torch.randn(bs, na * (nc + 5), ny, nx, generator=gen)
    anchors = random_anchors([na], gen)
    targets = make_targets(7, bs, nc, gen)
    p = conv.view(bs, na, nc + 5, ny, nx).permute(0, 1, 3, 4, 2)  # what YOLOLayer's view + permute gives
    assert not p.is_contiguous()
    assert_matches_reference(backend, device, [p], targets, anchors, LossOptions(nc=nc))
    # through the head's view: the leaf's gradient equals the reference's
    leaf = conv.clone().to(device).requires_grad_()
    view = leaf.view(bs, na, nc + 5, ny, nx).permute(0, 1, 3, 4, 2)
    model = duck_model([anchors[0].to(device)], nc)
    yk.compute_loss([view], targets.to(device), model, backend=backend)[0].backward()
    ref_leaf = conv.clone().requires_grad_()
    ref_view = ref_leaf.view(bs, na, nc + 5, ny, nx).permute(0, 1, 3, 4, 2)
    yk.compute_loss([ref_view], targets, duck_model(anchors, nc), backend="reference")[0].backward()
    scale = float(ref_leaf.grad.abs().max())
    torch.testing.assert_close(leaf.grad.cpu(), ref_leaf.grad, rtol=1e-4, atol=1e-4 * scale)
    # a strided slice (not dense) is read in place too
    wide = torch.randn(bs, na, ny, nx * 2, nc + 5, generator=gen)
    assert_matches_reference(backend, device, [wide[:, :, :, ::2]], targets, anchors, LossOptions(nc=nc))


def test_float64_p_computes_in_float64(backend, device, gen):
    p = make_p(2, [2], [(3, 4)], 3, gen, dtype=torch.float64)
    targets = make_targets(5, 2, 3, gen, dtype=torch.float64)
    # triton passes the float hyperparameters as float32 kernel arguments (docs/decisions.md)
    rtol_loss, rtol_grad = (1e-12, 1e-10) if backend == "cpp" else (1e-9, 1e-8)
    anchors = random_anchors([2], gen)
    items, grads = assert_matches_reference(
        backend, device, p, targets, anchors, LossOptions(nc=3), rtol_loss, rtol_grad
    )
    assert items.dtype == torch.float64 and grads[0].dtype == torch.float64


@pytest.mark.parametrize("box_loss", yk.BOX_LOSSES)
def test_extreme_logits_are_finite(backend, device, box_loss, gen):
    anchors = random_anchors([3], gen)
    targets = make_targets(6, 2, 5, gen)
    for sign in (1.0, -1.0):
        p = [torch.randn(2, 3, 4, 4, 10, generator=gen).sign() * 1e4 * sign]
        options = LossOptions(nc=5, box_loss=box_loss, fl_gamma=1.5)
        _, items, grads = run(backend, device, p, targets, anchors, options)
        assert torch.isfinite(items).all() and torch.isfinite(grads[0]).all()
        assert_matches_reference(backend, device, p, targets, anchors, options)
