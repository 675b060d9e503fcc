"""graph_conv and the fused hierarchy level against the stock PyTorch composite (and PyG).

Setting of the issue: 2,048 windows, float32, the real electrode graphs (GCN-normalised
4-nearest-neighbour graphs of the DREAMER 14, DEAP 32 and SEED 62 montages), run with
OMP_NUM_THREADS=2. Floors per call (one read of x, one write of the output; useful flops):

    N = 14, 5 -> 32:   x 0.57 MB, out 3.67 MB, 2*2048*(14*14*5 + 14*5*32)  = 13 MFLOP
    N = 32, 5 -> 32:   x 1.31 MB, out 8.39 MB, 2*2048*(32*32*5 + 32*5*32)  = 42 MFLOP
    N = 62, 64 -> 64:  x 32.5 MB, out 32.5 MB, 2*2048*(62*62*64 + 62*64*64) = 2.05 GFLOP

All three are bound by arithmetic on a machine whose L3 holds the tensors: filling 3.7 MB
takes about 22 us on these two cores, while 13 MFLOP take at least 69 us at one 512-bit FMA
per cycle per core (N = 14); N = 62 needs about 11 ms at the ~180 GFLOP/s of a large float32
GEMM on two cores. The backward pass costs about twice the forward's flops
(grad x, grad W, grad A) and reads x, out and grad_out.

Baselines: "torch" is matmul(matmul(A, x), W) + b, relu (and the pooling as a matmul with
the pooling weights); "torch_einsum" is the same with einsum for the propagation; "pyg" is
PyTorch Geometric's GCNConv (normalize=False, the same edge weights) on the block-diagonal
batch, measured only where torch_geometric is installed.
"""

import pytest
import torch

import affectkit.ops as ops
from affectkit.eeg import DEAP_CHANNELS, DREAMER_CHANNELS, SEED_CHANNELS, gcn_normalize, knn_adjacency, standard_montage
from affectkit.eeg.presets import HISTN_REGIONS

WINDOWS = 2048
CASES = {14: (DREAMER_CHANNELS, 5, 32), 32: (DEAP_CHANNELS, 5, 32), 62: (SEED_CHANNELS, 64, 64)}
IMPLS = ["affectkit", "torch", "torch_einsum", "pyg"]


def _graph(channels):
    return gcn_normalize(knn_adjacency(standard_montage(channels), k=4))


def _inputs(N, requires_grad=False):
    channels, F, Fo = CASES[N]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(WINDOWS, N, F, generator=g, requires_grad=requires_grad)
    W = (torch.randn(F, Fo, generator=g) / F**0.5).requires_grad_(requires_grad)
    b = torch.randn(Fo, generator=g).requires_grad_(requires_grad)
    return x, _graph(channels), W, b


def torch_conv(x, A, W, b):
    return torch.relu(torch.matmul(torch.matmul(A, x), W) + b)


def torch_einsum_conv(x, A, W, b):
    return torch.relu(torch.einsum("ij,sjf->sif", A, x) @ W + b)


def affectkit_conv(x, A, W, b):
    return ops.graph_conv(x, A, W, b, "relu")


def _pyg_conv(A, W, b):
    """GCNConv on the block-diagonal batch of WINDOWS copies of A, sharing W and b."""
    gnn = pytest.importorskip("torch_geometric.nn", reason="torch_geometric is not installed (optional baseline)")
    N, (F, Fo) = A.shape[0], W.shape
    conv = gnn.GCNConv(F, Fo, normalize=False, bias=True)
    with torch.no_grad():
        conv.lin.weight.copy_(W.detach().T)
        conv.bias.copy_(b.detach())
    src, dst = A.nonzero(as_tuple=True)
    offsets = (torch.arange(WINDOWS) * N).repeat_interleave(src.numel())
    # GCNConv aggregates messages source -> target: out[i] = sum_j A[i, j] x[j].
    edge_index = torch.stack([dst.repeat(WINDOWS) + offsets, src.repeat(WINDOWS) + offsets])
    edge_weight = A[src, dst].repeat(WINDOWS)

    def run(x, A_, W_, b_):
        return torch.relu(conv(x.reshape(-1, F), edge_index, edge_weight)).reshape(WINDOWS, N, Fo)

    return run


