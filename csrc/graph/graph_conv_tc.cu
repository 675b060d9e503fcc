// Tensor-core forward of graph_conv for float32: out[s] = act(A x[s] W + b) with one shared
// graph A (N, N), a weight W (F, Fo), no pooling, N, F, Fo <= 64.
//
// Why: the op is memory bound at these sizes only if the arithmetic keeps up. 8,192 samples of
// 62 x 64 -> 64 move 130 MB in and 130 MB out (87 us at ~3 TB/s on an H100) but cost 8.2
// GFLOP, over 120 us on the float32 FMA pipes (67 TFLOP/s); 14 x 32 -> 32 moves 14.7 + 14.7 MB
// (~10 us) for 0.34 GFLOP, where the barrier-phased FMA tiles of conv_kernel took 54 us.
//
// Accuracy: TF32 alone keeps 10 mantissa bits (errors ~1e-4). Each float32 operand v is split
// as big = tf32(v), small = v - big (exact); the product is big*big + big*small + small*big,
// small*small (~2^-22 relative) dropped, which keeps float32-level errors (~1e-6). Two ways:
// * TcSplit::Tf32x3: three m16n8k8 TF32 mma per 8-deep step (the usual 3xTF32).
// * TcSplit::Tf32Bf16: big*big in TF32, and both correction terms as ONE m16n8k16 bf16 mma
//   (bf16's 8 bits are plenty for terms already ~2^-11 of the result: their rounding adds
//   ~2^-20). The 16 bf16 depth slots of that mma hold, for TF32 depth k, slot 2k = big_L and
//   small_R, slot 2k+1 = small_L and big_R; the m16n8k16 fragment slots (2c, 2c+1) of a lane
//   then come from exactly the float the lane holds for the m16n8k8 fragment (column c), so
//   no data moves between lanes. bf16 mma runs at twice the TF32 rate: the tensor time is 2/3
//   of 3xTF32 (62 x 64 -> 64: 8.2 GFLOP x 2 TF32-equivalents, ~35-50 us of mma.sync).
//
// Work layout: a persistent grid (resident blocks, 8 warps each) loops over tiles of G samples,
// a tile's x ~16 KB: G = 8 for 14 x 32 -> 32 (64 KB of shared memory), G = 1 for 62 x 64 ->
// 64 (89 KB); both run two blocks per SM (118 registers), so one block's loads and stores
// proceed while the other waits at a barrier.
// * Staged once per block, zero padded: A (NP x NP, NP = N rounded up to 16), W (KP x OP, F
//   rounded up to 8, Fo to 32), bias (OP).
// * x: a tile is one contiguous chunk of G*N*F floats; cp.async (16-byte pieces when F % 4 == 0)
//   copies it into rows of stride sx (padding rows and columns stay zero). Double buffer: the
//   next tile's copy is issued before the current tile is computed.
// * Phase 1: Z = X W as one tall (G*NP x KP) @ (KP x OP) product; a warp owns 16 or 32 rows x
//   32 columns, so each W fragment read from shared memory feeds one or two m16 tiles. Rows
//   past N within a sample are not stored: Z's padding stays zero, so A's zero padding columns
//   never meet uninitialised shared memory.
// * Phase 2: Y_s = A Z_s per sample; a warp owns (sample, 16 or 32 rows, 32 columns); bias and
//   activation in registers; pairs of lanes swap halves of their accumulator fragments so each
//   lane holds 4 consecutive columns of one row: 16-byte stores (when Fo % 4 == 0), two lanes
//   writing one full 32-byte sector.
// Shared-memory strides: a left operand (row g, depth c of a fragment) is read at g * ld + c,
// conflict-free when ld = 4 mod 8; a right operand (depth c, column g) at c * ld + g, conflict
// free when ld = 8 mod 16 (also for the float2 stores of Z).
//
// Status: the automatic choice where the warp kernel does not fit (graph_conv_cuda.cu).
// Measured on an H200 (2026-11-26), graph replay: 14 x 32 -> 32 19.2 us (expected 11-13; floor
// ~10), 62 x 64 -> 64 203 us with Tf32Bf16 and 215 us with Tf32x3 (expected 90-100; memory
// floor ~87): the estimate of overlap between the two blocks of an SM did not hold, and no
// profile has said why yet.
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <string>

