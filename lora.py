"""LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models"): the model frozen, and on chosen
projections a trainable low-rank update, y = W x + b + (alpha / r) * B A dropout(x), with A (r, in) and B (out, r).

    train.lora: true   train.lora_rank: 8   train.lora_alpha: 16   train.lora_dropout: 0.0
    train.lora_targets: [q, k, v, o, gate, up, down]      (lm_head may be added)

`apply` swaps the targets for `LoRALinear` on a model built on the meta device, before parallel.py shards it
(build.py); the base keeps its parameter names (`layers.0.self_attn.q_proj.weight`) and the adapters sit beside
them (`...q_proj.lora_A.weight`), as PEFT names them once its adapter name is dropped. Only the adapters require
gradients, so the optimizer and the checkpoints (DCP with frozen parameters left out) hold only them and their
optimizer state; the base is rebuilt from train.init_from (or train.seed) and checked against the fingerprint the
checkpoint keeps (`fingerprint`). A = kaiming-uniform as PEFT draws it, B = 0: step 0 is the base.
"""
import functools
import json
import math
import os
import zlib
from dataclasses import replace

import torch
import torch.nn as nn
import torch.nn.functional as F

import checkpoint
from config import LORA_TARGETS as TARGETS, ConfigError
from model import build


class LoRALinear(nn.Linear):
    """A frozen nn.Linear (its own `weight` and `bias`) plus the adapter `lora_B(lora_A(lora_dropout(x))) * scaling`."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.lora_A = nn.Linear(base.in_features, rank, bias=False, device=base.weight.device)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False, device=base.weight.device)
        self.lora_dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.scaling = alpha / rank

    def forward(self, x):
        return F.linear(x, self.weight, self.bias) + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling

    def effective_weight(self) -> torch.Tensor:
        """W + scaling * B A, differentiable in A and B: for the fused loss, which reads the head's weight (the
        adapter's dropout is not applied there)."""
        return self.weight + self.scaling * (self.lora_B.weight @ self.lora_A.weight)


