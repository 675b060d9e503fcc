// Internal: the mma.sync / ldmatrix / cp.async helpers shared by the tensor-core attention
// kernels (cross_attention_tc.cu, the forward; cross_attention_tc_backward_kernels.cuh, the backward).
// Moved verbatim from cross_attention_tc.cu. Each translation unit gets its own internal copy
// (anonymous namespace), so no symbol is shared across objects.
#pragma once

#include <cstdint>
#include <type_traits>

#include "../core/cuda_utils.cuh"

namespace affectkit::attention::detail {
namespace {

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(src) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
__device__ __forceinline__ void cp_async_wait_1() { asm volatile("cp.async.wait_group 1;\n" ::: "memory"); }
// Waits until at most `pending` (0 .. 6; more waits for 6) of this thread's newest groups are in flight.
__device__ __forceinline__ void cp_async_wait_pending(int pending) {
  switch (pending) {
    case 0: asm volatile("cp.async.wait_group 0;\n" ::: "memory"); break;
    case 1: asm volatile("cp.async.wait_group 1;\n" ::: "memory"); break;
    case 2: asm volatile("cp.async.wait_group 2;\n" ::: "memory"); break;
    case 3: asm volatile("cp.async.wait_group 3;\n" ::: "memory"); break;
    case 4: asm volatile("cp.async.wait_group 4;\n" ::: "memory"); break;
    case 5: asm volatile("cp.async.wait_group 5;\n" ::: "memory"); break;
    default: asm volatile("cp.async.wait_group 6;\n" ::: "memory"); break;
  }
}

// Four 8x8 b16 matrices; lanes 8m..8m+7 give the row addresses of matrix m. Without .trans
// lane L receives row L/4, columns 2(L%4), 2(L%4)+1 of each matrix; with .trans, rows
// 2(L%4), 2(L%4)+1 of column L/4.
__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr)
               : "memory");
}
__device__ __forceinline__ void ldsm_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr)
               : "memory");
}

// D (16x8 fp32) += A (16x16, row) * B (16x8, col). With g = lane / 4, c = lane % 4:
// A regs: {(g, 2c..2c+1), (g+8, 2c..), (g, 2c+8..), (g+8, 2c+8..)} as (row, k);
// B regs: {(k 2c..2c+1, n g), (k 2c+8.., n g)}; D: {(g, 2c), (g, 2c+1), (g+8, 2c), (g+8, 2c+1)}.
template <typename T>
__device__ __forceinline__ void mma16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  if constexpr (std::is_same_v<T, __half>) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

// Two floats -> one register of two 16-bit values, `lo` in the low half (the lower index).
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  if constexpr (std::is_same_v<T, __half>) {
    const __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&v);
  } else {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&v);
  }
}

__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

// Copy `nrows` rows of `chunks` 16-byte chunks (row r from src + r * stride) into shared memory
// rows of `sstride` elements; rows >= `valid_rows` and chunks >= `valid_chunks` become zeros.
template <typename T, int kChunks>
__device__ __forceinline__ void stage_rows(T* dst, int sstride, const T* src, int64_t stride, int nrows,
                                           int valid_rows, int valid_chunks) {
  for (int c = threadIdx.x; c < nrows * kChunks; c += blockDim.x) {
    const int r = c / kChunks, ch = c % kChunks;
    T* d = dst + r * sstride + ch * 8;
    if (r < valid_rows && ch < valid_chunks) {
      cp_async16(smem_addr(d), src + static_cast<int64_t>(r) * stride + ch * 8);
    } else {
      *reinterpret_cast<uint4*>(d) = make_uint4(0u, 0u, 0u, 0u);
    }
  }
}

// How rows reach shared memory. kCopy16: 16-byte cp.async pieces (D a multiple of 8, rows
// 16-byte aligned). kCopy4: 4-byte cp.async pairs (D even, rows 4-byte aligned: MulT's D = 6),
// still asynchronous, so the double buffering keeps working. kCopy2: 2-byte loads (odd D or
// odd strides), batched so that eight loads per thread are in flight at once.
enum RowCopy : int { kCopy16 = 0, kCopy4 = 1, kCopy2 = 2 };

__device__ __forceinline__ void cp_async4(uint32_t dst, const void* src) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(dst), "l"(src) : "memory");
}

// fn(r, p) for every row r < nrows and pair p < npairs (npairs <= blockDim.x): the pair index
// takes the low bits of the thread index over a power-of-two span, so there is no integer
// division per element (it cost more than the copies at D = 6).
template <typename Fn>
__device__ __forceinline__ void for_row_pairs(int nrows, int npairs, const Fn& fn) {
  if (npairs <= 0) return;
  int shift = 0;
  while ((1 << shift) < npairs) ++shift;
  const int pair = static_cast<int>(threadIdx.x) & ((1 << shift) - 1);
  if (pair >= npairs) return;
  const int step = static_cast<int>(blockDim.x) >> shift;
  for (int r = static_cast<int>(threadIdx.x) >> shift; r < nrows; r += step) fn(r, pair);
}

