"""Run configuration: YAML files merged in order, then `section.key=value` overrides, validated into dataclasses.

    python train.py configs/tiny.yaml more.yaml train.max_steps=40 model.n_layer=2

Unknown keys and values of the wrong type stop with a message naming the key, where it came from (file or
command line) and the closest valid key, before anything is computed or written. A loaded config is frozen:
derived numbers (gradient accumulation, tokens per step) are computed once in `derive()`, and what the machine
and the data decide lives in a `Run` (memory.resolve).
"""
import argparse
import difflib
import importlib.util
import os
import types
from dataclasses import asdict, dataclass, field, fields, is_dataclass, replace
from typing import Literal, Union, get_args, get_origin

import torch
import yaml

from hardware import Precision
from kernel import Ops
from model import GPTConfig


class ConfigError(ValueError):
    """A configuration mistake, with a message meant for the user."""


# train.lora_targets: the short names and the modules they adapt (lora.py)
LORA_TARGETS = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
                "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj", "lm_head": "lm_head"}


@dataclass(frozen=True)
class DataConfig:
    datasets: list[str] = field(default_factory=lambda: ["data/pycode"])  # prepared dataset folders (meta.json)
    weights: list[float] | None = None  # mixture weights, one per dataset; None: equal
    # A resume checks that each dataset is the one the checkpoint was trained on (its meta.json and tokenizer) and
    # stops, naming the change, when it is not; true: go on with the data as it is now
    allow_change: bool = False


