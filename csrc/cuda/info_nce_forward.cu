// palfast::info_nce on CUDA, the forward: lse by the symmetric fixed-shift or the
// online tile kernels, then the loss per row. The design, the tile policies and
// the kernels shared with the backward are in csrc/cuda/info_nce.cuh.
#include "info_nce.cuh"

namespace palfast::cuda {
namespace {

// ------------------------------------------------------------- tile kernels
// lse[i] = log Σ_{k≠i} exp(<x_i, x_k> · inv_tau) for the BM rows of this block,
// which are anchor rows a0 + blockIdx.x·BM + r (< a1), by the online (max, sum):
// the path for normalize=False and for τ below the fixed shift's bound.
template <typename Tile>
__global__ void __launch_bounds__(kTileThreads)
    lse_kernel(const typename Tile::In* __restrict__ x, int64_t n, int64_t d,
               typename Tile::Acc inv_tau, int64_t a0, int64_t a1,
               typename Tile::Acc* __restrict__ lse) {
  using Acc = typename Tile::Acc;
  using L = Smem<Tile>;
  constexpr int kRowsPerWarp = Tile::BM / kWarps;
  constexpr int kColsPerLane = Tile::BN / kWarpSize;
  __shared__ __align__(128) unsigned char smem[L::kForward];
  Acc* s = reinterpret_cast<Acc*>(smem + L::kS);
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int64_t i0 = a0 + int64_t(blockIdx.x) * Tile::BM;

  // Lane-private running (max, sum) of row warp·kRowsPerWarp + rr over the
  // columns lane + 32·cc of every tile.
  Acc run_m[kRowsPerWarp], run_s[kRowsPerWarp];
#pragma unroll
  for (int rr = 0; rr < kRowsPerWarp; ++rr) {
    run_m[rr] = neg_inf<Acc>();
    run_s[rr] = Acc(0);
  }

  for (int64_t k0 = 0; k0 < n; k0 += Tile::BN) {
    Tile::dots(x, n, d, i0, k0, smem, s);
    __syncthreads();  // S complete
#pragma unroll
    for (int rr = 0; rr < kRowsPerWarp; ++rr) {
      const int r = warp * kRowsPerWarp + rr;
      const int64_t i = i0 + r;
#pragma unroll
      for (int cc = 0; cc < kColsPerLane; ++cc) {
        const int c = lane + kWarpSize * cc;
        const int64_t k = k0 + c;
        // Masked entries (k ≥ n, the diagonal) are skipped, never exp'd.
        if (k < n && k != i) lse_add(run_m[rr], run_s[rr], s[r * Tile::kLdS + c] * inv_tau);
      }
    }
    __syncthreads();  // S is read; the next tile may overwrite it
  }

#pragma unroll
  for (int rr = 0; rr < kRowsPerWarp; ++rr) {
    Acc m = run_m[rr], sum = run_s[rr];
#pragma unroll
    for (int off = kWarpSize / 2; off > 0; off >>= 1) {
      const Acc m2 = __shfl_xor_sync(kFullWarp, m, off);
      const Acc s2 = __shfl_xor_sync(kFullWarp, sum, off);
      lse_merge(m, sum, m2, s2);
    }
    const int64_t i = i0 + warp * kRowsPerWarp + rr;
    // N = 1: m = −inf, sum = 0, lse = −inf (the CPU kernel gives the same).
    if (lane == 0 && i < a1) lse[i] = m + log_acc(sum);
  }
}

// ------------------------------------------- symmetric fixed-shift forward
// s_ik = s_ki, so, as csrc/cpu/info_nce.cpp does, only tile pairs (I, K) with
// I ≤ K are computed, and each e_ik is added to the sum of row i and of row k.
// The B×B tiles (B = BM = BN) are grouped into `regions` runs of `per_region`
// consecutive tiles; block b takes the region pair (P, Q), P ≤ Q (the b-th in
// row-major order of the upper triangle), and every tile pair (I, K), I ≤ K, of
// it. Sums go to fixed slots, no atomics: the block's row sums of tile I over its
// K to row_part[Q][rows of I], its column sums to col_part[P][rows of K]
// (zero-initialised, only this block adds to them). lse_finish_kernel then adds
// each row's slots in a fixed order: the result does not depend on the schedule.
// Partial memory: 2·regions·N sums, regions ≈ √(2·kBlocksPerSm·SMs) (about 24 on
// an H200), so O(N) for a given GPU.

// The region pair (p, q), p ≤ q, of block b: b = Σ_{p' < p} (regions − p') + (q − p).
__device__ __forceinline__ void region_pair(int64_t b, int64_t regions, int64_t& p, int64_t& q) {
  p = 0;
  while (b >= regions - p) b -= regions - p++;
  q = p + b;
}

template <typename Tile>
__global__ void __launch_bounds__(kTileThreads)
    sym_lse_kernel(const typename Tile::In* __restrict__ x, int64_t n, int64_t d,
                   typename Tile::Acc inv_tau, int64_t a0, int64_t a1, int64_t per_region,
                   int64_t regions, typename Tile::Acc* __restrict__ row_part,
                   typename Tile::Acc* __restrict__ col_part) {
  using Acc = typename Tile::Acc;
  using L = Smem<Tile>;
  static_assert(Tile::BM == Tile::BN, "symmetric tiles are square");
  constexpr int B = Tile::BM;
  constexpr int kRowsPerWarp = B / kWarps;
  constexpr int kColsPerLane = B / kWarpSize;
  constexpr int kParts = kTileThreads / B;  // threads summing one column, B/kParts rows each
  static_assert(kTileThreads % B == 0 && B % kWarpSize == 0 && B % kWarps == 0);
  __shared__ __align__(128) unsigned char smem[L::kForward];
  __shared__ Acc col_tmp[kTileThreads];
  Acc* s = reinterpret_cast<Acc*>(smem + L::kS);
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const Acc shift_log2 = inv_tau * Acc(kLog2e);  // e_ik = exp2(c_ik·shift_log2 − shift_log2)
  int64_t p, q;
  region_pair(blockIdx.x, regions, p, q);
  const int64_t tiles = (n + B - 1) / B;
  const int64_t i_end = std::min(tiles, (p + 1) * per_region);
  const int64_t k_end = std::min(tiles, (q + 1) * per_region);
  // A pair of two tiles without anchor rows adds nothing any anchor's lse needs.
  auto has_anchors = [&](int64_t t) { return t * B < a1 && (t + 1) * B > a0; };

  for (int64_t ti = p * per_region; ti < i_end; ++ti) {
    Acc run[kRowsPerWarp];  // lane-private sums of rows warp·kRowsPerWarp + rr
#pragma unroll
    for (int rr = 0; rr < kRowsPerWarp; ++rr) run[rr] = Acc(0);
    for (int64_t tk = std::max(ti, q * per_region); tk < k_end; ++tk) {
      if (!has_anchors(ti) && !has_anchors(tk)) continue;  // the same for the whole block
      Tile::dots(x, n, d, ti * B, tk * B, smem, s);
      __syncthreads();  // S complete
      // e_ik into the row sums, and in place of S for the column sums. Masked
      // entries (k ≥ n, i ≥ n, the diagonal) are 0, never exp'd.
#pragma unroll
      for (int rr = 0; rr < kRowsPerWarp; ++rr) {
        const int r = warp * kRowsPerWarp + rr;
        const int64_t i = ti * B + r;
#pragma unroll
        for (int cc = 0; cc < kColsPerLane; ++cc) {
          const int c = lane + kWarpSize * cc;
          const int64_t k = tk * B + c;
          Acc e = Acc(0);
          if (i < n && k < n && k != i) {
            e = exp2_acc(fma(s[r * Tile::kLdS + c], shift_log2, -shift_log2));
          }
          run[rr] += e;
          s[r * Tile::kLdS + c] = e;  // this thread's own entry
        }
      }
      if (ti != tk) {  // a diagonal tile's columns are its rows, summed already
        __syncthreads();  // E complete
        const int c = threadIdx.x % B, part = threadIdx.x / B;
        Acc sum = Acc(0);
        constexpr int kRowsPerPart = B / kParts;
        for (int r = part * kRowsPerPart; r < (part + 1) * kRowsPerPart; ++r) {
          sum += s[r * Tile::kLdS + c];
        }
        col_tmp[threadIdx.x] = sum;
        __syncthreads();  // column parts complete
        const int64_t k = tk * B + threadIdx.x;
        if (threadIdx.x < B && k < n) {
          Acc total = Acc(0);
#pragma unroll
          for (int pp = 0; pp < kParts; ++pp) total += col_tmp[pp * B + threadIdx.x];
          col_part[p * n + k] += total;
        }
      }
      __syncthreads();  // E and column parts are read; the next tile may overwrite them
    }
#pragma unroll
    for (int rr = 0; rr < kRowsPerWarp; ++rr) {
      const Acc sum = warp_sum(run[rr]);
      const int64_t i = ti * B + warp * kRowsPerWarp + rr;
      if (lane == 0 && i < n) row_part[q * n + i] = sum;
    }
  }
}

// lse_i = 1/τ + ln(Σ_{q ≥ P(i)} row_part[q][i] + Σ_{p ≤ P(i)} col_part[p][i]) for the
// anchor rows i in [a0, a1), P(i) = i / rows_per_region, summed in that order. A
// row without other rows (N = 1) has the sum 0 and lse −inf, as on the CPU.
template <typename Acc>
__global__ void lse_finish_kernel(const Acc* __restrict__ row_part,
                                  const Acc* __restrict__ col_part, int64_t n,
                                  int64_t rows_per_region, int64_t regions, Acc inv_tau, int64_t a0,
                                  int64_t a1, Acc* __restrict__ lse) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = a0 + blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < a1; i += stride) {
    const int64_t home = i / rows_per_region;
    Acc sum = Acc(0);
    for (int64_t q = home; q < regions; ++q) sum += row_part[q * n + i];
    for (int64_t p = 0; p <= home; ++p) sum += col_part[p * n + i];
    lse[i] = inv_tau + log_acc(sum);
  }
}

