"""Memory and throughput plan of a config on N GPUs, before renting them.

    python plan.py configs/1b.yaml --gpus 8 --gpu h100 [--fit] [section.key=value ...]
    python plan.py --check        # the activation estimate against measured saved tensors on this CPU

Per GPU and per layout (DDP, FSDP2, FSDP2 with activation checkpointing, FSDP2 + tensor parallel of each degree
the model splits into, and pipeline stages of each degree under those): parameter, gradient, optimizer and
activation memory and whether they fit, the pipeline's bubble, bytes sent per step; FLOPs per step and the tokens/s
at 40 % and 50 % MFU; `--fit` names the smallest train.tp, then train.pp that fits (see `fit`).
"""
import argparse
import sys
from dataclasses import replace

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

import config
import hardware
import kernel
from model import GPT, GPTConfig, MoE

GPUS = {name: (g.memory_gib, g.peak_tflops) for name, g in hardware.GPUS.items()}  # one table: hardware.py
RESERVED_GIB = 3.0  # CUDA context, NCCL and cuBLAS workspaces, allocator fragmentation
GIB = 2**30
# GB/s each GPU sends to other nodes (HGX/DGX reference designs: one 200 Gb/s HDR NIC per A100, one 400 Gb/s NDR per
# Hopper GPU); other GPUs: 100 Gb/s. Only --fit uses it: whether a layout's data-parallel and pipeline traffic hides
NET_GBS = {"a100": 25, "a100-40gb": 25, "h100": 50, "h800": 50, "h200": 50}


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


def lora_activation_bytes(model: GPT, t, tokens: int, precision: str, checkpointing: bool = False) -> int:
    """What LoRA adapters add to `activation_bytes`: each keeps its r-wide A output and, with lora_dropout, the
    dropped input and its mask (the undropped input is the base matmul's, already counted); with activation
    checkpointing, one block's worth."""
    import lora
    a = 4 if precision == "fp32" else 2
    adapted = [m for m in model.modules() if isinstance(m, lora.LoRALinear)]
    per_token = sum(a * t.lora_rank + ((a + 1) * m.in_features if t.lora_dropout else 0) for m in adapted)
    if checkpointing:
        per_token //= max(1, model.cfg.n_layer)
    return per_token * tokens


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


def loss_kind(cfg: config.Config, gpus: int, mem_gib: float) -> str:
    """How the loss holds a micro-batch's logits, as kernel.configure will choose it: "plain", "compiled" or
    "chunked" (liger's too). auto takes "compiled" when the step is compiled and the layout fits mem_gib with it."""
    t = cfg.train
    if t.loss in ("plain", "compiled"):
        return t.loss
    if t.loss != "auto" or t.kernels == "liger" or t.compile is False or t.tp > 1:  # TP: vocab-parallel, chunked
        return "chunked"
    return "compiled" if fits(cfg, gpus, mem_gib, "compiled") else "chunked"


def micro_batch(cfg: config.Config, gpus: int, mem_gib: float) -> int:
    """train.micro_batch_size (or under pp the one train.pp_microbatches sets), or under auto the largest micro batch
    that divides the batch per GPU (under pp: per pipeline stage, so that the step has a micro-batch per stage at
    least) and whose configured layout fits mem_gib (1 when none does: out-of-memory then says what else to lower)."""
    if cfg.train.micro_batch_size != "auto" or cfg.train.pp > 1 and cfg.train.pp_microbatches:
        return config.derive(cfg, gpus).micro_batch
    per_gpu = config.derive(cfg, gpus).micro_batch  # auto without memory: a rank's whole batch (pp: per stage)
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


def parallel_mode(t: config.TrainConfig, n_params: int, mem_gib: float, cuda: bool = True) -> str:
    """How a run over several processes is wrapped: FSDP2 with expert, tensor or pipeline parallel (train.ep, train.tp
    or train.pp above 1); else train.parallel, where auto picks DDP while the FP32 model, its gradients and AdamW's
    two moments (16 bytes a parameter) take under 40 % of one device's memory (on CPUs always), else FSDP."""
    if t.ep > 1 or t.tp > 1 or t.pp > 1:
        return "fsdp"
    if t.parallel != "auto":
        return t.parallel
    return "ddp" if not cuda or 16 * n_params < 0.4 * mem_gib * GIB else "fsdp"


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
    fit = t.loss == "auto" and compiled and loss_kind(cfg, world, mem) == "compiled"
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


