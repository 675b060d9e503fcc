// Internal: the tensor-core forward of graph_conv (graph_conv_tc.cu), called by the CUDA
// dispatcher in graph_conv_cuda.cu.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <string>

#include "../core/core.h"
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
// the variable unless an integer in [lo, hi]. Inline: scripts/probe/wgmma_graph_probe.cu
// compiles graph_conv_wg_sm90a.cu alone.
inline int env_knob(const char* name, int fallback, int lo, int hi) {
  const char* env = std::getenv(name);
  if (env == nullptr || *env == '\0') return fallback;
  char* end = nullptr;
  const long v = std::strtol(env, &end, 10);
  if (*end != '\0' || v < lo || v > hi)
    throw ValueError(std::string(name) + ": expected an integer from " + std::to_string(lo) + " to " +
                     std::to_string(hi) + ", got '" + env + "'");
  return static_cast<int>(v);
}

#ifdef AFFECTKIT_WITH_SM90A
// The same op with wgmma (graph_conv_wg_sm90a.cu; the automatic choice where it pays, see
// graph_conv_cuda.cu): compute capability 9.0, N, F, Fo <= 64, F % 4 == 0 and x 16-byte
// aligned. Returns false, launching nothing, otherwise.
bool graph_conv_forward_wg(const float* x, const float* adj, const float* w, const float* bias,
                           float* out, int64_t S, int64_t N, int64_t F, int64_t Fo, Activation act,
                           uintptr_t stream);
#endif

}  // namespace affectkit::graph::detail
