// Bounded running top-k lists of (distance, id) pairs: smaller distance first, then smaller id.
// TopK (a heap) for short lists, TopKBuffer for long ones.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <utility>

namespace affectkit::knn {

template <typename T>
struct Hit {
  T dist;
  int64_t id;
};

// True when a is strictly better (closer, or as close with a smaller id) than b.
template <typename T>
inline bool better(T da, int64_t ia, T db, int64_t ib) {
  return da < db || (da == db && ia < ib);
}

// A max-heap over at most `k` hits living in caller-owned storage; the root is the worst kept.
template <typename T>
class TopK {
 public:
  TopK(Hit<T>* storage, int64_t k) : h_(storage), k_(k) {}

  // Offer one candidate; NaN distances are never kept.
  inline void push(T dist, int64_t id) {
    if (size_ < k_) {
      if (std::isnan(dist)) return;
      int64_t i = size_++;
      while (i > 0) {  // sift up
        int64_t p = (i - 1) / 2;
        if (!better(h_[p].dist, h_[p].id, dist, id)) break;
        h_[i] = h_[p];
        i = p;
      }
      h_[i] = {dist, id};
      return;
    }
    if (k_ == 0 || !better(dist, id, h_[0].dist, h_[0].id)) return;  // also rejects NaN
    sift_down_from_root(dist, id);
  }
  // Cheap pre-check for hot loops: could `dist` enter at all?
  inline bool may_enter(T dist) const { return size_ < k_ || dist <= h_[0].dist; }
  // The distance of the worst kept hit (the heap must be full: size() == k, k > 0).
  inline T worst() const { return h_[0].dist; }
  int64_t size() const { return size_; }
  const Hit<T>* data() const { return h_; }

  // Sort the kept hits ascending and write k results, padding with (+inf, -1).
  void write_sorted(T* dist_out, int64_t* id_out, int64_t k_out) {
    std::sort(h_, h_ + size_, [](const Hit<T>& a, const Hit<T>& b) {
      return better(a.dist, a.id, b.dist, b.id);
    });
    for (int64_t i = 0; i < k_out; ++i) {
      if (i < size_) {
        dist_out[i] = h_[i].dist;
        id_out[i] = h_[i].id;
      } else {
        dist_out[i] = std::numeric_limits<T>::infinity();
        id_out[i] = -1;
      }
    }
  }

 private:
  void sift_down_from_root(T dist, int64_t id) {
    int64_t i = 0;
    for (;;) {
      int64_t c = 2 * i + 1;
      if (c >= size_) break;
      if (c + 1 < size_ && better(h_[c].dist, h_[c].id, h_[c + 1].dist, h_[c + 1].id)) ++c;
      if (!better(dist, id, h_[c].dist, h_[c].id)) break;
      h_[i] = h_[c];
      i = c;
    }
    h_[i] = {dist, id};
  }

  Hit<T>* h_;
  int64_t k_;
  int64_t size_ = 0;
};

// A top-k for long lists (k in the hundreds and more): a candidate within the bound is
// appended, and when 2k are held the buffer is cut back, which tightens the bound. A heap's
// push sifts through log2(k) levels of a list that has left L1, a mispredicted branch at
// each: 3,001 neighbours of 256 queries in 200,000 rows took 1.02 s that way, against 0.12 s
// for 11 (the scoring is the same). Here a push is a compare and a store.
//
// A cut keeps the hits at or below a distance t that at least k of them reach (each hit
// dropped is then worse than k kept ones, so the result stays exact), and t becomes the
// bound. t comes from a sorted sample of 64 distances, aimed at keeping ~1.25 k; a count and
// a compaction, both without branches, do the rest. std::nth_element (the exact k-th hit)
// cost several times more, in mispredicted branches: it is the fallback when the sample
// misses (under k kept, or so many equal distances that little would go), and the last cut.
// With `unique_ids`, a row offered twice (one id) is kept once, at its best distance.
template <typename T>
class TopKBuffer {
 public:
  // storage holds 2 * k hits, or at least as many as will be offered (no cut comes sooner).
  TopKBuffer(Hit<T>* storage, int64_t k, bool unique_ids = false)
      : h_(storage), k_(k), unique_ids_(unique_ids),
        bound_(k > 0 ? std::numeric_limits<T>::infinity() : std::numeric_limits<T>::quiet_NaN()) {}

