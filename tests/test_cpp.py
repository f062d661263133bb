"""What is specific to the C++ CPU backend: the registered ops one by one and ``opcheck``, their
input checks, the gradient's layout and buffer reuse (the pool), determinism across thread
counts, build info. The parity suite over every fused backend is ``test_fused_loss.py``."""

import warnings

import pytest
import torch
from helpers import assert_matches_reference, duck_model, make_p, make_targets, random_anchors, run

import yolo_kernels as yk
from yolo_kernels import library
from yolo_kernels.anchor import fused_op
from yolo_kernels.anchor.options import LossOptions

OPS = torch.ops.yolo_kernels if library.LOAD_ERROR is None else None


def test_float64_gradcheck_through_the_op():
    """Through torch.ops.yolo_kernels.fused_loss and its registered autograd (the suite in
    test_fused_loss.py goes through the backend's eager autograd)."""
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


def test_gradient_keeps_the_layout_of_p(gen):
    nc, na, ny, nx, bs = 6, 3, 5, 4, 2
    conv = torch.randn(bs, na * (nc + 5), ny, nx, generator=gen)
    anchors = random_anchors([na], gen)
    targets = make_targets(7, bs, nc, gen)
    leaf = conv.clone().requires_grad_()
    p = leaf.view(bs, na, nc + 5, ny, nx).permute(0, 1, 3, 4, 2)  # what YOLOLayer's view+permute gives
    assert not p.is_contiguous()
    _, items, _, _, grads = yk.ops.fused_loss([p.detach()], targets, anchors, LossOptions(nc=nc))
    assert grads[0].stride() == p.stride()  # the head's backward gets its own layout: no copy
    # a strided slice (not dense): the gradient is laid out densely, in the slice's dimension order
    wide = torch.randn(bs, na, ny, nx * 2, nc + 5, generator=gen)
    _, _, _, _, grads = yk.ops.fused_loss([wide[:, :, :, ::2]], targets, anchors, LossOptions(nc=nc))
    assert grads[0].is_contiguous()


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
            _, items, _, _, grads = yk.ops.fused_loss(p, targets, anchors, options)
            results.append((items.clone(), [g.clone() for g in grads]))
    finally:
        torch.set_num_threads(threads)
    for items, grads in results[1:]:
        assert torch.equal(items, results[0][0])
        assert all(torch.equal(a, b) for a, b in zip(grads, results[0][1]))


def test_dense_crowded_images_bitwise_across_threads_and_equal_to_reference(gen):
    # hundreds of pairs per plane (the counting sorts), most targets in one image (its planes are
    # the costliest: the threads take them first), duplicates; with the statistics
    nas, grids, nc = [3, 3], [(8, 8), (16, 16)], 12
    anchors = random_anchors(nas, gen)
    p = make_p(4, nas, grids, nc, gen)
    targets = make_targets(700, 4, nc, gen)
    targets[:550, 0] = 0
    options = LossOptions(nc=nc)
    assert_matches_reference("cpp", "cpu", p, targets, anchors, options)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3, 4):
            torch.set_num_threads(n)
            _, items, _, stats, grads = fused_op.fused_loss_op(p, targets, anchors, options, True, None, True)
            results.append((items.clone(), stats.clone(), [g.clone() for g in grads]))
    finally:
        torch.set_num_threads(threads)
    for items, stats, grads in results[1:]:
        assert torch.equal(items, results[0][0]) and torch.equal(stats, results[0][1])
        assert all(torch.equal(a, b) for a, b in zip(grads, results[0][2]))


@pytest.mark.parametrize("nc", [80, 600])
def test_many_classes_equal_the_reference(nc, gen):
    # long class rows (COCO's 80, and 600: longer than any vector loop unrolls), with label
    # smoothing and a class pos_weight in the formula, and duplicate pairs on a cell
    nas, grids = [3, 3], [(5, 6), (10, 12)]
    anchors = random_anchors(nas, gen)
    p = make_p(2, nas, grids, nc, gen)
    targets = make_targets(40, 2, nc, gen)
    targets = torch.cat((targets, targets[:5]))
    for options in (LossOptions(nc=nc), LossOptions(nc=nc, label_smoothing=0.1, cls_pw=2.5)):
        assert_matches_reference("cpp", "cpu", p, targets, anchors, options)


