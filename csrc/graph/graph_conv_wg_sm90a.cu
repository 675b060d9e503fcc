// wgmma (sm_90a) forward of graph_conv for float32: out[s] = act(A x[s] W + b) with one shared
// graph A (N, N), a weight W (F, Fo), N, F, Fo <= 64 and F % 4 == 0. First ran on an H100 on
// 2026-11-27 (62 x 64 -> 64, 8,192 samples: 116 us, against 206 us for graph_conv_tc.cu's
// kernel); the automatic choice for large samples since (wg_pays in graph_conv_cuda.cu).
//
// Why: at 8,192 samples of 62 x 64 -> 64 the mma.sync kernel took 203 us on an H200 (target
// < 100 us; memory floor ~60 us there, ~87 us on an H100). Its warps issue every fragment load
// and every TF32 split themselves, for each product and each warp that reads an operand. Here
// each operand is split once, as it is written to shared memory, and the tensor cores read both
// sides of every product from there (no fragment loads, no per-product splits).
//
// Accuracy as graph_conv_tc.cu's Tf32Bf16: every float32 operand v is stored twice, as
// big = tf32(v) and as a pair of bf16 (v, small) on the left of a product, (small, v) on the
// right (small = v - big). Each product is 8 bf16 steps of K = 16 (the two correction terms
// v_L small_R + small_L v_R at once) then 8 TF32 steps of K = 8 (big x big): ~1e-6 relative,
// like float32, at 2/3 of the tensor time of three TF32 products.
//
// Layout: every operand in shared memory is 64 x 64 floats (zero padded), K-major in two
// 128-byte column blocks with the 128-byte swizzle (core/wgmma.cuh); a bf16 pair sits where its
// float would. The products, as D = L R^T with K = 64:
//   phase 1: Z^T (Fo x N) = W^T (Fo x F) . x_s (N x F)^T     L = W^T, R = x_s (shared memory)
//   phase 2: Y^T (Fo x N) = Z^T (Fo x N) . A (N x N)^T       L = Z^T (registers), R = A
// Phase 1's accumulators, split, are phase 2's left operand as they are: the register fragment
// of a k-step carries its 8 columns in permute_k's order, so A is staged with its columns in
// that order too. Phase 2's accumulators are columns of the output.
// Work: one block per SM, three warpgroups, each looping over its own samples. A warpgroup owns a
// 32 KB buffer that holds x_s; W^T, A and the bias are staged once per block. Each sample's x
// is loaded into registers two samples ahead and stored, split, while the sample before it is in
// phase 2. Per sample: 16 + 16 wgmma of 64 x 64 (1.6 M multiply-adds), 16 16-byte shared stores
// per thread, two warpgroup barriers. AFFECTKIT_GRAPH_WG_WREGS=1 (kWRegs, not yet run on a GPU):
// two warpgroups holding W^T in registers, so that phase 1 reads only x from shared memory.
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>

#include "../core/cuda_utils.cuh"
#include "../core/wgmma.cuh"
#include "graph_conv_tc.h"
#include "tc_math.cuh"

namespace affectkit::graph::detail {
namespace {

constexpr int kGroups = 3;                    // warpgroups per block (4 would cap registers at 128)
// kWRegs (AFFECTKIT_GRAPH_WG_WREGS=1, not yet run on a GPU): 2 warpgroups, each holding W^T's
// split fragments in registers (64 a thread, room the 3-warpgroup cap of 168 does not leave), so
// phase 1 reads only x from shared memory: 96 KB a sample instead of 128.
__host__ __device__ constexpr int groups_for(bool w_regs) { return w_regs ? 2 : kGroups; }
constexpr int kDim = 64;                      // N, F and Fo padded to 64
constexpr uint32_t kOperand = kDim * kDim * 4;  // bytes of one 64 x 64 float operand
// Shared memory, from a 1024-byte aligned base: W^T big and pair, A big and pair, then per
// warpgroup a big and a pair operand, then the bias.
constexpr uint32_t kWtBig = 0, kWtPair = kOperand, kAdjBig = 2 * kOperand, kAdjPair = 3 * kOperand;
constexpr uint32_t kGroupBase = 4 * kOperand, kGroupBytes = 2 * kOperand;
constexpr uint32_t kBiasOff = kGroupBase + kGroups * kGroupBytes;
constexpr size_t kSmemBytes = kBiasOff + kDim * 4 + 1024;  // + slack to align the base

// Byte offset of float k of row r in an operand (two 128-byte column blocks of 64 rows).
__host__ __device__ constexpr uint32_t elem_offset(int r, int k) {
  return static_cast<uint32_t>(k >> 5) * (kDim * 128u) + sw128_offset(r, (k & 31) >> 2) +
         4u * static_cast<uint32_t>(k & 3);
}
// Descriptor start of k step t (8 floats or 16 bf16: 32 bytes) of an operand at `base`.
__host__ __device__ constexpr uint32_t step_offset(int t) {
  return static_cast<uint32_t>(t >> 2) * (kDim * 128u) + 32u * static_cast<uint32_t>(t & 3);
}

#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900
// D (64 x 64 fp32) = L (64 x K) . R (64 x K)^T (+ D if accumulate), both from shared memory. Thread t of warp w
// (within the warpgroup), g = t / 4, c = t % 4, holds d[j][2 h + e] = D(16 w + 8 h + g,
// 8 j + 2 c + e).
__device__ __forceinline__ void wgmma_tf32_m64n64k8(float (&d)[8][4], uint64_t desc_a, uint64_t desc_b,
                                                     int accumulate) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k8.f32.tf32.tf32 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "
      "%32, %33, p, 1, 1;\n}\n"
      : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]), "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]), "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3])
      : "l"(desc_a), "l"(desc_b), "r"(accumulate));
