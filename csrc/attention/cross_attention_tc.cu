// Tensor-core forward of the fused attention (fp16 / bf16), FlashAttention-2 style.
//
// Design. A block owns a tile of query rows of one (b, h): 16 rows per warp, 4 warps (64 rows)
// or, for long queries with enough blocks to fill the GPU, 8 warps (128 rows, halving the
// K/V traffic from L2 per FLOP). The block stages its Q tile in shared memory once (each warp
// then keeps its 16 x D slice in registers as mma A fragments) and walks the key axis in tiles
// of 64 keys; K and V tiles are copied to shared memory with 16-byte cp.async, double
// buffered (the copy of tile t + 1 overlaps the math on tile t; deeper pipelines, up to 8
// stages at D, Dv <= 32, ran slower on an H100). Per tile and warp:
//   S (16 x 64, fp32) = Q K^T       mma.sync.m16n8k16, B fragments by ldmatrix from K rows;
//   scale, key limits (kv length, causal bottom-right), bool/additive mask -> -inf;
//   online softmax in fp32 in the log2 domain (running max m, running sum l per row; a tile
//   with nothing visible keeps m = -inf and is neutral: exp2 is taken against 0 then);
//   P -> fp16/bf16, reusing the S accumulator layout directly as the A fragment of
//   O (16 x Dv, fp32) += P V       mma.sync.m16n8k16, B fragments by ldmatrix.trans from V.
// Then O / l is written in the input dtype and lse = ln2 * m + ln(l) (the true natural-log
// logsumexp of the scaled, masked scores, which the backward and weights kernels recompute
// probabilities from); a row with no visible key gets zeros and lse = +inf, a row past the q
// length (padded form) zeros and +inf, exactly as forward_kernel in cross_attention.cu.
// Shared-memory rows are padded by 8 elements (16 bytes): with D / 8 even the row stride is an
// odd number of 16-byte units, so the 8 row addresses of every ldmatrix phase hit 8 distinct
// bank groups (conflict-free) without a swizzle. D and Dv are rounded up to 32, 64 or 128
// (zero-filled columns, mma k-steps / n-tiles past D or Dv skipped at run time), so only 9
// shape instantiations per dtype exist.
//
// Bounds. Key rows at or past the block's largest visible key (and every feature past D/Dv)
// are zero-filled in shared memory, never read from global memory; query rows at or past the
// q length are zero-filled; lengths and offsets are the clamped values of seq_info/key_end, so
// every global read stays inside the rows seq_info says exist. Key tiles past the block's
// visible range are never loaded (causal and kv-length skipping); a warp whose rows see
// nothing of a tile skips its math but still takes part in the block's copies and barriers
// (every __syncthreads sits in block-uniform control flow).
//
// Floors (H100 SXM: ~3.35 TB/s HBM, ~660 TFLOP/s dense fp16/bf16 through mma.sync, ~990 through
// wgmma). FLOPs = 2 * B * H * Lq * Lk_visible * (D + Dv); bytes = 2 * B * H * (Lq * (D + Dv) +
// Lk * (D + Dv)) + 4 * B * H * Lq (lse).
//   B=64 H=8 33x33 D=64: 8.7 MB -> 2.6 us of HBM; one tile per block, 512 blocks of 4 warps all
//     resident at once; expected ~5-8 us (launch + one load/compute/store latency chain).
//   B=32 H=8 50x375 D=32: 13.9 MB -> 4.2 us; 256 blocks x 6 key tiles; expected ~7-12 us.
//   B=4 H=16 4096^2 D=64: 275 GFLOP -> 0.42 ms at mma.sync peak; the softmax (exp2 on the
//     16/clk/SM MUFU) costs about as much as the mma at D=64, so ~1.0-1.4 ms is expected;
//     D=128: 550 GFLOP, ~1.7-2.5 ms. (SDPA's 0.57 / 0.85 ms use Hopper wgmma/TMA kernels.)
// Why: one warp per row with scalar dot products re-reads K and V from L2 for every query row
// (Lq times per head) and runs on the FP32 pipes; here K/V are read once per 64 or 128 rows
// and every multiply-add is on the tensor cores.
//
// D or Dv not a multiple of 8 (MulT's D = 6), or rows not 16-byte aligned: rows are staged by
// 4-byte cp.async pairs (even D, 4-byte aligned rows) or batched 2-byte loads, zero-filled to
// the next 16 columns, and out is written element by element where its rows are not 4-byte
// aligned or Dv is odd; the math is the same.
// (The generic kernel took D = 6 at 36.6 us for B=64 H=8 33x33 on an H100, graph replay.)
//
// Key groups. With few blocks on the GPU (MulT: 32 x 8 heads, 50 queries, so 256 blocks of 64
// rows), each block is a chain of dependent key tiles, about 1.4 us each on an H100, and most
// of every multiprocessor's warp slots are empty. Then 2 (or, forced, 4) groups of warps share
// the block's rows: each staged tile holds 64 keys per group, group w / row_warps works on its
// own 64 keys with its own running max, sum and output, and at the end the groups merge into
// group 0 through the freed K/V stages. The chain is 2 or 4 times shorter for the same copies.
// The dispatcher takes 2 groups where the key length spans more than one tile and the grid has
// fewer than 4 blocks per multiprocessor; AFFECTKIT_ATTENTION_KEY_GROUPS (auto, 1, 2, 4; read
// once) forces a setting, capped by the device's shared memory.
//
// Long unmasked sequences at D = Dv = 64 or 128 may go to cross_attention_tc_long.cu (32 rows a
// warp; on by default since it ran on an H200: 1.4-1.7x faster at L = 4096, see there).
// Not taken here (the generic kernel runs): float32/float64, dropout > 0, D or Dv above 128,
// devices below sm_80, lengths >= 2^30, or AFFECTKIT_ATTENTION_TENSOR_CORES=0 in the
// environment (read once).
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string>

