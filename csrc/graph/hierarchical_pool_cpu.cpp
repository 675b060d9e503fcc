// CPU path of hierarchical_pool (children -> parents by a fixed assignment, mean or softmax
// attention over the children), and its validated entry points.
#include <omp.h>

#include <algorithm>
#include <string>
#include <vector>

#include "../core/dispatch.h"
#include "graph.h"
#include "pool_kernels.h"

namespace affectkit::graph {
namespace detail {
namespace {

template <typename T>
void forward(const T* x, const int64_t* assignment, const T* scores, T* out, int64_t S, int64_t N,
             int64_t F, int64_t P) {
  const Children kids = build_children(assignment, N, P);
#pragma omp parallel
  {
    std::vector<T> w(N);
#pragma omp for schedule(static)
    for (int64_t s = 0; s < S; ++s)
      pool_sample(x + s * N * F, F, scores ? scores + s * N : nullptr, kids, out + s * P * F, F,
                  P, w.data());
  }
}

// grad_x[c] = w[c] g[p(c)]; grad_scores[c] = w[c] (d[c] - sum_c' w[c'] d[c']), d[c] = <g[p], x[c]>.
template <typename T>
void backward(const T* g, const T* x, const int64_t* assignment, const T* scores, T* gx, T* gs,
              int64_t S, int64_t N, int64_t F, int64_t P) {
  const Children kids = build_children(assignment, N, P);
#pragma omp parallel
  {
    std::vector<T> w(N), d(N);
#pragma omp for schedule(static)
    for (int64_t s = 0; s < S; ++s) {
      const T* sc = scores ? scores + s * N : nullptr;
      for (int64_t p = 0; p < P; ++p) {
        child_weights(kids, p, sc, w.data());
        const T* gp = g + (s * P + p) * F;
        T dbar = 0;
        for (int64_t i = kids.offset[p]; i < kids.offset[p + 1]; ++i) {
          const int64_t c = kids.child[i];
          if (gx) {
            T* dst = gx + (s * N + c) * F;
            for (int64_t f = 0; f < F; ++f) dst[f] = w[c] * gp[f];
          }
          if (gs) {
            const T* xc = x + (s * N + c) * F;
            T dot = 0;
            for (int64_t f = 0; f < F; ++f) dot += gp[f] * xc[f];
            d[c] = dot;
            dbar += w[c] * dot;
          }
        }
        if (gs)
          for (int64_t i = kids.offset[p]; i < kids.offset[p + 1]; ++i) {
            const int64_t c = kids.child[i];
            gs[s * N + c] = w[c] * (d[c] - dbar);
          }
      }
    }
  }
}

}  // namespace

void hierarchical_pool_forward_cpu(DType dtype, const void* x, const int64_t* assignment,
                                   const void* scores, void* out, int64_t S, int64_t N, int64_t F,
                                   int64_t P) {
  AFFECTKIT_DISPATCH_CPU_FLOAT(dtype, "x", T, [&] {
    forward(static_cast<const T*>(x), assignment, static_cast<const T*>(scores),
            static_cast<T*>(out), S, N, F, P);
  });
}

void hierarchical_pool_backward_cpu(DType dtype, const void* g, const void* x,
                                    const int64_t* assignment, const void* scores, void* gx,
                                    void* gs, int64_t S, int64_t N, int64_t F, int64_t P) {
  AFFECTKIT_DISPATCH_CPU_FLOAT(dtype, "grad_out", T, [&] {
    backward(static_cast<const T*>(g), static_cast<const T*>(x), assignment,
             static_cast<const T*>(scores), static_cast<T*>(gx), static_cast<T*>(gs), S, N, F, P);
  });
}

}  // namespace detail

namespace {

void validate_pool(const char* fn, Device device, const void* x, const int64_t* assignment,
                   int64_t S, int64_t N, int64_t F, int64_t P) {
  check_dims_nonnegative("S", S);
  check_dims_nonnegative("N", N);
  check_dims_nonnegative("F", F);
  check_dims_nonnegative("P", P);
  check_pointer("x", x, S * N * F);
  check_pointer("assignment", assignment, N);
  if (device == Device::CUDA) check_cuda_compiled(fn);
  if (device == Device::CPU) detail::check_assignment_values(assignment, N, P);
}

}  // namespace

void hierarchical_pool_forward(Device device, DType dtype, const void* x,
                               const int64_t* assignment, const void* scores, void* out,
                               int64_t S, int64_t N, int64_t F, int64_t P, uintptr_t stream) {
  validate_pool("hierarchical_pool_forward", device, x, assignment, S, N, F, P);
  check_pointer("out", out, S * P * F);
  (void)stream;
  if (device == Device::CUDA) {
#ifdef AFFECTKIT_WITH_CUDA
    detail::hierarchical_pool_forward_cuda(dtype, x, assignment, scores, out, S, N, F, P, stream);
#endif
    return;
  }
  detail::hierarchical_pool_forward_cpu(dtype, x, assignment, scores, out, S, N, F, P);
}

void hierarchical_pool_backward(Device device, DType dtype, const void* grad_out, const void* x,
                                const int64_t* assignment, const void* scores, void* grad_x,
                                void* grad_scores, int64_t S, int64_t N, int64_t F, int64_t P,
                                uintptr_t stream) {
  validate_pool("hierarchical_pool_backward", device, x, assignment, S, N, F, P);
  check_pointer("grad_out", grad_out, S * P * F);
  if (grad_scores && !scores)
    throw ValueError("grad_scores: expected null without scores (mean pooling), got a pointer");
  (void)stream;
  if (device == Device::CUDA) {
#ifdef AFFECTKIT_WITH_CUDA
    detail::hierarchical_pool_backward_cuda(dtype, grad_out, x, assignment, scores, grad_x,
                                            grad_scores, S, N, F, P, stream);
#endif
    return;
  }
  detail::hierarchical_pool_backward_cpu(dtype, grad_out, x, assignment, scores, grad_x,
                                         grad_scores, S, N, F, P);
}

}  // namespace affectkit::graph
