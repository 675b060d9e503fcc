// CUDA path of graph_conv's forward (and the fused level with pooling).
//
// Two kernels here and a tensor-core one in graph_conv_tc.cu; graph_conv_forward_cuda picks one
// per call:
//
// * warp_conv_kernel: one shared graph (B == 1), no pooling, and a small sample
//   ((N*F + N*M) accumulators <= 2 KB, M the width of the intermediate product; A, W and bias
//   staged in shared memory). One warp per sample, no block barrier inside the sample loop:
//   each warp loads its sample's contiguous x into a private shared slice, forms the first
//   product there and writes the second (+ bias, activation) straight to global memory with
//   lanes over consecutive outputs (fully coalesced; a sample's N*Fo outputs are contiguous).
//   The op is memory bound: 8,192 samples of 14 x 5 -> 32 in fp32 read 2.3 MB and write
//   14.7 MB, about 6 us at ~3 TB/s on an H100, where the tiled kernel below took 24.3 us
//   (53.7 us for 14 x 32 -> 32) in its barrier-separated phases.
// * conv_kernel: everything else (one graph per group of samples, pooling to parent nodes,
//   large N*F). A block takes a tile of G samples. The shared graph A (when it fits) and W
//   (when it fits) are staged in shared memory once per block; the tile's x is loaded with
//   coalesced reads, the first product (A x or x W, the cheaper) goes to shared memory, the
//   second product plus bias and activation to shared memory too, and from there the tile is
//   written out once (and pooled to the parent level).
//
// * graph_conv_forward_tc (graph_conv_tc.cu): float32 with one shared graph, a weight, no
//   pooling and N, F, Fo <= 64, on the tensor cores with float32 accuracy, where the warp
//   kernel cannot take the call. H200, 8,192 samples: 14 x 32 -> 32 19.2 us (conv_kernel 54 us,
//   floor ~10 us), 62 x 64 -> 64 203 us (conv_kernel 669 us, floor ~87 us).
//
// * graph_conv_forward_wg (graph_conv_wg_sm90a.cu): the same op as tc with wgmma, on compute
//   capability 9.0, for F % 4 == 0. It multiplies every sample as 64 x 64 x 64 (padded), so
//   its time barely depends on the size: H100, 8,192 samples: 62 x 64 -> 64 116 us (tc 206 us),
//   14 x 32 -> 32 98 us (tc 19.5 us). The automatic choice takes it where the real products
//   are at least half the padded ones (wg_pays).
//
// AFFECTKIT_GRAPH_CUDA_PATH (read once) forces a kernel, for timing and tests: auto (the
// default: warp, else wg where it pays, else tc, else tiled), tiled (conv_kernel), warp, tc (TF32 + bf16 corrections),
// tc3 (3xTF32; 3-6 % slower than tc on the H200), wg (wgmma; builds with sm_90 only). A forced
// kernel that cannot take the call falls back to the automatic choice.
//
// Accumulation in float (double for double).
#include <algorithm>
#include <cstdlib>
#include <string>
#include <type_traits>

#include "../core/cuda_utils.cuh"
#include "../core/dispatch.h"
#include "graph.h"
#include "graph_conv_tc.h"

