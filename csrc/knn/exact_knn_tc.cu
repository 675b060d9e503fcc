// Tensor-core path of the CUDA exact filtered k-NN for float16 queries and rows (d % 16 == 0).
//
// Why: the scalar fused kernel (exact_knn.cu) computes 32x8 tiles with FMAs through shared
// memory; at 1000 queries x 1M x 384 it is bound by scalar FMA issue (157 ms), while the work
// is one fp16 GEMM, 0.77 TFLOP (~1 ms on tensor cores) over 768 MB of rows (0.26 ms of HBM).
// Why compact shared filters: scoring every row and masking afterwards made the time
// independent of selectivity (H100, 1000 x 1M x 384, k = 10: 5.70 ms at 1 % allowed, 6.33 ms
// at 100 %); visiting only the allowed rows makes it proportional to them, plus a compaction
// pass over the n-byte mask (microseconds).
//
// Design (one block = 256 threads = 8 warps; grid = (query blocks, row chunks)):
//   * The block's BQ queries (BQ = 128, 64 or 32, the largest that fits in shared memory and
//     is useful for nq) stay resident in shared memory for the whole chunk (loaded once with
//     cp.async), so L2/HBM traffic per 128-row tile is only the rows: each row byte is reused
//     by BQ queries (at BQ = 128 and nq = 1000 the rows are read 8 times, ~6 GB mostly from L2).
//   * Rows stream through a 2-stage cp.async (16-byte, zero-filled out of range) pipeline of
//     128 rows x 64 columns. Each warp owns a (BQ/WQ) x (128/WN) piece of the BQ x 128 score
//     tile and computes it with WMMA 16x16x16 fp16 x fp16 -> fp32 (exact products, fp32 sums:
//     small-integer inputs give exact scores, as on the CPU).
//   * A shared filter (one allow-mask for all queries) is applied before the kernel, not in
//     it: launch_exact_tc compacts the allowed row indices on the device (CUB DeviceSelect::
//     Flagged over a counting iterator -> ascending int32 `rows` and a device int32 `count`,
//     workspace from cudaMallocAsync on the call's stream; nothing is read back, so the call
//     stays asynchronous and capturable in a CUDA graph). The kernel's row space is then
//     [0, *count): the host plans grid.y = nchunks from n as usual, and each block reads
//     *count and takes chunk c = [c * cr, min(count, (c + 1) * cr)) with
//     cr = round_up(ceil(count / nchunks), 128); blocks left with nothing write empty lists
//     (part_n = 0, +inf, -1), which the merge skips. Tiles gather rows[j] (row indices for
//     the next tile are loaded one tile ahead into registers) and the id recorded is rows[j],
//     so the (distance, id) tie rule is unchanged (rows is ascending). Per-query masks and
//     no mask use the identity row space and test the per-query mask in the epilogue.
//   * The fp32 score tile goes to shared memory; the metric is applied there (ip: -s; cosine:
//     1 - s, the rows/queries were normalised by the caller, zero vectors give 1; l2:
//     |q|^2 + |x|^2 - 2 s with fp32 norms of the fp16 values, clamped at 0, NaN kept), then
//     a per-query filter, then a per-query running top-k: one warp owns BQ/8 queries; each lane takes
//     4 consecutive rows of a query (one 16-byte shared load) and rejects a candidate with a
//     single compare against the query's current k-th distance (+inf until the list is full).
//     Survivors (rare: ~k ln(n/k) per query and chunk on random data) are inserted into the
//     sorted shared-memory list by the whole warp, with the exact (distance, id) tie rule.
//     The next tile's first row stage is already in flight during this epilogue.
//   * Rows are split into chunks (multiples of 128 rows) so that query blocks x chunks fill
//     the GPU in one wave; each (query, chunk) list is written out in the scalar kernel's
//     layout and merged by its merge kernel. Ids are database row indices (int32 inside the
//     kernel; rows[j] on the compacted path).
// Floor at the benchmark shape: max(0.77 TFLOP / ~600 TFLOP/s (mma.sync-class issue on H100),
// 6 GB of L2 reads / ~7 TB/s) ~ 1 ms; WMMA through shared memory with 8 warps per SM and an
// unoverlapped epilogue should land at ~2-3x that.
// AFFECTKIT_KNN_TENSOR_CORES=0 (read once) disables this path. Where its shared memory fits,
// the mma.sync kernel of exact_knn_mma.cu (register epilogue, 128 x 256 tiles) replaces the
// WMMA kernel below; AFFECTKIT_KNN_MMA=0 (read once) keeps WMMA. Planning and the compaction
// of a shared filter here serve both.

