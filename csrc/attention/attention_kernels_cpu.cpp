// CPU kernels of the fused attention (float32 and float64).
//
// Forward: one task per (b, h, tile of kBQ query rows); online softmax over tiles of up to kBK
// keys, on transposed score tiles St = K Q^T (keys x queries, 16 queries per vector), so the
// softmax needs no horizontal reductions. St and O += P V are small register-blocked matmuls
// (gemm_acc). Each driver's task loop is compiled per instruction set (simd::dispatch) with
// its helpers inlined and vectors as wide as that set's registers, so all of it is vectorised
// for the CPU it runs on; the AVX-512 copy also moves 16 x 16 blocks with intrinsics.
// Backward: one task per (b, h), which owns dq, dk and dv of that head outright, so the
// summation order is fixed and gradients are bit-identical run to run (no atomics).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

#include "../core/dispatch.h"
#include "../core/simd.h"
#include "../core/transpose_avx2.h"
#include "../core/transpose_avx512.h"
#include "attention.h"
#include "attention_common.h"

#define AFFECTKIT_INLINE inline __attribute__((always_inline))

// 64-byte vector types only live inside inlined helpers: no ABI crosses a function boundary.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace affectkit::attention {
namespace {

constexpr int64_t kBQ = 64;   // query rows per tile
constexpr int64_t kBK = 64;   // keys per tile
constexpr int64_t kCW = 16;   // column granularity of score tiles and padded features

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

template <typename T>
constexpr T neg_inf() { return -std::numeric_limits<T>::infinity(); }

// VB-byte vectors (GCC vector extensions), VB being the register width of the instruction
// set the code is compiled for (64 AVX-512, 32 AVX2, 16 baseline). Named vector variables stay
// in registers where arrays of accumulators would be spilled.
template <typename T, int VB>
struct Vec {
  typedef T type __attribute__((vector_size(VB)));
  static constexpr int n = VB / sizeof(T);
};

template <typename T, int VB>
AFFECTKIT_INLINE typename Vec<T, VB>::type load_vec(const T* p) {
  typename Vec<T, VB>::type v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
template <typename T, int VB>
AFFECTKIT_INLINE void store_vec(T* p, typename Vec<T, VB>::type v, bool accumulate) {
  if (accumulate) v += load_vec<T, VB>(p);
  std::memcpy(p, &v, sizeof(v));
}

// C[r, 0:NV*n] (+)= sum_k a[r][k * sak] * B[k, 0:NV*n] for r < R <= 6 (NV = 1 or 2 vectors
// per row): R * NV accumulators in registers, B read once per step, one broadcast live at a
// time. Six rows of two vectors is the widest tile AVX2's 16 registers hold (12 accumulators,
// 2 B vectors, 1 broadcast; a 4 x 3-vector tile needed 19).
template <typename T, int VB, int NV, int R>
AFFECTKIT_INLINE void micro_tile(int64_t K, const T* A, int64_t sam, int64_t sak, const T* __restrict B,
                                 int64_t ldb, T* __restrict C, int64_t ldc, bool accumulate) {
  using V = typename Vec<T, VB>::type;
  constexpr int n = Vec<T, VB>::n;
  const T* a0 = A;
  const T* a1 = A + sam * (R > 1 ? 1 : 0);
  const T* a2 = A + sam * (R > 2 ? 2 : 0);
  const T* a3 = A + sam * (R > 3 ? 3 : 0);
  const T* a4 = A + sam * (R > 4 ? 4 : 0);
  const T* a5 = A + sam * (R > 5 ? 5 : 0);
  V c00 = {}, c10 = {}, c20 = {}, c30 = {}, c40 = {}, c50 = {};
  V c01 = {}, c11 = {}, c21 = {}, c31 = {}, c41 = {}, c51 = {};
  for (int64_t k = 0; k < K; ++k) {
    const T* b = B + k * ldb;
    const V b0 = load_vec<T, VB>(b);
    V b1 = {};
    if constexpr (NV == 2) b1 = load_vec<T, VB>(b + n);
    const int64_t o = k * sak;
    // Row r's scalar times both B vectors (a macro: named accumulators stay in registers).
#define AFFECTKIT_TILE_ROW(r)                  \
  if constexpr (R > r) {                       \
    const T x = a##r[o];                       \
    c##r##0 += x * b0;                         \
    if constexpr (NV == 2) c##r##1 += x * b1;  \
  }
    AFFECTKIT_TILE_ROW(0)
    AFFECTKIT_TILE_ROW(1)
    AFFECTKIT_TILE_ROW(2)
    AFFECTKIT_TILE_ROW(3)
    AFFECTKIT_TILE_ROW(4)
    AFFECTKIT_TILE_ROW(5)
#undef AFFECTKIT_TILE_ROW
  }
  const V r0[6] = {c00, c10, c20, c30, c40, c50};
  const V r1[6] = {c01, c11, c21, c31, c41, c51};
  for (int r = 0; r < R; ++r) {
    store_vec<T, VB>(C + r * ldc, r0[r], accumulate);
    if constexpr (NV == 2) store_vec<T, VB>(C + r * ldc + n, r1[r], accumulate);
  }
}

template <typename T, int VB, int R>
AFFECTKIT_INLINE void row_panel(int64_t N, int64_t K, const T* A, int64_t sam, int64_t sak, const T* B,
                                int64_t ldb, T* C, int64_t ldc, bool accumulate) {
  constexpr int64_t n = Vec<T, VB>::n;
  int64_t n0 = 0;
  for (; n0 + 2 * n <= N; n0 += 2 * n)
    micro_tile<T, VB, 2, R>(K, A, sam, sak, B + n0, ldb, C + n0, ldc, accumulate);
  if (n0 < N) micro_tile<T, VB, 1, R>(K, A, sam, sak, B + n0, ldb, C + n0, ldc, accumulate);
}

// C[m, 0:N] (+)= sum_k A(m, k) * B[k, 0:N] for m < M, with A(m, k) = A[m*sam + k*sak].
// N is a multiple of the vector lanes; B and C rows are contiguous with leading dims ldb and ldc.
// Rows go in panels of up to 6, as even as possible (33 as 3 x 6 + 3 x 5, not 5 x 6 + 3): a
// panel of few rows has too few FMA chains to cover the FMA latency, and no panel computes
// rows it does not store. Against one 4-row tile with the tail padded, a 1-thread 8 x 33 x 33
// D = 64 backward with hot caches took 5-8 % less. Each element sums over k in the same order
// whatever its panel, so the split never changes a result.
template <typename T, int VB>
AFFECTKIT_INLINE void gemm_acc(int64_t M, int64_t N, int64_t K, const T* A, int64_t sam,
                               int64_t sak, const T* B, int64_t ldb, T* C, int64_t ldc,
                               bool accumulate) {
  static_assert(kCW % Vec<T, VB>::n == 0, "kCW must be a whole number of vectors");
  const int64_t panels = (M + 5) / 6;
  const int64_t base = panels ? M / panels : 0, longer = panels ? M % panels : 0;
  for (int64_t p = 0, m0 = 0; p < panels; ++p) {
    const int64_t rows = base + (p < longer ? 1 : 0);
    const T* a = A + m0 * sam;
    T* c = C + m0 * ldc;
    switch (rows) {
      case 6: row_panel<T, VB, 6>(N, K, a, sam, sak, B, ldb, c, ldc, accumulate); break;
      case 5: row_panel<T, VB, 5>(N, K, a, sam, sak, B, ldb, c, ldc, accumulate); break;
      case 4: row_panel<T, VB, 4>(N, K, a, sam, sak, B, ldb, c, ldc, accumulate); break;
      case 3: row_panel<T, VB, 3>(N, K, a, sam, sak, B, ldb, c, ldc, accumulate); break;
      case 2: row_panel<T, VB, 2>(N, K, a, sam, sak, B, ldb, c, ldc, accumulate); break;
      default: row_panel<T, VB, 1>(N, K, a, sam, sak, B, ldb, c, ldc, accumulate); break;
    }
    m0 += rows;
  }
}

// exp for float32 (Cephes-style polynomial, ~1 ulp), written so loops over it vectorise;
// exactly 0 below -86.6, which includes -inf (masked scores). That bound keeps every
// intermediate normal: a lower one let y * 2^n go subnormal for masked lanes (clamped, then
// discarded), and each subnormal result costs a microcode assist (17 % of a D = 6 forward).
constexpr float kExpLo = -86.6f, kExpHi = 88.3762626647949f;  // -86.6 * log2(e) rounds to -125

// exp(xc) = 2^n * p(r) for xc clamped to [kExpLo, kExpHi], on floats or float vectors
// (returns p(r) and n as a float); the caller builds 2^n in its own integer type.
template <typename X>
AFFECTKIT_INLINE X exp_reduced(X xc, X& n) {
  // Adding 1.5 * 2^23 rounds to an integer (no fast-math here, so it is not folded away).
  n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  X r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  X y = r * 1.9875691500e-4f + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  return y * r * r + r + 1.0f;
}

AFFECTKIT_INLINE float exp_fast(float x) {
  const float xc = std::min(std::max(x, kExpLo), kExpHi);
  float n;
  const float y = exp_reduced(xc, n);
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float pow2;
  std::memcpy(&pow2, &bits, sizeof(pow2));
  return x < kExpLo ? 0.0f : y * pow2;
}
AFFECTKIT_INLINE double exp_fast(double x) { return std::exp(x); }

// log for positive, normal float32 (Cephes-style, ~1 ulp), vectorisable like exp_fast.
AFFECTKIT_INLINE float log_fast(float x) {
  int32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  float e = static_cast<float>(((bits >> 23) & 0xff) - 126);
  const int32_t mbits = (bits & 0x807fffff) | 0x3f000000;  // mantissa in [0.5, 1)
  float m;
  std::memcpy(&m, &mbits, sizeof(m));
  const bool low = m < 0.707106781186547524f;
  e = low ? e - 1.0f : e;
  m = low ? m + m - 1.0f : m - 1.0f;
  const float z = m * m;
  float y = 7.0376836292e-2f;
  y = y * m - 1.1514610310e-1f;
  y = y * m + 1.1676998740e-1f;
  y = y * m - 1.2420140846e-1f;
  y = y * m + 1.4249322787e-1f;
  y = y * m - 1.6668057665e-1f;
  y = y * m + 2.0000714765e-1f;
  y = y * m - 2.4999993993e-1f;
  y = y * m + 3.3333331174e-1f;
  y = y * m * z;
  y += -2.12194440e-4f * e;
  y += -0.5f * z;
  return m + y + 0.693359375f * e;
}
AFFECTKIT_INLINE double log_fast(double x) { return std::log(x); }

// Every lane a (a broadcast). For constants, which GCC folds; a runtime value this way can
// compile to lane-by-lane inserts (CONTRIBUTING.md, "Check the broadcasts").
template <typename T, int VB>
AFFECTKIT_INLINE typename Vec<T, VB>::type splat(T a) {
  typename Vec<T, VB>::type v;
  for (int i = 0; i < Vec<T, VB>::n; ++i) v[i] = a;
  return v;
}

// exp_fast on a whole vector (float), lane by lane std::exp otherwise (double: the reference
// path, where accuracy matters more than speed).
template <typename T, int VB>
AFFECTKIT_INLINE typename Vec<T, VB>::type exp_vec(typename Vec<T, VB>::type x) {
  using V = typename Vec<T, VB>::type;
  if constexpr (std::is_same_v<T, float>) {
    typedef int32_t I __attribute__((vector_size(VB)));
    const V lo = splat<T, VB>(kExpLo), hi = splat<T, VB>(kExpHi);
    V xc = x < lo ? lo : x;
    xc = xc > hi ? hi : xc;
    V nf;
    const V y = exp_reduced(xc, nf);
    const I bits = (__builtin_convertvector(nf, I) + 127) << 23;
    V pow2;
    std::memcpy(&pow2, &bits, sizeof(pow2));
    return x < lo ? V{} : y * pow2;
  } else {
    V e;
    for (int i = 0; i < Vec<T, VB>::n; ++i) e[i] = std::exp(x[i]);
    return e;
  }
}

// The mask row of query i (key index 0), or null without a mask.
AFFECTKIT_INLINE const void* mask_row(const Mask& mask, int64_t b, int64_t h, int64_t i) {
  if (mask.data == nullptr) return nullptr;
  const int64_t off = b * mask.sb + h * mask.sh + i * mask.si;
  if (mask.dtype == DType::Bool) return static_cast<const uint8_t*>(mask.data) + off;
  if (mask.dtype == DType::Float64) return static_cast<const double*>(mask.data) + off;
  return static_cast<const float*>(mask.data) + off;
}

// Raw dot products s[0:ncols] of one query row against keys j0.. become scaled, masked
// scores: keys at or past `jlim` (absolute) and masked keys become -inf.
template <typename T>
AFFECTKIT_INLINE void finish_scores(T* __restrict s, int64_t ncols, int64_t j0, int64_t jlim,
                                    T scale, const Mask& mask, const void* mrow) {
  const int64_t valid = clamp64(jlim - j0, 0, ncols);
  for (int64_t j = 0; j < ncols; ++j) s[j] = j < valid ? s[j] * scale : neg_inf<T>();
  if (mrow == nullptr) return;
  const int64_t sj = mask.sj;
  if (mask.dtype == DType::Bool) {
    const uint8_t* m = static_cast<const uint8_t*>(mrow) + j0 * sj;
    for (int64_t j = 0; j < valid; ++j) s[j] = m[j * sj] ? s[j] : neg_inf<T>();
  } else if (mask.dtype == DType::Float64) {
    const double* m = static_cast<const double*>(mrow) + j0 * sj;
    for (int64_t j = 0; j < valid; ++j) s[j] += static_cast<T>(m[j * sj]);
  } else {
    const float* m = static_cast<const float*>(mrow) + j0 * sj;
    for (int64_t j = 0; j < valid; ++j) s[j] += static_cast<T>(m[j * sj]);
  }
}

// s[j] <- exp(s[j] - shift) (0 where s is -inf) for j < ncols (a multiple of kCW); the sum.
template <typename T>
AFFECTKIT_INLINE T exp_row(T* __restrict s, int64_t ncols, T shift) {
  T part[kCW] = {};  // lane-wise partial sums: a reduction the compiler vectorises
  for (int64_t j0 = 0; j0 < ncols; j0 += kCW)
    for (int c = 0; c < kCW; ++c) {
      const T e = exp_fast(s[j0 + c] - shift);
      s[j0 + c] = e;
      part[c] += e;
    }
  for (int w = kCW / 2; w > 0; w /= 2)  // tree reduction: vector shuffles, fixed order
    for (int c = 0; c < w; ++c) part[c] += part[c + w];
  return part[0];
}

// Multiply p[j] by the dropout factor of key j0 + j (0 or 1 / (1 - p)).
template <typename T>
AFFECTKIT_INLINE void apply_dropout(T* p, int64_t nk, int64_t j0, uint64_t row_key,
                                    uint32_t threshold, T inv_keep) {
  for (int64_t j = 0; j < nk; ++j)
    p[j] = dropout_keep(row_key, j0 + j, threshold) ? p[j] * inv_keep : T(0);
}

template <typename T>
AFFECTKIT_INLINE const T* row_ptr(const View& t, int64_t b, int64_t h, int64_t row) {
  return static_cast<const T*>(t.data) + b * t.sb + h * t.sh + row * t.sr;
}
template <typename T>
AFFECTKIT_INLINE T* row_ptr(const MutView& t, int64_t b, int64_t h, int64_t row) {
  return static_cast<T*>(t.data) + b * t.sb + h * t.sh + row * t.sr;
}

#if defined(__x86_64__) && defined(__GNUC__)
#define AFFECTKIT_AVX512_TRANSPOSE 1
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // GCC's false positive in the intrinsics
#pragma GCC diagnostic ignored "-Wuninitialized"  // the same, for the unpack intrinsics' undefined operand
// dst[f * ld + j] = rows[j][f] for f < F, j < ld (rows j >= n read as zeros): 16 x 16 blocks
// transposed in registers. ld is a multiple of 16. Called only when the CPU has AVX-512F.
__attribute__((target("avx512f"))) void transpose_avx512(const float* src, int64_t sr, int64_t n,
                                                         int64_t F, int64_t ld, float* dst) {
  for (int64_t f0 = 0; f0 < F; f0 += 16) {
    const int64_t fw = std::min<int64_t>(16, F - f0);
    const __mmask16 fmask = static_cast<__mmask16>((1u << fw) - 1u);
    for (int64_t j0 = 0; j0 < ld; j0 += 16) {
      if (j0 >= n) {  // padding columns only
        for (int64_t f = 0; f < fw; ++f) _mm512_storeu_ps(dst + (f0 + f) * ld + j0, _mm512_setzero_ps());
        continue;
      }
      __m512 r[16];
      for (int i = 0; i < 16; ++i)
        r[i] = j0 + i < n ? _mm512_maskz_loadu_ps(fmask, src + (j0 + i) * sr + f0) : _mm512_setzero_ps();
      transpose16x16_avx512(r);
      for (int64_t f = 0; f < fw; ++f) _mm512_storeu_ps(dst + (f0 + f) * ld + j0, r[f]);
    }
  }
}

#pragma GCC diagnostic pop

// Short rows (D = 6 is six floats) moved by masked AVX-512 loads and stores, one per 16
// columns, where the scalar loops they replace did an element at a time: in the 64 x 8 x 33 x 33
// D = 6 steps these loops were a fifth of the forward and a quarter of the backward.
// dst row r (stride lddst) = src row r (stride ldsrc, >= width) * s_r for r < nvalid with
// s_r = row_scale ? row_scale[r] : scale, and zeros where r >= nvalid or row_scale[r] <= 0.
__attribute__((target("avx512f"))) void scale_rows_avx512(float* dst, int64_t lddst, const float* src,
                                                          int64_t ldsrc, const float* row_scale, float scale,
                                                          int64_t nvalid, int64_t n, int64_t width) {
  for (int64_t r = 0; r < n; ++r) {
    const float s = r < nvalid ? (row_scale != nullptr ? row_scale[r] : scale) : 0.f;
    const bool zero = !(r < nvalid) || (row_scale != nullptr && !(s > 0.f));
    const __m512 sv = _mm512_set1_ps(s);
    for (int64_t c0 = 0; c0 < width; c0 += 16) {
      const __mmask16 m = static_cast<__mmask16>(width - c0 >= 16 ? 0xffffu : (1u << (width - c0)) - 1u);
      const __m512 v = zero ? _mm512_setzero_ps() : _mm512_mul_ps(_mm512_loadu_ps(src + r * ldsrc + c0), sv);
      _mm512_mask_storeu_ps(dst + r * lddst + c0, m, v);
    }
  }
}

// dst row r (ld columns, a multiple of 16) = src row r (stride sr) zero-padded from width on.
__attribute__((target("avx512f"))) void pack_rows_avx512(const float* src, int64_t sr, int64_t n, int64_t width,
                                                         int64_t ld, float* dst) {
  for (int64_t r = 0; r < n; ++r)
    for (int64_t c0 = 0; c0 < ld; c0 += 16) {
      const int64_t left = std::max<int64_t>(0, std::min<int64_t>(16, width - c0));
      const __mmask16 m = static_cast<__mmask16>((1u << left) - 1u);
      _mm512_storeu_ps(dst + r * ld + c0, _mm512_maskz_loadu_ps(m, src + r * sr + c0));
    }
}

// The same three movers for AVX2 (8 lanes; masked loads and stores never touch memory past a
// row's end).
__attribute__((target("avx2,fma"))) void transpose_avx2(const float* src, int64_t sr, int64_t n, int64_t F,
                                                       int64_t ld, float* dst) {
  for (int64_t f0 = 0; f0 < F; f0 += 8) {
    const int64_t fw = std::min<int64_t>(8, F - f0);
    const __m256i fmask = lane_mask_avx2(fw);
    for (int64_t j0 = 0; j0 < ld; j0 += 8) {
      if (j0 >= n) {  // padding columns only
        for (int64_t f = 0; f < fw; ++f) _mm256_storeu_ps(dst + (f0 + f) * ld + j0, _mm256_setzero_ps());
        continue;
      }
      __m256 r[8];
      for (int i = 0; i < 8; ++i) {
        const float* row = src + (j0 + i) * sr + f0;
        r[i] = j0 + i >= n ? _mm256_setzero_ps() : fw == 8 ? _mm256_loadu_ps(row) : _mm256_maskload_ps(row, fmask);
      }
      transpose8x8_avx2(r);
      for (int64_t f = 0; f < fw; ++f) _mm256_storeu_ps(dst + (f0 + f) * ld + j0, r[f]);
    }
  }
}

__attribute__((target("avx2,fma"))) void scale_rows_avx2(float* dst, int64_t lddst, const float* src,
                                                        int64_t ldsrc, const float* row_scale, float scale,
                                                        int64_t nvalid, int64_t n, int64_t width) {
  for (int64_t r = 0; r < n; ++r) {
    const float s = r < nvalid ? (row_scale != nullptr ? row_scale[r] : scale) : 0.f;
    const bool zero = !(r < nvalid) || (row_scale != nullptr && !(s > 0.f));
    const __m256 sv = _mm256_set1_ps(s);
    for (int64_t c0 = 0; c0 < width; c0 += 8) {
      const __m256 v = zero ? _mm256_setzero_ps() : _mm256_mul_ps(_mm256_loadu_ps(src + r * ldsrc + c0), sv);
      store_lanes_avx2(dst + r * lddst + c0, v, width - c0);
    }
  }
}

__attribute__((target("avx2,fma"))) void pack_rows_avx2(const float* src, int64_t sr, int64_t n, int64_t width,
                                                       int64_t ld, float* dst) {
  for (int64_t r = 0; r < n; ++r)
    for (int64_t c0 = 0; c0 < ld; c0 += 8)
      _mm256_storeu_ps(dst + r * ld + c0, width - c0 >= 8 ? _mm256_loadu_ps(src + r * sr + c0)
                                                          : _mm256_maskload_ps(src + r * sr + c0, lane_mask_avx2(width - c0)));
}
#endif

// The AVX-512 helpers above run in the AVX-512 copy of the kernels only (VB = 64 for float),
// the AVX2 ones in the AVX2 copy (VB = 32).
template <typename T, int VB>
constexpr bool use_avx512() {
#ifdef AFFECTKIT_AVX512_TRANSPOSE
  return VB == 64 && std::is_same_v<T, float>;
#else
  return false;
#endif
}
template <typename T, int VB>
constexpr bool use_avx2() {
#ifdef AFFECTKIT_AVX512_TRANSPOSE
  return VB == 32 && std::is_same_v<T, float>;
#else
  return false;
#endif
}

// dst[f, j] = t[row0 + j, f] (F x ld, transposed), zero for j in [n, ld).
template <typename T, int VB>
AFFECTKIT_INLINE void pack_transposed(const View& t, int64_t b, int64_t h, int64_t row0,
                                      int64_t n, int64_t F, int64_t ld, T* dst) {
#ifdef AFFECTKIT_AVX512_TRANSPOSE
  if constexpr (use_avx512<T, VB>()) {
    transpose_avx512(row_ptr<T>(t, b, h, row0), t.sr, n, F, ld, dst);
    return;
  }
  if constexpr (use_avx2<T, VB>()) {
    transpose_avx2(row_ptr<T>(t, b, h, row0), t.sr, n, F, ld, dst);
    return;
  }
#endif
  for (int64_t f = 0; f < F; ++f) std::fill(dst + f * ld + n, dst + (f + 1) * ld, T(0));
  for (int64_t j = 0; j < n; ++j) {
    const T* src = row_ptr<T>(t, b, h, row0 + j);
    for (int64_t f = 0; f < F; ++f) dst[f * ld + j] = src[f];
  }
}

// Rows [0, nvalid) of dst = rows of src (stride ldsrc) * scale, rows [nvalid, n) zeros, by the
// AVX-512 helper; false (nothing written) where it does not apply, for the caller's loop.
template <typename T, int VB>
AFFECTKIT_INLINE bool write_rows(T* dst, int64_t lddst, const T* src, int64_t ldsrc, T scale, int64_t nvalid,
                                 int64_t n, int64_t width) {
#ifdef AFFECTKIT_AVX512_TRANSPOSE
  if constexpr (use_avx512<T, VB>()) {
    scale_rows_avx512(dst, lddst, src, ldsrc, nullptr, scale, nvalid, n, width);
    return true;
  }
  if constexpr (use_avx2<T, VB>()) {
    scale_rows_avx2(dst, lddst, src, ldsrc, nullptr, scale, nvalid, n, width);
    return true;
  }
#endif
  (void)dst, (void)lddst, (void)src, (void)ldsrc, (void)scale, (void)nvalid, (void)n, (void)width;
  return false;
}

// dst[r, 0:ld] = row row0 + r of t for r < n, zero-padded to ld columns.
template <typename T, int VB>
AFFECTKIT_INLINE void pack_rows(const View& t, int64_t b, int64_t h, int64_t row0, int64_t n,
                                int64_t width, int64_t ld, T* dst) {
#ifdef AFFECTKIT_AVX512_TRANSPOSE
  if constexpr (use_avx512<T, VB>()) {
    pack_rows_avx512(row_ptr<T>(t, b, h, row0), t.sr, n, width, ld, dst);
    return;
  }
  if constexpr (use_avx2<T, VB>()) {
    pack_rows_avx2(row_ptr<T>(t, b, h, row0), t.sr, n, width, ld, dst);
    return;
  }
#endif
  for (int64_t r = 0; r < n; ++r) {  // a plain loop: rows are short, a libc call each costs more
    const T* src = row_ptr<T>(t, b, h, row0 + r);
    T* out = dst + r * ld;
    for (int64_t f = 0; f < ld; ++f) out[f] = f < width ? src[f] : T(0);
  }
}

template <typename T>
struct Params {  // what every task needs, computed once per call
  T scale, inv_keep;
  uint32_t threshold;
  explicit Params(const Problem& p)
      : scale(static_cast<T>(p.scale)),
        inv_keep(p.dropout_p > 0 ? static_cast<T>(1.0 / (1.0 - p.dropout_p)) : T(1)),
        threshold(dropout_threshold(p.dropout_p)) {}
};

// ---------------------------------------------------------------------------------- forward

// The forward works on transposed score tiles St[j, i] (keys x queries): each vector holds
// a vector's worth of query rows, so the softmax's max and sum over keys are plain vector ops
// (no horizontal reductions), K is read in place (broadcast operand) and only Q is
// transposed, once per task, with the scale folded in.
template <typename T>
struct ForwardScratch {
  std::vector<T> qt, st, vp, o, ot, m, l, alpha;
  std::vector<uint64_t> keys;
  // Sized for this call (D feature rows of Q^T, at most Lk key rows of St): allocating and
  // zeroing the largest case, 130 KB a thread, was a quarter of a tiny call's time in the core.
  ForwardScratch(int64_t D, int64_t Dv, int64_t Dvp, int64_t Lk)
      : qt(D * kBQ), st(std::min(kBK, Lk) * kBQ), vp(std::min(kBK, Lk) * Dvp), o(kBQ * Dvp), ot(Dv * kBQ),
        m(kBQ), l(kBQ), alpha(kBQ), keys(kBQ) {}
};

// One key tile of the online softmax, lanes c < npad of St (nk rows): the running max and
// sum (mrun, lrun) take the tile in, alpha gets exp(m_old - m_new) and St the exps. Each
// lane vector keeps its max, shift and sum in registers over the tile's keys.
template <typename T, int VB>
AFFECTKIT_INLINE void softmax_tile(T* st, int64_t nk, int64_t npad, T* mrun, T* lrun, T* alpha) {
  using V = typename Vec<T, VB>::type;
  constexpr int64_t n = Vec<T, VB>::n;
  const V ninf = splat<T, VB>(neg_inf<T>());
  for (int64_t c = 0; c < npad; c += n) {
    const V mold = load_vec<T, VB>(mrun + c);
    V m = mold;
    for (int64_t j = 0; j < nk; ++j) {
      const V x = load_vec<T, VB>(st + j * kBQ + c);
      m = m > x ? m : x;
    }
    const auto none = m == ninf;  // nothing visible yet: alpha 1, exps of -inf are 0
    const V a = none ? splat<T, VB>(T(1)) : exp_vec<T, VB>(mold - m);
    const V shift = none ? V{} : m;
    V l = load_vec<T, VB>(lrun + c) * a;
    for (int64_t j = 0; j < nk; ++j) {
      const V e = exp_vec<T, VB>(load_vec<T, VB>(st + j * kBQ + c) - shift);
      store_vec<T, VB>(st + j * kBQ + c, e, false);
      l += e;
    }
    store_vec<T, VB>(mrun + c, m, false);
    store_vec<T, VB>(lrun + c, l, false);
    store_vec<T, VB>(alpha + c, a, false);
  }
}

// Tiles of at most this many query rows (decoding: one query against a long memory) take
// the key-major forward below: the query-lane tile used 1 of 16 lanes and read K by scalar
// broadcasts from 6 key rows, 0.61-0.73x SDPA at Lq = 1, Lk = 8,192, D = 64 (RESULTS.md).
constexpr int64_t kFewRows = 4;

// The sum of a vector's lanes, halving the width each step (lane by lane through memory, a
// 64-byte vector took 16 scalar adds after a store and was slower than the AVX2 copy).
template <typename T, int VB>
AFFECTKIT_INLINE T hsum(typename Vec<T, VB>::type v) {
  if constexpr (VB > 16) {
    typename Vec<T, VB / 2>::type lo, hi;
    std::memcpy(&lo, &v, VB / 2);
    std::memcpy(&hi, reinterpret_cast<const char*>(&v) + VB / 2, VB / 2);
    return hsum<T, VB / 2>(lo + hi);
  } else {
    T lanes[Vec<T, VB>::n];
    std::memcpy(lanes, &v, sizeof(lanes));
    T sum = T(0);
    for (int l = 0; l < Vec<T, VB>::n; ++l) sum += lanes[l];
    return sum;
  }
}

// <a, b_r> for R rows b_r = b + r * ldb over D values, vectors along the features (R chains
// share each load of a), the tail one by one.
template <typename T, int VB, int R>
AFFECTKIT_INLINE void dot_rows(const T* __restrict a, const T* __restrict b, int64_t ldb, int64_t D, T* out) {
  using V = typename Vec<T, VB>::type;
  constexpr int n = Vec<T, VB>::n;
  V acc[R] = {};
  int64_t d = 0;
  for (; d + n <= D; d += n) {
    const V x = load_vec<T, VB>(a + d);
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) acc[r] += x * load_vec<T, VB>(b + r * ldb + d);
  }
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) {
    T sum = hsum<T, VB>(acc[r]);
    for (int64_t e = d; e < D; ++e) sum += a[e] * b[r * ldb + e];
    out[r] = sum;
  }
}

