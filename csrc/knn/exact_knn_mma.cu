// mma.sync kernel of the CUDA exact filtered k-NN for float16 (d % 16 == 0): the default
// tensor-core kernel wherever its shared memory fits (AFFECTKIT_KNN_MMA=0 keeps the WMMA
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
#include <cmath>
#include <cstdlib>
#include <cstring>

#include "../core/cuda_utils.cuh"
#include "exact_knn_mma.h"

namespace affectkit::knn::detail {
namespace {

using namespace mma_common;

constexpr int kThreads = 256;   // 8 warps: 2 along queries x 4 along rows
constexpr int kBQ = 128;        // queries per block
constexpr int kBN = 256;        // rows per tile
constexpr int kBK = 64;         // columns per pipeline stage
constexpr int kXLD = kBK + 8;   // halves per staged row (144 bytes: conflict-free ldmatrix)
constexpr int kBucket = 8;      // survivor slots per query and epilogue round

static_assert(kBN == kThreads, "the l2 row norms give each thread one tile row");
static_assert(kBucket >= 4, "a chunk's first tile keeps 4 bounds per query in the buckets");

__host__ __device__ constexpr size_t align128(size_t x) { return (x + 127) & ~size_t(127); }

// Shared-memory carve-up, identical on host and device.
struct Layout {
  size_t qs, xs, ld, lr, cnt, thr, qn, xn, bd, br, bn, total;
  __host__ __device__ Layout(int64_t d, int k, int stages) {
    size_t off = 0;
    qs = off; off += align128(size_t(kBQ) * size_t(d + 8) * 2);
    xs = off; off += align128(size_t(stages) * kBN * kXLD * 2);
    ld = off; off += align128(size_t(kBQ) * size_t(k) * 4);
    lr = off; off += align128(size_t(kBQ) * size_t(k) * 4);
    cnt = off; off += align128(size_t(kBQ) * 4);
    thr = off; off += align128(size_t(kBQ) * 4);
    qn = off; off += align128(size_t(kBQ) * 4);
    xn = off; off += align128(size_t(kBN) * 4);
    bd = off; off += align128(size_t(kBQ) * kBucket * 4);
    br = off; off += align128(size_t(kBQ) * kBucket * 4);
    bn = off; off += align128(size_t(kBQ) * 4);
    total = off;
  }
};

// The device code below is built for sm_90 and later only (see the kernel).
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Four 8x8 b16 matrices; lanes 8m..8m+7 give the row addresses of matrix m; lane L receives
// row L / 4, columns 2 (L % 4), 2 (L % 4) + 1 of each.
__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr)
               : "memory");
}

// D (16x8 fp32) += A (16x16 fp16, row) * B (16x8 fp16, col). With g = lane / 4, c = lane % 4:
// A regs {(g, 2c..2c+1), (g+8, 2c..), (g, 2c+8..), (g+8, 2c+8..)} as (row, k); B regs
// {(k 2c..2c+1, n g), (k 2c+8.., n g)}; D {(g, 2c), (g, 2c+1), (g+8, 2c), (g+8, 2c+1)}.
__device__ __forceinline__ void mma16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                         uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// METRIC: 0 ip, 1 l2, 2 cosine (the caller normalised cosine inputs; zero vectors give 1).
template <int METRIC>
__device__ __forceinline__ float to_dist(float s, float qn, float xn) {
  if constexpr (METRIC == 0) return -s;
  else if constexpr (METRIC == 2) return 1.f - s;
  else {
    const float v = (qn + xn) - 2.f * s;
    return v < 0.f ? 0.f : v;  // rounding can go below 0; NaN stays NaN
  }
}

// Distances as unsigned keys in the same order (atomicMin on floats of either sign); all ones,
// the initial value, stands for "no bound".
__device__ __forceinline__ unsigned order_key(float f) {
  const unsigned i = __float_as_uint(f);
  return (i & 0x80000000u) ? ~i : (i | 0x80000000u);
}
__device__ __forceinline__ float from_key(unsigned u) {
  if (u == 0xffffffffu) return INFINITY;
  return __uint_as_float((u & 0x80000000u) ? (u & 0x7fffffffu) : ~u);
}

