// WalkCodes (walk_codes.h): coding rows and scoring queries against codes.
#include "walk_codes.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>

#include "../core/simd.h"
#include "f16.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#include <immintrin.h>
#define AFFECTKIT_WALK_CODES_X86 1
#endif

namespace affectkit::knn {
namespace {

int64_t round_up_64(int64_t x) { return (x + 63) / 64 * 64; }

// A range's width, finite (rows spanning more than float's range code coarsely, not as NaN).
float finite_width(float w) { return std::isfinite(w) ? w : std::numeric_limits<float>::max(); }

// Row i of `rows` as float32: the row itself, or its conversion into buf.
const float* row_f32(const void* rows, DType dtype, int64_t d, int64_t i, std::vector<float>& buf) {
  if (dtype != DType::Float16) return static_cast<const float*>(rows) + i * d;
  buf.resize(d);
  f16_to_f32(static_cast<const uint16_t*>(rows) + i * d, buf.data(), d);
  return buf.data();
}

// Per-dimension min and max of rows [begin, end) into lo / hi (which hold the running ones).
void row_ranges(const void* rows, DType dtype, int64_t d, int64_t begin, int64_t end,
                std::vector<float>& lo, std::vector<float>& hi) {
  std::vector<float> buf;
  for (int64_t i = begin; i < end; ++i) {
    const float* x = row_f32(rows, dtype, d, i, buf);
    for (int64_t j = 0; j < d; ++j) {
      lo[j] = std::min(lo[j], x[j]);
      hi[j] = std::max(hi[j], x[j]);
    }
  }
}

// Scoring kernels: one row of codes (stride bytes, a multiple of 64) against a prepared
// query. "ip" returns sum a[j] code[j]; "l2" sum (a[j] - step[j] code[j])^2. Explicit
// intrinsics: GCC turns a vector conversion of uint8 lanes into one scalar conversion per
// lane (benchmarks/RESULTS.md, twenty-second session).
float ip_scalar(const float* a, const float*, const uint8_t* c, int64_t stride) {
  float s = 0.f;
  for (int64_t j = 0; j < stride; ++j) s += a[j] * static_cast<float>(c[j]);
  return s;
}
float l2_scalar(const float* a, const float* step, const uint8_t* c, int64_t stride) {
  float s = 0.f;
  for (int64_t j = 0; j < stride; ++j) {
    const float t = a[j] - step[j] * static_cast<float>(c[j]);
    s += t * t;
  }
  return s;
}

#ifdef AFFECTKIT_WALK_CODES_X86
// GCC 12's avx512fintrin.h builds the conversions and the reduction on an "undefined"
// register that -W(maybe-)uninitialized then reports; the values are all defined.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
__attribute__((target("avx2,fma"))) inline __m256 codes8_avx2(const uint8_t* c) {
  return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(c))));
}
__attribute__((target("avx2,fma"))) inline float hsum_avx2(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_shuffle_ps(t, t, 1)));
}
__attribute__((target("avx2,fma"))) float ip_avx2(const float* a, const float*, const uint8_t* c,
                                                  int64_t stride) {
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  for (int64_t j = 0; j < stride; j += 16) {
    acc0 = _mm256_fmadd_ps(_mm256_load_ps(a + j), codes8_avx2(c + j), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_load_ps(a + j + 8), codes8_avx2(c + j + 8), acc1);
  }
  return hsum_avx2(_mm256_add_ps(acc0, acc1));
}
__attribute__((target("avx2,fma"))) float l2_avx2(const float* a, const float* step, const uint8_t* c,
                                                  int64_t stride) {
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  for (int64_t j = 0; j < stride; j += 16) {
    const __m256 t0 = _mm256_fnmadd_ps(_mm256_load_ps(step + j), codes8_avx2(c + j), _mm256_load_ps(a + j));
    const __m256 t1 =
        _mm256_fnmadd_ps(_mm256_load_ps(step + j + 8), codes8_avx2(c + j + 8), _mm256_load_ps(a + j + 8));
    acc0 = _mm256_fmadd_ps(t0, t0, acc0);
    acc1 = _mm256_fmadd_ps(t1, t1, acc1);
  }
  return hsum_avx2(_mm256_add_ps(acc0, acc1));
}