// o[0, Dv) = o * alpha + sum_j p[j] V[j] for nk rows of V (row stride ldv); o holds Dvp >= Dv.
template <typename T, int VB>
AFFECTKIT_INLINE void accumulate_rows(T* __restrict o, int64_t Dv, T alpha, const T* __restrict p, int64_t nk,
                                      const T* __restrict vrows, int64_t ldv) {
  using V = typename Vec<T, VB>::type;
  constexpr int n = Vec<T, VB>::n;
  int64_t d = 0;
  for (; d + n <= Dv; d += n) {
    V acc = load_vec<T, VB>(o + d) * alpha;
    for (int64_t j = 0; j < nk; ++j) acc += p[j] * load_vec<T, VB>(vrows + j * ldv + d);
    store_vec<T, VB>(o + d, acc, false);
  }
  for (; d < Dv; ++d) {
    T acc = o[d] * alpha;
    for (int64_t j = 0; j < nk; ++j) acc += p[j] * vrows[j * ldv + d];
    o[d] = acc;
  }
}

// forward_task for a tile of mv <= kFewRows query rows, key-major: per key tile, each row's
// scores are dot products with the K rows (which stay in L1 for the tile's other rows), the
// online softmax runs along the keys, and O += P V along the features. Same results as the
// query-lane tile up to rounding: scale, masks, key limits and dropout as there, l summed
// before dropout, and rows without a visible key (or past q_length) zeros with lse = +inf.
template <typename T, int VB>
AFFECTKIT_INLINE void forward_few_rows(const Problem& p, const Params<T>& pr, const View& q, const View& k,
                                       const View& v, const Mask& mask, const MutView& out, const MutView& lse,
                                       int64_t b, int64_t h, const Seq& sq, int64_t i0, int64_t mv, int64_t present,
                                       ForwardScratch<T>& w) {
  const int64_t D = p.D, Dv = p.Dv, Dvp = round_up(Dv, kCW);
  const int64_t ld = round_up(std::min(kBK, p.Lk), kCW);  // score row stride (w.st holds kFewRows rows)
  T *st = w.st.data(), *o = w.o.data(), *mrun = w.m.data(), *lrun = w.l.data();
  int64_t kend = 0, kends[kFewRows];
  for (int64_t r = 0; r < mv; ++r) {
    kends[r] = key_end(p, sq, i0 + r);
    kend = std::max(kend, kends[r]);
    mrun[r] = neg_inf<T>();
    lrun[r] = T(0);
    std::fill(o + r * Dvp, o + (r + 1) * Dvp, T(0));
    if (pr.threshold > 0) w.keys[r] = dropout_row_key(p.seed, b, h, i0 + r);
  }
  for (int64_t j0 = 0; j0 < kend; j0 += kBK) {
    const int64_t nk = std::min<int64_t>(kBK, kend - j0);
    const T* krows = row_ptr<T>(k, b, h, sq.k0 + j0);
    const T* vrows = row_ptr<T>(v, b, h, sq.k0 + j0);
    for (int64_t r = 0; r < mv; ++r) {
      if (j0 >= kends[r]) continue;  // no key of this tile is visible to the row
      T* s = st + r * ld;
      const T* qrow = row_ptr<T>(q, b, h, sq.q0 + i0 + r);
      int64_t j = 0;
      for (; j + 4 <= nk; j += 4) dot_rows<T, VB, 4>(qrow, krows + j * k.sr, k.sr, D, s + j);
      for (; j < nk; ++j) dot_rows<T, VB, 1>(qrow, krows + j * k.sr, k.sr, D, s + j);
      finish_scores<T>(s, nk, j0, kends[r], pr.scale, mask, mask_row(mask, b, h, i0 + r));
      T tmax = neg_inf<T>();
      for (int64_t j = 0; j < nk; ++j) tmax = std::max(tmax, s[j]);
      if (tmax == neg_inf<T>()) continue;  // all masked here
      const T m_new = std::max(mrun[r], tmax);
      const T alpha = exp_fast(mrun[r] - m_new);  // 0 while nothing was visible
      const int64_t ncols = round_up(nk, kCW);
      std::fill(s + nk, s + ncols, neg_inf<T>());  // exp_row works on whole kCW blocks
      lrun[r] = lrun[r] * alpha + exp_row<T>(s, ncols, m_new);
      mrun[r] = m_new;
      if (pr.threshold > 0) apply_dropout<T>(s, nk, j0, w.keys[r], pr.threshold, pr.inv_keep);
      accumulate_rows<T, VB>(o + r * Dvp, Dv, alpha, s, nk, vrows, v.sr);
    }
  }
  for (int64_t r = 0; r < present; ++r) {
    T* dst = row_ptr<T>(out, b, h, sq.q0 + i0 + r);
    const bool any = r < mv && lrun[r] > T(0);
    *row_ptr<T>(lse, b, h, sq.q0 + i0 + r) = any ? mrun[r] + log_fast(lrun[r]) : std::numeric_limits<T>::infinity();
    const T inv = any ? T(1) / lrun[r] : T(0);
    for (int64_t c = 0; c < Dv; ++c) dst[c] = any ? o[r * Dvp + c] * inv : T(0);
  }
}

