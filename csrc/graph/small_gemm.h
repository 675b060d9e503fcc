// Small dense products for per-sample graph work on the CPU (internal to csrc/graph).
//
// The graphs are tiny (N <= ~200) and the batches huge, so each thread runs many
// independent products of a few kilobytes that stay in L1. They are written once with GCC
// vector extensions of VB bytes; the callers instantiate them inside functions compiled for
// AVX-512 (VB = 64), AVX2+FMA (VB = 32) or the baseline (VB = 16) and pick one at run time.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#define AK_INLINE inline __attribute__((always_inline))

namespace affectkit::graph::detail {

template <typename T, int VB>
struct Vec {
  typedef T type __attribute__((vector_size(VB)));
  static constexpr int64_t lanes = VB / static_cast<int>(sizeof(T));
};

inline int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

// Vectors travel by reference: no vector-ABI question between differently compiled functions.
template <typename T, int VB>
AK_INLINE void vload(typename Vec<T, VB>::type& v, const T* p) {
  std::memcpy(&v, p, sizeof v);
}
template <typename T, int VB>
AK_INLINE void vstore(T* p, const typename Vec<T, VB>::type& v) {
  std::memcpy(p, &v, sizeof v);
}

// What a product does to each output vector (at column col) before storing it: nothing, or
// graph_conv's bias and piecewise-linear activation, so that the forward writes its output
// once instead of storing the product and reading it back for a separate epilogue pass.
struct StoreAsIs {
  template <typename V>
  AK_INLINE void operator()(V&, int64_t) const {}
};

template <typename T>
struct BiasThenPiecewiseLinear {
  const T* bias;  // zero-padded to the product's columns
  enum Kind { kNone, kReLU, kLeaky } kind;
  T slope;  // leaky ReLU's negative slope
  template <typename V>
  AK_INLINE void operator()(V& v, int64_t col) const {
    V b;
    std::memcpy(&b, bias + col, sizeof b);
    v += b;
    // NaN compares false, so it passes through every branch unchanged (as torch's relu).
    if (kind == kReLU) v = v < T(0) ? V{} : v;
    else if (kind == kLeaky) v = v < T(0) ? v * slope : v;
  }
};

// C[R, NV*lanes] (= or +=) A[R, K] B[K, NV*lanes]: R x NV vector accumulators in registers.
// A's element (r, k) is A[r * lda + k * ca], so a transposed operand needs no copy.
template <typename T, int VB, int R, int NV, bool Acc, class Epi>
AK_INLINE void micro_kernel(int64_t K, const T* A, int64_t lda, int64_t ca, const T* B,
                            int64_t ldb, T* C, int64_t ldc, const Epi& epi, int64_t col) {
  using V = typename Vec<T, VB>::type;
  constexpr int64_t L = Vec<T, VB>::lanes;
  V acc[R][NV];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      acc[r][v] = V{};
      if (Acc) vload<T, VB>(acc[r][v], C + r * ldc + v * L);
    }
  for (int64_t k = 0; k < K; ++k) {
    V b[NV];
    for (int v = 0; v < NV; ++v) vload<T, VB>(b[v], B + k * ldb + v * L);
    for (int r = 0; r < R; ++r) {
      // Vector times scalar: GCC broadcasts straight from memory. (V{} + a, the other
      // spelling, keeps a scalar add of +0 and a register broadcast that competes with the
      // FMAs for a port: the 62 x 64 -> 64 forward took 1.5x as long on Zen 3.)
      const T a = A[r * lda + k * ca];
      for (int v = 0; v < NV; ++v) acc[r][v] += b[v] * a;
    }
  }
  // Unrolled, or GCC spills the accumulators and copies them out 16 bytes at a time (10 % of
  // the 62 x 64 -> 64 forward on Zen 3).
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      epi(acc[r][v], col + v * L);
      vstore<T, VB>(C + r * ldc + v * L, acc[r][v]);
    }
}

template <typename T, int VB, int R, bool Acc, class Epi>
AK_INLINE void row_panel(int64_t Nc, int64_t K, const T* A, int64_t lda, int64_t ca, const T* B,
                         int64_t ldb, T* C, int64_t ldc, const Epi& epi) {
  constexpr int64_t L = Vec<T, VB>::lanes;
  int64_t j = 0;
  if constexpr (VB >= 64)  // 32 vector registers: a 4 x 4 block of accumulators fits
    for (; j + 4 * L <= Nc; j += 4 * L)
      micro_kernel<T, VB, R, 4, Acc>(K, A, lda, ca, B + j, ldb, C + j, ldc, epi, j);
  for (; j + 2 * L <= Nc; j += 2 * L)
    micro_kernel<T, VB, R, 2, Acc>(K, A, lda, ca, B + j, ldb, C + j, ldc, epi, j);
  if (j < Nc) micro_kernel<T, VB, R, 1, Acc>(K, A, lda, ca, B + j, ldb, C + j, ldc, epi, j);
}

