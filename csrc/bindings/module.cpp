// affectkit._C: the Python face of the C++ core. No libtorch: tensors arrive as data
// pointers (ints), sizes, dtype/device codes and a CUDA stream handle; the GIL is
// released while kernels run.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <optional>

#include "../affectkit.h"
#include "../core/simd.h"

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

  // Module-local and exhaustive: every C++ exception leaving the core becomes a Python one
  // here, so none falls through to global translators that other pybind11 modules (torch's)
  // may have registered in shared pybind11 internals.
  py::register_local_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const affectkit::TypeError& e) {
      PyErr_SetString(PyExc_TypeError, e.what());
    } catch (const affectkit::ValueError& e) {
      PyErr_SetString(PyExc_ValueError, e.what());
    } catch (const std::bad_alloc&) {
      PyErr_SetString(PyExc_MemoryError, "affectkit: out of host memory");
    } catch (const std::invalid_argument& e) {
      PyErr_SetString(PyExc_ValueError, e.what());
    } catch (const std::exception& e) {  // CudaError and anything else
      PyErr_SetString(PyExc_RuntimeError, e.what());
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
  m.def("simd_level", &simd::level,
        "Instruction set of the CPU kernels: 2 AVX-512, 1 AVX2+FMA, 0 baseline (capped by "
        "AFFECTKIT_SIMD_LEVEL).");
  m.def("graph_simd_level", &graph::simd_level_in_use,
        "Instruction set of the CPU graph kernels: 2 AVX-512, 1 AVX2+FMA, 0 baseline "
        "(capped by AFFECTKIT_SIMD_LEVEL and AFFECTKIT_GRAPH_SIMD_LEVEL).");
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

  // --- attention ---------------------------------------------------------------------
  // Tensors travel as (data_ptr, stride_b, stride_h, stride_row) in elements, the mask as
  // (data_ptr, dtype_code, stride_b, stride_h, stride_i, stride_j), the problem as
  // dims = (B, H, Lq, Lk, D, Dv), index = (q_lengths, kv_lengths, cu_seqlens_q,
  // cu_seqlens_k, total_q, total_k) with 0 for absent pointers.
  using AttnView = std::array<int64_t, 4>;
  using AttnMask = std::array<int64_t, 6>;
  using AttnDims = std::array<int64_t, 6>;
  using AttnIndex = std::array<int64_t, 6>;
  auto attn_view = [](const AttnView& t) {
    return attention::View{reinterpret_cast<const void*>(static_cast<uintptr_t>(t[0])), t[1], t[2], t[3]};
  };
  auto attn_mut = [](const AttnView& t) {
    return attention::MutView{reinterpret_cast<void*>(static_cast<uintptr_t>(t[0])), t[1], t[2], t[3]};
  };
  auto attn_mask = [](const AttnMask& m) {
    return attention::Mask{reinterpret_cast<const void*>(static_cast<uintptr_t>(m[0])),
                           dtype_from_code(static_cast<int32_t>(m[1]), "attn_mask"), m[2], m[3], m[4], m[5]};
  };
  auto attn_problem = [](const AttnDims& d, const AttnIndex& ix, bool causal, double scale,
                         double dropout_p, uint64_t seed) {
    attention::Problem p;
    p.B = d[0], p.H = d[1], p.Lq = d[2], p.Lk = d[3], p.D = d[4], p.Dv = d[5];
    p.q_lengths = reinterpret_cast<const int64_t*>(static_cast<uintptr_t>(ix[0]));
    p.kv_lengths = reinterpret_cast<const int64_t*>(static_cast<uintptr_t>(ix[1]));
    p.cu_seqlens_q = reinterpret_cast<const int64_t*>(static_cast<uintptr_t>(ix[2]));
    p.cu_seqlens_k = reinterpret_cast<const int64_t*>(static_cast<uintptr_t>(ix[3]));
    p.total_q = ix[4], p.total_k = ix[5];
    p.causal = causal, p.scale = scale, p.dropout_p = dropout_p, p.seed = seed;
    return p;
  };
  m.def(
      "attention_forward",
      [=](int device, int dtype, AttnDims dims, AttnIndex index, bool causal, double scale,
          double dropout_p, uint64_t seed, AttnView q, AttnView k, AttnView v, AttnMask mask,
          AttnView out, AttnView lse, uintptr_t stream) {
        attention::attention_forward(device_from_code(device, "device"), dtype_from_code(dtype, "dtype"),
                                     attn_problem(dims, index, causal, scale, dropout_p, seed),
                                     attn_view(q), attn_view(k), attn_view(v), attn_mask(mask),
                                     attn_mut(out), attn_mut(lse), stream);
      },
      py::arg("device"), py::arg("dtype"), py::arg("dims"), py::arg("index"), py::arg("causal"),
      py::arg("scale"), py::arg("dropout_p"), py::arg("seed"), py::arg("q"), py::arg("k"),
      py::arg("v"), py::arg("mask"), py::arg("out"), py::arg("lse"), py::arg("stream") = 0,
      py::call_guard<py::gil_scoped_release>(),
      "Fused attention forward: out = softmax(scale q k^T + masks) v, and the row logsumexp.");
  m.def(
      "attention_backward",
      [=](int device, int dtype, AttnDims dims, AttnIndex index, bool causal, double scale,
          double dropout_p, uint64_t seed, AttnView q, AttnView k, AttnView v, AttnMask mask,
          AttnView out, AttnView grad_out, AttnView lse, AttnView grad_q, AttnView grad_k,
          AttnView grad_v, uintptr_t grad_mask, uintptr_t stream) {
        attention::attention_backward(device_from_code(device, "device"), dtype_from_code(dtype, "dtype"),
                                      attn_problem(dims, index, causal, scale, dropout_p, seed),
                                      attn_view(q), attn_view(k), attn_view(v), attn_mask(mask),
                                      attn_view(out), attn_view(grad_out), attn_view(lse),
                                      attn_mut(grad_q), attn_mut(grad_k), attn_mut(grad_v),
                                      mptr<void>(grad_mask), stream);
      },
      py::arg("device"), py::arg("dtype"), py::arg("dims"), py::arg("index"), py::arg("causal"),
      py::arg("scale"), py::arg("dropout_p"), py::arg("seed"), py::arg("q"), py::arg("k"),
      py::arg("v"), py::arg("mask"), py::arg("out"), py::arg("grad_out"), py::arg("lse"),
      py::arg("grad_q"), py::arg("grad_k"), py::arg("grad_v"), py::arg("grad_mask") = 0,
      py::arg("stream") = 0, py::call_guard<py::gil_scoped_release>(),
      "Fused attention backward (deterministic): grad_q, grad_k, grad_v from grad_out and lse; with\n"
      "grad_mask (a contiguous (B, H, Lq, Lk) buffer in the accumulation dtype, 0 = none), also the\n"
      "gradient of the scores, which is the gradient of a full additive attn_mask.");
  m.def(
      "attention_weights",
      [=](int device, int dtype, AttnDims dims, AttnIndex index, bool causal, double scale,
          double dropout_p, uint64_t seed, AttnView q, AttnView k, AttnMask mask, AttnView lse,
          uintptr_t weights, bool average_heads, uintptr_t stream) {
        attention::attention_weights(device_from_code(device, "device"), dtype_from_code(dtype, "dtype"),
                                     attn_problem(dims, index, causal, scale, dropout_p, seed),
                                     attn_view(q), attn_view(k), attn_mask(mask), attn_view(lse),
                                     mptr<void>(weights), average_heads, stream);
      },
      py::arg("device"), py::arg("dtype"), py::arg("dims"), py::arg("index"), py::arg("causal"),
      py::arg("scale"), py::arg("dropout_p"), py::arg("seed"), py::arg("q"), py::arg("k"),
      py::arg("mask"), py::arg("lse"), py::arg("weights"), py::arg("average_heads") = true,
      py::arg("stream") = 0,
      py::call_guard<py::gil_scoped_release>(),
      "Attention probabilities recomputed from the saved lse: (B, Lq, Lk) head-averaged, or (B, H, Lq, Lk).");
  // --- graph (EEG electrode graphs) ------------------------------------------------------
  m.def(
      "graph_conv_forward",
      [](int device, int dtype, uintptr_t x, uintptr_t adjacency, uintptr_t weight,
         uintptr_t bias, uintptr_t out, int64_t S, int64_t N, int64_t F, int64_t Fo, int64_t B,
         int32_t activation, uintptr_t stream) {
        graph::graph_conv_forward(device_from_code(device, "device"),
                                  dtype_from_code(dtype, "dtype"), cptr<void>(x),
                                  cptr<void>(adjacency), cptr<void>(weight), cptr<void>(bias),
                                  mptr<void>(out), S, N, F, Fo, B, activation, stream);
      },
      py::arg("device"), py::arg("dtype"), py::arg("x"), py::arg("adjacency"), py::arg("weight"),
      py::arg("bias"), py::arg("out"), py::arg("S"), py::arg("N"), py::arg("F"), py::arg("Fo"),
      py::arg("B"), py::arg("activation"), py::arg("stream") = 0,
      py::call_guard<py::gil_scoped_release>(),
      "out[s] = act(A[s // (S/B)] @ x[s] @ weight + bias); x (S, N, F), adjacency (B, N, N), "
      "weight (F, Fo) and bias (Fo) optional (0).");
  m.def(
      "graph_conv_pool_forward",
      [](int device, int dtype, uintptr_t x, uintptr_t adjacency, uintptr_t weight,
         uintptr_t bias, uintptr_t assignment, uintptr_t scores, uintptr_t node_out,
         uintptr_t pooled, int64_t S, int64_t N, int64_t F, int64_t Fo, int64_t B, int64_t P,
         int32_t activation, uintptr_t stream) {
        graph::graph_conv_pool_forward(
            device_from_code(device, "device"), dtype_from_code(dtype, "dtype"), cptr<void>(x),
            cptr<void>(adjacency), cptr<void>(weight), cptr<void>(bias),
            cptr<int64_t>(assignment), cptr<void>(scores), mptr<void>(node_out),
            mptr<void>(pooled), S, N, F, Fo, B, P, activation, stream);
      },
      py::arg("device"), py::arg("dtype"), py::arg("x"), py::arg("adjacency"), py::arg("weight"),
      py::arg("bias"), py::arg("assignment"), py::arg("scores"), py::arg("node_out"),
      py::arg("pooled"), py::arg("S"), py::arg("N"), py::arg("F"), py::arg("Fo"), py::arg("B"),
      py::arg("P"), py::arg("activation"), py::arg("stream") = 0,
      py::call_guard<py::gil_scoped_release>(),
      "graph_conv_forward, then pooling of node_out (S, N, Fo) into pooled (S, P, Fo) by "
      "assignment (N) int64 with mean (scores 0) or softmax weights of scores (S, N).");
  m.def(
      "graph_conv_backward",
      [](int device, int dtype, uintptr_t grad_out, uintptr_t out, uintptr_t x,
         uintptr_t adjacency, uintptr_t weight, uintptr_t grad_x, uintptr_t grad_adjacency,
         uintptr_t grad_weight, uintptr_t grad_bias, int64_t S, int64_t N, int64_t F,
         int64_t Fo, int64_t B, int32_t activation, uintptr_t stream,
         std::optional<std::array<int64_t, 3>> grad_out_strides) {
        graph::graph_conv_backward(
            device_from_code(device, "device"), dtype_from_code(dtype, "dtype"),
            cptr<void>(grad_out), cptr<void>(out), cptr<void>(x), cptr<void>(adjacency),
            cptr<void>(weight), mptr<void>(grad_x), mptr<void>(grad_adjacency),
            mptr<void>(grad_weight), mptr<void>(grad_bias), S, N, F, Fo, B, activation, stream,
            grad_out_strides ? grad_out_strides->data() : nullptr);
      },
      py::arg("device"), py::arg("dtype"), py::arg("grad_out"), py::arg("out"), py::arg("x"),
      py::arg("adjacency"), py::arg("weight"), py::arg("grad_x"), py::arg("grad_adjacency"),
      py::arg("grad_weight"), py::arg("grad_bias"), py::arg("S"), py::arg("N"), py::arg("F"),
      py::arg("Fo"), py::arg("B"), py::arg("activation"), py::arg("stream") = 0,
      py::arg("grad_out_strides") = std::nullopt, py::call_guard<py::gil_scoped_release>(),
      "Gradients of graph_conv_forward (each gradient pointer may be 0: not needed); "
      "grad_out_strides: None (contiguous) or its (sample, node, feature) element strides.");
  m.def(
      "cheb_graph_conv_forward",
      [](int device, int dtype, uintptr_t x, uintptr_t laplacian, uintptr_t coefficients,
         uintptr_t out, int64_t S, int64_t N, int64_t F, int64_t Fo, int64_t K, bool matrix,
         uintptr_t stream) {
        graph::cheb_graph_conv_forward(device_from_code(device, "device"),
                                       dtype_from_code(dtype, "dtype"), cptr<void>(x),
                                       cptr<void>(laplacian), cptr<void>(coefficients),
                                       mptr<void>(out), S, N, F, Fo, K, matrix, stream);
      },
      py::arg("device"), py::arg("dtype"), py::arg("x"), py::arg("laplacian"),
      py::arg("coefficients"), py::arg("out"), py::arg("S"), py::arg("N"), py::arg("F"),
      py::arg("Fo"), py::arg("K"), py::arg("matrix_coefficients"), py::arg("stream") = 0,
      py::call_guard<py::gil_scoped_release>(),
      "out[s] = sum_k T_k(L) x[s] theta_k; coefficients (K) scalars or (K, F, Fo) matrices.");
  m.def(
      "cheb_graph_conv_backward",
      [](int device, int dtype, uintptr_t grad_out, uintptr_t x, uintptr_t laplacian,
         uintptr_t coefficients, uintptr_t grad_x, uintptr_t grad_laplacian,
         uintptr_t grad_coefficients, int64_t S, int64_t N, int64_t F, int64_t Fo, int64_t K,
         bool matrix, uintptr_t stream) {
        graph::cheb_graph_conv_backward(
            device_from_code(device, "device"), dtype_from_code(dtype, "dtype"),
            cptr<void>(grad_out), cptr<void>(x), cptr<void>(laplacian), cptr<void>(coefficients),
            mptr<void>(grad_x), mptr<void>(grad_laplacian), mptr<void>(grad_coefficients), S, N,
            F, Fo, K, matrix, stream);
      },
      py::arg("device"), py::arg("dtype"), py::arg("grad_out"), py::arg("x"),
      py::arg("laplacian"), py::arg("coefficients"), py::arg("grad_x"),
      py::arg("grad_laplacian"), py::arg("grad_coefficients"), py::arg("S"), py::arg("N"),
      py::arg("F"), py::arg("Fo"), py::arg("K"), py::arg("matrix_coefficients"),
      py::arg("stream") = 0, py::call_guard<py::gil_scoped_release>(),
      "Gradients of cheb_graph_conv_forward (each gradient pointer may be 0: not needed).");
  m.def(
      "hierarchical_pool_forward",
      [](int device, int dtype, uintptr_t x, uintptr_t assignment, uintptr_t scores,
         uintptr_t out, int64_t S, int64_t N, int64_t F, int64_t P, uintptr_t stream) {
        graph::hierarchical_pool_forward(device_from_code(device, "device"),
                                         dtype_from_code(dtype, "dtype"), cptr<void>(x),
                                         cptr<int64_t>(assignment), cptr<void>(scores),
                                         mptr<void>(out), S, N, F, P, stream);
      },
      py::arg("device"), py::arg("dtype"), py::arg("x"), py::arg("assignment"),
      py::arg("scores"), py::arg("out"), py::arg("S"), py::arg("N"), py::arg("F"), py::arg("P"),
      py::arg("stream") = 0, py::call_guard<py::gil_scoped_release>(),
      "out[s, p] = weighted sum of x[s, c] over the children c of p (mean, or softmax of "
      "scores (S, N) over the children); assignment (N) int64 in [0, P).");
  m.def(
      "hierarchical_pool_backward",
      [](int device, int dtype, uintptr_t grad_out, uintptr_t x, uintptr_t assignment,
         uintptr_t scores, uintptr_t grad_x, uintptr_t grad_scores, int64_t S, int64_t N,
         int64_t F, int64_t P, uintptr_t stream) {
        graph::hierarchical_pool_backward(
            device_from_code(device, "device"), dtype_from_code(dtype, "dtype"),
            cptr<void>(grad_out), cptr<void>(x), cptr<int64_t>(assignment), cptr<void>(scores),
            mptr<void>(grad_x), mptr<void>(grad_scores), S, N, F, P, stream);
      },
      py::arg("device"), py::arg("dtype"), py::arg("grad_out"), py::arg("x"),
      py::arg("assignment"), py::arg("scores"), py::arg("grad_x"), py::arg("grad_scores"),
      py::arg("S"), py::arg("N"), py::arg("F"), py::arg("P"), py::arg("stream") = 0,
      py::call_guard<py::gil_scoped_release>(),
      "Gradients of hierarchical_pool_forward (grad_x, grad_scores; either may be 0).");
  // --- knn -------------------------------------------------------------------------
  m.def("knn_f16_kernel", [] { return std::string(knn::f16_kernel_name()); },
        "Which float16 row code this CPU runs: 'avx512', 'f16c' or 'scalar'.");
  m.def(
      "prepare_rows",
      [](uintptr_t src, uintptr_t dst, int64_t n, int64_t d) {
        return knn::prepare_rows(cptr<float>(src), mptr<float>(dst), n, d);
      },
      py::arg("src"), py::arg("dst"), py::arg("n"), py::arg("d"),
      py::call_guard<py::gil_scoped_release>(),
      "Checks float32 rows (n, d) for NaN / inf and, when dst != 0, writes them scaled to unit "
      "norm (zero rows stay zero): the first row holding NaN or inf, or -1.");
  m.def(
      "exact_knn",
      [](int device, int dtype, uintptr_t queries, int64_t nq, uintptr_t database, int64_t n,
         int64_t d, int metric, int64_t k, uintptr_t mask, bool mask_per_query,
         uintptr_t cand_offsets, uintptr_t cand_rows, uintptr_t row_ids, uintptr_t db_sqnorms,
         uintptr_t out_dist, uintptr_t out_ids, uintptr_t stream, int db_dtype, int64_t groups,
         uintptr_t group_offsets, uintptr_t group_rows, uintptr_t query_group_offsets,
         uintptr_t query_groups) {
        knn::Filter filter;
        filter.mask = cptr<uint8_t>(mask);
        filter.mask_per_query = mask_per_query;
        filter.cand_offsets = cptr<int64_t>(cand_offsets);
        filter.cand_rows = cptr<int64_t>(cand_rows);
        filter.groups = groups;
        filter.group_offsets = cptr<int64_t>(group_offsets);
        filter.group_rows = cptr<int64_t>(group_rows);
        filter.query_group_offsets = cptr<int64_t>(query_group_offsets);
        filter.query_groups = cptr<int64_t>(query_groups);
        const DType qt = dtype_from_code(dtype, "dtype");
        knn::exact_search(device_from_code(device, "device"), qt, cptr<void>(queries), nq,
                          cptr<void>(database),
                          db_dtype < 0 ? qt : dtype_from_code(db_dtype, "db_dtype"), n, d,
                          knn::metric_from_code(metric, "metric"), k, filter,
                          cptr<int64_t>(row_ids), cptr<void>(db_sqnorms), mptr<void>(out_dist),
                          mptr<int64_t>(out_ids), stream);
      },
      py::arg("device"), py::arg("dtype"), py::arg("queries"), py::arg("nq"),
      py::arg("database"), py::arg("n"), py::arg("d"), py::arg("metric"), py::arg("k"),
      py::arg("mask") = 0, py::arg("mask_per_query") = false, py::arg("cand_offsets") = 0,
      py::arg("cand_rows") = 0, py::arg("row_ids") = 0, py::arg("db_sqnorms") = 0,
      py::arg("out_dist") = 0, py::arg("out_ids") = 0, py::arg("stream") = 0,
      py::arg("db_dtype") = -1, py::arg("groups") = 0, py::arg("group_offsets") = 0,
      py::arg("group_rows") = 0, py::arg("query_group_offsets") = 0, py::arg("query_groups") = 0,
      py::call_guard<py::gil_scoped_release>(),
      "Exact filtered k-NN: for each query the k allowed rows with the smallest distance "
      "(metric 0 ip: -<q,x>, 1 l2: squared, 2 cosine: 1-<q,x> on unit vectors); ties to the "
      "smaller id; padded with id -1 and +inf. Filter: a byte mask (n,) or (nq, n), CSR "
      "candidate rows per query, or row groups (CSR group_offsets/group_rows, ascending rows) "
      "with CSR query_group_offsets/query_groups naming each query's distinct groups. "
      "db_dtype: -1 (the queries' dtype) or, on the CPU, float16 rows with float32 queries "
      "(scored in float32).");

  py::class_<knn::HnswGraph>(m, "HnswGraph",
                             "HNSW-style graph over float32 or float16 rows owned by the caller; filtered "
                             "search walks through every node and collects only allowed ones.")
      .def(py::init([](int64_t dim, int metric, int64_t M, int64_t ef_construction,
                       uint64_t seed, int row_dtype, bool walk_codes) {
             return std::make_unique<knn::HnswGraph>(
                 dim, knn::metric_from_code(metric, "metric"), M, ef_construction, seed,
                 dtype_from_code(row_dtype, "row_dtype"), walk_codes);
           }),
           py::arg("dim"), py::arg("metric"), py::arg("M") = 16,
           py::arg("ef_construction") = 100, py::arg("seed") = 0, py::arg("row_dtype") = 0,
           py::arg("walk_codes") = true,
           "walk_codes: keep 8-bit codes of the rows for searches to walk on (their beam is "
           "scored again on the rows).")
      .def(
          "add",
          [](knn::HnswGraph& g, uintptr_t rows, int64_t count) {
            g.add(cptr<void>(rows), count);
          },
          py::arg("rows"), py::arg("count"), py::call_guard<py::gil_scoped_release>(),
          "Insert rows [size(), size() + count) of the table at `rows` (row_dtype; OpenMP).")
      .def(
          "search",
          [](const knn::HnswGraph& g, uintptr_t rows, uintptr_t queries, int64_t nq, int64_t k,
             int64_t ef, uintptr_t allow, bool allow_per_query, uintptr_t out_dist,
             uintptr_t out_rows) {
            g.search(cptr<void>(rows), cptr<float>(queries), nq, k, ef, cptr<uint8_t>(allow),
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
      .def("row_dtype", [](const knn::HnswGraph& g) { return static_cast<int>(g.row_dtype()); })
      .def(
          "to_flat",
          [](const knn::HnswGraph& g) {
            std::vector<int32_t> flat = g.to_flat();
            return py::bytes(reinterpret_cast<const char*>(flat.data()),
                             flat.size() * sizeof(int32_t));
          },
          "The graph as bytes of int32 words (header, levels, links) for saving.")
      .def("has_walk_codes", [](const knn::HnswGraph& g) { return g.walk_codes() != nullptr; })
      .def(
          "walk_codes_state",
          [](const knn::HnswGraph& g) -> py::object {
            const knn::WalkCodes* c = g.walk_codes();
            if (c == nullptr) return py::none();
            auto bytes = [](const void* p, size_t n) { return py::bytes(static_cast<const char*>(p), n); };
            return py::make_tuple(bytes(c->data(), static_cast<size_t>(c->rows() * c->stride())),
                                  c->rows(), c->stride(), bytes(c->lo(), c->dim() * sizeof(float)),
                                  bytes(c->step(), c->dim() * sizeof(float)),
                                  bytes(c->outside_flags(), static_cast<size_t>(c->rows())));
          },
          "None, or (codes bytes, rows, stride, lo bytes, step bytes, outside bytes): the walk codes "
          "for saving (a row of codes is stride bytes; value ~ lo[j] + step[j] * code; outside: a "
          "byte a row, 1 where a value lies past the ranges and the walk scores the row itself).")
      .def(
          "set_walk_codes",
          [](knn::HnswGraph& g, uintptr_t codes, int64_t count, uintptr_t lo, uintptr_t step,
             uintptr_t outside, bool view) {
            g.set_walk_codes(cptr<uint8_t>(codes), count, cptr<float>(lo), cptr<float>(step),
                             cptr<uint8_t>(outside), view);
          },
          py::arg("codes"), py::arg("count"), py::arg("lo"), py::arg("step"), py::arg("outside"),
          py::arg("view") = false,
          "Install saved walk codes: count (= size()) rows of stride bytes, dim floats of lo and "
          "step, count outside flags. view: use 64-byte aligned codes in place (the caller keeps "
          "them alive and unchanged; the next add copies them); other codes are copied.")
      .def("walk_codes_in_place",
           [](const knn::HnswGraph& g) { return g.walk_codes() != nullptr && g.walk_codes()->is_view(); },
           "The walk codes are read where set_walk_codes(view=True) found them.")
      .def(
          "code_walk", [](knn::HnswGraph& g, uintptr_t rows) { g.code_walk(cptr<void>(rows)); },
          py::arg("rows"), py::call_guard<py::gil_scoped_release>(),
          "Code every node's row for the walk (from the rows at `rows`, row_dtype).")
      .def("drop_walk_codes", &knn::HnswGraph::drop_walk_codes,
           "Free the walk codes: searches then walk on the rows.")
      .def(
          "walk_distances",
          [](const knn::HnswGraph& g, uintptr_t rows, uintptr_t query, uintptr_t nodes, int64_t n,
             uintptr_t out) {
            g.walk_distances(cptr<void>(rows), cptr<float>(query), cptr<int32_t>(nodes), n,
                             mptr<float>(out));
          },
          py::arg("rows"), py::arg("query"), py::arg("nodes"), py::arg("n"), py::arg("out"),
          "The distances a search's walk ranks n int32 nodes by, for one float32 query: code "
          "distances, or the rows' own for rows outside the codes' ranges (for checking the codes).")
      .def(
          "audit_links",
          [](const knn::HnswGraph& g, uintptr_t rows) {
            knn::HnswGraph::LinkAudit a;
            {
              py::gil_scoped_release nogil;
              a = g.audit_links(cptr<void>(rows));
            }
            py::dict d;
            d["lists"] = a.lists;
            d["full"] = a.full;
            d["marked"] = a.marked;
            d["unsorted"] = a.unsorted;
            d["kept_violations"] = a.kept_violations;
            d["pruned"] = a.pruned;
            d["pruned_unwitnessed"] = a.pruned_unwitnessed;
            return d;
          },
          py::arg("rows"),
          "Check the level-0 lists against the rules add() keeps them by (for testing the build): "
          "a dict of counts: lists, full, marked (kept flags known), unsorted (marked lists not "
          "sorted by distance, id), kept_violations (kept links the heuristic would prune), pruned, "
          "pruned_unwitnessed (pruned links no earlier kept link prunes).")
      .def("set_placement_check", &knn::HnswGraph::set_placement_check, py::arg("on"),
           "For testing the build: from now on, compare every link placed into a marked list "
           "with a re-selection of the whole list (slow); resets the counts.")
      .def(
          "placement_check",
          [](const knn::HnswGraph& g) {
            const knn::HnswGraph::PlacementCheck c = g.placement_check();
            py::dict d;
            d["pruned"] = c.pruned;
            d["pruned_mismatch"] = c.pruned_mismatch;
            d["kept"] = c.kept;
            d["kept_mismatch"] = c.kept_mismatch;
            return d;
          },
          "Counts since set_placement_check, over lists whose kept flags match the heuristic: "
          "placements of a link the heuristic prunes (pruned) and keeps (kept), and those "
          "unlike the re-selection (pruned_mismatch, kept_mismatch).")
      .def_static(
          "from_flat",
          [](uintptr_t data, int64_t count) {
            return knn::HnswGraph::from_flat(cptr<int32_t>(data), count);
          },
          py::arg("data"), py::arg("count"), "Rebuild a graph from to_flat's words (validated).");
}