@dataclass(frozen=True)
class TrainConfig:
    out_dir: str = "out/run"
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"  # auto: cuda when available, else cpu
    # auto: by the hardware (hardware.py: BF16 where it is native, FP16 on GPUs without BF16, else FP32; the
    # banner says why). bf16/fp16: autocast matmuls, FP32 master weights and loss (fp16 with dynamic loss
    # scaling); fp8: bf16 plus torchao float8 Linear layers in the blocks (CUDA, compute capability >= 8.9)
    precision: Literal["auto", "fp32", "bf16", "fp16", "fp8"] = "auto"
    kernels: Literal["auto", "torch", "flash", "liger"] = "auto"  # see kernel.py
    loss: Literal["auto", "compiled", "chunked", "plain", "liger"] = "auto"  # lm_head + cross-entropy (kernel.py)
    seed: int = 1337
    batch_size: int = 64  # global batch in sequences per optimizer step, whatever the world size
    # sequences per device per forward/backward; auto: the largest that divides the batch per rank and fits the
    # memory plan of the device (memory.py), resolved at start-up and written into out_dir/config.yaml
    micro_batch_size: int | Literal["auto"] = "auto"
    max_steps: int = 1000
    # A wall-clock budget for the training loop (compile, evals and saves included); 0: none. After the warm-up
    # steps it fixes max_steps (never above the configured one) from the measured step time, so that the LR
    # schedule decays on time; the decided value is kept in the checkpoint, so a resume repeats it.
    max_minutes: float = 0.0
    # adamw: AdamW for every parameter. muon: Muon for the blocks' matrices, AdamW for embeddings, head, norms and
    # biases (optim.py); Muon's step is scaled to AdamW's RMS (Moonlight), so train.lr carries over.
    optimizer: Literal["adamw", "muon"] = "adamw"
    lr: float = 6e-4  # peak learning rate (AdamW; Muon too unless muon_lr is set)
    muon_lr: float | None = None  # Muon's peak learning rate in AdamW units; None: train.lr
    muon_momentum: float = 0.95
    min_lr_ratio: float = 0.1  # final lr = lr * min_lr_ratio
    warmup_steps: int = 100
    schedule: Literal["cosine", "linear", "wsd", "constant"] = "cosine"
    decay_frac: float = 0.2  # wsd: fraction of max_steps spent decaying at the end
    weight_decay: float = 0.1  # matrices only: never norms, biases or embeddings
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    fused_optimizer: Literal["auto", True, False] = "auto"  # fused AdamW; auto: where torch has it (CUDA, CPU, MPS)
    grad_clip: float = 1.0  # 0 disables
    compile: Literal["auto", True, False] = "auto"  # torch.compile; auto: CUDA, and CPU runs long enough (hardware.py)
    # A compiled run's first step (where compilation happens, minutes for a large FP8 model) may take this long;
    # past it the run stops with an error that says so. 0: no limit
    compile_timeout_s: float = 1800.0
    eval_interval: int = 200  # steps; 0 disables periodic eval
    eval_batches: int = 20  # micro-batches of the val split per eval
    ckpt_interval: int = 500  # steps; a checkpoint is also written at the end
    keep_last: int = 2  # checkpoints kept on disk
    ckpt_dir: str | None = None  # where checkpoints go: a folder or an fsspec URL (s3://bucket/run); None: out_dir
    lease_minutes: float = 10.0  # remote ckpt_dir: a run's lease there, unrenewed this long, may be taken over
    resume: bool = True  # continue from out_dir/latest when present
    async_checkpoint: bool = False  # write checkpoints in a background thread while training goes on
    # A Hugging Face Llama (or GPT-2) folder to start from: its config.json sets the model's shape (block_size
    # stays ours), its safetensors the initial weights. Resuming from out_dir still takes precedence.
    init_from: str | None = None
    # LoRA (lora.py): the model frozen, low-rank adapters trained on the projections named in lora_targets (q, k, v,
    # o, gate, up, down; lm_head too if listed); the optimizer and checkpoints hold the adapters only, the base is
    # rebuilt from train.init_from (a Hugging Face folder or a run of ours) or train.seed and checked by its hash
    lora: bool = False
    lora_rank: int = 8  # r: the adapters' inner width
    lora_alpha: float = 16.0  # the adapters' output is scaled by lora_alpha / lora_rank
    lora_dropout: float = 0.0  # dropout on the adapters' input (the base sees x as it is)
    lora_targets: list[str] = field(default_factory=lambda: ["q", "k", "v", "o", "gate", "up", "down"])
    # Scale-out (torchrun). auto: no wrap on one process; DDP while the model and its AdamW state take under
    # 40 % of a device's memory; FSDP2 otherwise.
    parallel: Literal["auto", "ddp", "fsdp"] = "auto"
    # Tensor (and sequence) parallel degree: each group of `tp` consecutive ranks splits every block's matrices
    # (attention heads, MLP width), the embedding and the head, over a (data parallel, tp) device mesh with FSDP2
    # across the groups (parallel.py); the ranks of one group see the same batch. 1: off. Keep a group inside a node
    tp: int = 1
    # Expert parallel (model.moe): each rank keeps num_experts / ep whole experts, tokens go to them and back by
    # all-to-all; with FSDP2 for the rest of the model (ep must equal the world size). 1: off
    ep: int = 1
    # Pipeline parallel degree (torch.distributed.pipelining): the blocks are cut into pp x pp_virtual_stages stages
    # of consecutive layers, each rank of a pipeline holding its stages (the embedding on the first, the final norm,
    # head and loss on the last). The mesh is (pp, dp, tp): pp outermost (stages across nodes), tp innermost, FSDP2
    # over dp inside each stage. 1: off
    pp: int = 1
    # the order of micro-batches' forwards and backwards: gpipe (all forwards, then all backwards), 1f1b,
    # interleaved_1f1b (pp_virtual_stages >= 2 per rank, looped), zero_bubble (torch's ZBVZeroBubble) and dualpipev
    # (two stages per rank in a V; the weight gradients split from the input gradients to fill the bubble)
    pp_schedule: Literal["1f1b", "gpipe", "interleaved_1f1b", "zero_bubble", "dualpipev"] = "1f1b"
    # pipeline micro-batches per step on each data-parallel rank (they replace gradient accumulation: the micro
    # batch is batch_size / dp / pp_microbatches); 0: the step's micro-batches of train.micro_batch_size
    pp_microbatches: int = 0
    pp_virtual_stages: int = 0  # stages per rank; 0: the schedule's (1; 2 for interleaved_1f1b, zero_bubble, dualpipev)
    # fsdp: free gathered block weights after forward (ZeRO-3); false: ZeRO-2 (always, under train.pp: a stage's
    # weights stay gathered across its micro-batches)
    reshard_after_forward: bool = True
    reduce_dtype: Literal["fp32", "bf16"] = "fp32"  # fsdp: dtype of gradient reduce-scatter
    # fsdp: reduce gradients only on the last micro-step (holds unsharded grads); under train.pp torch's stage does so
    fsdp_defer_sync: bool = False
    activation_checkpointing: bool = False  # recompute each block in backward: less memory, ~25 % more compute
    dist_timeout_s: int = 600  # a collective that waits longer than this fails the run instead of hanging
    # A step with a non-finite loss or gradient norm is skipped (weights and optimizer state untouched); this many
    # in a row stop the run without saving, leaving the last good checkpoint. 1: stop at the first.
    max_consecutive_skips: int = 5
    # Diagnostics (diagnose.py). profile=N: a torch.profiler trace of N steps (after the first 2 of this start) and
    # on CUDA the allocator's memory history, per rank into out_dir/profile/; the run then goes on. 0: off
    profile: int = 0


