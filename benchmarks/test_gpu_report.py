"""The GPU report's pieces that run anywhere (its measurements need a GPU: see gpu_report.py):
argument parsing, the import path from a bare checkout, the report files and the exit status, and
the one-command wrapper ``gpu_report.sh``."""

import json
import os
import subprocess
import sys

import gpu_report
import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))

REPORT = {
    "device": "NVIDIA H200 (Test)",
    "versions": "torch x",
    "install": "pip ok",
    "copy_bandwidth_gbs": 3000.0,
    "parity": [
        {
            "dtype": "float32",
            "options": "defaults",
            "batch": 16,
            "img": 416,
            "loss_rel_err": 1e-7,
            "grad_rel_err": 2e-7,
            "passed": True,
        },
        {
            "dtype": "bfloat16",
            "options": {"box_loss": "ciou"},
            "batch": 16,
            "img": 416,
            "loss_rel_err": 2e-7,
            "grad_rel_err": 3e-3,
            "passed": True,
        },
    ],
    "speed": [
        {
            "provider": "triton",
            "batch": 16,
            "img": 416,
            "median_ms": 0.5,
            "p20_ms": 0.4,
            "p80_ms": 0.6,
            "x_dram_floor": 1.2,
            "speedup_vs_reference": 30.0,
            "peak_extra_mb": 1.5,
        }
    ],
    "no_sync": "passed",
    "cuda_graph": "replay identical to eager",
    "train_step_graph": "training step replays like eager",
    "host": {"host_us_per_call": 812.4, "wall_us_per_call": 830.0, "top_own_us": {"run (jit.py:700)": 123.4}},
    "train_step": [
        {
            "case": "yolov3:16x416",
            "loss": "triton",
            "ms": 50.0,
            "p20": 49.0,
            "p80": 51.0,
            "images_per_s": 320.0,
            "loss_share": 0.012,
            "syncs": 0,
            "graph_ms": 40.0,
            "graph_loss_share": 0.005,
        },
        {"case": "yolov3:64x640", "loss": "all", "error": "out of memory"},
    ],
}


def test_floor_bytes_counts_gradient_and_objectness():
    p = [torch.zeros(2, 3, 4, 5, 85), torch.zeros(2, 3, 8, 10, 85, dtype=torch.float16)]
    cells = [2 * 3 * 4 * 5, 2 * 3 * 8 * 10]
    want = cells[0] * 85 * 4 + cells[0] * 4 + cells[1] * 85 * 2 + cells[1] * 2
    assert gpu_report.floor_bytes(p) == want


def test_parse_args_defaults_and_overrides():
    args = gpu_report.parse_args([])
    assert args.batch == [16, 64] and args.img == [416, 640] and not args.quick
    assert args.out == os.path.join(HERE, "results")
    assert args.tests_s == 150
    args = gpu_report.parse_args(["--batch", "8", "--img", "320", "--quick", "--out", "/tmp/x", "--budget-s", "60"])
    assert args.batch == [8] and args.img == [320] and args.quick and args.out == "/tmp/x" and args.budget_s == 60
    assert gpu_report.parse_args(["--tests-s", "0"]).tests_s == 0
    assert args.only is None and gpu_report.parse_args(["--only", "launches", "speed"]).only == ["launches", "speed"]
    with pytest.raises(SystemExit):
        gpu_report.parse_args(["--only", "everything"])


def test_only_selects_sections():
    assert all(gpu_report.selected(key, None) for key in gpu_report.SECTIONS)
    assert gpu_report.selected("speed_16x416", ["speed"]) and gpu_report.selected("speed", ["launches", "speed"])
    assert not gpu_report.selected("parity", ["speed"]) and not gpu_report.selected("speed_64x640", ["host"])
    assert gpu_report.selected("no_sync", ["no_sync"]) and not gpu_report.selected("no_sync_yolov5", ["no_sync"])
    assert "Result (only launches, speed run): all checks passed" in gpu_report.markdown(
        dict(REPORT, only=["launches", "speed"])
    )


def test_speed_order_puts_the_target_shapes_first():
    assert gpu_report.speed_order([16, 64], [416, 640]) == [(16, 416), (64, 640), (64, 416), (16, 640)]
    assert gpu_report.speed_order([8], [320]) == [(8, 320)]


def test_markdown_report():
    text = gpu_report.markdown(REPORT)
    assert "# Triton loss on NVIDIA H200 (Test)" in text and "| triton | 16 | 416 | 0.500 |" in text
    assert "30.0x" in text and "| bfloat16 | box_loss=ciou |" in text and "Result: all checks passed" in text
    assert "812 µs per call issued back to back (830 µs until the GPU finished)" in text
    assert "| `run (jit.py:700)` | 123.4 |" in text
    assert "Host time: FAILED: x" in gpu_report.markdown(dict(REPORT, host="FAILED: x"))
    assert "| yolov3:16x416 | triton | 50.00 (49.00-51.00) | 320 | 1.2% | 0 | 40.00 | 0.5% |" in text
    assert "| yolov3:64x640 | all | out of memory |" in text


def test_write_report_files_named_after_the_card(tmp_path):
    stem = gpu_report.write_report(REPORT, str(tmp_path))
    assert stem == str(tmp_path / "gpu-nvidia-h200-test")
    assert json.loads((tmp_path / "gpu-nvidia-h200-test.json").read_text()) == REPORT
    assert (tmp_path / "gpu-nvidia-h200-test.md").read_text() == gpu_report.markdown(REPORT)


