// Pieces the CPU and CUDA attention kernels share, so both make identical choices.
#pragma once

#include <cstdint>

#include "attention.h"

#if defined(__CUDACC__)
#define AFFECTKIT_HD __host__ __device__ __forceinline__
#else
#define AFFECTKIT_HD inline
#endif

namespace affectkit::attention {

// splitmix64's finaliser: a cheap bijective 64-bit mixer.
AFFECTKIT_HD uint64_t mix64(uint64_t z) {
  z ^= z >> 30;
  z *= 0xbf58476d1ce4e5b9ULL;
  z ^= z >> 27;
  z *= 0x94d049bb133111ebULL;
  z ^= z >> 31;
  return z;
}

constexpr uint64_t kGolden = 0x9e3779b97f4a7c15ULL;

// Dropout is a pure function of (seed, b, h, i, j): forward, backward and the weights pass
// recompute the same mask on CPU and CUDA without storing it.
AFFECTKIT_HD uint64_t dropout_row_key(uint64_t seed, int64_t b, int64_t h, int64_t i) {
  uint64_t key = mix64(seed + kGolden * static_cast<uint64_t>(b + 1));
  key = mix64(key + kGolden * static_cast<uint64_t>(h + 1));
  return mix64(key + kGolden * static_cast<uint64_t>(i + 1));
}
AFFECTKIT_HD bool dropout_keep(uint64_t row_key, int64_t j, uint32_t threshold) {
  return static_cast<uint32_t>(mix64(row_key + kGolden * static_cast<uint64_t>(j + 1)) >> 40) >=
         threshold;
}

// Valid lengths, row offsets and the causal offset of sequence b.
struct Seq {
  int64_t q0 = 0, k0 = 0;        // first row in memory (packed form), else 0
  int64_t qlen = 0, klen = 0;    // valid rows
  int64_t qrows = 0, krows = 0;  // rows present in memory (padded: Lq / Lk)
  int64_t offset = 0;            // key j visible to query i iff j <= i + offset (causal)
};

AFFECTKIT_HD int64_t clamp64(int64_t x, int64_t lo, int64_t hi) {
  return x < lo ? lo : (x > hi ? hi : x);
}

// Lengths that come from data are clamped, so a kernel stays in bounds even on bad input.
AFFECTKIT_HD Seq seq_info(const Problem& p, int64_t b) {
  Seq s;
  if (p.cu_seqlens_q != nullptr) {
    s.q0 = clamp64(p.cu_seqlens_q[b], 0, p.total_q);
    s.k0 = clamp64(p.cu_seqlens_k[b], 0, p.total_k);
    s.qlen = clamp64(clamp64(p.cu_seqlens_q[b + 1], 0, p.total_q) - s.q0, 0, p.Lq);
    s.klen = clamp64(clamp64(p.cu_seqlens_k[b + 1], 0, p.total_k) - s.k0, 0, p.Lk);
    s.qrows = s.qlen;
    s.krows = s.klen;
    s.offset = s.klen - s.qlen;
  } else {
    s.qlen = p.q_lengths != nullptr ? clamp64(p.q_lengths[b], 0, p.Lq) : p.Lq;
    s.klen = p.kv_lengths != nullptr ? clamp64(p.kv_lengths[b], 0, p.Lk) : p.Lk;
    s.qrows = p.Lq;
    s.krows = p.Lk;
    s.offset = p.Lk - p.Lq;
  }
  return s;
}

// Keys [0, key_end) can be visible to query row i (the causal and length limits).
AFFECTKIT_HD int64_t key_end(const Problem& p, const Seq& s, int64_t i) {
  if (!p.causal) return s.klen;
  return clamp64(i + s.offset + 1, 0, s.klen);
}

}  // namespace affectkit::attention
