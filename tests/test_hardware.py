"""The precision rule (hardware.py) with the hardware probes faked both ways, and how train.py reports it."""
import json
import os

import pytest
import torch

import hardware
import train
from test_train import train_args

CPU, CUDA, MPS = torch.device("cpu"), torch.device("cuda", 0), torch.device("mps")


@pytest.fixture
def cpu_kind(monkeypatch):
    """Pretend this CPU is of a given kind: (native BF16, native FP16, label)."""
    def fake(bf16: bool, fp16: bool, label: str):
        monkeypatch.setattr(hardware, "cpu_matmul_support", lambda: (bf16, fp16, label))
    return fake


@pytest.fixture
def gpu(monkeypatch):
    """Pretend the CUDA device is a named GPU of a given compute capability."""
    def fake(name: str, cap: tuple[int, int]):
        monkeypatch.setattr(hardware, "cuda_capability", lambda device: cap)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    return fake


def test_cpu_without_native_bf16_gets_fp32_and_a_warning_for_bf16(cpu_kind):
    cpu_kind(False, False, "AVX2")
    p = hardware.resolve_precision("auto", CPU)
    assert (p.name, p.warning) == ("fp32", None)
    assert hardware.describe(p) == "precision fp32: this CPU has no native BF16 matmul (AVX2)"
    assert p.autocast(CPU).__class__.__name__ == "nullcontext" and p.dtype == torch.float32
    explicit = hardware.resolve_precision("bf16", CPU)
    assert explicit.name == "bf16" and "without native BF16 matmul (AVX2)" in explicit.warning
    assert "auto picks fp32" in explicit.warning
    assert "FP16" in hardware.resolve_precision("fp16", CPU).warning
    assert hardware.resolve_precision("fp32", CPU).warning is None


@pytest.mark.parametrize("label", ["AMX", "AVX512-BF16"])
def test_cpu_with_native_bf16_gets_bf16(cpu_kind, label):
    cpu_kind(True, label == "AMX", label)
    p = hardware.resolve_precision("auto", CPU)
    assert (p.name, p.reason, p.warning) == ("bf16", f"this CPU has native BF16 matmul ({label})", None)
    assert p.dtype == torch.bfloat16 and not p.scaled
    assert hardware.resolve_precision("bf16", CPU).warning is None


def test_gpus_with_and_without_bf16(gpu):
    gpu("NVIDIA H100 80GB HBM3", (9, 0))
    assert hardware.resolve_precision("auto", CUDA).name == "bf16"
    assert hardware.resolve_precision("fp8", CUDA).name == "fp8"
    gpu("Tesla T4", (7, 5))
    p = hardware.resolve_precision("auto", CUDA)
    assert p.name == "fp16" and p.scaled and p.dtype == torch.float16
    assert "no BF16 (Tesla T4, compute capability 7.5): FP16 with dynamic loss scaling" in p.reason
    for asked in ("bf16", "fp8"):
        with pytest.raises(hardware.HardwareError, match="use train.precision=fp16"):
            hardware.resolve_precision(asked, CUDA)
    assert hardware.resolve_precision("fp32", CUDA).name == "fp32"


def test_mps_and_compile_auto():
    assert hardware.resolve_precision("auto", MPS).name == "fp32"
    with pytest.raises(hardware.HardwareError):
        hardware.resolve_precision("fp8", MPS)
    assert hardware.resolve_compile("auto", CUDA) and not hardware.resolve_compile("auto", CPU)
    assert not hardware.resolve_compile("auto", MPS) and hardware.resolve_compile(True, CPU)


def test_one_gpu_table_for_train_bench_and_plan(gpu):
    import plan
    gpu("NVIDIA H100 PCIe", (9, 0))
    assert hardware.peak_flops(CUDA) == 756e12
    gpu("NVIDIA A100-SXM4-80GB", (8, 0))
    assert hardware.peak_flops(CUDA) == 312e12  # not the A10's row
    assert hardware.peak_flops(CUDA, torch.float32) == 156e12  # FP32 matmuls run as TF32: half the BF16 peak
    gpu("NVIDIA H100 NVL", (9, 0))
    assert hardware.peak_flops(CUDA) == 835e12 and hardware.gpu_spec(CUDA).memory_gib == 94  # not the SXM's row
    gpu("NVIDIA H200 NVL", (9, 0))
    assert hardware.peak_flops(CUDA) == 835e12 and hardware.peak_flops(CUDA, torch.float32) == 418e12
    gpu("Tesla V100-SXM2-32GB", (7, 0))
    assert hardware.peak_flops(CUDA, torch.float16) == 125e12 and hardware.peak_flops(CUDA, torch.float32) == 15.7e12
    gpu("NVIDIA GeForce RTX 4090", (8, 9))
    assert hardware.peak_flops(CUDA) is None
    assert hardware.peak_flops(CPU) is None
    assert plan.GPUS["h200"] == (141, 989)


def test_the_banner_and_run_files_say_what_was_chosen_and_why(corpus, tmp_path, cpu_kind, capsys):
    cpu_kind(False, False, "AVX2")
    out = str(tmp_path / "avx2")
    assert train.main(train_args(corpus, out, "train.max_steps=2", "train.eval_interval=0")) == 0
    stdout = capsys.readouterr().out
    assert "precision fp32: this CPU has no native BF16 matmul (AVX2)" in stdout
    assert "compile False" in stdout  # compile auto: eager on CPU
    info = json.load(open(os.path.join(out, "run_info.json")))
    assert info["precision"] == "fp32" and "AVX2" in info["precision_reason"]
    assert "precision: fp32" in open(os.path.join(out, "config.yaml")).read()  # the resolved value is recorded
    # an explicit bf16 still runs on such a CPU, with one warning
    out = str(tmp_path / "bf16")
    assert train.main(train_args(corpus, out, "train.max_steps=2", "train.eval_interval=0",
                                 "train.precision=bf16")) == 0
    captured = capsys.readouterr()
    assert captured.err.count("warning: train.precision=bf16 on a CPU without native BF16 matmul (AVX2)") == 1
    assert "precision bf16: as configured" in captured.out
