// On a Hopper GPU, checks the wgmma pieces of the graph_conv wg kernel
// (csrc/graph/graph_conv_wg_sm90a.cu, included whole so that its own offsets, descriptors and
// product() are what runs), so that a failing wg test can be told apart by cause:
//   A1: 8 tf32 m64n64k8 steps on integer operands (exact): K-major tf32 descriptors, the 32-byte
//       k step, the second 128-byte column block, the accumulator (row, column) map;
//   A2: 8 bf16 m64n64k16 steps on raw pairs of integers (exact): which half of a pair is the
//       lower k;
//   A3: product() (bf16 corrections, then tf32) on operands split as the kernel splits them,
//       magnitudes spread over 1e-2 .. 1e2: float32 accuracy against float64;
//   A4, A5: A1 and A2 with the left operand from registers (the kRegsZ phase 2's wgmma "RS"
//       forms): the register fragment layouts, a[i] = L(16 w + g + 8 (i & 1), c + 4 (i >> 1)).
// Run by scripts/gpu_check.sh's probe step; a CPU test builds it for sm_90a.
#ifndef AFFECTKIT_WITH_CUDA
#define AFFECTKIT_WITH_CUDA 1
#endif
#ifndef AFFECTKIT_WITH_SM90A
#define AFFECTKIT_WITH_SM90A 1
#endif
#include "graph/graph_conv_wg_sm90a.cu"

#include <cmath>
#include <cstring>
#include <cstdio>
#include <cstdlib>
#include <vector>

using namespace affectkit;
using namespace affectkit::graph::detail;
using affectkit::graph::Activation;

namespace affectkit::graph::detail {
namespace {

// mode 0: tf32 only from raw words; 1: bf16 only from raw words; 2: product(); 3 and 4: modes 0
// and 1 with the left words in registers.
// lw/rw: 64 x 64 words (row, k) for the big operands; lp/rp: 64 x 64 pair words.
__global__ void probe_kernel(int mode, const uint32_t* lw, const uint32_t* lp, const uint32_t* rw,
                             const uint32_t* rp, float* out) {
  extern __shared__ unsigned char smem_raw[];
  unsigned char* smem = smem_raw + ((1024u - (smem_addr(smem_raw) & 1023u)) & 1023u);
  const uint32_t base = smem_addr(smem);
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, c = lane & 3;
  for (int i = tid; i < 4096; i += 128) {
    const int r = i / 64, k = i % 64;
    *reinterpret_cast<uint32_t*>(smem + 0 * kOperand + elem_offset(r, k)) = lw[i];
    *reinterpret_cast<uint32_t*>(smem + 1 * kOperand + elem_offset(r, k)) = lp[i];
    *reinterpret_cast<uint32_t*>(smem + 2 * kOperand + elem_offset(r, k)) = rw[i];
    *reinterpret_cast<uint32_t*>(smem + 3 * kOperand + elem_offset(r, k)) = rp[i];
  }
  fence_proxy_async();
  __syncthreads();
  float d[8][4];
  const uint32_t lb = base, lpa = base + kOperand, rb = base + 2 * kOperand, rpa = base + 3 * kOperand;
  if (mode == 0) {
    wgmma_fence();
#pragma unroll
    for (int t = 0; t < 8; ++t) wgmma_tf32_m64n64k8(d, sw128_desc(lb + step_offset(t)), sw128_desc(rb + step_offset(t)), t > 0);
    wgmma_commit();
    wgmma_wait_all(d);
  } else if (mode == 1) {
    wgmma_fence();
#pragma unroll
    for (int t = 0; t < 8; ++t) wgmma_bf16_m64n64k16(d, sw128_desc(lpa + step_offset(t)), sw128_desc(rpa + step_offset(t)), t > 0);
    wgmma_commit();
    wgmma_wait_all(d);
  } else if (mode == 3 || mode == 4) {
    uint32_t a[8][4];
#pragma unroll
    for (int t = 0; t < 8; ++t)
#pragma unroll
      for (int i = 0; i < 4; ++i)
        a[t][i] = (mode == 3 ? lw : lp)[(16 * warp + g + 8 * (i & 1)) * 64 + 8 * t + c + 4 * (i >> 1)];
    wgmma_fence_operand(a);
    wgmma_fence();
    if (mode == 3) {
#pragma unroll
      for (int t = 0; t < 8; ++t) wgmma_tf32_m64n64k8_rs(d, a[t], sw128_desc(rb + step_offset(t)), t > 0);
    } else {
#pragma unroll
      for (int t = 0; t < 8; ++t) wgmma_bf16_m64n64k16_rs(d, a[t], sw128_desc(rpa + step_offset(t)), t > 0);
    }
    wgmma_commit();
    wgmma_wait_all(d);
    wgmma_fence_operand(a);
  } else {
    product(d, lb, lpa, rb, rpa);
  }
  for (int j = 0; j < 8; ++j)
    for (int h = 0; h < 2; ++h)
      for (int e = 0; e < 2; ++e) out[(16 * warp + 8 * h + g) * 64 + 8 * j + 2 * c + e] = d[j][2 * h + e];
}

}  // namespace
}  // namespace affectkit::graph::detail