#include <cuda_bf16.h>

#include "../core/cuda_utils.cuh"
#include "graph_conv_tc.h"
#include "tc_math.cuh"

namespace affectkit::graph::detail {
namespace {

constexpr int kTcThreads = 256;
constexpr int kTcWarps = kTcThreads / 32;
constexpr int kMaxDim = 64;              // N, F, Fo at most
constexpr int64_t kTileBytes = 16 << 10;  // x bytes per tile to aim for
constexpr int kMaxTile = 32;             // samples per tile at most

struct TcShape {
  int64_t S;
  int N, F, Fo;
  int G;           // samples per tile
  int NP, KP, OP;  // N rounded up to 16, F to 8, Fo to 32
  int sa, sx, sw;  // row strides (floats) of A, x and W / Z
  bool vec_in;     // 16-byte copies of x (F % 4 == 0, x 16-byte aligned)
  bool vec_out;    // 16-byte stores of out (Fo % 4 == 0, out 16-byte aligned)
  bool az_pairs;   // phase 2 gives each warp two m16 tiles of A (needs NP / 16 even)
  int xbufs;       // x tile buffers (kXBuffers): copies run xbufs - 1 tiles ahead of the math
};

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void cp_async16(float* dst, const float* src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem_u32(dst)), "l"(src) : "memory");
}
__device__ __forceinline__ void cp_async4(float* dst, const float* src) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(smem_u32(dst)), "l"(src) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
// Waits until at most `pending` (1 .. 3) of this thread's newest groups are in flight.
__device__ __forceinline__ void cp_async_wait_pending(int pending) {
  if (pending <= 1) asm volatile("cp.async.wait_group 1;\n" ::: "memory");
  else if (pending == 2) asm volatile("cp.async.wait_group 2;\n" ::: "memory");
  else asm volatile("cp.async.wait_group 3;\n" ::: "memory");
}

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
// Fragment layouts (g = lane / 4, c = lane % 4). m16n8k8 tf32: A {(g, c), (g+8, c), (g, c+4),
// (g+8, c+4)} as (row, depth); B {(c, g), (c+4, g)} as (depth, column); D {(g, 2c), (g, 2c+1),
// (g+8, 2c), (g+8, 2c+1)}. m16n8k16 bf16: A {(g, 2c..2c+1), (g+8, 2c..), (g, 2c+8..),
// (g+8, 2c+8..)}, B {(2c..2c+1, g), (2c+8.., g)}, lower depth in the low half.
__device__ __forceinline__ void mma_tf32(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
__device__ __forceinline__ void mma_bf16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// v -> big (tf32) and the correction part: tf32(small) for Tf32x3; for Tf32Bf16 a bf16 pair
// (slots 2k, 2k+1) = (big, small) on the left operand, (small, big) on the right one.
// Non-finite v: small = inf - inf is NaN, so an infinite input gives NaN where it reaches.
template <TcSplit Sp, bool Left>
__device__ __forceinline__ void split(float v, uint32_t& big, uint32_t& corr) {
  big = tf32_round(v);
  const float small = v - __uint_as_float(big);  // exact
  if constexpr (Sp == TcSplit::Tf32x3) corr = tf32_trunc(small);
  else corr = Left ? pack_bf16(v, small) : pack_bf16(small, v);
}

template <TcSplit Sp>
__device__ __forceinline__ void mma_split(float (&d)[4], const uint32_t (&ab)[4], const uint32_t (&ac)[4],
                                          uint32_t bb0, uint32_t bb1, uint32_t bc0, uint32_t bc1) {
  if constexpr (Sp == TcSplit::Tf32x3) {
    mma_tf32(d, ac, bb0, bb1);  // small x big
    mma_tf32(d, ab, bc0, bc1);  // big x small
  } else {
    mma_bf16(d, ac, bc0, bc1);  // both corrections at once
  }
  mma_tf32(d, ab, bb0, bb1);    // the large term last
}

// acc[i][j] = L[16 i .. 16 i + 15, 0 .. K) R[0 .. K, 8 j .. 8 j + 7] for i < MR, j < 4, L and R
// in shared memory with row strides ldl, ldr; K a multiple of 8. Always 32 columns (OP is a
// multiple of 32): with a run-time column count each n8 tile sat behind its own branch and the
// four mma chains of a step no longer overlapped.
template <TcSplit Sp, int MR>
__device__ __forceinline__ void warp_mma(const float* L, int ldl, const float* R, int ldr, int K,
                                         float (&acc)[MR][4][4]) {
  const int lane = static_cast<int>(threadIdx.x & 31), g = lane >> 2, c = lane & 3;
#pragma unroll
  for (int i = 0; i < MR; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.f;
  const float* Lp = L + g * ldl + c;
  const float* Rp = R + c * ldr + g;
#pragma unroll 2
  for (int k = 0; k < K; k += 8) {
    uint32_t ab[MR][4], ac[MR][4];
#pragma unroll
    for (int i = 0; i < MR; ++i) {
      const float* p = Lp + 16 * i * ldl + k;
      split<Sp, true>(p[0], ab[i][0], ac[i][0]);
      split<Sp, true>(p[8 * ldl], ab[i][1], ac[i][1]);
      split<Sp, true>(p[4], ab[i][2], ac[i][2]);
      split<Sp, true>(p[8 * ldl + 4], ab[i][3], ac[i][3]);
    }
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const float* q = Rp + k * ldr + 8 * j;
      uint32_t bb0, bc0, bb1, bc1;
      split<Sp, false>(q[0], bb0, bc0);
      split<Sp, false>(q[4 * ldr], bb1, bc1);
#pragma unroll
      for (int i = 0; i < MR; ++i) mma_split<Sp>(acc[i][j], ab[i], ac[i], bb0, bb1, bc0, bc1);
    }
  }
}

// Phase 1 (see the top): Z rows of the tile = x rows @ W; units of MR m16 tiles x 32 columns.
template <TcSplit Sp, int MR>
__device__ __forceinline__ void tile_xw(const float* xb, const float* Ws, float* Zs, const TcShape& sh) {
  const int lane = static_cast<int>(threadIdx.x & 31), g = lane >> 2, c = lane & 3;
  const int CG = sh.OP / 32;
  const int units = (sh.G * sh.NP / (16 * MR)) * CG;
  for (int u = static_cast<int>(threadIdx.x >> 5); u < units; u += kTcWarps) {
    const int r0 = (u / CG) * 16 * MR, cg = u % CG;
    float acc[MR][4][4];
    warp_mma<Sp, MR>(xb + r0 * sh.sx, sh.sx, Ws + 32 * cg, sh.sw, sh.KP, acc);
#pragma unroll
    for (int i = 0; i < MR; ++i)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int row = r0 + 16 * i + g + 8 * h;
        if (row % sh.NP >= sh.N) continue;  // padding rows of Z stay zero
        float* z = Zs + row * sh.sw + 32 * cg + 2 * c;
#pragma unroll
        for (int j = 0; j < 4; ++j)
          *reinterpret_cast<float2*>(z + 8 * j) = make_float2(acc[i][j][2 * h], acc[i][j][2 * h + 1]);
      }
  }
}

