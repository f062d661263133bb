"""The anchor-free detection loss of the ``ultralytics`` package (YOLOv8, YOLO11, YOLO26, YOLOv10
heads): drop-ins for ``ultralytics.utils.loss.v8DetectionLoss`` and ``E2ELoss``.

    from yolo_kernels.yolov8 import DetectionLoss, E2ELoss
    criterion = DetectionLoss(model)              # as v8DetectionLoss(model); model.args has box/cls/dfl
    loss, loss_items = criterion(preds, batch)    # ([box, cls, dfl] * bs, {"box_loss": ..., ...})

``yolo_kernels.integrations.ultralytics.apply()`` makes the ultralytics trainer build these.
Semantics and what is checked: docs/anchor_free.md.
"""

from __future__ import annotations

from typing import Any

import torch

from ..config import compute_dtype, unwrap_model
from .backends import REGISTRY
from .options import DetectionOptions
from .validate import check_problem, check_values, parse_preds

__all__ = ["DetectionLoss", "E2ELoss"]


def _class_weights(model: Any, nc: int, device: torch.device) -> torch.Tensor | None:
    weights = getattr(model, "class_weights", None)
    if weights is None:
        return None
    weights = torch.as_tensor(weights)
    if weights.numel() != nc:
        raise ValueError(
            f"model.class_weights: expected {nc} per-class weights (nc = {nc}), got shape {tuple(weights.shape)}"
        )
    return weights.to(device).reshape(nc)


