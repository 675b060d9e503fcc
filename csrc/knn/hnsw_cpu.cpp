// HNSW-style graph: parallel construction and filtered search ("walk through, collect passing").
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <queue>
#include <string>
#include <utility>
#include <vector>

#include "../core/dispatch.h"
#include "f16.h"
#include "knn.h"
#include "walk_codes.h"

namespace affectkit::knn {
namespace {

typedef float V8 __attribute__((vector_size(32), aligned(4)));

AFFECTKIT_SIMD_CLONES float dot(const float* __restrict a, const float* __restrict b, int64_t d) {
  V8 acc0{}, acc1{};
  int64_t j = 0;
  for (; j + 16 <= d; j += 16) {
    acc0 += *reinterpret_cast<const V8*>(a + j) * *reinterpret_cast<const V8*>(b + j);
    acc1 += *reinterpret_cast<const V8*>(a + j + 8) * *reinterpret_cast<const V8*>(b + j + 8);
  }
  V8 acc = acc0 + acc1;
  float s = 0;
  for (int l = 0; l < 8; ++l) s += acc[l];
  for (; j < d; ++j) s += a[j] * b[j];
  return s;
}

AFFECTKIT_SIMD_CLONES float l2sq(const float* __restrict a, const float* __restrict b, int64_t d) {
  V8 acc0{}, acc1{};
  int64_t j = 0;
  for (; j + 16 <= d; j += 16) {
    V8 t0 = *reinterpret_cast<const V8*>(a + j) - *reinterpret_cast<const V8*>(b + j);
    V8 t1 = *reinterpret_cast<const V8*>(a + j + 8) - *reinterpret_cast<const V8*>(b + j + 8);
    acc0 += t0 * t0;
    acc1 += t1 * t1;
  }
  V8 acc = acc0 + acc1;
  float s = 0;
  for (int l = 0; l < 8; ++l) s += acc[l];
  for (; j < d; ++j) s += (a[j] - b[j]) * (a[j] - b[j]);
  return s;
}

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
typedef float V16 __attribute__((vector_size(64), aligned(4)));

__attribute__((target("avx512f"))) float dot_512(const float* __restrict a,
                                                 const float* __restrict b, int64_t d) {
  V16 acc0{}, acc1{};
  int64_t j = 0;
  for (; j + 32 <= d; j += 32) {
    acc0 += *reinterpret_cast<const V16*>(a + j) * *reinterpret_cast<const V16*>(b + j);
    acc1 += *reinterpret_cast<const V16*>(a + j + 16) * *reinterpret_cast<const V16*>(b + j + 16);
  }
  V16 acc = acc0 + acc1;
  float s = 0;
  for (int l = 0; l < 16; ++l) s += acc[l];
  for (; j < d; ++j) s += a[j] * b[j];
  return s;
}

__attribute__((target("avx512f"))) float l2sq_512(const float* __restrict a,
                                                  const float* __restrict b, int64_t d) {
  V16 acc0{}, acc1{};
  int64_t j = 0;
  for (; j + 32 <= d; j += 32) {
    V16 t0 = *reinterpret_cast<const V16*>(a + j) - *reinterpret_cast<const V16*>(b + j);
    V16 t1 = *reinterpret_cast<const V16*>(a + j + 16) - *reinterpret_cast<const V16*>(b + j + 16);
    acc0 += t0 * t0;
    acc1 += t1 * t1;
  }
  V16 acc = acc0 + acc1;
  float s = 0;
  for (int l = 0; l < 16; ++l) s += acc[l];
  for (; j < d; ++j) s += (a[j] - b[j]) * (a[j] - b[j]);
  return s;
}
#endif

// Distances from a to four rows at once (dot products, or squared L2 with kL2), each with
// exactly the accumulation order of dot / l2sq (or dot_512 / l2sq_512 for W = 16), so the
// results are bit-identical: four rows' loads are in flight together, where one row at a
// time waits on memory for each (the graph walk's rows are rarely cached).
// Vector types only cross always-inline helpers here: no ABI boundary.
#pragma GCC diagnostic ignored "-Wpsabi"

// (Loads by memcpy: a template argument drops V8's aligned(4), and the rows are not aligned.)
template <typename V>
inline __attribute__((always_inline)) V load_unaligned(const float* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}

template <typename V, int W, bool kL2>
inline __attribute__((always_inline)) void four_rows(const float* __restrict a, const float* const* x, int64_t d,
                                                     float* out) {
  V acc[4][2] = {};
  int64_t j = 0;
  for (; j + 2 * W <= d; j += 2 * W) {
    const V a0 = load_unaligned<V>(a + j), a1 = load_unaligned<V>(a + j + W);
    for (int r = 0; r < 4; ++r) {
      V t0 = load_unaligned<V>(x[r] + j), t1 = load_unaligned<V>(x[r] + j + W);
      if constexpr (kL2) {
        t0 = a0 - t0;
        t1 = a1 - t1;
        acc[r][0] += t0 * t0;
        acc[r][1] += t1 * t1;
      } else {
        acc[r][0] += a0 * t0;
        acc[r][1] += a1 * t1;
      }
    }
  }
  for (int r = 0; r < 4; ++r) {
    const V sum = acc[r][0] + acc[r][1];
    float s = 0;
    for (int l = 0; l < W; ++l) s += sum[l];
    for (int64_t i = j; i < d; ++i) s += kL2 ? (a[i] - x[r][i]) * (a[i] - x[r][i]) : a[i] * x[r][i];
    out[r] = s;
  }
}

AFFECTKIT_SIMD_CLONES void dot4(const float* a, const float* const* x, int64_t d, float* out) {
  four_rows<V8, 8, false>(a, x, d, out);
}
AFFECTKIT_SIMD_CLONES void l2sq4(const float* a, const float* const* x, int64_t d, float* out) {
  four_rows<V8, 8, true>(a, x, d, out);
}
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target("avx512f"))) void dot4_512(const float* a, const float* const* x, int64_t d, float* out) {
  four_rows<V16, 16, false>(a, x, d, out);
}
__attribute__((target("avx512f"))) void l2sq4_512(const float* a, const float* const* x, int64_t d, float* out) {
  four_rows<V16, 16, true>(a, x, d, out);
}
#endif

