// Exact filtered k-NN on the CPU, and the device dispatch with boundary validation.
//
// Plan: the allowed rows are gathered into a row list first (so a selective filter costs
// only its passing rows), then blocks of queries meet tiles of rows. A register-blocked
// micro-kernel computes a small score tile, which is folded into each query's running
// top-k at once: the (nq, n) score matrix never exists. Work items are (query block, row
// chunk) pairs so that a handful of queries still spreads over every thread; each item
// keeps its own top-k and the partial lists are merged in a fixed order (the (distance,
// id) order is total, so the result does not depend on the thread count).
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "../core/dispatch.h"
#include "knn.h"
#include "topk.h"

namespace affectkit::knn {

Metric metric_from_code(int32_t code, const char* arg) {
  if (code < 0 || code > 2)
    throw ValueError(std::string(arg) + ": expected 0 (ip), 1 (l2) or 2 (cosine), got " +
                     std::to_string(code));
  return static_cast<Metric>(code);
}

namespace {

constexpr int64_t kQueryBlock = 24;  // queries sharing one pass over a row tile
constexpr int64_t kRowTile = 96;     // rows per tile (packed: kRowTile * d stays in L2)
constexpr int64_t kMinChunkRows = 4 * kRowTile;

// ---------------------------------------------------------------------------------------
// Micro-kernel: scores[a][b] = <q_a, x_b> for up to 3 queries x 4 rows, vectorised with
// generic vector types (lowered to the instruction set of each clone).
// ---------------------------------------------------------------------------------------
template <typename T>
struct Vec;
template <>
struct Vec<float> {
  typedef float type __attribute__((vector_size(32), aligned(4)));
  static constexpr int lanes = 8;
};
template <>
struct Vec<double> {
  typedef double type __attribute__((vector_size(32), aligned(8)));
  static constexpr int lanes = 4;
};

template <typename T>
inline T hsum(typename Vec<T>::type v) {
  T s = 0;
  for (int l = 0; l < Vec<T>::lanes; ++l) s += v[l];
  return s;
}

// out[a * out_stride + b] = <q[a], x[b]>, a < nqa (<= 3), b < 4 (rows past nrb are skipped).
template <typename T>
AFFECTKIT_SIMD_CLONES void dot_3x4(const T* __restrict q, int64_t nqa, const T* __restrict x,
                                   int64_t nrb, int64_t d, T* __restrict out,
                                   int64_t out_stride) {
  using V = typename Vec<T>::type;
  constexpr int L = Vec<T>::lanes;
  const T* qp[3];
  const T* xp[4];
  for (int a = 0; a < 3; ++a) qp[a] = q + std::min<int64_t>(a, nqa - 1) * d;
  for (int b = 0; b < 4; ++b) xp[b] = x + std::min<int64_t>(b, nrb - 1) * d;
  V acc[3][4];
  for (int a = 0; a < 3; ++a)
    for (int b = 0; b < 4; ++b) acc[a][b] = V{};
  int64_t j = 0;
  for (; j + L <= d; j += L) {
    V qa0 = *reinterpret_cast<const V*>(qp[0] + j);
    V qa1 = *reinterpret_cast<const V*>(qp[1] + j);
    V qa2 = *reinterpret_cast<const V*>(qp[2] + j);
    for (int b = 0; b < 4; ++b) {
      V xb = *reinterpret_cast<const V*>(xp[b] + j);
      acc[0][b] += qa0 * xb;
      acc[1][b] += qa1 * xb;
      acc[2][b] += qa2 * xb;
    }
  }
  for (int a = 0; a < nqa; ++a)
    for (int b = 0; b < nrb; ++b) {
      T s = hsum<T>(acc[a][b]);
      for (int64_t t = j; t < d; ++t) s += qp[a][t] * xp[b][t];
      out[a * out_stride + b] = s;
    }
}

// scores (nqb, nrows) = queries (nqb, d) . rows (nrows, d)^T
template <typename T>
void score_tile(const T* q, int64_t nqb, const T* rows, int64_t nrows, int64_t d, T* scores) {
  for (int64_t a = 0; a < nqb; a += 3)
    for (int64_t b = 0; b < nrows; b += 4)
      dot_3x4(q + a * d, std::min<int64_t>(3, nqb - a), rows + b * d,
              std::min<int64_t>(4, nrows - b), d, scores + a * nrows + b, nrows);
}

template <typename T>
AFFECTKIT_SIMD_CLONES T sqnorm(const T* __restrict x, int64_t d) {
  T s = 0;
  for (int64_t j = 0; j < d; ++j) s += x[j] * x[j];
  return s;
}

template <typename T>
inline T to_distance(T ip, Metric metric, T qn, T xn) {
  switch (metric) {
    case Metric::InnerProduct: return -ip;
    case Metric::Cosine: return T(1) - ip;
    default: {
      const T dist = qn + xn - T(2) * ip;
      return dist < T(0) ? T(0) : dist;  // keeps NaN (never returned)
    }
  }
}

// ---------------------------------------------------------------------------------------
// Shared row list (all rows, or the rows a shared mask lets through): blocked kernel.
// `qmask` (per-query mask, or null) is checked while folding scores into the top-k.
// ---------------------------------------------------------------------------------------
template <typename T>
void search_row_list(const T* queries, int64_t nq, const T* db, int64_t n, int64_t d,
                     Metric metric, int64_t k, const int64_t* rows /* null: 0..m-1 */,
                     int64_t m, const uint8_t* qmask, const int64_t* row_ids, const T* xnorm,
                     const T* qnorm, T* out_dist, int64_t* out_ids) {
  const int64_t keff = std::min(k, m);
  if (keff == 0) {  // nothing allowed: all padding
    for (int64_t i = 0; i < nq * k; ++i) {
      out_dist[i] = std::numeric_limits<T>::infinity();
      out_ids[i] = -1;
    }
    return;
  }
  const int64_t nqb = (nq + kQueryBlock - 1) / kQueryBlock;
  const int64_t threads = omp_get_max_threads();
  int64_t nchunks = 1;
  if (nqb < 2 * threads) {
    nchunks = std::max<int64_t>(1, (2 * threads + nqb - 1) / nqb);
    nchunks = std::min<int64_t>(nchunks, std::max<int64_t>(1, m / kMinChunkRows));
  }
  const int64_t chunk_rows = (m + nchunks - 1) / std::max<int64_t>(nchunks, 1);
  // partial[c][q][0..keff) with their sizes.
  std::vector<Hit<T>> partial(static_cast<size_t>(nchunks * nq * keff));
  std::vector<int64_t> partial_size(static_cast<size_t>(nchunks * nq), 0);
  const bool packed = rows != nullptr;

#pragma omp parallel
  {
    std::vector<T> scores(kQueryBlock * kRowTile);
    std::vector<T> pack(packed ? kRowTile * d : 0);
#pragma omp for collapse(2) schedule(dynamic, 1)
    for (int64_t qb = 0; qb < nqb; ++qb) {
      for (int64_t c = 0; c < nchunks; ++c) {
        const int64_t q0 = qb * kQueryBlock, q1 = std::min(nq, q0 + kQueryBlock);
        const int64_t r_begin = c * chunk_rows, r_end = std::min(m, r_begin + chunk_rows);
        std::vector<TopK<T>> heaps;
        heaps.reserve(q1 - q0);
        for (int64_t qi = q0; qi < q1; ++qi)
          heaps.emplace_back(&partial[(c * nq + qi) * keff], keff);
        for (int64_t r0 = r_begin; r0 < r_end; r0 += kRowTile) {
          const int64_t nr = std::min(kRowTile, r_end - r0);
          const T* tile;
          if (packed) {
            for (int64_t r = 0; r < nr; ++r)
              std::memcpy(&pack[r * d], db + rows[r0 + r] * d, sizeof(T) * d);
            tile = pack.data();
          } else {
            tile = db + r0 * d;
          }
          score_tile(queries + q0 * d, q1 - q0, tile, nr, d, scores.data());
          for (int64_t qi = q0; qi < q1; ++qi) {
            TopK<T>& heap = heaps[qi - q0];
            const T* s = &scores[(qi - q0) * nr];
            const uint8_t* qm = qmask ? qmask + qi * n : nullptr;
            const T qn = qnorm ? qnorm[qi] : T(0);
            for (int64_t r = 0; r < nr; ++r) {
              const int64_t row = packed ? rows[r0 + r] : r0 + r;
              if (qm && !qm[row]) continue;
              const T dist = to_distance(s[r], metric, qn, xnorm ? xnorm[row] : T(0));
              if (!heap.may_enter(dist)) continue;
              heap.push(dist, row_ids ? row_ids[row] : row);
            }
          }
        }
        for (int64_t qi = q0; qi < q1; ++qi) partial_size[c * nq + qi] = heaps[qi - q0].size();
      }
    }
  }

  // Merge the chunks of each query in chunk order.
  std::vector<Hit<T>> merged_storage;
#pragma omp parallel for schedule(static) firstprivate(merged_storage)
  for (int64_t qi = 0; qi < nq; ++qi) {
    merged_storage.resize(keff);
    TopK<T> heap(merged_storage.data(), keff);
    for (int64_t c = 0; c < nchunks; ++c) {
      const Hit<T>* h = &partial[(c * nq + qi) * keff];
      for (int64_t i = 0; i < partial_size[c * nq + qi]; ++i) heap.push(h[i].dist, h[i].id);
    }
    heap.write_sorted(out_dist + qi * k, out_ids + qi * k, k);
  }
}

// ---------------------------------------------------------------------------------------
// Per-query candidate lists (a selective per-query filter): one query against its rows.
// ---------------------------------------------------------------------------------------
template <typename T>
void search_per_query_lists(const T* queries, int64_t nq, const T* db, int64_t d,
                            Metric metric, int64_t k, const int64_t* offsets,
                            const int64_t* cand, const int64_t* row_ids, const T* xnorm,
                            const T* qnorm, T* out_dist, int64_t* out_ids) {
#pragma omp parallel
  {
    std::vector<Hit<T>> storage(static_cast<size_t>(k));
    std::vector<T> pack(4 * d);
    T s[4];
#pragma omp for schedule(dynamic, 4)
    for (int64_t qi = 0; qi < nq; ++qi) {
      TopK<T> heap(storage.data(), k);
      const int64_t b = offsets[qi], e = offsets[qi + 1];
      const T qn = qnorm ? qnorm[qi] : T(0);
      for (int64_t i = b; i < e; i += 4) {
        const int64_t nr = std::min<int64_t>(4, e - i);
        for (int64_t r = 0; r < nr; ++r)
          std::memcpy(&pack[r * d], db + cand[i + r] * d, sizeof(T) * d);
        dot_3x4(queries + qi * d, 1, pack.data(), nr, d, s, 4);
        for (int64_t r = 0; r < nr; ++r) {
          const int64_t row = cand[i + r];
          const T dist = to_distance(s[r], metric, qn, xnorm ? xnorm[row] : T(0));
          if (!heap.may_enter(dist)) continue;
          const int64_t id = row_ids ? row_ids[row] : row;
          // A row listed twice must not appear twice: skip exact repeats already kept.
          bool dup = false;
          for (int64_t h = 0; h < heap.size(); ++h)
            if (heap.data()[h].id == id && heap.data()[h].dist == dist) dup = true;
          if (!dup) heap.push(dist, id);
        }
      }
      heap.write_sorted(out_dist + qi * k, out_ids + qi * k, k);
    }
  }
}

template <typename T>
void exact_search_typed(const T* queries, int64_t nq, const T* db, int64_t n, int64_t d,
                        Metric metric, int64_t k, const Filter& f, const int64_t* row_ids,
                        const T* db_sqnorms, T* out_dist, int64_t* out_ids) {
  if (nq == 0) return;
  std::vector<T> xnorm_store, qnorm_store;
  const T* xnorm = nullptr;
  const T* qnorm = nullptr;
  if (metric == Metric::L2) {
    qnorm_store.resize(nq);
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < nq; ++i) qnorm_store[i] = sqnorm(queries + i * d, d);
    qnorm = qnorm_store.data();
    if (db_sqnorms) {
      xnorm = db_sqnorms;
    } else {
      xnorm_store.resize(n);
#pragma omp parallel for schedule(static)
      for (int64_t i = 0; i < n; ++i) xnorm_store[i] = sqnorm(db + i * d, d);
      xnorm = xnorm_store.data();
    }
  }

