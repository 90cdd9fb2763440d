"""What this machine can do: the device, the precision rule, and the GPU table (memory and dense peak) that
train.py, bench.py and plan.py share.

    precision auto:  CUDA  -> bf16 on compute capability >= 8.0 (Ampere and later), else fp16 + loss scaling
                     CPU   -> bf16 where BF16 matmul is native (AMX, AVX512-BF16, Arm BF16), else fp32
                     MPS   -> fp32
Each choice comes with its reason, printed in the start-up banner. An explicit choice is obeyed, with a warning
where it runs emulated (BF16 or FP16 on a CPU without the instructions: ~50x slower than FP32 there).
"""
from contextlib import nullcontext
from dataclasses import dataclass

import torch


class HardwareError(ValueError):
    """The requested device or precision cannot run here, with a message meant for the user."""


@dataclass(frozen=True)
class GPU:
    name: str  # a substring of torch.cuda.get_device_name(); the table is searched in order, specific names first
    memory_gib: int
    peak_tflops: float  # dense tensor-core peak at the precision auto picks there (BF16, or FP16 before Ampere)
    fp32_tflops: float  # dense peak of FP32 matmuls: TF32 tensor cores from Ampere on (train.py allows TF32)


# Dense peaks from the vendors' data sheets (TF32 is half of BF16 on every Ampere and Hopper part here; V100 and T4
# have no TF32, so FP32 runs on their CUDA cores). Device names do not say SXM vs PCIe reliably everywhere: bench.py's
# --peak-tflops and plan.py's --gpu override. The NVL cards (two linked PCIe boards) are named before their SXM
# namesakes, which their names contain.
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
    spec = gpu_spec(device)
    if spec is None:
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


def cpu_matmul_support() -> tuple[bool, bool, str]:
    """(native BF16 matmul, native FP16 matmul, label) for this CPU, from oneDNN's own checks: the signals that
    decide whether its BF16/FP16 kernels run in hardware or fall back to a slow emulation."""
    try:
        bf16 = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        fp16 = bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN
        bf16 = fp16 = False
    if getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)():
        label = "AMX"
    elif getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)():
        label = "AVX512-BF16"
    else:
        label = torch.backends.cpu.get_cpu_capability()  # AVX2, AVX512, DEFAULT, SVE256, ...
    return bf16, fp16, label


def cuda_capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


@dataclass(frozen=True)
class Precision:
    """The precision a run uses: fp32, bf16, fp16 or fp8 (BF16 autocast plus FP8 Linear layers)."""
    name: str
    reason: str  # for the banner: why this one here
    warning: str | None = None  # an explicit choice that will run slowly here

    @property
    def dtype(self) -> torch.dtype:
        """The matmul dtype under autocast (FP32 when there is no autocast)."""
        return {"fp32": torch.float32, "fp16": torch.float16}.get(self.name, torch.bfloat16)

    @property
    def scaled(self) -> bool:
        """Whether the loss needs dynamic scaling (FP16's small exponent range)."""
        return self.name == "fp16"

    def autocast(self, device: torch.device):
        if self.name == "fp32":
            return nullcontext()
        return torch.autocast(device.type, dtype=self.dtype)


def resolve_precision(requested: str, device: torch.device) -> Precision:
    """`requested` (auto | fp32 | bf16 | fp16 | fp8) -> the Precision to run on `device`. Raises HardwareError
    for a choice the device cannot run at all."""
    if device.type == "cuda":
        cap = cuda_capability(device)
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
    bf16, fp16, label = cpu_matmul_support()
    if requested == "auto":
        if bf16:
            return Precision("bf16", f"this CPU has native BF16 matmul ({label})")
        return Precision("fp32", f"this CPU has no native BF16 matmul ({label})")
    slow = {"bf16": not bf16, "fp16": not fp16}.get(requested, False)
    warning = None
    if slow:
        warning = (f"train.precision={requested} on a CPU without native {requested.upper()} matmul ({label}): "
                   f"its matmuls run emulated, ~50x slower than FP32 (a 1024x1024 matmul on an AVX2 EPYC: "
                   f"~0.9 vs ~48 GFLOP/s); train.precision=auto picks fp32 here")
    return Precision(requested, "as configured", warning)


def describe(p: Precision) -> str:
    """One banner line: 'precision bf16: this CPU has native BF16 matmul (AMX)'."""
    return f"precision {p.name}: {p.reason}"


def resolve_compile(requested, device: torch.device) -> bool:
    """train.compile: True/False as configured; auto compiles on CUDA only. On CPUs the first compile of even the
    tiny model takes about a minute on a fresh machine and wins back only ~10-30 % per step (BENCHMARKS.md), so a
    short CPU run finishes sooner eager; long CPU runs can ask for it."""
    if requested == "auto":
        return device.type == "cuda"
    return bool(requested)
