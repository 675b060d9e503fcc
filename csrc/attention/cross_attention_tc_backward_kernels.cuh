// Kernels and launchers of the tensor-core attention backward (see cross_attention_tc_backward.cu for
// the design). A header so that each dtype instantiates them in its own translation unit
// (cross_attention_tc_backward_{f16,bf16}.cu): the two compile in parallel, which halves the
// longest step of a CUDA build.
#pragma once
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>

#include "../core/cuda_utils.cuh"
#include "attention.h"
#include "attention_common.h"
#include "cross_attention_tc.h"
#include "mma_helpers.cuh"

namespace affectkit::attention::detail::tc_backward {

constexpr int kTile = 64;   // keys per tile (dq) / keys per block (dkdv) / rows per dq block
constexpr int kPad = 8;     // elements of padding at the end of every shared-memory row
constexpr int kWarps = 4;   // 16 rows (dq) or keys (dkdv) per warp
constexpr int kThreads = kWarps * 32;
constexpr float kLog2e = 1.4426950408889634f;

// Query rows per dkdv tile: 32 when both D and Dv are 128 (keeps dK, dV, S^T, dP^T in registers).
template <int kD, int kDv>
constexpr int dkdv_query_tile() { return (kD == 128 && kDv == 128) ? 32 : 64; }

__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_all;\n" ::: "memory"); }

template <typename T>
__device__ __forceinline__ float2 unpack2(uint32_t x) {
  if constexpr (std::is_same_v<T, __half>) {
    return __half22float2(*reinterpret_cast<const __half2*>(&x));
  } else {
    return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&x));
  }
}

// ---------------------------------------------------------------------------------- dQ

// Under __launch_bounds__(128) alone ptxas settles on 128 (D = 32) or 168 (D = 128, sm_90)
// registers and spills a few bytes; an explicit per-kernel cap (CUDA 12.4+) gives it room.
#if defined(__CUDACC_VER_MAJOR__) && (__CUDACC_VER_MAJOR__ > 12 || (__CUDACC_VER_MAJOR__ == 12 && __CUDACC_VER_MINOR__ >= 4))
#define AFFECTKIT_TC_DQ_BOUNDS __maxnreg__(224)
#else
#define AFFECTKIT_TC_DQ_BOUNDS __launch_bounds__(kThreads)
#endif

