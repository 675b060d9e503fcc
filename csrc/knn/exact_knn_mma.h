// Internal: pieces shared by the two tensor-core kernels of the CUDA exact filtered k-NN
// (exact_knn_tc.cu: WMMA; exact_knn_mma.cu: mma.sync with the top-k threshold test in
// registers), and the mma kernel's plan / launch, which exact_knn_tc.cu dispatches to.
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace affectkit::knn::detail {

// The kernel's epilogue (its kEpi; see exact_knn_mma_kernel.cuh and epilogue_mode).
enum Epilogue : int {
  kPlain = 0,    // a hot query's elements one by one; the 8 warps meet at block barriers
  kGrouped = 1,  // by groups of 8 first (tree maxima); wgmma modes only
  kWarp = 2,     // grouped, and each warp's epilogue its own (no block barrier); mode 3 only
};

// How the mma kernel runs one call (ok == false: it cannot, use the WMMA kernel).
struct MmaPlan {
  bool ok = false;
  int wgmma = 0;           // 0: mma.sync; 1-3: the wgmma instantiations (exact_knn_mma_sm90a.cu),
                           // 2 keeping one slab's products in flight, 3 also warp-specialised
                           // (see wgmma_mode)
  int epilogue = kPlain;   // an Epilogue (epilogue_mode)
  int stages = 0;          // cp.async pipeline depth over 64-column row slabs (2 or 3)
  int64_t nchunks = 0;     // row chunks (grid.y)
  int64_t chunk_rows = 0;  // rows per chunk (a multiple of the 256-row tile)
  size_t smem = 0;         // dynamic shared memory per block, bytes
};

// AFFECTKIT_KNN_MMA=0 (read once) keeps the WMMA kernel; otherwise the mma kernel serves
// every call it fits (plan_exact_mma(...).ok).
bool mma_enabled();

// AFFECTKIT_KNN_WGMMA (read once) picks the kernel's wgmma instantiation where it can run:
// compute capability 9.0, and a build whose CUDA architectures include sm_90 (CMake then
// compiles exact_knn_mma_sm90a.cu for sm_90a and defines AFFECTKIT_WITH_SM90A). 1: each
// warpgroup waits for a slab's products before the next slab's barrier; 2 (unset: the default):
// it keeps them in flight until the next slab's are issued (a second barrier per slab frees the
// stage); 3: as 2, warp-specialised (a producer warpgroup issues the copies, mbarriers in place
// of the per-slab block barriers; on an H200, 2026-11-28: every test passed, 3.40 ms against
// 3.41 at 100 %), by default with the epilogue's grouped push and each warp's own epilogue
// (kWarp, not yet run on a GPU; see epilogue_mode); 0: mma.sync. On an H100, 1000 x 1M x
// 384, k = 10: 2.0 / 3.6 ms at 50 / 100 % of rows allowed with 1 or 2, against 2.3 / 4.0 ms
// with mma.sync. Another value: ValueError.
int wgmma_mode();
// AFFECTKIT_KNN_EPILOGUE (read once, with the wgmma mode, where that is read) picks the
// epilogue of wgmma mode `mode`: unset, mode 3 takes kWarp and the others kPlain; "plain"
// (modes 1-2), "grouped" (modes 2-3) or "warp" (mode 3) pick one. Another value, or one the
// mode has no kernel for: ValueError.
int epilogue_mode(int mode);
#ifdef AFFECTKIT_WITH_SM90A
// exact_knn_mma_sm90a.cu: mode 1-3 with an epilogue epilogue_mode allows for that mode.
void* wgmma_kernel_ptr(int metric, int mode, int epilogue);
// exact_knn_mma_grouped_sm90a.cu (a translation unit of its own, to keep each one's build
// short): modes 2 and 3 with kGrouped.
void* wgmma_grouped_kernel_ptr(int metric, int mode);
#endif

// The caller has checked the tensor-core preconditions (float16, d % 16 == 0, 16-byte
// aligned data, 1 <= k <= 256, n < 2^31); optin is the device's opt-in shared memory per block.
// Needs compute capability 9.0 or later and a block (128 queries x (d + 8) halves, 2-3 row
// stages of 36 KB, lists of k) within optin: on an H100, d = 384 runs with k <= 10 at 3 stages
// and k <= 46 at 2. The wgmma layout (queries padded to 64 columns, 32 KB stages) fits k <= 23
// at 3 stages and k <= 55 at 2; where it does not fit, the plan is mma.sync's.
MmaPlan plan_exact_mma(int64_t nq, int64_t n, int64_t d, int k, int device, int optin, int sms);

// The mma kernel for a plan with plan.ok, with launch_exact_tc's contract: mask is a per-query
// mask (mask_per_query) or null; rows/count (or null) are a compacted shared filter.
void launch_exact_mma(const MmaPlan& plan, const __half* queries, int64_t nq, const __half* db,
                      int64_t n, int64_t d, int metric, int k, const uint8_t* mask,
                      bool mask_per_query, const int* rows, const int* count, float* part_d,
                      long long* part_i, int* part_n, cudaStream_t stream);

#ifdef __CUDACC__
namespace mma_common {

// 16-byte cp.async to a shared-memory address; valid == false zero-fills the destination and
// reads nothing.
__device__ __forceinline__ void cp_async16(unsigned s, const void* gmem, bool valid) {
  const int bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(bytes)
               : "memory");
}
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
  cp_async16(static_cast<unsigned>(__cvta_generic_to_shared(smem)), gmem, valid);
}
__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ bool better(float da, int ia, float db, int ib) {
  return da < db || (da == db && ia < ib);
}

// Warp-cooperative insertion of (cd, cr) into a sorted list of at most k entries (all lanes
// call it with the same arguments). Keeps the k best by (distance, id); updates the threshold
// (the k-th distance, +inf while the list is not full).
__device__ inline void insert(float* ld, int* lr, int* cnt_p, float* thr_p, int k, float cd,
                              int cr) {
  const unsigned full = 0xffffffffu;
  const int lane = threadIdx.x & 31;
  const int cnt = *cnt_p;
  if (cnt == k && !better(cd, cr, ld[k - 1], lr[k - 1])) return;  // warp-uniform
  int pos = 0;
  for (int j = lane; j < cnt; j += 32) pos += better(ld[j], lr[j], cd, cr) ? 1 : 0;
  for (int off = 16; off > 0; off >>= 1) pos += __shfl_xor_sync(full, pos, off);
  const int last = min(cnt, k - 1);  // elements [pos, last) move one place right
  for (int base = last - 1; base >= pos; base -= 32) {
    const int j = base - lane;
    float vd = 0.f;
    int vr = 0;
    if (j >= pos) {
      vd = ld[j];
      vr = lr[j];
    }
    __syncwarp();
    if (j >= pos) {
      ld[j + 1] = vd;
      lr[j + 1] = vr;
    }
    __syncwarp();
  }
  const int ncnt = min(cnt + 1, k);
  if (lane == 0) {
    ld[pos] = cd;
    lr[pos] = cr;
    *cnt_p = ncnt;
  }
  __syncwarp();
  if (lane == 0) *thr_p = ncnt == k ? ld[k - 1] : INFINITY;
  __syncwarp();
}

}  // namespace mma_common
#endif

}  // namespace affectkit::knn::detail
