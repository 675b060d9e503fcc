// CPU backward of graph_conv: grad x, grad A (per-sample or shared graph), grad W and grad b,
// from grad_out read through its strides. Threads take chunks of the samples (graph by graph
// when each sample group has its own graph, so each grad A has one writer) and the chunks'
// partial weight and bias gradients are summed in chunk order.
#include "graph_conv_cpu_common.h"

namespace affectkit::graph::detail {
namespace {

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

#ifdef AK_GRAPH_AVX512_TILES
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // GCC's false positive in the intrinsics
#pragma GCC diagnostic ignored "-Wuninitialized"  // the same, for the unpack intrinsics' undefined operand
// Where gx's rows come from when a block of 16 nodes' kF feature vectors (t[f] = gx[j0:j0+16, f],
// nodes in the lanes) is interleaved back into 16 rows of kF: the block's output, kF vectors
// long, has lane l of vector v = t[k % kF][k / kF] with k = 16 v + l. One permute per feature
// and output vector (kF^2 in all: 25 at kF = 5) replaces a 16 x 16 transpose (64 shuffles)
// and 16 single-row stores, for kF <= 8.
template <int kF>
struct InterleaveRows {
  alignas(64) int idx[kF][16];  // k / kF
  uint16_t mask[kF][kF];        // mask[v][f]: the lanes l with k % kF == f
  constexpr InterleaveRows() : idx{}, mask{} {
    for (int v = 0; v < kF; ++v)
      for (int l = 0; l < 16; ++l) {
        idx[v][l] = (16 * v + l) / kF;
        mask[v][(16 * v + l) % kF] = static_cast<uint16_t>(mask[v][(16 * v + l) % kF] | (1u << l));
      }
  }
};
template <int kF>
inline constexpr InterleaveRows<kF> kInterleaveRows{};

// grad_x and grad_A of one sample for small graphs and few input features (N <= 64, F <= 16;
// float, AVX-512), on transposed tiles. The general route computes H = gp W^T with a row's F
// outputs in the vector lanes (5 of 16 lanes busy at F = 5, each FMA behind a scalar
// broadcast); here the lanes hold 16 nodes: each 16 x 16 tile of gp is transposed in
// registers and its columns combined straight into HT[f] = sum_o W[f, o] gpT[o] (no store
// and reload of gpT). Then, when asked for:
//   grad_x = A^T H:  gxT[f] = sum_i HT[f][i] A[i, :], interleaved back into gx's rows;
//   grad_A += H x^T: row i of ga_acc += sum_f HT[f][i] x[:, f] (x's columns by transposes).
// With gb_acc (Fop), the bias gradient's column sums come from the same loads of gp.
// gp: (N, Fop), zero past Fo; wpad: (kF, Fop) zero-padded, Fop a multiple of 16; arows:
// (N, Np), Np = N rounded up to 16, A's rows zero past column N; x: (N, kF); gx: (N, kF) or
// null; ga_acc: (N, Np) or null; scratch: 16 * Np floats.
template <int kF>
__attribute__((target("avx512f"))) void small_grad_xa_avx512(const float* gp, int64_t Fop, const float* wpad,
                                                             const float* arows, int64_t N, const float* x,
                                                             float* gx, float* ga_acc, float* gb_acc,
                                                             float* scratch) {
  const int64_t Np = (N + 15) / 16 * 16;
  float* ht_rows = scratch;  // (kF, Np)
  for (int64_t n0 = 0; n0 < Np; n0 += 16) {
    __m512 ht[kF], odd[kF];  // even and odd columns apart: 2 kF FMA chains (see combine_rows_avx512)
    for (int f = 0; f < kF; ++f) ht[f] = odd[f] = _mm512_setzero_ps();
    for (int64_t o0 = 0; o0 < Fop; o0 += 16) {
      __m512 r[16];
      for (int i = 0; i < 16; ++i)
        r[i] = n0 + i < N ? _mm512_loadu_ps(gp + (n0 + i) * Fop + o0) : _mm512_setzero_ps();
      if (gb_acc) {  // rows past N are zero
        __m512 s[8];
        for (int i = 0; i < 8; ++i) s[i] = _mm512_add_ps(r[i], r[i + 8]);
        for (int i = 0; i < 4; ++i) s[i] = _mm512_add_ps(s[i], s[i + 4]);
        const __m512 sum = _mm512_add_ps(_mm512_add_ps(s[0], s[2]), _mm512_add_ps(s[1], s[3]));
        _mm512_storeu_ps(gb_acc + o0, _mm512_add_ps(_mm512_loadu_ps(gb_acc + o0), sum));
      }
      transpose16x16_avx512(r);  // r[c] = gp[n0:n0+16, o0 + c]
      for (int c = 0; c < 16; c += 2)
        for (int f = 0; f < kF; ++f) {
          ht[f] = _mm512_fmadd_ps(_mm512_set1_ps(wpad[f * Fop + o0 + c]), r[c], ht[f]);
          odd[f] = _mm512_fmadd_ps(_mm512_set1_ps(wpad[f * Fop + o0 + c + 1]), r[c + 1], odd[f]);
        }
    }
    for (int f = 0; f < kF; ++f) _mm512_storeu_ps(ht_rows + f * Np + n0, _mm512_add_ps(ht[f], odd[f]));
  }
  constexpr __mmask16 fmask = static_cast<__mmask16>((1u << kF) - 1u);
  for (int64_t j0 = 0; j0 < Np; j0 += 16) {
    __m512 t[16];
    if (gx) {
      combine_rows_avx512<kF>(N, arows + j0, Np, ht_rows, 1, Np, t);  // t[f] = gx[j0:j0+16, f]
      const int64_t rows = std::min<int64_t>(16, N - j0);
      if constexpr (kF <= 8) {
        const InterleaveRows<kF>& il = kInterleaveRows<kF>;
        const int64_t n = rows * kF;  // this block's floats of gx, from gx + j0 * kF
        for (int v = 0; v < kF && 16 * v < n; ++v) {
          const __m512i idx = _mm512_load_si512(il.idx[v]);
          __m512 o = _mm512_permutexvar_ps(idx, t[0]);
          for (int f = 1; f < kF; ++f) o = _mm512_mask_permutexvar_ps(o, il.mask[v][f], idx, t[f]);
          float* dst = gx + j0 * kF + 16 * v;
          if (16 * v + 16 <= n) _mm512_storeu_ps(dst, o);
          else _mm512_mask_storeu_ps(dst, static_cast<__mmask16>((1u << (n - 16 * v)) - 1u), o);
        }
      } else {
        for (int f = kF; f < 16; ++f) t[f] = _mm512_setzero_ps();
        transpose16x16_avx512(t);
        for (int64_t j = 0; j < rows; ++j) _mm512_mask_storeu_ps(gx + (j0 + j) * kF, fmask, t[j]);
      }
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

// Lane r of the result: the sum of the 8 lanes of v[r].
__attribute__((target("avx2,fma"), always_inline)) inline __m256 row_sums8_avx2(const __m256 v[8]) {
  const __m256 s0123 = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
  const __m256 s4567 = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
  // s0123: the low-half sums of v0..v3, then their high-half sums; s4567 the same for v4..v7.
  return _mm256_add_ps(_mm256_permute2f128_ps(s0123, s4567, 0x20), _mm256_permute2f128_ps(s0123, s4567, 0x31));
}

// acc[f] = the 8-lane partial sums of the dot product of gp's row and W's row f (f < kN); with
// kSums, the row is also added into col_sums (Fop).
template <int kN, bool kSums>
__attribute__((target("avx2,fma"), always_inline)) inline void row_dots_avx2(const float* row, const float* wpad,
                                                                           int64_t Fop, __m256 acc[kN],
                                                                           float* col_sums) {
  for (int f = 0; f < kN; ++f) acc[f] = _mm256_setzero_ps();
  for (int64_t o = 0; o < Fop; o += 8) {
    const __m256 v = _mm256_loadu_ps(row + o);
    for (int f = 0; f < kN; ++f) acc[f] = _mm256_fmadd_ps(v, _mm256_loadu_ps(wpad + f * Fop + o), acc[f]);
    if constexpr (kSums) _mm256_storeu_ps(col_sums + o, _mm256_add_ps(_mm256_loadu_ps(col_sums + o), v));
  }
}

// small_grad_xa_avx512 for AVX2+FMA: 8 nodes per vector, features in blocks of 8 where they
// cross the lanes (gx's rows, x's columns). HT = W gp^T row by row, without transposing gp:
// each row's kF dot products as 8-lane partial sums (FMAs against W's padded rows), eight
// rows' partial sums then reduced into one vector of 8 nodes (row_sums8_avx2). Against
// transposing gp 8 x 8 and combining its columns, with the bias gradient's column sums in a
// pass of their own, the backward at 14 x 5 -> 32 runs 18 % fewer instructions (callgrind) and
// 10-15 % less time; here, with gb_acc (Fop), the column sums come from the dots' own loads.
// Same operands, with
// Np = N rounded up to 8, gp's rows (N, ldg) zero-padded to Fop, a multiple of 8, and wpad
// (kF, Fop) zero-padded; scratch: 16 * Np floats.
template <int kF>
__attribute__((target("avx2,fma"))) void small_grad_xa_avx2(const float* gp, int64_t ldg, int64_t Fop,
                                                           const float* wpad, const float* arows, int64_t N,
                                                           const float* x, float* gx, float* ga_acc,
                                                           float* gb_acc, float* scratch) {
  const int64_t Np = (N + 7) / 8 * 8;
  float* ht_rows = scratch;  // (kF, Np)
  constexpr int kA = kF <= 8 ? kF : kF / 2;  // dot products a pass: at most 8 accumulators
  for (int64_t n0 = 0; n0 < Np; n0 += 8) {
    __m256 part[kF][8];  // part[f][r]: row n0 + r's partial sums of dot product f
    for (int r = 0; r < 8; ++r) {
      const int64_t n = n0 + r;
      if (n >= N) {
        for (int f = 0; f < kF; ++f) part[f][r] = _mm256_setzero_ps();
        continue;
      }
      const float* row = gp + n * ldg;
      __m256 acc[kA];
      if (gb_acc) row_dots_avx2<kA, true>(row, wpad, Fop, acc, gb_acc);
      else row_dots_avx2<kA, false>(row, wpad, Fop, acc, nullptr);
      for (int f = 0; f < kA; ++f) part[f][r] = acc[f];
      if constexpr (kF > kA) {
        __m256 rest[kF - kA];
        row_dots_avx2<kF - kA, false>(row, wpad + kA * Fop, Fop, rest, nullptr);
        for (int f = kA; f < kF; ++f) part[f][r] = rest[f - kA];
      }
    }
    for (int f = 0; f < kF; ++f) _mm256_storeu_ps(ht_rows + f * Np + n0, row_sums8_avx2(part[f]));
  }
  constexpr int NB = combine_blocks_avx2<kF>();
  constexpr int kB = (kF + 7) / 8;  // blocks of 8 features
  __m256 t[8 * kB];
  if (gx)
    for (int64_t j0 = 0; j0 < Np; j0 += 8 * NB) {
      const int nb = j0 + 8 * NB <= Np ? NB : 1;
      __m256 gxT[NB * kF];
      if (nb == NB) combine_rows_avx2<kF, NB>(N, arows + j0, Np, ht_rows, 1, Np, gxT);
      else combine_rows_avx2<kF>(N, arows + j0, Np, ht_rows, 1, Np, gxT);
      for (int b = 0; b < nb; ++b) {
        for (int f = 0; f < 8 * kB; ++f) t[f] = f < kF ? gxT[b * kF + f] : _mm256_setzero_ps();
        for (int c = 0; c < kB; ++c) transpose8x8_avx2(t + 8 * c);  // t[8c + j] = gx[j, 8c : 8c + 8]
        // Rows in order, each as whole vectors where they stay inside this sample's gx: the
        // lanes past a row's end land in the next rows, which are stored after it. Only the
        // sample's last row(s) store part of a vector.
        const int64_t jb = j0 + 8 * b;
        for (int64_t j = 0; j < 8 && jb + j < N; ++j)
          for (int c = 0; c < kB; ++c) {
            const int64_t at = (jb + j) * kF + 8 * c;
            if (at + 8 <= N * kF) _mm256_storeu_ps(gx + at, t[8 * c + j]);
            else store_lanes_avx2(gx + at, t[8 * c + j], std::min(8, kF - 8 * c));
          }
      }
    }
  if (ga_acc)
    for (int64_t j0 = 0; j0 < Np; j0 += 8) {
      for (int c = 0; c < kB; ++c) {
        const int fw = std::min(8, kF - 8 * c);
        for (int j = 0; j < 8; ++j) {
          const float* src = x + (j0 + j) * kF + 8 * c;
          t[8 * c + j] = j0 + j >= N ? _mm256_setzero_ps()
                         : fw == 8   ? _mm256_loadu_ps(src)
                                     : _mm256_maskload_ps(src, lane_mask_avx2(fw));
        }
        transpose8x8_avx2(t + 8 * c);  // t[8c + f] = x[j0 : j0 + 8, 8c + f]
      }
      for (int64_t i = 0; i < N; ++i) {
        __m256 acc = _mm256_loadu_ps(ga_acc + i * Np + j0);
        for (int f = 0; f < kF; ++f) acc = _mm256_fmadd_ps(_mm256_set1_ps(ht_rows[f * Np + i]), t[f], acc);
        _mm256_storeu_ps(ga_acc + i * Np + j0, acc);
      }
    }
}

// The tile grad_x / grad_A for VB = 64 (AVX-512) or VB = 32 (AVX2), w (F, ldg) zero-padded,
// and the bias gradient's column sums into gb_acc when it is not null, by the number of input
// features.
template <int VB, int kF = 1>
void small_grad_xa(int64_t F, const float* gp, int64_t ldg, const float* w, const float* arows, int64_t N,
                   const float* x, float* gx, float* ga_acc, float* gb_acc, float* scratch) {
  if constexpr (kF < 16) {
    if (F != kF) return small_grad_xa<VB, kF + 1>(F, gp, ldg, w, arows, N, x, gx, ga_acc, gb_acc, scratch);
  }
  if constexpr (VB == 64) small_grad_xa_avx512<kF>(gp, ldg, w, arows, N, x, gx, ga_acc, gb_acc, scratch);
  else small_grad_xa_avx2<kF>(gp, ldg, ldg, w, arows, N, x, gx, ga_acc, gb_acc, scratch);
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

// small_grad_w_avx512 for AVX2+FMA: 8 lanes (two blocks at once for few features), Np = N
// rounded up to 8, Fop a multiple of 8; scratch: 16 * Np floats.
template <int kF>
__attribute__((target("avx2,fma"))) void small_grad_w_avx2(const float* x, const float* at_rows,
                                                          const float* gp, int64_t Fop, int64_t N,
                                                          float* gw_acc, float* scratch) {
  const int64_t Np = (N + 7) / 8 * 8;
  constexpr int NB = combine_blocks_avx2<kF>();
  __m256 acc[NB * kF];
  for (int64_t n0 = 0; n0 < Np; n0 += 8 * NB) {
    const int nb = n0 + 8 * NB <= Np ? NB : 1;  // a last single block
    if (nb == NB) combine_rows_avx2<kF, NB>(N, at_rows + n0, Np, x, kF, 1, acc);
    else combine_rows_avx2<kF>(N, at_rows + n0, Np, x, kF, 1, acc);
    for (int b = 0; b < nb; ++b)
      for (int f = 0; f < kF; ++f) _mm256_storeu_ps(scratch + f * Np + n0 + 8 * b, acc[b * kF + f]);
  }
  for (int64_t o0 = 0; o0 < Fop; o0 += 8 * NB) {
    const int nb = o0 + 8 * NB <= Fop ? NB : 1;
    if (nb == NB) combine_rows_avx2<kF, NB>(N, gp + o0, Fop, scratch, 1, Np, acc);
    else combine_rows_avx2<kF>(N, gp + o0, Fop, scratch, 1, Np, acc);
    for (int b = 0; b < nb; ++b)
      for (int f = 0; f < kF; ++f) {
        float* dst = gw_acc + f * Fop + o0 + 8 * b;
        _mm256_storeu_ps(dst, _mm256_add_ps(_mm256_loadu_ps(dst), acc[b * kF + f]));
      }
  }
}

// The tile grad_W for VB = 64 (AVX-512) or VB = 32 (AVX2), by the number of input features.
template <int VB, int kF = 1>
void small_grad_w(int64_t F, const float* x, const float* at_rows, const float* gp, int64_t Fop,
                  int64_t N, float* gw_acc, float* scratch) {
  if constexpr (kF < 16) {
    if (F != kF) return small_grad_w<VB, kF + 1>(F, x, at_rows, gp, Fop, N, gw_acc, scratch);
  }
  if constexpr (VB == 64) small_grad_w_avx512<kF>(x, at_rows, gp, Fop, N, gw_acc, scratch);
  else small_grad_w_avx2<kF>(x, at_rows, gp, Fop, N, gw_acc, scratch);
}
#pragma GCC diagnostic pop
#endif

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
  // Small graphs with few features take the transposed-tile grad_x on AVX-512 or AVX2 (float).
  [[maybe_unused]] constexpr bool tiles = (VB == 64 || VB == 32) && std::is_same_v<T, float>;  // x86 only
  bool small = false;
#ifdef AK_GRAPH_AVX512_TILES
  if constexpr (tiles) small = has_w && N <= 64 && F >= 1 && F <= 16;
#endif
  const bool small_gx = small && (a.gx || a.gA);  // grad_x and grad_A on tiles
  const int64_t Npt = round_up(N, VB == 64 ? 16 : 8);  // N rounded up to the tiles' vector lanes
  const bool m_route = !small && has_w && a.gx && a.gW && !a.gA && Fop * G < 2 * Fp;
  const bool small_gw = small && a.gW;
  // The tiles take the bias gradient's column sums with grad_x, from W padded to Fop.
  const bool tile_gb = small_gx && a.gb;
  std::vector<T> wpad(small_gx ? F * Fop : 0, T(0));
  if (!wpad.empty()) copy_padded(a.w, F, Fo, Fo, wpad.data(), Fop);
  std::vector<T> arows(small_gx ? N * Npt : 0, T(0)), scratch(small_gx ? 16 * Npt : 0);
  std::vector<T> at_rows(small_gw ? N * Npt : 0), scratch_w(small_gw ? 16 * Npt : 0);
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
      if (small_gx) copy_padded(A, N, N, N, arows.data(), Npt);
      if (small_gw) transpose_padded(A, N, N, N, at_rows.data(), Npt);
    }
    // gp[k] = grad_out * act'(out), zero-padded to Fop columns (strided rows gathered first).
    for (int64_t k = 0; k < g; ++k) {
      const T* gs = a.g + (s + k) * a.gs;
      const T* ys = a.y + (s + k) * N * Fo;
      T* d = gp.data() + k * N * Fop;
      if (Fo == Fop && a.gf == 0 && a.gn == 0) {  // one value for the whole sample (sum()'s)
        const T c = *gs;
        slope_times<T>([c](int64_t) { return c; }, ys, d, N * Fo, a.act);
        continue;
      }
      if (Fo == Fop && a.gf == 1 && a.gn == Fo) {  // the sample's rows back to back, unpadded
        const T* __restrict gr = gs;
        slope_times<T>([gr](int64_t f) { return gr[f]; }, ys, d, N * Fo, a.act);
        continue;
      }
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
    if (a.gb && !tile_gb) add_column_sums<T, VB>(gp.data(), g * N, Fop, gbacc.data());
    if (m_route) {  // M = A^T gp, grad_x = M W^T, grad_W += x^T M: three products, not four
      for (int64_t k = 0; k < g; ++k) {
        const T* xk = a.x + (s + k) * N * F;
        T* dst = a.gx + (s + k) * N * F;
        gemm_strided<T, VB, false>(N, Fop, N, A, 1, N, gp.data() + k * N * Fop, Fop, M.data(), Fop);
        if (F == Fp) {  // rows of whole vectors: straight into grad_x (a copy was 5 % at 62 x 64)
          gemm<T, VB, false>(N, F, Fo, M.data(), Fop, wT.data(), Fp, dst, F);
        } else {
          gemm<T, VB, false>(N, Fp, Fo, M.data(), Fop, wT.data(), Fp, gxcat.data(), Fp);
          for (int64_t i = 0; i < N; ++i)
            for (int64_t f = 0; f < F; ++f) dst[i * F + f] = gxcat[i * Fp + f];
        }
        gemm_strided<T, VB, true>(F, Fop, N, xk, 1, F, M.data(), Fop, gWacc.data(), Fop);
      }
      continue;  // no grad_A on this route (it needs H = gp W^T)
    }
#ifdef AK_GRAPH_AVX512_TILES
    if constexpr (tiles)
      if (small)
        for (int64_t k = 0; k < g; ++k) {
          if (small_gx)
            small_grad_xa<VB>(F, gp.data() + k * N * Fop, Fop, wpad.data(), arows.data(), N,
                              a.x + (s + k) * N * F, a.gx ? a.gx + (s + k) * N * F : nullptr,
                              a.gA ? gAacc.data() : nullptr, tile_gb ? gbacc.data() : nullptr, scratch.data());
          if (small_gw)
            small_grad_w<VB>(F, a.x + (s + k) * N * F, at_rows.data(), gp.data() + k * N * Fop, Fop, N,
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
void backward(const T* g, const int64_t* gstrides, const T* y, const T* x, const T* adj, const T* w, T* gx,
              T* gA, T* gW, T* gb, int64_t S, int64_t N, int64_t F, int64_t Fo, int64_t B, Activation act) {
  if (S == 0) {  // nothing flows back: every requested gradient is zero
    if (gA) std::fill(gA, gA + B * N * N, T(0));
    if (gW) std::fill(gW, gW + F * Fo, T(0));
    if (gb) std::fill(gb, gb + Fo, T(0));
    return;
  }
  const bool per_sample = B > 1;
  // Per-sample graphs are split between chunks graph by graph, so each gA[b] has one writer.
  // Chunks are handed out as threads free up (as in the forward: a fixed share per thread
  // waits for the slowest core), each with its own partial gradients.
  const int64_t units = per_sample ? B : S, R = S / B;
  const int nt = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(omp_get_max_threads(), units)));
  const int64_t chunks = nt == 1 ? 1 : std::min<int64_t>(units, 4 * nt);
  std::vector<T> partA(gA && !per_sample ? chunks * N * N : 0, T(0));
  std::vector<T> partW(gW ? chunks * F * Fo : 0, T(0)), partb(gb ? chunks * Fo : 0, T(0));
  const int level = simd_level();
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1)
  for (int64_t c = 0; c < chunks; ++c) {
    BackwardArgs<T> a{g, y, x, adj, w, gx,
                      gA ? (per_sample ? gA : partA.data() + c * N * N) : nullptr,
                      gW ? partW.data() + c * F * Fo : nullptr,
                      gb ? partb.data() + c * Fo : nullptr, N, F, Fo, R, act, per_sample,
                      gstrides ? gstrides[0] : N * Fo, gstrides ? gstrides[1] : Fo, gstrides ? gstrides[2] : 1};
    int64_t u0, u1;
    thread_range(units, static_cast<int>(c), static_cast<int>(chunks), &u0, &u1);
    if (per_sample) u0 *= R, u1 *= R;
    backward_range(level, a, u0, u1);
  }
  // Sum the partials in chunk order: deterministic for a thread count, whichever thread ran
  // which chunk.
  auto reduce = [chunks](const std::vector<T>& parts, T* dst, int64_t size) {
    std::fill(dst, dst + size, T(0));
    for (int64_t c = 0; c < chunks; ++c)
      for (int64_t i = 0; i < size; ++i) dst[i] += parts[c * size + i];
  };
  if (gA && !per_sample) reduce(partA, gA, N * N);
  if (gW) reduce(partW, gW, F * Fo);
  if (gb) reduce(partb, gb, Fo);
}

}  // namespace

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

}  // namespace affectkit::graph::detail