// Phase 2: out[s0 + gs] = act(A Z_gs + bias) for the tile's `count` samples; units of
// (sample, MR m16 tiles of A, 32 columns).
template <TcSplit Sp, int MR, int Act>
__device__ __forceinline__ void tile_az(const float* As, const float* Zs, const float* bs, float* out, int count,
                                        const TcShape& sh) {
  const int lane = static_cast<int>(threadIdx.x & 31), g = lane >> 2, c = lane & 3;
  const int CG = sh.OP / 32, per_sample = (sh.NP / (16 * MR)) * CG;
  const int units = count * per_sample;
  for (int u = static_cast<int>(threadIdx.x >> 5); u < units; u += kTcWarps) {
    const int gs = u / per_sample, rem = u - gs * per_sample;
    const int m0 = (rem / CG) * 16 * MR, cg = rem % CG;
    float acc[MR][4][4];
    warp_mma<Sp, MR>(As + m0 * sh.sa, sh.sa, Zs + gs * sh.NP * sh.sw + 32 * cg, sh.sw, sh.NP, acc);
    float* o = out + static_cast<int64_t>(gs) * sh.N * sh.Fo;
#pragma unroll
    for (int i = 0; i < MR; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int row = m0 + 16 * i + g, col = 32 * cg + 8 * j + 2 * c;
        float v[4];
#pragma unroll
        for (int e = 0; e < 4; ++e) v[e] = activate<Act>(acc[i][j][e] + bs[col + (e & 1)]);
        if (sh.vec_out) {
          // Even c: row g, columns 2c .. 2c+3 (its own pair and the odd neighbour's row-g pair);
          // odd c: row g+8, columns 2c-2 .. 2c+1.
          const bool odd = c & 1;
          const float s0 = __shfl_xor_sync(0xffffffffu, odd ? v[0] : v[2], 1);
          const float s1 = __shfl_xor_sync(0xffffffffu, odd ? v[1] : v[3], 1);
          const int r = odd ? row + 8 : row, cc = odd ? col - 2 : col;
          const float4 q = odd ? make_float4(s0, s1, v[2], v[3]) : make_float4(v[0], v[1], s0, s1);
          if (r < sh.N && cc < sh.Fo) *reinterpret_cast<float4*>(o + r * sh.Fo + cc) = q;
        } else {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int r = row + 8 * (e >> 1), cc = col + (e & 1);
            if (r < sh.N && cc < sh.Fo) o[r * sh.Fo + cc] = v[e];
          }
        }
      }
  }
}