def _impl(name, A, W, b):
    if name == "pyg":
        return _pyg_conv(A, W, b)
    return {"affectkit": affectkit_conv, "torch": torch_conv, "torch_einsum": torch_einsum_conv}[name]


def _fwd_bwd(fn, params):
    def step(*args):
        fn(*args).sum().backward()
        for p in params:
            p.grad = None

    return step


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("N", list(CASES))
def bench_graph_conv_forward(bench, impl, N):
    x, A, W, b = _inputs(N)
    fn = _impl(impl, A, W, b)
    _, F, Fo = CASES[N]
    with torch.no_grad():
        bench(f"graph_conv fwd {WINDOWS}x{N} {F}->{Fo}", impl, fn, x, A, W, b)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("N", list(CASES))
def bench_graph_conv_forward_backward(bench, impl, N):
    x, A, W, b = _inputs(N, requires_grad=True)
    fn = _impl(impl, A, W, b)
    _, F, Fo = CASES[N]
    params = [x, W, b]
    if impl == "pyg":  # GCNConv keeps its own copies of W and b
        params = [x]
    bench(f"graph_conv fwd+bwd {WINDOWS}x{N} {F}->{Fo}", impl, _fwd_bwd(fn, params), x, A, W, b)


# One whole HiSTN-style level on DREAMER: propagate, transform, bias, relu, attention pooling of
# the 14 electrodes into the 4 regions; both outputs are kept.


def _level_inputs(requires_grad=False):
    x, A, W, b = _inputs(14, requires_grad)
    index = {c: i for i, c in enumerate(DREAMER_CHANNELS)}
    assignment = torch.empty(14, dtype=torch.int64)
    for r, chans in enumerate(HISTN_REGIONS.values()):
        assignment[[index[c] for c in chans]] = r
    scores = torch.randn(WINDOWS, 14, generator=torch.Generator().manual_seed(1), requires_grad=requires_grad)
    return x, A, W, b, assignment, scores


def torch_level(x, A, W, b, assignment, scores):
    node = torch.relu(torch.matmul(torch.matmul(A, x), W) + b)
    member = torch.nn.functional.one_hot(assignment, 4).T.bool()  # (P, N)
    logits = scores.unsqueeze(1).masked_fill(~member, float("-inf"))  # (S, P, N)
    return node, torch.softmax(logits, -1) @ node


def affectkit_level(x, A, W, b, assignment, scores):
    return ops.graph_conv_pool(x, A, assignment, W, b, "relu", scores, 4)


def _level_sum(fn):
    def step(*args):
        node, pooled = fn(*args)
        (node.sum() + pooled.sum()).backward()
        for t in args:
            if isinstance(t, torch.Tensor) and t.requires_grad:
                t.grad = None

    return step


@pytest.mark.parametrize("impl", ["affectkit", "torch"])
def bench_graph_conv_pool_forward(bench, impl):
    args = _level_inputs()
    fn = affectkit_level if impl == "affectkit" else torch_level
    with torch.no_grad():
        bench(f"graph_conv_pool fwd {WINDOWS}x14 5->32 -> 4 regions", impl, fn, *args)


@pytest.mark.parametrize("impl", ["affectkit", "torch"])
def bench_graph_conv_pool_forward_backward(bench, impl):
    args = _level_inputs(requires_grad=True)
    fn = affectkit_level if impl == "affectkit" else torch_level
    bench(f"graph_conv_pool fwd+bwd {WINDOWS}x14 5->32 -> 4 regions", impl, _level_sum(fn), *args)
