"""What a run holds in memory per device, by layout (DDP, FSDP2, tensor and pipeline parallel) and term (parameters,
gradients, optimizer state, working memory, activations), and the Run decided from it at start-up (`resolve`): the
micro batch that fits, the loss's kind, the parallel mode, the kernels. plan.py shows it for N GPUs before a run."""
from dataclasses import replace
from types import SimpleNamespace

import torch
import torch.distributed as dist

import config
import hardware
import kernel
from model import GPT, GPTConfig, MoE

RESERVED_GIB = 3.0  # CUDA context, NCCL and cuBLAS workspaces, allocator fragmentation
GIB = 2**30


def resolve(cfg: config.Config, model: GPTConfig, device: torch.device, precision: hardware.Precision,
            compiled: bool, rank: int, world: int) -> config.Run:
    """The Run of `cfg` for this process, given the model's resolved shape and hardware.resolve's device, precision
    and compile: decides the micro batch, the parallel mode and the kernels by the smallest memory of any rank, so
    that every rank decides alike. Raises ConfigError only where the batch does not divide over the world, KernelError
    for a kernel that cannot run here."""
    mem = hardware.memory_gib(device)
    if dist.is_initialized():
        mems = [None] * dist.get_world_size()
        dist.all_gather_object(mems, mem)
        mem = min(mems)
    cfg = replace(cfg, model=model, train=replace(cfg.train, precision=precision.name, compile=compiled))
    cfg = with_micro(cfg, micro_batch(cfg, world, mem))
    t = cfg.train
    fit = loss_kind(cfg, world, mem) == "compiled"  # (configure takes it only for train.loss=auto, compiled)
    ops = kernel.configure(t.kernels, t.loss, device, precision.dtype, compiled=compiled, logits_fit=fit, tp=t.tp)
    mode = "none"  # one process: nothing to wrap (a train.tp above 1 fails config.derive below)
    if world > 1 or t.ep > 1:
        with torch.device("meta"):
            mode = parallel_mode(t, GPT(model).num_params(), mem, device.type == "cuda")
    return config.Run(cfg, device, precision, ops, mode, rank, config.derive(cfg, world))


def meta_model(cfg: config.Config) -> GPT:
    """`cfg`'s model on the meta device, with its LoRA adapters: the parameters a plan counts."""
    with torch.device("meta"):
        model = GPT(cfg.model)
    if cfg.train.lora:
        import lora
        lora.apply(model, cfg.train)
    return model


def micro_batch(cfg: config.Config, gpus: int, mem_gib: float) -> int:
    """train.micro_batch_size (or under pp the one train.pp_microbatches sets), or under auto the largest micro batch
    that divides the batch per GPU (under pp: per pipeline stage, so that the step has a micro-batch per stage at
    least) and whose configured layout fits mem_gib (1 when none does: out-of-memory then says what else to lower)."""
    per_gpu = config.derive(cfg, gpus).micro_batch  # auto without memory: a rank's whole batch (pp: per stage)
    if cfg.train.micro_batch_size != "auto" or cfg.train.pp > 1 and cfg.train.pp_microbatches:
        return per_gpu  # the configured one
    for m in (d for d in range(per_gpu, 0, -1) if per_gpu % d == 0):
        if fits(with_micro(cfg, m), gpus, mem_gib):
            return m
    return 1


def with_micro(cfg: config.Config, micro: int) -> config.Config:
    return replace(cfg, train=replace(cfg.train, micro_batch_size=micro))


def fits(cfg: config.Config, gpus: int, mem_gib: float, loss: str | None = None) -> bool:
    """Whether the configured layout of `cfg` (one GPU planned as DDP's replica) fits mem_gib by `layout_memory`,
    the loss holding its logits as `loss` (None: as `loss_kind` decides)."""
    model = meta_model(cfg)
    mode = parallel_mode(cfg.train, model.num_params(), mem_gib)
    loss = loss or loss_kind(cfg, gpus, mem_gib)
    return layout_memory(cfg, model, gpus, mode, cfg.train.activation_checkpointing, loss)["total"] <= mem_gib