// Start copying tile `tile`'s x (a contiguous chunk) into the rows of buffer xb.
__device__ __forceinline__ void load_tile(float* xb, const float* __restrict__ x, int64_t tile,
                                          const TcShape& sh) {
  const int64_t s0 = tile * sh.G;
  const int count = static_cast<int>(min(static_cast<int64_t>(sh.G), sh.S - s0));
  const float* src = x + s0 * sh.N * sh.F;
  if (sh.vec_in) {
    const int q = sh.F / 4, total = count * sh.N * q;
    for (int i = static_cast<int>(threadIdx.x); i < total; i += kTcThreads) {
      const int r = i / q, s = r / sh.N;
      cp_async16(xb + (r + s * (sh.NP - sh.N)) * sh.sx + 4 * (i - r * q), src + 4 * i);
    }
  } else {
    const int total = count * sh.N * sh.F;
    for (int i = static_cast<int>(threadIdx.x); i < total; i += kTcThreads) {
      const int r = i / sh.F, s = r / sh.N;
      cp_async4(xb + (r + s * (sh.NP - sh.N)) * sh.sx + (i - r * sh.F), src + i);
    }
  }
}
#endif  // __CUDA_ARCH__ >= 800

// Shared memory (floats): [A NP*sa][W KP*sw][bias OP][x: xbufs buffers of G*NP*sx][Z G*NP*sw].
// Every section starts 16-byte aligned (sa, sx, sw and OP are multiples of 4).
template <TcSplit Sp, int Act>
__global__ void __launch_bounds__(kTcThreads, 2)
    tc_conv_kernel(const float* __restrict__ x, const float* __restrict__ adj, const float* __restrict__ w,
                   const float* __restrict__ bias, float* __restrict__ out, TcShape sh) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  extern __shared__ float4 smem_f4[];
  float* As = reinterpret_cast<float*>(smem_f4);
  float* Ws = As + sh.NP * sh.sa;
  float* bs = Ws + sh.KP * sh.sw;
  float* Xs = bs + sh.OP;
  const int x_buf = sh.G * sh.NP * sh.sx;
  float* Zs = Xs + sh.xbufs * x_buf;
  const int total = static_cast<int>(Zs - As) + sh.G * sh.NP * sh.sw;
  const int tid = static_cast<int>(threadIdx.x);

  // Zero everything once: cp.async and the Z stores only ever write the valid rows and
  // columns, so the padding stays zero for the whole kernel.
  for (int i = tid; i < total; i += kTcThreads) As[i] = 0.f;
  __syncthreads();
  for (int i = tid; i < sh.N * sh.N; i += kTcThreads) As[(i / sh.N) * sh.sa + i % sh.N] = adj[i];
  for (int i = tid; i < sh.F * sh.Fo; i += kTcThreads) Ws[(i / sh.Fo) * sh.sw + i % sh.Fo] = w[i];
  if (bias)
    for (int i = tid; i < sh.Fo; i += kTcThreads) bs[i] = bias[i];

  // Groups: one per loop iteration, iteration i's tile in group i (possibly empty past the end).
  const int64_t tiles = (sh.S + sh.G - 1) / sh.G;
  int64_t tile = blockIdx.x;
  for (int i = 0; i < sh.xbufs - 1; ++i) {
    const int64_t t = tile + int64_t{i} * gridDim.x;
    if (t < tiles) load_tile(Xs + i * x_buf, x, t, sh);
    cp_async_commit();
  }
  // MR = 2 (two m16 tiles share each right-operand fragment) where that still gives every
  // warp a unit of work (phase 1) or the sample has an even number of m16 tiles (phase 2).
  const int CG = sh.OP / 32, MT = sh.NP / 16;
  const bool xw_pairs = (sh.G * MT) % 2 == 0 && (sh.G * MT / 2) * CG >= kTcWarps;
  for (int buf = 0; tile < tiles; tile += gridDim.x, buf = buf + 1 == sh.xbufs ? 0 : buf + 1) {
    const int64_t next = tile + int64_t{sh.xbufs - 1} * gridDim.x;
    // Into the buffer of the previous iteration, which every warp finished reading before that
    // iteration's second barrier.
    const int next_buf = buf == 0 ? sh.xbufs - 1 : buf - 1;
    if (next < tiles) load_tile(Xs + next_buf * x_buf, x, next, sh);
    cp_async_commit();
    cp_async_wait_pending(sh.xbufs - 1);
    __syncthreads();  // this tile's x (the first time also A, W, bias) is in shared memory
    const float* xb = Xs + buf * x_buf;
    if (xw_pairs) tile_xw<Sp, 2>(xb, Ws, Zs, sh);
    else tile_xw<Sp, 1>(xb, Ws, Zs, sh);
    __syncthreads();  // Z complete, x buffer free
    const int64_t s0 = tile * sh.G;
    const int count = static_cast<int>(min(static_cast<int64_t>(sh.G), sh.S - s0));
    float* o = out + s0 * sh.N * sh.Fo;
    if (sh.az_pairs) tile_az<Sp, 2, Act>(As, Zs, bs, o, count, sh);
    else tile_az<Sp, 1, Act>(As, Zs, bs, o, count, sh);
    // No barrier: the next write of Z follows the next loop's barrier.
  }
