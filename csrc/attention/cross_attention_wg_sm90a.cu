// Attention forward on Hopper's warpgroup MMA (wgmma, sm_90a): fp16 / bf16, D = Dv = 128, no
// attn_mask, the key limits of the long kernel (kv lengths, causal). The default for these
// shapes on compute capability 9.0 since it first ran (H100, 2026-11-27: 1688 us at L = 4096,
// B = 4, H = 16, 0.49x of SDPA; pipelined with loads two tiles ahead, H200, 2026-11-28: 1403 us,
// 0.58x of SDPA, against 1699 us for the first pipelined order in the same run, which took
// 1702 us on an H100 beside the serial order's 1816);
// AFFECTKIT_ATTENTION_WGMMA=0 (read once) turns it off, and the long kernel
// (cross_attention_tc_long.cu) runs these shapes, as it does on other GPUs.
//
// Why. At L = 4096, D = 128 the long kernel (mma.sync, ldmatrix fragments) reached 285 TFLOP/s
// on the H200, 0.43x of SDPA's flash path (669), against a target of 0.5x; FlashAttention-2
// style kernels top out near 350 TFLOP/s on Hopper, because mma.sync issues from registers a
// warp at a time. wgmma reads both operands of S = Q K^T from shared memory and multiplies a
// 64-row warpgroup tile per instruction, and takes P straight from registers for O += P V.
//
// Design (FlashAttention-3's structure without its producer warps and TMA):
//   * a block: 2 warpgroups x 64 query rows = 128 rows, 256 threads, one block an SM; key tiles
//     of 128 loaded by cp.async from all threads, in a ring of 2 stages (serial, 160 KB of shared
//     memory) or separate K and V rings of 3 (pipelined, 224 KB; see kPipelined below);
//   * shared memory in Hopper's 128-byte swizzle: each 128-row operand (Q, and per stage K and V)
//     is two column blocks of 64 d, 128 bytes a row (core/wgmma.cuh);
//   * S (64 x 128 keys) = Q K^T: 8 wgmma m64n128k16, both operands K-major from shared memory;
//   * online softmax in registers (the accumulator layout is mma.sync's, per warp: thread
//     (g, c) of warp w holds rows 16 w + g and + 8, keys 8 j + 2 c, + 1), as in the long kernel;
//   * O (64 x 128 d) += P V: 8 wgmma m64n128k16 with P from registers (the S accumulators of
//     keys 16 t .. 16 t + 15, repacked) and V from shared memory as an N-major operand
//     (imm-trans-b = 1: V is stored as key rows, like K). The descriptor offsets of that layout
//     were the one thing here that no kernel of ours had used before:
//     scripts/probe/wgmma_attention_probe.cu checks both orders on a GPU (on an H100 the one
//     used here passed, the reverse failed);
//   * by default (kPipelined) each warpgroup overlaps tile t's softmax with tile t - 1's O += P V
//     on the tensor cores; serially (AFFECTKIT_ATTENTION_WG_PIPELINE=0, or where 224 KB of shared
//     memory cannot be had) it waits for each product before the next step, and only the two
//     warpgroups of a block interleave.
// Semantics, limits and the epilogue (O / l in the input dtype; zeros and lse = +inf where no
// key is visible) are the long kernel's. One difference: a row multiplies P = 0 by the V rows
// of keys it cannot see but its block can (causal), so an infinite or NaN value there reaches
// it as NaN; the long kernel confines that to keys its own warp can see. Keys past the
// block's last visible key are zero-filled and never read.
//
// Floor (H200, ~990 TFLOP/s dense bf16 on wgmma): B=4 H=16 L=4096 D=128: 550 GFLOP -> 0.56 ms;
// the exp2 of 4 M scores per head adds MUFU time that the two warpgroups must hide.
#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string>

#include "../core/cuda_utils.cuh"
#include "../core/wgmma.cuh"
#include "attention.h"
#include "attention_common.h"
#include "cross_attention_tc.h"
#include "mma_helpers.cuh"

