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
from torch.distributed.tensor.debug import CommDebugMode
from torch.utils._python_dispatch import TorchDispatchMode

import config
import hardware
import kernel
import memory
from memory import GIB
from model import GPT, GPTConfig, MoE

GPUS = {name: (g.memory_gib, g.peak_tflops) for name, g in hardware.GPUS.items()}  # one table: hardware.py
# GB/s each GPU sends to other nodes (HGX/DGX reference designs: one 200 Gb/s HDR NIC per A100, one 400 Gb/s NDR per
# Hopper GPU); other GPUs: 100 Gb/s. Only --fit uses it: whether a layout's data-parallel and pipeline traffic hides
NET_GBS = {"a100": 25, "a100-40gb": 25, "h100": 50, "h800": 50, "h200": 50}


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
    local = memory.tp_params(model, tp)  # what one rank of a tensor-parallel group holds whole after FSDP's all-gather
    if mode == "fsdp" and dp > 1:
        reduce = 2 if t.reduce_dtype == "bf16" else 4
        gathers = local * (2 if t.reshard_after_forward else 1)  # again in backward (the root too, as measured)
        syncs = 1 if t.fsdp_defer_sync else d.grad_accum
        out["dp"] = (d.grad_accum * a * gathers + syncs * reduce * local) * (dp - 1) / dp  # a: the gathered dtype
    elif mode == "ddp" and dp > 1:
        out["dp"] = 2 * 4 * local * (dp - 1) / dp
    if t.optimizer == "muon" and dp * tp > 1:
        mc = memory.muon_cost(model, dp * tp)
        out["muon"] = mc["ddp_bytes"] if mode == "ddp" else mc["fsdp_bytes"] if tp == 1 else 2 * mc["ddp_bytes"]
    out["total"] = out["tp"] + out["dp"] + out["muon"]
    return out


