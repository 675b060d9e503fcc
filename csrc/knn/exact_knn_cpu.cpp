// Exact filtered k-NN on the CPU, and the device dispatch with boundary validation.
//
// Plan: the allowed rows are gathered into a row list first (so a selective filter costs
// only its passing rows); then blocks of queries meet tiles of rows. A register-blocked
// micro-kernel computes a strip of scores with the queries in vector lanes, and each row's
// scores are folded into the running top-k of W queries at once (query_lanes.inc): the
// (nq, n) score matrix never exists. Work items are (query block, row chunk) pairs so that a
// handful of queries still spreads over every thread; each item keeps its own top-k and the
// partial lists are merged in a fixed order (the (distance, id) order is total, so the
// result does not depend on the thread count). Per-query candidate lists (a selective
// per-query filter) score one query against four of its own rows at a time.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

#include "../core/dispatch.h"
#include "../core/simd.h"
#include "f16.h"
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

// Queries sharing one pass over a row tile (the tile is packed once for all of them). 256
// streams the rows from memory once per 256 queries. With 24, another
// path pre-packed the whole table for the blocks to share; on an AVX2 core (100k x 384, every
// row allowed) 200 queries took 444-582 ms that way, 266 ms now.
constexpr int64_t kQueryBlock = 256;
constexpr int64_t kRowTile = 96;     // rows per tile (packed: kRowTile * d stays in L2)
constexpr int64_t kMinChunkRows = 4 * kRowTile;
constexpr int64_t kMaxChunkRows = int64_t(1) << 30;
// Lists of at most this many hits (and at most 8 per lane of the vector width) live in the
// lanes (query_lanes.inc); longer ones append to a buffer per query (TopKBuffer). The lanes'
// first rows each pass the network over k levels, so their cost grows as k^2. Against the
// buffer (1,000 queries, AVX-512, 2 threads), at 1,567 rows: k = 40 6.1 against 6.4 ms,
// k = 64 9.1 against 8.3, k = 100 13.2 against 11.6, k = 128 17.3 against 12.0; at 77 rows
// the lanes still win at 64 (1.85 against 2.08 ms). Against the heaps the buffer replaced,
// the lanes had won up to 128. Per-query candidate lists keep a heap up to the same k:
// there a buffer lost at k = 10 to 64 (2 % of 50,000 rows a query: 16.3 against 19.5 ms at 10).
constexpr int64_t kLaneMaxK = 64;
// A row entering at most 3/8 of the lanes' lists goes into each alone (lane_insert), not
// through the network: 6 of 16 lanes ran the grief and anger scans (77 and 1,567 rows) at
// k = 10 to 100 as fast as 2 or 4 did, or faster (within this machine's noise).
constexpr int kFewLanesOf8 = 3;
// Rows per micro-kernel strip: that many accumulators of W queries each.
constexpr int kStripRows = 12;
static_assert(kRowTile % kStripRows == 0 && kStripRows % 2 == 0, "tiles hold whole strips, strips halves");

// Storage type of float16 database rows (IEEE binary16 bits). Such rows are converted to
// float32 wherever rows are copied anyway (packing tiles), so the scoring kernels
// are the float32 ones and the stored bytes read per pass are halved.
struct Half {
  uint16_t bits;
};

// dst[0, count) = src[0, count) as T: a plain copy, or a float16 -> float32 conversion.
template <typename T, typename S>
inline void load_values(const S* src, int64_t count, T* dst) {
  if constexpr (std::is_same_v<S, Half>) {
    static_assert(std::is_same_v<T, float>, "float16 rows are scored in float32");
    f16_to_f32(reinterpret_cast<const uint16_t*>(src), dst, count);
  } else {
    static_assert(std::is_same_v<S, T>, "rows are stored as the query type or as float16");
    std::memcpy(dst, src, sizeof(T) * count);
  }
}

