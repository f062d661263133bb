"""The public loss API: ``compute_loss`` (the drop-in), ``YOLOv3Loss``, ``build_targets`` and the
backend dispatch.

Data flows one way: public call -> ``validate.check_inputs`` -> ``resolve_backend`` -> one backend
call ``backend.loss(p, targets, anchors, options, balance=None, stats=False) -> (loss, loss_items,
layer_obj, grad_stats)`` (``grad_stats``: the op's ``[nl, 8]`` statistics, or None).
A backend is an object with a ``name``, an ``unavailable_reason(device)`` (``None`` when it can run
there) and that ``loss`` method; ``BACKENDS`` lists them. The YOLOv5-style family
(``yolo_kernels.yolov5``) goes through the same dispatch.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn

from . import reference
from .config import (
    DEFAULT_HYP,
    BackendUnavailableError,
    LossOptions,
    as_anchor_list,
    is_real_number,
    model_anchors,
    model_options,
    unwrap_model,
)
from .cpp import CppBackend
from .stats import LossStats
from .triton import TritonBackend
from .validate import check_inputs

__all__ = [
    "BackendUnavailableError",
    "BACKENDS",
    "available_backends",
    "resolve_backend",
    "compute_loss",
    "build_targets",
    "YOLOv3Loss",
]


class ReferenceBackend:
    """Plain PyTorch (``yolo_kernels.reference``): any device, any floating dtype."""

    name = "reference"

    def unavailable_reason(self, device: torch.device | None) -> str | None:
        return None

    def loss(self, p, targets, anchors, options, balance=None, stats=False):
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
    import os
    import sys

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


def check_backend_name(backend: Any) -> str:
    """``backend`` when it names a backend (or is ``"auto"``), else a clear error: checked where a
    backend is chosen (a constructor, ``apply``), not first at the training step. Whether it can
    run depends on the device, which the call knows."""
    if not isinstance(backend, str):
        raise TypeError(f"backend: expected a backend name, got {type(backend).__name__}")
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"backend: expected 'auto' or one of {sorted(BACKENDS)}, got {backend!r}")
    return backend


def model_strides(model: Any) -> list[float] | None:
    """The strides of ``model``'s YOLO layers (``module_list[j].stride``), or ``None`` where a layer
    does not carry one (the grid check of ``check_inputs`` is then skipped)."""
    model = unwrap_model(model)
    strides = []
    for j in getattr(model, "yolo_layers", ()):
        stride = getattr(model.module_list[j], "stride", None)
        if isinstance(stride, torch.Tensor) and stride.numel() == 1:
            stride = stride.item()
        if not is_real_number(stride) or not stride > 0:
            return None
        strides.append(float(stride))
    return strides or None


def resolve_backend(backend: str, device: torch.device, warn: bool = True):
    """The backend object for a name (or ``"auto"``) on ``device``; raises when it cannot run there.

    ``"auto"`` takes the first backend of ``AUTO_ORDER[device.type]`` that can run, else the
    reference, and then (with ``warn``) warns once per backend that the fast path is missing,
    with the reason."""
    check_backend_name(backend)
    if backend == "auto":
        reasons = []
        for name in AUTO_ORDER.get(device.type, ()):
            reason = BACKENDS[name].unavailable_reason(device)
            if reason is None:
                return BACKENDS[name]
            reasons.append((name, reason))
        for name, reason in reasons if warn else ():
            _warn_fallback_once(name, device, reason)
        return BACKENDS["reference"]
    reason = BACKENDS[backend].unavailable_reason(device)
    if reason is not None:
        raise BackendUnavailableError(f"backend {backend!r} cannot run on {device}: {reason}")
    return BACKENDS[backend]


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
    own_checks = hasattr(impl, "checks_values") and impl.checks_values(device)
    p = check_inputs(p, targets, anchors, options, validate and not own_checks, strides)
    if own_checks:
        loss, items, layer_obj, grad_stats = impl.loss(p, targets, anchors, options, balance, stats, validate=validate)
    else:
        loss, items, layer_obj, grad_stats = impl.loss(p, targets, anchors, options, balance, stats)
    if not stats:
        return loss, items, layer_obj, None
    return loss, items, layer_obj, LossStats(grad_stats, loss.detach())


def _run(p, targets, anchors, options: LossOptions, backend: str, validate: bool, stats: bool = False, strides=None):
    loss, items, _, loss_stats = run_backend(p, targets, anchors, options, backend, validate, None, stats, strides)
    return (loss, items, loss_stats) if stats else (loss, items)


def compute_loss(
    p: Sequence[torch.Tensor],
    targets: torch.Tensor,
    model: Any,
    backend: str = "auto",
    *,
    box_loss: str = "giou",
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    validate: bool = True,
    stats: bool = False,
):
    """Drop-in for ultralytics' ``compute_loss(p, targets, model)``.

    Reads ``model.hyp``, ``model.gr``, ``model.nc``, ``model.yolo_layers`` and
    ``model.module_list[j].anchor_vec`` (``.module`` of DataParallel/DDP is unwrapped).
    Returns ``(loss [1], loss_items [4] = (lbox, lobj, lcls, loss))``, float32 (float64 for
    float64 ``p``); with ``stats=True`` also a ``LossStats`` (``yolo_kernels.stats``: per-layer,
    per-component gradient norms and maxima, pair counts, unmatched targets, non-finite flag; device
    tensors, no host sync). ``validate=False`` skips the value checks of the targets (see ``validate``).
    """
    anchors = model_anchors(model)
    options = model_options(model, box_loss=box_loss, reduction=reduction, label_smoothing=label_smoothing)
    return _run(p, targets, anchors, options, backend, validate, stats, model_strides(model))


def build_targets(p: Sequence[torch.Tensor], targets: torch.Tensor, model: Any, *, validate: bool = True):
    """The original's ``build_targets``: ``(tcls, tbox, indices, anch)``, one entry per layer, where
    ``indices[i] = (b, a, gj, gi)``; pairs in anchor-major order."""
    anchors = [a.to(_first_device(p)) for a in model_anchors(model)]
    options = model_options(model)
    check_inputs(p, targets, anchors, options, validate)
    return reference.build_targets(p, targets, model)


class AnchoredLoss(nn.Module):
    """What the loss modules share: per-layer anchors given in pixels with their strides, kept as
    grid-unit buffers (``model.to(device)`` moves them), and the options."""

    options: LossOptions

    def _set_anchors(self, anchors: Sequence[Any], strides: Sequence[float]) -> None:
        anchors = as_anchor_list(anchors)
        strides = list(strides) if isinstance(strides, (list, tuple)) else strides
        if not isinstance(strides, list) or len(strides) != len(anchors):
            raise ValueError(f"strides: expected {len(anchors)} strides (one per anchor set), got {strides!r}")
        for i, s in enumerate(strides):
            if not is_real_number(s) or not s > 0:
                raise ValueError(f"strides[{i}]: expected a positive number, got {s!r}")
        self.strides = [float(s) for s in strides]
        #: the strides the grids of ``p`` are checked against (one image size), or None: no check
        self.grid_strides: list[float] | None = list(self.strides)
        for i, (a, s) in enumerate(zip(anchors, self.strides)):
            self.register_buffer(f"anchor_vec{i}", a.detach().to(torch.float32) / s, persistent=False)
        self.nl = len(anchors)

    @property
    def anchor_vecs(self) -> list[torch.Tensor]:
        """Per-layer anchors in grid units (pixels / stride)."""
        return [getattr(self, f"anchor_vec{i}") for i in range(self.nl)]

    @property
    def nc(self) -> int:
        return self.options.nc


class YOLOv3Loss(AnchoredLoss):
    """The YOLOv3 loss as a module that holds its anchors, strides and hyperparameters.

    Args:
        anchors: per layer, ``[na, 2]`` anchor sizes in **pixels**, in the order of ``p``.
        strides: per layer, the stride in pixels (anchors are divided by it).
        num_classes: ``nc``; ``p[i]`` has ``nc + 5`` channels.
        hyp: ultralytics hyperparameters (keys of ``DEFAULT_HYP``; missing keys take defaults, an
            unknown key is an error naming it).
        giou_ratio: ``gr``, the weight of the IoU in the objectness target (settable, e.g. ramped).
        box_loss: ``"giou"`` (default), ``"iou"``, ``"diou"`` or ``"ciou"``.
        reduction: ``"mean"`` (default) or ``"sum"`` (the original's alternative path).
        label_smoothing: ε of ``smooth_BCE``.
        backend: ``"auto"``, ``"reference"``, ``"cpp"`` or ``"triton"``.
        validate: check target values (see ``yolo_kernels.validate``).

    ``forward(p, targets, stats=False)`` returns ``(loss [1], loss_items [4])``, the same numbers
    as ``compute_loss`` on a model with those anchors and settings, and with ``stats=True`` a
    ``LossStats`` as third value.
    """

    def __init__(
        self,
        anchors: Sequence[Any],
        strides: Sequence[float],
        num_classes: int,
        hyp: Mapping[str, Any] | None = None,
        giou_ratio: float = 1.0,
        box_loss: str = "giou",
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        backend: str = "auto",
        validate: bool = True,
    ):
        super().__init__()
        self._set_anchors(anchors, strides)
        self.options = LossOptions.from_hyp(
            hyp,
            nc=num_classes,
            gr=giou_ratio,
            extra_keys=False,
            box_loss=box_loss,
            reduction=reduction,
            label_smoothing=label_smoothing,
        )
        self.backend = check_backend_name(backend)
        self.validate = validate

    @classmethod
    def from_model(cls, model: Any, **kwargs: Any) -> YOLOv3Loss:
        """A criterion with ``model``'s anchors, ``hyp``, ``gr`` and ``nc`` (anchors kept in grid
        units; the grids are checked against the layers' strides where they carry them)."""
        m = model_options(model)
        anchors = model_anchors(model)
        kwargs.setdefault("hyp", {k: getattr(m, k) for k in DEFAULT_HYP})
        kwargs.setdefault("giou_ratio", m.gr)
        criterion = cls([a.detach().cpu() for a in anchors], [1.0] * len(anchors), m.nc, **kwargs)
        criterion.grid_strides = model_strides(model)
        return criterion

    @property
    def gr(self) -> float:
        return self.options.gr

    @gr.setter
    def gr(self, value: float) -> None:
        self.options = dataclasses.replace(self.options, gr=value)

    giou_ratio = gr

    def forward(self, p: Sequence[torch.Tensor], targets: torch.Tensor, stats: bool = False):
        return _run(p, targets, self.anchor_vecs, self.options, self.backend, self.validate, stats, self.grid_strides)

    def extra_repr(self) -> str:
        o = self.options
        return (
            f"nl={self.nl}, nc={o.nc}, strides={self.strides}, box_loss={o.box_loss!r}, reduction={o.reduction!r}, "
            f"gr={o.gr}, label_smoothing={o.label_smoothing}, backend={self.backend!r}"
        )
