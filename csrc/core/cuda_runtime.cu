// Runtime queries, compiled only with CUDA.
#include <cuda_runtime.h>

#include "core.h"

namespace affectkit {

int cuda_device_count() {
  int count = 0;
  // No driver or no GPU is not an error here: report zero usable devices.
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return count;
}

int cuda_runtime_version() {
  int version = 0;
  cudaRuntimeGetVersion(&version);
  return version;
}

}  // namespace affectkit
