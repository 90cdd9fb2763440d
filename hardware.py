"""What this machine can do: the device, the precision rule, and the GPU table (memory and dense peak) that
train.py, bench.py and plan.py share.

    precision auto:  CUDA  -> bf16 on compute capability >= 8.0 (Ampere and later), else fp16 + loss scaling
                     CPU   -> bf16 where the CPU has BF16 instructions (AMX, AVX512-BF16, Arm BF16) and a timed
                              matmul at the model's width runs BF16 at least 1.2x faster than FP32; else fp32
                     MPS   -> fp32
    compile auto:    CUDA on, MPS off; CPU on where the run wins the compile back (resolve_compile)
Each choice's reason goes in the start-up banner; an explicit choice is obeyed, with a warning where it is slow.
"""
import functools
import os
import platform
import subprocess
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist

import kernel

try:
    import resource
except ImportError:  # Windows: no getrusage (see peak_memory_gb)
    resource = None


class HardwareError(ValueError):
    """The requested device or precision cannot run here, with a message meant for the user."""


@dataclass(frozen=True)
class GPU:
    name: str  # a substring of torch.cuda.get_device_name(); the table is searched in order, specific names first
    memory_gib: int
    peak_tflops: float  # dense tensor-core peak at the precision auto picks there (BF16, or FP16 before Ampere)
    fp32_tflops: float  # dense peak of FP32 matmuls: TF32 tensor cores from Ampere on (train.py allows TF32)


# Dense peaks from the vendors' data sheets (TF32 is half of BF16 on every Ampere and Hopper part here; V100 and T4
# have no TF32, so FP32 runs on their CUDA cores). Device names do not always say SXM vs PCIe: bench.py's
# --peak-tflops and plan.py's --gpu override. NVL cards (two linked PCIe boards) come before their SXM namesakes.
GPUS = {"h100-pcie": GPU("H100 PCIe", 80, 756, 378), "h800-pcie": GPU("H800 PCIe", 80, 756, 378),
        "h100-nvl": GPU("H100 NVL", 94, 835, 418), "h200-nvl": GPU("H200 NVL", 141, 835, 418),
        "h100": GPU("H100", 80, 989, 495), "h800": GPU("H800", 80, 989, 495), "h200": GPU("H200", 141, 989, 495),
        "a100-40gb": GPU("A100-SXM4-40GB", 40, 312, 156), "a100-pcie-40gb": GPU("A100-PCIE-40GB", 40, 312, 156),
        "a100": GPU("A100", 80, 312, 156), "l4": GPU("L4", 24, 121, 60), "a10": GPU("A10", 24, 125, 62.5),
        "v100": GPU("V100", 32, 125, 15.7), "t4": GPU("T4", 16, 65, 8.1)}


def gpu_spec(device: torch.device) -> GPU | None:
    """This CUDA device's row of GPUS, matched by name; None off CUDA or for a GPU not in the table."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((g for g in GPUS.values() if g.name in name), None)


def peak_flops(device: torch.device, dtype: torch.dtype = torch.bfloat16) -> float | None:
    """Dense FLOP/s of `device` for MFU with matmuls in `dtype` (FP32: TF32 or CUDA cores; BF16, FP16 and FP8
    runs count against the BF16/FP16 peak), or None where unknown (CPUs, GPUs not in the table)."""
    if (spec := gpu_spec(device)) is None:
        return None
    return (spec.fp32_tflops if dtype == torch.float32 else spec.peak_tflops) * 1e12


def pick_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """auto: CUDA when available, else CPU (MPS only when asked for: see README). Raises HardwareError."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise HardwareError("train.device is cuda but no CUDA device is available")
    if name == "mps" and not torch.backends.mps.is_available():
        raise HardwareError("train.device is mps but MPS is not available")
    return torch.device(name, local_rank) if name == "cuda" else torch.device(name)


def cpu_flags() -> set[str]:
    """This CPU's feature flags as the OS names them (Linux: /proc/cpuinfo's `flags` on x86, `Features` on Arm;
    macOS: the `hw.optional.arm.FEAT_BF16` sysctl as "bf16"); elsewhere (Windows) the x86 BF16 flags from torch's
    own CPUID checks; empty where it cannot tell."""
    if sys.platform == "darwin":
        try:
            out = subprocess.run(["sysctl", "-n", "hw.optional.arm.FEAT_BF16"], capture_output=True, text=True,
                                 timeout=5).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return set()
        return {"bf16"} if out == "1" else set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return set(value.split())
    except OSError:
        pass
    checks = (("amx_bf16", "_is_amx_tile_supported"), ("avx512_bf16", "_is_avx512_bf16_supported"))
    return {flag for flag, check in checks if getattr(torch.cpu, check, lambda: False)()}


