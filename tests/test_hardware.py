"""The precision rule (hardware.py) with the hardware probes faked both ways, and how train.py reports it."""
import json
import os
from dataclasses import replace

import pytest
import torch

import hardware
import train
from test_train import train_args

CPU, CUDA, MPS = torch.device("cpu"), torch.device("cuda", 0), torch.device("mps")


# The CPU kinds our machines have had: /proc/cpuinfo flags, what oneDNN says of BF16, and the measured BF16 / FP32
# matmul rate (BENCHMARKS.md). oneDNN says "supported" on all AVX-512 CPUs, also where it converts in software.
KINDS = {"intel-amx": ({"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}, True, 3.8, "bf16"),
         "amd-zen4": ({"avx2", "avx512f", "avx512_bf16"}, True, 2.3, "bf16"),
         "amd-avx2": ({"avx2"}, False, 0.02, "fp32"),
         "intel-avx512-no-bf16": ({"avx2", "avx512f", "avx512bw", "avx512_vnni"}, True, 0.29, "fp32")}


@pytest.fixture
def cpu_kind(monkeypatch):
    """Pretend this CPU is of a given kind: its flags, oneDNN's BF16 answer and the probe's BF16 / FP32 ratio
    (the FP16 probe answers the same)."""
    def fake(flags: set[str], onednn_bf16: bool, speedup: float):
        monkeypatch.setattr(hardware, "cpu_flags", lambda: set(flags))
        monkeypatch.setattr(hardware, "matmul_speedup", lambda dtype=torch.bfloat16, width=256: speedup)
        monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: onednn_bf16, raising=False)
    return fake


@pytest.mark.parametrize("kind", KINDS)
def test_auto_takes_the_precision_that_is_faster_on_each_cpu_kind(cpu_kind, kind):
    flags, onednn, speedup, expected = KINDS[kind]
    cpu_kind(flags, onednn, speedup)
    p = hardware.resolve_precision("auto", CPU, 256)
    assert (p.name, p.speedup, p.warning) == (expected, speedup, None)
    assert f"BF16 matmul {speedup:.2f}x FP32 here" in p.reason
    assert p.dtype == (torch.bfloat16 if expected == "bf16" else torch.float32) and not p.scaled


def test_bf16_that_only_runs_emulated_is_not_taken_for_native(cpu_kind):
    """The rule before: oneDNN's "supported" meant native, so this Intel AVX-512 CPU without AVX512-BF16 got BF16
    at 0.29x FP32's rate (the tiny quick start: 99 steps and 2.08 bits/byte instead of 359 and 1.66)."""
    cpu_kind(*KINDS["intel-avx512-no-bf16"][:3])
    p = hardware.resolve_precision("auto", CPU, 256)
    assert hardware.describe(p) == "precision fp32: BF16 matmul 0.29x FP32 here (AVX-512 without AVX512-BF16)"
    assert p.autocast(CPU).__class__.__name__ == "nullcontext"


def test_auto_needs_both_the_instructions_and_the_measured_gain(cpu_kind):
    cpu_kind({"avx512f", "avx512_bf16"}, True, 1.1)  # the instructions, but not 1.2x faster (a throttled VM)
    p = hardware.resolve_precision("auto", CPU, 256)
    assert p.name == "fp32" and p.reason == "BF16 matmul 1.10x FP32 here (AVX512-BF16), under 1.2x"
    cpu_kind({"avx2"}, False, 1.5)  # faster without the instructions: not trusted
    assert hardware.resolve_precision("auto", CPU, 256).name == "fp32"
    cpu_kind({"asimd", "bf16"}, False, 1.8)  # Arm with the BF16 extension
    p = hardware.resolve_precision("auto", CPU, 256)
    assert p.name == "bf16" and "(Arm BF16)" in p.reason


def test_an_explicit_choice_is_obeyed_with_one_warning_where_it_is_slower(cpu_kind):
    cpu_kind(*KINDS["amd-avx2"][:3])
    explicit = hardware.resolve_precision("bf16", CPU, 256)
    assert explicit.name == "bf16"
    assert "BF16 matmul 0.02x FP32 here (AVX2 without BF16 instructions)" in explicit.warning
    assert "auto picks fp32 here" in explicit.warning
    assert "FP16 matmul" in hardware.resolve_precision("fp16", CPU, 256).warning
    assert hardware.resolve_precision("fp32", CPU).warning is None
    cpu_kind(*KINDS["intel-amx"][:3])
    assert hardware.resolve_precision("bf16", CPU, 256).warning is None


def test_the_probe_measures_this_cpu_once():
    """Its time (0.1-0.2 s) is recorded in BENCHMARKS.md, not asserted here."""
    hardware.matmul_speedup.cache_clear()
    speedup = hardware.matmul_speedup(torch.bfloat16, 512)
    assert 0 < speedup < 100
    assert hardware.matmul_speedup(torch.bfloat16, 512) == speedup  # measured once per process
    assert hardware.matmul_speedup.cache_info().misses == 1


@pytest.fixture
def gpu(monkeypatch):
    """Pretend the CUDA device is a named GPU of a given compute capability."""
    def fake(name: str, cap: tuple[int, int]):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: cap)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    return fake


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