def loss_kind(cfg: config.Config, gpus: int, mem_gib: float) -> str:
    """How the loss holds a micro-batch's logits, as kernel.configure will choose it: "plain", "compiled" or
    "chunked" (liger's too). auto takes "compiled" when the step is compiled and the layout fits mem_gib with it."""
    t = cfg.train
    if t.loss in ("plain", "compiled"):
        return t.loss
    if t.loss != "auto" or t.kernels == "liger" or t.compile is False or t.tp > 1:  # TP: vocab-parallel, chunked
        return "chunked"
    return "compiled" if fits(cfg, gpus, mem_gib, "compiled") else "chunked"


def parallel_mode(t: config.TrainConfig, n_params: int, mem_gib: float, cuda: bool = True) -> str:
    """How a run over several processes is wrapped: train.parallel, where auto picks FSDP2 under train.ep, tp or pp
    above 1 (config refuses ddp with them), else DDP while the FP32 model, its gradients and AdamW's two moments (16
    bytes a parameter) take under 40 % of one device's memory (on CPUs always), else FSDP."""
    if t.parallel != "auto":
        return t.parallel
    small = not cuda or 16 * n_params < 0.4 * mem_gib * GIB
    return "ddp" if small and t.ep == t.tp == t.pp == 1 else "fsdp"


def layout_memory(cfg: config.Config, model: GPT, gpus: int, mode: str, ac: bool, loss: str) -> dict:
    """GiB per GPU of `cfg` (its train.tp and micro batch; `model` its `meta_model`) on `gpus` GPUs under `mode` (ddp |
    fsdp), with activation checkpointing `ac` and the loss holding its logits as `loss`, by term (params, grads, optim,
    working: gathered or cast weights and the loss's transients, activations) and in total with RESERVED_GIB; under
    train.pp, `pipeline_memory`."""
    t, m = cfg.train, cfg.model
    if t.pp > 1:
        return pipeline_memory(cfg, model, gpus, ac, loss)
    tp, bf16 = t.tp, t.precision != "fp32"
    tokens = t.micro_batch_size * m.block_size
    shards = gpus // tp if mode == "fsdp" else 1
    n = model.num_params()
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)  # a LoRA run: the adapters only
    n_muon = muon_cost(model, gpus)["params"] if t.optimizer == "muon" else 0
    # expert parallel: a rank's experts are never gathered
    kept = [sum(p.numel() for p in layer.mlp.experts.parameters()) if t.ep > 1 and isinstance(layer.mlp, MoE) else 0
            for layer in model.layers]
    whole, blocks = tp_params(model, tp), [tp_params(layer, tp) for layer in model.layers]  # a rank's part
    root = whole - sum(blocks)  # embeddings, head, final norm
    block = max(b - k for b, k in zip(blocks, kept))  # the largest gathered (an MoE block holds its experts)
    trained = whole * n_train / n  # what trains (a LoRA run, never split by tp: its adapters only)
    params, grads = 4 * whole / shards, 4 * trained / shards  # FP32 master weights; gradients of what trains
    optim = (8 * (trained - n_muon / tp) + 4 * n_muon / tp) / shards  # AdamW: 2 FP32 moments; Muon: 1 FP32 momentum
    if mode == "ddp":  # autocast's cached BF16 weight copies live through forward and backward
        working = 2 * n if bf16 else 0
    elif t.reshard_after_forward:  # gathered BF16 blocks (current + prefetched), their FP32 grads, the root
        working = (2 if bf16 else 4) * (2 * block + root) + 2 * 4 * block
    else:  # every block stays gathered from its forward to its backward
        working = (2 if bf16 else 4) * (whole - sum(kept)) + 2 * 4 * block
    loss = "chunked" if tp > 1 else loss  # the vocab-parallel loss holds one chunk of logits
    working += loss_transient_bytes(m, tokens, loss, t.precision, tp=tp)
    if n_muon:  # BF16 matrices in flight during Muon's step (received shards to orthogonalise; results)
        working += 2 * 2 * n_muon / gpus if mode == "fsdp" else 2 * n_muon
    act = activation_bytes(m, tokens, t.precision, bf16_params=mode == "fsdp" and bf16, checkpointing=ac, loss=loss,
                           tp=tp)
    if t.lora:  # each adapter keeps its r-wide A output and, with lora_dropout, the dropped input and its mask (the
        # undropped input is the base matmul's, counted above); under activation checkpointing, one block's worth
        import lora
        a = 2 if bf16 else 4
        per_token = sum(a * t.lora_rank + ((a + 1) * x.in_features if t.lora_dropout else 0) for x in model.modules()
                        if isinstance(x, lora.LoRALinear))
        act += per_token // (max(1, model.cfg.n_layer) if ac else 1) * tokens
    total = params + grads + optim + working + act + RESERVED_GIB * GIB
    return {"params": params / GIB, "grads": grads / GIB, "optim": optim / GIB, "working": working / GIB,
            "activations": act / GIB, "total": total / GIB}