def tp_options(cfg: config.Config, gpus: int) -> list[int]:
    """The tensor-parallel degrees a plan shows: 1 and the powers of two up to 8 (one node) that divide the GPUs and
    that the model splits into (config.check_tp), and train.tp."""
    train = replace(cfg.train, parallel="auto", precision="bf16", kernels="auto", loss="auto")
    model_only = replace(cfg, train=train, eval=replace(cfg.eval, interval=0))  # what the model alone allows
    options = [1]
    for tp in sorted({2, 4, 8, cfg.train.tp} - {1}):
        try:
            if gpus % tp == 0:
                config.check_tp(model_only, tp)
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
    cfg = memory.with_micro(cfg, memory.micro_batch(cfg, gpus, mem_gib))
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
    model = memory.meta_model(cfg)
    t = cfg.train
    loss = memory.loss_kind(cfg, gpus, mem_gib)
    configured = (memory.parallel_mode(t, model.num_params(), mem_gib), t.activation_checkpointing, t.tp, t.pp)
    layouts = [("ddp", False, 1, 1), ("fsdp", False, 1, 1), ("fsdp", True, 1, 1)]
    for tp in tp_options(cfg, gpus):
        layouts += [("fsdp", ac, tp, 1) for ac in (False, True) if tp > 1]
        layouts += [("fsdp", ac, tp, pp) for pp in pp_options(cfg, gpus // tp) for ac in (False, True)]
    rows = []
    for mode, ac, tp, pp in layouts:
        dp = gpus // tp // pp
        # this layout's micro batch: the configured one, or a data-parallel rank's whole batch (pp: a stage's) if less
        micro = min(t.micro_batch_size, max(1, t.batch_size // dp // (pp * config.virtual_stages(t) if pp > 1 else 1)))
        row_cfg = replace(cfg, train=replace(t, tp=tp, pp=pp, micro_batch_size=micro, pp_microbatches=0))
        try:
            config.derive(row_cfg, gpus)
        except config.ConfigError:  # the batch does not divide over this layout, or not into the schedule's needs
            continue
        mem = memory.layout_memory(row_cfg, model, gpus, mode, ac, loss)
        comm = comm_bytes(row_cfg, model, dp, tp, mode, ac)
        name = mode + (f" x tp {tp}" if tp > 1 else "") + (f" x pp {pp}" if pp > 1 else "") + (" + AC" if ac else "")
        rows.append({"mode": name, "tp": tp, "dp": dp, "pp": pp, "ac": ac, "bubble": 0.0, "inflight": 1.0, **mem,
                     "fits": mem["total"] <= mem_gib, "configured": (mode, ac, tp, pp) == configured,
                     "comm": comm["total"] / GIB, "comm_tp": comm["tp"] / GIB, "comm_p2p": comm["p2p"] / GIB})
    return rows


def pipeline_comm(cfg: config.Config, model: GPT, gpus: int, ac: bool) -> dict:
    """`comm_bytes` under pipeline parallel, for the pp rank that sends the most: `p2p`, per micro-batch the
    activations it sends to the next stage and the gradients to the previous one where that stage is on another rank
    (micro x block_size x n_embd in the compute dtype, of which a tensor-parallel rank sends its 1/tp slice of the
    sequence); `dp`, FSDP2's one all-gather of its stages' weights and one reduce-scatter of their gradients per step;
    `tp`, comm_bytes's per block and micro-batch over its blocks, the embedding's on the first stage, the final norm's
    and the loss's on the last; `muon` as comm_bytes, over its stages' matrices."""
    t, m = cfg.train, cfg.model
    dp, tp, a = gpus // (t.tp * t.pp), t.tp, 4 if t.precision == "fp32" else 2
    ring, ranks = (tp - 1) / tp, memory.pipeline_ranks(cfg, model, gpus, ac, "chunked")
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
        held = memory.tp_params(r["part"], tp)
        out["dp"] = (a + (2 if t.reduce_dtype == "bf16" else 4)) * held * (dp - 1) / dp
        if t.optimizer == "muon" and dp * tp > 1:
            mc = memory.muon_cost(r["part"], dp * tp)
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
    cfg = memory.with_micro(cfg, memory.micro_batch(cfg, gpus, mem_gib))
    rows = plan(cfg, gpus, gpu)
    d = config.derive(cfg, gpus)
    model = memory.meta_model(cfg)
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
        mc = memory.muon_cost(model, gpus)
        ns_ms = mc["flops_per_gpu"] / (0.5 * peak * 1e12) * 1e3
        print(f"muon: {mc['params'] / 1e6:,.0f}M parameters in Muon; Newton-Schulz {mc['flops'] / 1e12:.2f} TFLOP per "
              f"step ({mc['flops'] / (f * d.batch_tokens):.1%} of the step), {mc['flops_per_gpu'] / 1e12:.2f} per GPU "
              f"(~{ns_ms:.1f} ms at 50 % of peak); it moves {mc['fsdp_bytes'] / GIB:.2f} GiB per GPU under FSDP2, "
              f"{mc['ddp_bytes'] / GIB:.2f} GiB under DDP (BF16)")
    print(f"memory per GPU in GiB (micro batch {cfg.train.micro_batch_size} x {cfg.model.block_size} tokens, "
          f"{cfg.train.precision}, loss {memory.loss_kind(cfg, gpus, mem_gib)}, FSDP reshard_after_forward="
          f"{cfg.train.reshard_after_forward}; {memory.RESERVED_GIB:.0f} GiB reserved for CUDA/NCCL workspaces; "
          f"working = gathered/cast weights and the loss's logits):")
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
    model, loss = memory.meta_model(cfg), memory.loss_kind(cfg, gpus, mem_gib)
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
            mem = memory.layout_memory(c, model, gpus, "fsdp", row["ac"], loss)
            comm = comm_bytes(c, model, dp, row["tp"], "fsdp", row["ac"])
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


class CommBytes(CommDebugMode):
    """torch's CommDebugMode, which counts the collectives a region runs (DTensor's and FSDP2's alike), with the bytes
    each rank sends in them by the ring count of `comm_bytes`: `bytes` after the region, by collective."""

    def __init__(self):
        super().__init__()
        self.bytes = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = super().__torch_dispatch__(func, types, args, kwargs)
        if out is not NotImplemented:
            self._add(func, args)
        return out

    # without CommDebugMode's per-module tracker: its hooks lose their place among FSDP2's on a second step
    def __enter__(self):
        self.comm_counts.clear()
        self.advanced_module_tracker.module_parents_dict[""] = []  # every collective counts at the top
        return TorchDispatchMode.__enter__(self)

    def __exit__(self, *exc):
        return TorchDispatchMode.__exit__(self, *exc)

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
        return {str(k): v for k, v in self.get_comm_counts().items()}


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
            est = memory.activation_bytes(cfg, x.numel(), precision[:4], bf16_params=precision == "bf16 params")
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
