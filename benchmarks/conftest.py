"""Benchmark conventions: every benchmark sets a group (op + shape) and extra_info["impl"]
("affectkit" or the stock baseline such as "torch"); the summary reports, per group,
how many times faster affectkit is than each baseline in the same run."""

from collections import defaultdict

import pytest
import torch


def pytest_configure(config):
    torch.set_num_threads(int(__import__("os").environ.get("OMP_NUM_THREADS", torch.get_num_threads())))


def pytest_terminal_summary(terminalreporter, config):
    session = getattr(config, "_benchmarksession", None)
    if session is None or not session.benchmarks:
        return
    groups = defaultdict(dict)
    for bench in session.benchmarks:
        if bench and "impl" in bench.extra_info:
            groups[bench.group][bench.extra_info["impl"]] = bench.stats.median
    rows = []
    for group, times in sorted(groups.items()):
        ours = times.get("affectkit")
        for impl, t in sorted(times.items()):
            if impl != "affectkit" and ours:
                rows.append(f"  {group:<60} vs {impl:<12} {t / ours:6.2f}x  ({ours * 1e6:9.1f} us vs {t * 1e6:9.1f} us)")
    if rows:
        terminalreporter.write_sep("-", "affectkit speed-up over the stock path (median times)")
        for row in rows:
            terminalreporter.write_line(row)


@pytest.fixture
def bench(benchmark):
    """benchmark with the group/impl convention: bench(group, impl, fn, *args).

    With CUDA tensors among the arguments, or "cuda" in the group name (closures over CUDA
    models), each timed call ends with a synchronize, so the time is the GPU's, not the
    launch's."""

    def run(group, impl, fn, *args):
        benchmark.group = group
        benchmark.extra_info["impl"] = impl
        if "cuda" in group or any(isinstance(a, torch.Tensor) and a.is_cuda for a in args):
            inner = fn

            def fn(*a):
                out = inner(*a)
                torch.cuda.synchronize()
                return out

        return benchmark(fn, *args)

    return run