template <typename T, int VB>
AFFECTKIT_INLINE void forward_task(const Problem& p, const Params<T>& pr, const View& q,
                                        const View& k, const View& v, const Mask& mask,
                                        const MutView& out, const MutView& lse, int64_t b,
                                        int64_t h, int64_t qtile, ForwardScratch<T>& w) {
  const int64_t D = p.D, Dv = p.Dv, Dvp = round_up(Dv, kCW);
  const Seq sq = seq_info(p, b);
  const int64_t i0 = qtile * kBQ;
  const int64_t present = clamp64(sq.qrows - i0, 0, kBQ);
  const int64_t mv = clamp64(sq.qlen - i0, 0, kBQ);
  if (present == 0) return;
  if (mv > 0 && mv <= kFewRows) return forward_few_rows<T, VB>(p, pr, q, k, v, mask, out, lse, b, h, sq, i0, mv, present, w);
  const int64_t npad = round_up(mv, Vec<T, VB>::n);  // query lanes, padded to whole vectors
  const int64_t kend = mv > 0 ? key_end(p, sq, i0 + mv - 1) : 0;
  T *qt = w.qt.data(), *st = w.st.data(), *o = w.o.data(), *ot = w.ot.data(), *mrun = w.m.data();
  T *lrun = w.l.data(), *alpha = w.alpha.data();
  std::fill(mrun, mrun + npad, neg_inf<T>());
  std::fill(lrun, lrun + npad, T(0));
  if (kend > 0) {
    pack_transposed<T, VB>(q, b, h, sq.q0 + i0, mv, D, npad, qt);
    for (int64_t e = 0; e < D * npad; ++e) qt[e] *= pr.scale;  // scores come out scaled
  }
  if (pr.threshold > 0)
    for (int64_t r = 0; r < mv; ++r) w.keys[r] = dropout_row_key(p.seed, b, h, i0 + r);
  // O += P V as O^T += V^T St (Dv rows, query lanes) where that computes fewer padded
  // products than row by row with Dv padded to kCW columns: short values such as MulT's
  // Dv = 6 then cost 8 rather than 16 lanes per product.
  const bool transposed = round_up(Dv, 4) * npad < round_up(mv, 4) * Dvp;
  const bool direct_v = Dv % kCW == 0;  // V rows usable in place as the B operand
  for (int64_t j0 = 0; j0 < kend; j0 += kBK) {
    const int64_t nk = std::min<int64_t>(kBK, kend - j0);
    // St = K (scale Q)^T. Padding lanes (zero queries) score 0: finite, never stored.
    gemm_acc<T, VB>(nk, npad, D, row_ptr<T>(k, b, h, sq.k0 + j0), k.sr, 1, qt, npad, st, kBQ, false);
    // Causal and explicit masks; lane c (query i0 + c) sees key j0 + j iff
    // j0 + j <= i0 + c + offset. Key lengths need nothing here: kend stops at them.
    if (p.causal || mask.data != nullptr)
      for (int64_t j = 0; j < nk; ++j) {
        T* row = st + j * kBQ;
        const int64_t first = p.causal ? j0 + j - sq.offset - i0 : std::numeric_limits<int64_t>::min();
        const int64_t lo = clamp64(first, 0, mv);  // lanes [lo, mv) are visible
        for (int64_t c = 0; c < lo; ++c) row[c] = neg_inf<T>();
        if (mask.data == nullptr) continue;
        for (int64_t c = lo; c < mv; ++c) {
          const void* mr = mask_row(mask, b, h, i0 + c);
          if (mask.dtype == DType::Bool) {
            if (!static_cast<const uint8_t*>(mr)[(j0 + j) * mask.sj]) row[c] = neg_inf<T>();
          } else if (mask.dtype == DType::Float64) {
            row[c] += static_cast<T>(static_cast<const double*>(mr)[(j0 + j) * mask.sj]);
          } else {
            row[c] += static_cast<T>(static_cast<const float*>(mr)[(j0 + j) * mask.sj]);
          }
        }
      }
    softmax_tile<T, VB>(st, nk, npad, mrun, lrun, alpha);
    if (pr.threshold > 0)
      for (int64_t j = 0; j < nk; ++j)
        for (int64_t c = 0; c < mv; ++c) {
          T& e = st[j * kBQ + c];
          e = dropout_keep(w.keys[c], j0 + j, pr.threshold) ? e * pr.inv_keep : T(0);
        }
    const T* vrows = row_ptr<T>(v, b, h, sq.k0 + j0);
    if (transposed) {
      if (j0 > 0)  // the first tile overwrites ot below
        for (int64_t d = 0; d < Dv; ++d)
          for (int64_t c = 0; c < npad; ++c) ot[d * kBQ + c] *= alpha[c];
      // O^T(d, i) += sum_j V(j, d) St(j, i).
      gemm_acc<T, VB>(Dv, npad, nk, vrows, 1, v.sr, st, kBQ, ot, kBQ, j0 > 0);
      continue;
    }
    for (int64_t r = 0; r < mv && j0 > 0; ++r)  // the first tile overwrites o below
      if (alpha[r] != T(1)) {
        T* orow = o + r * Dvp;
        for (int64_t c = 0; c < Dvp; ++c) orow[c] *= alpha[r];
      }
    // O += P V with P(i, j) = St[j, i].
    const T* vb = w.vp.data();
    int64_t ldv = Dvp;
    if (direct_v) {
      vb = vrows;
      ldv = v.sr;
    } else {
      pack_rows<T, VB>(v, b, h, sq.k0 + j0, nk, Dv, Dvp, w.vp.data());
    }
    gemm_acc<T, VB>(mv, Dvp, nk, st, 1, kBQ, vb, ldv, o, Dvp, j0 > 0);
  }
  if (transposed && kend > 0) {  // back to rows: o(i, d) = O^T(d, i)
#ifdef AFFECTKIT_AVX512_TRANSPOSE
    if constexpr (use_avx512<T, VB>()) transpose_avx512(ot, kBQ, Dv, mv, Dvp, o);
    else if constexpr (use_avx2<T, VB>()) transpose_avx2(ot, kBQ, Dv, mv, Dvp, o);
    else
#endif
      for (int64_t r = 0; r < mv; ++r)
        for (int64_t d = 0; d < Dv; ++d) o[r * Dvp + d] = ot[d * kBQ + r];
  }
  // Row sums are >= 1 where a key is visible (the max contributes exp(0)), else 0: then the
  // row is zeros and lse = +inf, so the backward's P = exp(s - lse) is 0. Vector pass first.
  for (int64_t r = 0; r < npad; ++r) {
    const bool any = lrun[r] > T(0);
    const T l = any ? lrun[r] : T(1);
    alpha[r] = any ? T(1) / l : T(0);  // reused as 1 / l
    mrun[r] = any ? mrun[r] + log_fast(l) : std::numeric_limits<T>::infinity();
  }
  for (int64_t r = 0; r < present; ++r)
    *row_ptr<T>(lse, b, h, sq.q0 + i0 + r) = r < mv ? mrun[r] : std::numeric_limits<T>::infinity();
#ifdef AFFECTKIT_AVX512_TRANSPOSE
  if constexpr (use_avx512<T, VB>()) {
    scale_rows_avx512(row_ptr<T>(out, b, h, sq.q0 + i0), out.sr, o, Dvp, alpha, 0.f, mv, present, Dv);
    return;
  }
  if constexpr (use_avx2<T, VB>()) {
    scale_rows_avx2(row_ptr<T>(out, b, h, sq.q0 + i0), out.sr, o, Dvp, alpha, 0.f, mv, present, Dv);
    return;
  }
#endif
  for (int64_t r = 0; r < present; ++r) {
    T* dst = row_ptr<T>(out, b, h, sq.q0 + i0 + r);
    if (r < mv && alpha[r] > T(0)) {
      const T inv = alpha[r];
      for (int64_t c = 0; c < Dv; ++c) dst[c] = o[r * Dvp + c] * inv;
    } else {  // past q_length, or no visible key
      for (int64_t c = 0; c < Dv; ++c) dst[c] = T(0);
    }
  }
}

