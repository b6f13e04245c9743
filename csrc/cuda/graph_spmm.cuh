// out += G · (scale ∘ x) on CUDA, for a palfast graph (csrc/graph.h).
// The CUDA twin of csrc/cpu/graph_spmm.h; any CUDA op that needs G·x includes it.
//
// CSR part: one warp per row i, lanes over the D columns, the row's edges in
// registers' order; self-loops skipped (w_ii is ignored, SPEC §1).
// Label part: per-class sums S_c = Σ_{y_j = c} scale_j x_j by atomicAdd into a
// [C, D] buffer, then out_i += a (S_{y_i} − scale_i x_i): O(N·D) whatever the
// class sizes. (atomicAdd order varies from run to run, so the label part is
// reproducible to rounding, not bitwise.)
// T is the accumulation type (float or double); x, scale, out are contiguous
// device arrays; everything runs on `stream`, with no host synchronisation.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "../graph.h"

namespace palfast::cuda {

namespace spmm_detail {

constexpr int kThreads = 256;
constexpr int kWarpsPerBlock = kThreads / 32;

// Blocks for a grid-stride loop over `work` items, `per_block` items a block.
inline unsigned int grid_for(int64_t work, int64_t per_block) {
  const int64_t blocks = (work + per_block - 1) / per_block;
  return static_cast<unsigned int>(std::clamp<int64_t>(blocks, 1, int64_t(1) << 20));
}

template <typename T>
__global__ void csr_rows_kernel(const int64_t* __restrict__ indptr,
                                const int64_t* __restrict__ indices,
                                const float* __restrict__ weights, const T* __restrict__ x,
                                const T* __restrict__ scale, T* __restrict__ out, int64_t n,
                                int64_t d) {
  const int lane = threadIdx.x % 32;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  for (int64_t i = blockIdx.x * int64_t(kWarpsPerBlock) + threadIdx.x / 32; i < n; i += warps) {
    const int64_t e0 = indptr[i], e1 = indptr[i + 1];
    if (e0 == e1) continue;
    for (int64_t k = lane; k < d; k += 32) {
      T acc = 0;
      for (int64_t e = e0; e < e1; ++e) {
        const int64_t j = indices[e];
        if (j == i) continue;
        const T w = static_cast<T>(weights[e]) * (scale ? scale[j] : T(1));
        acc += w * x[j * d + k];
      }
      out[i * d + k] += acc;
    }
  }
}

template <typename T>
__global__ void class_sums_kernel(const int64_t* __restrict__ y, const T* __restrict__ x,
                                  const T* __restrict__ scale, T* __restrict__ sums, int64_t n,
                                  int64_t d) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < n * d; idx += stride) {
    const int64_t i = idx / d, c = y[i];
    if (c < 0) continue;
    atomicAdd(sums + c * d + idx % d, (scale ? scale[i] : T(1)) * x[idx]);
  }
}

template <typename T>
__global__ void class_apply_kernel(const int64_t* __restrict__ y, const T* __restrict__ x,
                                   const T* __restrict__ scale, const T* __restrict__ sums, T a,
                                   T* __restrict__ out, int64_t n, int64_t d) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < n * d; idx += stride) {
    const int64_t i = idx / d, c = y[i];
    if (c < 0) continue;
    out[idx] += a * (sums[c * d + idx % d] - (scale ? scale[i] : T(1)) * x[idx]);
  }
}

}  // namespace spmm_detail

// transpose=true applies Gᵀ (the t_* CSR arrays; the label part is symmetric).
// scale may be nullptr (all ones).
template <typename T>
void graph_spmm(const GraphArgs& g, const T* x, const T* scale, T* out, int64_t n, int64_t d,
                bool transpose, cudaStream_t stream) {
  using namespace spmm_detail;
  if (n == 0 || d == 0) return;
  const at::Tensor& indices = transpose ? g.t_indices : g.indices;
  if (indices.numel() > 0) {
    const at::Tensor& indptr = transpose ? g.t_indptr : g.indptr;
    const at::Tensor& weights = transpose ? g.t_weights : g.weights;
    csr_rows_kernel<T><<<grid_for(n, kWarpsPerBlock), kThreads, 0, stream>>>(
        indptr.data_ptr<int64_t>(), indices.data_ptr<int64_t>(), weights.data_ptr<float>(), x,
        scale, out, n, d);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  const unsigned int blocks = grid_for(n * d, kThreads);
  for (int64_t l = 0; l < g.num_label_sets(); ++l) {
    const int64_t classes = g.label_classes[l];
    if (classes <= 0) continue;  // no row of this set has a class
    const int64_t* y = g.labels.data_ptr<int64_t>() + l * n;
    const at::Tensor sums = at::zeros(
        {classes, d}, g.labels.options().dtype(c10::CppTypeToScalarType<T>::value));
    class_sums_kernel<T><<<blocks, kThreads, 0, stream>>>(y, x, scale, sums.data_ptr<T>(), n, d);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    class_apply_kernel<T><<<blocks, kThreads, 0, stream>>>(
        y, x, scale, sums.data_ptr<T>(), static_cast<T>(g.label_weights[l]), out, n, d);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace palfast::cuda
