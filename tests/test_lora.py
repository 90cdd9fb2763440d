"""LoRA (train.lora): the base stays frozen and out of the checkpoints, a resume is bit-exact, 2 processes (DDP, FSDP2)
follow one, and the adapters export in PEFT's format: PEFT loads them onto our exported base and gives our logits,
and --merge gives them too."""
import json
import os
import shutil

import pytest
import torch

from build import load_model
from hf import load_weights
import checkpoint
import eval as evaluate
import export
import sample
import train
from conftest import ROOT
from model import GPTConfig, build
from test_train import losses, train_args

LORA = ["train.lora=true", "train.lora_rank=4", "train.lora_alpha=8", "train.eval_interval=0", "train.ckpt_interval=3",
        "train.precision=fp32", "train.keep_last=5"]


@pytest.fixture(autouse=True)
def in_repo_root(monkeypatch):
    monkeypatch.chdir(ROOT)


@pytest.fixture(scope="module")
def hf_base(tmp_path_factory) -> str:
    """An "imported" model: a small Llama (GQA, untied head) written as a transformers folder."""
    cfg = GPTConfig(vocab_size=512, block_size=64, n_layer=2, n_head=2, n_kv_head=1, n_embd=64, intermediate_size=160)
    out = str(tmp_path_factory.mktemp("hf_base"))
    export.export_hf(build(cfg, "cpu", seed=7), out)
    return out


def saved_keys(step_dir: str) -> tuple[list[str], list[str]]:
    """The model tensors and the optimizer-state tensors a checkpoint holds."""
    meta = checkpoint._reader(step_dir).read_metadata()
    return (sorted(k for k in meta.state_dict_metadata if k.startswith("model.")),
            sorted(k for k in meta.state_dict_metadata if k.startswith("optim.state.")))