// GCC vector types of Bytes bytes (unaligned loads allowed): 64-byte ones in the AVX-512
// copy, 32 in the AVX2 one, 16 in the baseline (no -march=native anywhere).
template <typename T, int Bytes>
struct Vec {
  typedef T type __attribute__((vector_size(Bytes), aligned(sizeof(T))));
  static constexpr int lanes = Bytes / static_cast<int>(sizeof(T));
};

// The scoring kernels in use follow simd::level() (AFFECTKIT_SIMD_LEVEL caps it; the older
// AFFECTKIT_NO_AVX512=1 still forces at most AVX2): 64-, 32- or 16-byte vectors.
int kernel_level() {
  static const int level = std::getenv("AFFECTKIT_NO_AVX512") ? std::min(simd::level(), 1) : simd::level();
  return level;
}

// ||row||^2 of every stored row, in T.
template <typename T, typename S>
std::vector<T> row_sqnorms(const S* db, int64_t n, int64_t d);

template <typename T>
AFFECTKIT_SIMD_CLONES T sqnorm(const T* __restrict x, int64_t d) {
  T s = 0;
  for (int64_t j = 0; j < d; ++j) s += x[j] * x[j];
  return s;
}

template <typename T, typename S>
std::vector<T> row_sqnorms(const S* db, int64_t n, int64_t d) {
  std::vector<T> out(n);
#pragma omp parallel
  {
    std::vector<T> row(std::is_same_v<S, T> ? 0 : d);
#pragma omp for schedule(static)
    for (int64_t i = 0; i < n; ++i) {
      if constexpr (std::is_same_v<S, T>) {
        out[i] = sqnorm(db + i * d, d);
      } else {
        load_values(db + i * d, d, row.data());
        out[i] = sqnorm(row.data(), d);
      }
    }
  }
  return out;
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
// Shared row list (all rows, or the rows a shared mask lets through): the queries sit in
// vector lanes (query_lanes.inc). Work items are (block of kQueryBlock queries, chunk of rows);
// an item packs its queries transposed once, then for each tile of kRowTile rows packs the
// rows transposed in strips and meets them with every group of W queries. `qmask` (a
// per-query mask, or null) is checked for the rows that might enter.
// ---------------------------------------------------------------------------------------
template <typename T, typename S>
struct RowListJob {
  const T* queries;
  int64_t nq;
  const S* db;
  int64_t n, d;
  Metric metric;
  int64_t keff;
  const int64_t* rows;  // null: rows 0..m-1
  int64_t m;
  const uint8_t* qmask;
  const int64_t* row_ids;
  const T* xnorm;
  const T* qnorm;
  bool ids_follow_positions;  // ids increase along the row list: ties go to the earlier row
  int64_t chunk_rows;
  Hit<T>* partial;            // [chunk][query][keff]
  int64_t* partial_size;      // [chunk][query]

  int64_t row_at(int64_t i) const { return rows ? rows[i] : i; }
  int64_t id_at(int64_t i) const {
    const int64_t row = row_at(i);
    return row_ids ? row_ids[row] : row;
  }
};

template <typename T>
struct RowListWork {  // per thread
  std::vector<T> qt, xt, row, xn, kd;
  std::vector<std::conditional_t<sizeof(T) == 4, int32_t, int64_t>> kp;
  std::vector<Hit<T>> long_lists;  // up to 2 k hits a query for lists too long for the lanes

  // Room for a block of kQueryBlock queries of d values, a tile of rows, and lists of up to
  // lane_k hits in the lanes (0: the lists are buffers, sized when first needed).
  RowListWork(int64_t d, int64_t lane_k) {
    constexpr int64_t kMaxLanes = 64 / sizeof(T);
    const int64_t lanes = (kQueryBlock + kMaxLanes - 1) / kMaxLanes * kMaxLanes;
    d = std::max<int64_t>(d, 1);
    qt.resize(static_cast<size_t>(lanes * d));
    xt.resize(static_cast<size_t>(kRowTile * d));
    row.resize(static_cast<size_t>(d));
    xn.resize(kRowTile);
    kd.resize(static_cast<size_t>(lanes * lane_k));
    kp.resize(static_cast<size_t>(lanes * lane_k));
  }
};

// The item body, compiled once per instruction set: GCC lowers vector comparisons lane by
// lane in code compiled for a target without that vector width, even when it is inlined
// into a function with the right target (the insertion network then ran 6x slower), so the
// body's definitions sit inside the target region instead of being inlined into it. The
// target strings are those of core/simd.h.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512dq,avx2,fma")
namespace avx512 {
constexpr int kBytes = 64;
#include "query_lanes.inc"
}  // namespace avx512
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
constexpr int kBytes = 32;
#include "query_lanes.inc"
}  // namespace avx2
#pragma GCC pop_options
#define AFFECTKIT_KNN_LANE_LEVELS 1
#endif
namespace baseline {
constexpr int kBytes = 16;
#include "query_lanes.inc"
}  // namespace baseline

