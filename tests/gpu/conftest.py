"""Shared by every GPU suite: float32 convolutions in full precision, and a fixed seed."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _no_tf32_seeded():
    """float32 convs in full precision (cuDNN's TF32 default would dominate the error)."""
    old = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(0)
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old
