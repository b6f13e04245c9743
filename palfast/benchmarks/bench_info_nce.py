"""info_nce: palfast vs naive eager, torch.compile(naive), Inf-CL and pytorch-metric-learning.

Workload: SimCLR-style views graph (n images × 2 views, N = 2n rows), D = 128,
temperature 0.1, timed as a forward alone (``fwd``, under ``torch.no_grad``) and as
forward + backward (``fwd+bwd``). Implementations:

* ``palfast``: ``palfast.info_nce(z, PairGraph.from_views(n, 2), temperature=0.1)``.
  On CUDA, float32 z runs with TF32 matmuls forbidden (``torch.backends.cuda.matmul.fp32_precision
  = "ieee"``, as PyTorch's default ``allow_tf32 = False``): the logits on tensor cores in 3×TF32
  split precision, about float32's accuracy.
* ``naive_eager``, the baseline: the usual eager NT-Xent (dense N×N logits, the
  diagonal masked, cross-entropy); it skips where its N×N matrices cannot fit in memory.
* ``torch_compile_naive``: ``torch.compile(dynamic=True)`` of the same function (one
  compiled callable per process, reused by every size; its compilation falls in the
  untimed warm-up).
* ``inf_cl``: Inf-CL's ``inf_cl.cal_inf_loss`` (pip package ``inf-cl``; Triton
  kernels, CUDA only) with q = k = the normalised rows, labels = each row's other
  view and scale 1/τ. It has no diagonal mask, so its denominators also hold the
  row's own pair (e^{1/τ}): not the same loss value as NT-Xent, the same N×N logits.
  It computes in float32 (TF32 dots) whatever the input dtype.
* ``pml_SupConLoss``: pytorch-metric-learning's ``SupConLoss`` (N ≤ 8192, when installed).
* ``palfast_tf32`` (CUDA, float32): the same with TF32 matmuls allowed (``"tf32"``): plain TF32, one
  tensor-core product per logit product, tf32's accuracy (docs/cuda.md, "info_nce kernels").
* ``palfast_deterministic`` (CUDA, forward + backward): palfast under
  ``torch.use_deterministic_algorithms(True, warn_only=True)``, which takes a
  deterministic backward kernel (docs/cuda.md, "Determinism"): for 16-bit z the
  default FA2 row kernel, for float32 the row-block kernel instead of the symmetric
  one with atomics.
* ``palfast_sym``, ``palfast_tile`` (CUDA, 16-bit forward + backward): palfast with
  ``PALFAST_INFO_NCE_BACKWARD=sym`` (the FA2 symmetric backward with atomics) and
  ``=tile`` (the row-block kernel), so that the three 16-bit backward kernels are
  timed in one process (docs/cuda.md, "info_nce kernels"); no GPU has timed them yet.

TFLOP/s are effective (see ``effective_flops``): 2·N²·D for the forward, 6·N²·D for
forward + backward, as FlashAttention's benchmarks count attention, whatever the
kernel really computes. ``targets`` states the CUDA speed targets (docs/cuda.md, "What
the benchmark reports") for an H200 against the results.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

import palfast

from .harness import (
    INFO_NCE_BACKWARD_ENV,
    Case,
    Skip,
    allow_tf32,
    deterministic_algorithms,
    info_nce_backward_kernel,
)

D = 128
TAU = 0.1
FWD, FWD_BWD = "fwd", "fwd+bwd"

# Effective FLOPs per similarity entry and feature, counted from the dense algorithm as
# FlashAttention's benchmarks count attention: the forward is S = U Uᵀ (2·N²·D); the backward
# computes S again and dU = (M + Mᵀ) U (4·N²·D), 6·N²·D for forward + backward. palfast's
# symmetric kernels compute about half of S, so their effective rate is above the rate at
# which the chip really works; every implementation is counted alike, so ratios of TFLOP/s
# are ratios of times.
FLOPS_PER_ENTRY_AND_DIM = {FWD: 2, FWD_BWD: 6}
FLOP_COUNT_TEXT = {FWD: "fwd counted as 2·N²·D", FWD_BWD: "fwd+bwd counted as 6·N²·D"}

# The naive losses hold about this many N×N matrices at once (logits, the masked copy,
# log-softmax, their gradients); pytorch-metric-learning's SupConLoss about 10.
DENSE_COPIES = 6
PML_DENSE_COPIES = 10
# Share of the free memory the N×N baselines may plan to take: the rest is left to the
# allocator's rounding, the other implementations' inputs and the CUDA context.
DENSE_MEMORY_SHARE = 0.6
# Above this N the CPU baselines torch.compile and SupConLoss take tens of seconds a step.
CPU_BASELINE_MAX_N = 8192

# Inf-CL's result is checked once against the dense formula on two views of
# INF_CL_CHECK_N / 2 points (the second view = the first + VIEW_NOISE × Gaussian noise,
# cosine ≈ 0.96, so that a masked self pair moves the loss by 0.9 nats and a wrong
# positive by 9) within INF_CL_CHECK_ATOL nats: ample room for TF32 dots (operands
# rounded to TF32 on the CPU moved this loss by 2e-6).
INF_CL_CHECK_N = 256
VIEW_NOISE = 0.3
INF_CL_CHECK_ATOL = 0.05


def effective_flops(N: int, d: int, step: str) -> float:
    """Effective FLOPs of one ``step`` ("fwd" or "fwd+bwd") of InfoNCE on N rows of d
    features: 2·N²·d forward, 6·N²·d forward + backward (FLOPS_PER_ENTRY_AND_DIM)."""
    return FLOPS_PER_ENTRY_AND_DIM[step] * N * N * d


def _other_view(N: int, device) -> torch.Tensor:
    """Row i's positive in the two-view layout z = cat([view_0, view_1]): i ± N/2."""
    return (torch.arange(N, device=device) + N // 2) % N


def _naive_nt_xent(z: torch.Tensor) -> torch.Tensor:
    u = F.normalize(z, dim=1)
    s = u @ u.T / TAU
    s = s.masked_fill(torch.eye(z.shape[0], dtype=torch.bool, device=z.device), float("-inf"))
    return F.cross_entropy(s, _other_view(z.shape[0], z.device))


@functools.cache
def _compiled_nt_xent():
    # One compiled callable for every case, with symbolic sizes: it compiles once per dtype
    # and grad mode instead of once per size too, which leaves a GPU session's few minutes
    # to the timing.
    return torch.compile(_naive_nt_xent, dynamic=True)


def _free_bytes(device: str) -> int:
    if device.startswith("cuda"):
        return torch.cuda.mem_get_info()[0]
    with open("/proc/meminfo") as f:
        info = dict(line.split(":", 1) for line in f)
    return int(info["MemAvailable"].split()[0]) * 1024


def _dense_guard(N: int, device: str, dtype: torch.dtype, copies: int = DENSE_COPIES) -> None:
    need = copies * N * N * dtype.itemsize
    if need > DENSE_MEMORY_SHARE * _free_bytes(device):
        raise Skip(
            f"its N×N matrices need ~{need / 2**30:.0f} GiB, more than {DENSE_MEMORY_SHARE:.0%} of the free memory"
        )


def _inputs(N: int, device: str, dtype: torch.dtype, grad: bool):
    gen = torch.Generator(device=device).manual_seed(N)
    return torch.randn(N, D, device=device, dtype=dtype, generator=gen).requires_grad_(grad)


def _step(loss_fn, z, step: str):
    """One run of ``step``: the loss under no_grad (fwd), or the loss and its backward."""
    if step == FWD:

        def forward():
            with torch.no_grad():
                return loss_fn(z)

        return forward

    def forward_backward():
        z.grad = None
        loss_fn(z).backward()

    return forward_backward


def _inside(run, context):
    """``run`` with each call inside ``context()``, a fresh context manager per call that
    restores the caller's setting after it (the other implementations run outside it):
    deterministic mode, PALFAST_INFO_NCE_BACKWARD, or the TF32 flag."""

    def run_inside():
        with context():
            return run()

    return run_inside


def _import_inf_cl():
    try:
        import inf_cl
    except ImportError as e:  # also when its Triton is missing
        raise Skip(
            f"inf_cl cannot be imported ({e}); pip install inf-cl, or carry its wheel "
            "to the GPU machine (docs/cuda.md, 'On a GPU')"
        ) from e
    return inf_cl


def _inf_cl_loss(inf_cl, device: str):
    """InfoNCE over the views graph through ``inf_cl.cal_inf_loss`` (module docstring)."""
    scale = torch.tensor(1 / TAU, device=device)  # its logit scale: a tensor, as in CLIP

    def loss(x: torch.Tensor) -> torch.Tensor:
        u = F.normalize(x, dim=1)
        return inf_cl.cal_inf_loss(u, u, labels=_other_view(x.shape[0], x.device), scale=scale, head_dim=x.shape[1])

    return loss


@functools.cache
def _inf_cl_mismatch(device: str) -> str | None:
    """None when Inf-CL computes mean_i(lse_k(s_ik) − s_i,p(i)) with its self pair in the
    denominator, as the module docstring says; otherwise what differs."""
    inf_cl = _import_inf_cl()
    gen = torch.Generator(device).manual_seed(0)
    x = torch.randn(INF_CL_CHECK_N // 2, D, device=device, generator=gen)
    z = torch.cat([x, x + VIEW_NOISE * torch.randn(x.shape, device=device, generator=gen)])
    got = float(_inf_cl_loss(inf_cl, device)(z))
    u = F.normalize(z.double(), dim=1)
    s = u @ u.T / TAU
    want = float((torch.logsumexp(s, 1) - s.gather(1, _other_view(len(z), device)[:, None])[:, 0]).mean())
    if abs(got - want) > INF_CL_CHECK_ATOL:
        return (
            f"inf_cl.cal_inf_loss gave {got:.5f} where the dense formula with the self pair "
            f"gives {want:.5f} at N={INF_CL_CHECK_N}: its API may have changed; not timed"
        )
    return None


def _plan(quick: bool, device: str) -> list[tuple[int, torch.dtype, str]]:
    """(N, dtype, step) of every case."""
    if device.startswith("cuda"):
        if quick:
            return [(4096, torch.bfloat16, FWD_BWD), (4096, torch.bfloat16, FWD)]
        # The CUDA speed targets first (N = 65536: bf16 forward, forward + backward, and fp32
        # forward + backward against the bf16 time), so that a session stopped by its time
        # limit has them; then the sizes whose grids must fill the GPU.
        return [
            (65536, torch.bfloat16, FWD_BWD),
            (65536, torch.bfloat16, FWD),
            (65536, torch.float32, FWD_BWD),
            (65536, torch.float32, FWD),
            (16384, torch.bfloat16, FWD_BWD),
            (16384, torch.bfloat16, FWD),
            (4096, torch.bfloat16, FWD_BWD),
            (4096, torch.bfloat16, FWD),
        ]
    if quick:
        return [(1024, torch.float32, FWD), (1024, torch.float32, FWD_BWD), (4096, torch.float32, FWD_BWD)]
    return [(N, torch.float32, step) for N in (1024, 4096, 8192, 16384, 65536) for step in (FWD_BWD, FWD)]


def cases(quick: bool = False, device: str = "cpu") -> list[Case]:
    cuda = device.startswith("cuda")
    out = []
    for N, dtype, step in _plan(quick, device):
        grad = step == FWD_BWD

        def make_palfast(N=N, dtype=dtype, step=step, grad=grad, tf32=False):
            z = _inputs(N, device, dtype, grad)
            g = palfast.PairGraph.from_views(N // 2, 2, device=device)
            run = _step(lambda x: palfast.info_nce(x, g, temperature=TAU), z, step)
            return _inside(run, functools.partial(allow_tf32, tf32)) if cuda and dtype == torch.float32 else run

        def make_palfast_tf32(N=N, dtype=dtype, step=step, grad=grad):
            if not cuda or dtype != torch.float32:
                raise Skip("allow_tf32 changes only the CUDA kernels of float32 z")
            return make_palfast(N, dtype, step, grad, tf32=True)

        def make_palfast_deterministic(N=N, dtype=dtype, step=step, grad=grad):
            if not cuda or not grad:
                raise Skip("deterministic mode changes only the CUDA backward kernel")
            return _inside(
                make_palfast(N, dtype, step, grad), functools.partial(deterministic_algorithms, warn_only=True)
            )

        def make_palfast_kernel(kernel, N=N, dtype=dtype, step=step, grad=grad):
            if not cuda or not grad:
                raise Skip(f"{INFO_NCE_BACKWARD_ENV} changes only the CUDA backward kernel")
            if dtype == torch.float32:
                raise Skip(f"for float32, {kernel!r} is the kernel of palfast or of palfast_deterministic")
            return _inside(make_palfast(N, dtype, step, grad), functools.partial(info_nce_backward_kernel, kernel))

        def make_naive(N=N, dtype=dtype, step=step, grad=grad):
            _dense_guard(N, device, dtype)
            return _step(_naive_nt_xent, _inputs(N, device, dtype, grad), step)

        def make_compiled(N=N, dtype=dtype, step=step, grad=grad):
            _dense_guard(N, device, dtype)
            if not cuda and N > CPU_BASELINE_MAX_N:
                raise Skip(f"skipped above N={CPU_BASELINE_MAX_N} on the CPU to keep the benchmark short")
            return _step(_compiled_nt_xent(), _inputs(N, device, dtype, grad), step)

        def make_inf_cl(N=N, dtype=dtype, step=step, grad=grad):
            if not cuda:
                raise Skip("Inf-CL's kernels are written in Triton for CUDA GPUs")
            inf_cl = _import_inf_cl()
            mismatch = _inf_cl_mismatch(device)
            if mismatch:
                raise Skip(mismatch)
            return _step(_inf_cl_loss(inf_cl, device), _inputs(N, device, dtype, grad), step)

        def make_pml(N=N, dtype=dtype, step=step, grad=grad):
            _dense_guard(N, device, dtype, copies=PML_DENSE_COPIES)
            if N > CPU_BASELINE_MAX_N:
                raise Skip(
                    f"skipped above N={CPU_BASELINE_MAX_N} to keep the benchmark short (~20 s a step on the CPU)"
                )
            try:
                from pytorch_metric_learning.losses import SupConLoss
            except ImportError as e:
                raise Skip("pytorch-metric-learning is not installed") from e
            labels = torch.arange(N // 2, device=device).repeat(2)
            loss = SupConLoss(temperature=TAU)
            return _step(lambda x: loss(x, labels), _inputs(N, device, dtype, grad), step)

        impls = {"palfast": make_palfast, "naive_eager": make_naive}
        if cuda:
            impls["palfast_tf32"] = make_palfast_tf32
        if cuda and grad:
            impls["palfast_deterministic"] = make_palfast_deterministic
            impls["palfast_sym"] = functools.partial(make_palfast_kernel, "sym")
            impls["palfast_tile"] = functools.partial(make_palfast_kernel, "tile")
        if not quick:
            impls["torch_compile_naive"] = make_compiled
            impls["inf_cl"] = make_inf_cl
            impls["pml_SupConLoss"] = make_pml
        name = str(dtype).removeprefix("torch.")
        out.append(
            Case(
                "bench_info_nce",
                f"info_nce N={N} D={D} {name} {step}",
                {"N": N, "D": D, "dtype": name, "step": step, "flop_count": FLOP_COUNT_TEXT[step]},
                impls,
                "naive_eager",
                device,
                compare_to=(
                    "torch_compile_naive",
                    "inf_cl",
                    "palfast_tf32",
                    "palfast_deterministic",
                    "palfast_sym",
                    "palfast_tile",
                ),
                flops=effective_flops(N, D, step),
            )
        )
    return out


# The CUDA speed targets (docs/cuda.md, "What the benchmark reports"), for one H200 at
# D = 128, normalize=True, the views graph.
TARGET_N = 65536
FORWARD_MS = 2.0  # bf16 forward
STEP_MS = 6.0  # bf16 forward + backward (about 550 effective TFLOP/s)
FP32_OVER_BF16 = 4.0  # fp32 forward + backward against the bf16 one
GRID_NS = (4096, 16384)  # sizes at which every heavy palfast kernel must fill the GPU:
BLOCKS_PER_SM = 2  # at least this many blocks per SM
HEAVY_KERNEL_SHARE = 0.1  # "heavy": at least this share of the step's kernel time
# palfast's kernels, by the namespace in their names (csrc/cuda/); torch's own launches in
# the step (a loss mean, a fill) are not the grids the target is about.
OWN_KERNEL_NAME = "palfast::"
# Memory O(N·D): 4× the rows (MEMORY_NS) may cost at most this factor in peak memory
# (linear growth gives 4, an N×N buffer 16).
MEMORY_NS = (16384, 65536)
MEMORY_GROWTH_4X_ROWS = 8.0


def targets(rows: list[dict], env: dict) -> list[dict]:
    """The CUDA speed targets judged on palfast's rows: each a dict with ``target`` (text),
    ``value``, ``unit``, ``limit`` and ``status``: "met", "missed" or "unmeasured (why)"."""
    on_gpu = env.get("device", "cpu").startswith("cuda")

    def row(N, dtype, step):  # the targets are a GPU's: CPU rows answer none of them
        return next(
            (
                r
                for r in rows
                if on_gpu
                and r["impl"] == "palfast"
                and r["N"] == N
                and r["dtype"] == dtype
                and r["step"] == step
                and r.get("busy_processes", 0) == 0
            ),
            None,
        )

    def judge(text, unit, limit, value, why_not, at_most=True):
        if value is None:
            status = f"unmeasured ({why_not})"
        else:
            status = "met" if (value <= limit if at_most else value >= limit) else "missed"
        return {"target": text, "value": value, "unit": unit, "limit": limit, "status": status}

    def ms(r):
        return 1e3 * r["median_s"] if r and r.get("status") == "ok" else None

    def why(*needed):
        if not on_gpu:
            return "no GPU"
        missing = [
            f"N={N} {dtype} {step}"
            for N, dtype, step in needed
            if not (row(N, dtype, step) or {}).get("status") == "ok"
        ]
        return "palfast not timed at " + ", ".join(missing)

    bf16_fwd, bf16_step = (TARGET_N, "bfloat16", FWD), (TARGET_N, "bfloat16", FWD_BWD)
    fp32_step = (TARGET_N, "float32", FWD_BWD)
    out = [
        judge(
            f"forward <= {FORWARD_MS:g} ms at N={TARGET_N} bf16", "ms", FORWARD_MS, ms(row(*bf16_fwd)), why(bf16_fwd)
        ),
        judge(
            f"forward+backward <= {STEP_MS:g} ms at N={TARGET_N} bf16",
            "ms",
            STEP_MS,
            ms(row(*bf16_step)),
            why(bf16_step),
        ),
    ]
    fp32, bf16 = ms(row(*fp32_step)), ms(row(*bf16_step))
    out.append(
        judge(
            f"fp32 forward+backward <= {FP32_OVER_BF16:g}x bf16 at N={TARGET_N}",
            "x",
            FP32_OVER_BF16,
            fp32 / bf16 if fp32 and bf16 else None,
            why(fp32_step, bf16_step),
        )
    )
    sm_count = env.get("sm_count")
    for N in GRID_NS:
        for step in (FWD, FWD_BWD):
            r = row(N, "bfloat16", step)
            heavy = [
                k
                for k in (r or {}).get("kernels") or []
                if OWN_KERNEL_NAME in k["name"] and (k.get("share") or 0) >= HEAVY_KERNEL_SHARE and k.get("min_blocks")
            ]
            reason = why((N, "bfloat16", step))
            if r and r.get("status") == "ok" and not heavy:
                reason = r.get("kernels_status", "no palfast kernel in the records")
            out.append(
                judge(
                    f"{step} heavy kernels >= {BLOCKS_PER_SM} x SMs blocks at N={N} bf16",
                    "blocks",
                    BLOCKS_PER_SM * sm_count if sm_count else None,
                    min(k["min_blocks"] for k in heavy) if heavy and sm_count else None,
                    reason,
                    at_most=False,
                )
            )
            out[-1]["kernels"] = [{key: k[key] for key in ("name", "min_blocks", "share")} for k in heavy]
    mem_rows = [row(N, "bfloat16", FWD_BWD) for N in MEMORY_NS]
    peaks = [(r or {}).get("peak_mib") for r in mem_rows]
    reason = why(*((N, "bfloat16", FWD_BWD) for N in MEMORY_NS))
    if all(r and r.get("status") == "ok" for r in mem_rows):
        reason = "peak memory not measured"
    out.append(
        judge(
            f"peak memory at N={MEMORY_NS[1]} <= {MEMORY_GROWTH_4X_ROWS:g}x N={MEMORY_NS[0]} (bf16 fwd+bwd; O(N·D))",
            "x",
            MEMORY_GROWTH_4X_ROWS,
            peaks[1] / peaks[0] if all(peaks) else None,
            reason,
        )
    )
    return out
