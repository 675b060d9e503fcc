#!/usr/bin/env python3
"""Lane-accurate numpy emulation of tc_forward_long_kernel
(csrc/attention/cross_attention_tc_long.cu) with the helpers of mma_helpers.cuh and
attention_common.h, compared against a float64 reference. Written before the kernel had run
on a GPU (seventh session): 288 cases passed, and planted fragment, mask, stage and wait bugs
were caught. Keep it in step with the kernel when either changes.

Every warp is emulated as 32 lanes (the last axis of every register array); ldmatrix, mma.sync,
shuffles, pack2 and the cp.async pipeline follow the PTX semantics stated in the brief.
Shared memory is a flat uint16 array, initialised to NaN bit patterns ("garbage"), so any read
of a never-written element (padding, stale stage) poisons the result.
cp.async copies land only when a cp.async.wait_group retires their group (latest legal time).

Usage: python3 emu_long.py [--bug NAME] [--quick]
"""
import argparse
import itertools
import sys
import time

import numpy as np

LANE = np.arange(32)
G = LANE // 4
C4 = LANE % 4
KPAD = 8
KROWS = 128  # query rows per block (4 warps x 32 rows; wide: the dropped 8 x 16 variant)
KLN2 = np.float32(0.6931471805599453)
F32 = np.float32

BUG = None  # planted-bug switch (emulation only)


# ----------------------------------------------------------------------------- dtypes
def f32_to_bits(x, dt):
    x = np.asarray(x, dtype=np.float32)
    if dt == "fp16":
        return x.astype(np.float16).view(np.uint16)
    u = x.view(np.uint32).astype(np.uint64)
    rnd = ((u >> 16) & 1) + 0x7FFF  # round to nearest even
    out = ((u + rnd) >> 16).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        out = np.where(nan, np.uint16(0x7FC0), out)
    return out


def bits_to_f32(b, dt):
    b = np.asarray(b, dtype=np.uint16)
    if dt == "fp16":
        return b.view(np.float16).astype(np.float32)
    return (b.astype(np.uint32) << 16).view(np.float32)


def nan_bits(dt):
    return np.uint16(0x7E00 if dt == "fp16" else 0x7FC0)


def pack2(lo, hi, dt):
    return f32_to_bits(lo, dt).astype(np.uint32) | (f32_to_bits(hi, dt).astype(np.uint32) << 16)


def lo16(r):
    return (r & 0xFFFF).astype(np.uint16)


def hi16(r):
    return (r >> 16).astype(np.uint16)


# ----------------------------------------------------------------------------- warp primitives
def shfl_xor(x, mask):
    return x[..., LANE ^ mask]


def quad_max(x):
    x = np.fmax(x, shfl_xor(x, 1))
    return np.fmax(x, shfl_xor(x, 2))


def quad_sum(x):
    x = (x + shfl_xor(x, 1)).astype(F32)
    return (x + shfl_xor(x, 2)).astype(F32)


class Smem:
    def __init__(self, nelem, dt):
        self.a = np.full(nelem, nan_bits(dt), dtype=np.uint16)
        self.groups = []  # committed, not yet retired: list of lists of (dst_idx, values)
        self.cur = []
        self.region_check = None

    # cp.async bookkeeping
    def cp_async(self, dst_idx, vals):
        self.cur.append((dst_idx, vals))

    def commit(self):
        self.groups.append(self.cur)
        self.cur = []

    def wait(self, pending):
        assert not self.cur, "cp.async issued but not committed before a wait"
        while len(self.groups) > pending:
            for dst, vals in self.groups.pop(0):
                self.a[dst] = vals

    def ldsm_x4(self, addr, trans=False, region=None, kD=None, kS=None):
        """addr: (..., 32) element addresses; returns (..., 4, 32) uint32 registers."""
        addr = np.asarray(addr)
        assert addr.shape[-1] == 32
        assert np.all(addr % 8 == 0), "ldmatrix row address not 16-byte aligned"
        ra = addr.reshape(addr.shape[:-1] + (4, 8))  # [..., matrix m, row r] from lanes 8m + r
        if region is not None:  # every row read must be in [lo, hi) and columns [col, col+8) < kD
            lo, hi = region
            assert np.all(ra >= lo) and np.all(ra + 8 <= hi), "ldmatrix outside the expected region"
            assert np.all((ra - lo) % kS + 8 <= kD), "ldmatrix reads the padding"
        if not trans:
            base = ra[..., :, G]  # lane L: row L/4 of matrix m
            lo_v = self.a[base + 2 * C4]
            hi_v = self.a[base + 2 * C4 + 1]
        else:  # lane L: rows 2(L%4), 2(L%4)+1 of column L/4
            lo_v = self.a[ra[..., :, 2 * C4] + G]
            hi_v = self.a[ra[..., :, 2 * C4 + 1] + G]
        return lo_v.astype(np.uint32) | (hi_v.astype(np.uint32) << 16)


