// CUDA path of the fused attention: one warp per query row (forward, dq, weights) or per key
// row (dk, dv). Lanes take 32 keys (or queries) at a time for the scores, with an online
// softmax across those tiles, then the 32 lanes split the feature axis for P V. Accumulation
// is float32 (float64 for float64 inputs). No atomics: each warp owns the rows it writes, so
// gradients are deterministic. Lengths and offsets from data are clamped (memory-safe).
#include <algorithm>
#include <string>
#include <type_traits>

#include "../core/cuda_utils.cuh"
#include "../core/dispatch.h"
#include "attention.h"
#include "attention_common.h"
#include "cross_attention_tc.h"

namespace affectkit::attention::detail {
namespace {

constexpr int kWarps = 4;          // rows per block
constexpr int kThreads = kWarps * 32;
constexpr int kMaxPerLane = 8;     // 256 features / 32 lanes

template <typename A>
__device__ __forceinline__ A warp_max(A x) {
  for (int o = 16; o > 0; o >>= 1) x = max(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}
template <typename A>
__device__ __forceinline__ A warp_sum(A x) {
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}
__device__ __forceinline__ float exp_acc(float x) { return __expf(x); }
__device__ __forceinline__ double exp_acc(double x) { return exp(x); }
__device__ __forceinline__ float log_acc(float x) { return __logf(x); }
__device__ __forceinline__ double log_acc(double x) { return log(x); }

template <typename T, typename A>
__device__ __forceinline__ void store(T* p, A v) { *p = store_as<T>(v); }
template <typename T>
__device__ __forceinline__ auto load(const T* p) { return to_float(*p); }

template <typename T>
__device__ __forceinline__ const T* row_of(const View& t, int64_t b, int64_t h, int64_t row) {
  return static_cast<const T*>(t.data) + b * t.sb + h * t.sh + row * t.sr;
}
template <typename T>
__device__ __forceinline__ T* row_of(const MutView& t, int64_t b, int64_t h, int64_t row) {
  return static_cast<T*>(t.data) + b * t.sb + h * t.sh + row * t.sr;
}

// a . b over n features (each lane computes a whole dot product: lanes differ in b).
template <typename T, typename A>
__device__ __forceinline__ A dot(const T* a, const T* b, int64_t n) {
  A acc = 0;
  for (int64_t d = 0; d < n; ++d) acc += static_cast<A>(load(a + d)) * static_cast<A>(load(b + d));
  return acc;
}

// Scaled, masked score of (i, j), or -inf when j is past `jlim` or masked out.
template <typename A>
__device__ __forceinline__ A finish_score(A dotv, int64_t b, int64_t h, int64_t i, int64_t j,
                                          int64_t jlim, A scale, const Mask& mask) {
  if (j >= jlim) return -INFINITY;
  A s = dotv * scale;
  if (mask.data != nullptr) {
    const int64_t off = b * mask.sb + h * mask.sh + i * mask.si + j * mask.sj;
    if (mask.dtype == DType::Bool) {
      if (!static_cast<const uint8_t*>(mask.data)[off]) return -INFINITY;
    } else {
      s += static_cast<const A*>(mask.data)[off];
    }
  }
  return s;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) forward_kernel(Problem p, View q, View k, View v, Mask mask,
                                                          MutView out, MutView lse, uint32_t threshold) {
  using A = typename Acc<T>::type;
  const int lane = threadIdx.x & 31;
  const int64_t b = blockIdx.z, h = blockIdx.y;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  const Seq s = seq_info(p, b);
  if (i >= s.qrows) return;
  T* orow = row_of<T>(out, b, h, s.q0 + i);
  A* lrow = row_of<A>(lse, b, h, s.q0 + i);
  const A scale = static_cast<A>(p.scale);
  const A inv_keep = p.dropout_p > 0 ? static_cast<A>(1.0 / (1.0 - p.dropout_p)) : A(1);
  A acc[kMaxPerLane];
#pragma unroll
  for (int t = 0; t < kMaxPerLane; ++t) acc[t] = 0;
  A m = -INFINITY, l = 0;
  if (i < s.qlen) {
    const T* qrow = row_of<T>(q, b, h, s.q0 + i);
    const int64_t kend = key_end(p, s, i);
    const uint64_t key = threshold > 0 ? dropout_row_key(p.seed, b, h, i) : 0;
    for (int64_t j0 = 0; j0 < kend; j0 += 32) {
      const int64_t j = j0 + lane;
      A sc = -INFINITY;
      if (j < kend) sc = finish_score<A>(dot<T, A>(qrow, row_of<T>(k, b, h, s.k0 + j), p.D), b, h, i, j, kend, scale, mask);
      const A mnew = max(m, warp_max(sc));
      if (mnew == -INFINITY) continue;  // warp-uniform: nothing visible yet
      const A alpha = exp_acc(m - mnew);
      A pj = sc == -INFINITY ? A(0) : exp_acc(sc - mnew);
      l = l * alpha + warp_sum(pj);
      m = mnew;
      if (threshold > 0 && j < kend) pj = dropout_keep(key, j, threshold) ? pj * inv_keep : A(0);
#pragma unroll
      for (int t = 0; t < kMaxPerLane; ++t) acc[t] *= alpha;
      const int64_t n = clamp64(kend - j0, 0, 32);
      for (int jj = 0; jj < n; ++jj) {
        const A w = __shfl_sync(0xffffffffu, pj, jj);
        if (w == A(0)) continue;  // warp-uniform
        const T* vrow = row_of<T>(v, b, h, s.k0 + j0 + jj);
#pragma unroll
        for (int t = 0; t < kMaxPerLane; ++t) {
          const int64_t d = lane + 32 * t;
          if (d < p.Dv) acc[t] += w * static_cast<A>(load(vrow + d));
        }
      }
    }
  }
  const bool any = l > A(0);
  const A inv = any ? A(1) / l : A(0);
#pragma unroll
  for (int t = 0; t < kMaxPerLane; ++t) {
    const int64_t d = lane + 32 * t;
    if (d < p.Dv) store(orow + d, any ? acc[t] * inv : A(0));
  }
  if (lane == 0) *lrow = any ? m + log_acc(l) : A(INFINITY);
}

// dq (warp per query row), and delta_i = dO_i . O_i for the dk/dv kernel; with gmask, also
// the row's score gradient dS (the buffer is zeroed before, so only visible keys are written).
template <typename T>
__global__ void __launch_bounds__(kThreads) dq_kernel(Problem p, View q, View k, View v, Mask mask, View out,
                                                     View gout, View lse, MutView gq,
                                                     typename Acc<T>::type* delta, uint32_t threshold,
                                                     typename Acc<T>::type* gmask) {
  using A = typename Acc<T>::type;
  const int lane = threadIdx.x & 31;
  const int64_t b = blockIdx.z, h = blockIdx.y;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  const Seq s = seq_info(p, b);
  if (i >= s.qrows) return;
  T* dqrow = row_of<T>(gq, b, h, s.q0 + i);
  A acc[kMaxPerLane];
#pragma unroll
  for (int t = 0; t < kMaxPerLane; ++t) acc[t] = 0;
  if (i < s.qlen) {
    const T* qrow = row_of<T>(q, b, h, s.q0 + i);
    const T* gorow = row_of<T>(gout, b, h, s.q0 + i);
    const T* orow = row_of<T>(out, b, h, s.q0 + i);
    A part = 0;
    for (int64_t d = lane; d < p.Dv; d += 32) part += static_cast<A>(load(gorow + d)) * static_cast<A>(load(orow + d));
    const A di = warp_sum(part);
    if (lane == 0) delta[(h * p.B + b) * p.Lq + i] = di;
    const A lse_i = *row_of<A>(lse, b, h, s.q0 + i);
    const A scale = static_cast<A>(p.scale);
    const A inv_keep = p.dropout_p > 0 ? static_cast<A>(1.0 / (1.0 - p.dropout_p)) : A(1);
    const int64_t kend = isinf(lse_i) ? 0 : key_end(p, s, i);
    const uint64_t key = threshold > 0 ? dropout_row_key(p.seed, b, h, i) : 0;
    A* gmrow = gmask != nullptr ? gmask + ((b * p.H + h) * p.Lq + i) * p.Lk : nullptr;
    for (int64_t j0 = 0; j0 < kend; j0 += 32) {
      const int64_t j = j0 + lane;
      A ds = 0;
      if (j < kend) {
        const A sc = finish_score<A>(dot<T, A>(qrow, row_of<T>(k, b, h, s.k0 + j), p.D), b, h, i, j, kend, scale, mask);
        if (sc != -INFINITY) {
          const A pj = exp_acc(sc - lse_i);
          A dp = dot<T, A>(gorow, row_of<T>(v, b, h, s.k0 + j), p.Dv);
          if (threshold > 0) dp = dropout_keep(key, j, threshold) ? dp * inv_keep : A(0);
          ds = pj * (dp - di);
        }
        if (gmrow != nullptr) gmrow[j] = ds;
      }
      const int64_t n = clamp64(kend - j0, 0, 32);
      for (int jj = 0; jj < n; ++jj) {
        const A w = __shfl_sync(0xffffffffu, ds, jj);
        if (w == A(0)) continue;
        const T* krow = row_of<T>(k, b, h, s.k0 + j0 + jj);
#pragma unroll
        for (int t = 0; t < kMaxPerLane; ++t) {
          const int64_t d = lane + 32 * t;
          if (d < p.D) acc[t] += w * static_cast<A>(load(krow + d));
        }
      }
    }
#pragma unroll
    for (int t = 0; t < kMaxPerLane; ++t) acc[t] *= scale;
  }
#pragma unroll
  for (int t = 0; t < kMaxPerLane; ++t) {
    const int64_t d = lane + 32 * t;
    if (d < p.D) store(dqrow + d, acc[t]);
  }
}

// dk and dv, warp per key row: lanes take 32 queries at a time.
template <typename T>
__global__ void __launch_bounds__(kThreads) dkdv_kernel(Problem p, View q, View k, View v, Mask mask,
                                                       View gout, View lse, MutView gk, MutView gv,
                                                       const typename Acc<T>::type* delta,
                                                       uint32_t threshold) {
  using A = typename Acc<T>::type;
  const int lane = threadIdx.x & 31;
  const int64_t b = blockIdx.z, h = blockIdx.y;
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  const Seq s = seq_info(p, b);
  if (j >= s.krows) return;
  A dk[kMaxPerLane], dv[kMaxPerLane];
#pragma unroll
  for (int t = 0; t < kMaxPerLane; ++t) dk[t] = dv[t] = 0;
  if (j < s.klen) {
    const T* krow = row_of<T>(k, b, h, s.k0 + j);
    const T* vrow = row_of<T>(v, b, h, s.k0 + j);
    const A scale = static_cast<A>(p.scale);
    const A inv_keep = p.dropout_p > 0 ? static_cast<A>(1.0 / (1.0 - p.dropout_p)) : A(1);
    // Causal: query i sees j iff j <= i + offset.
    const int64_t ifirst = p.causal ? clamp64(j - s.offset, 0, s.qlen) : 0;
    for (int64_t i0 = ifirst; i0 < s.qlen; i0 += 32) {
      const int64_t i = i0 + lane;
      A ds = 0, pz = 0;
      if (i < s.qlen) {
        const A lse_i = *row_of<A>(lse, b, h, s.q0 + i);
        const T* qrow = row_of<T>(q, b, h, s.q0 + i);
        const A sc = isinf(lse_i) ? A(-INFINITY)
                                  : finish_score<A>(dot<T, A>(qrow, krow, p.D), b, h, i, j, key_end(p, s, i), scale, mask);
        if (sc != -INFINITY) {
          const A pj = exp_acc(sc - lse_i);
          A dp = dot<T, A>(row_of<T>(gout, b, h, s.q0 + i), vrow, p.Dv);
          A z = A(1);
          if (threshold > 0) z = dropout_keep(dropout_row_key(p.seed, b, h, i), j, threshold) ? inv_keep : A(0);
          ds = pj * (dp * z - delta[(h * p.B + b) * p.Lq + i]);
          pz = pj * z;
        }
      }
      const int64_t n = clamp64(s.qlen - i0, 0, 32);
      for (int ii = 0; ii < n; ++ii) {
        const A wds = __shfl_sync(0xffffffffu, ds, ii);
        const A wp = __shfl_sync(0xffffffffu, pz, ii);
        if (wds == A(0) && wp == A(0)) continue;
        const T* qr = row_of<T>(q, b, h, s.q0 + i0 + ii);
        const T* gr = row_of<T>(gout, b, h, s.q0 + i0 + ii);
#pragma unroll
        for (int t = 0; t < kMaxPerLane; ++t) {
          const int64_t d = lane + 32 * t;
          if (d < p.D) dk[t] += wds * static_cast<A>(load(qr + d));
          if (d < p.Dv) dv[t] += wp * static_cast<A>(load(gr + d));
        }
      }
    }
#pragma unroll
    for (int t = 0; t < kMaxPerLane; ++t) dk[t] *= scale;
  }
  T* dkrow = row_of<T>(gk, b, h, s.k0 + j);
  T* dvrow = row_of<T>(gv, b, h, s.k0 + j);
#pragma unroll
  for (int t = 0; t < kMaxPerLane; ++t) {
    const int64_t d = lane + 32 * t;
    if (d < p.D) store(dkrow + d, dk[t]);
    if (d < p.Dv) store(dvrow + d, dv[t]);
  }
}

// Probabilities (after dropout), warp per (b, query row): head-averaged or per head.
template <typename T>
__global__ void __launch_bounds__(kThreads) weights_kernel(Problem p, View q, View k, Mask mask, View lse,
                                                          T* w, bool average_heads, uint32_t threshold) {
  using A = typename Acc<T>::type;
  const int lane = threadIdx.x & 31;
  const int64_t b = blockIdx.y;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (i >= p.Lq) return;
  const Seq s = seq_info(p, b);
  const A scale = static_cast<A>(p.scale);
  const A inv_keep = p.dropout_p > 0 ? static_cast<A>(1.0 / (1.0 - p.dropout_p)) : A(1);
  const A factor = average_heads && p.H > 0 ? A(1) / static_cast<A>(p.H) : A(1);
  const int64_t kend = i < s.qlen ? key_end(p, s, i) : 0;
  for (int64_t j0 = 0; j0 < p.Lk; j0 += 32) {
    const int64_t j = j0 + lane;
    A sum = 0;
    for (int64_t h = 0; h < p.H; ++h) {
      A pj = 0;
      if (j < kend) {
        const A lse_i = *row_of<A>(lse, b, h, s.q0 + i);
        const A sc = isinf(lse_i) ? A(-INFINITY)
                                  : finish_score<A>(dot<T, A>(row_of<T>(q, b, h, s.q0 + i), row_of<T>(k, b, h, s.k0 + j), p.D),
                                                    b, h, i, j, kend, scale, mask);
        if (sc != -INFINITY) pj = exp_acc(sc - lse_i);
        if (threshold > 0) pj = dropout_keep(dropout_row_key(p.seed, b, h, i), j, threshold) ? pj * inv_keep : A(0);
      }
      if (average_heads) {
        sum += pj * factor;
      } else if (j < p.Lk) {
        store(w + ((b * p.H + h) * p.Lq + i) * p.Lk + j, pj);
      }
    }
    if (average_heads && j < p.Lk) store(w + (b * p.Lq + i) * p.Lk + j, sum);
  }
}

void check_grid(const Problem& p, const char* fn) {
  if (p.B > 65535 || p.H > 65535)
    throw ValueError(std::string(fn) + ": expected B and H at most 65535 on CUDA, got B = " +
                     std::to_string(p.B) + ", H = " + std::to_string(p.H));
}

unsigned row_blocks(int64_t rows) { return static_cast<unsigned>(std::max<int64_t>((rows + kWarps - 1) / kWarps, 1)); }

}  // namespace

void forward_cuda(DType dtype, const Problem& p, View q, View k, View v, Mask mask, MutView out,
                  MutView lse, uintptr_t stream) {
  if (p.B == 0 || p.H == 0 || p.Lq == 0) return;
  check_grid(p, "attention_forward");
  // fp16/bf16 problems it takes go to the tensor-core kernel (cross_attention_tc.cu).
  if (forward_cuda_tensor_cores(dtype, p, q, k, v, mask, out, lse, stream)) return;
  AFFECTKIT_DISPATCH_CUDA_FLOAT(dtype, "q", T, [&] {
    dim3 grid(row_blocks(p.Lq), static_cast<unsigned>(p.H), static_cast<unsigned>(p.B));
    forward_kernel<T><<<grid, kThreads, 0, as_stream(stream)>>>(p, q, k, v, mask, out, lse,
                                                               dropout_threshold(p.dropout_p));
  });
  cuda_check(cudaGetLastError(), "attention_forward");
}

void backward_cuda(DType dtype, const Problem& p, View q, View k, View v, Mask mask, View out,
                   View gout, View lse, MutView gq, MutView gk, MutView gv, void* gmask,
                   uintptr_t stream) {
  if (p.B == 0 || p.H == 0) return;
  check_grid(p, "attention_backward");
  // fp16/bf16 problems it takes go to the tensor-core kernels (cross_attention_tc_backward.cu).
  if (backward_cuda_tensor_cores(dtype, p, q, k, v, mask, out, gout, lse, gq, gk, gv, gmask, stream)) return;
  const cudaStream_t st = as_stream(stream);
  AFFECTKIT_DISPATCH_CUDA_FLOAT(dtype, "q", T, [&] {
    using A = typename Acc<T>::type;
    A* gm = static_cast<A*>(gmask);
    if (gm != nullptr && p.Lq > 0 && p.Lk > 0)
      cuda_check(cudaMemsetAsync(gm, 0, p.B * p.H * p.Lq * p.Lk * sizeof(A), st), "attention_backward: grad_mask");
    const uint32_t threshold = dropout_threshold(p.dropout_p);
    A* delta = nullptr;
    const int64_t n_delta = std::max<int64_t>(p.H * p.B * p.Lq, 1);
    cuda_check(cudaMallocAsync(reinterpret_cast<void**>(&delta), n_delta * sizeof(A), st), "attention_backward: scratch");
    if (p.Lq > 0) {
      dim3 grid(row_blocks(p.Lq), static_cast<unsigned>(p.H), static_cast<unsigned>(p.B));
      dq_kernel<T><<<grid, kThreads, 0, st>>>(p, q, k, v, mask, out, gout, lse, gq, delta, threshold, gm);
    }
    if (p.Lk > 0) {
      dim3 grid(row_blocks(p.Lk), static_cast<unsigned>(p.H), static_cast<unsigned>(p.B));
      dkdv_kernel<T><<<grid, kThreads, 0, st>>>(p, q, k, v, mask, gout, lse, gk, gv, delta, threshold);
    }
    const cudaError_t launch = cudaGetLastError();
    cuda_check(cudaFreeAsync(delta, st), "attention_backward: scratch");
    cuda_check(launch, "attention_backward");
  });
}

void weights_cuda(DType dtype, const Problem& p, View q, View k, Mask mask, View lse, void* w,
                  bool average_heads, uintptr_t stream) {
  if (p.B == 0 || p.Lq == 0 || p.Lk == 0) return;
  check_grid(p, "attention_weights");
  AFFECTKIT_DISPATCH_CUDA_FLOAT(dtype, "q", T, [&] {
    dim3 grid(row_blocks(p.Lq), static_cast<unsigned>(p.B));
    weights_kernel<T><<<grid, kThreads, 0, as_stream(stream)>>>(p, q, k, mask, lse, static_cast<T*>(w),
                                                               average_heads, dropout_threshold(p.dropout_p));
  });
  cuda_check(cudaGetLastError(), "attention_weights");
}

}  // namespace affectkit::attention::detail