// insert() for a bucket of m candidates and k <= 32: lane j holds list entry j in registers
// while the bucket goes in (a ballot finds each position, a shuffle moves the tail), so the
// list is read and written once per bucket rather than per candidate.
// The threshold only tightens (it may hold a bound from other chunks, below the list's k-th);
// a full list publishes its k-th distance to gkey.
__device__ void insert_bucket32(float* ld, int* lr, int* cnt_p, float* thr_p, int k,
                                const float* bd, const int* br, int m, unsigned* gkey) {
  const unsigned full = 0xffffffffu;
  const int lane = threadIdx.x & 31;
  int cnt = *cnt_p;
  float d = lane < cnt ? ld[lane] : INFINITY;
  int r = lane < cnt ? lr[lane] : INT_MAX;
  for (int e = 0; e < m; ++e) {
    const float cd = bd[e];
    const int cr = br[e];
    const int pos = __popc(__ballot_sync(full, lane < cnt && better(d, r, cd, cr)));
    if (pos >= k) continue;  // warp-uniform: not better than the k-th
    const float ud = __shfl_up_sync(full, d, 1);
    const int ur = __shfl_up_sync(full, r, 1);
    if (lane > pos) {
      d = ud;
      r = ur;
    } else if (lane == pos) {
      d = cd;
      r = cr;
    }
    cnt = min(cnt + 1, k);
  }
  if (lane < cnt) {
    ld[lane] = d;
    lr[lane] = r;
  }
  const float kth = __shfl_sync(full, d, k - 1);
  if (lane == 0) {
    *cnt_p = cnt;
    if (cnt == k) {
      *thr_p = fminf(*thr_p, kth);
      atomicMin(gkey, order_key(kth));
    }
  }
}

#endif

// grid: (ceil(nq / 128), nchunks); block: 256 threads; dynamic shared memory:
// Layout(d, k, stages). Row space as in the WMMA kernel: [0, n) in chunks of chunk_rows, or,
// with rows != nullptr (a compacted shared filter; mask is then null), [0, *count) split into
// gridDim.y chunks of round_up(ceil(*count / gridDim.y), 256) rows, position j standing for
// database row rows[j]. mask (or null) is a per-query (nq, n) mask.
template <int METRIC>
__global__ void __launch_bounds__(kThreads, 1)
mma_topk_kernel(const __half* __restrict__ queries, const __half* __restrict__ db,
                const uint8_t* __restrict__ mask, const int* __restrict__ rows,
                const int* __restrict__ count, int64_t nq, int64_t n, int64_t d, int k,
                int stages, int64_t chunk_rows, unsigned* __restrict__ gbound,
                float* __restrict__ part_d, long long* __restrict__ part_i,
                int* __restrict__ part_n) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
  // Hopper and later only (plan_exact_mma checks): the block needs ~227 KB of shared memory,
  // and at this register budget sm_80 code would spill. Not compiled there.
  __trap();
