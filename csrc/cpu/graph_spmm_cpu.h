// out += G · (scale ∘ x) on the CPU, for a palfast graph (csrc/graph.h).
//
// The CSR part is a row-parallel SpMM; the label part uses per-class sums,
// Σ_{j≠i, y_j=y_i} x_j = S_{y_i} − x_i, so it costs O(N·D) whatever the class
// sizes. Self-loops in the CSR part are skipped (w_ii is ignored, docs/api.md "PairGraph").
#pragma once

#include <vector>

#include "graph.h"
#include "schedule.h"

namespace palfast::cpu {

// edge(i, j, w_ij) for every CSR edge i → j of G (of Gᵀ with transpose=true)
// but self-loops, rows of n handed out dynamically; edge may write row i's
// outputs only.
template <typename Edge>
void for_each_csr_edge(const GraphArgs& g, int64_t n, bool transpose, const Edge& edge) {
  const int64_t* indptr = (transpose ? g.t_indptr : g.indptr).data_ptr<int64_t>();
  const int64_t* indices = (transpose ? g.t_indices : g.indices).data_ptr<int64_t>();
  const float* weights = (transpose ? g.t_weights : g.weights).data_ptr<float>();
  parallel_for_dynamic(n, kRowsPerUnit, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i)
      for (int64_t e = indptr[i]; e < indptr[i + 1]; ++e)
        if (indices[e] != i) edge(i, indices[e], weights[e]);
  });
}

// transpose=true applies Gᵀ (the t_* CSR arrays). scale may be nullptr (all ones).
template <typename T>
void graph_spmm(const GraphArgs& g, const T* x, const T* scale, T* out, int64_t n, int64_t d,
                bool transpose) {
  for_each_csr_edge(g, n, transpose, [&](int64_t i, int64_t j, float weight) {
    const T w = static_cast<T>(weight) * (scale ? scale[j] : T(1));
    T* o = out + i * d;
    const T* xj = x + j * d;
    for (int64_t k = 0; k < d; ++k) o[k] += w * xj[k];
  });

  const int64_t* labels = g.labels.data_ptr<int64_t>();
  for (int64_t l = 0; l < g.num_label_sets(); ++l) {
    const int64_t* y = labels + l * n;
    const int64_t classes = g.label_classes[l];
    const T a = static_cast<T>(g.label_weights[l]);
    std::vector<T> sums(static_cast<size_t>(classes * d), T(0));
    // Class sums, parallel over feature columns so no two threads write one sum.
    parallel_for_dynamic(d, kColsPerUnit, [&](int64_t k0, int64_t k1) {
      for (int64_t i = 0; i < n; ++i) {
        if (y[i] < 0) continue;
        const T s = scale ? scale[i] : T(1);
        T* dst = sums.data() + y[i] * d;
        const T* xi = x + i * d;
        for (int64_t k = k0; k < k1; ++k) dst[k] += s * xi[k];
      }
    });
    parallel_for_dynamic(n, kRowsPerUnit, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        if (y[i] < 0) continue;
        const T s = scale ? scale[i] : T(1);
        const T* sum = sums.data() + y[i] * d;
        const T* xi = x + i * d;
        T* o = out + i * d;
        for (int64_t k = 0; k < d; ++k) o[k] += a * (sum[k] - s * xi[k]);
      }
    });
  }
}

}  // namespace palfast::cpu