// ---------------------------------------------------- forward row kernel
// loss_i = lse_i − <u_i, q_i> · inv_tau / W_i for W_i > 0, else 0 (q = G u).
// u is the GEMM operand, so s_ij here and in lse come from the same values:
// with one positive and no other key (N = 2) the loss is 0 up to fp32 rounding.
template <typename X, typename Acc>
__global__ void loss_kernel(const X* __restrict__ u, const Acc* __restrict__ q,
                            const Acc* __restrict__ lse, const double* __restrict__ pos_weight,
                            int64_t n, int64_t d, Acc inv_tau, int64_t a0, int64_t a1,
                            Acc* __restrict__ loss) {
  for_each_row(n, [&](int64_t i, int lane) {
    Acc dot = Acc(0);
    for (int64_t k = lane; k < d; k += kWarpSize) dot += widen(u[i * d + k]) * q[i * d + k];
    dot = warp_sum(dot);
    if (lane == 0) {
      const double w = pos_weight[i];
      const bool anchor = i >= a0 && i < a1;
      loss[i] = anchor && w > 0 ? lse[i] - dot * inv_tau / static_cast<Acc>(w) : Acc(0);
    }
  });
}

// ------------------------------------------------------------------- host side
// lse of the anchor rows [a0, a1) by the symmetric fixed-shift kernels.
template <typename Tile>
void symmetric_lse(const at::Tensor& u, int64_t n, int64_t d, typename Tile::Acc inv_tau,
                   int64_t a0, int64_t a1, at::Tensor& lse, cudaStream_t stream) {
  using Acc = typename Tile::Acc;
  const int64_t tiles = ceil_div(n, Tile::BM);
  int64_t min_regions = 1;  // the fewest regions whose pairs give every SM kBlocksPerSm blocks
  while (min_regions * (min_regions + 1) / 2 < kBlocksPerSm * sm_count()) ++min_regions;
  const int64_t per_region = std::max<int64_t>(1, tiles / min_regions);
  const int64_t regions = ceil_div(tiles, per_region);
  at::Tensor row_part = at::empty({regions, n}, lse.options());
  at::Tensor col_part = at::zeros({regions, n}, lse.options());
  launch(sym_lse_kernel<Tile>, grid_exact(kForwardOp, regions * (regions + 1) / 2), kTileThreads,
         stream, ptr<typename Tile::In>(u), n, d, inv_tau, a0, a1, per_region, regions,
         mut_ptr<Acc>(row_part), mut_ptr<Acc>(col_part));
  launch(lse_finish_kernel<Acc>, grid_stride(a1 - a0, kRowThreads), kRowThreads, stream,
         ptr<Acc>(row_part), ptr<Acc>(col_part), n, per_region * Tile::BM, regions, inv_tau, a0,
         a1, mut_ptr<Acc>(lse));
}

