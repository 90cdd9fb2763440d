"""The Hugging Face `transformers` formats both ways (config.json <-> GPTConfig, our state dict <-> theirs) and
reading a folder's weights (`train.init_from`); export.py writes folders. Our modules use Hugging Face Llama's names
and its rotate-half RoPE layout, so Llama is a key table with no permutation; GPT-2 fuses q/k/v into one `c_attn`
stored transposed (`Conv1D`), which the table undoes. The embedding and head keep their padded rows (vocab rounded
up to 128), so ours -> HF -> ours is exact."""
import filecmp
import json
import os
from dataclasses import replace

import torch

import checkpoint
import config
import lora
from config import ConfigError
from loader import read_meta
from model import GPT, GPTConfig, MoEConfig
from rope import check_rope_scaling

LLAMA_HF_KEYS = ("model.", "lm_head.weight")  # every Llama key: ours with a "model." prefix, except the head
GPT2_LAYER = {  # ours (inside layers.N.) -> HF GPT-2 (inside transformer.h.N.); c_attn is handled apart
    "input_layernorm": "ln_1", "post_attention_layernorm": "ln_2", "self_attn.o_proj": "attn.c_proj",
    "mlp.up_proj": "mlp.c_fc", "mlp.down_proj": "mlp.c_proj"}
GPT2_TOP = {"embed_tokens": "transformer.wte", "embed_positions": "transformer.wpe", "norm": "transformer.ln_f",
            "lm_head": "lm_head"}


def hf_config(cfg: GPTConfig, eot_id: int | None = None, bos_id: int | None = None) -> dict:
    """Our model config -> the `config.json` transformers reads (FP32 weights); `eot_id` ends generation and
    `bos_id` starts it (the EOT where the tokenizer has no BOS convention)."""
    # both spellings of dtype and RoPE theta: transformers 5 reads `dtype`/`rope_parameters`, 4.x the others
    common = {"vocab_size": cfg.padded_vocab_size, "tie_word_embeddings": cfg.tie_embeddings,
              "bos_token_id": eot_id if bos_id is None else bos_id, "eos_token_id": eot_id,
              "torch_dtype": "float32", "dtype": "float32"}
    exportable(cfg)
    if cfg.arch == "llama":
        kind = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "mlp_bias": False, "hidden_act": "silu"}
        if cfg.moe.num_experts:
            kind = moe_config(cfg)
        elif cfg.qk_norm:
            kind = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "use_sliding_window": False,
                    "hidden_act": "silu"}
        elif cfg.mlp_kind == "relu2":
            kind = {"architectures": ["ArceeForCausalLM"], "model_type": "arcee", "mlp_bias": False,
                    "hidden_act": "relu2"}
        return {**kind, "hidden_size": cfg.n_embd, "intermediate_size": cfg.ffn_dim, "num_hidden_layers": cfg.n_layer,
                "num_attention_heads": cfg.n_head, "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_dim,
                "max_position_embeddings": cfg.block_size, "rms_norm_eps": cfg.norm_eps,
                "rope_theta": cfg.rope_theta, **({"rope_scaling": dict(cfg.rope_scaling)} if cfg.rope_scaling else {}),
                "rope_parameters": {"rope_type": "default", **(cfg.rope_scaling or {}), "rope_theta": cfg.rope_theta},
                "attention_bias": False, "attention_dropout": 0.0, **common}
    if cfg.kv_heads != cfg.n_head:
        raise ValueError("GPT-2 in transformers has no grouped-query attention: export needs n_kv_head = n_head")
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_embd": cfg.n_embd, "n_layer": cfg.n_layer,
            "n_head": cfg.n_head, "n_inner": cfg.ffn_dim, "n_positions": cfg.block_size,
            "layer_norm_epsilon": cfg.norm_eps, "activation_function": "gelu_new",  # GELU, tanh form
            "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, **common}