template <typename T, typename S>
void row_list_item(int level, const RowListJob<T, S>& job, int64_t qb, int64_t c, RowListWork<T>& ws) {
#ifdef AFFECTKIT_KNN_LANE_LEVELS
  if (level == 2) return avx512::row_list_item(job, qb, c, ws);
  if (level == 1) return avx2::row_list_item(job, qb, c, ws);
#endif
  (void)level;
  baseline::row_list_item(job, qb, c, ws);
}

template <typename T, typename S>
void search_row_list(const T* queries, int64_t nq, const S* db, int64_t n, int64_t d,
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
  // Row positions within a chunk are 32-bit lanes next to float32 distances.
  nchunks = std::max<int64_t>(nchunks, (m + kMaxChunkRows - 1) / kMaxChunkRows);
  // Chunks start on tile boundaries.
  const int64_t chunk_rows = ((m + nchunks - 1) / nchunks + kRowTile - 1) / kRowTile * kRowTile;
  nchunks = (m + chunk_rows - 1) / chunk_rows;
  // partial[c][q][0..keff) with their sizes (written before read: not zero-filled).
  std::unique_ptr<Hit<T>[]> partial(new Hit<T>[static_cast<size_t>(nchunks * nq * keff)]);
  std::vector<int64_t> partial_size(static_cast<size_t>(nchunks * nq), 0);

  bool ids_follow_positions = true;  // the row list ascends; do the ids?
  if (row_ids)
    for (int64_t i = 1; i < m && ids_follow_positions; ++i)
      ids_follow_positions = row_ids[rows ? rows[i] : i] > row_ids[rows ? rows[i - 1] : i - 1];
  const RowListJob<T, S> job{queries, nq, db, n, d, metric, keff, rows, m, qmask, row_ids, xnorm,
                             qnorm, ids_follow_positions, chunk_rows, partial.get(),
                             partial_size.data()};
  const int level = kernel_level();

#pragma omp parallel
  {
    RowListWork<T> ws(d, keff <= kLaneMaxK ? keff : 0);
#pragma omp for collapse(2) schedule(dynamic, 1)
    for (int64_t qb = 0; qb < nqb; ++qb)
      for (int64_t c = 0; c < nchunks; ++c) row_list_item(level, job, qb, c, ws);
  }

  // Merge the chunks of each query.
  std::vector<Hit<T>> merged_storage;
#pragma omp parallel for schedule(static) firstprivate(merged_storage)
  for (int64_t qi = 0; qi < nq; ++qi) {
    merged_storage.resize(2 * keff);
    TopKBuffer<T> merged(merged_storage.data(), keff);
    for (int64_t c = 0; c < nchunks; ++c) {
      const Hit<T>* h = &partial[(c * nq + qi) * keff];
      for (int64_t i = 0; i < partial_size[c * nq + qi]; ++i) merged.push(h[i].dist, h[i].id);
    }
    merged.write_sorted(out_dist + qi * k, out_ids + qi * k, k);
  }
}

