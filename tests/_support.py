"""Helpers shared by the test modules."""

import threading

import numpy as np
import pytest
import torch

from affectkit import _C

CUDA_OK = _C.build_info()["cuda_compiled"] and torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(
    not CUDA_OK,
    reason="needs a visible CUDA GPU and affectkit built with CUDA "
    f"(cuda_compiled={_C.build_info()['cuda_compiled']}, torch.cuda.is_available()={torch.cuda.is_available()})",
)


def capture_cuda_graph(fn):
    """Warm fn up on a side stream (as torch.cuda.graph requires), capture one call in a CUDA
    graph, return (graph, output)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


def cuda_synchronisations(fn) -> list[str]:
    """Call fn() and return the messages of the synchronising CUDA operations it ran (each one
    makes the host wait for the GPU queue), as torch's sync debug mode reports them."""
    import warnings

    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            fn()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return [str(w.message) for w in seen if "synchroniz" in str(w.message)]


def numpy_rng(gen) -> np.random.Generator:
    """A numpy generator drawn from a test's `gen`: fresh every run, replayed by
    AFFECTKIT_TEST_SEED (the run's seed, see conftest.py)."""
    return np.random.default_rng(int(torch.randint(0, 2**31, (1,), generator=gen)))


def run_threads(*targets):
    """Run each callable in a thread of its own, all at once; re-raise the first exception."""
    errors = []

    def guarded(fn):
        def run():
            try:
                fn()
            except Exception as e:  # noqa: BLE001 - re-raised in the calling thread
                errors.append(e)
        return run

    threads = [threading.Thread(target=guarded(fn)) for fn in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
