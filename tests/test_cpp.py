"""The C++ CPU backend against the reference: every option, edge cases, gradients, layout, dtypes,
determinism, the registered ops (opcheck) and the gradient pool."""

import warnings

import pytest
import torch
from helpers import duck_model, make_p, make_targets, random_anchors

import yolo_kernels as yk
from yolo_kernels import cpp
from yolo_kernels.config import LossOptions

OPS = torch.ops.yolo_kernels if cpp._C is not None else None


@pytest.fixture(autouse=True)
def _extension_built():
    if cpp._C is None:
        pytest.fail(f"the C++ extension is not built: {cpp.LOAD_ERROR}; {cpp.BUILD_HINT}")


def run(backend, p, targets, anchors, options, grad=True):
    q = [x.detach().clone().requires_grad_(grad) for x in p]
    model = duck_model(anchors, options.nc, hyp={k: getattr(options, k) for k in yk.DEFAULT_HYP}, gr=options.gr)
    extra = dict(box_loss=options.box_loss, reduction=options.reduction, label_smoothing=options.label_smoothing)
    loss, items = yk.compute_loss(q, targets, model, backend=backend, **extra)
    if grad:
        loss.backward()
    return loss, items, [x.grad for x in q]


def assert_matches_reference(p, targets, anchors, options, rtol_loss=1e-5, rtol_grad=1e-4):
    _, items, grads = run("cpp", p, targets, anchors, options)
    _, ref_items, ref_grads = run("reference", p, targets, anchors, options)
    torch.testing.assert_close(items, ref_items, rtol=rtol_loss, atol=rtol_loss * float(ref_items.abs().max()))
    for g, r in zip(grads, ref_grads):
        assert g.dtype == r.dtype and g.shape == r.shape
        torch.testing.assert_close(g, r, rtol=rtol_grad, atol=rtol_grad * float(r.abs().max()))
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


@pytest.mark.parametrize("options", OPTION_SETS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
@pytest.mark.parametrize("nc", [1, 80])
def test_parity_every_option(options, nc, gen):
    nas, grids = LAYOUTS[2]
    anchors = random_anchors(nas, gen, lo=0.3, hi=3.0)
    p = make_p(3, nas, grids, nc, gen)
    targets = make_targets(12, 3, nc, gen)
    targets[0, 2:4] = torch.tensor([1.0, 0.0])
    targets[1, 2:4] = torch.tensor([0.0, 1.0])
    targets = torch.cat((targets, targets[4:7]))  # exact duplicates
    assert_matches_reference(p, targets, anchors, LossOptions(nc=nc, **options))


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda layout: f"{len(layout[0])}layers")
def test_parity_layer_counts_and_grids(layout, gen):
    nas, grids = layout
    nc = 5
    anchors = random_anchors(nas, gen)
    p = make_p(2, nas, grids, nc, gen, scale=2.0)
    targets = make_targets(9, 2, nc, gen)
    assert_matches_reference(p, targets, anchors, LossOptions(nc=nc))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_empty_targets_and_no_match(reduction, gen):
    nas, grids, nc = [3, 2], [(4, 4), (2, 3)], 4
    anchors = [torch.tensor([[3.0, 3.0], [4.0, 2.0], [2.0, 4.0]]), torch.tensor([[1.5, 1.5], [2.0, 1.0]])]
    p = make_p(2, nas, grids, nc, gen)
    options = LossOptions(nc=nc, reduction=reduction)
    items, _ = assert_matches_reference(p, torch.zeros(0, 6), anchors, options)
    assert items[0] == 0 and items[2] == 0
    tiny = torch.tensor([[0, 1, 0.5, 0.5, 0.01, 0.01], [1, 2, 0.2, 0.9, 0.02, 0.015]])  # match no anchor
    assert sum(OPS.match(tiny, a, *g, 0.2)[0].shape[0] for a, g in zip(anchors, grids)) == 0
    items, _ = assert_matches_reference(p, tiny, anchors, options)
    assert items[0] == 0 and items[2] == 0


