// palfast::info_nce_backward on CUDA: dneg = M u by the tile kernel, the positive
// term and the normalisation backward. The design, the tile policies and the
// kernels shared with the forward are in csrc/cuda/info_nce.cuh.
#include "info_nce.cuh"

namespace palfast::cuda {
namespace {

// ------------------------------------------------------------- tile kernels
// The power-of-two scale 2^m of g is clamped to |m| ≤ kMaxScaleLog2, so that 2^m
// and 2^−m are normal floats (exact), whatever tiny or huge g is.
constexpr int kMaxScaleLog2 = 100;

// The backward's per-row factor: g_i·2^m for the online path; for the fixed
// shift a_i = g_i·2^m·exp(1/τ − lse_i) = g_i·2^m/Σ_i, set to 0 where g_i = 0 (rows
// that are not anchors have lse = +inf, and N = 1 gives lse = −inf).
template <bool kFixed, typename Acc>
__device__ __forceinline__ Acc row_factor(Acc g_scaled, Acc lse, Acc inv_tau) {
  if constexpr (kFixed) return g_scaled == Acc(0) ? Acc(0) : g_scaled * exp_acc(inv_tau - lse);
  return g_scaled;
}

// dneg[I, J] = Σ_K M_IK x[K, J] for this block's BM rows I and DV columns J,
// M_ik = g_i exp(s_ik − lse_i) + g_k exp(s_ik − lse_k), s = x xᵀ · inv_tau
// (kFixed: M_ik = e_ik (a_i + a_k), see use_fixed_shift). g_absmax (a device
// scalar, max|g|) sets the power-of-two scale of M. With key splits (small N,
// see backward_impl), block z of the grid's third dimension sums only the key
// tiles [z·split_tiles, (z+1)·split_tiles) into the slice z of dneg [splits, N, D].
template <typename Tile, bool kFixed>
__global__ void __launch_bounds__(kTileThreads)
    grad_tile_kernel(const typename Tile::In* __restrict__ x, int64_t n, int64_t d,
                     typename Tile::Acc inv_tau, const typename Tile::Acc* __restrict__ g,
                     const typename Tile::Acc* __restrict__ lse,
                     const typename Tile::Acc* __restrict__ g_absmax, int64_t a0, int64_t a1,
                     int64_t split_tiles, typename Tile::Acc* __restrict__ dneg) {
  using Acc = typename Tile::Acc;
  using L = Smem<Tile>;
  constexpr int BM = Tile::BM, BN = Tile::BN;
  __shared__ __align__(128) unsigned char smem[L::kBackward];
  Acc* s = reinterpret_cast<Acc*>(smem + L::kS);
  unsigned char* mbuf = smem + L::kM;
  Acc* row_g = reinterpret_cast<Acc*>(smem + L::kStats);
  Acc* row_lse = row_g + BM;
  Acc* col_g = row_lse + BM;
  Acc* col_lse = col_g + BN;
  const int64_t i0 = int64_t(blockIdx.x) * BM;
  const int64_t j0 = int64_t(blockIdx.y) * Tile::DV;

  // Power-of-two scale |g|·2^m < 2^(kMScaleLog2 + 1): exact, and undone exactly
  // when the result is stored.
  Acc m_scale = Acc(1), out_scale = Acc(1);
  {
    const Acc gm = *g_absmax;
    if (gm > Acc(0) && gm < std::numeric_limits<Acc>::infinity()) {  // else g is 0, inf or NaN
      const int e = max(-kMaxScaleLog2,
                        min(kMaxScaleLog2, Tile::kMScaleLog2 - static_cast<int>(ilogb(gm))));
      m_scale = static_cast<Acc>(ldexp(1.0, e));
      out_scale = static_cast<Acc>(ldexp(1.0, -e));
    }
  }
  const Acc shift_log2 = inv_tau * Acc(kLog2e);
  for (int r = threadIdx.x; r < BM; r += kTileThreads) {
    const int64_t i = i0 + r;
    row_g[r] = i < n ? row_factor<kFixed>(g[i] * m_scale, lse[i], inv_tau) : Acc(0);
    row_lse[r] = i < n ? lse[i] : Acc(0);
  }
  // (row stats are first read after the barriers inside dots below)

  // g is 0 outside the anchors [a0, a1), so a block without anchor rows only
  // needs the key tiles that hold anchors (M_ik = g_k exp(s_ik − lse_k) there).
  const bool has_anchor_rows = i0 < a1 && i0 + BM > a0;
  const int64_t split_begin = int64_t(blockIdx.z) * split_tiles * BN;
  const int64_t split_end = std::min(n, split_begin + split_tiles * BN);
  // Both bounds are multiples of BN or N: the key tiles are those of the unsplit grid.
  const int64_t k_begin = std::max(split_begin, has_anchor_rows ? int64_t(0) : (a0 / BN) * BN);
  const int64_t k_end = std::min(split_end, has_anchor_rows ? n : a1);
  typename Tile::Accum acc;
  acc.zero();
  for (int64_t k0 = k_begin; k0 < k_end; k0 += BN) {
    Tile::dots(x, n, d, i0, k0, smem, s);  // ends with the staging buffer free
    Tile::load_v(smem, x, n, d, k0, j0);
    for (int c = threadIdx.x; c < BN; c += kTileThreads) {
      const int64_t k = k0 + c;
      col_g[c] = k < n ? row_factor<kFixed>(g[k] * m_scale, lse[k], inv_tau) : Acc(0);
      col_lse[c] = k < n ? lse[k] : Acc(0);
    }
    __syncthreads();  // S, V and column stats complete
    for (int e = threadIdx.x; e < BM * BN; e += kTileThreads) {
      const int r = e / BN, c = e % BN;
      const int64_t i = i0 + r, k = k0 + c;
      Acc mv = Acc(0);
      // Masked entries are never exp'd: with lse = −inf (N = 1) exp(s − lse)
      // would be inf and 0·inf = NaN.
      if (i < n && k < n && k != i) {
        const Acc c_ik = s[r * Tile::kLdS + c];
        if constexpr (kFixed) {
          mv = exp2_acc(fma(c_ik, shift_log2, -shift_log2)) * (row_g[r] + col_g[c]);
        } else {
          const Acc xv = c_ik * inv_tau;
          mv = row_g[r] * exp_acc(xv - row_lse[r]) + col_g[c] * exp_acc(xv - col_lse[c]);
        }
      }
      Tile::store_m(s, mbuf, r, c, mv);
    }
    __syncthreads();  // M complete
    acc.add(s, mbuf, smem);
    __syncthreads();  // M, V, S and column stats are read; the next tile may overwrite them
  }
  acc.store(dneg + int64_t(blockIdx.z) * n * d, n, d, i0, j0, out_scale, s);
}

// out[e] = Σ_s parts[s][e] for e < count, the slices added in order (deterministic).
template <typename Acc>
__global__ void sum_slices_kernel(const Acc* __restrict__ parts, int64_t slices, int64_t count,
                                  Acc* __restrict__ out) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < count; e += stride) {
    Acc sum = parts[e];
    for (int64_t sl = 1; sl < slices; ++sl) sum += parts[sl * count + e];
    out[e] = sum;
  }
}

