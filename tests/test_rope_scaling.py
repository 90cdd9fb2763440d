"""RoPE scaling (model.rope_scaling): linear, llama3 and yarn give transformers' Llama logits at a sequence four
times the original context, go out to config.json and come back, and bad settings stop with the key named."""
import json
from dataclasses import asdict

import pytest
import torch

from hf import model_config
import config
import export
from model import GPTConfig, build

transformers = pytest.importorskip("transformers")

ORIGINAL = 32  # the "pretraining" context; every test runs at 4x that
SCALINGS = {
    "linear": {"rope_type": "linear", "factor": 4.0},
    "llama3": {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": ORIGINAL},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": ORIGINAL},
    "yarn_mscale": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": ORIGINAL,
                    "beta_fast": 16, "beta_slow": 2, "mscale": 0.707, "mscale_all_dim": 1.0, "truncate": False},
}


def long_cfg(scaling: dict) -> GPTConfig:
    # head_dim 32 and theta 500: wavelengths from ~6 to ~2800 positions, so every kind changes some frequencies
    return GPTConfig(vocab_size=300, block_size=4 * ORIGINAL, n_layer=2, n_head=2, n_kv_head=1, n_embd=64,
                     intermediate_size=160, rope_theta=500.0, init_std=0.1, rope_scaling=scaling)


@pytest.mark.parametrize("kind", SCALINGS)
def test_scaled_rope_matches_transformers_past_the_original_context(kind, tmp_path):
    cfg = long_cfg(SCALINGS[kind])
    ours = build(cfg, "cpu", seed=4).eval()
    export.export_hf(ours, str(tmp_path))
    hf = json.loads((tmp_path / "config.json").read_text())
    assert hf["rope_scaling"] == SCALINGS[kind] and hf["max_position_embeddings"] == 4 * ORIGINAL
    back = model_config(hf)
    assert {**asdict(back), "init_std": 0.1} == {**asdict(cfg), "vocab_size": cfg.padded_vocab_size}
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    assert theirs.config.rope_parameters["rope_type"] == SCALINGS[kind]["rope_type"]
    idx = torch.randint(0, 300, (2, 4 * ORIGINAL), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ours(idx), theirs(idx).logits
        plain = build(GPTConfig(**{**asdict(cfg), "rope_scaling": None}), "cpu", seed=4).eval()(idx)
    diff = (a - b).abs().max().item()
    assert diff < 2e-5, diff
    assert (a - plain).abs().max().item() > 0.05  # the scaling changed the logits (and theirs with them)


def test_import_reads_both_spellings_of_rope_settings():
    base = {"model_type": "llama", "vocab_size": 256, "hidden_size": 64, "num_attention_heads": 2,
            "num_hidden_layers": 1, "intermediate_size": 128, "max_position_embeddings": 128}
    v4 = {**base, "rope_theta": 5e5, "rope_scaling": {"type": "yarn", "factor": 4.0,
                                                       "original_max_position_embeddings": 32}}
    v5 = {**base, "rope_parameters": {"rope_type": "yarn", "rope_theta": 5e5, "factor": 4.0, "beta_fast": None,
                                      "original_max_position_embeddings": 32}}
    phi3 = {**base, "original_max_position_embeddings": 32, "rope_theta": 5e5,
            "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}
    saved = transformers.LlamaConfig(vocab_size=256, hidden_size=64, num_attention_heads=2, num_hidden_layers=1,
                                     intermediate_size=128, max_position_embeddings=128, rope_theta=5e5,
                                     rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                                   "original_max_position_embeddings": 32}).to_dict()
    for hf in (v4, v5, phi3, saved):
        m = model_config(hf)
        assert (m.rope_theta, m.rope_scaling) == (5e5, {"rope_type": "yarn", "factor": 4.0,
                                                        "original_max_position_embeddings": 32}), hf
    plain = model_config({**base, "rope_parameters": {"rope_type": "default", "rope_theta": 1e4}})
    assert plain.rope_scaling is None
    with pytest.raises(ValueError, match="rope_type must be one of"):
        model_config({**base, "rope_scaling": {"rope_type": "longrope", "factor": 2.0}})


@pytest.mark.parametrize("override,message", [
    ("{rope_type: ntk, factor: 2}", "rope_type must be one of linear, llama3, yarn"),
    ("{rope_type: yarn, factor: 4}", "needs original_max_position_embeddings"),
    ("{rope_type: linear, factor: 0.5}", "factor must be >= 1"),
    ("{rope_type: linear, factor: 2, beta_fast: 3}", "does not take beta_fast"),
    ("{rope_type: llama3, factor: 8, low_freq_factor: 4, high_freq_factor: 1, original_max_position_embeddings: 64}",
     "high_freq_factor"),
])
def test_bad_rope_scaling_stops_with_the_key(override, message):
    with pytest.raises(config.ConfigError, match=message):
        config.load(["configs/tiny.yaml", f"model.rope_scaling={override}"])
    ok = config.load(["configs/tiny.yaml", "model.rope_scaling={rope_type: linear, factor: 2}"])
    assert ok.model.rope_scaling == {"rope_type": "linear", "factor": 2}
