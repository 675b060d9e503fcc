// On a Hopper GPU, measures what fence.proxy.async.shared::cta costs with copies still in
// flight. ptxas compiles it to MEMBAR.ALL.CTA + FENCE.VIEW.ASYNC.S. Our wgmma kernels fence
// after cp.async.wait_group N with N > 0 (k-NN: one slab still loading; attention mode 2: one
// group), so if the MEMBAR also waits for the copies still in flight, their pipelines are one
// stage shallower than written. Every thread of 132 x 256 issues 8 16-byte copies from HBM
// (a 1 GB buffer, so no L2 hits), then times one of:
//   none      nothing (the clock reads alone)
//   fence     fence.proxy.async.shared::cta with the copies in flight
//   wait      cp.async.wait_group 0 (the full latency of the copies)
//   ldg_fence the same fence with 8 16-byte ld.global in flight instead of cp.async
// If "fence" is near "wait" and far above "none", the MEMBAR waits for cp.async in flight.
// Run by scripts/gpu_check.sh's probe step.
#include <cstdint>
#include <cstdio>
#include <cstdlib>

#define CK(x) do { cudaError_t e_ = (x); if (e_ != cudaSuccess) { std::printf("fence probe: CUDA error %s at line %d\n", cudaGetErrorString(e_), __LINE__); std::exit(2); } } while (0)

constexpr int kThreads = 256, kCopies = 8, kReps = 16;

__device__ __forceinline__ long long clock_now() {
  long long c;
  asm volatile("mov.u64 %0, %%clock64;" : "=l"(c)::"memory");
  return c;
}

template <int kMode>
__global__ void __launch_bounds__(kThreads) probe(const uint4* __restrict__ src, size_t n16, unsigned long long* cycles,
                                                  unsigned* sink) {
  __shared__ uint4 buf[kCopies * kThreads];
  const unsigned base = static_cast<unsigned>(__cvta_generic_to_shared(buf + threadIdx.x));
  long long total = 0;
  unsigned acc = 0;
  for (int rep = 0; rep < kReps; ++rep) {
    // A fresh region every repetition and block: HBM, not L2.
    const size_t first = ((static_cast<size_t>(rep) * gridDim.x + blockIdx.x) * kCopies * kThreads + threadIdx.x) % n16;
    uint4 r[kCopies];
    if constexpr (kMode == 3) {
#pragma unroll
      for (int i = 0; i < kCopies; ++i) r[i] = __ldcg(src + (first + i * kThreads) % n16);
    } else {
#pragma unroll
      for (int i = 0; i < kCopies; ++i)
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(base + i * kThreads * 16),
                     "l"(src + (first + i * kThreads) % n16)
                     : "memory");
      asm volatile("cp.async.commit_group;\n" ::: "memory");
    }
    const long long t0 = clock_now();
    if constexpr (kMode == 1 || kMode == 3) asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
    if constexpr (kMode == 2) asm volatile("cp.async.wait_group 0;\n" ::: "memory");
    const long long t1 = clock_now();
    total += t1 - t0;
    if constexpr (kMode == 3) {
#pragma unroll
      for (int i = 0; i < kCopies; ++i) acc += r[i].x ^ r[i].w;
    } else {
      asm volatile("cp.async.wait_group 0;\n" ::: "memory");
      acc += buf[threadIdx.x].x;
    }
    __syncthreads();
  }
  atomicAdd(cycles, static_cast<unsigned long long>(total));
  if (acc == 0x12345678u) *sink = acc;  // keeps the loads
}

int main() {
  const size_t bytes = size_t(1) << 30, n16 = bytes / 16;
  uint4* src = nullptr;
  unsigned long long* cycles = nullptr;
  unsigned* sink = nullptr;
  CK(cudaMalloc(&src, bytes));
  CK(cudaMemset(src, 1, bytes));
  CK(cudaMalloc(&cycles, sizeof(unsigned long long)));
  CK(cudaMalloc(&sink, sizeof(unsigned)));
  int sms = 0;
  CK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  const char* names[] = {"none", "fence", "wait", "ldg_fence"};
  double per[4] = {0, 0, 0, 0};
  for (int round = 0; round < 2; ++round) {  // the first round warms up
    for (int mode = 0; mode < 4; ++mode) {
      CK(cudaMemset(cycles, 0, sizeof(unsigned long long)));
      switch (mode) {
        case 0: probe<0><<<sms, kThreads>>>(src, n16, cycles, sink); break;
        case 1: probe<1><<<sms, kThreads>>>(src, n16, cycles, sink); break;
        case 2: probe<2><<<sms, kThreads>>>(src, n16, cycles, sink); break;
        default: probe<3><<<sms, kThreads>>>(src, n16, cycles, sink); break;
      }
      CK(cudaGetLastError());
      unsigned long long c = 0;
      CK(cudaMemcpy(&c, cycles, sizeof(c), cudaMemcpyDeviceToHost));
      per[mode] = static_cast<double>(c) / (static_cast<double>(sms) * kThreads * kReps);
    }
  }
  for (int mode = 0; mode < 4; ++mode) std::printf("fence probe: %-9s %8.0f cycles\n", names[mode], per[mode]);
  const bool waits = per[1] > 0.5 * per[2] && per[1] > 4 * per[0] + 100;
  std::printf("fence probe: the proxy fence %s for cp.async in flight\n", waits ? "WAITS" : "does not wait");
  return 0;
}
