// affectkit._C: the Python face of the C++ core. No libtorch: tensors arrive as data
// pointers (ints), sizes, dtype/device codes and a CUDA stream handle; the GIL is
// released while kernels run.
#include <pybind11/pybind11.h>

#include "../affectkit.h"

namespace py = pybind11;
using namespace affectkit;

namespace {

template <typename T>
const T* cptr(uintptr_t p) { return reinterpret_cast<const T*>(p); }
template <typename T>
T* mptr(uintptr_t p) { return reinterpret_cast<T*>(p); }

py::dict build_info_dict() {
  BuildInfo info = build_info();
  py::dict d;
  d["version"] = info.version;
  d["cuda_compiled"] = info.cuda_compiled;
  d["cuda_architectures"] = info.cuda_architectures;
  d["cuda_runtime_version"] = info.cuda_runtime_version;
  d["compiler"] = info.compiler;
  d["openmp"] = info.openmp;
  return d;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "affectkit C++/CUDA core (torch-free: pointers, sizes, dtype codes, streams)";

  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const affectkit::TypeError& e) {
      PyErr_SetString(PyExc_TypeError, e.what());
    }
  });

  py::dict dtypes;
  for (int code = 0; code <= static_cast<int>(DType::Bool); ++code)
    dtypes[dtype_name(static_cast<DType>(code))] = code;
  m.attr("DTYPE_CODES") = dtypes;
  m.attr("DEVICE_CPU") = static_cast<int>(Device::CPU);
  m.attr("DEVICE_CUDA") = static_cast<int>(Device::CUDA);
  m.attr("__version__") = build_info().version;

  m.def("build_info", &build_info_dict, "Version and build configuration of the core.");
  m.def("cpu_simd_level", &cpu_simd_level, "SIMD instruction set detected at run time.");
  m.def("num_threads", &num_threads, "OpenMP threads used by CPU kernels.");
  m.def("set_num_threads", &set_num_threads, py::arg("n"));
  m.def("cuda_device_count", &cuda_device_count, "CUDA devices usable now (0 without CUDA).");

  // --- pooling ---------------------------------------------------------------------
  m.def(
      "masked_mean_forward",
      [](int device, int dtype, uintptr_t x, uintptr_t lengths, uintptr_t out, int64_t B,
         int64_t L, int64_t F, uintptr_t stream) {
        pooling::masked_mean_forward(device_from_code(device, "device"),
                                     dtype_from_code(dtype, "dtype"), cptr<void>(x),
                                     cptr<int64_t>(lengths), mptr<void>(out), B, L, F, stream);
      },
      py::arg("device"), py::arg("dtype"), py::arg("x"), py::arg("lengths"), py::arg("out"),
      py::arg("B"), py::arg("L"), py::arg("F"), py::arg("stream") = 0,
      py::call_guard<py::gil_scoped_release>(),
      "out[b, f] = mean of x[b, t, f] over t < lengths[b] (x: (B, L, F), lengths int64).");
  m.def(
      "masked_mean_backward",
      [](int device, int dtype, uintptr_t grad_out, uintptr_t lengths, uintptr_t grad_x,
         int64_t B, int64_t L, int64_t F, uintptr_t stream) {
        pooling::masked_mean_backward(device_from_code(device, "device"),
                                      dtype_from_code(dtype, "dtype"), cptr<void>(grad_out),
                                      cptr<int64_t>(lengths), mptr<void>(grad_x), B, L, F,
                                      stream);
      },
      py::arg("device"), py::arg("dtype"), py::arg("grad_out"), py::arg("lengths"),
      py::arg("grad_x"), py::arg("B"), py::arg("L"), py::arg("F"), py::arg("stream") = 0,
      py::call_guard<py::gil_scoped_release>(),
      "Gradient of masked_mean_forward with respect to x.");

  // --- knn -------------------------------------------------------------------------
  m.def(
      "exact_knn",
      [](int device, int dtype, uintptr_t queries, int64_t nq, uintptr_t database, int64_t n,
         int64_t d, int metric, int64_t k, uintptr_t mask, bool mask_per_query,
         uintptr_t cand_offsets, uintptr_t cand_rows, uintptr_t row_ids, uintptr_t db_sqnorms,
         uintptr_t out_dist, uintptr_t out_ids, uintptr_t stream) {
        knn::Filter filter;
        filter.mask = cptr<uint8_t>(mask);
        filter.mask_per_query = mask_per_query;
        filter.cand_offsets = cptr<int64_t>(cand_offsets);
        filter.cand_rows = cptr<int64_t>(cand_rows);
        knn::exact_search(device_from_code(device, "device"), dtype_from_code(dtype, "dtype"),
                          cptr<void>(queries), nq, cptr<void>(database), n, d,
                          knn::metric_from_code(metric, "metric"), k, filter,
                          cptr<int64_t>(row_ids), cptr<void>(db_sqnorms), mptr<void>(out_dist),
                          mptr<int64_t>(out_ids), stream);
      },
      py::arg("device"), py::arg("dtype"), py::arg("queries"), py::arg("nq"),
      py::arg("database"), py::arg("n"), py::arg("d"), py::arg("metric"), py::arg("k"),
      py::arg("mask") = 0, py::arg("mask_per_query") = false, py::arg("cand_offsets") = 0,
      py::arg("cand_rows") = 0, py::arg("row_ids") = 0, py::arg("db_sqnorms") = 0,
      py::arg("out_dist") = 0, py::arg("out_ids") = 0, py::arg("stream") = 0,
      py::call_guard<py::gil_scoped_release>(),
      "Exact filtered k-NN: for each query the k allowed rows with the smallest distance "
      "(metric 0 ip: -<q,x>, 1 l2: squared, 2 cosine: 1-<q,x> on unit vectors); ties to the "
      "smaller id; padded with id -1 and +inf. Filter: a byte mask (n,) or (nq, n), or CSR "
      "candidate rows per query.");

  py::class_<knn::HnswGraph>(m, "HnswGraph",
                             "HNSW-style graph over float32 rows owned by the caller; filtered "
                             "search walks through every node and collects only allowed ones.")
      .def(py::init([](int64_t dim, int metric, int64_t M, int64_t ef_construction,
                       uint64_t seed) {
             return std::make_unique<knn::HnswGraph>(
                 dim, knn::metric_from_code(metric, "metric"), M, ef_construction, seed);
           }),
           py::arg("dim"), py::arg("metric"), py::arg("M") = 16,
           py::arg("ef_construction") = 100, py::arg("seed") = 0)
      .def(
          "add",
          [](knn::HnswGraph& g, uintptr_t rows, int64_t count) {
            g.add(cptr<float>(rows), count);
          },
          py::arg("rows"), py::arg("count"), py::call_guard<py::gil_scoped_release>(),
          "Insert rows [size(), size() + count) of the float32 table at `rows` (OpenMP).")
      .def(
          "search",
          [](const knn::HnswGraph& g, uintptr_t rows, uintptr_t queries, int64_t nq, int64_t k,
             int64_t ef, uintptr_t allow, bool allow_per_query, uintptr_t out_dist,
             uintptr_t out_rows) {
            g.search(cptr<float>(rows), cptr<float>(queries), nq, k, ef, cptr<uint8_t>(allow),
                     allow_per_query, mptr<float>(out_dist), mptr<int64_t>(out_rows));
          },
          py::arg("rows"), py::arg("queries"), py::arg("nq"), py::arg("k"), py::arg("ef"),
          py::arg("allow") = 0, py::arg("allow_per_query") = false, py::arg("out_dist") = 0,
          py::arg("out_rows") = 0, py::call_guard<py::gil_scoped_release>(),
          "Filtered search: up to k allowed rows per query (row indices; -1/+inf padding).")
      .def("size", &knn::HnswGraph::size)
      .def("dim", &knn::HnswGraph::dim)
      .def("M", &knn::HnswGraph::M)
      .def("metric", [](const knn::HnswGraph& g) { return static_cast<int>(g.metric()); })
      .def(
          "to_flat",
          [](const knn::HnswGraph& g) {
            std::vector<int32_t> flat = g.to_flat();
            return py::bytes(reinterpret_cast<const char*>(flat.data()),
                             flat.size() * sizeof(int32_t));
          },
          "The graph as bytes of int32 words (header, levels, links) for saving.")
      .def_static(
          "from_flat",
          [](uintptr_t data, int64_t count) {
            return knn::HnswGraph::from_flat(cptr<int32_t>(data), count);
          },
          py::arg("data"), py::arg("count"), "Rebuild a graph from to_flat's words (validated).");
}
