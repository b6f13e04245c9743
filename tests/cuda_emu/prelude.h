// Force-included (g++ -include) before each csrc file of the emulated build:
// the CUDA stand-ins, and palfast's registrations moved to the test-only
// namespace palfast_emu on the CPU dispatch key, so the emulated kernels take
// CPU tensors and never clash with the real palfast ops loaded beside them.
// Also the precompiled header of the build (build.py): ATen.h, which every
// file includes, is most of the compile time.
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include "cuda_emu.h"

#define PALFAST_EMU 1

#undef TORCH_LIBRARY
#undef TORCH_LIBRARY_FRAGMENT
#undef TORCH_LIBRARY_IMPL
#define TORCH_LIBRARY(ns, m) _TORCH_LIBRARY_FRAGMENT(palfast_emu, m, C10_UID)
#define TORCH_LIBRARY_FRAGMENT(ns, m) _TORCH_LIBRARY_FRAGMENT(palfast_emu, m, C10_UID)
#define TORCH_LIBRARY_IMPL(ns, k, m) _TORCH_LIBRARY_IMPL(palfast_emu, CPU, m, C10_UID)
