// Stand-alone check, on a Hopper GPU, of the two operand layouts that an attention forward on
// wgmma needs beyond those the k-NN probe (wgmma_probe.cu) checks. Written for a future
// FlashAttention-3-style forward (#3: L = 4096, D = 128 is at 0.43x of SDPA with mma.sync),
// before any such kernel exists:
//  1. P from registers. S = Q K^T (64 x 64, bf16, both operands K-major from 128-byte-swizzled
//     shared memory, as in the k-NN kernel) is rounded to bf16 and repacked from the
//     accumulator layout into the A fragments of the next product: keys 16 t .. 16 t + 15 are
//     accumulator chunks 2 t and 2 t + 1 (the mma.sync C -> A reuse, per warp).
//  2. V as an N-major B operand. O = P V (64 x 128) with V stored as key rows in 128-byte
//     column blocks of 64 d each (exactly like K), read with imm-trans-b = 1. Which descriptor
//     offsets that layout needs is what the probe finds out: it runs each candidate (leading
//     offset = the column blocks' stride and stride offset = the 8-key groups', or the
//     reverse) and prints which reproduces the float64 product, for d < 64 and d >= 64 apart.
// Inputs are small integers (Q, K in {-1, 0, 1}, V in [-3, 3]), so every product is exact and
// "right" means equal. Build and run (gpu_check.sh step "probe"):
//   nvcc -std=c++17 -O3 -gencode arch=compute_90a,code=sm_90a -I csrc scripts/probe/wgmma_attention_probe.cu
#include <cuda_bf16.h>

#include <cstdio>
#include <cstdlib>
#include <vector>

#include "core/wgmma.cuh"

using namespace affectkit;

constexpr int kRows = 64, kKeys = 64, kD = 128;  // one warpgroup: 64 query rows
constexpr int kBlock = 64 * 128;                 // bytes of one 128-byte column block of 64 rows

__device__ __forceinline__ uint64_t make_desc(uint32_t addr, uint32_t leading, uint32_t stride) {
  return static_cast<uint64_t>((addr & 0x3FFFFu) >> 4) | (static_cast<uint64_t>((leading >> 4) & 0x3FFFu) << 16) |
         (static_cast<uint64_t>((stride >> 4) & 0x3FFFu) << 32) | (uint64_t(1) << 62);
}

// D (64 x 64) += A (64 x 16) B^T (B: 64 x 16), bf16, both from shared memory, K-major.
__device__ __forceinline__ void wgmma_ss_m64n64k16(float (&d)[8][4], uint64_t desc_a, uint64_t desc_b) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, %32, %33, p, 1, 1, 0, 0;\n}\n"
      : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]), "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]), "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3])
      : "l"(desc_a), "l"(desc_b), "n"(1));
#endif
}

// D (64 x 128) += A (64 x 16, registers) B (16 x 128, shared memory, N-major: imm-trans-b = 1).
__device__ __forceinline__ void wgmma_rs_m64n128k16_tb(float (&d)[16][4], const uint32_t (&a)[4], uint64_t desc_b) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, {%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"
      : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]), "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]), "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3]), "+f"(d[8][0]), "+f"(d[8][1]), "+f"(d[8][2]), "+f"(d[8][3]), "+f"(d[9][0]), "+f"(d[9][1]), "+f"(d[9][2]), "+f"(d[9][3]), "+f"(d[10][0]), "+f"(d[10][1]), "+f"(d[10][2]), "+f"(d[10][3]), "+f"(d[11][0]), "+f"(d[11][1]), "+f"(d[11][2]), "+f"(d[11][3]), "+f"(d[12][0]), "+f"(d[12][1]), "+f"(d[12][2]), "+f"(d[12][3]), "+f"(d[13][0]), "+f"(d[13][1]), "+f"(d[13][2]), "+f"(d[13][3]), "+f"(d[14][0]), "+f"(d[14][1]), "+f"(d[14][2]), "+f"(d[14][3]), "+f"(d[15][0]), "+f"(d[15][1]), "+f"(d[15][2]), "+f"(d[15][3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "n"(1));
#endif
}

__device__ __forceinline__ uint32_t pack_bf16x2(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);  // .x (low half) = lo
  return *reinterpret_cast<const uint32_t*>(&v);
}

// Row r, column col of a (rows x 128) bf16 operand stored as 128-byte swizzled column blocks.
__device__ __forceinline__ uint32_t element_offset(int r, int col) {
  return (col / 64) * kBlock + sw128_offset(r, (col % 64) / 8) + (col % 8) * 2;
}

