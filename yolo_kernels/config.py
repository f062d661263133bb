"""What every loss family shares before any tensor is read: the package's errors, the reading of
numbers and hyperparameter dicts, the unwrapping of a parallel model, the compute dtype.

A family's own options live in its folder (``anchor/options.py``, ``anchor_free/options.py``).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from numpy import bool_ as numpy_bool

__all__ = [
    "BackendUnavailableError",
    "MissingHyperparameterError",
    "check_hyp_keys",
    "compute_dtype",
    "finite_number",
    "is_real_number",
    "unwrap_model",
]


class BackendUnavailableError(RuntimeError):
    """A requested backend cannot run here; the message says why and how to get it."""


class MissingHyperparameterError(KeyError):
    """``model.hyp`` lacks a key the loss reads (a ``KeyError``, as the original raises)."""

    def __str__(self) -> str:  # KeyError would print the message with quotes around it
        return str(self.args[0]) if self.args else ""


def is_real_number(value: Any) -> bool:
    """A Python or NumPy real number that is not a bool (hyperparameters often come out of NumPy)."""
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, numpy_bool))


def is_bool(value: Any) -> bool:
    """A Python or NumPy bool."""
    return isinstance(value, (bool, numpy_bool))


def finite_number(name: str, value: Any) -> float:
    """``value`` (a real number or a one-element tensor) as a finite float, else an error naming ``name``."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name}: expected a scalar, got a tensor of shape {tuple(value.shape)}")
        value = value.item()
    if not is_real_number(value):
        raise TypeError(f"{name}: expected a real number, got {type(value).__name__} ({value!r})")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name}: expected a finite number, got {value}")
    return value


def check_hyp_keys(hyp: Mapping[str, Any], known: Sequence[str], name: str = "hyp") -> None:
    """Raise a ``ValueError`` naming the keys of ``hyp`` that are not in ``known``."""
    unknown = [key for key in hyp if key not in known]
    if unknown:
        raise ValueError(
            f"{name}: unknown loss hyperparameter(s) {sorted(map(str, unknown))}; the known keys are {list(known)}"
        )


def unwrap_model(model: Any) -> Any:
    """The model inside DataParallel / DistributedDataParallel (anything with ``.module`` and no ``yolo_layers``)."""
    while not hasattr(model, "yolo_layers") and hasattr(model, "module"):
        model = model.module
    return model


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype every loss is computed in: float64 for float64 inputs, float32 for everything else."""
    return torch.float64 if dtype == torch.float64 else torch.float32
