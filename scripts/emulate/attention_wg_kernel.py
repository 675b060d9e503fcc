# Numpy emulation of one block of the wgmma attention forward
# (csrc/attention/cross_attention_wg_sm90a.cu), lane by lane where the kernel's index math is:
# the swizzled destinations of Q, K and V, the descriptor walks of S = Q K^T (K-major) and of
# O += P V (V N-major), the accumulator layout, the limits, the online softmax with its quad
# reductions, P repacked into A fragments, and the epilogue. Written before the kernel ran on a
# GPU (eleventh session); keep it in step with the kernel.
#
# Hardware model (PTX ISA, shared-memory matrix layouts, 128-byte swizzle; swizzle of a byte
# address a: a ^ (((a >> 7) & 7) << 4)):
#   K-major operand from a descriptor starting at S: element (m, k) at S + (m // 8) * 1024 +
#   (m % 8) * 128 + 2 k (k < 64 within a 128-byte column block).
#   N-major B (imm-trans-b = 1) with leading offset LBO and stride offset SBO: element (k, n)
#   at S + (k // 8) * SBO + (k % 8) * 128 + (n // 64) * LBO + 2 (n % 64): 8-key groups SBO
#   apart, 64-d column blocks LBO apart. That is the kernel's default descriptor; which order
#   the hardware wants is what scripts/probe/wgmma_attention_probe.cu finds out.
#   A from registers (m64k16): thread (w, g, c) holds A(16 w + g, 2 c .. 2 c + 1),
#   A(16 w + g + 8, 2 c ..), A(16 w + g, 2 c + 8 ..), A(16 w + g + 8, 2 c + 8 ..) in its 4
#   registers, low half first. Accumulators: d[j][2 h + e] = D(16 w + 8 h + g, 8 j + 2 c + e).
#
# Usage: python3 attention_wg_kernel.py [--bug NAME]; exits non-zero on a mismatch.
import argparse
import sys

import numpy as np

D, ROWS, KEYS, STAGES = 128, 128, 128, 2
OPERAND, BLOCK = 128 * D * 2, 128 * 128
BUG = None


def swz(a):
    return a ^ (((a >> 7) & 7) << 4)


def sw128_offset(r, p):
    return r * 128 + ((p ^ (r & 7)) * 16)