@dataclass(frozen=True)
class LogConfig:
    interval: int = 10  # steps between log lines / metrics.jsonl rows
    # Mirrors of metrics.jsonl (rank 0 only). wandb honours WANDB_MODE (offline/disabled) and WANDB_DIR.
    wandb: bool = False
    wandb_project: str = "gptrain"
    wandb_run_name: str | None = None  # None: the out_dir's folder name
    wandb_tags: list[str] = field(default_factory=list)
    tensorboard: bool = False  # event files in out_dir/tensorboard


@dataclass(frozen=True)
class EvalConfig:
    """Evaluation while training beyond train.eval_interval's val loss: lm-eval tasks and a sample from a fixed
    prompt (train.py LiveEval), every `interval` steps and at the last step, into metrics.jsonl and the trackers.
    Every rank runs it, rank 0 logs it; its time is left out of tokens/s, but train.max_minutes does not foresee it."""
    interval: int = 0  # steps; 0: off
    # lm-evaluation-harness tasks (pip install ".[eval]"), built in or from include_path; logged as task/metric
    tasks: list[str] = field(default_factory=list)
    limit: float | None = None  # examples per task (a fraction when < 1); None: all of them (slow for big tasks)
    num_fewshot: int | None = None  # None: each task's default
    include_path: str | None = None  # a folder of extra task YAMLs (e.g. over local files)
    prompt: str | None = None  # the prompt of a greedy sample, logged as text (`sample`); None: no sample
    max_new_tokens: int = 64  # of the sample; it also stops at the end-of-text token


