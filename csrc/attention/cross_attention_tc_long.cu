// Tensor-core forward for long sequences (fp16 / bf16, D = Dv = 64 or 128, no attn_mask).
//
// Why a second forward kernel. tc_forward_kernel (cross_attention_tc.cu) gives each warp 16
// query rows: every K or V fragment it loads from shared memory (one ldmatrix.x4, 512 bytes)
// feeds two mma.sync, and at L = 4096 on an H100 it reached 195 TFLOP/s at D = 64 and 167 at
// D = 128 (SDPA: 480 and 667). Here each warp owns 32 rows (two m16 tiles), so every K/V
// fragment feeds four mma, and the inner loops are free of the run-time checks the general
// kernel needs for ragged D, masks and short tiles:
//   * 4 warps x 32 rows = 128 query rows per block; 64 keys per tile;
//   * D = 64: Q fragments stay in registers; 3 shared-memory K/V stages (loads run two tiles
//     ahead); D = 128: Q is re-read from shared memory per k-step (registers: O alone is 128
//     floats a thread), 2 stages, so that two blocks (8 warps) fit an SM;
//   * one barrier per key tile: tile t + stages - 1 is copied into the stage that tile t - 1
//     used, right after the barrier that ends every warp's reads of it;
//   * softmax in the log2 domain with the scale folded into one FFMA before each exp2 (the
//     running max is kept on raw scores, which is why the scale must be positive);
//   * key limits (kv lengths, causal, rows past the q length) are applied only on the tiles
//     that cross a limit of the warp's rows; other tiles run the unmasked variant.
// Output and lse have exactly the general kernel's meaning (zeros and lse = +inf on rows with
// no visible key or past the q length).
//
// Floor (H100, mma.sync ~660 TFLOP/s dense): B=4 H=16 L=4096, D=64: 275 GFLOP -> 0.42 ms;
// D=128: 550 GFLOP -> 0.83 ms. The exp2 of every score (16 MUFU ops per clock per SM) adds
// ~40 % at D = 64 unless it overlaps the mma of other warps.
// Measured (H200, 2026-11-26, B=4 H=16 L=4096 bf16, no mask): D = 64 1.07 ms (256 TFLOP/s,
// 0.55x SDPA's flash path; the general kernel: 1.46 ms), D = 128 1.94 ms (283 TFLOP/s, 0.44x;
// general: 3.35 ms). A variant with 2 stages at D = 64 and 32-key tiles with 3 stages at
// D = 128 timed 1.06 ms and 2.03 ms, so it was dropped. D = 128 keeps 255 registers and ~100
// bytes of spills. AFFECTKIT_ATTENTION_LONG_KERNEL=0 (read once) leaves these shapes to the
// general kernel, for timing and tests.
#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>

#include "../core/cuda_utils.cuh"
#include "attention.h"
#include "attention_common.h"
#include "cross_attention_tc.h"
#include "mma_helpers.cuh"

namespace affectkit::attention::detail {
namespace {

constexpr int kRows = 128;  // query rows per block
constexpr int kPad = 8;                   // elements of padding per shared row (conflict-free ldmatrix)
constexpr float kLn2 = 0.6931471805599453f;

// 4 warps of 32 rows (two m16 tiles each). 8 warps of 16 rows (half the O accumulators a
// thread) ran 3-7 % slower on an H100 at L = 4096 (benchmarks/RESULTS.md, fourteenth session).
template <int kD>
struct LongConfig {
  static constexpr int kWarps = 4;
  static constexpr int kMT = 2;  // m16 tiles (16 rows each) per warp
  static_assert(kWarps * kMT * 16 == kRows, "a block covers kRows query rows");
  static constexpr int kKeys = 64;                    // keys per tile
  static constexpr int kStages = kD <= 64 ? 3 : 2;    // two blocks an SM at D = 128
  static constexpr bool kQInRegisters = kD <= 64;
  static constexpr int kS = kD + kPad;  // shared row stride (elements)
  static constexpr size_t kSmemBytes = (static_cast<size_t>(kRows) + kStages * 2 * kKeys) * kS * 2;
};

__device__ __forceinline__ void cp_async_wait(int pending) {
  if (pending >= 1) asm volatile("cp.async.wait_group 1;\n" ::: "memory");
  else asm volatile("cp.async.wait_group 0;\n" ::: "memory");
}

template <typename T, int kD>
__global__ void __launch_bounds__(LongConfig<kD>::kWarps * 32, 2)
    tc_forward_long_kernel(Problem p, View q, View k, View v, MutView out, MutView lse, float scale_log2) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using C = LongConfig<kD>;
  constexpr int kMT = C::kMT;
  constexpr int kWarpRows = kMT * 16;
  constexpr int kS = C::kS;
  constexpr int kStages = C::kStages;
  constexpr int kKeys = C::kKeys;
  constexpr int kStage = 2 * kKeys * kS;  // K rows, then V rows
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* const sQ = reinterpret_cast<T*>(smem_raw);
  T* const sKV = sQ + kRows * kS;

