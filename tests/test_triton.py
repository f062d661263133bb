"""The Triton backend against the reference: under the interpreter on CPU (small shapes), and on
CUDA when a GPU is present (those cases skip without one)."""

import pytest
import torch
from helpers import duck_model, make_p, make_targets, random_anchors

import yolo_kernels as yk
from yolo_kernels.config import LossOptions
from yolo_kernels.triton import interpreter_active
from yolo_kernels.triton import loss as triton_loss

DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(not interpreter_active(), reason="TRITON_INTERPRET=1 not set")),
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")),
]


def run(backend, p, targets, anchors, options, device):
    q = [x.detach().to(device).clone().requires_grad_() for x in p]
    model = duck_model(
        [a.to(device) for a in anchors], options.nc, hyp={k: getattr(options, k) for k in yk.DEFAULT_HYP}, gr=options.gr
    )
    extra = dict(box_loss=options.box_loss, reduction=options.reduction, label_smoothing=options.label_smoothing)
    loss, items = yk.compute_loss(q, targets.to(device), model, backend=backend, **extra)
    loss.backward()
    return items.cpu(), [x.grad.cpu() for x in q]


def assert_matches_reference(p, targets, anchors, options, device, rtol_loss=1e-5, rtol_grad=1e-4):
    items, grads = run("triton", p, targets, anchors, options, device)
    ref_items, ref_grads = run(
        "reference", [x.float() if x.dtype != torch.float64 else x for x in p], targets, anchors, options, "cpu"
    )
    torch.testing.assert_close(items, ref_items, rtol=rtol_loss, atol=rtol_loss * float(ref_items.abs().max()))
    for g, r in zip(grads, ref_grads):
        assert g.dtype == p[0].dtype and g.shape == r.shape
        torch.testing.assert_close(g.to(r.dtype), r, rtol=rtol_grad, atol=rtol_grad * float(r.abs().max()))
    return items, grads


