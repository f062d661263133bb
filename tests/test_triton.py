"""What is specific to the Triton launcher: the gradient's layout, the no-gradient path, and the
linear cost of matching and duplicates (under the interpreter). Its parity with the reference is
in ``test_fused_loss.py``, its building blocks in ``test_triton_math.py``, its compilation for
real GPUs in ``test_compile_gate.py``. Under the interpreter on CPU, and on CUDA when present."""

import pytest
import torch
from helpers import count_loop_iterations, make_p, make_targets, random_anchors

from yolo_kernels.anchor.options import LossOptions
from yolo_kernels.triton import anchor_loss as triton_loss
from yolo_kernels.triton import interpreter_active
from yolo_kernels.triton.launch import record_launches

DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(not interpreter_active(), reason="TRITON_INTERPRET=1 not set")),
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")),
]


@pytest.mark.parametrize("device", DEVICES)
def test_gradient_keeps_the_layout_of_p(device, gen):
    nc, na, ny, nx, bs = 4, 2, 3, 4, 2
    conv = torch.randn(bs, na * (nc + 5), ny, nx, generator=gen).to(device)
    p = conv.view(bs, na, nc + 5, ny, nx).permute(0, 1, 3, 4, 2)  # the head's view: channel stride ny * nx
    anchors = [a.to(device) for a in random_anchors([na], gen)]
    targets = make_targets(5, bs, nc, gen).to(device)
    _, _, _, _, grads = triton_loss.fused_loss([p], targets, anchors, LossOptions(nc=nc))
    assert grads[0].stride() == p.stride()


def test_gradient_views_take_the_strides_empty_like_gives():
    """The launcher's zeroed buffer holds each layer's gradient as a view with the strides
    ``torch.empty_like(p)`` would give: p's own when p is dense (any order of its dims), else
    contiguous; each view starts 128-byte aligned and the views do not overlap."""
    base = torch.zeros(2, 3, 4, 5, 7)
    layouts = [
        base,
        base.permute(0, 1, 4, 2, 3).contiguous().permute(0, 1, 3, 4, 2),  # the head's conv view
        base.permute(4, 0, 1, 2, 3).contiguous().permute(1, 2, 3, 4, 0),  # channels outermost
        base[:, :, :, :3],  # a slice: not dense
        base[:1].expand(2, -1, -1, -1, -1),  # overlapping
        torch.zeros(1, 3, 1, 5, 7)[:, :, :, :, :].transpose(2, 0),  # size-1 dims in any order
    ]
    p = [x.clone() if x.is_contiguous() else x for x in layouts]
    anchors = [torch.ones(x.shape[1], 2) for x in p]
    targets = torch.tensor([[0, 1, 0.5, 0.5, 0.2, 0.2]])
    with record_launches():
        *_, grads = triton_loss.fused_loss(p, targets, anchors, LossOptions(nc=2))
    starts = []
    for x, g in zip(p, grads):
        assert g.shape == x.shape and g.stride() == torch.empty_like(x).stride()
        assert (g.storage_offset() * g.element_size()) % 128 == 0
        starts.append(g.storage_offset())
    assert all(b - a >= x.numel() for a, b, x in zip(starts, starts[1:], p))


@pytest.mark.parametrize("device", DEVICES)
def test_without_gradient_no_gradient_is_allocated(device, gen):
    p = [x.to(device) for x in make_p(1, [2], [(3, 3)], 2, gen)]
    targets = make_targets(3, 1, 2, gen).to(device)
    anchors = [a.to(device) for a in random_anchors([2], gen)]
    _, items, _, _, grads = triton_loss.fused_loss(p, targets, anchors, LossOptions(nc=2), compute_grad=False)
    _, items_grad, _, _, _ = triton_loss.fused_loss(p, targets, anchors, LossOptions(nc=2), compute_grad=True)
    assert grads[0].numel() == 0 and torch.equal(items, items_grad)