def moe_config(cfg: GPTConfig) -> dict:
    """The MoE part of config.json: Qwen3-MoE for a softmax router without shared experts (QK-norm always), GLM-4-MoE
    for DeepSeek's sigmoid router with a score-correction bias and shared experts (exportable checks which)."""
    m = cfg.moe
    common = {"num_experts_per_tok": m.top_k, "norm_topk_prob": m.renormalize, "moe_intermediate_size": cfg.expert_size,
              "hidden_act": "silu"}
    if m.router == "softmax":
        return {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "num_experts": m.num_experts,
                "decoder_sparse_step": 1, "mlp_only_layers": list(range(m.dense_layers)), "use_sliding_window": False,
                "output_router_logits": False, **common}
    return {"architectures": ["Glm4MoeForCausalLM"], "model_type": "glm4_moe", "n_routed_experts": m.num_experts,
            "n_shared_experts": m.shared_experts, "first_k_dense_replace": m.dense_layers, "n_group": 1,
            "topk_group": 1, "routed_scaling_factor": 1.0, "use_qk_norm": cfg.qk_norm, "partial_rotary_factor": 1.0,
            **common}


def exportable(cfg: GPTConfig) -> None:
    """Raise ValueError naming the flag when no transformers class computes what the model does: ReLU^2 MLP ->
    Arcee, QK-norm -> Qwen3, MoE -> `moe_config`'s classes."""
    allowed = {"gpt2": ("gelu",), "llama": ("swiglu",) if cfg.qk_norm else ("swiglu", "relu2")}[cfg.arch]
    if cfg.mlp_kind not in allowed:
        what = {"gpt2": "GPT-2", "llama": "Qwen3 (QK-norm)" if cfg.qk_norm else "Llama/Arcee"}[cfg.arch]
        raise ValueError(f"model.mlp={cfg.mlp_kind}: no transformers class has {what} with that MLP; export needs "
                         f"model.mlp={' or '.join(allowed)}")
    if cfg.qk_norm and cfg.arch == "gpt2":
        raise ValueError("model.qk_norm with arch gpt2: transformers' GPT-2 has no QK-norm (llama maps to Qwen3)")
    m = cfg.moe
    if not m.num_experts:
        return
    if m.router == "softmax" and (m.shared_experts or m.bias_update_rate or not cfg.qk_norm):
        raise ValueError(
            "a softmax router exports as Qwen3-MoE, which has QK-norm, no shared experts and no score-correction bias; "
            f"export needs model.qk_norm=true, model.moe.shared_experts=0 and model.moe.bias_update_rate=0 (got "
            f"{cfg.qk_norm}, {m.shared_experts}, {m.bias_update_rate}), or model.moe.router=sigmoid (GLM-4-MoE)")
    if m.router == "sigmoid" and not m.shared_experts:
        raise ValueError("a sigmoid router exports as GLM-4-MoE, which always has shared experts; export needs "
                         "model.moe.shared_experts >= 1")


