"""Model: shapes, parameter counts against the formula, loss at init, KV-cache generation, sampling rules."""
import math

import pytest
import torch

from model import GPT, GPTConfig, build


def small(arch="llama", **kw):
    base = dict(arch=arch, vocab_size=300, block_size=64, n_layer=2, n_head=4, n_embd=64)
    base.update(kw)
    return GPTConfig(**base)


def expected_params(c: GPTConfig) -> int:
    """Count by hand from the shape: the formula the docs state."""
    d, hd, V = c.n_embd, c.head_dim, c.padded_vocab_size
    attn = d * c.n_head * hd + 2 * d * c.kv_heads * hd + c.n_head * hd * d
    if c.arch == "llama":
        mlp, norms, extra = 3 * d * c.ffn_dim, 2 * d, d
        pos = 0
    else:
        attn += c.n_head * hd + 2 * c.kv_heads * hd + d  # biases
        mlp = 2 * d * c.ffn_dim + c.ffn_dim + d
        norms, extra, pos = 4 * d, 2 * d, c.block_size * d
    head = 0 if c.tie_embeddings else V * d
    return V * d + pos + c.n_layer * (attn + mlp + norms) + extra + head


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("tie", [True, False])
def test_shapes_and_param_count(arch, tie):
    c = small(arch, tie_embeddings=tie, n_kv_head=2 if arch == "llama" else None)
    m = GPT(c)
    x = torch.randint(0, 300, (3, 17))
    assert c.padded_vocab_size == 384
    assert m(x).shape == (3, 17, 384)
    assert m.num_params() == expected_params(c)
    assert (m.lm_head.weight is m.embed_tokens.weight) == tie


def test_flops_per_token_palm():
    c = small(n_kv_head=2, tie_embeddings=False)
    m = GPT(c)
    # every parameter but the embedding table and the norms takes part in a matmul (lm_head included)
    n_matmul = expected_params(c) - c.padded_vocab_size * c.n_embd - (2 * c.n_layer + 1) * c.n_embd
    assert m.flops_per_token() == 6 * n_matmul + 12 * c.n_layer * c.n_embd * c.block_size


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_loss_at_init_is_about_ln_vocab(arch):
    torch.manual_seed(0)
    c = small(arch, vocab_size=1000)
    m = GPT(c)
    x = torch.randint(0, 1000, (4, 64))
    loss = m(x, x).item()
    assert abs(loss - math.log(c.padded_vocab_size)) < 0.1, loss


def test_meta_build_equals_direct_build():
    c = small(tie_embeddings=True)
    torch.manual_seed(3)
    a = GPT(c)
    torch.manual_seed(3)
    b = build(c, "cpu")
    assert b.lm_head.weight is b.embed_tokens.weight
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    assert torch.equal(a.rope, b.rope)


def test_init_stds():
    c = small(n_layer=8, n_embd=256, vocab_size=5000)
    m = GPT(c)
    assert abs(m.layers[0].self_attn.q_proj.weight.std().item() - 0.02) < 0.002
    assert abs(m.layers[0].mlp.down_proj.weight.std().item() - 0.02 / 4) < 0.001  # 0.02 / sqrt(2 * 8)
    assert torch.all(m.layers[0].input_layernorm.weight == 1)


@pytest.mark.parametrize("arch, kv", [("llama", 2), ("llama", None), ("gpt2", None)])
def test_kv_cache_matches_full_recompute(arch, kv):
    torch.manual_seed(0)
    m = GPT(small(arch, n_kv_head=kv)).eval()
    x = torch.randint(0, 300, (2, 40))
    full = m(x)
    from model import KVCache
    cache = KVCache(m.cfg, 2, 64, "cpu", torch.float32)
    pieces = [m(x[:, a:b], cache=cache) for a, b in [(0, 7), (7, 8), (8, 20), (20, 21), (21, 40)]]
    torch.testing.assert_close(torch.cat(pieces, 1), full, atol=1e-5, rtol=1e-5)
    prompt = x[:, :5]
    with_cache = m.generate(prompt, 50, temperature=0)
    without = m.generate(prompt, 50, temperature=0, use_cache=False)
    assert torch.equal(with_cache, without)
    assert with_cache.shape == (2, 55)
    # past block_size the window slides; cached and uncached still agree
    long = m.generate(prompt, 80, temperature=0)
    assert torch.equal(long, m.generate(prompt, 80, temperature=0, use_cache=False))


def test_sampling_rules():
    torch.manual_seed(0)
    m = GPT(small(vocab_size=260)).eval()
    prompt = torch.randint(0, 260, (4, 3))
    g = torch.Generator().manual_seed(0)
    out = m.generate(prompt, 60, temperature=5.0, generator=g)  # flat distribution: padded ids would show up
    assert out.max().item() < 260
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0] + [-1e9] * 380])
    for _ in range(20):
        assert m._sample(logits.clone(), 1.0, 2, None, None).item() in (2, 3)
        assert m._sample(logits.clone(), 1.0, None, 0.5, None).item() == 3  # p(3) = 0.64 >= 0.5
    assert m._sample(logits.clone(), 0.0, None, None, None).item() == 3


def test_stop_token_ends_generation():
    m = GPT(small()).eval()
    with torch.no_grad():
        m.lm_head.weight.zero_()
        m.lm_head.weight[7, 0] = 1.0  # make id 7 the most likely whatever the input
        m.norm.weight.fill_(1.0)
    prompt = torch.randint(0, 300, (2, 4))
    out = m.generate(prompt, 20, temperature=0, stop_token=7)
    assert out.shape[1] < 4 + 20 and (out[:, -1] == 7).all()


def test_rope_is_a_relative_rotation():
    """RoPE preserves norms, and q.k after rotation depends only on the distance between positions."""
    from kernel import torch_rope
    from model import rope_cache
    c = small(block_size=32)
    rope = rope_cache(c)
    q, k = torch.randn(1, 1, 1, c.head_dim), torch.randn(1, 1, 1, c.head_dim)

    def at(x, pos):
        return torch_rope(x, rope[pos:pos + 1])[0, 0, 0]
    torch.testing.assert_close(at(q, 5).norm(), q.norm())
    torch.testing.assert_close(at(q, 7) @ at(k, 3), at(q, 20) @ at(k, 16), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(at(q, 7) @ at(k, 3), at(q, 7) @ at(k, 5))
    # pairs (i, i + D/2) rotate by angle pos * theta^(-2i/D): Hugging Face Llama's layout
    x = torch.zeros(1, 1, 1, c.head_dim)
    x[..., 1] = 1.0
    y = at(x, 3)
    angle = 3 * c.rope_theta ** (-2 / c.head_dim)
    torch.testing.assert_close(y[1], torch.tensor(math.cos(angle)))
    torch.testing.assert_close(y[1 + c.head_dim // 2], torch.tensor(math.sin(angle)))
