// 8-bit codes of a graph's rows for the search walk: per-dimension affine scalar quantisation
// (value ~ lo[j] + step[j] * code, as FAISS's SQ8), a quarter of float32's bytes a row.
//
// Why: a filtered graph search reads a whole row for every node it scores (830 rows of 1.5 KB
// a query at 50 % selectivity, ef 20, on 200,000 x 384), and one core gathers random 1.5 KB
// rows at ~12 GB/s (~120 ns a row on the development EPYC): the walk ran at ~85 % of that
// ceiling. With 384-byte codes a row costs ~36 ns. The walk ranks by code distances, and the
// beam it returns is scored again on the stored rows, so every distance a search returns is
// exact; only the choice of the beam is approximate (recall@10 unchanged to +-0.002 there).
#pragma once

#include <cstddef>
#include <cstdint>
#include <new>
#include <vector>

#include "../core/core.h"
#include "knn.h"

namespace affectkit::knn {

// 64-byte aligned storage, so that a code row (a multiple of 64 bytes) is whole cache lines.
template <typename T>
struct CacheAligned {
  using value_type = T;
  CacheAligned() = default;
  template <typename U>
  CacheAligned(const CacheAligned<U>&) {}
  T* allocate(size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t(64))); }
  void deallocate(T* p, size_t) { ::operator delete(p, std::align_val_t(64)); }
  template <typename U>
  bool operator==(const CacheAligned<U>&) const { return true; }
  template <typename U>
  bool operator!=(const CacheAligned<U>&) const { return false; }
};

class WalkCodes {
 public:
  explicit WalkCodes(int64_t dim);

  // Codes for rows [0, end) of `rows` (row-major, row_dtype float32 or float16), rows
  // [0, begin) being coded already. The first rows set the ranges (derive_and_code: min-max
  // but for a few far rows); a later row with a value past them is coded clamped and marked
  // outside(), for the walk to score it on its row. Once more than 1 % of the rows (and 16)
  // are outside, the ranges are derived again from every row and all are coded again.
  void update(const void* rows, DType row_dtype, int64_t begin, int64_t end);

  // Saved codes: `count` rows of stride() bytes, dim() floats of lo and step (finite,
  // step >= 0) and count bytes of outside flags. Throws ValueError naming the argument
  // otherwise. With `view`, 64-byte aligned codes are used where they lie (a memory-mapped
  // file, paged in as walks read it; the caller keeps them alive and unchanged) until the
  // next update copies them; other codes are copied.
  void assign(const uint8_t* codes, int64_t count, const float* lo, const float* step,
              const uint8_t* outside, bool view = false);

  int64_t dim() const { return dim_; }
  int64_t stride() const { return stride_; }  // bytes a row: dim rounded up to 64
  int64_t rows() const { return rows_; }
  const uint8_t* data() const { return view_ ? view_ : codes_.data(); }
  bool is_view() const { return view_ != nullptr; }
  const float* lo() const { return lo_.data(); }
  const float* step() const { return step_.data(); }
  const uint8_t* row(int32_t v) const { return data() + static_cast<int64_t>(v) * stride_; }
  // Row v has a value past the ranges: its code distance is not to be trusted.
  bool outside(int32_t v) const { return outside_[static_cast<size_t>(v)] != 0; }
  const uint8_t* outside_flags() const { return outside_.data(); }
  int64_t outside_count() const { return n_outside_; }

  // A query prepared for one metric: ip and cosine score c0 + sum a[j] code[j] with
  // a = q * step and c0 = <q, lo>; l2 scores sum (a[j] - step[j] code[j])^2 with a = q - lo.
  // Both arrays run over stride() entries, zero past dim (so are the codes).
  struct Query {
    std::vector<float, CacheAligned<float>> a, step;
    float c0 = 0.f;
  };
  void prepare(const float* q, Metric metric, Query& out) const;

  // Code distances (the metric's "smaller is closer": -s, 1 - s or the squared L2) of nodes
  // v[0..n) into out[0..n).
  void score(const Query& q, Metric metric, const int32_t* v, size_t n, float* out) const;

 private:
  void derive_and_code(const void* rows, DType row_dtype, int64_t end);
  void code_rows(const void* rows, DType row_dtype, int64_t begin, int64_t end);

  int64_t dim_, stride_;
  int64_t rows_ = 0, n_outside_ = 0;
  std::vector<uint8_t> outside_;  // a byte a row
  std::vector<float> lo_, step_;
  std::vector<uint8_t, CacheAligned<uint8_t>> codes_;
  const uint8_t* view_ = nullptr;  // codes used in place (assign with view), or null
};

}  // namespace affectkit::knn
