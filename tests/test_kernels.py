"""Every kernel backend that can run here agrees with the plain-PyTorch reference, forward and gradients.

Tolerances by dtype: FP32 paths differ only in summation order (1e-5 relative); under BF16 autocast the
matmul inputs are rounded to 8 bits of mantissa (2e-2). Fused CUDA backends (flash-attn, liger) are checked
on CPU under TRITON_INTERPRET=1 where their Triton kernels run there, and skipped where the package is absent.
"""
import importlib.util
from build import build_model
import json
import os
import subprocess
import sys

import pytest
import torch

import bench
import kernel
import optim
import parallel
import train
from conftest import ROOT, TINY, make_run
from model import GPT, GPTConfig
from step import train_step
from test_train import train_args


def grads(fn, *inputs):
    inputs = [x.detach().clone().requires_grad_(x.is_floating_point()) for x in inputs]
    out = fn(*inputs)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(0)).to(out.dtype))
    return out.detach(), [x.grad for x in inputs if x.is_floating_point()]


def assert_close(a, b, rtol):
    (oa, ga), (ob, gb) = a, b
    torch.testing.assert_close(oa, ob, rtol=rtol, atol=rtol)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y, rtol=rtol, atol=rtol)


@pytest.mark.parametrize("chunk", [7, 64, 10_000])
def test_chunked_loss_equals_plain_loss_and_gradients(chunk):
    torch.manual_seed(0)
    h, w = torch.randn(100, 32), torch.randn(300, 32) * 0.2
    t = torch.randint(0, 300, (100,))
    t[::9] = -1  # ignored targets count neither in the mean nor in the gradients
    ref = grads(lambda h, w: kernel.plain_loss(h, w, t), h, w)
    got = grads(lambda h, w: kernel.chunked_loss(h, w, t, chunk=chunk), h, w)
    assert_close(got, ref, 1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref16 = grads(lambda h, w: kernel.plain_loss(h, w, t), h, w)
        got16 = grads(lambda h, w: kernel.chunked_loss(h, w, t, chunk=chunk), h, w)
    assert_close(got16, ref16, 2e-2)
    assert got16[1][1].dtype == torch.float32  # the FP32 weight gets an FP32 gradient


@pytest.mark.parametrize("rows", [256, 1024])  # several chunks, one chunk
def test_plan_counts_what_the_chunked_loss_holds(rows):
    """plan.py's estimate of the chunked loss's transient memory, against the peak torch's MemTracker sees in a
    BF16 forward and backward (the FP32 weight cast per call, the kept FP32 dW, each chunk's logits and dW product)."""
    import memory
    from torch.distributed._tools.mem_tracker import MemTracker
    N, V, d = 1024, 4096, 128
    torch.manual_seed(0)
    h, w = torch.randn(N, d, requires_grad=True), torch.randn(V, d, requires_grad=True)
    targets = torch.randint(0, V, (N,))
    tracker = MemTracker()
    with tracker:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = kernel.ChunkedLoss.apply(h, w, targets, rows)
        loss.backward()
    measured = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]
    cfg = GPTConfig(vocab_size=V, n_embd=d, n_layer=1, n_head=2, block_size=N)
    assert cfg.padded_vocab_size == V
    estimate = memory.loss_transient_bytes(cfg, N, "chunked", chunk_logits=rows * V)
    assert estimate == pytest.approx(measured, rel=0.05), (estimate / 2**20, measured / 2**20)