template <typename ZT, typename Tile>
std::tuple<at::Tensor, at::Tensor> forward_impl(const at::Tensor& z, const GraphArgs& g,
                                                double temperature, bool normalize, int64_t a0,
                                                int64_t a1) {
  using In = typename Tile::In;
  using Acc = typename Tile::Acc;
  const int64_t n = z.size(0), d = z.size(1);
  const auto acc_opts = z.options().dtype(info_nce_acc_dtype(z));
  at::Tensor loss = at::empty({n}, acc_opts);
  // Rows that are not anchors keep lse = +inf: exp(s − lse) = 0 in the backward.
  at::Tensor lse = at::full({n}, std::numeric_limits<double>::infinity(), acc_opts);
  if (n == 0) return {loss, lse};
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const Acc inv_tau = static_cast<Acc>(1.0 / temperature);

  const at::Tensor u = prepare<ZT, Tile>(z, normalize, nullptr, stream);
  if (a1 > a0 && use_fixed_shift<Acc>(normalize, temperature)) {
    symmetric_lse<Tile>(u, n, d, inv_tau, a0, a1, lse, stream);
  } else if (a1 > a0) {
    launch(lse_kernel<Tile>, grid_exact(kForwardOp, ceil_div(a1 - a0, Tile::BM)), kTileThreads,
           stream, ptr<In>(u), n, d, inv_tau, a0, a1, mut_ptr<Acc>(lse));
  }

  // Positive term: <u_i, (G u)_i> / (τ W_i), accumulated in Acc.
  at::Tensor q = at::zeros({n, d}, acc_opts);
  graph_spmm<In, Acc>(kForwardOp, g, ptr<In>(u), nullptr, mut_ptr<Acc>(q), n, d,
                      /*transpose=*/false, stream);
  launch(loss_kernel<In, Acc>, grid_stride(n, kRowWarps), kRowThreads, stream,
         ptr<In>(u), ptr<Acc>(q), ptr<Acc>(lse), g.pos_weight.data_ptr<double>(), n, d, inv_tau,
         a0, a1, mut_ptr<Acc>(loss));
  return {loss, lse};
}

// The kernels behind the entry point of csrc/info_nce.h (which checks the arguments).
std::tuple<at::Tensor, at::Tensor> info_nce_cuda(const at::Tensor& z, const GraphArgs& g,
                                                 double temperature, bool normalize, int64_t a0,
                                                 int64_t a1) {
  const c10::cuda::CUDAGuard guard(z.device());
  check_tensor_cores(z);
  switch (z.scalar_type()) {
    case at::kDouble: return forward_impl<double, DoubleTile>(z, g, temperature, normalize, a0, a1);
    case at::kFloat: return forward_impl<float, FloatTile>(z, g, temperature, normalize, a0, a1);
    case at::kHalf: return forward_impl<at::Half, HalfTile>(z, g, temperature, normalize, a0, a1);
    default: return forward_impl<at::BFloat16, BFloat16Tile>(z, g, temperature, normalize, a0, a1);
  }
}


}  // namespace

TORCH_LIBRARY_IMPL(palfast, CUDA, m) {
  m.impl("info_nce", &info_nce_entry<&info_nce_cuda>);
}

}  // namespace palfast::cuda