namespace affectkit::graph::detail {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxTile = 32;  // samples per block at most

template <typename A>
__device__ __forceinline__ A activate(A v, int act) {
  switch (act) {
    case 1: return v > A(0) ? v : A(0);
    case 2: return v > A(0) ? v : expm1(v);
    case 3: return v > A(0) ? v : v * A(0.01);
    case 4: return tanh(v);
    case 5: return A(1) / (A(1) + exp(-v));
    default: return v;
  }
}

// C_g = L_g R_g for g < G small products held in shared memory (L_g: rows x K, row stride
// ldl, sample stride sl (0: one L for all); R_g: K x cols). Each thread owns a 4 x 4 block of
// outputs (rows r0..r0+3, columns c0, c0+ct, c0+2ct, c0+3ct: neighbouring threads read
// neighbouring columns) and keeps it in registers, so every shared-memory value read feeds
// four multiply-adds instead of one. Reads past the edges are clamped and their results
// dropped; store(g, i, c, value) receives each valid output once.
template <typename A, typename Store>
__device__ __forceinline__ void tile_product(const A* L, int ldl, int sl, const A* R, int ldr, int sr,
                                             int G, int rows, int K, int cols, const Store& store) {
  const int rt = (rows + 3) / 4, ct = (cols + 3) / 4;
  const int per_g = rt * ct, items = G * per_g;
  for (int item = threadIdx.x; item < items; item += blockDim.x) {
    const int g = item / per_g, rem = item - g * per_g;
    const int r0 = (rem / ct) * 4, c0 = rem % ct;
    const A* Lg = L + g * sl;
    const A* Rg = R + g * sr;
    int li[4], rc[4];
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      li[u] = min(r0 + u, rows - 1) * ldl;
      rc[u] = min(c0 + ct * u, cols - 1);
    }
    A acc[4][4];
#pragma unroll
    for (int u = 0; u < 4; ++u)
#pragma unroll
      for (int w = 0; w < 4; ++w) acc[u][w] = A(0);
    for (int k = 0; k < K; ++k) {
      A a[4], b[4];
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        a[u] = Lg[li[u] + k];
        b[u] = Rg[k * ldr + rc[u]];
      }
#pragma unroll
      for (int u = 0; u < 4; ++u)
#pragma unroll
        for (int w = 0; w < 4; ++w) acc[u][w] += a[u] * b[w];
    }
#pragma unroll
    for (int u = 0; u < 4; ++u)
#pragma unroll
      for (int w = 0; w < 4; ++w) {
        const int i = r0 + u, c = c0 + ct * w;
        if (i < rows && c < cols) store(g, i, c, acc[u][w]);
      }
  }
}

template <typename T, typename A>
struct StoreOut {  // second product -> + bias, activation -> ys (G, N, Fo) and out
  A* ys;
  T* out;  // the tile's first output element
  const T* bias;
  int N, Fo, act;
  __device__ __forceinline__ void operator()(int g, int i, int c, A v) const {
    if (bias) v += A(to_float(bias[c]));
    v = activate(v, act);
    const int e = (g * N + i) * Fo + c;
    ys[e] = v;
    out[e] = store_as<T>(v);
  }
};

template <typename A>
struct StoreMid {  // first product -> mid (G, N, M)
  A* mid;
  int N, M;
  __device__ __forceinline__ void operator()(int g, int i, int c, A v) const { mid[(g * N + i) * M + c] = v; }
};

struct ConvShape {
  int64_t S, N, F, Fo, R, P;
  int act;
  int G;            // samples per tile
  bool a_in_smem;   // shared graph staged in shared memory
  bool w_in_smem;
  bool a_first;     // (A x) W, else A (x W)
};