// ------------------------------------------------------- backward row kernels
// The gradient in z's dtype: a row with ‖z_i‖ ≤ kNormFloor gets dL/du_i / kNormFloor
// (as torch.nn.functional.normalize), beyond float16's range, so float16 saturates
// to ±kHalfMax (csrc/info_nce.h, grad_in_dtype) instead of becoming inf; NaN stays.
template <typename Z, typename Acc>
__device__ __forceinline__ Z narrow_grad(Acc v) {
  if constexpr (std::is_same_v<Z, __half>) {
    const Acc top = Acc(kHalfMax);
    return narrow<Z>(v > top ? top : (v < -top ? -top : v));
  }
  return narrow<Z>(v);
}

// grad_z_i from v_i = (dneg_i − c_i q_i) · inv_tau = dL/du_i, through the
// normalisation: (v − u <u, v>) / ‖z‖, or v / kNormFloor where ‖z‖ ≤ kNormFloor.
// Here u is recomputed from z in Acc (not the 16-bit operand): the projection is
// then as exact as on the CPU.
template <typename Acc, typename Z>
__global__ void grad_rows_kernel(const Acc* __restrict__ dneg, const Acc* __restrict__ q,
                                 const Acc* __restrict__ c, const Z* __restrict__ z,
                                 const Acc* __restrict__ norm, int64_t n, int64_t d, Acc inv_tau,
                                 bool normalize, Z* __restrict__ grad) {
  for_each_row(n, [&](int64_t i, int lane) {
    const int64_t base = i * d;
    const Acc ci = c[i];
    if (!normalize) {
      for (int64_t k = lane; k < d; k += kWarpSize)
        grad[base + k] = narrow_grad<Z>((dneg[base + k] - ci * q[base + k]) * inv_tau);
      return;
    }
    const Acc nrm = norm[i];
    const Acc denom = floored(nrm);
    Acc dot = Acc(0);
    for (int64_t k = lane; k < d; k += kWarpSize)
      dot += (widen(z[base + k]) / denom) * ((dneg[base + k] - ci * q[base + k]) * inv_tau);
    dot = warp_sum(dot);
    for (int64_t k = lane; k < d; k += kWarpSize) {
      const Acc v = (dneg[base + k] - ci * q[base + k]) * inv_tau;
      const Acc u = widen(z[base + k]) / denom;
      grad[base + k] = narrow_grad<Z>(nrm > Acc(kNormFloor) ? (v - u * dot) / nrm : v / Acc(kNormFloor));
    }
  });
}