#else
  __trap();
#endif
}

__device__ __forceinline__ void wgmma_bf16_m64n64k16(float (&d)[8][4], uint64_t desc_a, uint64_t desc_b,
                                                     int accumulate) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "
      "%32, %33, p, 1, 1, 0, 0;\n}\n"
      : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]), "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]), "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3])
      : "l"(desc_a), "l"(desc_b), "r"(accumulate));
#else
  __trap();
#endif
}

// The same two steps with the left operand from registers (wgmma "RS"). Thread t of warp w,
// g = t / 4, c = t % 4, holds a[i] = L(16 w + g + 8 (i & 1), k) with k = c + 4 (i >> 1) (tf32,
// CuTe's ALayout_64x8), or the bf16 pair of slots 2 k, 2 k + 1 of that k (bf16: the slots
// 2 c + 8 (i >> 1), + 1, ALayout_64x16). B is K-major in shared memory, as above.
__device__ __forceinline__ void wgmma_tf32_m64n64k8_rs(float (&d)[8][4], const uint32_t (&a)[4], uint64_t desc_b,
                                                        int accumulate) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k8.f32.tf32.tf32 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "
      "{%32, %33, %34, %35}, %36, p, 1, 1;\n}\n"
      : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]), "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]), "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(accumulate));
#else
  __trap();
#endif
}

__device__ __forceinline__ void wgmma_bf16_m64n64k16_rs(float (&d)[8][4], const uint32_t (&a)[4], uint64_t desc_b,
                                                        int accumulate) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "
      "{%32, %33, %34, %35}, %36, p, 1, 1, 0;\n}\n"
      : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]), "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]), "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(accumulate));
#else
  __trap();
#endif
}

// v as the big part and the bf16 pair of a left (v, small) or right (small, v) operand.
template <bool Left>
__device__ __forceinline__ void split_pair(float v, uint32_t& big, uint32_t& pair) {
  big = tf32_round(v);
  const float small = v - __uint_as_float(big);  // exact
  pair = Left ? pack_bf16(v, small) : pack_bf16(small, v);
}

// D = L R^T over K = 64 from the (big, pair) operands at the given shared addresses: the
// corrections first (the first step overwrites D instead of adding to it), the large term last.
__device__ __forceinline__ void product(float (&d)[8][4], uint32_t l_big, uint32_t l_pair,
                                        uint32_t r_big, uint32_t r_pair) {
  wgmma_fence();
#pragma unroll
  for (int t = 0; t < 8; ++t)
    wgmma_bf16_m64n64k16(d, sw128_desc(l_pair + step_offset(t)), sw128_desc(r_pair + step_offset(t)),
                         t > 0);
  // PTX orders accumulator use between wgmma of one shape only; k16 -> k8 needs the fence.
  wgmma_fence();
#pragma unroll
  for (int t = 0; t < 8; ++t)
    wgmma_tf32_m64n64k8(d, sw128_desc(l_big + step_offset(t)), sw128_desc(r_big + step_offset(t)), 1);
  wgmma_commit();
  wgmma_wait_all(d);
}