namespace affectkit::attention::detail {
namespace {

constexpr int kD = 128;                 // D = Dv
constexpr int kRows = 128;              // query rows a block: two warpgroups of 64
constexpr int kKeys = 128;              // keys a tile
constexpr int kThreads = 256;
constexpr int kOperand = 128 * kD * 2;  // bytes of one 128-row operand (two column blocks)
constexpr int kColumnBlock = 128 * 128; // bytes of one 64-d column block of 128 rows
// Q and a K/V ring of 2 stages (3 pipelined), + alignment slack: 161 KB or 225 KB.
constexpr size_t smem_bytes(bool pipelined) {
  return static_cast<size_t>(kOperand) * (1 + 2 * (pipelined ? 3 : 2)) + 1024;
}
constexpr float kLn2 = 0.6931471805599453f;

// D (64 x 128, fp32) += A (64 x 16) B^T (B: 128 x 16), A and B K-major in shared memory.
template <typename T>
__device__ __forceinline__ void wgmma_ss(float (&d)[16][4], uint64_t desc_a, uint64_t desc_b) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  if constexpr (std::is_same_v<T, __half>) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, %64, %65, p, 1, 1, 0, 0;\n}\n"
                 : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]), "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]), "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3]), "+f"(d[8][0]), "+f"(d[8][1]), "+f"(d[8][2]), "+f"(d[8][3]), "+f"(d[9][0]), "+f"(d[9][1]), "+f"(d[9][2]), "+f"(d[9][3]), "+f"(d[10][0]), "+f"(d[10][1]), "+f"(d[10][2]), "+f"(d[10][3]), "+f"(d[11][0]), "+f"(d[11][1]), "+f"(d[11][2]), "+f"(d[11][3]), "+f"(d[12][0]), "+f"(d[12][1]), "+f"(d[12][2]), "+f"(d[12][3]), "+f"(d[13][0]), "+f"(d[13][1]), "+f"(d[13][2]), "+f"(d[13][3]), "+f"(d[14][0]), "+f"(d[14][1]), "+f"(d[14][2]), "+f"(d[14][3]), "+f"(d[15][0]), "+f"(d[15][1]), "+f"(d[15][2]), "+f"(d[15][3]) : "l"(desc_a), "l"(desc_b), "n"(1));
  } else {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, %64, %65, p, 1, 1, 0, 0;\n}\n"
                 : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]), "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]), "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3]), "+f"(d[8][0]), "+f"(d[8][1]), "+f"(d[8][2]), "+f"(d[8][3]), "+f"(d[9][0]), "+f"(d[9][1]), "+f"(d[9][2]), "+f"(d[9][3]), "+f"(d[10][0]), "+f"(d[10][1]), "+f"(d[10][2]), "+f"(d[10][3]), "+f"(d[11][0]), "+f"(d[11][1]), "+f"(d[11][2]), "+f"(d[11][3]), "+f"(d[12][0]), "+f"(d[12][1]), "+f"(d[12][2]), "+f"(d[12][3]), "+f"(d[13][0]), "+f"(d[13][1]), "+f"(d[13][2]), "+f"(d[13][3]), "+f"(d[14][0]), "+f"(d[14][1]), "+f"(d[14][2]), "+f"(d[14][3]), "+f"(d[15][0]), "+f"(d[15][1]), "+f"(d[15][2]), "+f"(d[15][3]) : "l"(desc_a), "l"(desc_b), "n"(1));
  }
#endif
}