struct ForwardTasks {  // this thread's share of the forward's tasks
  template <int VB, typename T>
  AFFECTKIT_INLINE static void run(const Problem& p, const Params<T>& pr, const View& q, const View& k,
                                   const View& v, const Mask& mask, const MutView& out, const MutView& lse,
                                   int64_t qtiles, ForwardScratch<T>& w) {
#pragma omp for collapse(3) schedule(dynamic, 1)
    for (int64_t b = 0; b < p.B; ++b)
      for (int64_t h = 0; h < p.H; ++h)
        for (int64_t qt = 0; qt < qtiles; ++qt)
          forward_task<T, VB>(p, pr, q, k, v, mask, out, lse, b, h, qt, w);
  }
};

template <typename T>
void forward(const Problem& p, View q, View k, View v, Mask mask, MutView out, MutView lse) {
  const int64_t qtiles = (p.Lq + kBQ - 1) / kBQ;
  const Params<T> pr(p);
  const int64_t Dvp = round_up(p.Dv, kCW);
#pragma omp parallel
  {
    ForwardScratch<T> w(p.D, p.Dv, Dvp, p.Lk);
    simd::dispatch<ForwardTasks>(p, pr, q, k, v, mask, out, lse, qtiles, w);
  }
}

// --------------------------------------------------------------------------------- backward

