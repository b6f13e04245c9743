// Test kernels for the emulator's dynamic shared memory (cuda_emu.h, "Shared
// memory"), registered in palfast_emu for tests/cuda_emu/test_dynamic_smem.py:
// kernels that declare `extern __shared__` as CUDA code does, launched with a
// dynamic size, after cudaFuncSetAttribute where they use more than 48 KB.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "cuda_emu.h"

namespace {

void check(bool ok, const std::string& what) {
  TORCH_CHECK(ok, "palfast_emu dynamic shared memory test op: ", what);
}

constexpr int kThreads = 256;
constexpr int kNoProbe = -1;

// The kernel's dynamic shared memory limit for this test: `max_dynamic` bytes
// through cudaFuncSetAttribute, or (max_dynamic < 0) none set, as for a kernel
// that was never opted in (an emulator-only reset: each test starts afresh).
template <typename K>
void set_limit(K kernel, int64_t max_dynamic) {
  if (max_dynamic < 0) {
    palfast_emu::KernelAttributes& a = palfast_emu::kernel_attributes();
    std::lock_guard<std::mutex> lock(a.mu);
    a.max_dynamic.erase(reinterpret_cast<const void*>(kernel));
    return;
  }
  const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                               static_cast<int>(max_dynamic));
  TORCH_CHECK(err == cudaSuccess, "cudaFuncSetAttribute(MaxDynamicSharedMemorySize, ",
              max_dynamic, "): ", cudaGetErrorString(err));
}

// ---- tile transpose: block b transposes x[b] ([rows, cols] fp32) into out[b]
// ([cols, rows]) through a rows·cols·4-byte tile of dynamic shared memory.
// Planted bugs: barrier = false leaves out the __syncthreads between the tile's
// writes and its transposed reads; probe ≥ 0 makes thread 0 of every block read
// (or, with probe_write, write) tile element rows·cols + probe, past the end.
__global__ void transpose_kernel(const float* x, int rows, int cols, bool barrier, int probe,
                                 bool probe_write, float* out) {
  extern __shared__ __align__(16) unsigned char smem[];
  float* tile = reinterpret_cast<float*>(smem);
  const int n = rows * cols;
  const float* src = x + static_cast<int64_t>(blockIdx.x) * n;
  float* dst = out + static_cast<int64_t>(blockIdx.x) * n;
  for (int e = threadIdx.x; e < n; e += blockDim.x) tile[e] = src[e];
  if (barrier) __syncthreads();
  for (int e = threadIdx.x; e < n; e += blockDim.x) {
    const int c = e / rows, r = e % rows;  // out[c, r] = x[r, c]
    dst[e] = tile[r * cols + c];
  }
  if (probe != kNoProbe && threadIdx.x == 0) {
    if (probe_write) tile[n + probe] = 1.0f;
    else dst[0] = tile[n + probe];
  }
}

at::Tensor transpose(const at::Tensor& x, int64_t max_dynamic, bool barrier, int64_t probe,
                     bool probe_write) {
  check(x.scalar_type() == at::kFloat && x.dim() == 3, "x must be float32 [blocks, rows, cols]");
  const at::Tensor xc = x.contiguous();
  at::Tensor out = at::empty({x.size(0), x.size(2), x.size(1)}, x.options());
  set_limit(transpose_kernel, max_dynamic);
  const size_t bytes = static_cast<size_t>(x.size(1) * x.size(2)) * sizeof(float);
  palfast_emu::launch(transpose_kernel, dim3(static_cast<unsigned>(x.size(0))), dim3(kThreads),
                      bytes, xc.data_ptr<float>(), int(x.size(1)), int(x.size(2)), barrier,
                      int(probe), probe_write, out.data_ptr<float>());
  return out;
}

// ---- block sums beside a 16 KB static array: block b stages its chunk of x
// (dynamic_bytes / 4 floats) in dynamic shared memory, each thread sums a
// strided slice of it into the static partials, and thread 0 adds those up.
constexpr int kStaticFloats = 4096;  // 16 KB of static shared memory (the partials use 256)

__global__ void block_sum_kernel(const float* x, int chunk, float* out) {
  __shared__ float partial[kStaticFloats];
  extern __shared__ float staged[];
  const float* src = x + static_cast<int64_t>(blockIdx.x) * chunk;
  for (int e = threadIdx.x; e < chunk; e += blockDim.x) staged[e] = src[e];
  __syncthreads();
  float s = 0.0f;
  for (int e = threadIdx.x; e < chunk; e += blockDim.x) s += staged[e];
  partial[threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.x == 0) {
    float total = 0.0f;
    for (int t = 0; t < static_cast<int>(blockDim.x); ++t) total += partial[t];
    out[blockIdx.x] = total;
  }
}

at::Tensor block_sum(const at::Tensor& x, int64_t max_dynamic) {
  check(x.scalar_type() == at::kFloat && x.dim() == 2, "x must be float32 [blocks, chunk]");
  const at::Tensor xc = x.contiguous();
  at::Tensor out = at::empty({x.size(0)}, x.options());
  set_limit(block_sum_kernel, max_dynamic);
  palfast_emu::launch(block_sum_kernel, dim3(static_cast<unsigned>(x.size(0))), dim3(kThreads),
                      static_cast<size_t>(x.size(1)) * sizeof(float), xc.data_ptr<float>(),
                      int(x.size(1)), out.data_ptr<float>());
  return out;
}

// ---- what a block finds in its dynamic shared memory before writing it, and
// where it lies: out[b] = (first 32-bit word, address mod 256) for block b;
// then it writes that word, which the next block must not see.
constexpr uintptr_t kAddressModulus = 256;

template <int Align>
__global__ void first_look_kernel(int64_t* out) {
  extern __shared__ __align__(Align) unsigned char raw[];
  if (threadIdx.x != 0) return;
  uint32_t word;
  std::memcpy(&word, raw, sizeof word);
  out[2 * blockIdx.x] = word;
  out[2 * blockIdx.x + 1] = static_cast<int64_t>(reinterpret_cast<uintptr_t>(raw) % kAddressModulus);
  std::memset(raw, 0, sizeof word);
}

at::Tensor first_look(int64_t blocks, int64_t align, int64_t bytes) {
  check(align == 16 || align == 128, "align must be 16 or 128");
  at::Tensor out = at::zeros({blocks, 2}, at::kLong);
  auto kernel = align == 16 ? first_look_kernel<16> : first_look_kernel<128>;
  set_limit(kernel, -1);
  palfast_emu::launch(kernel, dim3(static_cast<unsigned>(blocks)), dim3(kThreads),
                      static_cast<size_t>(bytes), out.data_ptr<int64_t>());
  return out;
}

// The opt-in maximum of the emulated device: 90 (sm_90, the default) or 80.
void set_smem_arch(int64_t sm) {
  check(sm == 80 || sm == 90, "sm must be 80 or 90");
  palfast_emu::smem_optin() = sm == 80 ? palfast_emu::kSmemOptinSm80 : palfast_emu::kSmemOptinSm90;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(palfast_emu, m) {
  m.def("emu_dsmem_transpose(Tensor x, int max_dynamic, bool barrier, int probe, bool probe_write)"
        " -> Tensor",
        &transpose);
  m.def("emu_dsmem_block_sum(Tensor x, int max_dynamic) -> Tensor", &block_sum);
  m.def("emu_dsmem_first_look(int blocks, int align, int bytes) -> Tensor", &first_look);
  m.def("emu_set_smem_arch(int sm) -> ()", &set_smem_arch);
}
