"""The anchor-free family's input checks (the bad-input policy of docs/semantics.md).

Structure (types, ranks, sizes, dtypes, devices) is always checked; values (image and class ids,
box sizes) on CPU in Python with the first bad row named, elsewhere as device-side asserts (no host
synchronisation), and not at all with ``validate=False``, except by the ``cpp`` backend's
``pad_targets`` op, which checks them with the same messages in the pass that lays them out.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np
import torch

from ..validate import MAX_BOX_SIZE, first_bad_row
from .options import DetectionOptions

__all__ = ["Problem", "check_problem", "check_values", "parse_preds"]

SIZE_MESSAGE = (
    f"batch['bboxes'][:, 2:4] (box w, h): expected finite sizes in [0, {MAX_BOX_SIZE:g}] as fractions of the "
    "image (normalised xywh; boxes in pixels?)"
)


class Problem(NamedTuple):
    """One checked loss call: the head's outputs and the targets as flat tensors."""

    boxes: torch.Tensor  # [bs, 4 * reg_max, A]
    scores: torch.Tensor  # [bs, nc, A]
    grids: tuple[tuple[int, int], ...]  # (ny, nx) per level
    batch_idx: torch.Tensor  # [n]
    cls: torch.Tensor  # [n]
    bboxes: torch.Tensor  # [n, 4] normalised xywh


def parse_preds(preds: Any, name: str = "preds") -> Mapping[str, Any]:
    """The training-output dict of a Detect head: ``preds`` itself, or the second item of the
    ``(inference, dict)`` tuple a head returns in eval mode."""
    if isinstance(preds, tuple) and len(preds) == 2 and isinstance(preds[1], Mapping):
        preds = preds[1]
    if not isinstance(preds, Mapping):
        raise TypeError(
            f"{name}: expected the Detect head's training output, a dict with 'boxes', 'scores', 'feats' "
            f"(or a tuple whose second item is that dict), got {type(preds).__name__}"
        )
    return preds


def _tensor(name: str, value: Any) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    return value


def _grids(feats: Any, name: str) -> tuple[tuple[int, int], ...]:
    if isinstance(feats, torch.Tensor) or not isinstance(feats, (list, tuple)) or not feats:
        raise TypeError(f"{name}: expected a non-empty list of per-level feature maps [bs, c, ny, nx]")
    grids = []
    for i, f in enumerate(feats):
        f = _tensor(f"{name}[{i}]", f)
        if f.dim() != 4 or f.shape[2] < 1 or f.shape[3] < 1:
            raise ValueError(f"{name}[{i}]: expected a feature map [bs, c, ny, nx], got shape {tuple(f.shape)}")
        grids.append((int(f.shape[2]), int(f.shape[3])))
    return tuple(grids)


def _check_values_cpu(batch_idx: torch.Tensor, cls: torch.Tensor, bboxes: torch.Tensor, bs: int, nc: int) -> None:
    b = batch_idx.detach().to(torch.float64).numpy()
    c = cls.detach().to(torch.float64).numpy()
    t = bboxes.detach().to(torch.float64).numpy()
    with np.errstate(invalid="ignore"):
        first_bad_row(
            ~((b >= 0) & (b < bs) & (b == np.trunc(b))), b, f"batch['batch_idx']: expected integers in [0, {bs})"
        )
        first_bad_row(~((c >= 0) & (c < nc) & (c == np.trunc(c))), c, f"batch['cls']: expected integers in [0, {nc})")
        xy, wh = t[:, :2], t[:, 2:]
        first_bad_row(~np.isfinite(xy).all(1), xy, "batch['bboxes'][:, 0:2] (box centre x, y): expected finite values")
        first_bad_row(~(np.isfinite(wh) & (wh >= 0) & (wh <= MAX_BOX_SIZE)).all(1), wh, SIZE_MESSAGE)


def _check_values_async(batch_idx: torch.Tensor, cls: torch.Tensor, bboxes: torch.Tensor, bs: int, nc: int) -> None:
    b, c, xy, wh = batch_idx.float(), cls.float(), bboxes[:, :2], bboxes[:, 2:]
    checks = [
        (((b >= 0) & (b < bs) & (b == b.trunc())).all(), f"batch['batch_idx']: expected integers in [0, {bs})"),
        (((c >= 0) & (c < nc) & (c == c.trunc())).all(), f"batch['cls']: expected integers in [0, {nc})"),
        (torch.isfinite(xy).all(), "batch['bboxes'][:, 0:2] (box centre x, y): expected finite values"),
        ((torch.isfinite(wh) & (wh >= 0) & (wh <= MAX_BOX_SIZE)).all(), SIZE_MESSAGE),
    ]
    for ok, message in checks:
        torch._assert_async(ok, f"{message} (device-side check)")