// Recompute one tile of probabilities in place: s[r, j] = exp(score - lse_r) for query rows
// i0 + r (r < mq) and keys j0 + j (j < ncols), from the raw dot products in s.
template <typename T>
AFFECTKIT_INLINE void probabilities(const Problem& p, const Params<T>& pr, const Seq& sq,
                                    int64_t b, int64_t h, int64_t i0, int64_t mq, int64_t j0,
                                    int64_t ncols, const Mask& mask, const View& lse, T* s) {
  for (int64_t r = 0; r < mq; ++r) {
    const int64_t i = i0 + r;
    T* row = s + r * kBK;
    finish_scores<T>(row, ncols, j0, key_end(p, sq, i), pr.scale, mask, mask_row(mask, b, h, i));
    const T l = *row_ptr<T>(lse, b, h, sq.q0 + i);
    if (std::isinf(l)) std::fill(row, row + ncols, T(0));  // no visible key: P = 0
    else exp_row<T>(row, ncols, l);
  }
}

// The backward also works on transposed tiles (keys x queries): Q and dO are transposed once
// per (b, h); K, V, Q and dO rows are read in place as matmul operands when their width is a
// whole number of vectors (else packed, zero-padded).
template <typename T>
struct BackwardScratch {
  std::vector<T> qt, gt, qp, gop, kp, st, dpt, dk, dv, dq, lse, delta;
};

