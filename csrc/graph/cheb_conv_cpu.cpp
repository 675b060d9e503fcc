// CPU path of cheb_graph_conv: out = sum_k T_k(L) x theta_k, and its gradients.
//
// Per sample, the K terms X_k = T_k(L) x come from the recursion X_k = 2 L X_{k-1} - X_{k-2}
// in L1-resident buffers. The backward pass runs the adjoint recursion (Clenshaw's, with L^T):
// U_k = G_k + c_{k+1} L^T U_{k+1} - U_{k+2}, G_k = grad_out theta_k^T, c_1 = 1, c_k = 2 else;
// then grad_x = U_0 and grad_L = sum_{k>=1} c_k U_k X_{k-1}^T.
#include <omp.h>

#include <algorithm>
#include <string>
#include <vector>

#include "../core/dispatch.h"
#include "graph.h"
#include "small_gemm.h"

namespace affectkit::graph {
namespace detail {
namespace {

template <typename T>
struct ChebArgs {
  const T* x;
  const T* lap;
  const T* coef;  // (K) or (K, F, Fo)
  T* out;         // forward only
  const T* g;     // backward: grad_out
  T* gx;          // (S, N, F) or null
  T* gL;          // this thread's (N, N) partial, or null
  T* gC;          // this thread's (K) or (K, F, Fo) partial, or null
  int64_t N, F, Fo, K;
  bool matrix;
};

// X[k] (N x Fp each) = T_k(L) x_s for k < K.
template <typename T, int VB>
AK_INLINE void chebyshev_terms(const ChebArgs<T>& a, const T* xs, int64_t Fp, T* X) {
  const int64_t N = a.N, F = a.F, step = N * Fp;
  copy_padded(xs, N, F, F, X, Fp);
  if (a.K > 1) gemm<T, VB, false>(N, Fp, N, a.lap, N, X, Fp, X + step, Fp);
  for (int64_t k = 2; k < a.K; ++k) {
    T* Xk = X + k * step;
    gemm<T, VB, false>(N, Fp, N, a.lap, N, X + (k - 1) * step, Fp, Xk, Fp);
    const T* Xk2 = X + (k - 2) * step;
    for (int64_t i = 0; i < step; ++i) Xk[i] = T(2) * Xk[i] - Xk2[i];
  }
}

template <typename T, int VB>
AK_INLINE void cheb_forward_range_impl(const ChebArgs<T>& a, int64_t s0, int64_t s1) {
  constexpr int64_t L = Vec<T, VB>::lanes;
  const int64_t N = a.N, F = a.F, Fo = a.Fo, K = a.K;
  const int64_t Fp = round_up(F, L), Fop = round_up(Fo, L), step = N * Fp;
  std::vector<T> X(K * step), y(N * Fop), theta(a.matrix ? K * F * Fop : 0);
  if (a.matrix)
    for (int64_t k = 0; k < K; ++k)
      copy_padded(a.coef + k * F * Fo, F, Fo, Fo, theta.data() + k * F * Fop, Fop);
  for (int64_t s = s0; s < s1; ++s) {
    chebyshev_terms<T, VB>(a, a.x + s * N * F, Fp, X.data());
    if (a.matrix) {
      gemm<T, VB, false>(N, Fop, F, X.data(), Fp, theta.data(), Fop, y.data(), Fop);
      for (int64_t k = 1; k < K; ++k)
        gemm<T, VB, true>(N, Fop, F, X.data() + k * step, Fp, theta.data() + k * F * Fop, Fop,
                          y.data(), Fop);
    } else {
      for (int64_t i = 0; i < step; ++i) y[i] = a.coef[0] * X[i];
      for (int64_t k = 1; k < K; ++k) {
        const T c = a.coef[k];
        const T* Xk = X.data() + k * step;
        for (int64_t i = 0; i < step; ++i) y[i] += c * Xk[i];
      }
    }
    T* o = a.out + s * N * Fo;
    for (int64_t i = 0; i < N; ++i)
      for (int64_t f = 0; f < Fo; ++f) o[i * Fo + f] = y[i * Fop + f];
  }
}
AK_GRAPH_MULTIVERSION(cheb_forward_range, ChebArgs)

template <typename T, int VB>
AK_INLINE void cheb_backward_range_impl(const ChebArgs<T>& a, int64_t s0, int64_t s1) {
  constexpr int64_t L = Vec<T, VB>::lanes;
  const int64_t N = a.N, F = a.F, Fo = a.Fo, K = a.K;
  const int64_t Fp = round_up(F, L), Fop = round_up(Fo, L), Np = round_up(N, L), step = N * Fp;
  const bool need_u = a.gx || a.gL;
  std::vector<T> X(K * step), U(need_u ? K * step : 0), gp(N * Fop), tmp(step), XT(F * Np);
  std::vector<T> thetaT(a.matrix ? K * Fo * Fp : 0), LT(N * N);
  std::vector<T> gL1(a.gL ? N * Np : 0, T(0)), gL2(a.gL ? N * Np : 0, T(0));
  std::vector<T> gC(a.gC ? (a.matrix ? K * F * Fop : K) : 0, T(0));
  if (a.matrix)
    for (int64_t k = 0; k < K; ++k)
      transpose_padded(a.coef + k * F * Fo, F, Fo, Fo, thetaT.data() + k * Fo * Fp, Fp);
  transpose_padded(a.lap, N, N, N, LT.data(), N);
  for (int64_t s = s0; s < s1; ++s) {
    chebyshev_terms<T, VB>(a, a.x + s * N * F, Fp, X.data());
    copy_padded(a.g + s * N * Fo, N, Fo, Fo, gp.data(), Fop);
    if (a.gC) {
      for (int64_t k = 0; k < K; ++k) {
        const T* Xk = X.data() + k * step;
        if (a.matrix) {
          transpose_padded(Xk, N, F, Fp, XT.data(), N);  // (F, N)
          gemm<T, VB, true>(F, Fop, N, XT.data(), N, gp.data(), Fop, gC.data() + k * F * Fop, Fop);
        } else {
          gC[k] += dot_lanes<T, VB>(Xk, gp.data(), step);  // Fp == Fop here (Fo == F)
        }
      }
    }
    if (!need_u) continue;
    for (int64_t k = K - 1; k >= 0; --k) {
      T* Uk = U.data() + k * step;
      if (a.matrix) {
        gemm<T, VB, false>(N, Fp, Fo, gp.data(), Fop, thetaT.data() + k * Fo * Fp, Fp, Uk, Fp);
      } else {
        const T c = a.coef[k];
        for (int64_t i = 0; i < step; ++i) Uk[i] = c * gp[i];
      }
      if (k + 1 < K) {
        gemm<T, VB, false>(N, Fp, N, LT.data(), N, Uk + step, Fp, tmp.data(), Fp);
        const T c = k + 1 >= 2 ? T(2) : T(1);
        for (int64_t i = 0; i < step; ++i) Uk[i] += c * tmp[i];
      }
      if (k + 2 < K) {
        const T* Uk2 = Uk + 2 * step;
        for (int64_t i = 0; i < step; ++i) Uk[i] -= Uk2[i];
      }
    }
    if (a.gx) {
      T* dst = a.gx + s * N * F;
      for (int64_t i = 0; i < N; ++i)
        for (int64_t f = 0; f < F; ++f) dst[i * F + f] = U[i * Fp + f];
    }
    if (a.gL)
      for (int64_t k = 1; k < K; ++k) {
        transpose_padded(X.data() + (k - 1) * step, N, F, Fp, XT.data(), Np);  // (F, Np)
        T* acc = k == 1 ? gL1.data() : gL2.data();
        gemm<T, VB, true>(N, Np, F, U.data() + k * step, Fp, XT.data(), Np, acc, Np);
      }
  }
  if (a.gL)
    for (int64_t i = 0; i < N; ++i)
      for (int64_t j = 0; j < N; ++j) a.gL[i * N + j] += gL1[i * Np + j] + T(2) * gL2[i * Np + j];
  if (a.gC) {
    if (a.matrix) {
      for (int64_t k = 0; k < K; ++k)
        for (int64_t r = 0; r < F; ++r)
          for (int64_t f = 0; f < Fo; ++f) a.gC[(k * F + r) * Fo + f] += gC[(k * F + r) * Fop + f];
    } else {
      for (int64_t k = 0; k < K; ++k) a.gC[k] += gC[k];
    }
  }
}
AK_GRAPH_MULTIVERSION(cheb_backward_range, ChebArgs)

template <typename T>
void forward(const ChebArgs<T>& args, int64_t S) {
  if (S == 0) return;
  const int nt = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(omp_get_max_threads(), S)));
  const int level = simd_level();
#pragma omp parallel num_threads(nt)
  {
    int64_t s0, s1;
    thread_range(S, omp_get_thread_num(), omp_get_num_threads(), &s0, &s1);
    cheb_forward_range(level, args, s0, s1);
  }
}

template <typename T>
void backward(ChebArgs<T> args, int64_t S) {
  const int64_t N = args.N, nC = args.matrix ? args.K * args.F * args.Fo : args.K;
  T* gL = args.gL;
  T* gC = args.gC;
  const int nt = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(omp_get_max_threads(), S)));
  std::vector<T> partL(gL ? nt * N * N : 0, T(0)), partC(gC ? nt * nC : 0, T(0));
  const int level = simd_level();
  if (S > 0) {
#pragma omp parallel num_threads(nt)
    {
      const int t = omp_get_thread_num();
      ChebArgs<T> a = args;
      a.gL = gL ? partL.data() + t * N * N : nullptr;
      a.gC = gC ? partC.data() + t * nC : nullptr;
      int64_t s0, s1;
      thread_range(S, t, omp_get_num_threads(), &s0, &s1);
      cheb_backward_range(level, a, s0, s1);
    }
  }
  auto reduce = [nt](const std::vector<T>& parts, T* dst, int64_t size) {
    std::fill(dst, dst + size, T(0));
    for (int t = 0; t < nt; ++t)
      for (int64_t i = 0; i < size; ++i) dst[i] += parts[t * size + i];
  };
  if (gL) reduce(partL, gL, N * N);
  if (gC) reduce(partC, gC, nC);
}

}  // namespace

