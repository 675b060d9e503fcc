// The mma kernel of the CUDA exact filtered k-NN (see exact_knn_mma.cu for its design), as a
// template over how the score tile is multiplied:
//   kWG = false: mma.sync m16n8k16 from ldmatrix fragments (exact_knn_mma.cu, sm_90);
//   kWG = true:  wgmma m64n256k16, both operands read by the tensor cores from shared memory
//                (exact_knn_mma_sm90a.cu, built for sm_90a only; the default on
//                compute capability 9.0 since it ran on an H100, 2026-11-27).
//                kInFlight = true keeps a slab's products running until the next slab's are
//                issued (wait_group 1, then a barrier frees the stage it read), so the tensor
//                cores are not idle across the per-slab barrier.
//                kWS = true (with kInFlight): warp-specialised. A third warpgroup (the
//                producer, 24 registers a thread after setmaxnreg) issues every row copy, and
//                each stage has two mbarriers: "full" (the producer's copies landed:
//                cp.async.mbarrier.arrive.noinc) and "empty" (the 8 consumer warps' products
//                that read it are done). The two consumer warpgroups (240 registers) never
//                meet at a block barrier inside a tile and issue no copies; loads start as
//                soon as a stage frees, also across a tile's epilogue.
//                Why: with loads issued by the multiplying warps behind a per-slab barrier,
//                a slab took ~3,450 cycles against ~1,024 of products (H200, ncu,
//                twenty-first session: issue 23 %, tensor 25 %, L2 19 %). On an H200
//                (twenty-third session) it was as fast as kInFlight alone (3.40 against
//                3.41 ms at 100 %): the loads were not what the consumers waited for. Its
//                producer warps sat in their mbarrier waits; what the consumers do between
//                products (the epilogue, with the tensor cores idle) is the likely bound,
//                hence the epilogues below.
//   kEpi (an Epilogue, exact_knn_mma.h; kGrouped and kWarp not yet run on a GPU):
//                kPlain tests a hot query's elements one by one, and all 8 warps meet at
//                block barriers in the epilogue; kGrouped tests them by groups first (wgmma
//                only); kWarp (kWS only) also makes each warp's epilogue its own. Mode 3 takes
//                kWarp unless AFFECTKIT_KNN_EPILOGUE says otherwise (see wgmma_mode): the next
//                GPU run measures each part's share.
// Included by exact_knn_mma.cu and the *_sm90a.cu files only; everything but the loader's
// shared-memory layout, the multiply and the accumulators' coordinates is shared, so all
// keep one epilogue.
//
// Why wgmma: the mma.sync kernel keeps the tensor pipe ~36 % busy (H200, 1000 x 1M x 384,
// every row allowed: 3.67 ms against a 1.1 ms floor): its 8 warps issue the ldmatrix, mma and
// address instructions themselves, ~3x the HMMA count, and wait on each mma's fixed latency.
// wgmma is one asynchronous instruction per 64 x 256 x 16 step of a warpgroup, reading both
// operands from shared memory, so the warps issue the next slab's copies while it runs.
//
// The kWG layout (Hopper's canonical K-major layout with the 128-byte swizzle, which the
// descriptors name): a slab of 8 rows x 64 halves is 1024 bytes, row r at byte 128 r, and its
// 16-byte piece p at piece p ^ (r % 8) (bits 4-6 of the address XOR bits 7-9; every such
// block 1024-byte aligned). Queries: per 64-column block, 128 rows of 128 bytes; a stage of
// rows: 256 rows of 128 bytes. A descriptor's start address steps 32 bytes per 16 columns
// inside the swizzled row; 1024 bytes separate 8-row groups. Warpgroup wg (warps 4 wg ..
// 4 wg + 3) multiplies queries 64 wg .. 64 wg + 63 by all 256 rows of the tile; each thread
// holds 2 queries x 64 rows of scores (mma.sync: 8 queries x 16 rows), and the epilogue reads
// them through qloc / rloc / at below.
#pragma once

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>

#include "../core/cuda_utils.cuh"
#include "../core/wgmma.cuh"
#include "exact_knn_mma.h"