using DistFn = float (*)(const float*, const float*, int64_t);
using Dist4Fn = void (*)(const float*, const float* const*, int64_t, float*);

// The widest kernels this CPU runs, picked once at run time.
struct Kernels {
  DistFn dot = &affectkit::knn::dot;
  DistFn l2sq = &affectkit::knn::l2sq;
  Dist4Fn dot4 = &affectkit::knn::dot4;
  Dist4Fn l2sq4 = &affectkit::knn::l2sq4;
  Kernels() {
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && std::getenv("AFFECTKIT_NO_AVX512") == nullptr) {
      dot = &dot_512;
      l2sq = &l2sq_512;
      dot4 = &dot4_512;
      l2sq4 = &l2sq4_512;
    }
#endif
  }
};
const Kernels& kernels() {
  static const Kernels k;
  return k;
}

// Nodes seen by one walk: a bit per node (25 KB at 200,000 rows, cache-resident, where an
// epoch per node took 800 KB), cleared word by word where the last walk set bits.
struct Visited {
  std::vector<uint64_t> bits;
  std::vector<int64_t> touched;  // words with bits set
  void reset(size_t n) {
    const size_t words = (n + 63) / 64;
    if (bits.size() < words) {
      bits.assign(words, 0);
      touched.clear();
      return;
    }
    for (int64_t w : touched) bits[w] = 0;
    touched.clear();
  }
  bool test_and_set(int32_t i) {
    uint64_t& word = bits[static_cast<size_t>(i) >> 6];
    const uint64_t bit = uint64_t{1} << (i & 63);
    if (word & bit) return true;
    if (!word) touched.push_back(static_cast<int64_t>(i) >> 6);
    word |= bit;
    return false;
  }
};

using Cand = std::pair<float, int32_t>;  // (distance, node); pair order breaks ties by node
using MinQueue = std::priority_queue<Cand, std::vector<Cand>, std::greater<Cand>>;
using MaxQueue = std::priority_queue<Cand>;

constexpr int32_t kMagic = 0x57534E48;  // "HNSW"
constexpr int32_t kVersionF32 = 1;      // 11 header words, float32 rows
constexpr int32_t kVersionTyped = 2;    // 12 header words, the last one the row dtype
constexpr int kHeaderF32 = 11;
constexpr int kMaxLevel = 30;

}  // namespace

struct HnswGraph::Impl {
  // Distance from a float32 vector q to stored row v (float32 or float16).
  static float dist(const HnswGraph& g, const float* q, const void* rows, int32_t v) {
    const int64_t at = static_cast<int64_t>(v) * g.dim_;
    if (g.row_dtype_ == DType::Float16) {
      const uint16_t* x = static_cast<const uint16_t*>(rows) + at;
      switch (g.metric_) {
        case Metric::InnerProduct: return -dot_f32_f16(q, x, g.dim_);
        case Metric::Cosine: return 1.0f - dot_f32_f16(q, x, g.dim_);
        default: return l2sq_f32_f16(q, x, g.dim_);
      }
    }
    const Kernels& k = kernels();
    const float* x = static_cast<const float*>(rows) + at;
    switch (g.metric_) {
      case Metric::InnerProduct: return -k.dot(q, x, g.dim_);
      case Metric::Cosine: return 1.0f - k.dot(q, x, g.dim_);
      default: return k.l2sq(q, x, g.dim_);
    }
  }

  // dist() of nodes v[0..n) into out[0..n): float32 rows four at a time.
  static void dists(const HnswGraph& g, const float* q, const void* rows, const int32_t* v, size_t n, float* out) {
    size_t i = 0;
    if (g.row_dtype_ != DType::Float16) {
      const Kernels& k = kernels();
      const bool l2 = g.metric_ != Metric::InnerProduct && g.metric_ != Metric::Cosine;
      for (; i + 4 <= n; i += 4) {
        const float* x[4];
        for (int r = 0; r < 4; ++r) x[r] = static_cast<const float*>(rows) + static_cast<int64_t>(v[i + r]) * g.dim_;
        (l2 ? k.l2sq4 : k.dot4)(q, x, g.dim_, out + i);
        if (g.metric_ == Metric::InnerProduct)
          for (int r = 0; r < 4; ++r) out[i + r] = -out[i + r];
        else if (g.metric_ == Metric::Cosine)
          for (int r = 0; r < 4; ++r) out[i + r] = 1.0f - out[i + r];
      }
    }
    for (; i < n; ++i) out[i] = dist(g, q, rows, v[i]);
  }

  // Row v as float32: the stored row itself, or its conversion into `buf`.
  static const float* row_f32(const HnswGraph& g, const void* rows, int32_t v,
                              std::vector<float>& buf) {
    const int64_t at = static_cast<int64_t>(v) * g.dim_;
    if (g.row_dtype_ != DType::Float16) return static_cast<const float*>(rows) + at;
    buf.resize(g.dim_);
    f16_to_f32(static_cast<const uint16_t*>(rows) + at, buf.data(), g.dim_);
    return buf.data();
  }