  if (f.cand_offsets) {
    search_per_query_lists(queries, nq, db, d, metric, k, f.cand_offsets, f.cand_rows, row_ids,
                           xnorm, qnorm, out_dist, out_ids);
    return;
  }
  if (f.mask && f.mask_per_query) {
    // Dense enough: one blocked pass over all rows, masking while folding. Sparse: gather
    // each query's rows and score only those.
    std::vector<int64_t> counts(nq + 1, 0);
#pragma omp parallel for schedule(static)
    for (int64_t qi = 0; qi < nq; ++qi) {
      int64_t c = 0;
      const uint8_t* qm = f.mask + qi * n;
      for (int64_t r = 0; r < n; ++r) c += qm[r] != 0;
      counts[qi + 1] = c;
    }
    for (int64_t qi = 0; qi < nq; ++qi) counts[qi + 1] += counts[qi];
    const double density = n ? double(counts[nq]) / (double(nq) * double(n)) : 0.0;
    if (density >= 0.15) {
      search_row_list(queries, nq, db, n, d, metric, k, nullptr, n, f.mask, row_ids, xnorm,
                      qnorm, out_dist, out_ids);
      return;
    }
    std::vector<int64_t> cand(counts[nq]);
#pragma omp parallel for schedule(static)
    for (int64_t qi = 0; qi < nq; ++qi) {
      int64_t o = counts[qi];
      const uint8_t* qm = f.mask + qi * n;
      for (int64_t r = 0; r < n; ++r)
        if (qm[r]) cand[o++] = r;
    }
    search_per_query_lists(queries, nq, db, d, metric, k, counts.data(), cand.data(), row_ids,
                           xnorm, qnorm, out_dist, out_ids);
    return;
  }
  if (f.mask) {  // shared mask: gather the passing rows once
    std::vector<int64_t> rows;
    rows.reserve(n / 4);
    for (int64_t r = 0; r < n; ++r)
      if (f.mask[r]) rows.push_back(r);
    if (static_cast<int64_t>(rows.size()) == n) {
      search_row_list(queries, nq, db, n, d, metric, k, nullptr, n, nullptr, row_ids, xnorm,
                      qnorm, out_dist, out_ids);
    } else {
      search_row_list(queries, nq, db, n, d, metric, k, rows.data(),
                      static_cast<int64_t>(rows.size()), nullptr, row_ids, xnorm, qnorm,
                      out_dist, out_ids);
    }
    return;
  }
  search_row_list(queries, nq, db, n, d, metric, k, nullptr, n, nullptr, row_ids, xnorm, qnorm,
                  out_dist, out_ids);
}

}  // namespace