// ---------------------------------------------------------------------------------------
// Per-query lists given as unions of shared row groups (Filter::groups): the queries of each
// group meet its rows in the shared-row-list kernel, one work item per (group, block of
// queries), each query's lists from its groups then merged. Per-query candidate lists read
// each candidate row once per query that lists it (~37 ns a candidate on 200,000 x 384
// rows, 2 threads); here a group's rows are read once for all of its queries.
// ---------------------------------------------------------------------------------------
template <typename T, typename S>
void search_groups(const T* queries, int64_t nq, const S* db, int64_t n, int64_t d, Metric metric,
                   int64_t k, const Filter& f, const int64_t* row_ids, const T* xnorm,
                   const T* qnorm, T* out_dist, int64_t* out_ids) {
  const int64_t G = f.groups;
  const int64_t entries = f.query_group_offsets[nq];
  // The queries of each group (ascending), and where each (query, group) entry's list lies.
  std::vector<int64_t> gq_offsets(G + 1, 0), gq_queries(entries), entry_slot(entries);
  for (int64_t e = 0; e < entries; ++e) ++gq_offsets[f.query_groups[e] + 1];
  for (int64_t g = 0; g < G; ++g) gq_offsets[g + 1] += gq_offsets[g];
  {
    std::vector<int64_t> fill(gq_offsets.begin(), gq_offsets.end() - 1);
    for (int64_t qi = 0; qi < nq; ++qi)
      for (int64_t e = f.query_group_offsets[qi]; e < f.query_group_offsets[qi + 1]; ++e) {
        const int64_t g = f.query_groups[e];
        entry_slot[e] = fill[g] - gq_offsets[g];
        gq_queries[fill[g]++] = qi;
      }
  }
  bool ids_rise = true;  // row ids rise with the row index, so along every (ascending) group
  if (row_ids)
    for (int64_t r = 1; r < n && ids_rise; ++r) ids_rise = row_ids[r] > row_ids[r - 1];

  // Lists: the g-th group's block (from block[g]) holds its queries' lists, keff(g) =
  // min(k, its rows) apart. (Room for k a list, zero-filled, had taken 4 GB and 34 % of the
  // time in page clearing for 1,000 queries x 258 groups at k = 1,000.)
  const auto keff_of = [&](int64_t g) { return std::min(k, f.group_offsets[g + 1] - f.group_offsets[g]); };
  std::vector<int64_t> block(G + 1, 0);
  for (int64_t g = 0; g < G; ++g) block[g + 1] = block[g] + (gq_offsets[g + 1] - gq_offsets[g]) * keff_of(g);
  std::unique_ptr<Hit<T>[]> partial(new Hit<T>[static_cast<size_t>(block[G])]);  // written before read
  std::vector<int64_t> partial_size(static_cast<size_t>(entries), 0);
  std::vector<int64_t> items;  // (group, query block) pairs, as g * blocks_max + qb
  int64_t blocks_max = 1;
  for (int64_t g = 0; g < G; ++g)
    blocks_max = std::max(blocks_max, (gq_offsets[g + 1] - gq_offsets[g] + kQueryBlock - 1) / kQueryBlock);
  for (int64_t g = 0; g < G; ++g) {
    if (f.group_offsets[g + 1] == f.group_offsets[g]) continue;  // no rows: empty lists
    for (int64_t qb = 0; qb * kQueryBlock < gq_offsets[g + 1] - gq_offsets[g]; ++qb) items.push_back(g * blocks_max + qb);
  }
  const int level = kernel_level();

#pragma omp parallel
  {
    // A group's lists hold min(k, its rows): in the lanes whenever that is at most kLaneMaxK.
    RowListWork<T> ws(d, std::min(k, kLaneMaxK));
    std::vector<T> gathered(static_cast<size_t>(kQueryBlock * std::max<int64_t>(d, 1))), gathered_norms(kQueryBlock);
#pragma omp for schedule(dynamic, 1)
    for (size_t it = 0; it < items.size(); ++it) {
      const int64_t g = items[it] / blocks_max, qb = items[it] % blocks_max;
      const int64_t r0 = f.group_offsets[g], m = f.group_offsets[g + 1] - r0;
      const int64_t q_first = gq_offsets[g] + qb * kQueryBlock;
      const int64_t nqg = std::min(kQueryBlock, gq_offsets[g + 1] - q_first);
      for (int64_t i = 0; i < nqg; ++i) {  // the block's queries, contiguous
        const int64_t qi = gq_queries[q_first + i];
        std::memcpy(&gathered[i * d], queries + qi * d, sizeof(T) * d);
        if (qnorm) gathered_norms[i] = qnorm[qi];
      }
      const int64_t keff = keff_of(g);
      // The block's lists start at its first query's slot in the group's block.
      Hit<T>* lists = &partial[block[g] + qb * kQueryBlock * keff];
      int64_t* sizes = &partial_size[q_first];
      const RowListJob<T, S> job{gathered.data(), nqg, db, n, d, metric, keff, f.group_rows + r0, m,
                                 nullptr, row_ids, xnorm, qnorm ? gathered_norms.data() : nullptr,
                                 ids_rise, std::max<int64_t>(m, 1), lists, sizes};
      row_list_item(level, job, 0, 0, ws);
    }
  }

  std::vector<Hit<T>> merged_storage;
#pragma omp parallel for schedule(static) firstprivate(merged_storage)
  for (int64_t qi = 0; qi < nq; ++qi) {
    merged_storage.resize(2 * k);
    // A row in two of the query's groups (groups may overlap; partitions do not) once.
    TopKBuffer<T> merged(merged_storage.data(), k, /*unique_ids=*/true);
    for (int64_t e = f.query_group_offsets[qi]; e < f.query_group_offsets[qi + 1]; ++e) {
      const int64_t g = f.query_groups[e], slot = entry_slot[e];
      const Hit<T>* h = &partial[block[g] + slot * keff_of(g)];
      for (int64_t i = 0; i < partial_size[gq_offsets[g] + slot]; ++i) merged.push(h[i].dist, h[i].id);
    }
    merged.write_sorted(out_dist + qi * k, out_ids + qi * k, k);
  }
}