def mma16816(d, a, b0, b1, dt):
    """d (...,4,32) f32 += A (16x16 from a (...,4,32)) x B (16x8 from b0, b1 (...,32))."""
    a, b0, b1, d = np.broadcast_arrays(a, b0[..., None, :], b1[..., None, :], d)
    b0 = b0[..., 0, :]
    b1 = b1[..., 0, :]
    lead = a.shape[:-2]
    A = np.full(lead + (16, 16), np.nan)
    B = np.full(lead + (16, 8), np.nan)
    cv = lambda r16: bits_to_f32(r16, dt).astype(np.float64)
    A[..., G, 2 * C4] = cv(lo16(a[..., 0, :]))
    A[..., G, 2 * C4 + 1] = cv(hi16(a[..., 0, :]))
    A[..., G + 8, 2 * C4] = cv(lo16(a[..., 1, :]))
    A[..., G + 8, 2 * C4 + 1] = cv(hi16(a[..., 1, :]))
    A[..., G, 2 * C4 + 8] = cv(lo16(a[..., 2, :]))
    A[..., G, 2 * C4 + 9] = cv(hi16(a[..., 2, :]))
    A[..., G + 8, 2 * C4 + 8] = cv(lo16(a[..., 3, :]))
    A[..., G + 8, 2 * C4 + 9] = cv(hi16(a[..., 3, :]))
    B[..., 2 * C4, G] = cv(lo16(b0))
    B[..., 2 * C4 + 1, G] = cv(hi16(b0))
    B[..., 2 * C4 + 8, G] = cv(lo16(b1))
    B[..., 2 * C4 + 9, G] = cv(hi16(b1))
    assert not np.isnan(A).any() or True  # NaNs are allowed to flow (garbage reads)
    # 16 products are exact in float64 (bf16/fp16 x bf16/fp16); one rounding to fp32 per mma
    # (real hardware may round differently in the last bit; irrelevant at bf16 tolerances).
    D = np.einsum("...ik,...kn->...in", A, B)
    Dm = np.empty(d.shape, np.float64)
    Dm[..., 0, :] = D[..., G, 2 * C4]
    Dm[..., 1, :] = D[..., G, 2 * C4 + 1]
    Dm[..., 2, :] = D[..., G + 8, 2 * C4]
    Dm[..., 3, :] = D[..., G + 8, 2 * C4 + 1]
    return (d.astype(np.float64) + Dm).astype(F32)


def fmaf(a, b, c):
    return (np.asarray(a, np.float64) * np.float64(b) + np.asarray(c, np.float64)).astype(F32)


# ----------------------------------------------------------------------------- attention_common.h
class Seq:
    pass


def clamp64(x, lo, hi):
    return lo if x < lo else (hi if x > hi else x)


def seq_info(p, b):
    s = Seq()
    if p["cu_q"] is not None:
        s.q0 = clamp64(p["cu_q"][b], 0, p["total_q"])
        s.k0 = clamp64(p["cu_k"][b], 0, p["total_k"])
        s.qlen = clamp64(clamp64(p["cu_q"][b + 1], 0, p["total_q"]) - s.q0, 0, p["Lq"])
        s.klen = clamp64(clamp64(p["cu_k"][b + 1], 0, p["total_k"]) - s.k0, 0, p["Lk"])
        s.qrows, s.krows = s.qlen, s.klen
        s.offset = s.klen - s.qlen
    else:
        s.q0 = s.k0 = 0
        s.qlen = clamp64(p["q_lengths"][b], 0, p["Lq"]) if p["q_lengths"] is not None else p["Lq"]
        s.klen = clamp64(p["kv_lengths"][b], 0, p["Lk"]) if p["kv_lengths"] is not None else p["Lk"]
        s.qrows, s.krows = p["Lq"], p["Lk"]
        s.offset = p["Lk"] - p["Lq"]
    return s


def key_end(p, s, i):
    if not p["causal"]:
        return s.klen
    return clamp64(i + s.offset + 1, 0, s.klen)