  const int lane = static_cast<int>(threadIdx.x & 31), warp = static_cast<int>(threadIdx.x >> 5);
  const int g = lane >> 2, c4 = lane & 3;
  const int64_t b = blockIdx.z, h = blockIdx.y;
  const Seq s = seq_info(p, b);
  const int r0 = static_cast<int>(gridDim.x - 1 - blockIdx.x) * kRows;  // longest causal tiles first
  if (r0 >= s.qrows) return;  // block-uniform, before any barrier
  const int qlen = static_cast<int>(s.qlen);
  const int qvalid = qlen - r0;
  const int kend_blk = qvalid > 0 ? static_cast<int>(key_end(p, s, r0 + min(kRows, qvalid) - 1)) : 0;
  const int n_tiles = (kend_blk + kKeys - 1) / kKeys;

  // This thread's rows: wr0 + 16 mt + 8 half + g. key_end is non-decreasing in the row, so
  // the warp's first and last valid rows bound its visible keys.
  const int wr0 = r0 + warp * kWarpRows;
  int kend[kMT][2];
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int i = wr0 + mt * 16 + half * 8 + g;
      kend[mt][half] = i < qlen ? static_cast<int>(key_end(p, s, i)) : 0;
    }
  const int warp_kmin = wr0 + kWarpRows - 1 < qlen ? static_cast<int>(key_end(p, s, wr0)) : 0;
  const int warp_kmax = wr0 < qlen ? static_cast<int>(key_end(p, s, min(wr0 + kWarpRows - 1, qlen - 1))) : 0;

  const T* const qbase = static_cast<const T*>(q.data) + b * q.sb + h * q.sh + (s.q0 + r0) * q.sr;
  const T* const kbase = static_cast<const T*>(k.data) + b * k.sb + h * k.sh + s.k0 * k.sr;
  const T* const vbase = static_cast<const T*>(v.data) + b * v.sb + h * v.sh + s.k0 * v.sr;
  auto stage_kv = [&](int t) {  // rows at or past kend_blk are zero-filled, never read
    T* const dK = sKV + (t % kStages) * kStage;
    const int j0 = t * kKeys;
    stage_rows<T, kD / 8>(dK, kS, kbase + static_cast<int64_t>(j0) * k.sr, k.sr, kKeys, kend_blk - j0, kD / 8);
    stage_rows<T, kD / 8>(dK + kKeys * kS, kS, vbase + static_cast<int64_t>(j0) * v.sr, v.sr, kKeys,
                          kend_blk - j0, kD / 8);
  };

  // Prologue: Q with tile 0, then tiles 1 .. kStages - 2, one commit group each.
  stage_rows<T, kD / 8>(sQ, kS, qbase, q.sr, kRows, n_tiles > 0 ? qvalid : 0, kD / 8);
#pragma unroll
  for (int t = 0; t < kStages - 1; ++t) {
    if (t < n_tiles) stage_kv(t);
    cp_async_commit();
  }