#include "../core/cuda_utils.cuh"
#include "attention.h"
#include "attention_common.h"
#include "cross_attention_tc.h"
#include "mma_helpers.cuh"

namespace affectkit::attention::detail {
namespace {

constexpr int kKeys = 64;     // keys per tile
constexpr int kPad = 8;       // elements of padding at the end of every shared-memory row
constexpr int kMaxWarps = 8;  // rows per block = 16 * warps (4 or 8)
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// Two K/V stages: the copy of tile t + 1 overlaps the math on tile t.
template <typename T, int kD, int kDv>
__global__ void __launch_bounds__(kMaxWarps * 32)
    tc_forward_kernel(Problem p, View q, View k, View v, Mask mask, MutView out, MutView lse, float scale_log2,
                      int row_copy, bool pair_store, int key_groups) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  constexpr int kSQ = kD + kPad;   // shared row stride of Q and K (elements)
  constexpr int kSV = kDv + kPad;  // of V
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* const sQ = reinterpret_cast<T*>(smem_raw);

  // Warp w owns rows 16 * (w % row_warps) .. + 15 of the block's tile and, of every staged
  // tile of key_groups * 64 keys, the 64 keys of group w / row_warps.
  const int nwarps = static_cast<int>(blockDim.x >> 5);
  const int row_warps = nwarps / key_groups;
  const int rows = row_warps * 16;
  const int tile_keys = key_groups * kKeys;
  const int stage_elems = tile_keys * (kSQ + kSV);
  const int lane = static_cast<int>(threadIdx.x & 31), warp = static_cast<int>(threadIdx.x >> 5);
  const int rg = warp % row_warps, kg = warp / row_warps;
  const int g = lane >> 2, c4 = lane & 3;
  T* const sK0 = sQ + rows * kSQ;  // stage s: K at sK0 + s * stage_elems, V right after it

