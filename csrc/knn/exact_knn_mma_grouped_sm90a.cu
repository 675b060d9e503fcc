// The wgmma k-NN kernels with the grouped push in the shared epilogue (kGrouped, see
// exact_knn_mma_kernel.cuh): modes 2 and 3 (AFFECTKIT_KNN_EPILOGUE=grouped), beside their
// defaults in exact_knn_mma_sm90a.cu. Not yet run on a GPU: they let one GPU run tell the
// grouped push's share of mode 3's epilogue from that of each warp's own epilogue.

#include "exact_knn_mma_kernel.cuh"

namespace affectkit::knn::detail {

void* wgmma_grouped_kernel_ptr(int metric, int mode) {
  return mode == 3 ? kernel_ptr<true, true, true, kGrouped>(metric)
                   : kernel_ptr<true, true, false, kGrouped>(metric);
}

}  // namespace affectkit::knn::detail
