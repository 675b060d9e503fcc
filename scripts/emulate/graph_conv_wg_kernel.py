# Numpy emulation of wg_conv_kernel (csrc/graph/graph_conv_wg_sm90a.cu): the split operands in
# swizzled shared memory (elem_offset, step_offset), the products read through descriptors
# (TF32 big words, bf16 pairs), the accumulator coordinates, the Z^T hand-over between the two
# phases in registers and the epilogue's output coordinates, against float64. Written before the kernel ran
# on a GPU (tenth session); keep it in step with the kernel.
#
# Hardware model as in knn_wgmma_layout.py (K-major, 128-byte swizzle, 1024 bytes between
# 8-row groups, 32 bytes per k step); TF32 operands are read with the low 13 bits dropped, bf16
# pairs as two bf16 values (the lower K slot in the low half), products summed in float64 here
# (the tensor cores' float32 sums are within the tolerance below).
#
# Phase 2 is Y^T = Z^T A^T: Z^T split from phase 1's accumulators into register fragments (CuTe's
# ALayout_64x8 for tf32, ALayout_64x16 for the bf16 pairs), A staged as a right operand with its
# columns in permute_k order, the outputs stored from Y^T's accumulators.
#
# --wregs: kWRegs's phase 1 (AFFECTKIT_GRAPH_WG_WREGS=1), W^T as register fragments read back
# from its staged words, x from shared memory.
#
# Usage: python3 graph_conv_wg_kernel.py [--wregs] [--bug NAME]; exits non-zero on a failure.
import argparse
import sys

import numpy as np

f32 = np.float32
K64 = 64
BUG = None
WREGS = False


def sw128_offset(r, p):
    return r * 128 + ((p ^ (r & 7)) * 16)


def elem_offset(r, k):
    if BUG == "column_block":  # planted: the column blocks 8 KB apart ignored
        return sw128_offset(r, (k & 31) >> 2) + 4 * (k & 3)
    return (k >> 5) * (K64 * 128) + sw128_offset(r, (k & 31) >> 2) + 4 * (k & 3)


def step_offset(t):
    return (t >> 2) * (K64 * 128) + 32 * (t & 3)


def tf32_round(v):
    return ((np.asarray(v, f32).view(np.uint32) + np.uint32(0x1000)) & np.uint32(0xffffe000)).view(f32)


def bf16_bits(v):
    b = np.asarray(v, f32).view(np.uint32).astype(np.uint64)
    return (((b + 0x7fff + ((b >> 16) & 1)) >> 16) & 0xffff).astype(np.uint32)


def split_pair(v, left):
    """(big word, pair word) of float32 values v, as split_pair<Left>."""
    v = np.asarray(v, f32)
    big = tf32_round(v)
    small = (v - big).astype(f32)
    lo, hi = (v, small) if left else (small, v)
    if BUG == "pair_order" and not left:  # planted: the right operand packed like a left one
        lo, hi = v, small
    return big.view(np.uint32), bf16_bits(lo) | (bf16_bits(hi) << 16)


