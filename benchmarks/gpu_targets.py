"""The issues' CUDA speed targets, each against the stock PyTorch path in the same run.

Run on a GPU machine (scripts/gpu_check.sh does): `python3 benchmarks/gpu_targets.py [--out FILE]`.
Prints one markdown table (card, case, affectkit, stock, ratio, target).

Timing: CUDA events around 50 back-to-back calls, median over 7 such trials after warm-up;
"graph" columns replay the same calls captured in a CUDA graph, which removes the Python
and launch overhead that dominates kernels of a few microseconds (the issue targets are GPU
times). Inputs are random (never zeros).

Floors (H100 SXM: ~3.0 TB/s measured copy, ~800 TFLOP/s bf16 dense matrix rate):
- attention B=64 H=8 33x33 D=64 bf16: q, k, v, out = 4 x 2.2 MB = 8.7 MB -> ~3 us; 143 MFLOP.
- graph_conv 8192 x 14, 5 -> 32 fp32: x 2.3 MB + out 14.7 MB -> ~6 us (fp32 out dominates).
- graph_conv 8192 x 62, 64 -> 64 fp32: 130 + 130 MB -> ~87 us; 8.2 GFLOP.
- filtered_knn 1000 x 1M x 384 fp16: 768 MB database read -> 0.26 ms; 0.77 TFLOP -> ~1 ms
  on the tensor cores; a float32 CUDA-core path is bound near 13 ms (60 TFLOP/s).
"""

from __future__ import annotations

import argparse
import math
import os
import re
import statistics
import sys
import traceback

import torch
import torch.nn.functional as F

import affectkit.ops as ops
from affectkit.nn import MultimodalFusion

ROWS: list[dict] = []
MATCH = ""  # --match: only the cases whose name contains it (e.g. one case under a profiler)


def wanted(case: str) -> bool:
    return MATCH in case


def gpu_time(fn, reps: int = 50, trials: int = 7) -> float:
    """Median seconds per call of fn() (CUDA events, reps calls per trial)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(trials):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / reps)
    return statistics.median(times)


def graph_time(fn, reps: int = 50, trials: int = 7) -> float | None:
    """Median seconds per call when fn's work is captured once and replayed as a CUDA graph."""
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(reps):
                fn()
        return gpu_time(graph.replay, reps=1, trials=trials) / reps
    except Exception as exc:  # report, keep going: the eager number still stands
        print(f"  graph capture failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return None


def record(case, ours, stock, stock_name, target="", ours_graph=None, stock_graph=None):
    row = dict(case=case, ours_us=ours * 1e6, stock_us=stock * 1e6, stock=stock_name, target=target,
               ours_graph_us=None if ours_graph is None else ours_graph * 1e6,
               stock_graph_us=None if stock_graph is None else stock_graph * 1e6)
    ROWS.append(row)
    g = "" if ours_graph is None else f" | graph {ours_graph * 1e6:.1f} vs {stock_graph * 1e6 if stock_graph else float('nan'):.1f}"
    print(f"{case}: {ours * 1e6:.1f} us vs {stock_name} {stock * 1e6:.1f} us ({stock / ours:.2f}x){g}", flush=True)


def both(case, ours_fn, stock_fn, stock_name, target=""):
    if not wanted(case):
        return
    record(case, gpu_time(ours_fn), gpu_time(stock_fn), stock_name, target, graph_time(ours_fn), graph_time(stock_fn))


# --------------------------------------------------------------------------- attention
def attention_inputs(B, H, Lq, Lk, D, dtype=torch.bfloat16, grad=False, full=False):
    q, k, v = (torch.randn(B, H, L, D, device="cuda", dtype=dtype, requires_grad=grad) for L in (Lq, Lk, Lk))
    lengths = torch.full((B,), Lk, device="cuda") if full else torch.randint(1, Lk + 1, (B,), device="cuda")
    mask = (torch.arange(Lk, device="cuda")[None, :] < lengths[:, None])[:, None, None, :]
    return q, k, v, lengths, mask


SHORT_FORWARD = [("B=64 H=8 33x33 D=64", (64, 8, 33, 33, 64), "< 12 us"),
                 ("MulT B=32 H=8 50x375 D=32", (32, 8, 50, 375, 32), "< 15 us"),
                 ("MulT B=32 H=8 50x500 D=32", (32, 8, 50, 500, 32), "< 15 us"),
                 ("MulT B=64 H=8 33x33 D=6", (64, 8, 33, 33, 6), "< 15 us"),
                 ("MulT B=32 H=8 50x375 D=6", (32, 8, 50, 375, 6), "< 15 us"),
                 ("MulT B=32 H=8 50x500 D=6", (32, 8, 50, 500, 6), "< 15 us")]
SHORT_BACKWARD = [("B=64 H=8 33x33 D=64", (64, 8, 33, 33, 64), "< 80 us"),
                  ("MulT B=32 H=8 50x375 D=6", (32, 8, 50, 375, 6), "")]


def bench_attention(long_sequences: bool = True, short_sequences: bool = True):
    for name, shape, target in SHORT_FORWARD if short_sequences else []:
        q, k, v, lengths, mask = attention_inputs(*shape)
        with torch.no_grad():
            both(f"attention bf16 fwd, key padding, {name}",
                 lambda: ops.cross_modal_attention(q, k, v, kv_lengths=lengths),
                 lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask), "SDPA+mask", target)

    def step(fn, q, k, v, g):
        return lambda: torch.autograd.grad(fn(), (q, k, v), g)

    for name, shape, target in SHORT_BACKWARD if short_sequences else []:
        q, k, v, lengths, mask = attention_inputs(*shape, grad=True)
        g = torch.randn_like(q)
        both(f"attention bf16 fwd+bwd, key padding, {name}",
             step(lambda: ops.cross_modal_attention(q, k, v, kv_lengths=lengths), q, k, v, g),
             step(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask), q, k, v, g), "SDPA+mask", target)
    for D in (64, 128) if long_sequences else ():  # throughput against SDPA's flash path (no mask)
        B, H, L = 4, 16, 4096
        q, k, v, lengths, mask = attention_inputs(B, H, L, L, D, full=True)
        flops = 4 * B * H * L * L * D
        variant = "off" if os.environ.get("AFFECTKIT_ATTENTION_LONG_KERNEL") == "0" else "on"
        case = f"attention bf16 fwd L=4096 D={D} B=4 H=16, long kernel {variant}"
        if not wanted(case):
            continue
        with torch.no_grad():
            ours = gpu_time(lambda: ops.cross_modal_attention(q, k, v), reps=5, trials=3)
            stock = gpu_time(lambda: F.scaled_dot_product_attention(q, k, v), reps=5, trials=3)
        record(f"{case} (TFLOP/s: ours {flops / ours / 1e12:.0f}, "
               f"SDPA {flops / stock / 1e12:.0f})", ours, stock, "SDPA", ">= 0.5x SDPA")