// D (64 x 128, fp32) += A (64 x 16, registers) B (16 x 128, N-major in shared memory).
template <typename T>
__device__ __forceinline__ void wgmma_rs(float (&d)[16][4], const uint32_t (&a)[4], uint64_t desc_b) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  if constexpr (std::is_same_v<T, __half>) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, {%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"
                 : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]), "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]), "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3]), "+f"(d[8][0]), "+f"(d[8][1]), "+f"(d[8][2]), "+f"(d[8][3]), "+f"(d[9][0]), "+f"(d[9][1]), "+f"(d[9][2]), "+f"(d[9][3]), "+f"(d[10][0]), "+f"(d[10][1]), "+f"(d[10][2]), "+f"(d[10][3]), "+f"(d[11][0]), "+f"(d[11][1]), "+f"(d[11][2]), "+f"(d[11][3]), "+f"(d[12][0]), "+f"(d[12][1]), "+f"(d[12][2]), "+f"(d[12][3]), "+f"(d[13][0]), "+f"(d[13][1]), "+f"(d[13][2]), "+f"(d[13][3]), "+f"(d[14][0]), "+f"(d[14][1]), "+f"(d[14][2]), "+f"(d[14][3]), "+f"(d[15][0]), "+f"(d[15][1]), "+f"(d[15][2]), "+f"(d[15][3]) : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "n"(1));
  } else {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, {%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"
                 : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]), "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]), "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3]), "+f"(d[8][0]), "+f"(d[8][1]), "+f"(d[8][2]), "+f"(d[8][3]), "+f"(d[9][0]), "+f"(d[9][1]), "+f"(d[9][2]), "+f"(d[9][3]), "+f"(d[10][0]), "+f"(d[10][1]), "+f"(d[10][2]), "+f"(d[10][3]), "+f"(d[11][0]), "+f"(d[11][1]), "+f"(d[11][2]), "+f"(d[11][3]), "+f"(d[12][0]), "+f"(d[12][1]), "+f"(d[12][2]), "+f"(d[12][3]), "+f"(d[13][0]), "+f"(d[13][1]), "+f"(d[13][2]), "+f"(d[13][3]), "+f"(d[14][0]), "+f"(d[14][1]), "+f"(d[14][2]), "+f"(d[14][3]), "+f"(d[15][0]), "+f"(d[15][1]), "+f"(d[15][2]), "+f"(d[15][3]) : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "n"(1));
  }
#endif
}

// A descriptor with explicit offsets (the N-major V operand); 128-byte swizzle.
__device__ __forceinline__ uint64_t desc_with(uint32_t addr, uint32_t leading, uint32_t stride) {
  return static_cast<uint64_t>((addr & 0x3FFFFu) >> 4) | (static_cast<uint64_t>((leading >> 4) & 0x3FFFu) << 16) |
         (static_cast<uint64_t>((stride >> 4) & 0x3FFFu) << 32) | (uint64_t(1) << 62);
}

// Rows [0, valid) of a 128-row, D = 128 operand into the swizzled layout by 16-byte cp.async;
// rows past `valid` are zeroed (never read from global memory).
template <typename T>
__device__ __forceinline__ void stage_operand(unsigned char* dst, const T* src, int64_t stride, int valid) {
  for (int i = threadIdx.x; i < 128 * (kD / 8); i += kThreads) {
    const int r = i / (kD / 8), p = i % (kD / 8);
    unsigned char* d = dst + (p / 8) * kColumnBlock + sw128_offset(r, p % 8);
    if (r < valid) cp_async16(smem_addr(d), src + static_cast<int64_t>(r) * stride + p * 8);
    else *reinterpret_cast<uint4*>(d) = make_uint4(0u, 0u, 0u, 0u);
  }
}

// 16-byte cp.async; valid == false zero-fills the destination and reads nothing.
__device__ __forceinline__ void cp_async16_zfill(uint32_t dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(valid ? 16 : 0)
               : "memory");
}

