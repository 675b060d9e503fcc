"""CPU-time comparison of cross_modal_attention and torch SDPA (key padding).

On a shared, overloaded machine wall-clock medians mostly measure the other tenants; the
minimum CPU time of the calling thread, with one thread, is a steadier estimate of the work
each implementation does. Each implementation runs in its own loop, as in pytest-benchmark:
alternating them call by call let SDPA's intermediates (2-4 MB at 64 x 8 x 33 x 33) evict our
inputs and change the allocator's state under the next call, which doubled our forward's time
there. The loops alternate three times to spread the machine's drift. Usage:

    python benchmarks/attention_cpu_time.py          # 1 thread, thread CPU time
    python benchmarks/attention_cpu_time.py 2        # 2 threads, wall clock
    python benchmarks/attention_cpu_time.py 1 bfloat16   # bfloat16 inputs (both sides)
"""

import sys
import time

import torch
import torch.nn.functional as F

import affectkit.ops as ops

SHAPES = [(64, 8, 33, 33, 64), (32, 8, 50, 375, 32), (64, 8, 33, 33, 6), (32, 8, 50, 375, 6)]


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


def main(threads: int, dtype: torch.dtype = torch.float32) -> None:
    torch.set_num_threads(threads)
    clock = time.thread_time if threads == 1 else time.perf_counter
    for B, H, Lq, Lk, D in SHAPES:
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(B, H, L, D, generator=g).to(dtype).requires_grad_() for L in (Lq, Lk, Lk))
        lengths = torch.randint(1, Lk + 1, (B,), generator=g)
        mask = (torch.arange(Lk)[None, :] < lengths[:, None])[:, None, None, :]

        def fwd(fn):
            def run():
                with torch.no_grad():
                    fn()
            return run

        def fwd_bwd(fn):
            def run():
                fn().sum().backward()
                q.grad = k.grad = v.grad = None
            return run

        ours = lambda: ops.cross_modal_attention(q, k, v, kv_lengths=lengths)  # noqa: E731
        sdpa = lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # noqa: E731
        a, b = _best([fwd(ours), fwd(sdpa)], 5, clock)
        c, d = _best([fwd_bwd(ours), fwd_bwd(sdpa)], 3, clock)
        print(f"{str(dtype).removeprefix('torch.')} B={B} H={H} {Lq}x{Lk} D={D}: fwd {a:.2f} vs SDPA {b:.2f} ms = {b / a:.2f}x | "
              f"fwd+bwd {c:.2f} vs {d:.2f} ms = {d / c:.2f}x", flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 1, getattr(torch, sys.argv[2]) if len(sys.argv) > 2 else torch.float32)
