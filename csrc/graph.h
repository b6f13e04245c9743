// The similarity graph as the kernels see it (SPEC §2).
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

inline GraphArgs make_graph_args(const at::Tensor& indptr, const at::Tensor& indices,
                                 const at::Tensor& weights, const at::Tensor& t_indptr,
                                 const at::Tensor& t_indices, const at::Tensor& t_weights,
                                 const at::Tensor& labels, at::ArrayRef<double> label_weights,
                                 at::ArrayRef<int64_t> label_classes,
                                 const at::Tensor& pos_weight) {
  return GraphArgs{indptr.contiguous(),   indices.contiguous(),
                   weights.contiguous(),  t_indptr.contiguous(),
                   t_indices.contiguous(), t_weights.contiguous(),
                   labels.contiguous(),   label_weights.vec(),
                   label_classes.vec(),   pos_weight.contiguous()};
}

// Shape/dtype/device contract of a graph over the N rows of z.
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
}

// make_graph_args + the checks of a graph over the rows of z (ops taking z and a graph).
inline GraphArgs checked_graph(const char* op, const at::Tensor& z, const at::Tensor& indptr,
                               const at::Tensor& indices, const at::Tensor& weights,
                               const at::Tensor& t_indptr, const at::Tensor& t_indices,
                               const at::Tensor& t_weights, const at::Tensor& labels,
                               at::ArrayRef<double> label_weights,
                               at::ArrayRef<int64_t> label_classes, const at::Tensor& pos_weight) {
  GraphArgs g = make_graph_args(indptr, indices, weights, t_indptr, t_indices, t_weights, labels,
                                label_weights, label_classes, pos_weight);
  check_embeddings(op, z);
  check_graph(op, g, z);
  return g;
}

// The data-dependent part of the contract: edge indices in [0, N) and class
// ids in [-1, label_classes[l]). PairGraph guarantees it, but a kernel that
// indexes with these unchecked (the CUDA class sums are atomics into a [C, D]
// buffer) would write out of bounds on a hand-made graph, so the CUDA ops call
// this: O(E + L·N) tensor reductions on the graph's device and one host sync.
inline void check_graph_ranges(const char* op, const GraphArgs& g, int64_t n) {
  struct Range {
    std::string name;
    at::Tensor t;
    int64_t lo, hi;  // allowed: [lo, hi)
  };
  std::vector<Range> ranges;
  if (g.indices.numel() > 0) {
    ranges.push_back({"graph.indices", g.indices, 0, n});
    ranges.push_back({"graph.t_indices", g.t_indices, 0, n});
  }
  if (n > 0) {
    for (int64_t l = 0; l < g.num_label_sets(); ++l) {
      ranges.push_back({"graph.labels[" + std::to_string(l) + "]", g.labels[l], -1,
                        g.label_classes[l]});
    }
  }
  if (ranges.empty()) return;
  std::vector<at::Tensor> bad;
  for (const Range& r : ranges) bad.push_back((r.t.min() < r.lo) | (r.t.max() >= r.hi));
  if (!at::stack(bad).any().item<bool>()) return;  // the one sync of the fast path
  for (const Range& r : ranges) {
    const int64_t lo = r.t.min().item<int64_t>(), hi = r.t.max().item<int64_t>();
    PALFAST_CHECK(lo >= r.lo && hi < r.hi, op, ": ", r.name, " must hold values in [", r.lo, ", ",
                  r.hi, ")", r.lo < 0 ? " (class ids, -1 for none, below label_classes)" : "",
                  ", got values in [", lo, ", ", hi, "]");
  }
}

}  // namespace palfast
