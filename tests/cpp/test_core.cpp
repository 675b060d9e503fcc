// Checks the C++ API directly: results against a double reference on random inputs,
// and that bad input throws instead of crashing.
#include <affectkit/affectkit.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>
#include <random>
#include <vector>

namespace {

int failures = 0;

void expect(bool ok, const char* what) {
  if (!ok) {
    std::fprintf(stderr, "FAIL: %s\n", what);
    ++failures;
  }
}

template <typename E, typename F>
void expect_throws(F&& f, const char* what) {
  try {
    f();
  } catch (const E&) {
    return;
  } catch (...) {
    std::fprintf(stderr, "FAIL: %s (wrong exception type)\n", what);
    ++failures;
    return;
  }
  std::fprintf(stderr, "FAIL: %s (nothing thrown)\n", what);
  ++failures;
}

void test_masked_mean(int64_t B, int64_t L, int64_t F, std::mt19937_64& rng) {
  using namespace affectkit;
  std::normal_distribution<float> normal;
  std::uniform_int_distribution<int64_t> len(0, L);
  std::vector<float> x(B * L * F), out(B * F, std::numeric_limits<float>::quiet_NaN());
  std::vector<int64_t> lengths(B);
  for (auto& v : x) v = normal(rng);
  for (auto& n : lengths) n = len(rng);
  pooling::masked_mean_forward(Device::CPU, DType::Float32, x.data(), lengths.data(), out.data(),
                               B, L, F);
  double err = 0, ref_norm = 0;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t f = 0; f < F; ++f) {
      double ref = 0;
      for (int64_t t = 0; t < lengths[b]; ++t) ref += x[(b * L + t) * F + f];
      if (lengths[b] > 0) ref /= lengths[b];
      err += (out[b * F + f] - ref) * (out[b * F + f] - ref);
      ref_norm += ref * ref;
    }
  expect(std::isfinite(err) && std::sqrt(err) <= 2e-5 * std::sqrt(ref_norm) + 1e-30,
         "masked_mean_forward matches the double reference");

  std::vector<float> gx(B * L * F, std::numeric_limits<float>::quiet_NaN());
  pooling::masked_mean_backward(Device::CPU, DType::Float32, out.data(), lengths.data(), gx.data(),
                                B, L, F);
  bool ok = true;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < L; ++t)
      for (int64_t f = 0; f < F; ++f) {
        const double want = t < lengths[b] ? out[b * F + f] / double(lengths[b]) : 0.0;
        ok &= std::fabs(gx[(b * L + t) * F + f] - want) <= 1e-6 * (1 + std::fabs(want));
      }
  expect(ok, "masked_mean_backward matches the formula");
}

// Exact filtered k-NN (knn::exact_search) on integer-valued vectors (exact in float), and the
// HNSW graph's recall on the same data: what an embedding service would call from C++.
void test_knn(std::mt19937_64& rng) {
  using namespace affectkit;
  const int64_t nq = 5, n = 300, d = 19, k = 4;
  std::uniform_int_distribution<int> val(-3, 3);
  std::vector<float> q(nq * d), x(n * d);
  for (auto& v : q) v = float(val(rng));
  for (auto& v : x) v = float(val(rng));
  std::vector<uint8_t> mask(n);
  for (auto& m : mask) m = uint8_t(rng() % 3 == 0);
  std::vector<float> dist(nq * k, std::numeric_limits<float>::quiet_NaN());
  std::vector<int64_t> ids(nq * k, -7);
  knn::Filter filter;
  filter.mask = mask.data();
  knn::exact_search(Device::CPU, DType::Float32, q.data(), nq, x.data(), n, d, knn::Metric::L2, k,
                    filter, nullptr, nullptr, dist.data(), ids.data());
  bool ok = true;
  for (int64_t i = 0; i < nq; ++i) {
    std::vector<std::pair<double, int64_t>> ref;
    for (int64_t r = 0; r < n; ++r) {
      if (!mask[r]) continue;
      double s = 0;
      for (int64_t j = 0; j < d; ++j) s += double(q[i * d + j] - x[r * d + j]) * (q[i * d + j] - x[r * d + j]);
      ref.push_back({s, r});
    }
    std::sort(ref.begin(), ref.end());
    for (int64_t j = 0; j < k; ++j) ok &= ids[i * k + j] == ref[j].second && dist[i * k + j] == ref[j].first;
  }
  expect(ok, "knn::exact_search matches the double brute force with id tie-breaks");
  expect_throws<ValueError>(
      [&] {
        knn::exact_search(Device::CPU, DType::Float32, q.data(), nq, x.data(), n, d, knn::Metric::L2,
                          0, filter, nullptr, nullptr, dist.data(), ids.data());
      },
      "k = 0 throws ValueError");

  knn::HnswGraph graph(d, knn::Metric::L2, 8, 64, 1);
  graph.add(x.data(), n);
  std::vector<float> gd(nq * k);
  std::vector<int64_t> gr(nq * k);
  graph.search(x.data(), q.data(), nq, k, 64, mask.data(), false, gd.data(), gr.data());
  int64_t hits = 0;
  for (int64_t i = 0; i < nq * k; ++i)
    hits += gr[i] >= 0 && gd[i] <= dist[(i / k) * k + k - 1] ? 1 : 0;
  bool allowed = true;
  for (int64_t r : gr) allowed &= r >= 0 && mask[r];
  expect(allowed, "HnswGraph::search returns only allowed rows");
  expect(hits >= nq * k * 9 / 10, "HnswGraph::search finds at least 90% of the exact distances");
}

}  // namespace

int main() {
  using namespace affectkit;
  std::mt19937_64 rng(std::random_device{}());
  const int64_t shapes[][3] = {{1, 1, 1}, {3, 7, 5}, {13, 31, 257}, {2, 1, 300}, {0, 4, 4}};
  for (auto& s : shapes) test_masked_mean(s[0], s[1], s[2], rng);
  test_knn(rng);

  float x[8] = {}, out[2];
  int64_t bad_lengths[2] = {1, 9};
  expect_throws<ValueError>(
      [&] { pooling::masked_mean_forward(Device::CPU, DType::Float32, x, bad_lengths, out, 2, 2, 2); },
      "lengths out of range throws ValueError");
  int64_t lengths[2] = {1, 2};
  expect_throws<TypeError>(
      [&] { pooling::masked_mean_forward(Device::CPU, DType::Int32, x, lengths, out, 2, 2, 2); },
      "integer dtype throws TypeError");
  expect_throws<ValueError>(
      [&] { pooling::masked_mean_forward(Device::CPU, DType::Float32, nullptr, lengths, out, 2, 2, 2); },
      "null pointer throws ValueError");
  expect_throws<ValueError>(
      [&] { pooling::masked_mean_forward(Device::CPU, DType::Float32, x, lengths, out, -1, 2, 2); },
      "negative size throws ValueError");

  BuildInfo info = build_info();
  expect(!info.version.empty(), "build_info reports a version");
  std::printf("affectkit %s, cuda=%d, simd=%s, threads=%d: %d failure(s)\n", info.version.c_str(),
              int(info.cuda_compiled), cpu_simd_level().c_str(), num_threads(), failures);
  return failures == 0 ? 0 : 1;
}