class DetectionLoss:
    """``v8DetectionLoss`` of ultralytics 8.4, fused: same constructor, call and return.

    Args:
        model: an ultralytics detection model (``model.model[-1]`` the Detect head with ``nc``,
            ``reg_max``, ``stride``; ``model.args`` the hyperparameters with the ``box``, ``cls``,
            ``dfl`` gains, read at every call as the original does; ``model.class_weights``
            optional, read here).
        tal_topk: boxes keep their ``tal_topk`` best candidate points.
        tal_topk2: after a point claimed by several boxes went to one, each box keeps its
            ``tal_topk2`` best (``None``: no second cut).
        backend: ``"auto"`` (the fastest that can run on the predictions' device), ``"cpp"``,
            ``"reference"``.
        validate: check the values of the targets (ids, box sizes); ``False`` when the caller
            vouches for them (the ``cpp`` op checks them anyway, in the pass that lays them out).
    """

    def __init__(
        self,
        model: Any,
        tal_topk: int = 10,
        tal_topk2: int | None = None,
        backend: str = "auto",
        validate: bool = True,
    ) -> None:
        model = unwrap_model(model)
        self.backend = REGISTRY.check_name(backend)
        if not isinstance(validate, bool):
            raise TypeError(f"validate: expected a bool, got {type(validate).__name__}")
        self.validate = validate
        self._options = DetectionOptions.from_model(model, tal_topk, tal_topk2)  # checks the model
        head = model.model[-1]
        self.hyp = model.args
        self.stride = head.stride
        self.nc = self._options.nc
        self.reg_max = self._options.reg_max
        self.no = self.nc + 4 * self.reg_max
        self.use_dfl = self._options.uses_dfl
        self.loss_names = self._options.item_names
        params = next(iter(model.parameters()), None)
        self.device = params.device if params is not None else torch.device("cpu")
        self.class_weights = _class_weights(model, self.nc, self.device)

    @property
    def options(self) -> DetectionOptions:
        """The options of the next call: the gains re-read from ``hyp`` (the trainer's args)."""
        hyp = self.hyp
        gains = tuple(hyp.get(k) if isinstance(hyp, dict) else getattr(hyp, k) for k in ("box", "cls", "dfl"))
        if gains != self._options.gains():
            o = self._options
            self._options = DetectionOptions(
                nc=o.nc, reg_max=o.reg_max, strides=o.strides, box=gains[0], cls=gains[1], dfl=gains[2],
                topk=o.topk, topk2=o.topk2, alpha=o.alpha, beta=o.beta,
            )  # fmt: skip
        return self._options

    def parse_output(self, preds: Any) -> Any:
        """The training-output dict: ``preds``, or the second item of an ``(inference, dict)`` tuple."""
        return parse_preds(preds)

    def __call__(self, preds: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(loss, loss_items)``: ``loss`` the gained ``[box, cls, dfl]`` times the batch size (the
        trainer sums it), ``loss_items`` those components detached, without the batch-size factor."""
        return self.loss(self.parse_output(preds), batch)

    def loss(self, preds: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """As ``__call__`` for the training-output dict itself."""
        return self._loss(preds, batch, 1.0)

    def _loss(self, preds: Any, batch: dict[str, torch.Tensor], weight: float):
        """``loss``, for a caller that multiplies the loss by ``weight`` before the trainer sums it
        (``E2ELoss``'s branch weights): the backend is told the gradient backward will then bring
        to the components, ``1 * weight * batch size`` in the loss's dtype, computed as autograd
        will compute it."""
        options = self.options
        problem = check_problem(parse_preds(preds), batch, options, validate=False)
        impl = REGISTRY.resolve(self.backend, problem.boxes.device)
        # a backend that checks the targets' values itself (the cpp op) skips the Python pass
        if self.validate and not impl.checks_values(problem.boxes.device):
            check_values(problem, options.nc)
        weights = self.class_weights
        if weights is not None and weights.device != problem.boxes.device:
            weights = weights.to(problem.boxes.device)
        bs = problem.boxes.shape[0]
        dtype = compute_dtype(problem.boxes.dtype)
        expected = float(torch.ones((), dtype=dtype) * weight * bs)
        components = impl.loss(problem, options, weights, expected)
        return components * bs, dict(zip(self.loss_names, components.detach()))


class E2ELoss:
    """``E2ELoss`` of ultralytics 8.4 (YOLO26 and YOLOv10 heads), fused: a one-to-many loss (top-10)
    and a one-to-one loss (top-7, then top-1) on the head's two branches, mixed by a weight that
    decays from 0.8 to 0.1 over the epochs (``update()`` once per epoch, as the trainer calls it);
    the loss items are the one-to-one branch's."""

    def __init__(self, model: Any, backend: str = "auto", validate: bool = True) -> None:
        self.one2many = DetectionLoss(model, tal_topk=10, backend=backend, validate=validate)
        self.one2one = DetectionLoss(model, tal_topk=7, tal_topk2=1, backend=backend, validate=validate)
        self.updates = 0
        self.total = 1.0
        self.o2m = 0.8
        self.o2o = self.total - self.o2m
        self.o2m_copy = self.o2m
        self.final_o2m = 0.1

    def __call__(self, preds: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        preds = parse_preds(preds)
        for key in ("one2many", "one2one"):
            if key not in preds:
                raise KeyError(
                    f"preds: expected an end-to-end head's output with keys 'one2many' and 'one2one', got "
                    f"{sorted(preds)} (a head without one2one branches takes DetectionLoss)"
                )
        loss_o2m, _ = self.one2many._loss(preds["one2many"], batch, self.o2m)
        loss_o2o, items = self.one2one._loss(preds["one2one"], batch, self.o2o)
        return loss_o2m * self.o2m + loss_o2o * self.o2o, items

    def update(self) -> None:
        """One epoch on: the one-to-many weight decays linearly to ``final_o2m`` at the last epoch."""
        self.updates += 1
        self.o2m = self.decay(self.updates)
        self.o2o = max(self.total - self.o2m, 0)

    def decay(self, x: int) -> float:
        epochs = self.one2one.hyp.get("epochs") if isinstance(self.one2one.hyp, dict) else self.one2one.hyp.epochs
        return max(1 - x / max(epochs - 1, 1), 0) * (self.o2m_copy - self.final_o2m) + self.final_o2m