template <typename T, int kD, int kDv>
__global__ void AFFECTKIT_TC_DQ_BOUNDS
    tc_dq_kernel(Problem p, View q, View k, View v, Mask mask, View out, View gout, View lse, MutView gq,
                 float* delta, float* gmask, float scale_log2, int copy, bool pair) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  constexpr int kSQ = kD + kPad;
  constexpr int kSV = kDv + kPad;
  constexpr int kStage = kTile * (kSQ + kSV);
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* const sQ = reinterpret_cast<T*>(smem_raw);  // [kTile][kSQ]
  T* const sO = sQ + kTile * kSQ;                 // dO: [kTile][kSV]
  T* const sK0 = sO + kTile * kSV;                // stage s: K at sK0 + s * kStage, V after it
  // (delta of the block's rows: the tail of shared memory, after the stages; see dq_smem_bytes)

  const int lane = static_cast<int>(threadIdx.x & 31), warp = static_cast<int>(threadIdx.x >> 5);
  const int g = lane >> 2, c4 = lane & 3;
  const int64_t b = blockIdx.z, h = blockIdx.y;
  const Seq s = seq_info(p, b);
  const int r0 = static_cast<int>(gridDim.x - 1 - blockIdx.x) * kTile;  // longest (causal) first
  if (r0 >= s.qrows) return;  // block-uniform, before any barrier
  const int qlen = static_cast<int>(s.qlen);
  const int qvalid = qlen - r0;
  const int kend_blk = qvalid > 0 ? static_cast<int>(key_end(p, s, r0 + min(kTile, qvalid) - 1)) : 0;
  const int n_tiles = (kend_blk + kTile - 1) / kTile;
  const int stages = p.Lk > kTile ? 2 : 1;
  float* const sDelta = reinterpret_cast<float*>(sK0 + stages * kStage);

  const T* const qbase = static_cast<const T*>(q.data) + b * q.sb + h * q.sh + (s.q0 + r0) * q.sr;
  const T* const gobase = static_cast<const T*>(gout.data) + b * gout.sb + h * gout.sh + (s.q0 + r0) * gout.sr;
  const T* const obase = static_cast<const T*>(out.data) + b * out.sb + h * out.sh + (s.q0 + r0) * out.sr;
  const T* const kbase = static_cast<const T*>(k.data) + b * k.sb + h * k.sh + s.k0 * k.sr;
  const T* const vbase = static_cast<const T*>(v.data) + b * v.sb + h * v.sh + s.k0 * v.sr;
  const int D = static_cast<int>(p.D), Dv = static_cast<int>(p.Dv);

  auto stage_kv = [&](int t) {
    const int j0 = t * kTile;
    T* const dK = sK0 + (t & 1) * kStage;
    T* const dV = dK + kTile * kSQ;
    const int valid = kend_blk - j0;
    stage_rows_either<T, kD>(copy, dK, kSQ, kbase + static_cast<int64_t>(j0) * k.sr, k.sr, kTile, valid, D);
    stage_rows_either<T, kDv>(copy, dV, kSV, vbase + static_cast<int64_t>(j0) * v.sr, v.sr, kTile, valid, Dv);
  };

  // Group 0: Q, dO and the first K/V tile.
  stage_rows_either<T, kD>(copy, sQ, kSQ, qbase, q.sr, kTile, n_tiles > 0 ? qvalid : 0, D);
  stage_rows_either<T, kDv>(copy, sO, kSV, gobase, gout.sr, kTile, n_tiles > 0 ? qvalid : 0, Dv);
  if (n_tiles > 0) stage_kv(0);
  cp_async_commit();

  // delta_i = dO_i . O_i for the block's valid rows (two lanes per row, 8 rows per warp pass),
  // from global memory, while the copies fly. Every valid row gets it, even with no key:
  // the dkdv kernel multiplies it by P = 0 and must not see garbage.
  for (int rr = warp * 16 + (lane >> 1); rr < warp * 16 + 16; rr += 16) {
    const int half = lane & 1;
    float acc = 0.f;
    if (rr < qvalid) {
      const T* const gorow = gobase + static_cast<int64_t>(rr) * gout.sr;
      const T* const orow = obase + static_cast<int64_t>(rr) * out.sr;
      for (int c = half; copy != kCopy16 && c < Dv; c += 2) acc = fmaf(to_float(gorow[c]), to_float(orow[c]), acc);
      for (int ch = half; copy == kCopy16 && ch < Dv / 8; ch += 2) {
        const uint4 x = *reinterpret_cast<const uint4*>(gorow + ch * 8);
        const uint4 y = *reinterpret_cast<const uint4*>(orow + ch * 8);
        const uint32_t xs[4] = {x.x, x.y, x.z, x.w}, ys[4] = {y.x, y.y, y.z, y.w};
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const float2 a = unpack2<T>(xs[e]), c = unpack2<T>(ys[e]);
          acc = fmaf(a.x, c.x, acc);
          acc = fmaf(a.y, c.y, acc);
        }
      }
    }
    acc += __shfl_xor_sync(0xffffffffu, acc, 1);
    if (half == 0) {
      sDelta[rr] = acc;
      if (rr < qvalid) delta[(b * p.H + h) * p.Lq + r0 + rr] = acc;
    }
  }
  __syncwarp();

  const int wr0 = r0 + warp * 16;
  const int ia = wr0 + g, ib = wr0 + g + 8;
  float delta_a = sDelta[warp * 16 + g], delta_b = sDelta[warp * 16 + g + 8];
  const float* const lsebase = static_cast<const float*>(lse.data) + b * lse.sb + h * lse.sh;
  const float lse_a = ia < qlen ? lsebase[(s.q0 + ia) * lse.sr] : INFINITY;
  const float lse_b = ib < qlen ? lsebase[(s.q0 + ib) * lse.sr] : INFINITY;
  const float lse2_a = lse_a * kLog2e, lse2_b = lse_b * kLog2e;
  const int kend_a = ia < qlen && !isinf(lse_a) ? static_cast<int>(key_end(p, s, ia)) : 0;
  const int kend_b = ib < qlen && !isinf(lse_b) ? static_cast<int>(key_end(p, s, ib)) : 0;
  const int warp_kmin = wr0 + 15 < qlen ? static_cast<int>(key_end(p, s, wr0)) : 0;
  const int warp_kmax = wr0 < qlen ? static_cast<int>(key_end(p, s, min(wr0 + 15, qlen - 1))) : 0;
  const bool has_mask = mask.data != nullptr;
  const bool bool_mask = mask.dtype == DType::Bool;
  const int64_t mrow_a = has_mask ? b * mask.sb + h * mask.sh + static_cast<int64_t>(ia) * mask.si : 0;
  const int64_t mrow_b = has_mask ? b * mask.sb + h * mask.sh + static_cast<int64_t>(ib) * mask.si : 0;
  const float scale = static_cast<float>(p.scale);
  float* const gm_a = gmask != nullptr ? gmask + ((b * p.H + h) * p.Lq + ia) * p.Lk : nullptr;
  float* const gm_b = gmask != nullptr ? gmask + ((b * p.H + h) * p.Lq + ib) * p.Lk : nullptr;

  float dq[kD / 8][4];