// ------------------------------------------------------------------- host side
template <typename ZT, typename Tile>
at::Tensor backward_impl(const at::Tensor& grad_rows, const at::Tensor& z, const GraphArgs& g,
                         const at::Tensor& lse_in, double temperature, bool normalize, int64_t a0,
                         int64_t a1) {
  using In = typename Tile::In;
  using Acc = typename Tile::Acc;
  using Z = typename CudaType<ZT>::type;
  const int64_t n = z.size(0), d = z.size(1);
  at::Tensor grad = at::empty({n, d}, z.options());
  if (n == 0) return grad;
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const Acc inv_tau = static_cast<Acc>(1.0 / temperature);
  const auto acc_opts = z.options().dtype(info_nce_acc_dtype(z));

  at::Tensor norm;
  const at::Tensor u = prepare<ZT, Tile>(z, normalize, &norm, stream);
  const at::Tensor lse = lse_in.contiguous();
  // Rows without positives, and rows that are not anchors, carry no loss,
  // whatever grad_rows says; c_i = g_i / W_i.
  at::Tensor has_pos = g.pos_weight > 0;
  has_pos.narrow(0, 0, a0).fill_(false);
  has_pos.narrow(0, a1, n - a1).fill_(false);
  const at::Tensor gr = at::where(has_pos, grad_rows, at::zeros_like(grad_rows)).contiguous();
  const at::Tensor c =
      at::where(has_pos, gr / g.pos_weight.to(gr.scalar_type()), at::zeros_like(gr)).contiguous();
  // max|g| on the device (no sync), for the power-of-two scale of g and M.
  const at::Tensor g_absmax = gr.abs().amax();

  // dneg = Σ_K M_IK u_K: every element is written once by the tile kernel.
  at::Tensor dneg = at::empty({n, d}, acc_opts);
  const int64_t col_blocks = ceil_div(d, Tile::DV);
  TORCH_CHECK(col_blocks <= kMaxGridY, kBackwardOp, ": z has too many columns (", d,
              ") for one CUDA grid");
  const int64_t row_blocks = ceil_div(n, Tile::BM), key_tiles = ceil_div(n, Tile::BN);
  // Small N: split the key tiles over up to `splits` blocks per output tile, so
  // that the grid has kBlocksPerSm blocks per SM; their partial sums go to slices
  // [splits, N, D] (about kBlocksPerSm·SMs·BM·D floats in all, whatever N)
  // added in a fixed order. Large N: one slice, written straight into dneg.
  const int64_t want = ceil_div(kBlocksPerSm * sm_count(), row_blocks * col_blocks);
  const int64_t split_tiles = ceil_div(key_tiles, std::clamp<int64_t>(want, 1, key_tiles));
  const int64_t splits = ceil_div(key_tiles, split_tiles);  // ≤ kMaxGridY: want ≤ 2·SMs
  at::Tensor parts = splits == 1 ? dneg : at::empty({splits, n, d}, acc_opts);
  const dim3 grid(grid_exact(kBackwardOp, row_blocks), static_cast<unsigned int>(col_blocks),
                  static_cast<unsigned int>(splits));
  launch(use_fixed_shift<Acc>(normalize, temperature) ? grad_tile_kernel<Tile, true>
                                                     : grad_tile_kernel<Tile, false>,
         grid, kTileThreads, stream, ptr<In>(u), n, d, inv_tau, ptr<Acc>(gr), ptr<Acc>(lse),
         ptr<Acc>(g_absmax), a0, a1, split_tiles, mut_ptr<Acc>(parts));
  if (splits > 1) {
    launch(sum_slices_kernel<Acc>, grid_stride(n * d, kRowThreads), kRowThreads, stream,
           ptr<Acc>(parts), splits, n * d, mut_ptr<Acc>(dneg));
  }

  // Positive term: dneg −= Gᵀ(c ∘ u) here, − c ∘ (G u) in grad_rows_kernel.
  const at::Tensor minus_c = c.neg();
  graph_spmm<In, Acc>(kBackwardOp, g, ptr<In>(u), ptr<Acc>(minus_c), mut_ptr<Acc>(dneg), n, d,
                      /*transpose=*/true, stream);
  at::Tensor q = at::zeros({n, d}, acc_opts);
  graph_spmm<In, Acc>(kBackwardOp, g, ptr<In>(u), nullptr, mut_ptr<Acc>(q), n, d,
                      /*transpose=*/false, stream);
  const at::Tensor zc = z.contiguous();
  launch(grad_rows_kernel<Acc, Z>, grid_stride(n, kRowWarps), kRowThreads,
         stream, ptr<Acc>(dneg), ptr<Acc>(q), ptr<Acc>(c), ptr<Z>(zc), ptr<Acc>(norm), n, d,
         inv_tau, normalize, mut_ptr<Z>(grad));
  return grad;
}