namespace affectkit::knn::detail {
namespace {

using namespace mma_common;

constexpr int kThreads = 256;   // 8 warps: 2 along queries x 4 along rows (kWG: 2 warpgroups)
constexpr int kBQ = 128;        // queries per block
constexpr int kBN = 256;        // rows per tile
constexpr int kBK = 64;         // columns per pipeline stage
constexpr int kXLD = kBK + 8;   // mma.sync: halves per staged row (144 bytes: conflict-free ldmatrix)
constexpr int kBucket = 8;      // survivor slots per query and epilogue round
constexpr int kProducerThreads = 128;  // kWS: the copy-issuing warpgroup, after the consumers
constexpr int kProducerRegs = 24, kConsumerRegs = 240;  // setmaxnreg: 128 x 24 + 256 x 240
                                                        // = 384 x 168 (__launch_bounds__(384, 1))

constexpr int kGroup = 8;       // kGroupedPush: elements a thread tests together before one by one
static_assert(kBN == kThreads, "the l2 row norms give each thread one tile row");
static_assert(kBucket >= 4, "a chunk's first tile keeps 4 bounds per query in the buckets");

__host__ __device__ constexpr size_t align128(size_t x) { return (x + 127) & ~size_t(127); }
__host__ __device__ constexpr size_t align1024(size_t x) { return (x + 1023) & ~size_t(1023); }

// Shared-memory carve-up, identical on host and device. kWG: offsets from a 1024-byte aligned
// base, which the kernel finds inside the 1 KB of slack counted in total.
struct Layout {
  size_t qs, xs, ld, lr, cnt, thr, qn, xn, bd, br, bn, mb, total;
  __host__ __device__ Layout(int64_t d, int k, int stages, bool wg, bool ws = false) {
    size_t off = 0;
    if (wg) {
      const size_t dpad = static_cast<size_t>((d + kBK - 1) / kBK * kBK);
      qs = off; off += align1024(size_t(kBQ) * dpad * 2);
      xs = off; off += align1024(size_t(stages) * kBN * kBK * 2);
    } else {
      qs = off; off += align128(size_t(kBQ) * size_t(d + 8) * 2);
      xs = off; off += align128(size_t(stages) * kBN * kXLD * 2);
    }
    ld = off; off += align128(size_t(kBQ) * size_t(k) * 4);
    lr = off; off += align128(size_t(kBQ) * size_t(k) * 4);
    cnt = off; off += align128(size_t(kBQ) * 4);
    thr = off; off += align128(size_t(kBQ) * 4);
    qn = off; off += align128(size_t(kBQ) * 4);
    xn = off; off += align128(size_t(kBN) * 4 * (ws ? 2 : 1));  // kWS: one a tile parity
    bd = off; off += align128(size_t(kBQ) * kBucket * 4);
    br = off; off += align128(size_t(kBQ) * kBucket * 4);
    bn = off; off += align128(size_t(kBQ) * 4);
    mb = off; off += ws ? align128(size_t(2) * stages * 8) : 0;  // kWS: full[stages], empty[stages]
    total = off + (wg ? 1024 : 0);
  }
};

// The device code below is built for sm_90 and later only (see the kernel).
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900
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

// The largest of v[0 .. N) as a balanced tree (a depth of log2 N dependent FMNMX, not N):
// fmaxf skips NaN, and gives NaN only when all are NaN, in any order.
template <int N>
__device__ __forceinline__ float tree_max(const float* v) {
  if constexpr (N == 1) return v[0];
  else return fmaxf(tree_max<N / 2>(v), tree_max<N - N / 2>(v + N / 2));
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


// D (64 x 256 fp32, this warpgroup's accumulators) += A (64 x 16 fp16) * B^T (B: 256 x 16
// fp16), both read from shared memory through descriptors (K-major, 128-byte swizzle).
// Thread t of warp w (within the warpgroup), g = t / 4, c = t % 4, holds d[j][2h + e] =
// D(16 w + 8 h + g, 8 j + 2 c + e): the mma.sync m16n8 layout, 32 times along N.
__device__ __forceinline__ void wgmma_m64n256k16(float (&d)[32][4], uint64_t desc_a,
                                                 uint64_t desc_b) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %130, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n256k16.f32.f16.f16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, %96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, %112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127}, "
      "%128, %129, p, 1, 1, 0, 0;\n}\n"
      : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]), "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]), "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3]), "+f"(d[8][0]), "+f"(d[8][1]), "+f"(d[8][2]), "+f"(d[8][3]), "+f"(d[9][0]), "+f"(d[9][1]), "+f"(d[9][2]), "+f"(d[9][3]), "+f"(d[10][0]), "+f"(d[10][1]), "+f"(d[10][2]), "+f"(d[10][3]), "+f"(d[11][0]), "+f"(d[11][1]), "+f"(d[11][2]), "+f"(d[11][3]), "+f"(d[12][0]), "+f"(d[12][1]), "+f"(d[12][2]), "+f"(d[12][3]), "+f"(d[13][0]), "+f"(d[13][1]), "+f"(d[13][2]), "+f"(d[13][3]), "+f"(d[14][0]), "+f"(d[14][1]), "+f"(d[14][2]), "+f"(d[14][3]), "+f"(d[15][0]), "+f"(d[15][1]), "+f"(d[15][2]), "+f"(d[15][3]), "+f"(d[16][0]), "+f"(d[16][1]), "+f"(d[16][2]), "+f"(d[16][3]), "+f"(d[17][0]), "+f"(d[17][1]), "+f"(d[17][2]), "+f"(d[17][3]), "+f"(d[18][0]), "+f"(d[18][1]), "+f"(d[18][2]), "+f"(d[18][3]), "+f"(d[19][0]), "+f"(d[19][1]), "+f"(d[19][2]), "+f"(d[19][3]), "+f"(d[20][0]), "+f"(d[20][1]), "+f"(d[20][2]), "+f"(d[20][3]), "+f"(d[21][0]), "+f"(d[21][1]), "+f"(d[21][2]), "+f"(d[21][3]), "+f"(d[22][0]), "+f"(d[22][1]), "+f"(d[22][2]), "+f"(d[22][3]), "+f"(d[23][0]), "+f"(d[23][1]), "+f"(d[23][2]), "+f"(d[23][3]), "+f"(d[24][0]), "+f"(d[24][1]), "+f"(d[24][2]), "+f"(d[24][3]), "+f"(d[25][0]), "+f"(d[25][1]), "+f"(d[25][2]), "+f"(d[25][3]), "+f"(d[26][0]), "+f"(d[26][1]), "+f"(d[26][2]), "+f"(d[26][3]), "+f"(d[27][0]), "+f"(d[27][1]), "+f"(d[27][2]), "+f"(d[27][3]), "+f"(d[28][0]), "+f"(d[28][1]), "+f"(d[28][2]), "+f"(d[28][3]), "+f"(d[29][0]), "+f"(d[29][1]), "+f"(d[29][2]), "+f"(d[29][3]), "+f"(d[30][0]), "+f"(d[30][1]), "+f"(d[30][2]), "+f"(d[30][3]), "+f"(d[31][0]), "+f"(d[31][1]), "+f"(d[31][2]), "+f"(d[31][3])
      : "l"(desc_a), "l"(desc_b), "r"(1));
