// Pooling over ragged sequences.
#pragma once

#include <cstdint>

#include "../core/core.h"

namespace affectkit::pooling {

// out[b, f] = mean of x[b, t, f] over t < lengths[b]; zero where lengths[b] == 0.
// x: (B, L, F) contiguous; lengths: (B,) int64 with 0 <= lengths[b] <= L; out: (B, F).
// On CUDA, pointers are device pointers, `stream` is a cudaStream_t as an integer, and
// lengths are clamped to [0, L] in the kernel (memory-safe; validate values beforehand).
void masked_mean_forward(Device device, DType dtype, const void* x, const int64_t* lengths,
                         void* out, int64_t B, int64_t L, int64_t F, uintptr_t stream = 0);

// grad_x[b, t, f] = grad_out[b, f] / lengths[b] for t < lengths[b], else 0.
void masked_mean_backward(Device device, DType dtype, const void* grad_out,
                          const int64_t* lengths, void* grad_x, int64_t B, int64_t L, int64_t F,
                          uintptr_t stream = 0);

namespace detail {
void masked_mean_forward_cpu(DType, const void*, const int64_t*, void*, int64_t, int64_t, int64_t);
void masked_mean_backward_cpu(DType, const void*, const int64_t*, void*, int64_t, int64_t, int64_t);
void masked_mean_forward_cuda(DType, const void*, const int64_t*, void*, int64_t, int64_t, int64_t,
                              uintptr_t);
void masked_mean_backward_cuda(DType, const void*, const int64_t*, void*, int64_t, int64_t,
                               int64_t, uintptr_t);
}  // namespace detail

}  // namespace affectkit::pooling