  uint32_t qf[C::kQInRegisters ? kMT : 1][C::kQInRegisters ? kD / 16 : 1][4];
  float o[kMT][kD / 8][4];
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
    for (int n = 0; n < kD / 8; ++n) o[mt][n][0] = o[mt][n][1] = o[mt][n][2] = o[mt][n][3] = 0.f;
  float m[kMT][2], l[kMT][2];  // running max of the raw scores, running (per-lane) sum
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt) m[mt][0] = m[mt][1] = -INFINITY, l[mt][0] = l[mt][1] = 0.f;

  // Fragment addresses (elements) of ldmatrix: A (Q rows), B of Q K^T (K rows), B of P V (V rows).
  const int q_row = warp * kWarpRows + ((lane >> 3) & 1) * 8 + (lane & 7), q_col = (lane >> 4) * 8;
  const int k_row = (lane >> 4) * 8 + (lane & 7), k_col = ((lane >> 3) & 1) * 8;
  const int v_row = ((lane >> 3) & 1) * 8 + (lane & 7), v_col = (lane >> 4) * 8;

  auto process = [&](const T* Ks, const T* Vs, int j0, auto limits) {
    constexpr bool kLimits = decltype(limits)::value;
    float sc[kMT][kKeys / 8][4];
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
      for (int n = 0; n < kKeys / 8; ++n) sc[mt][n][0] = sc[mt][n][1] = sc[mt][n][2] = sc[mt][n][3] = 0.f;
#pragma unroll
    for (int ks = 0; ks < kD / 16; ++ks) {
      uint32_t a[kMT][4];
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt) {
        if constexpr (C::kQInRegisters) {
#pragma unroll
          for (int r = 0; r < 4; ++r) a[mt][r] = qf[mt][ks][r];
        } else {
          ldsm_x4(a[mt], smem_addr(sQ + (q_row + mt * 16) * kS + ks * 16 + q_col));
        }
      }
#pragma unroll
      for (int np = 0; np < kKeys / 16; ++np) {
        uint32_t bk[4];
        ldsm_x4(bk, smem_addr(Ks + (np * 16 + k_row) * kS + ks * 16 + k_col));
#pragma unroll
        for (int mt = 0; mt < kMT; ++mt) {
          mma16816<T>(sc[mt][2 * np], a[mt], bk[0], bk[1]);
          mma16816<T>(sc[mt][2 * np + 1], a[mt], bk[2], bk[3]);
        }
      }
    }
    if constexpr (kLimits) {
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
        for (int n = 0; n < kKeys / 8; ++n)
#pragma unroll
          for (int e = 0; e < 4; ++e)
            if (j0 + n * 8 + 2 * c4 + (e & 1) >= kend[mt][e >> 1]) sc[mt][n][e] = -INFINITY;
    }
    // Online softmax per row (a row's four owners are lanes 4g .. 4g + 3).
    uint32_t pa[kMT][kKeys / 16][4];
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt) {
      float mx[2] = {m[mt][0], m[mt][1]};
#pragma unroll
      for (int n = 0; n < kKeys / 8; ++n) {
        mx[0] = fmaxf(mx[0], fmaxf(sc[mt][n][0], sc[mt][n][1]));
        mx[1] = fmaxf(mx[1], fmaxf(sc[mt][n][2], sc[mt][n][3]));
      }
      float alpha[2], shift[2];
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        mx[half] = quad_max(mx[half]);
        const float base = mx[half] == -INFINITY ? 0.f : mx[half];  // nothing visible yet: neutral
        alpha[half] = exp2f((m[mt][half] - base) * scale_log2);    // exp2(-inf) = 0
        shift[half] = -base * scale_log2;
        m[mt][half] = mx[half];
      }
      // P in the input dtype right away (half the registers of the fp32 scores): the S
      // accumulators of key tiles 2kk, 2kk + 1 are the A fragment of keys 16kk .. 16kk + 15.
      float sum[2] = {0.f, 0.f};
#pragma unroll
      for (int n = 0; n < kKeys / 8; ++n) {
        float e4[4];
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          e4[e] = exp2f(fmaf(sc[mt][n][e], scale_log2, shift[e >> 1]));
          sum[e >> 1] += e4[e];
        }
        pa[mt][n / 2][(n & 1) * 2] = pack2<T>(e4[0], e4[1]);
        pa[mt][n / 2][(n & 1) * 2 + 1] = pack2<T>(e4[2], e4[3]);
      }