  const int64_t b = blockIdx.z, h = blockIdx.y;
  const Seq s = seq_info(p, b);
  // Reverse order: under causal masking the last row tiles are the longest; start them first.
  const int r0 = static_cast<int>(gridDim.x - 1 - blockIdx.x) * rows;
  if (r0 >= s.qrows) return;  // block-uniform, before any barrier
  const int qlen = static_cast<int>(s.qlen);
  const int qvalid = qlen - r0;  // valid rows of this tile (may be <= 0)
  const int kend_blk = qvalid > 0 ? static_cast<int>(key_end(p, s, r0 + min(rows, qvalid) - 1)) : 0;
  const int n_tiles = (kend_blk + tile_keys - 1) / tile_keys;

  // This thread's two rows (g and g + 8 of its warp) and their key limits; the warp's range.
  const int wr0 = r0 + rg * 16;
  const int ia = wr0 + g, ib = wr0 + g + 8;
  const int kend_a = ia < qlen ? static_cast<int>(key_end(p, s, ia)) : 0;
  const int kend_b = ib < qlen ? static_cast<int>(key_end(p, s, ib)) : 0;
  const int warp_kmin = wr0 + 15 < qlen ? static_cast<int>(key_end(p, s, wr0)) : 0;
  const int warp_kmax = wr0 < qlen ? static_cast<int>(key_end(p, s, min(wr0 + 15, qlen - 1))) : 0;
  const bool has_mask = mask.data != nullptr;
  const bool bool_mask = mask.dtype == DType::Bool;
  const int64_t mrow_a = has_mask ? b * mask.sb + h * mask.sh + static_cast<int64_t>(ia) * mask.si : 0;
  const int64_t mrow_b = has_mask ? b * mask.sb + h * mask.sh + static_cast<int64_t>(ib) * mask.si : 0;
  const float scale = static_cast<float>(p.scale);

  const T* const qbase = static_cast<const T*>(q.data) + b * q.sb + h * q.sh + (s.q0 + r0) * q.sr;
  const T* const kbase = static_cast<const T*>(k.data) + b * k.sb + h * k.sh + s.k0 * k.sr;
  const T* const vbase = static_cast<const T*>(v.data) + b * v.sb + h * v.sh + s.k0 * v.sr;
  const int dchunks = static_cast<int>(p.D / 8), dvchunks = static_cast<int>(p.Dv / 8);
  // kCopy4 / kCopy2 staging fills K and V only up to the 16-column k-steps used.
  const int dfill = min(kD, static_cast<int>((p.D + 15) / 16) * 16);
  const int dvfill = min(kDv, static_cast<int>((p.Dv + 15) / 16) * 16);

  auto stage_kv = [&](int t) {
    const int j0 = t * tile_keys;
    T* const dK = sK0 + (t & 1) * stage_elems;
    T* const dV = dK + tile_keys * kSQ;
    const int valid = kend_blk - j0;  // > 0 for every tile we load
    const T* const ksrc = kbase + static_cast<int64_t>(j0) * k.sr;
    const T* const vsrc = vbase + static_cast<int64_t>(j0) * v.sr;
    if (row_copy == kCopy16) {
      stage_rows<T, kD / 8>(dK, kSQ, ksrc, k.sr, tile_keys, valid, dchunks);
      stage_rows<T, kDv / 8>(dV, kSV, vsrc, v.sr, tile_keys, valid, dvchunks);
    } else {
      stage_rows_small<T>(row_copy, dK, kSQ, ksrc, k.sr, tile_keys, valid, static_cast<int>(p.D), dfill, true);
      stage_rows_small<T>(row_copy, dV, kSV, vsrc, v.sr, tile_keys, valid, static_cast<int>(p.Dv), dvfill, true);
    }
  };
  if (row_copy == kCopy4) {  // the pad columns of every K/V stage, zeroed once (never copied into)
    for (int st = 0; st < (p.Lk > tile_keys ? 2 : 1); ++st) {
      zero_columns(sK0 + st * stage_elems, kSQ, tile_keys, static_cast<int>(p.D), dfill);
      zero_columns(sK0 + st * stage_elems + tile_keys * kSQ, kSV, tile_keys, static_cast<int>(p.Dv), dvfill);
    }
  }