def test_chunked_loss_under_compile_and_with_all_targets_ignored():
    torch.manual_seed(0)
    h, w = torch.randn(64, 16), torch.randn(50, 16)
    t = torch.randint(0, 50, (64,))
    compiled = torch.compile(lambda h, w: kernel.chunked_loss(h, w, t, chunk=16))
    assert_close(grads(compiled, h, w), grads(lambda h, w: kernel.plain_loss(h, w, t), h, w), 1e-5)
    none = torch.full((64,), -1)
    loss, (gh, gw) = grads(lambda h, w: kernel.chunked_loss(h, w, none), h, w)
    assert loss.item() == 0 and not gh.any() and not gw.any()


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_attention_matches_the_full_score_matrix(kv_heads):
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 24, 4, 16), torch.randn(2, 24, kv_heads, 16), torch.randn(2, 24, kv_heads, 16)
    assert_close(grads(kernel.torch_attention, q, k, v), grads(bench.naive_attention, q, k, v), 1e-5)


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_matmul_attention_matches_sdpa(kv_heads):
    """The CPU half-precision path: the same maths as the SDPA reference (FP32 here; BF16 within its rounding)."""
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 24, 4, 16), torch.randn(2, 24, kv_heads, 16), torch.randn(2, 24, kv_heads, 16)
    assert_close(grads(kernel.matmul_attention, q, k, v), grads(kernel.torch_attention, q, k, v), 1e-5)
    low = [t.bfloat16() for t in (q, k, v)]
    torch.testing.assert_close(kernel.matmul_attention(*low).float(), kernel.torch_attention(q, k, v),
                               atol=0.05, rtol=0.05)


def test_cpu_kernel_choice_by_dtype():
    ops = kernel.configure("auto", "auto", "cpu", torch.bfloat16)
    assert ops.names["attention"].startswith("matmul") and ops.names["loss"] == "chunked (cache-sized)"
    q = torch.randn(1, kernel.CPU_MATMUL_ATTENTION_MAX_T + 8, 2, 8)  # long context: back to SDPA
    torch.testing.assert_close(ops.attention(q, q, q), kernel.torch_attention(q, q, q))
    assert kernel.configure("auto", "auto", "cpu", torch.float32).names["attention"] == "torch"  # FP32: SDPA wins


def test_rms_norm_compiled_matches_eager():
    torch.manual_seed(0)
    x, w = torch.randn(3, 10, 64), torch.randn(64)
    compiled = torch.compile(lambda x, w: kernel.torch_rms_norm(x, w, 1e-5), backend="aot_eager")
    assert_close(grads(compiled, x, w), grads(lambda x, w: kernel.torch_rms_norm(x, w, 1e-5), x, w), 1e-5)
    xb = x.bfloat16()  # BF16 activations (FSDP2's BF16 parameters): normalised in FP32 either way
    torch.testing.assert_close(compiled(xb, w), kernel.torch_rms_norm(xb, w, 1e-5), atol=0.02, rtol=0.02)


def test_rms_norm_and_rope_match_the_formulas():
    torch.manual_seed(0)
    x, w = torch.randn(3, 10, 64), torch.randn(64)
    assert_close(grads(lambda x, w: kernel.torch_rms_norm(x, w, 1e-5), x, w),
                 grads(lambda x, w: bench.naive_rms_norm(x, w, 1e-5), x, w), 1e-5)
    # RoPE in the rotate-half layout is a rotation of the pairs (i, i + D/2) by angle pos * theta^(-2i/D)
    from model import rope_cache
    cfg = GPTConfig(vocab_size=10, n_embd=64, n_head=4, block_size=10)
    x = torch.randn(1, 10, 1, 16)
    out = kernel.torch_rope(x, rope_cache(cfg))
    pos, i = 7, 3
    angle = pos * 10000.0 ** (-2 * i / 16)
    a, b = x[0, pos, 0, i], x[0, pos, 0, i + 8]
    c, s = torch.cos(torch.tensor(angle)), torch.sin(torch.tensor(angle))
    torch.testing.assert_close(out[0, pos, 0, [i, i + 8]], torch.stack([a * c - b * s, a * s + b * c]))


