# Numpy emulation of the data path of the k-NN kernel's wgmma instantiation
# (csrc/knn/exact_knn_mma_kernel.cuh, kWG = true): the swizzled cp.async destinations of the
# resident queries and of a row stage, the shared-memory descriptors of the wgmma steps, the
# accumulator layout, and the epilogue's qloc / rloc / at() reading the scores back. Written
# before the kernel ran on a GPU (tenth session); keep it in step with the kernel.
#
# The hardware model (PTX ISA, "Shared memory matrix layout", K-major, 128-byte swizzle):
# element (m, k) of an operand whose descriptor starts at byte S lies at
# a = S + (m // 8) * SBO + (m % 8) * 128 + 2 k with SBO = 1024, then swizzled:
# a ^ (((a >> 7) & 7) << 4) (bits 4-6 XOR bits 7-9; every 8-row group 1024-byte aligned).
# Accumulators of m64nNk16: thread t of warp w (within the warpgroup), g = t / 4, c = t % 4,
# holds d[j][2 h + e] = D(16 w + 8 h + g, 8 j + 2 c + e).
#
# Usage: python3 knn_wgmma_layout.py [--bug NAME]; exits non-zero on a mismatch.
import argparse
import sys

import numpy as np

kBQ, kBN, kBK, kThreads = 128, 256, 64, 256
BUG = None


def align(x, a):
    return (x + a - 1) // a * a


def sw128_offset(r, p):
    if BUG == "loader_swizzle":  # planted: the XOR left out
        return r * 128 + p * 16
    return r * 128 + ((p ^ (r & 7)) * 16)


def layout(d, k, stages):
    """Layout(d, k, stages, wg = true): (qs, xs, total) byte offsets, as in the kernel."""
    dpad = align(d, kBK)
    qs = 0
    xs = qs + align(kBQ * dpad * 2, 1024)
    off = xs + align(stages * kBN * kBK * 2, 1024)
    for size in (kBQ * k * 4, kBQ * k * 4, kBQ * 4, kBQ * 4, kBQ * 4, kBN * 4, kBQ * 8 * 4, kBQ * 8 * 4, kBQ * 4):
        off += align(size, 128)
    return qs, xs, off + 1024