def apply(model: nn.Module, t) -> list[str]:
    """Put adapters on train.lora_targets of `model` (a GPT, best on the meta device) and freeze everything else;
    returns the names of the adapted modules. A target the model does not have (gate in a non-gated MLP) is
    skipped; config.ConfigError when no target is found at all."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and not isinstance(m, LoRALinear)
             and any(n == TARGETS[k] or n.endswith("." + TARGETS[k]) for k in t.lora_targets)]
    if not names:
        raise ConfigError(f"train.lora_targets {t.lora_targets} match no module of this model")
    for name in names:
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, child, LoRALinear(getattr(owner, child), t.lora_rank, t.lora_alpha, t.lora_dropout))
    for n, p in model.named_parameters():
        p.requires_grad_(is_adapter(n))
    return names


def is_adapter(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def has_adapters(model: nn.Module) -> bool:
    return any(isinstance(m, LoRALinear) for m in model.modules())


@torch.no_grad()
def init_adapters(model: nn.Module, seed: int, assign=None) -> None:
    """A ~ U(-1/sqrt(in), 1/sqrt(in)) (PEFT's kaiming-uniform with a = sqrt(5)), B = 0, each A drawn whole from a
    generator seeded by (seed, name) as model.init_weights draws, so the adapters do not depend on the sharding;
    `assign(param, full_value)` stores a full value (a sharded trainer keeps its shard)."""
    assign = assign or (lambda p, full: p.copy_(full))
    for name, p in model.named_parameters():
        if not is_adapter(name):
            continue
        full = torch.zeros(p.shape, dtype=p.dtype, device=p.device)  # p.shape is global for a sharded p
        if ".lora_A." in name:
            gen = torch.Generator(p.device).manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
            bound = 1 / math.sqrt(p.shape[1])
            full.uniform_(-bound, bound, generator=gen)
        assign(p, full)


@torch.no_grad()
def merged(model: nn.Module) -> nn.Module:
    """A plain GPT (no adapters) on the CPU computing what `model` (unsharded, adapters on) computes: W + scaling * B A
    for every adapted weight; a tied head that got its own adapter comes out untied."""
    sd, cfg = {k: v for k, v in model.state_dict().items() if not is_adapter(k)}, model.cfg
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):
            sd[f"{name}.weight"] = m.effective_weight().detach()
    if cfg.tie_embeddings and not torch.equal(sd["lm_head.weight"], sd["embed_tokens.weight"]):
        cfg = replace(cfg, tie_embeddings=False)
    plain = build(cfg, "cpu")
    plain.load_state_dict({k: v.cpu() for k, v in sd.items()})
    plain.set_ops(model.ops)
    return plain.eval()


def peft_files(model: nn.Module, t, base_path: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """(adapter_config.json, adapter_model.safetensors tensors) as PEFT saves a LoRA on a Llama-family
    transformers model: keys `base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight` (the head:
    `base_model.model.lm_head.lora_A.weight`), scaling lora_alpha / r (no rsLoRA)."""
    if model.cfg.arch != "llama":
        raise ValueError("LoRA export needs arch llama: transformers' GPT-2 fuses q/k/v into one Conv1D, which "
                         "PEFT adapts as a whole (export.py --merge writes the merged GPT-2 instead)")
    tensors = {}
    for k, v in model.state_dict().items():
        if is_adapter(k):
            name = f"base_model.model.{k if k.startswith('lm_head.') else 'model.' + k}"
            tensors[name] = v.detach().float().cpu().contiguous()
    targets = sorted({TARGETS[k].rsplit(".", 1)[-1] for k in t.lora_targets})
    conf = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_path, "r": t.lora_rank,
            "lora_alpha": t.lora_alpha, "lora_dropout": t.lora_dropout, "target_modules": targets, "bias": "none",
            "fan_in_fan_out": False, "use_rslora": False, "init_lora_weights": True, "inference_mode": True,
            "modules_to_save": None}
    return conf, tensors


def fingerprint(init_from: str | None, seed: int) -> dict:
    """What identifies the frozen base a LoRA run trains on, kept in its checkpoints: the xxh3 of train.init_from's
    weight and config files (a Hugging Face folder), of the checkpoint's checksums.json (a run of ours), or the
    seed of a randomly initialised base."""
    if not init_from:
        return {"seed": seed}
    if not os.path.exists(os.path.join(init_from, "config.json")):  # a run or checkpoint of ours
        folder = checkpoint.resolve(init_from)
        files = [checkpoint.SUMS_FILE] if os.path.exists(os.path.join(folder, checkpoint.SUMS_FILE)) else \
            sorted(n for n in os.listdir(folder) if os.path.isfile(os.path.join(folder, n)))
    else:
        folder = init_from
        files = sorted(n for n in os.listdir(folder) if n.endswith(".safetensors") or n == "config.json")
    return {"init_from": init_from, "files": {n: _digest(os.path.join(folder, n)) for n in files}}


def _digest(path: str) -> str:
    st = os.stat(path)
    return _digest_of(path, st.st_size, st.st_mtime_ns)


@functools.cache
def _digest_of(path: str, size: int, mtime_ns: int) -> str:  # each save hashes a large base once, not again
    return checkpoint.file_digest(path)


def check_base(saved: dict, t, where: str) -> None:
    """Raise checkpoint.CheckpointError when the base a LoRA checkpoint was trained on (its train_state's
    `lora_base`) is not the one train.init_from (or train.seed) gives now."""
    now = fingerprint(t.init_from, t.seed)
    if "lora_base" in saved and _digests(saved["lora_base"]) != _digests(now):
        raise checkpoint.CheckpointError(
            f"{where}: the adapters were trained on a base that is not the one train.init_from gives now "
            f"(saved {json.dumps(saved['lora_base'])[:300]}, now {json.dumps(now)[:300]})")


def _digests(fp: dict) -> dict:
    return {k: v for k, v in fp.items() if k != "init_from"}  # the folder may move; its contents may not change