__global__ void probe_kernel(const __nv_bfloat16* q, const __nv_bfloat16* k, const __nv_bfloat16* v, float* out,
                             uint32_t leading, uint32_t stride) {
  extern __shared__ unsigned char smem_raw[];
  unsigned char* smem = smem_raw + ((1024u - (smem_addr(smem_raw) & 1023u)) & 1023u);
  const int tid = threadIdx.x, w = tid >> 5, g = (tid & 31) >> 2, c = tid & 3;
  const __nv_bfloat16* src[3] = {q, k, v};
  for (int m = 0; m < 3; ++m)
    for (int i = tid; i < kRows * kD; i += blockDim.x)
      *reinterpret_cast<__nv_bfloat16*>(smem + m * 2 * kBlock + element_offset(i / kD, i % kD)) = src[m][i];
  fence_proxy_async();
  __syncthreads();
  const uint32_t qs = smem_addr(smem), ks = qs + 2 * kBlock, vs = qs + 4 * kBlock;

  float s[8][4] = {};
  wgmma_fence_operand(s);
  wgmma_fence();
  for (int b = 0; b < 2; ++b)
#pragma unroll
    for (int kk = 0; kk < 4; ++kk)
      wgmma_ss_m64n64k16(s, sw128_desc(qs + b * kBlock + 32 * kk), sw128_desc(ks + b * kBlock + 32 * kk));
  wgmma_commit();
  wgmma_wait_all(s);

  // O and every A fragment are written before the fence (PTX: register writes that a wgmma
  // reads must precede wgmma.fence), and pinned there.
  float o[16][4] = {};
  uint32_t a[kKeys / 16][4];
#pragma unroll
  for (int t = 0; t < kKeys / 16; ++t) {
    a[t][0] = pack_bf16x2(s[2 * t][0], s[2 * t][1]);
    a[t][1] = pack_bf16x2(s[2 * t][2], s[2 * t][3]);
    a[t][2] = pack_bf16x2(s[2 * t + 1][0], s[2 * t + 1][1]);
    a[t][3] = pack_bf16x2(s[2 * t + 1][2], s[2 * t + 1][3]);
  }
  wgmma_fence_operand(o);
  wgmma_fence_operand(a);
  wgmma_fence();
#pragma unroll
  for (int t = 0; t < kKeys / 16; ++t) wgmma_rs_m64n128k16_tb(o, a[t], make_desc(vs + t * 16 * 128, leading, stride));
  wgmma_commit();
  wgmma_wait_all(o);
  for (int j = 0; j < 16; ++j)
    for (int h = 0; h < 2; ++h)
      for (int e = 0; e < 2; ++e) out[(16 * w + 8 * h + g) * kD + 8 * j + 2 * c + e] = o[j][2 * h + e];
}

int main() {
  std::vector<__nv_bfloat16> q(kRows * kD), k(kKeys * kD), v(kKeys * kD);
  std::vector<double> qf(q.size()), kf(k.size()), vf(v.size());
  srand(2026);
  for (size_t i = 0; i < q.size(); ++i) q[i] = __float2bfloat16(static_cast<float>(qf[i] = rand() % 3 - 1));
  for (size_t i = 0; i < k.size(); ++i) k[i] = __float2bfloat16(static_cast<float>(kf[i] = rand() % 3 - 1));
  for (size_t i = 0; i < v.size(); ++i) v[i] = __float2bfloat16(static_cast<float>(vf[i] = rand() % 7 - 3));
  std::vector<double> want(kRows * kD, 0.0);  // (Q K^T) V: |S| <= 128, so S is exact in bf16
  for (int i = 0; i < kRows; ++i)
    for (int j = 0; j < kKeys; ++j) {
      double sij = 0;
      for (int t = 0; t < kD; ++t) sij += qf[i * kD + t] * kf[j * kD + t];
      for (int t = 0; t < kD; ++t) want[i * kD + t] += sij * vf[j * kD + t];
    }
  __nv_bfloat16 *dq, *dk, *dv;
  float* dout;
  cudaMalloc(&dq, q.size() * 2);
  cudaMalloc(&dk, k.size() * 2);
  cudaMalloc(&dv, v.size() * 2);
  cudaMalloc(&dout, want.size() * 4);
  cudaMemcpy(dq, q.data(), q.size() * 2, cudaMemcpyHostToDevice);
  cudaMemcpy(dk, k.data(), k.size() * 2, cudaMemcpyHostToDevice);
  cudaMemcpy(dv, v.data(), v.size() * 2, cudaMemcpyHostToDevice);
  const int smem = 6 * kBlock + 1024;
  cudaFuncSetAttribute(probe_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  struct Candidate { const char* name; uint32_t leading, stride; };
  const Candidate candidates[] = {{"leading = column-block stride, stride = 8-key group", kBlock, 1024},
                                  {"leading = 8-key group, stride = column-block stride", 1024, kBlock}};
  int passed = 0;
  for (const Candidate& cand : candidates) {
    cudaMemset(dout, 0xff, want.size() * 4);  // NaN: unwritten outputs show
    probe_kernel<<<1, 128, smem>>>(dq, dk, dv, dout, cand.leading, cand.stride);
    cudaError_t err = cudaGetLastError();  // a launch refused (shared memory, no sm_90a) shows here
    if (err == cudaSuccess) err = cudaDeviceSynchronize();
    if (err != cudaSuccess) {
      std::printf("wgmma attention probe: CUDA error %s (%s)\n", cudaGetErrorString(err), cand.name);
      return 2;
    }
    std::vector<float> out(want.size());
    cudaMemcpy(out.data(), dout, out.size() * 4, cudaMemcpyDeviceToHost);
    int bad[2] = {0, 0};
    for (int i = 0; i < kRows; ++i)
      for (int t = 0; t < kD; ++t)
        if (!(out[i * kD + t] == want[i * kD + t])) {
          if (bad[0] + bad[1] < 3) std::printf("  O(%d, %d) = %g, want %g\n", i, t, out[i * kD + t], want[i * kD + t]);
          ++bad[t / 64];
        }
    const bool ok = bad[0] == 0 && bad[1] == 0;
    passed += ok;
    std::printf("wgmma attention probe: %s: %s (wrong: %d of d < 64, %d of d >= 64)\n", cand.name,
                ok ? "PASS" : "FAIL", bad[0], bad[1]);
  }
  std::printf("wgmma attention probe: %s\n", passed ? "a layout reproduces (Q K^T) V" : "FAIL: no candidate layout");
  return passed ? 0 : 1;
}