#else
  constexpr bool kL2 = METRIC == 1;
  extern __shared__ __align__(128) unsigned char smem[];
  const Layout lay(d, k, stages);
  __half* qs = reinterpret_cast<__half*>(smem + lay.qs);
  __half* xs = reinterpret_cast<__half*>(smem + lay.xs);
  float* list_d = reinterpret_cast<float*>(smem + lay.ld);
  int* list_r = reinterpret_cast<int*>(smem + lay.lr);
  int* list_n = reinterpret_cast<int*>(smem + lay.cnt);
  float* thr = reinterpret_cast<float*>(smem + lay.thr);
  float* qn = reinterpret_cast<float*>(smem + lay.qn);
  float* xn = reinterpret_cast<float*>(smem + lay.xn);
  float* bucket_d = reinterpret_cast<float*>(smem + lay.bd);
  int* bucket_r = reinterpret_cast<int*>(smem + lay.br);
  int* bucket_n = reinterpret_cast<int*>(smem + lay.bn);

  const unsigned full = 0xffffffffu;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wq = warp >> 2, wn = warp & 3;  // this warp's 64 x 64 piece of the tile
  const int g = lane >> 2, c = lane & 3;    // mma fragment coordinates
  const int64_t q0 = static_cast<int64_t>(blockIdx.x) * kBQ;
  const int64_t chunk = blockIdx.y;
  const int64_t nchunks = gridDim.y;
  int64_t n_rows = n;
  if (rows != nullptr) {
    n_rows = *count;  // 0 <= *count <= n
    chunk_rows = (n_rows + nchunks - 1) / nchunks;
    chunk_rows = (chunk_rows + kBN - 1) / kBN * kBN;
  }
  const int64_t r_begin = chunk * chunk_rows;
  const int64_t r_end = min(n_rows, r_begin + chunk_rows);
  const bool has_rows = r_begin < r_end;  // block-uniform; false: write empty lists only
  const int d32 = static_cast<int>(d);  // d < 2^31 (it fits in shared memory)
  const int QLD = d32 + 8;  // halves per resident query row (odd x 16 bytes)
  const int d8 = static_cast<int>(d / 8);
  const int ksteps = static_cast<int>((d + kBK - 1) / kBK);

  // Resident queries (rows past nq are zero), list and bucket state.
  if (has_rows) {
    for (int i = tid; i < kBQ * d8; i += kThreads) {
      const int r = i / d8, p = i - r * d8;
      const bool ok = q0 + r < nq;
      cp_async16(qs + r * QLD + p * 8, ok ? queries + (q0 + r) * d + p * 8 : queries, ok);
    }
  }
  cp_async_commit();
  for (int i = tid; i < kBQ; i += kThreads) {
    list_n[i] = 0;
    thr[i] = INFINITY;
    bucket_n[i] = 0;
  }
  cp_async_wait<0>();
  __syncthreads();
  if (kL2 && has_rows) {
    for (int i = warp; i < kBQ; i += kThreads / 32) {
      float s = 0.f;
      for (int col = lane; col < d; col += 32) {
        const float v = __half2float(qs[i * QLD + col]);
        s += v * v;
      }
      for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(full, s, off);
      if (lane == 0) qn[i] = s;
    }
  }
  __syncthreads();

  // Row loader. Thread tid copies the 16-byte piece tid % 8 of tile rows tid / 8 + 32 it
  // (it < 8). Lane l of warp w holds the database row (-1: past r_end) of tile row
  // my_r = 4 w + l % 4 + 32 (l / 4) for the tile being loaded (ld_row) and the next (nx_row,
  // fetched one tile ahead); the copy takes row 4 w + l / 8 + 32 it from lane 4 it + l / 8.
  const int my_r = warp * 4 + (lane & 3) + 32 * (lane >> 2);
  const uint32_t xs_base = smem_addr(xs);
  auto db_row = [&](int64_t j) -> int {
    return j < r_end ? (rows != nullptr ? rows[j] : static_cast<int>(j)) : -1;
  };
  int ld_row = -1, nx_row = has_rows ? db_row(r_begin + my_r) : -1;
  int64_t ld_r0 = r_begin - kBN;  // load cursor: tile and slab of the last issued stage
  int ld_ks = ksteps - 1, ld_stage = 0;
  auto issue_load = [&]() {  // the next (tile, slab) in order; an empty group past r_end
    if (++ld_ks == ksteps) {
      ld_ks = 0;
      ld_r0 += kBN;
      ld_row = nx_row;
      nx_row = db_row(ld_r0 + kBN + my_r);
    }
    if (ld_r0 < r_end) {  // block-uniform: every lane takes part in the shuffles
      // Few instructions per piece (they are issued by the same warps as the mma): the
      // address is always in bounds (row and column clamped) and the zero fill of rows past
      // the end and columns past d comes from the copy's source size alone.
      const int col = ld_ks * kBK + (tid & 7) * 8;
      const bool col_ok = col < d;
      const __half* src_col = db + (col_ok ? col : 0);
      const uint32_t dst = xs_base + 2u * static_cast<uint32_t>(ld_stage * (kBN * kXLD) +
                                                               (tid >> 3) * kXLD + (tid & 7) * 8);
#pragma unroll
      for (int it = 0; it < kBN / 32; ++it) {
        const int row = __shfl_sync(full, ld_row, (it << 2) | (lane >> 3));
        const size_t offset = static_cast<size_t>(static_cast<unsigned>(max(row, 0))) *
                              static_cast<unsigned>(d32);  // one 32 x 32 -> 64-bit multiply
        cp_async16(dst + 2u * (32 * it * kXLD), src_col + offset, row >= 0 && col_ok);
      }
    }
    ld_stage = ld_stage + 1 == stages ? 0 : ld_stage + 1;
    cp_async_commit();
  };
  for (int s = 0; s < stages - 1; ++s) issue_load();

  // ldmatrix lane addresses (bytes): A rows wq*64 + lane % 16, columns + 8 (lane / 16);
  // B rows wn*64 + lane % 8 + 8 (lane / 16), columns + 8 ((lane / 8) % 2).
  const uint32_t a_base =
      smem_addr(qs) + 2u * static_cast<uint32_t>((wq * 64 + (lane & 15)) * QLD + (lane >> 4) * 8);
  const uint32_t b_lane =
      2u * static_cast<uint32_t>((wn * 64 + (lane & 7) + ((lane >> 4) << 3)) * kXLD +
                                 ((lane >> 3) & 1) * 8);
  int stage = 0;
  // Query bookkeeping: warp w, lane l < 16 handles query w + 8 l of the block (bound refresh,
  // bucket insertion). gbound[q] is the smallest k-th distance any chunk's full list has
  // reached (order_key): a row farther than it is beaten by k rows of that chunk.
  const int my_q = warp + 8 * (lane & 15);
  unsigned g_key = 0xffffffffu;

  for (int64_t r0 = r_begin; r0 < r_end; r0 += kBN) {
    float acc[4][8][4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 8; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.f;
    float xacc = 0.f;  // l2: |x|^2 of tile row tid

    for (int ks = 0; ks < ksteps; ++ks) {
      if (stages == 3) cp_async_wait<1>();
      else cp_async_wait<0>();
      __syncthreads();  // this stage landed for all; everyone is done with the one refilled next
      issue_load();
      // The bound from other chunks: read at a tile's first slab, folded into the threshold at
      // its last (a stale value is a valid bound too, so the unsynchronised write is benign).
      if (ks == 0 && lane < 16 && q0 + my_q < nq) g_key = __ldcg(gbound + q0 + my_q);
      if (ks == ksteps - 1 && lane < 16) thr[my_q] = fminf(thr[my_q], from_key(g_key));
      const uint32_t b_base = xs_base + 2u * static_cast<uint32_t>(stage * kBN * kXLD) + b_lane;
      const int d0 = ks * kBK;
      // One 16-column step: 4 + 4 ldmatrix.x4, 32 mma.
      auto kstep = [&](int kk) {
        uint32_t a[4][4];
#pragma unroll
        for (int i = 0; i < 4; ++i) ldsm_x4(a[i], a_base + 2u * (i * 16 * QLD + d0 + kk));
#pragma unroll
        for (int jp = 0; jp < 4; ++jp) {  // rows 16 jp .. 16 jp + 15: two n8 tiles
          uint32_t b[4];
          ldsm_x4(b, b_base + 2u * (jp * 16 * kXLD + kk));
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            mma16816(acc[i][2 * jp], a[i], b[0], b[1]);
            mma16816(acc[i][2 * jp + 1], a[i], b[2], b[3]);
          }
        }
      };
      if (d0 + kBK <= d) {  // block-uniform; one basic block, so the next step's ldmatrix
#pragma unroll              // can be scheduled under this step's mma
        for (int kk = 0; kk < kBK; kk += 16) kstep(kk);
      } else {  // the last slab when d % 64 != 0 (d % 16 == 0)
        for (int kk = 0; kk < kBK && d0 + kk < d; kk += 16) kstep(kk);
      }
      if constexpr (kL2) {  // columns past d are zero-filled
        const uint4* src = reinterpret_cast<const uint4*>(xs + stage * (kBN * kXLD) + tid * kXLD);
#pragma unroll
        for (int v = 0; v < kBK / 8; ++v) {
          const uint4 u = src[v];
          const __half2* h = reinterpret_cast<const __half2*>(&u);
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const float2 f = __half22float2(h[e]);
            xacc += f.x * f.x + f.y * f.y;
          }
        }
      }
      stage = stage + 1 == stages ? 0 : stage + 1;
    }
    if constexpr (kL2) {
      xn[tid] = xacc;  // the previous tile's epilogue read xn before this tile's barriers
      __syncthreads();
    }

    // Epilogue. Element acc[i][j][2h + e] is query wq*64 + 16i + 8h + g, tile row
    // wn*64 + 8j + 2c + e. Rounds: push survivors, insert the buckets, repeat while a bucket
    // overflowed (only while thresholds are still loose, i.e. in a chunk's first tiles).
    // l2: |x|^2 of this thread's tile row je (je = 2j + e: row wn*64 + 8j + 2c + e), and their
    // range for the cheap test
    auto xv = [&](int je) { return kL2 ? xn[wn * 64 + 8 * (je >> 1) + 2 * c + (je & 1)] : 0.f; };
    float x_min = INFINITY, x_max = 0.f;
    if constexpr (kL2) {
#pragma unroll
      for (int je = 0; je < 16; ++je) {
        x_min = fminf(x_min, xv(je));
        x_max = fmaxf(x_max, xv(je));
      }
    }
    // A chunk's first tile: every threshold is still +inf, so each query would push all 256
    // elements through the 8-slot buckets (dozens of rounds). Bound them first: per query,
    // each lane takes the ceil(k/4)-th smallest distinct distance among its 16 rows (at least
    // ceil(k/4) of its rows are that close); a quad's largest such value has >= k rows at or
    // under it in the warp's 64 rows, so the smallest over the 4 warps bounds the query's
    // k-th distance in the chunk, and anything strictly farther can never be returned.
    // Per-query masks (a global read per element) and k > 64 (over 16 per lane) skip this.
    if (r0 == r_begin && mask == nullptr && k <= 64) {
      const int kq = (k + 3) / 4;
      float* bound = bucket_d;  // free: the buckets are empty between epilogues
#pragma unroll
      for (int ih = 0; ih < 8; ++ih) {
        const int qi = wq * 64 + 8 * ih + g;
        const float qnv = kL2 ? qn[qi] : 0.f;
        float prev = -INFINITY;
        for (int r = 0; r < kq; ++r) {
          float mn = INFINITY;
#pragma unroll
          for (int je = 0; je < 16; ++je) {
            const float sv = acc[ih >> 1][je >> 1][2 * (ih & 1) + (je & 1)];
            const float v = to_dist<METRIC>(sv, qnv, xv(je));
            const bool valid = r0 + wn * 64 + 8 * (je >> 1) + 2 * c + (je & 1) < r_end;
            if (valid && v > prev) mn = fminf(mn, v);  // false for NaN
          }
          prev = mn;
        }
        prev = fmaxf(prev, __shfl_xor_sync(full, prev, 1));
        prev = fmaxf(prev, __shfl_xor_sync(full, prev, 2));
        if (c == 0) bound[qi * kBucket + wn] = prev;
      }
      __syncthreads();
#pragma unroll
      for (int ih = 0; ih < 8; ++ih) {
        const int qi = wq * 64 + 8 * ih + g;
        const float qnv = kL2 ? qn[qi] : 0.f;
        const float* bq = bound + qi * kBucket;
        const float b = fminf(fminf(bq[0], bq[1]), fminf(bq[2], bq[3]));
#pragma unroll
        for (int je = 0; je < 16; ++je) {
          float& s = acc[ih >> 1][je >> 1][2 * (ih & 1) + (je & 1)];
          if (to_dist<METRIC>(s, qnv, xv(je)) > b) s = NAN;
        }
      }
      __syncthreads();  // the pushes below write bucket_d
    }
    for (;;) {
      float t[8], qv[8];
#pragma unroll
      for (int ih = 0; ih < 8; ++ih) {
        const int qi = wq * 64 + 8 * ih + g;  // ih = 2i + h
        t[ih] = thr[qi];
        qv[ih] = kL2 ? qn[qi] : 0.f;
      }
      // Cheap test first, per query: could any of its 16 elements pass the threshold? ip and
      // cosine: the distance falls as the score grows, so the largest score decides exactly.
      // l2: |q|^2 + min |x|^2 - 2 max s bounds every distance from below; the fp32 rounding of
      // the exact distances (a few ulps of |q|^2 + |x|^2 >= 2 |s|) is covered by the margin.
      // fmaxf skips NaN (spent elements); all NaN gives NaN, never hot.
      float m[8];  // the largest score of each query among the thread's 16 rows
#pragma unroll
      for (int ih = 0; ih < 8; ++ih) {
        m[ih] = NAN;
#pragma unroll
        for (int je = 0; je < 16; ++je)
          m[ih] = fmaxf(m[ih], acc[ih >> 1][je >> 1][2 * (ih & 1) + (je & 1)]);
      }
      unsigned hot = 0;
#pragma unroll
      for (int ih = 0; ih < 8; ++ih) {
        float lo = to_dist<METRIC>(m[ih], 0.f, 0.f);
        if constexpr (kL2) {  // a lower bound, less a margin over fp32 rounding (see above)
          const float scale = qv[ih] + x_max;
          lo = (qv[ih] + x_min) - 2.f * m[ih] - 4e-6f * scale;
        }
        hot |= lo <= t[ih] ? 1u << ih : 0u;
      }
      bool pushed = false, overflow = false;
      if (hot != 0) {
#pragma unroll
        for (int ih = 0; ih < 8; ++ih) {
          if (!((hot >> ih) & 1u)) continue;
          const int qi = wq * 64 + 8 * ih + g;
#pragma unroll
          for (int je = 0; je < 16; ++je) {
            float& s = acc[ih >> 1][je >> 1][2 * (ih & 1) + (je & 1)];
            const float v = to_dist<METRIC>(s, qv[ih], xv(je));
            if (v <= t[ih]) {  // false for NaN, and for spent elements (NaN)
              const int64_t pos = r0 + wn * 64 + 8 * (je >> 1) + 2 * c + (je & 1);
              bool ok = q0 + qi < nq && pos < r_end;
              if (ok && mask != nullptr) ok = mask[(q0 + qi) * n + pos] != 0;
              bool spent = true;
              if (ok) {
                const int slot = atomicAdd(bucket_n + qi, 1);
                if (slot < kBucket) {
                  bucket_d[qi * kBucket + slot] = v;
                  bucket_r[qi * kBucket + slot] = static_cast<int>(pos);
                  pushed = true;
                } else {
                  overflow = true;  // bucket full: pending, retried next round
                  spent = false;
                }
              }
              if (spent) s = NAN;
            }
          }
        }
      }
      if (!__syncthreads_or(pushed)) break;  // a full bucket implies a push
      // Warp w inserts the buckets of queries w + 8 b (b < 16) that received survivors.
      const unsigned busy = __ballot_sync(full, lane < 16 && bucket_n[my_q] > 0);
      for (unsigned rest = busy; rest != 0; rest &= rest - 1) {
        const int qi = warp + 8 * (__ffs(rest) - 1);
        const int m = min(bucket_n[qi], kBucket);
        if (k <= 32) {
          insert_bucket32(list_d + qi * k, list_r + qi * k, list_n + qi, thr + qi, k,
                          bucket_d + qi * kBucket, bucket_r + qi * kBucket, m, gbound + q0 + qi);
        } else {
          for (int e = 0; e < m; ++e)
            insert(list_d + qi * k, list_r + qi * k, list_n + qi, thr + qi, k,
                   bucket_d[qi * kBucket + e], bucket_r[qi * kBucket + e]);
          if (lane == 0 && list_n[qi] == k) atomicMin(gbound + q0 + qi, order_key(thr[qi]));
        }
      }
      __syncwarp();
      if (lane < 16 && ((busy >> lane) & 1u)) bucket_n[my_q] = 0;
      if (!__syncthreads_or(overflow)) break;
    }
  }
  cp_async_wait<0>();

  // Lists of query qi were last changed by warp qi % 8, the one writing them out.
  for (int qi = warp; qi < kBQ; qi += kThreads / 32) {
    const int64_t q = q0 + qi;
    if (q >= nq) break;
    const int cnt = list_n[qi];
    const int64_t base = (q * nchunks + chunk) * k;
    if (lane == 0) part_n[q * nchunks + chunk] = cnt;
    for (int j = lane; j < k; j += 32) {
      const int pos = list_r[qi * k + j];
      part_d[base + j] = j < cnt ? list_d[qi * k + j] : INFINITY;
      part_i[base + j] = j < cnt ? static_cast<long long>(rows != nullptr ? rows[pos] : pos) : -1;
    }
  }
