// CUDA path of cheb_graph_conv's forward. A block takes a tile of G samples and runs the
// recursion X_k = 2 L X_{k-1} - X_{k-2} in three rotating shared-memory buffers, adding each
// term's contribution (theta_k X_k or X_k Theta_k) to an accumulator tile written out once.
#include <algorithm>
#include <string>
#include <type_traits>

#include "../core/cuda_utils.cuh"
#include "../core/dispatch.h"
#include "graph.h"

namespace affectkit::graph::detail {
namespace {

constexpr int kThreads = 256;

struct ChebShape {
  int64_t S, N, F, Fo, K;
  bool matrix;
  bool l_in_smem;
  int G;
};

// Shared memory: [L N*N][X 3 * G*N*F][acc G*N*Fo]
template <typename T>
__global__ void __launch_bounds__(kThreads)
    cheb_kernel(const T* __restrict__ x, const T* __restrict__ lap, const T* __restrict__ coef,
                T* __restrict__ out, ChebShape sh) {
  using A = typename Acc<T>::type;
  extern __shared__ unsigned char smem_raw[];
  A* smem = reinterpret_cast<A*>(smem_raw);
  const int64_t N = sh.N, F = sh.F, Fo = sh.Fo, tile = sh.G * N * F;
  A* Ls = smem;
  A* X = Ls + (sh.l_in_smem ? N * N : 0);
  A* acc = X + 3 * tile;
  const int tid = threadIdx.x;
  if (sh.l_in_smem)
    for (int64_t i = tid; i < N * N; i += blockDim.x) Ls[i] = to_float(lap[i]);
  for (int64_t s0 = static_cast<int64_t>(blockIdx.x) * sh.G; s0 < sh.S;
       s0 += static_cast<int64_t>(gridDim.x) * sh.G) {
    const int64_t gc = min(static_cast<int64_t>(sh.G), sh.S - s0);
    __syncthreads();
    for (int64_t i = tid; i < gc * N * F; i += blockDim.x) X[i] = to_float(x[s0 * N * F + i]);
    for (int64_t i = tid; i < gc * N * Fo; i += blockDim.x) acc[i] = 0;
    __syncthreads();
    for (int64_t k = 0; k < sh.K; ++k) {
      A* cur = X + (k % 3) * tile;
      if (k >= 1) {  // cur = c L prev - prevprev, c = 1 for k = 1 else 2
        const A* prev = X + ((k - 1) % 3) * tile;
        const A* prev2 = X + ((k + 1) % 3) * tile;  // (k - 2) mod 3
        for (int64_t e = tid; e < gc * N * F; e += blockDim.x) {
          const int64_t g = e / (N * F), i = (e / F) % N, f = e % F;
          A v = 0;
          for (int64_t j = 0; j < N; ++j) {
            const A l = sh.l_in_smem ? Ls[i * N + j] : A(to_float(lap[i * N + j]));
            v += l * prev[(g * N + j) * F + f];
          }
          cur[e] = k == 1 ? v : A(2) * v - prev2[e];
        }
        __syncthreads();
      }
      for (int64_t e = tid; e < gc * N * Fo; e += blockDim.x) {
        if (sh.matrix) {
          const int64_t g = e / (N * Fo), i = (e / Fo) % N, o = e % Fo;
          A v = 0;
          for (int64_t f = 0; f < F; ++f)
            v += cur[(g * N + i) * F + f] * A(to_float(coef[(k * F + f) * Fo + o]));
          acc[e] += v;
        } else {
          acc[e] += A(to_float(coef[k])) * cur[e];
        }
      }
      __syncthreads();  // cur is overwritten two steps later; acc is per-thread
    }
    for (int64_t i = tid; i < gc * N * Fo; i += blockDim.x) out[s0 * N * Fo + i] = store_as<T>(acc[i]);
  }
}

int max_shared_bytes() {
  int device = 0, bytes = 0;
  cuda_check(cudaGetDevice(&device), "cudaGetDevice");
  cuda_check(cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device),
             "cudaDeviceGetAttribute");
  return bytes;
}

}  // namespace

void cheb_graph_conv_forward_cuda(DType dtype, const void* x, const void* lap, const void* coef,
                                  void* out, int64_t S, int64_t N, int64_t F, int64_t Fo,
                                  int64_t K, bool matrix, uintptr_t stream) {
  if (S == 0 || N == 0) return;
  AFFECTKIT_DISPATCH_CUDA_FLOAT(dtype, "x", T, [&] {
    using Acc_t = typename Acc<T>::type;
    const int64_t e = sizeof(Acc_t);
    const int64_t limit = max_shared_bytes();
    ChebShape sh{S, N, F, Fo, K, matrix, N * N * e <= limit / 4, 1};
    const int64_t fixed = (sh.l_in_smem ? N * N : 0) * e;
    const int64_t per_sample = (3 * N * F + N * Fo) * e;
    if (fixed + per_sample > limit)
      throw ValueError("x: cheb_graph_conv on CUDA needs " + std::to_string(fixed + per_sample) +
                       " bytes of shared memory for one sample (N = " + std::to_string(N) +
                       ", F = " + std::to_string(F) + "), more than this GPU's " +
                       std::to_string(limit));
    const int64_t want = std::max<int64_t>(1, (2 * kThreads) / std::max<int64_t>(1, N * std::max(F, Fo)));
    sh.G = static_cast<int>(std::min<int64_t>({32, want, (limit - fixed) / per_sample, S}));
    const int64_t bytes = fixed + sh.G * per_sample;
    auto kernel = cheb_kernel<T>;
    cuda_check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                    static_cast<int>(bytes)),
               "cheb_graph_conv_forward (shared memory)");
    const int64_t tiles = (S + sh.G - 1) / sh.G;
    kernel<<<static_cast<unsigned>(std::min<int64_t>(tiles, 1 << 20)), kThreads, bytes,
             as_stream(stream)>>>(static_cast<const T*>(x), static_cast<const T*>(lap),
                                  static_cast<const T*>(coef), static_cast<T*>(out), sh);
  });
  cuda_check(cudaGetLastError(), "cheb_graph_conv_forward");
}

}  // namespace affectkit::graph::detail
