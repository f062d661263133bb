"""The main command runs end to end on small settings (no timing is asserted)."""

import json
import re
import sys

import pytest
import torch

from yolo_kernels import bench


def test_bench_rows_fields_and_table():
    rows = bench.run(batches=[1, 2], imgs=[64], backends=["reference", "cpp"], repeats=2, warmup=1)
    assert [r["provider"] for r in rows] == ["floor", "reference", "cpp"] * 2
    for r in rows:
        assert {
            "provider",
            "batch",
            "img",
            "dtype",
            "device",
            "median_ms",
            "p20_ms",
            "p80_ms",
            "x_floor",
            "speedup_vs_reference",
            "peak_extra_mb",
            "max_rel_err",
        } <= set(r)
        assert r["p20_ms"] <= r["median_ms"] <= r["p80_ms"]
    ref, cpp = rows[1], rows[2]
    assert ref["max_rel_err"] == 0.0 and ref["speedup_vs_reference"] == 1.0
    assert cpp["max_rel_err"] < 1e-4
    # the gradients (and, for the reference, its full-size temporaries) are seen by the memory measurement
    grad_mb = sum(x.numel() * 4 for x in bench.yolov3_inputs(1, 64)[1]) / 2**20
    assert cpp["peak_extra_mb"] >= grad_mb * 0.99 and ref["peak_extra_mb"] >= grad_mb
    table = bench.format_table(rows)
    assert table.count("\n") == len(rows) + 1 and "| cpp | yolov3 | 1 | 64 | 10 |" in table


def test_bench_yolov5_loss_axis():
    rows = bench.run(batches=[2], imgs=[64], backends=["reference", "cpp"], repeats=2, warmup=1, losses=["yolov5"])
    assert [(r["provider"], r["family"]) for r in rows] == [
        ("floor", "yolov5"),
        ("reference", "yolov5"),
        ("cpp", "yolov5"),
    ]
    assert rows[2]["max_rel_err"] < 1e-4 and rows[1]["loss"] == pytest.approx(rows[2]["loss"], rel=1e-5)
    # YOLOv5s's heads at strides 8, 16, 32
    assert [tuple(x.shape[2:4]) for x in bench.yolov5_inputs(1, 64)[1]] == [(8, 8), (4, 4), (2, 2)]
    with pytest.raises(ValueError, match="losses: expected names from"):
        bench.run(batches=[1], imgs=[64], backends=["cpp"], losses=["yolov4"])


def test_bench_yolov8_loss_axis(capsys):
    """The anchor-free loss: its own backends (the floor, reference and cpp), the same table."""
    rows = bench.run(batches=[2], imgs=[64], backends=["reference", "cpp"], repeats=2, warmup=1, losses=["yolov8"])
    assert [(r["provider"], r["family"]) for r in rows] == [
        ("floor", "yolov8"),
        ("reference", "yolov8"),
        ("cpp", "yolov8"),
    ]
    assert all(r["max_rel_err"] < 1e-4 for r in rows[1:])
    model, p, feats, targets = bench.yolov8_inputs(1, 64, 3)
    assert [tuple(x.shape) for x in p] == [(1, 64, 84), (1, 80, 84)] and targets["bboxes"].shape == (3, 4)
    with pytest.raises(ValueError, match="the yolov8 loss has no"):
        bench.run(batches=[1], imgs=[64], backends=["triton"], repeats=1, warmup=0, losses=["yolov8"])
    assert bench.main(["--loss", "yolov8", "--img", "64", "--batch", "1", "--repeats", "1", "--warmup", "0"]) == 0
    assert "| cpp | yolov8 | 1 | 64 |" in capsys.readouterr().out


def test_bench_main_json_and_plot(tmp_path, capsys):
    out, png = tmp_path / "rows.json", tmp_path / "plot.png"
    argv = [
        "--batch",
        "1",
        "2",
        "--img",
        "64",
        "--repeats",
        "2",
        "--warmup",
        "0",
        "--json",
        str(out),
        "--plot",
        str(png),
    ]
    assert bench.main(argv) == 0
    text = capsys.readouterr().out
    assert "machine:" in text and "| reference | yolov3 | 2 | 64 | 10 |" in text
    data = json.loads(out.read_text())
    assert {r["provider"] for r in data["rows"]} >= {"floor", "reference"}
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_rejects_unavailable_backend():
    with pytest.raises(Exception, match="backend"):
        bench.run(batches=[1], imgs=[64], backends=["nope"], repeats=1, warmup=0)


def test_bench_targets_axis_and_scaling_plot(tmp_path, capsys):
    rows = bench.run(batches=[1], imgs=[64], backends=["cpp"], repeats=2, warmup=0, targets=[2, 20])
    assert [(r["provider"], r["targets_per_image"]) for r in rows] == [
        ("floor", 2),
        ("cpp", 2),
        ("floor", 20),
        ("cpp", 20),
    ]
    assert all(r["max_rel_err"] is None or r["max_rel_err"] < 1e-4 for r in rows)
    png = tmp_path / "scaling.png"
    bench.plot(rows, str(png))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| cpp | yolov3 | 1 | 64 | 20 |" in bench.format_table(rows)


def test_interleaved_timing_takes_turns():
    calls = []
    times = bench.time_interleaved(
        {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
        repeats=3,
        warmup=1,
        device=bench.torch.device("cpu"),
        evict_bytes=1024,
    )
    assert calls == ["a", "b"] * 4 and len(times["a"]) == len(times["b"]) == 3


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--backends", "foo"], r"--backends: expected 'auto' or one of \['cpp', 'reference', 'triton'\], got 'foo'"),
        (
            ["--backends", "triton", "--device", "cpu"],
            r"--backends triton: unavailable on cpu: the triton backend runs",
        ),
        (["--batch", "0"], r"argument --batch: expected an integer >= 1, got 0"),
        (["--repeats", "x"], r"argument --repeats: expected an integer, got 'x'"),
        (["--threads", "0"], r"argument --threads: expected an integer >= 1, got 0"),
    ]
    + (
        [(["--device", "cuda"], r"--device cuda: no CUDA device is available")] if not torch.cuda.is_available() else []
    ),
)
def test_bench_bad_arguments_are_usage_errors(argv, message, capsys, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # triton on CPU tensors is then unavailable, as for a user
    with pytest.raises(SystemExit) as exit_info:
        bench.main(argv)
    assert exit_info.value.code == 2  # argparse's usage error, not a traceback
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert err.startswith("usage: python -m yolo_kernels.bench")


def test_bench_plot_without_matplotlib_fails_before_the_run(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    monkeypatch.setattr(bench, "run", lambda *a, **k: pytest.fail("the run started"))
    with pytest.raises(SystemExit):
        bench.main(["--plot", "x.png"])
    assert "--plot needs matplotlib" in capsys.readouterr().err


def test_bench_header_threads_and_no_profiler_banner(capfd):
    assert bench.main(["--batch", "1", "--img", "64", "--repeats", "1", "--warmup", "0", "--threads", "1"]) == 0
    out, err = capfd.readouterr()
    assert "1 thread," in out and "1 threads" not in out and "1 CPU thread (" in out
    assert "USDT" not in out + err and "profiler_start" not in out + err
