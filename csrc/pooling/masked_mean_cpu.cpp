// CPU path of masked_mean, and the device dispatch with boundary validation.
#include <algorithm>
#include <string>

#include "../core/dispatch.h"
#include "pooling.h"

namespace affectkit::pooling {
namespace {

void validate(const char* fn, Device device, const int64_t* lengths, int64_t B, int64_t L,
              int64_t F) {
  check_dims_nonnegative("B", B);
  check_dims_nonnegative("L", L);
  check_dims_nonnegative("F", F);
  check_pointer("lengths", lengths, B);
  if (device == Device::CUDA) check_cuda_compiled(fn);
  if (device == Device::CPU) {
    for (int64_t i = 0; i < B; ++i)
      if (lengths[i] < 0 || lengths[i] > L)
        throw ValueError("lengths: expected values in [0, " + std::to_string(L) + "], got lengths[" +
                         std::to_string(i) + "] = " + std::to_string(lengths[i]));
  }
}

// Sum rows [0, n) of a (n, F) block into acc (F); compiled per instruction set.
template <typename T>
AFFECTKIT_SIMD_CLONES void sum_rows(const T* __restrict x, int64_t n, int64_t F, int64_t f0,
                                    int64_t f1, T* __restrict acc) {
  for (int64_t f = f0; f < f1; ++f) acc[f - f0] = T(0);
  for (int64_t t = 0; t < n; ++t) {
    const T* row = x + t * F;
    for (int64_t f = f0; f < f1; ++f) acc[f - f0] += row[f];
  }
}

constexpr int64_t kFeatureBlock = 256;  // columns per task: one L1-resident accumulator

template <typename T>
void forward(const T* x, const int64_t* lengths, T* out, int64_t B, int64_t L, int64_t F) {
  const int64_t nblocks = (F + kFeatureBlock - 1) / kFeatureBlock;
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t blk = 0; blk < nblocks; ++blk) {
      const int64_t f0 = blk * kFeatureBlock, f1 = std::min(F, f0 + kFeatureBlock);
      const int64_t n = lengths[b];
      T* dst = out + b * F + f0;
      sum_rows(x + b * L * F, n, F, f0, f1, dst);
      const T inv = n > 0 ? T(1) / T(n) : T(0);
      for (int64_t f = 0; f < f1 - f0; ++f) dst[f] *= inv;
    }
  }
}

template <typename T>
void backward(const T* g, const int64_t* lengths, T* gx, int64_t B, int64_t L, int64_t F) {
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t t = 0; t < L; ++t) {
      const int64_t n = lengths[b];
      T* dst = gx + (b * L + t) * F;
      if (t < n) {
        const T inv = T(1) / T(n);
        const T* src = g + b * F;
        for (int64_t f = 0; f < F; ++f) dst[f] = src[f] * inv;
      } else {
        std::fill(dst, dst + F, T(0));
      }
    }
  }
}

}  // namespace

namespace detail {
void masked_mean_forward_cpu(DType dtype, const void* x, const int64_t* lengths, void* out,
                             int64_t B, int64_t L, int64_t F) {
  AFFECTKIT_DISPATCH_CPU_FLOAT(dtype, "x", T, [&] {
    forward(static_cast<const T*>(x), lengths, static_cast<T*>(out), B, L, F);
  });
}
void masked_mean_backward_cpu(DType dtype, const void* g, const int64_t* lengths, void* gx,
                              int64_t B, int64_t L, int64_t F) {
  AFFECTKIT_DISPATCH_CPU_FLOAT(dtype, "grad_out", T, [&] {
    backward(static_cast<const T*>(g), lengths, static_cast<T*>(gx), B, L, F);
  });
}
}  // namespace detail

void masked_mean_forward(Device device, DType dtype, const void* x, const int64_t* lengths,
                         void* out, int64_t B, int64_t L, int64_t F, uintptr_t stream) {
  validate("masked_mean_forward", device, lengths, B, L, F);
  check_pointer("x", x, B * L * F);
  check_pointer("out", out, B * F);
  (void)stream;
  if (device == Device::CUDA) {
#ifdef AFFECTKIT_WITH_CUDA
    detail::masked_mean_forward_cuda(dtype, x, lengths, out, B, L, F, stream);
#endif
    return;
  }
  detail::masked_mean_forward_cpu(dtype, x, lengths, out, B, L, F);
}

void masked_mean_backward(Device device, DType dtype, const void* grad_out,
                          const int64_t* lengths, void* grad_x, int64_t B, int64_t L, int64_t F,
                          uintptr_t stream) {
  validate("masked_mean_backward", device, lengths, B, L, F);
  check_pointer("grad_out", grad_out, B * F);
  check_pointer("grad_x", grad_x, B * L * F);
  (void)stream;
  if (device == Device::CUDA) {
#ifdef AFFECTKIT_WITH_CUDA
    detail::masked_mean_backward_cuda(dtype, grad_out, lengths, grad_x, B, L, F, stream);
#endif
    return;
  }
  detail::masked_mean_backward_cpu(dtype, grad_out, lengths, grad_x, B, L, F);
}

}  // namespace affectkit::pooling
