// palfast::graph_dirichlet on the CPU: Σ_ij w_ij ‖z_i − z_j‖² and its gradient.
//
// CSR edges are summed from differences z_i − z_j; a label set with weight a
// contributes a Σ_c Σ_{i≠j∈c} ‖z_i − z_j‖² = Σ_c 2 a n_c Σ_{i∈c} ‖z_i − μ_c‖²
// (within-class scatter around the class mean), O(N·D) whatever the class
// sizes. Neither form cancels when positives are close together, which is
// where the invariance term of a trained model lives.
// Gradient: dz_i = 2 Σ_j w_ij (z_i − z_j) + 2 Σ_j w_ji (z_i − z_j)
//                  + Σ_l 4 a_l n_c (z_i − μ_c).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "../graph_dirichlet.h"
#include "graph_spmm_cpu.h"
#include "schedule.h"

namespace palfast::cpu {
namespace {

// Class sums [C, D] and sizes [C] of label set y (−1 rows skipped), parallel
// over columns so that no two threads write one sum.
template <typename T>
void class_means(const int64_t* y, const T* z, int64_t n, int64_t d, int64_t classes,
                 std::vector<T>& means, std::vector<T>& sizes) {
  means.assign(static_cast<size_t>(classes * d), T(0));
  sizes.assign(static_cast<size_t>(classes), T(0));
  for (int64_t i = 0; i < n; ++i)
    if (y[i] >= 0) sizes[y[i]] += 1;
  parallel_for_dynamic(d, kColsPerUnit, [&](int64_t k0, int64_t k1) {
    for (int64_t i = 0; i < n; ++i) {
      if (y[i] < 0) continue;
      T* dst = means.data() + y[i] * d;
      const T* zi = z + i * d;
      for (int64_t k = k0; k < k1; ++k) dst[k] += zi[k];
    }
  });
  for (int64_t c = 0; c < classes; ++c)
    if (sizes[c] > 0)
      for (int64_t k = 0; k < d; ++k) means[c * d + k] /= sizes[c];
}

// member(i, a, n_c, μ_c) for every row i with a class c in each label set
// (weight a), rows handed out dynamically; member may write row i's outputs only.
template <typename T, typename Member>
void for_each_class_member(const GraphArgs& g, const T* z, int64_t n, int64_t d,
                           const Member& member) {
  std::vector<T> means, sizes;
  for (int64_t l = 0; l < g.num_label_sets(); ++l) {
    const int64_t* y = g.labels.data_ptr<int64_t>() + l * n;
    class_means<T>(y, z, n, d, g.label_classes[l], means, sizes);
    const T a = static_cast<T>(g.label_weights[l]);
    parallel_for_dynamic(n, kRowsPerUnit, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i)
        if (y[i] >= 0) member(i, a, sizes[y[i]], means.data() + y[i] * d);
    });
  }
}

template <typename T>
inline T sq_dist(const T* a, const T* b, int64_t d) {
  T s = 0;
  for (int64_t k = 0; k < d; ++k) {
    const T t = a[k] - b[k];
    s += t * t;
  }
  return s;
}

template <typename T>
at::Tensor forward_impl(const at::Tensor& z, const GraphArgs& g) {
  const int64_t n = z.size(0), d = z.size(1);
  const T* zp = z.data_ptr<T>();
  at::Tensor rows = at::zeros({n}, z.options());
  T* rp = rows.data_ptr<T>();
  for_each_csr_edge(g, n, /*transpose=*/false, [&](int64_t i, int64_t j, float w) {
    rp[i] += static_cast<T>(w) * sq_dist(zp + i * d, zp + j * d, d);
  });
  for_each_class_member<T>(g, zp, n, d, [&](int64_t i, T a, T size, const T* mu) {
    rp[i] += 2 * a * size * sq_dist(zp + i * d, mu, d);
  });
  return rows.sum();
}

template <typename T>
at::Tensor backward_impl(const at::Tensor& grad, const at::Tensor& z, const GraphArgs& g) {
  const int64_t n = z.size(0), d = z.size(1);
  const T* zp = z.data_ptr<T>();
  at::Tensor out = at::zeros_like(z);
  T* op = out.data_ptr<T>();
  // Out-edges (rows of G) and in-edges (rows of Gᵀ) both pull z_i towards z_j.
  auto pull = [&](int64_t i, const T* target, T w) {
    T* oi = op + i * d;
    const T* zi = zp + i * d;
    for (int64_t k = 0; k < d; ++k) oi[k] += w * (zi[k] - target[k]);
  };
  for (const bool transpose : {false, true})
    for_each_csr_edge(g, n, transpose, [&](int64_t i, int64_t j, float w) {
      pull(i, zp + j * d, 2 * static_cast<T>(w));
    });
  for_each_class_member<T>(g, zp, n, d, [&](int64_t i, T a, T size, const T* mu) {
    pull(i, mu, 4 * a * size);
  });
  return out.mul_(grad.to(out.scalar_type()));
}

// The kernels behind the entry points of csrc/graph_dirichlet.h (which check the arguments).
at::Tensor graph_dirichlet_cpu(const char*, const at::Tensor& za, const GraphArgs& g) {
  if (za.scalar_type() == at::kDouble) return forward_impl<double>(za, g);
  return forward_impl<float>(za, g);
}

at::Tensor graph_dirichlet_backward_cpu(const char*, const at::Tensor& grad, const at::Tensor& za,
                                        const GraphArgs& g) {
  if (za.scalar_type() == at::kDouble) return backward_impl<double>(grad, za, g);
  return backward_impl<float>(grad, za, g);
}

}  // namespace

TORCH_LIBRARY_IMPL(palfast, CPU, m) {
  m.impl("graph_dirichlet", &graph_dirichlet_entry<&graph_dirichlet_cpu>);
  m.impl("graph_dirichlet_backward", &graph_dirichlet_backward_entry<&graph_dirichlet_backward_cpu>);
}

}  // namespace palfast::cpu