// Shared memory layout (in accumulator elements): [A N*N][W F*Fo][x G*N*F][mid G*N*M][y G*N*Fo]
// with M = F for (A x) W and M = Fo for A (x W); plus G*N weights and N ints when pooling.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    conv_kernel(const T* __restrict__ x, const T* __restrict__ adj, const T* __restrict__ w,
                const T* __restrict__ bias, T* __restrict__ out, const int64_t* __restrict__ assignment,
                const T* __restrict__ scores, T* __restrict__ pooled, ConvShape sh) {
  using A = typename Acc<T>::type;
  extern __shared__ unsigned char smem_raw[];
  A* smem = reinterpret_cast<A*>(smem_raw);
  const int64_t N = sh.N, F = sh.F, Fo = sh.Fo, NN = N * N;
  const int64_t M = sh.a_first ? F : Fo;
  A* As = smem;
  A* Ws = As + (sh.a_in_smem ? NN : 0);
  A* xs = Ws + (sh.w_in_smem ? F * Fo : 0);
  A* mid = xs + sh.G * N * F;
  A* ys = mid + sh.G * N * M;
  A* pw = ys + sh.G * N * Fo;                              // pooling weights (G, N)
  int* parent = reinterpret_cast<int*>(pw + (assignment ? sh.G * N : 0));  // (N)
  const int tid = threadIdx.x;

  if (sh.a_in_smem)
    for (int64_t i = tid; i < NN; i += blockDim.x) As[i] = to_float(adj[i]);
  if (w && sh.w_in_smem)
    for (int64_t i = tid; i < F * Fo; i += blockDim.x) Ws[i] = to_float(w[i]);
  if (assignment)  // clamped: memory-safe even on unchecked input
    for (int64_t i = tid; i < N; i += blockDim.x) {
      const int64_t p = assignment[i];
      parent[i] = static_cast<int>(p < 0 ? 0 : (p >= sh.P ? sh.P - 1 : p));
    }

  for (int64_t s0 = static_cast<int64_t>(blockIdx.x) * sh.G; s0 < sh.S;
       s0 += static_cast<int64_t>(gridDim.x) * sh.G) {
    const int64_t g_count = min(static_cast<int64_t>(sh.G), sh.S - s0);
    __syncthreads();  // staging done / previous tile consumed
    for (int64_t i = tid; i < g_count * N * F; i += blockDim.x) xs[i] = to_float(x[s0 * N * F + i]);
    __syncthreads();
    // Tile sizes fit in int: the tile lives in shared memory.
    const int Gi = static_cast<int>(g_count), Ni = static_cast<int>(N), Fi = static_cast<int>(F),
              Foi = static_cast<int>(Fo);
    // First product into mid: (A x) (G, N, F) or (x W) (G, N, Fo).
    if (sh.a_first && sh.a_in_smem) {
      tile_product<A>(As, Ni, 0, xs, Fi, Ni * Fi, Gi, Ni, Ni, Fi, StoreMid<A>{mid, Ni, Fi});
    } else if (!sh.a_first && w && sh.w_in_smem) {
      tile_product<A>(xs, Fi, Ni * Fi, Ws, Foi, 0, Gi, Ni, Fi, Foi, StoreMid<A>{mid, Ni, Foi});
    } else
    for (int64_t e = tid; e < g_count * N * M; e += blockDim.x) {
      const int64_t g = e / (N * M), i = (e / M) % N, c = e % M;
      A acc = 0;
      if (sh.a_first) {
        const T* Ag = adj + ((s0 + g) / sh.R) * NN;
        for (int64_t j = 0; j < N; ++j) {
          const A a = sh.a_in_smem ? As[i * N + j] : A(to_float(Ag[i * N + j]));
          acc += a * xs[(g * N + j) * F + c];
        }
      } else {
        for (int64_t f = 0; f < F; ++f) {
          const A wv = sh.w_in_smem ? Ws[f * Fo + c] : A(to_float(w[f * Fo + c]));
          acc += xs[(g * N + i) * F + f] * wv;
        }
      }
      mid[e] = acc;
    }
    __syncthreads();
    // Second product, bias and activation into ys (G, N, Fo).
    const StoreOut<T, A> store_out{ys, out + s0 * N * Fo, bias, Ni, Foi, sh.act};
    if (w && sh.a_first && sh.w_in_smem) {
      tile_product<A>(mid, Fi, Ni * Fi, Ws, Foi, 0, Gi, Ni, Fi, Foi, store_out);
    } else if (w && !sh.a_first && sh.a_in_smem) {
      tile_product<A>(As, Ni, 0, mid, Foi, Ni * Foi, Gi, Ni, Ni, Foi, store_out);
    } else
    for (int64_t e = tid; e < g_count * N * Fo; e += blockDim.x) {
      const int64_t g = e / (N * Fo), i = (e / Fo) % N, o = e % Fo;
      A acc = 0;
      if (!w) {
        acc = mid[e];  // no weight: Fo == F and mid holds A x
      } else if (sh.a_first) {
        for (int64_t f = 0; f < F; ++f) {
          const A wv = sh.w_in_smem ? Ws[f * Fo + o] : A(to_float(w[f * Fo + o]));
          acc += mid[(g * N + i) * F + f] * wv;
        }
      } else {
        const T* Ag = adj + ((s0 + g) / sh.R) * NN;
        for (int64_t j = 0; j < N; ++j) {
          const A a = sh.a_in_smem ? As[i * N + j] : A(to_float(Ag[i * N + j]));
          acc += a * mid[(g * N + j) * Fo + o];
        }
      }
      if (bias) acc += A(to_float(bias[o]));
      acc = activate(acc, sh.act);
      ys[e] = acc;
      out[s0 * N * Fo + e] = store_as<T>(acc);
    }
    if (!assignment) continue;
    __syncthreads();
    // Child weights: 1 / count, or the softmax of the scores over the parent's children.
    for (int64_t e = tid; e < g_count * N; e += blockDim.x) {
      const int64_t g = e / N, c = e % N;
      const int p = parent[c];
      const T* sc = scores ? scores + (s0 + g) * N : nullptr;
      if (!sc) {
        int count = 0;
        for (int64_t j = 0; j < N; ++j) count += parent[j] == p;
        pw[e] = A(1) / A(count);
      } else {
        A m = -INFINITY;
        for (int64_t j = 0; j < N; ++j)
          if (parent[j] == p) m = max(m, A(to_float(sc[j])));
        A sum = 0;
        for (int64_t j = 0; j < N; ++j)
          if (parent[j] == p) sum += exp(A(to_float(sc[j])) - m);
        pw[e] = exp(A(to_float(sc[c])) - m) / sum;
      }
    }
    __syncthreads();
    for (int64_t e = tid; e < g_count * sh.P * Fo; e += blockDim.x) {
      const int64_t g = e / (sh.P * Fo), p = (e / Fo) % sh.P, o = e % Fo;
      A acc = 0;
      for (int64_t c = 0; c < N; ++c)
        if (parent[c] == p) acc += pw[g * N + c] * ys[(g * N + c) * Fo + o];
      pooled[s0 * sh.P * Fo + e] = store_as<T>(acc);
    }
  }
}

