// Filtered k-nearest-neighbour search over embeddings: exact (blocked scan with a fused
// running top-k) and graph (HNSW-style) search.
#pragma once

#include <array>
#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <vector>

#include "../core/core.h"

namespace affectkit::knn {

// Distances are "smaller is closer" for every metric:
//   InnerProduct: -<q, x>
//   L2:           ||q - x||^2 (squared Euclidean, clamped at 0)
//   Cosine:       1 - <q, x>; the caller passes unit-norm vectors (normalise at add time).
enum class Metric : int32_t { InnerProduct = 0, L2 = 1, Cosine = 2 };
Metric metric_from_code(int32_t code, const char* arg);  // throws ValueError on unknown codes

// Which database rows each query may return. At most one of `mask` and `cand_offsets`.
struct Filter {
  // Byte mask (nonzero = allowed): (n,) shared by every query, or (nq, n) per query.
  const uint8_t* mask = nullptr;
  bool mask_per_query = false;
  // Per-query candidate row lists in CSR form: query i may return the rows
  // cand_rows[cand_offsets[i] : cand_offsets[i + 1]] (each in [0, n); duplicates are ignored).
  const int64_t* cand_offsets = nullptr;  // (nq + 1,)
  const int64_t* cand_rows = nullptr;
  // Per-query lists as unions of shared groups of rows (k-means partitions): group g holds
  // the rows group_rows[group_offsets[g] : group_offsets[g + 1]] (strictly ascending), and
  // query i may return the rows of the distinct groups
  // query_groups[query_group_offsets[i] : query_group_offsets[i + 1]]. Each group's rows are
  // scored against all of its queries at once (the shared-row-list kernel), so a row is read
  // once per group rather than once per query. Exclusive with `mask` and `cand_offsets`.
  int64_t groups = 0;
  const int64_t* group_offsets = nullptr;        // (groups + 1,)
  const int64_t* group_rows = nullptr;
  const int64_t* query_group_offsets = nullptr;  // (nq + 1,)
  const int64_t* query_groups = nullptr;
};

// Checks float32 rows (n, d) for NaN and inf and, when dst is not null, writes them scaled to
// unit norm into dst (zero rows stay zero; dst must not overlap src): the first row holding a
// NaN or an inf, or -1 when there is none (dst is then complete).
int64_t prepare_rows(const float* src, float* dst, int64_t n, int64_t d);

// Exact filtered search. queries (nq, d) and database (n, d) are contiguous, of `dtype`
// (CPU: float32 or float64; CUDA: float32 or float16). For each query the k allowed rows
// with the smallest distance, ascending; ties go to the smaller id. Rows whose distance is
// NaN are never returned. Fewer than k allowed rows: the rest is id -1, distance +inf.
//   row_ids:     optional (n,) int64; the id reported (and used for tie-breaks) for a row.
//                Null: the row index itself.
//   db_sqnorms:  optional (n,) ||x||^2 in the database dtype for L2 (computed when null).
//   out_dist:    (nq, k) of `dtype`; out_ids: (nq, k) int64.
// Never materialises the (nq, n) score matrix: blocks of queries meet tiles of rows, and
// each tile's scores are folded into a running top-k per query at once.
void exact_search(Device device, DType dtype, const void* queries, int64_t nq,
                  const void* database, int64_t n, int64_t d, Metric metric, int64_t k,
                  const Filter& filter, const int64_t* row_ids, const void* db_sqnorms,
                  void* out_dist, int64_t* out_ids, uintptr_t stream = 0);

// The same with the database's dtype given apart: `db_dtype` equal to `dtype` (as above), or,
// on the CPU, float16 rows (IEEE binary16) with float32 queries. Those rows are converted to
// float32 as they are packed for scoring (AVX-512F or F16C at run time, scalar otherwise) and
// scored in float32: the result is the float32 search of the rows rounded to float16, at half
// the stored bytes. db_sqnorms (optional) and out_dist are then float32.
void exact_search(Device device, DType dtype, const void* queries, int64_t nq,
                  const void* database, DType db_dtype, int64_t n, int64_t d, Metric metric,
                  int64_t k, const Filter& filter, const int64_t* row_ids,
                  const void* db_sqnorms, void* out_dist, int64_t* out_ids,
                  uintptr_t stream = 0);

// An HNSW-style proximity graph over float32 or float16 rows (`row_dtype`, fixed at
// construction) that the caller owns and keeps alive (the graph stores only links; rows are
// passed to add and search). Queries are float32; float16 rows are scored against them in
// float32 (F16C / AVX-512 conversion at run time, scalar otherwise). Filtered search walks
// through every node but collects only allowed ones ("walk through, collect passing"), so
// the graph stays navigable however few rows pass; the beam stops once `ef` allowed rows
// are closer than every unexplored candidate. By default the walk scores 8-bit codes of the
// rows (walk_codes.h: a quarter of float32's bytes, which is what a walk waits for) and the
// beam it ends with is scored again on the rows.
// Construction inserts rows in parallel (OpenMP; a lock per node guards writes to its links,
// which walks read word by word without it); levels are drawn from a seeded generator, so
// the structure depends only on the seed and on the interleaving of the threads.
class WalkCodes;  // walk_codes.h

class HnswGraph {
 public:
  // walk_codes: keep 8-bit codes of the rows (walk_codes.h; dim rounded up to 64 bytes a row)
  // in step with add(), for search to walk on.
  HnswGraph(int64_t dim, Metric metric, int64_t M, int64_t ef_construction, uint64_t seed,
            DType row_dtype = DType::Float32, bool walk_codes = true);
  ~HnswGraph();

