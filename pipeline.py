"""Pipeline parallel (train.pp), in the manner of torchtitan's pipelining: each rank keeps its stages of the model
(`split`, called by parallel.parallelize on the meta device before any other wrapping) and `Pipeline` runs torch's
schedule over them (torch.distributed.pipelining: GPipe, 1F1B, Interleaved1F1B, ZBVZeroBubble, DualPipeV). A stage
is GPT.forward over some of the model's own blocks, so parameter names stay those of the unsplit model: checkpoints
(DCP), exports and the plan see one model whatever the layout.
"""
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining.schedules import PipelineScheduleSingle, get_schedule_class

import config
from model import GPT, GPTConfig


class _Layers(nn.ModuleDict):
    """A pipeline rank's blocks under their places in the whole model ("layers.7.mlp..."), iterated in order."""

    def __iter__(self):
        return iter(self.values())


class _Stage(GPT):
    """One pipeline stage: GPT.forward over some blocks of `whole` (the embedding if it is the first stage, the final
    norm, head and loss if the last). Its modules are whole's, so parameters keep the unsplit model's names, and
    whole's kernels, RoPE table and config are read from it, never copied."""

    def __init__(self, whole: GPT, layers: range, first: bool, last: bool):
        nn.Module.__init__(self)
        self._whole = [whole]  # in a list: not a submodule
        self.embed_tokens = whole.embed_tokens if first else None
        if whole.cfg.arch == "gpt2":
            self.embed_positions = whole.embed_positions if first else None
        self.dropout = whole.dropout
        self.layers = _Layers({str(i): whole.layers[str(i)] for i in layers})
        self.norm, self.lm_head = (whole.norm, whole.lm_head) if last else (None, None)

    cfg = property(lambda self: self._whole[0].cfg)
    ops = property(lambda self: self._whole[0].ops)
    rope = property(lambda self: self._whole[0].rope)


def stage_ids(t: config.TrainConfig, pp_rank: int) -> list[int]:
    """The pipeline stages pp rank `pp_rank` holds under `t` (see split; memory.pipeline_ranks counts by it too)."""
    S = t.pp * config.virtual_stages(t)
    if t.pp_schedule in ("zero_bubble", "dualpipev"):
        return [pp_rank, S - 1 - pp_rank]
    return list(range(pp_rank, S, t.pp))