// D = L R^T over K = 64 with L from register fragments (lp: the bf16 pairs, lb: the big words,
// k step t in [t]) and R (big, pair) in shared memory: issued and committed, not waited for.
__device__ __forceinline__ void issue_product_rs(float (&d)[8][4], const uint32_t (&lp)[8][4],
                                                 const uint32_t (&lb)[8][4], uint32_t r_big, uint32_t r_pair) {
  wgmma_fence();
#pragma unroll
  for (int t = 0; t < 8; ++t) wgmma_bf16_m64n64k16_rs(d, lp[t], sw128_desc(r_pair + step_offset(t)), t > 0);
  wgmma_fence();  // k16 -> k8, as in product()
#pragma unroll
  for (int t = 0; t < 8; ++t) wgmma_tf32_m64n64k8_rs(d, lb[t], sw128_desc(r_big + step_offset(t)), 1);
  wgmma_commit();
}

__device__ __forceinline__ void group_barrier(int group) {
  asm volatile("bar.sync %0, 128;\n" ::"r"(group + 1) : "memory");
}

// Stage rows x cols of a row-major matrix (or its transpose) as a split operand: row r, float
// k of the operand is m[r * ld + k] (or m[k * ld + r]); zero outside rows x cols.
// With PermuteK, float k of the operand holds column permute_k(k) of m: within each group of 8,
// positions 0..3 hold the even columns and 4..7 the odd ones, the K order in which kRegsZ's
// register fragments carry Z^T (thread c holds columns 2 c and 2 c + 1 of each group as its
// k = c and k = c + 4).
__host__ __device__ constexpr int permute_k(int k) { return (k & ~7) | ((k & 3) << 1) | ((k >> 2) & 1); }

template <bool Left, bool Transposed, bool PermuteK = false>
__device__ void stage_operand(unsigned char* smem, uint32_t big_off, uint32_t pair_off, const float* m,
                              int rows, int cols, int ld) {
  for (int i = threadIdx.x; i < kDim * kDim; i += blockDim.x) {
    const int r = i / kDim, k = i % kDim, km = PermuteK ? permute_k(k) : k;
    const float v = r < rows && km < cols ? (Transposed ? m[km * ld + r] : m[r * ld + km]) : 0.f;
    uint32_t big, pair;
    split_pair<Left>(v, big, pair);
    *reinterpret_cast<uint32_t*>(smem + big_off + elem_offset(r, k)) = big;
    *reinterpret_cast<uint32_t*>(smem + pair_off + elem_offset(r, k)) = pair;
  }
}
#endif