#endif
}

int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

// Tuning knobs for timing runs (read once; the defaults are what ships):
// AFFECTKIT_GRAPH_TC_TILE_KB (1..64, default 16): bytes of x per tile to aim for. Fewer
// samples per tile mean more loop iterations per persistent block, so more of the copies
// overlap math; more mean fewer barriers per sample.
// AFFECTKIT_GRAPH_TC_AZ_MR (1 or 2, default 2): m16 tiles of A per warp in phase 2 where NP/16
// is even; 1 spreads a lone 64-row sample over all 8 warps instead of 4.
// Both are read on every call, so that a bad value raises wherever it is set. x tile buffers
// are 2 (one copy in flight while a tile is computed): 3 and 4 were no faster on an H100, and
// 3 failed its float64 sweep once on an H200, so that setting was removed (the kernel keeps
// the count as a field: kXBuffers).

int64_t tile_bytes() {
  static const int kb = env_knob("AFFECTKIT_GRAPH_TC_TILE_KB", kTileBytes >> 10, 1, 64);
  return int64_t{kb} << 10;
}

int az_mr() {
  static const int mr = env_knob("AFFECTKIT_GRAPH_TC_AZ_MR", 2, 1, 2);
  return mr;
}

constexpr int kXBuffers = 2;

using TcKernel = void (*)(const float*, const float*, const float*, const float*, float*, TcShape);