  // Group 0: Q and the first K/V tile. (Q is filled to kD: every k-step's fragment is loaded.)
  stage_rows_either<T, kD>(row_copy, sQ, kSQ, qbase, q.sr, rows, n_tiles > 0 ? qvalid : 0, static_cast<int>(p.D));
  if (n_tiles > 0) stage_kv(0);
  cp_async_commit();

  uint32_t qf[kD / 16][4];
  float o[kDv / 8][4];
#pragma unroll
  for (int n = 0; n < kDv / 8; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
  float m_a = -INFINITY, m_b = -INFINITY, l_a = 0.f, l_b = 0.f;
  const bool warp_active = warp_kmax > 0;  // some row of this warp sees some key

  for (int t = 0; t < n_tiles; ++t) {
    if (t + 1 < n_tiles) stage_kv(t + 1);
    cp_async_commit();   // possibly empty: "all but the newest group" is then tile t
    cp_async_wait_1();
    __syncthreads();
    const int j0 = t * tile_keys + kg * kKeys;  // this warp's first key
    if (warp_active && t == 0) {
#pragma unroll
      for (int ks = 0; ks < kD / 16; ++ks) {
        const int row = rg * 16 + ((lane >> 3) & 1) * 8 + (lane & 7);
        const int col = ks * 16 + (lane >> 4) * 8;
        ldsm_x4(qf[ks], smem_addr(sQ + row * kSQ + col));
      }
    }
    if (warp_active && j0 < warp_kmax) {  // warp-uniform
      const T* const Ks = sK0 + (t & 1) * stage_elems + kg * kKeys * kSQ;
      const T* const Vs = sK0 + (t & 1) * stage_elems + tile_keys * kSQ + kg * kKeys * kSV;
      float sc[kKeys / 8][4];
#pragma unroll
      for (int n = 0; n < kKeys / 8; ++n) sc[n][0] = sc[n][1] = sc[n][2] = sc[n][3] = 0.f;
#pragma unroll
      for (int ks = 0; ks < kD / 16; ++ks) {
        if (ks * 16 >= p.D) break;  // zero-filled columns
#pragma unroll
        for (int np = 0; np < kKeys / 16; ++np) {
          uint32_t bk[4];
          const int key = np * 16 + (lane >> 4) * 8 + (lane & 7);
          const int col = ks * 16 + ((lane >> 3) & 1) * 8;
          ldsm_x4(bk, smem_addr(Ks + key * kSQ + col));
          mma16816<T>(sc[2 * np], qf[ks], bk[0], bk[1]);
          mma16816<T>(sc[2 * np + 1], qf[ks], bk[2], bk[3]);
        }
      }
      // Scale into the log2 domain and apply the key limits and the mask.
      if (!has_mask && j0 + kKeys <= warp_kmin) {
#pragma unroll
        for (int n = 0; n < kKeys / 8; ++n)
#pragma unroll
          for (int e = 0; e < 4; ++e) sc[n][e] *= scale_log2;
      } else {
#pragma unroll
        for (int n = 0; n < kKeys / 8; ++n) {
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
            sc[n][e] = x;
          }
        }
      }
      // Online softmax (a row's four owners are lanes 4g..4g+3).
      float mx_a = m_a, mx_b = m_b;
#pragma unroll
      for (int n = 0; n < kKeys / 8; ++n) {
        mx_a = fmaxf(mx_a, fmaxf(sc[n][0], sc[n][1]));
        mx_b = fmaxf(mx_b, fmaxf(sc[n][2], sc[n][3]));
      }
      mx_a = quad_max(mx_a);
      mx_b = quad_max(mx_b);
      const float base_a = mx_a == -INFINITY ? 0.f : mx_a;  // nothing visible yet: stay neutral
      const float base_b = mx_b == -INFINITY ? 0.f : mx_b;
      const float alpha_a = exp2f(m_a - base_a), alpha_b = exp2f(m_b - base_b);  // exp2(-inf) = 0
      m_a = mx_a;
      m_b = mx_b;
      float sum_a = 0.f, sum_b = 0.f;
#pragma unroll
      for (int n = 0; n < kKeys / 8; ++n) {
        sc[n][0] = exp2f(sc[n][0] - base_a);
        sc[n][1] = exp2f(sc[n][1] - base_a);
        sc[n][2] = exp2f(sc[n][2] - base_b);
        sc[n][3] = exp2f(sc[n][3] - base_b);
        sum_a += sc[n][0] + sc[n][1];
        sum_b += sc[n][2] + sc[n][3];
      }
      l_a = l_a * alpha_a + sum_a;  // per-lane partial sums; reduced over the quad at the end
      l_b = l_b * alpha_b + sum_b;
#pragma unroll
      for (int n = 0; n < kDv / 8; ++n) {
        o[n][0] *= alpha_a;
        o[n][1] *= alpha_a;
        o[n][2] *= alpha_b;
        o[n][3] *= alpha_b;
      }
      // O += P V: the S accumulators of key tiles 2kk, 2kk+1 are the A fragment of keys
      // 16kk..16kk+15.
#pragma unroll
      for (int kk = 0; kk < kKeys / 16; ++kk) {
        if (j0 + kk * 16 >= warp_kmax) break;  // all of P is zero from here on
        uint32_t pa[4];
        pa[0] = pack2<T>(sc[2 * kk][0], sc[2 * kk][1]);
        pa[1] = pack2<T>(sc[2 * kk][2], sc[2 * kk][3]);
        pa[2] = pack2<T>(sc[2 * kk + 1][0], sc[2 * kk + 1][1]);
        pa[3] = pack2<T>(sc[2 * kk + 1][2], sc[2 * kk + 1][3]);
#pragma unroll
        for (int np = 0; np < kDv / 16; ++np) {
          if (np * 16 >= p.Dv) break;
          uint32_t bv[4];
          const int key = kk * 16 + ((lane >> 3) & 1) * 8 + (lane & 7);
          const int col = np * 16 + (lane >> 4) * 8;
          ldsm_x4_trans(bv, smem_addr(Vs + key * kSV + col));
          mma16816<T>(o[2 * np], pa, bv[0], bv[1]);
          mma16816<T>(o[2 * np + 1], pa, bv[2], bv[3]);
        }
      }
    }
    __syncthreads();  // the stage read here is overwritten by the copy issued next iteration
  }

