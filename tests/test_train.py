"""The loss in real training steps: the train command, reference vs cpp curves, torch.compile with
fullgraph on the loss, and DistributedDataParallel (gloo, 2 processes)."""

import os
import re
import socket
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import yolo_kernels as yk
from yolo_kernels import train as train_mod


def test_synthetic_shapes_boxes_match_pixels():
    images, targets = train_mod.SyntheticShapes(6).batch(3, 64, torch.Generator().manual_seed(0))
    assert images.shape == (3, 3, 64, 64) and targets.shape[1] == 6 and len(targets) >= 3
    for _image, cls, x, y, w, h in targets.tolist():
        assert 0 <= cls < 6 and 0 < w < 1 and 0 < h < 1
        assert w / 2 <= x + 1e-6 <= 1 - w / 2 + 2e-6 and h / 2 <= y + 1e-6 <= 1 - h / 2 + 2e-6


def test_train_command_runs_and_reports(tmp_path, capsys):
    png = tmp_path / "loss.png"
    assert (
        train_mod.main(["--steps", "3", "--batch", "2", "--img", "64", "--eval-images", "2", "--plot", str(png)]) == 0
    )
    out = capsys.readouterr().out
    assert "held-out detection: mean IoU" in out and "loss fwd+bwd" in out
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_train_records_gradient_statistics_and_warns_once_on_unmatched_targets():
    model = train_mod.build_model("yolov3-tiny", 3)
    history = train_mod.train(model, steps=2, batch=2, img=64, backend="cpp")
    assert len(history["grad_norm"]) == 2 and len(history["grad_norm"][0]) == 2  # steps x layers
    assert all(len(layer) == 3 for layer in history["grad_norm"][0])
    assert history["unmatched_share"] == [0.0, 0.0] and history["nonfinite"] == [False, False]
    # anchors far larger than any shape: every target goes unmatched, and the run says so once
    torch.manual_seed(0)
    model = train_mod.build_model("yolov3-tiny", 3)
    for j in model.yolo_layers:
        model.module_list[j].anchor_vec *= 50
    with pytest.warns(RuntimeWarning, match=r"target\(s\) matched no anchor") as record:
        history = train_mod.train(model, steps=2, batch=2, img=64, backend="cpp")
    assert sum("matched no anchor" in str(w.message) for w in record) == 1
    assert history["unmatched_share"] == [1.0, 1.0]
    assert "grad_norm" not in train_mod.train(model, steps=1, batch=2, img=64, backend="cpp", stats=False)


def test_training_with_the_yolov5_loss_agrees_across_backends():
    curves = {}
    for backend in ("reference", "cpp"):
        torch.manual_seed(0)
        model = train_mod.build_model("yolov3-tiny", 4)
        history = train_mod.train(model, steps=4, batch=2, img=64, backend=backend, loss="yolov5")
        curves[backend] = torch.tensor(history["items"])
        assert len(history["grad_norm"]) == 4
    torch.testing.assert_close(curves["cpp"], curves["reference"], rtol=1e-4, atol=1e-5)
    assert torch.isfinite(curves["cpp"]).all() and curves["cpp"].shape == (4, 4)
    with pytest.raises(ValueError, match="loss: expected 'yolov3' or 'yolov5'"):
        train_mod.train(model, steps=1, batch=2, img=64, loss="yolov4")


def test_train_command_with_amp():
    model = train_mod.build_model("yolov3-tiny", 3)
    history = train_mod.train(model, steps=2, batch=2, img=64, backend="cpp", amp=True)
    assert all(torch.isfinite(torch.tensor(items)).all() for items in history["items"])


def test_reference_and_cpp_training_curves_agree():
    curves = {}
    for backend in ("reference", "cpp"):
        torch.manual_seed(0)  # same initial weights for both
        model = train_mod.build_model("yolov3-tiny", 4)
        curves[backend] = torch.tensor(train_mod.train(model, steps=4, batch=2, img=64, backend=backend)["items"])
    torch.testing.assert_close(curves["cpp"], curves["reference"], rtol=1e-4, atol=1e-5)


def test_compiled_training_step_has_no_graph_break_in_the_loss():
    torch.manual_seed(0)
    model = train_mod.build_model("yolov3-tiny", 3)
    images, targets = train_mod.SyntheticShapes(3).batch(2, 64, torch.Generator().manual_seed(1))
    crit = yk.YOLOv3Loss.from_model(model, backend="cpp")
    loss_fn = torch.compile(lambda p, t: crit(p, t), fullgraph=True)  # raises on any graph break
    drop_in = torch.compile(lambda p, t: yk.compute_loss(p, t, model, backend="cpp"), fullgraph=True)
    for fn in (loss_fn, drop_in):
        p = model(images)
        loss, items = fn(p, targets)
        loss.backward()
        eager = yk.compute_loss([x.detach() for x in p], targets, model, backend="reference")[1]
        torch.testing.assert_close(items.detach(), eager, rtol=1e-5, atol=1e-5)
        assert all(w.grad is not None for w in model.parameters())
        model.zero_grad()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = train_mod.build_model("yolov3-tiny", 2)
        alone = train_mod.build_model("yolov3-tiny", 2)
        alone.load_state_dict(model.state_dict())
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        images, targets = train_mod.SyntheticShapes(2).batch(2, 64, torch.Generator().manual_seed(100 + rank))
        for wrapped in (alone, ddp):
            loss, _ = yk.compute_loss(wrapped(images), targets, wrapped, backend="cpp")  # unwraps .module
            loss.backward()
        torch.save(
            {"ddp": [p.grad for p in model.parameters()], "alone": [p.grad for p in alone.parameters()]},
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_ddp_gloo_two_processes():
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_ddp_worker, args=(2, _free_port(), out_dir), nprocs=2, join=True)
        r0, r1 = (torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in (0, 1))
    for g0, g1, a0, a1 in zip(r0["ddp"], r1["ddp"], r0["alone"], r1["alone"]):
        assert torch.equal(g0, g1)  # identical across ranks
        torch.testing.assert_close(g0, (a0 + a1) / 2, rtol=1e-4, atol=1e-6)  # the mean of the per-rank gradients


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--backend", "cpu"], r"--backend: expected 'auto' or one of \['cpp', 'reference', 'triton'\], got 'cpu'"),
        (["--steps", "0"], r"argument --steps: expected an integer >= 1, got 0"),
        (["--nc", "7"], r"--nc: the synthetic data has 6 classes; expected 1..6, got 7"),
        (["--batch", "-1"], r"argument --batch: expected an integer >= 1, got -1"),
    ],
)
def test_train_bad_arguments_are_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_mod.main(argv)
    assert exit_info.value.code == 2
    assert re.search(message, capsys.readouterr().err)


def test_train_header_names_the_backend_auto_picked(capsys):
    assert train_mod.main(["--steps", "1", "--batch", "1", "--img", "64", "--eval-images", "1", "--no-stats"]) == 0
    out = capsys.readouterr().out
    picked = yk.loss.resolve_backend("auto", torch.device("cpu"), warn=False).name
    assert out.splitlines()[0].endswith(f"yolov3 loss, backend {picked} (auto), amp False, device cpu")
    assert "CPU thread" in out and "--threads" in out
