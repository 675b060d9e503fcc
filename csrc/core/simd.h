// Which vector instruction set the CPU kernels run with, chosen once at run time, and a way
// to compile one kernel body for each of them (no -march=native in installed builds).
//
// A kernel is a struct with an always_inline static template run<VB>(args...), VB being the
// vector width in bytes its GCC vector types use. simd::dispatch<Kernel>(args...) calls the
// copy compiled for the level in use: AVX-512 (VB = 64), AVX2 + FMA (VB = 32) or the
// baseline (VB = 16). Every helper the body calls must be inline too, so that it is compiled
// for the same instruction set; 64-byte vector types in an AVX2 copy are lowered through
// the stack by GCC and ran 20x slower than 32-byte ones, which is why the width follows the
// level rather than being fixed.
#pragma once

namespace affectkit::simd {

// 2: AVX-512 (F, VL, DQ), 1: AVX2 + FMA, 0: the baseline. The environment variable
// AFFECTKIT_SIMD_LEVEL=0 or 1 caps it (tests use it to run the lower levels' kernels on any
// machine); it never raises it. Read once per process.
int level();

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define AFFECTKIT_TARGET_AVX512 __attribute__((target("avx512f,avx512vl,avx512dq,avx2,fma")))
#define AFFECTKIT_TARGET_AVX2 __attribute__((target("avx2,fma")))

template <typename Kernel, typename... Args>
AFFECTKIT_TARGET_AVX512 void run_avx512(Args&... args) {
  Kernel::template run<64>(args...);
}
template <typename Kernel, typename... Args>
AFFECTKIT_TARGET_AVX2 void run_avx2(Args&... args) {
  Kernel::template run<32>(args...);
}
template <typename Kernel, typename... Args>
void run_baseline(Args&... args) {
  Kernel::template run<16>(args...);
}

// The copy for a given level (at most level(): callers cap it, never raise it).
template <typename Kernel, typename... Args>
void dispatch_at(int lvl, Args&&... args) {
  switch (lvl) {
    case 2: return run_avx512<Kernel>(args...);
    case 1: return run_avx2<Kernel>(args...);
    default: return run_baseline<Kernel>(args...);
  }
}
#else
template <typename Kernel, typename... Args>
void dispatch_at(int, Args&&... args) {
  Kernel::template run<16>(args...);
}
#endif

template <typename Kernel, typename... Args>
void dispatch(Args&&... args) {
  dispatch_at<Kernel>(level(), args...);
}

}  // namespace affectkit::simd
