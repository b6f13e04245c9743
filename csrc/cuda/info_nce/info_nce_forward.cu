// palfast::info_nce on CUDA, the forward: lse by the symmetric fixed-shift kernels
// (fa2_sym_lse_kernel for 16-bit z with D ≤ 128, sym_lse_kernel otherwise) or the
// online tile kernel, then the loss per row. The design, the tile policies and
// the kernels shared with the backward are in csrc/cuda/info_nce/info_nce.cuh; the counts
// and predicted times in csrc/cuda/info_nce/info_nce.md.
#include "info_nce.cuh"
#include "info_nce_fa2.cuh"

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
// The B×B tiles (B = BM = BN; 128 rows for the FA2-style kernel below) are
// grouped into `regions` runs of `per_region` consecutive tiles; block b takes
// the region pair (P, Q), P ≤ Q (the b-th in row-major order of the upper
// triangle), and every tile pair (I, K), I ≤ K, of it. Sums go to fixed slots,
// no atomics: the block's row sums of tile I over its K to row_part[Q][rows of
// I], its column sums to col_part[P][rows of K] (zero-initialised, only this
// block adds to them). lse_finish_kernel then adds each row's slots in a fixed
// order: the result does not depend on the schedule.
// Partial memory: 2·regions·N sums, regions ≈ √(2·kBlocksPerSm·SMs) (about 24 on
// an H200; 47 for the FA2-style kernel below, kFa2BlocksPerSm, whose tiles are
// 128 rows), so O(N) for a given GPU.

// The region pair (p, q), p ≤ q, of block b: b = Σ_{p' < p} (regions − p') + (q − p).
__device__ __forceinline__ void region_pair(int64_t b, int64_t regions, int64_t& p, int64_t& q) {
  p = 0;
  while (b >= regions - p) b -= regions - p++;
  q = p + b;
}