template <typename T, int VB>
AFFECTKIT_INLINE void backward_task(const Problem& p, const Params<T>& pr, const View& q,
                                         const View& k, const View& v, const Mask& mask,
                                         const View& out, const View& gout, const View& lse,
                                         const MutView& gq, const MutView& gk,
                                         const MutView& gv, T* gmask, int64_t b, int64_t h,
                                         BackwardScratch<T>& w) {
  // Features padded to whole vectors (not to kCW): D = 6 costs 8 lanes per product on AVX2.
  constexpr int64_t n = Vec<T, VB>::n;
  const int64_t D = p.D, Dv = p.Dv, Dp = round_up(D, n), Dvp = round_up(Dv, n);
  const Seq sq = seq_info(p, b);
  const int64_t qlen = sq.qlen;
  const int64_t kend = qlen > 0 ? key_end(p, sq, qlen - 1) : 0;
  const int64_t ldq = round_up(qlen, kCW) + kCW;  // room for a tile starting anywhere
  w.dq.assign(qlen * Dp, T(0));
  // The (Lq, Lk) slab of this head's score gradient: zeros except where a tile writes dS.
  T* gm = gmask != nullptr ? gmask + (b * p.H + h) * p.Lq * p.Lk : nullptr;
  if (gm != nullptr) std::fill(gm, gm + p.Lq * p.Lk, T(0));
  if (kend > 0) {
    w.qt.resize(D * ldq);
    w.gt.resize(Dv * ldq);
    w.lse.resize(ldq);
    w.delta.resize(ldq);
    w.st.resize(kBK * kBQ);
    w.dpt.resize(kBK * kBQ);
    w.dk.resize(kBK * Dp);
    w.dv.resize(kBK * Dvp);
    pack_transposed<T, VB>(q, b, h, sq.q0, qlen, D, ldq, w.qt.data());
    for (int64_t e = 0; e < D * ldq; ++e) w.qt[e] *= pr.scale;  // scores come out scaled
    pack_transposed<T, VB>(gout, b, h, sq.q0, qlen, Dv, ldq, w.gt.data());
    std::fill(w.delta.begin(), w.delta.end(), T(0));  // padding lanes: P = 0
    std::fill(w.lse.begin(), w.lse.end(), std::numeric_limits<T>::infinity());
    for (int64_t i = 0; i < qlen; ++i) {  // delta_i = dO_i . O_i = sum_j P_ij dP_ij
      const T* o = row_ptr<T>(out, b, h, sq.q0 + i);
      const T* g = row_ptr<T>(gout, b, h, sq.q0 + i);
      T acc = 0;
      if (Dv >= kCW) {  // lane-wise partial sums, then a tree: vectorised, fixed order
        T part[kCW] = {};
        int64_t c0 = 0;
        for (; c0 + kCW <= Dv; c0 += kCW)
          for (int64_t c = 0; c < kCW; ++c) part[c] += g[c0 + c] * o[c0 + c];
        for (int64_t c = c0; c < Dv; ++c) part[c - c0] += g[c] * o[c];
        for (int64_t s = kCW / 2; s > 0; s /= 2)
          for (int64_t c = 0; c < s; ++c) part[c] += part[c + s];
        acc = part[0];
      } else {
        for (int64_t c = 0; c < Dv; ++c) acc += g[c] * o[c];
      }
      w.delta[i] = acc;
      w.lse[i] = *row_ptr<T>(lse, b, h, sq.q0 + i);
    }
  }
  // Row operands: in place when a whole number of vectors wide, else packed.
  const T* qrows = nullptr;
  const T* grows = nullptr;
  int64_t ldqr = Dp, ldgr = Dvp;
  if (kend > 0) {
    if (D % n == 0) {
      qrows = row_ptr<T>(q, b, h, sq.q0);
      ldqr = q.sr;
    } else {
      w.qp.resize(qlen * Dp);
      pack_rows<T, VB>(q, b, h, sq.q0, qlen, D, Dp, w.qp.data());
      qrows = w.qp.data();
    }
    if (Dv % n == 0) {
      grows = row_ptr<T>(gout, b, h, sq.q0);
      ldgr = gout.sr;
    } else {
      w.gop.resize(qlen * Dvp);
      pack_rows<T, VB>(gout, b, h, sq.q0, qlen, Dv, Dvp, w.gop.data());
      grows = w.gop.data();
    }
  }
  T *st = w.st.data(), *dpt = w.dpt.data(), *dk = w.dk.data(), *dv = w.dv.data(), *dq = w.dq.data();
  const T *lse_all = w.lse.data(), *delta_all = w.delta.data();
  for (int64_t j0 = 0; j0 < kend; j0 += kBK) {
    const int64_t nk = std::min<int64_t>(kBK, kend - j0);
    const T* krows = row_ptr<T>(k, b, h, sq.k0 + j0);
    const T* vrows = row_ptr<T>(v, b, h, sq.k0 + j0);
    const T* kb = krows;
    int64_t ldk = k.sr;
    if (D % n != 0) {
      w.kp.resize(kBK * Dp);
      pack_rows<T, VB>(k, b, h, sq.k0 + j0, nk, D, Dp, w.kp.data());
      kb = w.kp.data();
      ldk = Dp;
    }
    // Causal: queries before j0 - offset see none of these keys.
    const int64_t ifirst = p.causal ? clamp64(j0 - sq.offset, 0, qlen) : 0;
    bool first = true;
    for (int64_t i0 = ifirst; i0 < qlen; i0 += kBQ) {
      const int64_t mq = std::min<int64_t>(kBQ, qlen - i0);
      const int64_t mpad = round_up(mq, n);  // whole vectors of query lanes
      // St = K (scale Q)^T and dPt = V dO^T for keys j0.. and queries i0.. (lanes).
      gemm_acc<T, VB>(nk, mpad, D, krows, k.sr, 1, w.qt.data() + i0, ldq, st, kBQ, false);
      gemm_acc<T, VB>(nk, mpad, Dv, vrows, v.sr, 1, w.gt.data() + i0, ldq, dpt, kBQ, false);
      // st <- dS = P * (dP * z - delta), dpt <- P * z, with P = exp(score - lse).
      for (int64_t j = 0; j < nk; ++j) {
        T* srow = st + j * kBQ;
        T* drow = dpt + j * kBQ;
        const int64_t jabs = j0 + j;
        // Lanes [lo, mq) are visible. Padding lanes score 0 against lse = +inf: P = 0.
        const int64_t lo = p.causal ? clamp64(jabs - sq.offset - i0, 0, mq) : 0;
        for (int64_t c = 0; c < lo; ++c) srow[c] = neg_inf<T>();
        if (mask.data != nullptr) {
          for (int64_t c = lo; c < mq; ++c) {
            const void* mr = mask_row(mask, b, h, i0 + c);
            if (mask.dtype == DType::Bool) {
              if (!static_cast<const uint8_t*>(mr)[jabs * mask.sj]) srow[c] = neg_inf<T>();
            } else if (mask.dtype == DType::Float64) {
              srow[c] += static_cast<T>(static_cast<const double*>(mr)[jabs * mask.sj]);
            } else {
              srow[c] += static_cast<T>(static_cast<const float*>(mr)[jabs * mask.sj]);
            }
          }
        }
        const T* lse_t = lse_all + i0;
        const T* delta_t = delta_all + i0;
        if (pr.threshold > 0) {
          for (int64_t c = 0; c < mpad; ++c) {
            const T pj = exp_fast(srow[c] - lse_t[c]);  // -inf or lse = +inf give 0
            const T z = c < mq && dropout_keep(dropout_row_key(p.seed, b, h, i0 + c), jabs, pr.threshold)
                            ? pr.inv_keep : T(0);
            srow[c] = pj * (drow[c] * z - delta_t[c]);
            drow[c] = pj * z;
          }
        } else {
          for (int64_t c = 0; c < mpad; ++c) {
            const T pj = exp_fast(srow[c] - lse_t[c]);
            srow[c] = pj * (drow[c] - delta_t[c]);
            drow[c] = pj;
          }
        }
        if (gm != nullptr)  // dS is the gradient of the additive mask (added after the scale)
          for (int64_t c = 0; c < mq; ++c) gm[(i0 + c) * p.Lk + jabs] = srow[c];
      }
      // dV += (P z)^T dO; dK += dS^T Q; dQ += dS K  (scale applied at the end).
      gemm_acc<T, VB>(nk, Dvp, mq, dpt, kBQ, 1, grows + i0 * ldgr, ldgr, dv, Dvp, !first);
      gemm_acc<T, VB>(nk, Dp, mq, st, kBQ, 1, qrows + i0 * ldqr, ldqr, dk, Dp, !first);
      gemm_acc<T, VB>(mq, Dp, nk, st, 1, kBQ, kb, ldk, dq + i0 * Dp, Dp, true);
      first = false;
    }
    if (!write_rows<T, VB>(row_ptr<T>(gk, b, h, sq.k0 + j0), gk.sr, dk, Dp, pr.scale, first ? 0 : nk, nk, D) ||
        !write_rows<T, VB>(row_ptr<T>(gv, b, h, sq.k0 + j0), gv.sr, dv, Dvp, T(1), first ? 0 : nk, nk, Dv))
      for (int64_t j = 0; j < nk; ++j) {
        T* dkr = row_ptr<T>(gk, b, h, sq.k0 + j0 + j);
        T* dvr = row_ptr<T>(gv, b, h, sq.k0 + j0 + j);
        if (first) {  // no query sees this tile
          std::fill(dkr, dkr + D, T(0));
          std::fill(dvr, dvr + Dv, T(0));
          continue;
        }
        for (int64_t c = 0; c < D; ++c) dkr[c] = dk[j * Dp + c] * pr.scale;
        for (int64_t c = 0; c < Dv; ++c) dvr[c] = dv[j * Dvp + c];
      }
  }
  for (int64_t j = kend; j < sq.krows; ++j) {  // keys no query sees
    T* dkr = row_ptr<T>(gk, b, h, sq.k0 + j);
    T* dvr = row_ptr<T>(gv, b, h, sq.k0 + j);
    std::fill(dkr, dkr + D, T(0));
    std::fill(dvr, dvr + Dv, T(0));
  }
  if (write_rows<T, VB>(row_ptr<T>(gq, b, h, sq.q0), gq.sr, dq, Dp, pr.scale, qlen, sq.qrows, D)) return;
  for (int64_t i = 0; i < sq.qrows; ++i) {
    T* dqr = row_ptr<T>(gq, b, h, sq.q0 + i);
    if (i < qlen)
      for (int64_t c = 0; c < D; ++c) dqr[c] = dq[i * Dp + c] * pr.scale;
    else
      std::fill(dqr, dqr + D, T(0));
  }
}