#pragma unroll
  for (int n = 0; n < kD / 8; ++n) dq[n][0] = dq[n][1] = dq[n][2] = dq[n][3] = 0.f;
  const bool warp_active = warp_kmax > 0;

  for (int t = 0; t < n_tiles; ++t) {
    if (t + 1 < n_tiles) stage_kv(t + 1);
    cp_async_commit();
    cp_async_wait_1();
    __syncthreads();
    const int j0 = t * kTile;
    if (warp_active && j0 < warp_kmax) {  // warp-uniform
      const T* const Ks = sK0 + (t & 1) * kStage;
      const T* const Vs = Ks + kTile * kSQ;
      const int arow = warp * 16 + ((lane >> 3) & 1) * 8 + (lane & 7);  // A-fragment row (ldmatrix)
      float sc[kTile / 8][4], dp[kTile / 8][4];
#pragma unroll
      for (int n = 0; n < kTile / 8; ++n) {
        sc[n][0] = sc[n][1] = sc[n][2] = sc[n][3] = 0.f;
        dp[n][0] = dp[n][1] = dp[n][2] = dp[n][3] = 0.f;
      }
      // S = Q K^T
#pragma unroll
      for (int ks = 0; ks < kD / 16; ++ks) {
        if (ks * 16 >= p.D) break;
        uint32_t af[4];
        ldsm_x4(af, smem_addr(sQ + arow * kSQ + ks * 16 + (lane >> 4) * 8));
#pragma unroll
        for (int np = 0; np < kTile / 16; ++np) {
          uint32_t bk[4];
          const int key = np * 16 + (lane >> 4) * 8 + (lane & 7);
          const int col = ks * 16 + ((lane >> 3) & 1) * 8;
          ldsm_x4(bk, smem_addr(Ks + key * kSQ + col));
          mma16816<T>(sc[2 * np], af, bk[0], bk[1]);
          mma16816<T>(sc[2 * np + 1], af, bk[2], bk[3]);
        }
      }
      // dP = dO V^T
#pragma unroll
      for (int ks = 0; ks < kDv / 16; ++ks) {
        if (ks * 16 >= p.Dv) break;
        uint32_t af[4];
        ldsm_x4(af, smem_addr(sO + arow * kSV + ks * 16 + (lane >> 4) * 8));
#pragma unroll
        for (int np = 0; np < kTile / 16; ++np) {
          uint32_t bv[4];
          const int key = np * 16 + (lane >> 4) * 8 + (lane & 7);
          const int col = ks * 16 + ((lane >> 3) & 1) * 8;
          ldsm_x4(bv, smem_addr(Vs + key * kSV + col));
          mma16816<T>(dp[2 * np], af, bv[0], bv[1]);
          mma16816<T>(dp[2 * np + 1], af, bv[2], bv[3]);
        }
      }
      // P, in place in sc.
      if (!has_mask && j0 + kTile <= warp_kmin) {
#pragma unroll
        for (int n = 0; n < kTile / 8; ++n) {
#pragma unroll
          for (int e = 0; e < 4; ++e) sc[n][e] = exp2f(fmaf(sc[n][e], scale_log2, -(e < 2 ? lse2_a : lse2_b)));
        }
      } else {
#pragma unroll
        for (int n = 0; n < kTile / 8; ++n) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int j = j0 + n * 8 + 2 * c4 + (e & 1);
            const bool upper = e < 2;
            float x = sc[n][e] * scale_log2;
            if (j >= (upper ? kend_a : kend_b)) {
              x = -INFINITY;
            } else if (has_mask) {
              const int64_t off = (upper ? mrow_a : mrow_b) + static_cast<int64_t>(j) * mask.sj;
              if (bool_mask) {
                if (!static_cast<const uint8_t*>(mask.data)[off]) x = -INFINITY;
              } else {
                x = fmaf(sc[n][e], scale, static_cast<const float*>(mask.data)[off]) * kLog2e;
              }
            }
            sc[n][e] = x == -INFINITY ? 0.f : exp2f(x - (upper ? lse2_a : lse2_b));
          }
        }
      }
      // When every visible key of the block is in this one tile, delta = sum_j P dP exactly
      // (= dO . O before O was rounded to the input dtype): the rounded O's error would
      // otherwise leak into dS, most visibly for rows that see one key, where dS is exactly 0.
      // The dK/dV kernel reads the delta written here.
      if (n_tiles == 1) {
        float da = 0.f, db = 0.f;
#pragma unroll
        for (int n = 0; n < kTile / 8; ++n) {
          da = fmaf(sc[n][0], dp[n][0], fmaf(sc[n][1], dp[n][1], da));
          db = fmaf(sc[n][2], dp[n][2], fmaf(sc[n][3], dp[n][3], db));
        }
        delta_a = quad_sum(da);
        delta_b = quad_sum(db);
        if (c4 == 0) {
          if (ia < qlen) delta[(b * p.H + h) * p.Lq + ia] = delta_a;
          if (ib < qlen) delta[(b * p.H + h) * p.Lq + ib] = delta_b;
        }
      }
      // dS = P (dP - delta), in place in sc.
