"""Markdown table of a pytest-benchmark JSON file: medians, x floor and speed-up over the original.

    pytest benchmarks --benchmark-only --benchmark-json=bench.json && python benchmarks/compare.py bench.json
"""

import json
import re
import sys
from collections import defaultdict


def rows(path):
    with open(path) as f:
        data = json.load(f)
    groups = defaultdict(dict)  # batch -> name -> median ms
    for b in data["benchmarks"]:
        batch = re.search(r"batch(\d+)", b["name"]).group(1)
        name = re.sub(r"\[?batch\d+-?", "[", b["name"]).replace("[]", "").replace("test_", "")
        name = name.replace("[", " [").rstrip("[ ")
        groups[int(batch)][name] = b["stats"]["median"] * 1e3
    return data.get("machine_info", {}), groups


def table(groups):
    lines = ["| batch | provider | median ms | x floor | vs original (same mode) |", "|---|---|---|---|---|"]
    for batch in sorted(groups):
        g = groups[batch]
        floor = g.get("floor_zero_fill")
        for name, ms in sorted(g.items(), key=lambda kv: kv[1]):
            mode = "forward" if name.endswith("forward]") else "forward+backward"
            original = g.get(f"original [{mode}]")
            x_floor = f"{ms / floor:.2f}" if floor else "-"
            speedup = f"{original / ms:.1f}x" if original and "]" in name else "-"
            lines.append(f"| {batch} | {name} | {ms:.2f} | {x_floor} | {speedup} |")
    return "\n".join(lines)


def main(argv):
    if len(argv) != 2:
        print(__doc__)
        return 2
    machine, groups = rows(argv[1])
    cpu = machine.get("cpu", {}).get("brand_raw", machine.get("processor", "?"))
    print(f"machine: {cpu}, Python {machine.get('python_version', '?')}\n")
    print(table(groups))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