  // Inserts rows [size(), size() + count) of `rows` (the whole table, row-major, row_dtype).
  void add(const void* rows, int64_t count);

  // For each query: up to k allowed rows < size() (row indices, ascending distance; -1/+inf
  // padding). `allow`: null (all rows), (size(),) bytes shared, or (nq, size()) per query.
  // With walk codes the walk ranks nodes by code distances and its beam (ef rows) is scored
  // again on `rows`: the distances returned are always those of the rows.
  void search(const void* rows, const float* queries, int64_t nq, int64_t k, int64_t ef,
              const uint8_t* allow, bool allow_per_query, float* out_dist,
              int64_t* out_rows) const;

  // Walk codes. A graph rebuilt by from_flat has none: set_walk_codes installs saved ones
  // (count must be size(); with view, aligned codes are used in place, see WalkCodes::assign),
  // code_walk codes every row from the rows; drop_walk_codes frees them (searches then walk
  // on the rows). Null when there are none.
  const WalkCodes* walk_codes() const { return codes_.get(); }
  void set_walk_codes(const uint8_t* codes, int64_t count, const float* lo, const float* step,
                      const uint8_t* outside, bool view = false);
  void code_walk(const void* rows);
  void drop_walk_codes();
  // The distances a search's walk ranks nodes[0..n) (each in [0, size())) by for one query:
  // code distances, or the rows' own for rows outside the codes' ranges. For checking the
  // codes and their kernels; ValueError without codes.
  void walk_distances(const void* rows, const float* query, const int32_t* nodes, int64_t n,
                      float* out) const;

  // The level-0 lists against the rules add() keeps them by, for checking the build: lists
  // (full: at 2M links; marked: placed by the kept flags), marked lists not sorted by
  // (distance, id), kept links closer to an earlier kept link than to their node (the
  // heuristic would have pruned them), and pruned links, with those no earlier kept link prunes.
  struct LinkAudit {
    int64_t lists = 0, full = 0, marked = 0, unsorted = 0, kept_violations = 0, pruned = 0,
            pruned_unwitnessed = 0;
  };
  LinkAudit audit_links(const void* rows) const;
  // With the check on, every placement of a link into a marked list during add() is also
  // done by a re-selection of the whole list, and compared. Counted over lists whose kept
  // flags are the heuristic's own partition of their links: placements of a link the
  // heuristic prunes (the placement should equal the re-selection) and of one it keeps (the
  // same unless a link it prunes was the only one pruning another), and the mismatches of each.
  struct PlacementCheck {
    int64_t pruned = 0, pruned_mismatch = 0, kept = 0, kept_mismatch = 0;
  };
  void set_placement_check(bool on);
  PlacementCheck placement_check() const;