class Shared:
    def __init__(self, nbytes):
        self.w = np.full(nbytes // 4, 0x7fc00000, np.uint32)  # NaN-poisoned words

    def put(self, off, words):
        self.w[off // 4] = words

    def word(self, a):
        return self.w[a // 4]


def read_operand(sm, start, bf16):
    """The 64 x K matrix a descriptor starting at `start` names (one k step: K = 8 floats or
    16 bf16), as float64."""
    m = np.arange(64)[:, None]
    if bf16:
        kk = np.arange(16)[None, :]
        a = start + (m // 8) * 1024 + (m % 8) * 128 + 2 * kk
        a = a ^ (((a >> 7) & 7) << 4)
        words = sm.word(a & ~3)
        half = np.where(a & 2, words >> 16, words & 0xffff).astype(np.uint32)
        return (half << 16).view(f32).astype(np.float64)
    kk = np.arange(8)[None, :]
    a = start + (m // 8) * 1024 + (m % 8) * 128 + 4 * kk
    a = a ^ (((a >> 7) & 7) << 4)
    return (sm.word(a) & np.uint32(0xffffe000)).view(f32).astype(np.float64)


def product(sm, l_big, l_pair, r_big, r_pair):
    D = np.zeros((64, 64))
    for t in range(8):
        D += read_operand(sm, l_pair + step_offset(t), True) @ read_operand(sm, r_pair + step_offset(t), True).T
    for t in range(8):
        st = step_offset(t) if BUG != "k_step" else 32 * t  # planted: column blocks skipped
        D += read_operand(sm, l_big + st, False) @ read_operand(sm, r_big + st, False).T
    return D.astype(f32)


def permute_k(k):
    if BUG == "no_permute":  # planted: A staged in plain column order
        return k
    return (k & ~7) | ((k & 3) << 1) | ((k >> 2) & 1)


def fragment_matrix(regs, bf16):
    """The 64 x K left operand that per-thread registers regs[warp][lane][i] (uint32 words) hand
    to one wgmma k step: tf32 a[i] = L(16 w + g + 8 (i & 1), c + 4 (i >> 1)); bf16: the pair of
    slots 2 k, 2 k + 1 of that k (low half first)."""
    L = np.zeros((64, 16 if bf16 else 8))
    for w in range(4):
        for lane in range(32):
            g, c = lane >> 2, lane & 3
            for i in range(4):
                m, k = 16 * w + g + 8 * (i & 1), c + 4 * (i >> 1)
                word = np.uint32(regs[w][lane][i])
                if bf16:
                    L[m, 2 * k] = np.array([(word & 0xffff) << 16], np.uint32).view(f32)[0]
                    L[m, 2 * k + 1] = np.array([(word >> 16) << 16], np.uint32).view(f32)[0]
                else:
                    L[m, k] = np.array([word & np.uint32(0xffffe000)], np.uint32).view(f32)[0]
    return L


def product_rs(sm, words, r_big, r_pair):
    """D = L R^T over K = 64 with L from register fragments and R (big, pair) from shared
    memory. words(t, w, g, c) gives thread (w, 4 g + c)'s (big, pair) words of k step t."""
    D = np.zeros((64, 64))
    for t in range(8):
        big = [[None] * 32 for _ in range(4)]
        pair = [[None] * 32 for _ in range(4)]
        for w in range(4):
            for lane in range(32):
                big[w][lane], pair[w][lane] = words(t, w, lane >> 2, lane & 3)
        D += fragment_matrix(pair, True) @ read_operand(sm, r_pair + step_offset(t), True).T
        D += fragment_matrix(big, False) @ read_operand(sm, r_big + step_offset(t), False).T
    return D.astype(f32)


def phase2_regs(sm, D1, adj_big, adj_pair):
    """kRegsZ's phase 2: D2 (rows fo, columns n) = Z^T A^T from register fragments of D1."""
    def words(t, w, g, c):
        acc = [D1[16 * w + g, 8 * t + 2 * c], D1[16 * w + g, 8 * t + 2 * c + 1],
               D1[16 * w + 8 + g, 8 * t + 2 * c], D1[16 * w + 8 + g, 8 * t + 2 * c + 1]]  # acc[t][0..3]
        order = [0, 2, 1, 3] if BUG != "rs_order" else [0, 1, 2, 3]  # planted: accumulator order
        return split_pair(np.array([acc[o] for o in order], f32), True)

    return product_rs(sm, words, adj_big, adj_pair)


def phase1_wregs(sm, wt_big, wt_pair, buf_big, buf_pair):
    """kWRegs's phase 1: D1 (rows fo, columns n) = W^T x^T, W^T's fragments read from its staged
    words: k step t, a[i] = W^T(16 w + g + 8 (i & 1), 8 t + c + 4 (i >> 1))."""
    def words(t, w, g, c):
        if BUG == "wregs_rows":  # planted: i's bits swapped (rows from bit 1, k from bit 0)
            offs = [elem_offset(16 * w + g + 8 * (i >> 1), 8 * t + c + 4 * (i & 1)) for i in range(4)]
        else:
            offs = [elem_offset(16 * w + g + 8 * (i & 1), 8 * t + c + 4 * (i >> 1)) for i in range(4)]
        return [sm.word(wt_big + o) for o in offs], [sm.word(wt_pair + o) for o in offs]

    return product_rs(sm, words, buf_big, buf_pair)


def stage(sm, big_off, pair_off, m, left):
    r, k = np.meshgrid(np.arange(64), np.arange(64), indexing="ij")
    v = np.zeros((64, 64), f32)
    v[: m.shape[0], : m.shape[1]] = m
    big, pair = split_pair(v, left)
    sm.put(big_off + elem_offset(r, k), big)
    sm.put(pair_off + elem_offset(r, k), pair)


def run(S, N, F, Fo, act, rng):
    kOperand = 64 * 64 * 4
    wt_big, wt_pair, adj_big, adj_pair = 0, kOperand, 2 * kOperand, 3 * kOperand
    buf_big, buf_pair = 4 * kOperand, 5 * kOperand
    sm = Shared(6 * kOperand)
    x = (rng.standard_normal((S, N, F)) * np.exp(rng.standard_normal((S, N, F)) * 2.3)).astype(f32)
    A = (rng.standard_normal((N, N)) / np.sqrt(N)).astype(f32)
    W = (rng.standard_normal((F, Fo)) / np.sqrt(F)).astype(f32)
    b = rng.standard_normal(Fo).astype(f32)
    stage(sm, wt_big, wt_pair, W.T, True)
    Ap = np.zeros((N, 64), f32)  # a right operand, columns in permute_k order
    cols = np.array([permute_k(k) for k in range(64)])
    Ap[:, cols < N] = A[:, cols[cols < N]]
    stage(sm, adj_big, adj_pair, Ap, False)
    bias = np.zeros(64, f32)
    bias[:Fo] = b
    out = np.full((S, N, Fo), np.nan, f32)
    for s in range(S):
        # The buffer held the previous sample's Z^T: poison it, so a piece the x stores skip shows.
        sm.w[buf_big // 4: (buf_pair + kOperand) // 4] = 0x7fc00000
        for gt in range(128):  # x split-stores: piece i = gt + 128 r of the whole 64 x 64 operand
            for r in range(8):
                i = gt + 128 * r
                row, col = i // 16, 4 * (i % 16)
                inside = row < N and col < F
                if BUG == "padding_skipped" and not inside:  # planted: the padding left as it was
                    continue
                v = x[s, row, col: col + 4] if inside else np.zeros(4, f32)
                big, pair = split_pair(v, False)
                off = elem_offset(row, col)
                sm.put(buf_big + off + 4 * np.arange(4), big)
                sm.put(buf_pair + off + 4 * np.arange(4), pair)
        if WREGS:
            D1 = phase1_wregs(sm, wt_big, wt_pair, buf_big, buf_pair)
        else:
            D1 = product(sm, wt_big, wt_pair, buf_big, buf_pair)
        D2 = phase2_regs(sm, D1, adj_big, adj_pair)
        for warp in range(4):  # Y^T (row fo = 16 w + 8 h + g, column n = 8 j + 2 c + e)
            for lane in range(32):
                g, c = lane >> 2, lane & 3
                for h in range(2):
                    fo = 16 * warp + 8 * h + g
                    if fo >= Fo:
                        continue
                    for j in range(8):
                        for e in range(2):
                            n = 8 * j + 2 * c + e
                            if n < N:
                                out[s, n, fo] = ACT[act](D2[fo, n] + bias[fo])
    want = ACT[act](np.einsum("nm,smf,fo->sno", A.astype(np.float64), x.astype(np.float64), W.astype(np.float64)) + b)
    # The size of the terms each output sums (activations have slopes <= 1): the split products'
    # error is relative to it, not to outputs that cancel (x spans 1e-4 .. 1e4 here).
    scale = np.einsum("nm,smf,fo->sno", np.abs(A.astype(np.float64)), np.abs(x.astype(np.float64)),
                      np.abs(W.astype(np.float64))) + np.abs(b)
    return out, want, scale


ACT = {0: lambda v: v, 1: lambda v: np.maximum(v, 0), 4: np.tanh}


def main():
    global BUG, WREGS
    ap = argparse.ArgumentParser()
    ap.add_argument("--bug", default=None, help="planted bug: column_block | pair_order | k_step | "
                    "padding_skipped | rs_order | no_permute | wregs_rows (with --wregs)")
    ap.add_argument("--wregs", action="store_true", help="phase 1 with W^T's fragments in registers")
    args = ap.parse_args()
    BUG, WREGS = args.bug, args.wregs
    rng = np.random.default_rng()
    failures = 0
    cases = [(2, 62, 64, 64, 0), (1, 64, 64, 1, 1), (2, 13, 32, 33, 4), (1, 1, 4, 7, 0), (1, 31, 8, 64, 1)]
    for S, N, F, Fo, act in cases:
        out, want, scale = run(S, N, F, Fo, act, rng)
        err = np.linalg.norm(out - want) / np.linalg.norm(scale)
        ok = not np.isnan(out).any() and err <= 1e-5
        failures += not ok
        print(f"S={S} N={N:2d} F={F:2d} Fo={Fo:2d} act={act}: error relative to the terms' size {err:.2e} "
              f"{'ok' if ok else 'FAIL'}")
    print(f"{len(cases) - failures} of {len(cases)} cases pass")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