@pytest.mark.parametrize("grid", [(13, 11), (70, 65)], ids=["2-radix-passes", "3-radix-passes"])
def test_crowded_planes_equal_the_reference(grid, gen):
    # hundreds of pairs in one (image, anchor) plane, many on the same cells: the plane's pairs are
    # sorted by cell with a radix sort (2 passes of 6 bits for 143 cells, 3 for 4550), which must
    # keep pair order within a cell (the last pair sets the objectness target)
    anchors = [a * grid[0] / 13 for a in random_anchors([3], gen, lo=0.5, hi=2.0)]  # the boxes' size in cells
    p = make_p(2, [3], [grid], 4, gen)
    targets = make_targets(300, 2, 4, gen)
    targets[:, 4:6] = targets[:, 4:6] * 0.3 + 0.02  # small boxes: most match an anchor
    targets = torch.cat((targets, targets[:60], targets[:60]))  # exact duplicates, in pair order
    for options in (LossOptions(nc=4), LossOptions(nc=4, box_loss="ciou", gr=0.5)):
        assert_matches_reference("cpp", "cpu", p, targets, anchors, options)


@pytest.mark.parametrize("nc", [20, 80, 600])
def test_confident_logits_sum_like_the_reference(nc, gen):
    # a matched cell's class BCE and a plane's objectness BCE are summed as logs of products
    # (bce_rows_summed, for classes from 16 on): confident logits (e^-|x| ~ 1e-4, whose log1p terms
    # a plain float product would round away), a few saturated ones, a class row with a tail past
    # 16 lanes (20), rows of several products (600 classes; the 42 cells of a plane); the class and
    # objectness terms each checked on their own, not against the total
    nas, grids = [3], [(6, 7)]
    anchors = random_anchors(nas, gen)
    p = make_p(2, nas, grids, nc, gen)
    cls = -9.0 + 0.5 * torch.randn(p[0][..., 5:].shape, generator=gen)
    cls.view(-1)[:: 7 * nc + 3] = 9.0
    cls.view(-1)[::97] = 60.0
    cls.view(-1)[1::89] = -60.0
    p[0][..., 5:] = cls
    obj = -9.0 + 0.5 * torch.randn(p[0][..., 4].shape, generator=gen)
    obj.view(-1)[::11] = 60.0
    obj.view(-1)[1::13] = -60.0
    p[0][..., 4] = obj
    targets = make_targets(30, 2, nc, gen)
    for options in (LossOptions(nc=nc), LossOptions(nc=nc, label_smoothing=0.1, cls_pw=2.5, obj_pw=0.7)):
        items, _ = assert_matches_reference("cpp", "cpu", p, targets, anchors, options)
        _, ref_items, _ = run("reference", "cpu", p, targets, anchors, options)
        torch.testing.assert_close(items[1:3], ref_items[1:3], rtol=2e-6, atol=0)


