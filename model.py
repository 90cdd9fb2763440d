"""GPT model: one code path for a Llama-style and a GPT-2-style decoder.

`arch: llama` -> RMSNorm, rotary positions (angles in FP32), SwiGLU MLP, grouped-query attention, no biases.
`arch: gpt2`  -> LayerNorm with bias, learned positions, GELU MLP, biases (the nanoGPT / gigaGPT model).
Module names follow Hugging Face Llama (`embed_tokens`, `layers.N.self_attn.q_proj`, `mlp.down_proj`,
`input_layernorm`, `norm`, `lm_head`, ...) so import/export is a key table. No distributed or file code here.
"""
import math
import zlib
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

import kernel
from rope import check_rope_scaling, rope_cache


@dataclass(frozen=True)
class MoEConfig:
    """Mixture-of-Experts MLPs (`model.moe.*`; README, "Mixture of Experts"): dropless token-choice routing."""
    num_experts: int = 0  # routed experts per MoE layer; 0: a dense model (every other key is ignored)
    top_k: int = 2  # experts each token is sent to
    shared_experts: int = 0  # experts every token goes through (one SwiGLU MLP of shared_experts x expert_size)
    # hidden width of one expert; None: ffn_dim / (top_k + shared_experts) rounded to a multiple of 8, so that the
    # FLOPs per token equal the dense model's (the grouped GEMM on CPUs needs multiples of 8)
    expert_size: int | None = None
    router: Literal["softmax", "sigmoid"] = "softmax"  # expert scores from the router's logits
    renormalize: bool = True  # divide each token's top-k weights by their sum
    dense_layers: int = 0  # the first N layers keep the dense MLP (DeepSeek's first_k_dense_replace)
    # DeepSeek-V3's auxiliary-loss-free balance: after each step every expert's bias (used to choose experts,
    # never to weight them) moves by this much towards the mean load (token counts over all data-parallel ranks)
    bias_update_rate: float = 1e-3
    aux_loss_coef: float = 0.0  # DeepSeek-V3's sequence-wise balance loss added to the training loss; 0: off