static uint32_t f2u(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
static float u2f(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
static uint32_t bf16_bits(float f) {  // round to nearest even
  const uint32_t b = f2u(f);
  return ((b + 0x7fffu + ((b >> 16) & 1u)) >> 16) & 0xffffu;
}
static uint32_t tf32_round_h(float v) { return (f2u(v) + 0x1000u) & 0xffffe000u; }
static double frand() { return (rand() / (double)RAND_MAX) * 2 - 1; }
// Magnitudes spread over about 1e-2 .. 1e2 (as the tests' large-dynamic-range case).
static double spread() { return frand() * std::exp(frand() * 2 * 2.3); }

#define CK(x) do { cudaError_t e_ = (x); if (e_ != cudaSuccess) { std::printf("wgmma graph probe: CUDA error %s at line %d\n", cudaGetErrorString(e_), __LINE__); std::exit(2); } } while (0)

static int fails = 0;

static void run_probe(int mode, const std::vector<uint32_t>& lw, const std::vector<uint32_t>& lp,
                      const std::vector<uint32_t>& rw, const std::vector<uint32_t>& rp, std::vector<float>& out) {
  uint32_t* dbuf;
  float* dout;
  CK(cudaMalloc(&dbuf, 4 * 4096 * 4));
  CK(cudaMalloc(&dout, 4096 * 4));
  CK(cudaMemcpy(dbuf, lw.data(), 4096 * 4, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(dbuf + 4096, lp.data(), 4096 * 4, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(dbuf + 8192, rw.data(), 4096 * 4, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(dbuf + 12288, rp.data(), 4096 * 4, cudaMemcpyHostToDevice));
  CK(cudaMemset(dout, 0xff, 4096 * 4));
  const int smem = 4 * kOperand + 1024;
  CK(cudaFuncSetAttribute(probe_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  probe_kernel<<<1, 128, smem>>>(mode, dbuf, dbuf + 4096, dbuf + 8192, dbuf + 12288, dout);
  CK(cudaGetLastError());
  CK(cudaDeviceSynchronize());
  out.resize(4096);
  CK(cudaMemcpy(out.data(), dout, 4096 * 4, cudaMemcpyDeviceToHost));
  cudaFree(dbuf);
  cudaFree(dout);
}

int main() {
  srand(1234);
  std::vector<uint32_t> lw(4096), lp(4096), rw(4096), rp(4096);
  std::vector<float> out;
  // A1: TF32 only, integers -3..3 (exact), distinct per (row, k) so a wrong map shows.
  std::vector<double> L(4096), R(4096);
  for (int i = 0; i < 4096; ++i) {
    L[i] = rand() % 7 - 3; R[i] = rand() % 7 - 3;
    lw[i] = f2u((float)L[i]); rw[i] = f2u((float)R[i]); lp[i] = rp[i] = 0;
  }
  for (int mode : {0, 3}) {
    run_probe(mode, lw, lp, rw, rp, out);
    const char* name = mode == 0 ? "A1 tf32-only m64n64k8 x8" : "A4 tf32-only m64n64k8 x8, left from registers";
    int bad = 0;
    for (int m = 0; m < 64; ++m)
      for (int n = 0; n < 64; ++n) {
        double want = 0;
        for (int k = 0; k < 64; ++k) want += L[m * 64 + k] * R[n * 64 + k];
        if (out[m * 64 + n] != want && bad++ < 4) std::printf("  %.2s D(%d,%d) = %g want %g\n", name, m, n, out[m * 64 + n], want);
      }
    std::printf("%s: %s (%d wrong)\n", name, bad ? "FAIL" : "PASS", bad);
    fails += bad != 0;
  }
  // A2: bf16 only, raw pairs (lo = slot 2k, hi = slot 2k+1) of integers.
  std::vector<double> Llo(4096), Lhi(4096), Rlo(4096), Rhi(4096);
  for (int i = 0; i < 4096; ++i) {
    Llo[i] = rand() % 7 - 3; Lhi[i] = rand() % 7 - 3; Rlo[i] = rand() % 7 - 3; Rhi[i] = rand() % 7 - 3;
    lp[i] = bf16_bits((float)Llo[i]) | (bf16_bits((float)Lhi[i]) << 16);
    rp[i] = bf16_bits((float)Rlo[i]) | (bf16_bits((float)Rhi[i]) << 16);
    lw[i] = rw[i] = 0;
  }
  for (int mode : {1, 4}) {
    run_probe(mode, lw, lp, rw, rp, out);
    const char* name = mode == 1 ? "A2 bf16-only m64n64k16 x8" : "A5 bf16-only m64n64k16 x8, left from registers";
    int bad = 0;
    for (int m = 0; m < 64; ++m)
      for (int n = 0; n < 64; ++n) {
        double want = 0;
        for (int k = 0; k < 64; ++k) want += Llo[m * 64 + k] * Rlo[n * 64 + k] + Lhi[m * 64 + k] * Rhi[n * 64 + k];
        if (out[m * 64 + n] != want && bad++ < 4) std::printf("  %.2s D(%d,%d) = %g want %g\n", name, m, n, out[m * 64 + n], want);
      }
    std::printf("%s: %s (%d wrong)\n", name, bad ? "FAIL" : "PASS", bad);
    fails += bad != 0;
  }
  // A3: operands split as the kernel splits them (left (v, small), right (small, v)).
  for (int i = 0; i < 4096; ++i) {
    const float a = (float)spread(), b = (float)spread();
    L[i] = a; R[i] = b;
    lw[i] = tf32_round_h(a); rw[i] = tf32_round_h(b);
    const float sa = a - u2f(lw[i]), sb = b - u2f(rw[i]);
    lp[i] = bf16_bits(a) | (bf16_bits(sa) << 16);
    rp[i] = bf16_bits(sb) | (bf16_bits(b) << 16);
  }
  run_probe(2, lw, lp, rw, rp, out);
  {
    double num = 0, den = 0;
    int nan = 0;
    for (int m = 0; m < 64; ++m)
      for (int n = 0; n < 64; ++n) {
        double want = 0;
        for (int k = 0; k < 64; ++k) want += L[m * 64 + k] * R[n * 64 + k];
        const double got = out[m * 64 + n];
        nan += std::isnan(got);
        num += (got - want) * (got - want);
        den += want * want;
      }
    const double err = std::sqrt(num / den);
    const bool ok = !nan && err < 5e-6;
    std::printf("A3 product() on split operands: relative error %.3g%s: %s\n", err, nan ? " (NaN)" : "",
                ok ? "PASS" : "FAIL");
    fails += !ok;
  }
  std::printf("wgmma graph probe: %s (%d failing checks)\n", fails ? "FAIL" : "PASS", fails);
  return fails ? 1 : 0;
}
