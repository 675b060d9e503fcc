// Internal: the tensor-core (float16 WMMA or mma.sync) path of the CUDA exact filtered k-NN.
// exact_knn.cu asks for a plan; when plan.ok it launches this kernel instead of the scalar
// fused kernel, with the same per-chunk output layout, and merges with its merge kernel.
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "exact_knn_mma.h"

namespace affectkit::knn::detail {

struct TcPlan {
  bool ok = false;         // false: use the scalar kernel
  int bq = 0;              // queries per block (32, 64 or 128)
  int64_t nchunks = 0;     // row chunks (grid.y); per-chunk lists are (nq, nchunks, k)
  int64_t chunk_rows = 0;  // rows per chunk (a multiple of the row tile: 128, mma 256)
  size_t smem = 0;         // dynamic shared memory per block, bytes
  MmaPlan mma;             // mma.ok: the mma.sync kernel (exact_knn_mma.cu) runs, not WMMA
};

// Whether (and how) the tensor-core kernel can serve this call: float16 data is implied
// by the caller; needs d % 16 == 0, 16-byte aligned queries/database, n in [1, 2^31),
// no row_ids, AFFECTKIT_KNN_TENSOR_CORES not "0", and a block that fits in shared memory.
TcPlan plan_exact_tc(const void* queries, int64_t nq, const void* database, int64_t n, int64_t d,
                     int64_t k, const int64_t* row_ids, int device, int sms);

// Launches the fused kernel for a plan with plan.ok: writes, for each query q and chunk c,
// part_n[q * nchunks + c] and the sorted list part_d/part_i[(q * nchunks + c) * k + j]
// (padding +inf / -1), exactly as the scalar fused kernel does.
// A shared mask (mask != nullptr, !mask_per_query) is first compacted on `stream` into the
// ascending list of allowed rows (a stream-ordered workspace, freed on the stream), and the
// kernel visits only those rows, spread over the same nchunks chunks by the count it reads
// on the device; some chunks may then be empty (part_n = 0). No host synchronisation: the
// call is asynchronous and can be captured in a CUDA graph.
void launch_exact_tc(const TcPlan& plan, const __half* queries, int64_t nq, const __half* database,
                     int64_t n, int64_t d, int metric, int k, const uint8_t* mask,
                     bool mask_per_query, float* part_d, long long* part_i, int* part_n,
                     cudaStream_t stream);

}  // namespace affectkit::knn::detail