def tp_params(module: torch.nn.Module, tp: int) -> float:
    """Parameters of `module` that one rank of a tensor-parallel group holds: the norms and the row-parallel biases
    (o_proj, down_proj) whole, the matrices, the other biases, the embeddings and the head split tp ways."""
    return sum(p.numel() / (1 if "norm" in name or name.endswith(("o_proj.bias", "down_proj.bias")) else tp)
               for name, p in module.named_parameters())


def comm_bytes(cfg: config.Config, model: GPT, dp: int, tp: int, mode: str, ac: bool) -> dict:
    """Bytes each GPU sends per optimizer step of `cfg` (whose train.tp is `tp`) by ring algorithms (S bytes
    all-gathered or reduce-scattered over n ranks: S (n - 1) / n per rank; an all-reduce twice that), by kind: `tp`,
    per block and micro-batch the all-gathers of the attention and MLP inputs and reduce-scatters of their outputs
    in forward, backward and (with activation checkpointing) the recomputed forward, plus the embedding's, the final
    norm's and the loss's three all-reduces of one FP32 number per token; `dp`, FSDP2's parameter all-gathers and
    gradient reduce-scatters, or DDP's one all-reduce of FP32 gradients; `muon`, Muon's matrices to their owners and
    back. Scalars are left out. Under train.pp (`dp` then the data-parallel degree of a stage), `pipeline_comm`."""
    t, m = cfg.train, cfg.model
    if t.pp > 1:
        return pipeline_comm(cfg, model, dp * tp * t.pp, ac)
    d = config.derive(cfg, dp * tp)
    tokens = d.micro_batch * m.block_size  # per micro-batch and rank
    a = 4 if t.precision == "fp32" else 2
    ring = (tp - 1) / tp
    out = {"tp": 0.0, "dp": 0.0, "muon": 0.0, "p2p": 0.0}
    if tp > 1:
        per_block = (8 + (4 if ac else 0)) * tokens * m.n_embd * a * ring
        ends = 4 * tokens * m.n_embd * a * ring + 3 * 2 * 4 * tokens * ring  # embedding, final norm; the loss
        if m.arch == "gpt2":
            ends += 2 * m.block_size * m.n_embd * a * ring  # the position embedding's reduce-scatter, its backward
        out["tp"] = d.grad_accum * (per_block * m.n_layer + ends)
    local = tp_params(model, tp)  # what one rank of a tensor-parallel group holds whole after FSDP's all-gather
    if mode == "fsdp" and dp > 1:
        gather = 2 if t.precision != "fp32" else 4
        reduce = 2 if t.reduce_dtype == "bf16" else 4
        gathers = local * (2 if t.reshard_after_forward else 1)  # again in backward (the root too, as measured)
        syncs = 1 if t.fsdp_defer_sync else d.grad_accum
        out["dp"] = (d.grad_accum * gather * gathers + syncs * reduce * local) * (dp - 1) / dp
    elif mode == "ddp" and dp > 1:
        out["dp"] = 2 * 4 * local * (dp - 1) / dp
    if t.optimizer == "muon" and dp * tp > 1:
        mc = muon_cost(model, dp * tp)
        out["muon"] = mc["ddp_bytes"] if mode == "ddp" else mc["fsdp_bytes"] if tp == 1 else 2 * mc["ddp_bytes"]
    out["total"] = out["tp"] + out["dp"] + out["muon"]
    return out


def tp_options(cfg: config.Config, gpus: int) -> list[int]:
    """The tensor-parallel degrees a plan shows: 1 and the powers of two up to 8 (one node) that divide the GPUs and
    that the model splits into (config.check_tp), and train.tp."""
    options = []
    for tp in sorted({1, 2, 4, 8, cfg.train.tp}):
        if tp > gpus or gpus % tp:
            continue
        try:
            if tp > 1:
                train = replace(cfg.train, parallel="auto", precision="bf16", kernels="auto", loss="auto")
                config.check_tp(replace(cfg, train=train, eval=replace(cfg.eval, interval=0)), tp)  # the model alone
            options.append(tp)
        except config.ConfigError:
            pass
    return options


