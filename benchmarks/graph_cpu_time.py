"""CPU-time comparison of graph_conv and the torch composites (issue 4's setting).

The counterpart of attention_cpu_time.py. Each implementation runs in its own loop, as in
pytest-benchmark: interleaving them call by call let the composites' freed intermediates
(3.7 MB each at N = 14) change the allocator's state under the next call, which tripled our
forward's time. The loops alternate three times to spread the machine's drift, and each
implementation keeps its best. One thread: thread CPU time; more: wall clock. Usage:

    python benchmarks/graph_cpu_time.py        # 2 threads
    python benchmarks/graph_cpu_time.py 1      # 1 thread, thread CPU time
"""

import sys
import time

import torch

import bench_graph_conv as bg


def _best(fns, rounds, clock):
    best = [float("inf")] * len(fns)
    for _ in range(3):
        for i, f in enumerate(fns):
            f()
            for _ in range(rounds):
                start = clock()
                f()
                best[i] = min(best[i], clock() - start)
    return [b * 1e3 for b in best]


def main(threads: int) -> None:
    torch.set_num_threads(threads)
    clock = time.thread_time if threads == 1 else time.perf_counter
    for N in bg.CASES:
        x, A, W, b = bg._inputs(N, requires_grad=True)

        def fwd(fn):
            def run():
                with torch.no_grad():
                    fn(x, A, W, b)
            return run

        def fwd_bwd(fn):
            def run():
                fn(x, A, W, b).sum().backward()
                x.grad = W.grad = b.grad = None
            return run

        impls = (bg.affectkit_conv, bg.torch_conv, bg.torch_einsum_conv)
        rounds = 2 if N == 62 else 30
        f = _best([fwd(fn) for fn in impls], rounds, clock)
        fb = _best([fwd_bwd(fn) for fn in impls], rounds, clock)
        print(f"N={N}: fwd {f[0]:.3f} ms vs {min(f[1:]):.3f} = {min(f[1:]) / f[0]:.2f}x | "
              f"fwd+bwd {fb[0]:.3f} ms vs {min(fb[1:]):.3f} = {min(fb[1:]) / fb[0]:.2f}x")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 2)