// ---------------------------------------------------------------------------------------
// Warp-per-sample kernel (shared graph, no pooling, small samples).
// ---------------------------------------------------------------------------------------

constexpr int kWarpSamplesPerBlock = kThreads / 32;
// Per-warp x + intermediate, at most. Larger samples (14 x 32 -> 32: 3.5 KB) ran slower here
// (62.3 us on an H100) than on the tiled kernel (53.7 us): a warp's serial products dominate.
constexpr int64_t kWarpSliceBytes = 2048;

// Blocks per SM to aim for: 8 x 256 threads (64 warps, 32 registers a thread) for float
// accumulation; double needs more registers.
template <typename T>
struct WarpMinBlocks {
  static constexpr int value = std::is_same_v<typename Acc<T>::type, double> ? 4 : 8;
};

// C = L R by one warp, everything in shared memory: L rows x K (row stride ldl), R K x cols
// (row stride ldr); store(i, c, value) receives each output once. When cols is a multiple of
// 32, lane l owns columns l, l + 32, ... and works through the rows four at a time, so each R
// value read feeds four multiply-adds (the L reads are broadcasts); consecutive lanes store
// consecutive columns of a row. Otherwise lanes take consecutive entries e = i * cols + c,
// with four independent partial sums over k.
template <typename A, typename Store>
__device__ __forceinline__ void warp_product(const A* L, int ldl, const A* R, int ldr, int rows,
                                             int K, int cols, int lane, const Store& store) {
  if (cols % 32 == 0) {
#pragma unroll 1
    for (int c = lane; c < cols; c += 32)
#pragma unroll 1
      for (int i0 = 0; i0 < rows; i0 += 4) {
        int li[4];
#pragma unroll
        for (int u = 0; u < 4; ++u) li[u] = min(i0 + u, rows - 1) * ldl;  // clamped, dropped
        A acc[4] = {A(0), A(0), A(0), A(0)};
#pragma unroll 1
        for (int k = 0; k < K; ++k) {
          const A r = R[k * ldr + c];
#pragma unroll
          for (int u = 0; u < 4; ++u) acc[u] += L[li[u] + k] * r;
        }
#pragma unroll
        for (int u = 0; u < 4; ++u)
          if (i0 + u < rows) store(i0 + u, c, acc[u]);
      }
  } else {
    const int total = rows * cols;
#pragma unroll 1
    for (int e = lane; e < total; e += 32) {
      const int i = e / cols, c = e - i * cols;
      const A* l = L + i * ldl;
      const A* r = R + c;
      A a0 = A(0), a1 = A(0), a2 = A(0), a3 = A(0);
      int k = 0;
#pragma unroll 1
      for (; k + 4 <= K; k += 4) {
        a0 += l[k] * r[k * ldr];
        a1 += l[k + 1] * r[(k + 1) * ldr];
        a2 += l[k + 2] * r[(k + 2) * ldr];
        a3 += l[k + 3] * r[(k + 3) * ldr];
      }
#pragma unroll 1
      for (; k < K; ++k) a0 += l[k] * r[k * ldr];
      store(i, c, (a0 + a1) + (a2 + a3));
    }
  }
}

