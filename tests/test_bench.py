"""The main command runs end to end on small settings (no timing is asserted)."""

from yolo_kernels import bench


def test_bench_rows_and_table():
    rows = bench.run(cfg="yolov3-tiny", img=64, batch=2, targets_per_image=3, repeats=2, warmup=1)
    providers = [r["provider"] for r in rows]
    assert providers[0] == "floor" and "reference" in providers
    ref = rows[providers.index("reference")]
    assert ref["max_rel_err"] == 0.0 and ref["speedup_vs_reference"] == 1.0
    assert all(r["p20_ms"] <= r["median_ms"] <= r["p80_ms"] for r in rows)
    table = bench.format_table(rows)
    assert table.count("\n") == len(rows) + 1 and "| reference |" in table


def test_bench_main_prints_machine_and_table(capsys):
    assert bench.main(["--cfg", "yolov3-tiny", "--img", "64", "--batch", "1", "--repeats", "2", "--warmup", "0"]) == 0
    out = capsys.readouterr().out
    assert "machine:" in out and "| reference |" in out and "yolov3-tiny at 64, batch 1" in out