  if (key_groups > 1) {
    // Merge the key groups' softmax states (m, per-lane partial l, O) for the same rows into
    // group 0's warp, through the K/V stages: the loop's last barrier ended every read of
    // them, and the newest copy group waited for in the loop was the last one with copies.
    constexpr int kFields = 4 + kDv / 2;  // m_a, m_b, l_a, l_b, o
    float* const parts = reinterpret_cast<float*>(sK0);
    if (kg > 0) {
      float* const mine = parts + ((kg - 1) * row_warps + rg) * kFields * 32 + lane;
      mine[0] = m_a;
      mine[32] = m_b;
      mine[64] = l_a;
      mine[96] = l_b;
#pragma unroll
      for (int n = 0; n < kDv / 8; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) mine[(4 + 4 * n + e) * 32] = o[n][e];
    }
    __syncthreads();  // block-uniform; no barrier follows
    if (kg > 0) return;
    for (int other = 1; other < key_groups; ++other) {
      const float* const theirs = parts + ((other - 1) * row_warps + rg) * kFields * 32 + lane;
      const float mx_a = fmaxf(m_a, theirs[0]), mx_b = fmaxf(m_b, theirs[32]);
      const float base_a = mx_a == -INFINITY ? 0.f : mx_a, base_b = mx_b == -INFINITY ? 0.f : mx_b;
      const float sa = exp2f(m_a - base_a), ta = exp2f(theirs[0] - base_a);  // exp2(-inf) = 0
      const float sb = exp2f(m_b - base_b), tb = exp2f(theirs[32] - base_b);
      l_a = l_a * sa + theirs[64] * ta;
      l_b = l_b * sb + theirs[96] * tb;
#pragma unroll
      for (int n = 0; n < kDv / 8; ++n) {
        o[n][0] = o[n][0] * sa + theirs[(4 + 4 * n) * 32] * ta;
        o[n][1] = o[n][1] * sa + theirs[(5 + 4 * n) * 32] * ta;
        o[n][2] = o[n][2] * sb + theirs[(6 + 4 * n) * 32] * tb;
        o[n][3] = o[n][3] * sb + theirs[(7 + 4 * n) * 32] * tb;
      }
      m_a = mx_a;
      m_b = mx_b;
    }
  }