  static int64_t row_bytes(const HnswGraph& g) {
    return g.dim_ * (g.row_dtype_ == DType::Float16 ? 2 : 4);
  }

  // While the graph is being built, a node's link words are written under its lock and read
  // without it, each word whole (relaxed atomics): a walk may see a list mid-change, but
  // every word it reads is a node, and a count no larger than the list's room. Taking the
  // lock to read cost 10 % of a 200,000-row build in pthread_mutex_lock: every insertion's
  // walk starts at the same few upper nodes, whose locks' lines then move between the cores.
  static void store_word(int32_t* p, int32_t v) { __atomic_store_n(p, v, __ATOMIC_RELAXED); }

  // Copy a node's links at a level (word by word while the graph is being built).
  static void read_links(const HnswGraph& g, int32_t node, int level, bool building,
                         std::vector<int32_t>& out) {
    const int32_t* s = g.slot(node, level);
    if (!building) {
      out.assign(s + 1, s + 1 + s[0]);
      return;
    }
    const int64_t n = std::min<int64_t>(__atomic_load_n(s, __ATOMIC_RELAXED), g.cap(level));
    out.resize(n);
    for (int64_t i = 0; i < n; ++i) out[i] = __atomic_load_n(s + 1 + i, __ATOMIC_RELAXED);
  }

  static int32_t greedy(const HnswGraph& g, const void* rows, const float* q, int32_t cur,
                        int level, bool building) {
    float dcur = dist(g, q, rows, cur);
    std::vector<int32_t> nb;
    for (bool changed = true; changed;) {
      changed = false;
      read_links(g, cur, level, building, nb);
      for (int32_t v : nb) {
        const float dv = dist(g, q, rows, v);
        if (dv < dcur) {
          dcur = dv;
          cur = v;
          changed = true;
        }
      }
    }
    return cur;
  }

  // Beam search on one level; results ascending. `allow` (or null) decides which nodes may
  // be collected; every node is walked through regardless. With `wq` (a query prepared for
  // the graph's walk codes) nodes are ranked by code distances, and so is the result.
  static std::vector<Cand> beam(const HnswGraph& g, const void* rows, const float* q,
                                int32_t entry, int level, int64_t ef, const uint8_t* allow,
                                bool building, Visited& vis, const WalkCodes::Query* wq = nullptr) {
    vis.reset(g.level_.size());
    MinQueue cand;
    MaxQueue res;
    const WalkCodes* codes = wq ? g.codes_.get() : nullptr;
    const bool any_outside = codes && codes->outside_count() > 0;
    float d0;
    if (codes)
      walk_dists(g, rows, q, *wq, &entry, 1, &d0);
    else
      d0 = dist(g, q, rows, entry);
    cand.push({d0, entry});
    vis.test_and_set(entry);
    if (!allow || allow[entry]) res.push({d0, entry});
    std::vector<int32_t> copied_links, nb(g.cap(level));
    std::vector<float> dnb(g.cap(level));
    // What a scored node's distance reads: its code row, or its row.
    const char* scored = codes ? reinterpret_cast<const char*>(codes->data()) : static_cast<const char*>(rows);
    const int64_t bytes = codes ? codes->stride() : row_bytes(g);
    while (!cand.empty()) {
      const Cand c = cand.top();
      if (static_cast<int64_t>(res.size()) >= ef && c.first > res.top().first) break;
      cand.pop();
      // The links: copied word by word while the graph is being built, else read in place (a
      // copy per expansion was 5-7 % of a filtered search, in memmove).
      const int32_t* links;
      int32_t count;
      if (building) {
        read_links(g, c.second, level, true, copied_links);
        links = copied_links.data();
        count = static_cast<int32_t>(copied_links.size());
      } else {
        const int32_t* s = g.slot(c.second, level);
        links = s + 1;
        count = s[0];
      }
      // The likely next candidate's links, while this one's neighbours are scored.
      if (!cand.empty()) __builtin_prefetch(g.slot(cand.top().second, level));
      // Drop visited nodes and start loading the others' whole rows before computing
      // distances (the first 256 bytes alone: 13 % slower at 50 % selectivity, one thread;
      // expanding two candidates at once for twice the loads in flight gained nothing).
      size_t fresh = 0;
      for (int32_t i = 0; i < count; ++i) {
        const int32_t v = links[i];
        if (!vis.test_and_set(v)) {
          nb[fresh++] = v;
          const char* row = scored + static_cast<int64_t>(v) * bytes;
          for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(row + off);
          if (any_outside && codes->outside(v)) {  // scored on its row below
            const char* full = static_cast<const char*>(rows) + static_cast<int64_t>(v) * row_bytes(g);
            for (int64_t off = 0; off < row_bytes(g); off += 64) __builtin_prefetch(full + off);
          }
        }
      }
      if (codes)
        walk_dists(g, rows, q, *wq, nb.data(), fresh, dnb.data());
      else
        dists(g, q, rows, nb.data(), fresh, dnb.data());
      for (size_t i = 0; i < fresh; ++i) {
        const int32_t v = nb[i];
        const float dv = dnb[i];
        if (static_cast<int64_t>(res.size()) < ef || dv < res.top().first) {
          cand.push({dv, v});
          if (!allow || allow[v]) {
            res.push({dv, v});
            if (static_cast<int64_t>(res.size()) > ef) res.pop();
          }
        }
      }
    }
    std::vector<Cand> out(res.size());
    for (size_t i = out.size(); i-- > 0;) {
      out[i] = res.top();
      res.pop();
    }
    return out;
  }

