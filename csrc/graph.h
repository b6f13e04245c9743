// The similarity graph as the kernels see it (docs/api.md, "PairGraph").
//
// G = CSR edges + Σ_l label_weights[l] · [labels[l, i] == labels[l, j] >= 0, i != j].
// The label part is never expanded into edges: kernels use per-class sums,
// so a label graph costs O(N·D) instead of O(Σ n_c² · D).
//
//   indptr    [N+1] int64, indices [E] int64, weights [E] float32   rows of G
//   t_indptr, t_indices, t_weights                                  rows of Gᵀ (the
//             same tensors when G is symmetric)
//   labels    [L, N] int64, compact class ids in [0, label_classes[l]) or -1
//   pos_weight [N] float64, W_i = Σ_{j≠i} w_ij (precomputed by PairGraph)
#pragma once

#include "checks.h"

#include <algorithm>
#include <cmath>
#include <optional>
#include <utility>

namespace palfast {

struct GraphArgs {
  at::Tensor indptr, indices, weights;
  at::Tensor t_indptr, t_indices, t_weights;
  at::Tensor labels;
  std::vector<double> label_weights;
  std::vector<int64_t> label_classes;
  at::Tensor pos_weight;

  int64_t num_label_sets() const { return labels.size(0); }
};

// The graph parameters of an op's C++ entry point, in the order of the schemas'
// PALFAST_GRAPH_ARGS (csrc/palfast.cpp), and the same names as call arguments:
// every entry point (csrc/<op>.h) spells them through these two macros.
#define PALFAST_GRAPH_PARAMS                                                                  \
  const at::Tensor &indptr, const at::Tensor &indices, const at::Tensor &weights,              \
      const at::Tensor &t_indptr, const at::Tensor &t_indices, const at::Tensor &t_weights,     \
      const at::Tensor &labels, at::ArrayRef<double> label_weights,                            \
      at::ArrayRef<int64_t> label_classes, const at::Tensor &pos_weight
#define PALFAST_GRAPH_NAMES                                                                   \
  indptr, indices, weights, t_indptr, t_indices, t_weights, labels, label_weights,              \
      label_classes, pos_weight

inline GraphArgs make_graph_args(PALFAST_GRAPH_PARAMS) {
  return GraphArgs{indptr.contiguous(),   indices.contiguous(),
                   weights.contiguous(),  t_indptr.contiguous(),
                   t_indices.contiguous(), t_weights.contiguous(),
                   labels.contiguous(),   label_weights.vec(),
                   label_classes.vec(),   pos_weight.contiguous()};
}

// The values every kernel indexes with: CSR row pointers monotone from 0 to E,
// column indices in [0, N), class ids in [-1, label_classes[l]) with
// label_classes[l] <= N, weights and degrees finite and >= 0. PairGraph's
// constructors guarantee all of this, but its tensors can be changed in place
// afterwards (or a graph rebuilt with dataclasses.replace), and a raw call of
// torch.ops.palfast.* must never read or write out of bounds.
//
// This is the one deliberate exception to "no host syncs in forward/backward"
// (docs/api.md, "Graph validation in the ops"): O(E + N) work. CPU tensors are
// scanned by this thread alone (about 1 ms at N = 65536, E = 524288): dozens of
// small parallel ATen reductions would each wait for every pool thread, which on
// a busy machine cost 60 ms at the median. Other devices reduce on the device
// and copy the few results to the host at once.
namespace graph_values {

// [min, max] of a 1-D contiguous tensor (NaN when it holds a NaN), or nullopt when empty.
inline std::optional<std::pair<double, double>> range(const at::Tensor& t) {
  if (t.numel() == 0) return std::nullopt;
  if (!t.is_cpu()) {
    const auto mm = at::aminmax(t);
    const at::Tensor both = at::stack({std::get<0>(mm), std::get<1>(mm)}).to(at::kDouble).cpu();
    return std::make_pair(both[0].item<double>(), both[1].item<double>());
  }
  double lo = 0, hi = 0;
  AT_DISPATCH_ALL_TYPES(t.scalar_type(), "palfast_graph_range", [&] {
    const scalar_t* p = t.data_ptr<scalar_t>();
    scalar_t a = p[0], b = p[0];
    bool nan = false;
    for (int64_t k = 1, m = t.numel(); k < m; ++k) {
      const scalar_t v = p[k];
      nan |= v != v;
      a = v < a ? v : a;
      b = v > b ? v : b;
    }
    nan |= p[0] != p[0];
    lo = nan ? NAN : static_cast<double>(a);
    hi = nan ? NAN : static_cast<double>(b);
  });
  return std::make_pair(lo, hi);
}

// Smallest step ptr[k + 1] − ptr[k] of a CSR row-pointer array (0 when it has one entry).
inline int64_t min_step(const at::Tensor& ptr) {
  if (ptr.numel() < 2) return 0;
  if (!ptr.is_cpu()) return ptr.diff().min().item<int64_t>();
  const int64_t* p = ptr.data_ptr<int64_t>();
  int64_t m = p[1] - p[0];
  for (int64_t k = 1, n = ptr.numel() - 1; k < n; ++k) m = std::min(m, p[k + 1] - p[k]);
  return m;
}

}  // namespace graph_values

inline void check_graph_values(const char* op, const GraphArgs& g, int64_t n) {
  const int64_t e = g.indices.size(0);
  const char* stale =
      ". If the graph came from a PairGraph, its tensors were changed after it was built (in "
      "place, or with dataclasses.replace): build a new PairGraph";
  auto csr = [&](const char* ptr_name, const at::Tensor& ptr, const char* idx_name,
                 const at::Tensor& idx) {
    const at::Tensor ends = at::stack({ptr[0], ptr[n]}).cpu();  // one copy
    const int64_t first = ends.data_ptr<int64_t>()[0], last = ends.data_ptr<int64_t>()[1];
    PALFAST_CHECK(first == 0 && last == e, op, ": ", ptr_name, " must start at 0 and end at E = ",
                  e, ", got first ", first, ", last ", last, stale);
    const int64_t step = graph_values::min_step(ptr);
    PALFAST_CHECK(step >= 0, op, ": ", ptr_name, " must be non-decreasing, got a step of ", step,
                  stale);
    if (const auto r = graph_values::range(idx)) {
      PALFAST_CHECK(r->first >= 0 && r->second < n, op, ": ", idx_name, " must be in [0, N = ", n,
                    "), got values in [", static_cast<int64_t>(r->first), ", ",
                    static_cast<int64_t>(r->second), "]", stale);
    }
  };
  // NaN fails both comparisons, so it is caught with negative values and infinities.
  auto finite_nonneg = [&](const char* name, const at::Tensor& w) {
    if (const auto r = graph_values::range(w)) {
      PALFAST_CHECK(r->first >= 0 && r->second < INFINITY, op, ": ", name,
                    " must be finite and >= 0, got values in [", r->first, ", ", r->second, "]",
                    stale);
    }
  };
  csr("graph.indptr", g.indptr, "graph.indices", g.indices);
  if (!g.t_indptr.is_same(g.indptr) || !g.t_indices.is_same(g.indices)) {
    csr("graph.t_indptr", g.t_indptr, "graph.t_indices", g.t_indices);
  }
  finite_nonneg("graph.weights", g.weights);
  if (!g.t_weights.is_same(g.weights)) finite_nonneg("graph.t_weights", g.t_weights);
  finite_nonneg("graph.pos_weight", g.pos_weight);
  for (int64_t l = 0; l < g.num_label_sets(); ++l) {
    const int64_t c = g.label_classes[l];
    const double a = g.label_weights[l];
    PALFAST_CHECK(0 <= c && c <= n, op, ": graph.label_classes[", l, "] must be in [0, N = ", n,
                  "] (compact class ids), got ", c, stale);
    PALFAST_CHECK(std::isfinite(a) && a >= 0, op, ": graph.label_weights[", l,
                  "] must be finite and >= 0, got ", a, stale);
    if (const auto r = graph_values::range(g.labels[l])) {
      PALFAST_CHECK(r->first >= -1 && r->second < c, op, ": graph.labels[", l,
                    "] must hold class ids in [-1, label_classes = ", c, "), got values in [",
                    static_cast<int64_t>(r->first), ", ", static_cast<int64_t>(r->second), "]",
                    stale);
    }
  }
}

// Shape/dtype/device contract of a graph over the N rows of z, and its values
// (check_graph_values).
inline void check_graph(const char* op, const GraphArgs& g, const at::Tensor& z) {
  const int64_t n = z.size(0);
  check_1d(op, "graph.indptr", g.indptr, at::kLong, n + 1);
  check_1d(op, "graph.indices", g.indices, at::kLong);
  check_1d(op, "graph.weights", g.weights, at::kFloat, g.indices.size(0));
  check_1d(op, "graph.t_indptr", g.t_indptr, at::kLong, n + 1);
  check_1d(op, "graph.t_indices", g.t_indices, at::kLong, g.indices.size(0));
  check_1d(op, "graph.t_weights", g.t_weights, at::kFloat, g.indices.size(0));
  check_1d(op, "graph.pos_weight", g.pos_weight, at::kDouble, n);
  PALFAST_CHECK(g.labels.dim() == 2 && g.labels.size(1) == n, op,
                ": graph.labels must have shape [L, ", n, "] (one row per label set), got ",
                g.labels.sizes(), ". The graph was built for a different number of rows than z has");
  PALFAST_CHECK_TYPE(g.labels.scalar_type() == at::kLong, op, ": graph.labels must be int64, got ",
                     g.labels.scalar_type());
  PALFAST_CHECK(static_cast<int64_t>(g.label_weights.size()) == g.labels.size(0) &&
                    static_cast<int64_t>(g.label_classes.size()) == g.labels.size(0),
                op, ": graph.label_weights and graph.label_classes must have one entry per label set (",
                g.labels.size(0), "), got ", g.label_weights.size(), " and ", g.label_classes.size());
  for (const at::Tensor* t : {&g.indptr, &g.indices, &g.weights, &g.t_indptr, &g.t_indices,
                              &g.t_weights, &g.labels, &g.pos_weight}) {
    check_same_device(op, "graph", *t, z);
  }
  check_graph_values(op, g, n);
}

// make_graph_args + the checks of a graph over the rows of z (ops taking z and a graph).
inline GraphArgs checked_graph(const char* op, const at::Tensor& z, PALFAST_GRAPH_PARAMS) {
  GraphArgs g = make_graph_args(PALFAST_GRAPH_NAMES);
  check_embeddings(op, z);
  check_graph(op, g, z);
  return g;
}

}  // namespace palfast