// stage_operand with the per-piece arithmetic taken out of the loop (pipelined): thread tid always
// copies piece tid % 16 of rows tid / 16 + 16 it (it < 8), and in the swizzled layout those
// land 2,048 bytes apart (16 rows; the swizzle depends on the row mod 8 only). Straight-line:
// 8 zero-filling copies, an add and a compare each.
template <typename T>
__device__ __forceinline__ void stage_operand_fast(uint32_t dst, const T* src, int64_t stride, int valid) {
  const int row = static_cast<int>(threadIdx.x) >> 4, piece = static_cast<int>(threadIdx.x) & 15;
  const uint32_t d0 = dst + (piece / 8) * kColumnBlock + sw128_offset(row, piece % 8);
  const T* const s0 = src + static_cast<int64_t>(row) * stride + piece * 8;
  const int64_t step = 16 * stride;
#pragma unroll
  for (int it = 0; it < 8; ++it) {
    const bool ok = row + 16 * it < valid;
    cp_async16_zfill(d0 + 2048u * it, ok ? s0 + it * step : src, ok);
  }
}
static_assert(kThreads == 256 && kD / 8 == 16, "stage_operand_fast: 256 threads, 16 pieces a row, 16 rows a step");

// kPipelined (the default; AFFECTKIT_ATTENTION_WG_PIPELINE=0 turns it off): FlashAttention-3's
// overlap inside a warpgroup. Tile t's S = Q K_t^T and tile t - 1's O += P V_{t-1} are issued
// together, and the softmax of S_t (exp2 on the MUFU pipe: about half the tensor time of a
// tile) runs while O += P V_{t-1} is still on the tensor cores. Every asynchronous window opens
// and closes inside one iteration.
// Its loads: the products are issued first and the loads staged under them, with the cheaper
// stage_operand_fast, in separate K and V rings of 3 (224 KB with Q): iteration t needs K_t and
// V_{t-1} and loads K_{t+2} and V_{t+1}, one commit group, so each load has two iterations to
// land. A first pipelined order (one K/V ring of 3, the next tile staged by all threads between
// the barrier and the products) had the tensor cores busy a third of the time under ncu and took
// 1699 us where this one takes 1403 (H200, L = 4096, D = 128); it is gone.
template <typename T, bool kPipelined>
__global__ void __launch_bounds__(kThreads, 1)
    wg_forward_kernel(Problem p, View q, View k, View v, MutView out, MutView lse, float scale_log2,
                      uint32_t v_leading, uint32_t v_stride) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  constexpr int kStages = kPipelined ? 3 : 2;
  extern __shared__ unsigned char smem_raw[];
  unsigned char* const smem = smem_raw + ((1024u - (smem_addr(smem_raw) & 1023u)) & 1023u);
  unsigned char* const sQ = smem;
  // Serial: stage s holds K at 2 s kOperand, V after it. Pipelined: K slots s < 3, V slots 3 + s.
  unsigned char* const sKV = smem + kOperand;

  const int tid = static_cast<int>(threadIdx.x), wg = tid >> 7, warp = (tid >> 5) & 3;
  const int g = (tid & 31) >> 2, c4 = tid & 3;
  const int64_t b = blockIdx.z, h = blockIdx.y;
  const Seq s = seq_info(p, b);
  const int r0 = static_cast<int>(gridDim.x - 1 - blockIdx.x) * kRows;  // longest causal tiles first
  if (r0 >= s.qrows) return;  // block-uniform, before any barrier
  const int qlen = static_cast<int>(s.qlen);
  const int qvalid = qlen - r0;
  const int kend_blk = qvalid > 0 ? static_cast<int>(key_end(p, s, r0 + min(kRows, qvalid) - 1)) : 0;
  const int n_tiles = (kend_blk + kKeys - 1) / kKeys;

  // This thread's rows: wr0 + 8 half + g. key_end is non-decreasing in the row, so the
  // warpgroup's first and last valid rows bound the keys any of its rows sees.
  const int wg_r0 = r0 + 64 * wg, wr0 = wg_r0 + 16 * warp;
  int kend[2];
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int i = wr0 + half * 8 + g;
    kend[half] = i < qlen ? static_cast<int>(key_end(p, s, i)) : 0;
  }
  const int wg_kmin = wg_r0 + 63 < qlen ? static_cast<int>(key_end(p, s, wg_r0)) : 0;
  const int wg_kmax = wg_r0 < qlen ? static_cast<int>(key_end(p, s, min(wg_r0 + 63, qlen - 1))) : 0;
  // The tiles this warpgroup multiplies: a prefix of the block's (nothing past wg_kmax is visible).
  const int n_wg = min(n_tiles, (wg_kmax + kKeys - 1) / kKeys);

  const T* const qbase = static_cast<const T*>(q.data) + b * q.sb + h * q.sh + (s.q0 + r0) * q.sr;
  const T* const kbase = static_cast<const T*>(k.data) + b * k.sb + h * k.sh + s.k0 * k.sr;
  const T* const vbase = static_cast<const T*>(v.data) + b * v.sb + h * v.sh + s.k0 * v.sr;
  auto stage_kv = [&](int t) {  // rows at or past kend_blk are zero-filled, never read
    unsigned char* const dK = sKV + (t % kStages) * 2 * kOperand;
    const int j0 = t * kKeys;
    stage_operand<T>(dK, kbase + static_cast<int64_t>(j0) * k.sr, k.sr, kend_blk - j0);
    stage_operand<T>(dK + kOperand, vbase + static_cast<int64_t>(j0) * v.sr, v.sr, kend_blk - j0);
  };
  auto k_addr_of = [&](int t) {
    return smem_addr(sKV) + static_cast<uint32_t>((t % kStages) * (kPipelined ? 1 : 2) * kOperand);
  };
  auto v_addr_of = [&](int t) {
    return kPipelined ? smem_addr(sKV) + static_cast<uint32_t>((3 + t % 3) * kOperand) : k_addr_of(t) + kOperand;
  };
  // Pipelined: the loads of iteration t (K_{t+2}, V_{t+1}) as one commit group; past the last
  // tile the group is empty.
  auto stage_ahead = [&](int t) {
    if (t + 2 < n_tiles) {
      const int j0 = (t + 2) * kKeys;
      stage_operand_fast<T>(k_addr_of(t + 2), kbase + static_cast<int64_t>(j0) * k.sr, k.sr, kend_blk - j0);
    }
    if (t + 1 < n_tiles) {
      const int j0 = (t + 1) * kKeys;
      stage_operand_fast<T>(v_addr_of(t + 1), vbase + static_cast<int64_t>(j0) * v.sr, v.sr, kend_blk - j0);
    }
    cp_async_commit();
  };

  if constexpr (kPipelined) {
    // Prologue: {Q, K_0}, then {K_1, V_0} (two commit groups).
    stage_operand_fast<T>(smem_addr(sQ), qbase, q.sr, n_tiles > 0 ? qvalid : 0);
    if (n_tiles > 0) stage_operand_fast<T>(k_addr_of(0), kbase, k.sr, kend_blk);
    cp_async_commit();
    stage_ahead(-1);
  } else {
    // Prologue: Q with tile 0 (one commit group). One tile is loaded ahead of the one multiplied.
    stage_operand<T>(sQ, qbase, q.sr, n_tiles > 0 ? qvalid : 0);
    if (n_tiles > 0) stage_kv(0);
    cp_async_commit();
  }

  float o[16][4];