def plan(cfg: config.Config, gpus: int, gpu: str | tuple[float, float]) -> list[dict]:
    """One row per layout of `gpus` GPUs: DDP, FSDP2, FSDP2 with activation checkpointing, and FSDP2 + tensor
    parallel (with and without checkpointing) for each degree of `tp_options`; memory terms in GiB per GPU, fits,
    bytes each GPU sends per step (comm_bytes) and throughput at 40 / 50 % MFU; and pipeline rows (`layout_rows`)
    with their bubble. `send_s`: the seconds a GPU takes to send its non-tensor-parallel bytes to other nodes at
    NET_GBS (0 on one node of 8 or fewer), `compute_s`: the step's compute at 40 % MFU; `hides`: the first fits in the
    second (FSDP2's and the pipeline's transfers overlap compute). `gpu`: a name in hardware.GPUS, or (memory GiB,
    peak TFLOP/s), then with 400 Gb/s per GPU between nodes."""
    mem_gib, peak_tflops = GPUS[gpu] if isinstance(gpu, str) else gpu
    net = NET_GBS.get(gpu, 12.5) if isinstance(gpu, str) else 50
    cfg = with_micro(cfg, micro_batch(cfg, gpus, mem_gib))
    rows = layout_rows(cfg, gpus, mem_gib)
    with torch.device("meta"):
        flops_tok = GPT(cfg.model).flops_per_token()
    step_flops = flops_tok * config.derive(cfg, gpus).batch_tokens
    for r in rows:
        r.update(step_tflops=step_flops / 1e12, **{
            f"tok_s_per_gpu_at_{p}": p / 100 * peak_tflops * 1e12 / flops_tok for p in (40, 50)})
        r["send_s"] = (r["comm"] - r["comm_tp"]) * GIB / (net * 1e9) if gpus > 8 else 0.0
        r["compute_s"] = step_flops / gpus / (0.4 * peak_tflops * 1e12) if peak_tflops else float("inf")
        r["hides"] = r["send_s"] <= r["compute_s"]
    return rows