#else
  __trap();  // built for sm_90a only (exact_knn_mma_sm90a.cu)
#endif
}


// kWS synchronisation (sm_90a; in other code they compile to nothing and the kernel traps).
// mbarriers of one stage: phases complete in turn, and a wait names the parity of the phase it
// waits for; waiting for parity 1 on a fresh barrier returns at once (its "previous" phase).
__device__ __forceinline__ void mbar_init(uint32_t bar, int count) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
#endif
}
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  uint32_t done = 0;
  do {
    asm volatile(
        "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
        "selp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(bar), "r"(parity)
        : "memory");
  } while (!done);
#endif
}
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("{\n.reg .b64 state;\nmbarrier.arrive.shared::cta.b64 state, [%0];\n}\n" ::"r"(bar)
               : "memory");
#endif
}
// One arrival on bar once all of this thread's earlier cp.async have landed (noinc: the
// arrival counts towards the barrier's expected count).
__device__ __forceinline__ void cp_async_mbar_arrive(uint32_t bar) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(bar) : "memory");
#endif
}
template <int N>
__device__ __forceinline__ void setmaxnreg_dec() {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(N));
#endif
}
template <int N>
__device__ __forceinline__ void setmaxnreg_inc() {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(N));
#endif
}
// Barrier 1 over the 256 consumer threads (the producer warpgroup takes no part), and its OR.
__device__ __forceinline__ void consumer_sync() {
  asm volatile("bar.sync 1, %0;\n" ::"n"(kThreads) : "memory");
}
__device__ __forceinline__ bool consumer_sync_or(bool v) {
  uint32_t r;
  asm volatile(
      "{\n.reg .pred p, q;\nsetp.ne.u32 q, %1, 0;\nbar.red.or.pred p, 1, %2, q;\n"
      "selp.u32 %0, 1, 0, p;\n}\n"
      : "=r"(r)
      : "r"(static_cast<uint32_t>(v)), "n"(kThreads)
      : "memory");
  return r != 0;
}

#endif

