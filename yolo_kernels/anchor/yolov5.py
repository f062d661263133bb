"""The YOLOv5-style loss (ultralytics/yolov5 ``utils/loss.py::ComputeLoss``, the same in
ultralytics/yolov3 master): a drop-in ``ComputeLoss`` and the module ``YOLOv5Loss``.

    from yolo_kernels.yolov5 import ComputeLoss
    compute_loss = ComputeLoss(model)                 # as in yolov5's train.py
    loss, loss_items = compute_loss(pred, targets)    # ((lbox + lobj + lcls) * bs, [lbox, lobj, lcls])

Both run through the same dispatch and fused ops as the YOLOv3 loss (``family="yolov5"``): the
C++ kernels on the CPU, the Triton kernels on CUDA, the reference anywhere. Semantics and the
deliberate differences from the original: docs/yolov5.md.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn

from ..config import MissingHyperparameterError, check_hyp_keys
from . import reference
from .backends import check_backend_name, run_backend
from .module import AnchoredLoss
from .options import LossOptions

__all__ = [
    "DEFAULT_HYP_V5",
    "HYP_KEYS_V5",
    "YOLOV5_ANCHORS",
    "YOLOV5_STRIDES",
    "default_balance",
    "ComputeLoss",
    "YOLOv5Loss",
]

#: YOLOv5's default anchors (pixels) of the P3, P4, P5 heads, and their strides.
YOLOV5_ANCHORS = ((10, 13, 16, 30, 33, 23), (30, 61, 62, 45, 59, 119), (116, 90, 156, 198, 373, 326))
YOLOV5_STRIDES = (8, 16, 32)

#: The loss hyperparameters of yolov5's ``data/hyps/hyp.scratch-low.yaml`` (the module API's defaults).
DEFAULT_HYP_V5: dict[str, float] = {
    "box": 0.05,
    "cls": 0.5,
    "cls_pw": 1.0,
    "obj": 1.0,
    "obj_pw": 1.0,
    "anchor_t": 4.0,
    "fl_gamma": 0.0,
    "label_smoothing": 0.0,
}
#: The keys the original reads with ``hyp[key]`` (``label_smoothing`` is read with a default of 0).
HYP_KEYS_V5 = ("box", "cls", "cls_pw", "obj", "obj_pw", "anchor_t", "fl_gamma")


def default_balance(nl: int) -> list[float]:
    """The original's per-layer objectness weights: ``[4.0, 1.0, 0.4]`` for 3 layers, else the
    first ``nl`` of ``[4.0, 1.0, 0.25, 0.06, 0.02]`` (P3-P7)."""
    if nl == 3:
        return [4.0, 1.0, 0.4]
    weights = [4.0, 1.0, 0.25, 0.06, 0.02]
    if not 1 <= nl <= len(weights):
        raise ValueError(
            f"nl: the default objectness balance covers 1 to {len(weights)} layers, got {nl}; pass balance=[...]"
        )
    return weights[:nl]


def _stride16_index(strides: Sequence[float], what: str = "strides") -> int:
    """Which layer ``autobalance`` normalises by: the one of stride 16, as the original."""
    if 16.0 not in strides:
        raise ValueError(f"autobalance: normalises by the stride-16 layer, but {what} are {list(strides)}")
    return list(strides).index(16.0)


def _options(hyp: Mapping[str, Any], nc: int, gr: float, sort_obj_iou: bool, box_loss: str) -> LossOptions:
    return LossOptions(
        nc=nc,
        family="yolov5",
        gr=gr,
        box=hyp["box"],
        cls=hyp["cls"],
        cls_pw=hyp["cls_pw"],
        obj=hyp["obj"],
        obj_pw=hyp["obj_pw"],
        anchor_t=hyp["anchor_t"],
        fl_gamma=hyp["fl_gamma"],
        label_smoothing=hyp.get("label_smoothing", 0.0),
        box_loss=box_loss,
        sort_obj_iou=sort_obj_iou,
    )


class YOLOv5Loss(AnchoredLoss):
    """The YOLOv5-style loss as a module that holds its anchors, hyperparameters and balance.

    Args:
        anchors: per layer, ``[na, 2]`` anchor sizes in **pixels**, in the order of ``p``.
        strides: per layer, the stride in pixels (anchors are divided by it).
        num_classes: ``nc``; ``p[i]`` has ``nc + 5`` channels.
        hyp: the loss hyperparameters (keys of ``DEFAULT_HYP_V5``; missing keys take those defaults,
            an unknown key is an error naming it).
        gr: the IoU ratio of the objectness target (mixed in only when < 1, as the original).
        box_loss: ``"ciou"`` (default, the original's), ``"giou"``, ``"diou"`` or ``"iou"``.
        balance: per-layer objectness weights (default: ``default_balance(nl)``).
        autobalance: update ``balance`` after every call as the original's ``autobalance`` does,
            on the device (no host sync), normalised by the weight of the stride-16 layer.
        sort_obj_iou: on a cell with several pairs the highest IoU sets the objectness target.
        backend: ``"auto"``, ``"reference"``, ``"cpp"`` or ``"triton"``.
        validate: check target values (see ``yolo_kernels.anchor.validate``).

    ``forward(p, targets, stats=False)`` returns ``(loss [1], loss_items [3])`` as the original's
    ``__call__``: ``loss = (lbox + lobj + lcls) * batch_size`` and ``loss_items = (lbox, lobj,
    lcls)``, detached; with ``stats=True`` also a ``LossStats`` (``yolo_kernels.stats``).
    """

    def __init__(
        self,
        anchors: Sequence[Any],
        strides: Sequence[float],
        num_classes: int,
        hyp: Mapping[str, Any] | None = None,
        gr: float = 1.0,
        box_loss: str = "ciou",
        balance: Sequence[float] | None = None,
        autobalance: bool = False,
        sort_obj_iou: bool = False,
        backend: str = "auto",
        validate: bool = True,
    ):
        super().__init__()
        self._set_anchors(anchors, strides)
        if hyp is not None and not isinstance(hyp, Mapping):
            raise TypeError(f"hyp: expected a dict of hyperparameters, got {type(hyp).__name__}")
        check_hyp_keys(hyp or {}, DEFAULT_HYP_V5)
        self.hyp = {**DEFAULT_HYP_V5, **(hyp or {})}
        self.box_loss = box_loss
        self.backend = check_backend_name(backend)
        self.validate = validate
        self.autobalance = bool(autobalance)
        self._gr, self._sort_obj_iou = float(gr), bool(sort_obj_iou)
        self.options = _options(self.hyp, num_classes, self._gr, self._sort_obj_iou, box_loss)  # validates
        weights = self._checked_balance(default_balance(self.nl) if balance is None else balance)
        self.register_buffer("balance_weights", torch.tensor(weights, dtype=torch.float64), persistent=False)
        self.ssi = _stride16_index(self.strides) if self.autobalance else 0

    def _checked_balance(self, weights: Sequence[float]) -> list[float]:
        weights = [float(w) for w in weights]
        if len(weights) != self.nl:
            raise ValueError(f"balance: expected {self.nl} weights (one per layer), got {len(weights)}")
        return weights

    @property
    def gr(self) -> float:
        return self._gr

    @gr.setter
    def gr(self, value: float) -> None:
        self.options = _options(self.hyp, self.nc, value, self._sort_obj_iou, self.box_loss)
        self._gr = float(value)

    @property
    def sort_obj_iou(self) -> bool:
        return self._sort_obj_iou

    @sort_obj_iou.setter
    def sort_obj_iou(self, value: bool) -> None:
        self.options = _options(self.hyp, self.nc, self._gr, value, self.box_loss)
        self._sort_obj_iou = bool(value)

    @property
    def balance(self) -> list[float]:
        """The per-layer objectness weights (reading them waits for the device)."""
        return self.balance_weights.tolist()

    @balance.setter
    def balance(self, weights: Sequence[float]) -> None:
        w = self.balance_weights
        self.balance_weights = torch.tensor(self._checked_balance(weights), dtype=w.dtype, device=w.device)

    @property
    def cp(self) -> float:
        """The positive class target after label smoothing (the original's ``cp``)."""
        return self.options.smooth_targets[0]

    @property
    def cn(self) -> float:
        """The negative class target after label smoothing (the original's ``cn``)."""
        return self.options.smooth_targets[1]

    def build_targets(self, p: Sequence[torch.Tensor], targets: torch.Tensor):
        """The original's ``build_targets``: ``(tcls, tbox, indices, anch)`` per layer, with
        ``indices[i] = (b, a, gj, gi)``, in the original's pair order (reference.match_yolov5)."""
        tcls, tbox, indices, anch = [], [], [], []
        for pi, anchor_vec in zip(p, self.anchor_vecs):
            dtype = reference.compute_dtype(pi.dtype)
            m = reference.match_yolov5(tuple(pi.shape[2:4]), targets, anchor_vec, self.options.anchor_t, dtype)
            tcls.append(m.tcls)
            tbox.append(m.tbox)
            indices.append((m.b, m.a, m.gj, m.gi))
            anch.append(m.anch)
        return tcls, tbox, indices, anch

    def forward(self, p: Sequence[torch.Tensor], targets: torch.Tensor, stats: bool = False):
        device = p[0].device if isinstance(p, (list, tuple)) and p and isinstance(p[0], torch.Tensor) else None
        if device is not None and self.balance_weights.device != device:
            self.balance_weights = self.balance_weights.to(device)
        loss, items, layer_obj, loss_stats = run_backend(
            p,
            targets,
            self.anchor_vecs,
            self.options,
            self.backend,
            self.validate,
            self.balance_weights,
            stats,
            self.grid_strides,
        )
        if self.autobalance:  # the original's update, on the device: no .item()
            w = self.balance_weights * 0.9999 + 0.0001 / layer_obj.to(self.balance_weights.dtype)
            self.balance_weights = w / w[self.ssi]
        return (loss, items[:3], loss_stats) if stats else (loss, items[:3])

    def extra_repr(self) -> str:
        o = self.options
        return (
            f"nl={self.nl}, nc={o.nc}, strides={self.strides}, box_loss={o.box_loss!r}, gr={self._gr}, "
            f"sort_obj_iou={self._sort_obj_iou}, autobalance={self.autobalance}, backend={self.backend!r}"
        )


def _unwrap(model: Any) -> Any:
    """``de_parallel``: the model inside DataParallel / DistributedDataParallel."""
    while isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)) or (
        not hasattr(model, "model") and hasattr(model, "module")
    ):
        model = model.module
    return model