def key_end_vec(p, s, i):
    i = np.asarray(i)
    if not p["causal"]:
        return np.full(i.shape, s.klen)
    return np.clip(i + s.offset + 1, 0, s.klen)


# ----------------------------------------------------------------------------- the kernel
def long_config(kD, wide):
    """LongConfig<kD>; wide = 8 warps of 16 rows, a variant the kernel had until it ran slower on an H100."""
    return dict(kKeys=64, kStages=3 if kD <= 64 else 2, kQInRegisters=kD <= 64, kS=kD + KPAD,
                kWarps=8 if wide else 4, kMT=1 if wide else 2)


def stage_rows(sm, dst, sstride, gmem, src, stride, nrows, valid_rows, valid_chunks, kChunks, row_limit):
    """stage_rows<T, kChunks>: rows >= valid_rows and chunks >= valid_chunks become zeros (plain
    stores), the rest are 16-byte cp.async into the current group."""
    r = np.repeat(np.arange(nrows), kChunks)
    ch = np.tile(np.arange(kChunks), nrows)
    d = (dst + r * sstride + ch * 8)[:, None] + np.arange(8)[None]
    valid = (r < valid_rows) & (ch < valid_chunks)
    if valid.any():
        assert r[valid].max() < row_limit, "stage_rows reads a row past the sequence's rows in memory"
        sidx = (src + r[valid] * stride + ch[valid] * 8)[:, None] + np.arange(8)[None]
        assert sidx.min() >= 0 and sidx.max() < gmem.size, "global read out of bounds"
        sm.cp_async(d[valid].ravel(), gmem[sidx].ravel().copy())
    sm.a[d[~valid].ravel()] = 0


