"""Run ultralytics' training code on the fused losses with one call.

    import yolo_kernels.integrations.ultralytics as yk_ultralytics
    yk_ultralytics.apply()      # before training starts; anywhere relative to the imports

It patches every client it finds:

* **the ``ultralytics`` package** (8.x: YOLOv8, YOLO11, YOLO26, YOLOv10 detection), when it is
  installed: ``DetectionModel.init_criterion`` builds ``yolo_kernels.yolov8.DetectionLoss`` (or
  ``E2ELoss`` for a head with one-to-one branches) for the plain detection heads (``Detect``,
  ``v10Detect``), so ``YOLO(...).train(...)`` and validation use the fused loss; other tasks
  (segment, pose, OBB, world, ...) keep theirs. A model whose criterion was already built keeps
  it (the trainer builds it at its first loss call, after ``apply()``);
* **the YOLOv3 archive** (``utils.utils.compute_loss``), when ``utils.utils`` is importable with a
  ``compute_loss``. Its ``train.py`` and ``test.py`` both do ``from utils.utils import *`` and
  call ``compute_loss`` by that name, so each module holds its own reference to the original
  function: an ``from yolo_kernels import compute_loss`` placed above the star import is silently
  undone by it, and one placed in ``train.py`` leaves ``test.py`` on the original. ``apply()``
  rebinds the name where the code looks it up: in ``utils.utils`` itself, so every later
  ``from utils.utils import *`` gets the fused loss, and in every module already imported that
  holds the original (``__main__``, ``train``, ``test``, ...).

It is idempotent (a second call changes nothing unless the options change) and reversible
(``revert()`` puts the originals back everywhere, including in modules that star-imported the
replacement meanwhile). The replacements have the originals' calls, read the same ``model``
attributes and return the same ``(loss, loss_items)``.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import sys
from typing import Any

from ..anchor import yolov3 as loss_api
from ..anchor.options import DEFAULT_HYP, LossOptions

__all__ = ["apply", "revert", "is_applied", "DEFAULT_MODULE", "OPTIONS", "PACKAGE_HEADS"]

#: Where the archive defines ``compute_loss``.
DEFAULT_MODULE = "utils.utils"
_ATTR = "compute_loss"
_STATE: dict[str, Any] = {}  # the archive: "module", "original", "replacement"
_PACKAGE: dict[str, Any] = {}  # the ultralytics package: "cls", "original", "settings"
#: The ultralytics heads whose loss is ``v8DetectionLoss`` / ``E2ELoss`` of the detection task.
PACKAGE_HEADS = ("Detect", "v10Detect")
_PACKAGE_NAME = "ultralytics.nn.tasks.DetectionModel.init_criterion"


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


def _make_init_criterion(original, backend: str, validate: bool):
    from ..anchor_free import yolov8

    @functools.wraps(original)
    def init_criterion(self):
        head = self.model[-1]
        if type(head).__name__ not in PACKAGE_HEADS:
            return original(self)
        if getattr(head, "one2one_cv2", None) is not None:
            return yolov8.E2ELoss(self, backend=backend, validate=validate)
        return yolov8.DetectionLoss(self, backend=backend, validate=validate)

    init_criterion._yolo_kernels_original = original  # type: ignore[attr-defined]
    return init_criterion


def _apply_package(backend: str, validate: bool) -> list[str]:
    """Patch ``DetectionModel.init_criterion`` of the installed ultralytics package."""
    from ultralytics.nn.tasks import DetectionModel

    settings = (backend, validate)
    if _PACKAGE.get("settings") == settings:
        return []
    original = _PACKAGE.get("original", DetectionModel.init_criterion)
    DetectionModel.init_criterion = _make_init_criterion(original, backend, validate)
    _PACKAGE.update(cls=DetectionModel, original=original, settings=settings)
    return [_PACKAGE_NAME]


def _apply_archive(module: str, backend: str, options: dict) -> list[str]:
    target = importlib.import_module(module)
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


def _package_installed() -> bool:
    if sys.modules.get("ultralytics") is not None:
        return True
    try:
        return importlib.util.find_spec("ultralytics") is not None
    except (ImportError, ValueError):  # blocked (sys.modules entry None) or a broken package
        return False


def _archive_found(module: str) -> bool:
    """``module`` imports and defines ``compute_loss`` (a missing ``utils`` package is no error
    when ``apply()`` looks for every client)."""
    try:
        return hasattr(importlib.import_module(module), _ATTR)
    except ImportError:
        return False


def apply(module: str | None = None, *, backend: str = "auto", **options: Any) -> list[str]:
    """Make ultralytics' code use yolo_kernels' losses: the ``ultralytics`` package's detection
    criterion and the YOLOv3 archive's ``compute_loss``, each where found. Returns what changed:
    the names of the modules rebound and ``"ultralytics.nn.tasks.DetectionModel.init_criterion"``.

    Args:
        module: ``None`` (every client found), or the archive module that defines
            ``compute_loss`` (e.g. ``"utils.utils"``, run from the ultralytics/yolov3 folder):
            only that one, and an error when it cannot be imported.
        backend: ``"auto"`` (triton on CUDA where the family has it, cpp on CPU) or a name.
        options: keyword options of ``yolo_kernels.compute_loss`` for the archive (``box_loss``,
            ``reduction``, ``label_smoothing``, ``validate``); ``validate`` also reaches the
            package's criterion.

    A backend name, option or value that the loss would reject is rejected here, before anything
    is changed (the hyperparameters stay in the model, as for the originals). With ``module=None``
    and neither client installed, an ``ImportError`` says so.
    """
    _check_settings(backend, options)
    validate = options.get("validate", True)
    if module is not None:
        try:
            importlib.import_module(module)
        except ImportError as error:
            raise ImportError(
                f"module: cannot import {module!r} ({error}); run from the ultralytics/yolov3 folder "
                "(where utils/utils.py is) or pass the module that defines compute_loss"
            ) from error
        return _apply_archive(module, backend, options)
    package = _package_installed()
    archive = _archive_found(DEFAULT_MODULE)
    if not package and not archive:
        raise ImportError(
            "apply: found neither the ultralytics package (pip install ultralytics) nor the YOLOv3 archive's "
            f"{DEFAULT_MODULE!r} with compute_loss (run from the ultralytics/yolov3 folder, or pass module=)"
        )
    changed = _apply_package(backend, validate) if package else []
    if archive:
        changed += _apply_archive(DEFAULT_MODULE, backend, options)
    return changed


def revert() -> list[str]:
    """Put the originals back wherever a replacement is. Returns what changed (as ``apply``)."""
    changed = []
    if _PACKAGE:
        _PACKAGE["cls"].init_criterion = _PACKAGE["original"]
        _PACKAGE.clear()
        changed.append(_PACKAGE_NAME)
    if _STATE:
        changed += _rebind(_STATE["replacement"], _STATE["original"])
        _STATE.clear()
    return changed


def is_applied() -> bool:
    return bool(_STATE or _PACKAGE)
