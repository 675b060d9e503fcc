// The public entry points of the fused attention: boundary validation, then dispatch to the
// CPU kernels (attention_kernels_cpu.cpp) or the CUDA kernels (cross_attention.cu).
#include <algorithm>
#include <cmath>
#include <string>

#include "../core/dispatch.h"
#include "attention.h"
#include "attention_common.h"

namespace affectkit::attention {
namespace {

constexpr int64_t kMaxDim = 256;

// ----------------------------------------------------------------------------------------
// Boundary validation
// ----------------------------------------------------------------------------------------

std::string str(int64_t x) { return std::to_string(x); }

void check_lengths(const char* arg, const int64_t* lengths, int64_t B, int64_t upper) {
  for (int64_t b = 0; b < B; ++b)
    if (lengths[b] < 0 || lengths[b] > upper)
      throw ValueError(std::string(arg) + ": expected values in [0, " + str(upper) + "], got " +
                       arg + "[" + str(b) + "] = " + str(lengths[b]));
}

void check_cu_seqlens(const char* arg, const int64_t* cu, int64_t B, int64_t total, int64_t max_len,
                      const char* max_arg) {
  if (cu[0] != 0)
    throw ValueError(std::string(arg) + ": expected " + arg + "[0] = 0, got " + str(cu[0]));
  for (int64_t b = 0; b < B; ++b) {
    const int64_t len = cu[b + 1] - cu[b];
    if (len < 0)
      throw ValueError(std::string(arg) + ": expected non-decreasing offsets, got " + arg + "[" +
                       str(b + 1) + "] = " + str(cu[b + 1]) + " < " + str(cu[b]));
    if (len > max_len)
      throw ValueError(std::string(arg) + ": expected sequences of at most " + max_arg + " = " +
                       str(max_len) + " rows, got " + str(len) + " rows in sequence " + str(b));
  }
  if (cu[B] != total)
    throw ValueError(std::string(arg) + ": expected the last offset to equal the number of rows (" +
                     str(total) + "), got " + str(cu[B]));
}

void validate(const char* fn, Device device, DType dtype, const Problem& p, const Mask& mask) {
  check_dims_nonnegative("B", p.B);
  check_dims_nonnegative("H", p.H);
  check_dims_nonnegative("Lq", p.Lq);
  check_dims_nonnegative("Lk", p.Lk);
  if (p.D < 1 || p.D > kMaxDim)
    throw ValueError("q: expected a head dimension D in [1, 256], got " + str(p.D));
  if (p.Dv < 1 || p.Dv > kMaxDim)
    throw ValueError("v: expected a head dimension Dv in [1, 256], got " + str(p.Dv));
  if (!std::isfinite(p.scale))
    throw ValueError("scale: expected a finite number, got " + std::to_string(p.scale));
  if (!(p.dropout_p >= 0.0 && p.dropout_p < 1.0))
    throw ValueError("dropout_p: expected a value in [0, 1), got " + std::to_string(p.dropout_p));
  const DType acc = dtype == DType::Float64 ? DType::Float64 : DType::Float32;
  if (mask.data != nullptr) check_dtype_in("attn_mask", mask.dtype, {DType::Bool, acc});
  if (device == Device::CUDA) {
    check_cuda_compiled(fn);
    check_dtype_in("q", dtype, {DType::Float32, DType::Float64, DType::Float16, DType::BFloat16});
  } else {
    check_dtype_in("q", dtype, {DType::Float32, DType::Float64, DType::BFloat16});
  }
  const bool packed = p.cu_seqlens_q != nullptr || p.cu_seqlens_k != nullptr;
  if (packed) {
    if (p.cu_seqlens_q == nullptr || p.cu_seqlens_k == nullptr)
      throw ValueError("cu_seqlens_q, cu_seqlens_k: expected both offsets in the packed form, got one");
    if (p.q_lengths != nullptr || p.kv_lengths != nullptr)
      throw ValueError("q_lengths, kv_lengths: expected none in the packed form (the offsets give the lengths)");
    check_dims_nonnegative("total_q", p.total_q);
    check_dims_nonnegative("total_k", p.total_k);
    if (device == Device::CPU) {
      check_cu_seqlens("cu_seqlens_q", p.cu_seqlens_q, p.B, p.total_q, p.Lq, "max_seqlen_q");
      check_cu_seqlens("cu_seqlens_k", p.cu_seqlens_k, p.B, p.total_k, p.Lk, "max_seqlen_k");
    }
  } else if (device == Device::CPU) {
    if (p.q_lengths != nullptr) check_lengths("q_lengths", p.q_lengths, p.B, p.Lq);
    if (p.kv_lengths != nullptr) check_lengths("kv_lengths", p.kv_lengths, p.B, p.Lk);
  }
}

int64_t rows_q(const Problem& p) { return p.cu_seqlens_q ? p.total_q : p.B * p.Lq; }
int64_t rows_k(const Problem& p) { return p.cu_seqlens_k ? p.total_k : p.B * p.Lk; }

}  // namespace

uint32_t dropout_threshold(double p) {
  if (!(p > 0.0)) return 0;
  const double t = std::floor(p * 16777216.0);
  return static_cast<uint32_t>(std::min(t, 16777215.0));
}


void attention_forward(Device device, DType dtype, const Problem& p, View q, View k, View v,
                       Mask mask, MutView out, MutView lse, uintptr_t stream) {
  validate("attention_forward", device, dtype, p, mask);
  const int64_t nq = rows_q(p) * p.H, nk = rows_k(p) * p.H;
  check_pointer("q", q.data, nq * p.D);
  check_pointer("k", k.data, nk * p.D);
  check_pointer("v", v.data, nk * p.Dv);
  check_pointer("out", out.data, nq * p.Dv);
  check_pointer("lse", lse.data, nq);
  if (device == Device::CUDA) {
#ifdef AFFECTKIT_WITH_CUDA
    detail::forward_cuda(dtype, p, q, k, v, mask, out, lse, stream);
#endif
    return;
  }
  (void)stream;
  if (dtype == DType::BFloat16) detail::forward_cpu_bf16(p, q, k, v, mask, out, lse);
  else detail::forward_cpu(dtype, p, q, k, v, mask, out, lse);
}

void attention_backward(Device device, DType dtype, const Problem& p, View q, View k, View v,
                        Mask mask, View out, View grad_out, View lse, MutView grad_q,
                        MutView grad_k, MutView grad_v, void* grad_mask, uintptr_t stream) {
  validate("attention_backward", device, dtype, p, mask);
  if (grad_mask != nullptr && (mask.data == nullptr || mask.dtype == DType::Bool))
    throw ValueError(std::string("grad_mask: expected an additive float attn_mask to differentiate, got ") +
                     (mask.data == nullptr ? "no mask" : "a bool mask"));
  const int64_t nq = rows_q(p) * p.H, nk = rows_k(p) * p.H;
  check_pointer("q", q.data, nq * p.D);
  check_pointer("k", k.data, nk * p.D);
  check_pointer("v", v.data, nk * p.Dv);
  check_pointer("out", out.data, nq * p.Dv);
  check_pointer("grad_out", grad_out.data, nq * p.Dv);
  check_pointer("lse", lse.data, nq);
  check_pointer("grad_q", grad_q.data, nq * p.D);
  check_pointer("grad_k", grad_k.data, nk * p.D);
  check_pointer("grad_v", grad_v.data, nk * p.Dv);
  if (device == Device::CUDA) {
#ifdef AFFECTKIT_WITH_CUDA
    detail::backward_cuda(dtype, p, q, k, v, mask, out, grad_out, lse, grad_q, grad_k, grad_v, grad_mask,
                          stream);
#endif
    return;
  }
  (void)stream;
  if (dtype == DType::BFloat16)
    detail::backward_cpu_bf16(p, q, k, v, mask, out, grad_out, lse, grad_q, grad_k, grad_v, grad_mask);
  else
    detail::backward_cpu(dtype, p, q, k, v, mask, out, grad_out, lse, grad_q, grad_k, grad_v, grad_mask);
}

void attention_weights(Device device, DType dtype, const Problem& p, View q, View k, Mask mask,
                       View lse, void* weights, bool average_heads, uintptr_t stream) {
  validate("attention_weights", device, dtype, p, mask);
  const int64_t nq = rows_q(p) * p.H, nk = rows_k(p) * p.H;
  check_pointer("q", q.data, nq * p.D);
  check_pointer("k", k.data, nk * p.D);
  check_pointer("lse", lse.data, nq);
  check_pointer("weights", weights, p.B * (average_heads ? 1 : p.H) * p.Lq * p.Lk);
  if (device == Device::CUDA) {
#ifdef AFFECTKIT_WITH_CUDA
    detail::weights_cuda(dtype, p, q, k, mask, lse, weights, average_heads, stream);
#endif
    return;
  }
  (void)stream;
  if (dtype == DType::BFloat16) detail::weights_cpu_bf16(p, q, k, mask, lse, weights, average_heads);
  else detail::weights_cpu(dtype, p, q, k, mask, lse, weights, average_heads);
}

}  // namespace affectkit::attention