#pragma unroll
  for (int n = 0; n < 16; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};  // running max of raw scores, per-lane sum
  const uint32_t q_addr = smem_addr(sQ) + 64 * wg * 128;    // this warpgroup's 64 rows
  float sc[16][4];  // S of the tile in hand, then its exponentials
  uint32_t pa[8][4];  // P in the input dtype: the A fragments of O += P V
  float alpha[2];     // O's rescale for the tile in hand

  auto clear_s = [&]() {  // before the fence: the products accumulate into S
#pragma unroll
    for (int n = 0; n < 16; ++n) sc[n][0] = sc[n][1] = sc[n][2] = sc[n][3] = 0.f;
  };
  auto issue_s = [&](uint32_t k_addr) {  // S = Q K^T, committed as one group
#pragma unroll
    for (int blk = 0; blk < 2; ++blk)
#pragma unroll
      for (int kk = 0; kk < 4; ++kk)
        wgmma_ss<T>(sc, sw128_desc(q_addr + blk * kColumnBlock + 32 * kk),
                    sw128_desc(k_addr + blk * kColumnBlock + 32 * kk));
    wgmma_commit();
  };
  // O += P V over the whole tile, committed as one group. Skipping the steps past the
  // warpgroup's last visible key (a data-dependent break) made ptxas serialise every wgmma of
  // the kernel (C7520), so P = 0 multiplies those key rows instead: zeros past the block's last
  // key, real V rows (another warpgroup's, under causal) before it.
  auto issue_pv = [&](uint32_t v_addr) {
#pragma unroll
    for (int t = 0; t < kKeys / 16; ++t)
      wgmma_rs<T>(o, pa[t], desc_with(v_addr + t * 16 * 128, v_leading, v_stride));
    wgmma_commit();
  };
  // The online softmax of S (sc, complete) at keys j0 ..: the running max and sum, O's rescale
  // (alpha), and the exponentials in place of the scores. A row's four owners are lanes 4g .. 4g + 3.
  auto softmax_with = [&](int j0, auto limits) {
    if constexpr (decltype(limits)::value) {
#pragma unroll
      for (int n = 0; n < 16; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e)
          if (j0 + n * 8 + 2 * c4 + (e & 1) >= kend[e >> 1]) sc[n][e] = -INFINITY;
    }
    float mx[2] = {m[0], m[1]};
#pragma unroll
    for (int n = 0; n < 16; ++n) {
      mx[0] = fmaxf(mx[0], fmaxf(sc[n][0], sc[n][1]));
      mx[1] = fmaxf(mx[1], fmaxf(sc[n][2], sc[n][3]));
    }
    float shift[2];
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      mx[half] = quad_max(mx[half]);
      const float base = mx[half] == -INFINITY ? 0.f : mx[half];  // nothing visible yet: neutral
      alpha[half] = exp2f((m[half] - base) * scale_log2);          // exp2(-inf) = 0
      shift[half] = -base * scale_log2;
      m[half] = mx[half];
    }
    float sum[2] = {0.f, 0.f};