  // The distances a walk on codes ranks nodes v[0..n) by: code distances, but the rows' own
  // for rows outside the codes' ranges (their clamped codes say little).
  static void walk_dists(const HnswGraph& g, const void* rows, const float* q,
                         const WalkCodes::Query& wq, const int32_t* v, size_t n, float* out) {
    const WalkCodes& codes = *g.codes_;
    codes.score(wq, g.metric_, v, n, out);
    if (codes.outside_count() > 0)
      for (size_t i = 0; i < n; ++i)
        if (codes.outside(v[i])) out[i] = dist(g, q, rows, v[i]);
  }

  // A beam ranked by code distances, scored again on the rows and sorted (loads first).
  static void rescore(const HnswGraph& g, const void* rows, const float* q, std::vector<Cand>& beam) {
    std::vector<int32_t> nodes(beam.size());
    std::vector<float> d(beam.size());
    const int64_t bytes = row_bytes(g);
    for (size_t i = 0; i < beam.size(); ++i) {
      nodes[i] = beam[i].second;
      const char* row = static_cast<const char*>(rows) + static_cast<int64_t>(nodes[i]) * bytes;
      for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(row + off);
    }
    dists(g, q, rows, nodes.data(), nodes.size(), d.data());
    for (size_t i = 0; i < beam.size(); ++i) beam[i].first = d[i];
    std::sort(beam.begin(), beam.end());
  }

  // The HNSW heuristic: keep a candidate only if it is closer to the base than to every kept
  // one (spreads links over directions); then fill free slots with the closest pruned ones,
  // which keeps more paths open for filtered walks. With `kept_flags`, also says which of the
  // returned links the heuristic kept (1) and which fill free slots (0).
  static std::vector<Cand> select(const HnswGraph& g, const void* rows,
                                  const std::vector<Cand>& sorted, int64_t m,
                                  std::vector<uint8_t>* kept_flags = nullptr) {
    if (static_cast<int64_t>(sorted.size()) <= m && !kept_flags) return sorted;
    std::vector<Cand> kept, pruned;
    std::vector<float> buf;
    for (const Cand& c : sorted) {
      if (static_cast<int64_t>(kept.size()) >= m) break;
      bool good = true;
      const float* cv = kept.empty() ? nullptr : row_f32(g, rows, c.second, buf);
      for (const Cand& r : kept)
        if (dist(g, cv, rows, r.second) < c.first) {
          good = false;
          break;
        }
      (good ? kept : pruned).push_back(c);
    }
    const size_t heuristic = kept.size();
    for (size_t i = 0; i < pruned.size() && static_cast<int64_t>(kept.size()) < m; ++i)
      kept.push_back(pruned[i]);
    if (kept_flags) {
      // Kept ones are those before `heuristic` in selection order; mark them before sorting.
      std::vector<std::pair<Cand, uint8_t>> marked(kept.size());
      for (size_t i = 0; i < kept.size(); ++i) marked[i] = {kept[i], i < heuristic ? 1 : 0};
      std::sort(marked.begin(), marked.end());
      kept_flags->resize(marked.size());
      for (size_t i = 0; i < marked.size(); ++i) kept[i] = marked[i].first, (*kept_flags)[i] = marked[i].second;
      return kept;
    }
    std::sort(kept.begin(), kept.end());
    return kept;
  }

  static bool kept_bit(const HnswGraph& g, int32_t node, int64_t i) {
    return (g.kept0_[node * g.kept_words() + i / 64] >> (i % 64)) & 1;
  }

  static void mark_list(HnswGraph& g, int32_t node, const std::vector<uint8_t>& flags) {
    uint64_t* w = g.kept0_.data() + node * g.kept_words();
    std::fill(w, w + g.kept_words(), 0);
    for (size_t i = 0; i < flags.size(); ++i)
      if (flags[i]) w[i / 64] |= uint64_t{1} << (i % 64);
    g.marked0_[node] = 1;
  }

  // The heuristic's choices over link[first + 1..], given those before (kept flags in `kept`;
  // link_dist(i): link i's distance to the list's node). A kept link needs testing only against
  // the links revived here; a pruned one against every link kept before it.
  template <typename LinkDist>
  static void rerun_after(const HnswGraph& g, const void* rows, const std::vector<int32_t>& link,
                          std::vector<uint8_t>& kept, int64_t first, LinkDist&& link_dist) {
    std::vector<int32_t> kept_links, revived;
    for (int64_t i = 0; i <= first; ++i)
      if (kept[i]) kept_links.push_back(link[i]);
    std::vector<float> buf;
    for (size_t i = first + 1; i < link.size(); ++i) {
      const float* row = row_f32(g, rows, link[i], buf);
      const float di = link_dist(static_cast<int64_t>(i));
      bool pruned = false;
      for (int32_t r : kept[i] ? revived : kept_links)
        if (dist(g, row, rows, r) < di) {
          pruned = true;
          break;
        }
      if (pruned) {
        kept[i] = 0;
        continue;
      }
      if (!kept[i]) revived.push_back(link[i]);
      kept[i] = 1;
      kept_links.push_back(link[i]);
    }
  }