@dataclass(frozen=True)
class GPTConfig:
    arch: Literal["llama", "gpt2"] = "llama"
    vocab_size: int | None = None  # None: taken from the data's meta.json
    block_size: int = 1024  # context length in tokens
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: int | None = None  # grouped-query attention; None: = n_head
    n_embd: int = 768
    intermediate_size: int | None = None  # None: 4*n_embd (gpt2), 8/3*n_embd rounded up to 128 (llama)
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    init_std: float = 0.02
    dropout: float = 0.0
    # Recipe options (BENCHMARKS.md, "Time to quality", has what each is worth)
    mlp: Literal["swiglu", "relu2", "gelu"] | None = None  # None: swiglu (llama), gelu (gpt2); relu2 = ReLU(x)^2
    qk_norm: bool = False  # RMSNorm over each head's queries and keys before RoPE (as Qwen3, OLMo 2)
    # RoPE scaling past the trained context, config.json's `rope_scaling` (rope_theta stays above): rope_type linear,
    # llama3 or yarn with its keys (rope.ROPE_SCALING_KEYS). None: plain RoPE
    rope_scaling: dict | None = None
    moe: MoEConfig = field(default_factory=MoEConfig)  # Mixture-of-Experts MLPs; off by default

    def __post_init__(self):
        if isinstance(self.moe, dict):  # from a checkpoint's or asdict()'s nested dict
            object.__setattr__(self, "moe", MoEConfig(**self.moe))

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def mlp_kind(self) -> str:
        return self.mlp or ("gelu" if self.arch == "gpt2" else "swiglu")

    @property
    def ffn_dim(self) -> int:
        """Hidden width of the MLP: 4*n_embd, or 8/3 of that rounded up to 128 for the gated (three-matrix)
        SwiGLU, so that every MLP kind has about the same parameters and FLOPs."""
        if self.intermediate_size:
            return self.intermediate_size
        if self.mlp_kind != "swiglu":
            return 4 * self.n_embd
        return 128 * math.ceil(8 * self.n_embd / 3 / 128)

    @property
    def expert_size(self) -> int:
        """Hidden width of one expert (model.moe.expert_size, else the dense FLOPs per token kept)."""
        m = self.moe
        return m.expert_size or max(8, 8 * round(self.ffn_dim / (m.top_k + m.shared_experts) / 8))

    @property
    def padded_vocab_size(self) -> int:
        """Vocab rounded up to a multiple of 128 (tensor-core friendly); ids past vocab_size are never sampled."""
        return 128 * math.ceil(self.vocab_size / 128)

    def validate(self) -> None:
        """Raise ValueError naming the field when the shape is inconsistent."""
        if not self.vocab_size or self.vocab_size < 2:
            raise ValueError(f"model.vocab_size must be >= 2 (got {self.vocab_size})")
        for name in ("block_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name} must be >= 1 (got {getattr(self, name)})")
        if self.n_embd % self.n_head:
            raise ValueError(f"model.n_embd ({self.n_embd}) must be divisible by model.n_head ({self.n_head})")
        if self.n_head % self.kv_heads:
            raise ValueError(f"model.n_head ({self.n_head}) must be divisible by model.n_kv_head ({self.kv_heads})")
        if self.arch == "llama" and self.head_dim % 2:
            raise ValueError(f"RoPE needs an even head dim (n_embd/n_head = {self.head_dim})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.dropout must be in [0, 1) (got {self.dropout})")
        if self.rope_scaling is not None:
            check_rope_scaling(self.rope_scaling, self.arch)
        m = self.moe
        if m.num_experts < 0:
            raise ValueError(f"model.moe.num_experts must be >= 0 (got {m.num_experts})")
        if m.num_experts:
            if self.arch != "llama" or self.mlp_kind != "swiglu":
                raise ValueError(f"model.moe needs arch llama with the SwiGLU MLP (got {self.arch}, {self.mlp_kind})")
            if not 1 <= m.top_k <= m.num_experts:
                raise ValueError(f"model.moe.top_k must be in [1, num_experts={m.num_experts}] (got {m.top_k})")
            if m.top_k == 1 and m.renormalize:  # the one weight would always be 1: no gradient reaches the router
                raise ValueError("model.moe.top_k=1 with model.moe.renormalize=true leaves the router untrained; "
                                 "set model.moe.renormalize=false")
            if m.shared_experts < 0 or m.dense_layers < 0 or m.bias_update_rate < 0 or m.aux_loss_coef < 0:
                raise ValueError("model.moe.shared_experts, dense_layers, bias_update_rate and aux_loss_coef must be "
                                 f">= 0 (got {m.shared_experts}, {m.dense_layers}, {m.bias_update_rate}, "
                                 f"{m.aux_loss_coef})")
            if self.expert_size % 8 or self.n_embd % 8:
                raise ValueError(f"model.moe.expert_size ({self.expert_size}) and model.n_embd ({self.n_embd}) must "
                                 f"be multiples of 8 (the grouped GEMM's 16-byte aligned strides)")