// grid: resident blocks (persistent); block: 128 groups_for(kWRegs); dynamic shared memory
// kSmemBytes (buffers for kGroups warpgroups, whichever count runs).
// Phase 2 takes Z^T from phase 1's accumulators in registers (wgmma with its left operand from
// registers) and A from shared memory. The kernel's first version stored Z^T to shared memory
// and read it back as phase 2's right operand; ncu put shared memory at 80 % of its throughput
// there, and this drops the Z^T stores (64 KB a sample, with a 2-way bank conflict) and their
// reads, about 40 % of the traffic. The buffer is free once phase 1 is done, so the next
// sample's x is stored while phase 2 runs (H200, 8,192 x 62 x 64 -> 64: 100.9 us against
// 113.8 us). The outputs come out transposed (rows fo), stored 4 bytes a lane, 32 bytes a row.
template <int Act, bool kWRegs>
__global__ void __launch_bounds__(128 * groups_for(kWRegs), 1)
wg_conv_kernel(const float* __restrict__ x, const float* __restrict__ adj, const float* __restrict__ w,
               const float* __restrict__ bias, float* __restrict__ out, int64_t S, int N, int F, int Fo) {
#if !defined(__CUDA_ARCH_FEAT_SM90_ALL)
  __trap();  // sm_90a only; graph_conv_forward_wg launches it on compute capability 9.0
#else
  extern __shared__ unsigned char smem_raw[];
  unsigned char* smem = smem_raw + ((1024u - (smem_addr(smem_raw) & 1023u)) & 1023u);
  const uint32_t base = smem_addr(smem);
  const int tid = threadIdx.x, group = tid >> 7, gt = tid & 127;
  const int warp = gt >> 5, lane = tid & 31, g = lane >> 2, c = lane & 3;
  float* bias_s = reinterpret_cast<float*>(smem + kBiasOff);

  // Once per block: W^T (row fo, float f = W[f][fo]), A (row n, float m = A[n][m]), the bias.
  stage_operand<true, true>(smem, kWtBig, kWtPair, w, Fo, F, Fo);
  stage_operand<false, false, true>(smem, kAdjBig, kAdjPair, adj, N, N, N);  // the right operand
  for (int i = tid; i < kDim; i += 128 * groups_for(kWRegs)) bias_s[i] = bias != nullptr && i < Fo ? bias[i] : 0.f;
  fence_proxy_async();
  __syncthreads();

  const uint32_t buf_big = kGroupBase + group * kGroupBytes, buf_pair = buf_big + kOperand;
  // This thread's share of a sample's x: the 16-byte pieces i = gt + 128 r (r < 8) of the whole
  // 64 x 64 operand, row i / 16, floats 4 (i % 16) .. + 3: x[s][row][4 (i % 16) ..] (F % 4 == 0)
  // inside N x F, zeros outside. Writing every piece, padding included, matters: the buffer
  // held the previous sample's Z^T, whose leftovers would meet zeros of W^T or A (and an
  // infinite one would make NaN in another sample's output).
  auto x_piece = [&](int r) { return gt + 128 * r; };
  auto x_inside = [&](int r) { return x_piece(r) / 16 < N && 4 * (x_piece(r) % 16) < F; };
  float4 xr[8];
  auto load_x = [&](int64_t s) {
    if (s >= S) return;
    const float* src = x + s * N * F;
#pragma unroll
    for (int r = 0; r < 8; ++r) {
      const int i = x_piece(r);  // read once: stream past L1/L2
      xr[r] = x_inside(r) ? __ldcs(reinterpret_cast<const float4*>(src + (i / 16) * F + 4 * (i % 16)))
                          : make_float4(0.f, 0.f, 0.f, 0.f);
    }
  };
  constexpr int groups = groups_for(kWRegs);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * groups;
  int64_t s = static_cast<int64_t>(blockIdx.x) * groups + group;
  load_x(s);
  float acc[8][4];
  // kWRegs: W^T as phase 1's left operand in registers, read back from its staged words (so the
  // split is the one the shared-memory path multiplies): k step t, a[i] = W^T(16 warp + g +
  // 8 (i & 1), 8 t + c + 4 (i >> 1)), the layout of phase 2's Z^T fragments in plain K order.
  uint32_t wb[8][4], wp[8][4];
  if constexpr (kWRegs) {
#pragma unroll
    for (int t = 0; t < 8; ++t)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const uint32_t off = elem_offset(16 * warp + g + 8 * (i & 1), 8 * t + c + 4 * (i >> 1));
        wb[t][i] = *reinterpret_cast<const uint32_t*>(smem + kWtBig + off);
        wp[t][i] = *reinterpret_cast<const uint32_t*>(smem + kWtPair + off);
      }
  }
  // Phase 1, Z^T = W^T x^T, into acc.
  auto phase1 = [&]() {
    if constexpr (kWRegs) {
      wgmma_fence_operand(wb);
      wgmma_fence_operand(wp);
      issue_product_rs(acc, wp, wb, base + buf_big, base + buf_pair);
      wgmma_wait_all(acc);
      wgmma_fence_operand(wb);  // read asynchronously: intact until here
      wgmma_fence_operand(wp);
    } else {
      product(acc, base + kWtBig, base + kWtPair, base + buf_big, base + buf_pair);
    }
  };
  auto store_x = [&]() {  // xr, split, into the buffer (every piece, padding included)
#pragma unroll
    for (int r = 0; r < 8; ++r) {
      const int i = x_piece(r);
      const float v[4] = {xr[r].x, xr[r].y, xr[r].z, xr[r].w};
      uint32_t big[4], pair[4];
#pragma unroll
      for (int e = 0; e < 4; ++e) split_pair<false>(v[e], big[e], pair[e]);
      const uint32_t off = elem_offset(i / 16, 4 * (i % 16));
      *reinterpret_cast<uint4*>(smem + buf_big + off) = make_uint4(big[0], big[1], big[2], big[3]);
      *reinterpret_cast<uint4*>(smem + buf_pair + off) = make_uint4(pair[0], pair[1], pair[2], pair[3]);
    }
  };
  if (s >= S) return;  // warpgroup-uniform; only named barriers of this group follow
  store_x();
  fence_proxy_async();
  group_barrier(group);
  load_x(s + stride);
  const float bias_r[2] = {bias_s[16 * warp + g], bias_s[16 * warp + 8 + g]};  // row fo of Y^T
  float d2[8][4];
