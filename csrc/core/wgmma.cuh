// Hopper warpgroup matrix multiply (wgmma, sm_90a only) helpers shared by the *_sm90a.cu
// kernels: shared-memory descriptors of Hopper's K-major layout with the 128-byte swizzle,
// the proxy fence, and the fence / commit / wait of a warpgroup's asynchronous products. In
// code built for any other target the instructions compile to nothing (and the kernels that
// use them trap before reaching them; see CONTRIBUTING.md).
//
// The layout: 8 rows x 128 bytes make a 1024-byte-aligned group; row r of a group sits at byte
// 128 r, and its 16-byte piece p at piece p ^ (r % 8) (bits 4-6 of the address XOR bits 7-9).
// A K-major operand wider than 128 bytes is stored as column blocks of 128 bytes, each block
// holding all its rows. A descriptor names rows 8-row group by 8-row group (1024 bytes apart)
// and steps 32 bytes along a row per k step (16 halves or 8 floats).
#pragma once

#include <cstdint>
#include <type_traits>

namespace affectkit {

#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
#endif

// Descriptor: start address (16-byte units, bits 0-13), leading offset 1 (unused by this
// layout), 1024 bytes between 8-row groups (bits 32-45), swizzle mode 1 = 128 bytes (62-63).
__device__ __forceinline__ uint64_t sw128_desc(uint32_t addr) {
  return static_cast<uint64_t>((addr & 0x3FFFFu) >> 4) | (uint64_t(1) << 16) |
         (uint64_t(1024 >> 4) << 32) | (uint64_t(1) << 62);
}

// Byte offset of the 16-byte piece p (0..7) of row r in a swizzled 128-byte-row block.
__host__ __device__ constexpr uint32_t sw128_offset(int r, int p) {
  return static_cast<uint32_t>(r) * 128u + static_cast<uint32_t>((p ^ (r & 7)) * 16);
}

// Shared memory written by the generic proxy (cp.async, ordinary stores) and then read by
// wgmma (the async proxy) needs this fence in the writing threads before the barrier.
__device__ __forceinline__ void fence_proxy_async() {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void wgmma_fence() {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void wgmma_commit() {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}
// Pins every register of an accumulator or A fragment at this point of the program: called
// just before wgmma_fence(), it keeps the compiler from sinking their ordinary writes (zeroing,
// rescaling, packing) past the fence, which PTX leaves undefined (a "memory" clobber does not
// cover registers).
template <int J, typename R>
__device__ __forceinline__ void wgmma_fence_operand(R (&d)[J][4]) {
#pragma unroll
  for (int j = 0; j < J; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      if constexpr (std::is_same_v<R, float>) asm volatile("" : "+f"(d[j][e])::"memory");
      else asm volatile("" : "+r"(d[j][e])::"memory");  // uint32_t: packed 16-bit pairs
    }
}

// Waits until at most N of this warpgroup's committed groups are pending. The accumulators of
// those may still be written: read them only after wgmma_wait_all.
template <int N>
__device__ __forceinline__ void wgmma_wait_pending() {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
#endif
}

// Waits for this warpgroup's products; the empty asm on every accumulator keeps the compiler
// from reading them before the wait (they are asm outputs it would otherwise think ready).
template <int J>
__device__ __forceinline__ void wgmma_wait_all(float (&d)[J][4]) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
#endif
#pragma unroll
  for (int j = 0; j < J; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) asm volatile("" : "+f"(d[j][e])::"memory");
}

}  // namespace affectkit
