"""The public API: the drop-in, the module, build_targets and the backend dispatch."""

import re

import pytest
import torch
from helpers import duck_model, make_p, make_targets, random_anchors

import yolo_kernels as yk


def test_available_backends_and_dispatch_errors():
    assert yk.available_backends()[0] == "reference"
    assert "reference" in yk.available_backends("cpu")
    p = [torch.zeros(1, 1, 2, 2, 6)]
    model = duck_model([torch.ones(1, 2)], 1)
    for name in ("cpp", "triton"):
        if name in yk.available_backends("cpu"):
            continue
        with pytest.raises(yk.BackendUnavailableError, match=f"backend '{name}' cannot run on cpu: .*"):
            yk.compute_loss(p, torch.zeros(0, 6), model, backend=name)
    with pytest.raises(ValueError, match=r"backend: expected 'auto' or one of .* got 'cuda'"):
        yk.compute_loss(p, torch.zeros(0, 6), model, backend="cuda")
    auto, _ = yk.compute_loss(p, torch.zeros(0, 6), model, backend="auto")
    ref, _ = yk.compute_loss(p, torch.zeros(0, 6), model, backend="reference")
    assert torch.allclose(auto, ref)


def test_drop_in_equals_reference_and_unwraps_module(gen):
    nas, grids, nc = [3, 3], [(4, 4), (8, 8)], 6
    anchors = random_anchors(nas, gen)
    model = duck_model(anchors, nc, hyp=dict(yk.DEFAULT_HYP, lr0=0.01, momentum=0.9), gr=0.4)
    p = make_p(2, nas, grids, nc, gen)
    t = make_targets(7, 2, nc, gen)
    loss, items = yk.compute_loss(p, t, model, backend="reference")
    ref_loss, ref_items = yk.reference.compute_loss(p, t, model)
    assert torch.equal(items, ref_items) and loss.shape == (1,) and items.shape == (4,)

    class Wrapper(torch.nn.Module):  # what DataParallel / DDP look like to the loss
        def __init__(self, module):
            super().__init__()
            self.module = module

    wrapped = Wrapper(yk.models.Darknet("yolov3-tiny"))
    q = [x.detach() for x in wrapped.module(torch.rand(2, 3, 64, 64))]
    t2 = make_targets(5, 2, 80, gen)
    a = yk.compute_loss(q, t2, wrapped)[1]
    b = yk.compute_loss(q, t2, wrapped.module)[1]
    assert torch.equal(a, b)
    tc, tb, ind, an = yk.build_targets(q, t2, wrapped)
    assert len(tc) == len(tb) == len(ind) == len(an) == 2


@pytest.mark.parametrize("options", [{}, {"box_loss": "ciou", "reduction": "sum", "label_smoothing": 0.05}])
def test_module_equals_drop_in(options, gen):
    model = yk.models.Darknet("yolov3-tiny")
    model.gr = 0.6
    model.hyp = dict(yk.DEFAULT_HYP, fl_gamma=1.5, cls=20.0)
    p = [x.detach() for x in model(torch.rand(2, 3, 64, 64))]
    t = make_targets(6, 2, 80, gen)
    want = yk.compute_loss(p, t, model, **options)
    heads = [model.module_list[j] for j in model.yolo_layers]
    crit = yk.YOLOv3Loss(
        [h.anchors for h in heads], [h.stride for h in heads], 80, hyp=model.hyp, giou_ratio=0.6, **options
    )
    got = crit(p, t)
    assert torch.allclose(got[1], want[1], rtol=1e-6)
    got_from_model = yk.YOLOv3Loss.from_model(model, **options)(p, t)
    assert torch.allclose(got_from_model[1], want[1], rtol=1e-6)
    crit.gr = 0.0  # ramped by the training loop
    model.gr = 0.0
    assert torch.allclose(crit(p, t)[1], yk.compute_loss(p, t, model, **options)[1], rtol=1e-6)
    assert "nc=80" in repr(crit)


def test_module_moves_anchors_with_to():
    crit = yk.YOLOv3Loss([[[10, 13], [16, 30]]], [8], 3).to(torch.float64)
    assert crit.anchor_vecs[0].dtype == torch.float64
    assert torch.allclose(crit.anchor_vecs[0], torch.tensor([[10, 13], [16, 30]], dtype=torch.float64) / 8)


def test_half_precision_inputs_match_upcast_reference(gen):
    nas, grids, nc = [3], [(6, 5)], 4
    anchors = random_anchors(nas, gen)
    model = duck_model(anchors, nc)
    p32 = make_p(2, nas, grids, nc, gen)
    t = make_targets(6, 2, nc, gen)
    for dtype in (torch.float16, torch.bfloat16):
        ph = [x.to(dtype).requires_grad_() for x in p32]
        loss, items = yk.compute_loss(ph, t, model)
        loss.backward()
        up = [x.detach().float().requires_grad_() for x in ph]
        loss_up, items_up = yk.compute_loss(up, t, model, backend="reference")
        loss_up.backward()
        assert torch.allclose(items, items_up, rtol=1e-2)
        assert ph[0].grad.dtype == dtype
        err = (ph[0].grad.float() - up[0].grad).abs().max() / up[0].grad.abs().max()
        assert err < 1e-2


