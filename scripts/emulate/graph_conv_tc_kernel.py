# Lane-level numpy emulation of tc_conv_kernel (csrc/graph/graph_conv_tc.cu): same index
# arithmetic, PTX fragment layouts, tf32 truncation, bf16 RN packing. Checks the result against
# float64 (relative errors printed per case). Written before the kernel had run on a GPU
# (seventh session); keep it in step with the kernel, its tuning knobs (tile_kb, az_mr) and
# its x buffer count (a kernel field, fixed at 2 by the host since the eighteenth session)
# included. Usage: python3 graph_conv_tc_kernel.py
import numpy as np
f32 = np.float32
def tf32(v): return (np.asarray(v, f32).view(np.uint32) & np.uint32(0xffffe000)).view(f32)
def bf16(v):
    b = np.asarray(v, f32).view(np.uint32).astype(np.uint64)
    r = ((b + 0x7fff + ((b >> 16) & 1)) >> 16) << 16
    return r.astype(np.uint32).view(f32)
lane = np.arange(32); G_ = lane >> 2; C_ = lane & 3

def split(v, sp, left):
    big = tf32((np.asarray(v, f32).view(np.uint32) + np.uint32(0x1000)).view(f32)); small = (v - big).astype(f32)
    if sp == 'x3': return big, tf32(small)
    return big, ((bf16(v), bf16(small)) if left else (bf16(small), bf16(v)))  # (lo, hi)

def mma_tf32(d, a, b0, b1):
    A = np.zeros((16, 8)); B = np.zeros((8, 8))
    A[G_, C_] = a[0]; A[G_ + 8, C_] = a[1]; A[G_, C_ + 4] = a[2]; A[G_ + 8, C_ + 4] = a[3]
    B[C_, G_] = b0; B[C_ + 4, G_] = b1
    D = A.astype(np.float64) @ B
    d[0] += D[G_, 2 * C_]; d[1] += D[G_, 2 * C_ + 1]; d[2] += D[G_ + 8, 2 * C_]; d[3] += D[G_ + 8, 2 * C_ + 1]

def mma_bf16(d, a, b0, b1):
    A = np.zeros((16, 16)); B = np.zeros((16, 8))
    for r, (ro, co) in enumerate([(0, 0), (8, 0), (0, 8), (8, 8)]):
        A[G_ + ro, 2 * C_ + co] = a[r][0]; A[G_ + ro, 2 * C_ + co + 1] = a[r][1]
    B[2 * C_, G_] = b0[0]; B[2 * C_ + 1, G_] = b0[1]; B[2 * C_ + 8, G_] = b1[0]; B[2 * C_ + 9, G_] = b1[1]
    D = A @ B
    d[0] += D[G_, 2 * C_]; d[1] += D[G_, 2 * C_ + 1]; d[2] += D[G_ + 8, 2 * C_]; d[3] += D[G_ + 8, 2 * C_ + 1]

def warp_mma(sm, L, ldl, R, ldr, K, MR, sp):
    acc = [[[np.zeros(32) for _ in range(4)] for _ in range(4)] for _ in range(MR)]
    Lp = L + G_ * ldl + C_; Rp = R + C_ * ldr + G_
    for k in range(0, K, 8):
        ab, ac = [], []
        for i in range(MR):
            p = Lp + 16 * i * ldl + k
            s = [split(sm[p + off], sp, True) for off in (0, 8 * ldl, 4, 8 * ldl + 4)]
            ab.append([x[0] for x in s]); ac.append([x[1] for x in s])
        for j in range(4):
            q = Rp + k * ldr + 8 * j
            bb0, bc0 = split(sm[q], sp, False); bb1, bc1 = split(sm[q + 4 * ldr], sp, False)
            for i in range(MR):
                if sp == 'x3':
                    mma_tf32(acc[i][j], ac[i], bb0, bb1); mma_tf32(acc[i][j], ab[i], bc0, bc1)
                else:
                    mma_bf16(acc[i][j], ac[i], bc0, bc1)
                mma_tf32(acc[i][j], ab[i], bb0, bb1)
                for e in range(4): acc[i][j][e] = acc[i][j][e].astype(f32).astype(np.float64)
    return acc