// CUB's NVTX ranges would pull NVTX's dlopen-based injection into this object; not wanted.
#ifndef CCCL_DISABLE_NVTX
#define CCCL_DISABLE_NVTX
#endif
#include <mma.h>
#include <thrust/iterator/counting_iterator.h>

#include <cub/device/device_select.cuh>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdlib>
#include <cstring>

#include "../core/cuda_utils.cuh"
#include "exact_knn_tc.h"

namespace affectkit::knn::detail {
namespace {

using namespace nvcuda;
using namespace mma_common;

constexpr int kThreads = 256;  // 8 warps
constexpr int kWarps = kThreads / 32;
constexpr int kBN = 128;       // rows per tile
constexpr int kBK = 64;        // columns per pipeline stage
constexpr int kStages = 2;
constexpr int kXLD = kBK + 8;  // halves per staged row (144 bytes: conflict-free ldmatrix)
constexpr int kSLD = kBN + 4;  // floats per score-tile row

__host__ __device__ constexpr size_t align128(size_t x) { return (x + 127) & ~size_t(127); }

// Shared-memory carve-up, identical on host and device.
struct Layout {
  size_t qs, xs, sc, ld, lr, cnt, thr, qn, xn, total;
  __host__ __device__ Layout(int bq, int64_t d, int k) {
    size_t off = 0;
    qs = off; off += align128(size_t(bq) * size_t(d + 8) * 2);
    xs = off; off += align128(size_t(kStages) * kBN * kXLD * 2);
    sc = off; off += align128(size_t(bq) * kSLD * 4);
    ld = off; off += align128(size_t(bq) * size_t(k) * 4);
    lr = off; off += align128(size_t(bq) * size_t(k) * 4);
    cnt = off; off += align128(size_t(bq) * 4);
    thr = off; off += align128(size_t(bq) * 4);
    qn = off; off += align128(size_t(bq) * 4);
    xn = off; off += align128(size_t(kBN) * 4);
    total = off;
  }
};

// grid: (ceil(nq / BQ), nchunks); block: 256 threads; dynamic shared memory: Layout(BQ, d, k).
// rows == nullptr: the row space is [0, n), split into chunks of chunk_rows.
// rows != nullptr (a compacted shared filter; the caller then passes mask == nullptr): the row
// space is [0, *count), position j standing for database row rows[j] (ascending), split into
// nchunks chunks of round_up(ceil(*count / nchunks), 128) rows derived here on the device; the
// ids written are the database rows rows[j].
template <int BQ>
__global__ void __launch_bounds__(kThreads, 1)
tc_topk_kernel(const __half* __restrict__ queries, const __half* __restrict__ db,
               const uint8_t* __restrict__ mask, bool mask_per_query,
               const int* __restrict__ rows, const int* __restrict__ count, int64_t nq, int64_t n,
               int64_t d, int metric, int k, int64_t chunk_rows, float* __restrict__ part_d,
               long long* __restrict__ part_i, int* __restrict__ part_n) {
  constexpr int WQ = BQ == 128 ? 4 : 2;  // warps along queries
  constexpr int WN = kWarps / WQ;        // warps along rows
  constexpr int FQ = BQ / (16 * WQ);     // 16x16 fragments per warp along queries
  constexpr int FN = kBN / (16 * WN);    // ... along rows
  static_assert(FQ >= 1 && FN >= 1 && FQ * 16 * WQ == BQ && FN * 16 * WN == kBN, "warp tiling");

  extern __shared__ __align__(128) unsigned char smem[];
  const Layout lay(BQ, d, k);
  __half* qs = reinterpret_cast<__half*>(smem + lay.qs);
  __half* xs = reinterpret_cast<__half*>(smem + lay.xs);
  float* sc = reinterpret_cast<float*>(smem + lay.sc);
  float* list_d = reinterpret_cast<float*>(smem + lay.ld);
  int* list_r = reinterpret_cast<int*>(smem + lay.lr);
  int* list_n = reinterpret_cast<int*>(smem + lay.cnt);
  float* thr = reinterpret_cast<float*>(smem + lay.thr);
  float* qn = reinterpret_cast<float*>(smem + lay.qn);
  float* xn = reinterpret_cast<float*>(smem + lay.xn);

  const unsigned full = 0xffffffffu;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wq = warp / WN, wn = warp % WN;
  const int64_t q0 = static_cast<int64_t>(blockIdx.x) * BQ;
  const int64_t chunk = blockIdx.y;
  const int64_t nchunks = gridDim.y;
  int64_t n_rows = n;  // size of the row space
  if (rows != nullptr) {
    n_rows = *count;  // 0 <= *count <= n
    chunk_rows = (n_rows + nchunks - 1) / nchunks;
    chunk_rows = (chunk_rows + kBN - 1) / kBN * kBN;
  }
  const int64_t r_begin = chunk * chunk_rows;
  const int64_t r_end = min(n_rows, r_begin + chunk_rows);
  const bool has_rows = r_begin < r_end;  // block-uniform; false: write empty lists only
  const int QLD = static_cast<int>(d) + 8;  // halves per resident query row
  const int d8 = static_cast<int>(d / 8);   // 16-byte pieces per row
  const bool l2 = metric == 1;

  // Resident queries (rows past nq are zero), list state.
  if (has_rows) {
    for (int c = tid; c < BQ * d8; c += kThreads) {
      const int r = c / d8, p = c - r * d8;
      const bool ok = q0 + r < nq;
      cp_async16(qs + r * QLD + p * 8, ok ? queries + (q0 + r) * d + p * 8 : queries, ok);
    }
  }
  cp_async_commit();
  for (int i = tid; i < BQ; i += kThreads) {
    list_n[i] = 0;
    thr[i] = INFINITY;
  }
  cp_async_wait<0>();
  __syncthreads();
  if (l2 && has_rows) {
    for (int i = warp; i < BQ; i += kWarps) {
      float s = 0.f;
      for (int c = lane; c < d; c += 32) {
        const float v = __half2float(qs[i * QLD + c]);
        s += v * v;
      }
      for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(full, s, off);
      if (lane == 0) qn[i] = s;
    }
  }
  __syncthreads();

  // Thread tid stages the 16-byte piece tid % 8 of tile rows tid / 8 + 32 * it. Their database
  // rows (-1: past r_end, zero-filled) are held in registers for the tile being loaded; with a
  // compacted list the next tile's are fetched from rows[] one tile ahead (next_row), so the
  // gather adds no dependent global load in front of the cp.async.
  constexpr int kPieces = (kBN * kBK / 8) / kThreads;
  auto db_row = [&](int64_t j) -> int {
    return j < r_end ? (rows != nullptr ? rows[j] : static_cast<int>(j)) : -1;
  };
  int cur_row[kPieces], next_row[kPieces];
#pragma unroll
  for (int it = 0; it < kPieces; ++it) cur_row[it] = db_row(r_begin + (tid >> 3) + it * 32);

  // One pipeline stage: tile rows cur_row[] x columns [d0, d0 + 64), zero outside.
  auto load_x = [&](int stage, int64_t d0) {
    __half* dst = xs + stage * (kBN * kXLD);
#pragma unroll
    for (int it = 0; it < kPieces; ++it) {
      const int r = (tid >> 3) + it * 32, p = tid & 7;
      const int64_t col = d0 + p * 8;
      const bool ok = cur_row[it] >= 0 && col < d;
      cp_async16(dst + r * kXLD + p * 8, ok ? db + static_cast<int64_t>(cur_row[it]) * d + col : db,
                 ok);
    }
  };

  const int ksteps = static_cast<int>((d + kBK - 1) / kBK);
  int step = 0;  // global stage counter: stage = step & 1
  if (has_rows) load_x(0, 0);
  cp_async_commit();

  for (int64_t r0 = r_begin; r0 < r_end; r0 += kBN) {
#pragma unroll
    for (int it = 0; it < kPieces; ++it) next_row[it] = db_row(r0 + kBN + (tid >> 3) + it * 32);
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[FQ][FN];
#pragma unroll
    for (int i = 0; i < FQ; ++i)
#pragma unroll
      for (int j = 0; j < FN; ++j) wmma::fill_fragment(acc[i][j], 0.f);
    float xpart = 0.f;  // l2: partial |x|^2 of row tid / 2, column half tid % 2

    for (int ks = 0; ks < ksteps; ++ks, ++step) {
      if (ks + 1 < ksteps) {
        load_x((step + 1) & 1, static_cast<int64_t>(ks + 1) * kBK);
      } else if (r0 + kBN < r_end) {
#pragma unroll
        for (int it = 0; it < kPieces; ++it) cur_row[it] = next_row[it];
        load_x((step + 1) & 1, 0);
      }
      cp_async_commit();
      cp_async_wait<1>();
      __syncthreads();
      const __half* xst = xs + (step & 1) * (kBN * kXLD);
      const int d0 = ks * kBK;
#pragma unroll
      for (int kk = 0; kk < kBK; kk += 16) {
        if (d0 + kk < d) {  // block-uniform; d % 16 == 0
          wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> a[FQ];
#pragma unroll
          for (int i = 0; i < FQ; ++i)
            wmma::load_matrix_sync(a[i], qs + (wq * FQ * 16 + i * 16) * QLD + d0 + kk, QLD);
#pragma unroll
          for (int j = 0; j < FN; ++j) {
            wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::col_major> b;
            wmma::load_matrix_sync(b, xst + (wn * FN * 16 + j * 16) * kXLD + kk, kXLD);
#pragma unroll
            for (int i = 0; i < FQ; ++i) wmma::mma_sync(acc[i][j], a[i], b, acc[i][j]);
          }
        }
      }
      if (l2) {  // 2 threads per staged row, 32 columns each (zero-filled past d)
        const uint4* src = reinterpret_cast<const uint4*>(xst + (tid >> 1) * kXLD + (tid & 1) * 32);
#pragma unroll
        for (int v = 0; v < 4; ++v) {
          const uint4 u = src[v];
          const __half2* h = reinterpret_cast<const __half2*>(&u);
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const float2 f = __half22float2(h[e]);
            xpart += f.x * f.x + f.y * f.y;
          }
        }
      }
      __syncthreads();
    }

    // Scores to shared memory (the previous epilogue finished before the barriers above).
#pragma unroll
    for (int i = 0; i < FQ; ++i)
#pragma unroll
      for (int j = 0; j < FN; ++j)
        wmma::store_matrix_sync(sc + (wq * FQ * 16 + i * 16) * kSLD + wn * FN * 16 + j * 16,
                                acc[i][j], kSLD, wmma::mem_row_major);
    if (l2) {
      xpart += __shfl_xor_sync(full, xpart, 1);
      if ((tid & 1) == 0) xn[tid >> 1] = xpart;
    }
    __syncthreads();

    // Epilogue: lane owns rows c0 .. c0 + 3 of the tile for each of the warp's queries.
    const int c0 = lane * 4;
    const int64_t row0 = r0 + c0;
    bool in_range[4];
    int id[4];               // database row (the id) of tile row c0 + j
    unsigned shared_ok = 0;  // bit j: row c0 + j in range and allowed by a shared mask
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      in_range[j] = row0 + j < r_end;
      id[j] = in_range[j] ? (rows != nullptr ? rows[row0 + j] : static_cast<int>(row0 + j)) : 0;
      // with rows (compacted: every row passes the shared filter) mask is nullptr
      const bool ok = in_range[j] && (mask == nullptr || mask_per_query || mask[row0 + j] != 0);
      shared_ok |= ok ? (1u << j) : 0u;
    }
    float xnv[4] = {0.f, 0.f, 0.f, 0.f};
    if (l2) {
#pragma unroll
      for (int j = 0; j < 4; ++j) xnv[j] = xn[c0 + j];
    }
    for (int qi = warp; qi < BQ; qi += kWarps) {
      const int64_t q = q0 + qi;
      if (q >= nq) break;  // warp-uniform; later qi are larger
      unsigned ok = shared_ok;
      if (mask_per_query) {
        const uint8_t* mrow = mask + q * n;
#pragma unroll
        for (int j = 0; j < 4; ++j)
          if (in_range[j] && mrow[row0 + j] == 0) ok &= ~(1u << j);
      }
      const float4 s4 = *reinterpret_cast<const float4*>(sc + qi * kSLD + c0);
      const float s[4] = {s4.x, s4.y, s4.z, s4.w};
      const float t = thr[qi];
      const float qnv = l2 ? qn[qi] : 0.f;
      float dist[4];
      bool cand[4];
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        float v;
        if (metric == 0) v = -s[j];
        else if (metric == 2) v = 1.f - s[j];
        else v = (qnv + xnv[j]) - 2.f * s[j];
        const bool nan = isnan(v);            // never kept (tested before the clamp below)
        if (metric == 1 && v < 0.f) v = 0.f;  // l2: rounding can go below 0
        dist[j] = v;
        cand[j] = ((ok >> j) & 1u) && !nan && v <= t;
      }
      if (__any_sync(full, cand[0] || cand[1] || cand[2] || cand[3])) {
        float* ld = list_d + qi * k;
        int* lr = list_r + qi * k;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          unsigned pending = __ballot_sync(full, cand[j]);
          while (pending) {
            const int src = __ffs(pending) - 1;
            pending &= pending - 1;
            const float cd = __shfl_sync(full, dist[j], src);
            const int cr = __shfl_sync(full, id[j], src);
            insert(ld, lr, list_n + qi, thr + qi, k, cd, cr);
          }
        }
      }
    }
  }
  cp_async_wait<0>();

  for (int qi = warp; qi < BQ; qi += kWarps) {
    const int64_t q = q0 + qi;
    if (q >= nq) break;
    const int cnt = list_n[qi];
    const int64_t base = (q * nchunks + chunk) * k;
    if (lane == 0) part_n[q * nchunks + chunk] = cnt;
    for (int j = lane; j < k; j += 32) {
      part_d[base + j] = j < cnt ? list_d[qi * k + j] : INFINITY;
      part_i[base + j] = j < cnt ? static_cast<long long>(list_r[qi * k + j]) : -1;
    }
  }
}

