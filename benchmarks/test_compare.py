"""compare.py reads the benchmark names the suite produces (batch, image, targets per image)."""

import json

import compare


def test_table_from_benchmark_json(tmp_path):
    def bench(name, ms):
        return {"name": name, "stats": {"median": ms / 1e3}}

    data = {
        "machine_info": {"cpu": {"brand_raw": "Test CPU"}, "python_version": "3.11"},
        "benchmarks": [
            bench("test_floor_zero_fill[batch16-img416-targets100]", 2.0),
            bench("test_original[batch16-img416-targets100-forward+backward]", 40.0),
            bench("test_backend[batch16-img416-targets100-cpp-forward+backward]", 4.0),
            bench("test_backend[batch16-img416-targets10-cpp-forward+backward]", 3.0),
        ],
    }
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(data))
    machine, groups = compare.load(str(path))
    assert set(groups) == {(16, 416, 100), (16, 416, 10)}
    table = compare.table(groups)
    assert "| 16 | 416 | 100 | backend [cpp-forward+backward] | 4.000 | 2.00 | 10.0x |" in table
    assert "| 16 | 416 | 10 | backend [cpp-forward+backward] | 3.000 | - | - |" in table
