"""What every Triton launcher of the package shares: the launch helper (keyword arguments only)
with its recorder, and the shapes' arithmetic of carving one zeroed buffer into aligned pieces.

``record_launches`` captures the launches of a launcher instead of running them: the compile gate
(``compile_gate.py``) derives each kernel's signature from the launcher itself that way, with no
GPU, rather than from a hand-written list.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from collections.abc import Iterator
from typing import Any

import torch

__all__ = ["ALIGN", "Launch", "carve", "cdiv", "contiguous_strides", "dense", "launch", "record_launches"]


@dataclasses.dataclass
class Launch:
    """One recorded kernel launch: the kernel, its grid and its keyword arguments."""

    kernel: Any
    grid: tuple
    arguments: dict


_RECORDER: contextvars.ContextVar[list | None] = contextvars.ContextVar("yolo_kernels_triton_recorder", default=None)


def launch(kernel, grid: tuple, **arguments) -> None:
    recorded = _RECORDER.get()
    if recorded is not None:
        recorded.append(Launch(kernel, grid, arguments))
        return
    kernel[grid](**arguments)


@contextlib.contextmanager
def record_launches() -> Iterator[list[Launch]]:
    """Within the block, a launcher (``anchor_loss.fused_loss``) records its launches (kernel, grid,
    arguments) instead of running them: it then runs on any tensors, with no GPU (its outputs are
    left uninitialised)."""
    launches: list[Launch] = []
    token = _RECORDER.set(launches)
    try:
        yield launches
    finally:
        _RECORDER.reset(token)


def contiguous_strides(shape) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


def dense(shape, strides) -> bool:
    """Whether a tensor of these shape and strides covers a block of ``numel`` elements exactly
    once (a permutation of a contiguous layout)."""
    step = 1
    for size, stride in sorted(((n, st) for n, st in zip(shape, strides) if n != 1), key=lambda d: d[1]):
        if stride != step:
            return False
        step *= size
    return True


ALIGN = 64  # elements: the pieces of the launcher's zeroed buffer start 128-byte aligned (fp16 and up)


def cdiv(n: int, d: int) -> int:
    return -(-n // d)  # triton.cdiv is a jit function: microseconds per call from Python


def carve(shapes: dict[str, tuple[int, ...]], dtype: torch.dtype, device) -> dict[str, torch.Tensor]:
    """Uninitialised tensors of these shapes as views of one allocation (each allocation costs
    microseconds of host time on a GPU machine; a call needs a dozen small buffers), each piece
    starting ``ALIGN`` elements after the last (128-byte aligned: the pointer alignment Triton
    specialises on is the same whatever the sizes)."""
    starts, end = {}, 0
    for name, shape in shapes.items():
        starts[name] = end
        end += cdiv(math.prod(shape), ALIGN) * ALIGN
    buffer = torch.empty(end, dtype=dtype, device=device)
    return {name: buffer[starts[name] : starts[name] + math.prod(shape)].view(shape) for name, shape in shapes.items()}
