// Pieces shared by graph_conv's CPU forward (graph_conv_forward_cpu.cpp) and backward
// (graph_conv_backward_cpu.cpp). The two are separate translation units so that they compile
// in parallel. Internal linkage (an unnamed namespace), as when they were one file: each
// unit keeps its own copy, and none clashes with a same-named helper of another unit.
#pragma once

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <type_traits>
#include <vector>

#include "../core/dispatch.h"
#include "../core/transpose_avx2.h"
#include "../core/transpose_avx512.h"
#include "graph.h"
#include "pool_kernels.h"
#include "small_gemm.h"

namespace affectkit::graph::detail {
namespace {

template <typename T>
AK_INLINE T leaky_slope() { return T(0.01); }

template <typename T>
AK_INLINE T activate(T v, Activation a) {
  switch (a) {
    case Activation::ReLU: return v > T(0) ? v : T(0);
    case Activation::ELU: return v > T(0) ? v : std::expm1(v);
    case Activation::LeakyReLU: return v > T(0) ? v : v * leaky_slope<T>();
    case Activation::Tanh: return std::tanh(v);
    case Activation::Sigmoid: return T(1) / (T(1) + std::exp(-v));
    default: return v;
  }
}

#if defined(__x86_64__) && defined(__GNUC__)
#define AK_GRAPH_AVX512_TILES 1
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // GCC's false positive in the intrinsics
#pragma GCC diagnostic ignored "-Wuninitialized"  // the same, for the unpack intrinsics' undefined operand
// acc[f] = sum_t coef[t * ct + f * cf] * src[t * ld] (16 lanes) for f < kF, t < T: the one
// product shape of the tile kernels below (kF accumulators, one vector load per t).
// With few features, kF chains of dependent FMAs (4 cycles each on Zen) leave the two FMA
// pipes half idle: even and odd t then go to separate accumulators (2 kF chains; 32
// registers hold them), added at the end. At 14 x 5 -> 32 that took about 7 % off the
// one-thread backward kernel (321 -> 300 us; HT's chains were 32 deep).
template <int kF>
__attribute__((target("avx512f"), always_inline)) inline void combine_rows_avx512(
    int64_t T, const float* src, int64_t ld, const float* coef, int64_t ct, int64_t cf, __m512 acc[kF]) {
  for (int f = 0; f < kF; ++f) acc[f] = _mm512_setzero_ps();
  int64_t t = 0;
  if constexpr (kF <= 8) {
    __m512 odd[kF];
    for (int f = 0; f < kF; ++f) odd[f] = _mm512_setzero_ps();
    for (; t + 2 <= T; t += 2) {
      const __m512 v0 = _mm512_loadu_ps(src + t * ld), v1 = _mm512_loadu_ps(src + (t + 1) * ld);
      for (int f = 0; f < kF; ++f) {
        acc[f] = _mm512_fmadd_ps(_mm512_set1_ps(coef[t * ct + f * cf]), v0, acc[f]);
        odd[f] = _mm512_fmadd_ps(_mm512_set1_ps(coef[(t + 1) * ct + f * cf]), v1, odd[f]);
      }
    }
    for (int f = 0; f < kF; ++f) acc[f] = _mm512_add_ps(acc[f], odd[f]);
  }
  for (; t < T; ++t) {
    const __m512 v = _mm512_loadu_ps(src + t * ld);
    for (int f = 0; f < kF; ++f) acc[f] = _mm512_fmadd_ps(_mm512_set1_ps(coef[t * ct + f * cf]), v, acc[f]);
  }
}

// The same product with 8 lanes (AVX2+FMA), for NB adjacent 8-lane blocks of src at once:
// acc[b * kF + f] holds block b (src + 8 b). Two blocks give few features 2 kF independent
// FMA chains (an FMA's latency needs about 8 in flight) and share each broadcast of coef.
// AVX2 has 16 vector registers: past 12 accumulators (plus the rows and a broadcast) they
// would spill inside the t loop, so a larger single block runs as two passes over src.
template <int kF, int NB = 1>
__attribute__((target("avx2,fma"), always_inline)) inline void combine_rows_avx2(
    int64_t T, const float* src, int64_t ld, const float* coef, int64_t ct, int64_t cf, __m256* acc) {
  if constexpr (kF * NB > 12) {
    static_assert(NB == 1, "two blocks only for kF <= 6");
    combine_rows_avx2<kF / 2>(T, src, ld, coef, ct, cf, acc);
    combine_rows_avx2<kF - kF / 2>(T, src, ld, coef + kF / 2 * cf, ct, cf, acc + kF / 2);
  } else {
    for (int f = 0; f < NB * kF; ++f) acc[f] = _mm256_setzero_ps();
    for (int64_t t = 0; t < T; ++t) {
      __m256 v[NB];
      for (int b = 0; b < NB; ++b) v[b] = _mm256_loadu_ps(src + t * ld + 8 * b);
      for (int f = 0; f < kF; ++f) {
        const __m256 c = _mm256_set1_ps(coef[t * ct + f * cf]);
        for (int b = 0; b < NB; ++b) acc[b * kF + f] = _mm256_fmadd_ps(c, v[b], acc[b * kF + f]);
      }
    }
  }
}

// How many 8-lane blocks combine_rows_avx2 takes at once for kF coefficients.
template <int kF>
constexpr int combine_blocks_avx2() { return kF <= 6 ? 2 : 1; }
#pragma GCC diagnostic pop
#endif

}  // namespace
}  // namespace affectkit::graph::detail