def test_model_loss_is_the_same_with_every_loss_kernel():
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=200, n_layer=2, n_embd=32, n_head=4, n_kv_head=2, block_size=16)
    model = GPT(cfg)
    x = torch.randint(0, 200, (3, 16))
    results = {}
    for loss in ("plain", "chunked", "auto"):  # auto on CPU: chunked, cache-sized chunks
        model.set_ops(kernel.configure("torch", loss))
        model.zero_grad()
        value = model(x, x)
        value.backward()
        results[loss] = (value.detach(), [p.grad.clone() for p in model.parameters()])
    assert_close(results["chunked"], results["plain"], 1e-5)
    assert_close(results["auto"], results["plain"], 1e-5)
    # the logits path (eval, sampling) is the plain lm_head
    model.set_ops(kernel.configure("torch", "plain"))
    logits = model(x)
    assert logits.shape == (3, 16, cfg.padded_vocab_size)


def test_configure_names_the_choice_and_refuses_what_cannot_run_here():
    assert kernel.configure("auto", "auto", "cpu", torch.float32).names == {
        "attention": "torch", "rms_norm": "torch", "rope": "torch", "loss": "chunked (cache-sized)",
        "grouped_mm": "torch grouped_mm"}
    assert kernel.configure("auto", "chunked", "cpu", torch.bfloat16).names["loss"] == "chunked"
    assert kernel.configure("torch", "plain").names["loss"] == "plain"
    for name in ("flash", "liger"):
        with pytest.raises(kernel.KernelError, match="needs a CUDA device"):
            kernel.configure(name, "auto", "cpu", torch.bfloat16)
    if importlib.util.find_spec("flash_attn") is None:
        with pytest.raises(kernel.KernelError, match="pip install flash-attn"):
            kernel._import("flash_attn")
    assert "compute capability >= 8.9" in kernel.float8_supported(torch.device("cpu"))


def test_auto_never_takes_liger_even_when_installed(monkeypatch):
    """liger failed to compile under torch.compile on the GPU's torch: auto keeps torch's kernels."""
    monkeypatch.setattr(kernel, "_installed", lambda name: name == "liger_kernel")
    assert kernel.configure("auto", "auto", "cuda", torch.bfloat16).names == {
        "attention": "torch", "rms_norm": "torch", "rope": "torch", "loss": "chunked", "grouped_mm": "loop"}


@pytest.mark.parametrize("installed,expected", [({"flash_attn"}, "torch"),
                                                 ({"flash_attn", "flash_attn_interface"}, "flash-attn 3")])
def test_auto_takes_flash_attention_3_only(monkeypatch, installed, expected):
    """flash-attn 2 is the kernel SDPA has built in: auto takes the package only for FlashAttention-3."""
    real = kernel._import

    def fake_import(name):
        if name.split(".")[0] in installed:
            return type(name, (), {"flash_attn_func": None})
        if name.split(".")[0] in ("flash_attn", "flash_attn_interface"):
            raise kernel.KernelError(f"{name} is not installed")
        return real(name)
    monkeypatch.setattr(kernel, "_import", fake_import)
    assert kernel.configure("auto", "auto", "cuda", torch.bfloat16).names["attention"] == expected
    assert kernel.configure("flash", "auto", "cuda", torch.bfloat16).names["attention"] != "torch"  # taken


def test_fp8_and_cuda_kernels_stop_before_training(corpus, tmp_path, capsys):
    out = str(tmp_path / "fp8")
    assert train.main(train_args(corpus, out, "train.precision=fp8")) == 2
    assert "train.precision=fp8: FP8 training needs a CUDA GPU" in capsys.readouterr().err
    assert train.main(train_args(corpus, out, "train.kernels=liger")) == 2
    assert "train.kernels=liger needs a CUDA device" in capsys.readouterr().err
    assert not os.path.exists(out)