OPTION_SETS = [
    {},
    {"gr": 0.3, "cls_pw": 2.0, "obj_pw": 0.5},
    {"fl_gamma": 1.5, "label_smoothing": 0.1},
    {"reduction": "sum", "box_loss": "ciou"},
    {"box_loss": "iou", "fl_gamma": 2.0},
    {"box_loss": "diou", "iou_t": 0.1, "reduction": "sum"},
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("options", OPTION_SETS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
@pytest.mark.parametrize("nc", [1, 80])
def test_parity_every_option(options, nc, device, gen):
    nas, grids = [2, 3], [(3, 4), (5, 2)]
    anchors = random_anchors(nas, gen, lo=0.3, hi=3.0)
    p = make_p(2, nas, grids, nc, gen)
    targets = make_targets(7, 2, nc, gen)
    targets[0, 2:4] = torch.tensor([1.0, 0.0])
    targets[1, 2:4] = torch.tensor([0.0, 1.0])
    targets = torch.cat((targets, targets[2:4]))  # exact duplicates
    assert_matches_reference(p, targets, anchors, LossOptions(nc=nc, **options), device)


@pytest.mark.parametrize("device", DEVICES)
def test_one_to_four_layers_and_duplicates(device, gen):
    nas, grids, nc = [1, 2, 3, 2], [(2, 3), (4, 4), (3, 5), (1, 2)], 3
    anchors = random_anchors(nas, gen)
    p = make_p(2, nas, grids, nc, gen, scale=2.0)
    same_cell = torch.tensor([[0, 2, 0.3, 0.3, 0.5, 0.5], [0, 1, 0.31, 0.32, 0.4, 0.6], [0, 1, 0.31, 0.32, 0.4, 0.6]])
    targets = torch.cat((make_targets(5, 2, nc, gen), same_cell))
    for n in (1, 4):
        assert_matches_reference(p[:n], targets, anchors[:n], LossOptions(nc=nc, gr=0.5), device)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_targets_and_no_match(device, gen):
    anchors = [torch.tensor([[3.0, 3.0], [4.0, 2.0]])]
    p = make_p(2, [2], [(4, 4)], 3, gen)
    for reduction in ("mean", "sum"):
        items, _ = assert_matches_reference(
            p, torch.zeros(0, 6), anchors, LossOptions(nc=3, reduction=reduction), device
        )
        assert items[0] == 0 and items[2] == 0
    tiny = torch.tensor([[0, 1, 0.5, 0.5, 0.01, 0.01]])
    items, _ = assert_matches_reference(p, tiny, anchors, LossOptions(nc=3), device)
    assert items[0] == 0 and items[2] == 0


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_p_and_gradient_layout(device, gen):
    nc, na, ny, nx, bs = 4, 2, 3, 4, 2
    conv = torch.randn(bs, na * (nc + 5), ny, nx, generator=gen)
    p = [conv.view(bs, na, nc + 5, ny, nx).permute(0, 1, 3, 4, 2)]
    anchors = random_anchors([na], gen)
    targets = make_targets(5, bs, nc, gen)
    assert_matches_reference(p, targets, anchors, LossOptions(nc=nc), device)
    q = p[0].to(device)
    _, _, grads = triton_loss.fused_loss([q], targets.to(device), [anchors[0].to(device)], LossOptions(nc=nc))
    assert grads[0].stride() == q.stride()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_p(dtype, device, gen):
    nas, grids, nc = [2], [(4, 3)], 5
    anchors = random_anchors(nas, gen)
    p = [x.to(dtype) for x in make_p(2, nas, grids, nc, gen)]
    targets = make_targets(5, 2, nc, gen)
    items, grads = run("triton", p, targets, anchors, LossOptions(nc=nc), device)
    ref_items, ref_grads = run("reference", [x.float() for x in p], targets, anchors, LossOptions(nc=nc), "cpu")
    torch.testing.assert_close(items, ref_items, rtol=1e-5, atol=1e-5 * float(ref_items.abs().max()))
    assert grads[0].dtype == dtype
    torch.testing.assert_close(grads[0].float(), ref_grads[0], rtol=1e-2, atol=1e-2 * float(ref_grads[0].abs().max()))


@pytest.mark.parametrize("device", DEVICES)
def test_float64_gradcheck(device):
    g = torch.Generator().manual_seed(3)
    anchors = [a.double().to(device) for a in random_anchors([2], g, lo=0.5, hi=2.0)]
    targets = make_targets(3, 1, 3, g, lo=0.2, hi=0.6, dtype=torch.float64).to(device)
    p = [x.to(device).requires_grad_() for x in make_p(1, [2], [(2, 3)], 3, g, dtype=torch.float64)]
    for options in (
        LossOptions(nc=3, gr=0.0),
        LossOptions(nc=3, gr=0.0, fl_gamma=1.5, reduction="sum", box_loss="diou"),
    ):
        fn = lambda *ps, options=options: yk.triton.TritonBackend().loss(list(ps), targets, anchors, options)[0]  # noqa: E731
        assert torch.autograd.gradcheck(fn, p, fast_mode=True)


@pytest.mark.parametrize("device", DEVICES)
def test_extreme_logits_are_finite(device, gen):
    anchors = random_anchors([2], gen)
    targets = make_targets(4, 2, 3, gen)
    p = [torch.randn(2, 2, 3, 3, 8, generator=gen).sign() * 1e4]
    items, grads = run("triton", p, targets, anchors, LossOptions(nc=3, fl_gamma=1.5), device)
    assert torch.isfinite(items).all() and torch.isfinite(grads[0]).all()
    assert_matches_reference(p, targets, anchors, LossOptions(nc=3, fl_gamma=1.5), device)


@pytest.mark.parametrize("device", DEVICES)
def test_bitwise_deterministic(device, gen):
    nas, grids, nc = [3], [(6, 6)], 6
    anchors = [a.to(device) for a in random_anchors(nas, gen)]
    p = [x.to(device) for x in make_p(2, nas, grids, nc, gen)]
    targets = make_targets(9, 2, nc, gen)
    targets = torch.cat((targets, targets[:3], targets[:3])).to(device)
    runs = [triton_loss.fused_loss(p, targets, anchors, LossOptions(nc=nc)) for _ in range(2)]
    assert torch.equal(runs[0][1], runs[1][1])
    assert all(torch.equal(a, b) for a, b in zip(runs[0][2], runs[1][2]))


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
