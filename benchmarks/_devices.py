"""Devices a benchmark runs on: the CPU always, CUDA where a GPU is visible."""

import pytest
import torch

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible")),
]