// The tiles of this block's region pair (P, Q) among `tiles` tiles: row tiles
// [P·per_region, i_end), key tiles from max(I, Q·per_region) to k_end.
struct RegionTiles {
  int64_t p, q, i_end, k_end;
};
__device__ __forceinline__ RegionTiles region_tiles(int64_t regions, int64_t per_region,
                                                    int64_t tiles) {
  RegionTiles r;
  region_pair(blockIdx.x, regions, r.p, r.q);
  r.i_end = std::min(tiles, (r.p + 1) * per_region);
  r.k_end = std::min(tiles, (r.q + 1) * per_region);
  return r;
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
  const auto [p, q, i_end, k_end] = region_tiles(regions, per_region, (n + B - 1) / B);
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

// ------------------------------- symmetric fixed-shift forward, FA2-style (16-bit)
// The same scheme as sym_lse_kernel (region pairs of tiles I ≤ K, the same fixed
// partial slots, so lse_finish_kernel and the result's independence of the
// schedule are unchanged) on tiles of its own B = Fa2Forward::kB = 128 rows, with
// the tile GEMM kept in registers as in FlashAttention-2: warp w owns rows
// 32w..32w+31 of query tile I, two m16 tiles whose mma.sync A fragments it loads
// once (ldmatrix) and keeps; key tile K streams as two 64-row halves through two
// shared-memory buffers by cp.async (the next half is copied while one is used),
// each ldmatrix'd B fragment feeding both m16 tiles; S = U_I U_Kᵀ stays in the
// mma accumulators, e = exp2(fma(c, k, −k)) in registers; row sums stay in
// registers over all K (a quad shuffle at the end), column sums are reduced over
// the warp's 32 rows by adds and shuffles, over the warps through a small shared
// buffer, and added to the block's own slots. A diagonal pair (I = K) computes
// both halves in full, only i = k masked, and takes only the row sums.
// csrc/cuda/info_nce/info_nce.md has the register/shared-memory budget and the counts.

// One step of reduce_scatter_rows: lanes Off apart each keep one half of
// v[0 .. 2·Half), the lower lane the low half, and add the partner's copy of it.
template <int Off, int Half, int V>
__device__ __forceinline__ void trade_halves(float (&v)[V], int lane) {
  const bool upper = lane & Off;
#pragma unroll
  for (int i = 0; i < Half; ++i) {
    // Select values, not elements: `upper ? v[a] : v[b]` put v in local memory.
    const float lo = v[i], hi = v[Half + i];
    const float keep = upper ? hi : lo, send = upper ? lo : hi;
    v[i] = keep + __shfl_xor_sync(kFullWarp, send, Off);
  }
}

// Sums v over the 8 lanes of equal lane % 4 (the rows g of an mma accumulator)
// and leaves lane (g, t) with the totals of v[g·V/8 .. (g+1)·V/8) in v[0 .. V/8):
// each step keeps half of the values and trades the other half with the partner
// lane (7V/8 shuffles, where summing every value over the 8 lanes takes 3V).
// The steps are written out so that every index is a compile-time constant.
template <int V>
__device__ __forceinline__ void reduce_scatter_rows(float (&v)[V]) {
  static_assert(V % 8 == 0);
  const int lane = threadIdx.x % kWarpSize;
  trade_halves<16, V / 2>(v, lane);  // lane bits 4, 3, 2 are g's bits 2, 1, 0
  trade_halves<8, V / 4>(v, lane);
  trade_halves<4, V / 8>(v, lane);
}


// Blocks of fa2_sym_lse_kernel that an SM must hold at once: 3 caps it at 168
// registers a thread (65 536 / (3 × 128) = 170, allocated in steps of 8); its 64
// Q-fragment and 64 accumulator registers fit in them without spills (ptxas -v,
// csrc/cuda/info_nce/info_nce.md), where left free it takes 175-177 and only 2 fit.
constexpr int kFa2ResidentBlocks = 3;

template <typename T>
__global__ void __launch_bounds__(Fa2Forward<T>::kThreads, kFa2ResidentBlocks)
    fa2_sym_lse_kernel(const T* __restrict__ x, int64_t n, int64_t d, int64_t ld, float inv_tau,
                       int64_t a0, int64_t a1, int64_t per_region, int64_t regions,
                       float* __restrict__ row_part, float* __restrict__ col_part) {
  using F = Fa2Forward<T>;
  constexpr int B = F::kB, KR = F::kKeyRows, kWarps = F::kThreads / kWarpSize;
  // The two key buffers, one after the other, so that together they take a query tile.
  __shared__ __align__(128) T tiles[F::kHalves * KR * F::kLd];
  __shared__ float col_buf[kWarps][KR];
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int g = lane / 4, t = lane % 4;  // rows g, g + 8 of each m16 tile, columns 2t, 2t + 1
  const int ksteps = static_cast<int>((d + 15) / 16);
  const int cols = ksteps * 16;  // D zero-padded to mma's K
  const float shift_log2 = inv_tau * float(kLog2e);  // e_ik = exp2(c_ik·shift_log2 − shift_log2)
  const auto [p, q, i_end, k_end] = region_tiles(regions, per_region, (n + B - 1) / B);
  // Tiles with anchor rows: [anchor_lo, anchor_hi). A pair of two tiles without
  // any adds nothing an anchor's lse needs.
  const int64_t anchor_lo = a0 / B, anchor_hi = (a1 + B - 1) / B;
  const int64_t halves_in_n = (n + KR - 1) / KR;  // key halves with a row < n

  for (int64_t ti = p * per_region; ti < i_end; ++ti) {
    int64_t k_lo = std::max(ti, q * per_region), k_hi = k_end;
    if (ti < anchor_lo || ti >= anchor_hi) {
      k_lo = std::max(k_lo, anchor_lo);
      k_hi = std::min(k_hi, anchor_hi);
    }
    // The key halves h (rows h·KR..) of tiles [k_lo, k_hi), without those past n.
    const int64_t h_lo = k_lo * F::kHalves, h_hi = std::min(k_hi * F::kHalves, halves_in_n);
    // Rows 16m + g + 8r of this warp, columns of this lane.
    float row_sum[F::kMTiles][2] = {};
    if (h_lo < h_hi) {
      // Q through both key buffers, its fragments into registers, then the key halves.
      uint32_t qf[F::kMTiles][F::kKSteps][4];
      load_query_fragments(qf, tiles, x, n, ld, cols, ksteps, ti * B);
      __syncthreads();  // every warp holds its Q: the buffers may take key halves
      load_tile_async<T, KR>(tiles, x, n, ld, cols, h_lo * KR);
      ptx::cp_async_commit();

      for (int64_t h = h_lo; h < h_hi; ++h) {
        const int cur = static_cast<int>((h - h_lo) & 1);
        const T* key = tiles + cur * KR * F::kLd;
        if (h + 1 < h_hi) {
          load_tile_async<T, KR>(tiles + (cur ^ 1) * KR * F::kLd, x, n, ld, cols, (h + 1) * KR);
        }
        ptx::cp_async_commit();  // empty after the last half: the wait below stays the same
        ptx::cp_async_wait<1>();  // this thread's copies of half h have landed
        __syncthreads();          // and everyone's

        float s[F::kMTiles][F::kNTiles][4];
        tile_dots(s, qf, key, ksteps);

        // e_ik in place of c_ik, into the row sums. Masked entries (k ≥ n, i ≥ n,
        // the diagonal) are 0, never exp'd; only diagonal and last tiles have any.
        const int64_t tk = h / F::kHalves;
        const bool masked = ti == tk || (h + 1) * KR > n;
        const int64_t i0 = ti * B + warp * F::kWarpRows + g, k0 = h * KR + 2 * t;
#pragma unroll
        for (int m = 0; m < F::kMTiles; ++m) {
#pragma unroll
          for (int j = 0; j < F::kNTiles; ++j) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              const int64_t i = i0 + 16 * m + 8 * (e >> 1), k = k0 + 8 * j + (e & 1);
              const bool keep = !masked || (i < n && k < n && i != k);
              s[m][j][e] = keep ? exp2_normal(fmaf(s[m][j][e], shift_log2, -shift_log2)) : 0.0f;
              row_sum[m][e >> 1] += s[m][j][e];
            }
          }
        }

        if (ti != tk) {  // a diagonal tile's columns are its rows, summed already
          // Column 8j + 2t + c of this warp's 32 rows is v[2j + c] summed over g;
          // after the reduce-scatter lane (g, t) holds columns 8g + 2t + {0, 1}.
          float v[2 * F::kNTiles];
#pragma unroll
          for (int j = 0; j < F::kNTiles; ++j) {
#pragma unroll
            for (int c = 0; c < 2; ++c) {
              v[2 * j + c] = s[0][j][c] + s[0][j][c + 2];
#pragma unroll
              for (int m = 1; m < F::kMTiles; ++m) v[2 * j + c] += s[m][j][c] + s[m][j][c + 2];
            }
          }
          reduce_scatter_rows(v);
          col_buf[warp][8 * g + 2 * t] = v[0];
          col_buf[warp][8 * g + 2 * t + 1] = v[1];
          __syncthreads();  // every warp's column sums are in col_buf
          const int64_t k = h * KR + threadIdx.x;
          if (threadIdx.x < KR && k < n) {
            float total = 0.0f;
#pragma unroll
            for (int w = 0; w < kWarps; ++w) total += col_buf[w][threadIdx.x];
            col_part[p * n + k] += total;
          }
        }
        __syncthreads();  // the key buffer and col_buf are read: the next half may overwrite them
      }
    }
    // The quad of lanes sharing a row adds its columns; every row of region P gets
    // its slot written (0 without tiles), as lse_finish_kernel reads them all.
#pragma unroll
    for (int m = 0; m < F::kMTiles; ++m) {
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        float sum = row_sum[m][r];
        sum += __shfl_xor_sync(kFullWarp, sum, 1);
        sum += __shfl_xor_sync(kFullWarp, sum, 2);
        const int64_t i = ti * B + warp * F::kWarpRows + 16 * m + g + 8 * r;
        if (t == 0 && i < n) row_part[q * n + i] = sum;
      }
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
// Region pairs per SM that the FA2-style forward aims for. kFa2ResidentBlocks = 3
// of its blocks fit on an SM at once: with kBlocksPerSm's 2 all would run at once,
// leaving a third of every SM's block slots empty; with about 8, handed out as
// blocks finish, the slots stay full until the tail and SMs differ by about one
// block in 8.
constexpr int64_t kFa2BlocksPerSm = 8;

// lse of the anchor rows [a0, a1) by the symmetric fixed-shift kernels.
template <typename Tile>
void symmetric_lse(const at::Tensor& u, int64_t n, int64_t d, typename Tile::Acc inv_tau,
                   int64_t a0, int64_t a1, at::Tensor& lse, cudaStream_t stream) {
  using In = typename Tile::In;
  using Acc = typename Tile::Acc;
  const bool fa2 = use_fa2_tiles<Tile>(d);  // else sym_lse_kernel
  const int64_t tile_rows = fa2 ? Fa2Forward<In>::kB : Tile::BM;  // each kernel's B
  const int64_t tiles = ceil_div(n, tile_rows);
  const int64_t blocks_per_sm = fa2 ? kFa2BlocksPerSm : kBlocksPerSm;
  int64_t min_regions = 1;  // the fewest regions whose pairs give every SM blocks_per_sm blocks
  while (min_regions * (min_regions + 1) / 2 < blocks_per_sm * sm_count()) ++min_regions;
  const int64_t per_region = std::max<int64_t>(1, tiles / min_regions);
  const int64_t regions = ceil_div(tiles, per_region);
  at::Tensor row_part = at::empty({regions, n}, lse.options());
  at::Tensor col_part = at::zeros({regions, n}, lse.options());
  const unsigned int grid = grid_exact(kForwardOp, regions * (regions + 1) / 2);
  if constexpr (std::is_same_v<In, __half> || std::is_same_v<In, __nv_bfloat16>) {
    if (fa2) {
      const at::Tensor up = pad_to_chunk<In>(u);
      launch(fa2_sym_lse_kernel<In>, grid, Fa2Forward<In>::kThreads, stream, ptr<In>(up), n, d,
             up.size(1), inv_tau, a0, a1, per_region, regions, mut_ptr<Acc>(row_part),
             mut_ptr<Acc>(col_part));
    }
  }
  if (!fa2) {
    launch(sym_lse_kernel<Tile>, grid, kTileThreads, stream, ptr<In>(u), n, d, inv_tau, a0, a1,
           per_region, regions, mut_ptr<Acc>(row_part), mut_ptr<Acc>(col_part));
  }
  launch(lse_finish_kernel<Acc>, grid_stride(a1 - a0, kRowThreads), kRowThreads, stream,
         ptr<Acc>(row_part), ptr<Acc>(col_part), n, per_region * tile_rows, regions, inv_tau, a0,
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
    case at::kFloat:
      switch (float_math()) {
        case FloatMath::kTf32:
          return forward_impl<float, Tf32Tile1>(z, g, temperature, normalize, a0, a1);
        case FloatMath::kTf32x3:
          return forward_impl<float, Tf32Tile3>(z, g, temperature, normalize, a0, a1);
        default: return forward_impl<float, FloatTile>(z, g, temperature, normalize, a0, a1);
      }
    case at::kHalf: return forward_impl<at::Half, HalfTile>(z, g, temperature, normalize, a0, a1);
    default: return forward_impl<at::BFloat16, BFloat16Tile>(z, g, temperature, normalize, a0, a1);
  }
}


}  // namespace

TORCH_LIBRARY_IMPL(palfast, CUDA, m) {
  m.impl("info_nce", &info_nce_entry<&info_nce_cuda>);
}

}  // namespace palfast::cuda