def bench_fusion():
    B, L, E, H = 64, 33, 768, 8
    text = torch.randn(B, L, E, device="cuda", dtype=torch.bfloat16)
    others = [torch.randn(B, L, E, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
    lengths = torch.randint(1, L + 1, (B,), device="cuda")
    ours = MultimodalFusion(E, H).to("cuda", torch.bfloat16).eval()

    class MHAFusion(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = torch.nn.ModuleList(torch.nn.MultiheadAttention(E, H, batch_first=True) for _ in range(2))
            self.norm = torch.nn.LayerNorm(E)

        def forward(self, text, others, lengths):
            kpm = torch.arange(text.shape[1], device=text.device)[None, :] >= lengths[:, None]
            out = text
            for attn, y in zip(self.attn, others):
                out = out + attn(text, y, y, key_padding_mask=kpm, need_weights=False)[0]
            return self.norm(out)

    stock = MHAFusion().to("cuda", torch.bfloat16).eval()
    with torch.no_grad():
        both("M2FNet fusion layer bf16 fwd (64x33, 768, 8 heads)", lambda: ours(text, others, lengths),
             lambda: stock(text, others, lengths), "nn.MultiheadAttention", "< 150 us")


# --------------------------------------------------------------------------- graph
def bench_graph():
    W = 8192
    # The targets: N = 14, 5 to 32 features, and N = 62, 64 to 64 ("A to B features"
    # is in -> out in both). 14 x 32 -> 32 is timed alongside, without a target.
    for N, Fi, Fo, target in [(14, 5, 32, "< 15 us"), (14, 32, 32, ""), (62, 64, 64, "< 100 us")]:
        x = torch.randn(W, N, Fi, device="cuda")
        A = torch.rand(N, N, device="cuda")
        A = (A + A.T) / N
        Wt = torch.randn(Fi, Fo, device="cuda") / Fi**0.5
        b = torch.randn(Fo, device="cuda")
        path = os.environ.get("AFFECTKIT_GRAPH_CUDA_PATH", "auto")
        both(f"graph_conv fp32 fwd, {W} windows, N={N}, {Fi}->{Fo}, relu, path {path}",
             lambda: ops.graph_conv(x, A, Wt, b, "relu"),
             lambda: torch.relu(torch.einsum("ij,sjf->sif", A, x) @ Wt + b), "einsum composite", target)


# --------------------------------------------------------------------------- knn
def _time_knn(q, x, mask, k):
    """(ours, stock) seconds for a filtered inner-product k-NN; stock: matmul, masked top-k."""
    def stock():
        s = (q @ x.T).float()
        s.masked_fill_(~mask, float("-inf"))
        return s.topk(k, dim=1)

    ours = gpu_time(lambda: ops.filtered_knn(q, x, mask, k, "ip"), reps=2, trials=3)
    return ours, gpu_time(stock, reps=2, trials=3)


def bench_knn():
    n, d, nq, k = 1_000_000, 384, 1000, 10
    x = torch.randn(n, d, device="cuda", dtype=torch.float16)
    q = torch.randn(nq, d, device="cuda", dtype=torch.float16)
    for sel in (0.01, 0.1, 0.5, 1.0):
        case = f"filtered_knn fp16 ip, 1000 x 1M x 384, k=10, selectivity {sel:.0%}"
        if not wanted(case):
            continue
        mask = torch.rand(n, device="cuda") < sel
        ours, base = _time_knn(q, x, mask, k)
        record(case, ours, base, "matmul+masked topk", "< 2 ms")


def bench_knn_scaling():
    """Every row allowed, with k and d varied: what the k-NN kernel's time follows. The
    products and row loads scale with d; the epilogue (threshold tests, bucket pushes, list
    inserts) with k and not with d. No targets: a diagnostic for issue #5's 100 % case."""
    n, nq = 1_000_000, 1000
    for d, k in ((384, 1), (384, 10), (384, 20), (128, 10), (64, 10)):  # k <= 22 keeps 3 stages at d = 384 in every mode
        case = f"filtered_knn scaling fp16 ip, 1000 x 1M x {d}, k={k}, selectivity 100%"
        if not wanted(case):
            continue
        x = torch.randn(n, d, device="cuda", dtype=torch.float16)
        q = torch.randn(nq, d, device="cuda", dtype=torch.float16)
        mask = torch.ones(n, device="cuda", dtype=torch.bool)
        ours, base = _time_knn(q, x, mask, k)
        record(case, ours, base, "matmul+masked topk", "")
        del x, q


def verdict(row) -> str:
    """Whether the row meets its issue target: "< X us|ms" against the graph-replay time where
    there is one (the GPU's own time, as the targets count) else the eager one; ">= R x"
    against stock / affectkit. Empty when the row has no target."""
    m = re.match(r"\s*<\s*([\d.]+)\s*(us|ms)", row["target"])
    if m:
        limit_us = float(m.group(1)) * (1000.0 if m.group(2) == "ms" else 1.0)
        ours = row["ours_graph_us"] if row["ours_graph_us"] is not None else row["ours_us"]
        return "yes" if ours < limit_us else "no"
    m = re.match(r"\s*>=\s*([\d.]+)\s*x", row["target"])
    if m:
        return "yes" if row["stock_us"] / row["ours_us"] >= float(m.group(1)) else "no"
    return ""


def write_table(path):
    """Print the rows as markdown; with a path, append them there (header on first write)."""
    card = torch.cuda.get_device_name()
    lines = []
    for r in ROWS:
        graph = "" if r["ours_graph_us"] is None else \
            f"{r['ours_graph_us']:.1f} / {r['stock_graph_us'] or math.nan:.1f} us"
        lines.append(f"| {card} | {r['case']} | {r['ours_us']:.1f} us | {r['stock']}: {r['stock_us']:.1f} us | "
                     f"{r['stock_us'] / r['ours_us']:.2f}x | {graph} | {r['target']} | {verdict(r)} |")
    header = ["| card | case | affectkit | stock | speed-up | graph replay: affectkit / stock | target | met |",
              "|---|---|---|---|---|---|---|---|"]
    print("\n".join(header + lines))
    if path:

        new = not os.path.exists(path)
        with open(path, "a") as f:
            f.write("\n".join((header if new else []) + lines) + "\n")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="markdown file the table rows are appended to")
    parser.add_argument("--only", default="attention,fusion,graph,knn",
                        help="comma-separated parts: attention, attention-small (no L=4096), attention-long "
                             "(only L=4096), fusion, graph, knn, knn-scaling (k and d varied, every row allowed)")
    parser.add_argument("--match", default="", help="only the cases whose name contains this text")
    args = parser.parse_args()
    global MATCH
    MATCH = args.match
    torch.manual_seed(0)
    for part in args.only.split(","):
        try:
            {"attention": bench_attention, "attention-small": lambda: bench_attention(False),
             "attention-long": lambda: bench_attention(True, False), "fusion": bench_fusion,
             "graph": bench_graph, "knn": bench_knn, "knn-scaling": bench_knn_scaling}[part]()
        except Exception:  # one broken family must not hide the others' numbers
            traceback.print_exc()
        torch.cuda.synchronize()
    write_table(args.out)


if __name__ == "__main__":
    main()
