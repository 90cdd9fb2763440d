"""Muon (optim.py) against references written here and against torch.optim.Muon; the parameter split; the LR
of each group. The distributed paths (DDP, FSDP2) are in test_distributed.py."""
import math

import pytest
import torch

import config
import optim
from model import GPT, GPTConfig


def reference_newton_schulz(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Jordan's quintic iteration as written in the Muon post, X <- aX + b(XX^T)X + c(XX^T)^2 X, in FP64."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.double()
    if g.size(0) > g.size(1):
        x = x.T
    x = x / (x.norm() + 1e-7)
    for _ in range(steps):
        s = x @ x.T
        x = a * x + b * (s @ x) + c * (s @ s @ x)
    return (x.T if g.size(0) > g.size(1) else x).float()


@pytest.mark.parametrize("shape", [(24, 40), (40, 24), (32, 32)])
def test_orthogonalize_matches_the_reference_and_torch(shape):
    g = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(optim.orthogonalize(g, torch.float32), reference_newton_schulz(g), rtol=1e-4, atol=1e-4)
    from torch.optim._muon import _zeropower_via_newtonschulz  # torch's BF16 iteration: the same ops, bit for bit
    want = _zeropower_via_newtonschulz(g, optim.NS_COEFFICIENTS, optim.NS_STEPS, 1e-7)
    assert torch.equal(optim.orthogonalize(g, torch.bfloat16), want)
    s = torch.linalg.svdvals(optim.orthogonalize(g, torch.float32))
    assert s.min() > 0.5 and s.max() < 1.3, s  # near-orthogonal: singular values pulled towards 1


def test_muon_step_matches_a_reference_update_and_torch_muon():
    """Two steps on one matrix: our Muon group = the update written out here (Nesterov momentum, decoupled weight
    decay, Moonlight's 0.2 * sqrt(max(A, B)) scale) = torch.optim.Muon(adjust_lr_fn="match_rms_adamw")."""
    gen = torch.Generator().manual_seed(1)
    w0 = torch.randn(16, 48, generator=gen)
    grads = [torch.randn(16, 48, generator=gen) for _ in range(2)]
    lr, wd, mu = 0.02, 0.1, 0.95
    ours, bf16, theirs = (torch.nn.Parameter(w0.clone()) for _ in range(3))
    opt = optim.Muon([{"params": [ours], "muon": True, "weight_decay": wd, "ns_dtype": "float32"}], lr=lr)
    opt16 = optim.Muon([{"params": [bf16], "muon": True, "weight_decay": wd, "ns_dtype": "bfloat16"}], lr=lr)
    ref_opt = torch.optim.Muon([theirs], lr=lr, weight_decay=wd, momentum=mu, adjust_lr_fn="match_rms_adamw")
    w, buf = w0.clone(), torch.zeros_like(w0)
    for g in grads:
        ours.grad, bf16.grad, theirs.grad = g.clone(), g.clone(), g.clone()
        opt.step()
        opt16.step()
        ref_opt.step()
        buf = mu * buf + (1 - mu) * g
        update = reference_newton_schulz((1 - mu) * g + mu * buf)
        w = w * (1 - lr * wd) - lr * 0.2 * math.sqrt(48) * update
    torch.testing.assert_close(ours.detach(), w, rtol=1e-4, atol=1e-5)
    assert torch.equal(bf16, theirs)  # torch's Muon orthogonalises in BF16: ours in BF16 does the same ops


def test_muon_takes_the_hidden_matrices_and_adamw_the_rest():
    cfg = config.Config(model=GPTConfig(vocab_size=64, n_layer=2, n_head=2, n_embd=32, block_size=16,
                                        tie_embeddings=False),
                        train=config.TrainConfig(optimizer="muon", lr=1e-3, muon_lr=0.01, schedule="constant",
                                                 warmup_steps=0))
    m = GPT(cfg.model)
    opt = optim.build(m, cfg.train, torch.device("cpu"))
    names = {id(p): n for n, p in m.named_parameters()}
    muon = {names[id(p)] for g in opt.param_groups if g.get("muon") for p in g["params"]}
    assert muon == {n for n, p in m.named_parameters() if p.ndim == 2 and n.startswith("layers.")}
    adamw = {names[id(p)] for g in opt.param_groups if not g.get("muon") for p in g["params"]}
    assert {"embed_tokens.weight", "lm_head.weight", "norm.weight"} <= adamw and not muon & adamw
    assert optim.set_lr(opt, 5, cfg.train, 10) == 1e-3
    assert [g["lr"] for g in opt.param_groups] == [1e-3, 1e-3, 0.01]
    x = torch.randint(0, 64, (2, 16))
    m(x, x).backward()
    opt.step()
    assert {k for s in opt.state.values() for k in s} == {"step", "exp_avg", "exp_avg_sq", "momentum_buffer"}


def test_muon_refuses_what_it_cannot_take():
    with pytest.raises(ValueError, match="2-D"):
        optim.Muon([{"params": [torch.nn.Parameter(torch.zeros(3))], "muon": True}])
    with pytest.raises(config.ConfigError, match="train.optimizer"):
        config.load(["train.optimizer=sgd"])
    with pytest.raises(config.ConfigError, match="train.muon_momentum"):
        config.load(["train.muon_momentum=1.5"])


def test_plan_counts_muon_state_and_newton_schulz():
    import memory
    import plan
    cfg = config.load(["configs/125m.yaml", "train.optimizer=adamw"])
    adamw = {r["mode"]: r for r in plan.plan(cfg, 8, "h100")}
    cfg = config.load(["configs/125m.yaml", "train.optimizer=muon"])
    muon = {r["mode"]: r for r in plan.plan(cfg, 8, "h100")}
    with torch.device("meta"):
        model = GPT(cfg.model)
    cost = memory.muon_cost(model, 8)
    d, f, L = 768, cfg.model.ffn_dim, cfg.model.n_layer
    assert cost["params"] == L * (4 * d * d + 3 * d * f)  # q, k, v, o and gate, up, down: 12 x 7 matrices
    one_square = 5 * (4 * d**3 + 2 * d**3)  # five iterations on a d x d matrix
    one_mlp = 5 * (4 * d * d * f + 2 * d**3)
    assert cost["flops"] == L * (4 * one_square + 3 * one_mlp)
    for mode in ("ddp", "fsdp"):  # one FP32 momentum instead of two moments for the Muon matrices
        saved = 4 * cost["params"] / (8 if mode == "fsdp" else 1) / 2**30
        assert muon[mode]["optim"] == pytest.approx(adamw[mode]["optim"] - saved)