template <typename A>
struct WarpStoreMid {  // first product -> the warp's intermediate (row stride ld)
  A* mid;
  int ld;
  __device__ __forceinline__ void operator()(int i, int c, A v) const { mid[i * ld + c] = v; }
};

template <typename T, typename A, int Act>
struct WarpStoreOut {  // + bias, activation -> the sample's output (N, Fo) in global memory
  T* out;
  const A* bias;  // Fo values in shared memory (zeros without a bias)
  int Fo;
  __device__ __forceinline__ void operator()(int i, int c, A v) const {
    out[i * Fo + c] = store_as<T>(activate(v + bias[c], Act));
  }
};

// Shared memory (accumulator elements): [A N*N][W F*Fo (with a weight)][bias Fo], then per
// warp [x N*F][mid N*M (with a weight)]; M = F for (A x) W, Fo for A (x W). Without a weight
// the single product A x goes straight to the output. The activation is a template argument:
// with a run-time switch the union of every activation's temporaries did not fit 32 registers.
// kPrefetch (AFFECTKIT_GRAPH_WARP_SPW > 0, not yet run on a GPU): each warp loads the first
// 128 elements of its first sample's x before the block stages A, W and the bias, and those of
// its next sample before this one's products, so that load latency overlaps other work. With
// one sample a warp (the default grid), every warp's load, products and stores follow one
// another: 8,192 x 14 x 5 -> 32 took 14.7-15.0 us on H100/H200s for 17 MB (~4 us at DRAM rate).
// kPrefetch's held loads do not fit the 32 registers of 8 blocks an SM (68 bytes of spills; at
// 6 blocks still 4-12): it aims for half the blocks.
template <typename T, int Act, bool kPrefetch>
__global__ void __launch_bounds__(kThreads, kPrefetch ? WarpMinBlocks<T>::value / 2 : WarpMinBlocks<T>::value)
    warp_conv_kernel(const T* __restrict__ x, const T* __restrict__ adj, const T* __restrict__ w,
                     const T* __restrict__ bias, T* __restrict__ out, int64_t S, int N, int F,
                     int Fo, bool a_first) {
  using A = typename Acc<T>::type;
  extern __shared__ unsigned char smem_raw[];
  A* As = reinterpret_cast<A*>(smem_raw);
  A* Ws = As + N * N;
  A* bs = Ws + (w ? F * Fo : 0);
  const int M = w ? (a_first ? F : Fo) : 0;
  const int NF = N * F;
  const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
  A* xs = bs + Fo + warp * (NF + N * M);
  A* mid = xs + NF;
  // kPrefetch: elements lane + 32 u (u < 4) of a sample's x, loaded ahead (zeros past NF).
  A ahead[4];
  auto load_ahead = [&](int64_t s) {
    const T* xg = x + s * NF;
#pragma unroll
    for (int u = 0; u < 4; ++u) ahead[u] = lane + 32 * u < NF ? A(to_float(xg[lane + 32 * u])) : A(0);
  };
  if constexpr (kPrefetch) {
    const int64_t s_first = static_cast<int64_t>(blockIdx.x) * kWarpSamplesPerBlock + warp;
    if (s_first < S) load_ahead(s_first);
  }

  for (int i = threadIdx.x; i < N * N; i += blockDim.x) As[i] = to_float(adj[i]);
  if (w)
    for (int i = threadIdx.x; i < F * Fo; i += blockDim.x) Ws[i] = to_float(w[i]);
  for (int i = threadIdx.x; i < Fo; i += blockDim.x) bs[i] = bias ? A(to_float(bias[i])) : A(0);
  __syncthreads();

  for (int64_t s = static_cast<int64_t>(blockIdx.x) * kWarpSamplesPerBlock + warp; s < S;
       s += static_cast<int64_t>(gridDim.x) * kWarpSamplesPerBlock) {
    const T* xg = x + s * NF;
    if constexpr (kPrefetch) {
#pragma unroll
      for (int u = 0; u < 4; ++u)
        if (lane + 32 * u < NF) xs[lane + 32 * u] = ahead[u];
    }
    // Four loads in flight per lane before any is stored (one memory latency, not NF / 32).
    for (int i0 = lane + (kPrefetch ? 128 : 0); i0 < NF; i0 += 128) {
      A v[4];
#pragma unroll
      for (int u = 0; u < 4; ++u) v[u] = i0 + 32 * u < NF ? A(to_float(xg[i0 + 32 * u])) : A(0);
#pragma unroll
      for (int u = 0; u < 4; ++u)
        if (i0 + 32 * u < NF) xs[i0 + 32 * u] = v[u];
    }
    __syncwarp();
    if constexpr (kPrefetch) {  // lands during these products
      const int64_t next = s + static_cast<int64_t>(gridDim.x) * kWarpSamplesPerBlock;
      if (next < S) load_ahead(next);
    }
    const WarpStoreOut<T, A, Act> store_out{out + s * N * Fo, bs, Fo};
    if (!w) {  // Fo == F
      warp_product<A>(As, N, xs, F, N, N, F, lane, store_out);
    } else if (a_first) {  // (A x) W
      warp_product<A>(As, N, xs, F, N, N, F, lane, WarpStoreMid<A>{mid, F});
      __syncwarp();
      warp_product<A>(mid, F, Ws, Fo, N, F, Fo, lane, store_out);
    } else {  // A (x W)
      warp_product<A>(xs, F, Ws, Fo, N, F, Fo, lane, WarpStoreMid<A>{mid, Fo});
      __syncwarp();
      warp_product<A>(As, N, mid, Fo, N, N, Fo, lane, store_out);
    }
    __syncwarp();  // every lane is done with xs and mid before the next sample overwrites them
  }
}

