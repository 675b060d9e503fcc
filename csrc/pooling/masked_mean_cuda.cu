// CUDA path of masked_mean.
#include <algorithm>
#include <string>
#include <type_traits>

#include "../core/cuda_utils.cuh"
#include "../core/dispatch.h"
#include "pooling.h"

namespace affectkit::pooling::detail {
namespace {

constexpr int kCols = 32;  // feature columns per block (one warp wide: coalesced rows)
constexpr int kRows = 8;   // time steps summed in parallel, then reduced in shared memory

__device__ __forceinline__ int64_t clamp_length(int64_t n, int64_t L) {
  return n < 0 ? 0 : (n > L ? L : n);
}

template <typename T>
__global__ void forward_kernel(const T* __restrict__ x, const int64_t* __restrict__ lengths,
                               T* __restrict__ out, int64_t L, int64_t F) {
  using A = typename Acc<T>::type;
  __shared__ A partial[kRows][kCols];
  const int64_t b = blockIdx.y;
  const int64_t f = static_cast<int64_t>(blockIdx.x) * kCols + threadIdx.x;
  const int64_t n = clamp_length(lengths[b], L);
  A acc = 0;
  if (f < F)
    for (int64_t t = threadIdx.y; t < n; t += kRows) acc += to_float(x[(b * L + t) * F + f]);
  partial[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && f < F) {
    for (int r = 1; r < kRows; ++r) acc += partial[r][threadIdx.x];
    const A mean = n > 0 ? acc / static_cast<A>(n) : A(0);
    out[b * F + f] = store_as<T>(mean);
  }
}

template <typename T>
__global__ void backward_kernel(const T* __restrict__ g, const int64_t* __restrict__ lengths,
                                T* __restrict__ gx, int64_t B, int64_t L, int64_t F) {
  using A = typename Acc<T>::type;
  const int64_t total = B * L * F;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t f = i % F, t = (i / F) % L, b = i / (F * L);
    const int64_t n = clamp_length(lengths[b], L);
    A v = t < n ? to_float(g[b * F + f]) / static_cast<A>(n) : A(0);
    gx[i] = store_as<T>(v);
  }
}

}  // namespace

void masked_mean_forward_cuda(DType dtype, const void* x, const int64_t* lengths, void* out,
                              int64_t B, int64_t L, int64_t F, uintptr_t stream) {
  if (B == 0 || F == 0) return;
  if (B > 65535) throw ValueError("B: expected at most 65535 sequences on CUDA, got " + std::to_string(B));
  AFFECTKIT_DISPATCH_CUDA_FLOAT(dtype, "x", T, [&] {
    dim3 grid(static_cast<unsigned>((F + kCols - 1) / kCols), static_cast<unsigned>(B));
    forward_kernel<T><<<grid, dim3(kCols, kRows), 0, as_stream(stream)>>>(
        static_cast<const T*>(x), lengths, static_cast<T*>(out), L, F);
  });
  cuda_check(cudaGetLastError(), "masked_mean_forward");
}

void masked_mean_backward_cuda(DType dtype, const void* g, const int64_t* lengths, void* gx,
                               int64_t B, int64_t L, int64_t F, uintptr_t stream) {
  const int64_t total = B * L * F;
  if (total == 0) return;
  AFFECTKIT_DISPATCH_CUDA_FLOAT(dtype, "grad_out", T, [&] {
    const int threads = 256;
    const int64_t blocks = std::min<int64_t>((total + threads - 1) / threads, 65536);
    backward_kernel<T><<<static_cast<unsigned>(blocks), threads, 0, as_stream(stream)>>>(
        static_cast<const T*>(g), lengths, static_cast<T*>(gx), B, L, F);
  });
  cuda_check(cudaGetLastError(), "masked_mean_backward");
}

}  // namespace affectkit::pooling::detail