#pragma unroll
      for (int half = 0; half < 2; ++half) l[mt][half] = l[mt][half] * alpha[half] + sum[half];
#pragma unroll
      for (int n = 0; n < kD / 8; ++n) {
        o[mt][n][0] *= alpha[0];
        o[mt][n][1] *= alpha[0];
        o[mt][n][2] *= alpha[1];
        o[mt][n][3] *= alpha[1];
      }
    }
    // O += P V.
#pragma unroll
    for (int kk = 0; kk < kKeys / 16; ++kk) {
      // Past the warp's last visible key P is zero; the rows there may hold another warp's keys
      // (causal), whose values must not reach these rows even as 0 * inf.
      if (kLimits && j0 + kk * 16 >= warp_kmax) break;
#pragma unroll
      for (int np = 0; np < kD / 16; ++np) {
        uint32_t bv[4];
        ldsm_x4_trans(bv, smem_addr(Vs + (kk * 16 + v_row) * kS + np * 16 + v_col));
#pragma unroll
        for (int mt = 0; mt < kMT; ++mt) {
          mma16816<T>(o[mt][2 * np], pa[mt][kk], bv[0], bv[1]);
          mma16816<T>(o[mt][2 * np + 1], pa[mt][kk], bv[2], bv[3]);
        }
      }
    }
  };

  for (int t = 0; t < n_tiles; ++t) {
    cp_async_wait(kStages - 2);  // tile t (and Q) landed for this thread's copies
    __syncthreads();             // ... for every thread's; and tile t - 1's stage is free
    if (t + kStages - 1 < n_tiles) stage_kv(t + kStages - 1);
    cp_async_commit();
    if constexpr (C::kQInRegisters) {
      if (t == 0) {
#pragma unroll
        for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
          for (int ks = 0; ks < kD / 16; ++ks) ldsm_x4(qf[mt][ks], smem_addr(sQ + (q_row + mt * 16) * kS + ks * 16 + q_col));
      }
    }
    const int j0 = t * kKeys;
    if (j0 >= warp_kmax) continue;  // warp-uniform: nothing of this tile is visible to the warp
    const T* const Ks = sKV + (t % kStages) * kStage;
    if (j0 + kKeys <= warp_kmin) process(Ks, Ks + kKeys * kS, j0, std::false_type{});
    else process(Ks, Ks + kKeys * kS, j0, std::true_type{});
  }

  // Epilogue: O / l in the input dtype, lse; zeros and +inf where nothing was visible.
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt) l[mt][0] = quad_sum(l[mt][0]), l[mt][1] = quad_sum(l[mt][1]);
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const float lsum = l[mt][half];
      const int i = wr0 + mt * 16 + half * 8 + g;
      if (i >= s.qrows) continue;
      const bool any = lsum > 0.f;
      const float inv = any ? 1.f / lsum : 0.f;
      const int64_t row = s.q0 + i;
      T* const orow = static_cast<T*>(out.data) + b * out.sb + h * out.sh + row * out.sr;
#pragma unroll
      for (int n = 0; n < kD / 8; ++n)
        *reinterpret_cast<uint32_t*>(orow + n * 8 + 2 * c4) =
            any ? pack2<T>(o[mt][n][2 * half] * inv, o[mt][n][2 * half + 1] * inv) : pack2<T>(0.f, 0.f);
      if (c4 == 0) {
        float* const lrow = static_cast<float*>(lse.data) + b * lse.sb + h * lse.sh + row * lse.sr;
        *lrow = any ? m[mt][half] * scale_log2 * kLn2 + __logf(lsum) : INFINITY;
      }
    }
#else
  __trap();  // never launched: the dispatcher requires sm_80+
#endif
}

bool aligned4(const void* ptr, int64_t sb, int64_t sh, int64_t sr) {
  return reinterpret_cast<uintptr_t>(ptr) % 4 == 0 && sb % 2 == 0 && sh % 2 == 0 && sr % 2 == 0;
}