def stage_operand(mem, dst, src, valid):
    """The kernel's stage_operand: rows < valid by 16-byte pieces into the swizzled blocks."""
    for i in range(128 * (D // 8)):
        r, p = divmod(i, D // 8)
        addr = dst + (p // 8) * BLOCK + sw128_offset(r, p % 8)
        mem[addr // 2: addr // 2 + 8] = src[r, 8 * p: 8 * p + 8] if r < valid else 0.0


def kmajor(mem, start, rows):
    m, k = np.meshgrid(np.arange(rows), np.arange(16), indexing="ij")
    return mem[swz(start + (m // 8) * 1024 + (m % 8) * 128 + 2 * k) // 2]


def nmajor(mem, start, leading, stride):
    k, n = np.meshgrid(np.arange(16), np.arange(D), indexing="ij")
    return mem[swz(start + (k // 8) * stride + (k % 8) * 128 + (n // 64) * leading + 2 * (n % 64)) // 2]


def lanes():
    for w in range(4):
        for lane in range(32):
            yield w, lane >> 2, lane & 3


def to_acc(M):
    """Per-lane accumulators of a 64 x N product: acc[w, g, c][j, 2h + e]."""
    n = M.shape[1] // 8
    return {(w, g, c): np.array([[M[16 * w + 8 * h + g, 8 * j + 2 * c + e] for h in (0, 1) for e in (0, 1)]
                                 for j in range(n)]) for w, g, c in lanes()}


def a_from_registers(pa_t):
    """The 64 x 16 A operand that the lanes' 4 registers (as pairs) of one k-step name."""
    A = np.full((64, 16), np.nan)
    for (w, g, c), regs in pa_t.items():
        (a0, a1), (a2, a3), (a4, a5), (a6, a7) = regs
        A[16 * w + g, 2 * c: 2 * c + 2] = a0, a1
        A[16 * w + g + 8, 2 * c: 2 * c + 2] = a2, a3
        A[16 * w + g, 2 * c + 8: 2 * c + 10] = a4, a5
        A[16 * w + g + 8, 2 * c + 8: 2 * c + 10] = a6, a7
    return A


def half(x):
    return np.float64(np.float16(x))


def run_block(rng, Lq, Lk, qlen, klen, causal, scale, r0):
    """Rows r0 .. r0 + 127 of one (b, h): (out, lse) as the kernel writes them, and the float64 truth."""
    q = rng.standard_normal((Lq, D)).astype(np.float16).astype(np.float64)
    k = rng.standard_normal((Lk, D)).astype(np.float16).astype(np.float64)
    v = rng.standard_normal((Lk, D)).astype(np.float16).astype(np.float64)
    offset = Lk - Lq
    key_end = lambda i: min(max(i + offset + 1, 0), klen) if causal else klen  # noqa: E731
    qvalid = qlen - r0
    kend_blk = key_end(r0 + min(ROWS, qvalid) - 1) if qvalid > 0 else 0
    n_tiles = -(-kend_blk // KEYS)
    raw = int(rng.integers(0, 64)) * 16
    base = raw + (1024 - raw % 1024) % 1024
    mem = np.full((base + OPERAND * (1 + 2 * STAGES)) // 2 + 8, np.nan)  # halves, poisoned
    sQ, sKV = base, base + OPERAND
    pad = lambda x, n: np.vstack([x, np.zeros((max(0, n - len(x)), D))])[:n]  # noqa: E731
    stage_operand(mem, sQ, pad(q[r0:], 128), qvalid if n_tiles > 0 else 0)
    leading, stride = (BLOCK, 1024) if BUG != "vdesc" else (1024, BLOCK)  # planted: the other order
    scale_log2 = scale * 1.4426950408889634
    out, lse = np.full((128, D), np.nan), np.full(128, np.nan)
    state = {}  # per warpgroup: o (per lane), m, l (per lane and half)
    for wg in range(2):
        state[wg] = dict(o={ln: np.zeros((16, 4)) for ln in lanes()}, m={ln: [-np.inf] * 2 for ln in lanes()},
                         l={ln: [0.0, 0.0] for ln in lanes()})
    for t in range(n_tiles):
        j0 = t * KEYS
        dK = sKV + (t % STAGES) * 2 * OPERAND
        stage_operand(mem, dK, pad(k[j0:], 128), kend_blk - j0)
        stage_operand(mem, dK + OPERAND, pad(v[j0:], 128), kend_blk - j0)
        for wg in range(2):
            wg_r0 = r0 + 64 * wg
            wg_kmin = key_end(wg_r0) if wg_r0 + 63 < qlen else 0
            wg_kmax = key_end(min(wg_r0 + 63, qlen - 1)) if wg_r0 < qlen else 0
            if j0 >= wg_kmax:
                continue
            limits = not (j0 + KEYS <= wg_kmin)
            q_addr = sQ + 64 * wg * 128
            S = np.zeros((64, KEYS))
            for blk in range(2):
                for kk in range(4):
                    step = 32 * kk if BUG != "kstep" else 16 * kk  # planted: 16 bytes a k16 step
                    S += kmajor(mem, q_addr + blk * BLOCK + step, 64) @ kmajor(mem, dK + blk * BLOCK + step, KEYS).T
            sc = to_acc(S)
            st = state[wg]
            pa = {}
            for (w, g, c), a in sc.items():
                rows = [wg_r0 + 16 * w + hh * 8 + g for hh in (0, 1)]
                kend = [key_end(i) if i < qlen else 0 for i in rows]
                a = a.copy()
                if limits:
                    for n in range(16):
                        for e in range(4):
                            if j0 + n * 8 + 2 * c + (e & 1) >= kend[e >> 1]:
                                a[n, e] = -np.inf
                sc[(w, g, c)] = a
            # quad reductions: a row's four owners are c = 0..3 of the same (w, g)
            for (w, g, c), a in sc.items():
                quad = [sc[(w, g, cc)] for cc in range(4)]
                mx = [max(st["m"][(w, g, c)][hh], max(float(np.max(x[:, 2 * hh: 2 * hh + 2])) for x in quad))
                      for hh in (0, 1)]
                alpha, shift = [], []
                for hh in (0, 1):
                    b = 0.0 if mx[hh] == -np.inf else mx[hh]
                    alpha.append(np.exp2((st["m"][(w, g, c)][hh] - b) * scale_log2))
                    shift.append(-b * scale_log2)
                st["m"][(w, g, c)] = mx
                e4 = np.exp2(a * scale_log2 + np.array([shift[0], shift[0], shift[1], shift[1]]))
                sums = [e4[:, 0:2].sum(), e4[:, 2:4].sum()]
                regs = []
                for n in range(16):
                    regs.append((tuple(map(half, e4[n, 0:2])), tuple(map(half, e4[n, 2:4]))))
                pa[(w, g, c)] = [[regs[2 * tt][0], regs[2 * tt][1], regs[2 * tt + 1][0], regs[2 * tt + 1][1]]
                                 for tt in range(8)]
                if BUG == "pa_order":  # planted: the two key halves of a k-step swapped
                    pa[(w, g, c)] = [[r[2], r[3], r[0], r[1]] for r in pa[(w, g, c)]]
                for hh in (0, 1):
                    st["l"][(w, g, c)][hh] = st["l"][(w, g, c)][hh] * alpha[hh] + sums[hh]
                o = st["o"][(w, g, c)]
                o[:, 0:2] *= alpha[0]
                o[:, 2:4] *= alpha[1]
            v_addr = dK + OPERAND
            O = np.zeros((64, D))
            for tt in range(KEYS // 16):
                vstep = tt * 16 * 128 if BUG != "vstep" else tt * 16 * 64  # planted: half a row per key
                A = a_from_registers({ln: pa[ln][tt] for ln in pa})
                O += A @ nmajor(mem, v_addr + vstep, leading, stride)
            for ln, add in to_acc(O).items():
                st["o"][ln] += add
    for wg in range(2):
        st = state[wg]
        for (w, g, c) in lanes():
            lsum = [sum(st["l"][(w, g, cc)][hh] for cc in range(4)) for hh in (0, 1)]
            for hh in (0, 1):
                i = 64 * wg + 16 * w + hh * 8 + g  # row within the block
                if r0 + i >= Lq:
                    continue
                any_ = lsum[hh] > 0
                inv = 1 / lsum[hh] if any_ else 0.0
                for n in range(16):
                    out[i, n * 8 + 2 * c: n * 8 + 2 * c + 2] = [half(st["o"][(w, g, c)][n, 2 * hh + e] * inv) for e in (0, 1)]
                if c == 0:
                    lse[i] = st["m"][(w, g, c)][hh] * scale_log2 * np.log(2) + np.log(lsum[hh]) if any_ else np.inf
    # float64 truth for the block's rows
    want_o, want_l = np.zeros((128, D)), np.full(128, np.inf)
    for i in range(128):
        r = r0 + i
        if r >= Lq:
            continue
        if r < qlen and key_end(r) > 0:
            s = scale * (k[: key_end(r)] @ q[r])
            mmax = s.max()
            p = np.exp(s - mmax)
            want_o[i] = p @ v[: key_end(r)] / p.sum()
            want_l[i] = mmax + np.log(p.sum())
    rows = min(128, Lq - r0)
    return out[:rows], lse[:rows], want_o[:rows], want_l[:rows]


def main():
    global BUG
    ap = argparse.ArgumentParser()
    ap.add_argument("--bug", default=None, help="planted bug: vdesc | kstep | pa_order | vstep")
    BUG = ap.parse_args().bug
    rng = np.random.default_rng()
    cases = [  # Lq, Lk, qlen, klen, causal, block start
        (300, 257, 300, 257, False, 128),
        (200, 333, 150, 300, True, 0),
        (256, 256, 256, 256, True, 128),
        (130, 140, 130, 0, False, 0),
        (300, 257, 290, 257, True, 256),   # rows past qlen and past Lq in the last block
        (256, 300, 140, 300, True, 128),   # one warpgroup with nothing visible (it skips every tile)
    ]
    failures = 0
    for Lq, Lk, qlen, klen, causal, r0 in cases:
        out, lse, want_o, want_l = run_block(rng, Lq, Lk, qlen, klen, causal, 1 / np.sqrt(D), r0)
        inf = np.isinf(want_l)
        err = np.abs(out - want_o).max() / max(1e-30, np.abs(want_o).max()) if (~inf).any() else 0.0
        ok = (not np.isnan(out).any() and not np.isnan(lse).any() and np.array_equal(np.isinf(lse), inf)
              and (out[inf] == 0).all() and err < 5e-3 and np.allclose(lse[~inf], want_l[~inf], atol=1e-3))
        failures += not ok
        print(f"Lq={Lq} Lk={Lk} qlen={qlen} klen={klen} causal={causal} rows {r0}+: "
              f"{'ok' if ok else 'MISMATCH'} (max error {err:.2e} of max |O|)")
    print(f"{len(cases) - failures} of {len(cases)} cases match")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
