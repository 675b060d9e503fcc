// Stand-alone check of the k-NN kernel's wgmma helpers (csrc/knn/exact_knn_mma_kernel.cuh) on
// a Hopper GPU: one block of two warpgroups, as in the kernel, multiplies a 128 x K query tile
// by a 256 x K row tile (K = 64, one 128-byte swizzled slab per 64 columns) with
// wgmma_m64n256k16 over descriptors from sw128_desc, and compares every accumulator, read
// through the kernel's (query, row) coordinates, with a float64 product on the host. If the
// k-NN wgmma tests fail, this says whether the layout model itself is wrong.
// Build and run (gpu_check.sh step "probe"):
//   nvcc -std=c++17 -O3 -gencode arch=compute_90a,code=sm_90a -I csrc scripts/probe/wgmma_probe.cu
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "knn/exact_knn_mma_kernel.cuh"

using namespace affectkit;
using namespace affectkit::knn::detail;

constexpr int kQ = 128, kR = 256, kK = 128;  // two 64-column slabs

__global__ void probe_kernel(const __half* q, const __half* x, float* out) {
  extern __shared__ unsigned char smem_raw[];  // 1 KB of slack: align as the kernel does
  unsigned char* smem = smem_raw + ((1024u - (smem_addr(smem_raw) & 1023u)) & 1023u);
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int wq = warp >> 2, wn = warp & 3, g = lane >> 2, c = lane & 3;
  const uint32_t qs = smem_addr(smem), xs = qs + kQ * kK * 2;
  // Ordinary 16-byte stores into the swizzled layout: slab b of row r, piece p.
  for (int i = tid; i < kQ * kK / 8; i += blockDim.x) {
    const int r = i / (kK / 8), p = i % (kK / 8);
    *reinterpret_cast<uint4*>(smem + (p / 8) * (kQ * 128) + sw128_offset(r, p % 8)) =
        reinterpret_cast<const uint4*>(q)[i];
  }
  for (int i = tid; i < kR * kK / 8; i += blockDim.x) {
    const int r = i / (kK / 8), p = i % (kK / 8);
    *reinterpret_cast<uint4*>(smem + kQ * kK * 2 + (p / 8) * (kR * 128) + sw128_offset(r, p % 8)) =
        reinterpret_cast<const uint4*>(x)[i];
  }
  fence_proxy_async();
  __syncthreads();
  float acc[32][4];
  for (int j = 0; j < 32; ++j)
    for (int e = 0; e < 4; ++e) acc[j][e] = 0.f;
  wgmma_fence();
  for (int slab = 0; slab < kK / 64; ++slab) {
    const uint32_t a = qs + slab * (kQ * 128) + wq * 64 * 128, b = xs + slab * (kR * 128);
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) wgmma_m64n256k16(acc, sw128_desc(a + 32 * kk), sw128_desc(b + 32 * kk));
  }
  wgmma_commit();
  wgmma_wait_all(acc);
  for (int ih = 0; ih < 2; ++ih)
    for (int je = 0; je < 64; ++je) {
      const int query = 64 * wq + 16 * wn + 8 * ih + g, row = 8 * (je >> 1) + 2 * c + (je & 1);
      out[query * kR + row] = acc[je >> 1][2 * ih + (je & 1)];
    }
}

int main() {
  std::vector<__half> q(kQ * kK), x(kR * kK);
  std::vector<double> qf(q.size()), xf(x.size());
  srand(12345);
  for (size_t i = 0; i < q.size(); ++i) q[i] = __float2half(qf[i] = rand() % 7 - 3);
  for (size_t i = 0; i < x.size(); ++i) x[i] = __float2half(xf[i] = rand() % 7 - 3);
  __half *dq, *dx;
  float* dout;
  cudaMalloc(&dq, q.size() * 2);
  cudaMalloc(&dx, x.size() * 2);
  cudaMalloc(&dout, kQ * kR * 4);
  cudaMemcpy(dq, q.data(), q.size() * 2, cudaMemcpyHostToDevice);
  cudaMemcpy(dx, x.data(), x.size() * 2, cudaMemcpyHostToDevice);
  cudaMemset(dout, 0xff, kQ * kR * 4);  // NaN: unwritten outputs show
  const int smem = kQ * kK * 2 + kR * kK * 2 + 1024;
  cudaFuncSetAttribute(probe_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  probe_kernel<<<1, 256, smem>>>(dq, dx, dout);
  const cudaError_t err = cudaDeviceSynchronize();
  if (err != cudaSuccess) {
    std::printf("wgmma probe: CUDA error %s\n", cudaGetErrorString(err));
    return 2;
  }
  std::vector<float> out(kQ * kR);
  cudaMemcpy(out.data(), dout, out.size() * 4, cudaMemcpyDeviceToHost);
  int bad = 0;
  for (int i = 0; i < kQ; ++i)
    for (int j = 0; j < kR; ++j) {
      double want = 0;
      for (int t = 0; t < kK; ++t) want += qf[i * kK + t] * xf[j * kK + t];
      const float got = out[i * kR + j];
      if (!(got == want) && bad++ < 5) std::printf("  D(%d, %d) = %g, want %g\n", i, j, got, want);
    }
  std::printf("wgmma probe: %s (%d of %d wrong)\n", bad ? "FAIL" : "PASS", bad, kQ * kR);
  return bad ? 1 : 0;
}
