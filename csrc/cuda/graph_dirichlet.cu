// palfast::graph_dirichlet on CUDA: Σ_ij w_ij ‖z_i − z_j‖² and its gradient.
// Same maths as csrc/cpu/graph_dirichlet.cpp (differences on CSR edges,
// within-class scatter 2 a n_c Σ_{i∈c} ‖z_i − μ_c‖² for label sets).
// Forward: one warp per row writes its term to rows[i]; the sum is at::sum.
// Backward: one warp per row, lanes over columns, for the rows of G and of Gᵀ;
// the label part is elementwise against class sums (graph_spmm_cuda.cuh's class_sums).
// The incoming gradient is multiplied on the device: no host synchronisation.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <utility>

#include "../graph_dirichlet.h"
#include "graph_spmm_cuda.cuh"

namespace palfast::cuda {
namespace {

template <typename T>
__global__ void csr_energy_kernel(CsrView csr, const T* __restrict__ z, T* __restrict__ rows,
                                  int64_t n, int64_t d) {
  for_each_row(n, [&](int64_t i, int lane) {
    // This lane's columns of Σ_e w_e ‖z_i − z_j‖², summed over the warp below.
    T acc = csr.row_sum<T>(i, [&](int64_t j) {
      T s = 0;
      for (int64_t k = lane; k < d; k += kWarpSize) {
        const T t = z[i * d + k] - z[j * d + k];
        s += t * t;
      }
      return s;
    });
    acc = warp_sum(acc);
    if (lane == 0) rows[i] += acc;
  });
}

template <typename T>
__global__ void class_sizes_kernel(const int64_t* __restrict__ y, T* __restrict__ sizes,
                                   int64_t n) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += stride)
    if (y[i] >= 0) atomicAdd(sizes + y[i], T(1));
}

// rows[i] += 2 a n_c ‖z_i − S_c / n_c‖², c = y[i].
template <typename T>
__global__ void scatter_energy_kernel(const int64_t* __restrict__ y, const T* __restrict__ z,
                                      const T* __restrict__ sums, const T* __restrict__ sizes,
                                      T a, T* __restrict__ rows, int64_t n, int64_t d) {
  for_each_row(n, [&](int64_t i, int lane) {
    const int64_t c = y[i];
    if (c < 0) return;
    const T nc = sizes[c];
    T s = 0;
    for (int64_t k = lane; k < d; k += kWarpSize) {
      const T t = z[i * d + k] - sums[c * d + k] / nc;
      s += t * t;
    }
    s = warp_sum(s);
    if (lane == 0) rows[i] += 2 * a * nc * s;
  });
}

// out_i += 2 Σ_e w_e (z_i − z_j) over the rows of G (or Gᵀ).
template <typename T>
__global__ void csr_grad_kernel(CsrView csr, const T* __restrict__ z, T* __restrict__ out,
                                int64_t n, int64_t d) {
  for_each_row(n, [&](int64_t i, int lane) {
    if (csr.empty_row(i)) return;
    for (int64_t k = lane; k < d; k += kWarpSize) {
      const T zik = z[i * d + k];
      out[i * d + k] += 2 * csr.row_sum<T>(i, [&](int64_t j) { return zik - z[j * d + k]; });
    }
  });
}

// out_i += 4 a n_c (z_i − S_c / n_c).
template <typename T>
__global__ void scatter_grad_kernel(const int64_t* __restrict__ y, const T* __restrict__ z,
                                    const T* __restrict__ sums, const T* __restrict__ sizes, T a,
                                    T* __restrict__ out, int64_t n, int64_t d) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < n * d; idx += stride) {
    const int64_t c = y[idx / d];
    if (c < 0) continue;
    const T nc = sizes[c];
    out[idx] += 4 * a * nc * (z[idx] - sums[c * d + idx % d] / nc);
  }
}

// Class sums [C, D] and sizes [C] of label set l. The sizes are atomic adds of
// 1, exact below 2^24 whatever their order.
template <typename T>
std::pair<at::Tensor, at::Tensor> class_stats(const char* op, const GraphArgs& g, int64_t l,
                                              const T* z, int64_t n, int64_t d,
                                              cudaStream_t stream) {
  at::Tensor sums = class_sums<T, T>(op, g, l, z, nullptr, n, d, stream);
  at::Tensor sizes = at::zeros({g.label_classes[l]}, sums.options());
  launch(class_sizes_kernel<T>, grid_stride(n, kRowThreads), kRowThreads, stream,
         g.labels.data_ptr<int64_t>() + l * n, sizes.data_ptr<T>(), n);
  return {sums, sizes};
}