class ComputeLoss:
    """Drop-in for ultralytics/yolov5's ``ComputeLoss(model, autobalance=False)``.

    Reads ``model.hyp`` from the object passed (in yolov5's ``train.py`` a DataParallel wrapper
    carries it) and the Detect module ``de_parallel(model).model[-1]`` (``na``, ``nc``, ``nl``,
    ``anchors`` in grid units, ``stride``). ``gr`` (default 1.0) and ``sort_obj_iou`` (default
    False, a class attribute) are attributes of the loss object, as in the original (which ignores
    ``model.gr``). Like the original, every call reads ``box``, ``obj``, ``cls`` and ``anchor_t``
    from ``hyp`` (the model's dict) and ``gr`` and ``sort_obj_iou``; the other keys are read once.
    ``backend`` picks the implementation (``"auto"``: Triton on CUDA, C++ on the CPU).

    ``compute_loss(p, targets)`` returns ``((lbox + lobj + lcls) * bs, (lbox, lobj, lcls))``.
    """

    #: A class attribute, as in the original (``ComputeLoss.sort_obj_iou = True`` sets it for every
    #: instance that has not set its own); read on every call.
    sort_obj_iou = False

    def __init__(self, model: Any, autobalance: bool = False, backend: str = "auto"):
        if not hasattr(model, "hyp"):
            raise TypeError(f"model: expected a 'hyp' attribute (set model.hyp as train.py does), got {type(model)}")
        hyp = model.hyp
        _check_hyp(hyp)
        inner = _unwrap(model)
        if not hasattr(inner, "model") or not len(inner.model):
            raise TypeError(f"model: expected a YOLOv5 model whose .model[-1] is the Detect module, got {type(inner)}")
        m = inner.model[-1]
        for attr in ("na", "nc", "nl", "anchors", "stride"):
            if not hasattr(m, attr):
                raise TypeError(f"model.model[-1]: expected a Detect module with '{attr}', got {type(m).__name__}")
        anchors = m.anchors.detach()
        if anchors.dim() != 3 or anchors.shape[0] != m.nl or anchors.shape[1] != m.na or anchors.shape[2] != 2:
            raise ValueError(
                f"model.model[-1].anchors: expected shape [nl={m.nl}, na={m.na}, 2], got {tuple(anchors.shape)}"
            )
        strides = [float(s) for s in torch.as_tensor(m.stride).flatten().tolist()]
        self.hyp = hyp  # the model's own dict, read on every call as the original does
        self.gr = 1.0
        self.na, self.nc, self.nl = int(m.na), int(m.nc), int(m.nl)
        self.anchors = anchors
        self.autobalance = autobalance
        self.device = next(iter(model.parameters())).device if hasattr(model, "parameters") else anchors.device
        # the Detect anchors are already in grid units: the loss module keeps them as they are
        self.loss = YOLOv5Loss(
            list(anchors.cpu()),
            [1.0] * self.nl,
            self.nc,
            hyp={
                **DEFAULT_HYP_V5,
                **{k: hyp[k] for k in HYP_KEYS_V5},
                "label_smoothing": hyp.get("label_smoothing", 0),
            },
            backend=backend,
        ).to(self.device)
        self.loss.grid_strides = strides  # the grids are checked against the model's strides
        if autobalance:  # the loss holds grid-unit anchors (strides 1): the model's strides pick the layer
            self.loss.autobalance, self.loss.ssi = True, _stride16_index(strides, "model strides")
        self.ssi = self.loss.ssi
        self._read: tuple | None = None  # what the loss's options were last built from

    balance = property(lambda self: self.loss.balance, lambda self, v: setattr(self.loss, "balance", v))
    cp = property(lambda self: self.loss.cp)
    cn = property(lambda self: self.loss.cn)

    def build_targets(self, p: Sequence[torch.Tensor], targets: torch.Tensor):
        """The original's ``build_targets(p, targets)``: ``(tcls, tbox, indices, anch)``."""
        return self.loss.build_targets(p, targets)

    def _sync_options(self) -> None:
        """Read what the original reads on every call: the gains ``box``, ``obj``, ``cls`` and
        ``anchor_t`` from ``self.hyp`` (the model's dict: a change between calls takes effect), and
        the attributes ``gr`` and ``sort_obj_iou``. ``cls_pw``, ``obj_pw``, ``fl_gamma`` and
        ``label_smoothing`` stay as at construction, where the original builds its BCE objects."""
        hyp = self.hyp
        if not isinstance(hyp, Mapping) or any(key not in hyp for key in _PER_CALL_KEYS):
            _check_hyp(hyp, "compute_loss.hyp")
        read = (*(hyp[key] for key in _PER_CALL_KEYS), self.gr, self.sort_obj_iou)
        if read == self._read:
            return
        loss = self.loss
        loss.hyp.update({key: hyp[key] for key in _PER_CALL_KEYS})
        loss._gr, loss._sort_obj_iou = float(self.gr), bool(self.sort_obj_iou)
        loss.options = _options(loss.hyp, loss.nc, loss._gr, loss._sort_obj_iou, loss.box_loss)  # validates
        self._read = read

    def __call__(self, p: Sequence[torch.Tensor], targets: torch.Tensor, stats: bool = False):
        """``(loss, loss_items)``; with ``stats=True`` also a ``LossStats`` (``yolo_kernels.stats``)."""
        self._sync_options()
        return self.loss(p, targets, stats=stats)


#: The hyperparameters the original reads on every call (the others build its BCE objects once).
_PER_CALL_KEYS = ("box", "obj", "cls", "anchor_t")


def _check_hyp(hyp: Any, name: str = "model.hyp") -> None:
    if not isinstance(hyp, Mapping):
        raise TypeError(f"{name}: expected a dict of hyperparameters, got {type(hyp).__name__}")
    missing = [key for key in HYP_KEYS_V5 if key not in hyp]
    if missing:
        raise MissingHyperparameterError(
            f"{name}: missing loss hyperparameter(s) {missing}; the loss reads {list(HYP_KEYS_V5)} "
            f"(and label_smoothing, default 0), got keys {sorted(map(str, hyp))}"
        )
