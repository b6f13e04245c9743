// Test ops for the warp-level primitives of csrc/cuda/mma.cuh under the emulator:
// small kernels that run one primitive each, registered in palfast_emu for
// tests/cuda_emu/test_mma.py, which checks them against the PTX ISA's layouts
// and plain matmuls/copies computed in Python.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "cuda_emu.h"

#define PALFAST_EMU 1
#include "cuda/mma.cuh"

namespace {

namespace ptx = palfast::cuda::ptx;
constexpr int kWarp = palfast_emu::kWarpSize;

void check(bool ok, const std::string& what) { TORCH_CHECK(ok, "palfast_emu mma test op: ", what); }

// ---- ldmatrix: x [rows, cols] 16-bit values (as int16) in shared memory; lane l
// gives the address of row rows[l] (column 0). Lanes ≥ `lanes` return at once.
constexpr int kLdRows = 64, kLdCols = 16;

__global__ void ldmatrix_kernel(const int16_t* x, int rows, int cols, const int64_t* lane_rows,
                                bool trans, int lanes, int32_t* out) {
  __shared__ __align__(16) int16_t smem[kLdRows * kLdCols];
  const int lane = threadIdx.x;
  for (int e = lane; e < rows * cols; e += kWarp) smem[e] = x[e];
  __syncwarp();
  if (lane >= lanes) return;
  uint32_t r[4];
  const int16_t* row = smem + lane_rows[lane] * cols;
  if (trans) ptx::ldmatrix_x4<true>(r, ptx::smem_addr(row));
  else ptx::ldmatrix_x4(r, ptx::smem_addr(row));
  for (int m = 0; m < 4; ++m) out[lane * 4 + m] = static_cast<int32_t>(r[m]);
}

at::Tensor ldmatrix(const at::Tensor& x, const at::Tensor& lane_rows, bool trans, int64_t lanes) {
  check(x.scalar_type() == at::kShort && x.dim() == 2 && x.size(0) <= kLdRows &&
            x.size(1) <= kLdCols && x.size(1) % 8 == 0,
        "x must be int16 [<= 64, 8 or 16]");
  check(lane_rows.scalar_type() == at::kLong && lane_rows.numel() == kWarp, "rows: int64 [32]");
  const at::Tensor xc = x.contiguous(), rc = lane_rows.contiguous();
  at::Tensor out = at::zeros({kWarp, 4}, x.options().dtype(at::kInt));
  palfast_emu::launch(ldmatrix_kernel, dim3(1), dim3(kWarp), 0, xc.data_ptr<int16_t>(),
                      int(x.size(0)), int(x.size(1)), rc.data_ptr<int64_t>(), trans, int(lanes),
                      out.data_ptr<int32_t>());
  return out;
}

// ---- mma.sync on registers given per lane: a [32, 4], b [32, 2] (int32, two
// 16-bit values each), c [32, 4] fp32; returns d [32, 4].
template <typename T>
__global__ void mma_kernel(const int32_t* a, const int32_t* b, const float* c, int lanes,
                           float* d) {
  const int lane = threadIdx.x;
  if (lane >= lanes) return;
  uint32_t ra[4], rb[2];
  float acc[4];
  for (int i = 0; i < 4; ++i) ra[i] = static_cast<uint32_t>(a[lane * 4 + i]);
  for (int i = 0; i < 2; ++i) rb[i] = static_cast<uint32_t>(b[lane * 2 + i]);
  for (int i = 0; i < 4; ++i) acc[i] = c[lane * 4 + i];
  ptx::mma_m16n8k16<T>(acc, ra, rb);
  for (int i = 0; i < 4; ++i) d[lane * 4 + i] = acc[i];
}

at::Tensor mma(const at::Tensor& a, const at::Tensor& b, const at::Tensor& c, bool bf16,
               int64_t lanes) {
  check(a.scalar_type() == at::kInt && a.numel() == kWarp * 4, "a: int32 [32, 4]");
  check(b.scalar_type() == at::kInt && b.numel() == kWarp * 2, "b: int32 [32, 2]");
  check(c.scalar_type() == at::kFloat && c.numel() == kWarp * 4, "c: float32 [32, 4]");
  const at::Tensor ac = a.contiguous(), bc = b.contiguous(), cc = c.contiguous();
  at::Tensor d = at::zeros({kWarp, 4}, c.options());
  auto kernel = bf16 ? mma_kernel<__nv_bfloat16> : mma_kernel<__half>;
  palfast_emu::launch(kernel, dim3(1), dim3(kWarp), 0, ac.data_ptr<int32_t>(),
                      bc.data_ptr<int32_t>(), cc.data_ptr<float>(), int(lanes),
                      d.data_ptr<float>());
  return d;
}

// ---- mma.sync m16n8k8 tf32 on registers given per lane: a [32, 4], b [32, 2]
// (int32, one fp32 pattern each), c [32, 4] fp32; returns d [32, 4].
__global__ void mma_tf32_kernel(const int32_t* a, const int32_t* b, const float* c, float* d) {
  const int lane = threadIdx.x;
  uint32_t ra[4], rb[2];
  float acc[4];
  for (int i = 0; i < 4; ++i) ra[i] = static_cast<uint32_t>(a[lane * 4 + i]);
  for (int i = 0; i < 2; ++i) rb[i] = static_cast<uint32_t>(b[lane * 2 + i]);
  for (int i = 0; i < 4; ++i) acc[i] = c[lane * 4 + i];
  ptx::mma_m16n8k8_tf32(acc, ra, rb);
  for (int i = 0; i < 4; ++i) d[lane * 4 + i] = acc[i];
}

at::Tensor mma_tf32(const at::Tensor& a, const at::Tensor& b, const at::Tensor& c) {
  check(a.scalar_type() == at::kInt && a.numel() == kWarp * 4, "a: int32 [32, 4]");
  check(b.scalar_type() == at::kInt && b.numel() == kWarp * 2, "b: int32 [32, 2]");
  check(c.scalar_type() == at::kFloat && c.numel() == kWarp * 4, "c: float32 [32, 4]");
  const at::Tensor ac = a.contiguous(), bc = b.contiguous(), cc = c.contiguous();
  at::Tensor d = at::zeros({kWarp, 4}, c.options());
  palfast_emu::launch(mma_tf32_kernel, dim3(1), dim3(kWarp), 0, ac.data_ptr<int32_t>(),
                      bc.data_ptr<int32_t>(), cc.data_ptr<float>(), d.data_ptr<float>());
  return d;
}

// ---- cvt.rna.tf32.f32 of each element of x (float32), as int32 patterns.
__global__ void cvt_tf32_kernel(const float* x, int64_t n, int32_t* out) {
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x)
    out[i] = static_cast<int32_t>(ptx::cvt_rna_tf32(x[i]));
}

