// Child-to-parent pooling of one sample (internal to csrc/graph): shared by the pooling op
// and the fused graph_conv_pool level, which pools rows it has just written (still in cache).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace affectkit::graph::detail {

// The children of each parent as a CSR list (built once per call from the assignment).
struct Children {
  std::vector<int64_t> offset;  // P + 1
  std::vector<int64_t> child;   // N, grouped by parent, in node order within a parent
};

inline Children build_children(const int64_t* assignment, int64_t N, int64_t P) {
  Children c;
  c.offset.assign(P + 1, 0);
  c.child.resize(N);
  for (int64_t n = 0; n < N; ++n) ++c.offset[assignment[n] + 1];
  for (int64_t p = 0; p < P; ++p) c.offset[p + 1] += c.offset[p];
  std::vector<int64_t> fill(c.offset.begin(), c.offset.end() - 1);
  for (int64_t n = 0; n < N; ++n) c.child[fill[assignment[n]]++] = n;
  return c;
}

// w[c] for every child c of parent p: 1/n (mean) or the softmax of scores over the children.
template <typename T>
inline void child_weights(const Children& kids, int64_t p, const T* scores, T* w) {
  const int64_t b = kids.offset[p], e = kids.offset[p + 1];
  if (!scores) {
    const T inv = T(1) / T(e - b);
    for (int64_t i = b; i < e; ++i) w[kids.child[i]] = inv;
    return;
  }
  T m = scores[kids.child[b]];
  for (int64_t i = b + 1; i < e; ++i) m = std::max(m, scores[kids.child[i]]);
  T sum = 0;
  for (int64_t i = b; i < e; ++i) {
    const int64_t c = kids.child[i];
    w[c] = std::exp(scores[c] - m);
    sum += w[c];
  }
  const T inv = T(1) / sum;
  for (int64_t i = b; i < e; ++i) w[kids.child[i]] *= inv;
}

// out[p, :F] = sum over children c of w[c] x[c, :F]; x rows are ldx apart. w: N scratch.
template <typename T>
inline void pool_sample(const T* x, int64_t ldx, const T* scores, const Children& kids, T* out,
                        int64_t F, int64_t P, T* w) {
  for (int64_t p = 0; p < P; ++p) {
    child_weights(kids, p, scores, w);
    T* o = out + p * F;
    std::fill(o, o + F, T(0));
    for (int64_t i = kids.offset[p]; i < kids.offset[p + 1]; ++i) {
      const int64_t c = kids.child[i];
      const T wc = w[c];
      const T* xc = x + c * ldx;
      for (int64_t f = 0; f < F; ++f) o[f] += wc * xc[f];
    }
  }
}

}  // namespace affectkit::graph::detail