// The kernels behind the entry point of csrc/info_nce.h (which checks the arguments).
at::Tensor info_nce_backward_cuda(const at::Tensor& grad_rows, const at::Tensor& z,
                                  const GraphArgs& g, const at::Tensor& lse, double temperature,
                                  bool normalize, int64_t a0, int64_t a1) {
  const c10::cuda::CUDAGuard guard(z.device());
  check_tensor_cores(z);
  switch (z.scalar_type()) {
    case at::kDouble:
      return backward_impl<double, DoubleTile>(grad_rows, z, g, lse, temperature, normalize, a0, a1);
    case at::kFloat:
      return backward_impl<float, FloatTile>(grad_rows, z, g, lse, temperature, normalize, a0, a1);
    case at::kHalf:
      return backward_impl<at::Half, HalfTile>(grad_rows, z, g, lse, temperature, normalize, a0, a1);
    default:
      return backward_impl<at::BFloat16, BFloat16Tile>(grad_rows, z, g, lse, temperature,
                                                        normalize, a0, a1);
  }
}


}  // namespace

TORCH_LIBRARY_IMPL(palfast, CUDA, m) {
  m.impl("info_nce_backward", &info_nce_backward_entry<&info_nce_backward_cuda>);
}

}  // namespace palfast::cuda
