"""benchmarks/anchor_free.py runs end to end at a tiny size and reports every provider and the floor."""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import anchor_free


def test_anchor_free_bench_reports_every_provider(tmp_path):
    md = tmp_path / "t.md"
    assert anchor_free.main(["--batch", "1", "--boxes", "2", "--repeats", "1", "--md", str(md)]) == 0
    text = md.read_text()
    for provider in ("reference", "floor"):
        assert f"| 1 | 2 | {provider} |" in text
    rows = anchor_free.measure(1, 2, 1)
    assert {r["provider"] for r in rows} >= {"reference", "floor"}
    assert all(r["ms"] > 0 for r in rows) and all(r["peak_mb"] >= 0 for r in rows)
