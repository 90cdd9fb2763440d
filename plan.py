"""Memory and throughput plan of a config on N GPUs, before renting them.

    python plan.py configs/1b.yaml --gpus 8 --gpu h100 [section.key=value ...]
    python plan.py --check        # the activation estimate against measured saved tensors on this CPU

Per GPU and per parallel mode (DDP, FSDP2, FSDP2 with activation checkpointing): parameter, gradient,
optimizer and activation memory and whether they fit; FLOPs per step and the tokens/s that 40 % and 50 % MFU
would give. The activation estimate counts the tensors autograd keeps for backward in one micro-batch, by
the dtype each has under the run's precision (see `activation_bytes`).
"""
import argparse
import sys
from dataclasses import replace

import torch
import torch.distributed as dist

import config
import hardware
import kernels
from model import GPT, GPTConfig, MoE

GPUS = {name: (g.memory_gib, g.peak_tflops) for name, g in hardware.GPUS.items()}  # one table: hardware.py
RESERVED_GIB = 3.0  # CUDA context, NCCL and cuBLAS workspaces, allocator fragmentation
GIB = 2**30


def activation_bytes(cfg: GPTConfig, tokens: int, precision: str, bf16_params: bool = False,
                     checkpointing: bool = False, loss: str = "plain") -> int:
    """Bytes autograd saves for backward in one forward of `tokens` tokens (Llama blocks, no dropout).

    Per layer and token, by the dtype each tensor has (matmul activations a: 2 in BF16, 4 in FP32; residual stream r:
    FP32 unless the parameters themselves are BF16, as under FSDP2 mixed precision): each RMSNorm computes in FP32 and
    keeps its FP32 input and normalised input, plus its output as the matmuls see it (autocast casts once per matmul: 3
    copies before q/k/v, 2 before gate/up; FP32 or BF16 parameters need 1); attention keeps q, k, v, its output (the
    o_proj input is a view of it) and a per-head log-sum-exp (no T x T scores with flash/SDPA kernels); the MLP keeps
    gate, up, silu(gate) and their product. The head keeps the final norm's tensors and, by `loss` (see `loss_kind`):
    plain, the FP32 log-probabilities (4 bytes per vocab entry); compiled, the logits in the matmul dtype (a); chunked,
    none of them. Activation checkpointing keeps each block's input and recomputes one block at a time."""
    d, kv, f, V = cfg.n_embd, cfg.kv_heads * cfg.head_dim, cfg.ffn_dim, cfg.padded_vocab_size
    a = 4 if precision == "fp32" else 2
    r = 2 if bf16_params else 4
    casts_attn, casts_mlp = (3, 2) if precision != "fp32" and not bf16_params else (1, 1)

    def norm(casts):
        return 8 * d + a * d * casts
    layer = norm(casts_attn) + a * (d + 2 * kv) + a * d + 4 * cfg.n_head + norm(casts_mlp) + 4 * a * f
    head = norm(1) + {"plain": 4 * V, "compiled": a * V, "chunked": 0}[loss]
    per_token = (r * d * cfg.n_layer + layer if checkpointing else layer * cfg.n_layer) + head
    return per_token * tokens


