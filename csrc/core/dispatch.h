// Turn a run-time dtype code into a compile-time element type.
#pragma once

#include "core.h"

// CPU kernels: float32 and float64.
#define AFFECTKIT_DISPATCH_CPU_FLOAT(DTYPE, ARG, T, ...)                                    \
  [&] {                                                                                     \
    ::affectkit::check_dtype_in(ARG, DTYPE,                                                 \
                                {::affectkit::DType::Float32, ::affectkit::DType::Float64}); \
    if ((DTYPE) == ::affectkit::DType::Float32) {                                           \
      using T = float;                                                                      \
      return __VA_ARGS__();                                                                 \
    }                                                                                       \
    using T = double;                                                                       \
    return __VA_ARGS__();                                                                   \
  }()

// CUDA kernels: float32, float64, float16 and bfloat16 (include cuda_utils.cuh first).
#define AFFECTKIT_DISPATCH_CUDA_FLOAT(DTYPE, ARG, T, ...)                                 \
  [&] {                                                                                   \
    ::affectkit::check_dtype_in(ARG, DTYPE,                                               \
                                {::affectkit::DType::Float32, ::affectkit::DType::Float64, \
                                 ::affectkit::DType::Float16, ::affectkit::DType::BFloat16}); \
    switch (DTYPE) {                                                                      \
      case ::affectkit::DType::Float64: {                                                 \
        using T = double;                                                                 \
        return __VA_ARGS__();                                                             \
      }                                                                                   \
      case ::affectkit::DType::Float16: {                                                 \
        using T = __half;                                                                 \
        return __VA_ARGS__();                                                             \
      }                                                                                   \
      case ::affectkit::DType::BFloat16: {                                                \
        using T = __nv_bfloat16;                                                          \
        return __VA_ARGS__();                                                             \
      }                                                                                   \
      default: {                                                                          \
        using T = float;                                                                  \
        return __VA_ARGS__();                                                             \
      }                                                                                   \
    }                                                                                     \
  }()

// Compile a small hot CPU loop for several instruction sets; the loader picks one at run time
// (no -march=native in installed builds). GCC on x86-64 only. For kernels with vector types
// of their own, use simd::dispatch (core/simd.h): it sizes the vectors to the instruction
// set and honours AFFECTKIT_SIMD_LEVEL. "arch=x86-64-v3", not "avx2", so that the AVX2 copy
// also has FMA.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define AFFECTKIT_SIMD_CLONES __attribute__((target_clones("avx512f", "arch=x86-64-v3", "default")))
#else
#define AFFECTKIT_SIMD_CLONES
#endif