#pragma unroll
      for (int n = 0; n < kTile / 8; ++n) {
#pragma unroll
        for (int e = 0; e < 4; ++e) sc[n][e] *= dp[n][e] - (e < 2 ? delta_a : delta_b);
      }
      if (gmask != nullptr) {  // dS of every visible (i, j); the rest of the buffer stays zero
#pragma unroll
        for (int n = 0; n < kTile / 8; ++n) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int j = j0 + n * 8 + 2 * c4 + (e & 1);
            if (e < 2 ? j < kend_a : j < kend_b) (e < 2 ? gm_a : gm_b)[j] = sc[n][e];
          }
        }
      }
      // dQ += dS K: the dS accumulators of key tiles 2kk, 2kk+1 are the A fragment of keys
      // 16kk..16kk+15; B (keys x features) by ldmatrix.trans from the K rows.
#pragma unroll
      for (int kk = 0; kk < kTile / 16; ++kk) {
        if (j0 + kk * 16 >= warp_kmax) break;  // dS is zero from here on
        uint32_t pa[4];
        pa[0] = pack2<T>(sc[2 * kk][0], sc[2 * kk][1]);
        pa[1] = pack2<T>(sc[2 * kk][2], sc[2 * kk][3]);
        pa[2] = pack2<T>(sc[2 * kk + 1][0], sc[2 * kk + 1][1]);
        pa[3] = pack2<T>(sc[2 * kk + 1][2], sc[2 * kk + 1][3]);
#pragma unroll
        for (int np = 0; np < kD / 16; ++np) {
          if (np * 16 >= p.D) break;
          uint32_t bk[4];
          const int key = kk * 16 + ((lane >> 3) & 1) * 8 + (lane & 7);
          const int col = np * 16 + (lane >> 4) * 8;
          ldsm_x4_trans(bk, smem_addr(Ks + key * kSQ + col));
          mma16816<T>(dq[2 * np], pa, bk[0], bk[1]);
          mma16816<T>(dq[2 * np + 1], pa, bk[2], bk[3]);
        }
      }
    }
    __syncthreads();  // the stage read here is overwritten by the copy issued next iteration
  }
  cp_async_wait_all();  // nothing may be in flight into shared memory when the block exits

  // dQ * scale in the input dtype; zeros for rows past the q length or with no visible key.
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int i = half == 0 ? ia : ib;
    if (i >= s.qrows) continue;
    T* const row = static_cast<T*>(gq.data) + b * gq.sb + h * gq.sh + (s.q0 + i) * gq.sr;
#pragma unroll
    for (int n = 0; n < kD / 8; ++n) {
      const int col = n * 8 + 2 * c4;
      if (col < D) store_pair<T>(row, col, D, pair, dq[n][2 * half] * scale, dq[n][2 * half + 1] * scale);
    }
  }
#else
  __trap();  // never launched: the dispatcher requires sm_80+
#endif
}

// -------------------------------------------------------------------------------- dK, dV