def cpu_bf16_instructions() -> tuple[bool, str]:
    """(whether this CPU has instructions that compute BF16 matmuls natively, a label for the banner). x86:
    AMX-BF16 or AVX512-BF16; Arm: the BF16 extension. oneDNN's "BF16 supported" is no such signal: it is also
    true where BF16 runs converted in software on plain AVX-512, several times slower than FP32."""
    flags = cpu_flags()
    for flag, label in (("amx_bf16", "AMX"), ("avx512_bf16", "AVX512-BF16"), ("bf16", "Arm BF16")):
        if flag in flags:
            return True, label
    if "avx512f" in flags:
        return False, "AVX-512 without AVX512-BF16"
    if "avx2" in flags:
        return False, "AVX2 without BF16 instructions"
    return False, f"{platform.machine() or 'this CPU'} without BF16 instructions"


@functools.cache
def matmul_rate(dtype: torch.dtype, width: int) -> float:
    """FLOP/s of a (512, w) @ (w, w) matmul in `dtype` on one thread, w the model's width clamped to [256, 1024]:
    the shortest call within ~40 ms after a warm-up one, so that another busy process cannot make a dtype look slow."""
    w = min(max(width, 256), 1024)
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(512, w, generator=gen).to(dtype), torch.randn(w, w, generator=gen).to(dtype)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a multi-threaded kernel waits for its slowest thread on a busy machine
    try:
        t0 = time.perf_counter()
        a @ b
        best, deadline = time.perf_counter() - t0, time.perf_counter() + 0.04
        if best <= 0.04:
            best = float("inf")
            while t0 < deadline:
                t0 = time.perf_counter()
                a @ b
                best = min(best, time.perf_counter() - t0)
        return 2 * 512 * w * w / best
    finally:
        torch.set_num_threads(threads)


@functools.cache
def matmul_speedup(dtype: torch.dtype = torch.bfloat16, width: int = 256) -> float:
    """How many times faster a CPU matmul runs in `dtype` than in FP32 here (`matmul_rate` at the model's width).
    Wider shapes are timed only where w=256 is not far behind (a CPU converting BF16 in software already is)."""
    r = matmul_rate(dtype, 256) / matmul_rate(torch.float32, 256)
    return r if r < 0.6 or width <= 256 else matmul_rate(dtype, width) / matmul_rate(torch.float32, width)


BF16_MIN_SPEEDUP = 1.2  # below this a CPU run stays FP32: BF16's rounding is not worth a small gain