#pragma unroll
    for (int n = 0; n < 16; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        sc[n][e] = exp2f(fmaf(sc[n][e], scale_log2, shift[e >> 1]));
        sum[e >> 1] += sc[n][e];
      }
#pragma unroll
    for (int half = 0; half < 2; ++half) l[half] = l[half] * alpha[half] + sum[half];
  };
  // Two copies, one with the key limits: the branch between them also ends the basic block
  // there. ptxas hoists a wgmma wait to the start of its block, so the pipelined wait for
  // O += P V, in the block after this one, stays behind the exponentials.
  auto softmax = [&](int j0) {
    if (j0 + kKeys > wg_kmin) softmax_with(j0, std::true_type{});  // warpgroup-uniform
    else softmax_with(j0, std::false_type{});
  };
  // O to the tile's max, and its P packed: the S accumulators of keys 16 t .. 16 t + 15
  // (chunks 2 t, 2 t + 1) are the A fragment of O's k-step t. Only once no product reads O or P.
  auto rescale_and_pack = [&]() {
#pragma unroll
    for (int n = 0; n < 16; ++n) {
      o[n][0] *= alpha[0];
      o[n][1] *= alpha[0];
      o[n][2] *= alpha[1];
      o[n][3] *= alpha[1];
      pa[n / 2][(n & 1) * 2] = pack2<T>(sc[n][0], sc[n][1]);
      pa[n / 2][(n & 1) * 2 + 1] = pack2<T>(sc[n][2], sc[n][3]);
    }
  };
  auto keep_p = [&]() {  // P was read asynchronously: keep it intact until its product is done
#pragma unroll
    for (int t = 0; t < kKeys / 16; ++t)
#pragma unroll
      for (int r = 0; r < 4; ++r) asm volatile("" : "+r"(pa[t][r])::"memory");
  };
  // Operands written by ordinary instructions (zeroed S, rescaled O, packed P) precede the fence.
  auto fence_operands = [&]() {
    wgmma_fence_operand(sc);
    wgmma_fence_operand(o);
    wgmma_fence_operand(pa);
    wgmma_fence();
  };

  // Tile t is waited for, and tile t + 1 loaded, at the top of iteration t; the barrier also
  // frees the stage refilled there (its last reader, tile t + 1 - kStages, finished in an
  // earlier iteration). Pipelined, the wait at the top of iteration t is for the group of
  // iteration t - 2 (K_t and V_{t-1}), also in the last iteration, which only finishes O += P V
  // of the last tile.
  const int n_iter = kPipelined ? n_tiles + 1 : n_tiles;
  for (int t = 0; t < n_iter; ++t) {
    if constexpr (kPipelined) {  // block-uniform
      cp_async_wait_pending(1);
      fence_proxy_async();
      __syncthreads();  // every thread's copies landed; the slots refilled below are free
    } else if (t < n_tiles) {  // block-uniform
      cp_async_wait_pending(0);  // tile t (and Q) landed for this thread's copies
      fence_proxy_async();       // ... visible to wgmma (the async proxy)
      __syncthreads();           // ... for every thread's; and the stage refilled next is free
      if (t + 1 < n_tiles) stage_kv(t + 1);
      cp_async_commit();
    }
    const int j0 = t * kKeys;
    if constexpr (kPipelined) {
      // Each case issues its products, stages the next loads under them (every thread takes
      // exactly one case, so all stage), then waits. Issuing in one branch and waiting in
      // another made ptxas serialise every wgmma (C7520, "WG.AR in divergent path").
      const bool do_s = t < n_wg, do_pv = t > 0 && t <= n_wg;  // warpgroup-uniform
      if (do_s && do_pv) {
        clear_s();
        fence_operands();
        issue_s(k_addr_of(t));
        issue_pv(v_addr_of(t - 1));
        if (t < n_tiles) stage_ahead(t);
        wgmma_wait_pending<1>();  // groups complete in order: S_t is done
        wgmma_fence_operand(sc);
        softmax(j0);
        wgmma_wait_all(o);
        keep_p();
        rescale_and_pack();
      } else if (do_s) {
        clear_s();
        fence_operands();
        issue_s(k_addr_of(t));
        if (t < n_tiles) stage_ahead(t);
        wgmma_wait_all(sc);
        softmax(j0);
        rescale_and_pack();
      } else if (do_pv) {
        fence_operands();
        issue_pv(v_addr_of(t - 1));
        if (t < n_tiles) stage_ahead(t);
        wgmma_wait_all(o);
        keep_p();
      } else if (t < n_tiles) {
        stage_ahead(t);
      }
    } else {
      if (t >= n_wg) continue;  // warpgroup-uniform: nothing of this tile is visible to it
      clear_s();
      fence_operands();
      issue_s(k_addr_of(t));
      wgmma_wait_all(sc);
      softmax(j0);
      rescale_and_pack();
      fence_operands();
      issue_pv(k_addr_of(t) + kOperand);
      wgmma_wait_all(o);
      keep_p();
    }
  }

  // Epilogue: O / l in the input dtype, lse; zeros and +inf where nothing was visible.
  l[0] = quad_sum(l[0]), l[1] = quad_sum(l[1]);
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const float lsum = l[half];
    const int i = wr0 + half * 8 + g;
    if (i >= s.qrows) continue;
    const bool any = lsum > 0.f;
    const float inv = any ? 1.f / lsum : 0.f;
    const int64_t row = s.q0 + i;
    T* const orow = static_cast<T*>(out.data) + b * out.sb + h * out.sh + row * out.sr;