// dots[r] = <q, rows[r]> for four rows of d values: the query's vectors are loaded once for
// the four, and four accumulator chains keep the FMAs busy.
struct FourDots {
  template <int VB, typename T>
  __attribute__((always_inline)) static void run(const T* const& q, const T* const* const& rows,
                                                 const int64_t& d, T* const& dots) {
    using V = typename Vec<T, VB>::type;
    constexpr int W = Vec<T, VB>::lanes;
    V acc[4] = {V{}, V{}, V{}, V{}};
    int64_t j = 0;
    for (; j + W <= d; j += W) {
      const V qv = *reinterpret_cast<const V*>(q + j);
      for (int r = 0; r < 4; ++r) acc[r] += qv * *reinterpret_cast<const V*>(rows[r] + j);
    }
    for (int r = 0; r < 4; ++r) {
      T lanes[W];
      std::memcpy(lanes, &acc[r], sizeof(V));
      T sum = 0;
      for (int l = 0; l < W; ++l) sum += lanes[l];
      for (int64_t jj = j; jj < d; ++jj) sum += q[jj] * rows[r][jj];
      dots[r] = sum;
    }
  }
};

// Per-query masks allowing at least this share of (query, row) pairs take one pass over all
// rows, masking as they fold, rather than per-query candidate lists: the pass reads a row
// once per 256 queries, the lists read each candidate on its own. Measured crossovers (1,000
// queries, d = 384, 2 threads, AVX-512 EPYC with 32 MB of L3 a core complex): 15 % with
// 7.7 MB of rows, 10 % with 31 MB, 6 % with 154 MB (the lists' cost per candidate grows as
// the rows leave the cache: 19, 25 and 42 ns; the pass's per pair stays 2.4-2.9 ns).
constexpr double kCachedRowsBytes = 32.0 * 1024 * 1024;
constexpr double kDenseFromCached = 0.12;
constexpr double kDenseFromUncached = 0.06;