def test_mps():
    assert hardware.resolve_precision("auto", MPS).name == "fp32"
    with pytest.raises(hardware.HardwareError):
        hardware.resolve_precision("fp8", MPS)


GAIN = (0.25, 50, "a test's")  # a compiled step saves 1/4 of an eager one; 50 s to compile


def test_compile_auto_on_a_cpu_compiles_where_the_run_wins_the_compile_back():
    """At 1 s an eager step, compiling saves 0.25 s a step: it pays back after 50 / 0.25 = 200 steps."""
    on, why = hardware.resolve_compile("auto", CPU, 1000, 0, 1.0, GAIN)
    assert why == ("auto: on (about 50 s to compile, pays back after ~200 steps of this run's 1000 (eager 1.00 s/step, "
                   "estimated): compiled steps 25% shorter, a test's)") and on
    on, why = hardware.resolve_compile("auto", CPU, 100, 0, 1.0, GAIN)  # a short run (the golden test's kind)
    assert not on and why.startswith("auto: off (about 50 s to compile, would pay back after ~200 steps of this "
                                     "run's 100")
    assert not hardware.resolve_compile("auto", CPU, 1000, 0, 0.1, GAIN)[0]  # the same steps on a 10x faster CPU
    # a time budget ends the run first: compile where budget x saved > the compile, whatever the estimated step
    for step_s in (0.2, 1.0, 5.0):
        on, why = hardware.resolve_compile("auto", CPU, 10**6, 9 * 60, step_s, GAIN)
        assert on and "pays back after ~3.3 of this run's 9 minutes: compiled steps 25% shorter" in why
        assert not hardware.resolve_compile("auto", CPU, 10**6, 3 * 60, step_s, GAIN)[0]  # 45 s saved < 50
    assert not hardware.resolve_compile("auto", CPU, 150, 9 * 60, 1.0, GAIN)[0]  # max_steps ends it first


def test_compile_as_configured_and_auto_off_cpus():
    for device in (CPU, CUDA, MPS):
        assert hardware.resolve_compile(True, device, 1, 0, 1.0, GAIN) == (True, "on: as configured")
        assert hardware.resolve_compile(False, device, 10**6, 0, 1.0, GAIN) == (False, "off: as configured")
    assert hardware.resolve_compile("auto", CUDA, 1, 0, 0.0, GAIN) == (True, "auto: on (CUDA)")
    assert hardware.resolve_compile("auto", MPS, 10**6, 0, 0.0, GAIN) == (False, "auto: off (not measured on MPS)")


def test_a_cpu_kind_never_measured_gets_the_least_gain_and_most_cost_seen(cpu_kind, monkeypatch):
    rows = hardware.CPU_COMPILE.values()
    unmeasured = hardware.CPU_COMPILE_UNMEASURED
    assert unmeasured[0] <= min(g[0] for g in rows) and unmeasured[1] >= max(g[1] for g in rows)  # saved, compile_s
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    cpu_kind(*KINDS["intel-amx"][:3])
    assert hardware.cpu_compile_gain("bf16") is unmeasured
    cpu_kind(*KINDS["amd-zen4"][:3])
    assert hardware.cpu_compile_gain("bf16") is hardware.CPU_COMPILE[("AVX512-BF16", "bf16", 2)]
    assert hardware.cpu_compile_gain("fp16") is unmeasured
    monkeypatch.setattr(torch, "get_num_threads", lambda: 16)  # a core count not measured
    assert hardware.cpu_compile_gain("bf16") is unmeasured


