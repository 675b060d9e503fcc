// graph_conv's validated entry points (forward, fused with pooling, and backward): check the
// arguments once, then dispatch to the CPU kernels (graph_conv_{forward,backward}_cpu.cpp) or
// the CUDA ones.
#include <string>

#include "../core/dispatch.h"
#include "graph.h"

namespace affectkit::graph {

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