  int64_t size() const { return static_cast<int64_t>(level_.size()); }
  int64_t dim() const { return dim_; }
  int64_t M() const { return M_; }
  Metric metric() const { return metric_; }
  DType row_dtype() const { return row_dtype_; }

  // Flat int32 form for saving; from_flat validates every field and link. Float32 graphs are
  // written as format version 1 (11 header words, unchanged); float16 ones as version 2, whose
  // 12th header word is the row dtype. from_flat reads both.
  std::vector<int32_t> to_flat() const;
  static std::unique_ptr<HnswGraph> from_flat(const int32_t* data, int64_t count);

  struct Impl;  // search helpers (hnsw_cpu.cpp)

 private:
  int64_t dim_, M_, ef_construction_;
  Metric metric_;
  DType row_dtype_;
  uint64_t rng_state_;
  int32_t entry_ = -1;
  int32_t max_level_ = -1;
  std::vector<int32_t> level_;               // top level of each node
  // Links per level: [count, cap slots]. Level 0 (where searches spend their time) of every
  // node back to back, so a node's links are one address computation away (a vector per node
  // cost a dependent cache miss on its header before each expansion); levels 1..top per node.
  std::vector<int32_t> links0_;              // (size, 2M + 1)
  std::vector<std::vector<int32_t>> upper_;  // per node: levels 1..top, (M + 1) each
  std::vector<std::unique_ptr<std::mutex>> locks_;  // one per node, guards its links
  // Level-0 lists once a full list has been re-selected (marked0_[node] = 1): links sorted by
  // (distance to the node, id), and bit i of the node's kept0_ words set where the heuristic
  // kept link i (clear: a pruned candidate filling a free slot). With them a new link is
  // placed by a few distances (Impl::connect), not a re-selection of the whole list. Built by
  // add(), not saved: a loaded graph marks each list again at its first re-selection.
  std::vector<uint8_t> marked0_;
  std::vector<uint64_t> kept0_;  // (size, kept_words())
  bool check_placement_ = false;
  std::array<std::atomic<int64_t>, 4> placement_counts_{};  // PlacementCheck's fields
  int64_t kept_words() const { return (2 * M_ + 63) / 64; }
  std::mutex global_;                                // guards entry_ and max_level_
  std::unique_ptr<WalkCodes> codes_;                 // null: searches walk on the rows
  int64_t cap(int level) const { return level == 0 ? 2 * M_ : M_; }
  // Where a level's block starts in a node's saved links (level 0 first, then 1..top).
  int64_t offset(int level) const { return level == 0 ? 0 : (2 * M_ + 1) + (level - 1) * (M_ + 1); }
  int32_t* slot(int32_t node, int level) {
    return level == 0 ? links0_.data() + node * (2 * M_ + 1) : upper_[node].data() + (level - 1) * (M_ + 1);
  }
  const int32_t* slot(int32_t node, int level) const {
    return level == 0 ? links0_.data() + node * (2 * M_ + 1) : upper_[node].data() + (level - 1) * (M_ + 1);
  }
  int draw_level();
};

namespace detail {
void exact_search_cpu(DType dtype, const void* queries, int64_t nq, const void* database,
                      DType db_dtype, int64_t n, int64_t d, Metric metric, int64_t k,
                      const Filter& filter, const int64_t* row_ids, const void* db_sqnorms,
                      void* out_dist, int64_t* out_ids);
void exact_search_cuda(DType dtype, const void* queries, int64_t nq, const void* database,
                       int64_t n, int64_t d, Metric metric, int64_t k, const Filter& filter,
                       const int64_t* row_ids, const void* db_sqnorms, void* out_dist,
                       int64_t* out_ids, uintptr_t stream);
}  // namespace detail

}  // namespace affectkit::knn