@pytest.mark.skipif(not interpreter_active(), reason="counts the interpreter's loop iterations")
def test_matching_and_duplicates_are_linear_in_the_pairs(monkeypatch):
    """Loop iterations of every kernel, counted by shadowing ``range`` in the kernels' module (the
    interpreter runs the kernels as Python): 4x the targets must cost about 4x, not 16x. Targets
    are spread over a large grid, so the winning pairs grow with the targets (the case where a
    per-winner scan of all candidates is quadratic), and clustered, so that duplicates abound."""
    iterations = count_loop_iterations(monkeypatch, triton_loss)
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


BAD_VALUES = [  # (column, value, the failing check's words in the message)
    (0, 2.0, "targets[:, 0] integers in [0, 2)"),
    (0, 0.5, "targets[:, 0] integers in [0, 2)"),
    (1, 3.0, "[:, 1] integers in [0, 3)"),
    (1, float("nan"), "[:, 1] integers in [0, 3)"),
    (2, float("inf"), "[:, 2:6] finite"),
    (3, float("nan"), "[:, 2:6] finite"),
    (4, -0.5, "w, h in [0, 2]"),
    (5, 40.0, "w, h in [0, 2]"),  # a box in pixels
    (5, float("inf"), "[:, 2:6] finite"),
]


@pytest.mark.skipif(not interpreter_active(), reason="a failed device-side assertion ends a CUDA context")
@pytest.mark.parametrize("column, value, words", BAD_VALUES)
def test_device_value_checks_assert_and_never_match_the_bad_row(column, value, words, gen):
    """The kernels check the target values (the Python checks are skipped on CUDA): one assertion
    whose message names every condition; the failing row is unmatched either way, so the loss
    equals the loss without it (a bad image index never addresses memory outside ``p``)."""
    p = make_p(2, [2, 3], [(4, 4), (2, 2)], 3, gen)
    anchors = random_anchors([2, 3], gen, lo=0.5, hi=2.0)
    targets = make_targets(6, 2, 3, gen, lo=0.2, hi=0.6)
    bad = targets.clone()
    bad[2, column] = value
    options = LossOptions(nc=3)
    assert triton_loss.fused_loss(p, targets, anchors, options, check_values=True)[0].isfinite().all()
    with pytest.raises(RuntimeError, match=r"device-side value checks failed") as error:
        triton_loss.fused_loss(p, bad, anchors, options, check_values=True)
    assert words in str(error.value)
    assert len(triton_loss.value_check_message(2**31, 2**31)) < 255  # CUDA's limit for the message
    kept = torch.cat((targets[:2], targets[3:]))
    loss_bad, items_bad, _, _, grads_bad = triton_loss.fused_loss(p, bad, anchors, options)
    loss_kept, items_kept, _, _, grads_kept = triton_loss.fused_loss(p, kept, anchors, options)
    torch.testing.assert_close(items_bad, items_kept)
    for g, h in zip(grads_bad, grads_kept):
        torch.testing.assert_close(g, h)


@pytest.mark.skipif(not interpreter_active(), reason="a failed device-side assertion ends a CUDA context")
@pytest.mark.parametrize("value", [0.0, -1.0, float("nan"), float("inf")])
def test_device_value_checks_cover_the_anchors_even_without_targets(value, gen):
    p = make_p(1, [2, 2], [(3, 3), (2, 2)], 2, gen)
    anchors = random_anchors([2, 2], gen)
    anchors[1][1, 0] = value
    for targets in (make_targets(3, 1, 2, gen), torch.zeros(0, 6)):
        with pytest.raises(RuntimeError, match=r"anchors finite > 0"):
            triton_loss.fused_loss(p, targets, anchors, LossOptions(nc=2), check_values=True)


