// The tensor-core attention backward's kernels for __nv_bfloat16: their own translation unit, built in
// parallel with the other dtype's (see cross_attention_tc_backward_kernels.cuh).
#include "cross_attention_tc_backward_kernels.cuh"

namespace affectkit::attention::detail::tc_backward {

void launch_bf16(int d_bucket, int dv_bucket, const Args& a, int dev, cudaStream_t stream) {
  launch_d<__nv_bfloat16>(d_bucket, dv_bucket, a, dev, stream);
}

}  // namespace affectkit::attention::detail::tc_backward