class KVCache:
    """Preallocated keys/values for all layers: (n_layer, B, n_kv_head, max_len, head_dim) each."""

    def __init__(self, cfg: GPTConfig, batch_size: int, max_len: int, device, dtype):
        shape = (cfg.n_layer, batch_size, cfg.kv_heads, max_len, cfg.head_dim)
        self.k, self.v = torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype)
        self.pos = 0  # tokens already cached

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store k, v (B, n_kv, T, D) at the current position; return all keys/values cached so far."""
        end = self.pos + k.size(2)
        self.k[layer, :, :, self.pos:end] = k
        self.v[layer, :, :, self.pos:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig, layer_idx: int):
        super().__init__()
        self.cfg, self.layer_idx = cfg, layer_idx
        bias = cfg.arch == "gpt2"
        d, hd = cfg.n_embd, cfg.head_dim
        self.q_proj = nn.Linear(d, cfg.n_head * hd, bias=bias)
        self.k_proj = nn.Linear(d, cfg.kv_heads * hd, bias=bias)
        self.v_proj = nn.Linear(d, cfg.kv_heads * hd, bias=bias)
        self.o_proj = nn.Linear(cfg.n_head * hd, d, bias=bias)
        if cfg.qk_norm:
            self.q_norm, self.k_norm = RMSNorm(hd, cfg.norm_eps), RMSNorm(hd, cfg.norm_eps)

    def forward(self, x, rope=None, cache: KVCache | None = None):
        B, T, _ = x.shape
        cfg = self.cfg
        # -1 heads: under tensor parallel a rank's projections hold n_head / tp (n_kv_head / tp) of them
        q, k, v = (proj(x).view(B, T, -1, cfg.head_dim) for proj in (self.q_proj, self.k_proj, self.v_proj))
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = self.ops.rope(q, k, rope)
        if cache is None and not (self.training and cfg.dropout):  # the training path: the chosen kernel
            return self.o_proj(self.ops.attention(q, k, v).reshape(B, T, -1))
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
        start = cache.pos if cache is not None else 0
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        mask = None
        if start > 0 and T > 1:  # queries sit at positions start..start+T-1 and see every cached key up to their own
            mask = torch.ones(T, start + T, dtype=torch.bool, device=x.device).tril(diagonal=start)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=start == 0 and T > 1,
                                           dropout_p=cfg.dropout if self.training else 0.0,
                                           enable_gqa=k.size(1) != q.size(1))
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig, width: int | None = None):
        super().__init__()
        self.kind, width = cfg.mlp_kind, width or cfg.ffn_dim
        bias = cfg.arch == "gpt2"
        if self.kind == "swiglu":
            self.gate_proj = nn.Linear(cfg.n_embd, width, bias=bias)
        self.up_proj = nn.Linear(cfg.n_embd, width, bias=bias)
        self.down_proj = nn.Linear(width, cfg.n_embd, bias=bias)

    def forward(self, x):
        if self.kind == "swiglu":
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        if self.kind == "relu2":  # squared ReLU (So et al. 2021, "Primer"; modded-nanogpt)
            return self.down_proj(F.relu(self.up_proj(x)).square())
        return self.down_proj(F.gelu(self.up_proj(x), approximate="tanh"))


def swiglu_experts(grouped_mm, xs, gate_proj, up_proj, down_proj, counts):
    """SwiGLU experts (E, out, in) weights on xs (M, d), its rows grouped by expert, counts (E,) rows each."""
    return grouped_mm(F.silu(grouped_mm(xs, gate_proj, counts)) * grouped_mm(xs, up_proj, counts), down_proj, counts)


class MoE(nn.Module):
    """Routed SwiGLU experts (dropless token choice) and optional shared experts in Hugging Face's Qwen3-MoE /
    GLM-4-MoE layout: `gate` the router, `experts.{gate,up,down}_proj` (E, out, in), `shared_experts` one MLP.
    Scores plus `gate.e_score_correction_bias` choose a token's top_k experts; the scores alone weight them. Tokens
    are sorted by expert: one grouped GEMM per expert matrix. In training `load` counts tokens for `update_bias`."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.moe, E, d, h = cfg.moe, cfg.moe.num_experts, cfg.n_embd, cfg.expert_size
        self.gate = nn.Linear(d, E, bias=False)
        self.gate.register_buffer("e_score_correction_bias", torch.zeros(E))  # in checkpoints; not a parameter
        self.experts = nn.Module()
        self.experts.gate_proj = nn.Parameter(torch.empty(E, h, d))
        self.experts.up_proj = nn.Parameter(torch.empty(E, h, d))
        self.experts.down_proj = nn.Parameter(torch.empty(E, d, h))
        if cfg.moe.shared_experts:
            self.shared_experts = MLP(cfg, cfg.moe.shared_experts * h)
        self.load = self.last_load = self.aux_loss = None  # (E,) tokens per expert: this step, the last; its loss

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (N, d) -> scores (N, E) FP32, the chosen experts (N, k) and their weights (N, k) FP32."""
        logits = F.linear(x.float(), self.gate.weight.float())
        scores = logits.softmax(dim=-1) if self.moe.router == "softmax" else logits.sigmoid()
        chosen = (scores + self.gate.e_score_correction_bias).topk(self.moe.top_k, dim=-1).indices
        weights = scores.gather(1, chosen)
        if self.moe.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return scores, chosen, weights

    def forward(self, x):
        B, T, d = x.shape
        k, E = self.moe.top_k, self.moe.num_experts
        flat = x.reshape(-1, d)
        scores, chosen, weights = self.route(flat)
        slots = chosen.flatten()  # (N*k,) the expert of each (token, choice)
        counts = torch.zeros(E, dtype=torch.int64, device=x.device).scatter_add_(0, slots, torch.ones_like(slots))
        order = slots.argsort(stable=True)  # the (token, choice) slots grouped by expert
        ys = self.run_experts(flat[order // k], counts)  # (N*k, d) in, (N*k, d) out, grouped by expert
        back = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=x.device))
        y = (ys[back].view(-1, k, d) * weights.unsqueeze(-1).to(ys.dtype)).sum(dim=1).view(B, T, d)
        if self.moe.shared_experts:
            y = y + self.shared_experts(x)
        if self.training:
            self.load = counts if self.load is None else self.load + counts
            if self.moe.aux_loss_coef:  # DeepSeek-V3 eq. 17-20: per sequence, load fraction x mean normalised score
                picked = torch.zeros(B, E, device=x.device).scatter_add_(
                    1, chosen.view(B, T * k), torch.ones(B, T * k, device=x.device))
                probs = (scores / scores.sum(dim=-1, keepdim=True)).view(B, T, E).mean(dim=1)
                self.aux_loss = self.moe.aux_loss_coef * (picked * E / (k * T) * probs).sum(dim=-1).mean()
        return y

    def run_experts(self, xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Each expert on its counts (E,) rows of xs (N*k, d) (expert parallel replaces this: parallel.py)."""
        w = self.experts
        return swiglu_experts(self.ops.grouped_mm, xs, w.gate_proj, w.up_proj, w.down_proj, counts)

    @torch.no_grad()
    def update_bias(self, load: torch.Tensor, keep: torch.Tensor) -> None:
        """DeepSeek-V3's auxiliary-loss-free step: bias += rate * sign(mean load - load) * keep (`keep` 0.0 on a
        skipped step leaves it unchanged). `load` (E,) is this step's tokens per expert over all ranks."""
        bias, load = self.gate.e_score_correction_bias, load.float()
        bias.add_((self.moe.bias_update_rate * torch.sign(load.mean() - load) * keep).to(bias.dtype))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return self.ops.rms_norm(x, self.weight, self.eps)


