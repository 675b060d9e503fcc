// Pieces shared by the graph kernels: activation codes, assignment checks, SIMD level.
#include <string>
#include <vector>

#include "graph.h"
#include "small_gemm.h"

namespace affectkit::graph {

Activation activation_from_code(int32_t code, const char* arg) {
  if (code < 0 || code > static_cast<int32_t>(Activation::Sigmoid))
    throw ValueError(std::string(arg) + ": expected an activation code in [0, 5], got " +
                     std::to_string(code));
  return static_cast<Activation>(code);
}

namespace detail {

void check_assignment_values(const int64_t* assignment, int64_t N, int64_t P) {
  std::vector<int64_t> count(P, 0);
  for (int64_t n = 0; n < N; ++n) {
    const int64_t p = assignment[n];
    if (p < 0 || p >= P)
      throw ValueError("assignment: expected parent indices in [0, " + std::to_string(P - 1) +
                       "], got assignment[" + std::to_string(n) + "] = " + std::to_string(p));
    ++count[p];
  }
  for (int64_t p = 0; p < P; ++p)
    if (count[p] == 0)
      throw ValueError("assignment: expected every parent in [0, " + std::to_string(P - 1) +
                       "] to have at least one child, got none for parent " + std::to_string(p));
}

int simd_level() {
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
  static const int level = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512dq"))
      return 2;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return 1;
    return 0;
  }();
  return level;
#else
  return 0;
#endif
}

}  // namespace detail
}  // namespace affectkit::graph
