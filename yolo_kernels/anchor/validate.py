"""The anchor-based families' input checks (docs/semantics.md, "Bad input"), shared by every backend.

Structural checks (types, ranks, sizes, dtypes, devices) read only tensor metadata and always run.
Data checks (image and class ids, box sizes, anchors) look at values:

* on CPU tensors they run in Python and raise ``ValueError`` naming the first bad row and value;
* on other devices, and inside ``torch.compile``, they are device-side asserts
  (``torch._assert_async``): no host synchronisation and no graph break; a bad value makes a
  later synchronising call fail with a ``RuntimeError`` carrying the same message (on CUDA the
  context is then unusable, as after any device assert);
* ``validate=False`` skips the data checks (the caller vouches for the data).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..validate import MAX_BOX_SIZE, first_bad_row
from .options import LossOptions

__all__ = ["check_inputs", "check_grids", "BOX_SIZE_MESSAGE"]

BOX_SIZE_MESSAGE = (
    f"targets[:, 4:6] (box w, h): expected finite sizes in [0, {MAX_BOX_SIZE:g}] as fractions of the "
    "image (normalised; boxes in pixels?)"
)


def _check_layer(i: int, pi: Any, first: torch.Tensor | None, na: int, options: LossOptions) -> None:
    name = f"p[{i}]"
    if not isinstance(pi, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(pi).__name__}")
    if not pi.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor (float16/bfloat16/float32/float64), got {pi.dtype}")
    if pi.dim() != 5:
        raise ValueError(f"{name}: expected a 5-D tensor [bs, na, ny, nx, nc + 5], got shape {tuple(pi.shape)}")
    if pi.shape[4] != options.nc + 5:
        raise ValueError(
            f"{name}: expected last dim nc + 5 = {options.nc + 5} (nc = {options.nc}), got {pi.shape[4]} "
            f"(shape {tuple(pi.shape)})"
        )
    if pi.shape[1] != na:
        raise ValueError(f"{name}: expected dim 1 = {na} anchors (anchors[{i}] has {na}), got {pi.shape[1]}")
    if pi.shape[0] < 1 or pi.shape[2] < 1 or pi.shape[3] < 1:
        raise ValueError(f"{name}: expected a non-empty batch and grid, got shape {tuple(pi.shape)}")
    if first is not None:
        if pi.shape[0] != first.shape[0]:
            raise ValueError(f"{name}: expected batch size {first.shape[0]} (as p[0]), got {pi.shape[0]}")
        if pi.device != first.device:
            raise ValueError(f"{name}: expected device {first.device} (as p[0]), got {pi.device}")
        if pi.dtype != first.dtype:
            raise TypeError(f"{name}: expected dtype {first.dtype} (as p[0]), got {pi.dtype}")


def _check_values_cpu(targets: torch.Tensor, anchors: Sequence[torch.Tensor], bs: int, nc: int) -> None:
    # numpy on the CPU copy: microseconds, where a dozen tiny torch ops cost half a millisecond
    t = targets.to(torch.float64).numpy()
    b, c, xy, wh = t[:, 0], t[:, 1], t[:, 2:4], t[:, 4:6]
    ok = True
    if len(t):  # column minima and maxima (NaN and inf propagate into them) cover all but integrality
        # on the columns as rows: numpy reduces a [nt, 6] array along axis 0 ten times slower
        cols = np.ascontiguousarray(t.T)
        lo, hi = cols.min(1), cols.max(1)
        ok = bool(np.isfinite(lo).all() and np.isfinite(hi).all() and lo[0] >= 0 and hi[0] < bs and lo[1] >= 0)
        ok = ok and bool(hi[1] < nc and min(lo[4], lo[5]) >= 0 and max(hi[4], hi[5]) <= MAX_BOX_SIZE)
        ok = ok and bool((cols[:2] == np.trunc(cols[:2])).all())
    sizes = torch.cat([a.reshape(-1) for a in anchors])
    ok = ok and bool(((sizes > 0) & torch.isfinite(sizes)).all())
    if ok:  # the common case in a few vector operations; the details below only on failure
        return
    with np.errstate(invalid="ignore"):
        first_bad_row(
            ~((b >= 0) & (b < bs) & (b == np.trunc(b))),
            b,
            f"targets[:, 0] (image index): expected integers in [0, {bs})",
        )
        first_bad_row(
            ~((c >= 0) & (c < nc) & (c == np.trunc(c))), c, f"targets[:, 1] (class): expected integers in [0, {nc})"
        )
        first_bad_row(~np.isfinite(xy).all(1), xy, "targets[:, 2:4] (box centre x, y): expected finite values")
        first_bad_row(~(np.isfinite(wh) & (wh >= 0) & (wh <= MAX_BOX_SIZE)).all(1), wh, BOX_SIZE_MESSAGE)
        for i, a in enumerate(anchors):
            a = a.to(torch.float64).numpy()
            first_bad_row(~(np.isfinite(a) & (a > 0)).all(1), a, f"anchors[{i}]: expected finite sizes > 0")


def _check_values_async(targets: torch.Tensor, anchors: Sequence[torch.Tensor], bs: int, nc: int) -> None:
    # device-side asserts: no host synchronisation; the offending row is not known here
    b, c, xy, wh = targets[:, 0], targets[:, 1], targets[:, 2:4], targets[:, 4:6]
    checks = [
        (
            ((b >= 0) & (b < bs) & (b == b.trunc())).all(),
            f"targets[:, 0] (image index): expected integers in [0, {bs})",
        ),
        (((c >= 0) & (c < nc) & (c == c.trunc())).all(), f"targets[:, 1] (class): expected integers in [0, {nc})"),
        (torch.isfinite(xy).all(), "targets[:, 2:4] (box centre x, y): expected finite values"),
        ((torch.isfinite(wh) & (wh >= 0) & (wh <= MAX_BOX_SIZE)).all(), BOX_SIZE_MESSAGE),
    ]
    checks += [
        ((torch.isfinite(a) & (a > 0)).all(), f"anchors[{i}]: expected finite sizes > 0") for i, a in enumerate(anchors)
    ]
    for ok, message in checks:
        torch._assert_async(ok, f"{message} (device-side check)")


def _is_eval_output(p: Any) -> bool:
    """``p`` looks like the output of a model in eval mode: ``(decoded boxes [bs, N, no], [layers])``."""
    return (
        isinstance(p, (list, tuple))
        and len(p) == 2
        and isinstance(p[0], torch.Tensor)
        and p[0].dim() == 3
        and isinstance(p[1], (list, tuple))
    )


def check_grids(p: Sequence[torch.Tensor], strides: Sequence[float]) -> None:
    """The layers' grids fit one image size at ``strides``: a layer of ``n`` cells at stride ``s``
    covers an image of about ``n * s`` pixels (``ceil`` or ``floor`` of size / stride, so within
    one stride). Layers passed in another order than the anchors and strides fail this. Equal
    strides carry no scale to check against (anchors given in grid units with strides of 1)."""
    if len(strides) != len(p):
        raise ValueError(f"strides: expected {len(p)} strides (one per layer of p), got {len(strides)}")
    if len(set(strides)) == 1:
        return
    for dim, what in ((2, "height"), (3, "width")):
        lo = max((pi.shape[dim] - 1) * s for pi, s in zip(p, strides))
        hi = min((pi.shape[dim] + 1) * s for pi, s in zip(p, strides))
        if not lo < hi:
            grids = [tuple(pi.shape[2:4]) for pi in p]
            implied = [pi.shape[dim] * s for pi, s in zip(p, strides)]
            raise ValueError(
                f"p: the layers' grids {grids} at strides {[float(s) for s in strides]} imply image {what}s "
                f"{[float(x) for x in implied]} pixels: expected one image size; are the layers of p in the "
                "order of the anchors and strides?"
            )


def check_inputs(
    p: Any,
    targets: Any,
    anchors: Sequence[torch.Tensor],
    options: LossOptions,
    validate: bool = True,
    strides: Sequence[float] | None = None,
) -> list[torch.Tensor]:
    """Raise ``TypeError``/``ValueError`` for bad ``p``/``targets``/``anchors``; return ``p`` as a list.
    With ``strides`` (per layer), the grids of ``p`` must fit one image size (``check_grids``)."""
    if _is_eval_output(p):
        raise TypeError(
            "p: got the output of a model in eval mode, (decoded boxes "
            f"{tuple(p[0].shape)}, [per-layer outputs]); the loss takes the per-layer outputs: pass its "
            "second item (as test.py does with train_out) or call model.train()"
        )
    if isinstance(p, torch.Tensor) or not isinstance(p, (list, tuple)):
        raise TypeError(f"p: expected a list of per-layer tensors, got {type(p).__name__}")
    if len(p) == 0:
        raise ValueError("p: expected at least one layer, got an empty list")
    if len(p) != len(anchors):
        raise ValueError(f"p: expected {len(anchors)} layers (one per anchor set of the model/criterion), got {len(p)}")
    for i, (pi, a) in enumerate(zip(p, anchors)):
        _check_layer(i, pi, p[0] if i else None, a.shape[0], options)
    if strides is not None:
        check_grids(p, strides)

    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"targets: expected a torch.Tensor [nt, 6], got {type(targets).__name__}")
    if not targets.is_floating_point():
        raise TypeError(f"targets: expected a floating-point tensor, got {targets.dtype}")
    if targets.dim() != 2 or targets.shape[1] != 6:
        raise ValueError(f"targets: expected shape [nt, 6] (image, class, x, y, w, h), got {tuple(targets.shape)}")
    if targets.device != p[0].device:
        raise ValueError(f"targets: expected device {p[0].device} (as p), got {targets.device}")

    if validate:
        eager_cpu = targets.device.type == "cpu" and not torch.compiler.is_compiling()
        check = _check_values_cpu if eager_cpu else _check_values_async
        check(targets.detach(), [a.detach() for a in anchors], p[0].shape[0], options.nc)
    return list(p)
