// CPU path of graph_conv (forward, backward, fused with pooling) and the validated entry
// points that dispatch to CPU or CUDA.
//
// Each thread takes a contiguous run of samples and, per sample, runs two small products
// whose operands (A, W, one sample) stay in L1: (A x) W when F <= Fo, else A (x W), then the
// bias, the activation and (fused level) the pooling, writing each output element once.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <type_traits>
#include <vector>

#include "../core/dispatch.h"
#include "../core/transpose_avx512.h"
#include "graph.h"
#include "pool_kernels.h"
#include "small_gemm.h"

namespace affectkit::graph {
namespace detail {
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

// d[f] = g(f) * act'(y[f]): one branch-free loop per activation, so it vectorises (a
// data-dependent branch per element mispredicts half the time on ReLU). g(f) reads the
// gradient: a contiguous row, or one value for the whole row (a broadcast gradient, read
// without staging it: a masked vector load right after the stores that staged it waits for
// them, which made the broadcast case 40 % slower than a contiguous one).
template <typename T, typename G>
AK_INLINE void slope_times(const G& g, const T* __restrict y, T* __restrict d, int64_t n, Activation act) {
  switch (act) {
    case Activation::ReLU:
      for (int64_t f = 0; f < n; ++f) d[f] = y[f] > T(0) ? g(f) : T(0);
      break;
    case Activation::ELU:
      for (int64_t f = 0; f < n; ++f) d[f] = g(f) * (y[f] > T(0) ? T(1) : y[f] + T(1));
      break;
    case Activation::LeakyReLU:
      for (int64_t f = 0; f < n; ++f) d[f] = g(f) * (y[f] > T(0) ? T(1) : leaky_slope<T>());
      break;
    case Activation::Tanh:
      for (int64_t f = 0; f < n; ++f) d[f] = g(f) * (T(1) - y[f] * y[f]);
      break;
    case Activation::Sigmoid:
      for (int64_t f = 0; f < n; ++f) d[f] = g(f) * (y[f] * (T(1) - y[f]));
      break;
    default:
      for (int64_t f = 0; f < n; ++f) d[f] = g(f);
  }
}

// out[i, :Fo] = act(y[i, :Fo] + bias), one loop per activation so the simple ones vectorise.
template <typename T>
AK_INLINE void epilogue(const T* y, int64_t ldy, const T* bias, T* out, int64_t N, int64_t Fo,
                        Activation act) {
  for (int64_t i = 0; i < N; ++i) {
    const T* yi = y + i * ldy;
    T* oi = out + i * Fo;
    switch (act) {
      case Activation::None:
        for (int64_t f = 0; f < Fo; ++f) oi[f] = yi[f] + bias[f];
        break;
      case Activation::ReLU:
        for (int64_t f = 0; f < Fo; ++f) oi[f] = std::max(yi[f] + bias[f], T(0));
        break;
      case Activation::LeakyReLU:
        for (int64_t f = 0; f < Fo; ++f) {
          const T v = yi[f] + bias[f];
          oi[f] = v > T(0) ? v : v * leaky_slope<T>();
        }
        break;
      default:
        for (int64_t f = 0; f < Fo; ++f) oi[f] = activate(yi[f] + bias[f], act);
    }
  }
}

#if defined(__x86_64__) && defined(__GNUC__)
#define AK_GRAPH_AVX512_TILES 1
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // GCC's false positive in the intrinsics
#pragma GCC diagnostic ignored "-Wuninitialized"  // the same, for the unpack intrinsics' undefined operand
// acc[f] = sum_t coef[t * ct + f * cf] * src[t * ld] (16 lanes) for f < kF, t < T: the one
// product shape of the tile kernels below (kF accumulators, one vector load per t).
template <int kF>
__attribute__((target("avx512f"), always_inline)) inline void combine_rows_avx512(
    int64_t T, const float* src, int64_t ld, const float* coef, int64_t ct, int64_t cf, __m512 acc[kF]) {
  for (int f = 0; f < kF; ++f) acc[f] = _mm512_setzero_ps();
  for (int64_t t = 0; t < T; ++t) {
    const __m512 v = _mm512_loadu_ps(src + t * ld);
    for (int f = 0; f < kF; ++f) acc[f] = _mm512_fmadd_ps(_mm512_set1_ps(coef[t * ct + f * cf]), v, acc[f]);
  }
}

// grad_x and grad_A of one sample for small graphs and few input features (N <= 64, F <= 16;
// float, AVX-512), on transposed tiles. The general route computes H = gp W^T with a row's F
// outputs in the vector lanes (5 of 16 lanes busy at F = 5, each FMA behind a scalar
// broadcast); here the lanes hold 16 nodes: gpT = gp^T (register transposes) and
// HT[f] = sum_o W[f, o] gpT[o]. Then, when asked for:
//   grad_x = A^T H:  gxT[f] = sum_i HT[f][i] A[i, :], transposed back into gx's rows;
//   grad_A += H x^T: row i of ga_acc += sum_f HT[f][i] x[:, f] (x's columns by transposes).
// gp: (N, ldg); w: (F, Fo); arows: (N, Np), Np = N rounded up to 16, A's rows zero past
// column N; x: (N, kF); gx: (N, kF) or null; ga_acc: (N, Np) or null; scratch:
// (round_up(Fo, 16) + 16) * Np floats.
template <int kF>
__attribute__((target("avx512f"))) void small_grad_xa_avx512(const float* gp, int64_t ldg, int64_t Fo,
                                                             const float* w, const float* arows,
                                                             int64_t N, const float* x, float* gx,
                                                             float* ga_acc, float* scratch) {
  const int64_t Np = (N + 15) / 16 * 16;
  float* gpT = scratch;                             // (Fo, Np)
  float* ht_rows = scratch + (Fo + 15) / 16 * 16 * Np;  // (kF, Np)
  for (int64_t n0 = 0; n0 < Np; n0 += 16) {
    for (int64_t o0 = 0; o0 < Fo; o0 += 16) {
      const int64_t ow = std::min<int64_t>(16, Fo - o0);
      const __mmask16 omask = static_cast<__mmask16>((1u << ow) - 1u);
      __m512 r[16];
      for (int i = 0; i < 16; ++i)
        r[i] = n0 + i < N ? _mm512_maskz_loadu_ps(omask, gp + (n0 + i) * ldg + o0) : _mm512_setzero_ps();
      transpose16x16_avx512(r);
      for (int64_t c = 0; c < ow; ++c) _mm512_storeu_ps(gpT + (o0 + c) * Np + n0, r[c]);
    }
    __m512 ht[kF];
    combine_rows_avx512<kF>(Fo, gpT + n0, Np, w, 1, Fo, ht);
    for (int f = 0; f < kF; ++f) _mm512_storeu_ps(ht_rows + f * Np + n0, ht[f]);
  }
  constexpr __mmask16 fmask = static_cast<__mmask16>((1u << kF) - 1u);
  for (int64_t j0 = 0; j0 < Np; j0 += 16) {
    __m512 t[16];
    if (gx) {
      for (int f = kF; f < 16; ++f) t[f] = _mm512_setzero_ps();
      combine_rows_avx512<kF>(N, arows + j0, Np, ht_rows, 1, Np, t);
      transpose16x16_avx512(t);
      for (int64_t j = 0; j < 16 && j0 + j < N; ++j) _mm512_mask_storeu_ps(gx + (j0 + j) * kF, fmask, t[j]);
    }
    if (ga_acc) {
      for (int j = 0; j < 16; ++j)
        t[j] = j0 + j < N ? _mm512_maskz_loadu_ps(fmask, x + (j0 + j) * kF) : _mm512_setzero_ps();
      transpose16x16_avx512(t);  // t[f] = x[j0:j0+16, f]
      for (int64_t i = 0; i < N; ++i) {
        __m512 acc = _mm512_loadu_ps(ga_acc + i * Np + j0);
        for (int f = 0; f < kF; ++f) acc = _mm512_fmadd_ps(_mm512_set1_ps(ht_rows[f * Np + i]), t[f], acc);
        _mm512_storeu_ps(ga_acc + i * Np + j0, acc);
      }
    }
  }
}

template <int kF = 1>
void small_grad_xa(int64_t F, const float* gp, int64_t ldg, int64_t Fo, const float* w,
                   const float* arows, int64_t N, const float* x, float* gx, float* ga_acc, float* scratch) {
  if constexpr (kF < 16) {
    if (F != kF) return small_grad_xa<kF + 1>(F, gp, ldg, Fo, w, arows, N, x, gx, ga_acc, scratch);
  }
  small_grad_xa_avx512<kF>(gp, ldg, Fo, w, arows, N, x, gx, ga_acc, scratch);
}

// grad_W of one sample for the same shapes: gw_acc (kF, Fop) += Z^T gp with Z = A x, Z's
// columns computed 16 nodes per vector (as in the forward) and each gp row vector scaled by
// broadcasts of Z. x: (N, kF); at_rows: (N, Np), row j = A[:, j]; gp: (N, Fop);
// scratch: 16 * Np floats.
template <int kF>
__attribute__((target("avx512f"))) void small_grad_w_avx512(const float* x, const float* at_rows,
                                                            const float* gp, int64_t Fop, int64_t N,
                                                            float* gw_acc, float* scratch) {
  const int64_t Np = (N + 15) / 16 * 16;
  __m512 acc[kF];
  for (int64_t n0 = 0; n0 < Np; n0 += 16) {
    combine_rows_avx512<kF>(N, at_rows + n0, Np, x, kF, 1, acc);
    for (int f = 0; f < kF; ++f) _mm512_storeu_ps(scratch + f * Np + n0, acc[f]);
  }
  for (int64_t o0 = 0; o0 < Fop; o0 += 16) {
    combine_rows_avx512<kF>(N, gp + o0, Fop, scratch, 1, Np, acc);
    for (int f = 0; f < kF; ++f) {
      float* dst = gw_acc + f * Fop + o0;
      _mm512_storeu_ps(dst, _mm512_add_ps(_mm512_loadu_ps(dst), acc[f]));
    }
  }
}

template <int kF = 1>
void small_grad_w(int64_t F, const float* x, const float* at_rows, const float* gp, int64_t Fop,
                  int64_t N, float* gw_acc, float* scratch) {
  if constexpr (kF < 16) {
    if (F != kF) return small_grad_w<kF + 1>(F, x, at_rows, gp, Fop, N, gw_acc, scratch);
  }
  small_grad_w_avx512<kF>(x, at_rows, gp, Fop, N, gw_acc, scratch);
}

// The small forward's epilogue when it is piecewise linear (none, ReLU, leaky ReLU): out =
// act(y + bias) written straight from registers, negative values scaled by negative_slope.
struct Fused {
  const float* bias;  // (Fop), zero-padded
  float* out;         // this sample's (N, Fo) output
  int64_t Fo;
  float negative_slope;
};

__attribute__((target("avx512f"), always_inline)) inline void finish_row(const Fused* fused, __mmask16 omask,
                                                                          float* y, int64_t Fop, int64_t row,
                                                                          int64_t o0, __m512 v) {
  if (!fused) return _mm512_storeu_ps(y + row * Fop + o0, v);
  const __mmask16 neg = _mm512_cmp_ps_mask(v, _mm512_setzero_ps(), _CMP_LT_OQ);
  v = _mm512_mask_mul_ps(v, neg, v, _mm512_set1_ps(fused->negative_slope));
  _mm512_mask_storeu_ps(fused->out + row * fused->Fo + o0, omask, v);
}

// The forward for the same small shapes (N <= 64, F <= 16, with W; float, AVX-512), one sample:
// y = (A x) W with 16 nodes per vector for A x (ZT[f] = sum_j x[j, f] A[:, j]), then each
// output row from broadcasts of Z[i, f] against W's rows. No packing of samples side by side
// and no half-empty lanes. x: (N, kF); at_rows: (N, Np), row j = A[:, j], zero past N;
// wp: (kF, Fop) zero-padded; y: (N, Fop); scratch: 16 * Np floats.
template <int kF>
__attribute__((target("avx512f"))) void small_forward_avx512(const float* x, const float* at_rows,
                                                             const float* wp, int64_t Fop, int64_t N,
                                                             float* y, float* scratch, const Fused* fused) {
  const int64_t Np = (N + 15) / 16 * 16;
  for (int64_t n0 = 0; n0 < Np; n0 += 16) {
    __m512 zt[kF];
    combine_rows_avx512<kF>(N, at_rows + n0, Np, x, kF, 1, zt);
    for (int f = 0; f < kF; ++f) _mm512_storeu_ps(scratch + f * Np + n0, zt[f]);
  }
  // Four rows at a time: four independent FMA chains, each W vector loaded once for them.
  // Fused: start from the bias, apply the activation and store into the output row (Fo wide);
  // otherwise store the product into y (Fop wide) for the general epilogue.
  for (int64_t o0 = 0; o0 < Fop; o0 += 16) {
    const __m512 init = fused ? _mm512_loadu_ps(fused->bias + o0) : _mm512_setzero_ps();
    const __mmask16 omask =
        fused ? static_cast<__mmask16>((1u << std::min<int64_t>(16, fused->Fo - o0)) - 1u) : 0;
    int64_t i = 0;
    for (; i + 4 <= N; i += 4) {
      __m512 acc[4] = {init, init, init, init};
      for (int f = 0; f < kF; ++f) {
        const __m512 w = _mm512_loadu_ps(wp + f * Fop + o0);
        for (int r = 0; r < 4; ++r) acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(scratch[f * Np + i + r]), w, acc[r]);
      }
      for (int r = 0; r < 4; ++r) finish_row(fused, omask, y, Fop, i + r, o0, acc[r]);
    }
    for (; i < N; ++i) {
      __m512 acc = init;
      for (int f = 0; f < kF; ++f)
        acc = _mm512_fmadd_ps(_mm512_set1_ps(scratch[f * Np + i]), _mm512_loadu_ps(wp + f * Fop + o0), acc);
      finish_row(fused, omask, y, Fop, i, o0, acc);
    }
  }
}

template <int kF = 1>
void small_forward(int64_t F, const float* x, const float* at_rows, const float* wp, int64_t Fop,
                   int64_t N, float* y, float* scratch, const Fused* fused) {
  if constexpr (kF < 16) {
    if (F != kF) return small_forward<kF + 1>(F, x, at_rows, wp, Fop, N, y, scratch, fused);
  }
  small_forward_avx512<kF>(x, at_rows, wp, Fop, N, y, scratch, fused);
}
#pragma GCC diagnostic pop
#endif

template <typename T>
struct ForwardArgs {
  const T* x;
  const T* adj;
  const T* w;     // (F, Fo) or null
  const T* bias;  // (Fo) or null
  T* out;
  int64_t N, F, Fo, R;  // R samples share one adjacency
  Activation act;
  bool check_each_graph;       // per-sample adjacency: check it for NaN where it is read
  int64_t* first_bad_graph;    // this thread's first non-finite graph, or -1
  const Children* kids;        // fused pooling, or null
  const T* scores;             // (S, N) or null
  T* pooled;                   // (S, P, Fo)
  int64_t P;
};

template <typename T, int VB>
AK_INLINE void forward_range_impl(const ForwardArgs<T>& a, int64_t s0, int64_t s1) {
  constexpr int64_t L = Vec<T, VB>::lanes;
  const int64_t N = a.N, F = a.F, Fo = a.Fo;
  const int64_t Fp = round_up(F, L), Fop = round_up(Fo, L);
  const bool has_w = a.w != nullptr, a_first = Fp <= Fop;
  // Small graphs with few features take the transposed-tile forward on AVX-512 (float).
  bool small_fwd = false;
#ifdef AK_GRAPH_AVX512_TILES
  if constexpr (VB == 64 && std::is_same_v<T, float>) small_fwd = has_w && F >= 1 && F <= 16 && N <= 64;
#endif
  const bool fused_epilogue = small_fwd && (a.act == Activation::None || a.act == Activation::ReLU ||
                                            a.act == Activation::LeakyReLU);
  const int64_t Np16 = round_up(N, 16);
  std::vector<T> at_rows(small_fwd ? N * Np16 : 0), scratch(small_fwd ? 16 * Np16 : 0);
  // With few features, G samples that share a graph sit side by side in one padded row, so
  // the product with A fills the vector lanes instead of multiplying zero padding.
  const int64_t G = small_fwd ? 1 : (!has_w || a_first) && F > 0 ? std::max<int64_t>(1, Fp / F) : 1;
  std::vector<T> wp(has_w ? F * Fop : 0), xs(N * Fp), tmp(N * std::max(Fp, Fop)), y(N * Fop);
  std::vector<T> bias(Fop, T(0)), w_pool(N);
  if (has_w) copy_padded(a.w, F, Fo, Fo, wp.data(), Fop);
  if (a.bias) std::copy(a.bias, a.bias + Fo, bias.begin());
  for (int64_t s = s0, g = 1; s < s1; s += g) {
    g = std::min({G, s1 - s, a.R - s % a.R});  // a group never crosses into another graph
    const int64_t graph = s / a.R;
    const T* A = a.adj + graph * N * N;
    if (a.check_each_graph && (s == s0 || s % a.R == 0) && *a.first_bad_graph < 0 &&
        !all_finite(A, N * N))
      *a.first_bad_graph = graph;
    const T* xg = a.x + s * N * F;
#ifdef AK_GRAPH_AVX512_TILES
    if constexpr (VB == 64 && std::is_same_v<T, float>)
      if (small_fwd) {
        if (s == s0 || s % a.R == 0) transpose_padded(A, N, N, N, at_rows.data(), Np16);  // a new graph
        const Fused fused{bias.data(), a.out + s * N * Fo, Fo,
                          a.act == Activation::ReLU ? 0.0f : a.act == Activation::LeakyReLU ? leaky_slope<float>() : 1.0f};
        small_forward(F, xg, at_rows.data(), wp.data(), Fop, N, y.data(), scratch.data(),
                      fused_epilogue ? &fused : nullptr);
      }
#endif
    if (!small_fwd) {
      for (int64_t i = 0; i < N; ++i) {  // xs[i] = [x[s][i] | x[s+1][i] | ... | 0 ...]
        T* d = xs.data() + i * Fp;
        int64_t c = 0;
        for (int64_t k = 0; k < g; ++k)
          for (int64_t f = 0; f < F; ++f) d[c++] = xg[(k * N + i) * F + f];
        for (; c < Fp; ++c) d[c] = T(0);
      }
      if (!has_w) {
        gemm<T, VB, false>(N, Fp, N, A, N, xs.data(), Fp, y.data(), Fp);
      } else if (a_first) {
        gemm<T, VB, false>(N, Fp, N, A, N, xs.data(), Fp, tmp.data(), Fp);
      } else {
        gemm<T, VB, false>(N, Fop, F, xs.data(), Fp, wp.data(), Fop, tmp.data(), Fop);
        gemm<T, VB, false>(N, Fop, N, A, N, tmp.data(), Fop, y.data(), Fop);
      }
    }
    for (int64_t k = 0; k < g; ++k) {
      const T* yk = y.data();
      int64_t ldy = Fop;
      if (!has_w) {
        yk = y.data() + k * F, ldy = Fp;
      } else if (a_first && !small_fwd) {
        gemm<T, VB, false>(N, Fop, F, tmp.data() + k * F, Fp, wp.data(), Fop, y.data(), Fop);
      }
      T* o = a.out + (s + k) * N * Fo;
      if (!fused_epilogue) epilogue(yk, ldy, bias.data(), o, N, Fo, a.act);
      if (a.kids)
        pool_sample(o, Fo, a.scores ? a.scores + (s + k) * N : nullptr, *a.kids,
                    a.pooled + (s + k) * a.P * Fo, Fo, a.P, w_pool.data());
    }
  }
}
AK_GRAPH_MULTIVERSION(forward_range, ForwardArgs)


template <typename T>
struct BackwardArgs {
  const T* g;    // grad_out (S, N, Fo), element strides gs, gn, gf
  const T* y;    // forward output (S, N, Fo)
  const T* x;
  const T* adj;
  const T* w;
  T* gx;         // (S, N, F) or null
  T* gA;         // per-sample: (B, N, N); shared: this thread's (N, N) partial; or null
  T* gW;         // this thread's (F, Fo) partial, or null
  T* gb;         // this thread's (Fo) partial, or null
  int64_t N, F, Fo, R;
  Activation act;
  bool per_sample;  // one graph per R samples, gA written per graph (else accumulated)
  int64_t gs, gn, gf;
};

template <typename T, int VB>
AK_INLINE void backward_range_impl(const BackwardArgs<T>& a, int64_t s0, int64_t s1) {
  constexpr int64_t L = Vec<T, VB>::lanes;
  const int64_t N = a.N, F = a.F, Fo = a.Fo;
  const int64_t Fp = round_up(F, L), Fop = round_up(Fo, L), Np = round_up(N, L);
  const bool has_w = a.w != nullptr;
  // grad_W = sum_s (A x_s)^T g_s (route 1, N^2 F flops) or x_s^T (A^T g_s) (N^2 Fo flops).
  const bool w_route1 = Fp <= Fop;
  // As in the forward pass, G samples sharing a graph sit side by side in the F-wide products.
  const int64_t G = F > 0 ? std::max<int64_t>(1, Fp / F) : 1;
  // With grad_x and grad_W both wanted (and not grad_A), M = A^T gp serves both: cheaper
  // unless the features are few enough that grouping makes the A products nearly free.
  // Small graphs with few features take the transposed-tile grad_x on AVX-512 (float).
  bool small = false;
#ifdef AK_GRAPH_AVX512_TILES
  if constexpr (VB == 64 && std::is_same_v<T, float>) small = has_w && N <= 64 && F >= 1 && F <= 16;
#endif
  const bool small_gx = small && (a.gx || a.gA);  // grad_x and grad_A on tiles
  const int64_t Np16 = round_up(N, 16);
  const bool m_route = !small && has_w && a.gx && a.gW && !a.gA && Fop * G < 2 * Fp;
  const bool small_gw = small && a.gW;
  std::vector<T> arows(small_gx ? N * Np16 : 0, T(0)), scratch(small_gx ? (Fop + 16) * Np16 : 0);
  std::vector<T> at_rows(small_gw ? N * Np16 : 0), scratch_w(small_gw ? 16 * Np16 : 0);
  std::vector<T> wT(has_w ? Fo * Fp : 0), gp(G * N * Fop), Ht(G * N * Fp), Hcat(N * Fp, T(0));
  std::vector<T> gxcat(N * Fp), xcat(N * Fp), Zcat(N * Fp), xT(a.gA ? F * Np : 0), M(N * Fop);
  std::vector<T> gAacc(a.gA ? N * Np : 0), gWacc(a.gW ? F * Fop : 0, T(0)), gbacc(Fop, T(0));
  std::vector<T> grow_buf(a.gf > 1 ? Fo : 0);
  if (has_w) transpose_padded(a.w, F, Fo, Fo, wT.data(), Fp);
  const T* A = nullptr;
  for (int64_t s = s0, g = 1; s < s1; s += g) {
    g = std::min({G, s1 - s, a.R - s % a.R});  // a group never crosses into another graph
    const int64_t grp = s / a.R;
    if (s == s0 || s % a.R == 0) {  // a new graph begins
      A = a.adj + grp * N * N;
      std::fill(gAacc.begin(), gAacc.end(), T(0));
      if (small_gx) copy_padded(A, N, N, N, arows.data(), Np16);
      if (small_gw) transpose_padded(A, N, N, N, at_rows.data(), Np16);
    }
    // gp[k] = grad_out * act'(out), zero-padded to Fop columns (strided rows gathered first).
    for (int64_t k = 0; k < g; ++k) {
      const T* gs = a.g + (s + k) * a.gs;
      const T* ys = a.y + (s + k) * N * Fo;
      for (int64_t i = 0; i < N; ++i) {
        T* d = gp.data() + (k * N + i) * Fop;
        const T* grow = gs + i * a.gn;
        if (a.gf == 0) {  // one value for the row (sum()'s gradient, a broadcast)
          const T c = *grow;
          slope_times<T>([c](int64_t) { return c; }, ys + i * Fo, d, Fo, a.act);
        } else {
          if (a.gf != 1) {  // gathered into a contiguous row first
            for (int64_t f = 0; f < Fo; ++f) grow_buf[f] = grow[f * a.gf];
            grow = grow_buf.data();
          }
          const T* __restrict gr = grow;
          slope_times<T>([gr](int64_t f) { return gr[f]; }, ys + i * Fo, d, Fo, a.act);
        }
        for (int64_t f = Fo; f < Fop; ++f) d[f] = T(0);
      }
    }
    if (a.gb) add_column_sums<T, VB>(gp.data(), g * N, Fop, gbacc.data());
    if (m_route) {  // M = A^T gp, grad_x = M W^T, grad_W += x^T M: three products, not four
      for (int64_t k = 0; k < g; ++k) {
        const T* xk = a.x + (s + k) * N * F;
        gemm_strided<T, VB, false>(N, Fop, N, A, 1, N, gp.data() + k * N * Fop, Fop, M.data(), Fop);
        gemm<T, VB, false>(N, Fp, Fo, M.data(), Fop, wT.data(), Fp, gxcat.data(), Fp);
        gemm_strided<T, VB, true>(F, Fop, N, xk, 1, F, M.data(), Fop, gWacc.data(), Fop);
        T* dst = a.gx + (s + k) * N * F;
        for (int64_t i = 0; i < N; ++i)
          for (int64_t f = 0; f < F; ++f) dst[i * F + f] = gxcat[i * Fp + f];
      }
      continue;  // no grad_A on this route (it needs H = gp W^T)
    }
#ifdef AK_GRAPH_AVX512_TILES
    if constexpr (VB == 64 && std::is_same_v<T, float>)
      if (small)
        for (int64_t k = 0; k < g; ++k) {
          if (small_gx)
            small_grad_xa(F, gp.data() + k * N * Fop, Fop, Fo, a.w, arows.data(), N, a.x + (s + k) * N * F,
                          a.gx ? a.gx + (s + k) * N * F : nullptr, a.gA ? gAacc.data() : nullptr,
                          scratch.data());
          if (small_gw)
            small_grad_w(F, a.x + (s + k) * N * F, at_rows.data(), gp.data() + k * N * Fop, Fop, N,
                         gWacc.data(), scratch_w.data());
        }
#endif
    // Hcat[:, kF:(k+1)F] = gp[k] W^T: the gradient with respect to A x_{s+k}.
    if (!small_gx && (a.gx || a.gA)) {
      const T* Hs = gp.data();  // the group's gp rows are stacked: one product for all
      int64_t ldh = Fop;
      if (has_w) {
        gemm<T, VB, false>(g * N, Fp, Fo, gp.data(), Fop, wT.data(), Fp, Ht.data(), Fp);
        Hs = Ht.data(), ldh = Fp;
      }
      for (int64_t k = 0; k < g; ++k)
        for (int64_t i = 0; i < N; ++i)
          for (int64_t f = 0; f < F; ++f) Hcat[i * Fp + k * F + f] = Hs[(k * N + i) * ldh + f];
      for (int64_t i = 0; i < N; ++i)
        for (int64_t c = g * F; c < Fp; ++c) Hcat[i * Fp + c] = T(0);
    }
    if (a.gx && !small_gx) {  // grad_x = A^T H for the whole group (A^T read in place)
      gemm_strided<T, VB, false>(N, Fp, N, A, 1, N, Hcat.data(), Fp, gxcat.data(), Fp);
      for (int64_t k = 0; k < g; ++k) {
        T* dst = a.gx + (s + k) * N * F;
        for (int64_t i = 0; i < N; ++i)
          for (int64_t f = 0; f < F; ++f) dst[i * F + f] = gxcat[i * Fp + k * F + f];
      }
    }
    if (a.gA && !small_gx)  // grad_A += H_k x_k^T
      for (int64_t k = 0; k < g; ++k) {
        transpose_padded(a.x + (s + k) * N * F, N, F, F, xT.data(), Np);
        gemm<T, VB, true>(N, Np, F, Hcat.data() + k * F, Fp, xT.data(), Np, gAacc.data(), Np);
      }
    if (a.gW && !small_gw) {
      if (w_route1) {  // Z = A x for the group, then grad_W += Z_k^T gp_k (Z^T read in place)
        const T* xg = a.x + s * N * F;
        for (int64_t i = 0; i < N; ++i) {
          T* d = xcat.data() + i * Fp;
          int64_t c = 0;
          for (int64_t k = 0; k < g; ++k)
            for (int64_t f = 0; f < F; ++f) d[c++] = xg[(k * N + i) * F + f];
          for (; c < Fp; ++c) d[c] = T(0);
        }
        gemm<T, VB, false>(N, Fp, N, A, N, xcat.data(), Fp, Zcat.data(), Fp);
        for (int64_t k = 0; k < g; ++k)
          gemm_strided<T, VB, true>(F, Fop, N, Zcat.data() + k * F, 1, Fp,
                                    gp.data() + k * N * Fop, Fop, gWacc.data(), Fop);
      } else {  // M = A^T gp_k, then grad_W += x_k^T M (both transposes read in place)
        for (int64_t k = 0; k < g; ++k) {
          gemm_strided<T, VB, false>(N, Fop, N, A, 1, N, gp.data() + k * N * Fop, Fop, M.data(), Fop);
          gemm_strided<T, VB, true>(F, Fop, N, a.x + (s + k) * N * F, 1, F, M.data(), Fop,
                                    gWacc.data(), Fop);
        }
      }
    }
    if (a.gA && (s + g == s1 || (s + g) % a.R == 0)) {  // the graph ends: flush its gradient
      T* dst = a.gA + (a.per_sample ? grp * N * N : 0);
      for (int64_t i = 0; i < N; ++i) {
        const T* src = gAacc.data() + i * Np;
        if (a.per_sample) std::copy(src, src + N, dst + i * N);
        else for (int64_t j = 0; j < N; ++j) dst[i * N + j] += src[j];
      }
    }
  }
  if (a.gW)
    for (int64_t k = 0; k < F; ++k)
      for (int64_t f = 0; f < Fo; ++f) a.gW[k * Fo + f] += gWacc[k * Fop + f];
  if (a.gb)
    for (int64_t f = 0; f < Fo; ++f) a.gb[f] += gbacc[f];
}
AK_GRAPH_MULTIVERSION(backward_range, BackwardArgs)

template <typename T>
void forward(const T* x, const T* adj, const T* w, const T* bias, T* out, int64_t S, int64_t N,
             int64_t F, int64_t Fo, int64_t B, Activation act, const int64_t* assignment,
             const T* scores, T* pooled, int64_t P) {
  if (S == 0) return;
  if (B == 1 && !all_finite(adj, N * N))
    throw ValueError("adjacency: expected finite values, got NaN or infinity");
  const Children kids = assignment ? build_children(assignment, N, P) : Children{};
  const int nt = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(omp_get_max_threads(), S)));
  std::vector<int64_t> bad(nt, -1);
  const int level = simd_level();