def test_duplicates_last_pair_wins_and_gradients_sum(gen):
    nc = 3
    anchors = [torch.tensor([[1.0, 1.0]])]
    p = make_p(1, [1], [(2, 2)], nc, gen)
    # same cell, different sizes: the second pair sets the objectness target; both box terms count
    targets = torch.tensor([[0, 2, 0.3, 0.3, 0.5, 0.5], [0, 1, 0.2, 0.4, 0.4, 0.6], [0, 1, 0.2, 0.4, 0.4, 0.6]])
    assert_matches_reference(p, targets, anchors, LossOptions(nc=nc))
    assert_matches_reference(p, targets.flip(0), anchors, LossOptions(nc=nc, gr=0.5))


def test_float64_gradcheck_through_cpp():
    g = torch.Generator().manual_seed(7)
    nas, grids, nc = [2, 3], [(2, 3), (3, 2)], 3
    anchors = random_anchors(nas, g, lo=0.5, hi=2.0)
    targets = make_targets(5, 2, nc, g, lo=0.2, hi=0.6, dtype=torch.float64)
    targets = torch.cat((targets, targets[:1]))
    p = [x.requires_grad_() for x in make_p(2, nas, grids, nc, g, dtype=torch.float64)]
    for options in (
        LossOptions(nc=nc, gr=0.0),
        LossOptions(nc=nc, gr=0.0, fl_gamma=1.5, reduction="sum", box_loss="diou"),
    ):
        fn = lambda *ps, options=options: yk.ops.fused_loss(list(ps), targets, anchors, options)[0]  # noqa: E731
        assert torch.autograd.gradcheck(fn, p)
    # gr > 0: the objectness target depends on p through the detached IoU; compare with the reference
    assert_matches_reference([x.detach() for x in p], targets, anchors, LossOptions(nc=nc), 1e-10, 1e-9)


def test_non_contiguous_p_is_read_in_place_and_grad_keeps_its_layout(gen):
    nc, na, ny, nx, bs = 6, 3, 5, 4, 2
    conv = torch.randn(bs, na * (nc + 5), ny, nx, generator=gen)
    anchors = random_anchors([na], gen)
    targets = make_targets(7, bs, nc, gen)
    leaf = conv.clone().requires_grad_()
    p = leaf.view(bs, na, nc + 5, ny, nx).permute(0, 1, 3, 4, 2)  # what YOLOLayer's view+permute gives
    assert not p.is_contiguous()
    _, items, grads = yk.ops.fused_loss([p.detach()], targets, anchors, LossOptions(nc=nc))
    assert grads[0].stride() == p.stride()  # the head's backward gets its own layout: no copy
    assert_matches_reference([p.detach()], targets, anchors, LossOptions(nc=nc))
    loss, _ = yk.compute_loss([p], targets, duck_model(anchors, nc), backend="cpp")
    loss.backward()
    ref_leaf = conv.clone().requires_grad_()
    ref_p = ref_leaf.view(bs, na, nc + 5, ny, nx).permute(0, 1, 3, 4, 2)
    yk.compute_loss([ref_p], targets, duck_model(anchors, nc), backend="reference")[0].backward()
    torch.testing.assert_close(leaf.grad, ref_leaf.grad, rtol=1e-4, atol=1e-4 * float(ref_leaf.grad.abs().max()))
    # a strided slice (not dense): read in place, gradient laid out densely
    wide = torch.randn(bs, na, ny, nx * 2, nc + 5, generator=gen)
    sliced = wide[:, :, :, ::2]
    assert_matches_reference([sliced], targets, anchors, LossOptions(nc=nc))


