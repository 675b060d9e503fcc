// Device arithmetic shared by the float32 tensor-core graph_conv kernels (graph_conv_tc.cu,
// mma.sync; graph_conv_wg_sm90a.cu, wgmma): TF32 splitting, bf16 packing, activations.
#pragma once

#include <cuda_bf16.h>

#include <cstdint>

namespace affectkit::graph::detail {

#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
// TF32 by truncation (one LOP3) and by rounding half away from zero (two; cvt.rna costs four
// here, for its infinity check). Rounding the big part halves |small| (<= 2^-11 |v|) and with
// it the error of every correction term: 1.9e-6 -> 5.6e-7 (Tf32Bf16) and 8e-7 -> 6e-8
// (Tf32x3) relative on 62 x 64 -> 64 inputs spanning 1e-3 .. 1e3, emulated.
__device__ __forceinline__ uint32_t tf32_trunc(float v) { return __float_as_uint(v) & 0xffffe000u; }
__device__ __forceinline__ uint32_t tf32_round(float v) { return (__float_as_uint(v) + 0x1000u) & 0xffffe000u; }

__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}

template <int Act>
__device__ __forceinline__ float activate(float v) {
  if constexpr (Act == 1) return v > 0.f ? v : 0.f;
  else if constexpr (Act == 2) return v > 0.f ? v : expm1f(v);
  else if constexpr (Act == 3) return v > 0.f ? v : v * 0.01f;
  else if constexpr (Act == 4) return tanhf(v);
  else if constexpr (Act == 5) return 1.f / (1.f + expf(-v));
  else return v;
}

#endif

}  // namespace affectkit::graph::detail