__attribute__((target("avx512f"))) inline __m512 codes16_512(const uint8_t* c) {
  return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_load_si128(reinterpret_cast<const __m128i*>(c))));
}
__attribute__((target("avx512f"))) float ip_512(const float* a, const float*, const uint8_t* c,
                                                int64_t stride) {
  __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
  for (int64_t j = 0; j < stride; j += 32) {
    acc0 = _mm512_fmadd_ps(_mm512_load_ps(a + j), codes16_512(c + j), acc0);
    acc1 = _mm512_fmadd_ps(_mm512_load_ps(a + j + 16), codes16_512(c + j + 16), acc1);
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
}
__attribute__((target("avx512f"))) float l2_512(const float* a, const float* step, const uint8_t* c,
                                                int64_t stride) {
  __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
  for (int64_t j = 0; j < stride; j += 32) {
    const __m512 t0 = _mm512_fnmadd_ps(_mm512_load_ps(step + j), codes16_512(c + j), _mm512_load_ps(a + j));
    const __m512 t1 =
        _mm512_fnmadd_ps(_mm512_load_ps(step + j + 16), codes16_512(c + j + 16), _mm512_load_ps(a + j + 16));
    acc0 = _mm512_fmadd_ps(t0, t0, acc0);
    acc1 = _mm512_fmadd_ps(t1, t1, acc1);
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
}
#endif

using RowFn = float (*)(const float*, const float*, const uint8_t*, int64_t);

// The widest kernels the SIMD level allows (simd::level(), which AFFECTKIT_SIMD_LEVEL caps).
struct Kernels {
  RowFn ip = &ip_scalar, l2 = &l2_scalar;
  Kernels() {
#ifdef AFFECTKIT_WALK_CODES_X86
    if (simd::level() >= 2) {
      ip = &ip_512;
      l2 = &l2_512;
    } else if (simd::level() == 1) {
      ip = &ip_avx2;
      l2 = &l2_avx2;
    }
#endif
  }
};
const Kernels& kernels() {
  static const Kernels k;
  return k;
}

}  // namespace

WalkCodes::WalkCodes(int64_t dim) : dim_(dim), stride_(round_up_64(dim)), lo_(dim, 0.f), step_(dim, 0.f) {}

namespace {
// Rows outside the ranges a graph of n rows tolerates: each costs the walk an exact score.
int64_t outside_limit(int64_t n) { return std::max<int64_t>(16, n / 100); }
}  // namespace

void WalkCodes::update(const void* rows, DType row_dtype, int64_t begin, int64_t end) {
  if (begin != rows_)
    throw ValueError("walk codes: expected rows from " + std::to_string(rows_) + ", got " + std::to_string(begin));
  if (end <= begin) return;
  if (view_) {  // codes in place (a mapped file) are read-only: own them before growing
    codes_.assign(view_, view_ + rows_ * stride_);
    view_ = nullptr;
  }
  codes_.resize(static_cast<size_t>(end * stride_));
  outside_.resize(static_cast<size_t>(end), 0);
  if (rows_ == 0) {
    derive_and_code(rows, row_dtype, end);
  } else {
    code_rows(rows, row_dtype, begin, end);
    if (n_outside_ > outside_limit(end)) derive_and_code(rows, row_dtype, end);  // the data drifted
  }
  rows_ = end;
}

void WalkCodes::derive_and_code(const void* rows, DType row_dtype, int64_t end) {
  // Each dimension's 1 and 99 % quantiles over at most kSample evenly spaced rows, the gap
  // between them widened by itself on each side, then narrowed to the rows' true min and max
  // where those lie inside: the exact ranges, unless a few far rows (under 1 %) would stretch
  // a dimension's 256 steps. Those fall outside, and the walk scores them on their rows. (Min-
  // max ranges let one row scaled by 1e4 take recall@10 from 0.985 to 0.118.) Where more than
  // the tolerated rows fall outside, the far values are no outliers: min-max ranges.
  constexpr int64_t kSample = 16384;
  const int64_t sample = std::min(end, kSample);
  const float inf = std::numeric_limits<float>::infinity();
  std::vector<float> mn(dim_, inf), mx(dim_, -inf);
  row_ranges(rows, row_dtype, dim_, 0, end, mn, mx);
  std::vector<float> cols(static_cast<size_t>(sample * dim_)), buf;  // column-major sample
  for (int64_t s = 0; s < sample; ++s) {
    const float* x = row_f32(rows, row_dtype, dim_, s * end / sample, buf);
    // (NaN, which the index refuses but the raw graph takes, would break nth_element's order)
    for (int64_t j = 0; j < dim_; ++j) cols[j * sample + s] = std::isnan(x[j]) ? 0.f : x[j];
  }
  const int64_t r_lo = sample / 100, r_hi = sample - 1 - sample / 100;
  for (int64_t j = 0; j < dim_; ++j) {
    float* c = cols.data() + j * sample;
    std::nth_element(c, c + r_lo, c + sample);
    const float q_lo = c[r_lo];
    std::nth_element(c, c + r_hi, c + sample);
    const float gap = finite_width(c[r_hi] - q_lo);
    const float lo = std::max(mn[j], q_lo - gap), hi = std::min(mx[j], c[r_hi] + gap);
    lo_[j] = lo;
    step_[j] = finite_width(hi - lo) / 255.f;
  }
  code_rows(rows, row_dtype, 0, end);
  if (n_outside_ <= outside_limit(end)) return;
  for (int64_t j = 0; j < dim_; ++j) {
    lo_[j] = mn[j];
    step_[j] = finite_width(mx[j] - mn[j]) / 255.f;
  }
  code_rows(rows, row_dtype, 0, end);
}

void WalkCodes::code_rows(const void* rows, DType row_dtype, int64_t begin, int64_t end) {
  std::vector<float> inv(dim_), hi(dim_);
  for (int64_t j = 0; j < dim_; ++j) {
    inv[j] = step_[j] > 0.f ? 1.f / step_[j] : 0.f;
    hi[j] = lo_[j] + 255.f * step_[j];
  }
  int64_t outside = 0;
#pragma omp parallel reduction(+ : outside)
  {
    std::vector<float> buf;
#pragma omp for schedule(static)
    for (int64_t i = begin; i < end; ++i) {
      const float* x = row_f32(rows, row_dtype, dim_, i, buf);
      uint8_t* c = codes_.data() + i * stride_;
      bool out = false;
      for (int64_t j = 0; j < dim_; ++j) {
        // past the range by more than half a step (rounding of lo + 255 step aside)
        out |= x[j] < lo_[j] - 0.5f * step_[j] || x[j] > hi[j] + 0.5f * step_[j];
        const float v = std::min(255.f, std::max(0.f, (x[j] - lo_[j]) * inv[j]));
        c[j] = static_cast<uint8_t>(static_cast<int>(v + 0.5f));
      }
      std::fill(c + dim_, c + stride_, uint8_t{0});
      outside += out ? 1 : 0;
      outside_[i] = out ? 1 : 0;
    }
  }
  // rows [begin, end) were coded again: recount those before begin
  int64_t before = 0;
  for (int64_t i = 0; i < begin; ++i) before += outside_[i];
  n_outside_ = before + outside;
}

void WalkCodes::assign(const uint8_t* codes, int64_t count, const float* lo, const float* step,
                       const uint8_t* outside, bool view) {
  check_dims_nonnegative("codes rows", count);
  check_pointer("codes", codes, count * stride_);
  check_pointer("lo", lo, dim_);
  check_pointer("step", step, dim_);
  check_pointer("outside", outside, count);
  for (int64_t j = 0; j < dim_; ++j) {
    if (!std::isfinite(lo[j]) || !std::isfinite(step[j]) || step[j] < 0.f)
      throw ValueError("walk codes: expected finite lo and step >= 0, got lo[" + std::to_string(j) +
                       "] = " + std::to_string(lo[j]) + ", step = " + std::to_string(step[j]));
  }
  lo_.assign(lo, lo + dim_);
  step_.assign(step, step + dim_);
  // The kernels load code rows with aligned loads: codes elsewhere are copied.
  if (view && reinterpret_cast<uintptr_t>(codes) % 64 == 0) {
    view_ = codes;
    codes_.clear();
    codes_.shrink_to_fit();
  } else {
    view_ = nullptr;
    codes_.assign(codes, codes + count * stride_);
  }
  outside_.resize(static_cast<size_t>(count));
  n_outside_ = 0;
  for (int64_t i = 0; i < count; ++i) {
    outside_[i] = outside[i] != 0;
    n_outside_ += outside_[i];
  }
  rows_ = count;
}

void WalkCodes::prepare(const float* q, Metric metric, Query& out) const {
  out.a.assign(stride_, 0.f);
  out.c0 = 0.f;
  if (metric == Metric::L2) {
    out.step.assign(stride_, 0.f);
    for (int64_t j = 0; j < dim_; ++j) {
      out.a[j] = q[j] - lo_[j];
      out.step[j] = step_[j];
    }
  } else {
    for (int64_t j = 0; j < dim_; ++j) {
      out.a[j] = q[j] * step_[j];
      out.c0 += q[j] * lo_[j];
    }
  }
}

void WalkCodes::score(const Query& q, Metric metric, const int32_t* v, size_t n, float* out) const {
  const Kernels& k = kernels();
  if (metric == Metric::L2) {
    for (size_t i = 0; i < n; ++i) out[i] = k.l2(q.a.data(), q.step.data(), row(v[i]), stride_);
    return;
  }
  // ip: -s; cosine: 1 - s (s = c0 + the kernel's sum)
  const float base = metric == Metric::Cosine ? 1.f : 0.f;
  for (size_t i = 0; i < n; ++i) out[i] = base - (q.c0 + k.ip(q.a.data(), nullptr, row(v[i]), stride_));
}

}  // namespace affectkit::knn