#endif
}

template <int METRIC>
void* kernel_ptr() {
  return reinterpret_cast<void*>(&mma_topk_kernel<METRIC>);
}

}  // namespace

bool mma_enabled() {
  static const bool enabled = [] {
    const char* e = std::getenv("AFFECTKIT_KNN_MMA");
    return !(e != nullptr && std::strcmp(e, "0") == 0);
  }();
  return enabled;
}

MmaPlan plan_exact_mma(int64_t nq, int64_t n, int64_t d, int k, int device, int optin,
                       int sms) {
  MmaPlan plan;
  if (!mma_enabled()) return plan;
  int major = 0;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess) {
    cudaGetLastError();
    return plan;
  }
  if (major < 9) return plan;  // the kernel is built for sm_90 and later only
  int stages = 3;  // 2 when k's lists leave no room for a third
  while (stages >= 2 && Layout(d, k, stages).total > static_cast<size_t>(optin)) --stages;
  if (stages < 2) return plan;
  const size_t smem = Layout(d, k, stages).total;
  int per_sm = 0;
  for (void* fn : {kernel_ptr<0>(), kernel_ptr<1>(), kernel_ptr<2>()}) {
    if (cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             static_cast<int>(smem)) != cudaSuccess) {
      cudaGetLastError();
      return plan;
    }
  }
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel_ptr<0>(), kThreads, smem) !=
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
#define AFFECTKIT_MMA_LAUNCH(M)                                                              \
  mma_topk_kernel<M><<<grid, kThreads, plan.smem, stream>>>(queries, db, qmask, rows, count, \
                                                            nq, n, d, k, plan.stages,        \
                                                            plan.chunk_rows, gbound, part_d, \
                                                            part_i, part_n)
    if (metric == 0) AFFECTKIT_MMA_LAUNCH(0);
    else if (metric == 1) AFFECTKIT_MMA_LAUNCH(1);
    else AFFECTKIT_MMA_LAUNCH(2);
#undef AFFECTKIT_MMA_LAUNCH
    err = cudaGetLastError();
  }
  cudaFreeAsync(gbound, stream);  // stream-ordered: after the kernel
  cuda_check(err, "exact_knn mma kernel launch");
}

}  // namespace affectkit::knn::detail