namespace detail {
void exact_search_cpu(DType dtype, const void* queries, int64_t nq, const void* database,
                      int64_t n, int64_t d, Metric metric, int64_t k, const Filter& filter,
                      const int64_t* row_ids, const void* db_sqnorms, void* out_dist,
                      int64_t* out_ids) {
  AFFECTKIT_DISPATCH_CPU_FLOAT(dtype, "queries", T, [&] {
    exact_search_typed(static_cast<const T*>(queries), nq, static_cast<const T*>(database), n,
                       d, metric, k, filter, row_ids, static_cast<const T*>(db_sqnorms),
                       static_cast<T*>(out_dist), out_ids);
  });
}
}  // namespace detail

void exact_search(Device device, DType dtype, const void* queries, int64_t nq,
                  const void* database, int64_t n, int64_t d, Metric metric, int64_t k,
                  const Filter& filter, const int64_t* row_ids, const void* db_sqnorms,
                  void* out_dist, int64_t* out_ids, uintptr_t stream) {
  check_dims_nonnegative("nq", nq);
  check_dims_nonnegative("n", n);
  check_dims_nonnegative("d", d);
  if (k <= 0) throw ValueError("k: expected a positive integer, got " + std::to_string(k));
  if (static_cast<int32_t>(metric) < 0 || static_cast<int32_t>(metric) > 2)
    throw ValueError("metric: expected ip, l2 or cosine, got code " +
                     std::to_string(static_cast<int32_t>(metric)));
  check_pointer("queries", queries, nq * d);
  check_pointer("database", database, n * d);
  check_pointer("out_dist", out_dist, nq * k);
  check_pointer("out_ids", out_ids, nq * k);
  if (filter.mask && filter.cand_offsets)
    throw ValueError("filter: expected a mask or candidate lists, got both");
  if (filter.cand_offsets && filter.mask_per_query)
    throw ValueError("filter.mask_per_query: expected false with candidate lists, got true");
  if (device == Device::CUDA) {
    check_cuda_compiled("exact_search");
    if (filter.cand_offsets)
      throw ValueError("filter: candidate lists are CPU only; pass a byte mask on CUDA");
#ifdef AFFECTKIT_WITH_CUDA
    detail::exact_search_cuda(dtype, queries, nq, database, n, d, metric, k, filter, row_ids,
                              db_sqnorms, out_dist, out_ids, stream);
#endif
    return;
  }
  (void)stream;
  if (filter.cand_offsets) {
    check_pointer("filter.cand_offsets", filter.cand_offsets, nq + 1);
    if (nq > 0 && filter.cand_offsets[0] != 0)
      throw ValueError("filter.cand_offsets: expected cand_offsets[0] = 0, got " +
                       std::to_string(filter.cand_offsets[0]));
    for (int64_t i = 0; i < nq; ++i)
      if (filter.cand_offsets[i + 1] < filter.cand_offsets[i])
        throw ValueError("filter.cand_offsets: expected non-decreasing values, got offsets[" +
                         std::to_string(i + 1) + "] = " +
                         std::to_string(filter.cand_offsets[i + 1]) + " < offsets[" +
                         std::to_string(i) + "] = " + std::to_string(filter.cand_offsets[i]));
    const int64_t total = nq > 0 ? filter.cand_offsets[nq] : 0;
    check_pointer("filter.cand_rows", filter.cand_rows, total);
    for (int64_t i = 0; i < total; ++i)
      if (filter.cand_rows[i] < 0 || filter.cand_rows[i] >= n)
        throw ValueError("filter.cand_rows: expected values in [0, " + std::to_string(n - 1) +
                         "], got cand_rows[" + std::to_string(i) +
                         "] = " + std::to_string(filter.cand_rows[i]));
  }
  if (filter.mask) check_pointer("filter.mask", filter.mask, filter.mask_per_query ? nq * n : n);
  detail::exact_search_cpu(dtype, queries, nq, database, n, d, metric, k, filter, row_ids,
                           db_sqnorms, out_dist, out_ids);
}

}  // namespace affectkit::knn