template <typename T, int kD, int kDv>
__global__ void __launch_bounds__(kThreads)
    tc_dkdv_kernel(Problem p, View q, View k, View v, Mask mask, View gout, View lse, MutView gk, MutView gv,
                   const float* delta, float scale_log2, int copy, bool pair) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  constexpr int kQT = dkdv_query_tile<kD, kDv>();  // query rows per tile
  constexpr int kSQ = kD + kPad;
  constexpr int kSV = kDv + kPad;
  constexpr int kStage = kQT * (kSQ + kSV);  // Q then dO
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* const sK = reinterpret_cast<T*>(smem_raw);  // [kTile][kSQ]
  T* const sV = sK + kTile * kSQ;                 // [kTile][kSV]
  T* const sQ0 = sV + kTile * kSV;                // stage s: Q at sQ0 + s * kStage, dO after it

  const int lane = static_cast<int>(threadIdx.x & 31), warp = static_cast<int>(threadIdx.x >> 5);
  const int g = lane >> 2, c4 = lane & 3;
  const int64_t b = blockIdx.z, h = blockIdx.y;
  const Seq s = seq_info(p, b);
  const int j0 = static_cast<int>(blockIdx.x) * kTile;  // first blocks see the most queries (causal)
  if (j0 >= s.krows) return;  // block-uniform, before any barrier
  const int qlen = static_cast<int>(s.qlen), klen = static_cast<int>(s.klen);
  const int offset = static_cast<int>(s.offset);
  const int kvalid = klen - j0;  // valid keys of this block (may be <= 0)
  // Query i sees key j iff j <= i + offset (causal): the first query that sees key j0.
  const int i_begin = kvalid <= 0 ? qlen : (p.causal ? static_cast<int>(clamp64(j0 - offset, 0, qlen)) : 0);
  const int n_tiles = (qlen - i_begin + kQT - 1) / kQT;
  const int stages = qlen - i_begin > kQT ? 2 : 1;
  float* const sL0 = reinterpret_cast<float*>(sQ0 + stages * kStage);  // stage s: lse at sL0 + 2 s kQT,
                                                                       // delta after it

  const T* const kbase = static_cast<const T*>(k.data) + b * k.sb + h * k.sh + (s.k0 + j0) * k.sr;
  const T* const vbase = static_cast<const T*>(v.data) + b * v.sb + h * v.sh + (s.k0 + j0) * v.sr;
  const T* const qbase = static_cast<const T*>(q.data) + b * q.sb + h * q.sh + s.q0 * q.sr;
  const T* const gobase = static_cast<const T*>(gout.data) + b * gout.sb + h * gout.sh + s.q0 * gout.sr;
  const float* const lsebase = static_cast<const float*>(lse.data) + b * lse.sb + h * lse.sh;
  const float* const dbase = delta + (b * p.H + h) * p.Lq;
  const int D = static_cast<int>(p.D), Dv = static_cast<int>(p.Dv);

  auto stage_q = [&](int t) {
    const int i0 = i_begin + t * kQT;
    T* const dQ = sQ0 + (t & 1) * kStage;
    T* const dO = dQ + kQT * kSQ;
    const int valid = qlen - i0;  // > 0 for every tile we load
    stage_rows_either<T, kD>(copy, dQ, kSQ, qbase + static_cast<int64_t>(i0) * q.sr, q.sr, kQT, valid, D);
    stage_rows_either<T, kDv>(copy, dO, kSV, gobase + static_cast<int64_t>(i0) * gout.sr, gout.sr, kQT, valid, Dv);
    float* const dl = sL0 + (t & 1) * 2 * kQT;
    for (int r = static_cast<int>(threadIdx.x); r < kQT; r += static_cast<int>(blockDim.x)) {
      const int i = i0 + r;
      // Rows past the q length: lse = +inf gives P = 0 (their Q and dO rows are zeros too).
      dl[r] = i < qlen ? lsebase[(s.q0 + i) * lse.sr] * kLog2e : INFINITY;
      dl[kQT + r] = i < qlen ? dbase[i] : 0.f;
    }
  };

  // Group 0: K, V and the first query tile.
  stage_rows_either<T, kD>(copy, sK, kSQ, kbase, k.sr, kTile, n_tiles > 0 ? kvalid : 0, D);
  stage_rows_either<T, kDv>(copy, sV, kSV, vbase, v.sr, kTile, n_tiles > 0 ? kvalid : 0, Dv);
  if (n_tiles > 0) stage_q(0);
  cp_async_commit();

  const int wj0 = j0 + warp * 16;  // the warp's first key
  const int ja = wj0 + g, jb = wj0 + g + 8;
  const bool has_mask = mask.data != nullptr;
  const bool bool_mask = mask.dtype == DType::Bool;
  const int64_t mbase = has_mask ? b * mask.sb + h * mask.sh : 0;
  const float scale = static_cast<float>(p.scale);
  const bool warp_active = wj0 < klen;
  const int arow = warp * 16 + ((lane >> 3) & 1) * 8 + (lane & 7);  // A-fragment row (ldmatrix)

  float dk[kD / 8][4], dv[kDv / 8][4];
#pragma unroll
  for (int n = 0; n < kD / 8; ++n) dk[n][0] = dk[n][1] = dk[n][2] = dk[n][3] = 0.f;
