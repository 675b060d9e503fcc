// Tensor-core backward of the fused attention (fp16 / bf16), FlashAttention-2 style.
//
// Design. Two kernels on the stream, no atomics (each block owns the rows it writes, and every
// sum runs in a fixed order, so the gradients are bit-identical from run to run):
//  1. tc_dq_kernel: a block owns 64 query rows of one (b, h), 16 per warp. It first computes
//     delta_i = dO_i . O_i (fp32) for its rows (written to a scratch (B, H, Lq) buffer for
//     kernel 2), stages Q and dO in shared memory, then walks the key axis in tiles of 64 keys
//     (K and V by 16-byte cp.async, double buffered, exactly like the forward). Per tile and warp:
//       S  (16 x 64) = Q K^T      mma, B fragments by ldmatrix from K rows;
//       P = exp2(S * scale * log2e (+ mask) - lse * log2e) with the forward's key limits and
//           masks (invisible -> 0; rows with lse = +inf see nothing);
//       dP (16 x 64) = dO V^T     mma, B fragments by ldmatrix from V rows;
//       dS = P * (dP - delta)     (fp32; also stored to the dS buffer when gmask != nullptr);
//       dQ (16 x D) += dS K       mma, dS packed to fp16/bf16 straight from the accumulator
//                                 layout as the A fragment, B by ldmatrix.trans from K;
//     and dQ * scale is written in the input dtype (zeros for rows past the q length).
//  2. tc_dkdv_kernel: a block owns 64 keys of one (b, h), 16 per warp, with K and V in shared
//     memory, and walks the query axis in tiles of 64 (32 at D = Dv = 128) query rows (Q, dO,
//     lse and delta; double buffered). It works on the transposed problem so that no
//     fragment ever has to be transposed through shared memory:
//       S^T (16 keys x 64 queries) = K Q^T      A = K rows (ldmatrix), B = Q rows (ldmatrix);
//       P^T = exp2(S^T ... - lse[query]);       dP^T = V dO^T (same pattern);
//       dS^T = P^T * (dP^T - delta[query]);
//       dV (16 x Dv) += P^T dO                  A = P^T from the accumulators, B = dO by
//                                               ldmatrix.trans;
//       dK (16 x D)  += dS^T Q                  A = dS^T, B = Q by ldmatrix.trans;
//     dK * scale and dV are written in the input dtype (zeros for keys past the kv length).
// The kernel, fragment and shared-memory conventions (8-element row padding, D/Dv rounded up
// to 32/64/128 with skipped k-steps/n-tiles, reverse block order for causal dq) are those of
// the forward (cross_attention_tc.cu); the helpers live in mma_helpers.cuh. Accumulation is
// fp32 in registers throughout.
//
// Bounds. Only rows that seq_info says exist are read (query rows below the q length, key rows
// below the kv length; everything else is zero-filled in shared memory), and only rows below
// qrows / krows are written, so packed neighbours are never touched. Every __syncthreads sits
// in block-uniform control flow; warps with nothing to do in a tile skip only their math.
//
// Floors (H100 SXM: ~3.35 TB/s HBM, ~660 TFLOP/s dense fp16/bf16 through mma.sync). Seven
// GEMMs per visible (i, j): dq recomputes S and dP and forms dS K (2D + Dv), dkdv recomputes
// S and dP and forms P^T dO and dS^T Q (2D + 2Dv): FLOPs = 2 * B * H * Lq * Lk_vis * (4 D + 3 Dv)
// (FA2's single-kernel backward needs 5 GEMMs but accumulates dQ with atomics, which the
// determinism contract rules out). Bytes (2 per element): dq reads Q, dO, O, K, V and writes
// dQ; dkdv reads K, V, Q, dO and writes dK, dV; plus lse and delta in fp32.
//   B=64 H=8 33x33 D=64 bf16: ~26 MB -> ~8 us of HBM (less: it is L2-resident right after the
//     forward); 512 blocks of 4 warps per kernel, one tile each, all resident; expected
//     ~6-10 us per kernel, ~15-20 us for the backward (+ a pooled cudaMallocAsync, and the
//     dS memset only with a mask gradient), against ~1 ms for the generic kernels.
//   B=4 H=16 4096^2 D=64: 2 * 64 * 4096^2 * 448 = 0.96 TFLOP -> 1.5 ms at mma.sync peak; with
//     the exp2, masking and fp32 elementwise work and ldmatrix traffic expect ~3-4 ms (40-50% of
//     peak, FA2-class); causal roughly halves it. (SDPA's Hopper kernels use wgmma/TMA.)
// Why: the generic kernels run one warp per row with scalar dot products on the FP32 pipes and
// re-read K/V (dq) or Q/dO (dk/dv) from L2 for every row; here every multiply-add is on the
// tensor cores and each operand tile is read once per 64 rows.
//
// D or Dv not a multiple of 8, or rows not 16-byte aligned: 4-byte cp.async or 2-byte staging
// and 2-byte stores where needed, as in the forward; same math.
// Not taken here (the generic kernels run): float32/float64, dropout > 0, D or Dv above 128,
// devices below sm_80, lengths >= 2^30, Lq or Lk == 0, or AFFECTKIT_ATTENTION_TENSOR_CORES=0
// in the environment (read once, as the forward reads it).
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

