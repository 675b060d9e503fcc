// float16 rows on the CPU: conversion and mixed-precision distances behind run-time dispatch.
#include "f16.h"

#include <cmath>
#include <cstdlib>
#include <cstring>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#include <immintrin.h>
#define AFFECTKIT_X86_F16 1
#endif

namespace affectkit::knn {

float f16_to_f32(uint16_t h) {
  const uint32_t sign = (static_cast<uint32_t>(h) & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1Fu, man = h & 0x3FFu;
  uint32_t bits;
  if (exp == 0x1F) {
    bits = sign | 0x7F800000u | (man << 13);  // inf or NaN (payload kept)
  } else if (exp == 0) {
    const float v = std::ldexp(static_cast<float>(man), -24);  // zero or subnormal: man * 2^-24
    return sign ? -v : v;
  } else {
    bits = sign | ((exp + 112u) << 23) | (man << 13);  // rebias 15 -> 127
  }
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

namespace {

void convert_scalar(const uint16_t* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = f16_to_f32(src[i]);
}

float dot_scalar(const float* a, const uint16_t* b, int64_t d) {
  float s = 0.f;
  for (int64_t j = 0; j < d; ++j) s += a[j] * f16_to_f32(b[j]);
  return s;
}

float l2sq_scalar(const float* a, const uint16_t* b, int64_t d) {
  float s = 0.f;
  for (int64_t j = 0; j < d; ++j) {
    const float t = a[j] - f16_to_f32(b[j]);
    s += t * t;
  }
  return s;
}

#ifdef AFFECTKIT_X86_F16
// The zero-masked forms: GCC 12's unmasked _mm512_cvtph_ps / _mm512_reduce_add_ps start from
// an "undefined" register and trip -Wuninitialized false positives.
__attribute__((target("avx512f"), always_inline)) inline __m512 cvt16(__m256i h) {
  return _mm512_maskz_cvtph_ps(0xFFFF, h);
}

__attribute__((target("avx512f"), always_inline)) inline float hsum_512(__m512 v) {
  alignas(64) float t[16];
  _mm512_store_ps(t, v);
  float s = 0.f;
  for (float x : t) s += x;
  return s;
}

__attribute__((target("avx512f"))) void convert_512(const uint16_t* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    _mm512_storeu_ps(dst + i, cvt16(_mm256_loadu_si256(
                                  reinterpret_cast<const __m256i*>(src + i))));
  for (; i < n; ++i) dst[i] = f16_to_f32(src[i]);
}

__attribute__((target("avx512f"))) float dot_512(const float* a, const uint16_t* b, int64_t d) {
  __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
  int64_t j = 0;
  for (; j + 32 <= d; j += 32) {
    const __m512 b0 = cvt16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + j)));
    const __m512 b1 =
        cvt16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + j + 16)));
    acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + j), b0, acc0);
    acc1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + j + 16), b1, acc1);
  }
  float s = hsum_512(_mm512_add_ps(acc0, acc1));
  for (; j < d; ++j) s += a[j] * f16_to_f32(b[j]);
  return s;
}

__attribute__((target("avx512f"))) float l2sq_512(const float* a, const uint16_t* b, int64_t d) {
  __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
  int64_t j = 0;
  for (; j + 32 <= d; j += 32) {
    const __m512 t0 = _mm512_sub_ps(
        _mm512_loadu_ps(a + j),
        cvt16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + j))));
    const __m512 t1 = _mm512_sub_ps(
        _mm512_loadu_ps(a + j + 16),
        cvt16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + j + 16))));
    acc0 = _mm512_fmadd_ps(t0, t0, acc0);
    acc1 = _mm512_fmadd_ps(t1, t1, acc1);
  }
  float s = hsum_512(_mm512_add_ps(acc0, acc1));
  for (; j < d; ++j) {
    const float t = a[j] - f16_to_f32(b[j]);
    s += t * t;
  }
  return s;
}

__attribute__((target("avx2,fma,f16c"))) float hsum_256(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_shuffle_ps(t, t, 1)));
}

__attribute__((target("avx2,fma,f16c"))) void convert_f16c(const uint16_t* src, float* dst,
                                                           int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(dst + i,
                     _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
  for (; i < n; ++i) dst[i] = f16_to_f32(src[i]);
}

__attribute__((target("avx2,fma,f16c"))) float dot_f16c(const float* a, const uint16_t* b,
                                                        int64_t d) {
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 16 <= d; j += 16) {
    const __m256 b0 = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + j)));
    const __m256 b1 = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + j + 8)));
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + j), b0, acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + j + 8), b1, acc1);
  }
  float s = hsum_256(_mm256_add_ps(acc0, acc1));
  for (; j < d; ++j) s += a[j] * f16_to_f32(b[j]);
  return s;
}

__attribute__((target("avx2,fma,f16c"))) float l2sq_f16c(const float* a, const uint16_t* b,
                                                         int64_t d) {
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 16 <= d; j += 16) {
    const __m256 t0 = _mm256_sub_ps(
        _mm256_loadu_ps(a + j), _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + j))));
    const __m256 t1 = _mm256_sub_ps(
        _mm256_loadu_ps(a + j + 8),
        _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + j + 8))));
    acc0 = _mm256_fmadd_ps(t0, t0, acc0);
    acc1 = _mm256_fmadd_ps(t1, t1, acc1);
  }
  float s = hsum_256(_mm256_add_ps(acc0, acc1));
  for (; j < d; ++j) {
    const float t = a[j] - f16_to_f32(b[j]);
    s += t * t;
  }
  return s;
}
#endif

struct F16Kernels {
  void (*convert)(const uint16_t*, float*, int64_t) = &convert_scalar;
  float (*dot)(const float*, const uint16_t*, int64_t) = &dot_scalar;
  float (*l2sq)(const float*, const uint16_t*, int64_t) = &l2sq_scalar;
  const char* name = "scalar";
  F16Kernels() {
#ifdef AFFECTKIT_X86_F16
    if (std::getenv("AFFECTKIT_NO_F16C") != nullptr) return;
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && std::getenv("AFFECTKIT_NO_AVX512") == nullptr) {
      convert = &convert_512;
      dot = &dot_512;
      l2sq = &l2sq_512;
      name = "avx512";
    } else if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
               __builtin_cpu_supports("f16c")) {
      convert = &convert_f16c;
      dot = &dot_f16c;
      l2sq = &l2sq_f16c;
      name = "f16c";
    }
#endif
  }
};

const F16Kernels& f16_kernels() {
  static const F16Kernels k;
  return k;
}

}  // namespace

void f16_to_f32(const uint16_t* src, float* dst, int64_t n) { f16_kernels().convert(src, dst, n); }
float dot_f32_f16(const float* a, const uint16_t* b, int64_t d) { return f16_kernels().dot(a, b, d); }
float l2sq_f32_f16(const float* a, const uint16_t* b, int64_t d) {
  return f16_kernels().l2sq(a, b, d);
}
const char* f16_kernel_name() { return f16_kernels().name; }

}  // namespace affectkit::knn
