"""Backend dispatch, shared by every loss family: the backend contract, each family's registry,
``auto``.

A backend is an object with

* ``name``;
* ``unavailable_reason(device) -> str | None`` (``None``: it can run there);
* the family's ``loss(...)``, one signature per family (``anchor/backends.py``,
  ``anchor_free/backends.py`` say which).

Each family keeps one ``Registry`` (its backends by name, and what ``auto`` tries on each device
type), built in its ``backends.py``; the public modules resolve their ``backend=`` argument
through it and call nothing below the backend object.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import warnings
from typing import Any, Protocol

import torch
import torch.nn as nn

from .config import BackendUnavailableError

__all__ = ["Backend", "Registry"]


class Backend(Protocol):
    """What every backend of every family has (its ``loss`` is the family's)."""

    name: str

    def unavailable_reason(self, device: torch.device | None) -> str | None: ...


_WARNED: set[tuple[str, str]] = set()


def _caller_stacklevel() -> int:
    """The ``stacklevel`` of the first frame outside yolo_kernels and torch.nn (the user's line that
    called the loss), however many frames the call took to get here."""
    package = os.path.dirname(os.path.abspath(__file__))
    skip = (package + os.sep, os.path.dirname(os.path.abspath(nn.__file__)) + os.sep)
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(skip):
        frame, level = frame.f_back, level + 1
    return level


def _warn_fallback_once(family: str, name: str, device: torch.device, reason: str) -> None:
    """``auto`` could not use the fast backend it prefers for this device: say so once per process
    and family, at the user's line."""
    if (family, name) in _WARNED:
        return
    _WARNED.add((family, name))
    warnings.warn(
        f"yolo_kernels: backend='auto' runs the slow 'reference' loss on {device.type}: {reason}. "
        f"backend='reference' silences this; `python -m yolo_kernels.info` lists the backends.",
        RuntimeWarning,
        stacklevel=_caller_stacklevel(),
    )


@dataclasses.dataclass(frozen=True)
class Registry:
    """One family's backends. ``backends``: by name, ``"reference"`` (plain PyTorch, runs anywhere)
    among them; ``auto_order``: by device type, the fast backends ``auto`` tries first."""

    family: str
    backends: dict[str, Any]
    auto_order: dict[str, tuple[str, ...]]

    def register(self, backend: Any, auto_on: tuple[str, ...] = ()) -> None:
        """Add ``backend`` (under its ``name``, replacing one of that name), tried by ``auto`` on the
        device types ``auto_on`` after the ones there already; registering again changes no order."""
        self.backends[backend.name] = backend
        for device_type in auto_on:
            order = self.auto_order.get(device_type, ())
            if backend.name not in order:
                self.auto_order[device_type] = (*order, backend.name)

    def available(self, device: str | torch.device | None = None) -> list[str]:
        """Names of the backends that can run (on ``device`` when given), reference first."""
        device = torch.device(device) if device is not None else None
        return [name for name, backend in self.backends.items() if backend.unavailable_reason(device) is None]

    def check_name(self, backend: Any) -> str:
        """``backend`` when it names a backend (or is ``"auto"``), else a clear error: checked where a
        backend is chosen (a constructor, ``apply``), not first at the training step. Whether it can
        run depends on the device, which the call knows."""
        if not isinstance(backend, str):
            raise TypeError(f"backend: expected a backend name, got {type(backend).__name__}")
        if backend != "auto" and backend not in self.backends:
            raise ValueError(f"backend: expected 'auto' or one of {sorted(self.backends)}, got {backend!r}")
        return backend

    def resolve(self, backend: str, device: torch.device, warn: bool = True) -> Any:
        """The backend object for a name (or ``"auto"``) on ``device``; raises when it cannot run there.

        ``"auto"`` takes the first backend of ``auto_order[device.type]`` that can run, else the
        reference, and then (with ``warn``) warns once per backend that the fast path is missing,
        with the reason."""
        self.check_name(backend)
        if backend == "auto":
            reasons = []
            for name in self.auto_order.get(device.type, ()):
                reason = self.backends[name].unavailable_reason(device)
                if reason is None:
                    return self.backends[name]
                reasons.append((name, reason))
            for name, reason in reasons if warn else ():
                _warn_fallback_once(self.family, name, device, reason)
            return self.backends["reference"]
        reason = self.backends[backend].unavailable_reason(device)
        if reason is not None:
            raise BackendUnavailableError(f"backend {backend!r} cannot run on {device}: {reason}")
        return self.backends[backend]