template <TcSplit Sp>
TcKernel pick_kernel(Activation act) {
  switch (act) {
    case Activation::ReLU: return tc_conv_kernel<Sp, 1>;
    case Activation::ELU: return tc_conv_kernel<Sp, 2>;
    case Activation::LeakyReLU: return tc_conv_kernel<Sp, 3>;
    case Activation::Tanh: return tc_conv_kernel<Sp, 4>;
    case Activation::Sigmoid: return tc_conv_kernel<Sp, 5>;
    default: return tc_conv_kernel<Sp, 0>;
  }
}

}  // namespace

bool graph_conv_forward_tc(TcSplit split, const float* x, const float* adj, const float* w,
                           const float* bias, float* out, int64_t S, int64_t N, int64_t F,
                           int64_t Fo, Activation act, uintptr_t stream) {
  const int64_t aim_bytes = tile_bytes();
  const int mr = az_mr();
  if (w == nullptr || N < 1 || F < 1 || Fo < 1 || N > kMaxDim || F > kMaxDim || Fo > kMaxDim) return false;
  if (current_device_attr(cudaDevAttrComputeCapabilityMajor) < 8) return false;
  TcShape sh{};
  sh.S = S;
  sh.N = static_cast<int>(N);
  sh.F = static_cast<int>(F);
  sh.Fo = static_cast<int>(Fo);
  sh.NP = static_cast<int>(round_up(N, 16));
  sh.KP = static_cast<int>(round_up(F, 8));
  sh.OP = static_cast<int>(round_up(Fo, 32));
  sh.sa = sh.NP + 4;
  sh.sx = sh.KP + 4;
  sh.sw = sh.OP + 8;
  sh.vec_in = F % 4 == 0 && reinterpret_cast<uintptr_t>(x) % 16 == 0;
  sh.vec_out = Fo % 4 == 0 && reinterpret_cast<uintptr_t>(out) % 16 == 0;
  sh.az_pairs = (sh.NP / 16) % 2 == 0 && mr == 2;
  const int64_t fixed = sh.NP * sh.sa + sh.KP * sh.sw + sh.OP;         // floats
  sh.xbufs = kXBuffers;
  const int64_t per_sample = sh.xbufs * sh.NP * sh.sx + sh.NP * sh.sw;  // floats
  const int64_t limit = current_device_attr(cudaDevAttrMaxSharedMemoryPerBlockOptin);
  // ~16 KB of x per tile (62 x 64: one sample, and two blocks per SM whose barriers do not
  // line up), even above one sample so that phase 1 can pair m16 tiles.
  int64_t G = std::clamp<int64_t>(aim_bytes / (N * F * 4), 1, std::min<int64_t>(kMaxTile, S));
  if (G > 1) G -= G % 2;
  while (G > 2 && (fixed + G * per_sample) * 4 > limit) G -= 2;
  if (G == 2 && (fixed + G * per_sample) * 4 > limit) G = 1;
  const int64_t bytes = (fixed + G * per_sample) * 4;
  if (bytes > limit) return false;
  sh.G = static_cast<int>(G);

  auto launch = [&](auto kernel) {
    cuda_check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)),
               "graph_conv_forward (shared memory)");
    int per_sm = 0;
    cuda_check(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kTcThreads, static_cast<size_t>(bytes)),
               "graph_conv_forward (occupancy)");
    const int64_t resident = std::max<int64_t>(1, int64_t{per_sm} * current_device_attr(cudaDevAttrMultiProcessorCount));
    const int64_t tiles = (S + G - 1) / G;
    const unsigned blocks = static_cast<unsigned>(std::min<int64_t>({tiles, resident, 1 << 20}));
    kernel<<<blocks, kTcThreads, bytes, as_stream(stream)>>>(x, adj, w, bias, out, sh);
  };
  if (split == TcSplit::Tf32x3) launch(pick_kernel<TcSplit::Tf32x3>(act));
  else launch(pick_kernel<TcSplit::Tf32Bf16>(act));
  return true;
}

}  // namespace affectkit::graph::detail
