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

#include <cmath>
#include <functional>
#include <string>
#include <vector>

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

// The values every kernel indexes with: CSR row pointers monotone from 0 to E,
// column indices in [0, N), class ids in [-1, label_classes[l]) with
// label_classes[l] <= N, weights and degrees finite and >= 0. PairGraph's
// constructors guarantee all of this, but its tensors can be changed in place
// afterwards (or a graph rebuilt with dataclasses.replace), and a raw call of
// torch.ops.palfast.* must never read or write out of bounds.
//
// This is the one deliberate exception to "no host syncs in forward/backward"
// (see docs/api.md, "Graph validation"): O(E + N) device-side reductions,
// gathered into one small tensor and copied to the host once per op call.
// Messages are only worked out (with more syncs) once something is wrong.
inline void check_graph_values(const char* op, const GraphArgs& g, int64_t n) {
  const int64_t e = g.indices.size(0);
  std::vector<at::Tensor> bad;  // 0-dim bool tensors, true = violated
  std::vector<std::string> what;
  std::vector<std::function<std::string()>> got;  // the actual values, worked out on failure
  auto add = [&](at::Tensor b, std::string msg, std::function<std::string()> actual) {
    bad.push_back(std::move(b));
    what.push_back(std::move(msg));
    got.push_back(std::move(actual));
  };
  auto range = [](const at::Tensor& t) {
    return [t] {
      return c10::str("values in [", t.min().item(), ", ", t.max().item(), "]");
    };
  };
  auto csr = [&](const char* ptr_name, const at::Tensor& ptr, const char* idx_name,
                 const at::Tensor& idx) {
    add(ptr[0].ne(0).logical_or(ptr[n].ne(e)),
        std::string(ptr_name) + " must start at 0 and end at E = " + std::to_string(e),
        [ptr, n] {
          return c10::str("first ", ptr[0].item(), ", last ", ptr[n].item());
        });
    if (n > 0) {
      add(ptr.diff().lt(0).any(), std::string(ptr_name) + " must be non-decreasing",
          [] { return std::string("a decreasing step"); });
    }
    if (e > 0) {
      add(idx.min().lt(0).logical_or(idx.max().ge(n)),
          std::string(idx_name) + " must be in [0, N = " + std::to_string(n) + ")", range(idx));
    }
  };
  // NaN fails both comparisons, so it is caught with negative values and infinities.
  auto finite_nonneg = [&](const char* name, const at::Tensor& w) {
    if (w.numel() == 0) return;
    add(w.min().ge(0).logical_and(w.max().lt(INFINITY)).logical_not(),
        std::string(name) + " must be finite and >= 0", range(w));
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
                  "] (compact class ids), got ", c);
    PALFAST_CHECK(std::isfinite(a) && a >= 0, op, ": graph.label_weights[", l,
                  "] must be finite and >= 0, got ", a);
    if (n > 0) {
      const at::Tensor y = g.labels[l];
      add(y.min().lt(-1).logical_or(y.max().ge(c)),
          "graph.labels[" + std::to_string(l) + "] must hold class ids in [-1, label_classes = " +
              std::to_string(c) + ")",
          range(y));
    }
  }
  if (bad.empty()) return;
  const at::Tensor flags = at::stack(bad).to(at::kCPU);  // the one host sync
  const bool* f = flags.data_ptr<bool>();
  for (size_t k = 0; k < what.size(); ++k) {
    PALFAST_CHECK(!f[k], op, ": ", what[k], ", got ", got[k](),
                  ". If the graph came from a PairGraph, its tensors were changed after it "
                  "was built (in place, or with dataclasses.replace): build a new PairGraph");
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

}  // namespace palfast