@pytest.mark.parametrize("kind, threads, overrides, compiled", [  # BENCHMARKS.md, "Compile on CPUs"
    ("amd-zen4", 2, [], True),  # the quick start: 9 minutes of BF16 steps on the CPU kind where compile was measured
    ("amd-zen4", 1, [], True),  # ... under torchrun (a thread per process: compile saves less, costs more)
    ("amd-zen4", 2, ["train.precision=fp32"], True),
    ("amd-avx2", 2, [], False),  # the quick start in FP32 on an AVX2 CPU: ~10 % faster steps, a minute to compile
    ("intel-amx", 2, [], False),  # not measured: the conservative row
    ("intel-amx", 2, ["train.max_minutes=60", "train.max_steps=100000"], True),  # ... which an hour still pays for
    ("amd-zen4", 2, ["train.max_minutes=1.5"], False),  # test_train's shipped-config run
    ("amd-zen4", 2, ["train.max_minutes=0", "train.max_steps=20", "train.precision=fp32"], False)])  # the golden run
def test_resolve_decides_compile_for_the_run_the_config_describes(cpu_kind, monkeypatch, kind, threads, overrides,
                                                                   compiled):
    import config
    cpu_kind(*KINDS[kind][:3])
    monkeypatch.setattr(hardware, "matmul_rate", lambda dtype, width: 100e9)  # FLOP/s on one thread
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    cfg = config.load(["configs/tiny.yaml", *overrides])
    device, precision, on = hardware.resolve(cfg.train, 0, cfg.model)
    assert on == compiled and precision.compile_reason.startswith(f"auto: {'on' if compiled else 'off'} (about ")
    assert hardware.describe(precision).splitlines()[1] == f"compile {precision.compile_reason}"


def test_the_eager_step_estimate():
    """Kaplan's FLOPs over the timed matmul rate, the threads and the measured efficiency; without a vocab (the
    data's, not read yet) the head is left out, which makes the step shorter and the decision lean towards eager."""
    import config
    cfg = config.load(["configs/tiny.yaml"])
    with_vocab = replace(cfg.model, vocab_size=8192)
    rate = hardware.matmul_rate(torch.float32, 256)
    s = hardware.eager_step_s(with_vocab, cfg.train, torch.float32)
    flops = 16 * 256 * (6 * (12 * 6 * 256**2 + 8192 * 256) + 12 * 6 * 256 * 256)
    assert s == pytest.approx(flops / (rate * torch.get_num_threads() * hardware.EAGER_STEP_EFFICIENCY))
    assert hardware.eager_step_s(cfg.model, cfg.train, torch.float32) < s


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
    cpu_kind(*KINDS["amd-avx2"][:3])
    out = str(tmp_path / "avx2")
    assert train.main(train_args(corpus, out, "train.max_steps=2", "train.eval_interval=0")) == 0
    stdout = capsys.readouterr().out
    assert "precision fp32: BF16 matmul 0.02x FP32 here (AVX2 without BF16 instructions)" in stdout
    assert "compile False" in stdout and "\ncompile off: as configured\n" in stdout  # TINY's train.compile=false
    info = json.load(open(os.path.join(out, "run_info.json")))
    assert info["precision"] == "fp32" and "AVX2" in info["precision_reason"] and info["matmul_speedup"] == 0.02
    assert "precision: fp32" in open(os.path.join(out, "config.yaml")).read()  # the resolved value is recorded
    # an explicit bf16 still runs on such a CPU, with one warning
    out = str(tmp_path / "bf16")
    assert train.main(train_args(corpus, out, "train.max_steps=2", "train.eval_interval=0",
                                 "train.precision=bf16")) == 0
    captured = capsys.readouterr()
    assert captured.err.count("warning: train.precision=bf16 on this CPU: BF16 matmul 0.02x FP32 here") == 1
    assert "precision bf16: as configured (BF16 matmul 0.02x FP32 here" in captured.out


def test_a_resumed_run_keeps_the_precision_it_started_with(corpus, tmp_path, cpu_kind, capsys):
    """auto is a timed decision: a resume of the same run (a busy machine, another node) must not change it."""
    out = str(tmp_path / "run")
    cpu_kind(*KINDS["intel-amx"][:3])
    assert train.main(train_args(corpus, out, "train.max_steps=2", "train.eval_interval=0")) == 0
    cpu_kind(*KINDS["amd-avx2"][:3])  # the same run resumed where the probe says otherwise
    assert train.main(train_args(corpus, out, "train.max_steps=4", "train.eval_interval=0")) == 0
    stdout = capsys.readouterr().out
    assert "precision bf16: as when the run started (here now: BF16 matmul 0.02x FP32 here (AVX2" in stdout
    assert json.load(open(os.path.join(out, "run_info.json")))["precision"] == "bf16"
