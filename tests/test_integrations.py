"""``yolo_kernels.integrations.ultralytics`` against a stand-in of the archive's module layout:
``utils/utils.py`` defines ``compute_loss``, and ``train.py`` / ``test.py`` star-import it and call
it by name. Each scenario runs in a fresh interpreter inside that folder (as ``python train.py``)."""

import os
import subprocess
import sys
import textwrap

import pytest

UTILS = """
import yolo_kernels
CALLS = []


def compute_loss(p, targets, model):  # the original's name and call; counts its own calls
    CALLS.append("original")
    return yolo_kernels.reference.compute_loss(p, targets, model)
"""

TRAIN = """
{before}
from utils.utils import *
{after}


def train_step(p, targets, model):
    return compute_loss(p, targets, model)
"""

TEST = """
from utils.utils import *


def test(p, targets, model):
    return compute_loss(p, targets, model)[1][:3]
"""

MAIN = """
import sys
import torch
import yolo_kernels as yk
import yolo_kernels.integrations.ultralytics as yk_ultralytics
PACKAGE = "ultralytics.nn.tasks.DetectionModel.init_criterion"  # also patched where ultralytics is installed
{setup}
import utils.utils

model = yk.models.Darknet("yolov3-tiny")
model.hyp, model.gr = dict(yk.DEFAULT_HYP), 1.0
p = [x.detach() for x in model(torch.rand(2, 3, 64, 64))]
targets = torch.tensor([[0, 3, 0.5, 0.5, 0.3, 0.4], [1, 7, 0.2, 0.7, 0.1, 0.2]])
want = yk.reference.compute_loss(p, targets, model)[1]


import test as test_module
{run}
"""


def run_archive(tmp_path, before="", after="", setup="", run=""):
    (tmp_path / "utils").mkdir()
    (tmp_path / "utils" / "__init__.py").write_text("")
    (tmp_path / "utils" / "utils.py").write_text(UTILS)
    (tmp_path / "train.py").write_text(TRAIN.format(before=before, after=after))
    (tmp_path / "test.py").write_text(TEST)
    code = MAIN.format(setup=setup, run=textwrap.dedent(run))
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


CHECK_BOTH = """
import train
items_train = train.train_step(p, targets, model)[1]
items_test = test_module.test(p, targets, model)
assert torch.allclose(items_train, want, rtol=1e-5) and torch.allclose(items_test, want[:3], rtol=1e-5)
print("original calls:", len(utils.utils.CALLS))
print("train:", getattr(train.compute_loss, "_yolo_kernels_settings", "original"))
print("test:", getattr(test_module.compute_loss, "_yolo_kernels_settings", "original"))
"""


@pytest.mark.parametrize("where", ["top of train.py", "after the star import", "after both modules imported"])
def test_apply_reaches_train_and_test_wherever_it_is_called(tmp_path, where):
    call = "import yolo_kernels.integrations.ultralytics as yku; yku.apply()"
    kwargs = {
        "top of train.py": dict(before=call),
        "after the star import": dict(after=call),
        "after both modules imported": dict(run="import train\n" + call + "\n"),
    }[where]
    kwargs["run"] = kwargs.get("run", "") + CHECK_BOTH
    out = run_archive(tmp_path, **kwargs)
    assert "original calls: 0" in out
    assert "train: ('auto', {})" in out and "test: ('auto', {})" in out


def test_without_apply_the_original_runs(tmp_path):
    out = run_archive(tmp_path, run=CHECK_BOTH)
    assert "original calls: 2" in out and "train: original" in out and "test: original" in out


def test_apply_is_idempotent_and_revert_restores_everything(tmp_path):
    out = run_archive(
        tmp_path,
        run="""
        import train
        first = yk_ultralytics.apply()
        fused = train.compute_loss
        assert yk_ultralytics.apply() == [] and train.compute_loss is fused      # a second call changes nothing
        assert sorted(set(first) - {PACKAGE}) == ["test", "train", "utils.utils"], first
        yk_ultralytics.apply(backend="reference", box_loss="ciou")               # new options: rebinds to them
        assert train.compute_loss._yolo_kernels_settings == ("reference", {"box_loss": "ciou"})
        assert test_module.compute_loss is train.compute_loss is utils.utils.compute_loss
        import importlib, types
        late = types.ModuleType("late")                                         # star-imported after apply
        exec("from utils.utils import *", late.__dict__)
        sys.modules["late"] = late
        restored = yk_ultralytics.revert()
        assert sorted(set(restored) - {PACKAGE}) == ["late", "test", "train", "utils.utils"], restored
        for m in (train, test_module, utils.utils, late):
            assert m.compute_loss.__module__ == "utils.utils" and not hasattr(m.compute_loss, "_yolo_kernels_original")
        assert not yk_ultralytics.is_applied() and yk_ultralytics.revert() == []
        train.train_step(p, targets, model)
        print("original calls:", len(utils.utils.CALLS))
    """,
    )
    assert "original calls: 1" in out


@pytest.mark.parametrize(
    "code, message",
    [
        ("yku.apply('utils.utils')", "module: cannot import 'utils.utils'"),
        ("sys.modules['ultralytics'] = None; yku.apply()", "found neither the ultralytics package"),
    ],
)
def test_apply_without_the_archive_says_what_to_do(tmp_path, code, message):
    code = "import sys; import yolo_kernels.integrations.ultralytics as yku; " + code
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH="")
    )
    assert result.returncode != 0
    assert message in result.stderr and "ultralytics/yolov3 folder" in result.stderr