def test_leaf_gradient_is_the_kernel_buffer(gen):
    p = [x.requires_grad_() for x in make_p(2, [3], [(4, 4)], 5, gen)]
    targets = make_targets(4, 2, 5, gen)
    model = duck_model(random_anchors([3], gen), 5)
    yk.compute_loss(p, targets, model, backend="cpp")[0].backward()
    first = p[0].grad.data_ptr()
    assert p[0].grad.stride() == p[0].stride()
    p[0].grad = None  # back to the pool ...
    yk.compute_loss(p, targets, model, backend="cpp")[0].backward()
    assert p[0].grad.data_ptr() == first  # ... and reused: no fresh allocation, no page faults


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_p(dtype, gen):
    nas, grids, nc = [3, 2], [(6, 5), (3, 3)], 7
    anchors = random_anchors(nas, gen)
    p32 = make_p(2, nas, grids, nc, gen)
    targets = make_targets(8, 2, nc, gen)
    ph = [x.to(dtype) for x in p32]
    options = LossOptions(nc=nc)
    loss, items, grads = run("cpp", ph, targets, anchors, options)
    assert loss.dtype == torch.float32 and all(g.dtype == dtype for g in grads)
    _, ref_items, ref_grads = run("reference", [x.float() for x in ph], targets, anchors, options)  # same values upcast
    torch.testing.assert_close(items, ref_items, rtol=1e-5, atol=1e-5 * float(ref_items.abs().max()))
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g.float(), r, rtol=1e-2, atol=1e-2 * float(r.abs().max()))


def test_float64_p_computes_in_float64(gen):
    p = make_p(2, [2], [(3, 4)], 3, gen, dtype=torch.float64)
    anchors = random_anchors([2], gen)
    targets = make_targets(5, 2, 3, gen, dtype=torch.float64)
    items, grads = assert_matches_reference(p, targets, anchors, LossOptions(nc=3), 1e-12, 1e-10)
    assert items.dtype == torch.float64 and grads[0].dtype == torch.float64


@pytest.mark.parametrize("box_loss", ["giou", "iou", "diou"])
def test_extreme_logits_are_finite(box_loss, gen):
    nas, nc = [3], 5
    anchors = random_anchors(nas, gen)
    targets = make_targets(6, 2, nc, gen)
    for sign in (1.0, -1.0):
        p = [torch.randn(2, 3, 4, 4, nc + 5, generator=gen).sign() * 1e4 * sign]
        options = LossOptions(nc=nc, box_loss=box_loss, fl_gamma=1.5)
        _, items, grads = run("cpp", p, targets, anchors, options)
        assert torch.isfinite(items).all() and torch.isfinite(grads[0]).all()
        assert_matches_reference(p, targets, anchors, options)


def test_bitwise_deterministic_across_runs_and_threads(gen):
    nas, grids, nc = [3, 3, 3], [(13, 13), (26, 26), (52, 52)], 20
    anchors = random_anchors(nas, gen)
    p = make_p(4, nas, grids, nc, gen)
    targets = make_targets(40, 4, nc, gen)
    targets = torch.cat((targets, targets[:5]))
    options = LossOptions(nc=nc)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 1, max(2, threads)):
            torch.set_num_threads(n)
            _, items, grads = yk.ops.fused_loss(p, targets, anchors, options)
            results.append((items.clone(), [g.clone() for g in grads]))
    finally:
        torch.set_num_threads(threads)
    for items, grads in results[1:]:
        assert torch.equal(items, results[0][0])
        assert all(torch.equal(a, b) for a, b in zip(grads, results[0][1]))


def test_backward_scales_by_grad_output(gen):
    p = make_p(2, [3], [(4, 4)], 4, gen)
    targets = make_targets(5, 2, 4, gen)
    model = duck_model(random_anchors([3], gen), 4)
    q = [x.clone().requires_grad_() for x in p]
    loss, _ = yk.compute_loss(q, targets, model, backend="cpp")
    (loss * 2.5).sum().backward()
    r = [x.clone().requires_grad_() for x in p]
    ref, _ = yk.compute_loss(r, targets, model, backend="reference")
    (ref * 2.5).sum().backward()
    torch.testing.assert_close(q[0].grad, r[0].grad, rtol=1e-4, atol=1e-4 * float(r[0].grad.abs().max()))
    # retain_graph: a second backward still gives the same gradient (accumulated)
    s = [x.clone().requires_grad_() for x in p]
    loss, _ = yk.compute_loss(s, targets, model, backend="cpp")
    loss.backward(retain_graph=True)
    once = s[0].grad.clone()
    loss.backward()
    torch.testing.assert_close(s[0].grad, 2 * once)