#pragma unroll
  for (int n = 0; n < kDv / 8; ++n) dv[n][0] = dv[n][1] = dv[n][2] = dv[n][3] = 0.f;

  for (int t = 0; t < n_tiles; ++t) {
    if (t + 1 < n_tiles) stage_q(t + 1);
    cp_async_commit();
    cp_async_wait_1();
    __syncthreads();
    const int i0 = i_begin + t * kQT;
    const int imax = min(i0 + kQT, qlen) - 1;  // the tile's last valid query
    // Causal: the warp's first key is seen by some query of the tile iff wj0 <= imax + offset.
    if (warp_active && (!p.causal || wj0 <= imax + offset)) {  // warp-uniform
      const T* const Qs = sQ0 + (t & 1) * kStage;
      const T* const Os = Qs + kQT * kSQ;
      const float* const sL = sL0 + (t & 1) * 2 * kQT;
      const float* const sD = sL + kQT;
      float sc[kQT / 8][4], dp[kQT / 8][4];
#pragma unroll
      for (int n = 0; n < kQT / 8; ++n) {
        sc[n][0] = sc[n][1] = sc[n][2] = sc[n][3] = 0.f;
        dp[n][0] = dp[n][1] = dp[n][2] = dp[n][3] = 0.f;
      }
      // S^T = K Q^T (keys x queries)
#pragma unroll
      for (int ks = 0; ks < kD / 16; ++ks) {
        if (ks * 16 >= p.D) break;
        uint32_t af[4];
        ldsm_x4(af, smem_addr(sK + arow * kSQ + ks * 16 + (lane >> 4) * 8));
#pragma unroll
        for (int np = 0; np < kQT / 16; ++np) {
          uint32_t bq[4];
          const int row = np * 16 + (lane >> 4) * 8 + (lane & 7);
          const int col = ks * 16 + ((lane >> 3) & 1) * 8;
          ldsm_x4(bq, smem_addr(Qs + row * kSQ + col));
          mma16816<T>(sc[2 * np], af, bq[0], bq[1]);
          mma16816<T>(sc[2 * np + 1], af, bq[2], bq[3]);
        }
      }
      // dP^T = V dO^T
#pragma unroll
      for (int ks = 0; ks < kDv / 16; ++ks) {
        if (ks * 16 >= p.Dv) break;
        uint32_t af[4];
        ldsm_x4(af, smem_addr(sV + arow * kSV + ks * 16 + (lane >> 4) * 8));
#pragma unroll
        for (int np = 0; np < kQT / 16; ++np) {
          uint32_t bo[4];
          const int row = np * 16 + (lane >> 4) * 8 + (lane & 7);
          const int col = ks * 16 + ((lane >> 3) & 1) * 8;
          ldsm_x4(bo, smem_addr(Os + row * kSV + col));
          mma16816<T>(dp[2 * np], af, bo[0], bo[1]);
          mma16816<T>(dp[2 * np + 1], af, bo[2], bo[3]);
        }
      }
      // P^T (in sc) and dS^T = P^T (dP^T - delta) (in dp). Element (n, e): key ja (e < 2) or
      // jb, query i0 + 8n + 2 c4 + (e & 1).
      const bool full = !has_mask && wj0 + 16 <= klen && i0 + kQT <= qlen &&
                        (!p.causal || wj0 + 15 <= i0 + offset);
#pragma unroll
      for (int n = 0; n < kQT / 8; ++n) {
        const float2 l2 = *reinterpret_cast<const float2*>(sL + n * 8 + 2 * c4);
        const float2 dl = *reinterpret_cast<const float2*>(sD + n * 8 + 2 * c4);
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const float lse2 = (e & 1) ? l2.y : l2.x;
          const float di = (e & 1) ? dl.y : dl.x;
          float pr;
          if (full) {
            pr = exp2f(fmaf(sc[n][e], scale_log2, -lse2));
          } else {
            const int i = i0 + n * 8 + 2 * c4 + (e & 1);
            const int j = e < 2 ? ja : jb;
            float x = sc[n][e] * scale_log2;
            if (i >= qlen || j >= klen || (p.causal && j > i + offset)) {
              x = -INFINITY;
            } else if (has_mask) {
              const int64_t off = mbase + static_cast<int64_t>(i) * mask.si + static_cast<int64_t>(j) * mask.sj;
              if (bool_mask) {
                if (!static_cast<const uint8_t*>(mask.data)[off]) x = -INFINITY;
              } else {
                x = fmaf(sc[n][e], scale, static_cast<const float*>(mask.data)[off]) * kLog2e;
              }
            }
            pr = x == -INFINITY ? 0.f : exp2f(x - lse2);  // lse2 = +inf (nothing visible): 0
          }
          sc[n][e] = pr;
          dp[n][e] = pr * (dp[n][e] - di);
        }
      }
      // dV += P^T dO and dK += dS^T Q: query tiles 2kk, 2kk+1 of the accumulators are the A
      // fragment of queries 16kk..16kk+15; B (queries x features) by ldmatrix.trans.
#pragma unroll
      for (int kk = 0; kk < kQT / 16; ++kk) {
        if (i0 + kk * 16 >= qlen) break;  // P and dS are zero from here on
        uint32_t pa[4], sa[4];
        pa[0] = pack2<T>(sc[2 * kk][0], sc[2 * kk][1]);
        pa[1] = pack2<T>(sc[2 * kk][2], sc[2 * kk][3]);
        pa[2] = pack2<T>(sc[2 * kk + 1][0], sc[2 * kk + 1][1]);
        pa[3] = pack2<T>(sc[2 * kk + 1][2], sc[2 * kk + 1][3]);
        sa[0] = pack2<T>(dp[2 * kk][0], dp[2 * kk][1]);
        sa[1] = pack2<T>(dp[2 * kk][2], dp[2 * kk][3]);
        sa[2] = pack2<T>(dp[2 * kk + 1][0], dp[2 * kk + 1][1]);
        sa[3] = pack2<T>(dp[2 * kk + 1][2], dp[2 * kk + 1][3]);
        const int row = kk * 16 + ((lane >> 3) & 1) * 8 + (lane & 7);
#pragma unroll
        for (int np = 0; np < kDv / 16; ++np) {
          if (np * 16 >= p.Dv) break;
          uint32_t bo[4];
          ldsm_x4_trans(bo, smem_addr(Os + row * kSV + np * 16 + (lane >> 4) * 8));
          mma16816<T>(dv[2 * np], pa, bo[0], bo[1]);
          mma16816<T>(dv[2 * np + 1], pa, bo[2], bo[3]);
        }
#pragma unroll
        for (int np = 0; np < kD / 16; ++np) {
          if (np * 16 >= p.D) break;
          uint32_t bq[4];
          ldsm_x4_trans(bq, smem_addr(Qs + row * kSQ + np * 16 + (lane >> 4) * 8));
          mma16816<T>(dk[2 * np], sa, bq[0], bq[1]);
          mma16816<T>(dk[2 * np + 1], sa, bq[2], bq[3]);
        }
      }
    }
    __syncthreads();  // the stage read here is overwritten by the copy issued next iteration
  }
  cp_async_wait_all();  // nothing may be in flight into shared memory when the block exits

  // dK * scale and dV in the input dtype; zeros for keys past the kv length or seen by nobody.
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int j = half == 0 ? ja : jb;
    if (j >= s.krows) continue;
    T* const krow = static_cast<T*>(gk.data) + b * gk.sb + h * gk.sh + (s.k0 + j) * gk.sr;
    T* const vrow = static_cast<T*>(gv.data) + b * gv.sb + h * gv.sh + (s.k0 + j) * gv.sr;
