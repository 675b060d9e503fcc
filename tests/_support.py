"""Helpers shared by the test modules."""

import pytest
import torch

from affectkit import _C

CUDA_OK = _C.build_info()["cuda_compiled"] and torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(
    not CUDA_OK,
    reason="needs a visible CUDA GPU and affectkit built with CUDA "
    f"(cuda_compiled={_C.build_info()['cuda_compiled']}, torch.cuda.is_available()={torch.cuda.is_available()})",
)