template <typename T, int kD>
void launch_long(const Problem& p, View q, View k, View v, MutView out, MutView lse, cudaStream_t stream) {
  auto* kernel = tc_forward_long_kernel<T, kD>;
  constexpr size_t bytes = LongConfig<kD>::kSmemBytes;
  // Set on every launch (the limit is per device); negligible next to a kernel this size.
  cuda_check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)),
             "attention_forward (long): shared memory");
  dim3 grid(static_cast<unsigned>((p.Lq + kRows - 1) / kRows), static_cast<unsigned>(p.H), static_cast<unsigned>(p.B));
  kernel<<<grid, LongConfig<kD>::kWarps * 32, bytes, stream>>>(p, q, k, v, out, lse,
                                                              static_cast<float>(p.scale * 1.4426950408889634));
}

template <typename T>
void launch_d(int64_t d, const Problem& p, View q, View k, View v, MutView out, MutView lse, cudaStream_t st) {
  if (d == 64) launch_long<T, 64>(p, q, k, v, out, lse, st);
  else launch_long<T, 128>(p, q, k, v, out, lse, st);
}

#ifdef AFFECTKIT_WITH_SM90A
// D = 128 goes to the wgmma kernel where it was built and the device is compute capability 9.0,
// unless AFFECTKIT_ATTENTION_WGMMA=0 (read once). On an H100 at L = 4096: 1688 us against the
// long kernel's 1966 us (benchmarks/RESULTS.md, fourteenth session).
bool wgmma_requested() {
  static const bool requested = [] {
    const char* env = std::getenv("AFFECTKIT_ATTENTION_WGMMA");
    if (env == nullptr || *env == '\0' || std::strcmp(env, "1") == 0) return true;
    if (std::strcmp(env, "0") == 0) return false;
    throw ValueError(std::string("AFFECTKIT_ATTENTION_WGMMA: expected 0 or 1, got '") + env + "'");
  }();
  return requested;
}
#endif

}  // namespace

bool forward_cuda_tensor_cores_long(DType dtype, const Problem& p, View q, View k, View v, Mask mask, MutView out,
                                    MutView lse, int sms, uintptr_t stream) {
  static const bool enabled = [] {
    const char* env = std::getenv("AFFECTKIT_ATTENTION_LONG_KERNEL");
    return env == nullptr || std::strcmp(env, "0") != 0;
  }();
  if (!enabled || mask.data != nullptr || p.dropout_p > 0 || !(p.scale > 0)) return false;
  if (dtype != DType::Float16 && dtype != DType::BFloat16) return false;
  if (p.D != p.Dv || (p.D != 64 && p.D != 128)) return false;
  if (p.Lq >= (int64_t{1} << 30) || p.Lk >= (int64_t{1} << 30)) return false;
  // Long enough that 128-row tiles and several key tiles pay, with blocks to fill the GPU.
  const int64_t row_tiles = (p.Lq + kRows - 1) / kRows;
  if (p.Lq < 256 || p.Lk < 256 || p.B * p.H * row_tiles < 2 * static_cast<int64_t>(sms)) return false;
  if (row_copy_mode(p.D, q.data, q.sb, q.sh, q.sr) != kCopy16 || row_copy_mode(p.D, k.data, k.sb, k.sh, k.sr) != kCopy16 ||
      row_copy_mode(p.Dv, v.data, v.sb, v.sh, v.sr) != kCopy16 || !aligned4(out.data, out.sb, out.sh, out.sr))
    return false;
#ifdef AFFECTKIT_WITH_SM90A
  if (wgmma_requested() && forward_cuda_wgmma(dtype, p, q, k, v, out, lse, stream)) return true;
#endif
  const cudaStream_t st = as_stream(stream);
  if (dtype == DType::Float16) launch_d<__half>(p.D, p, q, k, v, out, lse, st);
  else launch_d<__nv_bfloat16>(p.D, p, q, k, v, out, lse, st);
  cuda_check(cudaGetLastError(), "attention_forward (long)");
  return true;
}

}  // namespace affectkit::attention::detail
