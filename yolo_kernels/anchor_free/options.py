"""The anchor-free family's options: what a head and a trainer's hyperparameters fix for a loss call.

One frozen value per loss object. ``from_model`` reads an ultralytics ``DetectionModel`` (or any
module whose last layer has ``nc``, ``reg_max`` and ``stride``, and which has ``args`` with the
gains), as the original loss's constructor does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..config import is_real_number, unwrap_model

__all__ = ["DetectionOptions"]


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")
    return value


def _finite(name: str, value: Any) -> float:
    if not is_real_number(value) or value != value or abs(float(value)) == float("inf"):
        raise ValueError(f"{name}: expected a finite real number, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class DetectionOptions:
    """Everything but the tensors that one anchor-free loss call depends on.

    ``box``/``cls``/``dfl``: the gains of the three components; ``topk``: candidates kept per box by
    the task-aligned assigner; ``topk2``: the second cut after an anchor claimed by several boxes
    went to one of them (``None``: no second cut, as ``topk2 == topk``); ``alpha``/``beta``: the
    exponents of score and CIoU in the alignment metric; ``strides``: per level, in pixels.
    """

    nc: int
    reg_max: int
    strides: tuple[float, ...]
    box: float = 7.5
    cls: float = 0.5
    dfl: float = 1.5
    topk: int = 10
    topk2: int | None = None
    alpha: float = 0.5
    beta: float = 6.0

    def __post_init__(self) -> None:
        _positive_int("nc", self.nc)
        _positive_int("reg_max", self.reg_max)
        _positive_int("topk", self.topk)
        if self.topk2 is not None:
            _positive_int("topk2", self.topk2)
        if not self.strides or not all(is_real_number(s) and s > 0 for s in self.strides):
            raise ValueError(f"strides: expected one positive stride per level, got {self.strides!r}")
        for name in ("box", "cls", "dfl", "alpha", "beta"):
            object.__setattr__(self, name, _finite(name, getattr(self, name)))
        object.__setattr__(self, "strides", tuple(float(s) for s in self.strides))

    @property
    def second_cut(self) -> int | None:
        """``topk2`` when it differs from ``topk`` (the original runs the second cut only then)."""
        return self.topk2 if self.topk2 is not None and self.topk2 != self.topk else None

    @property
    def size_floor(self) -> float:
        """Box sides below this (pixels) are raised to it about the centre before anchors are
        searched inside: the second level's stride (the first's when there is one level)."""
        return self.strides[1] if len(self.strides) > 1 else self.strides[0]

    @property
    def uses_dfl(self) -> bool:
        """``reg_max > 1``: distances are distributions over bins (DFL); else plain values (L1)."""
        return self.reg_max > 1

    @property
    def item_names(self) -> tuple[str, str, str]:
        return ("box_loss", "cls_loss", "dfl_loss" if self.uses_dfl else "l1_loss")

    def gains(self) -> tuple[float, float, float]:
        return (self.box, self.cls, self.dfl)

    @classmethod
    def from_model(cls, model: Any, topk: int = 10, topk2: int | None = None) -> DetectionOptions:
        """The options of an ultralytics detection model: ``nc``, ``reg_max``, ``stride`` from its
        head (the last module), the gains from ``model.args`` (``box``, ``cls``, ``dfl``)."""
        model = unwrap_model(model)
        layers = getattr(model, "model", None)
        try:
            head = layers[-1]
        except (TypeError, IndexError, KeyError):
            raise TypeError(
                f"model: expected an ultralytics detection model (model.model[-1] the Detect head), "
                f"got {type(model).__name__}"
            ) from None
        for attr in ("nc", "reg_max", "stride"):
            if not hasattr(head, attr):
                raise TypeError(f"model.model[-1]: expected a Detect head with .{attr}, got {type(head).__name__}")
        hyp = getattr(model, "args", None)
        if hyp is None:
            raise AttributeError(
                "model.args: expected the training hyperparameters (box, cls, dfl gains), got none; the "
                "ultralytics trainer sets it (model.args = trainer.args), or set it yourself, e.g. "
                "model.args = ultralytics.cfg.get_cfg()"
            )
        gains = {}
        for key in ("box", "cls", "dfl"):
            value = hyp.get(key) if isinstance(hyp, dict) else getattr(hyp, key, None)
            if value is None:
                raise AttributeError(f"model.args.{key}: expected the {key} gain, got none")
            gains[key] = value
        stride = head.stride
        strides = stride.tolist() if isinstance(stride, torch.Tensor) else list(stride)
        return cls(nc=int(head.nc), reg_max=int(head.reg_max), strides=tuple(strides), topk=topk, topk2=topk2, **gains)
