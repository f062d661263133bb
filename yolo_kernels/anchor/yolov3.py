"""The YOLOv3 archive family's public API: ``compute_loss`` (the drop-in), ``YOLOv3Loss``,
``build_targets``.

Data flows one way: public call -> ``backends.run_backend`` (input checks, backend choice, one
backend call). The backend names (``BACKENDS``, ``available_backends``, ``resolve_backend``,
``run_backend``, ``check_backend_name``) live in ``backends.py`` and are re-exported here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..config import BackendUnavailableError
from . import reference
from .backends import (
    AUTO_ORDER,
    BACKENDS,
    available_backends,
    check_backend_name,
    first_device,
    resolve_backend,
    run_backend,
)
from .module import AnchoredLoss
from .options import LossOptions, model_anchors, model_options, model_strides
from .validate import check_inputs

__all__ = [
    "AUTO_ORDER",
    "BackendUnavailableError",
    "BACKENDS",
    "check_backend_name",
    "run_backend",
    "available_backends",
    "resolve_backend",
    "compute_loss",
    "build_targets",
    "YOLOv3Loss",
]


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
    anchors = [a.to(first_device(p)) for a in model_anchors(model)]
    options = model_options(model)
    check_inputs(p, targets, anchors, options, validate)
    return reference.build_targets(p, targets, model)


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
        validate: check target values (see ``yolo_kernels.anchor.validate``).

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
        kwargs.setdefault("hyp", m.as_hyp())
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
