"""Mixture of Experts (model.moe): the grouped GEMM against its per-expert loop, the layer against a per-token
reference, active-parameter FLOPs, the KV cache, config keys, the balancing bias (and a skipped step leaving it),
training with a bit-exact resume, DDP (AdamW) and expert parallel over 2 ranks (train.ep=2 with FSDP2; Muon on the
local 3-D expert stacks) against one process, an ep=2 checkpoint resumed in one process, eval.py, and the Hugging
Face exports (Qwen3-MoE, GLM-4-MoE) with their logits and the refusals.

Tolerances: DDP and ep=2 against one process as tests/test_distributed.py (1e-5 on losses of ~9 nats, FP32); the
token counts per expert, all-reduced over the ranks, agree exactly; exports to 1e-5 as the dense ones.
"""
import json
import os
import re
import shutil
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from hf import load_weights, model_config
import config
import eval as eval_
import export
import kernel
import step
import train
from model import GPTConfig, MoE, MoEConfig, build
from test_distributed import DIST, Launch
from test_train import rows, train_args

MOE = ["model.moe.num_experts=4", "model.moe.top_k=2", "model.moe.aux_loss_coef=0.01"]


def tiny(**moe) -> GPTConfig:
    return GPTConfig(vocab_size=300, block_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=64,
                     intermediate_size=256, moe=MoEConfig(**{"num_experts": 4, "top_k": 2, **moe}))


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_grouped_mm_matches_the_per_expert_loop(dtype, tol):
    gen = torch.Generator().manual_seed(0)
    counts = torch.tensor([5, 0, 19, 8])  # an expert without tokens too
    x = torch.randn(int(counts.sum()), 64, generator=gen).to(dtype)
    w = torch.randn(4, 48, 64, generator=gen).to(dtype)
    grad = torch.randn(len(x), 48, generator=gen).to(dtype)
    out = {}
    for name, fn in [("loop", kernel.loop_grouped_mm), ("grouped", kernel.torch_grouped_mm)]:
        xi, wi = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = fn(xi, wi, counts)
        y.backward(grad)
        out[name] = (y.float(), xi.grad.float(), wi.grad.float())
    for a, b in zip(out["loop"], out["grouped"]):
        assert a.shape == b.shape and ((a - b).abs().max() / a.abs().max()).item() < tol
    xs = x.clone().requires_grad_()  # a gradient with zero strides (from .sum()) is made contiguous for it
    kernel.torch_grouped_mm(xs, w, counts).float().sum().backward()


@pytest.mark.parametrize("moe", [dict(router="softmax", renormalize=False),
                                 dict(router="sigmoid", shared_experts=1, renormalize=True)])
def test_the_layer_is_its_per_token_definition(moe):
    cfg = tiny(**moe, expert_size=40)
    layer = build(cfg, "cpu", seed=1).layers[0].mlp
    assert isinstance(layer, MoE)
    with torch.no_grad():
        layer.gate.e_score_correction_bias.copy_(torch.tensor([0.3, 0.0, -0.3, 0.0]))  # changes choices
    x = torch.randn(3, 16, 64, generator=torch.Generator().manual_seed(2))
    e = layer.experts
    ref = torch.zeros_like(x)
    for b in range(3):
        for t in range(16):
            logits = layer.gate.weight @ x[b, t]
            s = logits.softmax(-1) if moe["router"] == "softmax" else logits.sigmoid()
            top = (s + layer.gate.e_score_correction_bias).topk(2).indices
            wts = s[top] / (s[top].sum() if moe["renormalize"] else 1)
            for i, wt in zip(top, wts):
                ref[b, t] += wt * (e.down_proj[i] @ (F.silu(e.gate_proj[i] @ x[b, t]) * (e.up_proj[i] @ x[b, t])))
            if moe.get("shared_experts"):
                ref[b, t] += layer.shared_experts(x[b, t])
    for ops in (kernel.REFERENCE, kernel.configure("auto", "auto", "cpu")):
        layer.ops = ops
        assert (layer(x) - ref).abs().max().item() < 1e-5


