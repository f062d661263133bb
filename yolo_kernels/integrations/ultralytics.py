"""Run ultralytics/yolov3's archive code (v8) on the fused loss with one call.

    import yolo_kernels.integrations.ultralytics as yk_ultralytics
    yk_ultralytics.apply()      # in train.py, before training starts; anywhere relative to its imports

Why a call and not an import line: the archive's ``train.py`` and ``test.py`` both do
``from utils.utils import *`` and call ``compute_loss`` by that name, so each module holds its own
reference to the original function. An ``from yolo_kernels import compute_loss`` placed above the
star import is silently undone by it, and one placed in ``train.py`` leaves ``test.py`` on the
original. ``apply()`` rebinds the name where the code looks it up:

* in ``utils.utils`` itself, so every later ``from utils.utils import *`` gets the fused loss;
* in every module already imported that holds the original (``__main__``, ``train``, ``test``, ...).

It is idempotent (a second call changes nothing unless the options change) and reversible
(``revert()`` puts the original back everywhere, including in modules that star-imported the
replacement meanwhile). The replacement has the original's call, ``compute_loss(p, targets,
model)``, reads the same ``model`` attributes and returns the same ``(loss, loss_items)``.
"""

from __future__ import annotations

import functools
import importlib
import sys
from typing import Any

from .. import loss as loss_api
from ..config import DEFAULT_HYP, LossOptions

__all__ = ["apply", "revert", "is_applied", "DEFAULT_MODULE", "OPTIONS"]

#: Where the archive defines ``compute_loss``.
DEFAULT_MODULE = "utils.utils"
_ATTR = "compute_loss"
_STATE: dict[str, Any] = {}  # "module", "original", "replacement"


def _make_replacement(original, backend: str, options: dict):
    @functools.wraps(original)
    def compute_loss(p, targets, model):
        return loss_api.compute_loss(p, targets, model, backend=backend, **options)

    compute_loss.__doc__ = (
        f"yolo_kernels' fused loss (backend={backend!r}) in place of the original compute_loss; "
        "see yolo_kernels.integrations.ultralytics."
    )
    compute_loss._yolo_kernels_original = original  # type: ignore[attr-defined]
    compute_loss._yolo_kernels_settings = (backend, dict(options))  # type: ignore[attr-defined]
    return compute_loss


def _rebind(old, new) -> list[str]:
    """Set ``compute_loss`` to ``new`` in every imported module where it is ``old``; their names."""
    changed = []
    for name, module in list(sys.modules.items()):
        try:
            current = getattr(module, _ATTR, None) if module is not None else None
        except Exception:
            continue
        if current is old:
            setattr(module, _ATTR, new)
            changed.append(name)
    return changed


#: The keyword options of ``yolo_kernels.compute_loss`` that ``apply`` passes on (``stats`` would
#: change what the training code gets back).
OPTIONS = ("box_loss", "reduction", "label_smoothing", "validate")


def _check_settings(backend: Any, options: dict) -> None:
    """Bad settings fail at ``apply``, not at the first training step."""
    loss_api.check_backend_name(backend)
    unknown = [key for key in options if key not in OPTIONS]
    if unknown:
        hyp = [key for key in unknown if key in DEFAULT_HYP]
        hint = f"; {hyp} are hyperparameters, read from model.hyp (set them in the hyp dict)" if hyp else ""
        raise TypeError(f"apply: unknown option(s) {unknown}; expected keyword options among {list(OPTIONS)}{hint}")
    if "validate" in options and not isinstance(options["validate"], bool):
        raise TypeError(f"validate: expected a bool, got {type(options['validate']).__name__}")
    # the values as the loss checks them (nc does not matter here)
    LossOptions(nc=1, **{key: value for key, value in options.items() if key != "validate"})


def apply(module: str = DEFAULT_MODULE, *, backend: str = "auto", **options: Any) -> list[str]:
    """Rebind ``compute_loss`` to yolo_kernels' loss in ``module`` (``"utils.utils"``) and in every
    imported module that holds the original. Returns the names of the modules changed.

    Args:
        module: the module that defines the original ``compute_loss`` (imported if needed; run from
            the ultralytics/yolov3 folder so that ``utils`` is importable).
        backend: as in ``yolo_kernels.compute_loss`` (``"auto"``: triton on CUDA, cpp on CPU).
        options: keyword options of ``yolo_kernels.compute_loss`` (``box_loss``, ``reduction``,
            ``label_smoothing``, ``validate``).

    A backend name, option or value that the loss would reject is rejected here, before any
    module is changed (the hyperparameters stay in ``model.hyp``, as for the original).
    """
    _check_settings(backend, options)
    try:
        target = importlib.import_module(module)
    except ImportError as error:
        raise ImportError(
            f"module: cannot import {module!r} ({error}); run from the ultralytics/yolov3 folder "
            "(where utils/utils.py is) or pass the module that defines compute_loss"
        ) from error
    current = getattr(target, _ATTR, None)
    if current is None:
        raise AttributeError(f"module: {module!r} has no {_ATTR!r} to replace")
    if _STATE and _STATE["module"] != module:
        raise RuntimeError(f"yolo_kernels: already applied to {_STATE['module']!r}; call revert() first")
    original = getattr(current, "_yolo_kernels_original", current)
    if getattr(current, "_yolo_kernels_settings", None) == (backend, dict(options)):
        return _rebind(original, current)  # idempotent: only modules imported since, if any
    replacement = _make_replacement(original, backend, options)
    changed = _rebind(current, replacement)
    if original is not current:  # options changed: modules still on the original too
        changed += _rebind(original, replacement)
    _STATE.update(module=module, original=original, replacement=replacement)
    return changed


def revert() -> list[str]:
    """Put the original ``compute_loss`` back wherever the replacement is. Returns the module names."""
    if not _STATE:
        return []
    changed = _rebind(_STATE["replacement"], _STATE["original"])
    _STATE.clear()
    return changed


def is_applied() -> bool:
    return bool(_STATE)
