// CPU forward of graph_conv, fused with the bias, the activation and (graph_conv_pool) the
// pooling. Each thread takes a contiguous run of samples and, per sample, runs two small
// products whose operands (A, W, one sample) stay in L1: (A x) W when F <= Fo, else A (x W),
// then the epilogue, writing each output element once.
#include "graph_conv_cpu_common.h"

namespace affectkit::graph::detail {
namespace {

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

#ifdef AK_GRAPH_AVX512_TILES
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // GCC's false positive in the intrinsics
#pragma GCC diagnostic ignored "-Wuninitialized"  // the same, for the unpack intrinsics' undefined operand
// The small forward's epilogue when it is piecewise linear (none, ReLU, leaky ReLU): out =
// act(y + bias) written straight from registers, negative values scaled by negative_slope.
struct Fused {
  const float* bias;  // (Fop), zero-padded
  float* out;         // this sample's (N, Fo) output
  int64_t Fo;
  float negative_slope;
};

// Fused's fields as the tile kernels' epilogues take them: by value, so that they stay in
// registers. Read through the pointer, the compiler reloaded them after every output store
// (they may alias); passing them by value took about a third off the AVX2 forward at N = 14.
struct RowEpilogue {
  float* out;  // null: store the product into y instead
  int64_t Fo;
  float slope;  // 0 (ReLU), leaky ReLU's slope, or 1 (none): max(v, slope * v) for slope <= 1
};

AK_INLINE RowEpilogue row_epilogue(const Fused* fused) {
  return fused ? RowEpilogue{fused->out, fused->Fo, fused->negative_slope} : RowEpilogue{nullptr, 0, 0.f};
}

__attribute__((target("avx512f"), always_inline)) inline void finish_row(RowEpilogue ep, float* y, int64_t Fop,
                                                                          int64_t row, int64_t o0, __m512 v) {
  if (!ep.out) return _mm512_storeu_ps(y + row * Fop + o0, v);
  // As finish_row_avx2: maxps returns its second operand when either is NaN, so v comes
  // second and NaN propagates; ReLU as max(0, v), since v * 0 is NaN for v = -inf.
  v = ep.slope == 0.f ? _mm512_max_ps(_mm512_setzero_ps(), v)
                      : _mm512_max_ps(v, _mm512_mul_ps(v, _mm512_set1_ps(ep.slope)));
  float* dst = ep.out + row * ep.Fo + o0;
  if (o0 + 16 <= ep.Fo) _mm512_storeu_ps(dst, v);
  else _mm512_mask_storeu_ps(dst, static_cast<__mmask16>((1u << (ep.Fo - o0)) - 1u), v);
}

// Rows i..i+R-1, columns o0..o0+16*NV-1 of the AVX-512 forward's output: R * NV independent
// FMA chains from broadcasts of Z (zt: (kF, Np), Z transposed), each broadcast used for the
// NV column vectors and each W vector loaded once for the R rows.
template <int kF, int R, int NV>
__attribute__((target("avx512f"), always_inline)) inline void forward_rows_avx512(
    const float* zt, int64_t Np, const float* wp, int64_t Fop, int64_t i, int64_t o0, const __m512 init[NV],
    float* y, RowEpilogue ep) {
  __m512 acc[R][NV];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = init[v];
  for (int f = 0; f < kF; ++f) {
    __m512 w[NV];
    for (int v = 0; v < NV; ++v) w[v] = _mm512_loadu_ps(wp + f * Fop + o0 + 16 * v);
    for (int r = 0; r < R; ++r) {
      const __m512 z = _mm512_set1_ps(zt[f * Np + i + r]);
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_fmadd_ps(z, w[v], acc[r][v]);
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) finish_row(ep, y, Fop, i + r, o0 + 16 * v, acc[r][v]);
}

// The forward for the same small shapes (N <= 64, F <= 16, with W; float, AVX-512), one sample:
// y = (A x) W with 16 nodes per vector for A x (ZT[f] = sum_j x[j, f] A[:, j]), then the
// output in blocks of 4 rows x 32 columns from broadcasts of Z[i, f] against W's rows (a
// 16-column block for an odd tail, 2 rows then 1 for the last rows). No packing of samples
// side by side and no half-empty lanes. Fused: start from the bias, apply the activation and
// store into the output row (Fo wide); otherwise store the product into y (Fop wide) for the
// general epilogue. x: (N, kF); at_rows: (N, Np), row j = A[:, j], zero past N; wp: (kF, Fop)
// zero-padded; y: (N, Fop); scratch: 16 * Np floats.
template <int kF>
__attribute__((target("avx512f"))) void small_forward_avx512(const float* x, const float* at_rows,
                                                             const float* wp, int64_t Fop, int64_t N,
                                                             float* y, float* scratch, const Fused* fused) {
  const int64_t Np = (N + 15) / 16 * 16;
  const RowEpilogue ep = row_epilogue(fused);
  for (int64_t n0 = 0; n0 < Np; n0 += 16) {
    __m512 zt[kF];
    combine_rows_avx512<kF>(N, at_rows + n0, Np, x, kF, 1, zt);
    for (int f = 0; f < kF; ++f) _mm512_storeu_ps(scratch + f * Np + n0, zt[f]);
  }
  int64_t o0 = 0;
  for (; o0 + 32 <= Fop; o0 += 32) {
    const __m512 init[2] = {fused ? _mm512_loadu_ps(fused->bias + o0) : _mm512_setzero_ps(),
                            fused ? _mm512_loadu_ps(fused->bias + o0 + 16) : _mm512_setzero_ps()};
    int64_t i = 0;
    for (; i + 4 <= N; i += 4) forward_rows_avx512<kF, 4, 2>(scratch, Np, wp, Fop, i, o0, init, y, ep);
    if (i + 2 <= N) forward_rows_avx512<kF, 2, 2>(scratch, Np, wp, Fop, i, o0, init, y, ep), i += 2;
    for (; i < N; ++i) forward_rows_avx512<kF, 1, 2>(scratch, Np, wp, Fop, i, o0, init, y, ep);
  }
  if (o0 < Fop) {
    const __m512 init[1] = {fused ? _mm512_loadu_ps(fused->bias + o0) : _mm512_setzero_ps()};
    int64_t i = 0;
    for (; i + 4 <= N; i += 4) forward_rows_avx512<kF, 4, 1>(scratch, Np, wp, Fop, i, o0, init, y, ep);
    if (i + 2 <= N) forward_rows_avx512<kF, 2, 1>(scratch, Np, wp, Fop, i, o0, init, y, ep), i += 2;
    for (; i < N; ++i) forward_rows_avx512<kF, 1, 1>(scratch, Np, wp, Fop, i, o0, init, y, ep);
  }
}

// The AVX2 counterpart of finish_row (8 lanes); a row's last, partial vector is stored lane
// group by lane group (store_lanes_avx2: vmaskmovps is slow on AMD).
__attribute__((target("avx2,fma"), always_inline)) inline void finish_row_avx2(RowEpilogue ep, float* y,
                                                                               int64_t Fop, int64_t row, int64_t o0,
                                                                               __m256 v) {
  if (!ep.out) return _mm256_storeu_ps(y + row * Fop + o0, v);
  // maxps returns its second operand when either is NaN: v must come second (as slope * v
  // does) so that NaN propagates. ReLU as max(0, v), not max(0 * v, v), which gives -0.
  v = ep.slope == 0.f ? _mm256_max_ps(_mm256_setzero_ps(), v) : _mm256_max_ps(v, _mm256_mul_ps(v, _mm256_set1_ps(ep.slope)));
  store_lanes_avx2(ep.out + row * ep.Fo + o0, v, ep.Fo - o0);
}

// Rows i..i+R-1, columns o0..o0+8*NV-1 of the AVX2 forward's output: R * NV independent FMA
// chains from broadcasts of Z (zt: (kF, Np), Z transposed), each W vector loaded once for the R rows.
template <int kF, int R, int NV>
__attribute__((target("avx2,fma"), always_inline)) inline void forward_rows_avx2(
    const float* zt, int64_t Np, const float* wp, int64_t Fop, int64_t i, int64_t o0, const __m256 init[NV],
    float* y, RowEpilogue ep) {
  __m256 acc[R][NV];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = init[v];
  for (int f = 0; f < kF; ++f) {
    __m256 w[NV];
    for (int v = 0; v < NV; ++v) w[v] = _mm256_loadu_ps(wp + f * Fop + o0 + 8 * v);
    for (int r = 0; r < R; ++r) {
      const __m256 z = _mm256_set1_ps(zt[f * Np + i + r]);
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm256_fmadd_ps(z, w[v], acc[r][v]);
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) finish_row_avx2(ep, y, Fop, i + r, o0 + 8 * v, acc[r][v]);
}

// small_forward_avx512 for AVX2+FMA: 8 nodes per vector for Z = A x (two blocks at once for
// few features, see combine_rows_avx2), then the output in blocks of 4 rows x 16 columns (8
// accumulators of the 16 registers; an 8-column block for an odd tail, 2 rows then 1 for the
// last rows). Same operands, with Np = N rounded up to 8: at_rows (N, Np), zero past N; wp
// (kF, Fop) zero-padded, Fop a multiple of 8; y (N, Fop); scratch: 16 * Np floats.
template <int kF>
__attribute__((target("avx2,fma"))) void small_forward_avx2(const float* x, const float* at_rows,
                                                           const float* wp, int64_t Fop, int64_t N,
                                                           float* y, float* scratch, const Fused* fused) {
  const int64_t Np = (N + 7) / 8 * 8;
  const RowEpilogue ep = row_epilogue(fused);
  constexpr int NB = combine_blocks_avx2<kF>();
  for (int64_t n0 = 0; n0 < Np; n0 += 8 * NB) {
    __m256 zt[NB * kF];
    const int nb = n0 + 8 * NB <= Np ? NB : 1;  // a last single block
    if (nb == NB) combine_rows_avx2<kF, NB>(N, at_rows + n0, Np, x, kF, 1, zt);
    else combine_rows_avx2<kF>(N, at_rows + n0, Np, x, kF, 1, zt);
    for (int b = 0; b < nb; ++b)
      for (int f = 0; f < kF; ++f) _mm256_storeu_ps(scratch + f * Np + n0 + 8 * b, zt[b * kF + f]);
  }
  int64_t o0 = 0;
  for (; o0 + 16 <= Fop; o0 += 16) {
    const __m256 init[2] = {fused ? _mm256_loadu_ps(fused->bias + o0) : _mm256_setzero_ps(),
                            fused ? _mm256_loadu_ps(fused->bias + o0 + 8) : _mm256_setzero_ps()};
    int64_t i = 0;
    for (; i + 4 <= N; i += 4) forward_rows_avx2<kF, 4, 2>(scratch, Np, wp, Fop, i, o0, init, y, ep);
    if (i + 2 <= N) forward_rows_avx2<kF, 2, 2>(scratch, Np, wp, Fop, i, o0, init, y, ep), i += 2;
    for (; i < N; ++i) forward_rows_avx2<kF, 1, 2>(scratch, Np, wp, Fop, i, o0, init, y, ep);
  }
  if (o0 < Fop) {
    const __m256 init[1] = {fused ? _mm256_loadu_ps(fused->bias + o0) : _mm256_setzero_ps()};
    int64_t i = 0;
    for (; i + 4 <= N; i += 4) forward_rows_avx2<kF, 4, 1>(scratch, Np, wp, Fop, i, o0, init, y, ep);
    if (i + 2 <= N) forward_rows_avx2<kF, 2, 1>(scratch, Np, wp, Fop, i, o0, init, y, ep), i += 2;
    for (; i < N; ++i) forward_rows_avx2<kF, 1, 1>(scratch, Np, wp, Fop, i, o0, init, y, ep);
  }
}

// The tile forward for VB = 64 (AVX-512) or VB = 32 (AVX2), by the number of input features.
template <int VB, int kF = 1>
void small_forward(int64_t F, const float* x, const float* at_rows, const float* wp, int64_t Fop,
                   int64_t N, float* y, float* scratch, const Fused* fused) {
  if constexpr (kF < 16) {
    if (F != kF) return small_forward<VB, kF + 1>(F, x, at_rows, wp, Fop, N, y, scratch, fused);
  }
  if constexpr (VB == 64) small_forward_avx512<kF>(x, at_rows, wp, Fop, N, y, scratch, fused);
  else small_forward_avx2<kF>(x, at_rows, wp, Fop, N, y, scratch, fused);
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
  // Small graphs with few features take the transposed-tile forward on AVX-512 or AVX2 (float).
  [[maybe_unused]] constexpr bool tiles = (VB == 64 || VB == 32) && std::is_same_v<T, float>;  // x86 only
  bool small_fwd = false;
#ifdef AK_GRAPH_AVX512_TILES
  if constexpr (tiles) small_fwd = has_w && F >= 1 && F <= 16 && N <= 64;
#endif
  const bool fused_epilogue = small_fwd && (a.act == Activation::None || a.act == Activation::ReLU ||
                                            a.act == Activation::LeakyReLU);  // the tiles' own
  const int64_t Npt = round_up(N, VB == 64 ? 16 : 8);  // N rounded up to the tiles' vector lanes
  std::vector<T> at_rows(small_fwd ? N * Npt : 0), scratch(small_fwd ? 16 * Npt : 0);
  // With few features, G samples that share a graph sit side by side in one padded row, so
  // the product with A fills the vector lanes instead of multiplying zero padding.
  const int64_t G = small_fwd ? 1 : (!has_w || a_first) && F > 0 ? std::max<int64_t>(1, Fp / F) : 1;
  std::vector<T> wp(has_w ? F * Fop : 0), xs(N * Fp), tmp(N * std::max(Fp, Fop)), y(N * Fop);
  std::vector<T> bias(Fop, T(0)), w_pool(N);
  if (has_w) copy_padded(a.w, F, Fo, Fo, wp.data(), Fop);
  if (a.bias) std::copy(a.bias, a.bias + Fo, bias.begin());
  // The general path's last product applies the bias and a piecewise-linear activation as it
  // stores whole vectors straight into the output (Fo a multiple of the lanes).
  const bool piecewise_linear = a.act == Activation::None || a.act == Activation::ReLU ||
                                a.act == Activation::LeakyReLU;
  const bool gemm_epilogue = !small_fwd && has_w && piecewise_linear && Fo == Fop;
  using BiasAct = BiasThenPiecewiseLinear<T>;
  const BiasAct bias_act{bias.data(),
                         a.act == Activation::ReLU ? BiasAct::kReLU
                         : a.act == Activation::LeakyReLU ? BiasAct::kLeaky : BiasAct::kNone,
                         leaky_slope<T>()};
  for (int64_t s = s0, g = 1; s < s1; s += g) {
    g = std::min({G, s1 - s, a.R - s % a.R});  // a group never crosses into another graph
    const int64_t graph = s / a.R;
    const T* A = a.adj + graph * N * N;
    if (a.check_each_graph && (s == s0 || s % a.R == 0) && *a.first_bad_graph < 0 &&
        !all_finite(A, N * N))
      *a.first_bad_graph = graph;
    const T* xg = a.x + s * N * F;
#ifdef AK_GRAPH_AVX512_TILES
    if constexpr (tiles)
      if (small_fwd) {
        if (s == s0 || s % a.R == 0) transpose_padded(A, N, N, N, at_rows.data(), Npt);  // a new graph
        const Fused fused{bias.data(), a.out + s * N * Fo, Fo,
                          a.act == Activation::ReLU ? 0.0f : a.act == Activation::LeakyReLU ? leaky_slope<float>() : 1.0f};
        small_forward<VB>(F, xg, at_rows.data(), wp.data(), Fop, N, y.data(), scratch.data(),
                      fused_epilogue ? &fused : nullptr);
      }
#endif
    if (!small_fwd) {
      // One sample whose rows fill whole vectors is read in place; others are packed.
      const T* xin = xg;
      int64_t ldx = F;
      if (g > 1 || F != Fp) {
        for (int64_t i = 0; i < N; ++i) {  // xs[i] = [x[s][i] | x[s+1][i] | ... | 0 ...]
          T* d = xs.data() + i * Fp;
          int64_t c = 0;
          for (int64_t k = 0; k < g; ++k)
            for (int64_t f = 0; f < F; ++f) d[c++] = xg[(k * N + i) * F + f];
          for (; c < Fp; ++c) d[c] = T(0);
        }
        xin = xs.data(), ldx = Fp;
      }
      T* o = a.out + s * N * Fo;  // g == 1 where the product writes the output directly
      if (!has_w) {
        gemm<T, VB, false>(N, Fp, N, A, N, xin, ldx, y.data(), Fp);
      } else if (a_first) {
        gemm<T, VB, false>(N, Fp, N, A, N, xin, ldx, tmp.data(), Fp);
      } else {
        gemm<T, VB, false>(N, Fop, F, xin, ldx, wp.data(), Fop, tmp.data(), Fop);
        if (gemm_epilogue) gemm<T, VB, false>(N, Fo, N, A, N, tmp.data(), Fop, o, Fo, bias_act);
        else gemm<T, VB, false>(N, Fop, N, A, N, tmp.data(), Fop, y.data(), Fop);
      }
    }
    for (int64_t k = 0; k < g; ++k) {
      const T* yk = y.data();
      int64_t ldy = Fop;
      T* o = a.out + (s + k) * N * Fo;
      if (!has_w) {
        yk = y.data() + k * F, ldy = Fp;
      } else if (a_first && !small_fwd) {
        if (gemm_epilogue) gemm<T, VB, false>(N, Fo, F, tmp.data() + k * F, Fp, wp.data(), Fop, o, Fo, bias_act);
        else gemm<T, VB, false>(N, Fop, F, tmp.data() + k * F, Fp, wp.data(), Fop, y.data(), Fop);
      }
      if (!fused_epilogue && !gemm_epilogue) epilogue(yk, ldy, bias.data(), o, N, Fo, a.act);
      if (a.kids)
        pool_sample(o, Fo, a.scores ? a.scores + (s + k) * N : nullptr, *a.kids,
                    a.pooled + (s + k) * a.P * Fo, Fo, a.P, w_pool.data());
    }
  }
}
AK_GRAPH_MULTIVERSION(forward_range, ForwardArgs)


template <typename T>
void forward(const T* x, const T* adj, const T* w, const T* bias, T* out, int64_t S, int64_t N,
             int64_t F, int64_t Fo, int64_t B, Activation act, const int64_t* assignment,
             const T* scores, T* pooled, int64_t P) {
  if (S == 0) return;
  if (B == 1 && !all_finite(adj, N * N))
    throw ValueError("adjacency: expected finite values, got NaN or infinity");
  const Children kids = assignment ? build_children(assignment, N, P) : Children{};
  const int nt = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(omp_get_max_threads(), S)));
  // Runs of samples handed out as threads free up, not one fixed share per thread: on a
  // shared machine one core is often slowed by other work, and a fixed split waits for it.
  const int64_t chunks = nt == 1 ? 1 : std::min<int64_t>(S, 8 * nt);
  std::vector<int64_t> bad(chunks, -1);
  const int level = simd_level();
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1)
  for (int64_t c = 0; c < chunks; ++c) {
    ForwardArgs<T> a{x, adj, w, bias, out, N, F, Fo, S / B, act, B > 1, &bad[c],
                     assignment ? &kids : nullptr, scores, pooled, P};
    int64_t s0, s1;
    thread_range(S, static_cast<int>(c), static_cast<int>(chunks), &s0, &s1);
    forward_range(level, a, s0, s1);
  }
  for (int64_t g : bad)
    if (g >= 0)
      throw ValueError("adjacency: expected finite values, got NaN or infinity in adjacency[" +
                       std::to_string(g) + "]");
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

}  // namespace affectkit::graph::detail
