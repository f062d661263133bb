"""docs/semantics.md, "Bad input": every bad input gets a TypeError/ValueError naming the argument,
expected and actual."""

import pytest
import torch
from helpers import duck_model, make_p, make_targets

import yolo_kernels as yk
from yolo_kernels import library

NC, BS = 3, 2
ANCHORS = [torch.tensor([[1.0, 1.0], [2.0, 2.0]]), torch.tensor([[0.5, 0.8]])]


@pytest.fixture
def good(gen):
    p = make_p(BS, [2, 1], [(3, 3), (6, 6)], NC, gen)
    return p, make_targets(4, BS, NC, gen), duck_model(ANCHORS, NC)


def call(p, targets, model, **kw):
    return yk.compute_loss(p, targets, model, backend="reference", **kw)


# the value checks: the Python pass (reference) and the cpp op's own (same messages)
VALUE_BACKENDS = [
    "reference",
    pytest.param("cpp", marks=pytest.mark.skipif(library.LOAD_ERROR is not None, reason="no extension")),
]


def test_good_inputs_pass(good):
    loss, items = call(*good)
    assert torch.isfinite(loss).all()


@pytest.mark.parametrize(
    "mutate, error, pattern",
    [
        (lambda p, t: (p[:1], t), ValueError, r"p: expected 2 layers .* got 1"),
        (lambda p, t: (p + p[:1], t), ValueError, r"p: expected 2 layers .* got 3"),
        (lambda p, t: ([], t), ValueError, r"p: expected at least one layer"),
        (lambda p, t: (p[0], t), TypeError, r"p: expected a list of per-layer tensors, got Tensor"),
        (lambda p, t: ([p[0], p[1].numpy()], t), TypeError, r"p\[1\]: expected a torch.Tensor, got ndarray"),
        (lambda p, t: ([p[0], p[1][0]], t), ValueError, r"p\[1\]: expected a 5-D tensor .* got shape \(1, 6, 6, 8\)"),
        (lambda p, t: ([p[0], p[1][..., :7]], t), ValueError, r"p\[1\]: expected last dim nc \+ 5 = 8 .* got 7"),
        (
            lambda p, t: ([p[0].repeat(1, 2, 1, 1, 1), p[1]], t),
            ValueError,
            r"p\[0\]: expected dim 1 = 2 anchors .* got 4",
        ),
        (
            lambda p, t: ([p[0].long(), p[1]], t),
            TypeError,
            r"p\[0\]: expected a floating-point tensor .* got torch.int64",
        ),
        (
            lambda p, t: ([p[0], p[1].double()], t),
            TypeError,
            r"p\[1\]: expected dtype torch.float32 \(as p\[0\]\), got torch.float64",
        ),
        (lambda p, t: ([p[0], p[1][:1]], t), ValueError, r"p\[1\]: expected batch size 2 \(as p\[0\]\), got 1"),
        (lambda p, t: ([p[0][:0], p[1][:0]], t), ValueError, r"p\[0\]: expected a non-empty batch and grid"),
        (lambda p, t: (p, t.tolist()), TypeError, r"targets: expected a torch.Tensor \[nt, 6\], got list"),
        (lambda p, t: (p, t[:, :5]), ValueError, r"targets: expected shape \[nt, 6\] .* got \(4, 5\)"),
        (lambda p, t: (p, t.flatten()), ValueError, r"targets: expected shape \[nt, 6\] .* got \(24,\)"),
        (lambda p, t: (p, t.long()), TypeError, r"targets: expected a floating-point tensor, got torch.int64"),
        (lambda p, t: (p, t.to("meta")), ValueError, r"targets: expected device cpu \(as p\), got meta"),
    ],
)
def test_structural_errors(good, mutate, error, pattern):
    p, t, model = good
    p2, t2 = mutate(p, t)
    with pytest.raises(error, match=pattern):
        call(p2, t2, model)


def _set(t, row, col, value):
    t = t.clone()
    t[row, col] = value
    return t


@pytest.mark.parametrize(
    "row, col, value, pattern",
    [
        (1, 0, 2.0, r"targets\[:, 0\] \(image index\): expected integers in \[0, 2\), got 2.0 at row 1"),
        (2, 0, -1.0, r"targets\[:, 0\] \(image index\): expected integers in \[0, 2\), got -1.0 at row 2"),
        (0, 0, 0.5, r"targets\[:, 0\] .* got 0.5 at row 0"),
        (3, 1, 3.0, r"targets\[:, 1\] \(class\): expected integers in \[0, 3\), got 3.0 at row 3"),
        (0, 1, -2.0, r"targets\[:, 1\] \(class\): .* got -2.0 at row 0"),
        (1, 1, float("nan"), r"targets\[:, 1\] \(class\): .* got nan at row 1"),
        (
            2,
            2,
            float("inf"),
            r"targets\[:, 2:4\] \(box centre x, y\): expected finite values, got \[inf, .*\] at row 2",
        ),
        (
            1,
            4,
            50.0,
            r"targets\[:, 4:6\] \(box w, h\): expected finite sizes in \[0, 2\] as fractions of the image "
            r"\(normalised; boxes in pixels\?\), got \[50.0, .*\] at row 1",
        ),
        (2, 5, 2.001, r"targets\[:, 4:6\] \(box w, h\): .* got \[.*, 2.001\] at row 2"),
        (3, 5, -0.1, r"targets\[:, 4:6\] \(box w, h\): .* at row 3"),
        (0, 5, float("nan"), r"targets\[:, 4:6\] \(box w, h\): .* got \[.*, nan\] at row 0"),
    ],
)
@pytest.mark.parametrize("backend", VALUE_BACKENDS)
def test_value_errors_name_row_and_value(good, row, col, value, pattern, backend):
    p, t, model = good
    with pytest.raises(ValueError, match=pattern):
        yk.compute_loss(p, _set(t, row, col, value), model, backend=backend)


