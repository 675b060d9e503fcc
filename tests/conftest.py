import os
import zlib

import pytest
import torch


# Fresh random inputs every run; the seed is printed so a failure can be replayed
# with AFFECTKIT_TEST_SEED=<seed>.
_SEED = int(os.environ.get("AFFECTKIT_TEST_SEED", torch.seed() % 2**31))


def pytest_report_header(config):
    return f"affectkit test seed: {_SEED} (replay with AFFECTKIT_TEST_SEED={_SEED})"


@pytest.fixture
def gen(request):
    """A torch.Generator seeded from the run's seed and the test's name (a stable hash of it:
    Python's str hash differs between processes, which made the printed seed unreplayable)."""
    return torch.Generator().manual_seed(_SEED + zlib.crc32(request.node.nodeid.encode()) % 100_003)


@pytest.fixture(scope="module")
def module_gen(request):
    """`gen` for module-scoped fixtures: seeded from the run's seed and the module's name."""
    return torch.Generator().manual_seed(_SEED + zlib.crc32(request.node.nodeid.encode()) % 100_003)