def loss_transient_bytes(cfg: GPTConfig, tokens: int, loss: str = "plain", precision: str = "bf16",
                         chunk_logits: int = kernels.CHUNK_LOGITS) -> int:
    """Peak memory the loss adds beyond what it saves: plain (eager), the BF16 logits and the FP32 logits and their
    gradient; compiled, the logits' gradient in the matmul dtype (inductor fuses the softmax into passes over the
    saved logits and holds less than the 4 and 8 bytes per logit counted here and in `activation_bytes`:
    BENCHMARKS.md); chunked (kernels.ChunkedLoss), one chunk of ~chunk_logits logits in FP32 and BF16, then 12
    bytes per (V, d) element (the kept FP32 dW, the BF16 copy of the weight, each chunk's BF16 dW product and its
    FP32 copy), and dh. Within 5 % of what torch's MemTracker measures on CPU (tests/test_kernels.py)."""
    if loss == "compiled":
        return (4 if precision == "fp32" else 2) * cfg.padded_vocab_size * tokens
    if loss == "chunked":
        V, d = cfg.padded_vocab_size, cfg.n_embd
        chunk = min(tokens, max(1, chunk_logits // V)) * V  # logits in one chunk
        return 6 * chunk + 12 * V * d + 4 * tokens * d
    return 10 * cfg.padded_vocab_size * tokens


def muon_cost(model: GPT, gpus: int) -> dict:
    """What train.optimizer=muon adds per step (optim.py): Newton-Schulz FLOPs (5 iterations of 4 m^2 n + 2 m^3
    for an m x n matrix, m <= n), dealt out over the GPUs, and the bytes each GPU moves for it in BF16 (FSDP2:
    its shards out to the owners and back; DDP: the orthogonalised matrices it does not own, broadcast). MoE expert
    stacks count as one matrix per expert, orthogonalised where their shards lie (FSDP2, ep), nothing moved."""
    mats, experts = [], []
    for n, p in model.named_parameters():
        if p.ndim > 1 and n.startswith("layers.") and not n.endswith("mlp.gate.weight"):  # routers: AdamW
            (mats if p.ndim == 2 else experts).extend([p.shape[-2:]] * (p.shape[0] if p.ndim == 3 else 1))
    flops = sum(5 * (4 * min(s) ** 2 * max(s) + 2 * min(s) ** 3) for s in mats + experts)
    moved = sum(s[0] * s[1] for s in mats)
    return {"params": moved + sum(s[0] * s[1] for s in experts), "flops": flops, "flops_per_gpu": flops / gpus,
            "fsdp_bytes": 2 * 2 * moved / gpus * (gpus - 1) / gpus, "ddp_bytes": 2 * moved * (gpus - 1) / gpus}


def loss_kind(cfg: config.Config, gpus: int, mem_gib: float) -> str:
    """How the loss holds a micro-batch's (tokens, vocab) logits, as kernels.configure will choose it: "plain"
    (eager, all of them in FP32), "compiled" (all of them, fused by inductor) or "chunked" (one chunk at a time;
    liger's too). train.loss auto takes "compiled" when the step is compiled and the configured parallel mode fits
    in mem_gib with it; else "chunked"."""
    t = cfg.train
    if t.loss in ("plain", "compiled"):
        return t.loss
    if t.loss != "auto" or t.kernels == "liger" or t.compile is False:
        return "chunked"
    compiled = replace(cfg, train=replace(t, loss="compiled"))
    return "compiled" if next(r for r in plan(compiled, gpus, (mem_gib, 0.0)) if r["configured"])["fits"] else "chunked"


def micro_batch(cfg: config.Config, gpus: int, mem_gib: float) -> int:
    """train.micro_batch_size, or under auto the largest micro batch that divides the batch per GPU and whose
    configured plan fits mem_gib (1 when none does: out-of-memory then says what else to lower)."""
    t = cfg.train
    if t.micro_batch_size != "auto":
        return t.micro_batch_size
    per_gpu = config.derive(cfg, gpus).micro_batch  # auto without memory: a rank's whole batch
    for m in (d for d in range(per_gpu, 0, -1) if per_gpu % d == 0):
        if next(r for r in plan(with_micro(cfg, m), gpus, (mem_gib, 0.0)) if r["configured"])["fits"]:
            return m
    return 1


def with_micro(cfg: config.Config, micro: int) -> config.Config:
    return replace(cfg, train=replace(cfg.train, micro_batch_size=micro))


def parallel_mode(parallel: str, world: int, n_params: int, mem_gib: float, cuda: bool = True) -> str:
    """'none' on one process; else train.parallel, where auto picks DDP while the FP32 model, its gradients and
    AdamW's two moments (16 bytes a parameter) take under 40 % of one device's memory (on CPUs always), else FSDP."""
    if world == 1:
        return "none"
    if parallel != "auto":
        return parallel
    return "ddp" if not cuda or 16 * n_params < 0.4 * mem_gib * GIB else "fsdp"


def resolve(cfg: config.Config, model: GPTConfig, device: torch.device, precision: hardware.Precision,
            compiled: bool, rank: int, world: int) -> config.Run:
    """The Run of `cfg` for this process: `model` is the model's resolved shape (train.init_from's, the data's
    vocab), device, precision and compile come from hardware.resolve; here the micro batch (auto: the largest
    that fits the device's memory by this plan), the parallel mode and the kernels (the loss by whether the
    full logits fit) are decided, by the smallest memory of any rank, so that every rank decides alike. Raises
    ConfigError or KernelError."""
    mem = hardware.memory_gib(device)
    if dist.is_initialized():
        mems = [None] * dist.get_world_size()
        dist.all_gather_object(mems, mem)
        mem = min(mems)
    cfg = replace(cfg, model=model, train=replace(cfg.train, precision=precision.name, compile=compiled))
    cfg = with_micro(cfg, micro_batch(cfg, world, mem))
    t = cfg.train
    fit = t.loss == "auto" and compiled and full_logits(cfg, world, mem)
    ops = kernels.configure(t.kernels, t.loss, device, precision.dtype, compiled=compiled, logits_fit=fit)
    with torch.device("meta"):
        n = GPT(model).num_params()
    mode = parallel_mode(t.parallel, world, n, mem, device.type == "cuda")
    if t.ep > 1:  # expert parallel runs beside FSDP2, over all ranks
        if t.ep != world:
            raise config.ConfigError(f"train.ep={t.ep} must equal the world size ({world}): the experts are sharded "
                                     f"over every rank")
        mode = "fsdp"
    return config.Run(cfg, device, precision, ops, mode, rank, config.derive(cfg, world))


def full_logits(cfg: config.Config, gpus: int, mem_gib: float) -> bool:
    """Whether the loss holds a micro-batch's full logits (`loss_kind` is plain or compiled)."""
    return loss_kind(cfg, gpus, mem_gib) != "chunked"


def plan(cfg: config.Config, gpus: int, gpu: str | tuple[float, float]) -> list[dict]:
    """One row per parallel mode: memory terms in GiB per GPU, fits, and throughput at 40 / 50 % MFU. `gpu`: a
    name in hardware.GPUS, or (memory GiB, peak TFLOP/s)."""
    mem_gib, peak_tflops = GPUS[gpu] if isinstance(gpu, str) else gpu
    cfg = with_micro(cfg, micro_batch(cfg, gpus, mem_gib))
    with torch.device("meta"):
        model = GPT(cfg.model)
    n = model.num_params()
    blocks = [sum(p.numel() for p in layer.parameters()) for layer in model.layers]
    block = max(blocks)  # the largest (an MoE block holds all its experts)
    root = n - sum(blocks)  # embeddings, head, final norm
    experts = [sum(p.numel() for p in layer.mlp.experts.parameters()) if isinstance(layer.mlp, MoE) else 0
               for layer in model.layers]
    gathered = n  # what FSDP2 holds gathered when no block reshards after forward
    if cfg.train.ep > 1:  # expert parallel: a rank's experts stay where they are, never gathered
        block, gathered = block - max(experts), n - sum(experts)
    flops_tok = model.flops_per_token()
    t, m = cfg.train, cfg.model
    tokens = t.micro_batch_size * m.block_size
    bf16 = t.precision != "fp32"
    loss = loss_kind(cfg, gpus, mem_gib)
    mode_of_run = "fsdp" if t.ep > 1 else parallel_mode(t.parallel, max(gpus, 2), n, mem_gib)  # 1 GPU: DDP's
    n_muon = muon_cost(model, gpus)["params"] if t.optimizer == "muon" else 0
    rows = []
    for mode, ac in (("ddp", False), ("fsdp", False), ("fsdp", True)):
        shards = gpus if mode == "fsdp" else 1
        params, grads = 4 * n / shards, 4 * n / shards  # FP32 master weights and gradients
        optim = (8 * (n - n_muon) + 4 * n_muon) / shards  # AdamW: 2 FP32 moments; Muon: 1 FP32 momentum
        if mode == "ddp":  # autocast's cached BF16 weight copies live through forward and backward
            working = 2 * n if bf16 else 0
        elif t.reshard_after_forward:  # gathered BF16 blocks (current + prefetched), their unsharded FP32
            working = (2 if bf16 else 4) * (2 * block + root) + 2 * 4 * block  # their unsharded grads, the root
        else:  # every block stays gathered from its forward to its backward
            working = (2 if bf16 else 4) * gathered + 2 * 4 * block
        working += loss_transient_bytes(m, tokens, loss, t.precision)
        if n_muon:  # BF16 matrices in flight during Muon's step (received shards to orthogonalise; results)
            working += 2 * 2 * n_muon / gpus if mode == "fsdp" else 2 * n_muon
        act = activation_bytes(m, tokens, t.precision, bf16_params=mode == "fsdp" and bf16, checkpointing=ac, loss=loss)
        total = params + grads + optim + working + act + RESERVED_GIB * GIB
        rows.append({"mode": mode + (" + AC" if ac else ""), "params": params / GIB, "grads": grads / GIB,
                     "optim": optim / GIB, "working": working / GIB, "activations": act / GIB,
                     "total": total / GIB, "fits": total / GIB <= mem_gib,
                     "configured": (mode, ac) == (mode_of_run, t.activation_checkpointing)})
    step_flops = flops_tok * config.derive(cfg, gpus).batch_tokens
    for r in rows:
        r.update(step_tflops=step_flops / 1e12, **{
            f"tok_s_per_gpu_at_{p}": p / 100 * peak_tflops * 1e12 / flops_tok for p in (40, 50)})
    return rows


def print_plan(cfg: config.Config, gpus: int, gpu: str) -> None:
    mem_gib, peak = GPUS[gpu]
    cfg = with_micro(cfg, micro_batch(cfg, gpus, mem_gib))
    rows = plan(cfg, gpus, gpu)
    d = config.derive(cfg, gpus)
    with torch.device("meta"):
        model = GPT(cfg.model)
    f = model.flops_per_token()
    experts, active = sum(p.numel() for m in model.modules() if isinstance(m, MoE) for p in m.experts.parameters()), ""
    if experts:  # an MoE: the parameters a token uses, which the FLOPs count
        ep = f", experts over ep={cfg.train.ep} ranks" if cfg.train.ep > 1 else ""
        active = f" ({(model.num_params() - experts + model.active_expert_params()) / 1e6:,.0f}M active per token{ep})"
    print(f"{model.num_params() / 1e6:,.0f}M parameters{active}, {f / 1e9:.2f} GFLOPs/token (PaLM: 6N + 12 L d T); "
          f"{gpus} x {gpu} ({mem_gib} GiB, {peak} BF16 TFLOP/s)")
    print(d.banner(cfg))
    print(f"per step: {f * d.batch_tokens / 1e15:.1f} PFLOP; per GPU at 40 % MFU: "
          f"{rows[0]['tok_s_per_gpu_at_40']:,.0f} tok/s ({d.batch_tokens / gpus / rows[0]['tok_s_per_gpu_at_40']:.2f}"
          f" s/step), at 50 %: {rows[0]['tok_s_per_gpu_at_50']:,.0f} tok/s "
          f"({d.batch_tokens / gpus / rows[0]['tok_s_per_gpu_at_50']:.2f} s/step)")
    if cfg.train.optimizer == "muon":
        mc = muon_cost(model, gpus)
        ns_ms = mc["flops_per_gpu"] / (0.5 * peak * 1e12) * 1e3
        print(f"muon: {mc['params'] / 1e6:,.0f}M parameters in Muon; Newton-Schulz {mc['flops'] / 1e12:.2f} TFLOP per "
              f"step ({mc['flops'] / (f * d.batch_tokens):.1%} of the step), {mc['flops_per_gpu'] / 1e12:.2f} per GPU "
              f"(~{ns_ms:.1f} ms at 50 % of peak); it moves {mc['fsdp_bytes'] / GIB:.2f} GiB per GPU under FSDP2, "
              f"{mc['ddp_bytes'] / GIB:.2f} GiB under DDP (BF16)")
    print(f"memory per GPU in GiB (micro batch {cfg.train.micro_batch_size} x {cfg.model.block_size} tokens, "
          f"{cfg.train.precision}, loss {loss_kind(cfg, gpus, mem_gib)}, FSDP reshard_after_forward="
          f"{cfg.train.reshard_after_forward}; {RESERVED_GIB:.0f} GiB reserved for CUDA/NCCL workspaces; working = "
          f"gathered/cast weights and the loss's logits):")
    print(f"{'mode':<10} {'params':>7} {'grads':>7} {'optim':>7} {'working':>8} {'activ.':>7} {'total':>7}  fits")
    for r in rows:
        print(f"{r['mode']:<10} {r['params']:7.2f} {r['grads']:7.2f} {r['optim']:7.2f} {r['working']:8.2f} "
              f"{r['activations']:7.2f} {r['total']:7.2f}  {'yes' if r['fits'] else 'NO '}"
              f"{'  <- the config' if r['configured'] else ''}")


def measure_saved(model: GPT, tokens: torch.Tensor, precision: str) -> int:
    """Bytes of the distinct tensors autograd saves in one forward (what backward will need)."""
    seen = {}

    def pack(t):
        if not (t.requires_grad and isinstance(t, torch.nn.Parameter) or t.data_ptr() == 0):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    params = {p.untyped_storage().data_ptr() for p in model.parameters()} | {
        b.untyped_storage().data_ptr() for b in model.buffers()}
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else torch.autocast("cpu", enabled=False)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), ctx:
        loss = model(tokens, tokens)
    loss.backward()
    return sum(n for ptr, n in seen.items() if ptr not in params)


def check() -> None:
    """Estimate vs measured saved-tensor bytes for a few small shapes (CPU, torch SDPA, unchunked loss); in BF16
    the estimate adds autocast's weight copies, which the plan counts as working memory."""
    ops = kernels.configure("torch", "plain")  # the estimate's unchunked head; SDPA saves what flash-attn saves
    shapes = [dict(n_layer=2, n_embd=256, n_head=4, block_size=256),
              dict(n_layer=4, n_embd=384, n_head=6, n_kv_head=2, block_size=128),
              dict(n_layer=2, n_embd=512, n_head=8, block_size=512, intermediate_size=1024)]
    print(f"{'shape':<52} {'prec':>11} {'estimate MiB':>13} {'measured MiB':>13} {'error':>7}")
    for s in shapes:
        cfg = GPTConfig(vocab_size=4096, **s)
        torch.manual_seed(0)
        model = GPT(cfg, ops)
        x = torch.randint(0, cfg.vocab_size, (4, cfg.block_size))
        for precision in ("fp32", "bf16", "bf16 params"):
            est = activation_bytes(cfg, x.numel(), precision[:4], bf16_params=precision == "bf16 params")
            if precision == "bf16":  # autocast's BF16 weight copies are saved for backward too
                est += 2 * sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
            m = model.to(torch.bfloat16) if precision == "bf16 params" else model  # as FSDP2 computes
            got = measure_saved(m, x, "fp32" if precision == "bf16 params" else precision)
            print(f"{str(s):<52} {precision:>11} {est / 2**20:13.1f} {got / 2**20:13.1f} {est / got - 1:+7.1%}")


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("args", nargs="*", help="YAML configs and section.key=value overrides, as for train.py")
    p.add_argument("--gpus", type=config.at_least(1), default=8)
    p.add_argument("--gpu", choices=list(GPUS), default="h100")
    p.add_argument("--check", action="store_true", help="compare the activation estimate with this CPU")
    a = p.parse_intermixed_args(argv)
    if a.check:
        check()
        return 0
    try:
        cfg = config.load(a.args)
        if cfg.model.vocab_size is None:
            cfg = replace(cfg, model=replace(cfg.model, vocab_size=50257))
            print("model.vocab_size is unset (it comes from the data): planning with 50257")
        print_plan(cfg, a.gpus, a.gpu)
    except config.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
