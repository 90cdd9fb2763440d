"""Optimizers: AdamW, or Muon for the hidden matrices with AdamW for everything else; one or many processes.

    train.optimizer: adamw -> AdamW, weight decay on matrices only (never norms, biases or embedding tables)
    train.optimizer: muon  -> Muon (momentum orthogonalised by Newton-Schulz; Jordan et al. 2024) for the 2-D
                              weights inside the blocks; AdamW for the embeddings, the head, norms and biases
                              (as modded-nanogpt and nanochat split them)

Muon's update of a (A, B) matrix is scaled by 0.2 * sqrt(max(A, B)) (Moonlight's rule, Liu et al. 2025), so its
RMS matches AdamW's and it can use AdamW's learning rate and weight decay. Newton-Schulz needs whole matrices: they
are dealt out round-robin, the owner of one gathers it, orthogonalises it and sends back what each rank needs; each
momentum buffer keeps its parameter's sharding (docs/training.md has the why and the comparison with torch's Muon).
"""
import math

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.tensor import DTensor, distribute_tensor

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # Jordan's quintic: steepest slope at zero that still converges
NS_STEPS = 5


def orthogonalize(g: torch.Tensor, dtype: torch.dtype = torch.bfloat16, steps: int = NS_STEPS) -> torch.Tensor:
    """Newton-Schulz approximation of U V^T for g = U S V^T in `dtype` (singular values roughly in (0.5, 1.5), which
    Jordan found trains as well as exact); a 3-D g (MoE experts) is orthogonalised per matrix."""
    a, b, c = NS_COEFFICIENTS
    x = g.to(dtype)
    tall = x.size(-2) > x.size(-1)
    if tall:  # iterate on the wide orientation: the Gram matrix is the smaller side
        x = x.mT
    norm = x.norm() if x.ndim == 2 else x.norm(dim=(-2, -1), keepdim=True)
    x = x / norm.clamp(min=1e-7)  # spectral norm <= Frobenius norm <= 1
    mm = torch.addmm if x.ndim == 2 else torch.baddbmm  # 3-D: one matrix per expert, the same iteration
    for _ in range(steps):
        gram = x @ x.mT
        x = mm(x, mm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.mT if tall else x


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


class Muon(torch.optim.AdamW):
    """AdamW for the groups without `muon: True`, Muon for those with it, in one optimizer, so that checkpoints, the
    non-finite skip and the LR schedule treat it like AdamW. A Muon group holds `momentum` (0.95), `nesterov` (True)
    and `ns_dtype` (the Newton-Schulz dtype by name); its `lr` and `weight_decay` are in AdamW's units."""

    def __init__(self, param_groups: list[dict], group=None, **adamw):
        for g in param_groups:
            if g.get("muon"):
                if any(p.ndim not in (2, 3) for p in g["params"]):
                    raise ValueError("Muon takes 2-D parameters (and 3-D stacks of expert matrices) only")
                g.setdefault("momentum", 0.95)
                g.setdefault("nesterov", True)
                g.setdefault("ns_dtype", "bfloat16")
        super().__init__(param_groups, **adamw)
        self.group = group  # the ranks that hold these parameters: a pipeline stage's (parallel.py); None: all

    @torch.no_grad()
    def step(self, closure=None):
        everything = self.param_groups
        self.param_groups = [g for g in everything if not g.get("muon")]
        try:  # torch's AdamW (fused where asked) for the other groups
            loss = super().step(closure)
        finally:
            self.param_groups = everything
        for g in everything:
            if g.get("muon"):
                self._muon_step(g)
        return loss

    def _muon_step(self, g: dict) -> None:
        params = [p for p in g["params"] if p.grad is not None]
        mu, updates = g["momentum"], []
        for p in params:
            state = self.state[p]
            if "momentum_buffer" not in state:  # a DTensor like p under FSDP2: sharded the same way
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] = torch.tensor(0.0)  # AdamW's load_state_dict expects a step in every state
            state["step"] += 1
            grad, buf = _local(p.grad), _local(state["momentum_buffer"])
            buf.lerp_(grad, 1 - mu)
            updates.append(grad.lerp(buf, mu) if g["nesterov"] else buf.clone())
        for p, o in zip(params, self._orthogonalize(params, updates, getattr(torch, g["ns_dtype"]))):
            local = _local(p)
            local.mul_(1 - g["lr"] * g["weight_decay"])
            local.add_(o, alpha=-g["lr"] * (0.2 * math.sqrt(max(p.shape[-2:]))))  # Moonlight's scale

    def _orthogonalize(self, params: list[torch.Tensor], updates: list[torch.Tensor], dtype) -> list[torch.Tensor]:
        """Orthogonalised updates, each the shape of its local update; each matrix computed by one rank. A sharded 3-D
        expert stack (FSDP2's or expert parallel's Shard(0): whole experts) is orthogonalised where it lies."""
        world = dist.get_world_size(self.group) if dist.is_initialized() else 1
        local = [world == 1 or (p.ndim == 3 and isinstance(p, DTensor)) for p in params]
        if all(local):
            return [orthogonalize(u, dtype) for u in updates]
        done = {j: orthogonalize(u, dtype) for j, u in enumerate(updates) if local[j]}
        others = [j for j in range(len(params)) if not local[j]]
        done.update(zip(others, self._deal_out([params[j] for j in others], [updates[j] for j in others], dtype)))
        return [done[j] for j in range(len(params))]

    def _deal_out(self, params: list[torch.Tensor], updates: list[torch.Tensor], dtype) -> list[torch.Tensor]:
        """Orthogonalised updates of whole matrices dealt out round-robin over the ranks (see the module doc)."""
        world, group = dist.get_world_size(self.group), self.group
        owner = [j % world for j in range(len(params))]  # ranks of `group`
        mine = [o == dist.get_rank(group) for o in owner]
        split = [isinstance(p, DTensor) and p.device_mesh.ndim > 1 for p in params]  # FSDP2 + tensor parallel
        sharded = [isinstance(p, DTensor) and not s for p, s in zip(params, split)]  # FSDP2: Shard(0), all ranks
        rows = [-(-p.shape[0] // world) for p in params]  # FSDP2's Shard(0): ceil(n / world) rows, the last short
        full, waits = [None] * len(params), []
        out = [self._split_matrix(p, u, dtype, owner[j]) if split[j] else None
               for j, (p, u) in enumerate(zip(params, updates))]
        for j, (p, u) in enumerate(zip(params, updates)):  # 1. the owner gets each whole matrix
            if split[j]:
                continue
            if not sharded[j]:  # DDP: every rank already has it
                full[j] = u
                continue
            padded = u.new_zeros(rows[j], *p.shape[1:], dtype=dtype)
            padded[:u.size(0)] = u
            bucket = [torch.empty_like(padded) for _ in range(world)] if mine[j] else None
            waits.append(dist.gather(padded, bucket, group=group, group_dst=owner[j], async_op=True))
            full[j] = bucket
        for w in waits:
            w.wait()
        waits = []
        for j, (p, u) in enumerate(zip(params, updates)):  # 2. the owner orthogonalises, 3. and sends back
            if split[j]:
                continue
            if mine[j]:
                whole = torch.cat(full[j])[:p.shape[0]] if sharded[j] else full[j]
                result = orthogonalize(whole, dtype).contiguous()  # a tall matrix's result is a transposed view
            if not sharded[j]:  # DDP: the whole result to every rank
                out[j] = result if mine[j] else torch.empty(p.shape, dtype=dtype, device=u.device)
                waits.append(dist.broadcast(out[j], group=group, group_src=owner[j], async_op=True))
                continue
            pieces = None
            if mine[j]:
                pad = result.new_zeros(rows[j] * world - p.shape[0], *p.shape[1:])
                pieces = list(torch.cat([result, pad]).split(rows[j]))
            out[j] = torch.empty(rows[j], *p.shape[1:], dtype=dtype, device=u.device)
            waits.append(dist.scatter(out[j], pieces, group=group, group_src=owner[j], async_op=True))
        for w in waits:
            w.wait()
        return [o[:u.size(0)] for o, u in zip(out, updates)]

    def _split_matrix(self, p: DTensor, u: torch.Tensor, dtype, owner: int) -> torch.Tensor:
        """A matrix over a (dp, tp) mesh: gathered whole, orthogonalised by its owner and broadcast; each rank keeps
        its piece, laid out as p's. One at a time, so no rank holds more than one whole matrix beyond its own."""
        whole = DTensor.from_local(u.to(dtype), p.device_mesh, p.placements, run_check=False, shape=p.shape,
                                   stride=p.stride()).full_tensor()
        mine = owner == dist.get_rank(self.group)
        result = orthogonalize(whole, dtype).contiguous() if mine else torch.empty_like(whole)
        dist.broadcast(result, group=self.group, group_src=owner)
        return distribute_tensor(result, p.device_mesh, p.placements, src_data_rank=None).to_local()


def param_groups(model: nn.Module, t, muon: bool) -> list[dict]:
    """AdamW groups (decay on matrices, none on norms, biases and embedding tables); with `muon`, the blocks' 2-D
    weights and 3-D expert stacks (MoE routers aside) go to a Muon group instead, its Newton-Schulz in BF16 where the
    run's matmuls are (train.precision bf16 or fp8, as resolved), else in FP32. Frozen parameters are left out."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay, hidden = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:  # frozen (a LoRA run's base): no state, no update
            continue
        if muon and p.ndim in (2, 3) and name.startswith("layers.") and not name.endswith("mlp.gate.weight"):
            hidden.append(p)
        elif p.ndim >= 2 and id(p) not in embeddings:
            decay.append(p)
        else:
            no_decay.append(p)
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if muon:
        groups.append({"params": hidden, "weight_decay": t.weight_decay, "muon": True, "momentum": t.muon_momentum,
                       "ns_dtype": "bfloat16" if t.precision in ("bf16", "fp8") else "float32"})
    return [g for g in groups if g["params"]]


def build(model: nn.Module, t, device: torch.device) -> torch.optim.Optimizer:
    """The optimizer train.optimizer names; AdamW fused where torch has it (train.fused_optimizer=auto), else
    torch's default (for-each on GPUs, a loop on CPUs); Muon with AdamW for the rest (`param_groups`)."""
    fused = device.type in ("cuda", "cpu", "mps") if t.fused_optimizer == "auto" else bool(t.fused_optimizer)
    kw = dict(lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps, fused=fused or None)
    if t.optimizer == "adamw":
        return torch.optim.AdamW(param_groups(model, t, muon=False), **kw)
    stage = getattr(model, "stage_group", None)  # a pipeline stage's ranks deal out its matrices; None: all ranks
    return Muon(param_groups(model, t, muon=True), group=stage, **kw)


def lr_at(step: int, t, max_steps: int, peak: float) -> float:
    """Learning rate for 0-based `step` of `max_steps`, peaking at `peak` (train.lr or train.muon_lr): linear warmup,
    then cosine / linear / warmup-stable-decay / constant down to peak * train.min_lr_ratio."""
    if step < t.warmup_steps:
        return peak * (step + 1) / t.warmup_steps
    min_lr = peak * t.min_lr_ratio
    if t.schedule == "constant":
        return peak
    if t.schedule == "wsd":  # constant, then a linear decay over the last decay_frac of the run
        start = max(t.warmup_steps, int(max_steps * (1 - t.decay_frac)))
        if step < start:
            return peak
        return peak + (min_lr - peak) * min(1.0, (step - start) / max(1, max_steps - start))
    progress = min(1.0, (step - t.warmup_steps) / max(1, max_steps - t.warmup_steps))
    if t.schedule == "linear":
        return peak + (min_lr - peak) * progress
    return min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (peak - min_lr)


def set_lr(optimizer: torch.optim.Optimizer, step: int, t, max_steps: int) -> float:
    """Set `step`'s learning rates: train.lr's schedule for the AdamW groups, the same schedule peaking at
    train.muon_lr (when set) for the Muon groups. Returns AdamW's."""
    lr = lr_at(step, t, max_steps, t.lr)
    muon_lr = lr_at(step, t, max_steps, t.muon_lr) if t.muon_lr else lr
    for g in optimizer.param_groups:
        g["lr"] = muon_lr if g.get("muon") else lr
    return lr
