// affectkit core: the vocabulary every kernel family shares.
// Torch-free on purpose: kernels take raw pointers, sizes, a dtype code and,
// for CUDA, a stream handle, so one build serves any framework version.
#pragma once

#include <cstdint>
#include <initializer_list>
#include <stdexcept>
#include <string>

namespace affectkit {

// Element types, by stable integer code (the Python layer maps torch dtypes onto these).
enum class DType : int32_t {
  Float32 = 0,
  Float64 = 1,
  Float16 = 2,
  BFloat16 = 3,
  Int32 = 4,
  Int64 = 5,
  Bool = 6,
};

enum class Device : int32_t { CPU = 0, CUDA = 1 };

const char* dtype_name(DType dtype);
DType dtype_from_code(int32_t code, const char* arg);  // throws ValueError on unknown codes
Device device_from_code(int32_t code, const char* arg);

// Errors raised at the library boundary. The Python bindings turn ValueError into
// Python's ValueError and TypeError into Python's TypeError.
struct ValueError : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};
struct TypeError : std::runtime_error {
  using std::runtime_error::runtime_error;
};
// A failure reported by the CUDA runtime (bad launch, out of memory, ...).
struct CudaError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Boundary checks: each names the argument, what was expected and what came.
void check_dims_nonnegative(const char* arg, int64_t value);
void check_pointer(const char* arg, const void* ptr, int64_t numel);
void check_dtype_in(const char* arg, DType got, std::initializer_list<DType> allowed);
void check_cuda_compiled(const char* function);

// Build and machine facts, for `affectkit info`.
struct BuildInfo {
  std::string version;
  bool cuda_compiled;
  std::string cuda_architectures;  // CMake syntax, e.g. "80-real;90"
  int cuda_runtime_version;        // e.g. 13000, 0 without CUDA
  std::string compiler;
  bool openmp;
};
BuildInfo build_info();

// SIMD level detected on this CPU at run time ("avx512", "avx2", "sse4.2", "neon", "scalar").
std::string cpu_simd_level();

// OpenMP threads used by CPU kernels.
int num_threads();
void set_num_threads(int n);

// Number of CUDA devices usable now (0 when built without CUDA or no driver/GPU).
int cuda_device_count();

}  // namespace affectkit