at::Tensor cvt_tf32(const at::Tensor& x) {
  check(x.scalar_type() == at::kFloat, "x: float32");
  const at::Tensor xc = x.contiguous();
  at::Tensor out = at::empty(x.sizes(), x.options().dtype(at::kInt));
  palfast_emu::launch(cvt_tf32_kernel, dim3(1), dim3(kWarp), 0, xc.data_ptr<float>(),
                      xc.numel(), out.data_ptr<int32_t>());
  return out;
}

// ---- a 16×N GEMM as the kernels do it: out = A Bᵀ with A [16, K] and B [N, K]
// (b_kn = false, ldmatrix) or out = A B with B [K, N] (b_kn = true,
// ldmatrix .trans), all operands in shared memory, fragments by ldmatrix.
constexpr int kGemmMaxK = 64, kGemmMaxN = 64;

template <typename T>
__global__ void gemm_kernel(const T* a, const T* b, int n, int k, bool b_kn, float* out) {
  __shared__ __align__(16) T sa[16 * kGemmMaxK];
  __shared__ __align__(16) T sb[kGemmMaxN * kGemmMaxK];
  const int lane = threadIdx.x, g = lane / 4, t = lane % 4;
  for (int e = lane; e < 16 * k; e += kWarp) sa[e] = a[e];
  for (int e = lane; e < n * k; e += kWarp) sb[e] = b[e];
  __syncwarp();
  const int mat = lane / 8, r = lane % 8;  // this lane's row address: row r of matrix mat
  for (int j = 0; j < n; j += 16) {        // two n8 tiles at a time
    float acc[2][4] = {};
    for (int kk = 0; kk < k; kk += 16) {
      uint32_t fa[4], fb[4];
      ptx::ldmatrix_x4(fa, ptx::smem_addr(sa + ((mat & 1) * 8 + r) * k + kk + (mat >> 1) * 8));
      if (b_kn) {  // matrices (k 0-7, n 0-7), (k 8-15, n 0-7), (k 0-7, n 8-15), (k 8-15, n 8-15)
        const T* row = sb + (kk + (mat & 1) * 8 + r) * n + j + (mat >> 1) * 8;
        ptx::ldmatrix_x4<true>(fb, ptx::smem_addr(row));
      } else {     // matrices (n 0-7, k 0-7), (n 0-7, k 8-15), (n 8-15, k 0-7), (n 8-15, k 8-15)
        const T* row = sb + (j + (mat >> 1) * 8 + r) * k + kk + (mat & 1) * 8;
        ptx::ldmatrix_x4(fb, ptx::smem_addr(row));
      }
      const uint32_t b0[2] = {fb[0], fb[1]}, b1[2] = {fb[2], fb[3]};
      ptx::mma_m16n8k16<T>(acc[0], fa, b0);
      ptx::mma_m16n8k16<T>(acc[1], fa, b1);
    }
    for (int h = 0; h < 2; ++h)
      for (int e = 0; e < 4; ++e)
        out[(g + 8 * (e >> 1)) * n + j + 8 * h + 2 * t + (e & 1)] = acc[h][e];
  }
}

