// The wgmma instantiation of the mma k-NN kernel (exact_knn_mma_kernel.cuh). CMake compiles
// this file alone for sm_90a, the only target with wgmma, and only when the build's CUDA
// architectures include sm_90; plan_exact_mma launches it on compute capability 9.0 only.

#include "exact_knn_mma_kernel.cuh"

namespace affectkit::knn::detail {

void* wgmma_kernel_ptr(int metric, int mode, int epilogue) {
  if (epilogue == kGrouped) return wgmma_grouped_kernel_ptr(metric, mode);
  if (mode == 3) return kernel_ptr<true, true, true, kWarp>(metric);
  return mode == 2 ? kernel_ptr<true, true>(metric) : kernel_ptr<true, false>(metric);
}

}  // namespace affectkit::knn::detail