#pragma omp parallel num_threads(nt)
  {
    const int t = omp_get_thread_num(), n = omp_get_num_threads();
    ForwardArgs<T> a{x, adj, w, bias, out, N, F, Fo, S / B, act, B > 1, &bad[t],
                     assignment ? &kids : nullptr, scores, pooled, P};
    int64_t s0, s1;
    thread_range(S, t, n, &s0, &s1);
    forward_range(level, a, s0, s1);
  }
  for (int64_t g : bad)
    if (g >= 0)
      throw ValueError("adjacency: expected finite values, got NaN or infinity in adjacency[" +
                       std::to_string(g) + "]");
}

template <typename T>
void backward(const T* g, const int64_t* gstrides, const T* y, const T* x, const T* adj, const T* w, T* gx,
              T* gA, T* gW, T* gb, int64_t S, int64_t N, int64_t F, int64_t Fo, int64_t B, Activation act) {
  if (S == 0) {  // nothing flows back: every requested gradient is zero
    if (gA) std::fill(gA, gA + B * N * N, T(0));
    if (gW) std::fill(gW, gW + F * Fo, T(0));
    if (gb) std::fill(gb, gb + Fo, T(0));
    return;
  }
  const bool per_sample = B > 1;
  // Per-sample graphs are split between threads graph by graph, so each gA[b] has one writer.
  const int64_t units = per_sample ? B : S, R = S / B;
  const int nt = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(omp_get_max_threads(), units)));
  std::vector<T> partA(gA && !per_sample ? nt * N * N : 0, T(0));
  std::vector<T> partW(gW ? nt * F * Fo : 0, T(0)), partb(gb ? nt * Fo : 0, T(0));
  const int level = simd_level();
