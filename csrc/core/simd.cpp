#include "simd.h"

#include <algorithm>
#include <cstdlib>

namespace affectkit::simd {

int level() {
  static const int cached = [] {
    int found = 0;
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512dq"))
      found = 2;
    else if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
      found = 1;
#endif
    if (const char* cap = std::getenv("AFFECTKIT_SIMD_LEVEL"))
      if (cap[0] >= '0' && cap[0] <= '2' && cap[1] == '\0') found = std::min(found, cap[0] - '0');
    return found;
  }();
  return cached;
}

}  // namespace affectkit::simd
