"""Pipeline-parallel training against one process, run by tests/test_pp.py as
`torchrun --nproc_per_node=N tests/pp_worker.py DATASET OUT.json CASE...` (CASE: layout:schedule:arch:optimizer, the
layout pp2, dp2pp2 or pp2tp2). Per case, the same 4-layer model trains 10 steps split by parallel.parallelize and
parallel.Pipeline (step.train_step, as train.py runs it) and whole in one process (the reference, on rank 0, once
per model and optimizer), on the same batches: 8 sequences a step, micro-batches of 2 (the reference accumulates 4). Rank 0 writes to OUT.json,
per case, the largest differences over the 10 steps of the global mean loss and the gradient norm, of every weight
after them (gathered whole, over every rank's stages), and then, after one stage's weights are made NaN, whether
every rank skipped that step and kept its weights.
"""
import json
import os
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import config  # noqa: E402
import memory  # noqa: E402
import optim  # noqa: E402
import parallel  # noqa: E402
import plan  # noqa: E402
import step  # noqa: E402
from build import build_model  # noqa: E402
from conftest import TINY, make_run  # noqa: E402
from model import GPT  # noqa: E402

LAYOUTS = {"pp2": ["train.pp=2"], "dp2pp2": ["train.pp=2"], "pp2tp2": ["train.pp=2", "train.tp=2"]}
STEPS = 10