def memory_gib(device: torch.device) -> float:
    """The memory a run on `device` plans against: the GPU's; for a CPU (MPS shares it) the machine's RAM, or the
    container's limit where lower, shared by the processes torchrun started on this machine."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory / 2**30
    ram = 16 * 2**30  # Windows: no sysconf; a laptop's worth
    if hasattr(os, "sysconf") and "SC_PHYS_PAGES" in os.sysconf_names:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for limit in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):  # cgroup v2, v1
        try:
            ram = min(ram, int(open(limit).read().strip()))
        except (OSError, ValueError):  # absent, or "max"
            pass
    return ram / int(os.environ.get("LOCAL_WORLD_SIZE", "1")) / 2**30


@dataclass(frozen=True)
class Precision:
    """The precision a run uses: fp32, bf16, fp16 or fp8 (BF16 autocast plus FP8 Linear layers)."""
    name: str
    reason: str  # for the banner: why this one here
    warning: str | None = None  # an explicit choice that will run slowly here
    speedup: float | None = None  # CPU: BF16 (FP16 for fp16) matmul rate / FP32's, as measured at start-up
    compile_reason: str = ""  # for the banner: train.compile as resolved and why (resolve, from resolve_compile)

    @property
    def dtype(self) -> torch.dtype:
        """The matmul dtype under autocast (FP32 when there is no autocast)."""
        return {"fp32": torch.float32, "fp16": torch.float16}.get(self.name, torch.bfloat16)

    @property
    def scaled(self) -> bool:
        """Whether the loss needs dynamic scaling (FP16's small exponent range)."""
        return self.name == "fp16"

    def autocast(self, device: torch.device):
        return nullcontext() if self.name == "fp32" else torch.autocast(device.type, dtype=self.dtype)


def resolve_precision(requested: str, device: torch.device, width: int = 256) -> Precision:
    """`requested` (auto | fp32 | bf16 | fp16 | fp8) -> the Precision for `device` and a model of width `width`, by
    the module docstring's rule. Raises HardwareError for a choice the device cannot run at all."""
    if device.type == "cuda":
        cap = torch.cuda.get_device_capability(device)
        gpu = f"{torch.cuda.get_device_name(device)}, compute capability {cap[0]}.{cap[1]}"
        bf16 = cap >= (8, 0)
        if requested == "auto":
            if bf16:
                return Precision("bf16", f"this GPU has BF16 tensor cores ({gpu})")
            return Precision("fp16", f"this GPU has no BF16 ({gpu}): FP16 with dynamic loss scaling")
        if requested in ("bf16", "fp8") and not bf16:
            raise HardwareError(f"train.precision={requested}: this GPU has no BF16 ({gpu}); use "
                                f"train.precision=fp16 (or auto)")
        return Precision(requested, "as configured")
    if device.type == "mps":
        if requested == "auto":
            return Precision("fp32", "on Apple MPS autocast is not measured by this project; FP32 always works "
                                     "(train.precision=bf16 or fp16 to try them)")
        if requested == "fp8":
            raise HardwareError("train.precision=fp8 needs a CUDA GPU of compute capability >= 8.9")
        return Precision(requested, "as configured")
    if requested in ("fp32", "fp8"):  # fp8 is refused later, with torchao's reason (kernel.float8_supported)
        return Precision(requested, "as configured")
    native, label = cpu_bf16_instructions()
    half = torch.float16 if requested == "fp16" else torch.bfloat16
    speedup = matmul_speedup(half, width)
    measured = f"{'FP16' if half == torch.float16 else 'BF16'} matmul {speedup:.2f}x FP32 here ({label})"
    if requested == "auto":
        if native and speedup >= BF16_MIN_SPEEDUP:
            return Precision("bf16", measured, speedup=speedup)
        return Precision("fp32", measured if not native else f"{measured}, under {BF16_MIN_SPEEDUP}x", speedup=speedup)
    warning = None
    if speedup < BF16_MIN_SPEEDUP:
        auto = "bf16" if native and matmul_speedup(torch.bfloat16, width) >= BF16_MIN_SPEEDUP else "fp32"
        warning = (f"train.precision={requested} on this CPU: {measured}, so this run is slower than it could be; "
                   f"train.precision=auto picks {auto} here")
    return Precision(requested, f"as configured ({measured})", warning, speedup)


def describe(p: Precision) -> str:
    """The banner's lines for what was decided here: 'precision bf16: BF16 matmul 2.30x FP32 here (AVX512-BF16)' and,
    where resolve decided compile too, 'compile auto: off (...)'."""
    return f"precision {p.name}: {p.reason}" + (f"\ncompile {p.compile_reason}" if p.compile_reason else "")


def resolve(t, local_rank: int, model) -> tuple[torch.device, Precision, bool]:
    """train.device, train.precision and train.compile here for `model` (a GPTConfig, vocab_size maybe None) ->
    (device, Precision carrying compile's reason, compile); under torchrun on CPUs rank 0's probes decide for all.
    Raises HardwareError."""
    device = pick_device(t.device, local_rank)

    def decide() -> tuple[Precision, bool]:
        precision = resolve_precision(t.precision, device, model.n_embd)
        timed = device.type == "cpu" and t.compile == "auto"  # only there does the decision need the estimates
        compiled, why = resolve_compile(t.compile, device, t.max_steps, 60 * t.max_minutes,
                                        eager_step_s(model, t, precision.dtype) if timed else 0.0,
                                        cpu_compile_gain(precision.name) if timed else None)
        return replace(precision, compile_reason=why), compiled
    if device.type == "cpu" and dist.is_initialized():  # rank 0 times the probes while the others wait
        shared = [decide() if dist.get_rank() == 0 else None]
        dist.broadcast_object_list(shared, src=0)
        precision, compiled = shared[0]
    else:
        precision, compiled = decide()
    if precision.name == "fp8" and (why := kernel.float8_supported(device)):
        raise HardwareError(f"train.precision=fp8: {why}")
    return device, precision, compiled


# torch.compile on the tiny config (BENCHMARKS.md, "Compile on CPUs"): (cpu_bf16_instructions label, precision,
# threads per process) -> (the share of an eager step's time a compiled step saves, the cold compile's seconds, the
# banner's source); an unmeasured CPU gets the least gain and most cost of any row: it compiles where every row would
CPU_COMPILE = {("AVX512-BF16", "bf16", 2): (0.24, 45, "measured on AMD Zen 4, BF16, 2 threads"),
               ("AVX512-BF16", "bf16", 1): (0.11, 57, "measured on AMD Zen 4, BF16, 1 thread"),
               ("AVX512-BF16", "fp32", 2): (0.10, 45, "measured on AMD Zen 4, FP32, 2 threads"),
               ("AVX512-BF16", "fp32", 1): (0.02, 42, "measured on AMD Zen 4, FP32, 1 thread"),
               ("AVX2 without BF16 instructions", "fp32", 2): (0.09, 60, "measured on an AVX2 EPYC, FP32, 2 threads")}
CPU_COMPILE_UNMEASURED = (0.02, 60, "not measured here: the least gain and most cost of any measured row")
# An eager step's FLOP rate / (threads x matmul_rate), the highest measured (BENCHMARKS.md): short estimates lean eager
EAGER_STEP_EFFICIENCY = 0.6


def cpu_compile_gain(precision: str) -> tuple[float, float, str]:
    """This CPU's row of CPU_COMPILE for a run at `precision` (fp32, bf16, ...) on this process's threads."""
    return CPU_COMPILE.get((cpu_bf16_instructions()[1], precision, torch.get_num_threads()), CPU_COMPILE_UNMEASURED)


def eager_step_s(model, t, dtype: torch.dtype) -> float:
    """An eager CPU step's estimated seconds for `model` (a GPTConfig) and `t`'s batch: its FLOPs (the head only where
    the vocab is known) over the timed matmul rate x threads x EAGER_STEP_EFFICIENCY."""
    d, n_layer = model.n_embd, model.n_layer
    flops = 6 * (12 * n_layer * d * d + (model.vocab_size or 0) * d) + 12 * n_layer * d * model.block_size
    tokens = t.batch_size * model.block_size / (dist.get_world_size() if dist.is_initialized() else 1)
    return flops * tokens / (matmul_rate(dtype, d) * torch.get_num_threads() * EAGER_STEP_EFFICIENCY)


def resolve_compile(requested, device: torch.device, max_steps: int, budget_s: float, step_s: float,
                    gain: tuple[float, float, str] | None) -> tuple[bool, str]:
    """train.compile -> (compile, why). auto on a CPU: on where the run's eager length (`max_steps` x `step_s`, cut to
    a time budget's `budget_s`) x the share a compiled step saves exceeds the compile's seconds (`gain`: a row of
    CPU_COMPILE); under a budget that is also what trains more steps, whatever the estimate."""
    if requested != "auto":
        return bool(requested), f"{'on' if requested else 'off'}: as configured"
    if device.type != "cpu":
        return device.type == "cuda", f"auto: {'on (CUDA)' if device.type == 'cuda' else 'off (not measured on MPS)'}"
    budgeted = 0 < budget_s < max_steps * step_s  # the time budget ends the run before max_steps
    eager_s = budget_s if budgeted else max_steps * step_s
    saved, compile_s, source = gain
    on = eager_s * saved > compile_s
    pays = compile_s / saved  # seconds of eager steps
    run = f"~{pays / 60:.1f} of this run's {budget_s / 60:g} minutes" if budgeted else \
        f"~{pays / step_s:.0f} steps of this run's {max_steps} (eager {step_s:.2f} s/step, estimated)"
    return on, f"auto: {'on' if on else 'off'} (about {compile_s:.0f} s to compile, {'pays' if on else 'would pay'}" \
        f" back after {run}: compiled steps {saved:.0%} shorter, {source})"


def peak_memory_gb(device: torch.device) -> float:
    """Peak memory in GB: allocated on CUDA, the process's peak RSS on a CPU (NaN on Windows: no getrusage)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    if resource is None:
        return float("nan")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / (2**30 if sys.platform == "darwin" else 2**20)