def store16(mem, addr, halves):
    assert addr % 16 == 0
    mem[addr // 2: addr // 2 + 8] = halves


def operand(mem, start, rows):
    """The (rows x 16) matrix a K-major, 128-byte swizzled descriptor starting at `start` names."""
    out = np.empty((rows, 16), np.float64)
    for m in range(rows):
        for kk in range(16):
            a = start + (m // 8) * 1024 + (m % 8) * 128 + 2 * kk
            a ^= ((a >> 7) & 7) << 4
            out[m, kk] = mem[a // 2]
    return out


def l2_slab(mem, row_addr, tid, acc, dtype):
    """The kernel's l2 loop over one 64-column slab of staged row tid: piece v (8 halves) read
    at v ^ (tid % 8) of the swizzled row, i.e. in column order, pairs summed as in the kernel
    (acc += a * a + b * b) in `dtype`."""
    acc = dtype(acc)
    for v in range(kBK // 8):
        phys = v if BUG == "l2_order" else v ^ (tid & 7)  # planted: the stored order
        piece = mem[(row_addr + 16 * phys) // 2:][:8].astype(dtype)
        for e in range(4):
            acc = dtype(acc + dtype(dtype(piece[2 * e] * piece[2 * e]) + dtype(piece[2 * e + 1] * piece[2 * e + 1])))
    return acc


def l2_order_matches_mma_sync(rng):
    """With float16 rows (not the integers of run_tile, whose sums are exact in any order), the
    float32 norms of a swizzled wgmma stage must equal, bit for bit, the same loop over rows in
    column order (the mma.sync stage), so both kernels break l2 ties alike."""
    x = rng.standard_normal((kBN, kBK)).astype(np.float16).astype(np.float64)
    mem = np.zeros(kBN * kBK)
    for r in range(kBN):
        for p in range(kBK // 8):
            store16(mem, sw128_offset(r, p), x[r, 8 * p: 8 * p + 8])
    plain = np.zeros(kBN * kBK)
    plain[:] = x.reshape(-1)
    global BUG
    planted, BUG = BUG, (None if BUG == "l2_order" else BUG)
    want = [l2_slab(plain, r * 128, 0, 0.0, np.float32) for r in range(kBN)]  # tid 0: no XOR
    BUG = planted
    got = [l2_slab(mem, r * 128, r, 0.0, np.float32) for r in range(kBN)]
    return all(g == w for g, w in zip(got, want))


def run_tile(d, stages, raw_base, rng):
    """One tile of the kernel's data path; returns the scores as the epilogue reads them and
    the float64 truth, both (128 queries, 256 rows)."""
    _, xs_off, total = layout(d, 10, stages)
    base = raw_base + ((1024 - raw_base % 1024) % 1024)  # the kernel's 1024-byte alignment
    assert base % 1024 == 0 and base + total - 1024 <= raw_base + total
    mem = np.full((raw_base + total) // 2 + 8, np.nan)  # halves, poisoned
    nq_valid = int(rng.integers(1, kBQ + 1))
    q = rng.integers(-3, 4, (kBQ, d)).astype(np.float64)
    q[nq_valid:] = 0
    x = rng.integers(-3, 4, (kBN, d)).astype(np.float64)
    ksteps = (d + kBK - 1) // kBK
    p8, d8 = ksteps * 8, d // 8
    qs = base  # qs offset 0
    for i in range(kBQ * p8):
        r, p = divmod(i, p8)
        ok = r < nq_valid and p < d8
        store16(mem, qs + (p // 8) * (kBQ * kBK * 2) + sw128_offset(r, p % 8),
                q[r, p * 8: p * 8 + 8] if ok else np.zeros(8))
    xs = base + xs_off
    D = np.zeros((2, 64, kBN))  # per warpgroup
    xacc = np.zeros(kBN)
    stage = int(rng.integers(0, stages))
    for ks in range(ksteps):
        for tid in range(kThreads):  # issue_load for slab ks into `stage`
            ld_lane = sw128_offset(tid >> 3, tid & 7)
            col = ks * kBK + (tid & 7) * 8
            for it in range(kBN // 32):
                row = (tid >> 3) + 32 * it
                dst = xs + 2 * (stage * kBN * kBK) + ld_lane + 2 * (32 * it * kBK)
                store16(mem, dst, x[row, col: col + 8] if col < d else np.zeros(8))
        for wq in range(2):
            a_wg = qs + wq * 64 * 128
            a_addr = a_wg + ks * (kBQ * kBK * 2)
            b_addr = xs + stage * (kBN * kBK * 2)
            if BUG == "b_stage":  # planted: the stage of the previous slab
                b_addr = xs + ((stage + stages - 1) % stages) * (kBN * kBK * 2)
            for kk in range(kBK // 16):
                step = 32 * kk if BUG != "k_step" else 16 * kk  # planted: 16 bytes per k16
                A = operand(mem, a_addr + step, 64)
                B = operand(mem, b_addr + step, kBN)
                D[wq] += A @ B.T
        for tid in range(kThreads):  # l2: |x|^2 of row tid, as the kernel reads it
            xacc[tid] += l2_slab(mem, xs + 2 * (stage * kBN * kBK) + tid * 128, tid, 0.0, np.float64)
        stage = (stage + 1) % stages
    # Accumulators per thread, read back through the epilogue's coordinates.
    got = np.full((kBQ, kBN), np.nan)
    for warp in range(8):
        wq, wn = warp >> 2, warp & 3
        for lane in range(32):
            g, c = lane >> 2, lane & 3
            acc = np.empty((32, 4))
            for j in range(32):
                for h in range(2):
                    for e in range(2):
                        acc[j, 2 * h + e] = D[wq, 16 * wn + 8 * h + g, 8 * j + 2 * c + e]
            for ih in range(2):
                qloc = 64 * wq + 16 * wn + 8 * ih + g
                if BUG == "qloc":  # planted: the mma.sync query map
                    qloc = 64 * wq + 8 * ih + g
                for je in range(64):
                    rloc = 8 * (je >> 1) + 2 * c + (je & 1)
                    got[qloc, rloc] = acc[je >> 1, 2 * ih + (je & 1)]
    # q_at (the l2 query norms) over the resident layout
    qn = np.array([sum(mem[(qs + (col // kBK) * (kBQ * kBK * 2) + sw128_offset(i, (col % kBK) // 8)) // 2 + col % 8] ** 2
                       for col in range(d)) for i in range(kBQ)])
    truth = q @ x.T
    return got, truth, qn, (q ** 2).sum(1), xacc, (x ** 2).sum(1)


def main():
    global BUG
    ap = argparse.ArgumentParser()
    ap.add_argument("--bug", default=None, help="planted bug: loader_swizzle | b_stage | k_step | qloc | l2_order")
    BUG = ap.parse_args().bug
    rng = np.random.default_rng()
    failures = 0
    cases = [(16, 2), (48, 3), (64, 3), (80, 2), (384, 3)]
    for d, stages in cases:
        raw = int(rng.integers(0, 64)) * 16
        got, truth, qn, qn_want, xn, xn_want = run_tile(d, stages, raw, rng)
        ok = np.array_equal(got, truth) and np.array_equal(qn, qn_want) and np.array_equal(xn, xn_want)
        failures += not ok
        print(f"d={d:4d} stages={stages} base+{raw:4d}: {'ok' if ok else 'MISMATCH'}")
    ok = l2_order_matches_mma_sync(rng)
    failures += not ok
    print(f"l2 norms in column order, float32: {'ok' if ok else 'MISMATCH'}")
    print(f"{len(cases) + 1 - failures} of {len(cases) + 1} cases match")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
