// knn::exact_search through the installed C++ package, swept over what picks its code paths:
// list lengths on both sides of the vector lanes (k = 1 to 700, so the long-list buffers cut
// again and again), every filter kind, user ids rising and shuffled, one query and a block
// and a half of them, float32 and float64. Entries are small integers, so every distance is
// exact and the answer must equal a double brute force bit for bit, ties by id. It needs no
// Python, so it also runs where only the C++ core builds: on aarch64 under qemu-user it
// checks the NEON build of the baseline kernels (see CONTRIBUTING.md).
#include <affectkit/affectkit.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <utility>
#include <vector>

namespace {

using namespace affectkit;

int failures = 0;

enum class Kind { None, Shared, PerQuery, Lists, Groups };
const char* kind_name(Kind k) {
  switch (k) {
    case Kind::None: return "none";
    case Kind::Shared: return "shared mask";
    case Kind::PerQuery: return "per-query mask";
    case Kind::Lists: return "candidate lists";
    default: return "row groups";
  }
}

struct Case {
  int64_t nq, n, d, k;
  Kind kind;
  bool shuffled_ids;
  knn::Metric metric;
};

// The allowed rows of each query, as the filter states them (repeats included), and the Filter.
struct Filtered {
  std::vector<std::vector<int64_t>> allowed;
  std::vector<uint8_t> mask;
  std::vector<int64_t> offsets, rows, group_offsets, group_rows, query_group_offsets, query_groups;
  knn::Filter filter;
};

Filtered make_filter(const Case& c, std::mt19937_64& rng) {
  Filtered f;
  f.allowed.resize(c.nq);
  std::uniform_real_distribution<double> u(0, 1);
  auto all_rows = [&] {
    std::vector<int64_t> r(c.n);
    std::iota(r.begin(), r.end(), 0);
    return r;
  };
  switch (c.kind) {
    case Kind::None:
      for (auto& a : f.allowed) a = all_rows();
      break;
    case Kind::Shared: {
      f.mask.resize(c.n);
      std::vector<int64_t> r;
      for (int64_t i = 0; i < c.n; ++i)
        if ((f.mask[i] = u(rng) < 0.6)) r.push_back(i);
      for (auto& a : f.allowed) a = r;
      f.filter.mask = f.mask.data();
      break;
    }
    case Kind::PerQuery: {
      f.mask.resize(c.nq * c.n);
      const double p = u(rng) < 0.5 ? 0.5 : 0.03;  // one pass over all rows, or gathered lists
      for (int64_t q = 0; q < c.nq; ++q)
        for (int64_t i = 0; i < c.n; ++i)
          if ((f.mask[q * c.n + i] = u(rng) < p)) f.allowed[q].push_back(i);
      f.filter.mask = f.mask.data();
      f.filter.mask_per_query = true;
      break;
    }
    case Kind::Lists: {
      f.offsets.push_back(0);
      std::uniform_int_distribution<int64_t> row(0, c.n - 1);
      for (int64_t q = 0; q < c.nq; ++q) {
        const int64_t len = std::uniform_int_distribution<int64_t>(0, 2 * c.k + 40)(rng);
        for (int64_t i = 0; i < len; ++i) f.allowed[q].push_back(row(rng));  // repeats allowed
        f.rows.insert(f.rows.end(), f.allowed[q].begin(), f.allowed[q].end());
        f.offsets.push_back(static_cast<int64_t>(f.rows.size()));
      }
      f.filter.cand_offsets = f.offsets.data();
      f.filter.cand_rows = f.rows.data();
      break;
    }
    case Kind::Groups: {  // 7 overlapping groups; each query takes up to 3 distinct ones
      const int64_t G = 7;
      std::vector<std::vector<int64_t>> groups(G);
      f.group_offsets.push_back(0);
      for (auto& g : groups) {
        const double p = u(rng) * 0.5;
        for (int64_t i = 0; i < c.n; ++i)
          if (u(rng) < p) g.push_back(i);
        f.group_rows.insert(f.group_rows.end(), g.begin(), g.end());
        f.group_offsets.push_back(static_cast<int64_t>(f.group_rows.size()));
      }
      f.query_group_offsets.push_back(0);
      for (int64_t q = 0; q < c.nq; ++q) {
        std::vector<int64_t> order(G);
        std::iota(order.begin(), order.end(), 0);
        std::shuffle(order.begin(), order.end(), rng);
        const int64_t take = std::uniform_int_distribution<int64_t>(0, 3)(rng);
        for (int64_t t = 0; t < take; ++t) {
          f.query_groups.push_back(order[t]);
          f.allowed[q].insert(f.allowed[q].end(), groups[order[t]].begin(), groups[order[t]].end());
        }
        f.query_group_offsets.push_back(static_cast<int64_t>(f.query_groups.size()));
      }
      f.filter.groups = G;
      f.filter.group_offsets = f.group_offsets.data();
      f.filter.group_rows = f.group_rows.data();
      f.filter.query_group_offsets = f.query_group_offsets.data();
      f.filter.query_groups = f.query_groups.data();
      break;
    }
  }
  return f;
}

template <typename T>
void run_case(const Case& c, std::mt19937_64& rng) {
  std::uniform_int_distribution<int> val(-2, 2);  // few values: distances tie many ways
  std::vector<T> q(c.nq * c.d), x(c.n * c.d);
  for (auto& v : q) v = T(val(rng));
  for (auto& v : x) v = T(val(rng));
  std::vector<int64_t> ids(c.n);
  std::iota(ids.begin(), ids.end(), 0);
  if (c.shuffled_ids) {
    std::shuffle(ids.begin(), ids.end(), rng);
    for (auto& v : ids) v = v * 1000003 + 11;
  }
  Filtered f = make_filter(c, rng);
  std::vector<T> dist(c.nq * c.k, std::numeric_limits<T>::quiet_NaN());
  std::vector<int64_t> out(c.nq * c.k, -7);
  knn::exact_search(Device::CPU, sizeof(T) == 4 ? DType::Float32 : DType::Float64, q.data(), c.nq, x.data(),
                    c.n, c.d, c.metric, c.k, f.filter, c.shuffled_ids ? ids.data() : nullptr, nullptr,
                    dist.data(), out.data());
  int64_t bad = -1;
  for (int64_t i = 0; i < c.nq && bad < 0; ++i) {
    std::vector<int64_t> rows = f.allowed[i];
    std::sort(rows.begin(), rows.end());
    rows.erase(std::unique(rows.begin(), rows.end()), rows.end());
    std::vector<std::pair<double, int64_t>> ref;
    for (int64_t r : rows) {
      double ip = 0, l2 = 0;
      for (int64_t j = 0; j < c.d; ++j) {
        const double a = q[i * c.d + j], b = x[r * c.d + j];
        ip += a * b;
        l2 += (a - b) * (a - b);
      }
      ref.push_back({c.metric == knn::Metric::L2 ? l2 : -ip, ids[r]});
    }
    std::sort(ref.begin(), ref.end());
    for (int64_t j = 0; j < c.k; ++j) {
      const bool pad = j >= static_cast<int64_t>(ref.size());
      const int64_t want_id = pad ? -1 : ref[j].second;
      const double want_d = pad ? std::numeric_limits<double>::infinity() : ref[j].first;
      if (out[i * c.k + j] != want_id || double(dist[i * c.k + j]) != want_d) bad = i;
    }
  }
  if (bad >= 0) {
    std::fprintf(stderr, "FAIL: exact_search %s nq=%lld n=%lld d=%lld k=%lld %s ids=%s metric=%d: query %lld\n",
                 sizeof(T) == 4 ? "float32" : "float64", (long long)c.nq, (long long)c.n, (long long)c.d,
                 (long long)c.k, kind_name(c.kind), c.shuffled_ids ? "shuffled" : "rows", int(c.metric),
                 (long long)bad);
    ++failures;
  }
}

}  // namespace