// C[M, Nc] (= or +=) A[M, K] B[K, Nc], row-major with leading dimensions; A's element (i, k)
// is A[i * lda + k * ca]. Nc must be a multiple of the vector lanes (callers pad their
// buffers with zero columns).
// Rows go in panels of up to 6 with 16 vector registers (AVX2, baseline: 6 x 2 accumulators,
// two B vectors and a broadcast: 12 FMAs for 8 loads), up to 4 with 32 (AVX-512: 4 x 4), as
// evenly as possible: 62 rows as 7 x 6 + 4 x 5, not 10 x 6 + 2, whose 2-row panel has too
// few independent FMA chains to cover the FMA latency. Each element's sum runs over k in the
// same order whatever its panel, so the split never changes a result.
template <typename T, int VB, bool Acc, class Epi = StoreAsIs>
AK_INLINE void gemm_strided(int64_t M, int64_t Nc, int64_t K, const T* A, int64_t lda, int64_t ca,
                            const T* B, int64_t ldb, T* C, int64_t ldc, const Epi& epi = Epi{}) {
  constexpr int kRows = VB >= 64 ? 4 : 6;
  const int64_t panels = (M + kRows - 1) / kRows;
  const int64_t base = panels ? M / panels : 0, longer = panels ? M % panels : 0;
  int64_t i = 0;
  for (int64_t p = 0; p < panels; ++p) {
    const int64_t rows = base + (p < longer ? 1 : 0);
    const T* Ai = A + i * lda;
    T* Ci = C + i * ldc;
    switch (rows) {
      case 6: if constexpr (kRows >= 6) row_panel<T, VB, 6, Acc>(Nc, K, Ai, lda, ca, B, ldb, Ci, ldc, epi); break;
      case 5: if constexpr (kRows >= 5) row_panel<T, VB, 5, Acc>(Nc, K, Ai, lda, ca, B, ldb, Ci, ldc, epi); break;
      case 4: row_panel<T, VB, 4, Acc>(Nc, K, Ai, lda, ca, B, ldb, Ci, ldc, epi); break;
      case 3: row_panel<T, VB, 3, Acc>(Nc, K, Ai, lda, ca, B, ldb, Ci, ldc, epi); break;
      case 2: row_panel<T, VB, 2, Acc>(Nc, K, Ai, lda, ca, B, ldb, Ci, ldc, epi); break;
      case 1: row_panel<T, VB, 1, Acc>(Nc, K, Ai, lda, ca, B, ldb, Ci, ldc, epi); break;
      default: break;
    }
    i += rows;
  }
}

template <typename T, int VB, bool Acc, class Epi = StoreAsIs>
AK_INLINE void gemm(int64_t M, int64_t Nc, int64_t K, const T* A, int64_t lda, const T* B,
                    int64_t ldb, T* C, int64_t ldc, const Epi& epi = Epi{}) {
  gemm_strided<T, VB, Acc>(M, Nc, K, A, lda, 1, B, ldb, C, ldc, epi);
}

// sum_i a[i] b[i] for n a multiple of the lanes, in vector partial sums (a plain scalar loop
// is a strictly ordered float reduction, which the compiler may not reorder or vectorise).
template <typename T, int VB>
AK_INLINE T dot_lanes(const T* a, const T* b, int64_t n) {
  using V = typename Vec<T, VB>::type;
  constexpr int64_t L = Vec<T, VB>::lanes;
  V s0{}, s1{}, x0, y0, x1, y1;
  int64_t i = 0;
  for (; i + 2 * L <= n; i += 2 * L) {
    vload<T, VB>(x0, a + i), vload<T, VB>(y0, b + i);
    vload<T, VB>(x1, a + i + L), vload<T, VB>(y1, b + i + L);
    s0 += x0 * y0, s1 += x1 * y1;
  }
  if (i < n) vload<T, VB>(x0, a + i), vload<T, VB>(y0, b + i), s0 += x0 * y0;
  s0 += s1;
  T sum = 0;
  for (int64_t c = 0; c < L; ++c) sum += s0[c];
  return sum;
}