#pragma omp parallel num_threads(nt)
  {
    const int t = omp_get_thread_num(), n = omp_get_num_threads();
    BackwardArgs<T> a{g, y, x, adj, w, gx,
                      gA ? (per_sample ? gA : partA.data() + t * N * N) : nullptr,
                      gW ? partW.data() + t * F * Fo : nullptr,
                      gb ? partb.data() + t * Fo : nullptr, N, F, Fo, R, act, per_sample,
                      gstrides ? gstrides[0] : N * Fo, gstrides ? gstrides[1] : Fo, gstrides ? gstrides[2] : 1};
    int64_t u0, u1;
    thread_range(units, t, n, &u0, &u1);
    if (per_sample) u0 *= R, u1 *= R;
    backward_range(level, a, u0, u1);
  }
  // Sum the per-thread partials in thread order (deterministic for a thread count).
  auto reduce = [nt](const std::vector<T>& parts, T* dst, int64_t size) {
    std::fill(dst, dst + size, T(0));
    for (int t = 0; t < nt; ++t)
      for (int64_t i = 0; i < size; ++i) dst[i] += parts[t * size + i];
  };
  if (gA && !per_sample) reduce(partA, gA, N * N);
  if (gW) reduce(partW, gW, F * Fo);
  if (gb) reduce(partb, gb, Fo);
}

}  // namespace