def layout_rows(cfg: config.Config, gpus: int, mem_gib: float) -> list[dict]:
    """`plan`'s rows without the throughput columns: each layout's `layout_memory`, whether it fits, `comm_bytes`.
    Pipeline rows (FSDP2 inside each stage, with and without checkpointing, for each degree of `pp_options` under each
    tensor-parallel degree) run train.pp_schedule, with at most a stage's share of a data-parallel rank's batch per
    micro-batch, so that each stage has a micro-batch."""
    model = meta_model(cfg)
    t = cfg.train
    loss = loss_kind(cfg, gpus, mem_gib)
    configured = (parallel_mode(t, model.num_params(), mem_gib), t.activation_checkpointing, t.tp, t.pp)
    layouts = [("ddp", False, 1, 1), ("fsdp", False, 1, 1), ("fsdp", True, 1, 1)]
    for tp in tp_options(cfg, gpus):
        layouts += [("fsdp", ac, tp, 1) for ac in (False, True) if tp > 1]
        layouts += [("fsdp", ac, tp, pp) for pp in pp_options(cfg, gpus // tp) for ac in (False, True)]
    rows = []
    for mode, ac, tp, pp in layouts:
        dp = gpus // tp // pp
        # the micro batch of this layout: the configured one, or a data-parallel rank's whole batch (under pp: a
        # stage's share of it) if smaller
        micro = min(t.micro_batch_size, max(1, t.batch_size // dp // (pp * config.virtual_stages(t) if pp > 1 else 1)))
        row_cfg = replace(cfg, train=replace(t, tp=tp, pp=pp, micro_batch_size=micro, pp_microbatches=0))
        try:
            config.derive(row_cfg, gpus)
        except config.ConfigError:  # the batch does not divide over this layout, or not into the schedule's needs
            continue
        mem = layout_memory(row_cfg, model, gpus, mode, ac, loss)
        comm = comm_bytes(row_cfg, model, dp, tp, mode, ac)
        name = mode + (f" x tp {tp}" if tp > 1 else "") + (f" x pp {pp}" if pp > 1 else "") + (" + AC" if ac else "")
        rows.append({"mode": name, "tp": tp, "dp": dp, "pp": pp, "ac": ac, "bubble": 0.0, "inflight": 1.0, **mem,
                     "fits": mem["total"] <= mem_gib, "configured": (mode, ac, tp, pp) == configured,
                     "comm": comm["total"] / GIB, "comm_tp": comm["tp"] / GIB, "comm_p2p": comm["p2p"] / GIB})
    return rows


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
    if t.lora:
        act += lora_activation_bytes(model, t, tokens, t.precision, checkpointing=ac)
    total = params + grads + optim + working + act + RESERVED_GIB * GIB
    return {"params": params / GIB, "grads": grads / GIB, "optim": optim / GIB, "working": working / GIB,
            "activations": act / GIB, "total": total / GIB}


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
    stages = [argparse.Namespace(num_stages=n, group_size=pp, group_rank=0, stage_index=i, submod=None)  # stand-ins
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


def pipeline_ranks(cfg: config.Config, model: GPT, gpus: int, ac: bool, loss: str) -> list[dict]:
    """Per pp rank of `cfg` (train.pp above 1, its tp, schedule and micro batch) on `gpus` GPUs: its stages, as
    pipeline.py lays them out (`stage_ids`, `layers`: loop-style schedules stages r, r + pp, r + 2 pp, ... on rank r;
    the V schedules, zero_bubble and dualpipev, r and 2 pp - 1 - r, so that rank 0 holds the first and the last),
    their modules (a container named as the model is: layers, and the
    embedding with stage 0, the final norm and head with the last stage), the activations in flight by
    `pipeline_schedule`, the bubble; with `ac`, each stage keeps only its blocks' inputs per micro-batch and
    recomputes one block at a time."""
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
        part = torch.nn.Module()
        part.layers = torch.nn.ModuleList(model.layers[i] for s in stages for i in pipeline.layers(m, n, s))
        ends = (["embed_tokens", "embed_positions"] if 0 in stages else []) + (["norm", "lm_head"] if n - 1 in stages
                                                                               else [])
        for name in ends:
            if hasattr(model, name):
                setattr(part, name, getattr(model, name))
        ranks.append({"rank": r, "stages": stages, "part": part, "first": 0 in stages, "last": n - 1 in stages,
                      "activations": peaks[r] + (block if ac else 0), "bubble": bubble, "tokens": tokens,
                      "inflight": peaks[r] / sum(weights[s] for s in stages), "loss": loss, "d": d})
    return ranks


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


def pipeline_comm(cfg: config.Config, model: GPT, gpus: int, ac: bool) -> dict:
    """`comm_bytes` under pipeline parallel, for the pp rank that sends the most: `p2p`, per micro-batch the
    activations it sends to the next stage and the gradients to the previous one where that stage is on another rank
    (micro x block_size x n_embd in the compute dtype, of which a tensor-parallel rank sends its 1/tp slice of the
    sequence); `dp`, FSDP2's one all-gather of its stages' weights and one reduce-scatter of their gradients per step;
    `tp`, comm_bytes's per block and micro-batch over its blocks, the embedding's on the first stage, the final norm's
    and the loss's on the last; `muon` as comm_bytes, over its stages' matrices."""
    t, m = cfg.train, cfg.model
    dp, tp, a = gpus // (t.tp * t.pp), t.tp, 4 if t.precision == "fp32" else 2
    ring, ranks = (tp - 1) / tp, pipeline_ranks(cfg, model, gpus, ac, "chunked")
    owner = {s: r["rank"] for r in ranks for s in r["stages"]}
    best = None
    for r in ranks:
        mb, tokens, n = r["d"].grad_accum, r["tokens"], len(owner)
        sends = sum((s < n - 1 and owner[s + 1] != r["rank"]) + (s > 0 and owner[s - 1] != r["rank"])
                    for s in r["stages"])
        out = {"p2p": mb * sends * tokens * m.n_embd * a / tp, "tp": 0.0, "dp": 0.0, "muon": 0.0}
        if tp > 1:
            ends = 2 * tokens * m.n_embd * a * ring * (r["first"] + r["last"]) + 3 * 2 * 4 * tokens * ring * r["last"]
            if m.arch == "gpt2" and r["first"]:
                ends += 2 * m.block_size * m.n_embd * a * ring
            out["tp"] = mb * ((8 + (4 if ac else 0)) * tokens * m.n_embd * a * ring * len(r["part"].layers) + ends)
        held = tp_params(r["part"], tp)
        out["dp"] = (a + (2 if t.reduce_dtype == "bf16" else 4)) * held * (dp - 1) / dp
        if t.optimizer == "muon" and dp * tp > 1:
            mc = muon_cost(r["part"], dp * tp)
            out["muon"] = mc["fsdp_bytes"] if tp == 1 else 2 * mc["ddp_bytes"]
        out["total"] = out["p2p"] + out["tp"] + out["dp"] + out["muon"]
        best = out if best is None or out["total"] > best["total"] else best
    return best


def pp_options(cfg: config.Config, ranks: int) -> list[int]:
    """The pipeline degrees a plan shows on `ranks` GPUs per tensor-parallel rank: the powers of two from 2 that
    divide them and whose pp x pp_virtual_stages stages each get a layer (config.check_pp), and train.pp."""
    options = []
    for pp in sorted(({2 ** i for i in range(1, ranks.bit_length())} | {cfg.train.pp}) - {1}):
        train = replace(cfg.train, pp=pp, parallel="auto", precision="bf16")
        try:
            if ranks % pp == 0:
                config.check_pp(replace(cfg, train=train, eval=replace(cfg.eval, interval=0)))
                options.append(pp)
        except config.ConfigError:
            pass
    return options


def fit(rows: list[dict]) -> dict | None:
    """The row that fits with the smallest tensor-parallel degree, then the smallest pipeline degree, then without
    activation checkpointing where one fits (its recompute costs ~25 % more compute), FSDP2 before DDP. Among the rows
    that fit, the efficient ones come first: those whose traffic between nodes hides behind compute (`plan`'s
    `hides`: FSDP2 across many nodes, which all-gathers the whole model every micro-batch, gives way to pipeline
    stages) and whose pipeline idles at most a tenth of the step (the bubble); None when nothing fits."""
    fitting = [r for r in rows if r["fits"]]
    return min(fitting, key=lambda r: (not r.get("hides", True) or r["bubble"] > 0.1, r["tp"], r["pp"], r["ac"],
                                       r["mode"].startswith("ddp")), default=None)


def print_plan(cfg: config.Config, gpus: int, gpu: str, show_fit: bool = False) -> None:
    mem_gib, peak = GPUS[gpu]
    cfg = with_micro(cfg, micro_batch(cfg, gpus, mem_gib))
    rows = plan(cfg, gpus, gpu)
    d = config.derive(cfg, gpus)
    model = meta_model(cfg)
    f = model.flops_per_token()
    experts, active = sum(p.numel() for m in model.modules() if isinstance(m, MoE) for p in m.experts.parameters()), ""
    if experts:  # an MoE: the parameters a token uses, which the FLOPs count
        ep = f", experts over ep={cfg.train.ep} ranks" if cfg.train.ep > 1 else ""
        active = f" ({(model.num_params() - experts + model.active_expert_params()) / 1e6:,.0f}M active per token{ep})"
    print(f"{model.num_params() / 1e6:,.0f}M parameters{active}, {f / 1e9:.2f} GFLOPs/token (PaLM: 6N + 12 L d T); "
          f"{gpus} x {gpu} ({mem_gib} GiB, {peak} BF16 TFLOP/s)")
    if cfg.train.lora:
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        print(f"LoRA rank {cfg.train.lora_rank} on {', '.join(cfg.train.lora_targets)}: {n_train / 1e6:,.2f}M "
              f"trainable parameters ({n_train / model.num_params():.2%}); gradients and optimizer state for those "
              f"only, the frozen base in FP32 (FLOPs/token as full training counts them: the base's weight "
              f"gradients are skipped, about a third of the step's matmuls)")
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
    print(f"{'mode':<24} {'params':>7} {'grads':>7} {'optim':>7} {'working':>8} {'activ.':>7} {'total':>7}  fits  "
          f"{'bubble':>6}  {'comm GiB/step (of it TP, P2P)':>31}  {'send s':>6}")
    for r in rows:
        bubble = f"{r['bubble']:6.1%}" if r["pp"] > 1 else ""
        comm = f"{r['comm']:.2f} ({r['comm_tp']:.2f}, {r['comm_p2p']:.2f})"
        print(f"{r['mode']:<24} {r['params']:7.2f} {r['grads']:7.2f} {r['optim']:7.2f} {r['working']:8.2f} "
              f"{r['activations']:7.2f} {r['total']:7.2f}  {'yes' if r['fits'] else 'NO '}  {bubble:>6}  {comm:>31}  "
              f"{r['send_s']:6.1f}{'  <- the config' if r['configured'] else ''}")
    print(f"comm: bytes each GPU sends per optimizer step (ring collectives, point-to-point between stages; "
          f"comm_bytes); TP's belong on NVLink, keep train.tp within a node. send s: the rest at "
          f"{NET_GBS.get(gpu, 12.5)} GB/s per GPU between nodes (0 on one node), against "
          f"{rows[0]['compute_s']:.1f} s of compute at 40 % MFU. bubble: the idle fraction of "
          f"train.pp_schedule={cfg.train.pp_schedule} (pipeline_schedule)")
    if show_fit:
        best = fit(rows)
        pp = f" train.pp={best['pp']} train.pp_schedule={cfg.train.pp_schedule}" if best and best["pp"] > 1 else ""
        print("--fit: nothing fits; lower train.micro_batch_size or use more GPUs" if best is None else
              f"--fit: the smallest tensor-parallel, then pipeline degree that fits"
              f"{' efficiently' if best['hides'] and best['bubble'] <= 0.1 else ''} is {best['mode']}: "
              f"train.tp={best['tp']}{' train.parallel=ddp' if best['mode'].startswith('ddp') else ''}{pp}"
              f" train.activation_checkpointing={str(best['ac']).lower()}")
        if best is not None and best["pp"] > 1:
            print_schedules(cfg, gpus, mem_gib, best)


def print_schedules(cfg: config.Config, gpus: int, mem_gib: float, row: dict) -> None:
    """The pipeline layout of `row` under each train.pp_schedule: bubble, activations in flight on the rank with the
    most memory (which rank; in micro-batches of that rank's layers), memory and bytes sent per GPU."""
    t = cfg.train
    dp = gpus // row["tp"] // row["pp"]
    model, loss = meta_model(cfg), loss_kind(cfg, gpus, mem_gib)
    print(f"schedules at tp {row['tp']} x pp {row['pp']} x dp {dp}"
          f"{' + AC' if row['ac'] else ''}: {'schedule':<17} {'stages':>6} {'micro-batches':>13} {'bubble':>7} "
          f"{'rank':>4} {'in flight':>9} {'total GiB':>9} {'P2P GiB':>8}")
    for name in config.PP_SCHEDULES:
        micro = min(t.micro_batch_size, max(1, t.batch_size // dp // (row["pp"] * 2)))
        train = replace(t, tp=row["tp"], pp=row["pp"], pp_schedule=name, pp_virtual_stages=0, micro_batch_size=micro,
                        pp_microbatches=0)
        c = replace(cfg, train=train)
        try:
            d = config.derive(c, gpus)
            mem, comm = layout_memory(c, model, gpus, "fsdp", row["ac"], loss), comm_bytes(c, model, dp, row["tp"],
                                                                                            "fsdp", row["ac"])
        except (config.ConfigError, ValueError) as e:  # too few micro-batches for the schedule, too few layers
            print(f"{'':>{len('schedules at')}} {name:<17} {str(e)[:80]}")
            continue
        print(f"{'':>{len('schedules at')}} {name:<17} {row['pp'] * config.virtual_stages(train):6} "
              f"{d.grad_accum:13} {mem['bubble']:7.1%} {mem['rank']:4} {mem['inflight']:9.2f} {mem['total']:9.2f} "
              f"{comm['p2p'] / GIB:8.2f}")
    print("(1f1b, gpipe by the standard counts; interleaved_1f1b, zero_bubble, dualpipev by torch's own order of each "
          "schedule with forward = backward-input = backward-weight time; in flight: micro-batches of the rank's "
          "layers whose activations are kept)")


def measure_saved(model: GPT, tokens: torch.Tensor, precision: str) -> int:
    """Bytes of the distinct tensors autograd saves in one forward (what backward will need); of a DTensor (tensor
    parallel), its local part on this rank."""
    seen = {}

    def storage(t):
        with torch.no_grad():
            return (t.to_local() if isinstance(t, DTensor) else t).untyped_storage()

    def pack(t):
        try:
            kept = storage(t)
            ptr = kept.data_ptr()
        except RuntimeError:  # a tensor without storage of its own (DTensor's dispatch wrappers)
            return t
        if not (t.requires_grad and isinstance(t, torch.nn.Parameter)) and ptr != 0:
            seen[ptr] = kept.nbytes()
        return t
    params = {storage(p).data_ptr() for p in model.parameters()} | {storage(b).data_ptr() for b in model.buffers()}
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else torch.autocast("cpu", enabled=False)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), ctx:
        loss = model(tokens, tokens)
    loss.backward()
    return sum(n for ptr, n in seen.items() if ptr not in params)


class CommBytes:
    """torch's CommDebugMode, which counts the collectives a region runs (DTensor's and FSDP2's alike), with the bytes
    each rank sends in them by the ring count of `comm_bytes`: `bytes` after the region, by collective."""

    def __init__(self):
        from torch.distributed.tensor.debug import CommDebugMode
        from torch.utils._python_dispatch import TorchDispatchMode

        class Tally(CommDebugMode):
            def __torch_dispatch__(mode, func, types, args=(), kwargs=None):
                out = super().__torch_dispatch__(func, types, args, kwargs)
                if out is not NotImplemented:
                    self._add(func, args)
                return out

            # without CommDebugMode's per-module tracker: its hooks lose their place among FSDP2's on a second step
            def __enter__(mode):
                mode.comm_counts.clear()
                mode.advanced_module_tracker.module_parents_dict[""] = []  # every collective counts at the top
                return TorchDispatchMode.__enter__(mode)

            def __exit__(mode, *exc):
                return TorchDispatchMode.__exit__(mode, *exc)
        self.mode, self.bytes = Tally(), {}

    def _add(self, func, args) -> None:
        from torch.distributed.distributed_c10d import _resolve_process_group
        name = func._overloadpacket.__name__.strip("_")
        if name in ("all_gather_into_tensor", "allgather_base"):  # (input, n, group) / (output, input, group)
            size, n = (args[0].nbytes * args[1], args[1]) if name.startswith("all_gather") else \
                (args[0].nbytes, args[0].numel() // args[1].numel())
        elif name in ("reduce_scatter_tensor", "reduce_scatter_base"):  # (input, op, n, group) / (output, input, ..)
            size, n = (args[0].nbytes, args[2]) if name.startswith("reduce_scatter_tensor") else \
                (args[1].nbytes, args[1].numel() // args[0].numel())
        elif name in ("all_reduce", "allreduce"):  # (input, op, group name) / ([tensors], group, ...): 2 ring passes
            group = _resolve_process_group(args[2]) if name == "all_reduce" else dist.ProcessGroup.unbox(args[1])
            size, n = 2 * sum(t.nbytes for t in (args[0] if isinstance(args[0], list) else [args[0]])), group.size()
        else:
            return
        self.bytes[name] = self.bytes.get(name, 0) + size * (n - 1) / n

    def counts(self) -> dict:
        return {str(k): v for k, v in self.mode.get_comm_counts().items()}

    def __enter__(self):
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self.mode.__exit__(*exc)


def check() -> None:
    """Estimate vs measured saved-tensor bytes for a few small shapes (CPU, torch SDPA, unchunked loss); in BF16
    the estimate adds autocast's weight copies, which the plan counts as working memory."""
    ops = kernel.configure("torch", "plain")  # the estimate's unchunked head; SDPA saves what flash-attn saves
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
    p.add_argument("--fit", action="store_true", help="name the smallest train.tp, then train.pp (then FSDP2, then "
                                                      "activation checkpointing) whose plan fits the GPU")
    a = p.parse_intermixed_args(argv)
    if a.check:
        check()
        return 0
    try:
        cfg = config.load(a.args)
        if cfg.model.vocab_size is None:
            cfg = replace(cfg, model=replace(cfg.model, vocab_size=50257))
            print("model.vocab_size is unset (it comes from the data): planning with 50257")
        print_plan(cfg, a.gpus, a.gpu, a.fit)
    except config.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
