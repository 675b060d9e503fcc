"""The ops inside CUDA graph capture: no host synchronisation while capturing (the value
checks that read data back are skipped then), and replays on new inputs match eager calls."""

import torch

import affectkit.ops as ops
from _support import capture_cuda_graph as _capture, requires_cuda


@requires_cuda
def test_attention_forward_and_backward_replay_match_eager(gen):
    B, H, Lq, Lk, D = 5, 3, 33, 41, 64
    q, k, v = (torch.randn(B, H, L, D, generator=gen).cuda().requires_grad_() for L in (Lq, Lk, Lk))
    lengths = torch.randint(0, Lk + 1, (B,), generator=gen).cuda()
    g = torch.randn(B, H, Lq, D, generator=gen).cuda()

    def step():
        out = ops.cross_modal_attention(q, k, v, kv_lengths=lengths, causal=True)
        return (out, *torch.autograd.grad(out, (q, k, v), g))

    graph, captured = _capture(step)
    for _ in range(2):  # new values in the same buffers, then replay
        with torch.no_grad():
            for t in (q, k, v, g):
                t.copy_(torch.randn(t.shape, generator=gen))
            lengths.copy_(torch.randint(0, Lk + 1, (B,), generator=gen))
        graph.replay()
        torch.cuda.synchronize()
        for got, want in zip(captured, step()):
            assert torch.equal(got, want)  # the same deterministic kernels on the same data


@requires_cuda
def test_masked_mean_replay_and_eager_checks_still_run(gen):
    x = torch.randn(7, 13, 37, generator=gen).cuda()
    lengths = torch.randint(0, 14, (7,), generator=gen).cuda()
    graph, captured = _capture(lambda: ops.masked_mean(x, lengths))
    lengths.copy_(torch.randint(0, 14, (7,), generator=gen))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, ops.masked_mean(x, lengths))
    # Outside capture a bad length is still a clear error.
    lengths[0] = 14
    try:
        ops.masked_mean(x, lengths)
    except ValueError as exc:
        assert "lengths" in str(exc)
    else:
        raise AssertionError("an out-of-range length outside capture must raise ValueError")