  // A new link (dx, x) into the marked full level-0 list s of node b (under b's lock): the
  // list that re-selecting the old links and x gives, from a few distances. The list is sorted,
  // so the heuristic's choices among the links closer than x stand, and x is tested only
  // against the kept links before its place. A kept x prunes the later kept links closer to it
  // than to b; only then can later choices change, and the heuristic runs again from there.
  // One link goes: the farthest pruned one, else the last (select keeps every kept link and
  // fills up with the closest pruned ones). A re-selection took b's cap distances and then
  // the heuristic's (~250 at M = 32); this takes ~6 for the place and about one per kept link.
  // The graph is the one re-selection builds (set_placement_check compares the two).
  // Returns whether x is among the heuristic's kept links.
  static bool place_link(HnswGraph& g, const void* rows, int32_t b, int32_t* s, int32_t x, float dx) {
    const int64_t cap = g.cap(0);
    std::vector<float> bbuf, xbuf;
    const float* base = row_f32(g, rows, b, bbuf);
    std::vector<float> d(cap, std::numeric_limits<float>::quiet_NaN());
    auto link_dist = [&](int64_t i) {  // distance from b to link i, computed once
      if (std::isnan(d[i])) d[i] = dist(g, base, rows, s[1 + i]);
      return d[i];
    };
    // The place: the first link after (dx, x). The search's first probes, in cache together.
    for (int64_t i : {cap / 2, cap / 4, 3 * cap / 4})
      __builtin_prefetch(static_cast<const char*>(rows) + static_cast<int64_t>(s[1 + i]) * row_bytes(g));
    int64_t lo = 0, hi = cap;
    while (lo < hi) {
      const int64_t mid = (lo + hi) / 2;
      if (Cand{link_dist(mid), s[1 + mid]} < Cand{dx, x})
        lo = mid + 1;
      else
        hi = mid;
    }
    const int64_t pos = lo;
    std::vector<int32_t> kept_before, kept_after;
    std::vector<int64_t> after_at;
    for (int64_t i = 0; i < cap; ++i)
      if (kept_bit(g, b, i)) {
        (i < pos ? kept_before : kept_after).push_back(s[1 + i]);
        if (i >= pos) after_at.push_back(i);
      }
    // The heuristic stops at cap kept links: x, after them all, is never looked at.
    if (static_cast<int64_t>(kept_before.size()) >= cap) return false;
    const float* xv = row_f32(g, rows, x, xbuf);
    std::vector<float> dk(std::max(kept_before.size(), kept_after.size()));
    bool x_kept = true;
    for (size_t i = 0; i < kept_before.size() && x_kept; i += 4) {  // stops at the first pruner
      const size_t n = std::min<size_t>(4, kept_before.size() - i);
      dists(g, xv, rows, kept_before.data() + i, n, dk.data());
      for (size_t j = 0; j < n; ++j) x_kept = x_kept && !(dk[j] < dx);
    }
    // The new sequence: the old links with x at pos, kept flags updated.
    std::vector<int32_t> link(cap + 1);
    std::vector<uint8_t> kept(cap + 1);
    for (int64_t i = 0, j = 0; i <= cap; ++i) {
      if (i == pos) {
        link[i] = x, kept[i] = x_kept;
      } else {
        link[i] = s[1 + j], kept[i] = kept_bit(g, b, j);
        ++j;
      }
    }
    if (x_kept && !kept_after.empty()) {
      // x prunes the later kept links closer to it than to b.
      dists(g, xv, rows, kept_after.data(), kept_after.size(), dk.data());
      int64_t first_flip = -1;
      for (size_t i = 0; i < kept_after.size(); ++i)
        if (dk[i] < link_dist(after_at[i])) {
          kept[after_at[i] + 1] = 0;
          if (first_flip < 0) first_flip = after_at[i] + 1;
        }
      // A pruned link whose pruners x has all pruned is kept again, and may then prune later
      // links: from the first link x pruned on, the heuristic runs again (rarely needed).
      if (first_flip >= 0) rerun_after(g, rows, link, kept, first_flip, [&](int64_t i) {
          return i < pos ? link_dist(i) : i == pos ? dx : link_dist(i - 1);
        });
    }
    int64_t drop = cap;  // the last, unless a pruned link can go
    for (int64_t i = cap; i >= 0; --i)
      if (!kept[i]) {
        drop = i;
        break;
      }
    uint64_t* w = g.kept0_.data() + b * g.kept_words();
    std::fill(w, w + g.kept_words(), 0);
    for (int64_t i = 0, j = 0; i <= cap; ++i) {
      if (i == drop) continue;
      store_word(s + 1 + j, link[i]);
      if (kept[i]) w[j / 64] |= uint64_t{1} << (j % 64);
      ++j;
    }
    return x_kept;
  }

  // place_link, compared with the re-selection of the whole list (set_placement_check).
  static void checked_place_link(HnswGraph& g, const void* rows, int32_t b, int32_t* s, int32_t x, float dx) {
    const int64_t cap = g.cap(0);
    std::vector<float> buf;
    const float* base = row_f32(g, rows, b, buf);
    std::vector<Cand> all(cap);
    for (int64_t i = 0; i < cap; ++i) all[i] = {dist(g, base, rows, s[1 + i]), s[1 + i]};
    std::vector<uint8_t> own, want_kept;
    select(g, rows, all, cap, &own);
    bool consistent = true;
    for (int64_t i = 0; i < cap; ++i) consistent = consistent && own[i] == kept_bit(g, b, i);
    all.push_back({dx, x});
    std::sort(all.begin(), all.end());
    const std::vector<Cand> want = select(g, rows, all, cap, &want_kept);
    const bool x_kept = place_link(g, rows, b, s, x, dx);
    if (!consistent) return;
    bool same = static_cast<int64_t>(want.size()) == cap;
    for (int64_t i = 0; same && i < cap; ++i)
      same = s[1 + i] == want[i].second && kept_bit(g, b, i) == (want_kept[i] != 0);
    g.placement_counts_[x_kept ? 2 : 0] += 1;
    if (!same) g.placement_counts_[x_kept ? 3 : 1] += 1;
  }