def test_lora_trains_only_adapters_resumes_exactly_and_exports_for_peft(corpus, hf_base, tmp_path, capsys):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    out, again = str(tmp_path / "lora"), str(tmp_path / "again")
    # dropout on the adapters, the head adapted too: the resume must repeat the dropout masks
    args = [*LORA, f"train.init_from={hf_base}", "train.max_steps=6", "train.lora_dropout=0.1", "train.optimizer=adamw",
            "train.lora_targets=[q,k,v,o,gate,up,down,lm_head]"]
    assert train.main(train_args(corpus, out, *args)) == 0
    ls = losses(out)
    assert ls[6] < ls[1], ls
    keys, moments = saved_keys(os.path.join(out, "step_000006"))
    assert len(keys) == 2 * (7 * 2 + 1)  # A and B on 7 projections x 2 layers, and the head
    assert all(".lora_A." in k or ".lora_B." in k for k in keys + moments) and len(moments) == 3 * len(keys)
    # the base is frozen: the run's model still has the imported weights under its adapters
    model, cfg, _ = load_model(out, "cpu")
    base = build(cfg.model, "cpu")
    load_weights(base, hf_base)
    trained = dict(model.named_parameters())
    for name, p in base.named_parameters():
        assert torch.equal(trained[name], p), name
    # bit-exact resume from the step-3 checkpoint (adapters + their AdamW state; the base rebuilt)
    os.makedirs(again)
    shutil.copytree(os.path.join(out, "step_000003"), os.path.join(again, "step_000003"))
    assert train.main(train_args(corpus, again, *args)) == 0
    assert all(losses(again)[s] == ls[s] for s in (4, 5, 6)), (losses(again), ls)

    # PEFT loads the adapters onto our exported base and gives our logits; --merge gives them without PEFT
    dst, merged = str(tmp_path / "hf"), str(tmp_path / "merged")
    assert export.main([out, "--to", "hf", dst]) == 0
    assert export.main([out, "--to", "hf", merged, "--merge"]) == 0
    conf = json.loads(open(os.path.join(dst, "adapter", "adapter_config.json")).read())
    assert (conf["r"], conf["lora_alpha"], conf["task_type"]) == (4, 8.0, "CAUSAL_LM")
    hf = transformers.AutoModelForCausalLM.from_pretrained(dst, dtype=torch.float32)
    hf = peft.PeftModel.from_pretrained(hf, os.path.join(dst, "adapter")).eval()
    whole = transformers.AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    idx = torch.randint(0, 512, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model(idx)
        peft_diff = (ours - hf(input_ids=idx).logits).abs().max().item()
        merge_diff = (ours - whole(idx).logits).abs().max().item()
        moved = (ours - base.eval()(idx)).abs().max().item()
    with capsys.disabled():  # the figures docs/finetuning.md quotes (pytest -s shows them)
        print(f"LoRA parity: peft {peft_diff:.2e}, merged {merge_diff:.2e}; the adapters moved logits by {moved:.2e}")
    assert peft_diff < 1e-5 and merge_diff < 1e-5 and moved > 1e-3
    # sample.py and eval.py run the LoRA run as it is
    assert sample.main([out, "--prompt", "def f(x):", "--max_new_tokens", "8", "--temperature", "0"]) == 0
    assert evaluate.main([out, "--max_tokens", "2000", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["loss"] == pytest.approx(ls[6], abs=1.0)


def test_a_changed_base_stops_the_resume(corpus, hf_base, tmp_path):
    out, moved = str(tmp_path / "lora"), str(tmp_path / "base")
    shutil.copytree(hf_base, moved)
    args = [*LORA, f"train.init_from={moved}", "train.max_steps=3"]
    assert train.main(train_args(corpus, out, *args)) == 0
    model = build(GPTConfig(vocab_size=512, block_size=64, n_layer=2, n_head=2, n_kv_head=1, n_embd=64,
                            intermediate_size=160), "cpu", seed=8)
    export.export_hf(model, moved)  # other weights under the same path
    assert train.main(train_args(corpus, out, *args, "train.max_steps=4")) == 2
    with pytest.raises(checkpoint.CheckpointError, match="base that is not the one"):
        load_model(out, "cpu")


def test_lora_from_our_run_with_muon_under_ddp_and_fsdp_matches_one_process(corpus, trained, tmp_path):
    """A LoRA run on a run of ours (train.init_from=RUN), Muon for the adapter matrices: DDP and FSDP2 (the frozen
    base sharded; one torchrun launch runs both) follow one process as test_distributed's Muon runs do (1e-4: only
    the order of gradient sums differs), and the FSDP2 run's adapter checkpoint resumes in one process."""
    from test_distributed import DIST, ok, torchrun
    common = [*DIST, *LORA, f"train.init_from={trained}", "train.optimizer=muon", "train.max_steps=4",
              "train.ckpt_interval=2"]
    single, ddp, fsdp, one = (str(tmp_path / n) for n in ("single", "ddp", "fsdp", "one"))
    assert train.main(train_args(corpus, single, *common)) == 0
    ref = losses(single)
    ok(torchrun(*train_args(corpus, ddp, *common, "train.parallel=ddp"), "--",
                *train_args(corpus, fsdp, *common, "train.parallel=fsdp"), script="tests/train_each.py"))
    for run in (ddp, fsdp):
        assert all(abs(losses(run)[s] - ref[s]) < 1e-4 for s in range(1, 5)), (run, losses(run), ref)
    os.makedirs(one)
    shutil.copytree(os.path.join(fsdp, "step_000002"), os.path.join(one, "step_000002"))
    assert train.main(train_args(corpus, one, *common)) == 0
    assert all(abs(losses(one)[s] - ref[s]) < 1e-4 for s in (3, 4)), (losses(one), ref)


def test_plan_counts_a_frozen_base_and_adapter_state_and_bad_keys_stop():
    import config
    import plan
    full = {r["mode"]: r for r in plan.plan(config.load(["configs/1b.yaml"]), 8, "h100")}
    cfg = config.load(["configs/1b.yaml", "train.lora=true", "train.lora_rank=16", "train.optimizer=adamw"])
    rows = {r["mode"]: r for r in plan.plan(cfg, 8, "h100")}
    with torch.device("meta"):
        import lora
        from model import GPT
        model = GPT(cfg.model)
        n, trained = model.num_params(), sum(p.numel() for p in model.parameters())
        lora.apply(model, cfg.train)
        trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert 0 < trained < n / 50
    r = rows["ddp"]  # FP32 base + adapters; gradients and two AdamW moments of the adapters only
    assert r["params"] * 2**30 == pytest.approx(4 * (n + trained))
    assert (r["grads"] * 2**30, r["optim"] * 2**30) == (pytest.approx(4 * trained), pytest.approx(8 * trained))
    assert r["total"] < full["ddp"]["total"] and r["activations"] >= full["ddp"]["activations"]
    for bad, message in [("train.lora_rank=0", "lora_rank must be >= 1"), ("train.lora_targets=[q,x]", "'x'"),
                         ("train.precision=fp8", "fp8")]:
        with pytest.raises(config.ConfigError, match=message):
            config.load(["configs/tiny.yaml", "train.lora=true", bad])


def test_chunked_loss_under_a_frozen_head_skips_dw_and_keeps_dh():
    import kernel
    gen = torch.Generator().manual_seed(0)
    h, w = torch.randn(40, 16, generator=gen), torch.randn(96, 16, generator=gen)
    targets = torch.randint(0, 96, (40,), generator=gen)
    grads = []
    for loss in (kernel.plain_loss, lambda a, b, c: kernel.chunked_loss(a, b, c, chunk=7)):
        x = h.clone().requires_grad_()
        loss(x, w, targets).backward()  # w is frozen
        grads.append(x.grad)
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_merge_of_a_tied_head_and_gpt2_export_refused(arch):
    """Merging gives the adapted model's logits; a tied head that has its own adapter comes out untied; GPT-2's
    adapters are refused for PEFT (its q/k/v are one Conv1D there) with the --merge way out named."""
    from types import SimpleNamespace
    import lora
    from model import GPT
    cfg = GPTConfig(arch=arch, vocab_size=300, block_size=32, n_layer=2, n_head=2, n_embd=64, tie_embeddings=True)
    t = SimpleNamespace(lora_rank=4, lora_alpha=8.0, lora_dropout=0.0, lora_targets=["q", "v", "up", "gate", "lm_head"])
    with torch.device("meta"):
        model = GPT(cfg)
    assert "layers.0.mlp.gate_proj" not in lora.apply(model, t) or arch == "llama"  # gpt2 has no gate: skipped
    model.to_empty(device="cpu")
    model.init_weights(0)
    with torch.no_grad():  # B away from 0, so that the adapters change the logits
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.normal_(0, 0.1)
    model.eval()
    merged = lora.merged(model)
    assert not merged.cfg.tie_embeddings and not lora.has_adapters(merged)
    idx = torch.randint(0, 300, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (model(idx) - merged(idx)).abs().max().item() < 1e-5
    if arch == "gpt2":
        with pytest.raises(ValueError, match="--merge"):
            lora.peft_files(model, t, "base")
