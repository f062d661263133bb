"""Markdown table of a pytest-benchmark JSON file: medians, x floor and speed-up over the original.

pytest benchmarks --benchmark-only --benchmark-json=bench.json && python benchmarks/compare.py bench.json
"""

import json
import re
import sys
from collections import defaultdict

NAME = re.compile(
    r"test_(?P<test>\w+)\[batch(?P<batch>\d+)-img(?P<img>\d+)(?:-targets(?P<targets>\d+))?-?(?P<rest>.*)\]"
)


def load(path):
    """``(machine_info, {(batch, img, targets per image): {label: median ms}})``."""
    with open(path) as f:
        data = json.load(f)
    groups = defaultdict(dict)
    for b in data["benchmarks"]:
        m = NAME.fullmatch(b["name"])
        if not m:
            continue
        label = m["test"] + (f" [{m['rest']}]" if m["rest"] else "")
        groups[int(m["batch"]), int(m["img"]), int(m["targets"] or 10)][label] = b["stats"]["median"] * 1e3
    return data.get("machine_info", {}), groups


def table(groups):
    lines = [
        "| batch | img | targets/img | benchmark | median ms | x floor | vs original (same mode) |",
        "|---|---|---|---|---|---|---|",
    ]
    for (batch, img, targets), g in sorted(groups.items()):
        for label, ms in sorted(g.items(), key=lambda kv: kv[1]):
            # each loss family against its own floor (the YOLOv5-style heads are other shapes)
            floor = g.get("yolov5_floor_zero_fill" if label.startswith("yolov5") else "floor_zero_fill")
            mode = "forward" if label.endswith("-forward]") or label.endswith("[forward]") else "forward+backward"
            original = g.get(f"original [{mode}]")
            comparable = label.startswith(("backend", "original", "compiled_reference"))
            x_floor = f"{ms / floor:.2f}" if floor else "-"
            speedup = f"{original / ms:.1f}x" if original and comparable else "-"
            lines.append(f"| {batch} | {img} | {targets} | {label} | {ms:.3f} | {x_floor} | {speedup} |")
    return "\n".join(lines)


def main(argv):
    if len(argv) != 2:
        print(__doc__)
        return 2
    machine, groups = load(argv[1])
    cpu = machine.get("cpu", {}).get("brand_raw", machine.get("processor", "?"))
    print(f"machine: {cpu}, Python {machine.get('python_version', '?')}\n")
    print(table(groups))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
