// bfloat16 on the CPU: the inputs are widened to dense float32 copies once (a 16-bit shift
// per element, OpenMP over heads), the float32 kernels run on them (float32 accumulation
// throughout), and the outputs are rounded back to bfloat16 (round to nearest even). The
// copies cost one pass over q, k, v (and out, grad_out), small next to the O(Lq Lk D) work.
// The float32 buffers are kept per calling thread and reused (grow-only): a fresh allocation
// of several megabytes per call page-faulted on every 4 KiB (measured: 7.5 of 11 ms at
// B=64 H=8 33x33 D=64). They hold the largest call's staged tensors until the thread exits.
#include <algorithm>
#include <cstring>
#include <vector>

#include "attention.h"

namespace affectkit::attention::detail {
namespace {

inline float widen_one(uint16_t x) {
  const uint32_t bits = static_cast<uint32_t>(x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

inline uint16_t narrow_one(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof(bits));
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40u);  // quiet NaN
  return static_cast<uint16_t>((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

// The rows a View addresses: (nb, nh, nr) rows of F features. Packed: nb = 1 and the rows
// are the total rows (the kernels add cu_seqlens to row indices, with sb = 0).
struct Rows {
  int64_t nb, nh, nr, F;
  bool packed;
};
Rows q_rows(const Problem& p, int64_t F) {
  const bool packed = p.cu_seqlens_q != nullptr;
  return {packed ? 1 : p.B, p.H, packed ? p.total_q : p.Lq, F, packed};
}
Rows k_rows(const Problem& p, int64_t F) {
  const bool packed = p.cu_seqlens_k != nullptr;
  return {packed ? 1 : p.B, p.H, packed ? p.total_k : p.Lk, F, packed};
}

// Staging buffer `slot` of the calling thread, at least n floats.
constexpr int kSlots = 8;  // the backward stages 5 inputs and 3 outputs
float* scratch(int slot, int64_t n) {
  static thread_local std::vector<float> pool[kSlots];
  std::vector<float>& buf = pool[slot];
  if (static_cast<int64_t>(buf.size()) < n) buf.resize(std::max<int64_t>(n, 1));
  return buf.data();
}

// A dense float32 tensor laid out (nb, nh, nr, F), with the views the kernels take.
struct Dense {
  float* data;
  Rows r;
  Dense(int slot, const Rows& rows) : data(scratch(slot, rows.nb * rows.nh * rows.nr * rows.F)), r(rows) {}
  int64_t sb() const { return r.packed ? 0 : r.nh * r.nr * r.F; }
  View view() const { return View{data, sb(), r.nr * r.F, r.F}; }
  MutView mut() { return MutView{data, sb(), r.nr * r.F, r.F}; }
  float* row(int64_t b, int64_t h, int64_t i) const { return data + ((b * r.nh + h) * r.nr + i) * r.F; }
};

Dense widen(int slot, const View& t, const Rows& rows) {
  Dense d(slot, rows);
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t b = 0; b < rows.nb; ++b)
    for (int64_t h = 0; h < rows.nh; ++h)
      for (int64_t i = 0; i < rows.nr; ++i) {
        const uint16_t* src = static_cast<const uint16_t*>(t.data) + b * t.sb + h * t.sh + i * t.sr;
        float* dst = d.row(b, h, i);
        for (int64_t f = 0; f < rows.F; ++f) dst[f] = widen_one(src[f]);
      }
  return d;
}

void narrow(const Dense& d, const MutView& t) {
  const Rows& rows = d.r;
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t b = 0; b < rows.nb; ++b)
    for (int64_t h = 0; h < rows.nh; ++h)
      for (int64_t i = 0; i < rows.nr; ++i) {
        const float* src = d.row(b, h, i);
        uint16_t* dst = static_cast<uint16_t*>(t.data) + b * t.sb + h * t.sh + i * t.sr;
        for (int64_t f = 0; f < rows.F; ++f) dst[f] = narrow_one(src[f]);
      }
}

}  // namespace

void forward_cpu_bf16(const Problem& p, View q, View k, View v, Mask mask, MutView out, MutView lse) {
  const Dense q32 = widen(0, q, q_rows(p, p.D)), k32 = widen(1, k, k_rows(p, p.D));
  const Dense v32 = widen(2, v, k_rows(p, p.Dv));
  Dense o32(3, q_rows(p, p.Dv));
  forward_cpu(DType::Float32, p, q32.view(), k32.view(), v32.view(), mask, o32.mut(), lse);
  narrow(o32, out);
}

void backward_cpu_bf16(const Problem& p, View q, View k, View v, Mask mask, View out, View gout, View lse,
                       MutView gq, MutView gk, MutView gv, void* gmask) {
  const Dense q32 = widen(0, q, q_rows(p, p.D)), k32 = widen(1, k, k_rows(p, p.D));
  const Dense v32 = widen(2, v, k_rows(p, p.Dv)), o32 = widen(3, out, q_rows(p, p.Dv));
  const Dense g32 = widen(4, gout, q_rows(p, p.Dv));
  Dense gq32(5, q_rows(p, p.D)), gk32(6, k_rows(p, p.D)), gv32(7, k_rows(p, p.Dv));
  backward_cpu(DType::Float32, p, q32.view(), k32.view(), v32.view(), mask, o32.view(), g32.view(), lse,
               gq32.mut(), gk32.mut(), gv32.mut(), gmask);
  narrow(gq32, gq);
  narrow(gk32, gk);
  narrow(gv32, gv);
}

void weights_cpu_bf16(const Problem& p, View q, View k, Mask mask, View lse, void* w, bool average_heads) {
  const Dense q32 = widen(0, q, q_rows(p, p.D)), k32 = widen(1, k, k_rows(p, p.D));
  const int64_t n = p.B * (average_heads ? 1 : p.H) * p.Lq * p.Lk;
  float* w32 = scratch(2, n);
  weights_cpu(DType::Float32, p, q32.view(), k32.view(), mask, lse, w32, average_heads);
  uint16_t* dst = static_cast<uint16_t*>(w);
#pragma omp parallel for schedule(static)
  for (int64_t e = 0; e < n; ++e) dst[e] = narrow_one(w32[e]);
}

}  // namespace affectkit::attention::detail
