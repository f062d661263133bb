"""cpp's time when other work runs between its calls, and why.

    python benchmarks/between_calls.py [--batch 16] [--img 416] [--calls 20] [--rounds 2]

YOLOv3 loss, forward + backward with ``backend="cpp"``, caches evicted before each call, medians;
between two timed calls runs one of:

* ``nothing``; ``original``: the original loss (``benchmarks/original.py``) forward + backward;
  ``reference``: the reference loss; ``allocator``: 60 MB of tensors made and freed;
* ``kept gradients``: as ``original``, but nobody resets ``p.grad`` (a script without
  ``zero_grad``): autograd then adds cpp's gradient into the one already there;
* ``no pool``: nothing between, the gradient pool off (``yk.cpp.pool_set_enabled(False)``): every
  call's gradient is fresh memory, as when the pool cannot serve one (the previous call's
  gradient still alive, or the pool's limit reached).

Each row also shows the minor page faults per call (``getrusage``): fresh memory is paid for by
one fault per 4 KB page on its first write.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import original

import yolo_kernels as yk
from yolo_kernels import bench


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--img", type=int, default=416)
    parser.add_argument("--calls", type=int, default=20, help="timed calls per mode and round")
    parser.add_argument("--rounds", type=int, default=2, help="every mode once per round")
    args = parser.parse_args(argv)
    model, p, targets = bench.yolov3_inputs(args.batch, args.img, 10)
    scratch = torch.empty(bench.EVICT_BYTES, dtype=torch.uint8)

    def step(backend=None):
        if backend is None:
            loss, _ = original.compute_loss(p, targets, model)
        else:
            loss, _ = yk.compute_loss(p, targets, model, backend=backend)
        loss.backward()

    def allocate():
        xs = [torch.ones(2 << 20) for _ in range(8)]
        del xs

    modes = {  # name: (what runs between, reset p.grad, gradient pool on)
        "nothing": (None, True, True),
        "original": (step, True, True),
        "reference": (lambda: step("reference"), True, True),
        "allocator": (allocate, True, True),
        "kept gradients": (step, False, True),
        "no pool": (None, True, False),
    }
    machine = bench.machine_line(torch.device("cpu"), torch.get_num_threads())
    print(f"cpp, YOLOv3 batch {args.batch} at {args.img}, {machine}")
    print("| between calls | round | median ms | page faults per call |")
    print("|---|---|---|---|")
    for round_ in range(args.rounds):
        for name, (between, reset, pool) in modes.items():
            yk.cpp.pool_set_enabled(pool)
            times, faults = [], []
            for call in range(args.calls + 3):
                if reset:
                    for x in p:
                        x.grad = None
                if between is not None:
                    between()
                    if reset:
                        for x in p:
                            x.grad = None
                scratch.fill_(1)
                f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                t0 = time.perf_counter()
                step("cpp")
                if call >= 3:  # warm-up calls first
                    times.append((time.perf_counter() - t0) * 1e3)
                    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
            for x in p:
                x.grad = None
            print(f"| {name} | {round_ + 1} | {statistics.median(times):.2f} | {statistics.median(faults):.0f} |")
    yk.cpp.pool_set_enabled(True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
