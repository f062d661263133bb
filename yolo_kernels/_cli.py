"""What the command-line tools (``bench``, ``train``) share: argument types that reject bad values
with argparse's own error (usage line, no traceback), and the checks that must fail before a long
run rather than after it."""

from __future__ import annotations

import argparse

import torch

from .anchor import yolov3 as loss_api


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1."""
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def nonnegative_int(text: str) -> int:
    """An argparse type: an integer >= 0."""
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def check_device(parser: argparse.ArgumentParser, device: str) -> torch.device:
    """``--device`` as a device that exists here."""
    try:
        dev = torch.device(device)
    except RuntimeError:
        parser.error(f"--device: expected 'cpu' or 'cuda', got {device!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available here (torch.cuda.is_available() is False)")
    if dev.type not in ("cpu", "cuda"):
        parser.error(f"--device: expected 'cpu' or 'cuda', got {device!r}")
    return dev


def check_backends(parser: argparse.ArgumentParser, names: list[str], device: torch.device, flag: str) -> None:
    """Each of ``names`` is a backend (or ``auto``) that can run on ``device``."""
    for name in names:
        if name != "auto" and name not in loss_api.BACKENDS:
            parser.error(f"{flag}: expected 'auto' or one of {sorted(loss_api.BACKENDS)}, got {name!r}")
        if name != "auto":
            reason = loss_api.BACKENDS[name].unavailable_reason(device)
            if reason is not None:
                parser.error(f"{flag} {name}: unavailable on {device.type}: {reason}")


def check_matplotlib(parser: argparse.ArgumentParser) -> None:
    """``--plot`` needs matplotlib: say so before the run, not after it."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        parser.error("--plot needs matplotlib: pip install matplotlib")


def threads_note(threads: int) -> str:
    """How many CPU threads run, and how to change it (contention makes more threads slower)."""
    return (
        f"{threads} CPU thread{'s' if threads != 1 else ''} (torch.get_num_threads(); set with --threads N or "
        "OMP_NUM_THREADS; on a busy machine fewer threads can be much faster)"
    )