def model_config(hf: dict, block_size: int | None = None) -> GPTConfig:
    """A transformers `config.json` (Llama, Qwen3, Arcee, Qwen3-MoE, GLM-4-MoE or GPT-2) -> GPTConfig; `block_size`
    defaults to its maximum length."""
    kind = hf.get("model_type")
    tie = hf.get("tie_word_embeddings", kind == "gpt2")
    moe = MoEConfig()
    if kind == "qwen3_moe":
        if hf.get("decoder_sparse_step", 1) != 1:
            raise ValueError("Qwen3-MoE with decoder_sparse_step != 1 cannot be imported (MoE layers after the dense)")
        dense = hf.get("mlp_only_layers") or []
        if dense != list(range(len(dense))):
            raise ValueError(f"Qwen3-MoE mlp_only_layers {dense}: only the first layers may be dense")
        moe = MoEConfig(num_experts=hf["num_experts"], top_k=hf["num_experts_per_tok"], dense_layers=len(dense),
                        expert_size=hf["moe_intermediate_size"], renormalize=hf.get("norm_topk_prob", False),
                        bias_update_rate=0.0)
    elif kind == "glm4_moe":
        rope = hf.get("rope_parameters") or {}
        if hf.get("n_group", 1) != 1 or hf.get("routed_scaling_factor", 1.0) != 1.0 or \
                rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 0.5)) != 1.0:
            raise ValueError("GLM-4-MoE imports with n_group 1, routed_scaling_factor 1 and partial_rotary_factor 1")
        moe = MoEConfig(num_experts=hf["n_routed_experts"], top_k=hf["num_experts_per_tok"], router="sigmoid",
                        shared_experts=hf.get("n_shared_experts", 1), expert_size=hf["moe_intermediate_size"],
                        dense_layers=hf.get("first_k_dense_replace", 1), renormalize=hf.get("norm_topk_prob", True))
    if kind in ("llama", "qwen3", "arcee", "qwen3_moe", "glm4_moe"):
        act = {"arcee": "relu2"}.get(kind, "silu")
        if hf.get("attention_bias") or hf.get("mlp_bias") or hf.get("hidden_act", act) != act:
            raise ValueError(f"only bias-free {kind} models with hidden_act {act} can be imported")
        if hf.get("use_sliding_window"):
            raise ValueError("sliding-window attention is not supported")
        rope = rope_scaling(hf)
        n_embd, n_head = hf["hidden_size"], hf["num_attention_heads"]
        if hf.get("head_dim", n_embd // n_head) != n_embd // n_head:
            raise ValueError("head_dim must equal hidden_size / num_attention_heads")
        return GPTConfig(arch="llama", vocab_size=hf["vocab_size"],
                         block_size=block_size or hf["max_position_embeddings"], n_layer=hf["num_hidden_layers"],
                         n_head=n_head, n_kv_head=hf.get("num_key_value_heads", n_head), n_embd=n_embd,
                         intermediate_size=hf["intermediate_size"],
                         rope_theta=float(rope.pop("rope_theta", None) or hf.get("rope_theta") or 10000.0),
                         rope_scaling=rope or None, norm_eps=hf.get("rms_norm_eps", 1e-6), tie_embeddings=tie,
                         mlp="relu2" if kind == "arcee" else None, moe=moe,
                         qk_norm=kind in ("qwen3", "qwen3_moe") or hf.get("use_qk_norm", False))
    if kind == "gpt2":
        return GPTConfig(arch="gpt2", vocab_size=hf["vocab_size"], block_size=block_size or hf["n_positions"],
                         n_layer=hf["n_layer"], n_head=hf["n_head"], n_embd=hf["n_embd"],
                         intermediate_size=hf.get("n_inner") or 4 * hf["n_embd"],
                         norm_eps=hf.get("layer_norm_epsilon", 1e-5), tie_embeddings=tie)
    raise ValueError(f"model_type {kind!r} cannot be imported (llama, qwen3, arcee, qwen3_moe, glm4_moe or gpt2)")


def rope_scaling(hf: dict) -> dict:
    """config.json's RoPE settings (transformers 5's `rope_parameters` or 4.x's `rope_scaling`) as {rope_theta, and
    our model.rope_scaling's keys}. Raises ValueError for a kind that model.rope_cache does not compute."""
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    kind = rope.pop("rope_type", rope.pop("type", "default"))
    if rope.pop("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError("partial rotary embeddings (partial_rotary_factor < 1) are not supported")
    theta = rope.pop("rope_theta", None)
    if kind == "default":
        return {"rope_theta": theta} if theta else {}
    if kind in ("llama3", "yarn"):
        rope.setdefault("original_max_position_embeddings",
                        hf.get("original_max_position_embeddings", hf.get("max_position_embeddings")))
    rope = {k: v for k, v in rope.items() if v is not None}  # transformers writes unset options as null
    try:
        check_rope_scaling({"rope_type": kind, **rope})
    except ValueError as e:
        raise ValueError(f"rope_scaling: {str(e).replace('model.rope_scaling', 'it')}") from None
    return {"rope_type": kind, **rope, **({"rope_theta": theta} if theta else {})}


def safetensors_module():
    """safetensors.torch, imported on first use: it comes with the hf extra, not the base install."""
    try:
        import safetensors.torch
    except ImportError:
        raise ConfigError('Hugging Face weights need the safetensors package: pip install ".[hf]"') from None
    return safetensors.torch


def config_from_init(path: str, ours: GPTConfig) -> GPTConfig:
    """The model section for `train.init_from=path` (a Hugging Face folder, or a run or checkpoint of ours): its shape
    with our block_size, init_std, dropout and (where set) rope_scaling. Raises config.ConfigError."""
    try:
        if os.path.exists(os.path.join(path, "config.json")):
            safetensors_module()  # before the run starts, not when the weights are loaded
            with open(os.path.join(path, "config.json")) as f:
                full = model_config(json.load(f))
        else:
            saved = config.build(checkpoint.read_state(checkpoint.resolve(path))["config"])
            if saved.train.lora:
                raise ValueError("it is a LoRA run; start from its merged model (python export.py RUN --to hf DIR "
                                 "--merge) instead")
            full = saved.model
            if full.arch == "gpt2" and ours.block_size != full.block_size:
                raise ValueError(f"model.block_size {ours.block_size} differs from its {full.block_size} positions")
        if full.arch == "gpt2" and ours.block_size > full.block_size:
            raise ValueError(f"model.block_size {ours.block_size} is longer than its {full.block_size} positions")
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError(f"train.init_from={path}: {e}") from None
    return replace(full, block_size=ours.block_size, init_std=ours.init_std, dropout=ours.dropout,
                   rope_scaling=ours.rope_scaling or full.rope_scaling)


def to_hf(model: GPT) -> dict[str, torch.Tensor]:
    """Our state dict -> transformers' names and layouts (contiguous FP32 CPU tensors; a tied head once)."""
    cfg = model.cfg  # LoRA adapters are left out: `export_adapter` writes them
    sd = {k: v.detach().float().cpu() for k, v in model.state_dict().items() if not lora.is_adapter(k)}
    if cfg.tie_embeddings:
        sd.pop("lm_head.weight")  # transformers re-ties it from the embedding
    if cfg.arch == "llama":
        for k in [k for k in sd if k.endswith(("experts.gate_proj", "experts.up_proj", "experts.down_proj"))]:
            stack, (prefix, name) = sd.pop(k), k.rsplit(".", 1)  # (E, out, in) -> one Linear weight per expert,
            sd.update({f"{prefix}.{e}.{name}.weight": w for e, w in enumerate(stack)})  # as save_pretrained writes
        if cfg.moe.router == "softmax":  # Qwen3-MoE: no bias (exportable: bias_update_rate 0, so it is all zeros)
            sd = {k: v for k, v in sd.items() if not k.endswith("e_score_correction_bias")}
        return {k if k == "lm_head.weight" else f"model.{k}": v.contiguous() for k, v in sd.items()}
    out = {}
    for k, v in sd.items():
        mod, _, kind = k.rpartition(".")
        if mod.startswith("layers."):
            _, i, rest = mod.split(".", 2)
            if rest in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                continue  # fused below
            name = f"transformer.h.{i}.{GPT2_LAYER[rest]}.{kind}"
            out[name] = v.t() if kind == "weight" and "layernorm" not in rest else v  # Conv1D: (in, out)
        else:
            out[f"{GPT2_TOP[mod]}.{kind}"] = v
    for i in range(cfg.n_layer):
        p = f"layers.{i}.self_attn."
        for kind in ("weight", "bias"):
            qkv = torch.cat([sd[f"{p}{n}_proj.{kind}"] for n in "qkv"], dim=0)
            out[f"transformer.h.{i}.attn.c_attn.{kind}"] = qkv.t() if kind == "weight" else qkv
    return {k: v.contiguous() for k, v in out.items()}


def from_hf(sd: dict[str, torch.Tensor], cfg: GPTConfig) -> dict[str, torch.Tensor]:
    """transformers' state dict -> our names and layouts (the inverse of `to_hf`)."""
    if cfg.arch == "llama":
        out, experts = {}, {}
        for k, v in sd.items():
            if not k.startswith(LLAMA_HF_KEYS):
                continue
            k = k.removeprefix("model.")
            if ".mlp.experts." in k:  # per-expert Linear weights (experts.E.gate_proj.weight) or fused stacks
                prefix, rest = k.split(".mlp.experts.")
                if rest == "gate_up_proj":  # transformers' in-memory layout: (E, 2 * I, d), gate first
                    out[f"{prefix}.mlp.experts.gate_proj"], out[f"{prefix}.mlp.experts.up_proj"] = v.chunk(2, dim=1)
                elif rest == "down_proj":
                    out[f"{prefix}.mlp.experts.down_proj"] = v
                else:
                    e, name, _ = rest.split(".")
                    experts.setdefault(f"{prefix}.mlp.experts.{name}", {})[int(e)] = v
            else:
                out[k] = v
        out.update({k: torch.stack([d[e] for e in sorted(d)]) for k, d in experts.items()})
    else:
        back, back_layer = {v: k for k, v in GPT2_TOP.items()}, {v: k for k, v in GPT2_LAYER.items()}
        out = {}
        for k, v in sd.items():
            mod, _, kind = k.rpartition(".")
            if mod.startswith("transformer.h."):
                _, _, i, rest = mod.split(".", 3)
                if rest == "attn.c_attn":
                    qkv = v.t() if kind == "weight" else v
                    for n, part in zip("qkv", qkv.split(cfg.n_embd, dim=0)):
                        out[f"layers.{i}.self_attn.{n}_proj.{kind}"] = part
                elif rest in back_layer:
                    name = back_layer[rest]
                    out[f"layers.{i}.{name}.{kind}"] = v.t() if kind == "weight" and "layernorm" not in name else v
            elif mod in back:
                out[f"{back[mod]}.{kind}"] = v
    if cfg.tie_embeddings:
        out.pop("lm_head.weight", None)
    elif "lm_head.weight" not in out:
        raise ValueError("the checkpoint has no lm_head.weight but its config says the head is untied")
    return out


def read_hf(path: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """A Hugging Face model folder -> (config.json as a dict, state dict from its safetensors file(s))."""
    load_file = safetensors_module().load_file
    with open(os.path.join(path, "config.json")) as f:
        hf = json.load(f)
    files = sorted(n for n in os.listdir(path) if n.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors weights in {path} (convert .bin checkpoints first)")
    return hf, {k: v for name in files for k, v in load_file(os.path.join(path, name)).items()}


def load_init(model: GPT, path: str, assign=None) -> None:
    """train.init_from's weights into `model`: a Hugging Face folder by `load_weights`, a run or checkpoint of ours
    by checkpoint.load_base (resharded by DCP); LoRA adapters keep their values."""
    if os.path.exists(os.path.join(path, "config.json")):
        load_weights(model, path, assign)
    else:
        checkpoint.load_base(checkpoint.resolve(path), model, skip=lora.is_adapter)


@torch.no_grad()
def load_weights(model: GPT, path: str, assign=None) -> None:
    """Copy the weights of the Hugging Face folder `path` into `model` in place, parameter by parameter. A
    vocabulary smaller than our padded table fills its first rows (the rest keep their init). `assign(param,
    full_value)` stores a full tensor into a parameter (a sharded trainer passes one that keeps its shard)."""
    _, sd = read_hf(path)
    ours, assign = from_hf(sd, model.cfg), assign or (lambda p, value: p.copy_(value))
    params = {n: p for n, p in model.named_parameters() if not lora.is_adapter(n)}  # LoRA adapters start apart
    biases = {k: b for k, b in model.named_buffers() if k.endswith("e_score_correction_bias")}  # optional
    missing = sorted(set(params) - set(ours) - ({"lm_head.weight"} if model.cfg.tie_embeddings else set()))
    for name in set(ours) & set(biases):
        biases[name].copy_(ours.pop(name))
    extra = sorted(set(ours) - set(params))
    if missing or extra:
        raise ValueError(f"{path} does not match the model: missing {missing[:5]}, unexpected {extra[:5]}")
    for name, value in ours.items():
        p = params[name]
        if value.shape != p.shape:
            if name in ("embed_tokens.weight", "lm_head.weight") and value.shape[0] <= p.shape[0]:
                full = p.full_tensor() if hasattr(p, "full_tensor") else p  # gathered when a sharded DTensor
                value = torch.cat([value, full[value.shape[0]:].to(value)])  # keep the padded rows' init
            elif name == "embed_positions.weight" and value.shape[0] >= p.shape[0]:
                value = value[:p.shape[0]]  # a shorter context than the checkpoint's
            else:
                raise ValueError(f"{name}: {path} has shape {tuple(value.shape)}, the model {tuple(p.shape)}")
        assign(p, value.to(device=p.device, dtype=p.dtype))


def check_init_tokenizer(cfg: config.Config) -> list[str]:
    """Warnings for datasets not tokenized with the tokenizer that train.init_from's folder brings (a model
    continues pretraining well only on the ids it was trained with: prepare with --tokenizer hf:FOLDER)."""
    theirs = os.path.join(cfg.train.init_from, "tokenizer.json")
    if not os.path.exists(theirs):
        return []
    return [f"{d} was not tokenized with the tokenizer of {cfg.train.init_from}; prepare it with python "
            f"data/prepare.py ... --tokenizer hf:{cfg.train.init_from}" for d in cfg.data.datasets
            if (spec := read_meta(d)["tokenizer"])["type"] not in ("hf", "bpe")  # bpe: ours, exported as tokenizer.json
            or not filecmp.cmp(theirs, os.path.join(d, spec["file"]), shallow=False)]
