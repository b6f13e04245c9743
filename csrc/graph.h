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
#include <utility>
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

// The few numbers check_graph_values tests, gathered before any is tested: CPU
// tensors are scanned by this thread at once; device tensors are reduced on
// their device and all results copied to the host together by fetch(), so a
// check costs one host sync per op call, not one per number.
class Stats {
 public:
  // Queues [min, max] of a 1-D contiguous tensor (NaN when it holds a NaN).
  // Returns the slot of min (max is the next one), or -1 when t is empty.
  int64_t range(const at::Tensor& t) {
    if (t.numel() == 0) return -1;
    if (!t.is_cpu()) {
      const auto mm = at::aminmax(t);
      return push(std::get<0>(mm), std::get<1>(mm));
    }
    double lo = 0, hi = 0;
    AT_DISPATCH_ALL_TYPES(t.scalar_type(), "palfast_graph_range", [&] {
      const scalar_t* p = t.data_ptr<scalar_t>();
      scalar_t a = p[0], b = p[0];
      bool nan = p[0] != p[0];
      for (int64_t k = 1, m = t.numel(); k < m; ++k) {
        const scalar_t v = p[k];
        nan |= v != v;
        a = v < a ? v : a;
        b = v > b ? v : b;
      }
      lo = nan ? NAN : static_cast<double>(a);
      hi = nan ? NAN : static_cast<double>(b);
    });
    return push(lo, hi);
  }

  // Queues ptr[0], ptr[last] and the smallest step ptr[k + 1] − ptr[k] (0 when ptr
  // has one entry) of a CSR row-pointer array; returns the slot of ptr[0].
  int64_t csr(const at::Tensor& ptr) {
    const int64_t last = ptr.numel() - 1;
    if (!ptr.is_cpu()) {
      const at::Tensor step = last > 0 ? ptr.diff().min() : at::zeros({}, ptr.options());
      const int64_t slot = push(ptr[0], ptr[last]);
      push(step);
      return slot;
    }
    const int64_t* p = ptr.data_ptr<int64_t>();
    int64_t m = last > 0 ? p[1] - p[0] : 0;
    for (int64_t k = 1; k < last; ++k) m = std::min(m, p[k + 1] - p[k]);
    const int64_t slot = push(static_cast<double>(p[0]), static_cast<double>(p[last]));
    push(static_cast<double>(m));
    return slot;
  }

  // Copies every queued device value to the host (one sync); a no-op on the CPU.
  void fetch() {
    if (device_.empty()) return;
    const at::Tensor all = at::stack(device_).to(at::kDouble).cpu();
    values_.assign(all.data_ptr<double>(), all.data_ptr<double>() + all.numel());
    device_.clear();
  }

  // Int64 values pass through double: exact below 2^53, and a corrupt index
  // beyond that still compares out of range.
  double operator[](int64_t slot) const { return values_.at(static_cast<size_t>(slot)); }

 private:
  template <typename... V>
  int64_t push(const V&... v) {
    const int64_t slot = static_cast<int64_t>(values_.size() + device_.size());
    (add(v), ...);
    return slot;
  }
  void add(double v) { values_.push_back(v); }
  void add(const at::Tensor& v) { device_.push_back(v.to(at::kDouble)); }

  std::vector<double> values_;
  std::vector<at::Tensor> device_;
};

}  // namespace graph_values

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
// and copy all the results to the host at once (graph_values::Stats::fetch).
inline void check_graph_values(const char* op, const GraphArgs& g, int64_t n) {
  const int64_t e = g.indices.size(0);
  const char* stale =
      ". If the graph came from a PairGraph, its tensors were changed after it was built (in "
      "place, or with dataclasses.replace): build a new PairGraph";
  const bool own_transpose = !g.t_indptr.is_same(g.indptr) || !g.t_indices.is_same(g.indices);
  const bool own_t_weights = !g.t_weights.is_same(g.weights);
  // Everything is queued first, then fetched with one copy, then tested.
  graph_values::Stats stats;
  struct Csr {
    const char *ptr_name, *idx_name;
    int64_t ptr_slot, idx_slot;
  };
  std::vector<Csr> csrs = {{"graph.indptr", "graph.indices", stats.csr(g.indptr),
                            stats.range(g.indices)}};
  if (own_transpose) {
    csrs.push_back({"graph.t_indptr", "graph.t_indices", stats.csr(g.t_indptr),
                    stats.range(g.t_indices)});
  }
  std::vector<std::pair<const char*, int64_t>> weights = {{"graph.weights", stats.range(g.weights)},
                                                          {"graph.pos_weight",
                                                           stats.range(g.pos_weight)}};
  if (own_t_weights) weights.emplace_back("graph.t_weights", stats.range(g.t_weights));
  std::vector<int64_t> label_slots;
  for (int64_t l = 0; l < g.num_label_sets(); ++l) label_slots.push_back(stats.range(g.labels[l]));
  stats.fetch();

  for (const Csr& c : csrs) {
    const double first = stats[c.ptr_slot], last = stats[c.ptr_slot + 1];
    PALFAST_CHECK(first == 0 && last == static_cast<double>(e), op, ": ", c.ptr_name,
                  " must start at 0 and end at E = ", e, ", got first ",
                  static_cast<int64_t>(first), ", last ", static_cast<int64_t>(last), stale);
    const double step = stats[c.ptr_slot + 2];
    PALFAST_CHECK(step >= 0, op, ": ", c.ptr_name, " must be non-decreasing, got a step of ",
                  static_cast<int64_t>(step), stale);
    if (c.idx_slot >= 0) {
      const double lo = stats[c.idx_slot], hi = stats[c.idx_slot + 1];
      PALFAST_CHECK(lo >= 0 && hi < static_cast<double>(n), op, ": ", c.idx_name,
                    " must be in [0, N = ", n, "), got values in [", static_cast<int64_t>(lo),
                    ", ", static_cast<int64_t>(hi), "]", stale);
    }
  }
  // NaN fails both comparisons, so it is caught with negative values and infinities.
  for (const auto& [name, slot] : weights) {
    if (slot < 0) continue;
    PALFAST_CHECK(stats[slot] >= 0 && stats[slot + 1] < INFINITY, op, ": ", name,
                  " must be finite and >= 0, got values in [", stats[slot], ", ", stats[slot + 1],
                  "]", stale);
  }
  for (int64_t l = 0; l < g.num_label_sets(); ++l) {
    const int64_t c = g.label_classes[l];
    const double a = g.label_weights[l];
    PALFAST_CHECK(0 <= c && c <= n, op, ": graph.label_classes[", l, "] must be in [0, N = ", n,
                  "] (compact class ids), got ", c, stale);
    PALFAST_CHECK(std::isfinite(a) && a >= 0, op, ": graph.label_weights[", l,
                  "] must be finite and >= 0, got ", a, stale);
    if (const int64_t slot = label_slots[static_cast<size_t>(l)]; slot >= 0) {
      PALFAST_CHECK(stats[slot] >= -1 && stats[slot + 1] < static_cast<double>(c), op,
                    ": graph.labels[", l, "] must hold class ids in [-1, label_classes = ", c,
                    "), got values in [", static_cast<int64_t>(stats[slot]), ", ",
                    static_cast<int64_t>(stats[slot + 1]), "]", stale);
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
