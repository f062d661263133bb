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


def test_the_table_takes_medians_and_quantiles(monkeypatch):
    """ms is the median of the interleaved runs, p20/p80 their quantiles (not the maximum)."""
    monkeypatch.setattr(
        anchor_free, "time_interleaved", lambda calls, *a, **k: {name: [5.0, 1.0, 4.0, 2.0, 3.0] for name in calls}
    )
    monkeypatch.setattr(anchor_free, "peak_extra_bytes", lambda fn, device: 0)
    rows = anchor_free.measure(1, 2, 5)
    assert all((r["ms"], r["p20"], r["p80"], r["x_floor"]) == (3.0, 2.0, 4.0, 1.0) for r in rows)


def test_parts_time_the_assigner_and_the_loss_alone(tmp_path):
    """--parts adds cpp's two steps, each timed alone in the same turns (when the extension is built)."""
    md = tmp_path / "t.md"
    assert anchor_free.main(["--batch", "1", "--boxes", "2", "--repeats", "1", "--parts", "--md", str(md)]) == 0
    text = md.read_text()
    if "| 1 | 2 | cpp |" not in text:  # no extension: no cpp rows at all
        assert "cpp: assigner" not in text
        return
    for part in ("cpp: assigner", "cpp: loss with gradient"):
        assert f"| 1 | 2 | {part} |" in text


def test_providers_limits_the_table_to_the_named_ones(tmp_path):
    """--providers times only the named providers, and the floor."""
    md = tmp_path / "t.md"
    assert (
        anchor_free.main(
            ["--batch", "1", "--boxes", "2", "--repeats", "1", "--providers", "reference", "--md", str(md)]
        )
        == 0
    )
    text = md.read_text()
    assert "| 1 | 2 | reference |" in text and "| 1 | 2 | floor |" in text
    assert "| 1 | 2 | original |" not in text and "| 1 | 2 | cpp |" not in text