@pytest.mark.parametrize("backend", VALUE_BACKENDS)
def test_value_errors_report_the_first_bad_column_then_row(good, backend):
    p, t, model = good
    t = _set(_set(_set(t, 3, 0, 5.0), 1, 1, 7.0), 0, 4, -1.0)  # image at row 3, class at row 1, size at row 0
    with pytest.raises(ValueError, match=r"targets\[:, 0\] \(image index\): .* got 5.0 at row 3"):
        yk.compute_loss(p, t, model, backend=backend)
    with pytest.raises(ValueError, match=r"targets\[:, 0\] .* got 123456800.0 at row 2"):
        yk.compute_loss(p, _set(t, 2, 0, 123456789.0), model, backend=backend)


def test_validate_false_skips_value_checks(good):
    p, t, model = good
    bad = _set(t, 0, 4, -0.5)  # negative width: structurally fine, value-checked only
    with pytest.raises(ValueError):
        call(p, bad, model)
    loss, _ = call(p, bad, model, validate=False)
    assert loss.shape == (1,)


@pytest.mark.parametrize("backend", VALUE_BACKENDS)
def test_bad_anchor_values(good, backend):
    p, t, _ = good
    with pytest.raises(ValueError, match=r"anchors\[1\]: expected finite sizes > 0, got \[0.0, 0.8\] at row 0"):
        yk.compute_loss(p, t, duck_model([ANCHORS[0], torch.tensor([[0.0, 0.8]])], NC), backend=backend)
    with pytest.raises(ValueError, match=r"anchors\[0\]: expected finite sizes > 0, got \[2.0, nan\] at row 1"):
        bad = torch.tensor([[1.0, 1.0], [2.0, float("nan")]])
        yk.compute_loss(p, t, duck_model([bad, ANCHORS[1]], NC), backend=backend)


def test_bad_anchors_and_options(good):
    p, t, _ = good
    with pytest.raises(ValueError, match="box_loss: expected one of .* got 'eiou'"):
        call(p, t, duck_model(ANCHORS, NC), box_loss="eiou")
    with pytest.raises(ValueError, match="reduction: expected one of .* got 'none'"):
        call(p, t, duck_model(ANCHORS, NC), reduction="none")
    with pytest.raises(ValueError, match=r"label_smoothing: expected a value in \[0, 1\], got 1.5"):
        call(p, t, duck_model(ANCHORS, NC), label_smoothing=1.5)
    with pytest.raises(ValueError, match="nc: expected at least 1 class, got 0"):
        call(p, t, duck_model(ANCHORS, 0))
    with pytest.raises(TypeError, match=r"nc: expected an integer number of classes, got str \('3'\)"):
        call(p, t, duck_model(ANCHORS, "3"))
    with pytest.raises(ValueError, match="gr: expected a finite number, got nan"):
        call(p, t, duck_model(ANCHORS, NC, gr=float("nan")))
    with pytest.raises(TypeError, match="giou: expected a real number, got str"):
        call(p, t, duck_model(ANCHORS, NC, hyp=dict(yk.DEFAULT_HYP, giou="3.54")))


def test_bad_model_objects(good):
    p, t, model = good
    with pytest.raises(TypeError, match="model: expected a YOLO model with a 'yolo_layers' attribute, got int"):
        call(p, t, 3)
    del model.hyp
    with pytest.raises(TypeError, match=r"model: expected a 'hyp' attribute"):
        call(p, t, model)


def test_bad_criterion_arguments():
    with pytest.raises(ValueError, match=r"strides: expected 2 strides"):
        yk.YOLOv3Loss([[[10, 13]], [[30, 61]]], [32], 80)
    with pytest.raises(ValueError, match=r"strides\[0\]: expected a positive number, got 0"):
        yk.YOLOv3Loss([[[10, 13]]], [0], 80)
    with pytest.raises(ValueError, match=r"anchors\[0\]: expected shape \[na, 2\]"):
        yk.YOLOv3Loss([[[10, 13, 5]]], [32], 80)
    with pytest.raises(TypeError, match="anchors: expected a non-empty list"):
        yk.YOLOv3Loss([], [], 80)
