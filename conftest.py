"""Test-session settings shared by tests/ and benchmarks/.

Without a GPU, the Triton kernels are tested by the Triton interpreter, which must be switched on
before triton is imported (importing yolo_kernels imports it).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
