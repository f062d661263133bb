import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

from yolo_kernels.models import CFG_DIR


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(1234)


@pytest.fixture(scope="session")
def cfg_dir():
    return CFG_DIR