void cheb_graph_conv_forward_cpu(DType dtype, const void* x, const void* lap, const void* coef,
                                 void* out, int64_t S, int64_t N, int64_t F, int64_t Fo, int64_t K,
                                 bool matrix) {
  AFFECTKIT_DISPATCH_CPU_FLOAT(dtype, "x", T, [&] {
    if (!all_finite(static_cast<const T*>(lap), N * N))
      throw ValueError("laplacian: expected finite values, got NaN or infinity");
    ChebArgs<T> a{static_cast<const T*>(x), static_cast<const T*>(lap), static_cast<const T*>(coef),
                  static_cast<T*>(out), nullptr, nullptr, nullptr, nullptr, N, F, Fo, K, matrix};
    forward(a, S);
  });
}

void cheb_graph_conv_backward_cpu(DType dtype, const void* g, const void* x, const void* lap,
                                  const void* coef, void* gx, void* gL, void* gC, int64_t S,
                                  int64_t N, int64_t F, int64_t Fo, int64_t K, bool matrix) {
  AFFECTKIT_DISPATCH_CPU_FLOAT(dtype, "grad_out", T, [&] {
    ChebArgs<T> a{static_cast<const T*>(x), static_cast<const T*>(lap), static_cast<const T*>(coef),
                  nullptr, static_cast<const T*>(g), static_cast<T*>(gx), static_cast<T*>(gL),
                  static_cast<T*>(gC), N, F, Fo, K, matrix};
    backward(a, S);
  });
}

}  // namespace detail

