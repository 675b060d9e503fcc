// mma.sync kernel of the CUDA exact filtered k-NN for float16 (d % 16 == 0): the default
// tensor-core kernel wherever its shared memory fits, except on compute capability 9.0, where
// the wgmma instantiation of the same body (exact_knn_mma_kernel.cuh, exact_knn_mma_sm90a.cu)
// is the default (AFFECTKIT_KNN_WGMMA: 2 by default there, 1, or 0 for mma.sync);
// this file plans and launches both (AFFECTKIT_KNN_MMA=0 keeps the WMMA
// kernel of exact_knn_tc.cu, which also does the shared-filter compaction and the planning
// around both; the chunk lists are merged by exact_knn.cu as before).
//
// Why: the WMMA kernel (16x16x16 fragments, fp32 score tile stored to shared memory and read
// back by a separate top-k pass, 128-row tiles, 2 stages) ran at ~120 TFLOP/s effective on an
// H100 (1000 x 1M x 384, k = 10, ip: 6.4 ms with every row allowed). Its shared-memory traffic
// per MAC and its unoverlapped epilogue, not the tensor cores, set the pace.
//
// Design (one block = 256 threads = 8 warps, 1 block per SM; grid = (query blocks, chunks)):
//   * Block tile 128 queries x 256 rows. Warps are 2 (queries) x 4 (rows), each owning a 64 x 64
//     piece: per 16-column k step a warp loads 4 + 4 ldmatrix.x4 (A: queries, B: rows) for 32
//     mma.sync m16n8k16 (fp16 x fp16 -> fp32; exact products, fp32 sums as before). Shared-
//     memory reads per k step and block: 32 KB of ldmatrix + 8 KB of cp.async writes ~ 320
//     cycles, under the ~430 cycles of the 256 mma at mma.sync rates (~0.6 mma/clk/SM): the
//     kernel is tensor-bound, where 64 x 32 warp tiles (or WMMA's 32 x 32) are not.
//   * The block's 128 queries stay in shared memory for the whole chunk (cp.async once, rows
//     padded by 16 bytes: conflict-free ldmatrix), so only rows stream: 256 rows x 64 columns
//     per stage (144-byte padded rows), 3 stages (2 when k's lists do not leave room) of
//     cp.async with one __syncthreads per stage; the global stage counter runs across tiles,
//     so the next tile's first slabs load during the current tile's last slabs and epilogue.
//     A compacted shared filter gathers rows[j]: each lane holds one row index of the tile
//     being loaded (and prefetches the next tile's), and the copy loop gets the row of each
//     16-byte piece by a shuffle, so no dependent global load sits in front of a cp.async.
//   * Epilogue in registers: each thread holds 128 scores (8 queries x 16 rows). Distances
//     are as before (ip: -s; cosine: 1 - s, inputs normalised by the caller; l2: |q|^2 +
//     |x|^2 - 2 s with fp32 norms of the fp16 values, clamped at 0; NaN never kept). A cheap
//     test per query first (ip, cosine: the largest of its 16 scores decides exactly; l2: a
//     lower bound with a rounding margin) against the query's threshold; only "hot" queries
//     test their 16 elements one by one. Survivors go to a per-query bucket of 8 slots
//     (shared atomic); warp w then inserts the buckets of queries w, w + 8, ... into their
//     sorted lists (k <= 32: the list sits in the warp's registers for the whole bucket),
//     with the exact (distance, id) tie rule. A full bucket leaves a survivor pending for
//     another round (same accumulators, tighter thresholds); spent or disallowed elements
//     become NaN. __syncthreads_or ends the epilogue after one barrier when no thread had a
//     survivor.
//   * Fewer survivors: (1) a chunk's first tile (all thresholds +inf) is pruned first: per
//     query, each lane's ceil(k/4)-th smallest distance, the max over a quad and the min over
//     the 4 row-warps bound the chunk's k-th distance; (2) the chunks of a query share a
//     bound in global memory (atomicMin of each full list's k-th distance, read once per
//     tile): a row farther than any chunk's k-th distance cannot be in the answer, so every
//     chunk prunes with the best of them (~k ln(n/k) survivors per query in all, rather than
//     per chunk). Ties with a bound are kept (<=), so the merge still sees every answer row.
//   * Lists hold row-space positions (ascending rows[] keeps the tie rule); ids are
//     translated (rows[pos]) only when the lists are written out.
// Floor (H100 SXM, 1000 x 1M x 384, k = 10, fraction f of rows allowed): 0.77 f TFLOP at
// ~600 TFLOP/s mma.sync issue = 1.3 f ms; rows read 8 times (8 query blocks share each chunk
// and run in the same wave, grid x fastest): 6.1 f GB from L2 at ~7 TB/s = 0.9 f ms, 0.77 f GB
// from HBM = 0.25 f ms, both overlapped with the math. Measured (H200, same shape, ip, shared
// mask): 0.25 / 0.68 / 2.06 / 3.67 ms at 1 / 10 / 50 / 100 % (WMMA kernel: 0.65 / 1.37 /
// 3.62 / 6.24). The tensor pipe is ~36 % busy: with 2 warps per scheduler (255 registers,
// one 227 KB block per SM) the HMMA issue waits on fixed latencies and the per-slab barrier,
// and address/loader and epilogue instructions are ~3x the HMMA count.