@dataclass(frozen=True)
class Config:
    model: GPTConfig = field(default_factory=GPTConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


SECTIONS = {f.name: f.type for f in fields(Config)}


def at_least(low: float, kind=int):
    """An argparse `type` for the scripts' counts and sizes: a number of `kind` that is >= low, else a clear error."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a{'n integer' if kind is int else ' number'}") from None
        if not value >= low:
            raise argparse.ArgumentTypeError(f"{text} is below {low:g}")
        return value
    return parse


def _all_keys(cls=Config, prefix: str = "") -> list[str]:
    """Every dotted key (model.n_layer); a field that is itself a dataclass (model.moe) is a subsection."""
    return [k for f in fields(cls) for k in (_all_keys(f.type, f"{prefix}{f.name}.") if is_dataclass(f.type)
                                             else [f"{prefix}{f.name}"])]


def _suggest(key: str, options: list[str], prefix: str = "") -> str:
    close = difflib.get_close_matches(key, options, n=1, cutoff=0.5)
    return f"; did you mean '{prefix}{close[0]}'?" if close else ""


def _annotation(section: str, key: str, source: str):
    """The annotation of `section.key` (key dotted into subsections: model.moe.top_k). An unknown section or key
    stops with the closest valid one, or the section that has it."""
    if section not in SECTIONS:
        raise ConfigError(f"unknown section '{section}' ({source}){_suggest(section, list(SECTIONS))}"
                          f" (sections: {', '.join(SECTIONS)})")
    tp, path = SECTIONS[section], section
    for part in key.split("."):
        known = {f.name: f.type for f in fields(tp)} if is_dataclass(tp) else {}
        if part not in known:
            elsewhere = [k for k in _all_keys() if k.endswith(f".{part}")] if path == section else []
            hint = f"; did you mean '{elsewhere[0]}'?" if elsewhere else _suggest(part, list(known), f"{path}.")
            raise ConfigError(f"unknown key '{path}.{part}' ({source}){hint}")
        tp, path = known[part], f"{path}.{part}"
    return tp


def _set(tree: dict, sources: dict, section: str, key: str, value, source: str) -> None:
    """Store `section.key` in the nested `tree` and where it came from in `sources`; a mapping given for a
    subsection sets each of its keys."""
    if is_dataclass(_annotation(section, key, source)):
        if not isinstance(value, dict):
            raise ConfigError(f"{section}.{key} ({source}) is a section: give its keys ({section}.{key}.KEY=VALUE "
                              f"or a mapping)")
        for k, v in value.items():
            _set(tree, sources, section, f"{key}.{k}", v, source)
        return
    node = tree.setdefault(section, {})
    *parents, name = key.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[name] = value
    sources[f"{section}.{key}"] = source


def _coerce(value, tp, where: str):
    """Check `value` against the annotation `tp`, converting only where YAML is known to be ambiguous."""
    origin, args = get_origin(tp), get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):  # int | Literal["auto"]: the first that takes it
            try:
                return _coerce(value, option, where)
            except ConfigError as e:
                errors.append(str(e).removeprefix(f"{where}: "))
        raise ConfigError(f"{where}: {' or '.join(errors)}")
    if origin is Literal:
        if value not in args:
            names = (str(a).lower() if isinstance(a, bool) else str(a) for a in args)  # YAML spells true/false
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(names)}")
        return value
    if origin is list:
        return [_coerce(v, args[0], where) for v in (value if isinstance(value, list) else [value])]
    if tp in (bool, str, dict) and isinstance(value, tp):
        return value
    if tp in (int, float) and isinstance(value, (int, float, str)) and not isinstance(value, bool):
        try:  # YAML 1.1 reads 1e6 and 3e-4 as strings; an int must be a whole number
            number = value if type(value) is tp else float(value)
            if tp is float or number == int(number):
                return tp(number)
        except (ValueError, OverflowError):
            pass
    raise ConfigError(f"{where}: expected {getattr(tp, '__name__', tp)}, got {value!r}")


def _make(cls, values: dict, prefix: str, sources: dict):
    """A dataclass from its (nested) dict of values, each checked against its annotation."""
    made = {}
    for f in fields(cls):
        if f.name in values:
            key = f"{prefix}{f.name}"
            if is_dataclass(f.type):
                made[f.name] = _make(f.type, values[f.name] or {}, f"{key}.", sources)
            else:
                made[f.name] = _coerce(values[f.name], f.type, f"{key} ({sources.get(key, 'config')})")
    return cls(**made)


def build(tree: dict, sources: dict | None = None) -> Config:
    """Nested dict -> validated Config; `sources` maps 'section.key' to where the value came from."""
    cfg = _make(Config, tree, "", sources or {})
    validate(cfg)
    return cfg


def _read_yaml(path: str) -> dict:
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}:{at} YAML syntax error: {getattr(e, 'problem', e)}") from None
    if not isinstance(data, dict | None):
        raise ConfigError(f"{path}: expected a mapping of sections (model, data, train, log)")
    return data or {}


def load(args: list[str]) -> Config:
    """YAML paths and `section.key=value` overrides, in order -> Config. Raises ConfigError."""
    tree, sources = {}, {}
    for arg in args:
        if "=" in arg:
            dotted, raw = arg.split("=", 1)
            section, _, key = dotted.partition(".")
            if not key:
                raise ConfigError(f"override '{arg}' must look like section.key=value")
            tp = _annotation(section, key, "command line")
            value = raw  # strings stay verbatim (eval.prompt="def f(x):" is no YAML mapping)
            if tp == str | None and raw in ("null", "~"):
                value = None
            elif tp not in (str, str | None):  # everything else is read as YAML (numbers, lists, null)
                try:
                    value = yaml.safe_load(raw)
                except yaml.YAMLError:
                    raise ConfigError(f"override '{arg}': cannot parse value {raw!r}") from None
            _set(tree, sources, section, key, value, "command line")
        elif arg.endswith((".yaml", ".yml")):
            for section, values in _read_yaml(arg).items():
                if not isinstance(values, dict):
                    raise ConfigError(f"{arg}: section '{section}' must be a mapping")
                for key, value in values.items():
                    _set(tree, sources, section, key, value, arg)
        else:
            raise ConfigError(f"argument '{arg}' is neither a .yaml file nor a section.key=value override")
    return build(tree, sources)


def validate(cfg: Config) -> None:
    """Value checks that types alone cannot express (the vocab may still be unknown: it can come from the data)."""
    t, e = cfg.train, cfg.eval
    lowest = {1: {"train.batch_size": t.batch_size,  # the lowest value each key may take
                  "train.micro_batch_size": 1 if t.micro_batch_size == "auto" else t.micro_batch_size,
                  "train.max_steps": t.max_steps, "train.keep_last": t.keep_last, "log.interval": cfg.log.interval,
                  "train.ckpt_interval": t.ckpt_interval, "train.eval_batches": t.eval_batches,
                  "train.dist_timeout_s": t.dist_timeout_s, "train.max_consecutive_skips": t.max_consecutive_skips,
                  "train.tp": t.tp, "train.ep": t.ep, "train.pp": t.pp},
              0: {"train.warmup_steps": t.warmup_steps, "train.eval_interval": t.eval_interval,
                  "train.lr": t.lr, "train.weight_decay": t.weight_decay, "train.grad_clip": t.grad_clip,
                  "train.max_minutes": t.max_minutes, "train.muon_lr": t.muon_lr or 0,
                  "train.profile": t.profile, "train.compile_timeout_s": t.compile_timeout_s,
                  "train.pp_microbatches": t.pp_microbatches, "train.pp_virtual_stages": t.pp_virtual_stages}}
    for low, values in lowest.items():
        for key, v in values.items():
            if v < low:
                raise ConfigError(f"{key} must be >= {low} (got {v})")
    if t.lease_minutes <= 0:
        raise ConfigError(f"train.lease_minutes must be > 0 (got {t.lease_minutes})")
    if not 0 <= t.muon_momentum < 1:
        raise ConfigError(f"train.muon_momentum must be in [0, 1) (got {t.muon_momentum})")
    if not 0 <= t.min_lr_ratio <= 1 or not 0 <= t.decay_frac <= 1:
        raise ConfigError("train.min_lr_ratio and train.decay_frac must be in [0, 1]")
    if e.interval < 0 or e.max_new_tokens < 1 or (e.num_fewshot or 0) < 0 or (e.limit is not None and e.limit <= 0):
        raise ConfigError(f"eval.interval must be >= 0, eval.max_new_tokens >= 1, eval.num_fewshot >= 0 and "
                          f"eval.limit > 0 (got {e.interval}, {e.max_new_tokens}, {e.num_fewshot}, {e.limit})")
    if t.lora:
        if t.lora_rank < 1 or t.lora_alpha <= 0 or not 0 <= t.lora_dropout < 1:
            raise ConfigError(f"train.lora_rank must be >= 1, train.lora_alpha > 0 and train.lora_dropout in [0, 1) "
                              f"(got {t.lora_rank}, {t.lora_alpha}, {t.lora_dropout})")
        bad = [k for k in t.lora_targets if k not in LORA_TARGETS]
        if bad or not t.lora_targets:
            raise ConfigError(f"train.lora_targets: {bad or 'empty'}; choose from {', '.join(LORA_TARGETS)}")
        if t.precision == "fp8":
            raise ConfigError("train.lora with train.precision=fp8: the frozen base is not converted to FP8; use bf16")
    if not cfg.data.datasets:
        raise ConfigError("data.datasets is empty")
    experts = cfg.model.moe.num_experts  # 0 here may still be an MoE from train.init_from: check_model tells
    if t.ep > 1 and (experts % t.ep or t.parallel == "ddp" or e.interval):
        raise ConfigError(f"train.ep={t.ep} needs model.moe.num_experts a multiple of it (got {experts}), "
                          f"train.parallel fsdp or auto (got {t.parallel}) and eval.interval 0 (got "
                          f"{e.interval}: a sample's experts would need all-to-alls that ranks of different "
                          f"lengths do not all join)")
    for option in ("wandb", "tensorboard"):  # the option's name is its package's name
        if getattr(cfg.log, option) and importlib.util.find_spec(option) is None:
            raise ConfigError(f"log.{option} is on but the {option} package is not installed: pip install {option}")
    if e.interval and e.tasks:
        if e.include_path and not os.path.isdir(e.include_path):
            raise ConfigError(f"eval.include_path {e.include_path} is not a folder")
        if importlib.util.find_spec("lm_eval") is None:
            raise ConfigError("eval.tasks needs EleutherAI's lm-evaluation-harness: pip install \".[eval]\" "
                              "(or pip install lm-eval)")
    w = cfg.data.weights
    if w is not None and (len(w) != len(cfg.data.datasets) or min(w) < 0 or sum(w) <= 0):
        raise ConfigError(f"data.weights needs one non-negative weight per dataset ({len(cfg.data.datasets)}), "
                          f"not all zero; got {w}")
    if not t.init_from:  # else the model's shape is known only at start-up (train.py); the vocab may come from the data
        check_model(cfg)


def check_model(cfg: Config, world: int | None = None, data_vocab: int = 0) -> None:
    """The rules that need the model as it trains (train.init_from's shape, the data's vocab: `data_vocab`, its
    largest token id + 1) and the world size (None: not known yet): the model's own (GPTConfig.validate), a vocab
    that holds the data's, tensor parallel's splits, expert parallel's experts, LoRA on an MoE. Raises ConfigError."""
    m, t = cfg.model, cfg.train
    if (m.vocab_size or 0) < data_vocab:
        raise ConfigError(f"model.vocab_size ({m.vocab_size}) is smaller than the data's vocab ({data_vocab}, "
                          f"{cfg.data.datasets[0]}/meta.json)")
    try:
        replace(m, vocab_size=m.vocab_size or 2).validate()  # the vocab may be the data's, not known yet
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if t.tp > 1:
        check_tp(cfg)
    if t.pp > 1:
        check_pp(cfg)
    experts = m.moe.num_experts
    if t.ep > 1 and world is not None and (t.ep != world or not experts or experts % t.ep):
        raise ConfigError(f"train.ep={t.ep} must equal the world size ({world}) and divide "
                          f"model.moe.num_experts ({experts}): each rank keeps whole experts")
    if t.lora and experts:
        raise ConfigError("train.lora with an MoE model (model.moe): adapters on the experts are not "
                          "supported, and the frozen base's routing biases would still move")


def check_tp(cfg: Config, tp: int | None = None) -> None:
    """Raise ConfigError, naming the numbers, when the model or the run cannot be split `tp` ways (default
    train.tp): whole heads (query and key/value), MLP columns, the sequence (block_size) and the padded vocab in
    equal parts per rank; FSDP2 (not DDP) across the groups; none of what tensor parallel does not do (another loss
    than the vocab-parallel one, fused RMSNorm kernels, FP8, generation while training, MoE, LoRA)."""
    m, t, tp = cfg.model, cfg.train, tp or cfg.train.tp
    splits = {"model.n_head": m.n_head, "model.n_kv_head": m.kv_heads, "model.block_size": m.block_size,
              "the MLP width (model.intermediate_size)": m.ffn_dim}
    if m.vocab_size:
        splits["the padded vocab (model.vocab_size rounded up to 128)"] = m.padded_vocab_size
    for name, n in splits.items():
        if n % tp:
            raise ConfigError(f"train.tp={tp} cannot split {name} ({n}): it must be a multiple of train.tp")
    if t.parallel == "ddp":
        raise ConfigError(f"train.tp={tp} runs FSDP2 across the tensor-parallel groups; train.parallel=ddp cannot "
                          f"be combined with it (use auto or fsdp)")
    if t.loss != "auto":
        raise ConfigError(f"train.loss={t.loss} with train.tp={tp}: the head is split by vocab, and its loss is the "
                          f"vocab-parallel one (kernel.py); use train.loss=auto")
    if t.kernels in ("flash", "liger"):
        raise ConfigError(f"train.kernels={t.kernels} with train.tp={tp}: its fused RMSNorm and RoPE kernels do not "
                          f"take the sequence-parallel DTensors; use train.kernels=auto (FlashAttention-3 where "
                          f"installed)")
    if t.precision == "fp8":
        raise ConfigError(f"train.precision=fp8 with train.tp={tp} is not supported (torchao's float8 tensor-parallel "
                          f"styles are not wired in); use bf16")
    if cfg.eval.interval:
        raise ConfigError(f"eval.interval={cfg.eval.interval} (lm-eval tasks and samples while training) does not "
                          f"run under train.tp={tp}; set eval.interval=0 and evaluate the checkpoints with eval.py")
    if m.moe.num_experts:
        raise ConfigError(f"model.moe with train.tp={tp}: the tensor-parallel plan does not split MoE layers; shard "
                          f"the experts with train.ep instead")
    if t.lora:
        raise ConfigError(f"train.lora with train.tp={tp}: the adapters are not split by the tensor-parallel plan; "
                          f"train LoRA under DDP or FSDP2 (train.tp=1), where the frozen base is sharded")


# train.pp_schedule -> (torch's schedule class name, stages per rank by default)
PP_SCHEDULES = {"gpipe": ("GPipe", 1), "1f1b": ("1F1B", 1), "interleaved_1f1b": ("Interleaved1F1B", 2),
                "zero_bubble": ("ZBVZeroBubble", 2), "dualpipev": ("DualPipeV", 2)}


def virtual_stages(t: TrainConfig) -> int:
    """Pipeline stages per rank: train.pp_virtual_stages, or the schedule's own number."""
    return t.pp_virtual_stages or PP_SCHEDULES[t.pp_schedule][1]


def check_pp(cfg: Config) -> None:
    """Raise ConfigError, naming the keys, when the run cannot be cut into train.pp pipeline stages: the schedule's
    stages per rank, a layer at least per stage, and none of what the pipeline does not carry (a head tied to the
    embedding across the first and last stage, MoE and expert parallel, LoRA, FP16's loss scaling, FP8, DDP inside a
    stage, generation while training)."""
    m, t, v = cfg.model, cfg.train, virtual_stages(cfg.train)
    single = PP_SCHEDULES[t.pp_schedule][1] == 1
    if v != 1 if single else v != 2 if t.pp_schedule in ("zero_bubble", "dualpipev") else v < 2:
        raise ConfigError(f"train.pp_schedule={t.pp_schedule} runs {'one stage' if single else 'two stages (a V)'} "
                          f"per rank{' or more' if t.pp_schedule == 'interleaved_1f1b' else ''}; "
                          f"train.pp_virtual_stages={t.pp_virtual_stages} does not fit it (0: the schedule's own)")
    if m.n_layer < t.pp * v:
        raise ConfigError(f"train.pp={t.pp} with {v} stage(s) per rank cuts the model into {t.pp * v} stages, more "
                          f"than its model.n_layer ({m.n_layer}) layers")
    refused = {"model.tie_embeddings=true (the embedding is on the first stage, the head on the last; untie them)":
               m.tie_embeddings,
               "model.moe (the routing biases' balancing step and the balance loss span every stage)":
               m.moe.num_experts, "train.ep": t.ep > 1, "train.lora": t.lora,
               "train.parallel=ddp (data parallel inside a stage is FSDP2: use auto or fsdp)": t.parallel == "ddp",
               f"train.precision={t.precision} (FP16's loss scaling and FP8 are not wired into the pipeline; use bf16)":
               t.precision in ("fp16", "fp8"),
               "eval.interval (samples while training need the whole model; evaluate checkpoints with eval.py)":
               cfg.eval.interval}
    for what, on in refused.items():
        if on:
            raise ConfigError(f"train.pp={t.pp} does not run with {what}")


@dataclass(frozen=True)
class Derived:
    world_size: int  # all ranks: data parallel x tensor parallel (train.tp) x pipeline (train.pp)
    micro_batch: int
    grad_accum: int
    batch_tokens: int
    # data-parallel ranks: the number of different batches each micro-step (world_size / tp / pp); the ranks of a
    # tensor-parallel group, and the stages of a pipeline, share each batch
    dp: int

    def banner(self, cfg: Config) -> str:
        t = cfg.train
        ranks = f"world size {self.world_size}" if t.tp == t.pp == 1 else \
            f"data parallel {self.dp} (world size {self.world_size} / train.tp {t.tp}" + \
            (f" / train.pp {t.pp})" if t.pp > 1 else ")")
        accum = "grad accum" if t.pp == 1 else f"pipeline micro-batches ({t.pp_schedule})"
        return (f"global batch {t.batch_size} seqs = micro batch {self.micro_batch} x {accum} {self.grad_accum} "
                f"x {ranks}; {self.batch_tokens:,} tokens/step (block_size "
                f"{cfg.model.block_size}); {t.max_steps} steps = {self.batch_tokens * t.max_steps:,} tokens")


def derive(cfg: Config, world_size: int = 1, micro: int | None = None) -> Derived:
    """The numbers that follow from the config, the batch split over world_size / train.tp / train.pp data-parallel
    ranks. `micro`: the micro batch when train.micro_batch_size is auto; without it, a rank's whole batch."""
    t = cfg.train
    if world_size % (t.tp * t.pp):
        raise ConfigError(f"the world size ({world_size}) must be a multiple of train.tp ({t.tp})" if t.pp == 1 else
                          f"the world size ({world_size}) must be a multiple of train.tp x train.pp ({t.tp} x {t.pp})")
    dp = world_size // (t.tp * t.pp)
    ranks = "world size" if t.tp == t.pp == 1 else f"data-parallel size (world size {world_size} / train.tp {t.tp}" + \
        (f" / train.pp {t.pp})" if t.pp > 1 else ")")
    if t.batch_size % dp:
        raise ConfigError(f"train.batch_size ({t.batch_size}) must be a multiple of the {ranks} ({dp})")
    if t.pp > 1 and t.pp_microbatches:
        if t.batch_size // dp % t.pp_microbatches:
            raise ConfigError(f"train.pp_microbatches ({t.pp_microbatches}) must divide a data-parallel rank's batch "
                              f"(train.batch_size {t.batch_size} / {dp})")
        micro = t.batch_size // dp // t.pp_microbatches
        if t.micro_batch_size not in ("auto", micro):
            raise ConfigError(f"train.micro_batch_size ({t.micro_batch_size}) and train.pp_microbatches "
                              f"({t.pp_microbatches}) disagree: the micro batch is batch_size / dp / pp_microbatches "
                              f"({micro}); set one of them")
    elif t.micro_batch_size != "auto":
        micro = t.micro_batch_size
    # without a memory plan: a rank's whole batch, or under pp one micro-batch per stage
    micro = micro or max(1, t.batch_size // dp // (t.pp * virtual_stages(t) if t.pp > 1 else 1))
    per_step = micro * dp
    if t.batch_size % per_step:
        raise ConfigError(f"train.batch_size ({t.batch_size}) must be a multiple of train.micro_batch_size "
                          f"({micro}) x {ranks} ({dp})"
                          + ("" if t.micro_batch_size != "auto" else " (auto chose it)"))
    accum = t.batch_size // per_step
    if t.pp > 1:  # torch's schedules: 1F1B and the V schedules need a micro-batch per stage; interleaved whole rounds
        stages = t.pp * (virtual_stages(t) if t.pp_schedule != "interleaved_1f1b" else 1)
        if (t.pp_schedule != "gpipe" and accum < stages) or (t.pp_schedule == "interleaved_1f1b" and accum % t.pp):
            raise ConfigError(f"train.pp_schedule={t.pp_schedule} on {t.pp * virtual_stages(t)} stages needs "
                              + (f"a multiple of train.pp ({t.pp})" if t.pp_schedule == "interleaved_1f1b" else
                                 f"at least {stages}") + f" pipeline micro-batches per step; this step has {accum} "
                              f"(train.batch_size / dp / micro batch {micro}): set train.pp_microbatches")
    return Derived(world_size, micro, accum, t.batch_size * cfg.model.block_size, dp)


@dataclass(frozen=True)
class Run:
    """A config resolved for this process, made once at start-up (memory.resolve): `cfg` with every value that the
    machine or the data decides (precision, compile, micro batch, vocab, train.init_from's model shape), and what the
    config does not say. config.yaml, run_info.json and the checkpoints keep it."""
    cfg: Config
    device: torch.device
    precision: Precision  # its reason (and on CPUs the measured BF16 speed-up) is for the banner
    ops: Ops  # the kernels the model is built with
    mode: str  # none | ddp | fsdp
    rank: int
    batch: Derived

    @property
    def world_size(self) -> int:
        return self.batch.world_size

    @property
    def grad_accum(self) -> int:
        return self.batch.grad_accum

    @property
    def tp(self) -> int:
        return self.cfg.train.tp

    @property
    def dp(self) -> int:
        return self.batch.dp

    @property
    def dp_rank(self) -> int:
        """This rank's place among the data-parallel ranks: which batches it reads (in the (pp, dp, tp) mesh of
        parallel.py a tensor-parallel group is tp consecutive ranks; a pipeline's stages are dp x tp ranks apart)."""
        return self.rank // self.tp % self.dp

    @property
    def pp(self) -> int:
        return self.cfg.train.pp

    @property
    def pp_rank(self) -> int:
        return self.rank // (self.dp * self.tp)


def to_dict(cfg: Config) -> dict:
    return asdict(cfg)


def dump(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