def kernel_block(p, cfg, dt, kD, bx, by, bz, gridx, q, k, v, out, lse, wcount, scale_log2):
    kKeys, kStages, kS = cfg["kKeys"], cfg["kStages"], cfg["kS"]
    qinreg = cfg["kQInRegisters"]
    kWarps, kMT = cfg["kWarps"], cfg["kMT"]
    wrows = kMT * 16  # query rows a warp
    kStage = 2 * kKeys * kS
    sQ = 0
    sKV = sQ + KROWS * kS
    sm = Smem(sKV + kStages * kStage, dt)

    b, h = bz, by
    s = seq_info(p, b)
    r0 = (gridx - 1 - bx) * KROWS
    if r0 >= s.qrows:
        return
    qlen = s.qlen
    qvalid = qlen - r0
    kend_blk = key_end(p, s, r0 + min(KROWS, qvalid) - 1) if qvalid > 0 else 0
    n_tiles = (kend_blk + kKeys - 1) // kKeys

    qd, qsb, qsh, qsr = q
    kd_, ksb, ksh, ksr = k
    vd, vsb, vsh, vsr = v
    qbase = b * qsb + h * qsh + (s.q0 + r0) * qsr
    kbase = b * ksb + h * ksh + s.k0 * ksr
    vbase = b * vsb + h * vsh + s.k0 * vsr

    slot_tile = [None] * kStages  # emulation bookkeeping: which tile each stage slot was given
    tile_group = {}

    def stage_kv(t):
        dK = sKV + (t % kStages) * kStage
        j0 = t * kKeys
        stage_rows(sm, dK, kS, kd_, kbase + j0 * ksr, ksr, kKeys, kend_blk - j0, kD // 8, kD // 8, s.krows - j0)
        stage_rows(sm, dK + kKeys * kS, kS, vd, vbase + j0 * vsr, vsr, kKeys, kend_blk - j0, kD // 8, kD // 8,
                   s.krows - j0)
        slot_tile[t % kStages] = t
        tile_group[t] = len(sm.groups)  # index of the group about to be committed

    # prologue
    stage_rows(sm, sQ, kS, qd, qbase, qsr, KROWS, qvalid if n_tiles > 0 else 0, kD // 8, kD // 8, s.qrows - r0)
    for t in range(kStages - 1):
        if t < n_tiles:
            stage_kv(t)
        sm.commit()
    retired = [0]  # number of groups retired so far (emulation bookkeeping)

    def cp_async_wait(pending):
        n = 1 if pending >= 1 else 0  # cp_async_wait(): wait_group 1 or wait_group 0
        if BUG == "wait_off":  # planted: one group too many left in flight
            n = pending + 1
        before = len(sm.groups)
        sm.wait(n)
        retired[0] += before - len(sm.groups)

    # per-warp state
    W = []
    for warp in range(kWarps):
        st = {}
        wr0 = r0 + warp * wrows
        st["wr0"] = wr0
        kend = np.zeros((kMT, 2, 32), dtype=np.int64)
        for mt in range(kMT):
            for half in range(2):
                i = wr0 + mt * 16 + half * 8 + G
                kend[mt, half] = np.where(i < qlen, key_end_vec(p, s, i), 0)
        st["kend"] = kend
        st["kmin"] = key_end(p, s, wr0) if wr0 + wrows - 1 < qlen else 0
        st["kmax"] = key_end(p, s, min(wr0 + wrows - 1, qlen - 1)) if wr0 < qlen else 0
        st["o"] = np.zeros((kMT, kD // 8, 4, 32), F32)
        st["m"] = np.full((kMT, 2, 32), -np.inf, F32)
        st["l"] = np.zeros((kMT, 2, 32), F32)
        st["qf"] = None
        st["q_row"] = warp * wrows + ((LANE >> 3) & 1) * 8 + (LANE & 7)
        W.append(st)
    q_col = (LANE >> 4) * 8
    k_row = (LANE >> 4) * 8 + (LANE & 7)
    k_col = ((LANE >> 3) & 1) * 8
    v_row = ((LANE >> 3) & 1) * 8 + (LANE & 7)
    v_col = (LANE >> 4) * 8
    if BUG == "k_row":  # planted: the K ldmatrix lanes 8..15 and 16..23 swapped
        k_row, k_col = ((LANE >> 3) & 1) * 8 + (LANE & 7), (LANE >> 4) * 8
    qreg = (sQ, sQ + KROWS * kS)

    def load_q(st, mt, ks):
        addr = sQ + (st["q_row"] + mt * 16) * kS + ks * 16 + q_col
        return sm.ldsm_x4(addr, region=qreg, kD=kD, kS=kS)

    def process(st, Ks, Vs, j0, limits):
        kNB = kKeys // 8
        kNP = kKeys // 16
        kregion = (Ks, Ks + kKeys * kS)
        vregion = (Vs, Vs + kKeys * kS)
        sc = np.zeros((kMT, kNB, 4, 32), F32)
        for ks in range(kD // 16):
            if qinreg:
                a = st["qf"][:, ks]  # (kMT, 4, 32)
            else:
                a = np.stack([load_q(st, mt, ks) for mt in range(kMT)])
            addr = Ks + (np.arange(kNP)[:, None] * 16 + k_row[None]) * kS + ks * 16 + k_col[None]
            bk = sm.ldsm_x4(addr, region=kregion, kD=kD, kS=kS)  # (kNP, 4, 32)
            i0, i1, i2, i3 = 0, 1, 2, 3
            if BUG == "bk_swap":  # planted: the two halves of the K fragment swapped
                i0, i1, i2, i3 = 2, 3, 0, 1
            b0 = np.stack([bk[:, i0], bk[:, i2]], axis=1)  # (kNP, 2, 32): n-tiles 2np, 2np+1
            b1 = np.stack([bk[:, i1], bk[:, i3]], axis=1)
            scv = sc.reshape(kMT, kNP, 2, 4, 32)
            scv = mma16816(scv, a[:, None, None], b0[None], b1[None], dt)
            sc = scv.reshape(kMT, kNB, 4, 32)
        if limits:
            key = j0 + np.arange(kNB)[:, None, None] * 8 + 2 * C4[None, None] + (np.arange(4) & 1)[None, :, None]
            ke = st["kend"][:, np.array([0, 0, 1, 1])]  # (kMT, 4, 32)
            off = 0 if BUG != "mask_off1" else 1
            sc = np.where(key[None] >= ke[:, None] + off, F32(-np.inf), sc).astype(F32)
        # online softmax
        pa = np.zeros((kMT, kKeys // 16, 4, 32), np.uint32)
        m, l, o = st["m"], st["l"], st["o"]
        sl2 = F32(scale_log2)
        mx = [m[:, 0].copy(), m[:, 1].copy()]
        for n in range(kNB):
            mx[0] = np.fmax(mx[0], np.fmax(sc[:, n, 0], sc[:, n, 1]))
            mx[1] = np.fmax(mx[1], np.fmax(sc[:, n, 2], sc[:, n, 3]))
        alpha = [None, None]
        shift = [None, None]
        for half in range(2):
            mx[half] = quad_max(mx[half])
            base = np.where(mx[half] == -np.inf, F32(0), mx[half]).astype(F32)
            with np.errstate(invalid="ignore"):
                alpha[half] = np.exp2(((m[:, half] - base).astype(F32) * sl2).astype(F32)).astype(F32)
            shift[half] = (-base * sl2).astype(F32)
            m[:, half] = mx[half]
        ssum = [np.zeros((kMT, 32), F32), np.zeros((kMT, 32), F32)]
        for n in range(kNB):
            e4 = []
            for e in range(4):
                with np.errstate(invalid="ignore"):
                    x = np.exp2(fmaf(sc[:, n, e], sl2, shift[e >> 1])).astype(F32)
                e4.append(x)
                ssum[e >> 1] = (ssum[e >> 1] + x).astype(F32)
            r01, r23 = (n & 1) * 2, (n & 1) * 2 + 1
            if BUG == "pa_swap":  # planted: P registers of the two row halves swapped
                r01, r23 = r23, r01
            pa[:, n // 2, r01] = pack2(e4[0], e4[1], dt)
            pa[:, n // 2, r23] = pack2(e4[2], e4[3], dt)
        for half in range(2):
            l[:, half] = (l[:, half] * alpha[half] + ssum[half]).astype(F32)
        o[:, :, 0] *= alpha[0][:, None]
        o[:, :, 1] *= alpha[0][:, None]
        o[:, :, 2] *= alpha[1][:, None]
        o[:, :, 3] *= alpha[1][:, None]
        # O += P V
        kDNP = kD // 16
        for kk in range(kKeys // 16):
            if limits and j0 + kk * 16 >= st["kmax"] and BUG != "no_break":
                break
            addr = Vs + (kk * 16 + v_row[None]) * kS + np.arange(kDNP)[:, None] * 16 + v_col[None]
            bv = sm.ldsm_x4(addr, trans=True, region=vregion, kD=kD, kS=kS)  # (kDNP, 4, 32)
            b0 = np.stack([bv[:, 0], bv[:, 2]], axis=1)
            b1 = np.stack([bv[:, 1], bv[:, 3]], axis=1)
            ov = o.reshape(kMT, kDNP, 2, 4, 32)
            ov = mma16816(ov, pa[:, kk][:, None, None], b0[None], b1[None], dt)
            o[...] = ov.reshape(kMT, kD // 8, 4, 32)

    stats = {"proc_lim": 0, "proc_fast": 0, "skip": 0}
    for t in range(n_tiles):
        cp_async_wait(kStages - 2)
        # __syncthreads(): every warp has finished tile t - 1 (warps are emulated in turn)
        if t + kStages - 1 < n_tiles:
            assert (t + kStages - 1) % kStages != t % kStages
            stage_kv(t + kStages - 1)
        sm.commit()
        slot = t % kStages
        assert slot_tile[slot] == t, f"stage slot {slot} holds tile {slot_tile[slot]}, expected {t}"
        assert tile_group[t] < retired[0], f"tile {t} read before its cp.async group retired"
        for warp in range(kWarps):
            st = W[warp]
            if qinreg and t == 0:
                st["qf"] = np.stack([np.stack([load_q(st, mt, ks) for ks in range(kD // 16)]) for mt in range(kMT)])
            j0 = t * kKeys
            if j0 >= st["kmax"]:
                stats["skip"] += 1
                continue
            Ks = sKV + (t % kStages) * kStage
            if BUG == "wrong_slot":  # planted: read the stage of the previous tile
                Ks = sKV + ((t + kStages - 1) % kStages) * kStage
            if j0 + kKeys <= st["kmin"]:
                stats["proc_fast"] += 1
                process(st, Ks, Ks + kKeys * kS, j0, False)
            else:
                stats["proc_lim"] += 1
                process(st, Ks, Ks + kKeys * kS, j0, True)

    # epilogue
    od, osb, osh, osr = out
    ld, lsb, lsh, lsr = lse
    sl2 = F32(scale_log2)
    for warp in range(kWarps):
        st = W[warp]
        l = st["l"]
        for mt in range(kMT):
            l[mt, 0] = quad_sum(l[mt, 0])
            l[mt, 1] = quad_sum(l[mt, 1])
        for mt in range(kMT):
            for half in range(2):
                lsum = l[mt, half]
                i = st["wr0"] + mt * 16 + half * 8 + G
                act = i < s.qrows
                anyv = lsum > 0
                with np.errstate(divide="ignore"):
                    inv = np.where(anyv, (F32(1) / lsum).astype(F32), F32(0)).astype(F32)
                row = s.q0 + i
                obase = b * osb + h * osh + row * osr
                for n in range(kD // 8):
                    r = pack2(st["o"][mt, n, 2 * half] * inv, st["o"][mt, n, 2 * half + 1] * inv, dt)
                    col = n * 8 + 2 * C4
                    for lane in np.nonzero(act)[0]:
                        idx = obase[lane] + col[lane]
                        assert idx % 2 == 0
                        od[idx] = r[lane] & 0xFFFF
                        od[idx + 1] = r[lane] >> 16
                        wcount["out"][idx] += 1
                        wcount["out"][idx + 1] += 1
                with np.errstate(divide="ignore", invalid="ignore"):
                    lv = np.where(anyv, (st["m"][mt, half] * sl2 * KLN2).astype(F32) + np.log(lsum).astype(F32),
                                  F32(np.inf)).astype(F32)
                for lane in np.nonzero(act & (C4 == 0))[0]:
                    idx = b * lsb + h * lsh + row[lane] * lsr
                    ld[idx] = lv[lane]
                    wcount["lse"][idx] += 1
    return stats


def launch(p, dt, kD, kAlt, q, k, v, out, lse, wcount):
    cfg = long_config(kD, kAlt)
    gridx = (p["Lq"] + KROWS - 1) // KROWS
    scale_log2 = np.float32(p["scale"] * 1.4426950408889634)
    tot = {"proc_lim": 0, "proc_fast": 0, "skip": 0}
    for bz in range(p["B"]):
        for by in range(p["H"]):
            for bx in range(gridx):
                st = kernel_block(p, cfg, dt, kD, bx, by, bz, gridx, q, k, v, out, lse, wcount, scale_log2)
                if st:
                    for kk in tot:
                        tot[kk] += st[kk]
    return tot


# ----------------------------------------------------------------------------- reference + driver
def reference(p, Qf, Kf, Vf):
    """Qf: list per b of (H, qrows, D) float64 (rows as in memory), same for K, V.
    Returns per b (H, qrows, D) out and (H, qrows) lse, and a mask of 'empty' rows."""
    res = []
    for b in range(p["B"]):
        s = seq_info(p, b)
        H = p["H"]
        O = np.zeros((H, s.qrows, Vf[b].shape[-1]))
        L = np.full((H, s.qrows), np.inf)
        for i in range(s.qrows):
            if i >= s.qlen:
                continue
            ke = key_end(p, s, i)
            if ke <= 0:
                continue
            assert not np.isnan(Qf[b][:, i]).any() and not np.isnan(Kf[b][:, :ke]).any()
            sc = p["scale"] * np.einsum("hd,hjd->hj", Qf[b][:, i], Kf[b][:, :ke])
            mx = sc.max(axis=1, keepdims=True)
            e = np.exp(sc - mx)
            ssum = e.sum(axis=1, keepdims=True)
            O[:, i] = np.einsum("hj,hjd->hd", e / ssum, Vf[b][:, :ke])
            L[:, i] = (mx + np.log(ssum))[:, 0]
        res.append((O, L))
    return res


def run_case(name, dt, kD, kAlt, B, H, Lq, Lk, causal, q_lengths=None, kv_lengths=None, seqs=None, scale=0.7,
             seed=0, verbose=True):
    rng = np.random.default_rng(seed)
    packed = seqs is not None
    p = dict(B=B, H=H, Lq=Lq, Lk=Lk, causal=causal, scale=scale, q_lengths=None, kv_lengths=None, cu_q=None,
             cu_k=None, total_q=0, total_k=0)
    if packed:
        qls = [a for a, _ in seqs]
        kls = [c for _, c in seqs]
        assert len(seqs) == B
        p["cu_q"] = np.concatenate([[0], np.cumsum(qls)]).astype(np.int64)
        p["cu_k"] = np.concatenate([[0], np.cumsum(kls)]).astype(np.int64)
        p["total_q"], p["total_k"] = int(p["cu_q"][-1]), int(p["cu_k"][-1])
        p["Lq"], p["Lk"] = max(qls), max(kls)
        Lq, Lk = p["Lq"], p["Lk"]
        tq, tk = p["total_q"], p["total_k"]
        # layout (total, H, D): sb = 0, sh = D, sr = H * D
        Qg = rng.standard_normal((tq, H, kD)).astype(np.float32) * 1.5
        Kg = rng.standard_normal((tk, H, kD)).astype(np.float32) * 1.5
        Vg = rng.standard_normal((tk, H, kD)).astype(np.float32)
        qstr = (0, kD, H * kD)
        kstr = (0, kD, H * kD)
        ostr = (0, kD, H * kD)
        lstr = (0, tq, 1)  # lse (H, total_q)
        nout, nlse = tq * H * kD, H * tq
    else:
        p["q_lengths"] = q_lengths
        p["kv_lengths"] = kv_lengths
        # layout (B, L, H, D): sb = L*H*D, sh = D, sr = H*D
        Qg = rng.standard_normal((B, Lq, H, kD)).astype(np.float32) * 1.5
        Kg = rng.standard_normal((B, Lk, H, kD)).astype(np.float32) * 1.5
        Vg = rng.standard_normal((B, Lk, H, kD)).astype(np.float32)
        qstr = (Lq * H * kD, kD, H * kD)
        kstr = (Lk * H * kD, kD, H * kD)
        ostr = (Lq * H * kD, kD, H * kD)
        lstr = (H * Lq, Lq, 1)  # lse (B, H, Lq)
        nout, nlse = B * Lq * H * kD, B * H * Lq
    if not packed:  # garbage (NaN) in the padding: rows >= q_lengths / kv_lengths must never be used
        for b in range(B):
            s_ = seq_info(p, b)
            Qg[b, s_.qlen:] = np.nan
            Kg[b, s_.klen:] = np.nan
            Vg[b, s_.klen:] = np.nan
    qb, kb, vb = f32_to_bits(Qg, dt), f32_to_bits(Kg, dt), f32_to_bits(Vg, dt)
    outb = np.full(nout, nan_bits(dt), np.uint16)
    lsev = np.full(nlse, np.nan, np.float32)
    wcount = {"out": np.zeros(nout, np.int64), "lse": np.zeros(nlse, np.int64)}
    t0 = time.time()
    try:
        stats = launch(p, dt, kD, kAlt, (qb.ravel(), *qstr), (kb.ravel(), *kstr), (vb.ravel(), *kstr),
                       (outb, *ostr), (lsev, *lstr), wcount)
    except AssertionError as ex:
        line = f"FAIL {name:60s} emulator assertion: {ex}"
        if verbose:
            print(line, flush=True)
        return False, line
    el = time.time() - t0
    # float64 inputs exactly as stored
    Qf, Kf, Vf = (bits_to_f32(x, dt).astype(np.float64) for x in (qb, kb, vb))
    Qs, Ks, Vs, Os, Ls = [], [], [], [], []
    outf = bits_to_f32(outb, dt).astype(np.float64)
    for b in range(B):
        s = seq_info(p, b)
        if packed:
            sl = slice(s.q0, s.q0 + s.qrows)
            Qs.append(Qf[sl].transpose(1, 0, 2))
            Ks.append(Kf[s.k0:s.k0 + s.krows].transpose(1, 0, 2))
            Vs.append(Vf[s.k0:s.k0 + s.krows].transpose(1, 0, 2))
            Os.append(outf.reshape(-1, H, kD)[sl].transpose(1, 0, 2))
            Ls.append(lsev.reshape(H, -1)[:, sl])
        else:
            Qs.append(Qf[b].transpose(1, 0, 2))
            Ks.append(Kf[b].transpose(1, 0, 2))
            Vs.append(Vf[b].transpose(1, 0, 2))
            Os.append(outf.reshape(B, Lq, H, kD)[b].transpose(1, 0, 2))
            Ls.append(lsev.reshape(B, H, Lq)[b])
    ref = reference(p, Qs, Ks, Vs)
    ok = True
    msgs = []
    if not (np.all(wcount["out"] == 1) and np.all(wcount["lse"] == 1)):
        ok = False
        msgs.append(f"writes: out min/max {wcount['out'].min()}/{wcount['out'].max()}, "
                    f"lse {wcount['lse'].min()}/{wcount['lse'].max()}")
    num = den = 0.0
    lse_bad = 0
    zero_bad = 0
    lse_maxerr = 0.0
    for b in range(B):
        Ro, Rl = ref[b]
        Eo, El = Os[b], Ls[b].astype(np.float64)
        empty = np.isinf(Rl)
        if np.isnan(Eo).any() or np.isnan(El).any():
            ok = False
            msgs.append(f"NaN in output of sequence {b}")
            continue
        zero_bad += int(np.sum(np.abs(Eo[empty]) != 0) + np.sum(~np.isposinf(El[empty])))
        zero_bad += int(np.sum(np.isinf(El[~empty])))
        num += float(np.sum((Eo - Ro) ** 2))
        den += float(np.sum(Ro ** 2))
        fin = ~empty & np.isfinite(El)
        d = np.abs(El[fin] - Rl[fin])
        tol = 2e-3 * np.maximum(1, np.abs(Rl[fin]))
        lse_bad += int(np.sum(d > tol))
        if d.size:
            lse_maxerr = max(lse_maxerr, float((d / np.maximum(1, np.abs(Rl[fin]))).max()))
    rel = np.sqrt(num / den) if den > 0 else (0.0 if num == 0 else np.inf)
    if not (rel < 1e-2):
        ok = False
    if lse_bad or zero_bad:
        ok = False
    if msgs and "NaN" in " ".join(msgs):
        rel = float("nan")
    line = (f"{'PASS' if ok else 'FAIL'} {name:60s} rel_out={rel:.2e} lse_rel_max={lse_maxerr:.1e} "
            f"lse_bad={lse_bad} zero/inf_bad={zero_bad} tiles(lim/fast/skip)={stats['proc_lim']}/"
            f"{stats['proc_fast']}/{stats['skip']} {el:.1f}s {' '.join(msgs)}")
    if verbose:
        print(line, flush=True)
    return ok, line


def main():
    global BUG
    ap = argparse.ArgumentParser()
    ap.add_argument("--bug", default=None, help="planted bug: bk_swap | k_row | mask_off1 | no_break")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--configs", default="64,0;128,0", help="kD,wide pairs; wide=1: 8 warps of 16 rows")
    args = ap.parse_args()
    BUG = args.bug
    configs = [tuple(int(x) for x in c.split(",")) for c in args.configs.split(";")]
    results = []
    seed = 0
    for kD, alt in configs:
        alt = bool(alt)
        tag = f"D={kD} wide={int(alt)}"
        dts = ["bf16", "fp16"]
        cases = []
        if args.quick:
            cases = [("bf16", 1, 1, 129, 257, True, None, [100], None),
                     ("bf16", 2, 1, 0, 0, True, None, None, [(129, 65), (17, 257)])]
        else:
            # padded: the Lq x Lk grid (non-causal and causal), B=1 H=1 full lengths
            for Lq, Lk in itertools.product([1, 17, 128, 129, 300], [1, 31, 64, 65, 257, 450]):
                for causal in (False, True):
                    cases.append((dts[(Lq + Lk) % 2], 1, 1, Lq, Lk, causal, None, None, None))
            # padded with kv / q lengths (0, mid-tile, full), B=3 H=2
            for causal in (False, True):
                cases.append(("bf16", 3, 2, 300, 450, causal, [300, 200, 5], [0, 100, 450], None))
                cases.append(("fp16", 3, 2, 129, 257, causal, [129, 60, 0], [257, 31, 65], None))
                cases.append(("bf16", 2, 1, 300, 65, causal, [250, 300], [33, 65], None))
                cases.append(("fp16", 2, 1, 17, 450, causal, [17, 9], [450, 200], None))
            # packed varlen, causal offset klen - qlen per sequence (Lq < Lk, Lq > Lk, empty)
            for causal in (False, True):
                cases.append(("bf16", 4, 2, 0, 0, causal, None, None, [(300, 450), (129, 65), (0, 31), (17, 1)]))
                cases.append(("fp16", 3, 1, 0, 0, causal, None, None, [(128, 64), (1, 257), (257, 0)]))
        for dt, B, H, Lq, Lk, causal, ql, kl, seqs in cases:
            seed += 1
            if seqs is not None:
                name = f"{tag} {dt} packed causal={int(causal)} seqs={seqs}"
                ok, line = run_case(name, dt, kD, alt, B, H, 0, 0, causal, seqs=seqs, seed=seed)
            else:
                name = f"{tag} {dt} B={B} H={H} Lq={Lq} Lk={Lk} causal={int(causal)} ql={ql} kl={kl}"
                ql_a = None if ql is None else np.array(ql, np.int64)
                kl_a = None if kl is None else np.array(kl, np.int64)
                ok, line = run_case(name, dt, kD, alt, B, H, Lq, Lk, causal, q_lengths=ql_a, kv_lengths=kl_a,
                                    seed=seed)
            results.append(ok)
    print(f"SUMMARY bug={BUG}: {sum(results)}/{len(results)} passed")
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