  // Epilogue: O / l in the input dtype, lse; zeros and +inf where nothing was visible.
  l_a = quad_sum(l_a);
  l_b = quad_sum(l_b);
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int i = half == 0 ? ia : ib;
    if (i >= s.qrows) continue;
    const float l = half == 0 ? l_a : l_b;
    const float m = half == 0 ? m_a : m_b;
    const bool any = l > 0.f;
    const float inv = any ? 1.f / l : 0.f;
    const int64_t row = s.q0 + i;
    T* const orow = static_cast<T*>(out.data) + b * out.sb + h * out.sh + row * out.sr;
#pragma unroll
    for (int n = 0; n < kDv / 8; ++n) {
      const int col = n * 8 + 2 * c4;
      if (col < p.Dv)  // a select, not a product: 0 * inf (P = 0 times an infinite V) stays out
        store_pair<T>(orow, col, static_cast<int>(p.Dv), pair_store, any ? o[n][2 * half] * inv : 0.f,
                      any ? o[n][2 * half + 1] * inv : 0.f);
    }
    if (c4 == 0) {
      float* const lrow = static_cast<float*>(lse.data) + b * lse.sb + h * lse.sh + row * lse.sr;
      *lrow = any ? m * kLn2 + __logf(l) : INFINITY;
    }
  }
#else
  __trap();  // never launched: the dispatcher requires sm_80+
#endif
}

constexpr int kMaxDevices = 64;

int device_attr(cudaDeviceAttr attr, int dev, std::atomic<int>* cache) {
  if (dev < 0 || dev >= kMaxDevices) {
    int value = 0;
    cuda_check(cudaDeviceGetAttribute(&value, attr, dev), "attention_forward: device attribute");
    return value;
  }
  int value = cache[dev].load(std::memory_order_relaxed);
  if (value == 0) {
    cuda_check(cudaDeviceGetAttribute(&value, attr, dev), "attention_forward: device attribute");
    cache[dev].store(value, std::memory_order_relaxed);
  }
  return value;
}

bool aligned4(const void* ptr, int64_t sb, int64_t sh, int64_t sr) {
  return reinterpret_cast<uintptr_t>(ptr) % 4 == 0 && sb % 2 == 0 && sh % 2 == 0 && sr % 2 == 0;
}

// Shared memory of a block: its Q tile and the K/V stages (which the key-group merge reuses).
size_t smem_bytes(int kD, int kDv, int row_warps, int key_groups, int stages) {
  const size_t stage_area = static_cast<size_t>(stages * key_groups * kKeys * ((kD + kPad) + (kDv + kPad))) * 2;
  const size_t merge_area = static_cast<size_t>((key_groups - 1) * row_warps * 32 * (4 + kDv / 2)) * 4;
  return static_cast<size_t>(row_warps * 16 * (kD + kPad)) * 2 + std::max(stage_area, merge_area);
}