  static void connect(HnswGraph& g, const void* rows, int32_t node, int level,
                      const std::vector<Cand>& nbrs) {
    {
      std::lock_guard<std::mutex> lock(*g.locks_[node]);
      int32_t* s = g.slot(node, level);
      for (size_t i = 0; i < nbrs.size(); ++i) store_word(s + 1 + i, nbrs[i].second);
      store_word(s, static_cast<int32_t>(nbrs.size()));
      if (level == 0) g.marked0_[node] = 0;
    }
    const int64_t cap = g.cap(level);
    std::vector<float> buf;
    for (const Cand& nb : nbrs) {
      std::lock_guard<std::mutex> lock(*g.locks_[nb.second]);
      int32_t* s = g.slot(nb.second, level);
      const int32_t cnt = s[0];
      if (std::find(s + 1, s + 1 + cnt, node) != s + 1 + cnt) continue;
      if (cnt < cap) {
        store_word(s + 1 + cnt, node);
        store_word(s, cnt + 1);
        continue;
      }
      if (level == 0 && g.marked0_[nb.second]) {
        if (g.check_placement_)
          checked_place_link(g, rows, nb.second, s, node, nb.first);
        else
          place_link(g, rows, nb.second, s, node, nb.first);
        continue;
      }
      // Full: re-select among the old links and the new node.
      const float* base = row_f32(g, rows, nb.second, buf);
      std::vector<Cand> all;
      all.reserve(cnt + 1);
      all.push_back({nb.first, node});
      for (int32_t i = 0; i < cnt; ++i)
        all.push_back({dist(g, base, rows, s[1 + i]), s[1 + i]});
      std::sort(all.begin(), all.end());
      std::vector<uint8_t> flags;
      const std::vector<Cand> keep = select(g, rows, all, cap, level == 0 ? &flags : nullptr);
      for (size_t i = 0; i < keep.size(); ++i) store_word(s + 1 + i, keep[i].second);
      store_word(s, static_cast<int32_t>(keep.size()));
      if (level == 0) mark_list(g, nb.second, flags);
    }
  }

  static void insert(HnswGraph& g, const void* rows, int32_t node, Visited& vis) {
    const int lvl = g.level_[node];
    std::unique_lock<std::mutex> glock(g.global_);
    const int32_t ep = g.entry_;
    const int maxl = g.max_level_;
    if (lvl <= maxl) glock.unlock();  // only a new top node keeps the global lock
    std::vector<float> qbuf;
    const float* q = row_f32(g, rows, node, qbuf);
    int32_t cur = ep;
    for (int l = maxl; l > lvl; --l) cur = greedy(g, rows, q, cur, l, /*building=*/true);
    for (int l = std::min(lvl, maxl); l >= 0; --l) {
      std::vector<Cand> cands = beam(g, rows, q, cur, l, g.ef_construction_, nullptr, /*building=*/true, vis);
      cands.erase(std::remove_if(cands.begin(), cands.end(),
                                 [&](const Cand& c) { return c.second == node; }),
                  cands.end());
      if (cands.empty()) continue;
      connect(g, rows, node, l, select(g, rows, cands, g.M_));
      cur = cands[0].second;
    }
    if (lvl > maxl) {
      g.entry_ = node;
      g.max_level_ = lvl;
    }
  }
};

HnswGraph::HnswGraph(int64_t dim, Metric metric, int64_t M, int64_t ef_construction,
                     uint64_t seed, DType row_dtype, bool walk_codes)
    : dim_(dim),
      M_(M),
      ef_construction_(ef_construction),
      metric_(metric),
      row_dtype_(row_dtype),
      rng_state_(seed) {
  check_dtype_in("row_dtype", row_dtype, {DType::Float32, DType::Float16});
  if (dim <= 0) throw ValueError("dim: expected a positive integer, got " + std::to_string(dim));
  if (M < 2 || M > 1024)
    throw ValueError("M: expected a value in [2, 1024], got " + std::to_string(M));
  if (ef_construction < 1)
    throw ValueError("ef_construction: expected a positive integer, got " +
                     std::to_string(ef_construction));
  metric_from_code(static_cast<int32_t>(metric), "metric");
  if (walk_codes) codes_ = std::make_unique<WalkCodes>(dim);
}

HnswGraph::~HnswGraph() = default;

void HnswGraph::set_walk_codes(const uint8_t* codes, int64_t count, const float* lo,
                               const float* step, const uint8_t* outside, bool view) {
  if (count != size())
    throw ValueError("codes: expected one code row per graph node (" + std::to_string(size()) +
                     "), got " + std::to_string(count));
  auto c = std::make_unique<WalkCodes>(dim_);
  c->assign(codes, count, lo, step, outside, view);
  codes_ = std::move(c);
}

void HnswGraph::code_walk(const void* rows) {
  check_pointer("rows", rows, size() * dim_);
  auto c = std::make_unique<WalkCodes>(dim_);
  c->update(rows, row_dtype_, 0, size());
  codes_ = std::move(c);
}

void HnswGraph::drop_walk_codes() { codes_.reset(); }