def test_active_flops_kv_cache_config_and_the_bias_step():
    dense, moe = build(replace(tiny(), moe=MoEConfig()), "cpu"), build(tiny(), "cpu")
    # the default expert width keeps the dense FLOPs per token: top_k x (ffn_dim / top_k); the router adds E x d
    assert moe.cfg.expert_size == 128
    assert moe.flops_per_token() == dense.flops_per_token() + 6 * 2 * 4 * 64
    assert moe.num_params() > dense.num_params()
    prompt = torch.randint(0, 300, (2, 5), generator=torch.Generator().manual_seed(0))
    moe.eval()
    assert torch.equal(moe.generate(prompt, 20, temperature=0), moe.generate(prompt, 20, temperature=0,
                                                                             use_cache=False))
    # nested keys on the command line and in YAML, with the usual errors
    cfg = config.load(["model.moe.num_experts=8", "model.moe.router=sigmoid"])
    assert cfg.model.moe.num_experts == 8 and cfg.model.moe.router == "sigmoid"
    assert config.build(config.to_dict(cfg)).model == cfg.model  # as a checkpoint keeps it
    for args, words in [(["model.moe.num_expert=8"], "did you mean 'model.moe.num_experts'"),
                        (["model.moe.num_experts=6", "train.ep=4"], "train.ep=4 needs model.moe.num_experts a"),
                        (["model.moe.num_experts=4", "train.ep=2", "eval.interval=5"], "and eval.interval 0"),
                        (["model.moe.num_experts=4", "model.moe.top_k=5"], "model.moe.top_k must be in [1"),
                        (["model.moe.router=relu"], "softmax, sigmoid"),
                        (["model.moe.num_experts=4", "model.moe.top_k=1"], "set model.moe.renormalize=false"),
                        (["model.moe=3"], "model.moe (command line) is a section"),
                        (["model.moe.num_experts=4", "model.moe.expert_size=20"], "multiples of 8"),
                        (["model.moe.num_experts=4", "model.arch=gpt2"], "model.moe needs arch llama")]:
        with pytest.raises(config.ConfigError, match=re.escape(words)):
            config.load(args)
    # what is known only once the model is built (train.init_from may make it an MoE) and the world size: checked
    # by config.check_model, which train.py calls at start-up (a LoRA on an MoE already at load)
    with pytest.raises(config.ConfigError, match=re.escape("divide model.moe.num_experts (0)")):
        config.check_model(config.load(["model.vocab_size=300", "train.ep=2"]), world=2)
    with pytest.raises(config.ConfigError, match=re.escape("train.lora with an MoE model")):
        config.load(["model.vocab_size=300", "model.moe.num_experts=4", "train.lora=true"])
    # the balancing step: under-loaded experts' biases rise, over-loaded ones fall; a skipped step moves nothing
    layer = moe.layers[0].mlp
    bias = layer.gate.e_score_correction_bias
    layer.load = torch.tensor([10, 2, 4, 8])
    step.balance_experts([layer], torch.tensor(1.0), "none")
    assert torch.equal(bias, torch.zeros(4)) and layer.load is None
    layer.load = torch.tensor([10, 2, 4, 8])
    step.balance_experts([layer], torch.tensor(0.0), "none")
    assert torch.allclose(bias, torch.tensor([-1e-3, 1e-3, 1e-3, -1e-3]))


def test_plan_counts_every_expert_and_keeps_them_local_under_ep():
    import plan
    base = config.load(["configs/1b.yaml", "model.vocab_size=50304", "model.moe.num_experts=16"])
    ep = config.load(["configs/1b.yaml", "model.vocab_size=50304", "model.moe.num_experts=16", "train.ep=8"])
    dense = config.load(["configs/1b.yaml", "model.vocab_size=50304"])
    rows = {name: {r["mode"]: r for r in plan.plan(c, 8, "h100")} for name, c in
            [("dense", dense), ("moe", base), ("ep", ep)]}
    assert rows["moe"]["fsdp"]["params"] > 4 * rows["dense"]["fsdp"]["params"]  # all 16 experts are held
    assert rows["ep"]["fsdp"]["params"] == rows["moe"]["fsdp"]["params"]
    assert rows["ep"]["fsdp"]["working"] < rows["moe"]["fsdp"]["working"]  # experts are never gathered
    assert rows["ep"]["fsdp"]["configured"]
    # equal active FLOPs per token: the router's are all that is added
    assert rows["moe"]["fsdp"]["step_tflops"] == pytest.approx(rows["dense"]["fsdp"]["step_tflops"], rel=1e-3)


@pytest.fixture(scope="module")
def moe_run(corpus, tmp_path_factory):
    """One process, Muon (3-D expert stacks), 6 steps with checkpoints at 3 and 6."""
    out = str(tmp_path_factory.mktemp("moe") / "single")
    assert train.main(train_args(corpus, out, *DIST, *MOE, "train.max_steps=6")) == 0
    return out


def test_training_logs_balance_resumes_bit_exactly_and_evaluates(corpus, moe_run, tmp_path, capsys):
    logged = [r for r in rows(moe_run) if "loss" in r]
    assert len(logged) == 6 and all(r["moe_load_max"] >= 1.0 and r["moe_aux_loss"] > 0 for r in logged)
    assert len(logged[-1]["moe_load"]) == 2 and logged[-1]["moe_bias_spread_max"] > 0
    resumed = str(tmp_path / "resumed")
    os.makedirs(resumed)
    shutil.copytree(os.path.join(moe_run, "step_000003"), os.path.join(resumed, "step_000003"))
    assert train.main(train_args(corpus, resumed, *DIST, *MOE, "train.max_steps=6")) == 0
    again = [r for r in rows(resumed) if "loss" in r]
    assert [r["step"] for r in again] == [4, 5, 6]
    for a, b in zip(again, logged[3:]):  # bit-exact: the biases and Muon's 3-D momenta came back
        assert (a["loss"], a["grad_norm"], a["moe_load"]) == (b["loss"], b["grad_norm"], b["moe_load"])
    # eval.py's command line, in this process (an interpreter costs seconds), on a few batches: its text report
    assert eval_.main([moe_run, "--max_tokens", "2000"]) == 0
    out = capsys.readouterr().out
    assert "bpb" in out or "bits" in out.lower()


