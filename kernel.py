"""The one place that picks fast implementations of the hot ops, by config and availability.

    ops:       attention        rms_norm         rope             loss (lm_head + cross-entropy)
    torch:     SDPA             F.rms_norm       rotate-half      compiled plain, or chunked (see below)
    flash:     flash-attn 3/2   flash-attn       flash-attn       as torch
    liger:     SDPA             liger-kernel     liger-kernel     liger fused linear + cross-entropy
    grouped_mm (the MoE experts' matmuls): F.grouped_mm where torch has it for the device (CPUs; CUDA in BF16 from
               compute capability 8.0), else the per-expert loop that is its reference
    auto:      FlashAttention-3 where installed (CUDA, BF16/FP16), else torch; never liger (see configure);
               on CPUs in BF16/FP16: attention as explicit matmuls up to T=1024 (matmul_attention)

The loss under `train.loss: auto`: with torch.compile on and the full logits within the memory plan, the plain
loss compiled (inductor fuses log-softmax, target gather and gradient into passes over BF16 logits); otherwise
chunked, which never holds all (N, V) FP32 logits. `train.loss` overrides the loss alone (`plain`: the reference).

The `torch_*` functions are the reference every other backend must reproduce (tests/test_kernels.py). Optional
packages are imported only when chosen; a missing one is an error naming the pip line. `configure()` returns the
choice as an `Ops` value the model is built with; nothing here is written after import.
"""
import functools
import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import loss_parallel

PIP = {"flash_attn": "pip install flash-attn --no-build-isolation",
       "flash_attn_interface": "build FlashAttention-3 from the hopper/ folder of the flash-attention repository",
       "liger_kernel": "pip install liger-kernel", "torchao": "pip install torchao"}


class KernelError(RuntimeError):
    """A requested kernel cannot run here, with a message meant for the user."""


def _import(name: str):
    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise KernelError(f"{name} is not installed ({e}); install it with: {PIP[name.split('.')[0]]}") from None


# ----------------------------------------------------------------------------- references (plain PyTorch)

def torch_attention(q, k, v):
    """Causal attention; q (B, T, H, D), k/v (B, T, H_kv, D) -> (B, T, H, D). GQA without repeating K/V."""
    y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                       enable_gqa=k.size(2) != q.size(2))
    return y.transpose(1, 2)


CPU_MATMUL_ATTENTION_MAX_T = 1024  # past this the (T, T) scores of every head cost more memory than they save


