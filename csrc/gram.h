// x xᵀ for the Gram-side covariance ops (csrc/sq_xcorr.cpp, csrc/barlow_twins_xcorr.cpp).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>

namespace palfast {

// x xᵀ into out [M, M]. It is symmetric, so only the block rows' parts on and
// right of the diagonal are multiplied (one GEMM per block row, about half the
// FLOPs of at::mm) and the strictly lower blocks are copied from their mirror.
inline void gram_out(at::Tensor out, const at::Tensor& x) {
  // Rows per block row: large enough for an efficient GEMM, small enough that
  // the skipped lower triangle is most of the saving.
  constexpr int64_t kBlock = 512;
  const int64_t m = x.size(0);
  if (m <= kBlock) {
    at::mm_out(out, x, x.t());
    return;
  }
  for (int64_t i0 = 0; i0 < m; i0 += kBlock) {
    const int64_t ni = std::min(kBlock, m - i0);
    at::Tensor right = out.narrow(0, i0, ni).narrow(1, i0, m - i0);
    at::mm_out(right, x.narrow(0, i0, ni), x.narrow(0, i0, m - i0).t());
  }
  for (int64_t i0 = 0; i0 + kBlock < m; i0 += kBlock) {
    const int64_t ni = std::min(kBlock, m - i0), rest = m - i0 - ni;
    out.narrow(0, i0 + ni, rest).narrow(1, i0, ni).copy_(
        out.narrow(0, i0, ni).narrow(1, i0 + ni, rest).t());
  }
}

}  // namespace palfast