#pragma unroll
    for (int n = 0; n < 16; ++n)
      *reinterpret_cast<uint32_t*>(orow + n * 8 + 2 * c4) =  // a select: 0 * inf in O stays out
          any ? pack2<T>(o[n][2 * half] * inv, o[n][2 * half + 1] * inv) : pack2<T>(0.f, 0.f);
    if (c4 == 0) {
      float* const lrow = static_cast<float*>(lse.data) + b * lse.sb + h * lse.sh + row * lse.sr;
      *lrow = any ? m[half] * scale_log2 * kLn2 + __logf(lsum) : INFINITY;
    }
  }
#else
  __trap();  // built for sm_90a only; launched on compute capability 9.0 only
#endif
}

// AFFECTKIT_ATTENTION_WG_PIPELINE: 1 (the default: pipelined) or 0 (serial, the kernel's first
// version). Read once; a bad value raises on every call.
int pipeline_mode() {
  static const int mode = [] {
    const char* env = std::getenv("AFFECTKIT_ATTENTION_WG_PIPELINE");
    if (env == nullptr || *env == '\0' || std::strcmp(env, "1") == 0) return 1;
    if (std::strcmp(env, "0") == 0) return 0;
    throw ValueError(std::string("AFFECTKIT_ATTENTION_WG_PIPELINE: expected 0 or 1, got '") + env + "'");
  }();
  return mode;
}