enum class Path { Auto, Tiled, Warp, Tc, Tc3, Wg };

// Whether the wgmma kernel beats tc on a sample of N x F -> Fo: it always does two 64 x 64 x 64
// products (2 x 64^3 multiply-adds), tc the real ones (the cheaper order, as a_first), at about
// half wg's rate per multiply-add (H100: 206 us against 116 us at 62 x 64 -> 64, nearly the
// padded size). So wg pays once the real work is at least half the padded work.
bool wg_pays(int64_t N, int64_t F, int64_t Fo) {
  const int64_t real = N * F * Fo + N * N * std::min(F, Fo);
  return real >= int64_t{64} * 64 * 64;  // half of the padded 2 x 64^3
}

// Thrown again on every call while the variable holds a bad value (a throwing static
// initialisation is retried).
Path forced_path() {
  static const Path path = [] {
    const char* env = std::getenv("AFFECTKIT_GRAPH_CUDA_PATH");
    const std::string v = env ? env : "";
    if (v.empty() || v == "auto") return Path::Auto;
    if (v == "tiled") return Path::Tiled;
    if (v == "warp") return Path::Warp;
    if (v == "tc") return Path::Tc;
    if (v == "tc3") return Path::Tc3;
    if (v == "wg") return Path::Wg;
    throw ValueError("AFFECTKIT_GRAPH_CUDA_PATH: expected auto, tiled, warp, tc, tc3 or wg, got '" + v + "'");
  }();
  return path;
}

int max_shared_bytes() {
  int device = 0, bytes = 0;
  cuda_check(cudaGetDevice(&device), "cudaGetDevice");
  cuda_check(cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device),
             "cudaDeviceGetAttribute");
  return bytes;
}

}  // namespace