def test_no_grad_forward_allocates_no_gradient(gen):
    p = make_p(1, [2], [(3, 3)], 2, gen)
    targets = make_targets(3, 1, 2, gen)
    anchors = random_anchors([2], gen)
    _, items, grads = yk.ops.fused_loss(p, targets, anchors, LossOptions(nc=2), compute_grad=False)
    assert grads[0].numel() == 0
    with torch.no_grad():
        loss, li = yk.compute_loss([x.requires_grad_() for x in p], targets, duck_model(anchors, 2), backend="cpp")
    assert loss.grad_fn is None and torch.equal(li, items)


# ------------------------------------------------------------------ the ops one by one


def test_match_op_equals_reference(gen):
    anchors = torch.tensor([[1.0, 1.0], [2.0, 3.0], [0.5, 0.4]])
    targets = make_targets(20, 3, 4, gen, lo=0.05, hi=0.5)
    targets[0, 2:4] = torch.tensor([1.0, 1.0])
    indices, tbox, anch, tcls = yk.ops.match(targets, anchors, 6, 8, 0.2)
    m = yk.reference.match((6, 8), targets, anchors, 0.2)
    assert torch.equal(indices, torch.stack((m.b, m.a, m.gj, m.gi), 1))
    assert torch.equal(tbox, m.tbox) and torch.equal(anch, m.anch) and torch.equal(tcls, m.tcls)


@pytest.mark.parametrize("kind", ["giou", "iou", "diou", "ciou"])
def test_box_iou_op_values_and_gradient(kind, gen):
    ps = torch.randn(9, 6, generator=gen, dtype=torch.float64)
    tbox = torch.rand(9, 4, generator=gen, dtype=torch.float64) + 0.2
    anch = torch.rand(9, 2, generator=gen, dtype=torch.float64) + 0.5
    iou, d_iou = yk.ops.box_iou(ps, tbox, anch, kind)
    x = ps[:, :4].clone().requires_grad_()
    pbox = torch.cat((x[:, :2].sigmoid(), x[:, 2:].exp() * anch), 1)
    want = yk.reference.box_iou_kind(pbox, tbox, kind)
    want.sum().backward()
    torch.testing.assert_close(iou, want.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(d_iou, x.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("gamma", [0.0, 1.5])
def test_bce_op_values_and_gradient(gamma, gen):
    x = (torch.randn(50, generator=gen, dtype=torch.float64) * 5).requires_grad_()
    y = torch.rand(50, generator=gen, dtype=torch.float64)
    loss, grad = yk.ops.bce_with_logits(x.detach(), y, 1.7, gamma)
    bce = torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor([1.7], dtype=torch.float64), reduction="none")
    ref = yk.reference.FocalLoss(bce, gamma)(x, y) if gamma else bce(x, y)
    ref.sum().backward()
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grad, x.grad, rtol=1e-10, atol=1e-14)


def _opcheck_cases(gen):
    anchors = random_anchors([3, 2], gen)
    p = [x.requires_grad_() for x in make_p(2, [3, 2], [(4, 3), (2, 5)], 4, gen)]
    targets = make_targets(6, 2, 4, gen)
    o = LossOptions(nc=4, fl_gamma=1.0)
    fused = (
        p,
        targets,
        anchors,
        o.gr,
        o.giou,
        o.cls,
        o.cls_pw,
        o.obj,
        o.obj_pw,
        o.iou_t,
        o.fl_gamma,
        o.label_smoothing,
        o.box_loss,
        o.reduction,
        True,
    )
    return [
        (OPS.fused_loss.default, fused),
        (OPS.match.default, (targets, anchors[0], 4, 3, 0.2)),
        (
            OPS.box_iou.default,
            (
                torch.randn(5, 9, generator=gen),
                torch.rand(5, 4, generator=gen) + 0.1,
                torch.rand(5, 2, generator=gen) + 0.1,
                "ciou",
            ),
        ),
        (OPS.bce_with_logits.default, (torch.randn(3, 4, generator=gen), torch.rand(3, 4, generator=gen), 1.0, 0.0)),
    ]


