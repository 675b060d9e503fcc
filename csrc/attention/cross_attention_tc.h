// Internal: the tensor-core (mma.sync) forward of the fused attention, fp16/bf16 only.
// Used by forward_cuda in cross_attention.cu; see cross_attention_tc.cu for the design.
#pragma once

#include <cstdint>

#include "attention.h"

namespace affectkit::attention::detail {

// Runs the tensor-core forward and returns true when the problem is one it takes (fp16 or
// bf16, no dropout, D and Dv at most 128, an sm_80+ device, AFFECTKIT_ATTENTION_TENSOR_CORES
// not "0"; any row strides); returns false, having done nothing,
// otherwise, and the caller runs the generic kernel. Throws CudaError on a failed launch.
bool forward_cuda_tensor_cores(DType dtype, const Problem& p, View q, View k, View v, Mask mask,
                               MutView out, MutView lse, uintptr_t stream);

// The long-sequence forward (cross_attention_tc_long.cu): fp16/bf16, D = Dv = 64 or 128, no
// mask, no dropout, 16-byte aligned rows, Lq and Lk >= 256 and enough 128-row tiles to fill
// `sms` multiprocessors twice, unless AFFECTKIT_ATTENTION_LONG_KERNEL=0. Returns false, having
// done nothing, otherwise.
bool forward_cuda_tensor_cores_long(DType dtype, const Problem& p, View q, View k, View v, Mask mask,
                                    MutView out, MutView lse, int sms, uintptr_t stream);

#ifdef AFFECTKIT_WITH_SM90A
// The wgmma forward (cross_attention_wg_sm90a.cu): what the long kernel takes, at D = Dv = 128,
// on compute capability 9.0. Returns false, having done nothing, otherwise.
// forward_cuda_tensor_cores_long calls it unless AFFECTKIT_ATTENTION_WGMMA=0.
bool forward_cuda_wgmma(DType dtype, const Problem& p, View q, View k, View v, MutView out, MutView lse,
                        uintptr_t stream);
#endif

// The tensor-core backward (cross_attention_tc_backward.cu): grad_q, grad_k, grad_v and, when
// grad_mask != nullptr, the score gradient dS (the buffer is zeroed here first), with the
// semantics of attention_backward. Takes what the forward takes, plus 16-byte aligned rows of
// out, grad_out, grad_q, grad_k and grad_v and Lq, Lk > 0; returns false, having done nothing,
// otherwise (the caller runs the generic kernels). Deterministic (no atomics). Throws
// CudaError on a failed launch.
bool backward_cuda_tensor_cores(DType dtype, const Problem& p, View q, View k, View v, Mask mask, View out,
                                View grad_out, View lse, MutView grad_q, MutView grad_k, MutView grad_v,
                                void* grad_mask, uintptr_t stream);

}  // namespace affectkit::attention::detail
