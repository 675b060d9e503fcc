// CUDA path of hierarchical_pool (forward and backward). One thread per output element; the
// graphs are tiny, so each thread scans the N children for its parent (indices clamped to
// [0, P): memory-safe on unchecked input) and recomputes the child weights it needs.
#include <algorithm>
#include <type_traits>

#include "../core/cuda_utils.cuh"
#include "../core/dispatch.h"
#include "graph.h"

namespace affectkit::graph::detail {
namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ int64_t parent_of(const int64_t* assignment, int64_t c, int64_t P) {
  const int64_t p = assignment[c];
  return p < 0 ? 0 : (p >= P ? P - 1 : p);
}

// Softmax max and normaliser over the children of p (scores of one sample), or the count.
template <typename T, typename A>
__device__ void parent_stats(const int64_t* assignment, const T* sc, int64_t N, int64_t P,
                             int64_t p, A* m, A* norm) {
  A mx = sc ? A(-INFINITY) : A(0), sum = 0;
  if (sc)
    for (int64_t c = 0; c < N; ++c)
      if (parent_of(assignment, c, P) == p) mx = max(mx, A(to_float(sc[c])));
  for (int64_t c = 0; c < N; ++c)
    if (parent_of(assignment, c, P) == p) sum += sc ? exp(A(to_float(sc[c])) - mx) : A(1);
  *m = mx;
  *norm = sum;
}

template <typename T, typename A>
__device__ __forceinline__ A child_weight(const T* sc, int64_t c, A m, A norm) {
  return (sc ? exp(A(to_float(sc[c])) - m) : A(1)) / norm;
}

template <typename T>
__global__ void pool_forward_kernel(const T* __restrict__ x, const int64_t* __restrict__ assignment,
                                    const T* __restrict__ scores, T* __restrict__ out, int64_t S,
                                    int64_t N, int64_t F, int64_t P) {
  using A = typename Acc<T>::type;
  const int64_t total = S * P * F;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t s = e / (P * F), p = (e / F) % P, f = e % F;
    const T* sc = scores ? scores + s * N : nullptr;
    A m, norm;
    parent_stats(assignment, sc, N, P, p, &m, &norm);
    A acc = 0;
    for (int64_t c = 0; c < N; ++c)
      if (parent_of(assignment, c, P) == p)
        acc += child_weight(sc, c, m, norm) * A(to_float(x[(s * N + c) * F + f]));
    out[e] = store_as<T>(acc);
  }
}

// grad_x[s, c, f] = w[s, c] g[s, p(c), f]
template <typename T>
__global__ void pool_grad_x_kernel(const T* __restrict__ g, const int64_t* __restrict__ assignment,
                                   const T* __restrict__ scores, T* __restrict__ gx, int64_t S,
                                   int64_t N, int64_t F, int64_t P) {
  using A = typename Acc<T>::type;
  const int64_t total = S * N * F;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t s = e / (N * F), c = (e / F) % N, f = e % F;
    const int64_t p = parent_of(assignment, c, P);
    const T* sc = scores ? scores + s * N : nullptr;
    A m, norm;
    parent_stats(assignment, sc, N, P, p, &m, &norm);
    gx[e] = store_as<T>(child_weight(sc, c, m, norm) * A(to_float(g[(s * P + p) * F + f])));
  }
}

// grad_scores[s, c] = w_c (d_c - sum_c' w_c' d_c'), d_c = <g[s, p], x[s, c]>
template <typename T>
__global__ void pool_grad_scores_kernel(const T* __restrict__ g, const T* __restrict__ x,
                                        const int64_t* __restrict__ assignment,
                                        const T* __restrict__ scores, T* __restrict__ gs,
                                        int64_t S, int64_t N, int64_t F, int64_t P) {
  using A = typename Acc<T>::type;
  const int64_t total = S * N;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t s = e / N, c = e % N;
    const int64_t p = parent_of(assignment, c, P);
    const T* sc = scores + s * N;
    const T* gp = g + (s * P + p) * F;
    A m, norm;
    parent_stats(assignment, sc, N, P, p, &m, &norm);
    A dbar = 0, dc = 0;
    for (int64_t c2 = 0; c2 < N; ++c2) {
      if (parent_of(assignment, c2, P) != p) continue;
      A d = 0;
      for (int64_t f = 0; f < F; ++f) d += A(to_float(gp[f])) * A(to_float(x[(s * N + c2) * F + f]));
      dbar += child_weight(sc, c2, m, norm) * d;
      if (c2 == c) dc = d;
    }
    gs[e] = store_as<T>(child_weight(sc, c, m, norm) * (dc - dbar));
  }
}

unsigned grid_for(int64_t total) {
  return static_cast<unsigned>(std::min<int64_t>((total + kThreads - 1) / kThreads, 65536));
}

}  // namespace

void hierarchical_pool_forward_cuda(DType dtype, const void* x, const int64_t* assignment,
                                    const void* scores, void* out, int64_t S, int64_t N,
                                    int64_t F, int64_t P, uintptr_t stream) {
  const int64_t total = S * P * F;
  if (total == 0) return;
  AFFECTKIT_DISPATCH_CUDA_FLOAT(dtype, "x", T, [&] {
    pool_forward_kernel<T><<<grid_for(total), kThreads, 0, as_stream(stream)>>>(
        static_cast<const T*>(x), assignment, static_cast<const T*>(scores), static_cast<T*>(out),
        S, N, F, P);
  });
  cuda_check(cudaGetLastError(), "hierarchical_pool_forward");
}

void hierarchical_pool_backward_cuda(DType dtype, const void* g, const void* x,
                                     const int64_t* assignment, const void* scores, void* gx,
                                     void* gs, int64_t S, int64_t N, int64_t F, int64_t P,
                                     uintptr_t stream) {
  if (P == 0) return;  // then N == 0 too (every child has a parent): nothing to write
  AFFECTKIT_DISPATCH_CUDA_FLOAT(dtype, "grad_out", T, [&] {
    if (gx && S * N * F > 0)
      pool_grad_x_kernel<T><<<grid_for(S * N * F), kThreads, 0, as_stream(stream)>>>(
          static_cast<const T*>(g), assignment, static_cast<const T*>(scores), static_cast<T*>(gx),
          S, N, F, P);
    if (gs && S * N > 0)
      pool_grad_scores_kernel<T><<<grid_for(S * N), kThreads, 0, as_stream(stream)>>>(
          static_cast<const T*>(g), static_cast<const T*>(x), assignment,
          static_cast<const T*>(scores), static_cast<T*>(gs), S, N, F, P);
  });
  cuda_check(cudaGetLastError(), "hierarchical_pool_backward");
}

}  // namespace affectkit::graph::detail