template <typename T, bool kPipelined>
void launch(const Problem& p, View q, View k, View v, MutView out, MutView lse, cudaStream_t stream) {
  auto* kernel = wg_forward_kernel<T, kPipelined>;
  constexpr size_t bytes = smem_bytes(kPipelined);
  cuda_check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)),
             "attention_forward (wgmma): shared memory");
  // V's descriptor offsets: leading = the column blocks' stride, stride = the 8-key groups'
  // (CUTLASS's MN-major 128-byte swizzle; the probe showed the reverse order wrong on an H100).
  const uint32_t leading = static_cast<uint32_t>(kColumnBlock), stride = 1024u;
  dim3 grid(static_cast<unsigned>((p.Lq + kRows - 1) / kRows), static_cast<unsigned>(p.H), static_cast<unsigned>(p.B));
  kernel<<<grid, kThreads, bytes, stream>>>(p, q, k, v, out, lse, static_cast<float>(p.scale * 1.4426950408889634),
                                            leading, stride);
}

}  // namespace

bool forward_cuda_wgmma(DType dtype, const Problem& p, View q, View k, View v, MutView out, MutView lse,
                        uintptr_t stream) {
  if (p.D != kD || p.Dv != kD || (dtype != DType::Float16 && dtype != DType::BFloat16)) return false;
  if (current_device_attr(cudaDevAttrComputeCapabilityMajor) != 9 || current_device_attr(cudaDevAttrComputeCapabilityMinor) != 0)
    return false;
  const int optin = current_device_attr(cudaDevAttrMaxSharedMemoryPerBlockOptin);
  if (optin < static_cast<int>(smem_bytes(false))) return false;
  const int mode = optin >= static_cast<int>(smem_bytes(true)) ? pipeline_mode() : 0;
  const cudaStream_t st = as_stream(stream);
  auto run = [&](auto tag) {
    using T = decltype(tag);
    if (mode == 1) launch<T, true>(p, q, k, v, out, lse, st);
    else launch<T, false>(p, q, k, v, out, lse, st);
  };
  if (dtype == DType::Float16) run(__half{});
  else run(__nv_bfloat16{});
  cuda_check(cudaGetLastError(), "attention_forward (wgmma)");
  return true;
}

}  // namespace affectkit::attention::detail