def test_bench_prints_one_json_line(monkeypatch, capsys):
    """bench.py's command line through its main(), in this process (a second interpreter costs seconds)."""
    monkeypatch.chdir(ROOT)
    capsys.readouterr()
    assert bench.main(["configs/tiny.yaml", *TINY, "model.vocab_size=512", "train.loss=chunked",
                       "--warmup", "1", "--steps", "2", "--peak-tflops", "1", "--baseline"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["tokens_per_s"] > 0 and result["batch_tokens"] == 8 * 64 and result["kernels"]["loss"] == "chunked"
    assert result["mfu"] == pytest.approx(result["tokens_per_s"] * result["flops_per_token"] / 1e12)
    assert result["speedup_vs_baseline"] == pytest.approx(result["tokens_per_s"] / result["baseline_tokens_per_s"])


LIGER = importlib.util.find_spec("liger_kernel") is not None and importlib.util.find_spec("triton") is not None


@pytest.mark.skipif(not LIGER, reason="liger-kernel (and triton) not installed")
def test_liger_kernels_under_the_triton_interpreter():
    """liger's RoPE and fused linear + cross-entropy Triton kernels on CPU tensors, with TRITON_INTERPRET=1 set
    before triton loads (its RMSNorm kernel does not run in the interpreter: a CUDA-only check). RoPE rotates q
    and k in place in the projection's output (no copy); the loss in FP32 and under BF16 autocast. Passed with
    liger-kernel 0.8.5 and triton 3.9 on torch 2.13 (CPU), installed with pip --target on PYTHONPATH."""
    code = """
import torch, kernels
from model import GPTConfig, rope_cache
from test_kernels import assert_close, grads
fn = kernel._import("liger_kernel.transformers.functional")
torch.manual_seed(0)
table = rope_cache(GPTConfig(vocab_size=10, n_embd=64, n_head=4, block_size=16))
q, k = torch.randn(2, 16, 4, 16), torch.randn(2, 16, 2, 16)
def both(rope):
    return grads(lambda q, k: torch.cat([t.flatten() for t in rope(q, k, table)]), q, k)
assert_close(both(kernel._liger_rope(fn)), both(kernel.torch_rope_qk), 1e-5)
# q, k as the model makes them: views of a projection's output
x = torch.randn(2, 16, 64, requires_grad=True); W = torch.randn(64 + 32, 64) * 0.1
def proj(rope):
    x.grad = None
    qk = x @ W.t()
    q, k = qk[..., :64].reshape(2, 16, 4, 16), qk[..., 64:].reshape(2, 16, 2, 16)
    a, b = rope(q, k, table)
    out = (a.sum(-1) ** 2).sum() + (b.sum(-1) ** 2).sum()
    out.backward()
    return out.detach(), x.grad.clone()
o1, g1 = proj(kernel._liger_rope(fn)); o2, g2 = proj(kernel.torch_rope_qk)
torch.testing.assert_close(o1, o2, rtol=1e-5, atol=1e-5); torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-4)
h, W, t = torch.randn(32, 64), torch.randn(128, 64) * 0.1, torch.randint(0, 128, (32,))
t[::5] = -1
assert_close(grads(lambda h, W: kernel._liger_loss(fn)(h, W, t), h, W),
             grads(lambda h, W: kernel.plain_loss(h, W, t), h, W), 1e-5)
with torch.autocast("cpu", dtype=torch.bfloat16):
    a = grads(lambda h, W: kernel._liger_loss(fn)(h, W, t), h, W)
    b = grads(lambda h, W: kernel.plain_loss(h, W, t), h, W)
assert_close(a, b, 2e-2)
print("ok")
"""
    r = subprocess.run([sys.executable, "-c", code], cwd=os.path.join(ROOT, "tests"), capture_output=True, text=True,
                       timeout=300, env={**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join(
                           filter(None, (ROOT, os.environ.get("PYTHONPATH"))))})
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-3000:]


def test_loss_auto_compiles_the_plain_loss_when_the_logits_fit():
    """train.loss auto: a compiled step whose plan holds the full logits takes the compiled plain loss; an eager step
    or logits that do not fit keep the chunked one. The fallback is torch's kernels with the chunked loss."""
    ops = kernel.configure("auto", "auto", "cpu", torch.bfloat16, compiled=True, logits_fit=True)
    assert ops.names["loss"] == "plain, compiled" and ops.loss is kernel.compiled_loss
    for compiled, fit in ((True, False), (False, True)):
        ops = kernel.configure("auto", "auto", "cuda", torch.bfloat16, compiled=compiled, logits_fit=fit)
        assert ops.names["loss"] == "chunked" and ops.loss is kernel.chunked_loss and ops.fallback is None
    assert kernel.configure("torch", "chunked", "cpu", compiled=True, logits_fit=True).names["loss"] == "chunked"
    ops = kernel.configure("auto", "compiled", "cpu", torch.bfloat16)
    assert ops.replaced() == {"loss": "chunked (cache-sized)"} and ops.fallback.loss is kernel.cpu_chunked_loss
    assert ops.fallback.fallback is None and ops.fallback.replaced() == {}  # nothing left: first_step re-raises


def test_plan_decides_whether_the_full_logits_fit():
    """memory.loss_kind, which memory.resolve asks: the 125m config's logits (32 x 1024 x 50k) fit an 80 GiB GPU
    compiled, not a 24 GiB one; an eager step, a chunked or liger loss never hold them; plain and compiled always do."""
    import config
    import memory
    cfg = config.load(["configs/125m.yaml", "train.compile=true"])
    assert memory.loss_kind(cfg, 8, 80) == "compiled" and memory.loss_kind(cfg, 8, 24) == "chunked"
    for override in ("train.compile=false", "train.loss=chunked", "train.kernels=liger"):
        assert memory.loss_kind(config.load(["configs/125m.yaml", override]), 8, 80) == "chunked", override
    for loss in ("plain", "compiled"):
        assert memory.loss_kind(config.load(["configs/125m.yaml", f"train.loss={loss}"]), 8, 1) == loss


def test_a_compiled_step_has_no_graph_break_and_no_recompile(monkeypatch):
    """The whole-model compile (inductor, CPU) with loss auto: lm_head and the loss are in the model's one graph (the
    chunked loss was a graph break), nothing recompiles after the first step, and the losses match the eager
    chunked step's (FP32: summation order only)."""
    import config
    from torch._dynamo.utils import counters
    overrides = ["configs/tiny.yaml", "model.n_layer=1", "model.n_embd=64", "model.n_head=2", "model.block_size=32",
                 "model.vocab_size=512", "train.precision=fp32", "train.optimizer=adamw", "train.batch_size=4",
                 "train.micro_batch_size=4"]
    batch = torch.randint(0, 512, (4, 33), generator=torch.Generator().manual_seed(0))
    batches = [(batch[:, :-1], batch[:, 1:])]
    losses = {}
    for compile_ in (False, True):
        cfg = config.load([*overrides, f"train.compile={str(compile_).lower()}"])
        run = make_run(cfg)
        assert run.ops.names["loss"] == ("plain, compiled" if compile_ else "chunked (cache-sized)")
        model = build_model(run.cfg, run.device, run.ops, parallelize=lambda m: parallel.parallelize(m, run))
        step_model = parallel.wrap(model, run)
        optimizer = optim.build(model, run.cfg.train, run.device)
        torch._dynamo.reset()
        counters.clear()
        losses[compile_] = []
        for i in range(3):
            if i == 1:
                monkeypatch.setattr(torch._dynamo.config, "error_on_recompile", True)
            loss, _, _ = train_step(model, step_model, optimizer, batches, run)
            losses[compile_].append(loss.item())
        if compile_:
            assert dict(counters["graph_break"]) == {} and counters["stats"]["unique_graphs"] == 1
    torch.testing.assert_close(losses[True], losses[False], rtol=1e-5, atol=1e-5)
