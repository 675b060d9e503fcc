// float16 (IEEE binary16) database rows on the CPU: conversion to float32 and
// mixed-precision distances (float32 query against float16 row, accumulated in float32).
// Each function picks the widest code this CPU runs, once, at run time: AVX-512F, else
// F16C with AVX2/FMA, else portable scalar code. AFFECTKIT_NO_AVX512=1 skips the AVX-512
// code and AFFECTKIT_NO_F16C=1 skips both vector paths (tests cover every path this way).
#pragma once

#include <cstdint>

namespace affectkit::knn {

// Exact conversion of one binary16 bit pattern (subnormals, infinities and NaN kept).
float f16_to_f32(uint16_t h);

// dst[i] = f16_to_f32(src[i]) for i < n.
void f16_to_f32(const uint16_t* src, float* dst, int64_t n);

// <a, b> and ||a - b||^2 for float32 a and float16 b of length d.
float dot_f32_f16(const float* a, const uint16_t* b, int64_t d);
float l2sq_f32_f16(const float* a, const uint16_t* b, int64_t d);

// Which code the functions above run: "avx512", "f16c" or "scalar".
const char* f16_kernel_name();

}  // namespace affectkit::knn