namespace {

void validate_cheb(const char* fn, Device device, const void* x, const void* lap,
                   const void* coef, int64_t S, int64_t N, int64_t F, int64_t Fo, int64_t K,
                   bool matrix) {
  check_dims_nonnegative("S", S);
  check_dims_nonnegative("N", N);
  check_dims_nonnegative("F", F);
  check_dims_nonnegative("Fo", Fo);
  if (K < 1) throw ValueError("K: expected at least one Chebyshev coefficient, got " + std::to_string(K));
  if (!matrix && Fo != F)
    throw ValueError("Fo: expected Fo == F = " + std::to_string(F) +
                     " with scalar coefficients, got " + std::to_string(Fo));
  check_pointer("x", x, S * N * F);
  check_pointer("laplacian", lap, N * N);
  check_pointer("coefficients", coef, matrix ? K * F * Fo : K);
  if (device == Device::CUDA) check_cuda_compiled(fn);
}

}  // namespace

void cheb_graph_conv_forward(Device device, DType dtype, const void* x, const void* laplacian,
                             const void* coefficients, void* out, int64_t S, int64_t N,
                             int64_t F, int64_t Fo, int64_t K, bool matrix_coefficients,
                             uintptr_t stream) {
  validate_cheb("cheb_graph_conv_forward", device, x, laplacian, coefficients, S, N, F, Fo, K,
                matrix_coefficients);
  check_pointer("out", out, S * N * Fo);
  (void)stream;
  if (device == Device::CUDA) {
#ifdef AFFECTKIT_WITH_CUDA
    detail::cheb_graph_conv_forward_cuda(dtype, x, laplacian, coefficients, out, S, N, F, Fo, K,
                                         matrix_coefficients, stream);
#endif
    return;
  }
  detail::cheb_graph_conv_forward_cpu(dtype, x, laplacian, coefficients, out, S, N, F, Fo, K,
                                      matrix_coefficients);
}

void cheb_graph_conv_backward(Device device, DType dtype, const void* grad_out, const void* x,
                              const void* laplacian, const void* coefficients, void* grad_x,
                              void* grad_laplacian, void* grad_coefficients, int64_t S, int64_t N,
                              int64_t F, int64_t Fo, int64_t K, bool matrix_coefficients,
                              uintptr_t stream) {
  validate_cheb("cheb_graph_conv_backward", device, x, laplacian, coefficients, S, N, F, Fo, K,
                matrix_coefficients);
  check_pointer("grad_out", grad_out, S * N * Fo);
  (void)stream;
  if (device == Device::CUDA)
    throw ValueError("device: expected CPU, got CUDA: cheb_graph_conv_backward has no CUDA kernel "
                     "(affectkit.ops computes it with PyTorch operations on CUDA)");
  detail::cheb_graph_conv_backward_cpu(dtype, grad_out, x, laplacian, coefficients, grad_x,
                                       grad_laplacian, grad_coefficients, S, N, F, Fo, K,
                                       matrix_coefficients);
}

}  // namespace affectkit::graph
