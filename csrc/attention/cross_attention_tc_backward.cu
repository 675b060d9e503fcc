// Tensor-core backward of the fused attention (fp16 / bf16), FlashAttention-2 style.
//
// Design. Two kernels on the stream, no atomics (each block owns the rows it writes, and every
// sum runs in a fixed order, so the gradients are bit-identical from run to run):
//  1. tc_dq_kernel: a block owns 64 query rows of one (b, h), 16 per warp. It first computes
//     delta_i = dO_i . O_i (fp32) for its rows (written to a scratch (B, H, Lq) buffer for
//     kernel 2), stages Q and dO in shared memory, then walks the key axis in tiles of 64 keys
//     (K and V by 16-byte cp.async, double buffered, exactly like the forward). Per tile and warp:
//       S  (16 x 64) = Q K^T      mma, B fragments by ldmatrix from K rows;
//       P = exp2(S * scale * log2e (+ mask) - lse * log2e) with the forward's key limits and
//           masks (invisible -> 0; rows with lse = +inf see nothing);
//       dP (16 x 64) = dO V^T     mma, B fragments by ldmatrix from V rows;
//       dS = P * (dP - delta)     (fp32; also stored to the dS buffer when gmask != nullptr);
//       dQ (16 x D) += dS K       mma, dS packed to fp16/bf16 straight from the accumulator
//                                 layout as the A fragment, B by ldmatrix.trans from K;
//     and dQ * scale is written in the input dtype (zeros for rows past the q length).
//  2. tc_dkdv_kernel: a block owns 64 keys of one (b, h), 16 per warp, with K and V in shared
//     memory, and walks the query axis in tiles of 64 (32 at D = Dv = 128) query rows (Q, dO,
//     lse and delta; double buffered). It works on the transposed problem so that no
//     fragment ever has to be transposed through shared memory:
//       S^T (16 keys x 64 queries) = K Q^T      A = K rows (ldmatrix), B = Q rows (ldmatrix);
//       P^T = exp2(S^T ... - lse[query]);       dP^T = V dO^T (same pattern);
//       dS^T = P^T * (dP^T - delta[query]);
//       dV (16 x Dv) += P^T dO                  A = P^T from the accumulators, B = dO by
//                                               ldmatrix.trans;
//       dK (16 x D)  += dS^T Q                  A = dS^T, B = Q by ldmatrix.trans;
//     dK * scale and dV are written in the input dtype (zeros for keys past the kv length).
// The kernel, fragment and shared-memory conventions (8-element row padding, D/Dv rounded up
// to 32/64/128 with skipped k-steps/n-tiles, reverse block order for causal dq) are those of
// the forward (cross_attention_tc.cu); the helpers live in mma_helpers.cuh. Accumulation is
// fp32 in registers throughout.
//
// Bounds. Only rows that seq_info says exist are read (query rows below the q length, key rows
// below the kv length; everything else is zero-filled in shared memory), and only rows below
// qrows / krows are written, so packed neighbours are never touched. Every __syncthreads sits
// in block-uniform control flow; warps with nothing to do in a tile skip only their math.
//
// Floors (H100 SXM: ~3.35 TB/s HBM, ~660 TFLOP/s dense fp16/bf16 through mma.sync). Seven
// GEMMs per visible (i, j): dq recomputes S and dP and forms dS K (2D + Dv), dkdv recomputes
// S and dP and forms P^T dO and dS^T Q (2D + 2Dv): FLOPs = 2 * B * H * Lq * Lk_vis * (4 D + 3 Dv)
// (FA2's single-kernel backward needs 5 GEMMs but accumulates dQ with atomics, which the
// determinism contract rules out). Bytes (2 per element): dq reads Q, dO, O, K, V and writes
// dQ; dkdv reads K, V, Q, dO and writes dK, dV; plus lse and delta in fp32.
//   B=64 H=8 33x33 D=64 bf16: ~26 MB -> ~8 us of HBM (less: it is L2-resident right after the
//     forward); 512 blocks of 4 warps per kernel, one tile each, all resident; expected
//     ~6-10 us per kernel, ~15-20 us for the backward (+ a pooled cudaMallocAsync, and the
//     dS memset only with a mask gradient), against ~1 ms for the generic kernels.
//   B=4 H=16 4096^2 D=64: 2 * 64 * 4096^2 * 448 = 0.96 TFLOP -> 1.5 ms at mma.sync peak; with
//     the exp2, masking and fp32 elementwise work and ldmatrix traffic expect ~3-4 ms (40-50% of
//     peak, FA2-class); causal roughly halves it. (SDPA's Hopper kernels use wgmma/TMA.)
// Why: the generic kernels run one warp per row with scalar dot products on the FP32 pipes and
// re-read K/V (dq) or Q/dO (dk/dv) from L2 for every row; here every multiply-add is on the
// tensor cores and each operand tile is read once per 64 rows.
//
// D or Dv not a multiple of 8, or rows not 16-byte aligned: 4-byte cp.async or 2-byte staging
// and 2-byte stores where needed, as in the forward; same math.
// Not taken here (the generic kernels run): float32/float64, dropout > 0, D or Dv above 128,
// devices below sm_80, lengths >= 2^30, Lq or Lk == 0, or AFFECTKIT_ATTENTION_TENSOR_CORES=0
// in the environment (read once, as the forward reads it).
#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>

