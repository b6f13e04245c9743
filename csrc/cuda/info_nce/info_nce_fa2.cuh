// The FA2-style tile layout and helpers shared by fa2_sym_lse_kernel
// (csrc/cuda/info_nce/info_nce_forward.cu), fa2_sym_grad_kernel and
// fa2_row_grad_kernel (csrc/cuda/info_nce/info_nce_backward.cu): 16-bit tiles of up to kMaxD columns in
// shared memory, filled by cp.async and read by ldmatrix (csrc/cuda/mma.cuh).
// Included after info_nce.cuh, inside no namespace of its own.
#pragma once

#include "info_nce.cuh"
#include "../mma.cuh"

namespace palfast::cuda {
namespace {

// fa2_sym_lse_kernel's tiles; fa2_sym_grad_kernel (Fa2Backward) shares the
// block size, D limit and shared-tile layout (kThreads, kMaxD, kKSteps, kChunk,
// kLd), not the row counts; fa2_row_grad_kernel (Fa2Row) takes them all, its query
// tile and key halves being the forward's.
template <typename T>
struct Fa2Forward {
  // Query tiles of 128 rows, 4 warps × 32 rows: two m16 tiles a warp (the M of
  // mma.m16n8k16 is 16), so each ldmatrix'd key B fragment feeds two mma.sync
  // (FlashAttention-2's layout; 16 rows a warp read the key tile twice as often
  // per FLOP). kB is also the forward's symmetric tile: symmetric_lse's region grid.
  static constexpr int kMTiles = 2;
  static constexpr int kWarpRows = 16 * kMTiles;
  static constexpr int kThreads = kTileThreads;  // 4 warps, as in every info_nce tile kernel
  static constexpr int kB = kThreads / kWarpSize * kWarpRows;
  // Key tiles stream 64 rows at a time: two 64-row buffers at D ≤ 128 take 34 KiB,
  // inside the 48 KiB of static shared memory (two 128-row ones would take 68 KiB).
  // Together they hold a query tile while its fragments are loaded.
  static constexpr int kKeyRows = 64;
  static constexpr int kHalves = kB / kKeyRows;  // key halves of a tile
  static constexpr int kMaxD = 128;     // Q fragments: kMTiles × kMaxD/16 × 4 registers a thread
  static constexpr int kKSteps = kMaxD / 16;  // the K of mma.m16n8k16 is 16
  static constexpr int kNTiles = kKeyRows / 8;  // n8 tiles (mma's N) of a key half
  static constexpr int kChunk = 16 / sizeof(T);  // elements of one 16-byte cp.async
  // Row stride of a shared tile: 272 bytes, 4 banks past a multiple of 128, so
  // the 8 rows of an ldmatrix matrix hit 8 distinct 16-byte bank groups.
  static constexpr int kLd = kMaxD + kChunk;
  static_assert(kB % kKeyRows == 0);
};

// Rows [r0, r0 + Rows) of x [n, ld] (ld a multiple of kChunk) into dst [Rows][kLd],
// columns [0, cols) (cols a multiple of 16), by 16-byte cp.async copies; rows ≥ n
// and columns ≥ ld are zero-filled without reading x. Not waited for here.
// Thread t copies column chunk t % kChunksPerRow of every kRowStep-th row from
// t / kChunksPerRow: a fixed column and pointer steps, no index division per copy.
template <typename T, int Rows>
__device__ __forceinline__ void load_tile_async(T* dst, const T* __restrict__ x, int64_t n,
                                                int64_t ld, int cols, int64_t r0) {
  using F = Fa2Forward<T>;
  constexpr int kChunksPerRow = F::kMaxD / F::kChunk;
  constexpr int kRowStep = F::kThreads / kChunksPerRow;
  static_assert(F::kThreads % kChunksPerRow == 0 && Rows % kRowStep == 0);
  const int c = threadIdx.x % kChunksPerRow * F::kChunk, r = threadIdx.x / kChunksPerRow;
  if (c >= cols) return;  // past D rounded up to 16: never read by the mma
  // Rows of x from this thread's first row on (0 for a column past ld), at most Rows.
  const int rows_left = c < ld ? static_cast<int>(std::clamp<int64_t>(n - r0 - r, 0, Rows)) : 0;
  const T* src = x + (r0 + r) * ld + c;
  const int64_t step = kRowStep * ld;
  T* out = dst + r * F::kLd + c;
#pragma unroll
  for (int it = 0; it < Rows / kRowStep; ++it, src += step) {
    const bool inside = it * kRowStep < rows_left;
    ptx::cp_async_16(out + it * kRowStep * F::kLd, inside ? src : x, inside ? 16 : 0);
  }
}

// Rows [r0, r0 + Rows) of the float vector v into dst [Rows] by 16-byte cp.async
// copies of the first Rows/4 threads (v must hold them all: the factor vectors are
// padded to whole tiles). Not waited for here.
template <int Rows>
__device__ __forceinline__ void load_floats_async(float* dst, const float* __restrict__ v,
                                                  int64_t r0) {
  constexpr int kCopyBytes = 16, kFloatsPerCopy = kCopyBytes / sizeof(float);
  static_assert(Rows % kFloatsPerCopy == 0);
  if (threadIdx.x < Rows / kFloatsPerCopy) {
    const int f = kFloatsPerCopy * threadIdx.x;
    ptx::cp_async_16(dst + f, v + r0 + f, kCopyBytes);
  }
}

// The address this lane gives ldmatrix_x4 for the four 8×8 matrices at rows
// row0.., columns col0.. of a shared tile: matrix m = lane / 8 is rows
// row0 + (m & 1)·8.., columns col0 + (m >> 1)·8.. (the A fragment order, see
// csrc/cuda/mma.cuh); `swap` exchanges the roles of the two bits (m's low bit
// picks the column block: two n8 tiles of B from a [n][k] tile). Ld: the
// tile's row stride in elements. With ldmatrix's .trans the same addresses give
// the B fragments of two n8 tiles from a [k][n] tile (swap = false), and the A
// fragment of a matrix stored transposed, [k][m] (swap = true).
template <typename T, int Ld = Fa2Forward<T>::kLd>
__device__ __forceinline__ const T* frag_row(const T* tile, int row0, int col0, bool swap) {
  const int lane = threadIdx.x % kWarpSize, m = lane / 8;
  const int row_blk = swap ? m >> 1 : m & 1, col_blk = swap ? m & 1 : m >> 1;
  return tile + (row0 + row_blk * 8 + lane % 8) * Ld + col0 + col_blk * 8;
}

// s[m][j] = A_m · (rows 8j..8j+7 of tile)ᵀ for the n8 tiles j < NTiles: a warp's
// MTiles m16 tiles of 16 rows (A_m, the ldmatrix fragments of its k-steps, kept
// in registers) times a [rows][kLd] shared tile, over the first ksteps k-steps
// of 16 columns, by mma.sync with B fragments of two n8 tiles per ldmatrix, each
// fed to all MTiles m16 tiles. Warp-collective.
template <typename T, int MTiles, int NTiles>
__device__ __forceinline__ void tile_dots(float (&s)[MTiles][NTiles][4],
                                          const uint32_t (&a)[MTiles][Fa2Forward<T>::kKSteps][4],
                                          const T* tile, int ksteps) {
  using F = Fa2Forward<T>;
  static_assert(NTiles % 2 == 0, "one ldmatrix gives two n8 tiles");
#pragma unroll
  for (int m = 0; m < MTiles; ++m) {
#pragma unroll
    for (int j = 0; j < NTiles; ++j) s[m][j][0] = s[m][j][1] = s[m][j][2] = s[m][j][3] = 0.0f;
  }
  // This lane's ldmatrix row in the tile, offset by constants below.
  const ptx::SmemAddr rows = ptx::smem_addr(frag_row(tile, 0, 0, true));
#pragma unroll
  for (int ks = 0; ks < F::kKSteps; ++ks) {
    if (ks >= ksteps) continue;
#pragma unroll
    for (int j = 0; j < NTiles; j += 2) {
      uint32_t bf[4];  // B fragments of n8 tiles j and j + 1
      ptx::ldmatrix_x4(bf, rows + (j * 8 * F::kLd + ks * 16) * sizeof(T));
      const uint32_t b0[2] = {bf[0], bf[1]}, b1[2] = {bf[2], bf[3]};
#pragma unroll
      for (int m = 0; m < MTiles; ++m) {
        ptx::mma_m16n8k16<T>(s[m][j], a[m][ks], b0);
        ptx::mma_m16n8k16<T>(s[m][j + 1], a[m][ks], b1);
      }
    }
  }
}

// qf ← the A fragments of this warp's kMTiles m16 tiles of the query tile, rows
// [r0, r0 + kB) of x (warp w: rows r0 + w·kWarpRows..), over the first ksteps
// k-steps: copied by cp.async into `tiles` (kB rows of kLd, both key buffers of
// fa2_sym_lse_kernel and fa2_row_grad_kernel), waited for, read by ldmatrix. All
// threads; the caller's __syncthreads must follow before `tiles` is overwritten.
template <typename T>
__device__ __forceinline__ void load_query_fragments(
    uint32_t (&qf)[Fa2Forward<T>::kMTiles][Fa2Forward<T>::kKSteps][4], T* tiles,
    const T* __restrict__ x, int64_t n, int64_t ld, int cols, int ksteps, int64_t r0) {
  using F = Fa2Forward<T>;
  load_tile_async<T, F::kB>(tiles, x, n, ld, cols, r0);
  ptx::cp_async_commit();
  ptx::cp_async_wait<0>();
  __syncthreads();  // every thread's copies have landed
  const int warp = threadIdx.x / kWarpSize;
#pragma unroll
  for (int m = 0; m < F::kMTiles; ++m) {
#pragma unroll
    for (int ks = 0; ks < F::kKSteps; ++ks) {
      if (ks < ksteps) {
        const T* row = frag_row(tiles, warp * F::kWarpRows + 16 * m, ks * 16, false);
        ptx::ldmatrix_x4(qf[m][ks], ptx::smem_addr(row));
      }
    }
  }
}

// The FA2-style kernels (fa2_sym_lse_kernel, fa2_sym_grad_kernel,
// fa2_row_grad_kernel) take 16-bit z with D ≤ Fa2Forward::kMaxD: their fragments
// of the block's own tile (and the backward's column-side or dneg accumulators)
// live in registers. Other D, fp32 and fp64
// take the shared-memory tile kernels.
template <typename Tile>
bool use_fa2_tiles(int64_t d) {
  using In = typename Tile::In;
  if constexpr (std::is_same_v<In, __half> || std::is_same_v<In, __nv_bfloat16>) {
    return d <= Fa2Forward<In>::kMaxD;
  } else {
    return false;
  }
}

// u with its rows padded by zero columns to a multiple of kChunk elements, as
// load_tile_async's 16-byte copies need (u itself when D is a multiple already).
template <typename T>
at::Tensor pad_to_chunk(const at::Tensor& u) {
  constexpr int64_t kChunk = Fa2Forward<T>::kChunk;
  const int64_t d = u.size(1);
  return d % kChunk == 0 ? u : at::constant_pad_nd(u, {0, kChunk - d % kChunk});
}

// 2^x for the fixed-shift terms, x ≥ −113 (use_fixed_shift): the hardware's
// ex2.approx.ftz (MUFU.EX2, about 2 ulp like exp2f), without exp2f's scaling
// for subnormal results, which these terms never are (3 instructions saved a term).
__device__ __forceinline__ float exp2_normal(float x) {
#if defined(__CUDA_ARCH__) && !defined(PALFAST_EMU)
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#else
  return exp2f(x);
#endif
}

}  // namespace
}  // namespace palfast::cuda