#pragma unroll
    for (int n = 0; n < kD / 8; ++n) {
      const int col = n * 8 + 2 * c4;
      if (col < D) store_pair<T>(krow, col, D, pair, dk[n][2 * half] * scale, dk[n][2 * half + 1] * scale);
    }
#pragma unroll
    for (int n = 0; n < kDv / 8; ++n) {
      const int col = n * 8 + 2 * c4;
      if (col < Dv) store_pair<T>(vrow, col, Dv, pair, dv[n][2 * half], dv[n][2 * half + 1]);
    }
  }
#else
  __trap();  // never launched: the dispatcher requires sm_80+
#endif
}

// ------------------------------------------------------------------------------- host

constexpr int kMaxDevices = 64;

inline int device_attr(cudaDeviceAttr attr, int dev, std::atomic<int>* cache) {
  if (dev < 0 || dev >= kMaxDevices) {
    int value = 0;
    cuda_check(cudaDeviceGetAttribute(&value, attr, dev), "attention_backward: device attribute");
    return value;
  }
  int value = cache[dev].load(std::memory_order_relaxed);
  if (value == 0) {
    cuda_check(cudaDeviceGetAttribute(&value, attr, dev), "attention_backward: device attribute");
    cache[dev].store(value, std::memory_order_relaxed);
  }
  return value;
}

inline bool aligned4(const void* ptr, int64_t sb, int64_t sh, int64_t sr) {
  return reinterpret_cast<uintptr_t>(ptr) % 4 == 0 && sb % 2 == 0 && sh % 2 == 0 && sr % 2 == 0;
}

