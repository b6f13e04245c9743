// out += G · (scale ∘ x) on CUDA, for a palfast graph (csrc/graph.h).
// The CUDA twin of csrc/cpu/graph_spmm_cpu.h; every CUDA op that needs G·x uses it.
//
// CSR part: one warp per row i, lanes over the D columns, the row's edges in
// CSR order (no atomics: bitwise reproducible); self-loops skipped (w_ii is
// ignored, docs/api.md).
// Label part: per-class sums S_c = Σ_{y_j = c} scale_j x_j by atomicAdd into a
// [C, D] buffer, then out_i += a (S_{y_i} − scale_i x_i): O(N·D) whatever the
// class sizes. atomicAdd order varies from run to run, so the label part is
// reproducible to rounding, not bitwise (alert_atomic_sums).
// x is in X (16-bit types are widened), the accumulation type T is float or
// double; x, scale, out are contiguous device arrays; everything runs on
// `stream`, with no host synchronisation (the ops check the graph's ranges
// beforehand, check_graph_values in csrc/graph.h).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

#include "../graph.h"
#include "common.cuh"

namespace palfast::cuda {

// One side of a graph's CSR edges (the rows of G, or of Gᵀ) as device pointers.
struct CsrView {
  const int64_t* indptr;
  const int64_t* indices;
  const float* weights;

  __device__ __forceinline__ bool empty_row(int64_t i) const { return indptr[i] == indptr[i + 1]; }

  // Σ_{edges e of row i, j = indices[e] ≠ i} weights[e] · term(j), in CSR order
  // (self-loops skipped, docs/api.md).
  template <typename T, typename F>
  __device__ __forceinline__ T row_sum(int64_t i, F&& term) const {
    T acc = T(0);
    for (int64_t e = indptr[i], e1 = indptr[i + 1]; e < e1; ++e) {
      const int64_t j = indices[e];
      if (j != i) acc += static_cast<T>(weights[e]) * term(j);
    }
    return acc;
  }
};

inline CsrView csr_view(const GraphArgs& g, bool transpose) {
  return {(transpose ? g.t_indptr : g.indptr).data_ptr<int64_t>(),
          (transpose ? g.t_indices : g.indices).data_ptr<int64_t>(),
          (transpose ? g.t_weights : g.weights).data_ptr<float>()};
}

namespace spmm_detail {

template <typename X, typename T>
__global__ void csr_rows_kernel(CsrView csr, const X* __restrict__ x, const T* __restrict__ scale,
                                T* __restrict__ out, int64_t n, int64_t d) {
  for_each_row(n, [&](int64_t i, int lane) {
    if (csr.empty_row(i)) return;
    for (int64_t k = lane; k < d; k += kWarpSize) {
      out[i * d + k] += csr.row_sum<T>(i, [&](int64_t j) {
        return (scale != nullptr ? scale[j] : T(1)) * widen(x[j * d + k]);
      });
    }
  });
}

// sums[y_i] += scale_i · x_i for rows with a class (y_i ≥ 0).
template <typename X, typename T>
__global__ void class_sums_kernel(const int64_t* __restrict__ y, const X* __restrict__ x,
                                  const T* __restrict__ scale, T* __restrict__ sums, int64_t n,
                                  int64_t d) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < n * d; idx += stride) {
    const int64_t i = idx / d, c = y[i];
    if (c < 0) continue;
    atomicAdd(sums + c * d + idx % d, (scale != nullptr ? scale[i] : T(1)) * widen(x[idx]));
  }
}

// out_i += a · (sums[y_i] − scale_i · x_i): Σ over the other rows of i's class.
template <typename X, typename T>
__global__ void class_apply_kernel(const int64_t* __restrict__ y, const X* __restrict__ x,
                                   const T* __restrict__ scale, const T* __restrict__ sums, T a,
                                   T* __restrict__ out, int64_t n, int64_t d) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < n * d; idx += stride) {
    const int64_t i = idx / d, c = y[i];
    if (c < 0) continue;
    out[idx] += a * (sums[c * d + idx % d] - (scale != nullptr ? scale[i] : T(1)) * widen(x[idx]));
  }
}

}  // namespace spmm_detail

// Class sums [C, D] in T of label set l: S_c = Σ_{y_j = c} scale_j x_j.
template <typename X, typename T>
at::Tensor class_sums(const char* op, const GraphArgs& g, int64_t l, const X* x, const T* scale,
                      int64_t n, int64_t d, cudaStream_t stream) {
  using namespace spmm_detail;
  alert_atomic_sums(op);
  at::Tensor sums = at::zeros({g.label_classes[l], d},
                              g.labels.options().dtype(c10::CppTypeToScalarType<T>::value));
  launch(class_sums_kernel<X, T>, grid_stride(n * d, kRowThreads), kRowThreads, stream,
         g.labels.data_ptr<int64_t>() + l * n, x, scale, sums.data_ptr<T>(), n, d);
  return sums;
}

// transpose=true applies Gᵀ (the t_* CSR arrays; the label part is symmetric).
// scale may be nullptr (all ones). op names the calling op in alerts.
template <typename X, typename T>
void graph_spmm(const char* op, const GraphArgs& g, const X* x, const T* scale, T* out, int64_t n,
                int64_t d, bool transpose, cudaStream_t stream) {
  using namespace spmm_detail;
  if (n == 0 || d == 0) return;
  if (g.indices.numel() > 0) {
    launch(csr_rows_kernel<X, T>, grid_stride(n, kRowWarps), kRowThreads, stream,
           csr_view(g, transpose), x, scale, out, n, d);
  }
  for (int64_t l = 0; l < g.num_label_sets(); ++l) {
    if (g.label_classes[l] <= 0) continue;  // no row of this set has a class
    const at::Tensor sums = class_sums<X, T>(op, g, l, x, scale, n, d, stream);
    launch(class_apply_kernel<X, T>, grid_stride(n * d, kRowThreads), kRowThreads, stream,
           g.labels.data_ptr<int64_t>() + l * n, x, scale, sums.data_ptr<T>(),
           static_cast<T>(g.label_weights[l]), out, n, d);
  }
}

}  // namespace palfast::cuda