def whole(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def batches(global_batch: torch.Tensor, micro: int, part: int = 0, parts: int = 1) -> list:
    rows = global_batch.tensor_split(parts)[part]
    return [(b[:, :-1], b[:, 1:]) for b in rows.split(micro)]


def reference(args: list[str], alone, cache: dict) -> tuple[list, list, dict]:
    """The one-process run of `args` (its losses, gradient norms and final weights): computed once per model and
    optimizer by rank 0 (with Muon's group `alone`), shared with every rank."""
    key = tuple(args)
    if key not in cache:
        got, run = [None], make_run(config.load(args), world=1)  # (memory.resolve gathers every rank's memory)
        if dist.get_rank() == 0:
            ref = build_model(run.cfg, run.device, run.ops)
            opt = optim.build(ref, run.cfg.train, run.device)
            opt.group = alone
            t, out = run.cfg.train, ([], [])
            for i in range(STEPS):
                x = torch.randint(0, 512, (t.batch_size, run.cfg.model.block_size + 1),
                                  generator=torch.Generator().manual_seed(i))
                optim.set_lr(opt, i, t, STEPS)
                loss, norm, _ = step.train_step(ref, ref, opt, batches(x, t.micro_batch_size), run)
                out[0].append(loss.item() / run.grad_accum)
                out[1].append(norm.item())
            got = [(*out, {n: p.detach() for n, p in ref.named_parameters()})]
        dist.broadcast_object_list(got, src=0)
        cache[key] = got[0]
    return cache[key]


def case(dataset: str, name: str, alone, cache: dict) -> dict:
    layout, schedule, arch, optimizer = name.split(":")
    args = ["configs/tiny.yaml", *TINY, f"data.datasets=[{dataset}]", "train.precision=fp32", "model.vocab_size=512",
            "model.n_layer=4", "model.n_head=4", "model.tie_embeddings=false", "eval.interval=0",
            "train.micro_batch_size=2", f"model.arch={arch}", f"train.optimizer={optimizer}", "train.muon_lr=0.02"]
    ref_losses, ref_norms, refs = reference(args, alone, cache)
    cfg = config.load([*args, *LAYOUTS[layout], f"train.pp_schedule={schedule}"])
    run = make_run(cfg, world=dist.get_world_size(), rank=dist.get_rank())
    model = build_model(run.cfg, run.device, run.ops, parallelize=lambda m: parallel.parallelize(m, run))
    pipe = parallel.wrap(model, run)
    opt = optim.build(model, run.cfg.train, run.device)
    t, T, out = run.cfg.train, cfg.model.block_size, {"loss": 0.0, "norm": 0.0}
    for i in range(STEPS):
        x = torch.randint(0, 512, (t.batch_size, T + 1), generator=torch.Generator().manual_seed(i))
        optim.set_lr(opt, i, t, STEPS)
        loss, norm, _ = step.train_step(model, pipe, opt, batches(x, run.cfg.train.micro_batch_size,
                                                                  run.dp_rank, run.dp), run)
        mean = loss.detach() / run.grad_accum
        dist.all_reduce(mean)  # every rank holds its pipeline's loss, the mean of its dp rank's sequences
        out["loss"] = max(out["loss"], abs(mean.item() / run.world_size - ref_losses[i]))
        out["norm"] = max(out["norm"], abs(norm.item() - ref_norms[i]))
    diff = torch.tensor(max((whole(p.detach()) - refs[n]).abs().max().item()
                            for n, p in model.named_parameters()))
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    out["param"] = diff.item()
    # a NaN weight on the first stage only: every rank sees the flag and skips, weights kept on all
    first = model.embed_tokens is not None
    if first:
        with torch.no_grad():
            whole_emb = model.embed_tokens.weight
            (whole_emb.to_local() if hasattr(whole_emb, "to_local") else whole_emb).fill_(float("nan"))
    kept = {n: whole(p.detach()).clone() for n, p in model.named_parameters() if "embed_tokens" not in n}
    x = torch.randint(0, 512, (t.batch_size, T + 1), generator=torch.Generator().manual_seed(STEPS))
    _, _, bad = step.train_step(model, pipe, opt, batches(x, run.cfg.train.micro_batch_size, run.dp_rank, run.dp), run)
    same = all(torch.equal(whole(p.detach()), kept[n]) for n, p in model.named_parameters() if n in kept)
    flags = torch.tensor([bad.item(), float(same)])
    dist.all_reduce(flags, op=dist.ReduceOp.MIN)
    out["skipped_by_all"] = flags.tolist() == [1.0, 1.0]
    return out


def measure(dataset: str, schedule: str, *shape: str) -> dict:
    """One step of `schedule` over the ranks (after a first one, which also infers the stages' shapes): on each rank
    the most (stage, micro-batch) activations in flight at once (a forward keeps them; a full backward, or a split
    one's weight half, frees them) and the bytes it sends to other stages' ranks, against memory.pipeline_schedule
    (stages weighted 1) and plan.pipeline_comm's stage-boundary bytes; and the bubble measured over three more steps,
    1 - (each rank's seconds inside its stages' forwards and backwards) / (the schedule's seconds), the ranks' mean
    (communication waits count as bubble). `shape`: more overrides (scripts/pp_bubble.sh's larger model)."""
    from torch.distributed.pipelining import stage as stage_module
    cfg = config.load(["configs/tiny.yaml", *TINY, f"data.datasets=[{dataset}]", "train.precision=fp32",
                       "model.vocab_size=512", "model.n_layer=4", "model.n_head=4", "model.tie_embeddings=false",
                       "eval.interval=0", "train.micro_batch_size=1", "train.optimizer=adamw",
                       f"train.pp={dist.get_world_size()}", f"train.pp_schedule={schedule}", *shape])
    run = make_run(cfg, world=dist.get_world_size(), rank=dist.get_rank())
    model = build_model(run.cfg, run.device, run.ops, parallelize=lambda m: parallel.parallelize(m, run))
    pipe, opt = parallel.wrap(model, run), optim.build(model, run.cfg.train, run.device)
    t, T = run.cfg.train, cfg.model.block_size
    count = {"now": 0, "peak": 0, "sent": 0, "busy": 0.0}
    cls, real = stage_module._PipelineStageBase, {}

    def counting(name, delta):
        real[name] = getattr(cls, name)

        def wrapped(self, *args, **kwargs):
            if name != "backward_one_chunk" or kwargs.get("full_backward", True):
                count["now"] += delta
                count["peak"] = max(count["peak"], count["now"])
            t0 = time.perf_counter()
            out = real[name](self, *args, **kwargs)
            count["busy"] += time.perf_counter() - t0
            return out
        setattr(cls, name, wrapped)

    def sending(name):  # the send operations a stage makes, forward (activations) and backward (their gradients)
        real[name] = getattr(cls, name)

        def wrapped(self, *args, **kwargs):
            ops = real[name](self, *args, **kwargs)
            count["sent"] += sum(op.tensor.nbytes for op in ops)
            return ops
        setattr(cls, name, wrapped)
    x = torch.randint(0, 512, (t.batch_size, T + 1), generator=torch.Generator().manual_seed(0))
    step.train_step(model, pipe, opt, batches(x, t.micro_batch_size), run)
    for name, delta in (("forward_one_chunk", 1), ("backward_one_chunk", -1), ("backward_weight_one_chunk", -1)):
        counting(name, delta)
    sending("get_fwd_send_ops")
    sending("get_bwd_send_ops")
    try:
        step.train_step(model, pipe, opt, batches(x, t.micro_batch_size), run)
        peak, sent, count["busy"], wall = count["peak"], count["sent"], 0.0, 0.0
        for _ in range(3 if shape else 0):  # the bubble's timing: scripts/pp_bubble.sh's larger model only
            dist.barrier()
            t0 = time.perf_counter()
            pipe.step(batches(x, t.micro_batch_size))
            wall += time.perf_counter() - t0
            opt.zero_grad(set_to_none=True)
    finally:
        for name, fn in real.items():
            setattr(cls, name, fn)
    got = [None] * dist.get_world_size()
    dist.all_gather_object(got, (peak, sent, 1 - count["busy"] / wall if wall else None))
    S = run.pp * config.virtual_stages(t)
    planned_peaks, bubble = memory.pipeline_schedule(t, run.grad_accum, [1.0] * S)
    with torch.device("meta"):
        whole_model = GPT(run.cfg.model)
    return {"inflight": [g[0] for g in got], "planned_inflight": planned_peaks, "sent": max(g[1] for g in got),
            "planned_sent": plan.pipeline_comm(run.cfg, whole_model, run.world_size, False)["p2p"],
            "bubble": sum(g[2] for g in got) / len(got) if shape else None, "planned_bubble": bubble,
            "microbatches": run.grad_accum}


def main(dataset: str, out: str, *cases: str) -> None:
    dist.init_process_group("gloo")
    torch.set_flush_denormal(True)
    alone, cache = [dist.new_group([r]) for r in range(dist.get_world_size())][dist.get_rank()], {}
    results = {name: measure(dataset, *name.split(":")[1:]) if name.startswith("measure:") else
               case(dataset, name, alone, cache) for name in cases}
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump(results, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