at::Tensor gemm(const at::Tensor& a, const at::Tensor& b, bool b_kn) {
  const int64_t k = a.size(1), n = b_kn ? b.size(1) : b.size(0);
  check(a.dim() == 2 && a.size(0) == 16 && k % 16 == 0 && k <= kGemmMaxK, "a: [16, 16·j <= 64]");
  check(b.dim() == 2 && n % 16 == 0 && n <= kGemmMaxN && (b_kn ? b.size(0) : b.size(1)) == k,
        "b: [N, K] or [K, N], N = 16·j <= 64");
  check(a.scalar_type() == b.scalar_type() &&
            (a.scalar_type() == at::kBFloat16 || a.scalar_type() == at::kHalf),
        "a, b: both bfloat16 or both float16");
  const at::Tensor ac = a.contiguous(), bc = b.contiguous();
  at::Tensor out = at::zeros({16, n}, a.options().dtype(at::kFloat));
  if (a.scalar_type() == at::kBFloat16) {
    palfast_emu::launch(gemm_kernel<__nv_bfloat16>, dim3(1), dim3(kWarp), 0,
                        reinterpret_cast<const __nv_bfloat16*>(ac.data_ptr()),
                        reinterpret_cast<const __nv_bfloat16*>(bc.data_ptr()), int(n), int(k),
                        b_kn, out.data_ptr<float>());
  } else {
    palfast_emu::launch(gemm_kernel<__half>, dim3(1), dim3(kWarp), 0,
                        reinterpret_cast<const __half*>(ac.data_ptr()),
                        reinterpret_cast<const __half*>(bc.data_ptr()), int(n), int(k), b_kn,
                        out.data_ptr<float>());
  }
  return out;
}

// ---- cp.async: thread i copies 16-byte chunk i (group 1), then chunk T + i
// (group 2), each with its src_bytes[chunk], into shared memory prefilled with
// kStale (which no copy leaves behind); waits until `pending` groups remain,
// meets the block at a barrier and reads its neighbour's two chunks (thread
// (i + 1) % T) into out. Then, after a second barrier, waits for the rest,
// unless final_wait is false (an error: copies never waited for).
constexpr int kCpThreads = 64;
constexpr uint8_t kStale = 0xAB;

template <int Pending>
__global__ void cp_async_kernel(const uint8_t* src, const int64_t* src_bytes, bool final_wait,
                                uint8_t* out) {
  __shared__ __align__(16) uint8_t smem[2 * kCpThreads * 16];
  const int i = threadIdx.x;
  for (int c : {i, kCpThreads + i}) std::memset(smem + 16 * c, kStale, 16);
  __syncthreads();
  for (int c : {i, kCpThreads + i}) {
    ptx::cp_async_16(smem + 16 * c, src + 16 * c, static_cast<int>(src_bytes[c]));
    ptx::cp_async_commit();
  }
  ptx::cp_async_wait<Pending>();
  __syncthreads();
  const int next = (i + 1) % kCpThreads;
  for (int c : {next, kCpThreads + next}) std::memcpy(out + 16 * c, smem + 16 * c, 16);
  __syncthreads();  // every neighbour has read before the rest lands
  if (final_wait) ptx::cp_async_wait<0>();
}