def test_opcheck_every_op(gen):
    for op, args in _opcheck_cases(gen):
        # match's output size depends on the data: its fake kernel has a dynamic size, which
        # the static aot_dispatch test cannot take; the other tests still run on it
        utils = ("test_schema", "test_autograd_registration", "test_faketensor")
        if op is not OPS.match.default:
            utils = utils + ("test_aot_dispatch_dynamic",)
        torch.library.opcheck(op, args, test_utils=utils)


@pytest.mark.parametrize(
    "call, pattern",
    [
        (lambda t, a: OPS.match(t[:, :5], a, 3, 3, 0.2), r"targets: expected shape \[nt, 6\]"),
        (lambda t, a: OPS.match(t, a[:, :1], 3, 3, 0.2), r"anchors: expected shape \[na, 2\]"),
        (lambda t, a: OPS.match(t, a, 0, 3, 0.2), r"ny, nx: expected a non-empty grid, got 0 x 3"),
        (lambda t, a: OPS.match(t.long(), a, 3, 3, 0.2), r"targets: expected a floating-point tensor, got Long"),
        (lambda t, a: OPS.match(t.to("meta"), a, 3, 3, 0.2), r"."),
        (lambda t, a: OPS.box_iou(t[:, :3], t[:, :4], t[:, :2], "giou"), r"ps: expected shape \[P, >= 4\]"),
        (lambda t, a: OPS.box_iou(t, t[:, :4], t[:, :2], "eiou"), r"box_loss: expected one of .* got 'eiou'"),
        (lambda t, a: OPS.bce_with_logits(t, t[:, :2], 1.0, 0.0), r"y: expected the shape of x"),
        (lambda t, a: OPS.bce_with_logits(t, t, -1.0, 0.0), r"expected pos_weight > 0"),
    ],
)
def test_ops_reject_malformed_input(call, pattern, gen):
    targets = make_targets(4, 2, 3, gen)
    anchors = torch.ones(2, 2)
    with pytest.raises((RuntimeError, NotImplementedError), match=pattern):
        call(targets, anchors)


def test_fused_op_rejects_malformed_input(gen):
    anchors = random_anchors([2], gen)
    p = make_p(2, [2], [(3, 3)], 3, gen)
    t = make_targets(4, 2, 3, gen)
    o = (1.0, 3.54, 37.4, 1.0, 64.3, 1.0, 0.2, 0.0, 0.0, "giou", "mean", True)
    f = OPS.fused_loss
    cases = [
        (lambda: f([], t, [], *o), r"p: expected at least one layer"),
        (lambda: f(p, t, anchors + anchors, *o), r"p: expected 2 layers"),
        (lambda: f([p[0][0]], t, anchors, *o), r"p\[0\]: expected a 5-D tensor"),
        (lambda: f([p[0][..., :5]], t, anchors, *o), r"p\[0\]: expected last dim nc \+ 5 >= 6"),
        (lambda: f([p[0].int()], t, anchors, *o), r"p\[0\]: expected a floating-point tensor"),
        (lambda: f(p, t, [anchors[0][:1]], *o), r"p\[0\]: expected dim 1 = 1 anchors, got 2"),
        (lambda: f(p, t, [torch.ones(2, 3)], *o), r"anchors\[0\]: expected shape \[na, 2\]"),
        (lambda: f(p, t[:, :4], anchors, *o), r"targets: expected shape \[nt, 6\]"),
        (
            lambda: f(p, torch.tensor([[2.0, 0, 0.5, 0.5, 0.1, 0.1]]), anchors, *o),
            r"image index\): expected an integer in \[0, 2\), got 2",
        ),
        (
            lambda: f(p, torch.tensor([[0, 3.0, 0.5, 0.5, 0.1, 0.1]]), anchors, *o),
            r"class\): expected an integer in \[0, 3\), got 3",
        ),
        (
            lambda: f(p, torch.tensor([[0, 1.0, 0.5, 0.5, 0.0, 0.1]]), anchors, *o),
            r"box size\): expected finite values > 0",
        ),
        (lambda: f(p, t, [-anchors[0]], *o), r"anchors\[0\]: expected finite sizes > 0"),
        (lambda: f(p, t, anchors, *o[:9], "eiou", "mean", True), r"box_loss: expected one of"),
        (lambda: f(p, t, anchors, *o[:9], "giou", "none", True), r"reduction: expected 'mean' or 'sum', got 'none'"),
        (lambda: f(p, t, anchors, float("nan"), *o[1:]), r"gr: expected a finite number, got nan"),
    ]
    for call, pattern in cases:
        with pytest.raises(RuntimeError, match=pattern):
            call()