inline size_t dq_smem_bytes(int kD, int kDv, int stages) {
  return static_cast<size_t>(kTile * ((kD + kPad) + (kDv + kPad)) * (1 + stages)) * 2 + kTile * sizeof(float);
}
inline size_t dkdv_smem_bytes(int kD, int kDv, int kQT, int stages) {
  return static_cast<size_t>(kTile * ((kD + kPad) + (kDv + kPad)) + stages * kQT * ((kD + kPad) + (kDv + kPad))) * 2 +
         static_cast<size_t>(stages) * 2 * kQT * sizeof(float);
}

// Raise a kernel's dynamic shared-memory limit to `bytes` once per device (bit in `configured`).
template <typename Kernel>
void allow_smem(Kernel kernel, size_t bytes, int dev, std::atomic<uint64_t>& configured) {
  const uint64_t bit = dev >= 0 && dev < kMaxDevices ? uint64_t{1} << dev : 0;
  if (bytes > 48 * 1024 && (bit == 0 || !(configured.load(std::memory_order_relaxed) & bit))) {
    cuda_check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)),
               "attention_backward: shared memory");
    configured.fetch_or(bit, std::memory_order_relaxed);
  }
}

struct Args {
  const Problem& p;
  View q, k, v;
  Mask mask;
  View out, gout, lse;
  MutView gq, gk, gv;
  float* delta;
  float* gmask;
  int copy;   // row copy mode (mma_helpers.cuh)
  bool pair;  // 4-byte gradient stores (else 2-byte)
};

template <typename T, int kD, int kDv>
void launch(const Args& a, int dev, cudaStream_t stream) {
  const Problem& p = a.p;
  const float scale_log2 = static_cast<float>(p.scale * 1.4426950408889634);
  constexpr int kQT = dkdv_query_tile<kD, kDv>();
  {
    auto* kernel = tc_dq_kernel<T, kD, kDv>;
    static std::atomic<uint64_t> configured{0};
    allow_smem(kernel, dq_smem_bytes(kD, kDv, 2), dev, configured);
    const int stages = p.Lk > kTile ? 2 : 1;
    dim3 grid(static_cast<unsigned>((p.Lq + kTile - 1) / kTile), static_cast<unsigned>(p.H),
              static_cast<unsigned>(p.B));
    kernel<<<grid, kThreads, dq_smem_bytes(kD, kDv, stages), stream>>>(p, a.q, a.k, a.v, a.mask, a.out, a.gout,
                                                                        a.lse, a.gq, a.delta, a.gmask, scale_log2,
                                                                        a.copy, a.pair);
  }
  {
    auto* kernel = tc_dkdv_kernel<T, kD, kDv>;
    static std::atomic<uint64_t> configured{0};
    allow_smem(kernel, dkdv_smem_bytes(kD, kDv, kQT, 2), dev, configured);
    // The kernel uses one stage when its query range fits one tile; the launch sizes for the
    // largest range (all of Lq), which is never smaller.
    const int stages = p.Lq > kQT ? 2 : 1;
    dim3 grid(static_cast<unsigned>((p.Lk + kTile - 1) / kTile), static_cast<unsigned>(p.H),
              static_cast<unsigned>(p.B));
    kernel<<<grid, kThreads, dkdv_smem_bytes(kD, kDv, kQT, stages), stream>>>(
        p, a.q, a.k, a.v, a.mask, a.gout, a.lse, a.gk, a.gv, a.delta, scale_log2, a.copy, a.pair);
  }
}

template <typename T, int kD>
void launch_dv(int dv_bucket, const Args& a, int dev, cudaStream_t stream) {
  if (dv_bucket == 32) launch<T, kD, 32>(a, dev, stream);
  else if (dv_bucket == 64) launch<T, kD, 64>(a, dev, stream);
  else launch<T, kD, 128>(a, dev, stream);
}

template <typename T>
void launch_d(int d_bucket, int dv_bucket, const Args& a, int dev, cudaStream_t stream) {
  if (d_bucket == 32) launch_dv<T, 32>(dv_bucket, a, dev, stream);
  else if (d_bucket == 64) launch_dv<T, 64>(dv_bucket, a, dev, stream);
  else launch_dv<T, 128>(dv_bucket, a, dev, stream);
}


// One per dtype, each in its own .cu file.
void launch_f16(int d_bucket, int dv_bucket, const Args& a, int dev, cudaStream_t stream);
void launch_bf16(int d_bucket, int dv_bucket, const Args& a, int dev, cudaStream_t stream);

}  // namespace affectkit::attention::detail::tc_backward