def make_norm(cfg: GPTConfig) -> nn.Module:
    return RMSNorm(cfg.n_embd, cfg.norm_eps) if cfg.arch == "llama" else nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps)


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = make_norm(cfg)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = make_norm(cfg)
        self.mlp = MoE(cfg) if cfg.moe.num_experts and layer_idx >= cfg.moe.dense_layers else MLP(cfg)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, rope=None, cache=None):
        x = x + self.dropout(self.self_attn(self.input_layernorm(x), rope, cache))
        return x + self.dropout(self.mlp(self.post_attention_layernorm(x)))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig, ops: kernel.Ops = kernel.REFERENCE):
        """`ops`: the attention, RMSNorm, RoPE and loss kernels (kernel.configure); plain PyTorch by default."""
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        V, d = cfg.padded_vocab_size, cfg.n_embd
        device = torch.empty(0).device  # the caller's default device; meta (nothing allocated) for sharded init
        with torch.device("meta"):  # modules' own default inits would waste time and RNG draws
            self.embed_tokens = nn.Embedding(V, d)
            if cfg.arch == "gpt2":
                self.embed_positions = nn.Embedding(cfg.block_size, d)
            self.dropout = nn.Dropout(cfg.dropout)
            self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
            self.norm = make_norm(cfg)
            self.lm_head = nn.Linear(d, V, bias=False)
            if cfg.arch == "llama":
                self.register_buffer("rope", torch.empty(cfg.block_size, 2, cfg.head_dim), persistent=False)
        self.to_empty(device=device)
        self.init_weights()
        self.set_ops(ops)

    def set_ops(self, ops: kernel.Ops) -> None:
        """Hand `ops` to every module that calls a kernel (the constructor does; after a failed first step: their
        fallback). Compiled graphs need a recompile."""
        for m in self.modules():
            if isinstance(m, (GPT, Attention, RMSNorm, MoE)):
                m.ops = ops

    @torch.no_grad()
    def init_weights(self, seed: int = 0, assign=None) -> None:
        """Initialise every parameter and buffer in place (after `to_empty()`; a no-op on the meta device).

        Linear weights, embeddings and experts ~ N(0, init_std); the residual projections (`o_proj`, `down_proj`,
        `experts.down_proj`) use init_std / sqrt(2 * n_layer) so the residual stream's variance does not grow with
        depth (GPT-2); biases 0, norm weights 1. Each parameter is drawn from a generator seeded by (seed, name), so
        the model is the same however it is sharded; `assign(param, full_value)` stores it (a sharded trainer's
        keeps only the local shard)."""
        if self.cfg.tie_embeddings:  # (re)tie: to_empty() gives each module its own new parameter
            self.lm_head.weight = self.embed_tokens.weight
        if next(self.parameters()).is_meta:
            return
        std, assign = self.cfg.init_std, assign or (lambda p, full: p.copy_(full))
        for name, p in self.named_parameters():
            full = torch.empty(p.shape, dtype=p.dtype, device=p.device)  # p.shape is global for a sharded p
            gen = torch.Generator(p.device).manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
            if name.endswith("bias"):
                full.zero_()
            elif "norm." in name:  # every norm weight: the blocks', q_norm/k_norm and the final one
                full.fill_(1.0)
            elif name.endswith(("o_proj.weight", "down_proj.weight", "experts.down_proj")):
                full.normal_(0.0, std / math.sqrt(2 * self.cfg.n_layer), generator=gen)
            else:
                full.normal_(0.0, std, generator=gen)
            assign(p, full)
        if self.cfg.arch == "llama":
            self.rope.copy_(rope_cache(self.cfg, self.rope.device))
        for m in self.modules():
            if isinstance(m, MoE):
                m.gate.e_score_correction_bias.zero_()

    def num_params(self, embeddings: bool = True) -> int:
        """Unique parameters (a tied embedding counts once); `embeddings=False` leaves out the embedding tables."""
        n = sum(p.numel() for p in self.parameters())
        if not embeddings:  # Kaplan et al.'s non-embedding count (a tied table leaves with the head)
            n -= sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Embedding))
        return n

    def flops_per_token(self) -> float:
        """Training FLOPs per token by PaLM's count (Chowdhery et al. 2022, appendix B): 6*N + 12*L*d*T, N the
        matmul parameters (lm_head and a token's top_k experts included, embeddings and norms not), 12*L*d*T
        attention's QK^T and AV, forward and backward, over the full T x T square."""
        cfg = self.cfg
        linears = [m.weight for m in self.modules() if isinstance(m, nn.Linear)]
        frozen = sum(w.numel() for w in linears if not w.requires_grad)  # a LoRA base: no weight gradient, 4 per token
        n_matmul = sum(w.numel() for w in linears) + self.active_expert_params()
        return 6 * n_matmul - 2 * frozen + 12 * cfg.n_layer * cfg.n_embd * cfg.block_size

    def active_expert_params(self) -> int:
        """Routed-expert parameters one token uses (top_k of each MoE layer's experts): its active count."""
        moe = [m.experts for m in self.modules() if isinstance(m, MoE)]
        return sum(self.cfg.moe.top_k * p[0].numel() for e in moe for p in e.parameters())

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache: KVCache | None = None):
        """idx (B, T) -> logits (B, T, padded_vocab), or with targets (B, T) (-1 ignored) the mean FP32 cross-entropy
        by the model's ops, in training plus the MoE balance loss when model.moe.aux_loss_coef is set. A pipeline
        stage (pipeline.py) lacks the embedding (idx is then the residual stream (B, T, d) of the stage before) or
        the final norm and head (it returns the residual stream)."""
        T = (idx if targets is None else targets).size(1)  # a later pipeline stage's idx: a sequence part under TP
        start = cache.pos if cache is not None else 0
        if start + T > self.cfg.block_size:
            raise ValueError(f"sequence of {start + T} tokens exceeds block_size {self.cfg.block_size}")
        rope = self.rope[start:start + T] if self.cfg.arch == "llama" else None
        x = idx
        if self.embed_tokens is not None:
            x = self.embed_tokens(idx)
            if self.cfg.arch == "gpt2":
                x = x + self.embed_positions(torch.arange(start, start + T, device=idx.device))
            x = self.dropout(x)
        for layer in self.layers:
            x = layer(x, rope, cache)
        if cache is not None:
            cache.pos += T
        if self.norm is None:
            return x
        x = self.norm(x)
        if targets is None:
            return self.lm_head(x)
        # lm_head and the loss in one kernel: the chunked/fused ones never hold all (B*T, V) FP32 logits. A head with
        # a LoRA adapter (lora.py) hands the kernel its weight with the adapter folded in
        head = self.lm_head
        weight = head.effective_weight() if hasattr(head, "effective_weight") else head.weight
        loss = self.ops.loss(x.flatten(0, 1), weight, targets.reshape(-1))
        if self.training and self.cfg.moe.num_experts and self.cfg.moe.aux_loss_coef:
            loss = loss + sum(layer.mlp.aux_loss for layer in self.layers if isinstance(layer.mlp, MoE))
        return loss

    @torch.no_grad()
    def generate_stream(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                        top_k: int | None = None, top_p: float | None = None, stop_token: int | None = None,
                        use_cache: bool = True, generator: torch.Generator | None = None):
        """Yield the next token ids (B,) one step at a time after the prompt idx (B, T).

        temperature 0 is greedy; top_k keeps the k most likely ids; top_p the smallest set whose probability
        reaches p. A sequence that produced `stop_token` repeats it; the stream ends when every one has. With
        `use_cache` a KV cache holds the prefix, rebuilt when the window slides past block_size."""
        B = idx.size(0)
        done = torch.zeros(B, dtype=torch.bool, device=idx.device)
        cache, fed = None, 0  # tokens of idx already in the cache
        for _ in range(max_new_tokens):
            if idx.size(1) > self.cfg.block_size:
                idx = idx[:, -self.cfg.block_size:]
                cache = None
            if not use_cache:
                logits = self(idx)[:, -1]
            else:
                if cache is None:
                    dtype = self.lm_head.weight.dtype
                    if torch.is_autocast_enabled(idx.device.type):
                        dtype = torch.get_autocast_dtype(idx.device.type)
                    cache = KVCache(self.cfg, B, self.cfg.block_size, idx.device, dtype)
                    fed = 0
                logits = self(idx[:, fed:], cache=cache)[:, -1]
                fed = idx.size(1)
            nxt = self._sample(logits.float(), temperature, top_k, top_p, generator)
            if stop_token is not None:
                nxt = torch.where(done, stop_token, nxt)
                done |= nxt == stop_token
            idx = torch.cat([idx, nxt[:, None]], dim=1)
            yield nxt
            if stop_token is not None and bool(done.all()):
                return

    def generate(self, idx: torch.Tensor, max_new_tokens: int, **kw) -> torch.Tensor:
        """Prompt (B, T) -> (B, T + new) ids; same options as `generate_stream`."""
        new = list(self.generate_stream(idx, max_new_tokens, **kw))
        return torch.cat([idx] + [t[:, None] for t in new], dim=1)

    def _sample(self, logits, temperature, top_k, top_p, generator):
        logits[:, self.cfg.vocab_size:] = float("-inf")  # padded ids are never sampled
        if temperature <= 0:
            return logits.argmax(dim=-1)
        logits = logits / temperature
        if top_k is not None and top_k < logits.size(-1):
            kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if top_p is not None and top_p < 1.0:
            sorted_logits, order = logits.sort(dim=-1, descending=True)
            cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
            drop = cum - sorted_logits.softmax(dim=-1) >= top_p  # mass before this id already reaches p
            sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
            logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
        return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)


def build(cfg: GPTConfig, device, seed: int = 0) -> GPT:
    """Build on the meta device (no memory touched), then allocate on `device` and initialise once."""
    with torch.device("meta"):
        model = GPT(cfg)
    model.to_empty(device=device)
    model.init_weights(seed)
    return model