at::Tensor cp_async(const at::Tensor& src, const at::Tensor& src_bytes, int64_t pending,
                    bool final_wait) {
  check(src.scalar_type() == at::kByte && src.numel() == 2 * kCpThreads * 16, "src: uint8 [2048]");
  check(src_bytes.scalar_type() == at::kLong && src_bytes.numel() == 2 * kCpThreads,
        "src_bytes: int64 [128]");
  check(pending >= 0 && pending <= 2, "pending: 0, 1 or 2");
  // A 16-byte aligned copy of src (a tensor's storage may start anywhere).
  at::Tensor sc = at::empty({src.numel() + 16}, src.options());
  const auto offset = (16 - reinterpret_cast<uintptr_t>(sc.data_ptr()) % 16) % 16;
  at::Tensor aligned = sc.narrow(0, static_cast<int64_t>(offset), src.numel());
  aligned.copy_(src);
  const at::Tensor bc = src_bytes.contiguous();
  at::Tensor out = at::zeros_like(src);
  auto kernel = pending == 0 ? cp_async_kernel<0> : pending == 1 ? cp_async_kernel<1>
                                                                 : cp_async_kernel<2>;
  palfast_emu::launch(kernel, dim3(1), dim3(kCpThreads), 0, aligned.data_ptr<uint8_t>(),
                      bc.data_ptr<int64_t>(), final_wait, out.data_ptr<uint8_t>());
  return out;
}

// Warp-level mma.sync m16n8k16 run so far (the emulated kernels' included).
int64_t mma_count() { return palfast_emu::rt().ptx_mmas; }

// Warp-level mma.sync m16n8k8 tf32 run so far (the emulated kernels' included).
int64_t tf32_mma_count() { return palfast_emu::rt().ptx_tf32_mmas; }

// Thread-level red_add_v2 calls so far (the emulated kernels' included).
int64_t red_v2_count() { return palfast_emu::rt().red_v2s; }

// Thread-level atomicAdd calls so far (the emulated kernels' included).
int64_t atomic_count() { return palfast_emu::rt().atomics; }

// ---- red_add_v2: each of `threads` threads adds (v[2i], v[2i + 1]) to
// out[offset + 2·(i % slots) ..], so `threads / slots` threads meet on each pair.
__global__ void red_v2_kernel(const float* v, int slots, int64_t offset, float* out) {
  const int i = threadIdx.x;
  ptx::red_add_v2(out + offset + 2 * (i % slots), v[2 * i], v[2 * i + 1]);
}

at::Tensor red_v2(const at::Tensor& v, int64_t slots, int64_t offset) {
  check(v.scalar_type() == at::kFloat && v.dim() == 2 && v.size(1) == 2 && v.size(0) <= 1024,
        "v: float32 [threads <= 1024, 2]");
  check(slots >= 1 && offset >= 0, "slots >= 1, offset >= 0");
  const at::Tensor vc = v.contiguous();
  at::Tensor out = at::zeros({offset + 2 * slots}, v.options());
  palfast_emu::launch(red_v2_kernel, dim3(1), dim3(static_cast<unsigned>(v.size(0))), 0,
                      vc.data_ptr<float>(), int(slots), offset, out.data_ptr<float>());
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(palfast_emu, m) {
  m.def("emu_ptx_ldmatrix(Tensor x, Tensor rows, bool trans, int lanes) -> Tensor", &ldmatrix);
  m.def("emu_ptx_mma(Tensor a, Tensor b, Tensor c, bool bf16, int lanes) -> Tensor", &mma);
  m.def("emu_ptx_mma_tf32(Tensor a, Tensor b, Tensor c) -> Tensor", &mma_tf32);
  m.def("emu_ptx_cvt_tf32(Tensor x) -> Tensor", &cvt_tf32);
  m.def("emu_ptx_tf32_mma_count() -> int", &tf32_mma_count);
  m.def("emu_ptx_gemm(Tensor a, Tensor b, bool b_kn) -> Tensor", &gemm);
  m.def("emu_ptx_cp_async(Tensor src, Tensor src_bytes, int pending, bool final_wait) -> Tensor",
        &cp_async);
  m.def("emu_ptx_mma_count() -> int", &mma_count);
  m.def("emu_ptx_red_v2_count() -> int", &red_v2_count);
  m.def("emu_atomic_count() -> int", &atomic_count);
  m.def("emu_ptx_red_v2(Tensor v, int slots, int offset) -> Tensor", &red_v2);
}