def matmul_attention(q, k, v):
    """The same causal attention as explicit matmuls, faster than SDPA's CPU flash kernel in BF16/FP16 at short
    context; its (B, H, T, T) scores are O(T^2) memory, so past CPU_MATMUL_ATTENTION_MAX_T it calls torch_attention."""
    B, T, H, D = q.shape
    if T > CPU_MATMUL_ATTENTION_MAX_T:
        return torch_attention(q, k, v)
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))  # (B, H, T, D)
    if k.size(1) != H:  # GQA: each K/V head serves H / H_kv query heads
        k, v = (x.repeat_interleave(H // k.size(1), dim=1) for x in (k, v))
    scores = (q * D**-0.5) @ k.transpose(-2, -1)  # scaling q: T*D multiplies instead of T*T
    future = torch.ones(T, T, dtype=torch.bool, device=q.device).triu_(1)
    return (scores.masked_fill(future, float("-inf")).softmax(dim=-1) @ v).transpose(1, 2)


def torch_rms_norm(x, weight, eps):
    """RMSNorm, normalised in FP32 (as Hugging Face Llama), output in x's dtype. Eager, F.rms_norm's fused kernel
    is faster; under torch.compile the written-out form, which inductor fuses with its neighbours."""
    if not torch.compiler.is_compiling():
        return F.rms_norm(x, (x.size(-1),), weight, eps)
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).type_as(x)


def torch_rope_qk(q, k, rope):
    """Rotate queries and keys (B, T, H, D) by the FP32 table rope (T, 2, D); the kernels' signature."""
    return torch_rope(q, rope), torch_rope(k, rope)


def torch_rope(x, rope):
    """Rotate x (B, T, H, D) by the FP32 table rope (T, 2, D) (rotate-half layout, as Hugging Face Llama)."""
    cos, sin = rope[None, :, 0, None, :], rope[None, :, 1, None, :]  # (1, T, 1, D) views
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    return (xf * cos + torch.cat([-x2, x1], dim=-1) * sin).type_as(x)


def plain_loss(h, weight, targets):
    """Mean cross-entropy of logits h @ weight.T in FP32; h (N, d), weight (V, d), targets (N,), -1 ignored."""
    return F.cross_entropy(F.linear(h, weight).float(), targets, ignore_index=-1)


class ChunkedLoss(torch.autograd.Function):
    """lm_head + mean cross-entropy, `chunk` rows at a time: the FP32 logits of one chunk exist at once, never
    all N x V of them. The gradients are computed in the forward pass (the chunk's logits are at hand then) and
    kept: dh (N, d) in h's dtype and dW (V, d) in FP32, which backward scales by the incoming gradient."""

    @staticmethod
    def forward(ctx, h, weight, targets, chunk):
        dtype = torch.get_autocast_dtype(h.device.type) if torch.is_autocast_enabled(h.device.type) else h.dtype
        need_h, need_w = ctx.needs_input_grad[:2]  # a frozen head (LoRA) needs no dW
        with torch.autocast(h.device.type, enabled=False):
            w = weight.to(dtype)
            acc = torch.promote_types(dtype, torch.float32)  # logits, loss and dW: FP32 at least
            valid = targets >= 0
            scale = valid.to(acc) / valid.sum().clamp(min=1)  # (N,) per-row weight of the mean; 0 when ignored
            safe = targets.clamp(min=0)
            loss = torch.zeros((), device=h.device, dtype=acc)
            dh = torch.empty_like(h) if need_h else None
            dw = torch.zeros(weight.shape, device=h.device, dtype=acc) if need_w else None
            for i in range(0, h.size(0), chunk):
                hc, tc, sc = h[i:i + chunk].to(dtype), safe[i:i + chunk], scale[i:i + chunk]
                logits = (hc @ w.t()).to(acc)  # (chunk, V): the only large buffer
                lse = torch.logsumexp(logits, dim=-1)
                rows = torch.arange(hc.size(0), device=h.device)
                loss += ((lse - logits[rows, tc]) * sc).sum()
                if need_h or need_w:  # d loss / d logits = (softmax - onehot) * row weight, in the logits buffer
                    g = logits.sub_(lse[:, None]).exp_()
                    g[rows, tc] -= 1.0
                    g = g.to(dtype)
                    if need_h:
                        dh[i:i + chunk] = ((g @ w) * sc[:, None]).to(h.dtype)
                    if need_w:
                        dw += (g.t() @ (hc * sc[:, None].to(dtype))).to(acc)
                logits = g = None  # freed now, not when the next chunk's are made: one chunk's at a time
        ctx.save_for_backward(dh, dw)
        ctx.weight_dtype = weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad):
        dh, dw = ctx.saved_tensors
        return (None if dh is None else dh * grad.to(dh.dtype),
                None if dw is None else (dw * grad).to(ctx.weight_dtype), None, None)


CHUNK_LOGITS = 2**26  # logits per chunk of chunked_loss on a GPU (memory.py counts them)