bool tensor_cores_enabled() {
  static const bool enabled = [] {
    const char* e = std::getenv("AFFECTKIT_KNN_TENSOR_CORES");
    return !(e != nullptr && std::strcmp(e, "0") == 0);
  }();
  return enabled;
}

template <int BQ>
void* kernel_ptr() {
  return reinterpret_cast<void*>(&tc_topk_kernel<BQ>);
}

void* kernel_for(int bq) {
  return bq == 128 ? kernel_ptr<128>() : bq == 64 ? kernel_ptr<64>() : kernel_ptr<32>();
}

}  // namespace

TcPlan plan_exact_tc(const void* queries, int64_t nq, const void* database, int64_t n, int64_t d,
                     int64_t k, const int64_t* row_ids, int device, int sms) {
  TcPlan plan;
  if (!tensor_cores_enabled()) return plan;
  if (nq <= 0 || n <= 0 || n > INT_MAX || d <= 0 || d % 16 != 0 || k <= 0 || k > 256) return plan;
  if (row_ids != nullptr) return plan;  // tie-breaks by user ids: the scalar kernel
  if (reinterpret_cast<uintptr_t>(queries) % 16 != 0 ||
      reinterpret_cast<uintptr_t>(database) % 16 != 0)
    return plan;
  int optin = 0;
  if (cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) !=
      cudaSuccess) {
    cudaGetLastError();
    return plan;
  }
  plan.mma = plan_exact_mma(nq, n, d, static_cast<int>(k), device, optin, sms);
  if (plan.mma.ok) {
    plan.ok = true;
    plan.bq = 128;
    plan.nchunks = plan.mma.nchunks;
    plan.chunk_rows = plan.mma.chunk_rows;
    plan.smem = plan.mma.smem;
    return plan;
  }
  int bq = nq >= 96 ? 128 : nq >= 48 ? 64 : 32;
  while (bq >= 32 && Layout(bq, d, static_cast<int>(k)).total > static_cast<size_t>(optin))
    bq /= 2;
  if (bq < 32) return plan;
  const size_t smem = Layout(bq, d, static_cast<int>(k)).total;
  void* fn = kernel_for(bq);
  int per_sm = 0;
  if (cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize,
                           static_cast<int>(smem)) != cudaSuccess ||
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, fn, kThreads, smem) != cudaSuccess ||
      per_sm < 1) {
    cudaGetLastError();
    return plan;
  }
  const int64_t qblocks = (nq + bq - 1) / bq;
  const int64_t slots = static_cast<int64_t>(std::max(sms, 1)) * per_sm;
  int64_t nchunks = qblocks >= slots ? 1 : slots / qblocks;  // one full wave, no ragged tail
  nchunks = std::min<int64_t>({nchunks, (n + kBN - 1) / kBN, 65535});
  int64_t chunk_rows = (n + nchunks - 1) / nchunks;
  chunk_rows = (chunk_rows + kBN - 1) / kBN * kBN;
  nchunks = (n + chunk_rows - 1) / chunk_rows;
  if (qblocks > INT_MAX) return plan;
  plan.ok = true;
  plan.bq = bq;
  plan.nchunks = nchunks;
  plan.chunk_rows = chunk_rows;
  plan.smem = smem;
  return plan;
}

