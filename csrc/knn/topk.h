// A bounded running top-k of (distance, id) pairs: smaller distance first, then smaller id.
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

}  // namespace affectkit::knn