void graph_conv_forward_cuda(DType dtype, const void* x, const void* adj, const void* w,
                             const void* bias, void* out, int64_t S, int64_t N, int64_t F,
                             int64_t Fo, int64_t B, Activation act, const int64_t* assignment,
                             const void* scores, void* pooled, int64_t P, uintptr_t stream) {
  if (S == 0 || N == 0) return;
  const Path path = forced_path();
  AFFECTKIT_DISPATCH_CUDA_FLOAT(dtype, "x", T, [&] {
    using Acc_t = typename Acc<T>::type;
    const int64_t e = sizeof(Acc_t);
    const int64_t limit = max_shared_bytes();
    int device = 0, sms = 0;
    cuda_check(cudaGetDevice(&device), "cudaGetDevice");
    cuda_check(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device), "cudaDeviceGetAttribute");
    const bool a_first = F <= Fo;

    // Shared graph, no pooling, small samples: one warp per sample (see the top of the file).
    const int64_t warp_slice = (N * F + (w ? N * (a_first ? F : Fo) : 0)) * e;
    const int64_t warp_fixed = (N * N + (w ? F * Fo : 0) + Fo) * e;
    const int64_t warp_bytes = warp_fixed + kWarpSamplesPerBlock * warp_slice;
    const bool warp_ok =
        B == 1 && assignment == nullptr && warp_slice <= kWarpSliceBytes && warp_bytes <= limit / 2;
    // Tensor cores: float32, shared graph, a weight, no pooling (graph_conv_forward_tc checks
    // the sizes and returns false, launching nothing, when they do not fit).
    auto try_tc = [&](TcSplit split) {
      return std::is_same_v<T, float> && B == 1 && assignment == nullptr && w != nullptr &&
             graph_conv_forward_tc(split, static_cast<const float*>(x), static_cast<const float*>(adj),
                                   static_cast<const float*>(w), static_cast<const float*>(bias),
                                   static_cast<float*>(out), S, N, F, Fo, act, stream);
    };
#ifdef AFFECTKIT_WITH_SM90A
    if constexpr (std::is_same_v<T, float>) {
      const bool wg_wanted = path == Path::Wg || (path == Path::Auto && !warp_ok && wg_pays(N, F, Fo));
      if (wg_wanted && B == 1 && assignment == nullptr && w != nullptr &&
          graph_conv_forward_wg(static_cast<const float*>(x), static_cast<const float*>(adj),
                                static_cast<const float*>(w), static_cast<const float*>(bias),
                                static_cast<float*>(out), S, N, F, Fo, act, stream))
        return;
    }
#endif
    if (path == Path::Tc && try_tc(TcSplit::Tf32Bf16)) return;
    if (path == Path::Tc3 && try_tc(TcSplit::Tf32x3)) return;
    // A forced wg that declined the call (F % 4 != 0, another GPU) takes the automatic choice.
    if ((path == Path::Auto || path == Path::Wg) && !warp_ok && try_tc(TcSplit::Tf32Bf16)) return;
    if (path != Path::Tiled && warp_ok) {
      // AFFECTKIT_GRAPH_WARP_SPW (read on every call, so that a bad value raises wherever it is
      // set): 0 (default) the kernel without kPrefetch, one sample a warp where the grid allows;
      // n >= 1 the kPrefetch kernel with about n samples a warp (a grid n times smaller).
      const int spw = env_knob("AFFECTKIT_GRAPH_WARP_SPW", 0, 0, 16);
      using WarpKernel = void (*)(const T*, const T*, const T*, const T*, T*, int64_t, int, int, int, bool);
      auto pick = [&](auto prefetch) -> WarpKernel {
        constexpr bool kP = decltype(prefetch)::value;
        switch (act) {
          case Activation::ReLU: return warp_conv_kernel<T, 1, kP>;
          case Activation::ELU: return warp_conv_kernel<T, 2, kP>;
          case Activation::LeakyReLU: return warp_conv_kernel<T, 3, kP>;
          case Activation::Tanh: return warp_conv_kernel<T, 4, kP>;
          case Activation::Sigmoid: return warp_conv_kernel<T, 5, kP>;
          default: return warp_conv_kernel<T, 0, kP>;
        }
      };
      const WarpKernel kernel = spw > 0 ? pick(std::true_type{}) : pick(std::false_type{});
      if (warp_bytes > 48 * 1024)
        cuda_check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(warp_bytes)),
                   "graph_conv_forward (shared memory)");
      int per_sm = 0;
      cuda_check(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads,
                                                               static_cast<size_t>(warp_bytes)),
                 "graph_conv_forward (occupancy)");
      const int64_t resident = std::max<int64_t>(1, static_cast<int64_t>(per_sm) * sms);
      const int64_t per_block = int64_t{kWarpSamplesPerBlock} * std::max(spw, 1);
      const int64_t wanted = (S + per_block - 1) / per_block;
      const unsigned blocks = static_cast<unsigned>(std::min<int64_t>({wanted, resident, 1 << 20}));
      // Sizes fit in int: A, W and bias fit in shared memory and N * F, N * M are capped.
      kernel<<<blocks, kThreads, warp_bytes, as_stream(stream)>>>(
          static_cast<const T*>(x), static_cast<const T*>(adj), static_cast<const T*>(w),
          static_cast<const T*>(bias), static_cast<T*>(out), S, static_cast<int>(N),
          static_cast<int>(F), static_cast<int>(Fo), a_first);
      return;
    }

    ConvShape sh{S, N, F, Fo, S / B, P, static_cast<int>(act), 1, false, false, a_first};
    // Stage A when one graph serves every sample and it takes at most a quarter of the budget.
    sh.a_in_smem = B == 1 && N * N * e <= limit / 4;
    sh.w_in_smem = w != nullptr && F * Fo * e <= limit / 4;
    const int64_t M = sh.a_first ? F : Fo;
    const int64_t fixed = (sh.a_in_smem ? N * N : 0) * e + (sh.w_in_smem ? F * Fo : 0) * e +
                          (assignment ? N * 4 + 16 : 0);
    const int64_t per_sample = (N * F + N * M + N * Fo + (assignment ? N : 0)) * e;
    if (fixed + per_sample > limit)
      throw ValueError("x: graph_conv on CUDA needs " + std::to_string(fixed + per_sample) +
                       " bytes of shared memory for one sample (N = " + std::to_string(N) +
                       ", F = " + std::to_string(F) + ", F_out = " + std::to_string(Fo) +
                       "), more than this GPU's " + std::to_string(limit));
    // Enough samples per tile for about 16 outputs per thread (one 4 x 4 register block),
    // within the shared-memory budget: a block per sample left most threads idle and
    // restaged A and W for every sample (64 us for 8,192 x 14 x 5 -> 32 on an H100).
    const int64_t want = std::max<int64_t>(1, (16 * kThreads) / std::max<int64_t>(1, N * std::max(F, Fo)));
    sh.G = static_cast<int>(std::min<int64_t>({kMaxTile, want, (limit - fixed) / per_sample, S}));
    const int64_t bytes = fixed + sh.G * per_sample;
    auto kernel = conv_kernel<T>;
    cuda_check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                    static_cast<int>(bytes)),
               "graph_conv_forward (shared memory)");
    // At most the blocks that can be resident at once: each stages A and W once and then
    // loops over tiles, instead of every tile restaging them.
    const int64_t tiles = (S + sh.G - 1) / sh.G;
    int per_sm = 0;
    cuda_check(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, static_cast<size_t>(bytes)),
               "graph_conv_forward (occupancy)");
    const int64_t resident = std::max<int64_t>(1, static_cast<int64_t>(per_sm) * sms);
    const unsigned blocks = static_cast<unsigned>(std::min<int64_t>({tiles, resident, 1 << 20}));
    kernel<<<blocks, kThreads, bytes, as_stream(stream)>>>(
        static_cast<const T*>(x), static_cast<const T*>(adj), static_cast<const T*>(w),
        static_cast<const T*>(bias), static_cast<T*>(out), assignment,
        static_cast<const T*>(scores), static_cast<T*>(pooled), sh);
  });
  cuda_check(cudaGetLastError(), "graph_conv_forward");
}

}  // namespace affectkit::graph::detail
