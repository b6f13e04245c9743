// Test hooks of the emulator, next to the emulated palfast ops in palfast_emu.
#include <torch/library.h>

#include "cuda_emu.h"

#ifdef PALFAST_EMU_FAST_SWITCH
// palfast_emu_switch(save_sp, load_sp): pushes the System V callee-saved
// registers, saves rsp, switches to the other stack and pops its registers.
// (The kernels leave MXCSR and the x87 control word alone, so they are not saved.)
asm(R"(
  .text
  .globl palfast_emu_switch
  .type palfast_emu_switch, @function
palfast_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size palfast_emu_switch, .-palfast_emu_switch
)");
#endif

namespace {

// Seeds the scheduler: the block order and the order in which threads run.
void set_seed(int64_t seed) { palfast_emu::set_seed(static_cast<uint64_t>(seed)); }

// Fiber switches so far on this thread (tests check the emulator did run threads).
int64_t switches() { return palfast_emu::rt().switches; }

}  // namespace

TORCH_LIBRARY_FRAGMENT(palfast_emu, m) {
  m.def("emu_set_seed(int seed) -> ()", &set_seed);
  m.def("emu_switches() -> int", &switches);
}