def test_no_grad_forward_allocates_no_gradient(gen):
    p = make_p(1, [2], [(3, 3)], 2, gen)
    targets = make_targets(3, 1, 2, gen)
    anchors = random_anchors([2], gen)
    _, items, _, _, grads = yk.ops.fused_loss(p, targets, anchors, LossOptions(nc=2), compute_grad=False)
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
    want = yk.reference.box_iou(pbox, tbox, kind)
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
    cases = []
    for o, balance in (
        (LossOptions(nc=4, fl_gamma=1.0), None),
        (LossOptions(nc=4, family="yolov5", box_loss="ciou", sort_obj_iou=True), torch.tensor([4.0, 1.0])),
    ):
        scalars = [read(o) for _, read in fused_op.OP_SCALARS]
        cases.append((OPS.fused_loss.default, (p, targets, anchors, balance, *scalars, balance is not None, True)))
    ps, tbox, anch = torch.randn(5, 9, generator=gen), torch.rand(5, 4, generator=gen) + 0.1, torch.rand(5, 2) + 0.1
    return cases + [
        (OPS.match.default, (targets, anchors[0], 4, 3, 0.2)),
        (OPS.match.default, (targets, anchors[0], 4, 3, 4.0, "yolov5")),
        (OPS.box_iou.default, (ps, tbox, anch, "ciou")),
        (OPS.box_iou.default, (ps, tbox, anch, "ciou", "yolov5")),
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
    o = (None, "yolov3", 1.0, 3.54, 37.4, 1.0, 64.3, 1.0, 0.2, 4.0, 0.0, 0.0, "giou", "mean", False, False, True)
    f = OPS.fused_loss
    cases = [
        (lambda: f([], t, [], *o), r"p: expected at least one layer"),
        (lambda: f(p, t, anchors + anchors, *o), r"p: expected 2 layers"),
        (lambda: f([p[0][0]], t, anchors, *o), r"p\[0\]: expected a 5-D tensor"),
        (lambda: f([p[0][..., :5]], t, anchors, *o), r"p\[0\]: expected last dim nc \+ 5 >= 6"),
        (
            lambda: f([torch.zeros(1, 2, 1, 1, 8).expand(2, 2, 65536, 32768, 8)], t, anchors, *o),
            r"p\[0\]: expected fewer than 2\^31 cells per grid \(ny \* nx\), got 65536 x 32768",
        ),
        (lambda: f([p[0].int()], t, anchors, *o), r"p\[0\]: expected a floating-point tensor"),
        (lambda: f(p, t, [anchors[0][:1]], *o), r"p\[0\]: expected dim 1 = 1 anchors, got 2"),
        (lambda: f(p, t, [torch.ones(2, 3)], *o), r"anchors\[0\]: expected shape \[na, 2\]"),
        (lambda: f(p, t[:, :4], anchors, *o), r"targets: expected shape \[nt, 6\]"),
        (
            lambda: f(p, torch.tensor([[2.0, 0, 0.5, 0.5, 0.1, 0.1]]), anchors, *o),
            r"targets\[:, 0\] \(image index\): expected integers in \[0, 2\), got 2.0 at row 0",
        ),
        (
            lambda: f(p, torch.tensor([[0, 3.0, 0.5, 0.5, 0.1, 0.1]]), anchors, *o),
            r"targets\[:, 1\] \(class\): expected integers in \[0, 3\), got 3.0 at row 0",
        ),
        (
            lambda: f(p, torch.tensor([[0, 1.0, 0.5, 0.5, -0.1, 0.1]]), anchors, *o),
            r"targets\[:, 4:6\] \(box w, h\): expected finite sizes in \[0, 2\] .*, got \[-0.1, 0.1\] at row 0",
        ),
        (lambda: f(p, t, [-anchors[0]], *o), r"anchors\[0\]: expected finite sizes > 0"),
        (lambda: f(p, t, anchors, *o[:12], "eiou", *o[13:]), r"box_loss: expected one of"),
        (lambda: f(p, t, anchors, *o[:13], "none", *o[14:]), r"reduction: expected 'mean' or 'sum', got 'none'"),
        (lambda: f(p, t, anchors, *o[:9], float("inf"), *o[10:]), r"anchor_t: expected a finite number, got inf"),
        (lambda: f(p, t, anchors, *o[:2], float("nan"), *o[3:]), r"gr: expected a finite number, got nan"),
        (lambda: f(p, t, anchors, None, "yolov4", *o[2:]), r"family: expected 'yolov3' or 'yolov5', got 'yolov4'"),
        (lambda: f(p, t, anchors, torch.ones(2), *o[1:]), r"balance: expected shape \[1\] \(one weight per layer\)"),
        (lambda: f(p, t, anchors, torch.tensor([float("inf")]), *o[1:]), r"balance\[0\]: expected a finite weight"),
    ]
    for call, pattern in cases:
        with pytest.raises((RuntimeError, ValueError), match=pattern):  # value checks: ValueError
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
        _, _, _, _, grads = yk.ops.fused_loss(p, targets, anchors, LossOptions(nc=3))
        assert torch.isfinite(grads[0]).all() and not yk.cpp.pool_stats()["enabled"]
    finally:
        yk.cpp.pool_set_enabled(True)
        yk.cpp.pool_set_limit(4 << 30)


def test_missing_extension_is_a_clear_error(monkeypatch):
    backend = yk.loss.BACKENDS["cpp"]
    monkeypatch.setattr(library, "_C", None)
    monkeypatch.setattr(library, "LOAD_ERROR", "yolo_kernels._C could not be imported (test)")
    assert "cpp" not in yk.available_backends("cpu")
    p = [torch.zeros(1, 1, 2, 2, 6)]
    with pytest.raises(yk.BackendUnavailableError, match=r"pip install -v --no-build-isolation \."):
        yk.compute_loss(p, torch.zeros(0, 6), duck_model([torch.ones(1, 2)], 1), backend="cpp")
    monkeypatch.setattr(yk.dispatch, "_WARNED", set())
    model = duck_model([torch.ones(1, 2)], 1)
    with pytest.warns(
        RuntimeWarning,
        match=r"runs the slow 'reference' loss on cpu: yolo_kernels._C could not be imported \(test\)",
    ) as caught:
        assert yk.compute_loss(p, torch.zeros(0, 6), model)[0].shape == (1,)  # auto -> reference, warns
    assert caught[0].filename == __file__  # attributed to the caller's line
    monkeypatch.setattr(yk.dispatch, "_WARNED", set())
    with pytest.warns(RuntimeWarning, match=r"'reference' loss on cpu") as caught:  # through nn.Module.__call__
        yk.YOLOv3Loss([[[10, 13]]], [8], 1)(p, torch.zeros(0, 6))
    assert caught[0].filename == __file__
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per process: the second call is quiet
        yk.compute_loss(p, torch.zeros(0, 6), model)
    assert backend.unavailable_reason(torch.device("cpu")).startswith("yolo_kernels._C could not be imported")