def check_problem(
    preds: Mapping[str, Any], batch: Any, options: DetectionOptions, validate: bool = True, name: str = "preds"
) -> Problem:
    """Check one call's predictions and batch against ``options``; raise ``TypeError``/``ValueError``
    naming the argument, the expected and the actual; return them as a ``Problem``."""
    for key in ("boxes", "scores", "feats"):
        if key not in preds:
            raise KeyError(f"{name}: expected the key {key!r} (keys 'boxes', 'scores', 'feats'), got {sorted(preds)}")
    boxes = _tensor(f"{name}['boxes']", preds["boxes"])
    scores = _tensor(f"{name}['scores']", preds["scores"])
    grids = _grids(preds["feats"], f"{name}['feats']")
    if len(grids) != len(options.strides):
        raise ValueError(
            f"{name}['feats']: expected {len(options.strides)} levels (the head's strides "
            f"{list(options.strides)}), got {len(grids)}"
        )
    for key, t in (("boxes", boxes), ("scores", scores)):
        if not t.is_floating_point():
            raise TypeError(f"{name}[{key!r}]: expected a floating-point tensor, got {t.dtype}")
    a = sum(ny * nx for ny, nx in grids)
    if boxes.dim() != 3 or boxes.shape[1] != 4 * options.reg_max or boxes.shape[2] != a:
        raise ValueError(
            f"{name}['boxes']: expected shape [bs, 4 * reg_max = {4 * options.reg_max}, anchors = {a}], "
            f"got {tuple(boxes.shape)}"
        )
    if scores.dim() != 3 or scores.shape[1] != options.nc or scores.shape[2] != a:
        raise ValueError(
            f"{name}['scores']: expected shape [bs, nc = {options.nc}, anchors = {a}], got {tuple(scores.shape)}"
        )
    bs = boxes.shape[0]
    if bs < 1 or scores.shape[0] != bs:
        raise ValueError(f"{name}['scores']: expected batch size {bs} (as 'boxes', at least 1), got {scores.shape[0]}")
    if scores.device != boxes.device:
        raise ValueError(f"{name}['scores']: expected device {boxes.device} (as 'boxes'), got {scores.device}")
    if scores.dtype != boxes.dtype:
        raise TypeError(f"{name}['scores']: expected dtype {boxes.dtype} (as 'boxes'), got {scores.dtype}")

    if not isinstance(batch, Mapping):
        raise TypeError(f"batch: expected a dict with 'batch_idx', 'cls', 'bboxes', got {type(batch).__name__}")
    for key in ("batch_idx", "cls", "bboxes"):
        if key not in batch:
            raise KeyError(f"batch: expected the key {key!r} (keys 'batch_idx', 'cls', 'bboxes'), got {sorted(batch)}")
    batch_idx = _tensor("batch['batch_idx']", batch["batch_idx"]).reshape(-1)
    cls = _tensor("batch['cls']", batch["cls"]).reshape(-1)
    bboxes = _tensor("batch['bboxes']", batch["bboxes"])
    n = batch_idx.shape[0]
    if bboxes.dim() != 2 or bboxes.shape != (n, 4):
        raise ValueError(
            f"batch['bboxes']: expected shape [n, 4] (normalised x, y, w, h), n = {n} as batch['batch_idx'], "
            f"got {tuple(bboxes.shape)}"
        )
    if cls.shape[0] != n:
        raise ValueError(f"batch['cls']: expected {n} values (as batch['batch_idx']), got {cls.shape[0]}")
    if not bboxes.is_floating_point():
        raise TypeError(f"batch['bboxes']: expected a floating-point tensor, got {bboxes.dtype}")
    # the trainer's batch may still be on the CPU while the model runs elsewhere (the original moves it too)
    batch_idx, cls, bboxes = (t.to(boxes.device) for t in (batch_idx, cls, bboxes))
    problem = Problem(boxes, scores, grids, batch_idx, cls, bboxes)
    if validate:
        check_values(problem, options.nc)
    return problem


def check_values(problem: Problem, nc: int) -> None:
    """The targets' values (image and class ids integers in range, box centres finite, sizes in
    ``[0, MAX_BOX_SIZE]``): on the CPU in eager mode each check's first bad row named (``ValueError``),
    elsewhere device-side asserts (no host synchronisation)."""
    if problem.batch_idx.shape[0] == 0:
        return
    eager_cpu = problem.boxes.device.type == "cpu" and not torch.compiler.is_compiling()
    check = _check_values_cpu if eager_cpu else _check_values_async
    check(problem.batch_idx, problem.cls, problem.bboxes, problem.boxes.shape[0], nc)