// grid: (ceil(nq / 128), nchunks); block: 256 threads; dynamic shared memory:
// Layout(d, k, stages, kWG). Row space as in the WMMA kernel: [0, n) in chunks of chunk_rows,
// or, with rows != nullptr (a compacted shared filter; mask is then null), [0, *count) split
// into gridDim.y chunks of round_up(ceil(*count / gridDim.y), 256) rows, position j standing
// for database row rows[j]. mask (or null) is a per-query (nq, n) mask.
template <int METRIC, bool kWG, bool kInFlight, bool kWS, int kEpi>
__global__ void __launch_bounds__(kWS ? kThreads + kProducerThreads : kThreads, 1)
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
  if constexpr (kWG) {
#if defined(__CUDA_ARCH__) && !defined(__CUDA_ARCH_FEAT_SM90_ALL)
    __trap();  // wgmma needs sm_90a code (plan_exact_mma launches kWG only where it was built)
#endif
  }
  static_assert(kWG || !kInFlight, "only wgmma products are asynchronous");
  static_assert(!kWS || kInFlight, "the warp-specialised loop keeps a slab in flight");
  static_assert(kEpi != kWarp || kWS, "a warp's own epilogue needs the warp-specialised loop");
  static_assert(kEpi == kPlain || kWG, "the grouped push is built for the wgmma layout only");
  constexpr bool kL2 = METRIC == 1;
  // kGrouped, kWarp (not yet run on a GPU): the epilogue's push pass tests each group of
  // kGroup elements by its largest score before testing them one by one, and the cheap test
  // takes its maxima as trees. On the H200 (twenty-third session) the consumers, not the
  // loads, bounded the kernel, and between products they run the epilogue, where a hot query
  // walked all kRPT elements, ~9 instructions each (an emulation on random data: about half
  // the warps have a hot query each tile).
  constexpr bool kGroupedPush = kEpi != kPlain;
  // kWarp (not yet run on a GPU): the epilogue is each warp's own: a warp holds the scores of
  // 16 queries (qloc) over all the tile's rows, so it can also refresh, insert and write out
  // those 16 itself, and its epilogue needs no barrier but its own (__syncwarp). The block
  // barriers of the shared epilogue made all 8 warps wait for the slowest insert each round,
  // with the tensor cores idle; now one warpgroup's epilogue can run under the other's
  // products. l2 keeps one consumers' barrier a tile for the row norms (xn, a buffer a parity).
  constexpr bool kWarpLocal = kEpi == kWarp;
  // Scores per thread: kQPT queries x kRPT tile rows; kRowWarps warps share a query's rows.
  constexpr int kQPT = kWG ? 2 : 8, kRPT = kWG ? 64 : 16, kRowWarps = kWG ? 1 : 4;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  unsigned char* smem = smem_raw;
  if constexpr (kWG) smem += (1024u - (smem_addr(smem_raw) & 1023u)) & 1023u;
  const Layout lay(d, k, stages, kWG, kWS);
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
  const int wq = warp >> 2, wn = warp & 3;  // mma.sync: this warp's 64 x 64 piece of the tile
  const int g = lane >> 2, c = lane & 3;    // mma fragment coordinates
  const int wr = kWG ? 0 : wn;              // this warp's share of the tile's rows
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
  const int QLD = d32 + 8;  // mma.sync: halves per resident query row (odd x 16 bytes)
  const int d8 = static_cast<int>(d / 8);
  const int ksteps = static_cast<int>((d + kBK - 1) / kBK);
  // Block-local query of the thread's score set ih (< kQPT), tile row of its score je (< kRPT).
  auto qloc = [&](int ih) {
    return kWG ? 64 * wq + 16 * wn + 8 * ih + g : 64 * wq + 8 * ih + g;
  };
  auto rloc = [&](int je) { return 64 * wr + 8 * (je >> 1) + 2 * c + (je & 1); };
  // Half of query row i, column col, in the resident query layout.
  auto q_at = [&](int i, int col) -> __half {
    if constexpr (kWG)
      return qs[(col / kBK) * (kBQ * kBK) + sw128_offset(i, (col % kBK) / 8) / 2 + col % 8];
    else
      return qs[i * QLD + col];
  };

  // Resident queries (rows past nq are zero; kWG: columns past d too), list and bucket state,
  // by the 256 consumer threads (kWS: the producer warpgroup only meets the barriers).
  const bool consumer = tid < kThreads;
  if (has_rows && consumer) {
    if constexpr (kWG) {
      const int p8 = ksteps * (kBK / 8);  // 16-byte pieces per query row, padded to 64 columns
      for (int i = tid; i < kBQ * p8; i += kThreads) {
        const int r = i / p8, p = i - r * p8;
        const bool ok = q0 + r < nq && p < d8;
        cp_async16(smem_addr(qs) + (p / 8) * (kBQ * kBK * 2) + sw128_offset(r, p % 8),
                   ok ? queries + (q0 + r) * d + p * 8 : queries, ok);
      }
    } else {
      for (int i = tid; i < kBQ * d8; i += kThreads) {
        const int r = i / d8, p = i - r * d8;
        const bool ok = q0 + r < nq;
        cp_async16(qs + r * QLD + p * 8, ok ? queries + (q0 + r) * d + p * 8 : queries, ok);
      }
    }
  }
  cp_async_commit();
  for (int i = tid; i < kBQ && consumer; i += kThreads) {
    list_n[i] = 0;
    thr[i] = INFINITY;
    bucket_n[i] = 0;
  }
  cp_async_wait<0>();
  if constexpr (kWG) fence_proxy_async();
  __syncthreads();
  if constexpr (kWS) {  // full[s] (128 producer arrivals), empty[s] (8 consumer warps)
    const uint32_t mb0 = smem_addr(smem + lay.mb);
    for (int s = tid; s < stages; s += kThreads) {
      mbar_init(mb0 + 8u * s, kProducerThreads);
      mbar_init(mb0 + 8u * (stages + s), kThreads / 32);
    }
  }
  if (kL2 && has_rows && consumer) {
    for (int i = warp; i < kBQ; i += kThreads / 32) {
      float s = 0.f;
      for (int col = lane; col < d; col += 32) {
        const float v = __half2float(q_at(i, col));
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
  // kWG: the piece lands at piece (tid % 8) ^ (row % 8) of its 128-byte row, and row % 8 =
  // (tid / 8) % 8 for every it, so the swizzle is one XOR per thread.
  const int my_r = warp * 4 + (lane & 3) + 32 * (lane >> 2);
  const uint32_t xs_base = smem_addr(xs);
  const int row_halves = kWG ? kBK : kXLD;  // per staged row
  const uint32_t ld_lane = kWG ? sw128_offset(tid >> 3, tid & 7)
                               : 2u * static_cast<uint32_t>((tid >> 3) * kXLD + (tid & 7) * 8);
  auto db_row = [&](int64_t j) -> int {
    return j < r_end ? (rows != nullptr ? rows[j] : static_cast<int>(j)) : -1;
  };
  int ld_row = -1, nx_row = !kWS && has_rows ? db_row(r_begin + my_r) : -1;
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
      // Few instructions per piece (they are issued by the same warps as the multiply): the
      // address is always in bounds (row and column clamped) and the zero fill of rows past
      // the end and columns past d comes from the copy's source size alone.
      const int col = ld_ks * kBK + (tid & 7) * 8;
      const bool col_ok = col < d;
      const __half* src_col = db + (col_ok ? col : 0);
      const uint32_t dst = xs_base + 2u * static_cast<uint32_t>(ld_stage * (kBN * row_halves)) + ld_lane;
#pragma unroll
      for (int it = 0; it < kBN / 32; ++it) {
        const int row = __shfl_sync(full, ld_row, (it << 2) | (lane >> 3));
        const size_t offset = static_cast<size_t>(static_cast<unsigned>(max(row, 0))) *
                              static_cast<unsigned>(d32);  // one 32 x 32 -> 64-bit multiply
        cp_async16(dst + 2u * (32 * it * row_halves), src_col + offset, row >= 0 && col_ok);
      }
    }
    ld_stage = ld_stage + 1 == stages ? 0 : ld_stage + 1;
    cp_async_commit();
  };
  // kWS: stage s's barriers (full at mb + 8 s, empty at mb + 8 (stages + s)).
  const uint32_t full_bar = kWS ? smem_addr(smem + lay.mb) : 0u;
  const uint32_t empty_bar = full_bar + 8u * static_cast<uint32_t>(stages);
  if constexpr (kWS) {
    if (!consumer) {
      // The producer: warp pw copies tile rows 64 pw .. 64 pw + 63 of every slab, lane l the
      // 16-byte piece l % 8 of rows 4 it + l / 8 (it < 16). Lane l holds the database rows of
      // the warp's rows l and 32 + l (-1: past r_end), fetched one tile ahead; each copy takes
      // its row by a shuffle, as the all-threads loader does.
      setmaxnreg_dec<kProducerRegs>();
      const int pw = warp - kThreads / 32;
      int na = has_rows ? db_row(r_begin + 64 * pw + lane) : -1;
      int nb = has_rows ? db_row(r_begin + 64 * pw + 32 + lane) : -1;
      // Copy it lands at byte 512 it + (lane_even or lane_odd) of the stage: row 4 it + l / 8 of
      // the warp's 64 has row % 8 = (4 (it % 2) + l / 8) % 8, so two swizzles cover all 16.
      const uint32_t lane_even = sw128_offset(64 * pw + (lane >> 3), lane & 7);
      const uint32_t lane_odd = sw128_offset(64 * pw + 4 + (lane >> 3), lane & 7) - 512u;
      int st = 0;
      uint32_t ph = 0;
      for (int64_t r0 = r_begin; r0 < r_end; r0 += kBN) {
        const int ra = na, rb = nb;
        na = db_row(r0 + kBN + 64 * pw + lane);
        nb = db_row(r0 + kBN + 64 * pw + 32 + lane);
        for (int ks = 0; ks < ksteps; ++ks) {
          mbar_wait(empty_bar + 8u * st, ph ^ 1u);  // the consumers are done with this stage
          const int col = ks * kBK + (lane & 7) * 8;
          const bool col_ok = col < d;
          const __half* src_col = db + (col_ok ? col : 0);
          const uint32_t dst = xs_base + static_cast<uint32_t>(st * (kBN * kBK * 2));
#pragma unroll
          for (int it = 0; it < 16; ++it) {
            const int j = 4 * it + (lane >> 3);
            const int row = __shfl_sync(full, it < 8 ? ra : rb, j & 31);
            const size_t offset = static_cast<size_t>(static_cast<unsigned>(max(row, 0))) *
                                  static_cast<unsigned>(d32);
            cp_async16(dst + ((it & 1) ? lane_odd : lane_even) + 512u * it, src_col + offset,
                       row >= 0 && col_ok);
          }
          cp_async_mbar_arrive(full_bar + 8u * st);  // once this thread's copies have landed
          if (++st == stages) {
            st = 0;
            ph ^= 1u;
          }
        }
      }
      cp_async_commit();
      cp_async_wait<0>();
      return;
    }
    setmaxnreg_inc<kConsumerRegs>();
  } else {
    for (int s = 0; s < stages - 1; ++s) issue_load();
  }
  uint32_t phase = 0;  // kWS: parity of the full barrier's phase the consumers wait for
  // kWS: the 8 consumer warps release a stage once their products that read it are done.
  auto release = [&](int s) {
    __syncwarp();
    if (lane == 0) mbar_arrive(empty_bar + 8u * static_cast<uint32_t>(s));
  };

  // mma.sync ldmatrix lane addresses (bytes): A rows wq*64 + lane % 16, columns + 8 (lane / 16);
  // B rows wn*64 + lane % 8 + 8 (lane / 16), columns + 8 ((lane / 8) % 2).
  const uint32_t a_base =
      smem_addr(qs) + 2u * static_cast<uint32_t>((wq * 64 + (lane & 15)) * QLD + (lane >> 4) * 8);
  const uint32_t b_lane =
      2u * static_cast<uint32_t>((wn * 64 + (lane & 7) + ((lane >> 4) << 3)) * kXLD +
                                 ((lane >> 3) & 1) * 8);
  // wgmma: this warpgroup's 64 queries in each 64-column block of the resident queries.
  const uint32_t a_wg = smem_addr(qs) + static_cast<uint32_t>(wq * 64 * 128);
  int stage = 0;
  // Query bookkeeping: warp w, lane l < 16 handles query w + 8 l of the block (kWarpLocal:
  // 16 w + l, its own) (bound refresh, bucket insertion, write-out). gbound[q] is the smallest
  // k-th distance any chunk's full list has reached (order_key): a row farther than it is
  // beaten by k rows of that chunk.
  auto book_q = [&](int b) { return kWarpLocal ? 16 * warp + b : warp + 8 * b; };
  const int my_q = book_q(lane & 15);
  unsigned g_key = 0xffffffffu;

  for (int64_t r0 = r_begin; r0 < r_end; r0 += kBN) {
    float acc[32][4];  // 32 groups of 4 scores in either layout; read them through at()
#pragma unroll
    for (int j = 0; j < 32; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[j][e] = 0.f;
    // Score of the thread's query ih and tile row je (see qloc, rloc).
    auto at = [&](int ih, int je) -> float& {
      if constexpr (kWG) return acc[je >> 1][2 * ih + (je & 1)];
      else return acc[(ih >> 1) * 8 + (je >> 1)][2 * (ih & 1) + (je & 1)];
    };
    float xacc = 0.f;  // l2: |x|^2 of tile row tid

    for (int ks = 0; ks < ksteps; ++ks) {
      if constexpr (kWS) {
        mbar_wait(full_bar + 8u * stage, phase);  // the producer's copies into it landed
        fence_proxy_async();  // ... written through the generic proxy, read by wgmma
      } else {
        if (stages == 3) cp_async_wait<1>();
        else cp_async_wait<0>();
        if constexpr (kWG) fence_proxy_async();
        __syncthreads();  // this stage landed for all (and, but kInFlight, the next refill's is free)
      }
      if constexpr (kWG) {  // four asynchronous 64 x 256 x 16 steps; the copies issue meanwhile
        const uint32_t a_addr = a_wg + static_cast<uint32_t>(ks * (kBQ * kBK * 2));
        const uint32_t b_addr = xs_base + static_cast<uint32_t>(stage * (kBN * kBK * 2));
        wgmma_fence_operand(acc);  // the tile's zeroing precedes the fence
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < kBK / 16; ++kk)
          wgmma_m64n256k16(acc, sw128_desc(a_addr + 32 * kk), sw128_desc(b_addr + 32 * kk));
        wgmma_commit();
      }
      if constexpr (kInFlight) {
        // This warpgroup's previous slab is done once at most this slab's group is pending;
        // past the barrier both warpgroups' are, so its stage (the one refilled next) is free.
        // At a tile's first slab the epilogue's wait and barrier have done this already.
        wgmma_wait_pending<1>();
        if constexpr (kWS) {
          if (ks > 0) release(stage == 0 ? stages - 1 : stage - 1);
        } else if (ks > 0) {
          __syncthreads();
        }
      }
      if constexpr (!kWS) issue_load();
      // The bound from other chunks: read at a tile's first slab, folded into the threshold at
      // its last (a stale value is a valid bound too, so the unsynchronised write is benign).
      if (ks == 0 && lane < 16 && q0 + my_q < nq) g_key = __ldcg(gbound + q0 + my_q);
      if (ks == ksteps - 1 && lane < 16) thr[my_q] = fminf(thr[my_q], from_key(g_key));
      if constexpr (!kWG) {
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
              mma16816(acc[i * 8 + 2 * jp], a[i], b[0], b[1]);
              mma16816(acc[i * 8 + 2 * jp + 1], a[i], b[2], b[3]);
            }
          }
        };
        if (d0 + kBK <= d) {  // block-uniform; one basic block, so the next step's ldmatrix
#pragma unroll                // can be scheduled under this step's mma
          for (int kk = 0; kk < kBK; kk += 16) kstep(kk);
        } else {  // the last slab when d % 64 != 0 (d % 16 == 0)
          for (int kk = 0; kk < kBK && d0 + kk < d; kk += 16) kstep(kk);
        }
      }
      if constexpr (kL2) {  // columns past d are zero-filled
        const uint4* src =
            reinterpret_cast<const uint4*>(xs + stage * (kBN * row_halves) + tid * row_halves);
#pragma unroll
        for (int v = 0; v < kBK / 8; ++v) {
          // Pieces in column order (the sum then matches the mma.sync build's to the bit); in
          // the swizzled wgmma stage, piece v of row tid sits at v ^ (tid % 8), which also
          // spreads 8 neighbouring rows over all banks.
          const uint4 u = src[kWG ? (v ^ (tid & 7)) : v];
          const __half2* h = reinterpret_cast<const __half2*>(&u);
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const float2 f = __half22float2(h[e]);
            xacc += f.x * f.x + f.y * f.y;
          }
        }
      }
      if constexpr (kWG && !kInFlight) wgmma_wait_all(acc);  // before the barrier that frees this stage
      if (++stage == stages) {
        stage = 0;
        phase ^= 1u;
      }
    }
    if constexpr (kInFlight) wgmma_wait_all(acc);  // the tile's last slab, before the epilogue
    if constexpr (kWS) release(stage == 0 ? stages - 1 : stage - 1);
    // The block's barriers from here on: kWS, the consumers' barrier 1.
    auto block_sync = [&]() {
      if constexpr (kWS) consumer_sync();
      else __syncthreads();
    };
    auto block_sync_or = [&](bool v) -> bool {
      if constexpr (kWS) return consumer_sync_or(v);
      else return __syncthreads_or(v) != 0;
    };
    // The epilogue's barriers: kWarpLocal, the warp's own; else the block's.
    auto epi_sync = [&]() {
      if constexpr (kWarpLocal) __syncwarp();
      else block_sync();
    };
    auto epi_sync_or = [&](bool v) -> bool {
      if constexpr (kWarpLocal) {
        __syncwarp();
        return __any_sync(full, v) != 0;
      } else {
        return block_sync_or(v);
      }
    };
    if constexpr (kWarpLocal) __syncwarp();  // this warp's threshold refresh (lanes < 16) is in
    // kWarpLocal: a buffer a tile parity, since a warp may be a tile ahead of another's reads.
    float* xn_t = xn + (kWarpLocal ? kBN * static_cast<int>(((r0 - r_begin) / kBN) & 1) : 0);
    if constexpr (kL2) {
      xn_t[tid] = xacc;  // the previous tile's (same parity: two tiles back) epilogue is done
      block_sync();
    }

    // Epilogue. at(ih, je) is query qloc(ih), tile row rloc(je). Rounds: push survivors,
    // insert the buckets, repeat while a bucket overflowed (only while thresholds are still
    // loose, i.e. in a chunk's first tiles).
    // l2: |x|^2 of this thread's tile rows, and their range for the cheap test
    // (kWG: 64 rows a thread; re-read rather than held in registers, which would spill)
    const volatile float* xnv = xn_t;
    auto xv = [&](int je) { return kL2 ? (kWG ? xnv[rloc(je)] : xn_t[rloc(je)]) : 0.f; };
    float x_min = INFINITY, x_max = 0.f;
    if constexpr (kL2) {
#pragma unroll
      for (int je = 0; je < kRPT; ++je) {
        x_min = fminf(x_min, xv(je));
        x_max = fmaxf(x_max, xv(je));
      }
    }
    // A chunk's first tile: every threshold is still +inf, so each query would push all 256
    // elements through the 8-slot buckets (dozens of rounds). Bound them first: per query,
    // each lane takes the ceil(k/4)-th smallest distinct distance among its kRPT rows (at
    // least ceil(k/4) of its rows are that close); a quad's largest such value has >= k rows
    // at or under it in the quad's rows, so the smallest over the kRowWarps warps sharing the
    // tile's rows bounds the query's k-th distance in the chunk, and anything strictly
    // farther can never be returned. Per-query masks (a global read per element) and k > 64
    // (over 16 per lane) skip this.
    if (r0 == r_begin && mask == nullptr && k <= 64) {
      const int kq = (k + 3) / 4;
      float* bound = bucket_d;  // free: the buckets are empty between epilogues
      if (r0 + kBN > r_end) {  // block-uniform: rows past the chunk's end are spent (NaN)
#pragma unroll
        for (int ih = 0; ih < kQPT; ++ih)
#pragma unroll
          for (int je = 0; je < kRPT; ++je)
            if (r0 + rloc(je) >= r_end) at(ih, je) = NAN;
      }
#pragma unroll
      for (int ih = 0; ih < kQPT; ++ih) {
        const int qi = qloc(ih);
        const float qnv = kL2 ? qn[qi] : 0.f;
        float prev = -INFINITY;
        for (int r = 0; r < kq; ++r) {
          float mn = INFINITY;
#pragma unroll
          for (int je = 0; je < kRPT; ++je) {
            const float v = to_dist<METRIC>(at(ih, je), qnv, xv(je));
            if (v > prev) mn = fminf(mn, v);  // false for NaN
          }
          prev = mn;
        }
        prev = fmaxf(prev, __shfl_xor_sync(full, prev, 1));
        prev = fmaxf(prev, __shfl_xor_sync(full, prev, 2));
        if (c == 0) bound[qi * kBucket + wr] = prev;
      }
      epi_sync();
#pragma unroll
      for (int ih = 0; ih < kQPT; ++ih) {
        const int qi = qloc(ih);
        const float qnv = kL2 ? qn[qi] : 0.f;
        const float* bq = bound + qi * kBucket;
        float b = bq[0];
#pragma unroll
        for (int w = 1; w < kRowWarps; ++w) b = fminf(b, bq[w]);
#pragma unroll
        for (int je = 0; je < kRPT; ++je) {
          float& s = at(ih, je);
          if (to_dist<METRIC>(s, qnv, xv(je)) > b) s = NAN;
        }
      }
      epi_sync();  // the pushes below write bucket_d
    }
    for (;;) {
      float t[kQPT], qv[kQPT];
#pragma unroll
      for (int ih = 0; ih < kQPT; ++ih) {
        t[ih] = thr[qloc(ih)];
        qv[ih] = kL2 ? qn[qloc(ih)] : 0.f;
      }
      // Cheap test first, per query: could any of its kRPT elements pass the threshold? ip and
      // cosine: the distance falls as the score grows, so the largest score decides exactly.
      // l2: |q|^2 + min |x|^2 - 2 max s bounds every distance from below; the fp32 rounding of
      // the exact distances (a few ulps of |q|^2 + |x|^2 >= 2 |s|) is covered by the margin.
      // fmaxf skips NaN (spent elements); all NaN gives NaN, never hot.
      // kGroupedPush: the cheap test's bound for a group whose largest score is mx.
      auto lower = [&](float mx, int ih) -> float {
        if constexpr (kL2) {
          const float scale = qv[ih] + x_max;
          return (qv[ih] + x_min) - 2.f * mx - 4e-6f * scale;
        } else {
          return to_dist<METRIC>(mx, 0.f, 0.f);
        }
      };
      float m[kQPT];  // the largest score of each query among the thread's rows
      float gm[kQPT][kRPT / kGroup];  // kGroupedPush: ... among each kGroup of them
#pragma unroll
      for (int ih = 0; ih < kQPT; ++ih) {
        if constexpr (kGroupedPush) {
#pragma unroll
          for (int grp = 0; grp < kRPT / kGroup; ++grp) {
            float e[kGroup];
#pragma unroll
            for (int i = 0; i < kGroup; ++i) e[i] = at(ih, grp * kGroup + i);
            gm[ih][grp] = tree_max<kGroup>(e);
          }
          m[ih] = tree_max<kRPT / kGroup>(gm[ih]);
        } else {
          m[ih] = NAN;
#pragma unroll
          for (int je = 0; je < kRPT; ++je) m[ih] = fmaxf(m[ih], at(ih, je));
        }
      }
      unsigned hot = 0;
#pragma unroll
      for (int ih = 0; ih < kQPT; ++ih) {
        float lo = to_dist<METRIC>(m[ih], 0.f, 0.f);
        if constexpr (kL2) {  // a lower bound, less a margin over fp32 rounding (see above)
          const float scale = qv[ih] + x_max;
          lo = (qv[ih] + x_min) - 2.f * m[ih] - 4e-6f * scale;
        }
        hot |= lo <= t[ih] ? 1u << ih : 0u;
      }
      bool pushed = false, overflow = false;
      // Element je of query ih (block-local qi): into the query's bucket if within the threshold.
      auto push = [&](int ih, int qi, int je) {
        float& s = at(ih, je);
        const float v = to_dist<METRIC>(s, qv[ih], xv(je));
        if (v <= t[ih]) {  // false for NaN, and for spent elements (NaN)
          const int64_t pos = r0 + rloc(je);
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
      };
      if (hot != 0) {
#pragma unroll
        for (int ih = 0; ih < kQPT; ++ih) {
          if (!((hot >> ih) & 1u)) continue;
          const int qi = qloc(ih);
          if constexpr (kGroupedPush) {
#pragma unroll
            for (int grp = 0; grp < kRPT / kGroup; ++grp) {
              // A group whose largest score fails the bound has no element to push.
              if (!(lower(gm[ih][grp], ih) <= t[ih])) continue;
#pragma unroll
              for (int je = grp * kGroup; je < (grp + 1) * kGroup; ++je) push(ih, qi, je);
            }
          } else {
#pragma unroll
            for (int je = 0; je < kRPT; ++je) push(ih, qi, je);
          }
        }
      }
      if (!epi_sync_or(pushed)) break;  // a full bucket implies a push
      // Warp w inserts the buckets of its queries book_q(b) (b < 16) that received survivors.
      const unsigned busy = __ballot_sync(full, lane < 16 && bucket_n[my_q] > 0);
      for (unsigned rest = busy; rest != 0; rest &= rest - 1) {
        const int qi = book_q(__ffs(rest) - 1);
        const int mcount = min(bucket_n[qi], kBucket);
        if (k <= 32) {
          insert_bucket32(list_d + qi * k, list_r + qi * k, list_n + qi, thr + qi, k,
                          bucket_d + qi * kBucket, bucket_r + qi * kBucket, mcount, gbound + q0 + qi);
        } else {
          for (int e = 0; e < mcount; ++e)
            insert(list_d + qi * k, list_r + qi * k, list_n + qi, thr + qi, k,
                   bucket_d[qi * kBucket + e], bucket_r[qi * kBucket + e]);
          if (lane == 0 && list_n[qi] == k) atomicMin(gbound + q0 + qi, order_key(thr[qi]));
        }
      }
      __syncwarp();
      if (lane < 16 && ((busy >> lane) & 1u)) bucket_n[my_q] = 0;
      if (!epi_sync_or(overflow)) break;
    }
  }
  cp_async_wait<0>();

  // Each list was last changed by the warp that book_q gives it, the one writing it out.
  for (int b = 0; b < kBQ / (kThreads / 32); ++b) {
    const int qi = book_q(b);
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

// The kernel of one metric, multiply and epilogue, for exact_knn_mma.cu's attribute and
// launch calls.
template <bool kWG, bool kInFlight, bool kWS = false, int kEpi = kPlain>
void* kernel_ptr(int metric) {
  if (metric == 0) return reinterpret_cast<void*>(&mma_topk_kernel<0, kWG, kInFlight, kWS, kEpi>);
  if (metric == 1) return reinterpret_cast<void*>(&mma_topk_kernel<1, kWG, kInFlight, kWS, kEpi>);
  return reinterpret_cast<void*>(&mma_topk_kernel<2, kWG, kInFlight, kWS, kEpi>);
}

// Threads a block of the kernel that wgmma mode (0-3, see wgmma_mode) launches.
constexpr int threads_for(int wgmma) { return wgmma == 3 ? kThreads + kProducerThreads : kThreads; }

}  // namespace
}  // namespace affectkit::knn::detail