void HnswGraph::walk_distances(const void* rows, const float* query, const int32_t* nodes,
                               int64_t n, float* out) const {
  if (!codes_ || codes_->rows() != size()) throw ValueError("walk_distances: the graph has no walk codes");
  check_dims_nonnegative("n", n);
  check_pointer("rows", rows, size() * dim_);
  check_pointer("query", query, dim_);
  check_pointer("nodes", nodes, n);
  check_pointer("out", out, n);
  for (int64_t i = 0; i < n; ++i)
    if (nodes[i] < 0 || nodes[i] >= size())
      throw ValueError("nodes: expected values in [0, " + std::to_string(size()) + "), got nodes[" +
                       std::to_string(i) + "] = " + std::to_string(nodes[i]));
  WalkCodes::Query wq;
  codes_->prepare(query, metric_, wq);
  Impl::walk_dists(*this, rows, query, wq, nodes, static_cast<size_t>(n), out);
}

int HnswGraph::draw_level() {
  // splitmix64 -> uniform in (0, 1] -> geometric level with ratio 1/M
  uint64_t z = (rng_state_ += 0x9E3779B97F4A7C15ULL);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  z ^= z >> 31;
  const double u = (static_cast<double>(z >> 11) + 1.0) / 9007199254740992.0;
  const int level = static_cast<int>(-std::log(u) / std::log(static_cast<double>(M_)));
  return std::min(level, kMaxLevel);
}

void HnswGraph::add(const void* rows, int64_t count) {
  check_dims_nonnegative("count", count);
  const int64_t start = size(), total = start + count;
  check_pointer("rows", rows, total * dim_);
  if (total > std::numeric_limits<int32_t>::max())
    throw ValueError("count: the graph holds at most 2^31 - 1 rows, got " + std::to_string(total));
  if (count == 0) return;
  level_.resize(total);
  links0_.resize(total * (2 * M_ + 1), 0);
  upper_.resize(total);
  marked0_.resize(total, 0);
  kept0_.resize(total * kept_words(), 0);
  locks_.reserve(total);
  for (int64_t i = start; i < total; ++i) {
    level_[i] = draw_level();
    upper_[i].assign(offset(level_[i] + 1) - offset(1), 0);
    locks_.push_back(std::make_unique<std::mutex>());
  }
  int64_t first = start;
  if (entry_ < 0) {
    entry_ = static_cast<int32_t>(start);
    max_level_ = level_[start];
    first = start + 1;
  }
#pragma omp parallel
  {
    Visited vis;
#pragma omp for schedule(dynamic, 8)
    for (int64_t i = first; i < total; ++i) Impl::insert(*this, rows, static_cast<int32_t>(i), vis);
  }
  if (codes_) codes_->update(rows, row_dtype_, start, total);
}

void HnswGraph::search(const void* rows, const float* queries, int64_t nq, int64_t k,
                       int64_t ef, const uint8_t* allow, bool allow_per_query, float* out_dist,
                       int64_t* out_rows) const {
  check_dims_nonnegative("nq", nq);
  if (k <= 0) throw ValueError("k: expected a positive integer, got " + std::to_string(k));
  if (ef <= 0) throw ValueError("ef: expected a positive integer, got " + std::to_string(ef));
  const int64_t n = size();
  check_pointer("rows", rows, n * dim_);
  check_pointer("queries", queries, nq * dim_);
  check_pointer("out_dist", out_dist, nq * k);
  check_pointer("out_rows", out_rows, nq * k);
  const int64_t ef_eff = std::max(ef, k);
#pragma omp parallel
  {
    Visited vis;
    WalkCodes::Query wq;
#pragma omp for schedule(dynamic, 1)
    for (int64_t qi = 0; qi < nq; ++qi) {
      const float* q = queries + qi * dim_;
      const uint8_t* a = allow ? allow + (allow_per_query ? qi * n : 0) : nullptr;
      std::vector<Cand> found;
      if (entry_ >= 0) {
        int32_t cur = entry_;
        for (int l = max_level_; l > 0; --l) cur = Impl::greedy(*this, rows, q, cur, l, false);
        if (codes_ && codes_->rows() == n) {  // (always, but for a graph mid-add)
          codes_->prepare(q, metric_, wq);
          found = Impl::beam(*this, rows, q, cur, 0, ef_eff, a, false, vis, &wq);
          Impl::rescore(*this, rows, q, found);
        } else {
          found = Impl::beam(*this, rows, q, cur, 0, ef_eff, a, false, vis);
        }
      }
      for (int64_t j = 0; j < k; ++j) {
        const bool hit = j < static_cast<int64_t>(found.size());
        out_dist[qi * k + j] = hit ? found[j].first : std::numeric_limits<float>::infinity();
        out_rows[qi * k + j] = hit ? found[j].second : -1;
      }
    }
  }
}

HnswGraph::LinkAudit HnswGraph::audit_links(const void* rows) const {
  check_pointer("rows", rows, size() * dim_);
  LinkAudit a;
  std::vector<float> buf, cbuf;
  for (int32_t node = 0; node < size(); ++node) {
    const int32_t* s = slot(node, 0);
    ++a.lists;
    a.full += s[0] == cap(0);
    if (!marked0_[node]) continue;
    ++a.marked;
    const float* base = Impl::row_f32(*this, rows, node, buf);
    std::vector<Cand> link(s[0]);
    for (int32_t i = 0; i < s[0]; ++i) link[i] = {Impl::dist(*this, base, rows, s[1 + i]), s[1 + i]};
    a.unsorted += !std::is_sorted(link.begin(), link.end());
    std::vector<int32_t> kept;
    for (int32_t i = 0; i < s[0]; ++i) {
      const float* c = Impl::row_f32(*this, rows, link[i].second, cbuf);
      bool pruned_by_earlier = false;
      for (int32_t r : kept) pruned_by_earlier = pruned_by_earlier || Impl::dist(*this, c, rows, r) < link[i].first;
      if (Impl::kept_bit(*this, node, i)) {
        a.kept_violations += pruned_by_earlier;
        kept.push_back(link[i].second);
      } else {
        ++a.pruned;
        a.pruned_unwitnessed += !pruned_by_earlier;
      }
    }
  }
  return a;
}

