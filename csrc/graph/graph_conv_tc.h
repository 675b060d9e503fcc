// Internal: the tensor-core forward of graph_conv (graph_conv_tc.cu), called by the CUDA
// dispatcher in graph_conv_cuda.cu.
#pragma once

#include <cstdint>

#include "graph.h"

namespace affectkit::graph::detail {

// How the float32 products are split for the tensor cores (both keep float32 accuracy, see
// graph_conv_tc.cu): three TF32 products, or one TF32 product plus the two correction
// products as a single bf16 product of twice the depth.
enum class TcSplit { Tf32x3, Tf32Bf16 };

// out[s] = act(A x[s] W + bias) for float32, one shared graph A (N, N), a weight (F, Fo) and
// N, F, Fo <= 64, on the tensor cores. Returns false, launching nothing, when the shape is not
// one it takes (too large, or too little shared memory on this GPU).
bool graph_conv_forward_tc(TcSplit split, const float* x, const float* adj, const float* w,
                           const float* bias, float* out, int64_t S, int64_t N, int64_t F,
                           int64_t Fo, Activation act, uintptr_t stream);

// An integer timing knob from the environment: fallback when unset or empty, ValueError naming
// the variable unless an integer in [lo, hi].
int env_knob(const char* name, int fallback, int lo, int hi);

#ifdef AFFECTKIT_WITH_SM90A
// The same op with wgmma (graph_conv_wg_sm90a.cu; the automatic choice where it pays, see
// graph_conv_cuda.cu): compute capability 9.0, N, F, Fo <= 64, F % 4 == 0 and x 16-byte
// aligned. Returns false, launching nothing, otherwise.
bool graph_conv_forward_wg(const float* x, const float* adj, const float* w, const float* bias,
                           float* out, int64_t S, int64_t N, int64_t F, int64_t Fo, Activation act,
                           uintptr_t stream);
#endif

}  // namespace affectkit::graph::detail