def test_targets_device_and_anchor_device_handling(gen):
    # anchors stored on another device/dtype than p are moved (ultralytics keeps anchor_vec as a plain attribute)
    anchors = [torch.tensor([[1.0, 1.0]], dtype=torch.float64)]
    p = make_p(1, [1], [(3, 3)], 2, gen)
    loss, _ = yk.compute_loss(p, make_targets(2, 1, 2, gen), duck_model(anchors, 2))
    assert loss.dtype == torch.float32


@pytest.mark.parametrize("drop", [["iou_t"], ["giou", "fl_gamma"]])
def test_drop_in_names_missing_hyperparameters(drop, gen):
    hyp = {k: v for k, v in yk.DEFAULT_HYP.items() if k not in drop}
    hyp["iou_thres"] = 0.3  # a typo must not silently leave the default in place
    model = duck_model(random_anchors([2], gen), 3, hyp=hyp)
    p, t = make_p(1, [2], [(2, 2)], 3, gen), make_targets(2, 1, 3, gen)
    for call in (
        lambda: yk.compute_loss(p, t, model),
        lambda: yk.build_targets(p, t, model),
        lambda: yk.YOLOv3Loss.from_model(model),
        lambda: yk.reference.compute_loss(p, t, model),
    ):
        expected = r"model.hyp: missing loss hyperparameter\(s\) " + re.escape(repr(drop)) + ".*'iou_thres'"
        with pytest.raises(KeyError, match=expected):
            call()


def test_drop_in_needs_gr_and_the_module_api_keeps_its_defaults(gen):
    model = duck_model(random_anchors([2], gen), 3)
    del model.gr
    p, t = make_p(1, [2], [(2, 2)], 3, gen), make_targets(2, 1, 3, gen)
    with pytest.raises(TypeError, match="model: expected a 'gr' attribute"):
        yk.compute_loss(p, t, model)
    crit = yk.YOLOv3Loss([torch.ones(2, 2)], [1.0], 3, hyp={"iou_t": 0.1})  # documented defaults fill the rest
    assert crit.options.iou_t == 0.1 and crit.options.box == yk.DEFAULT_HYP["giou"]


def test_numpy_scalars_are_numbers(gen):
    """Hyperparameters, nc and strides often come out of NumPy: its scalars are accepted like Python's."""
    import numpy as np

    hyp = {k: np.float32(v) for k, v in yk.DEFAULT_HYP.items()}
    anchors = random_anchors([2], gen)
    model = duck_model(anchors, np.int64(3), hyp=hyp, gr=np.float64(0.5))
    python_model = duck_model(anchors, 3, hyp={k: float(v) for k, v in hyp.items()}, gr=0.5)
    p, t = make_p(1, [2], [(2, 2)], 3, gen), make_targets(2, 1, 3, gen)
    torch.testing.assert_close(yk.compute_loss(p, t, model)[1], yk.compute_loss(p, t, python_model)[1])
    crit = yk.YOLOv3Loss([torch.ones(2, 2)], [np.int32(8)], np.int64(3))
    assert crit.strides == [8.0] and crit.nc == 3
    with pytest.raises(TypeError, match="box: expected a real number, got bool"):
        yk.LossOptions(nc=3, box=np.bool_(True))
    with pytest.raises(TypeError, match="giou: expected a real number, got bool"):
        yk.YOLOv3Loss([torch.ones(2, 2)], [8.0], 3, hyp={"giou": np.bool_(True)})


def test_model_options_follow_every_change_of_the_model(gen):
    """``model_options`` builds the options once per set of plain values: an edit of ``model.hyp``
    (in place or a new dict), of ``gr`` or ``nc``, a value's type, or a keyword gives new options,
    and a value that is not a plain Python value is never cached."""
    from yolo_kernels.anchor.options import model_options

    model = duck_model(random_anchors([3], gen), 4)
    first = model_options(model)
    assert model_options(model) is first
    model.hyp["giou"] = 2.5  # in place
    assert model_options(model).box == 2.5
    model.hyp = dict(model.hyp, cls=9.0)
    assert model_options(model).cls == 9.0
    model.gr = 0.25
    assert model_options(model).gr == 0.25
    model.nc = 1
    assert model_options(model).nc == 1
    assert model_options(model, box_loss="ciou").box_loss == "ciou"
    assert model_options(model).box_loss == "giou"
    model.hyp["fl_gamma"] = torch.tensor(1.5)  # a tensor: read every call, never a cache key
    assert model_options(model).fl_gamma == 1.5
    model.hyp["fl_gamma"].fill_(0.5)
    assert model_options(model).fl_gamma == 0.5
    model.hyp["fl_gamma"] = True  # equal to 1 as a key, but a bool is not a number here
    with pytest.raises(TypeError, match="fl_gamma"):
        model_options(model)


def test_every_documented_path_resolves_from_the_package():
    """The README's API table writes ``yk.<path>`` after ``import yolo_kernels as yk``: each path
    resolves in a fresh interpreter, with no other import first."""
    import os
    import subprocess
    import sys

    readme = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")).read()
    table = readme[readme.index("| `yk.compute_loss(") :]
    table = table[: table.index("\n\n")]
    paths = sorted(set(re.findall(r"`yk\.([A-Za-z_][A-Za-z0-9_.]*)", table)))
    assert {"yolov8.DetectionLoss", "anchor_free.reference", "integrations.ultralytics"} <= set(paths)
    code = (
        "import functools, yolo_kernels as yk\n"
        f"for path in {paths!r}:\n"
        "    functools.reduce(getattr, path.split('.'), yk)\n"
        "print('ok')\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-2000:]