#include <algorithm>
#include <climits>
#include <cstdlib>
#include <cstring>
#include <string>

#include "../core/core.h"
#include "exact_knn_mma_kernel.cuh"

namespace affectkit::knn::detail {

bool mma_enabled() {
  static const bool enabled = [] {
    const char* e = std::getenv("AFFECTKIT_KNN_MMA");
    return !(e != nullptr && std::strcmp(e, "0") == 0);
  }();
  return enabled;
}

// Thrown again on every call while the variable holds a bad value (a throwing static
// initialisation is retried).
int wgmma_mode() {
  static const int mode = [] {
    const char* e = std::getenv("AFFECTKIT_KNN_WGMMA");
    const std::string v = e ? e : "";
    if (v.empty()) return 2;  // the fastest on an H100 (benchmarks/RESULTS.md, 14th session)
    if (v == "0") return 0;
    if (v == "1") return 1;
    if (v == "2") return 2;
    if (v == "3") return 3;
    throw ValueError("AFFECTKIT_KNN_WGMMA: expected 0, 1, 2 or 3, got '" + v + "'");
  }();
  return mode;
}

int epilogue_mode(int mode) {
  static const std::string v = [] {
    const char* e = std::getenv("AFFECTKIT_KNN_EPILOGUE");
    return std::string(e ? e : "");
  }();
  if (v.empty()) return mode == 3 ? kWarp : kPlain;  // mode 3 was prepared with kWarp
  const int epi = v == "plain" ? kPlain : v == "grouped" ? kGrouped : v == "warp" ? kWarp : -1;
  if (epi < 0)
    throw ValueError("AFFECTKIT_KNN_EPILOGUE: expected plain, grouped or warp, got '" + v + "'");
  // The kernels built: plain for modes 1-2, grouped for 2-3, warp for 3.
  const bool built = epi == kPlain ? (mode == 1 || mode == 2)
                     : epi == kGrouped ? (mode == 2 || mode == 3)
                                       : mode == 3;
  if (!built)
    throw ValueError("AFFECTKIT_KNN_EPILOGUE: '" + v + "' has no kernel for AFFECTKIT_KNN_WGMMA=" +
                     std::to_string(mode) + " (plain: modes 1-2, grouped: 2-3, warp: 3)");
  return epi;
}

namespace {
void* kernel_for(int wgmma, int epilogue, int metric) {
#ifdef AFFECTKIT_WITH_SM90A
  if (wgmma) return wgmma_kernel_ptr(metric, wgmma, epilogue);
#endif
  (void)epilogue;
  return wgmma ? nullptr : kernel_ptr<false, false>(metric);
}
}  // namespace

MmaPlan plan_exact_mma(int64_t nq, int64_t n, int64_t d, int k, int device, int optin,
                       int sms) {
  MmaPlan plan;
  if (!mma_enabled()) return plan;
  int major = 0, minor = 0;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess ||
      cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device) != cudaSuccess) {
    cudaGetLastError();
    return plan;
  }
  if (major < 9) return plan;  // the kernel is built for sm_90 and later only
  // wgmma code exists for compute capability 9.0 exactly (sm_90a), where the build made it.
  int wgmma = major == 9 && minor == 0 && kernel_for(1, kPlain, 0) != nullptr ? wgmma_mode() : 0;
  int epilogue = wgmma ? epilogue_mode(wgmma) : kPlain;  // read (and checked) with the mode
  // 3 row stages, or 2 when k's lists leave no room for a third (2 at most ran 7 % slower at
  // 100 % selectivity on an H200); 1: none.
  auto stages_for = [&](int wg) {
    int s = 3;
    while (s >= 2 && Layout(d, k, s, wg != 0, wg == 3).total > static_cast<size_t>(optin)) --s;
    return s;
  };
  int stages = stages_for(wgmma);
  if (stages < 2 && wgmma) {  // at d % 64 != 0 the wgmma layout is the larger: try mma.sync
    wgmma = 0;
    epilogue = kPlain;
    stages = stages_for(0);
  }
  if (stages < 2) return plan;
  const size_t smem = Layout(d, k, stages, wgmma != 0, wgmma == 3).total;
  int per_sm = 0;
  for (int metric = 0; metric < 3; ++metric) {
    if (cudaFuncSetAttribute(kernel_for(wgmma, epilogue, metric),
                             cudaFuncAttributeMaxDynamicSharedMemorySize,
                             static_cast<int>(smem)) != cudaSuccess) {
      cudaGetLastError();
      return plan;
    }
  }
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel_for(wgmma, epilogue, 0),
                                                    threads_for(wgmma), smem) !=
          cudaSuccess ||
      per_sm < 1) {
    cudaGetLastError();
    return plan;
  }
  const int64_t qblocks = (nq + kBQ - 1) / kBQ;
  if (qblocks > INT_MAX) return plan;
  // One full wave: the query blocks of a chunk are adjacent in grid x, so they run together
  // and all but the first read the chunk's rows from L2.
  const int64_t slots = static_cast<int64_t>(std::max(sms, 1)) * per_sm;
  int64_t nchunks = qblocks >= slots ? 1 : slots / qblocks;
  nchunks = std::min<int64_t>({nchunks, (n + kBN - 1) / kBN, 65535});
  int64_t chunk_rows = (n + nchunks - 1) / nchunks;
  chunk_rows = (chunk_rows + kBN - 1) / kBN * kBN;
  plan.ok = true;
  plan.wgmma = wgmma;
  plan.epilogue = epilogue;
  plan.stages = stages;
  plan.nchunks = (n + chunk_rows - 1) / chunk_rows;
  plan.chunk_rows = chunk_rows;
  plan.smem = smem;
  return plan;
}