def activation_bytes(cfg: GPTConfig, tokens: int, precision: str, bf16_params: bool = False,
                     checkpointing: bool = False, loss: str = "plain", tp: int = 1) -> int:
    """Bytes autograd saves for backward in one forward of `tokens` tokens (Llama blocks, no dropout).

    Per layer and token, by dtype (matmul activations a: 2 in BF16, 4 in FP32; residual stream r: FP32 unless the
    parameters are BF16, as under FSDP2): each RMSNorm keeps its FP32 input and normalised input and its output as
    the matmuls see it (autocast casts once per matmul: 3 copies before q/k/v, 2 before gate/up; else 1); attention
    keeps q, k, v, its output and a per-head log-sum-exp (no T x T scores); the MLP keeps gate, up, silu(gate) and
    their product. The head keeps the final norm's tensors and, by `loss`: plain, the FP32 log-probabilities;
    compiled, the logits in dtype a; chunked, none. Activation checkpointing keeps each block's input and recomputes
    one block at a time. Tensor parallel over `tp` ranks divides every term by tp except the norm outputs, which the
    column-parallel matmuls keep gathered whole."""
    d, kv, f, V = cfg.n_embd, cfg.kv_heads * cfg.head_dim, cfg.ffn_dim, cfg.padded_vocab_size
    a = 4 if precision == "fp32" else 2
    r = 2 if bf16_params else 4
    casts_attn, casts_mlp = (3, 2) if precision != "fp32" and not bf16_params else (1, 1)

    def norm(casts):  # FP32 input and normalised input, the output as the matmuls see it (under TP: gathered whole)
        return 8 * d / tp + a * d * casts
    layer = norm(casts_attn) + norm(casts_mlp) + (a * (d + 2 * kv) + a * d + 4 * cfg.n_head + 4 * a * f) / tp
    head = norm(1) + {"plain": 4 * V, "compiled": a * V, "chunked": 0}[loss] / tp
    per_token = (r * d * cfg.n_layer / tp + layer if checkpointing else layer * cfg.n_layer) + head
    return int(per_token * tokens)


