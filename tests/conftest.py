import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

SHARED_CFG = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "cfg")


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(1234)


@pytest.fixture(scope="session")
def cfg_dir():
    path = os.environ.get("YOLO_KERNELS_CFG_DIR", SHARED_CFG)
    if not os.path.isdir(path):
        pytest.fail(f"Darknet cfg test data not found at {path} (set YOLO_KERNELS_CFG_DIR)")
    return path
