"""A short training run of the ultralytics package (``YOLO("yolov8n.yaml").train``, CPU, synthetic
data written here) with and without ``integrations.ultralytics.apply()``: the same losses.

Each run is a fresh interpreter (the trainer changes process state: settings, seeds, threads).

The development install has torchvision's metadata (ultralytics reads its version) but not a
working torchvision: PyPI's torchvision wheels are built against the CUDA torch, whose libraries
the CPU torch of this project's machines lacks, so its C ops do not load and ``import torchvision``
stops at registering fakes for ``torchvision::nms`` / ``qnms``. ``TORCHVISION_OPS`` below defines
those two ops (plain-torch greedy NMS; the validator of the last epoch calls it) and lets
torchvision call them, when, and only when, its own C ops do not load.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("ultralytics", reason="ultralytics (requirements-ultralytics.txt) missing")

TORCHVISION_OPS = """
import importlib.util, os, ctypes, torch
_spec = importlib.util.find_spec("torchvision")
try:
    ctypes.CDLL(os.path.join(os.path.dirname(_spec.origin), "_C.so"))
except OSError:
    _lib = torch.library.Library("torchvision", "DEF")
    _lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")

    def _nms(dets, scores, iou_threshold):
        order = scores.argsort(descending=True)
        keep = []
        while order.numel():
            i = order[0]
            keep.append(i)
            rest = dets[order[1:]]
            lt = torch.maximum(dets[i, :2], rest[:, :2])
            rb = torch.minimum(dets[i, 2:], rest[:, 2:])
            inter = (rb - lt).clamp(min=0).prod(1)
            area = lambda b: (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
            iou = inter / (area(dets[i]) + area(rest) - inter)
            order = order[1:][iou <= iou_threshold]
        return torch.stack(keep) if keep else torch.zeros(0, dtype=torch.long)

    _lib.impl("nms", _nms, "CPU")
    import torchvision.extension
    torchvision.extension._has_ops = lambda: True  # the two ops it calls exist now
"""

SCRIPT = """
import json, os, sys
import numpy as np
{ops}
import cv2

root = sys.argv[1]
for split in ("train", "val"):
    os.makedirs(f"{{root}}/images/{{split}}", exist_ok=True)
    os.makedirs(f"{{root}}/labels/{{split}}", exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(4):
        cv2.imwrite(f"{{root}}/images/{{split}}/{{i}}.jpg", (rng.random((64, 64, 3)) * 255).astype(np.uint8))
        with open(f"{{root}}/labels/{{split}}/{{i}}.txt", "w") as f:
            for k in range(3):
                x, y = rng.uniform(0.3, 0.7, 2)
                w, h = rng.uniform(0.1, 0.4, 2)
                f.write(f"{{k % 2}} {{x:.4f}} {{y:.4f}} {{w:.4f}} {{h:.4f}}\\n")
with open(f"{{root}}/data.yaml", "w") as f:
    f.write(f"path: {{root}}\\ntrain: images/train\\nval: images/val\\nnames:\\n  0: a\\n  1: b\\n")

from ultralytics import YOLO
if sys.argv[2] == "patched":
    import yolo_kernels.integrations.ultralytics as yk_ultralytics
    assert yk_ultralytics.apply(backend=sys.argv[3]) == ["ultralytics.nn.tasks.DetectionModel.init_criterion"]

losses, criteria = [], set()
def record(trainer):
    losses.append({{k: float(v) for k, v in trainer.loss_items.items()}})
    criteria.add(type(trainer.model.criterion).__module__ + "." + type(trainer.model.criterion).__name__)

model = YOLO(sys.argv[4])
model.add_callback("on_train_batch_end", record)
model.train(data=f"{{root}}/data.yaml", epochs=1, imgsz=64, batch=2, workers=0, device="cpu", plots=False,
            amp=False, seed=0, deterministic=True, project=f"{{root}}/runs", name="r", exist_ok=True, verbose=False,
            mosaic=0.0, val=False)
print("RESULT " + json.dumps({{"losses": losses, "criteria": sorted(criteria)}}))
"""


def train(tmp_path, mode, backend, cfg):
    root = tmp_path / mode
    env = {**os.environ, "YOLO_OFFLINE": "1", "YOLO_CONFIG_DIR": str(tmp_path / "config"), "OMP_NUM_THREADS": "1"}
    script = SCRIPT.format(ops=textwrap.dedent(TORCHVISION_OPS))
    out = subprocess.run(
        [sys.executable, "-c", script, str(root), mode, backend, cfg],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT ") :])


@pytest.mark.parametrize("cfg", ["yolov8n.yaml", "yolo26n.yaml"])
def test_training_run_matches_the_unpatched_run(tmp_path, cfg):
    backend = "auto"
    plain = train(tmp_path, "plain", backend, cfg)
    patched = train(tmp_path, "patched", backend, cfg)
    assert plain["criteria"] and all(c.startswith("ultralytics.") for c in plain["criteria"])
    assert all(c.startswith("yolo_kernels.anchor_free.yolov8.") for c in patched["criteria"])
    assert len(patched["losses"]) == len(plain["losses"]) >= 2
    for ours, theirs in zip(patched["losses"], plain["losses"]):
        assert list(ours) == list(theirs)
        assert list(ours.values()) == pytest.approx(list(theirs.values()), rel=1e-4, abs=1e-6)