void graph_conv_forward_cpu(DType dtype, const void* x, const void* adj, const void* w,
                            const void* bias, void* out, int64_t S, int64_t N, int64_t F,
                            int64_t Fo, int64_t B, Activation act, const int64_t* assignment,
                            const void* scores, void* pooled, int64_t P) {
  AFFECTKIT_DISPATCH_CPU_FLOAT(dtype, "x", T, [&] {
    forward(static_cast<const T*>(x), static_cast<const T*>(adj), static_cast<const T*>(w),
            static_cast<const T*>(bias), static_cast<T*>(out), S, N, F, Fo, B, act, assignment,
            static_cast<const T*>(scores), static_cast<T*>(pooled), P);
  });
}

void graph_conv_backward_cpu(DType dtype, const void* g, const int64_t* gstrides, const void* y,
                             const void* x, const void* adj, const void* w, void* gx, void* gA,
                             void* gW, void* gb, int64_t S, int64_t N, int64_t F, int64_t Fo, int64_t B,
                             Activation act) {
  AFFECTKIT_DISPATCH_CPU_FLOAT(dtype, "grad_out", T, [&] {
    backward(static_cast<const T*>(g), gstrides, static_cast<const T*>(y), static_cast<const T*>(x),
             static_cast<const T*>(adj), static_cast<const T*>(w), static_cast<T*>(gx),
             static_cast<T*>(gA), static_cast<T*>(gW), static_cast<T*>(gb), S, N, F, Fo, B, act);
  });
}

}  // namespace detail