// acc[c] += sum_r m[r, c] for a row-major (rows, cols) block, cols a multiple of the lanes.
// The sums stay in registers across rows (two chains per column vector, to hide the add
// latency); adding row by row into acc would chain every row through a store and a load.
template <typename T, int VB>
AK_INLINE void add_column_sums(const T* m, int64_t rows, int64_t cols, T* acc) {
  using V = typename Vec<T, VB>::type;
  constexpr int64_t L = Vec<T, VB>::lanes;
  for (int64_t c = 0; c < cols; c += L) {
    V s0{}, s1{}, v0, v1;
    int64_t r = 0;
    for (; r + 1 < rows; r += 2) {
      vload<T, VB>(v0, m + r * cols + c);
      vload<T, VB>(v1, m + (r + 1) * cols + c);
      s0 += v0, s1 += v1;
    }
    if (r < rows) vload<T, VB>(v0, m + r * cols + c), s0 += v0;
    vload<T, VB>(v1, acc + c);
    vstore<T, VB>(acc + c, v1 + (s0 + s1));
  }
}

// dst[r, c] = src[r, c] for c < cols, zero for cols <= c < ld_dst (pads stay zero).
template <typename T>
AK_INLINE void copy_padded(const T* src, int64_t rows, int64_t cols, int64_t ld_src, T* dst,
                           int64_t ld_dst) {
  // Plain loops, not memcpy: rows are a few dozen bytes, where a library call costs more.
  for (int64_t r = 0; r < rows; ++r) {
    const T* s = src + r * ld_src;
    T* d = dst + r * ld_dst;
    int64_t c = 0;
    for (; c < cols; ++c) d[c] = s[c];
    for (; c < ld_dst; ++c) d[c] = T(0);
  }
}

// dst[c, r] = src[r, c] (dst is cols x ld_dst, zero past rows).
template <typename T>
AK_INLINE void transpose_padded(const T* src, int64_t rows, int64_t cols, int64_t ld_src, T* dst,
                                int64_t ld_dst) {
  for (int64_t c = 0; c < cols; ++c) {
    T* d = dst + c * ld_dst;
    int64_t r = 0;
    for (; r < rows; ++r) d[r] = src[r * ld_src + c];
    for (; r < ld_dst; ++r) d[r] = T(0);
  }
}

// True when every value is finite (no NaN, no infinity).
template <typename T>
inline bool all_finite(const T* p, int64_t n) {
  int bad = 0;
  for (int64_t i = 0; i < n; ++i) bad |= !((p[i] - p[i]) == T(0));
  return bad == 0;
}

// Which instruction set the graph kernels use: simd::level(), further capped by
// AFFECTKIT_GRAPH_SIMD_LEVEL.
int simd_level();

// [begin, end) of `total` items for thread `t` of `nt` (contiguous, balanced).
inline void thread_range(int64_t total, int t, int nt, int64_t* begin, int64_t* end) {
  *begin = total * t / nt;
  *end = total * (t + 1) / nt;
}

}  // namespace affectkit::graph::detail

// Instantiate NAME##_isa<T> for each instruction set from a template NAME##_impl<T, VB>
// taking (const Args&, int64_t, int64_t), and a dispatcher NAME<T>(level, args, begin, end).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define AK_GRAPH_MULTIVERSION(NAME, ARGS)                                                         \
  template <typename T>                                                                           \
  __attribute__((target("avx512f,avx512vl,avx512dq,avx2,fma"))) void NAME##_avx512(              \
      const ARGS<T>& a, int64_t b0, int64_t b1) {                                                 \
    NAME##_impl<T, 64>(a, b0, b1);                                                                \
  }                                                                                               \
  template <typename T>                                                                           \
  __attribute__((target("avx2,fma"))) void NAME##_avx2(const ARGS<T>& a, int64_t b0, int64_t b1) { \
    NAME##_impl<T, 32>(a, b0, b1);                                                                \
  }                                                                                               \
  template <typename T>                                                                           \
  void NAME##_base(const ARGS<T>& a, int64_t b0, int64_t b1) {                                    \
    NAME##_impl<T, 16>(a, b0, b1);                                                                \
  }                                                                                               \
  template <typename T>                                                                           \
  void NAME(int level, const ARGS<T>& a, int64_t b0, int64_t b1) {                                \
    if (level >= 2) NAME##_avx512<T>(a, b0, b1);                                                  \
    else if (level == 1) NAME##_avx2<T>(a, b0, b1);                                               \
    else NAME##_base<T>(a, b0, b1);                                                               \
  }
#else
#define AK_GRAPH_MULTIVERSION(NAME, ARGS)                                \
  template <typename T>                                                  \
  void NAME(int, const ARGS<T>& a, int64_t b0, int64_t b1) {             \
    NAME##_impl<T, 16>(a, b0, b1);                                       \
  }
#endif