// Candidate rows are scored this many rows after their prefetch: rows of a per-query list
// are scattered, so without it each one waited on memory in turn.
constexpr int64_t kPrefetchRows = 8;

template <typename S>
inline void prefetch_row(const S* row, int64_t d) {
  const char* p = reinterpret_cast<const char*>(row);
  for (int64_t b = 0; b < int64_t(sizeof(S)) * d; b += 64) __builtin_prefetch(p + b);
}

// ---------------------------------------------------------------------------------------
// Per-query candidate lists (a selective per-query filter): one query against its own rows,
// four rows at a time, straight from where they are stored (float16 rows are converted
// first). The rows are not shared between queries, so this reads every candidate row from
// memory: it wins only while the lists are short (see kDenseFromCached).
// ---------------------------------------------------------------------------------------
template <typename List, typename T, typename S>
void search_per_query_lists_with(const T* queries, int64_t nq, const S* db, int64_t d, Metric metric, int64_t k,
                                 const int64_t* offsets, const int64_t* cand, const int64_t* row_ids,
                                 const T* xnorm, const T* qnorm, T* out_dist, int64_t* out_ids) {
  constexpr bool kHeap = std::is_same_v<List, TopK<T>>;
  const int level = kernel_level();
#pragma omp parallel
  {
    std::vector<Hit<T>> storage(static_cast<size_t>(kHeap ? k : 2 * k));
    std::vector<T> converted(std::is_same_v<S, T> ? 0 : 4 * std::max<int64_t>(d, 1));
#pragma omp for schedule(dynamic, 4)
    for (int64_t qi = 0; qi < nq; ++qi) {
      List list = [&] {
        if constexpr (kHeap) return TopK<T>(storage.data(), k);
        else return TopKBuffer<T>(storage.data(), k, /*unique_ids=*/true);
      }();
      const int64_t b = offsets[qi], e = offsets[qi + 1];
      const T qn = qnorm ? qnorm[qi] : T(0);
      for (int64_t i = b; i < std::min(e, b + kPrefetchRows); ++i) prefetch_row(db + cand[i] * d, d);
      for (int64_t i = b; i < e; i += 4) {
        const int64_t nr = std::min<int64_t>(4, e - i);
        for (int64_t p = i + kPrefetchRows; p < std::min(e, i + kPrefetchRows + 4); ++p)
          prefetch_row(db + cand[p] * d, d);
        const T* rows[4];
        for (int64_t r = 0; r < 4; ++r) {
          const S* src = db + cand[i + std::min(r, nr - 1)] * d;
          if constexpr (std::is_same_v<S, T>) {
            rows[r] = src;
          } else {
            load_values(src, d, &converted[r * d]);
            rows[r] = &converted[r * d];
          }
        }
        T s[4];
        const T* const* row_ptrs = rows;
        T* dots = s;
        simd::dispatch_at<FourDots>(level, queries + qi * d, row_ptrs, d, dots);
        for (int64_t r = 0; r < nr; ++r) {
          const int64_t row = cand[i + r];
          const T dist = to_distance(s[r], metric, qn, xnorm ? xnorm[row] : T(0));
          if (!list.may_enter(dist)) continue;
          const int64_t id = row_ids ? row_ids[row] : row;
          // A row listed twice must not appear twice (the buffer drops repeats as it cuts).
          bool dup = false;
          if constexpr (kHeap)
            for (int64_t h = 0; h < list.size(); ++h)
              if (list.data()[h].id == id && list.data()[h].dist == dist) dup = true;
          if (!dup) list.push(dist, id);
        }
      }
      list.write_sorted(out_dist + qi * k, out_ids + qi * k, k);
    }
  }
}

