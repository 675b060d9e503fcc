// Fused multi-head (cross-modal) attention: softmax(scale * Q K^T + masks) V, forward and
// backward, flash-style (online softmax over key tiles; P is recomputed in backward from the
// saved per-row logsumexp, never stored).
#pragma once

#include <cstdint>

#include "../core/core.h"

namespace affectkit::attention {

// A strided (batch, head, row, feature) tensor whose feature axis is contiguous. Element
// (b, h, r, f) lives at data + b*sb + h*sh + (row0(b) + r)*sr + f, in elements, where row0(b)
// is cu_seqlens[b] in the packed (varlen) form and 0 in the padded form.
struct View {
  const void* data = nullptr;
  int64_t sb = 0, sh = 0, sr = 0;
};
struct MutView {
  void* data = nullptr;
  int64_t sb = 0, sh = 0, sr = 0;
};

// Optional mask broadcastable to (B, H, Lq, Lk): dtype Bool (true = attend) or an additive
// float mask in the accumulation type (float32 for float32/16-bit inputs, float64 for
// float64). Input dtypes: float32, float64, bfloat16 on the CPU; also float16 on CUDA. Strides are in elements; 0 on broadcast axes. data == nullptr: no mask.
struct Mask {
  const void* data = nullptr;
  DType dtype = DType::Bool;
  int64_t sb = 0, sh = 0, si = 0, sj = 0;
};

struct Problem {
  int64_t B = 0, H = 0;
  int64_t Lq = 0, Lk = 0;  // padded lengths, or max_seqlen_q / max_seqlen_k when packed
  int64_t D = 0, Dv = 0;   // 1..256 each
  // Padded form: optional valid lengths (B,), values in [0, Lq] / [0, Lk]; null = full.
  const int64_t* q_lengths = nullptr;
  const int64_t* kv_lengths = nullptr;
  // Packed form: row offsets (B + 1,), non-decreasing from 0 to total_q / total_k, each
  // segment at most Lq / Lk long. When set, q_lengths/kv_lengths must be null.
  const int64_t* cu_seqlens_q = nullptr;
  const int64_t* cu_seqlens_k = nullptr;
  int64_t total_q = 0, total_k = 0;
  // Key j is visible to query i iff j <= i + (Lk - Lq) (bottom-right aligned). In the
  // packed form Lk - Lq is per sequence: kv length minus query length.
  bool causal = false;
  double scale = 1.0;
  // Dropout on the probabilities: element (b, h, i, j) is kept iff its counter-based hash of
  // (seed, b, h, i, j) is >= threshold (a 24-bit integer, see dropout_threshold); kept ones
  // are scaled by 1 / (1 - dropout_p). dropout_p == 0 disables it.
  double dropout_p = 0.0;
  uint64_t seed = 0;
};

// The 24-bit keep threshold for dropout probability p in [0, 1).
uint32_t dropout_threshold(double p);

// out (B, H, Lq, Dv) and lse (B, H, Lq) in the accumulation type (float32 or float64; +inf on
// rows with no visible key, whose output row is zeros). Rows past q_lengths are zeros.
void attention_forward(Device device, DType dtype, const Problem& p, View q, View k, View v,
                       Mask mask, MutView out, MutView lse, uintptr_t stream = 0);

// Gradients of out with respect to q, k, v given grad_out (laid out like out). Deterministic:
// the same inputs give bit-identical gradients (no atomics, fixed summation order).
// grad_mask (optional, needs an additive float mask): the gradient of the scores,
// dS = P * (dP - rowsum(dO * O)) with P and dP after dropout, written for every
// (b, h, i, j) of a contiguous (B, H, Lq, Lk) buffer in the accumulation type, zero where
// the key is invisible or the row is past q_lengths or sees no key. It is the gradient
// with respect to a full additive mask; the caller sums it over the mask's broadcast axes.
void attention_backward(Device device, DType dtype, const Problem& p, View q, View k, View v,
                        Mask mask, View out, View grad_out, View lse, MutView grad_q,
                        MutView grad_k, MutView grad_v, void* grad_mask = nullptr,
                        uintptr_t stream = 0);

// Attention probabilities (after dropout) recomputed from lse, in the input dtype, contiguous:
// head-averaged (B, Lq, Lk) when average_heads, else per head (B, H, Lq, Lk); zeros outside
// the valid rows and keys.
void attention_weights(Device device, DType dtype, const Problem& p, View q, View k, Mask mask,
                       View lse, void* weights, bool average_heads = true, uintptr_t stream = 0);

namespace detail {
void forward_cpu(DType, const Problem&, View, View, View, Mask, MutView, MutView);
void backward_cpu(DType, const Problem&, View, View, View, Mask, View, View, View, MutView,
                  MutView, MutView, void*);
void weights_cpu(DType, const Problem&, View, View, Mask, View, void*, bool);
// bfloat16 on the CPU: widened to float32, the float32 kernels, rounded back.
void forward_cpu_bf16(const Problem&, View, View, View, Mask, MutView, MutView);
void backward_cpu_bf16(const Problem&, View, View, View, Mask, View, View, View, MutView, MutView,
                       MutView, void*);
void weights_cpu_bf16(const Problem&, View, View, Mask, View, void*, bool);
void forward_cuda(DType, const Problem&, View, View, View, Mask, MutView, MutView, uintptr_t);
void backward_cuda(DType, const Problem&, View, View, View, Mask, View, View, View, MutView,
                   MutView, MutView, void*, uintptr_t);
void weights_cuda(DType, const Problem&, View, View, Mask, View, void*, bool, uintptr_t);
}  // namespace detail

}  // namespace affectkit::attention