namespace {

void validate_conv(const char* fn, Device device, const void* x, const void* adj,
                   const void* weight, int64_t S, int64_t N, int64_t F, int64_t Fo, int64_t B) {
  check_dims_nonnegative("S", S);
  check_dims_nonnegative("N", N);
  check_dims_nonnegative("F", F);
  check_dims_nonnegative("Fo", Fo);
  if (B < 1) throw ValueError("B: expected at least one adjacency, got " + std::to_string(B));
  if (S % B != 0)
    throw ValueError("adjacency: expected the number of graphs B to divide the number of samples S = " +
                     std::to_string(S) + ", got B = " + std::to_string(B));
  if (!weight && Fo != F)
    throw ValueError("Fo: expected Fo == F = " + std::to_string(F) + " without a weight, got " +
                     std::to_string(Fo));
  check_pointer("x", x, S * N * F);
  check_pointer("adjacency", adj, B * N * N);
  if (device == Device::CUDA) check_cuda_compiled(fn);
}

}  // namespace

void graph_conv_forward(Device device, DType dtype, const void* x, const void* adjacency,
                        const void* weight, const void* bias, void* out, int64_t S, int64_t N,
                        int64_t F, int64_t Fo, int64_t B, int32_t activation, uintptr_t stream) {
  graph_conv_pool_forward(device, dtype, x, adjacency, weight, bias, nullptr, nullptr, out,
                          nullptr, S, N, F, Fo, B, 0, activation, stream);
}