template <typename T, typename S>
void search_per_query_lists(const T* queries, int64_t nq, const S* db, int64_t d,
                            Metric metric, int64_t k, const int64_t* offsets,
                            const int64_t* cand, const int64_t* row_ids, const T* xnorm,
                            const T* qnorm, T* out_dist, int64_t* out_ids) {
  // Short lists keep a heap, checked for a repeat of the row at each push; long ones a buffer.
  if (k <= kLaneMaxK)
    search_per_query_lists_with<TopK<T>>(queries, nq, db, d, metric, k, offsets, cand, row_ids, xnorm, qnorm,
                                         out_dist, out_ids);
  else
    search_per_query_lists_with<TopKBuffer<T>>(queries, nq, db, d, metric, k, offsets, cand, row_ids, xnorm,
                                               qnorm, out_dist, out_ids);
}

template <typename T, typename S>
void exact_search_typed(const T* queries, int64_t nq, const S* db, int64_t n, int64_t d,
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
      xnorm_store = row_sqnorms<T>(db, n, d);
      xnorm = xnorm_store.data();
    }
  }

  if (f.query_group_offsets) {
    search_groups(queries, nq, db, n, d, metric, k, f, row_ids, xnorm, qnorm, out_dist, out_ids);
    return;
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
    const double rows_bytes = double(n) * double(d) * double(sizeof(S));
    if (density >= (rows_bytes <= kCachedRowsBytes ? kDenseFromCached : kDenseFromUncached)) {
      search_row_list<T, S>(queries, nq, db, n, d, metric, k, nullptr, n, f.mask, row_ids, xnorm, qnorm,
                            out_dist, out_ids);
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
    const int64_t m = static_cast<int64_t>(rows.size());
    const int64_t* row_list = m == n ? nullptr : rows.data();
    search_row_list<T, S>(queries, nq, db, n, d, metric, k, row_list, m, nullptr, row_ids, xnorm, qnorm,
                          out_dist, out_ids);
    return;
  }
  search_row_list<T, S>(queries, nq, db, n, d, metric, k, nullptr, n, nullptr, row_ids, xnorm, qnorm,
                        out_dist, out_ids);
}

// Offsets that start at 0 and never decrease, ending at most at `limit` values.
void check_offsets(const char* name, const int64_t* offsets, int64_t count) {
  check_pointer(name, offsets, count + 1);
  if (offsets[0] != 0)
    throw ValueError(std::string(name) + ": expected " + name + "[0] = 0, got " + std::to_string(offsets[0]));
  for (int64_t i = 0; i < count; ++i)
    if (offsets[i + 1] < offsets[i])
      throw ValueError(std::string(name) + ": expected non-decreasing values, got [" + std::to_string(i + 1) +
                       "] = " + std::to_string(offsets[i + 1]) + " < [" + std::to_string(i) +
                       "] = " + std::to_string(offsets[i]));
}