int main() {
  const char* seed_env = std::getenv("AFFECTKIT_TEST_SEED");
  const uint64_t seed = seed_env ? std::strtoull(seed_env, nullptr, 10) : std::random_device{}();
  std::mt19937_64 rng(seed);
  int cases = 0;
  const Kind kinds[] = {Kind::None, Kind::Shared, Kind::PerQuery, Kind::Lists, Kind::Groups};
  for (int64_t k : {1, 10, 32, 33, 64, 65, 129, 700})
    for (Kind kind : kinds)
      for (bool shuffled : {false, true}) {
        const knn::Metric metric = (k + cases) % 2 ? knn::Metric::L2 : knn::Metric::InnerProduct;
        // One query against many rows (row chunks split between threads), and 300 queries (past
        // a 256-query block) against fewer.
        run_case<float>({1, 4001, 7, k, kind, shuffled, metric}, rng);
        run_case<float>({300, 389, 5, k, kind, shuffled, metric}, rng);
        if (kind == Kind::None || kind == Kind::Lists) run_case<double>({37, 1500, 6, k, kind, shuffled, metric}, rng);
        cases += kind == Kind::None || kind == Kind::Lists ? 3 : 2;
      }
  const char* cap = std::getenv("AFFECTKIT_SIMD_LEVEL");
  std::printf("knn sweep (seed %llu, cpu simd=%s, AFFECTKIT_SIMD_LEVEL=%s): %d cases, %d failure(s)\n",
              (unsigned long long)seed, cpu_simd_level().c_str(), cap ? cap : "unset", cases, failures);
  return failures == 0 ? 0 : 1;
}
