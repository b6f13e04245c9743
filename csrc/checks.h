// Argument checks shared by the CPU and CUDA kernels.
//
// Every message reads "<op>: <arg> must <expectation>, got <actual>" so a user
// can fix the call without reading palfast's source. Checks here are cheap
// (shapes, dtypes, devices). The one data-dependent check per call is the
// graph's index ranges (check_graph_values in csrc/graph.h, O(E + N), one host
// sync), so that no op can read or write out of bounds; the rest (weight
// ranges, sizes) happens once in Python when a PairGraph is built.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <string>
#include <vector>

namespace palfast {

// ValueError in Python.
#define PALFAST_CHECK(cond, ...) TORCH_CHECK_VALUE(cond, __VA_ARGS__)
// TypeError in Python.
#define PALFAST_CHECK_TYPE(cond, ...) TORCH_CHECK_TYPE(cond, __VA_ARGS__)

inline bool is_float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

inline void check_embeddings(const char* op, const at::Tensor& z) {
  PALFAST_CHECK(z.dim() == 2, op, ": z must be a 2-D tensor [N, D], got shape ", z.sizes());
  PALFAST_CHECK_TYPE(is_float_dtype(z.scalar_type()), op,
                     ": z must be float32, float64, float16 or bfloat16, got ", z.scalar_type());
  PALFAST_CHECK(z.size(1) >= 1, op, ": z must have at least one column, got shape ", z.sizes());
}

// Accumulation dtype of the kernels: float64 for float64 inputs, else float32.
inline at::ScalarType acc_dtype(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_matrix(const char* op, const char* name, const at::Tensor& x) {
  PALFAST_CHECK(x.dim() == 2, op, ": ", name, " must be a 2-D tensor, got shape ", x.sizes());
  PALFAST_CHECK_TYPE(is_float_dtype(x.scalar_type()), op, ": ", name,
                     " must be float32, float64, float16 or bfloat16, got ", x.scalar_type());
}

inline void check_same_device(const char* op, const char* name, const at::Tensor& t,
                              const at::Tensor& z) {
  PALFAST_CHECK(t.device() == z.device(), op, ": ", name, " must be on the same device as z (",
                z.device(), "), got ", t.device(), ". Move the graph with graph.to(z.device)");
}

inline void check_1d(const char* op, const char* name, const at::Tensor& t, at::ScalarType dtype,
                     int64_t size = -1) {
  PALFAST_CHECK(t.dim() == 1, op, ": ", name, " must be 1-D, got shape ", t.sizes());
  PALFAST_CHECK_TYPE(t.scalar_type() == dtype, op, ": ", name, " must be ", dtype, ", got ",
                     t.scalar_type());
  if (size >= 0) {
    PALFAST_CHECK(t.size(0) == size, op, ": ", name, " must have ", size, " entries, got ",
                  t.size(0));
  }
}

// The incoming gradient of an op with a 0-dim output.
inline void check_scalar_grad(const char* op, const at::Tensor& grad, const at::Tensor& like) {
  PALFAST_CHECK(grad.dim() == 0, op, ": grad must be a 0-dim tensor, got shape ", grad.sizes());
  check_same_device(op, "grad", grad, like);
}

}  // namespace palfast
