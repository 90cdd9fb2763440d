"""Hugging Face bridge: an export loads in transformers with our logits and greedy tokens; ours -> HF -> ours is
exact; training starts from a Hugging Face folder."""
import json
import os
from dataclasses import asdict

import pytest
import torch

from build import load_model
from hf import load_weights, model_config
import export
import train
from conftest import ROOT, TINY
from model import GPTConfig, build

transformers = pytest.importorskip("transformers")

SHAPES = {  # GQA + untied head + a non-default theta; GPT-2 with its tied head
    "llama": dict(arch="llama", n_kv_head=2, tie_embeddings=False, rope_theta=5e5, intermediate_size=160),
    "gpt2": dict(arch="gpt2", tie_embeddings=True, intermediate_size=256),
    "qk_norm": dict(arch="llama", n_kv_head=2, tie_embeddings=True, intermediate_size=160, qk_norm=True),
    "relu2": dict(arch="llama", n_kv_head=2, tie_embeddings=False, intermediate_size=256, mlp="relu2"),
}
HF_CLASS = {"llama": "LlamaForCausalLM", "gpt2": "GPT2LMHeadModel", "qk_norm": "Qwen3ForCausalLM",
            "relu2": "ArceeForCausalLM"}


def tiny(arch: str, vocab: int = 300) -> GPTConfig:
    return GPTConfig(vocab_size=vocab, block_size=64, n_layer=2, n_head=4, n_embd=64, **SHAPES[arch])