def test_launches_do_not_grow_with_the_layers(gen):
    """Each CUDA launch costs host and driver time that, at common sizes, exceeds the kernels'
    own time. Up to four layers share each launch of the per-layer kernels (match, objectness,
    pair gradient), so a loss call is five Triton launches (eight for five layers); besides them
    the launcher issues one memset, one sort, one search and the value assertion, whatever the
    number of layers (the per-layer sums, scales and items are one finalize kernel). Counted with
    the kernels recorded, not run, after a first call has built the layer table."""
    from torch.utils._python_dispatch import TorchDispatchMode

    free = {"empty", "empty_like", "new_empty", "view", "slice", "select", "reshape", "_reshape_alias", "detach"}
    free |= {"as_strided", "alias", "unsqueeze", "expand", "t", "transpose", "permute", "lift_fresh", "_to_copy"}

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []
            self.allocations = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            self.allocations += name in ("empty", "empty_like", "new_empty", "empty_strided", "zeros")
            if name not in free:
                self.ops.append(name)
            if name == "_assert_async":  # the recorded kernels left its flag unwritten
                return None
            return func(*args, **(kwargs or {}))

    for nl, launches_expected in ((1, 5), (3, 5), (4, 5), (5, 8)):
        p = make_p(2, [3] * nl, [(4, 4)] * nl, 3, gen)
        anchors, targets = random_anchors([3] * nl, gen), make_targets(5, 2, 3, gen)
        with record_launches():
            triton_loss.fused_loss(p, targets, anchors, LossOptions(nc=3))  # builds the layer table
        with record_launches() as launches, Count() as count:
            triton_loss.fused_loss(p, targets, anchors, LossOptions(nc=3), check_values=True)
        assert len(launches) == launches_expected
        assert sorted(count.ops) == ["_assert_async", "searchsorted", "sort", "zeros"], count.ops
        # allocations (microseconds of host time each on a GPU machine): the zeroed buffer, the
        # kernels' buffers carved from one float and one integer allocation, the four outputs
        assert count.allocations == 7
        # the eager autograd: forward the same but the pair gradients' launches (no gradient yet);
        # backward one memset of the gradients, then the objectness and pair gradient kernels
        groups = len(range(0, nl, 4))
        with record_launches() as launches, Count() as count:
            *_, saved = triton_loss.loss_forward(p, targets, anchors, LossOptions(nc=3))
        assert len(launches) == launches_expected - groups and count.allocations == 7
        with record_launches() as launches, Count() as count:
            triton_loss.loss_backward(saved, p, torch.ones(1))
        assert len(launches) == 2 * groups and count.allocations == 1


@pytest.mark.parametrize("device", DEVICES)
def test_layers_beyond_one_launch_equal_the_reference(device, gen):
    """Six layers of different grids and anchor counts: two launches of each per-layer kernel
    (layers 0-3 and 4-5) split the candidates, cells and groups between them exactly."""
    from helpers import assert_matches_reference

    nas, grids = [3, 2, 3, 1, 2, 3], [(2, 3), (4, 4), (3, 5), (1, 1), (5, 2), (6, 6)]
    p = make_p(2, nas, grids, 4, gen)
    anchors = random_anchors(nas, gen, lo=0.5, hi=3.0)
    targets = make_targets(9, 2, 4, gen, lo=0.1, hi=0.7)
    targets = torch.cat((targets, targets[:3]))  # duplicates
    assert_matches_reference("triton", device, p, targets, anchors, LossOptions(nc=4))


@pytest.mark.parametrize("device", DEVICES)
def test_a_loss_kept_after_backward_does_not_keep_the_predictions(device, gen):
    """Backward writes the gradient from state forward kept; once backward has run, a loss kept
    alive (a logging list) must not hold the network's outputs ``p`` (tens of MB in training)."""
    import gc
    import weakref

    import yolo_kernels as yk

    leaves = [x.to(device).requires_grad_() for x in make_p(2, [3], [(4, 4)], 3, gen)]
    p = [x * 1.0 for x in leaves]  # the network's outputs: not leaves
    anchors = [a.to(device) for a in random_anchors([3], gen)]
    targets = make_targets(4, 2, 3, gen).to(device)
    options = LossOptions(nc=3)
    loss, _, _, _ = yk.triton.TritonBackend().loss(p, targets, anchors, options)
    loss.sum().backward()
    alive = weakref.ref(p[0])
    del p
    gc.collect()
    assert loss.grad_fn is not None and alive() is None