// AFFECTKIT_ATTENTION_KEY_GROUPS (read once): unset or "auto" -> 0 (the dispatcher chooses),
// else 1, 2 or 4 key groups wherever shared memory allows.
int key_groups_setting() {
  static const int setting = [] {
    const char* env = std::getenv("AFFECTKIT_ATTENTION_KEY_GROUPS");
    if (env == nullptr || std::strcmp(env, "auto") == 0) return 0;
    if (std::strcmp(env, "1") == 0) return 1;
    if (std::strcmp(env, "2") == 0) return 2;
    if (std::strcmp(env, "4") == 0) return 4;
    throw ValueError(std::string("AFFECTKIT_ATTENTION_KEY_GROUPS: expected auto, 1, 2 or 4, got '") + env + "'");
  }();
  return setting;
}

struct BlockShape {
  int row_warps, key_groups;
};

// Rows of 16 per block (row_warps) and key groups, at most kMaxWarps warps in all. Key groups
// shorten each block's chain of dependent key tiles (one 64-key tile costs about 1.4 us of
// latency on an H100 when a few blocks share a multiprocessor): they are chosen where the
// grid leaves multiprocessors short of warps and there is more than one key tile.
BlockShape block_shape(const Problem& p, int sms, int kD, int kDv, size_t smem_limit) {
  const int64_t tiles128 = (p.Lq + 127) / 128, tiles64 = (p.Lq + 63) / 64;
  const int forced = key_groups_setting();
  int groups = forced;
  if (groups == 0) groups = p.Lk > kKeys && p.B * p.H * tiles64 < 4 * static_cast<int64_t>(sms) ? 2 : 1;
  int row_warps = groups == 1 && p.Lq >= 256 && p.B * p.H * tiles128 >= 2 * static_cast<int64_t>(sms) ? 8 : 4;
  row_warps = std::min(row_warps, kMaxWarps / groups);
  const auto stages = [&](int kg) { return p.Lk > kg * kKeys ? 2 : 1; };
  while (groups > 1 && smem_bytes(kD, kDv, row_warps, groups, stages(groups)) > smem_limit) {
    groups /= 2;
    row_warps = std::min(4, kMaxWarps / groups);
  }
  if (smem_bytes(kD, kDv, row_warps, groups, stages(groups)) > smem_limit) row_warps = 4;
  return {row_warps, groups};
}

template <typename T, int kD, int kDv>
void launch(const Problem& p, View q, View k, View v, Mask mask, MutView out, MutView lse, int dev, int sms,
            size_t smem_limit, cudaStream_t stream) {
  // The row copy every operand allows (16-byte, 4-byte or 2-byte pieces; see mma_helpers.cuh).
  const int row_copy = std::max({row_copy_mode(p.D, q.data, q.sb, q.sh, q.sr),
                                 row_copy_mode(p.D, k.data, k.sb, k.sh, k.sr),
                                 row_copy_mode(p.Dv, v.data, v.sb, v.sh, v.sr)});
  const bool pair_store = p.Dv % 2 == 0 && aligned4(out.data, out.sb, out.sh, out.sr);
  auto* kernel = tc_forward_kernel<T, kD, kDv>;
  const BlockShape shape = block_shape(p, sms, kD, kDv, smem_limit);
  const int rows = shape.row_warps * 16, tile_keys = shape.key_groups * kKeys;
  const int stages = p.Lk > tile_keys ? 2 : 1;  // one key tile at most: a single stage
  const size_t bytes = smem_bytes(kD, kDv, shape.row_warps, shape.key_groups, stages);
  // Allow this kernel the device's whole opt-in shared memory, once per device.
  static std::atomic<uint64_t> configured{0};
  const uint64_t bit = dev >= 0 && dev < kMaxDevices ? uint64_t{1} << dev : 0;
  if (bytes > 48 * 1024 && (bit == 0 || !(configured.load(std::memory_order_relaxed) & bit))) {
    cuda_check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem_limit)),
               "attention_forward: shared memory");
    configured.fetch_or(bit, std::memory_order_relaxed);
  }
  dim3 grid(static_cast<unsigned>((p.Lq + rows - 1) / rows), static_cast<unsigned>(p.H), static_cast<unsigned>(p.B));
  kernel<<<grid, shape.row_warps * shape.key_groups * 32, bytes, stream>>>(
      p, q, k, v, mask, out, lse, static_cast<float>(p.scale * 1.4426950408889634), row_copy, pair_store,
      shape.key_groups);
}