@pytest.mark.parametrize("arch", SHAPES)
def test_transformers_gives_our_logits_and_tokens(arch, tmp_path):
    cfg = tiny(arch)
    ours = build(cfg, "cpu", seed=3).eval()
    export.export_hf(ours, str(tmp_path))
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    assert type(theirs).__name__ == HF_CLASS[arch]
    if arch == "qk_norm":  # norm weights away from 1, so that a missing or misplaced norm would show
        with torch.no_grad():
            for layer in ours.layers:
                layer.self_attn.q_norm.weight.uniform_(0.5, 1.5)
                layer.self_attn.k_norm.weight.uniform_(0.5, 1.5)
        export.export_hf(ours, str(tmp_path))
        theirs = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    idx = torch.randint(0, cfg.vocab_size, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (ours(idx) - theirs(idx).logits).abs().max().item()
    assert diff < 1e-5, diff
    prompt = idx[:1, :8]
    mine = ours.generate(prompt, 24, temperature=0)
    # our sampler never emits the padded ids; tell transformers the same, and not to stop early
    hf = theirs.generate(prompt, max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=0,
                         suppress_tokens=list(range(cfg.vocab_size, cfg.padded_vocab_size)))
    assert mine.tolist() == hf.tolist()


@pytest.mark.parametrize("arch", SHAPES)
def test_round_trip_is_exact(arch, tmp_path):
    cfg = tiny(arch)
    a = build(cfg, "cpu", seed=1)
    export.export_hf(a, str(tmp_path))
    with open(tmp_path / "config.json") as f:
        back_cfg = model_config(json.load(f))
    assert asdict(back_cfg) == {**asdict(cfg), "vocab_size": cfg.padded_vocab_size}
    b = build(cfg, "cpu", seed=2)
    load_weights(b, str(tmp_path))
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("shape", ["qk_norm", "llama"])
def test_export_refuses_what_transformers_cannot_compute(shape, tmp_path):
    cfg = GPTConfig(**{**asdict(tiny(shape)), "mlp": "gelu"})  # no Llama-like class has a non-gated GELU MLP
    with pytest.raises(ValueError, match="model.mlp=gelu"):
        export.export_hf(build(cfg, "cpu"), str(tmp_path))


def test_import_rejects_a_mismatched_model(tmp_path):
    export.export_hf(build(tiny("llama"), "cpu"), str(tmp_path))
    other = build(GPTConfig(**{**asdict(tiny("llama")), "n_layer": 3}), "cpu")
    with pytest.raises(ValueError, match="does not match"):
        load_weights(other, str(tmp_path))


def test_export_cli_writes_a_tokenizer_transformers_reads(trained, tmp_path):
    dst = str(tmp_path / "hf")
    assert export.main([trained, "--to", "hf", dst]) == 0  # the command line, in this process
    from tokenizer import load_tokenizer
    ours = load_tokenizer(os.path.join(trained, "tokenizer"))
    theirs = transformers.AutoTokenizer.from_pretrained(dst)
    text = "def add(a, b):\n    return a + b\n"
    assert theirs(text)["input_ids"] == ours.encode(text)
    assert theirs.eos_token_id == ours.eot_id
    model, _, _ = load_model(trained, "cpu")
    hf = transformers.AutoModelForCausalLM.from_pretrained(dst, dtype=torch.float32).eval()
    ids = torch.tensor([ours.encode(text)])
    with torch.no_grad():
        assert torch.allclose(model(ids), hf(ids).logits, atol=1e-5)


@pytest.mark.parametrize("parallel", ["none", "fsdp"])
def test_training_starts_from_a_hf_checkpoint(corpus, tmp_path, monkeypatch, parallel):
    from safetensors.torch import load_file, save_file
    from test_distributed import ok, torchrun
    monkeypatch.chdir(ROOT)
    src = build(tiny("llama", vocab=520), "cpu", seed=5)
    hf_dir, out = tmp_path / "hf", str(tmp_path / "run")
    export.export_hf(src, str(hf_dir))
    # an unpadded vocab, as real checkpoints have (CodeLlama: 32016): our table keeps its own rows past it
    conf = json.loads((hf_dir / "config.json").read_text())
    (hf_dir / "config.json").write_text(json.dumps({**conf, "vocab_size": 520}))
    sd = load_file(hf_dir / "model.safetensors")
    for k in ("model.embed_tokens.weight", "lm_head.weight"):
        sd[k] = sd[k][:520].contiguous()
    save_file(sd, hf_dir / "model.safetensors")
    # lr 0 (Muon too): one step changes nothing, so the checkpoint must hold exactly the imported weights
    argv = ["configs/tiny.yaml", *TINY, f"data.datasets=[{corpus}]", f"train.out_dir={out}",
            f"train.init_from={hf_dir}", "train.max_steps=1", "train.lr=0", "train.muon_lr=null",
            "train.eval_interval=0", "train.precision=fp32", "model.n_layer=5"]  # the shape comes from config.json, whatever the YAML says
    if parallel == "none":
        assert train.main(argv) == 0
    else:
        ok(torchrun(*argv, "train.parallel=fsdp", "train.micro_batch_size=2"))
    model, cfg, _ = load_model(out, "cpu")
    m = cfg.model
    assert (m.n_layer, m.n_kv_head, m.rope_theta, m.tie_embeddings, m.vocab_size) == (2, 2, 5e5, False, 520)
    for (k, a), b in zip(src.state_dict().items(), model.state_dict().values()):
        if k in ("embed_tokens.weight", "lm_head.weight"):
            a, b = a[:520], b[:520]
        assert torch.equal(a, b), k


def test_gpt2_tokenizer_exports_as_transformers_gpt2(tmp_path):
    from tokenizer import Tokenizer
    spec = {"type": "tiktoken", "name": "gpt2"}
    run_tok, dst = tmp_path / "tok", tmp_path / "hf"
    os.makedirs(run_tok)
    os.makedirs(dst)
    (run_tok / "meta.json").write_text(json.dumps({"tokenizer": spec, "eot_id": 50256}))
    assert export.export_tokenizer(str(run_tok), str(dst), 1024)
    theirs = transformers.AutoTokenizer.from_pretrained(str(dst))
    text = "def add(a, b):\n    return a + b  # h\u00e9llo \u00fcnicode\n\n\n  x"
    assert theirs(text)["input_ids"] == Tokenizer(spec, str(run_tok)).encode(text)
    assert theirs.eos_token_id == 50256