void HnswGraph::set_placement_check(bool on) {
  check_placement_ = on;
  for (auto& c : placement_counts_) c = 0;
}

HnswGraph::PlacementCheck HnswGraph::placement_check() const {
  return {placement_counts_[0], placement_counts_[1], placement_counts_[2], placement_counts_[3]};
}

std::vector<int32_t> HnswGraph::to_flat() const {
  const int64_t n = size();
  const bool typed = row_dtype_ != DType::Float32;
  std::vector<int32_t> out = {kMagic,
                              typed ? kVersionTyped : kVersionF32,
                              static_cast<int32_t>(dim_),
                              static_cast<int32_t>(metric_),
                              static_cast<int32_t>(M_),
                              static_cast<int32_t>(ef_construction_),
                              entry_,
                              max_level_,
                              static_cast<int32_t>(n),
                              static_cast<int32_t>(rng_state_ & 0xFFFFFFFFu),
                              static_cast<int32_t>(rng_state_ >> 32)};
  if (typed) out.push_back(static_cast<int32_t>(row_dtype_));
  out.insert(out.end(), level_.begin(), level_.end());
  for (int64_t i = 0; i < n; ++i) {  // each node's levels in order, as one block
    const int32_t* l0 = slot(static_cast<int32_t>(i), 0);
    out.insert(out.end(), l0, l0 + offset(1));
    out.insert(out.end(), upper_[i].begin(), upper_[i].end());
  }
  return out;
}

std::unique_ptr<HnswGraph> HnswGraph::from_flat(const int32_t* data, int64_t count) {
  auto bad = [](const std::string& what) { return ValueError("graph: " + what); };
  if (count < kHeaderF32 || data == nullptr)
    throw bad("expected at least " + std::to_string(kHeaderF32) + " header words, got " +
              std::to_string(count));
  if (data[0] != kMagic || (data[1] != kVersionF32 && data[1] != kVersionTyped))
    throw bad("expected magic " + std::to_string(kMagic) + " and version " +
              std::to_string(kVersionF32) + " or " + std::to_string(kVersionTyped) + ", got " +
              std::to_string(data[0]) + "/" + std::to_string(data[1]));
  const int kHeader = data[1] == kVersionTyped ? kHeaderF32 + 1 : kHeaderF32;
  if (count < kHeader)
    throw bad("expected at least " + std::to_string(kHeader) + " header words, got " +
              std::to_string(count));
  DType row_dtype = DType::Float32;
  if (data[1] == kVersionTyped) {
    if (data[11] != static_cast<int32_t>(DType::Float32) &&
        data[11] != static_cast<int32_t>(DType::Float16))
      throw bad("expected row dtype code 0 (float32) or 2 (float16), got " +
                std::to_string(data[11]));
    row_dtype = static_cast<DType>(data[11]);
  }
  const uint64_t seed = static_cast<uint32_t>(data[9]) | (static_cast<uint64_t>(static_cast<uint32_t>(data[10])) << 32);
  auto g = std::make_unique<HnswGraph>(data[2], metric_from_code(data[3], "graph metric"), data[4],
                                       data[5], seed, row_dtype, /*walk_codes=*/false);
  const int64_t n = data[8];
  if (n < 0 || count < kHeader + n) throw bad("row count " + std::to_string(n) + " out of range");
  g->entry_ = data[6];
  g->max_level_ = data[7];
  g->level_.assign(data + kHeader, data + kHeader + n);
  int32_t top = -1;
  int64_t need = kHeader + n;
  for (int64_t i = 0; i < n; ++i) {
    if (g->level_[i] < 0 || g->level_[i] > kMaxLevel)
      throw bad("level of row " + std::to_string(i) + " out of range");
    top = std::max(top, g->level_[i]);
    need += g->offset(g->level_[i] + 1);
  }
  if (count != need)
    throw bad("expected " + std::to_string(need) + " words, got " + std::to_string(count));
  if (n == 0 ? (g->entry_ != -1) : (g->entry_ < 0 || g->entry_ >= n || g->level_[g->entry_] != top ||
                                    g->max_level_ != top))
    throw bad("entry point inconsistent with the levels");
  const int32_t* p = data + kHeader + n;
  g->links0_.resize(n * (2 * g->M_ + 1));
  g->upper_.resize(n);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t len = g->offset(g->level_[i] + 1), len0 = g->offset(1);
    std::copy(p, p + len0, g->slot(static_cast<int32_t>(i), 0));
    g->upper_[i].assign(p + len0, p + len);
    p += len;
    for (int l = 0; l <= g->level_[i]; ++l) {
      const int32_t* s = g->slot(static_cast<int32_t>(i), l);
      if (s[0] < 0 || s[0] > g->cap(l)) throw bad("link count out of range");
      for (int32_t j = 0; j < s[0]; ++j)
        if (s[1 + j] < 0 || s[1 + j] >= n || g->level_[s[1 + j]] < l)
          throw bad("link out of range at row " + std::to_string(i));
    }
  }
  g->marked0_.assign(n, 0);
  g->kept0_.assign(n * g->kept_words(), 0);
  g->locks_.reserve(n);
  for (int64_t i = 0; i < n; ++i) g->locks_.push_back(std::make_unique<std::mutex>());
  return g;
}

}  // namespace affectkit::knn