struct BackwardTasks {  // this thread's share of the backward's tasks
  template <int VB, typename T>
  AFFECTKIT_INLINE static void run(const Problem& p, const Params<T>& pr, const View& q, const View& k,
                                   const View& v, const Mask& mask, const View& out, const View& gout,
                                   const View& lse, const MutView& gq, const MutView& gk, const MutView& gv,
                                   T* const& gmask, BackwardScratch<T>& w) {
#pragma omp for collapse(2) schedule(dynamic, 1)
    for (int64_t b = 0; b < p.B; ++b)
      for (int64_t h = 0; h < p.H; ++h)
        backward_task<T, VB>(p, pr, q, k, v, mask, out, gout, lse, gq, gk, gv, gmask, b, h, w);
  }
};

template <typename T>
void backward(const Problem& p, View q, View k, View v, Mask mask, View out, View gout, View lse,
              MutView gq, MutView gk, MutView gv, T* gmask) {
  const Params<T> pr(p);
#pragma omp parallel
  {
    BackwardScratch<T> w;
    simd::dispatch<BackwardTasks>(p, pr, q, k, v, mask, out, gout, lse, gq, gk, gv, gmask, w);
  }
}

// ---------------------------------------------------------------------------------- weights

template <typename T, int VB>
AFFECTKIT_INLINE void weights_task(const Problem& p, const Params<T>& pr, const View& q,
                                        const View& k, const Mask& mask, const View& lse, T* w,
                                        bool average_heads, int64_t b, int64_t qt, T* kt, T* pt) {
  const int64_t D = p.D, Lq = p.Lq, Lk = p.Lk;
  const T factor = average_heads && p.H > 0 ? T(1) / static_cast<T>(p.H) : T(1);
  const Seq sq = seq_info(p, b);
  const int64_t i0 = qt * kBQ;
  const int64_t rows = std::min<int64_t>(kBQ, Lq - i0);
  const int64_t mq = clamp64(sq.qlen - i0, 0, kBQ);
  const int64_t kend = mq > 0 ? key_end(p, sq, i0 + mq - 1) : 0;
  // (B, Lq, Lk) summed over heads, or (B, H, Lq, Lk) one slab per head.
  auto tile = [&](int64_t h) {
    return average_heads ? w + (b * Lq + i0) * Lk : w + ((b * p.H + h) * Lq + i0) * Lk;
  };
  if (average_heads) std::fill(tile(0), tile(0) + rows * Lk, T(0));
  for (int64_t h = 0; h < p.H; ++h) {
    T* wt = tile(h);
    if (!average_heads) std::fill(wt, wt + rows * Lk, T(0));
    for (int64_t j0 = 0; j0 < kend; j0 += kBK) {
      const int64_t nk = std::min<int64_t>(kBK, kend - j0);
      const int64_t ncols = round_up(nk, kCW);
      pack_transposed<T, VB>(k, b, h, sq.k0 + j0, nk, D, ncols, kt);
      gemm_acc<T, VB>(mq, ncols, D, row_ptr<T>(q, b, h, sq.q0 + i0), q.sr, 1, kt, ncols, pt, kBK, false);
      probabilities<T>(p, pr, sq, b, h, i0, mq, j0, ncols, mask, lse, pt);
      for (int64_t r = 0; r < mq; ++r) {
        T* prow = pt + r * kBK;
        if (pr.threshold > 0)
          apply_dropout(prow, nk, j0, dropout_row_key(p.seed, b, h, i0 + r), pr.threshold, pr.inv_keep);
        T* wrow = wt + r * Lk + j0;
        for (int64_t j = 0; j < nk; ++j) wrow[j] += prow[j] * factor;
      }
    }
  }
}