void check_groups(const Filter& f, int64_t nq, int64_t n) {
  if (f.groups < 0) throw ValueError("filter.groups: expected a count >= 0, got " + std::to_string(f.groups));
  check_offsets("filter.group_offsets", f.group_offsets, f.groups);
  check_pointer("filter.group_rows", f.group_rows, f.group_offsets[f.groups]);
  for (int64_t g = 0; g < f.groups; ++g) {
    if (f.group_offsets[g + 1] - f.group_offsets[g] > kMaxChunkRows)
      throw ValueError("filter.group_offsets: expected groups of at most 2^30 rows, got " +
                       std::to_string(f.group_offsets[g + 1] - f.group_offsets[g]) + " in group " + std::to_string(g));
    for (int64_t i = f.group_offsets[g]; i < f.group_offsets[g + 1]; ++i) {
      const int64_t r = f.group_rows[i];
      if (r < 0 || r >= n || (i > f.group_offsets[g] && r <= f.group_rows[i - 1]))
        throw ValueError("filter.group_rows: expected strictly ascending rows in [0, " + std::to_string(n - 1) +
                         "] within each group, got group_rows[" + std::to_string(i) + "] = " + std::to_string(r) +
                         " in group " + std::to_string(g));
    }
  }
  check_offsets("filter.query_group_offsets", f.query_group_offsets, nq);
  const int64_t entries = f.query_group_offsets[nq];
  check_pointer("filter.query_groups", f.query_groups, entries);
  std::vector<int64_t> seen(f.groups, -1);
  for (int64_t qi = 0; qi < nq; ++qi)
    for (int64_t e = f.query_group_offsets[qi]; e < f.query_group_offsets[qi + 1]; ++e) {
      const int64_t g = f.query_groups[e];
      if (g < 0 || g >= f.groups || seen[g] == qi)
        throw ValueError("filter.query_groups: expected distinct groups in [0, " + std::to_string(f.groups - 1) +
                         "] for each query, got query_groups[" + std::to_string(e) + "] = " + std::to_string(g) +
                         " for query " + std::to_string(qi));
      seen[g] = qi;
    }
}

}  // namespace

namespace detail {
void exact_search_cpu(DType dtype, const void* queries, int64_t nq, const void* database,
                      DType db_dtype, int64_t n, int64_t d, Metric metric, int64_t k,
                      const Filter& filter, const int64_t* row_ids, const void* db_sqnorms,
                      void* out_dist, int64_t* out_ids) {
  if (db_dtype != dtype) {  // float16 rows, float32 queries (checked by exact_search)
    exact_search_typed(static_cast<const float*>(queries), nq, static_cast<const Half*>(database),
                       n, d, metric, k, filter, row_ids, static_cast<const float*>(db_sqnorms),
                       static_cast<float*>(out_dist), out_ids);
    return;
  }
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
  exact_search(device, dtype, queries, nq, database, dtype, n, d, metric, k, filter, row_ids,
               db_sqnorms, out_dist, out_ids, stream);
}

void exact_search(Device device, DType dtype, const void* queries, int64_t nq,
                  const void* database, DType db_dtype, int64_t n, int64_t d, Metric metric,
                  int64_t k, const Filter& filter, const int64_t* row_ids,
                  const void* db_sqnorms, void* out_dist, int64_t* out_ids, uintptr_t stream) {
  if (db_dtype != dtype &&
      !(device == Device::CPU && dtype == DType::Float32 && db_dtype == DType::Float16))
    throw TypeError(std::string("database: expected the dtype of queries (") + dtype_name(dtype) +
                    "), or float16 with float32 queries on the CPU, got " +
                    dtype_name(db_dtype) + (device == Device::CPU ? "" : " on CUDA"));
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
  if ((filter.mask != nullptr) + (filter.cand_offsets != nullptr) + (filter.query_group_offsets != nullptr) > 1)
    throw ValueError("filter: expected at most one of a mask, candidate lists and row groups, got several");
  if (filter.cand_offsets && filter.mask_per_query)
    throw ValueError("filter.mask_per_query: expected false with candidate lists, got true");
  if (device == Device::CUDA) {
    check_cuda_compiled("exact_search");
    if (filter.cand_offsets || filter.query_group_offsets)
      throw ValueError("filter: candidate lists and row groups are CPU only; pass a byte mask on CUDA");
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
  if (filter.query_group_offsets) check_groups(filter, nq, n);
  if (filter.mask) check_pointer("filter.mask", filter.mask, filter.mask_per_query ? nq * n : n);
  detail::exact_search_cpu(dtype, queries, nq, database, db_dtype, n, d, metric, k, filter,
                           row_ids, db_sqnorms, out_dist, out_ids);
}

}  // namespace affectkit::knn