// Zeros columns [c0, c1) (both even) of nrows shared-memory rows.
template <typename T>
__device__ __forceinline__ void zero_columns(T* dst, int sstride, int nrows, int c0, int c1) {
  for_row_pairs(nrows, (c1 - c0) / 2, [&](int r, int pair) {
    *reinterpret_cast<uint32_t*>(dst + r * sstride + c0 + 2 * pair) = 0u;
  });
}

// Rows >= valid_rows and columns [valid_cols, fill_cols) become zeros; columns from fill_cols
// on are not written (callers pass at least D rounded up to the 16-column mma k-step, past
// which the mma loops never read). kCopy4 needs valid_cols and fill_cols even, and with
// pads_zeroed leaves columns [valid_cols, fill_cols) alone (the caller zeroed them once).
template <typename T>
__device__ __forceinline__ void stage_rows_small(int copy, T* dst, int sstride, const T* __restrict__ src,
                                                 int64_t stride, int nrows, int valid_rows, int valid_cols,
                                                 int fill_cols, bool pads_zeroed = false) {
  static_assert(sizeof(T) == 2, "fp16 / bf16 only");
  if (copy == kCopy4) {
    for_row_pairs(nrows, valid_cols / 2, [&](int r, int pair) {
      T* const d = dst + r * sstride + 2 * pair;
      if (r < valid_rows) cp_async4(smem_addr(d), src + static_cast<int64_t>(r) * stride + 2 * pair);
      else *reinterpret_cast<uint32_t*>(d) = 0u;
    });
    if (!pads_zeroed) zero_columns(dst, sstride, nrows, valid_cols, fill_cols);
    return;
  }
  constexpr int kBatch = 8;
  const uint16_t* __restrict__ s16 = reinterpret_cast<const uint16_t*>(src);
  uint16_t* const d16 = reinterpret_cast<uint16_t*>(dst);
  const int total = nrows * fill_cols, step = static_cast<int>(blockDim.x);
  for (int base = threadIdx.x; base < total; base += kBatch * step) {
    uint16_t v[kBatch];
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      const int e = base + u * step, r = e / fill_cols, c = e - r * fill_cols;
      v[u] = e < total && r < valid_rows && c < valid_cols ? __ldg(s16 + static_cast<int64_t>(r) * stride + c)
                                                           : uint16_t{0};
    }
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      const int e = base + u * step, r = e / fill_cols, c = e - r * fill_cols;
      if (e < total) d16[r * sstride + c] = v[u];
    }
  }
}

// Any copy mode, zero-filled to kCols: rows >= valid_rows and columns [valid_cols, kCols).
template <typename T, int kCols>
__device__ __forceinline__ void stage_rows_either(int copy, T* dst, int sstride, const T* src, int64_t stride,
                                                  int nrows, int valid_rows, int valid_cols) {
  if (copy == kCopy16) stage_rows<T, kCols / 8>(dst, sstride, src, stride, nrows, valid_rows, valid_cols / 8);
  else stage_rows_small<T>(copy, dst, sstride, src, stride, nrows, valid_rows, valid_cols, kCols);
}

// The copy mode for rows of D elements at ptr with strides (elements) sb, sh, sr.
inline int row_copy_mode(int64_t D, const void* ptr, int64_t sb, int64_t sh, int64_t sr) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(ptr);
  if (D % 8 == 0 && a % 16 == 0 && sb % 8 == 0 && sh % 8 == 0 && sr % 8 == 0) return kCopy16;
  if (D % 2 == 0 && a % 4 == 0 && sb % 2 == 0 && sh % 2 == 0 && sr % 2 == 0) return kCopy4;
  return kCopy2;
}

// Writes outputs col and col + 1 (when col + 1 < ncols) of a row, col < ncols: one 4-byte store
// where `pair` (even widths, 4-byte aligned rows), else two 2-byte stores.
template <typename T>
__device__ __forceinline__ void store_pair(T* row, int col, int ncols, bool pair, float lo, float hi) {
  const uint32_t two = pack2<T>(lo, hi);
  if (pair) {
    *reinterpret_cast<uint32_t*>(row + col) = two;
  } else {
    uint16_t* const r16 = reinterpret_cast<uint16_t*>(row);
    r16[col] = static_cast<uint16_t>(two & 0xffffu);
    if (col + 1 < ncols) r16[col + 1] = static_cast<uint16_t>(two >> 16);
  }
}

}  // namespace
}  // namespace affectkit::attention::detail
