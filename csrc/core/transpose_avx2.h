// An 8 x 8 float transpose in AVX registers and a lane mask for short rows: the AVX2
// counterparts of transpose_avx512.h, for CPUs without AVX-512.
#pragma once

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

namespace affectkit {

// r[i] holds row i on entry and column i on exit. Three rounds of unpack/shuffle/permute.
__attribute__((target("avx2,fma"), always_inline)) inline void transpose8x8_avx2(__m256 r[8]) {
  __m256 t[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    r[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
    r[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xee);
    r[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    r[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xee);
  }
  for (int c = 0; c < 4; ++c) {
    t[c] = _mm256_permute2f128_ps(r[c], r[c + 4], 0x20);
    t[c + 4] = _mm256_permute2f128_ps(r[c], r[c + 4], 0x31);
  }
  for (int i = 0; i < 8; ++i) r[i] = t[i];
}

// A mask selecting lanes [0, count) of 8 (count clamped to [0, 8]), for maskload/maskstore,
// which never touch the memory of unselected lanes.
__attribute__((target("avx2,fma"), always_inline)) inline __m256i lane_mask_avx2(long count) {
  const int c = count < 0 ? 0 : count > 8 ? 8 : static_cast<int>(count);
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(c), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// Stores lanes [0, count) of v at dst (count in [0, 8]) and touches no memory past them, by
// 16-, 8- and 4-byte stores: vmaskmovps to memory is microcoded on AMD Zen (tens of cycles;
// it was 15 % of a D = 6 attention backward), these cost one cycle each.
__attribute__((target("avx2,fma"), always_inline)) inline void store_lanes_avx2(float* dst, __m256 v, long count) {
  if (count >= 8) return _mm256_storeu_ps(dst, v);
  __m128 part = _mm256_castps256_ps128(v);
  if (count >= 4) {
    _mm_storeu_ps(dst, part);
    part = _mm256_extractf128_ps(v, 1);
    dst += 4;
    count -= 4;
  }
  if (count >= 2) {
    _mm_storel_pi(reinterpret_cast<__m64*>(dst), part);
    part = _mm_movehl_ps(part, part);
    dst += 2;
    count -= 2;
  }
  if (count >= 1) _mm_store_ss(dst, part);
}

}  // namespace affectkit

#endif