def layers(cfg: GPTConfig, S: int, s: int) -> range:
    """The blocks of stage `s` of `S`: runs of consecutive layers, as even as the count allows."""
    return range(s * cfg.n_layer // S, (s + 1) * cfg.n_layer // S)


def split(model: GPT, run: config.Run, mesh) -> None:
    """Cut `model` (on the meta device, in place) to this rank's pipeline stages: train.pp x the schedule's stages per
    rank cut the blocks into runs of consecutive layers (stage s: layers s L / S to (s + 1) L / S); a looped schedule
    gives rank r stages r, r + pp, ..., a V schedule (zero_bubble, dualpipev) stages r and 2 pp - 1 - r. `model` keeps
    what its stages hold (the others' blocks, and the embedding or head it does not hold, become absent) and, for
    parallel.py and Pipeline, `stages` [(stage index, stage)], `pp_group` (over the pipeline's ranks) and
    `stage_group` (over a stage's dp x tp ranks: Muon deals out its matrices among these, optim.py)."""
    S, ids = run.pp * config.virtual_stages(run.cfg.train), stage_ids(run.cfg.train, run.pp_rank)
    model.layers = _Layers({str(i): model.layers[i] for s in sorted(ids) for i in layers(model.cfg, S, s)})
    stages = [(s, _Stage(model, layers(model.cfg, S, s), s == 0, s == S - 1)) for s in ids]
    if 0 not in ids:
        model.embed_tokens = None
        if model.cfg.arch == "gpt2":
            model.embed_positions = None
    if S - 1 not in ids:
        model.norm = model.lm_head = None
    # every rank makes every stage's group (new_group is collective), then keeps its own
    ranks = run.dp * run.tp
    groups = [dist.new_group(list(range(i * ranks, (i + 1) * ranks))) for i in range(run.pp)]
    model.stages, model.pp_group, model.stage_group = stages, mesh["pp"].get_group(), groups[run.pp_rank]


class Pipeline:
    """What a pipeline-parallel run's step calls instead of the model: torch's schedule (train.pp_schedule) over this
    rank's stages. The step's micro-batches go in as one batch, which the schedule cuts back into them; the last
    stage's loss is the model's mean per micro-batch over their number, so the gradients are the step's mean as
    with gradient accumulation, and every stage's gradients are complete when `step` returns."""

    def __init__(self, model: GPT, run: config.Run):
        t, self.model, self.run, self.n = run.cfg.train, model, run, run.grad_accum
        self.group = model.pp_group
        S = run.pp * config.virtual_stages(t)
        self.parts = dict(model.stages)  # by stage index
        self.owner = [next(r for r in range(run.pp) if s in stage_ids(t, r)) for s in range(S)]  # stage -> pp rank
        self.stages = [PipelineStage(part, s, S, run.device, group=self.group) for s, part in model.stages]
        self.first = any(s.is_first for s in self.stages)
        self.last = any(s.is_last for s in self.stages)
        if t.compile and t.pp_schedule in ("zero_bubble", "dualpipev"):
            # their input-gradient half keeps the graph for the weight half (retain_graph), which compiled backward
            # graphs that reuse ("donate") their saved buffers refuse
            torch._functorch.config.donated_buffer = False
        schedule = get_schedule_class(config.PP_SCHEDULES[t.pp_schedule][0])
        one = issubclass(schedule, PipelineScheduleSingle)
        self.schedule = schedule(self.stages[0] if one else self.stages, n_microbatches=self.n,
                                 loss_fn=lambda loss, target: loss / self.n, scale_grads=False)

    def step(self, batches) -> torch.Tensor:
        """Forward and backward of the step's micro-batches [(x, y)]; the sum of their losses, on every rank of the
        pipeline (from the last stage's: one all-reduce of a number), as a tensor-parallel group's ranks all have it."""
        xs, ys = zip(*batches)
        x, y, losses = torch.cat(xs), torch.cat(ys), []
        with self.run.precision.autocast(self.run.device):  # the last stage gets the targets: GPT.forward's loss
            self.schedule.step(*([x] if self.first else []), target=y, losses=losses, return_outputs=False, targets=y)
        loss = torch.stack(losses).detach().sum() * self.n if self.last else torch.zeros((), device=self.run.device)
        dist.all_reduce(loss, group=self.group)
        return loss

    @torch.no_grad()
    def nats(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The summed cross-entropy of batch (x, y) (-1 targets ignored), on every rank of the pipeline: one forward
        through the stages in order, each rank running its own and passing the residual stream on (no schedule:
        torch's zero-bubble ones have no forward-only mode)."""
        me, h, loss = self.run.pp_rank, x, None
        for s in range(len(self.owner)):
            prev = self.owner[s - 1] if s else None  # the rank holding the stage before
            if self.owner[s] == me:
                if prev not in (me, None):
                    meta = [None]
                    dist.recv_object_list(meta, group=self.group, group_src=prev)
                    h = torch.empty(meta[0][0], dtype=meta[0][1], device=self.run.device)
                    dist.recv(h, group=self.group, group_src=prev)
                with self.run.precision.autocast(self.run.device):
                    h = loss = self.parts[s](h, targets=y)
            elif prev == me:
                dist.send_object_list([(h.shape, h.dtype)], group=self.group, group_dst=self.owner[s])
                dist.send(h.contiguous(), group=self.group, group_dst=self.owner[s])
        count = (y >= 0).sum()
        nats = torch.where(count > 0, loss.float() * count, 0.0) if self.last else \
            torch.zeros((), device=self.run.device)  # (an all-padding batch's mean is NaN)
        dist.all_reduce(nats, group=self.group)  # every stage's rank has it, as a tensor-parallel group's ranks do
        return nats

    def clip(self, max_norm: float) -> torch.Tensor:
        """step.clip_grads over the whole pipeline: each rank's norm (over its dp x tp mesh, by torch's DTensors)
        squared and summed over the stages, then every stage's gradients scaled by the one global norm."""
        params = list(self.model.parameters())
        norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        square = (norm.full_tensor() if hasattr(norm, "full_tensor") else norm) ** 2
        dist.all_reduce(square, group=self.group)
        torch.nn.utils.clip_grads_with_norm_(params, max_norm or float("inf"), square.sqrt())
        return square.sqrt()

    def train(self, mode: bool = True):
        for m in (self.model, *self.parts.values()):
            m.train(mode)
        return self

    def eval(self):
        return self.train(False)