void graph_conv_pool_forward(Device device, DType dtype, const void* x, const void* adjacency,
                             const void* weight, const void* bias, const int64_t* assignment,
                             const void* scores, void* node_out, void* pooled, int64_t S,
                             int64_t N, int64_t F, int64_t Fo, int64_t B, int64_t P,
                             int32_t activation, uintptr_t stream) {
  const Activation act = activation_from_code(activation, "activation");
  validate_conv("graph_conv_forward", device, x, adjacency, weight, S, N, F, Fo, B);
  check_pointer("out", node_out, S * N * Fo);
  check_dims_nonnegative("P", P);
  if (assignment) {
    check_pointer("pooled", pooled, S * P * Fo);
    if (device == Device::CPU) detail::check_assignment_values(assignment, N, P);
  }
  (void)stream;
  if (device == Device::CUDA) {
#ifdef AFFECTKIT_WITH_CUDA
    detail::graph_conv_forward_cuda(dtype, x, adjacency, weight, bias, node_out, S, N, F, Fo, B,
                                    act, assignment, scores, pooled, P, stream);
#endif
    return;
  }
  detail::graph_conv_forward_cpu(dtype, x, adjacency, weight, bias, node_out, S, N, F, Fo, B, act,
                                 assignment, scores, pooled, P);
}