#pragma unroll
  for (int j = 0; j < 8; ++j) d2[j][0] = d2[j][1] = d2[j][2] = d2[j][3] = 0.f;
  for (; s < S; s += stride) {
    phase1();  // Z^T
    // Z^T as phase 2's left operand: k-step t holds columns 8 t .. 8 t + 7 in permute_k
    // order, so thread c's k = c and k = c + 4 are its own columns 8 t + 2 c and + 1.
    uint32_t zb[8][4], zp[8][4];
#pragma unroll
    for (int t = 0; t < 8; ++t) {
      split_pair<true>(acc[t][0], zb[t][0], zp[t][0]);  // row g,     k = c
      split_pair<true>(acc[t][2], zb[t][1], zp[t][1]);  // row g + 8, k = c
      split_pair<true>(acc[t][1], zb[t][2], zp[t][2]);  // row g,     k = c + 4
      split_pair<true>(acc[t][3], zb[t][3], zp[t][3]);  // row g + 8, k = c + 4
    }
    group_barrier(group);  // every warp's phase 1 is done reading x: the buffer is free
    wgmma_fence_operand(zb);
    wgmma_fence_operand(zp);
    wgmma_fence_operand(d2);
    issue_product_rs(d2, zp, zb, base + kAdjBig, base + kAdjPair);
    store_x();  // the next sample's x under phase 2 (past the last sample: stale, never read)
    wgmma_wait_all(d2);
    wgmma_fence_operand(zb);  // read asynchronously: intact until here
    wgmma_fence_operand(zp);
    fence_proxy_async();  // the x stores, for the next phase 1
    load_x(s + 2 * stride);
    // Y^T (row fo = 16 warp + 8 h + g, column n = 8 j + 2 c + e): bias, activation, store.
    float* y = out + s * N * Fo;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int fo = 16 * warp + 8 * h + g;
      if (fo >= Fo) continue;
#pragma unroll
      for (int j = 0; j < 8; ++j)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int n = 8 * j + 2 * c + e;
          if (n < N) __stcs(y + n * Fo + fo, activate<Act>(d2[j][2 * h + e] + bias_r[h]));
        }
    }
    group_barrier(group);  // every warp's x stores are in before the next phase 1
  }
#endif
}

using WgKernel = void (*)(const float*, const float*, const float*, const float*, float*, int64_t, int,
                          int, int);

template <bool kWRegs>
WgKernel pick_kernel(Activation act) {
  switch (act) {
    case Activation::ReLU: return wg_conv_kernel<1, kWRegs>;
    case Activation::ELU: return wg_conv_kernel<2, kWRegs>;
    case Activation::LeakyReLU: return wg_conv_kernel<3, kWRegs>;
    case Activation::Tanh: return wg_conv_kernel<4, kWRegs>;
    case Activation::Sigmoid: return wg_conv_kernel<5, kWRegs>;
    default: return wg_conv_kernel<0, kWRegs>;
  }
}

}  // namespace

bool graph_conv_forward_wg(const float* x, const float* adj, const float* w, const float* bias,
                           float* out, int64_t S, int64_t N, int64_t F, int64_t Fo, Activation act,
                           uintptr_t stream) {
  if (w == nullptr || N < 1 || F < 1 || Fo < 1 || N > kDim || F > kDim || Fo > kDim || F % 4 != 0 ||
      reinterpret_cast<uintptr_t>(x) % 16 != 0)
    return false;
  if (current_device_attr(cudaDevAttrComputeCapabilityMajor) != 9 ||
      current_device_attr(cudaDevAttrComputeCapabilityMinor) != 0 ||
      current_device_attr(cudaDevAttrMaxSharedMemoryPerBlockOptin) < static_cast<int>(kSmemBytes))
    return false;
  // AFFECTKIT_GRAPH_WG_WREGS (read on every call, so that a bad value raises wherever it is set):
  // 0 (default) or 1, kWRegs above.
  const bool w_regs = env_knob("AFFECTKIT_GRAPH_WG_WREGS", 0, 0, 1) == 1;
  const WgKernel kernel = w_regs ? pick_kernel<true>(act) : pick_kernel<false>(act);
  const int groups = groups_for(w_regs);
  cuda_check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(kSmemBytes)),
             "graph_conv_forward (shared memory)");
  const int64_t blocks = std::min<int64_t>((S + groups - 1) / groups, current_device_attr(cudaDevAttrMultiProcessorCount));
  if (blocks == 0) return true;
  kernel<<<static_cast<unsigned>(blocks), 128 * groups, kSmemBytes, as_stream(stream)>>>(
      x, adj, w, bias, out, S, static_cast<int>(N), static_cast<int>(F), static_cast<int>(Fo));
  cuda_check(cudaGetLastError(), "graph_conv_forward (wgmma kernel launch)");
  return true;
}

}  // namespace affectkit::graph::detail