template <typename T, int kD>
void launch_dv(int dv_bucket, const Problem& p, View q, View k, View v, Mask mask, MutView out, MutView lse, int dev,
               int sms, size_t smem_limit, cudaStream_t stream) {
  if (dv_bucket == 32) launch<T, kD, 32>(p, q, k, v, mask, out, lse, dev, sms, smem_limit, stream);
  else if (dv_bucket == 64) launch<T, kD, 64>(p, q, k, v, mask, out, lse, dev, sms, smem_limit, stream);
  else launch<T, kD, 128>(p, q, k, v, mask, out, lse, dev, sms, smem_limit, stream);
}

template <typename T>
void launch_d(int d_bucket, int dv_bucket, const Problem& p, View q, View k, View v, Mask mask, MutView out,
              MutView lse, int dev, int sms, size_t smem_limit, cudaStream_t stream) {
  if (d_bucket == 32) launch_dv<T, 32>(dv_bucket, p, q, k, v, mask, out, lse, dev, sms, smem_limit, stream);
  else if (d_bucket == 64) launch_dv<T, 64>(dv_bucket, p, q, k, v, mask, out, lse, dev, sms, smem_limit, stream);
  else launch_dv<T, 128>(dv_bucket, p, q, k, v, mask, out, lse, dev, sms, smem_limit, stream);
}

int bucket(int64_t d) { return d <= 32 ? 32 : (d <= 64 ? 64 : 128); }

}  // namespace

bool forward_cuda_tensor_cores(DType dtype, const Problem& p, View q, View k, View v, Mask mask, MutView out,
                               MutView lse, uintptr_t stream) {
  static const bool enabled = [] {
    const char* env = std::getenv("AFFECTKIT_ATTENTION_TENSOR_CORES");
    return !(env != nullptr && std::strcmp(env, "0") == 0);
  }();
  if (!enabled) return false;
  if (dtype != DType::Float16 && dtype != DType::BFloat16) return false;
  if (p.dropout_p > 0) return false;
  if (p.D < 1 || p.D > 128 || p.Dv < 1 || p.Dv > 128) return false;
  if (p.Lq >= (int64_t{1} << 30) || p.Lk >= (int64_t{1} << 30)) return false;
  if (mask.data != nullptr && mask.dtype != DType::Bool && mask.dtype != DType::Float32) return false;
  int dev = 0;
  cuda_check(cudaGetDevice(&dev), "attention_forward: device");
  static std::atomic<int> cc_major[kMaxDevices];
  static std::atomic<int> sm_count[kMaxDevices];
  if (device_attr(cudaDevAttrComputeCapabilityMajor, dev, cc_major) < 8) return false;
  static std::atomic<int> smem_optin[kMaxDevices];
  const int sms = device_attr(cudaDevAttrMultiProcessorCount, dev, sm_count);
  const size_t smem_limit = static_cast<size_t>(device_attr(cudaDevAttrMaxSharedMemoryPerBlockOptin, dev, smem_optin));
  if (forward_cuda_tensor_cores_long(dtype, p, q, k, v, mask, out, lse, sms, stream)) return true;
  const cudaStream_t st = as_stream(stream);
  const int db = bucket(p.D), dvb = bucket(p.Dv);
  if (dtype == DType::Float16) launch_d<__half>(db, dvb, p, q, k, v, mask, out, lse, dev, sms, smem_limit, st);
  else launch_d<__nv_bfloat16>(db, dvb, p, q, k, v, mask, out, lse, dev, sms, smem_limit, st);
  cuda_check(cudaGetLastError(), "attention_forward");
  return true;
}

}  // namespace affectkit::attention::detail
