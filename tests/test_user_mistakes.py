"""What a new user gets wrong, and what the originals accept: each mistake is a clear error at the
call that makes it (naming the argument, what was expected and what came), and what the originals
train on trains here too (zero-size boxes; hyperparameters changed between calls)."""

import original_yolov5 as original
import pytest
import torch
from helpers import duck_model, fused_backends, make_p, make_targets
from test_yolov5 import HYP, ComputeLoss, TinyYOLOv5, YOLOv5Loss, fixed_problem

import yolo_kernels as yk
import yolo_kernels.integrations.ultralytics as yk_ultralytics
from yolo_kernels.anchor.backends import run_backend
from yolo_kernels.anchor.options import LossOptions

BACKENDS = [pytest.param("reference", "cpu", id="reference"), *fused_backends()]
ANCHORS_PX = [[[116, 90], [156, 198]], [[30, 61], [62, 45]], [[10, 13], [16, 30]]]
STRIDES = [32, 16, 8]
GRIDS = [(2, 3), (4, 6), (8, 12)]  # a 64 x 96 image at strides 32, 16, 8


def layers(nc=3, seed=0, bs=2):
    return make_p(bs, [2, 2, 2], GRIDS, nc, torch.Generator().manual_seed(seed))


def yolov5_model(nc=4):
    """The stand-in yolov5 model with the default loss hyperparameters, as train.py sets them."""
    model = TinyYOLOv5(nc)
    model.hyp = dict(HYP)
    return model


def archive_model(nc=3, strides=STRIDES):
    """A duck-typed archive Darknet whose YOLO layers carry their stride, as the archive's do."""
    model = duck_model([torch.tensor(a, dtype=torch.float32) / s for a, s in zip(ANCHORS_PX, STRIDES)], nc)
    for j, s in zip(model.yolo_layers, strides):
        model.module_list[j].stride = s
    return model


# ------------------------------------------------------------------ unknown hyperparameter keys


def test_module_apis_reject_unknown_hyperparameter_keys():
    with pytest.raises(
        ValueError, match=r"hyp: unknown loss hyperparameter\(s\) \['iou_thres'\]; the known keys are \["
    ):
        yk.YOLOv3Loss(ANCHORS_PX, STRIDES, 3, hyp={"iou_thres": 0.3})
    with pytest.raises(ValueError, match=r"unknown loss hyperparameter\(s\) \['giou'\]; .*'box'"):
        YOLOv5Loss(ANCHORS_PX, STRIDES, 3, hyp={"giou": 0.05})
    crit = yk.YOLOv3Loss(ANCHORS_PX, STRIDES, 3, hyp={"iou_t": 0.3})  # a known key is taken
    assert crit.options.iou_t == 0.3


def test_drop_in_reads_only_the_loss_keys_of_a_training_hyp():
    model = archive_model()
    model.hyp = dict(yk.DEFAULT_HYP, lr0=0.01, momentum=0.937, degrees=1.98)  # train.py's hyp
    loss, _ = yk.compute_loss(layers(), make_targets(5, 2, 3, torch.Generator().manual_seed(1)), model)
    assert torch.isfinite(loss).all()


# ------------------------------------------------------------------ layers in the wrong order


def test_layers_in_another_order_than_the_strides_are_rejected():
    p, t = layers(), make_targets(5, 2, 3, torch.Generator().manual_seed(1))
    pattern = r"p: the layers' grids .* at strides \[32.0, 16.0, 8.0\] imply image heights .*order of the anchors"
    crit = yk.YOLOv3Loss(ANCHORS_PX, STRIDES, 3)
    crit(p, t)
    with pytest.raises(ValueError, match=pattern):
        crit(p[::-1], t)
    model = archive_model()
    yk.compute_loss(p, t, model)
    with pytest.raises(ValueError, match=pattern):
        yk.compute_loss(p[::-1], t, model)
    with pytest.raises(ValueError, match=pattern):
        yk.YOLOv3Loss.from_model(model)(p[::-1], t)
    with pytest.raises(ValueError, match=r"imply image heights"):
        YOLOv5Loss(ANCHORS_PX, STRIDES, 3)(p[::-1], t)


def test_grids_of_images_that_are_not_a_multiple_of_the_largest_stride_pass():
    # a 100 x 70 image: ceil(size / stride) cells (stride-2 convolutions with padding)
    p = make_p(1, [2, 2, 2], [(4, 3), (7, 5), (13, 9)], 3)
    loss, _ = yk.YOLOv3Loss(ANCHORS_PX, STRIDES, 3)(p, torch.zeros(0, 6))
    assert torch.isfinite(loss).all()