def loss_transient_bytes(cfg: GPTConfig, tokens: int, loss: str = "plain", precision: str = "bf16",
                         chunk_logits: int = kernel.CHUNK_LOGITS, tp: int = 1) -> int:
    """Peak memory the loss adds beyond what it saves: plain, the BF16 and FP32 logits and their gradient;
    compiled, the logits' gradient in the matmul dtype; chunked (kernel.ChunkedLoss), one chunk of ~chunk_logits
    logits in FP32 and BF16, 12 bytes per (V, d) element (the kept FP32 dW, the BF16 weight, each chunk's BF16 dW
    and its FP32 copy) and dh; under tensor parallel, the same with each rank's V / tp vocab entries."""
    if loss == "compiled":
        return (4 if precision == "fp32" else 2) * cfg.padded_vocab_size * tokens
    if loss == "chunked":
        V, d = cfg.padded_vocab_size // tp, cfg.n_embd
        chunk = min(tokens, max(1, chunk_logits // V)) * V  # logits in one chunk
        return 6 * chunk + 12 * V * d + 4 * tokens * d
    return 10 * cfg.padded_vocab_size * tokens


def muon_cost(model: GPT, gpus: int) -> dict:
    """What train.optimizer=muon adds per step: Newton-Schulz FLOPs (5 iterations of 4 m^2 n + 2 m^3 for an m x n
    matrix, m <= n) over the GPUs, and the BF16 bytes each GPU moves (FSDP2: its shards to the owners and back; DDP:
    the matrices it does not own, broadcast). An MoE expert stack counts as one matrix per expert, nothing moved;
    frozen matrices not at all."""
    mats, experts = [], []
    for n, p in model.named_parameters():
        if p.ndim > 1 and n.startswith("layers.") and not n.endswith("mlp.gate.weight") and p.requires_grad:
            (mats if p.ndim == 2 else experts).extend([p.shape[-2:]] * (p.shape[0] if p.ndim == 3 else 1))
    flops = sum(5 * (4 * min(s) ** 2 * max(s) + 2 * min(s) ** 3) for s in mats + experts)
    moved = sum(s[0] * s[1] for s in mats)
    return {"params": moved + sum(s[0] * s[1] for s in experts), "flops": flops, "flops_per_gpu": flops / gpus,
            "fsdp_bytes": 2 * 2 * moved / gpus * (gpus - 1) / gpus, "ddp_bytes": 2 * moved * (gpus - 1) / gpus}


def tp_params(module: torch.nn.Module, tp: int) -> float:
    """Parameters of `module` that one rank of a tensor-parallel group holds: the norms and the row-parallel biases
    (o_proj, down_proj) whole, the matrices, the other biases, the embeddings and the head split tp ways."""
    return sum(p.numel() / (1 if "norm" in name or name.endswith(("o_proj.bias", "down_proj.bias")) else tp)
               for name, p in module.named_parameters())


def pipeline_memory(cfg: config.Config, model: GPT, gpus: int, ac: bool, loss: str) -> dict:
    """`layout_memory` under pipeline parallel: the pp rank with the most memory, by term. Each rank's stages are
    sharded over dp by FSDP2 (FP32 master weights, gradients, AdamW's two moments or Muon's one momentum); their
    weights stay gathered for the whole step (reshard_after_forward is off under pp) and their gradients accumulate
    unsharded in the reduce dtype until the step's one reduce-scatter; the rank of the last stage adds the loss's
    transients; activations as `pipeline_ranks` counts them."""
    t = cfg.train
    dp, wide = gpus // (t.tp * t.pp), 4 if t.precision == "fp32" else 2
    best = None
    for r in pipeline_ranks(cfg, model, gpus, ac, loss):
        held = tp_params(r["part"], t.tp)
        n_muon = muon_cost(r["part"], dp)["params"] / t.tp if t.optimizer == "muon" else 0
        params, optim = 4 * held / dp, (8 * (held - n_muon) + 4 * n_muon) / dp
        working = wide * held + (4 if t.reduce_dtype == "fp32" or wide == 4 else 2) * held + 2 * 2 * n_muon / dp
        if r["last"]:
            working += loss_transient_bytes(cfg.model, r["tokens"], r["loss"], t.precision, tp=t.tp)
        total = 2 * params + optim + working + r["activations"] + RESERVED_GIB * GIB
        if best is None or total / GIB > best["total"]:
            best = {"params": params / GIB, "grads": params / GIB, "optim": optim / GIB, "working": working / GIB,
                    "activations": r["activations"] / GIB, "total": total / GIB, "rank": r["rank"],
                    "inflight": r["inflight"], "bubble": r["bubble"]}
    return best


def pipeline_ranks(cfg: config.Config, model: GPT, gpus: int, ac: bool, loss: str) -> list[dict]:
    """Per pp rank of `cfg` (train.pp above 1, its tp, schedule and micro batch) on `gpus` GPUs: its stages, as
    pipeline.py lays them out (`stage_ids`, `layers`: loop-style schedules stages r, r + pp, r + 2 pp, ... on rank r;
    the V schedules, zero_bubble and dualpipev, r and 2 pp - 1 - r, so that rank 0 holds the first and the last),
    their modules (a container named as the model is: layers, and the embedding with stage 0, the final norm and head
    with the last stage), the activations in flight by `pipeline_schedule`, the bubble; with `ac`, each stage keeps
    only its blocks' inputs per micro-batch and recomputes one block at a time."""
    t, m = cfg.train, cfg.model
    d = config.derive(cfg, gpus)
    tokens, n = d.micro_batch * m.block_size, t.pp * config.virtual_stages(t)
    loss = "chunked" if t.tp > 1 else loss  # the vocab-parallel loss holds one chunk of logits

    def act(layers, checkpointing=False):  # activation_bytes of `layers` blocks and the head
        return activation_bytes(replace(m, n_layer=layers), tokens, t.precision, t.precision != "fp32", checkpointing,
                                loss, t.tp)
    head, block = act(0), act(1) - act(0)
    kept = act(1, True) - act(1) if ac else block  # per block and micro-batch in flight: its input, or everything
    import pipeline  # (torch.distributed.pipelining: only a pipeline plan imports it)
    weights = [len(pipeline.layers(m, n, s)) * kept + (head if s == n - 1 else 0) for s in range(n)]
    peaks, bubble = pipeline_schedule(t, d.grad_accum, weights)
    ranks = []
    for r in range(t.pp):
        stages = pipeline.stage_ids(t, r)
        first, last = 0 in stages, n - 1 in stages
        part = torch.nn.Module()
        part.layers = torch.nn.ModuleList(model.layers[i] for s in stages for i in pipeline.layers(m, n, s))
        for name in (["embed_tokens", "embed_positions"] if first else []) + (["norm", "lm_head"] if last else []):
            if hasattr(model, name):
                setattr(part, name, getattr(model, name))
        ranks.append({"rank": r, "stages": stages, "part": part, "first": first, "last": last,
                      "activations": peaks[r] + (block if ac else 0), "bubble": bubble, "tokens": tokens,
                      "inflight": peaks[r] / sum(weights[s] for s in stages), "loss": loss, "d": d})
    return ranks


def pipeline_schedule(t: config.TrainConfig, m: int, weights: list[float]) -> tuple[list[float], float]:
    """Of train.pp_schedule over train.pp ranks and `m` micro-batches, given the bytes one micro-batch's activations
    take on each stage (`weights`): per pp rank the peak bytes of activations in flight, and the bubble (the idle
    fraction of the step).

    gpipe and 1f1b by the standard counts (Huang et al. 2019; Narayanan et al. 2021, PipeDream-Flush): GPipe keeps
    all m micro-batches, 1F1B min(m, pp - r) on rank r; both idle (pp - 1) / (m + pp - 1) of the step. The
    multi-stage schedules by torch's own order of their computations (the `pipeline_order` their classes build,
    here from stand-in stages: the order needs only the stage count and the group size), walked per rank: a forward
    adds its stage's weight, a full backward (or, split, its weight-gradient half, which still needs the saved
    inputs) frees it; and run through a timing simulation of that order with forward = input-gradient = weight-gradient
    = 1 and a full backward = 2 (the zero-bubble paper's equal-cost assumption; no communication time, stages of equal
    cost, the head's extra work not counted): its bubble is 1 - busy / makespan. That gives (pp - 1) / (v m + pp - 1)
    for interleaved 1F1B (Narayanan et al. 2021) and torch's ZB-V and DualPipeV orders' own figures."""
    from torch.distributed.pipelining import schedules
    pp, v = t.pp, config.virtual_stages(t)
    if v == 1:
        keep = [m if t.pp_schedule == "gpipe" else min(m, pp - r) for r in range(pp)]
        return [k * weights[r] for r, k in enumerate(keep)], (pp - 1) / (m + pp - 1)
    n = pp * v
    stages = [SimpleNamespace(num_stages=n, group_size=pp, group_rank=0, stage_index=i, submod=None)  # stand-ins
              for i in range(v)]
    order = schedules.get_schedule_class(config.PP_SCHEDULES[t.pp_schedule][0])(stages, m).pipeline_order
    cost = {"F": 1, "I": 1, "W": 1, "B": 2}
    ops = [[(a.computation_type.value, a.stage_index, a.microbatch_index) for step in order[r] if step is not None
            for a in (step.sub_actions or [step]) if a.computation_type.value in cost] for r in range(pp)]
    peaks = []
    for rank_ops in ops:  # activations in flight
        now = peak = 0
        for kind, s, _ in rank_ops:
            now += weights[s] if kind == "F" else -weights[s] if kind in "BW" else 0
            peak = max(peak, now)
        peaks.append(peak)
    done, free, at = {}, [0] * pp, [0] * pp  # (F | G (input gradient) | W, stage, micro-batch) -> end time
    while any(at[r] < len(ops[r]) for r in range(pp)):
        moved = False
        for r in range(pp):
            while at[r] < len(ops[r]):
                kind, s, mb = ops[r][at[r]]
                needs = {"F": [("F", s - 1, mb)] if s else [],
                         "W": [("G", s, mb)]}.get(kind, [("F", s, mb)] + ([("G", s + 1, mb)] if s < n - 1 else []))
                if not all(k in done for k in needs):
                    break
                free[r] = max([free[r]] + [done[k] for k in needs]) + cost[kind]
                done[("G" if kind in "BI" else kind, s, mb)] = free[r]
                at[r], moved = at[r] + 1, True
        if not moved:
            raise RuntimeError(f"{t.pp_schedule}: torch's order does not progress in the simulation")
    return peaks, 1 - 3 * m * v / max(free)