@torch.compiler.disable  # traced by inductor, its chunk loop ran several times slower than eager
def chunked_loss(h, weight, targets, chunk: int | None = None):
    """Same value and gradients as `plain_loss`, holding one chunk of ~CHUNK_LOGITS FP32 logits at a time."""
    return ChunkedLoss.apply(h, weight, targets, chunk or max(1, CHUNK_LOGITS // weight.size(0)))


@torch.compiler.disable
def cpu_chunked_loss(h, weight, targets):
    """The chunked loss in chunks of ~2^21 logits (8 MB in FP32), which stay in a CPU's cache between the GEMMs and
    the softmax; at least 512 rows, as each chunk also adds its (V, d) FP32 dW."""
    return ChunkedLoss.apply(h, weight, targets, max(512, 2**21 // weight.size(0)))


class VocabParallelLoss(torch.autograd.Function):
    """lm_head + mean cross-entropy under tensor parallel: h (N, d) a DTensor replicated over the tensor-parallel
    mesh, weight (V, d) a DTensor sharded by vocab rows, so each rank makes the logits of its V / tp vocab entries
    and torch's `loss_parallel` computes the cross-entropy across the shards by all-reduce. `chunk` rows at a time;
    as ChunkedLoss, the gradients are computed in forward (inside loss_parallel, which its backward needs) and
    scaled in backward: dh as a Partial DTensor (reduced where sequence parallel scatters it), dW as this rank's
    shard. The result is a plain tensor, the same on every rank."""

    @staticmethod
    def forward(ctx, h, weight, targets, chunk):
        n = (targets >= 0).sum().clamp(min=1)
        need_grad = any(ctx.needs_input_grad[:2])
        w = weight.detach().requires_grad_(need_grad)
        loss, dh, dw, spec = torch.zeros((), device=targets.device), [], None, None
        with torch.enable_grad(), loss_parallel():
            for i in range(0, h.size(0), chunk):
                hc = h[i:i + chunk].detach().requires_grad_(need_grad)
                part = F.cross_entropy(F.linear(hc, w).float(), targets[i:i + chunk], ignore_index=-1,
                                       reduction="sum") / n  # mean reduction is for 1-D meshes only
                if need_grad:
                    ghc, gw = torch.autograd.grad(part, (hc, w))
                    spec = (ghc.device_mesh, ghc.placements)
                    dh.append(ghc.to_local())
                    dw = gw.to_local() if dw is None else dw + gw.to_local()
                loss += part.detach().full_tensor()
        if need_grad:
            ctx.save_for_backward(torch.cat(dh), dw)
            ctx.h_spec = (*spec, h.shape, h.stride())
            ctx.w_spec = (weight.device_mesh, weight.placements, weight.shape, weight.stride())
            ctx.w_dtype = weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad):
        dh, dw = ctx.saved_tensors

        def dtensor(local, mesh, placements, shape, stride):
            return DTensor.from_local(local, mesh, placements, run_check=False, shape=shape, stride=stride)
        return (dtensor(dh * grad.to(dh.dtype), *ctx.h_spec), dtensor((dw * grad).to(ctx.w_dtype), *ctx.w_spec),
                None, None)


@torch.compiler.disable
def vocab_parallel_loss(h, weight, targets):
    """`plain_loss` under tensor parallel (VocabParallelLoss), ~CHUNK_LOGITS logits of this rank's shard at a time."""
    shard = weight.to_local().size(0)
    return VocabParallelLoss.apply(h, weight, targets, max(1, CHUNK_LOGITS // shard))


def compiled_loss(h, weight, targets):
    """`plain_loss` under torch.compile: traced into the graph of a compiled model that calls it, a graph of its own
    when called eagerly (FSDP2 compiles per block, so the head and loss run outside the blocks' graphs)."""
    return (plain_loss if torch.compiler.is_compiling() else _compiled_plain_loss())(h, weight, targets)


@functools.cache
def _compiled_plain_loss():
    return torch.compile(plain_loss)  # on first use: torch.compile imports inductor, which takes a while


def loop_grouped_mm(x, w, counts):
    """The reference grouped GEMM: x (M, K) with its rows sorted by group, w (G, N, K) one (out, in) matrix per
    group as nn.Linear stores it, counts (G,) rows per group (summing to M) -> (M, N), each group's rows @ w[g].T.
    One matmul per group and a host read of `counts`."""
    return torch.cat([xg @ w[g].t() for g, xg in enumerate(x.split(counts.tolist()))])


class _ContiguousGrad(torch.autograd.Function):
    """The identity, whose backward hands on a contiguous gradient: grouped_mm's backward refuses the zero-stride
    gradients that an expanded upstream gradient (a `.sum()`) gives."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


def torch_grouped_mm(x, w, counts):
    """`loop_grouped_mm` as one torch grouped GEMM (F.grouped_mm; no host sync), in autocast's dtype when it is on.
    Strides must be 16-byte aligned: K and N multiples of 8 (model.py checks the MoE widths)."""
    kind = x.device.type
    dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype
    offs = counts.cumsum(0).to(torch.int32)
    return _ContiguousGrad.apply(F.grouped_mm(x.to(dtype), w.to(dtype).transpose(-2, -1), offs=offs))


# ----------------------------------------------------------------------------- optional backends

def _flash_attention(mod):
    def attention(q, k, v):  # (B, T, H, D) in BF16/FP16; GQA native: K/V keep their n_kv_head heads
        out = mod.flash_attn_func(q, k, v, causal=True)
        return out[0] if isinstance(out, tuple) else out  # some FA3 releases also return the log-sum-exp
    return attention


def _flash_rms_norm(mod):
    return lambda x, weight, eps: mod.rms_norm_fn(x, weight, None, eps=eps)


def _flash_rope(mod):
    def rope(q, k, table):  # flash-attn wants (T, D/2) halves; the angles were computed in FP32
        half = table.size(-1) // 2
        cos, sin = table[:, 0, :half].to(q.dtype), table[:, 1, :half].to(q.dtype)
        return tuple(mod.apply_rotary_emb(x, cos, sin, interleaved=False) for x in (q, k))
    return rope


# liger's Triton kernels run outside torch.compile's graphs (torch.compiler.disable): dynamo fails to trace them

def _liger_rms_norm(mod):
    return torch.compiler.disable(mod.liger_rms_norm)  # (x, weight, eps), as torch_rms_norm


def _liger_rope(mod):
    @torch.compiler.disable
    def rope(q, k, table):
        # liger rotates the storage of (B, H, T, D) views in place: our q and k's transposed views cost no copy
        cos, sin = table[None, :, 0].to(q.dtype), table[None, :, 1].to(q.dtype)
        q, k = mod.liger_rope(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
        return q.transpose(1, 2), k.transpose(1, 2)
    return rope


def _liger_loss(mod):
    # dW accumulates in FP32 (accum_dtype; else in the weight's BF16 under FSDP2). The FP32 weight is cast once,
    # with autocast off (under autocast liger's per-chunk matmuls cast it for every chunk). Liger syncs with the
    # host once in its forward (`.item()`) and once in its backward (`torch.equal`): never chosen by auto.
    accum = {"accum_dtype": torch.float32} if "accum_dtype" in inspect.signature(
        mod.liger_fused_linear_cross_entropy).parameters else {}

    @torch.compiler.disable
    def loss(h, weight, targets):
        kind = h.device.type
        dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else h.dtype
        with torch.autocast(kind, enabled=False):
            out = mod.liger_fused_linear_cross_entropy(h.to(dtype), weight.to(dtype), targets, ignore_index=-1, **accum)
        return (out[0] if isinstance(out, tuple) else out).float()
    return loss


# ----------------------------------------------------------------------------- choice

@dataclass(frozen=True)
class Ops:
    """The hot ops a model calls, chosen once per run and handed to the model when it is built (`GPT(cfg, ops)`): each
    has its reference's signature. `names` say which backend each is, for the banner; `fallback` is what a backend that
    fails at the first step is replaced by (torch's kernels, the chunked loss), None where these are already that."""
    attention: Callable
    rms_norm: Callable
    rope: Callable
    loss: Callable
    grouped_mm: Callable = loop_grouped_mm  # the MoE experts' matmuls
    names: dict = field(default_factory=lambda: {"attention": "torch", "rms_norm": "torch", "rope": "torch",
                                                  "loss": "chunked", "grouped_mm": "loop"})
    fallback: "Ops | None" = None

    def replaced(self) -> dict[str, str]:
        """{op: the fallback's name} for each op the fallback replaces."""
        if self.fallback is None:
            return {}
        return {op: self.fallback.names[op] for op in self.names
                if getattr(self, op) is not getattr(self.fallback, op)}


REFERENCE = Ops(torch_attention, torch_rms_norm, torch_rope_qk, chunked_loss)  # plain PyTorch, the chunked loss


def _flash_attention_module():
    try:  # FlashAttention-3 (Hopper) first
        return _import("flash_attn_interface"), "flash-attn 3"
    except KernelError:
        return _import("flash_attn"), "flash-attn 2"


def _installed(name: str) -> bool:
    try:
        _import(name)
        return True
    except KernelError:
        return False


def configure(kernels: str = "auto", loss: str = "auto", device: torch.device | str = "cpu",
              dtype: torch.dtype = torch.float32, compiled: bool = False, logits_fit: bool = False,
              tp: int = 1) -> Ops:
    """The Ops for train.kernels and train.loss, with their `fallback`. `compiled`: the step runs under
    torch.compile; `logits_fit`: the memory plan holds a micro-batch's full logits (memory.loss_kind); `tp` > 1: the
    loss is `vocab_parallel_loss`. Fused kernels need CUDA (flash attention also BF16/FP16), else KernelError."""
    device = torch.device(device)
    cuda, half = device.type == "cuda", dtype in (torch.bfloat16, torch.float16)
    chosen, names = {op: getattr(REFERENCE, op) for op in REFERENCE.names}, dict(REFERENCE.names)
    # torch's grouped GEMM where it runs (the fallback keeps it too): CPUs from torch 2.11, CUDA in BF16 from sm_80
    bf16_gpu = cuda and dtype == torch.bfloat16 and torch.cuda.is_available() and \
        torch.cuda.get_device_capability(device) >= (8, 0)
    if hasattr(F, "grouped_mm") and (device.type == "cpu" or bf16_gpu):
        chosen["grouped_mm"], names["grouped_mm"] = torch_grouped_mm, "torch grouped_mm"
    if device.type == "cpu":
        chosen["loss"], names["loss"] = cpu_chunked_loss, "chunked (cache-sized)"
        if half and kernels in ("auto", "torch"):  # explicit score matrices at short context (see matmul_attention)
            chosen["attention"] = matmul_attention
            names["attention"] = f"matmul up to T={CPU_MATMUL_ATTENTION_MAX_T}, then SDPA"
    if tp > 1:  # config.check_tp allows only train.loss=auto here
        chosen["loss"], names["loss"], loss = vocab_parallel_loss, "vocab-parallel (loss_parallel)", "tensor parallel"
    fallback = Ops(**chosen, names=dict(names))
    if kernels in ("flash", "liger") and not cuda:
        raise KernelError(f"train.kernels={kernels} needs a CUDA device (this run is on {device.type}); "
                          f"use train.kernels=torch or auto")
    if kernels == "flash" and not half:
        raise KernelError("train.kernels=flash needs BF16 or FP16 (train.precision=bf16)")

    if cuda:  # the optional fused kernels (asked for on another device: refused above)
        # auto takes FlashAttention-3 only: flash-attn 2 is the kernel SDPA already has built in (or beats, with cuDNN)
        if kernels == "flash" or (kernels == "auto" and half and _installed("flash_attn_interface")):
            mod, label = _flash_attention_module()
            chosen["attention"], names["attention"] = _flash_attention(mod), label
            if kernels == "flash":
                chosen["rms_norm"] = _flash_rms_norm(_import("flash_attn.ops.triton.layer_norm"))
                chosen["rope"] = _flash_rope(_import("flash_attn.layers.rotary"))
                names["rms_norm"] = names["rope"] = "flash-attn triton"
        # auto never takes liger (dynamo cannot trace it; its loss syncs with the host): train.kernels=liger asks for it
        if kernels == "liger":
            fn = _import("liger_kernel.transformers.functional")
            chosen["rms_norm"], chosen["rope"] = _liger_rms_norm(fn), _liger_rope(fn)
            names["rms_norm"] = names["rope"] = "liger"
            if loss == "auto":
                loss = "liger"  # (under tensor parallel the loss was decided above)
    if loss == "auto" and compiled and logits_fit:
        loss = "compiled"
    fixed = {"plain": (plain_loss, "plain"), "compiled": (compiled_loss, "plain, compiled"),
             "chunked": (chunked_loss, "chunked")}
    if loss in fixed:
        chosen["loss"], names["loss"] = fixed[loss]
    elif loss == "liger":
        if not cuda:
            raise KernelError("train.loss=liger needs a CUDA device")
        chosen["loss"], names["loss"] = _liger_loss(_import("liger_kernel.transformers.functional")), "liger fused"
    ops = Ops(**chosen, names=names)
    return ops if ops == fallback else Ops(**chosen, names=names, fallback=fallback)


def float8_supported(device: torch.device) -> str | None:
    """None when FP8 training can run on `device`, else the reason it cannot."""
    if device.type != "cuda":
        return f"FP8 training needs a CUDA GPU of compute capability >= 8.9 (this run is on {device.type})"
    cap = torch.cuda.get_device_capability(device)
    if cap < (8, 9):
        return f"FP8 training needs compute capability >= 8.9 (Ada, Hopper); this GPU has {cap[0]}.{cap[1]}"
    try:
        _import("torchao.float8")
    except KernelError as e:
        return str(e)
    return None


def convert_to_float8(model: torch.nn.Module, fsdp: bool) -> int:
    """Swap the Linear layers of the transformer blocks (not the embedding, lm_head or MoE routers) for torchao's float8
    training Linear (dynamic tensorwise scaling), FP8 all-gathers under FSDP2; returns how many were converted."""
    float8 = _import("torchao.float8")
    config = float8.Float8LinearConfig(enable_fsdp_float8_all_gather=fsdp)
    converted = []

    def only_blocks(module, fqn):
        ok = isinstance(module, torch.nn.Linear) and fqn.startswith("layers.") and not fqn.endswith("mlp.gate") and \
            module.in_features % 16 == 0 and module.out_features % 16 == 0  # FP8 GEMMs need multiples of 16
        if ok:
            converted.append(fqn)
        return ok
    float8.convert_to_float8_training(model, config=config, module_filter_fn=only_blocks)
    return len(converted)


def precompute_float8_scales(model: torch.nn.Module) -> None:
    """After each optimizer step under FSDP2 + FP8 all-gather: one all-reduce for all weight scales."""
    _import("torchao.float8").precompute_float8_dynamic_scale_for_fsdp(model)