def test_the_yolov5_drop_in_checks_grids_against_the_detect_strides():
    p, targets, _ = fixed_problem(nc=4)
    model = yolov5_model()
    compute_loss = ComputeLoss(model, backend="reference")
    compute_loss(p, targets)
    with pytest.raises(ValueError, match=r"imply image heights"):
        compute_loss(p[::-1], targets)


# ------------------------------------------------------------------ boxes in pixels, zero-size boxes


@pytest.mark.parametrize("backend, device", BACKENDS)
def test_boxes_in_pixels_are_rejected_naming_the_row(backend, device):
    p, t = layers(), make_targets(5, 2, 3, torch.Generator().manual_seed(1))
    t[3, 4:6] = torch.tensor([37.0, 52.0])  # pixels
    q = [x.to(device) for x in p]
    with pytest.raises(
        ValueError, match=r"box w, h\): expected finite sizes in \[0, 2\] .*pixels.* got \[37.0, 52.0\] at row 3"
    ):
        yk.compute_loss(q, t.to(device), archive_model(), backend=backend)
    t[3, 4:6] = torch.tensor([1.0004, 0.2])  # a hair above 1 (an unclipped box): accepted
    yk.compute_loss(q, t.to(device), archive_model(), backend=backend)


@pytest.mark.parametrize("backend, device", BACKENDS)
@pytest.mark.parametrize("family", yk.FAMILIES)
def test_zero_size_boxes_match_nothing_as_in_the_originals(backend, device, family):
    nc = 3
    g = torch.Generator().manual_seed(2)
    p = make_p(2, [2, 2], [(6, 6), (3, 3)], nc, g)
    anchors = [torch.tensor([[1.0, 1.5], [2.0, 1.0]]), torch.tensor([[0.5, 0.8], [1.2, 1.0]])]
    t = make_targets(6, 2, nc, g, lo=0.1, hi=0.5)
    zero = t[:3].clone()
    zero[0, 4], zero[1, 5], zero[2, 4:6] = 0.0, 0.0, 0.0  # w = 0, h = 0, both
    options = LossOptions(nc=nc, family=family)

    def run(targets):
        q = [x.to(device).requires_grad_() for x in p]
        loss, items, _, st = run_backend(q, targets.to(device), anchors, options, backend, True, stats=True)
        loss.backward()
        return loss.detach().cpu(), items.cpu(), [x.grad.cpu() for x in q], int(st.unmatched_targets)

    with_zero = run(torch.cat((t, zero)))
    without = run(t)
    torch.testing.assert_close(with_zero[0], without[0], rtol=1e-6, atol=0)
    for a, b in zip(with_zero[2], without[2]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert with_zero[3] == without[3] + 3


def test_negative_and_nan_sizes_stay_errors():
    p, t = layers(), make_targets(5, 2, 3, torch.Generator().manual_seed(1))
    for bad in (-0.1, float("nan"), float("inf")):
        t2 = t.clone()
        t2[1, 5] = bad
        with pytest.raises(ValueError, match=r"box w, h\).* at row 1"):
            yk.compute_loss(p, t2, archive_model(), backend="reference")


def test_zero_size_boxes_are_accepted_by_the_original_yolov5_too():
    p, targets, anchors = fixed_problem(nc=4)
    targets[0, 4] = 0.0
    want, _ = original.compute_loss(p, targets, anchors, HYP, 4, [4.0, 1.0, 0.4])
    model = yolov5_model()
    loss, _ = ComputeLoss(model, backend="reference")(p, targets)
    torch.testing.assert_close(loss, want, rtol=1e-6, atol=0)


# ------------------------------------------------------------------ backends and options at the call


def test_bad_backend_names_fail_at_construction():
    with pytest.raises(
        ValueError, match=r"backend: expected 'auto' or one of \['cpp', 'reference', 'triton'\], got 'cudaa'"
    ):
        yk.YOLOv3Loss(ANCHORS_PX, STRIDES, 3, backend="cudaa")
    with pytest.raises(ValueError, match=r"got 'gpu'"):
        YOLOv5Loss(ANCHORS_PX, STRIDES, 3, backend="gpu")
    model = yolov5_model()
    with pytest.raises(ValueError, match=r"got 'gpu'"):
        ComputeLoss(model, backend="gpu")


@pytest.mark.parametrize(
    "kwargs, error, pattern",
    [
        ({"box_loss": "bogus"}, ValueError, r"box_loss: expected one of"),
        ({"backend": "gpu"}, ValueError, r"backend: expected 'auto' or one of"),
        ({"iou_t": 0.3}, TypeError, r"unknown option\(s\) \['iou_t'\].*hyperparameters, read from model.hyp"),
        ({"reduction": "none"}, ValueError, r"reduction: expected one of"),
        ({"label_smoothing": 2.0}, ValueError, r"label_smoothing: expected a value in \[0, 1\]"),
        ({"validate": "yes"}, TypeError, r"validate: expected a bool"),
        ({"stats": True}, TypeError, r"unknown option\(s\) \['stats'\]"),
    ],
)
def test_integration_apply_validates_at_the_call(kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        yk_ultralytics.apply("yolo_kernels_no_such_module", **kwargs)  # fails before the import
    assert not yk_ultralytics.is_applied()


def test_the_eval_mode_output_gets_a_hint():
    p, t = layers(), make_targets(5, 2, 3, torch.Generator().manual_seed(1))
    boxes = torch.zeros(2, sum(2 * h * w for h, w in GRIDS), 8)
    with pytest.raises(TypeError, match=r"p: got the output of a model in eval mode.*second item.*model.train\(\)"):
        yk.compute_loss((boxes, p), t, archive_model())
    with pytest.raises(TypeError, match=r"eval mode"):
        yk.YOLOv3Loss(ANCHORS_PX, STRIDES, 3)((boxes, p), t)


# ------------------------------------------------------------------ the yolov5 drop-in reads as the original


def test_compute_loss_reads_hyp_on_every_call_as_the_original():
    p, targets, anchors = fixed_problem(nc=4)
    model = yolov5_model()
    compute_loss = ComputeLoss(model, backend="reference")
    compute_loss(p, targets)
    model.hyp.update(box=0.2, obj=0.7, cls=1.3, anchor_t=2.5)  # e.g. a hyperparameter schedule
    loss, items = compute_loss(p, targets)
    want, want_items = original.compute_loss(p, targets, anchors, dict(model.hyp), 4, [4.0, 1.0, 0.4])
    torch.testing.assert_close(loss, want, rtol=1e-6, atol=0)
    torch.testing.assert_close(items, want_items, rtol=1e-6, atol=1e-7)
    del model.hyp["box"]
    with pytest.raises(KeyError, match=r"compute_loss.hyp: missing loss hyperparameter\(s\) \['box'\]"):
        compute_loss(p, targets)


def test_a_class_level_sort_obj_iou_is_read_as_in_the_original():
    p, targets, anchors = fixed_problem(nc=4, nt=40)  # cells with several pairs of different IoU
    model = yolov5_model()
    compute_loss = ComputeLoss(model, backend="reference")
    want, _ = original.compute_loss(p, targets, anchors, HYP, 4, [4.0, 1.0, 0.4], sort_obj_iou=True)
    ComputeLoss.sort_obj_iou = True
    try:
        assert compute_loss.sort_obj_iou is True
        loss, _ = compute_loss(p, targets)
    finally:
        ComputeLoss.sort_obj_iou = False
    torch.testing.assert_close(loss, want, rtol=1e-6, atol=0)
    plain, _ = original.compute_loss(p, targets, anchors, HYP, 4, [4.0, 1.0, 0.4])
    assert not torch.equal(want, plain), "the problem must tell the two settings apart"


def test_compile_gate_without_a_usable_triton_says_what_is_missing(monkeypatch, capsys):
    import yolo_kernels.triton as triton_backend
    from yolo_kernels.triton import compile_gate

    monkeypatch.setattr(triton_backend, "IMPORT_ERROR", "triton could not be imported (No module named 'triton')")
    with pytest.raises(SystemExit) as exit_info:
        compile_gate.main([])
    assert exit_info.value.code == 2
    assert "the compile gate needs a supported triton: triton could not be imported" in capsys.readouterr().err


def test_no_cuda_device_means_no_triton_install_hint(monkeypatch):
    import yolo_kernels.triton as triton_backend

    monkeypatch.setattr(triton_backend, "_loss", None)
    monkeypatch.setattr(triton_backend, "IMPORT_ERROR", "triton could not be imported (x); install ...")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    backend = yk.loss.BACKENDS["triton"]
    for device in (None, torch.device("cpu")):
        reason = backend.unavailable_reason(device)
        assert "CUDA" in reason and "install" not in reason
