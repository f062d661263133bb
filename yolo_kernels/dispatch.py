"""Backend dispatch, shared by every loss family: the backend contract, the registry, ``auto``.

A backend is an object with

* ``name``;
* ``unavailable_reason(device) -> str | None`` (``None``: it can run there);
* ``checks_values(device) -> bool``: whether it checks the target and anchor values itself on
  that device (``run_backend`` then skips its own pass);
* ``loss(p, targets, anchors, options, balance=None, stats=False, validate=True) -> (loss,
  loss_items, layer_obj, grad_stats)`` (``grad_stats``: the op's ``[nl, 8]`` statistics, or None).

``BACKENDS`` lists them; ``resolve_backend`` turns a name or ``"auto"`` into one for a device;
``run_backend`` checks the inputs and runs it. The public APIs (``loss.py``, ``yolov5.py``) call
``run_backend`` and nothing below it.
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import Any

import torch
import torch.nn as nn

from . import reference
from .config import BackendUnavailableError, LossOptions
from .cpp import CppBackend
from .stats import LossStats
from .triton import TritonBackend
from .validate import check_inputs

__all__ = [
    "AUTO_ORDER",
    "BACKENDS",
    "ReferenceBackend",
    "available_backends",
    "check_backend_name",
    "resolve_backend",
    "run_backend",
]


class ReferenceBackend:
    """Plain PyTorch (``yolo_kernels.reference``): any device, any floating dtype."""

    name = "reference"

    def unavailable_reason(self, device: torch.device | None) -> str | None:
        return None

    def checks_values(self, device: torch.device) -> bool:
        return False  # run_backend's checks (validate) cover it

    def loss(self, p, targets, anchors, options, balance=None, stats=False, validate=True):
        loss, items, layer_obj = reference.loss(p, targets, anchors, options, balance, return_layer_obj=True)
        grad_stats = reference.gradient_stats(p, targets, anchors, options, balance) if stats else None
        return loss, items, layer_obj, grad_stats


BACKENDS: dict[str, Any] = {
    "reference": ReferenceBackend(),
    "cpp": CppBackend(),
    "triton": TritonBackend(),
}
#: What ``backend="auto"`` tries, by device type, before falling back to the reference.
AUTO_ORDER = {"cuda": ("triton",), "cpu": ("cpp",)}


def available_backends(device: str | torch.device | None = None) -> list[str]:
    """Names of the backends that can run (on ``device`` when given), reference first."""
    device = torch.device(device) if device is not None else None
    return [name for name, backend in BACKENDS.items() if backend.unavailable_reason(device) is None]


_WARNED: set[str] = set()


def _caller_stacklevel() -> int:
    """The ``stacklevel`` of the first frame outside yolo_kernels and torch.nn (the user's line that
    called the loss), however many frames the call took to get here."""
    package = os.path.dirname(os.path.abspath(__file__))
    skip = (package + os.sep, os.path.dirname(os.path.abspath(nn.__file__)) + os.sep)
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(skip):
        frame, level = frame.f_back, level + 1
    return level


def _warn_fallback_once(name: str, device: torch.device, reason: str) -> None:
    """``auto`` could not use the fast backend it prefers for this device: say so once per process,
    at the user's line."""
    if name in _WARNED:
        return
    _WARNED.add(name)
    warnings.warn(
        f"yolo_kernels: backend='auto' runs the slow 'reference' loss on {device.type}: {reason}. "
        f"backend='reference' silences this; `python -m yolo_kernels.info` lists the backends.",
        RuntimeWarning,
        stacklevel=_caller_stacklevel(),
    )


def check_backend_name(backend: Any, backends: dict[str, Any] | None = None) -> str:
    """``backend`` when it names a backend (or is ``"auto"``), else a clear error: checked where a
    backend is chosen (a constructor, ``apply``), not first at the training step. Whether it can
    run depends on the device, which the call knows."""
    if not isinstance(backend, str):
        raise TypeError(f"backend: expected a backend name, got {type(backend).__name__}")
    backends = BACKENDS if backends is None else backends
    if backend != "auto" and backend not in backends:
        raise ValueError(f"backend: expected 'auto' or one of {sorted(backends)}, got {backend!r}")
    return backend


def resolve_backend(
    backend: str,
    device: torch.device,
    warn: bool = True,
    backends: dict[str, Any] | None = None,
    auto_order: dict[str, tuple[str, ...]] | None = None,
):
    """The backend object for a name (or ``"auto"``) on ``device``; raises when it cannot run there.

    ``"auto"`` takes the first backend of ``AUTO_ORDER[device.type]`` that can run, else the
    reference, and then (with ``warn``) warns once per backend that the fast path is missing,
    with the reason. ``backends``/``auto_order``: another family's registry (default: the anchor
    families')."""
    backends = BACKENDS if backends is None else backends
    auto_order = AUTO_ORDER if auto_order is None else auto_order
    check_backend_name(backend, backends)
    if backend == "auto":
        reasons = []
        for name in auto_order.get(device.type, ()):
            reason = backends[name].unavailable_reason(device)
            if reason is None:
                return backends[name]
            reasons.append((name, reason))
        for name, reason in reasons if warn else ():
            _warn_fallback_once(name, device, reason)
        return backends["reference"]
    reason = backends[backend].unavailable_reason(device)
    if reason is not None:
        raise BackendUnavailableError(f"backend {backend!r} cannot run on {device}: {reason}")
    return backends[backend]


def _first_device(p: Any) -> torch.device:
    if isinstance(p, (list, tuple)) and p and isinstance(p[0], torch.Tensor):
        return p[0].device
    return torch.device("cpu")


def run_backend(
    p,
    targets,
    anchors,
    options: LossOptions,
    backend: str,
    validate: bool,
    balance=None,
    stats: bool = False,
    strides=None,
):
    """Check the inputs, pick the backend, run it: ``(loss, loss_items, layer_obj, LossStats or None)``.
    ``strides`` (per layer, optional): the grids of ``p`` must fit one image size at them."""
    if not isinstance(stats, bool):
        raise TypeError(f"stats: expected a bool, got {type(stats).__name__}")
    device = _first_device(p)
    anchors = [a.to(device=device) for a in anchors]
    impl = resolve_backend(backend, device)
    # a backend that checks the target and anchor values itself on this device skips the Python pass
    own_checks = impl.checks_values(device)
    p = check_inputs(p, targets, anchors, options, validate and not own_checks, strides)
    loss, items, layer_obj, grad_stats = impl.loss(p, targets, anchors, options, balance, stats, validate=validate)
    if not stats:
        return loss, items, layer_obj, None
    return loss, items, layer_obj, LossStats(grad_stats, loss.detach())