template <typename T>
at::Tensor forward_impl(const char* op, const at::Tensor& z, const GraphArgs& g,
                        cudaStream_t stream) {
  const int64_t n = z.size(0), d = z.size(1);
  at::Tensor rows = at::zeros({n}, z.options());
  const T* zp = z.data_ptr<T>();
  if (g.indices.numel() > 0) {
    launch(csr_energy_kernel<T>, grid_stride(n, kRowWarps), kRowThreads, stream,
           csr_view(g, /*transpose=*/false), zp, rows.data_ptr<T>(), n, d);
  }
  for (int64_t l = 0; l < g.num_label_sets(); ++l) {
    if (g.label_classes[l] <= 0) continue;
    const std::pair<at::Tensor, at::Tensor> stats = class_stats<T>(op, g, l, zp, n, d, stream);
    const at::Tensor& sums = stats.first;
    const at::Tensor& sizes = stats.second;
    launch(scatter_energy_kernel<T>, grid_stride(n, kRowWarps), kRowThreads, stream,
           g.labels.data_ptr<int64_t>() + l * n, zp, sums.data_ptr<T>(), sizes.data_ptr<T>(),
           static_cast<T>(g.label_weights[l]), rows.data_ptr<T>(), n, d);
  }
  return rows.sum();
}

template <typename T>
at::Tensor backward_impl(const char* op, const at::Tensor& z, const GraphArgs& g,
                         cudaStream_t stream) {
  const int64_t n = z.size(0), d = z.size(1);
  at::Tensor out = at::zeros_like(z);
  const T* zp = z.data_ptr<T>();
  if (g.indices.numel() > 0) {
    for (const bool transpose : {false, true}) {
      launch(csr_grad_kernel<T>, grid_stride(n, kRowWarps), kRowThreads, stream,
             csr_view(g, transpose), zp, out.data_ptr<T>(), n, d);
    }
  }
  for (int64_t l = 0; l < g.num_label_sets(); ++l) {
    if (g.label_classes[l] <= 0) continue;
    const std::pair<at::Tensor, at::Tensor> stats = class_stats<T>(op, g, l, zp, n, d, stream);
    const at::Tensor& sums = stats.first;
    const at::Tensor& sizes = stats.second;
    launch(scatter_grad_kernel<T>, grid_stride(n * d, kRowThreads), kRowThreads, stream,
           g.labels.data_ptr<int64_t>() + l * n, zp, sums.data_ptr<T>(), sizes.data_ptr<T>(),
           static_cast<T>(g.label_weights[l]), out.data_ptr<T>(), n, d);
  }
  return out;
}

// The kernels behind the entry points of csrc/graph_dirichlet.h (which check the arguments).
at::Tensor graph_dirichlet_cuda(const char* op, const at::Tensor& za, const GraphArgs& g) {
  const c10::cuda::CUDAGuard guard(za.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  return AT_DISPATCH_FLOATING_TYPES(za.scalar_type(), "graph_dirichlet_cuda",
                                    [&] { return forward_impl<scalar_t>(op, za, g, stream); });
}

// The incoming gradient is multiplied on the device: no host synchronisation.
at::Tensor graph_dirichlet_backward_cuda(const char* op, const at::Tensor& grad,
                                         const at::Tensor& za, const GraphArgs& g) {
  const c10::cuda::CUDAGuard guard(za.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  at::Tensor out = AT_DISPATCH_FLOATING_TYPES(za.scalar_type(), "graph_dirichlet_backward_cuda",
                                              [&] { return backward_impl<scalar_t>(op, za, g, stream); });
  return out.mul_(grad.to(out.scalar_type()));
}

}  // namespace

TORCH_LIBRARY_IMPL(palfast, CUDA, m) {
  m.impl("graph_dirichlet", &graph_dirichlet_entry<&graph_dirichlet_cuda>);
  m.impl("graph_dirichlet_backward", &graph_dirichlet_backward_entry<&graph_dirichlet_backward_cuda>);
}

}  // namespace palfast::cuda
