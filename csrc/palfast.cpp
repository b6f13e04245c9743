// palfast's op schemas (one m.def per op, all in this file) and the Python
// module stub. Device files only register kernels (TORCH_LIBRARY_IMPL);
// autograd and fake (meta) kernels are registered in palfast/_ops.py.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// Importing palfast._C runs the static TORCH_LIBRARY registrations below.
// The module also says how it was built, for `palfast info` and the import check.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  PyObject* m = PyModule_Create(&module_def);
  if (m == nullptr) return nullptr;
  PyModule_AddStringConstant(m, "torch_version", PALFAST_TORCH_VERSION);
  PyModule_AddStringConstant(m, "cuda_archs", PALFAST_CUDA_ARCHS);
#ifdef PALFAST_WITH_CUDA
  PyModule_AddIntConstant(m, "with_cuda", 1);
#else
  PyModule_AddIntConstant(m, "with_cuda", 0);
#endif
  return m;
}
}

// A graph argument list, spelled out in every schema that takes a PairGraph
// (see csrc/graph.h for the meaning of each tensor).
#define PALFAST_GRAPH_ARGS                                                                   \
  "Tensor indptr, Tensor indices, Tensor weights, Tensor t_indptr, Tensor t_indices, "      \
  "Tensor t_weights, Tensor labels, float[] label_weights, int[] label_classes, "           \
  "Tensor pos_weight"

TORCH_LIBRARY(palfast, m) {
  // Graph-weighted InfoNCE (docs/api.md). Returns (per-row loss [N], lse [N]) in
  // float32 (float64 for float64 z); rows with W_i = 0 get loss 0. Only lse is
  // saved for backward, which recomputes the similarity tiles. Anchors are the
  // rows [anchor_begin, anchor_end) (all rows in one process; a rank's own rows
  // under torch.distributed, the others being keys only): other rows get loss 0
  // and lse +inf, and no work is spent on pairs of two non-anchor rows.
  m.def("info_nce(Tensor z, " PALFAST_GRAPH_ARGS
        ", float temperature, bool normalize, int anchor_begin, int anchor_end)"
        " -> (Tensor, Tensor)");
  // d(Σ_i grad_rows_i · loss_i)/dz over anchor rows i, same dtype and shape as z.
  m.def("info_nce_backward(Tensor grad_rows, Tensor z, " PALFAST_GRAPH_ARGS
        ", Tensor lse, float temperature, bool normalize, int anchor_begin, int anchor_end)"
        " -> Tensor");
}

// --- the covariance losses' ops (VICReg, Barlow Twins, spectral contrastive, VIC²;
// contracts in csrc/<op>.h). A fragment, so this section only appends to the file.
TORCH_LIBRARY_FRAGMENT(palfast, m) {
  // G·x (Gᵀ·x when transpose), same dtype and shape as x. Its own backward
  // (the product with the other side), so it needs no separate backward op.
  m.def("graph_spmm(Tensor x, " PALFAST_GRAPH_ARGS ", bool transpose) -> Tensor");
  // Σ_ij w_ij ‖z_i − z_j‖² as a 0-dim float32 (float64 for float64 z) tensor.
  m.def("graph_dirichlet(Tensor z, " PALFAST_GRAPH_ARGS ") -> Tensor");
  // d(grad · graph_dirichlet(z))/dz, z's dtype and shape.
  m.def("graph_dirichlet_backward(Tensor grad, Tensor z, " PALFAST_GRAPH_ARGS ") -> Tensor");
  // (Σ_kl (pᵀq)_kl² − [offdiag] Σ_k (pᵀq)_kk², aux); q = None means q = p. aux
  // holds the M×M Gram matrices when gram, else the product pᵀq; the caller
  // picks the cheaper side (palfast/_ops.py, sq_xcorr_uses_gram).
  m.def("sq_xcorr(Tensor p, Tensor? q, bool offdiag, bool gram) -> (Tensor, Tensor)");
  // (dp, dq) of grad · sq_xcorr; dq is empty when q is None.
  m.def("sq_xcorr_backward(Tensor grad, Tensor p, Tensor? q, Tensor aux, bool offdiag, "
        "bool gram) -> (Tensor, Tensor)");
  // The Barlow Twins objective of C = scale·ẑᵀGẑ for column-standardised zhat:
  // (Σ_k (1 − C_kk)² + lambd Σ_{k≠l} C_kl², aux), on the N×N Gram side when gram
  // (palfast/_ops.py, barlow_twins_xcorr_uses_gram).
  m.def("barlow_twins_xcorr(Tensor zhat, " PALFAST_GRAPH_ARGS
        ", float lambd, float scale, bool gram) -> (Tensor, Tensor)");
  // d(grad · loss)/dẑ, ẑ's dtype and shape.
  m.def("barlow_twins_xcorr_backward(Tensor grad, Tensor zhat, " PALFAST_GRAPH_ARGS
        ", Tensor aux, float lambd, float scale, bool gram) -> Tensor");
}