void launch_exact_tc(const TcPlan& plan, const __half* queries, int64_t nq, const __half* database,
                     int64_t n, int64_t d, int metric, int k, const uint8_t* mask,
                     bool mask_per_query, float* part_d, long long* part_i, int* part_n,
                     cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((nq + plan.bq - 1) / plan.bq),
                  static_cast<unsigned>(plan.nchunks));
  // A shared mask: compact the allowed rows on the device (ascending int32 list + count; CUB
  // select, stream-ordered workspace, no host synchronisation), and let the kernel visit only
  // them. The count never comes back to the host: the kernel derives its chunks from it.
  const bool compact = mask != nullptr && !mask_per_query;
  unsigned char* ws = nullptr;
  int* rows = nullptr;
  int* count = nullptr;
  try {
    if (compact) {
      const thrust::counting_iterator<int> first(0);
      size_t temp_bytes = 0;
      cuda_check(cub::DeviceSelect::Flagged(nullptr, temp_bytes, first, mask, rows, count, n, stream),
                 "exact_knn filter compaction (size query)");
      // CUB wants 256-byte aligned temporary storage (cudaMallocAsync gives at least that)
      const size_t rows_bytes = (static_cast<size_t>(n) * sizeof(int) + 255) & ~size_t(255);
      const size_t count_bytes = 256;
      cuda_check(cudaMallocAsync(reinterpret_cast<void**>(&ws), rows_bytes + count_bytes + temp_bytes,
                                 stream),
                 "exact_knn filter compaction workspace");
      rows = reinterpret_cast<int*>(ws);
      count = reinterpret_cast<int*>(ws + rows_bytes);
      cuda_check(cub::DeviceSelect::Flagged(ws + rows_bytes + count_bytes, temp_bytes, first, mask,
                                            rows, count, n, stream),
                 "exact_knn filter compaction");
    }
    if (plan.mma.ok) {
      launch_exact_mma(plan.mma, queries, nq, database, n, d, metric, k, mask, mask_per_query, rows,
                       count, part_d, part_i, part_n, stream);
    } else {
      const uint8_t* kmask = compact ? nullptr : mask;  // compacted rows all pass the filter
#define AFFECTKIT_TC_LAUNCH(BQ)                                                                 \
  tc_topk_kernel<BQ><<<grid, kThreads, plan.smem, stream>>>(                                   \
      queries, database, kmask, mask_per_query, rows, count, nq, n, d, metric, k, plan.chunk_rows, \
      part_d, part_i, part_n)
      if (plan.bq == 128) AFFECTKIT_TC_LAUNCH(128);
      else if (plan.bq == 64) AFFECTKIT_TC_LAUNCH(64);
      else AFFECTKIT_TC_LAUNCH(32);
#undef AFFECTKIT_TC_LAUNCH
      cuda_check(cudaGetLastError(), "exact_knn tensor-core kernel launch");
    }
  } catch (...) {
    if (ws) cudaFreeAsync(ws, stream);
    throw;
  }
  if (ws) cudaFreeAsync(ws, stream);  // stream-ordered: after the kernel
}

}  // namespace affectkit::knn::detail