namespace affectkit::attention::detail {
namespace {

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

int device_attr(cudaDeviceAttr attr, int dev, std::atomic<int>* cache) {
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

bool aligned4(const void* ptr, int64_t sb, int64_t sh, int64_t sr) {
  return reinterpret_cast<uintptr_t>(ptr) % 4 == 0 && sb % 2 == 0 && sh % 2 == 0 && sr % 2 == 0;
}

size_t dq_smem_bytes(int kD, int kDv, int stages) {
  return static_cast<size_t>(kTile * ((kD + kPad) + (kDv + kPad)) * (1 + stages)) * 2 + kTile * sizeof(float);
}
size_t dkdv_smem_bytes(int kD, int kDv, int kQT, int stages) {
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

int bucket(int64_t d) { return d <= 32 ? 32 : (d <= 64 ? 64 : 128); }

}  // namespace

bool backward_cuda_tensor_cores(DType dtype, const Problem& p, View q, View k, View v, Mask mask, View out,
                                View gout, View lse, MutView gq, MutView gk, MutView gv, void* gmask,
                                uintptr_t stream) {
  static const bool enabled = [] {
    const char* env = std::getenv("AFFECTKIT_ATTENTION_TENSOR_CORES");
    return !(env != nullptr && std::strcmp(env, "0") == 0);
  }();
  if (!enabled) return false;
  if (dtype != DType::Float16 && dtype != DType::BFloat16) return false;
  if (p.dropout_p > 0) return false;
  if (p.B <= 0 || p.H <= 0 || p.Lq <= 0 || p.Lk <= 0) return false;
  if (p.D < 1 || p.D > 128 || p.Dv < 1 || p.Dv > 128) return false;
  if (p.Lq >= (int64_t{1} << 30) || p.Lk >= (int64_t{1} << 30)) return false;
  // The row copy every staged operand allows (16-, 4- or 2-byte pieces; delta's 16-byte loads of
  // out and grad_out go with kCopy16).
  const int copy = std::max({row_copy_mode(p.D, q.data, q.sb, q.sh, q.sr), row_copy_mode(p.D, k.data, k.sb, k.sh, k.sr),
                             row_copy_mode(p.Dv, v.data, v.sb, v.sh, v.sr),
                             row_copy_mode(p.Dv, out.data, out.sb, out.sh, out.sr),
                             row_copy_mode(p.Dv, gout.data, gout.sb, gout.sh, gout.sr)});
  const bool pair = p.D % 2 == 0 && p.Dv % 2 == 0 && aligned4(gq.data, gq.sb, gq.sh, gq.sr) &&
                    aligned4(gk.data, gk.sb, gk.sh, gk.sr) && aligned4(gv.data, gv.sb, gv.sh, gv.sr);
  if (mask.data != nullptr && mask.dtype != DType::Bool && mask.dtype != DType::Float32) return false;
  if (gmask != nullptr && (mask.data == nullptr || mask.dtype != DType::Float32)) return false;
  int dev = 0;
  cuda_check(cudaGetDevice(&dev), "attention_backward: device");
  static std::atomic<int> cc_major[kMaxDevices];
  if (device_attr(cudaDevAttrComputeCapabilityMajor, dev, cc_major) < 8) return false;
  const cudaStream_t st = as_stream(stream);

  float* gm = static_cast<float*>(gmask);
  if (gm != nullptr)  // dS is written only where visible; everything else must read zero
    cuda_check(cudaMemsetAsync(gm, 0, static_cast<size_t>(p.B * p.H * p.Lq * p.Lk) * sizeof(float), st),
               "attention_backward: grad_mask");
  float* delta = nullptr;
  cuda_check(cudaMallocAsync(reinterpret_cast<void**>(&delta), static_cast<size_t>(p.B * p.H * p.Lq) * sizeof(float),
                             st),
             "attention_backward: scratch");
  const Args args{p, q, k, v, mask, out, gout, lse, gq, gk, gv, delta, gm, copy, pair};
  const int db = bucket(p.D), dvb = bucket(p.Dv);
  cudaError_t launch_status = cudaSuccess;
  try {
    if (dtype == DType::Float16) launch_d<__half>(db, dvb, args, dev, st);
    else launch_d<__nv_bfloat16>(db, dvb, args, dev, st);
    launch_status = cudaGetLastError();
  } catch (...) {
    cudaFreeAsync(delta, st);
    throw;
  }
  cuda_check(cudaFreeAsync(delta, st), "attention_backward: scratch");
  cuda_check(launch_status, "attention_backward");
  return true;
}

}  // namespace affectkit::attention::detail
