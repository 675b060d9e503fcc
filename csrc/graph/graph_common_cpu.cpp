// Pieces shared by the graph kernels: activation codes, assignment checks, SIMD level.
#include <algorithm>
#include <cstdlib>
#include <string>
#include <vector>

#include "graph.h"
#include "../core/simd.h"
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
  // AFFECTKIT_GRAPH_SIMD_LEVEL caps the graph kernels alone (AFFECTKIT_SIMD_LEVEL caps all).
  static const int level = [] {
    int found = simd::level();
    if (const char* cap = std::getenv("AFFECTKIT_GRAPH_SIMD_LEVEL"))
      if (cap[0] >= '0' && cap[0] <= '2' && cap[1] == '\0') found = std::min(found, cap[0] - '0');
    return found;
  }();
  return level;
}

}  // namespace detail

int simd_level_in_use() { return detail::simd_level(); }

}  // namespace affectkit::graph
