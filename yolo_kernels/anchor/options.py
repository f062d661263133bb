"""The anchor-based families' options (``LossOptions``) and the reading of an ultralytics-style
``model`` (docs/semantics.md, "What the drop-in reads from model").

One home for the YOLOv3 hyperparameter defaults and for the duck-typed model attributes, shared by
the reference, the public API and every backend of the two anchor-based families.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..config import (
    MissingHyperparameterError,
    check_hyp_keys,
    finite_number,
    is_bool,
    is_real_number,
    unwrap_model,
)

__all__ = [
    "DEFAULT_HYP",
    "BOX_LOSSES",
    "REDUCTIONS",
    "FAMILIES",
    "LossOptions",
    "as_anchor_list",
    "model_anchors",
    "model_options",
    "model_strides",
]

#: Defaults of the original ``train.py`` (``cls`` is *not* scaled by nc/80: that is the caller's job).
DEFAULT_HYP: dict[str, float] = {
    "giou": 3.54,
    "cls": 37.4,
    "cls_pw": 1.0,
    "obj": 64.3,
    "obj_pw": 1.0,
    "iou_t": 0.20,
    "fl_gamma": 0.0,
}


BOX_LOSSES = ("giou", "iou", "diou", "ciou")
REDUCTIONS = ("mean", "sum")
#: The loss families: the archive YOLOv3 loss, and the YOLOv5-style ``ComputeLoss`` (docs/yolov5.md).
FAMILIES = ("yolov3", "yolov5")


@dataclasses.dataclass(frozen=True)
class LossOptions:
    """Every scalar the loss depends on, validated once.

    ``box``/``cls``/``obj`` are the gains of the three terms (``box`` is read from the YOLOv3
    hyperparameter ``giou`` and the YOLOv5 one ``box``), ``cls_pw``/``obj_pw`` the BCE
    ``pos_weight``s, ``iou_t`` the anchor-matching threshold, ``fl_gamma`` the focal gamma
    (0 disables it), ``gr`` the objectness target's IoU ratio, ``nc`` the number of classes,
    ``box_loss`` one of ``BOX_LOSSES``, ``reduction`` one of ``REDUCTIONS`` and
    ``label_smoothing`` the ε of ``smooth_BCE``.

    ``family`` picks the loss: ``"yolov3"`` (matching by wh-IoU > ``iou_t``, one cell per pair) or
    ``"yolov5"`` (matching by the wh ratio < ``anchor_t`` plus up to two neighbour cells, the
    ``2 sigmoid - 0.5`` / ``(2 sigmoid)^2`` box, ``gr`` mixed in only when < 1, per-layer
    objectness ``balance``, the loss times the batch size; ``reduction`` must be ``"mean"``).
    ``sort_obj_iou``: on a cell with several pairs the highest IoU sets the objectness target
    (else the last pair in pair order).
    """

    nc: int
    gr: float = 1.0
    box: float = DEFAULT_HYP["giou"]
    cls: float = DEFAULT_HYP["cls"]
    cls_pw: float = DEFAULT_HYP["cls_pw"]
    obj: float = DEFAULT_HYP["obj"]
    obj_pw: float = DEFAULT_HYP["obj_pw"]
    iou_t: float = DEFAULT_HYP["iou_t"]
    fl_gamma: float = DEFAULT_HYP["fl_gamma"]
    box_loss: str = "giou"
    reduction: str = "mean"
    label_smoothing: float = 0.0
    family: str = "yolov3"
    anchor_t: float = 4.0
    sort_obj_iou: bool = False

    def __post_init__(self) -> None:
        nc = self.nc
        if isinstance(nc, torch.Tensor) and nc.numel() == 1:
            nc = nc.item()
        if not is_real_number(nc) or not float(nc).is_integer():
            raise TypeError(f"nc: expected an integer number of classes, got {type(nc).__name__} ({nc!r})")
        if int(nc) < 1:
            raise ValueError(f"nc: expected at least 1 class, got {int(nc)}")
        object.__setattr__(self, "nc", int(nc))
        for field in (
            "gr",
            "box",
            "cls",
            "cls_pw",
            "obj",
            "obj_pw",
            "iou_t",
            "fl_gamma",
            "label_smoothing",
            "anchor_t",
        ):
            object.__setattr__(self, field, finite_number(field, getattr(self, field)))
        if self.cls_pw <= 0 or self.obj_pw <= 0:
            raise ValueError(f"cls_pw/obj_pw: expected positive pos_weights, got {self.cls_pw}, {self.obj_pw}")
        if self.fl_gamma < 0:
            raise ValueError(f"fl_gamma: expected >= 0, got {self.fl_gamma}")
        if not 0.0 <= self.label_smoothing <= 1.0:
            raise ValueError(f"label_smoothing: expected a value in [0, 1], got {self.label_smoothing}")
        if self.box_loss not in BOX_LOSSES:
            raise ValueError(f"box_loss: expected one of {BOX_LOSSES}, got {self.box_loss!r}")
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"reduction: expected one of {REDUCTIONS}, got {self.reduction!r}")
        if self.family not in FAMILIES:
            raise ValueError(f"family: expected one of {FAMILIES}, got {self.family!r}")
        if self.family == "yolov5" and self.reduction != "mean":
            raise ValueError(f"reduction: the yolov5 loss has only 'mean', got {self.reduction!r}")
        if self.anchor_t <= 0:
            raise ValueError(f"anchor_t: expected a positive wh-ratio threshold, got {self.anchor_t}")
        if not is_bool(self.sort_obj_iou):
            raise TypeError(f"sort_obj_iou: expected a bool, got {type(self.sort_obj_iou).__name__}")
        object.__setattr__(self, "sort_obj_iou", bool(self.sort_obj_iou))

    @property
    def match_threshold(self) -> float:
        """The matching threshold of the family: ``iou_t`` (yolov3) or ``anchor_t`` (yolov5)."""
        return self.anchor_t if self.family == "yolov5" else self.iou_t

    @property
    def objectness_gr(self) -> float:
        """The IoU ratio mixed into the objectness target: ``gr``, except that the yolov5 loss mixes
        only when ``gr < 1`` (``gr >= 1`` there means the plain clamped IoU, i.e. ``gr = 1``)."""
        return min(self.gr, 1.0) if self.family == "yolov5" else self.gr

    @classmethod
    def from_hyp(
        cls,
        hyp: Mapping[str, Any] | None,
        *,
        nc: int,
        gr: float = 1.0,
        strict: bool = False,
        extra_keys: bool = True,
        name: str = "hyp",
        **options: Any,
    ) -> LossOptions:
        """Options from an ultralytics ``hyp`` dict. Missing keys take ``DEFAULT_HYP``, or with
        ``strict`` raise a ``KeyError`` naming them (``name`` is the argument's name in that
        message). Other keys are ignored (a model's ``hyp`` also holds the training keys), or
        without ``extra_keys`` raise a ``ValueError`` naming them (a misspelt key would otherwise
        leave its hyperparameter at the default)."""
        if hyp is None:
            hyp = {}
        if not isinstance(hyp, Mapping):
            raise TypeError(f"{name}: expected a dict of hyperparameters, got {type(hyp).__name__}")
        if not extra_keys:
            check_hyp_keys(hyp, DEFAULT_HYP, name)
        missing = [key for key in DEFAULT_HYP if key not in hyp]
        if strict and missing:
            raise MissingHyperparameterError(
                f"{name}: missing loss hyperparameter(s) {missing}; the loss reads {list(DEFAULT_HYP)}, "
                f"got keys {sorted(map(str, hyp))}"
            )
        values = {key: hyp.get(key, default) for key, default in DEFAULT_HYP.items()}
        # the archive's name of the box gain, read here and nowhere else (an error names the key)
        box = finite_number("giou", values.pop("giou"))
        return cls(nc=nc, gr=gr, box=box, **values, **options)

    def as_hyp(self) -> dict[str, float]:
        """The YOLOv3 ``hyp`` dict of these options (the inverse of ``from_hyp``'s reading)."""
        return {key: self.box if key == "giou" else getattr(self, key) for key in DEFAULT_HYP}

    @property
    def smooth_targets(self) -> tuple[float, float]:
        """``(cp, cn)``: the positive and negative class targets after label smoothing."""
        return 1.0 - 0.5 * self.label_smoothing, 0.5 * self.label_smoothing


def model_anchors(model: Any) -> list[torch.Tensor]:
    """``model.module_list[j].anchor_vec`` for each ``j`` in ``model.yolo_layers`` (grid units, ``[na, 2]``)."""
    model = unwrap_model(model)
    for attr in ("yolo_layers", "module_list"):
        if not hasattr(model, attr):
            raise TypeError(f"model: expected a YOLO model with a '{attr}' attribute, got {type(model).__name__}")
    anchors = []
    for j in model.yolo_layers:
        layer = model.module_list[j]
        if not hasattr(layer, "anchor_vec"):
            raise TypeError(
                f"model: module_list[{j}] (listed in yolo_layers) has no 'anchor_vec'; got {type(layer).__name__}"
            )
        anchors.append(layer.anchor_vec)
    return anchors


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


def model_options(model: Any, **options: Any) -> LossOptions:
    """``LossOptions`` from ``model.hyp``, ``model.gr`` and ``model.nc`` plus keyword overrides.
    Like the original, every hyperparameter must be there: nothing is defaulted. Built once per
    distinct set of plain values (checking them is a third of the Python time of a loss call on
    a GPU, and they rarely change between steps); a changed value makes a new one."""
    model = unwrap_model(model)
    for attr in ("hyp", "nc", "gr"):
        if not hasattr(model, attr):
            raise TypeError(f"model: expected a '{attr}' attribute (set model.{attr} before computing the loss)")
    key = _options_key(model.hyp, model.nc, model.gr, options)
    cached = _OPTIONS_CACHE.get(key) if key is not None else None
    if cached is not None:
        return cached
    result = LossOptions.from_hyp(model.hyp, nc=model.nc, gr=model.gr, strict=True, name="model.hyp", **options)
    if key is not None:
        if len(_OPTIONS_CACHE) >= 64:
            _OPTIONS_CACHE.clear()
        _OPTIONS_CACHE[key] = result
    return result


_OPTIONS_CACHE: dict[tuple, LossOptions] = {}
#: Values a cache key may hold: immutable and compared by value (a tensor or array is neither).
_PLAIN_TYPES = (int, float, bool, str, type(None))


def _options_key(hyp: Any, nc: Any, gr: Any, options: dict) -> tuple | None:
    """The cache key of ``model_options``, or ``None`` when a value is not a plain Python value."""
    if type(hyp) is not dict:
        return None
    extra = sorted(options.items())
    plain = [hyp.get(key) for key in DEFAULT_HYP] + [nc, gr] + [value for _, value in extra]
    if not all(type(v) in _PLAIN_TYPES for v in plain):
        return None
    # the types too: 1 and 1.0 and True are equal keys, but not the same hyperparameter
    present = tuple(key in hyp for key in DEFAULT_HYP)
    return present, tuple((type(v), v) for v in plain), tuple(name for name, _ in extra)


def as_anchor_list(anchors: Sequence[Any], name: str = "anchors") -> list[torch.Tensor]:
    """Per-layer anchors as float tensors of shape ``[na, 2]``."""
    if isinstance(anchors, torch.Tensor) and anchors.dim() == 3:
        anchors = list(anchors)
    if not isinstance(anchors, (list, tuple)) or len(anchors) == 0:
        raise TypeError(f"{name}: expected a non-empty list of per-layer [na, 2] anchors, got {type(anchors).__name__}")
    out = []
    for i, a in enumerate(anchors):
        t = torch.as_tensor(a, dtype=torch.float32) if not isinstance(a, torch.Tensor) else a
        if t.dim() == 1 and t.numel() % 2 == 0:
            t = t.reshape(-1, 2)
        if t.dim() != 2 or t.shape[1] != 2 or t.shape[0] == 0:
            raise ValueError(f"{name}[{i}]: expected shape [na, 2] with na >= 1, got {tuple(t.shape)}")
        out.append(t)
    return out
