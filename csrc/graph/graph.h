// Graph convolution over small graphs (EEG electrodes) with huge batches.
//
// Layout: node features x are (S, N, F) contiguous: S samples (every window of every trial),
// N nodes, F features. Adjacencies are (B, N, N) with S % B == 0: B == 1 shares one graph,
// B > 1 gives sample s the graph s / (S / B) (a data-dependent graph per leading index).
// On CUDA every pointer is a device pointer and `stream` is a cudaStream_t as an integer.
#pragma once

#include <cstdint>

#include "../core/core.h"

namespace affectkit::graph {

// Element-wise activation after propagation; the derivative is taken from the output.
enum class Activation : int32_t {
  None = 0,
  ReLU = 1,
  ELU = 2,        // alpha = 1
  LeakyReLU = 3,  // negative slope 0.01 (torch's default)
  Tanh = 4,
  Sigmoid = 5,
};
Activation activation_from_code(int32_t code, const char* arg);

// out[s] = act(A[s / (S/B)] @ x[s] @ weight + bias). weight (F, Fo) may be null (then Fo == F),
// bias (Fo) may be null. Throws ValueError if the adjacency holds NaN or infinity (CPU).
void graph_conv_forward(Device device, DType dtype, const void* x, const void* adjacency,
                        const void* weight, const void* bias, void* out, int64_t S, int64_t N,
                        int64_t F, int64_t Fo, int64_t B, int32_t activation,
                        uintptr_t stream = 0);

// Gradients of graph_conv_forward given grad_out and the forward output `out` (the
// activation's derivative is read from it). Each gradient pointer may be null (not needed):
// grad_x (S, N, F); grad_adjacency (B, N, N), summed over the samples sharing a graph;
// grad_weight (F, Fo) and grad_bias (Fo), summed over all samples. grad_out_strides: null for a
// contiguous grad_out, else its three element strides (sample, node, feature), any of them 0
// (a broadcast gradient such as sum()'s or a mean over nodes' is read in place, not copied).
// CPU only: on CUDA, affectkit.ops computes the gradients with PyTorch matrix products.
void graph_conv_backward(Device device, DType dtype, const void* grad_out, const void* out,
                         const void* x, const void* adjacency, const void* weight,
                         void* grad_x, void* grad_adjacency, void* grad_weight,
                         void* grad_bias, int64_t S, int64_t N, int64_t F, int64_t Fo, int64_t B,
                         int32_t activation, uintptr_t stream = 0,
                         const int64_t* grad_out_strides = nullptr);

// out[s] = sum_k T_k(L) x[s] theta_k, T_k the Chebyshev polynomials (T_0 = I, T_1 = L,
// T_k = 2 L T_{k-1} - T_{k-2}). laplacian (N, N) is shared by every sample. coefficients:
// K scalars (matrix_coefficients false, then Fo == F) or K matrices (K, F, Fo).
void cheb_graph_conv_forward(Device device, DType dtype, const void* x, const void* laplacian,
                             const void* coefficients, void* out, int64_t S, int64_t N,
                             int64_t F, int64_t Fo, int64_t K, bool matrix_coefficients,
                             uintptr_t stream = 0);

// Gradients of cheb_graph_conv_forward; grad_x (S, N, F), grad_laplacian (N, N) and
// grad_coefficients (K) or (K, F, Fo) may each be null. CPU only (PyTorch on CUDA).
void cheb_graph_conv_backward(Device device, DType dtype, const void* grad_out, const void* x,
                              const void* laplacian, const void* coefficients, void* grad_x,
                              void* grad_laplacian, void* grad_coefficients, int64_t S,
                              int64_t N, int64_t F, int64_t Fo, int64_t K,
                              bool matrix_coefficients, uintptr_t stream = 0);

// Pool child nodes into parents: out[s, p] = sum over children c of p of w[s, c] x[s, c],
// where assignment (N) int64 gives each child's parent in [0, P) and every parent has at
// least one child. w = 1 / (number of children) when scores is null, else the softmax of
// scores (S, N) over the children of each parent. out is (S, P, F).
void hierarchical_pool_forward(Device device, DType dtype, const void* x,
                               const int64_t* assignment, const void* scores, void* out,
                               int64_t S, int64_t N, int64_t F, int64_t P, uintptr_t stream = 0);

// Gradients of hierarchical_pool_forward: grad_x (S, N, F) and grad_scores (S, N) (either may
// be null; grad_scores needs scores).
void hierarchical_pool_backward(Device device, DType dtype, const void* grad_out, const void* x,
                                const int64_t* assignment, const void* scores, void* grad_x,
                                void* grad_scores, int64_t S, int64_t N, int64_t F, int64_t P,
                                uintptr_t stream = 0);

// One whole hierarchy level in one pass: node_out = graph_conv_forward(...), then
// pooled = hierarchical_pool_forward(node_out, assignment, scores) while node_out is in cache.
void graph_conv_pool_forward(Device device, DType dtype, const void* x, const void* adjacency,
                             const void* weight, const void* bias, const int64_t* assignment,
                             const void* scores, void* node_out, void* pooled, int64_t S,
                             int64_t N, int64_t F, int64_t Fo, int64_t B, int64_t P,
                             int32_t activation, uintptr_t stream = 0);

// The instruction set the CPU graph kernels run with: 2 AVX-512, 1 AVX2+FMA, 0 baseline
// (the environment variable AFFECTKIT_GRAPH_SIMD_LEVEL can cap it, for testing).
int simd_level_in_use();

namespace detail {
// Shape checks shared by the CPU and CUDA entry points.
void check_assignment_values(const int64_t* assignment, int64_t N, int64_t P);

void graph_conv_forward_cpu(DType, const void*, const void*, const void*, const void*, void*,
                            int64_t, int64_t, int64_t, int64_t, int64_t, Activation,
                            const int64_t*, const void*, void*, int64_t);
void graph_conv_backward_cpu(DType, const void*, const int64_t*, const void*, const void*,
                             const void*, const void*, void*, void*, void*, void*, int64_t, int64_t,
                             int64_t, int64_t, int64_t, Activation);
void cheb_graph_conv_forward_cpu(DType, const void*, const void*, const void*, void*, int64_t,
                                 int64_t, int64_t, int64_t, int64_t, bool);
void cheb_graph_conv_backward_cpu(DType, const void*, const void*, const void*, const void*,
                                  void*, void*, void*, int64_t, int64_t, int64_t, int64_t,
                                  int64_t, bool);
void hierarchical_pool_forward_cpu(DType, const void*, const int64_t*, const void*, void*,
                                   int64_t, int64_t, int64_t, int64_t);
void hierarchical_pool_backward_cpu(DType, const void*, const void*, const int64_t*,
                                    const void*, void*, void*, int64_t, int64_t, int64_t,
                                    int64_t);

void graph_conv_forward_cuda(DType, const void*, const void*, const void*, const void*, void*,
                             int64_t, int64_t, int64_t, int64_t, int64_t, Activation,
                             const int64_t*, const void*, void*, int64_t, uintptr_t);
void cheb_graph_conv_forward_cuda(DType, const void*, const void*, const void*, void*, int64_t,
                                  int64_t, int64_t, int64_t, int64_t, bool, uintptr_t);
void hierarchical_pool_forward_cuda(DType, const void*, const int64_t*, const void*, void*,
                                    int64_t, int64_t, int64_t, int64_t, uintptr_t);
void hierarchical_pool_backward_cuda(DType, const void*, const void*, const int64_t*,
                                     const void*, void*, void*, int64_t, int64_t, int64_t,
                                     int64_t, uintptr_t);
}  // namespace detail

}  // namespace affectkit::graph
