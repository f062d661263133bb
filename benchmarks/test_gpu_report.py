"""The GPU report's pieces that run anywhere (its measurements need a GPU: see gpu_report.py)."""

import pytest
import torch

import gpu_report


def test_floor_bytes_counts_gradient_and_objectness():
    p = [torch.zeros(2, 3, 4, 5, 85), torch.zeros(2, 3, 8, 10, 85, dtype=torch.float16)]
    cells = [2 * 3 * 4 * 5, 2 * 3 * 8 * 10]
    want = cells[0] * 85 * 4 + cells[0] * 4 + cells[1] * 85 * 2 + cells[1] * 2
    assert gpu_report.floor_bytes(p) == want


def test_markdown_report():
    report = {
        "device": "Test GPU", "versions": "torch x", "copy_bandwidth_gbs": 3000.0,
        "parity": [{"dtype": "float32", "batch": 16, "img": 416, "loss_rel_err": 1e-7, "grad_rel_err": 2e-7}],
        "speed": [{"provider": "triton", "batch": 16, "img": 416, "median_ms": 0.5, "p20_ms": 0.4, "p80_ms": 0.6,
                   "x_dram_floor": 1.2, "speedup_vs_reference": 30.0, "peak_extra_mb": 1.5}],
        "no_sync": "passed", "cuda_graph": "replay identical to eager",
    }  # fmt: skip
    text = gpu_report.markdown(report)
    assert "# Triton loss on Test GPU" in text and "| triton | 16 | 416 | 0.500 |" in text and "30.0x" in text


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_main_without_gpu_says_so(capsys):
    assert gpu_report.main([]) == 2
    assert "no CUDA device" in capsys.readouterr().err