#include "../core/cuda_utils.cuh"
#include "cross_attention_tc_backward_kernels.cuh"

namespace affectkit::attention::detail {

using tc_backward::aligned4;
using tc_backward::Args;
using tc_backward::device_attr;
using tc_backward::kMaxDevices;

namespace {

int bucket(int64_t d) { return d <= 32 ? 32 : (d <= 64 ? 64 : 128); }

}  // namespace

bool backward_cuda_tensor_cores(DType dtype, const Problem& p, View q, View k, View v, Mask mask, View out,
                                View gout, View lse, MutView gq, MutView gk, MutView gv, void* gmask,
                                uintptr_t stream) {
  static const bool enabled = [] {
    const char* env = std::getenv("AFFECTKIT_ATTENTION_TENSOR_CORES");
    return !(env != nullptr && std::strcmp(env, "0") == 0);
  }();
  if (!enabled) return false;
  if (dtype != DType::Float16 && dtype != DType::BFloat16) return false;
  if (p.dropout_p > 0) return false;
  if (p.B <= 0 || p.H <= 0 || p.Lq <= 0 || p.Lk <= 0) return false;
  if (p.D < 1 || p.D > 128 || p.Dv < 1 || p.Dv > 128) return false;
  if (p.Lq >= (int64_t{1} << 30) || p.Lk >= (int64_t{1} << 30)) return false;
  // The row copy every staged operand allows (16-, 4- or 2-byte pieces; delta's 16-byte loads of
  // out and grad_out go with kCopy16).
  const int copy = std::max({row_copy_mode(p.D, q.data, q.sb, q.sh, q.sr), row_copy_mode(p.D, k.data, k.sb, k.sh, k.sr),
                             row_copy_mode(p.Dv, v.data, v.sb, v.sh, v.sr),
                             row_copy_mode(p.Dv, out.data, out.sb, out.sh, out.sr),
                             row_copy_mode(p.Dv, gout.data, gout.sb, gout.sh, gout.sr)});
  const bool pair = p.D % 2 == 0 && p.Dv % 2 == 0 && aligned4(gq.data, gq.sb, gq.sh, gq.sr) &&
                    aligned4(gk.data, gk.sb, gk.sh, gk.sr) && aligned4(gv.data, gv.sb, gv.sh, gv.sr);
  if (mask.data != nullptr && mask.dtype != DType::Bool && mask.dtype != DType::Float32) return false;
  if (gmask != nullptr && (mask.data == nullptr || mask.dtype != DType::Float32)) return false;
  int dev = 0;
  cuda_check(cudaGetDevice(&dev), "attention_backward: device");
  static std::atomic<int> cc_major[kMaxDevices];
  if (device_attr(cudaDevAttrComputeCapabilityMajor, dev, cc_major) < 8) return false;
  const cudaStream_t st = as_stream(stream);

  float* gm = static_cast<float*>(gmask);
  if (gm != nullptr)  // dS is written only where visible; everything else must read zero
    cuda_check(cudaMemsetAsync(gm, 0, static_cast<size_t>(p.B * p.H * p.Lq * p.Lk) * sizeof(float), st),
               "attention_backward: grad_mask");
  float* delta = nullptr;
  cuda_check(cudaMallocAsync(reinterpret_cast<void**>(&delta), static_cast<size_t>(p.B * p.H * p.Lq) * sizeof(float),
                             st),
             "attention_backward: scratch");
  const Args args{p, q, k, v, mask, out, gout, lse, gq, gk, gv, delta, gm, copy, pair};
  const int db = bucket(p.D), dvb = bucket(p.Dv);
  cudaError_t launch_status = cudaSuccess;
  try {
    if (dtype == DType::Float16) tc_backward::launch_f16(db, dvb, args, dev, st);
    else tc_backward::launch_bf16(db, dvb, args, dev, st);
    launch_status = cudaGetLastError();
  } catch (...) {
    cudaFreeAsync(delta, st);
    throw;
  }
  cuda_check(cudaFreeAsync(delta, st), "attention_backward: scratch");
  cuda_check(launch_status, "attention_backward");
  return true;
}

}  // namespace affectkit::attention::detail