# ------------------------------------------------------------------ build, pool, missing extension


def test_build_info():
    info = yk.cpp.build_info()
    assert {"compiler", "flags", "parallel_backend"} <= set(info)
    assert "-std=c++17" in info["flags"] and "-O" in info["flags"]


def test_gradient_pool_reuses_and_can_be_limited_or_disabled(gen):
    p = [x.requires_grad_() for x in make_p(1, [2], [(8, 8)], 3, gen)]
    targets = make_targets(3, 1, 3, gen)
    anchors = random_anchors([2], gen)
    before = yk.cpp.pool_stats()
    for _ in range(3):
        yk.ops.fused_loss(p, targets, anchors, LossOptions(nc=3))
    after = yk.cpp.pool_stats()
    assert after["hits"] >= before["hits"] + 2 and after["cached_bytes"] > 0
    try:
        yk.cpp.pool_set_limit(0)
        assert yk.cpp.pool_stats()["cached_bytes"] == 0
        yk.ops.fused_loss(p, targets, anchors, LossOptions(nc=3))
        assert yk.cpp.pool_stats()["cached_bytes"] == 0  # freed, not kept
        yk.cpp.pool_set_enabled(False)
        _, _, grads = yk.ops.fused_loss(p, targets, anchors, LossOptions(nc=3))
        assert torch.isfinite(grads[0]).all() and not yk.cpp.pool_stats()["enabled"]
    finally:
        yk.cpp.pool_set_enabled(True)
        yk.cpp.pool_set_limit(4 << 30)


def test_missing_extension_is_a_clear_error(monkeypatch):
    backend = yk.loss.BACKENDS["cpp"]
    monkeypatch.setattr(cpp, "_C", None)
    monkeypatch.setattr(cpp, "LOAD_ERROR", "yolo_kernels._C could not be imported (test)")
    assert "cpp" not in yk.available_backends("cpu")
    p = [torch.zeros(1, 1, 2, 2, 6)]
    with pytest.raises(yk.BackendUnavailableError, match=r"pip install --no-build-isolation -e \."):
        yk.compute_loss(p, torch.zeros(0, 6), duck_model([torch.ones(1, 2)], 1), backend="cpp")
    monkeypatch.setattr(yk.loss, "_WARNED", set())
    model = duck_model([torch.ones(1, 2)], 1)
    with pytest.warns(
        RuntimeWarning,
        match=r"uses the slow 'reference' backend on cpu because the 'cpp' backend is "
        r"unavailable: yolo_kernels._C could not be imported \(test\)",
    ):
        assert yk.compute_loss(p, torch.zeros(0, 6), model)[0].shape == (1,)  # auto -> reference, warns
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per process: the second call is quiet
        yk.compute_loss(p, torch.zeros(0, 6), model)
    assert backend.unavailable_reason(torch.device("cpu")).startswith("yolo_kernels._C could not be imported")
