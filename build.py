"""The model of a run, built in one place for train.py, bench.py, eval.py, sample.py and export.py: on the meta
device, LoRA applied, sharded there by parallel.py, then allocated and given train.seed's init, train.init_from's
weights and LoRA's adapters: the same values whatever the sharding. Also: a run's model back from its checkpoint,
and the checkpoint a run resumes from."""
import os
import sys
from dataclasses import replace

import torch
from torch.distributed.tensor import DTensor, distribute_tensor

import checkpoint
import config
import hardware
import kernel
from loader import read_meta
from model import GPT


def build_model(cfg: config.Config, device: torch.device, ops: kernel.Ops = kernel.REFERENCE,
                parallelize=None) -> GPT:
    """cfg's model on `device`, initialised (see the module docstring). `parallelize(model)` runs on the meta
    model, in place (parallel.parallelize: tensor parallel, FP8, activation checkpointing, FSDP2, expert parallel),
    so that each rank allocates only its shards."""
    t = cfg.train
    with torch.device("meta"):
        model = GPT(cfg.model, ops)
    if t.lora:  # before any wrapping: FSDP2 and DDP see the frozen base and the adapters as they will train
        import lora
        lora.apply(model, t)
    if parallelize is not None:
        parallelize(model)
    model.to_empty(device=device)
    model.init_weights(t.seed, assign=_assign)
    if t.init_from:
        import hf  # Hugging Face formats: safetensors
        hf.load_init(model, t.init_from, _assign)
    if t.lora:
        lora.init_adapters(model, t.seed, _assign)
    return model


def _assign(p: torch.Tensor, full: torch.Tensor) -> None:
    """Store a full value: a sharded parameter (every rank draws the same full tensor) keeps only its shard."""
    p.copy_(distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None) if isinstance(p, DTensor)
            else full)


def load_model(path: str, device) -> tuple:
    """A run folder or checkpoint folder -> (model in eval mode, its Config, the checkpoint folder). A LoRA run's
    base is rebuilt as the run built it (train.init_from or train.seed, checked by its fingerprint)."""
    if not checkpoint.is_remote(path) and not os.path.isdir(path):
        raise FileNotFoundError(f"{path} does not exist" if not os.path.exists(path) else
                                f"{path} is a file; name a run folder or one of its step_NNNNNN folders")
    path = checkpoint.resolve(path)
    state = checkpoint.read_state(path)
    cfg = config.build(state["config"], {k: f"{path}/{checkpoint.STATE_FILE}" for k in config._all_keys()})
    if cfg.train.lora:
        import lora
        lora.check_base(state, cfg.train, path)
        model = build_model(cfg, device)
    else:  # every weight comes from the checkpoint: train.init_from is not read again
        model = build_model(replace(cfg, train=replace(cfg.train, init_from=None)), device)
    checkpoint.load(path, model)
    return model.eval(), cfg, path


def load_for_inference(path: str, device: str = "auto", precision: str = "auto") -> tuple:
    """`load_model` with train.py's rules for this machine (device, precision, kernels), for sampling and eval:
    (model, its Config, the checkpoint folder, the Precision); prints the precision's warning. Raises
    FileNotFoundError or ValueError."""
    device = hardware.pick_device(device)
    model, cfg, path = load_model(path, device)
    p = hardware.resolve_precision(precision, device, cfg.model.n_embd)
    if p.warning:
        print(f"warning: {p.warning}", file=sys.stderr)
    model.set_ops(kernel.configure("auto", "auto", device, p.dtype))
    return model, cfg, path, p


def find_resume(cfg: config.Config) -> str | None:
    """The checkpoint to resume from (rank 0): the newest one in the run that verifies (train_state.json, the
    tensor index against this model, every file's checksum); damaged newer ones are set aside, loudly."""
    t = cfg.train
    if not t.resume:
        return None
    with torch.device("meta"):
        model = GPT(cfg.model)
    if t.lora:
        import lora
        lora.apply(model, t)

    def check(state, path):
        if "data" in state and not cfg.data.allow_change and (changes := data_changes(state["data"], cfg)):
            raise config.ConfigError(f"the data changed since checkpoint {path} was saved ({'; '.join(changes)}), "
                                     f"so the run would resume on other tokens; restore the data, use another "
                                     f"train.out_dir, or set data.allow_change=true to go on with the new data")
        ours = config.to_dict(cfg)["model"]  # nested sections (model.moe) as dicts, as the checkpoint keeps them
        if diff := {k: (v, ours.get(k)) for k, v in state["config"]["model"].items() if ours.get(k) != v}:
            lines = ", ".join(f"model.{k}: checkpoint {a!r} vs config {b!r}" for k, (a, b) in diff.items())
            raise config.ConfigError(f"checkpoint {path} was trained with a different model ({lines}); "
                                     f"use another train.out_dir or train.resume=false")
        if t.lora:
            lora.check_base(state, t, path)
    set_aside = []

    def warn(message):
        set_aside.append(message)
        print(message, file=sys.stderr, flush=True)
    path = checkpoint.find_resumable(t.ckpt_dir or t.out_dir, model, warn, check=check)
    if path is None and set_aside:  # every checkpoint was damaged: a new start, whose rows must not mix with the old
        metrics, kept = os.path.join(t.out_dir, "metrics.jsonl"), ""
        if os.path.exists(metrics):
            os.replace(metrics, f"{metrics}.before_restart")
            kept = f"; the old metrics.jsonl rows are kept in {metrics}.before_restart"
        print(f"warning: no checkpoint left that verifies, so training starts again from step 0{kept}",
              file=sys.stderr, flush=True)
    return path


def data_identity(paths: list[str]) -> dict:
    """What a checkpoint records of the run's data, so that a dataset replaced under a run is noticed on resume: per
    folder, the digest of its meta.json (which holds every shard's checksum) and of its tokenizer file, and what a
    message can name (tokenizer, vocab, tokens per split)."""
    found = {}
    for path in paths:
        meta = read_meta(path)
        files = ["meta.json"] + ([meta["tokenizer"]["file"]] if "file" in meta["tokenizer"] else [])
        found[path] = {"tokenizer": meta["tokenizer"], "vocab_size": meta["vocab_size"],
                       **{f"{split}_tokens": s["tokens"] for split, s in meta["splits"].items()},
                       **{f"{name}_xxh3": checkpoint.file_digest(os.path.join(path, name)) for name in files}}
    return found


def data_changes(saved: dict, cfg: config.Config) -> list[str]:
    """How the configured datasets differ from the identity a checkpoint `saved` (data_identity); [] when alike."""
    if list(saved) != cfg.data.datasets:
        return [f"data.datasets: checkpoint {list(saved)} vs config {cfg.data.datasets}"]
    now, changes = data_identity(cfg.data.datasets), []
    for path in saved:
        for key, was in saved[path].items():
            if (new := now[path].get(key)) != was:  # a digest: which file; else the values
                changes.append(f"{path}: " + (f"{key.removesuffix('_xxh3')} changed" if key.endswith("_xxh3") else
                                              f"{key} {was!r} -> {new!r}"))
    return changes