  // NaN distances never pass (nor does anything when k = 0: the bound is then NaN).
  inline bool may_enter(T dist) const { return dist <= bound_; }
  inline void push(T dist, int64_t id) {
    if (!(dist <= bound_)) return;
    h_[size_++] = {dist, id};
    if (size_ == 2 * k_) cut(false);
  }
  // Batched pushes without a branch each: make_room(n) (n <= k), then up to n offer() calls,
  // each of which stores the hit and keeps it when `pass` and within the bound.
  inline void make_room(int64_t n) {
    if (size_ + n <= 2 * k_) return;
    cut(false);
    if (size_ + n > 2 * k_) cut(true);  // a sampled cut may leave less room than n
  }
  inline void offer(T dist, int64_t id, bool pass) {
    h_[size_] = {dist, id};
    size_ += pass & (dist <= bound_);
  }
  // Every hit worse than this is out for good (+inf until k hits were kept).
  T bound() const { return bound_; }

  // The best min(k, held) hits at data()[0, size()), in no order.
  void shrink() { cut(true); }
  // The same, best first.
  void finish() {
    cut(true);
    std::sort(h_, h_ + size_, ByRank{});
  }
  int64_t size() const { return size_; }
  const Hit<T>* data() const { return h_; }

  // finish(), then write k results, padding with (+inf, -1).
  void write_sorted(T* dist_out, int64_t* id_out, int64_t k_out) {
    finish();
    for (int64_t i = 0; i < k_out; ++i) {
      dist_out[i] = i < size_ ? h_[i].dist : std::numeric_limits<T>::infinity();
      id_out[i] = i < size_ ? h_[i].id : -1;
    }
  }

 private:
  struct ByRank {  // a type, not a function pointer, so that the sorts inline it
    bool operator()(const Hit<T>& a, const Hit<T>& b) const { return better(a.dist, a.id, b.dist, b.id); }
  };
  static constexpr int kSample = 64;

  int64_t count_within(T t) const {
    int64_t c = 0;
    for (int64_t i = 0; i < size_; ++i) c += h_[i].dist <= t;
    return c;
  }

  // Cut to the hits within a sampled distance; false (nothing changed) when it misses.
  bool sampled_cut() {
    T sample[kSample];
    for (int i = 0; i < kSample; ++i) sample[i] = h_[i * size_ / kSample].dist;
    std::sort(sample, sample + kSample);
    int at = static_cast<int>(kSample * (k_ + k_ / 4) / size_);
    for (int tries = 0; tries < 2 && at < kSample; ++tries, at += kSample / 8) {
      const T t = sample[at];
      const int64_t kept = count_within(t);
      if (kept < k_) continue;
      if (kept > k_ + 3 * k_ / 4) return false;  // little would go (equal distances)
      int64_t j = 0;
      for (int64_t i = 0; i < size_; ++i) {
        h_[j] = h_[i];
        j += h_[i].dist <= t;
      }
      size_ = j;
      bound_ = t;
      return true;
    }
    return false;
  }

  void cut(bool exact) {
    if (unique_ids_) {  // the best hit of each id first, then the others dropped
      std::sort(h_, h_ + size_, [](const Hit<T>& a, const Hit<T>& b) {
        return a.id < b.id || (a.id == b.id && a.dist < b.dist);
      });
      size_ = std::unique(h_, h_ + size_, [](const Hit<T>& a, const Hit<T>& b) { return a.id == b.id; }) - h_;
    }
    if (size_ <= k_) return;
    if (!exact && size_ >= 2 * kSample && sampled_cut()) return;
    std::nth_element(h_, h_ + (k_ - 1), h_ + size_, ByRank{});
    size_ = k_;
    bound_ = h_[k_ - 1].dist;
  }

  Hit<T>* h_;
  int64_t k_;
  bool unique_ids_;
  T bound_;
  int64_t size_ = 0;
};

}  // namespace affectkit::knn