def test_failures_decide_the_exit_status():
    assert gpu_report.failures(REPORT) == []
    bad_parity = dict(REPORT, parity=[dict(REPORT["parity"][0], passed=False, grad_rel_err=0.5)])
    assert "parity float32 defaults" in gpu_report.failures(bad_parity)[0]
    for key in ("no_sync", "cuda_graph", "train_step_graph", "cuda_tests"):
        problems = gpu_report.failures(dict(REPORT, **{key: "FAILED: replay differs from eager"}))
        assert problems and problems[0].startswith(key)
    assert "FAILED" in gpu_report.markdown(bad_parity)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_main_without_gpu_says_so(capsys):
    assert gpu_report.main([]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_runs_from_a_bare_checkout_without_pytest_on_the_path(tmp_path):
    """Run as a script from another folder: it finds the package in its source tree by itself."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    path = os.path.join(HERE, "gpu_report.py")
    code = f"import runpy, sys; sys.modules['pytest'] = None; sys.argv = [{path!r}, '--help']; "
    code += f"runpy.run_path({path!r}, run_name='__main__')"
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "--quick" in result.stdout and "--out" in result.stdout


def test_wrapper_builds_in_place_then_runs_the_report(tmp_path):
    """gpu_report.sh with a stand-in python: the install command it runs, the fallback without the
    extension, and the report's arguments and install note."""
    log = tmp_path / "calls.log"
    fake = tmp_path / "python"
    fake.write_text(
        "#!/usr/bin/env bash\n"
        f'echo "NO_EXT=${{YOLO_KERNELS_NO_EXT:-}} $*" >> {log}\n'
        'if [ "$1" = "-m" ] && [ -z "${YOLO_KERNELS_NO_EXT:-}" ]; then exit 1; fi\n'  # the extension build fails
        'if [ "$1" = "benchmarks/gpu_report.py" ]; then echo "install: $YK_INSTALL"; fi\n'
    )
    fake.chmod(0o755)
    script = os.path.join(HERE, "gpu_report.sh")
    result = subprocess.run(
        ["bash", script, "--out", "/tmp/o", "--quick"],
        env=dict(os.environ, PYTHON=str(fake)),
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    calls = log.read_text().splitlines()
    assert calls[0] == "NO_EXT= -m pip install --no-build-isolation --no-deps -e ."
    assert calls[1] == "NO_EXT=1 -m pip install --no-build-isolation --no-deps -e ."
    assert calls[2] == "NO_EXT= benchmarks/gpu_report.py --out /tmp/o --quick"
    assert "install: pip install -e . with YOLO_KERNELS_NO_EXT=1" in result.stdout


def test_cuda_tests_section_reports_the_summary_or_a_cut_short_run():
    """The report's last section runs the suite's CUDA cases in a subprocess: here, without a GPU,
    they are skipped (the summary says so); with too little time the run is incomplete, not failed."""
    done = gpu_report.cuda_tests(600)
    assert not done.startswith(("FAILED", "incomplete")) and ("skipped" in done or "passed" in done), done
    assert gpu_report.cuda_tests(0.01).startswith("incomplete: stopped after")
    assert not gpu_report.failures(dict(REPORT, cuda_tests="incomplete: stopped after 1 s"))


def test_anchor_free_section_runs_its_logic_on_the_cpu():
    """The anchor-free section's parity, no-sync and speed logic with the cpp backend standing in for
    triton (small shapes), its markdown and its failures."""
    import gpu_anchor_free

    cpu = torch.device("cpu")
    rows = gpu_anchor_free.parity(cpu, "cpp", batch=1, img=160)
    assert len(rows) == 4 and all(r["passed"] for r in rows), rows
    assert gpu_anchor_free.no_sync(cpu, "cpp", batch=1, img=160).startswith("not applicable")
    speed = gpu_anchor_free.speed(cpu, 10e9, "cpp", shapes=[(1, 160, 3, 5)], rounds=1)
    assert {r["provider"] for r in speed} >= {"reference", "cpp"} and all(r["median_ms"] > 0 for r in speed)
    device = gpu_anchor_free.device_time(cpu, 10e9, "cpp", shapes=[(1, 160, 3, 5)])
    assert [r["provider"] for r in device] == ["reference", "cpp"] and all(r["device_kernels"] == 0 for r in device)
    section = {"parity": rows, "no_sync": "passed", "cuda_graph": "replay identical", "speed": speed}
    section["speed"].append({"shape": "xview", "provider": "reference", "oom": True})
    top = {"_class_loss_kernel": [2, 40.0]}
    row = dict(shape="s", provider="triton", device_kernels=12, device_ms=0.08, x_dram_floor=1.6, top=top)
    section["device"] = [row]
    text = "\n".join(gpu_anchor_free.markdown(section))
    assert "| E2ELoss, reg_max 1 | bfloat16 | 1 | 160 |" in text and "| xview | reference | out of memory |" in text
    assert "| s | triton | 12 | 0.080 | 1.60 | `_class_loss_kernel` 2, 40.0 |" in text
    assert gpu_report.failures(dict(REPORT, anchor_free=section)) == []
    bad = dict(section, parity=[dict(rows[0], passed=False)], no_sync="FAILED: a sync")
    problems = gpu_report.failures(dict(REPORT, anchor_free=bad))
    assert len(problems) == 2 and all(p.startswith("anchor_free") for p in problems)
    assert "anchor-free family" in gpu_report.markdown(dict(REPORT, anchor_free=bad))