void graph_conv_backward(Device device, DType dtype, const void* grad_out, const void* out,
                         const void* x, const void* adjacency, const void* weight, void* grad_x,
                         void* grad_adjacency, void* grad_weight, void* grad_bias, int64_t S,
                         int64_t N, int64_t F, int64_t Fo, int64_t B, int32_t activation,
                         uintptr_t stream, const int64_t* grad_out_strides) {
  const Activation act = activation_from_code(activation, "activation");
  validate_conv("graph_conv_backward", device, x, adjacency, weight, S, N, F, Fo, B);
  if (grad_out_strides) {
    const int64_t dims[3] = {S, N, Fo};
    for (int d = 0; d < 3; ++d) {
      const int64_t st = grad_out_strides[d];
      if (st < 0 || (dims[d] > 1 && st > (int64_t{1} << 50) / dims[d]))  // extent stays far from overflow
        throw ValueError("grad_out_strides: expected element strides in [0, 2^50 / size] for a grad_out of "
                         "shape (" + std::to_string(S) + ", " + std::to_string(N) + ", " + std::to_string(Fo) +
                         "), got " + std::to_string(st) + " for dimension " + std::to_string(d));
    }
  }
  check_pointer("grad_out", grad_out, S * N * Fo);
  check_pointer("out", out, S * N * Fo);
  if (grad_weight && !weight)
    throw ValueError("grad_weight: expected null without a weight, got a pointer");
  (void)stream;
  if (device == Device::CUDA)
    throw ValueError("device: expected CPU, got CUDA: graph_conv_backward has no CUDA kernel "
                     "(affectkit.ops computes it with PyTorch operations on CUDA)");
  detail::graph_conv_backward_cpu(dtype, grad_out, grad_out_strides, out, x, adjacency, weight, grad_x,
                                  grad_adjacency, grad_weight, grad_bias, S, N, F, Fo, B, act);
}

}  // namespace affectkit::graph