void launch_exact_mma(const MmaPlan& plan, const __half* queries, int64_t nq, const __half* db,
                      int64_t n, int64_t d, int metric, int k, const uint8_t* mask,
                      bool mask_per_query, const int* rows, const int* count, float* part_d,
                      long long* part_i, int* part_n, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((nq + kBQ - 1) / kBQ), static_cast<unsigned>(plan.nchunks));
  const uint8_t* qmask = mask_per_query ? mask : nullptr;  // a shared mask arrives compacted
  // Per-query bound shared by the chunks (order_key; all ones = none), stream-ordered.
  unsigned* gbound = nullptr;
  cuda_check(
      cudaMallocAsync(reinterpret_cast<void**>(&gbound), static_cast<size_t>(nq) * 4, stream),
      "exact_knn mma workspace");
  cudaError_t err = cudaMemsetAsync(gbound, 0xff, static_cast<size_t>(nq) * 4, stream);
  if (err == cudaSuccess) {
    int stages = plan.stages;
    int64_t chunk_rows = plan.chunk_rows;
    void* args[] = {&queries, &db,     &qmask,      &rows,   &count,  &nq,     &n,     &d,
                    &k,       &stages, &chunk_rows, &gbound, &part_d, &part_i, &part_n};
    err = cudaLaunchKernel(kernel_for(plan.wgmma, plan.epilogue, metric), grid,
                           dim3(threads_for(plan.wgmma)), args, plan.smem, stream);
  }
  cudaFreeAsync(gbound, stream);  // stream-ordered: after the kernel
  cuda_check(err, "exact_knn mma kernel launch");
}

}  // namespace affectkit::knn::detail