def test_ddp_and_expert_parallel_match_one_process_and_reshard(corpus, moe_run, tmp_path):
    adamw = str(tmp_path / "adamw")
    assert train.main(train_args(corpus, adamw, *DIST, *MOE, "train.max_steps=4", "train.optimizer=adamw")) == 0
    ddp, ep = str(tmp_path / "ddp"), str(tmp_path / "ep")
    launch = Launch({  # both in one launch
        "ddp": (ddp, train_args(corpus, ddp, *DIST, *MOE, "train.max_steps=4", "train.optimizer=adamw",
                                "train.parallel=ddp")),
        # expert parallel: 2 experts per rank, tokens by all-to-all, FSDP2 for the rest, Muon on the local experts
        "ep": (ep, train_args(corpus, ep, *DIST, *MOE, "train.max_steps=6", "train.ep=2", "train.loss=chunked"))})
    for name in ("ddp", "ep"):
        launch.finished(name)
    for one, two, steps in [(adamw, ddp, 4), (moe_run, ep, 6)]:
        a, b = [r for r in rows(one) if "loss" in r], [r for r in rows(two) if "loss" in r]
        assert len(a) == len(b) == steps
        for x, y in zip(a, b):
            assert abs(x["loss"] - y["loss"]) < 1e-5, (x, y)
            assert x["moe_load"] == y["moe_load"]  # the counts of both ranks, all-reduced
    # the ep=2 checkpoint (experts sharded over 2 ranks) resumes in one process
    resumed = str(tmp_path / "resumed")
    os.makedirs(resumed)
    shutil.copytree(os.path.join(ep, "step_000003"), os.path.join(resumed, "step_000003"))
    assert train.main(train_args(corpus, resumed, *DIST, *MOE, "train.max_steps=6")) == 0
    a, b = [r for r in rows(resumed) if "loss" in r], [r for r in rows(moe_run) if "loss" in r][3:]
    assert [r["step"] for r in a] == [4, 5, 6] and all(abs(x["loss"] - y["loss"]) < 1e-5 for x, y in zip(a, b))


@pytest.mark.parametrize("kind, moe, qk_norm, cls", [
    ("qwen3_moe", dict(bias_update_rate=0.0, dense_layers=1, expert_size=32), True, "Qwen3MoeForCausalLM"),
    ("glm4_moe", dict(router="sigmoid", shared_experts=1, dense_layers=1, expert_size=40), False,
     "Glm4MoeForCausalLM")])
def test_exports_to_transformers_with_our_logits_and_imports_back(kind, moe, qk_norm, cls, tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = replace(tiny(**moe), n_layer=3, qk_norm=qk_norm)
    ours = build(cfg, "cpu", seed=3).eval()
    if kind == "glm4_moe":  # a bias that changes choices: GLM-4-MoE's e_score_correction_bias must carry it
        with torch.no_grad():
            for layer in ours.layers[1:]:
                layer.mlp.gate.e_score_correction_bias.uniform_(-0.05, 0.05)
    export.export_hf(ours, str(tmp_path))
    theirs, info = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32,
                                                                     output_loading_info=True)
    assert type(theirs).__name__ == cls and not info["missing_keys"] and not info["unexpected_keys"]
    idx = torch.randint(0, cfg.vocab_size, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (ours(idx) - theirs.eval()(idx).logits).abs().max().item() < 1e-5
    prompt = idx[:1, :8]  # greedy tokens with our KV cache = transformers' (padded ids never sampled by ours)
    hf = theirs.generate(prompt, max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=0,
                         suppress_tokens=list(range(cfg.vocab_size, cfg.padded_vocab_size)))
    assert ours.generate(prompt, 16, temperature=0).tolist() == hf.tolist()
    with open(tmp_path / "config.json") as f:
        assert model_config(json.load(f)) == replace(cfg, vocab_size=cfg.padded_vocab_size)
    back = build(cfg, "cpu", seed=4)
    load_weights(back, str(tmp_path))
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in ours.state_dict().items())


@pytest.mark.parametrize("moe, qk_norm, flag", [
    (dict(), True, "model.moe.bias_update_rate=0"),  # softmax + the bias: Qwen3-MoE has none
    (dict(bias_update_rate=0.0), False, "model.qk_norm=true"),
    (dict(bias_update_rate=0.0, shared_experts=1), True, "model.moe.shared_experts=0"),
    (dict(router="sigmoid"), False, "model.moe.shared_experts >= 1")])
def test_export_refuses_a_router_no_class_computes(moe, qk_norm, flag, tmp_path):
    with pytest.raises(ValueError, match=re.escape(flag)):
        export.export_hf(build(replace(tiny(**moe), qk_norm=qk_norm), "cpu"), str(tmp_path))