struct WeightsTasks {  // this thread's share of the weights' tasks
  template <int VB, typename T>
  AFFECTKIT_INLINE static void run(const Problem& p, const Params<T>& pr, const View& q, const View& k,
                                   const Mask& mask, const View& lse, T* const& w, const bool& average_heads,
                                   const int64_t& qtiles, T* const& kt, T* const& pt) {
#pragma omp for collapse(2) schedule(dynamic, 1)
    for (int64_t b = 0; b < p.B; ++b)
      for (int64_t qt = 0; qt < qtiles; ++qt)
        weights_task<T, VB>(p, pr, q, k, mask, lse, w, average_heads, b, qt, kt, pt);
  }
};

template <typename T>
void weights(const Problem& p, View q, View k, Mask mask, View lse, T* w, bool average_heads) {
  const int64_t qtiles = (p.Lq + kBQ - 1) / kBQ;
  const Params<T> pr(p);
#pragma omp parallel
  {
    std::vector<T> kt(p.D * kBK), pt(kBQ * kBK);
    T* ktp = kt.data();
    T* ptp = pt.data();
    simd::dispatch<WeightsTasks>(p, pr, q, k, mask, lse, w, average_heads, qtiles, ktp, ptp);
  }
}

}  // namespace

namespace detail {
void forward_cpu(DType dtype, const Problem& p, View q, View k, View v, Mask mask, MutView out,
                 MutView lse) {
  AFFECTKIT_DISPATCH_CPU_FLOAT(dtype, "q", T, [&] { forward<T>(p, q, k, v, mask, out, lse); });
}
void backward_cpu(DType dtype, const Problem& p, View q, View k, View v, Mask mask, View out,
                  View gout, View lse, MutView gq, MutView gk, MutView gv, void* gmask) {
  AFFECTKIT_DISPATCH_CPU_FLOAT(dtype, "q", T, [&] {
    backward<T>(p, q, k, v, mask, out, gout, lse, gq, gk, gv, static_cast<T*>(gmask));
  });
}
void weights_cpu(DType dtype, const Problem& p, View q, View k, Mask mask, View lse, void* w,
                 bool average_heads) {
  AFFECTKIT_DISPATCH_CPU_FLOAT(dtype, "q", T, [&] {
    weights<T>(p, q, k, mask, lse, static_cast<T*>(w), average_heads);
  });
}
}  // namespace detail

}  // namespace affectkit::attention