def run(x, A, W, b, act, sp, blocks, limit=227 * 1024, vec_out=True, vec_in=True, tile_kb=16, az_mr=2, xbufs=2):
    S, N, F = x.shape; Fo = W.shape[1]
    ru = lambda v, m: (v + m - 1) // m * m
    NP, KP, OP = ru(N, 16), ru(F, 8), ru(Fo, 32)
    sa, sx, sw = NP + 4, KP + 4, OP + 8
    vec_in = vec_in and F % 4 == 0; vec_out = vec_out and Fo % 4 == 0
    fixed = NP * sa + KP * sw + OP; per = xbufs * NP * sx + NP * sw
    G = int(np.clip((tile_kb << 10) // (N * F * 4), 1, min(32, S)))
    if G > 1: G -= G % 2
    while G > 2 and (fixed + G * per) * 4 > limit: G -= 2
    if G == 2 and (fixed + G * per) * 4 > limit: G = 1
    assert (fixed + G * per) * 4 <= limit
    xf, out = x.reshape(-1).astype(f32), np.full(S * N * Fo, np.nan, f32)
    tiles = (S + G - 1) // G
    MT, CG = NP // 16, OP // 32
    for blk in range(min(blocks, tiles)):
        sm = np.zeros(fixed + G * per, f32)
        As, Ws, bs, Xs = 0, NP * sa, NP * sa + KP * sw, NP * sa + KP * sw + OP
        xbuf = G * NP * sx; Zs = Xs + xbufs * xbuf
        for i in range(N * N): sm[As + (i // N) * sa + i % N] = A.reshape(-1)[i]
        for i in range(F * Fo): sm[Ws + (i // Fo) * sw + i % Fo] = W.reshape(-1)[i]
        if b is not None: sm[bs:bs + Fo] = b
        def load(xb, tile):
            s0 = tile * G; count = min(G, S - s0); src = s0 * N * F
            if vec_in:
                q = F // 4
                for i in range(count * N * q):
                    r = i // q; s = r // N; d = xb + (r + s * (NP - N)) * sx + 4 * (i - r * q)
                    sm[d:d + 4] = xf[src + 4 * i: src + 4 * i + 4]
            else:
                for i in range(count * N * F):
                    r = i // F; s = r // N; sm[xb + (r + s * (NP - N)) * sx + (i - r * F)] = xf[src + i]
        tile = blk; buf = 0
        xw_pairs = (G * MT) % 2 == 0 and (G * MT // 2) * CG >= 8; az_pairs = MT % 2 == 0 and az_mr == 2
        # The kernel's copy schedule, each copy landing at once (so a copy into a buffer still
        # to be read would show up as a wrong result): xbufs - 1 tiles ahead.
        for i in range(xbufs - 1):
            if blk + i * blocks < tiles: load(Xs + i * xbuf, blk + i * blocks)
        while tile < tiles:
            nxt = tile + (xbufs - 1) * blocks; next_buf = xbufs - 1 if buf == 0 else buf - 1
            if nxt < tiles: load(Xs + next_buf * xbuf, nxt)
            xb = Xs + buf * xbuf
            MR = 2 if xw_pairs else 1
            for u in range((G * NP // (16 * MR)) * CG):
                r0 = (u // CG) * 16 * MR; cg = u % CG
                acc = warp_mma(sm, xb + r0 * sx, sx, Ws + 32 * cg, sw, KP, MR, sp)
                for i in range(MR):
                    for h in range(2):
                        row = r0 + 16 * i + G_ + 8 * h
                        ok = row % NP < N
                        z = Zs + row * sw + 32 * cg + 2 * C_
                        for j in range(4):
                            sm[(z + 8 * j)[ok]] = acc[i][j][2 * h][ok]; sm[(z + 8 * j + 1)[ok]] = acc[i][j][2 * h + 1][ok]
            s0 = tile * G; count = min(G, S - s0); o0 = s0 * N * Fo
            MR = 2 if az_pairs else 1
            per_s = (NP // (16 * MR)) * CG
            for u in range(count * per_s):
                gs = u // per_s; rem = u - gs * per_s; m0 = (rem // CG) * 16 * MR; cg = rem % CG
                acc = warp_mma(sm, As + m0 * sa, sa, Zs + gs * NP * sw + 32 * cg, sw, NP, MR, sp)
                o = o0 + gs * N * Fo
                for i in range(MR):
                    for j in range(4):
                        row = m0 + 16 * i + G_; col = 32 * cg + 8 * j + 2 * C_
                        v = [act((acc[i][j][e] + sm[bs + col + (e & 1)]).astype(f32)) for e in range(4)]
                        if vec_out:
                            odd = (C_ & 1) == 1
                            send0 = np.where(odd, v[0], v[2]); send1 = np.where(odd, v[1], v[3])
                            s0_ = send0[lane ^ 1]; s1_ = send1[lane ^ 1]
                            r = np.where(odd, row + 8, row); cc = np.where(odd, col - 2, col)
                            q = [np.where(odd, s0_, v[0]), np.where(odd, s1_, v[1]), np.where(odd, v[2], s0_), np.where(odd, v[3], s1_)]
                            for L in range(32):
                                if r[L] < N and cc[L] < Fo:
                                    assert (o + r[L] * Fo + cc[L]) % 4 == 0
                                    out[o + r[L] * Fo + cc[L]: o + r[L] * Fo + cc[L] + 4] = [q[e][L] for e in range(4)]
                        else:
                            for e in range(4):
                                r = row + 8 * (e >> 1); cc = col + (e & 1); ok = (r < N) & (cc < Fo)
                                out[(o + r * Fo + cc)[ok]] = v[e][ok]
            tile += blocks; buf = 0 if buf + 1 == xbufs else buf + 1
    return out.reshape(S, N, Fo)

relu = lambda t: np.maximum(t, 0)
rng = np.random.default_rng(0)
cases = [(3, 14, 32, 32), (3, 62, 64, 64), (5, 13, 5, 33), (2, 17, 7, 5), (1, 1, 1, 1), (4, 31, 33, 64), (19, 14, 32, 32)]
for sp in ('x3', 'bf'):
    for (S, N, F, Fo) in cases:
        for vo in (True, False):
            x = rng.standard_normal((S, N, F)).astype(f32); A = (rng.standard_normal((N, N)) / N**.5).astype(f32)
            W = (rng.standard_normal((F, Fo)) / F**.5).astype(f32); b = rng.standard_normal(Fo).astype(f32)
            knobs = dict(tile_kb=[16, 1, 4][S % 3], az_mr=1 + S % 2)  # the kernel's knobs
            got = run(x, A, W, b, relu, sp, blocks=2, vec_out=vo, **knobs)
            want = relu(A.astype(float) @ x.astype(float) @ W.astype(float) + b)
            err = np.linalg.norm(got - want) / np.linalg.norm(want)
            print(sp, S, N, F, Fo, knobs, 'vec_out' if vo else 'scalar', 'nan' if np.isnan(got).any() else '', f'{err:.2e}', flush=True)
# dynamic range
S, N, F, Fo = 2, 62, 64, 64
sp_ = lambda *s: (rng.standard_normal(s) * np.exp(rng.standard_normal(s) * 2.3)).astype(f32)
x, A, W = sp_(S, N, F), (sp_(N, N) / N**.5).astype(f32), (sp_(F, Fo) / F**.5).astype(f32)
want = A.astype(float) @ x.astype(float) @ W.astype(float)
t = lambda v: tf32(v).astype(float)
print('plain tf32', np.linalg.norm(t(A) @ t((t(x) @ t(W)).astype(f32)) - want) / np.linalg.norm(want))
for sp in ('x3', 'bf'):
    got = run(x, A, W, None, lambda t: t, sp, blocks=1)
    print('dynamic', sp, np.linalg.norm(got - want) / np.linalg.norm(want))
