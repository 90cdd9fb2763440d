"""Tensor-parallel checks that need a process group, run by tests/test_tp.py as
`torchrun --nproc_per_node=2 tests/tp_worker.py DATASET OUT.json`. Rank 0 writes what it measured to OUT.json and
tests/test_tp.py asserts on it:

  models: for Llama with GQA, GPT-2 (biases, learned positions) and Llama with qk_norm and the squared-ReLU MLP,
          all with tied embeddings, split over 2 ranks (dp 1 x tp 2) by parallel.parallelize: the loss (the
          vocab-parallel loss against the unsplit plain one), every parameter's gradient (gathered whole), the
          gradient norm as step.py computes it, the logits, and one AdamW and one Muon step, each against the same
          model in one process; the largest absolute differences.
  comm:   the bytes sent in one training step as plan.CommBytes (torch's CommDebugMode) counts them, against
          plan.comm_bytes, for dp 1 x tp 2 (tensor parallel) and dp 2 x tp 1 (FSDP2).
  saved:  the bytes autograd keeps for backward on a rank of dp 1 x tp 2, against memory.activation_bytes.
"""
import json
import os
import sys
from dataclasses import replace

import torch
import torch.distributed as dist
from torch.distributed.tensor import distribute_tensor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import config  # noqa: E402
from build import build_model  # noqa: E402
import kernel  # noqa: E402
import memory  # noqa: E402
import optim  # noqa: E402
import parallel  # noqa: E402
import plan  # noqa: E402
import step  # noqa: E402
from conftest import TINY, make_run  # noqa: E402
from model import GPT  # noqa: E402

MODELS = {"llama_gqa_tied": ["model.n_head=4", "model.n_kv_head=2", "model.tie_embeddings=true"],
          "gpt2_tied": ["model.arch=gpt2", "model.n_head=4", "model.tie_embeddings=true"],
          "llama_qknorm_relu2": ["model.n_head=4", "model.qk_norm=true", "model.mlp=relu2"]}


def whole(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def setup(dataset: str, extra: list[str], tp: int, parallel_mode: str = "auto"):
    """(run, model, training module) for this process group: the TINY model with `extra`, FP32, one micro-batch."""
    cfg = config.load(["configs/tiny.yaml", *TINY, f"data.datasets=[{dataset}]", "train.precision=fp32",
                       "model.vocab_size=512", "train.batch_size=4", "train.micro_batch_size=2",
                       f"train.tp={tp}", f"train.parallel={parallel_mode}", "train.optimizer=adamw",
                       "train.muon_lr=0.02", *extra])
    run = make_run(cfg, world=dist.get_world_size(), rank=dist.get_rank())
    model = build_model(run.cfg, run.device, run.ops, parallelize=lambda m: parallel.parallelize(m, run))
    return run, model, parallel.wrap(model, run)


def batch(run, seed: int = 0):
    g = torch.Generator().manual_seed(seed + run.dp_rank)
    x = torch.randint(0, 512, (run.cfg.train.micro_batch_size, run.cfg.model.block_size + 1), generator=g)
    return x[:, :-1], x[:, 1:]


def compare(dataset: str, extra: list[str]) -> dict:
    """Largest absolute differences between the model split over the 2 ranks and the same model in one process."""
    run, model, train_model = setup(dataset, extra, tp=2)
    ref = GPT(run.cfg.model, kernel.configure("torch", "plain"))  # the unsplit plain loss: the reference
    ref.init_weights(run.cfg.train.seed)
    x, y = batch(run)
    loss = train_model(x, y)
    loss.backward()
    ref_loss = ref(x, y)
    ref_loss.backward()
    grads = {n: whole(p.grad) for n, p in model.named_parameters()}
    out = {"loss": abs(loss.item() - ref_loss.item()),
           "grad": max((grads[n] - p.grad).abs().max().item() for n, p in ref.named_parameters()),
           "params": len(grads) == len(dict(ref.named_parameters()))}
    out["grad_norm"] = abs(step.clip_grads(model, 0).item() - step.clip_grads(ref, 0).item())
    with torch.no_grad():
        out["logits"] = (model(x) - ref(x)).abs().max().item()
    for name in ("adamw", "muon"):  # one optimizer step on each side from the same gradients
        t = replace(run.cfg.train, optimizer=name)
        opt, ref_opt = optim.build(model, t, run.device), optim.build(ref, t, run.device)
        model.zero_grad()
        ref.zero_grad()
        train_model(x, y).backward()
        ref(x, y).backward()
        opt.step()
        ref_opt.step()
        out[f"{name}_step"] = max((whole(p.detach()) - q.detach()).abs().max().item()
                                  for p, q in zip(model.parameters(), ref.parameters()))
    return out


def saved(dataset: str) -> dict:
    """Bytes autograd saves in one forward of the model split over the 2 ranks (no FSDP2, so the weights are the split
    parameters themselves), against memory.activation_bytes at tp 2. The loss is a stand-in that keeps nothing (the
    vocab-parallel loss's own memory is the plan's loss_transient_bytes), so the head's gathered input, which the
    estimate counts for the head's matmul, is not kept either and comes off the estimate."""
    run, _, _ = setup(dataset, ["model.n_head=4", "model.n_kv_head=2", "model.block_size=128"], tp=2)
    mesh = parallel.device_mesh(run)
    with torch.device("meta"):
        model = GPT(run.cfg.model, replace(run.ops, loss=lambda h, weight, targets: h.to_local().sum()))
    parallel.tensor_parallel(model, mesh["tp"])
    model.to_empty(device="cpu")
    model.init_weights(0, assign=lambda p, full: p.copy_(distribute_tensor(full, p.device_mesh, p.placements)))
    x, _ = batch(run)
    m, tokens = run.cfg.model, x.numel()
    planned = memory.activation_bytes(m, tokens, "fp32", loss="chunked", tp=2) - 4 * m.n_embd * tokens
    return {"measured": plan.measure_saved(model, x, "fp32"), "planned": planned}


def comm(dataset: str, tp: int, parallel_mode: str) -> dict:
    """Bytes one training step sends, counted by CommDebugMode, against the plan's figure for that layout."""
    run, model, train_model = setup(dataset, ["model.n_head=4", "model.n_kv_head=2"], tp=tp,
                                    parallel_mode=parallel_mode)
    opt = optim.build(model, run.cfg.train, run.device)
    batches = [batch(run, i) for i in range(run.grad_accum)]
    step.train_step(model, train_model, opt, batches, run)  # FSDP2's first step sets up its buffers
    with plan.CommBytes() as counted:
        step.train_step(model, train_model, opt, batches, run)
    planned = plan.comm_bytes(run.cfg, model, run.dp, run.tp, run.mode, False)
    kind = "tp" if tp > 1 else "dp"
    return {"counted": sum(counted.bytes.values()), "planned": planned[kind], "by_op": counted.bytes,
            "counts": counted.counts()}


def main(dataset: str, out: str) -> None:
    dist.init_process_group("gloo")
    torch.set_flush_denormal(True)
    results = {"models": {name: compare(dataset, extra) for name, extra in MODELS.items()},
               "comm": {"tp": comm(dataset, 2, "auto"), "fsdp": comm(dataset, 1, "fsdp")}, "saved": saved(dataset)}
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump(results, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
