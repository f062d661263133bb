"""The training-step benchmark's logic on the CPU (its figures come from a GPU: ``gpu_report.py``'s
``train_step`` section): every loss of both families runs a real step in turns, the stand-in
writes the heads' gradients once and gives no loss, the table and the errors."""

import pytest
import torch
import train_step

import yolo_kernels as yk

CPU = torch.device("cpu")


@pytest.mark.skipif("cpp" not in yk.available_backends("cpu"), reason="the cpp extension is not built")
def test_every_loss_runs_a_step_in_turns_on_the_cpu():
    rows = train_step.report(CPU, ["yolov3:2x64", "yolov5:2x64"], steps=2, cfg="yolov3-tiny")
    assert [(r["case"], r["loss"]) for r in rows] == [
        (case, loss) for case in ("yolov3:2x64", "yolov5:2x64") for loss in ("original", "reference", "cpp", "stand-in")
    ]
    for r in rows:
        assert "error" not in r and r["ms"] > 0 and r["p20"] <= r["ms"] <= r["p80"]
        assert r["images_per_s"] == pytest.approx(2 / r["ms"] * 1e3)
        assert r["syncs"] is None and r["graph"] == "CUDA only"  # both need CUDA
        assert ("loss_share" in r) == (r["loss"] != "stand-in")
        if "loss_share" in r:
            assert r["loss_share"] < 1
    table = train_step.markdown(rows)
    assert table.count("\n") == len(rows) + 1 and "| yolov5:2x64 | cpp |" in table


def test_the_stand_in_writes_each_head_gradient_once_as_zeros():
    p = [torch.randn(2, 3, 4, 4, 9, requires_grad=True), torch.randn(2, 3, 2, 2, 9, requires_grad=True)]
    loss = train_step.stand_in(p, None)
    assert loss.shape == (1,) and float(loss.detach()) == 0.0
    loss.sum().backward()
    assert all(x.grad is not None and x.grad.shape == x.shape and not x.grad.any() for x in p)


def test_the_original_yolov5_loss_is_set_up_as_the_reference_one():
    """The original YOLOv5 loss of the step gets the criterion's anchors, gains and balance: the
    same value as the reference on the network's heads."""
    torch.manual_seed(0)
    from yolo_kernels.train import SyntheticShapes, build_model

    model = build_model("yolov3-tiny", 80)
    images, targets = SyntheticShapes(80).batch(2, 64, torch.Generator().manual_seed(0))
    p = model(images)
    losses = train_step.criteria("yolov5", model, 64, CPU)
    torch.testing.assert_close(losses["original"](p, targets), losses["reference"](p, targets), rtol=1e-5, atol=0)


@pytest.mark.parametrize("text", ["yolov3", "yolov3:16", "yolov8:16x640", "yolov3:16xbig"])
def test_bad_cases_name_the_argument(text):
    with pytest.raises(ValueError, match="--cases"):
        train_step.Case.parse(text)
    assert train_step.Case.parse("yolov5:16x640") == train_step.Case("yolov5", 16, 640)


@pytest.mark.skipif("cpp" not in yk.available_backends("cpu"), reason="the cpp extension is not built")
def test_a_loss_that_fails_is_reported_and_the_others_still_run(monkeypatch):
    real = train_step.criteria

    def with_a_broken_loss(*args):
        def broken(p, targets):
            raise RuntimeError("no kernel for this\nsecond line")

        return dict(real(*args), broken=broken)

    monkeypatch.setattr(train_step, "criteria", with_a_broken_loss)
    rows = train_step.report(CPU, ["yolov3:1x64"], steps=1, cfg="yolov3-tiny")
    by_loss = {r["loss"]: r for r in rows}
    assert by_loss["broken"]["error"] == "RuntimeError: no kernel for this"
    assert all("ms" in by_loss[name] for name in ("original", "reference", "cpp", "stand-in"))
    assert "| yolov3:1x64 | broken | RuntimeError: no kernel for this |" in train_step.markdown(rows)
