// CPU path of the fused attention, and the device dispatch with boundary validation.
//
// Forward: one task per (b, h, tile of kBQ query rows); online softmax over tiles of kBK
// keys. Scores S = Q K^T and the update O += P V are small blocked matmuls (gemm_acc) that
// the compiler vectorises for each instruction set (AFFECTKIT_SIMD_CLONES).
// Backward: one task per (b, h), which owns dq, dk and dv of that head outright, so the
// summation order is fixed and the gradients are bit-identical run to run (no atomics).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "../core/dispatch.h"
#include "attention.h"
#include "attention_common.h"

namespace affectkit::attention {
namespace {

constexpr int kBQ = 64;    // query rows per forward task
constexpr int kBK = 32;    // keys per tile
constexpr int kCW = 16;    // micro-kernel column block (elements)
constexpr int kMaxDim = 256;

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// C[m, 0:N] (+)= sum_k A(m, k) * B[k, 0:N] for m < M, with A(m, k) = A[m*sam + k*sak].
// N is a multiple of kCW; B and C rows are contiguous with leading dims ldb, ldc. Rows are
// blocked by 4 and columns by kCW so the accumulators stay in vector registers.
template <typename T>
AFFECTKIT_SIMD_CLONES void gemm_acc(int64_t M, int64_t N, int64_t K, const T* A, int64_t sam,
                                    int64_t sak, const T* __restrict B, int64_t ldb,
                                    T* __restrict C, int64_t ldc, bool accumulate) {
  if (M <= 0) return;
  for (int64_t m0 = 0; m0 < M; m0 += 4) {
    const T* a0 = A + std::min(m0 + 0, M - 1) * sam;
    const T* a1 = A + std::min(m0 + 1, M - 1) * sam;
    const T* a2 = A + std::min(m0 + 2, M - 1) * sam;
    const T* a3 = A + std::min(m0 + 3, M - 1) * sam;
    const int64_t rows = std::min<int64_t>(4, M - m0);
    for (int64_t n0 = 0; n0 < N; n0 += kCW) {
      T c0[kCW] = {}, c1[kCW] = {}, c2[kCW] = {}, c3[kCW] = {};
      for (int64_t k = 0; k < K; ++k) {
        const T* b = B + k * ldb + n0;
        const T x0 = a0[k * sak], x1 = a1[k * sak], x2 = a2[k * sak], x3 = a3[k * sak];
        for (int c = 0; c < kCW; ++c) {
          c0[c] += x0 * b[c];
          c1[c] += x1 * b[c];
          c2[c] += x2 * b[c];
          c3[c] += x3 * b[c];
        }
      }
      T* acc[4] = {c0, c1, c2, c3};
      for (int64_t r = 0; r < rows; ++r) {
        T* dst = C + (m0 + r) * ldc + n0;
        if (accumulate)
          for (int c = 0; c < kCW; ++c) dst[c] += acc[r][c];
        else
          for (int c = 0; c < kCW; ++c) dst[c] = acc[r][c];
      }
    }
  }
}

// exp for float32 (Cephes-style polynomial, ~1 ulp), written so loops over it vectorise;
// exactly 0 below the float range, which includes -inf (masked scores).
inline float exp_fast(float x) {
  const float lo = -87.3365478515625f, hi = 88.3762626647949f;
  const float xc = std::min(std::max(x, lo), hi);
  const float magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const float n = (xc * 1.44269504088896341f + magic) - magic;
  float r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float pow2;
  std::memcpy(&pow2, &bits, sizeof(pow2));
  return x < lo ? 0.0f : y * pow2;
}
inline double exp_fast(double x) { return std::exp(x); }

template <typename T>
constexpr T neg_inf() { return -std::numeric_limits<T>::infinity(); }

// The mask row of query i (absolute key index 0), or null without a mask.
const void* mask_row(const Mask& mask, int64_t b, int64_t h, int64_t i) {
  if (mask.data == nullptr) return nullptr;
  const int64_t off = b * mask.sb + h * mask.sh + i * mask.si;
  if (mask.dtype == DType::Bool) return static_cast<const uint8_t*>(mask.data) + off;
  if (mask.dtype == DType::Float64) return static_cast<const double*>(mask.data) + off;
  return static_cast<const float*>(mask.data) + off;
}

// Turn raw dot products s[0:kBK] of one query row against keys [j0, j0 + kBK) into scaled,
// masked scores: keys at or past `jlim` (absolute) and masked keys become -inf.
template <typename T>
AFFECTKIT_SIMD_CLONES void finish_scores(T* __restrict s, int64_t j0, int64_t jlim, T scale,
                                         const Mask& mask, const void* mrow) {
  const int64_t valid = clamp64(jlim - j0, 0, kBK);
  for (int j = 0; j < kBK; ++j) s[j] = j < valid ? s[j] * scale : neg_inf<T>();
  if (mrow == nullptr) return;
  const int64_t sj = mask.sj;
  if (mask.dtype == DType::Bool) {
    const uint8_t* m = static_cast<const uint8_t*>(mrow) + j0 * sj;
    for (int64_t j = 0; j < valid; ++j)
      if (!m[j * sj]) s[j] = neg_inf<T>();
  } else if (mask.dtype == DType::Float64) {
    const double* m = static_cast<const double*>(mrow) + j0 * sj;
    for (int64_t j = 0; j < valid; ++j) s[j] += static_cast<T>(m[j * sj]);
  } else {
    const float* m = static_cast<const float*>(mrow) + j0 * sj;
    for (int64_t j = 0; j < valid; ++j) s[j] += static_cast<T>(m[j * sj]);
  }
}

// p[j] = exp(s[j] - shift) (0 where s is -inf); returns the sum.
template <typename T>
AFFECTKIT_SIMD_CLONES T exp_row(T* __restrict s, T shift) {
  for (int j = 0; j < kBK; ++j) s[j] = exp_fast(s[j] - shift);
  T part[kCW] = {};  // lane-wise partial sums: a reduction the compiler can vectorise
  for (int j0 = 0; j0 < kBK; j0 += kCW)
    for (int c = 0; c < kCW; ++c) part[c] += s[j0 + c];
  T sum = 0;
  for (int c = 0; c < kCW; ++c) sum += part[c];
  return sum;
}

template <typename T>
AFFECTKIT_SIMD_CLONES T max_row(const T* __restrict s) {
  T m = neg_inf<T>();
  for (int j = 0; j < kBK; ++j) m = std::max(m, s[j]);
  return m;
}

// Multiply p[j] by the dropout factor of key j0 + j (0 or 1 / (1 - p)).
template <typename T>
void apply_dropout(T* p, int64_t nk, int64_t j0, uint64_t row_key, uint32_t threshold, T inv_keep) {
  for (int64_t j = 0; j < nk; ++j)
    p[j] = dropout_keep(row_key, j0 + j, threshold) ? p[j] * inv_keep : T(0);
}

template <typename T>
const T* row_ptr(const View& t, int64_t b, int64_t h, int64_t row) {
  return static_cast<const T*>(t.data) + b * t.sb + h * t.sh + row * t.sr;
}
template <typename T>
T* row_ptr(const MutView& t, int64_t b, int64_t h, int64_t row) {
  return static_cast<T*>(t.data) + b * t.sb + h * t.sh + row * t.sr;
}

// Kt[d, j] = K[j0 + j, d] (D x kBK), zero for j >= nk.
template <typename T>
void pack_transposed(const View& t, int64_t b, int64_t h, int64_t row0, int64_t nk, int64_t D,
                     T* dst) {
  for (int64_t d = 0; d < D; ++d) std::fill(dst + d * kBK + nk, dst + (d + 1) * kBK, T(0));
  for (int64_t j = 0; j < nk; ++j) {
    const T* src = row_ptr<T>(t, b, h, row0 + j);
    for (int64_t d = 0; d < D; ++d) dst[d * kBK + j] = src[d];
  }
}

// dst[r, 0:ld] = rows [row0, row0 + n) of t, zero-padded to ld columns and to `rows` rows.
template <typename T>
void pack_rows(const View& t, int64_t b, int64_t h, int64_t row0, int64_t n, int64_t rows,
               int64_t width, int64_t ld, T* dst) {
  for (int64_t r = 0; r < rows; ++r) {
    T* out = dst + r * ld;
    if (r < n) {
      const T* src = row_ptr<T>(t, b, h, row0 + r);
      std::copy(src, src + width, out);
      std::fill(out + width, out + ld, T(0));
    } else {
      std::fill(out, out + ld, T(0));
    }
  }
}

template <typename T>
void forward(const Problem& p, View q, View k, View v, Mask mask, MutView out, MutView lse) {
  const int64_t D = p.D, Dv = p.Dv, Dvp = round_up(Dv, kCW);
  const int64_t qtiles = (p.Lq + kBQ - 1) / kBQ;
  const T scale = static_cast<T>(p.scale);
  const uint32_t threshold = dropout_threshold(p.dropout_p);
  const T inv_keep = p.dropout_p > 0 ? static_cast<T>(1.0 / (1.0 - p.dropout_p)) : T(1);
#pragma omp parallel
  {
    std::vector<T> kt(kMaxDim * kBK), vp(kBK * Dvp), s(kBQ * kBK), o(kBQ * Dvp);
    T mrun[kBQ], lrun[kBQ];
#pragma omp for collapse(3) schedule(dynamic, 1)
    for (int64_t b = 0; b < p.B; ++b) {
      for (int64_t h = 0; h < p.H; ++h) {
        for (int64_t qt = 0; qt < qtiles; ++qt) {
          const Seq sq = seq_info(p, b);
          const int64_t i0 = qt * kBQ;
          const int64_t present = clamp64(sq.qrows - i0, 0, kBQ);
          const int64_t mv = clamp64(sq.qlen - i0, 0, kBQ);
          if (present == 0) continue;
          const int64_t kend = mv > 0 ? key_end(p, sq, i0 + mv - 1) : 0;
          std::fill(o.begin(), o.end(), T(0));
          std::fill(mrun, mrun + kBQ, neg_inf<T>());
          std::fill(lrun, lrun + kBQ, T(0));
          const T* qrow0 = row_ptr<T>(q, b, h, sq.q0 + i0);
          for (int64_t j0 = 0; j0 < kend; j0 += kBK) {
            const int64_t nk = std::min<int64_t>(kBK, kend - j0);
            pack_transposed(k, b, h, sq.k0 + j0, nk, D, kt.data());
            pack_rows(v, b, h, sq.k0 + j0, nk, kBK, Dv, Dvp, vp.data());
            gemm_acc<T>(mv, kBK, D, qrow0, q.sr, 1, kt.data(), kBK, s.data(), kBK, false);
            for (int64_t r = 0; r < mv; ++r) {
              const int64_t i = i0 + r;
              T* srow = s.data() + r * kBK;
              finish_scores<T>(srow, j0, key_end(p, sq, i), scale, mask, mask_row(mask, b, h, i));
              const T mnew = std::max(mrun[r], max_row<T>(srow));
              if (mnew == neg_inf<T>()) {  // nothing visible yet: contributes nothing
                std::fill(srow, srow + kBK, T(0));
                continue;
              }
              const T alpha = exp_fast(mrun[r] - mnew);
              lrun[r] = lrun[r] * alpha + exp_row<T>(srow, mnew);
              mrun[r] = mnew;
              if (threshold > 0)
                apply_dropout(srow, nk, j0, dropout_row_key(p.seed, b, h, i), threshold, inv_keep);
              if (alpha != T(1)) {
                T* orow = o.data() + r * Dvp;
                for (int64_t c = 0; c < Dvp; ++c) orow[c] *= alpha;
              }
            }
            gemm_acc<T>(mv, Dvp, kBK, s.data(), kBK, 1, vp.data(), Dvp, o.data(), Dvp, true);
          }
          for (int64_t r = 0; r < present; ++r) {
            T* dst = row_ptr<T>(out, b, h, sq.q0 + i0 + r);
            T* l = row_ptr<T>(lse, b, h, sq.q0 + i0 + r);
            if (r < mv && lrun[r] > T(0)) {
              const T inv = T(1) / lrun[r];
              for (int64_t c = 0; c < Dv; ++c) dst[c] = o[r * Dvp + c] * inv;
              *l = mrun[r] + std::log(lrun[r]);
            } else {  // past q_length, or no visible key: zeros, and P = exp(s - inf) = 0
              std::fill(dst, dst + Dv, T(0));
              *l = std::numeric_limits<T>::infinity();
            }
          }
        }
      }
    }
  }
}

// Recompute one tile of probabilities: p[r, j] = exp(score - lse_r) for rows i0 + r < i0 + mq
// and keys j0 + j, from raw dot products already in p.
template <typename T>
void probabilities(const Problem& p, const Seq& sq, int64_t b, int64_t h, int64_t i0,
                   int64_t mq, int64_t j0, T scale, const Mask& mask, const View& lse, T* pt) {
  for (int64_t r = 0; r < mq; ++r) {
    const int64_t i = i0 + r;
    T* row = pt + r * kBK;
    finish_scores<T>(row, j0, key_end(p, sq, i), scale, mask, mask_row(mask, b, h, i));
    const T l = *row_ptr<T>(lse, b, h, sq.q0 + i);
    if (std::isinf(l)) std::fill(row, row + kBK, T(0));  // no visible key: P = 0
    else exp_row<T>(row, l);
  }
}

template <typename T>
void backward(const Problem& p, View q, View k, View v, Mask mask, View out, View gout, View lse,
              MutView gq, MutView gk, MutView gv) {
  const int64_t D = p.D, Dv = p.Dv, Dp = round_up(D, kCW), Dvp = round_up(Dv, kCW);
  const T scale = static_cast<T>(p.scale);
  const uint32_t threshold = dropout_threshold(p.dropout_p);
  const T inv_keep = p.dropout_p > 0 ? static_cast<T>(1.0 / (1.0 - p.dropout_p)) : T(1);
#pragma omp parallel
  {
    std::vector<T> kt(kMaxDim * kBK), vt(kMaxDim * kBK), kp(kBK * Dp);
    std::vector<T> pt(kBQ * kBK), dpt(kBQ * kBK), dk(kBK * Dp), dv(kBK * Dvp);
    std::vector<T> qp, gop, dq, delta;
#pragma omp for collapse(2) schedule(dynamic, 1)
    for (int64_t b = 0; b < p.B; ++b) {
      for (int64_t h = 0; h < p.H; ++h) {
        const Seq sq = seq_info(p, b);
        const int64_t qlen = sq.qlen;
        qp.resize(qlen * Dp);
        gop.resize(qlen * Dvp);
        dq.assign(qlen * Dp, T(0));
        delta.resize(qlen);
        pack_rows(q, b, h, sq.q0, qlen, qlen, D, Dp, qp.data());
        pack_rows(gout, b, h, sq.q0, qlen, qlen, Dv, Dvp, gop.data());
        for (int64_t i = 0; i < qlen; ++i) {  // delta_i = dO_i . O_i = sum_j P_ij dP_ij
          const T* o = row_ptr<T>(out, b, h, sq.q0 + i);
          T acc = 0;
          for (int64_t c = 0; c < Dv; ++c) acc += gop[i * Dvp + c] * o[c];
          delta[i] = acc;
        }
        const int64_t kend = qlen > 0 ? key_end(p, sq, qlen - 1) : 0;
        for (int64_t j0 = 0; j0 < kend; j0 += kBK) {
          const int64_t nk = std::min<int64_t>(kBK, kend - j0);
          pack_transposed(k, b, h, sq.k0 + j0, nk, D, kt.data());
          pack_transposed(v, b, h, sq.k0 + j0, nk, Dv, vt.data());
          pack_rows(k, b, h, sq.k0 + j0, nk, kBK, D, Dp, kp.data());
          std::fill(dk.begin(), dk.end(), T(0));
          std::fill(dv.begin(), dv.end(), T(0));
          // Causal: queries before j0 - offset see none of these keys.
          const int64_t ifirst = p.causal ? clamp64(j0 - sq.offset, 0, qlen) : 0;
          for (int64_t i0 = ifirst; i0 < qlen; i0 += kBQ) {
            const int64_t mq = std::min<int64_t>(kBQ, qlen - i0);
            gemm_acc<T>(mq, kBK, D, qp.data() + i0 * Dp, Dp, 1, kt.data(), kBK, pt.data(), kBK, false);
            probabilities<T>(p, sq, b, h, i0, mq, j0, scale, mask, lse, pt.data());
            gemm_acc<T>(mq, kBK, Dv, gop.data() + i0 * Dvp, Dvp, 1, vt.data(), kBK, dpt.data(), kBK, false);
            // pt <- dS = P * (dP * z - delta); dpt <- P * z (dropped probabilities, for dV).
            for (int64_t r = 0; r < mq; ++r) {
              T* prow = pt.data() + r * kBK;
              T* dprow = dpt.data() + r * kBK;
              const T di = delta[i0 + r];
              if (threshold > 0) {
                const uint64_t key = dropout_row_key(p.seed, b, h, i0 + r);
                for (int64_t j = 0; j < kBK; ++j) {
                  const T z = j < nk && dropout_keep(key, j0 + j, threshold) ? inv_keep : T(0);
                  const T pj = prow[j];
                  prow[j] = pj * (dprow[j] * z - di);
                  dprow[j] = pj * z;
                }
              } else {
                for (int64_t j = 0; j < kBK; ++j) {
                  const T pj = prow[j];
                  prow[j] = pj * (dprow[j] - di);
                  dprow[j] = pj;
                }
              }
            }
            // dV += (P z)^T dO; dK += dS^T Q; dQ += dS K  (scale applied at the end).
            gemm_acc<T>(kBK, Dvp, mq, dpt.data(), 1, kBK, gop.data() + i0 * Dvp, Dvp, dv.data(), Dvp, true);
            gemm_acc<T>(kBK, Dp, mq, pt.data(), 1, kBK, qp.data() + i0 * Dp, Dp, dk.data(), Dp, true);
            gemm_acc<T>(mq, Dp, kBK, pt.data(), kBK, 1, kp.data(), Dp, dq.data() + i0 * Dp, Dp, true);
          }
          for (int64_t j = 0; j < nk; ++j) {
            T* dkr = row_ptr<T>(gk, b, h, sq.k0 + j0 + j);
            T* dvr = row_ptr<T>(gv, b, h, sq.k0 + j0 + j);
            for (int64_t c = 0; c < D; ++c) dkr[c] = dk[j * Dp + c] * scale;
            for (int64_t c = 0; c < Dv; ++c) dvr[c] = dv[j * Dvp + c];
          }
        }
        for (int64_t j = kend; j < sq.krows; ++j) {  // keys no query sees
          T* dkr = row_ptr<T>(gk, b, h, sq.k0 + j);
          T* dvr = row_ptr<T>(gv, b, h, sq.k0 + j);
          std::fill(dkr, dkr + D, T(0));
          std::fill(dvr, dvr + Dv, T(0));
        }
        for (int64_t i = 0; i < sq.qrows; ++i) {
          T* dqr = row_ptr<T>(gq, b, h, sq.q0 + i);
          if (i < qlen)
            for (int64_t c = 0; c < D; ++c) dqr[c] = dq[i * Dp + c] * scale;
          else
            std::fill(dqr, dqr + D, T(0));
        }
      }
    }
  }
}

template <typename T>
void weights(const Problem& p, View q, View k, Mask mask, View lse, T* w, bool average_heads) {
  const int64_t D = p.D, Lq = p.Lq, Lk = p.Lk;
  const int64_t qtiles = (Lq + kBQ - 1) / kBQ;
  const T scale = static_cast<T>(p.scale);
  const uint32_t threshold = dropout_threshold(p.dropout_p);
  const T inv_keep = p.dropout_p > 0 ? static_cast<T>(1.0 / (1.0 - p.dropout_p)) : T(1);
  const T factor = average_heads && p.H > 0 ? T(1) / static_cast<T>(p.H) : T(1);
#pragma omp parallel
  {
    std::vector<T> kt(kMaxDim * kBK), pt(kBQ * kBK);
#pragma omp for collapse(2) schedule(dynamic, 1)
    for (int64_t b = 0; b < p.B; ++b) {
      for (int64_t qt = 0; qt < qtiles; ++qt) {
        const Seq sq = seq_info(p, b);
        const int64_t i0 = qt * kBQ;
        const int64_t rows = std::min<int64_t>(kBQ, Lq - i0);
        const int64_t mq = clamp64(sq.qlen - i0, 0, kBQ);
        const int64_t kend = mq > 0 ? key_end(p, sq, i0 + mq - 1) : 0;
        // (B, Lq, Lk) summed over heads, or (B, H, Lq, Lk) one slab per head.
        auto tile = [&](int64_t h) {
          return average_heads ? w + (b * Lq + i0) * Lk : w + ((b * p.H + h) * Lq + i0) * Lk;
        };
        if (average_heads) std::fill(tile(0), tile(0) + rows * Lk, T(0));
        for (int64_t h = 0; h < p.H; ++h) {
          T* wt = tile(h);
          if (!average_heads) std::fill(wt, wt + rows * Lk, T(0));
          for (int64_t j0 = 0; j0 < kend; j0 += kBK) {
            const int64_t nk = std::min<int64_t>(kBK, kend - j0);
            pack_transposed(k, b, h, sq.k0 + j0, nk, D, kt.data());
            gemm_acc<T>(mq, kBK, D, row_ptr<T>(q, b, h, sq.q0 + i0), q.sr, 1, kt.data(), kBK,
                        pt.data(), kBK, false);
            probabilities<T>(p, sq, b, h, i0, mq, j0, scale, mask, lse, pt.data());
            for (int64_t r = 0; r < mq; ++r) {
              T* prow = pt.data() + r * kBK;
              if (threshold > 0)
                apply_dropout(prow, nk, j0, dropout_row_key(p.seed, b, h, i0 + r), threshold, inv_keep);
              T* wrow = wt + r * Lk + j0;
              for (int64_t j = 0; j < nk; ++j) wrow[j] += prow[j] * factor;
            }
          }
        }
      }
    }
  }
}

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
    check_dtype_in("q", dtype, {DType::Float32, DType::Float64});
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

namespace detail {
void forward_cpu(DType dtype, const Problem& p, View q, View k, View v, Mask mask, MutView out,
                 MutView lse) {
  AFFECTKIT_DISPATCH_CPU_FLOAT(dtype, "q", T, [&] { forward<T>(p, q, k, v, mask, out, lse); });
}
void backward_cpu(DType dtype, const Problem& p, View q, View k, View v, Mask mask, View out,
                  View gout, View lse, MutView gq, MutView gk, MutView gv) {
  AFFECTKIT_DISPATCH_CPU_FLOAT(dtype, "q", T, [&] {
    backward<T>(p, q, k, v, mask, out, gout, lse, gq, gk, gv);
  });
}
void weights_cpu(DType dtype, const Problem& p, View q, View k, Mask mask, View lse, void* w,
                 bool average_heads) {
  AFFECTKIT_DISPATCH_CPU_FLOAT(dtype, "q", T, [&] {
    weights<T>(p, q, k, mask, lse, static_cast<T*>(w), average_heads);
  });
}
}  // namespace detail

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
  detail::forward_cpu(dtype, p, q, k, v, mask, out, lse);
}

void attention_backward(Device device, DType dtype, const Problem& p, View q, View k, View v,
                        Mask mask, View out, View grad_out, View lse, MutView grad_q,
                        MutView grad_k, MutView grad_v, uintptr_t stream) {
  validate("attention_backward", device, dtype, p, mask);
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
    detail::backward_cuda(dtype, p, q, k, v, mask, out, grad_out, lse, grad_q, grad_k, grad_v, stream);
#endif
    return;
  }
  (void)stream;
  detail::backward_cpu(dtype, p, q, k, v, mask, out, grad_out, lse, grad_q, grad_k, grad_v);
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
  detail::weights_cpu(dtype, p, q, k, mask, lse, weights, average_heads);
}

}  // namespace affectkit::attention
