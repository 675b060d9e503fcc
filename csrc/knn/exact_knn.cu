// CUDA path of exact filtered k-NN: one fused kernel computes a tile of distances (shared-
// memory tiled product), applies the filter and folds the tile into a per-query running
// top-k held in shared memory; a second kernel merges the per-chunk lists of each query.
// The (nq, n) score matrix never exists. Ties go to the smaller id, as on the CPU.
// float16 with d % 16 == 0 uses the tensor-core kernel (exact_knn_tc.cu) instead of the fused
// one; it visits only the rows a shared mask allows (compacted on the device).
#include <algorithm>
#include <cmath>
#include <string>
#include <type_traits>

#include "../core/cuda_utils.cuh"
#include "../core/dispatch.h"
#include "exact_knn_tc.h"
#include "knn.h"

namespace affectkit::knn::detail {
namespace {

constexpr int kLanes = 32;       // rows per tile = lanes of a warp
constexpr int kQueries = 8;      // queries per block = warps per block
constexpr int kDepth = 32;       // feature columns per shared-memory step
constexpr int kMaxK = 256;       // per-query list in shared memory

__device__ __forceinline__ bool better(float da, long long ia, float db, long long ib) {
  return da < db || (da == db && ia < ib);
}

template <typename T>
__device__ __forceinline__ float load(const T* p) { return to_float(*p); }

// Fold one candidate per lane into the warp's sorted list (dist/id of length <= k).
__device__ void fold(float* ld, long long* li, int* cnt_ptr, int k, float dist, long long id,
                     bool valid) {
  const unsigned full = 0xffffffffu;
  const int lane = threadIdx.x;
  int cnt = *cnt_ptr;
  bool cand = valid && !isnan(dist) && (cnt < k || better(dist, id, ld[cnt - 1], li[cnt - 1]));
  unsigned pending = __ballot_sync(full, cand);
  while (pending) {
    const int src = __ffs(pending) - 1;
    pending &= pending - 1;
    const float cd = __shfl_sync(full, dist, src);
    const long long ci = __shfl_sync(full, id, src);
    cnt = *cnt_ptr;
    if (cnt == k && !better(cd, ci, ld[k - 1], li[k - 1])) continue;  // warp-uniform
    int pos = 0;
    for (int j = lane; j < cnt; j += kLanes) pos += better(ld[j], li[j], cd, ci) ? 1 : 0;
    for (int off = 16; off > 0; off >>= 1) pos += __shfl_xor_sync(full, pos, off);
    const int last = min(cnt, k - 1);  // elements [pos, last) move one place right
    for (int base = last - 1; base >= pos; base -= kLanes) {
      const int j = base - lane;
      float vd = 0.f;
      long long vi = 0;
      if (j >= pos) {
        vd = ld[j];
        vi = li[j];
      }
      __syncwarp();
      if (j >= pos) {
        ld[j + 1] = vd;
        li[j + 1] = vi;
      }
      __syncwarp();
    }
    if (lane == 0) {
      ld[pos] = cd;
      li[pos] = ci;
      *cnt_ptr = min(cnt + 1, k);
    }
    __syncwarp();
  }
}

// grid: (query blocks, row chunks); block: (32 lanes, 8 warps). Warp w owns query q0 + w.
template <typename T>
__global__ void fused_topk_kernel(const T* __restrict__ queries, const T* __restrict__ db,
                                  const uint8_t* __restrict__ mask, bool mask_per_query,
                                  const int64_t* __restrict__ row_ids, int64_t nq, int64_t n,
                                  int64_t d, int metric, int k, int64_t chunk_rows,
                                  float* __restrict__ part_d, long long* __restrict__ part_i,
                                  int* __restrict__ part_n) {
  __shared__ float qs[kQueries][kDepth];
  __shared__ float xs[kLanes][kDepth + 1];
  __shared__ float list_d[kQueries][kMaxK];
  __shared__ long long list_i[kQueries][kMaxK];
  __shared__ int list_n[kQueries];

  const int lane = threadIdx.x, warp = threadIdx.y;
  const int64_t q = static_cast<int64_t>(blockIdx.x) * kQueries + warp;
  const int64_t chunk = blockIdx.y;
  const int64_t r_begin = chunk * chunk_rows;
  const int64_t r_end = min(n, r_begin + chunk_rows);
  if (lane == 0) list_n[warp] = 0;
  __syncthreads();

  for (int64_t r0 = r_begin; r0 < r_end; r0 += kLanes) {
    const int64_t row = r0 + lane;
    float acc = 0.f;
    for (int64_t d0 = 0; d0 < d; d0 += kDepth) {
      const int64_t col = d0 + lane;
      qs[warp][lane] = (q < nq && col < d) ? load(queries + q * d + col) : 0.f;
      for (int rr = warp; rr < kLanes; rr += kQueries) {
        const int64_t xr = r0 + rr;
        xs[rr][lane] = (xr < r_end && col < d) ? load(db + xr * d + col) : 0.f;
      }
      __syncthreads();
      const int depth = static_cast<int>(d - d0 < kDepth ? d - d0 : kDepth);
      if (metric == 1) {
        for (int t = 0; t < depth; ++t) {
          const float diff = qs[warp][t] - xs[lane][t];
          acc += diff * diff;
        }
      } else {
        for (int t = 0; t < depth; ++t) acc += qs[warp][t] * xs[lane][t];
      }
      __syncthreads();
    }
    bool valid = q < nq && row < r_end;
    if (valid && mask) valid = mask[(mask_per_query ? q * n : 0) + row] != 0;
    const float dist = metric == 0 ? -acc : (metric == 2 ? 1.f - acc : acc);
    const long long id = valid ? (row_ids ? row_ids[row] : row) : 0;
    fold(list_d[warp], list_i[warp], &list_n[warp], k, dist, id, valid);
  }

  if (q < nq) {
    const int cnt = list_n[warp];
    const int64_t base = (q * gridDim.y + chunk) * k;
    if (lane == 0) part_n[q * gridDim.y + chunk] = cnt;
    for (int j = lane; j < k; j += kLanes) {
      part_d[base + j] = j < cnt ? list_d[warp][j] : INFINITY;
      part_i[base + j] = j < cnt ? list_i[warp][j] : -1;
    }
  }
}

// One thread per query: merge the sorted per-chunk lists (padding sorts last).
template <typename T>
__global__ void merge_kernel(const float* __restrict__ part_d, const long long* __restrict__ part_i,
                             const int* __restrict__ part_n, int* __restrict__ heads, int64_t nq,
                             int64_t nchunks, int k,
                             T* __restrict__ out_d, int64_t* __restrict__ out_i) {
  const int64_t q = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (q >= nq) return;
  int* head = heads + q * nchunks;
  for (int j = 0; j < k; ++j) {
    int best = -1;
    float bd = INFINITY;
    long long bi = -1;
    for (int64_t c = 0; c < nchunks; ++c) {
      if (head[c] >= part_n[q * nchunks + c]) continue;  // this chunk's list is used up
      const int64_t at = (q * nchunks + c) * k + head[c];
      const long long ci = part_i[at];
      if (best < 0 || better(part_d[at], ci, bd, bi)) {
        best = static_cast<int>(c);
        bd = part_d[at];
        bi = ci;
      }
    }
    if (best >= 0) ++head[best];
    if constexpr (std::is_same_v<T, float>) out_d[q * k + j] = best >= 0 ? bd : INFINITY;
    else out_d[q * k + j] = from_float<T>(best >= 0 ? bd : INFINITY);
    out_i[q * k + j] = best >= 0 ? static_cast<int64_t>(bi) : -1;
  }
}

template <typename T>
void run(const T* queries, int64_t nq, const T* db, int64_t n, int64_t d, Metric metric,
         int64_t k, const Filter& filter, const int64_t* row_ids, T* out_d, int64_t* out_i,
         cudaStream_t stream) {
  int device = 0, sms = 1;
  cuda_check(cudaGetDevice(&device), "cudaGetDevice");
  cuda_check(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device),
             "cudaDeviceGetAttribute");
  const int64_t qblocks = (nq + kQueries - 1) / kQueries;
  int64_t nchunks = 0, chunk_rows = 0;
  TcPlan tc;  // float16 with d % 16 == 0: the tensor-core kernel (exact_knn_tc.cu)
  if constexpr (std::is_same_v<T, __half>)
    tc = plan_exact_tc(queries, nq, db, n, d, k, row_ids, device, sms);
  if (tc.ok) {
    nchunks = tc.nchunks;
    chunk_rows = tc.chunk_rows;
  } else if (n > 0) {
    nchunks = std::max<int64_t>(1, (4 * sms + qblocks - 1) / qblocks);
    nchunks = std::min<int64_t>({nchunks, (n + 255) / 256, 65535});
    chunk_rows = (n + nchunks - 1) / nchunks;
    nchunks = (n + chunk_rows - 1) / chunk_rows;
  }
  float* part_d = nullptr;
  long long* part_i = nullptr;
  int* heads = nullptr;
  int* part_n = nullptr;
  const size_t parts = static_cast<size_t>(nq * nchunks * k);
  auto release = [&] {
    if (part_d) cudaFreeAsync(part_d, stream);
    if (part_i) cudaFreeAsync(part_i, stream);
    if (heads) cudaFreeAsync(heads, stream);
    if (part_n) cudaFreeAsync(part_n, stream);
  };
  try {
    if (parts) {
      cuda_check(cudaMallocAsync(reinterpret_cast<void**>(&part_d), parts * sizeof(float), stream),
                 "exact_knn workspace");
      cuda_check(cudaMallocAsync(reinterpret_cast<void**>(&part_i), parts * sizeof(long long), stream),
                 "exact_knn workspace");
      cuda_check(cudaMallocAsync(reinterpret_cast<void**>(&heads), nq * nchunks * sizeof(int), stream),
                 "exact_knn workspace");
      cuda_check(cudaMallocAsync(reinterpret_cast<void**>(&part_n), nq * nchunks * sizeof(int), stream),
                 "exact_knn workspace");
      cuda_check(cudaMemsetAsync(heads, 0, nq * nchunks * sizeof(int), stream), "cudaMemsetAsync");
      if constexpr (std::is_same_v<T, __half>) {
        // a shared mask is compacted to the allowed rows on the stream inside launch_exact_tc
        // (device-side count, no host sync); chunks it leaves empty report part_n = 0
        if (tc.ok)
          launch_exact_tc(tc, queries, nq, db, n, d, static_cast<int>(metric), static_cast<int>(k),
                          filter.mask, filter.mask_per_query, part_d, part_i, part_n, stream);
      }
      if (!tc.ok) {
        const dim3 grid(static_cast<unsigned>(qblocks), static_cast<unsigned>(nchunks));
        fused_topk_kernel<T><<<grid, dim3(kLanes, kQueries), 0, stream>>>(
            queries, db, filter.mask, filter.mask_per_query, row_ids, nq, n, d,
            static_cast<int>(metric), static_cast<int>(k), chunk_rows, part_d, part_i, part_n);
        cuda_check(cudaGetLastError(), "exact_knn fused kernel launch");
      }
    }
    const int threads = 128;
    merge_kernel<T><<<static_cast<unsigned>((nq + threads - 1) / threads), threads, 0, stream>>>(
        part_d, part_i, part_n, heads, nq, nchunks, static_cast<int>(k), out_d, out_i);
    cuda_check(cudaGetLastError(), "exact_knn merge kernel launch");
  } catch (...) {
    release();
    throw;
  }
  release();
}

}  // namespace

void exact_search_cuda(DType dtype, const void* queries, int64_t nq, const void* database,
                       int64_t n, int64_t d, Metric metric, int64_t k, const Filter& filter,
                       const int64_t* row_ids, const void* db_sqnorms, void* out_dist,
                       int64_t* out_ids, uintptr_t stream) {
  (void)db_sqnorms;  // L2 is computed directly as sum((q - x)^2) on the GPU
  check_dtype_in("queries", dtype, {DType::Float32, DType::Float16});
  if (k > kMaxK)
    throw ValueError("k: expected at most " + std::to_string(kMaxK) + " on CUDA, got " +
                     std::to_string(k));
  if (nq == 0) return;
  if (dtype == DType::Float16) {
    run(static_cast<const __half*>(queries), nq, static_cast<const __half*>(database), n, d, metric,
        k, filter, row_ids, static_cast<__half*>(out_dist), out_ids, as_stream(stream));
  } else {
    run(static_cast<const float*>(queries), nq, static_cast<const float*>(database), n, d, metric,
        k, filter, row_ids, static_cast<float*>(out_dist), out_ids, as_stream(stream));
  }
}

}  // namespace affectkit::knn::detail
