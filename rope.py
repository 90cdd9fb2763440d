"""Rotary position tables (Su et al. 2021) and their scaling past the trained context, computed as transformers'
`modeling_rope_utils` computes them, so that imports and exports keep their logits: `rope_cache(cfg)` is the
(block_size, 2, head_dim) cos/sin table the model applies (kernel.torch_rope and its fused forms).

    model.rope_scaling: {rope_type: linear, factor: 4}
                        {rope_type: llama3, factor, low_freq_factor, high_freq_factor, original_max_position_embeddings}
                        {rope_type: yarn, factor, original_max_position_embeddings, [beta_fast, beta_slow, ...]}
"""
import math

import torch


ROPE_SCALING_KEYS = {  # rope_type -> (required, optional) keys, as transformers' Llama-family configs take them
    "linear": ({"factor"}, set()),
    "llama3": ({"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}, set()),
    "yarn": ({"factor", "original_max_position_embeddings"},
             {"beta_fast", "beta_slow", "attention_factor", "mscale", "mscale_all_dim", "truncate"}),
}


def check_rope_scaling(rs: dict, arch: str = "llama") -> None:
    """Raise ValueError naming the key when `rs` is not a RoPE scaling that `rope_cache` (and transformers) compute."""
    kind = rs.get("rope_type")
    if arch != "llama":
        raise ValueError("model.rope_scaling needs arch llama (GPT-2 has learned positions)")
    if kind not in ROPE_SCALING_KEYS:
        raise ValueError(f"model.rope_scaling.rope_type must be one of {', '.join(ROPE_SCALING_KEYS)} (got {kind!r})")
    required, optional = ROPE_SCALING_KEYS[kind]
    if missing := sorted(required - set(rs)):
        raise ValueError(f"model.rope_scaling ({kind}) needs {', '.join(missing)}")
    if extra := sorted(set(rs) - required - optional - {"rope_type"}):
        raise ValueError(f"model.rope_scaling ({kind}) does not take {', '.join(extra)} "
                         f"(it takes {', '.join(sorted(required | optional))})")
    numbers = {k: v for k, v in rs.items() if k not in ("rope_type", "truncate")}
    if bad := [k for k, v in numbers.items() if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0]:
        raise ValueError(f"model.rope_scaling.{bad[0]} must be a positive number (got {rs[bad[0]]!r})")
    if rs["factor"] < 1:
        raise ValueError(f"model.rope_scaling.factor must be >= 1 (got {rs['factor']})")
    if kind == "llama3" and rs["high_freq_factor"] <= rs["low_freq_factor"]:
        raise ValueError(f"model.rope_scaling.high_freq_factor ({rs['high_freq_factor']}) must be greater than "
                         f"low_freq_factor ({rs['low_freq_factor']})")
    if kind == "yarn" and rs.get("beta_fast", 32) < rs.get("beta_slow", 1):
        raise ValueError(f"model.rope_scaling.beta_fast ({rs.get('beta_fast', 32)}) must be >= beta_slow "
                         f"({rs.get('beta_slow', 1)})")


def rope_frequencies(cfg, device=None) -> tuple[torch.Tensor, float]:
    """(head_dim/2 inverse frequencies in FP32, the factor cos and sin are multiplied by) for cfg.rope_scaling,
    by the formulas of transformers' modeling_rope_utils: linear divides every frequency by `factor` (positions
    interpolated); llama3 divides the low frequencies (wavelength above original/low_freq_factor) by `factor`,
    keeps the high ones (below original/high_freq_factor) and blends between; yarn (Peng et al. 2023) blends
    interpolated and original frequencies by a ramp over the dimensions that turn between beta_slow and beta_fast
    times within the original context, and scales cos/sin by 0.1 ln(factor) + 1 (its attention temperature)."""
    hd, rs = cfg.head_dim, cfg.rope_scaling or {}
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, device=device, dtype=torch.float32) / hd))
    kind, factor = rs.get("rope_type"), rs.get("factor", 1.0)
    if kind == "linear":
        return inv_freq / factor, 1.0
    if kind == "llama3":
        old, low, high = rs["original_max_position_embeddings"], rs["low_freq_factor"], rs["high_freq_factor"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old / low, inv_freq / factor, inv_freq)
        smooth = (old / wavelen - low) / (high - low)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old / high) & (wavelen <= old / low)
        return torch.where(medium, blended, scaled), 1.0
    if kind == "yarn":
        def mscale(scale, m=1.0):
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0
        attention = rs.get("attention_factor")
        if attention is None:
            m, m_all = rs.get("mscale"), rs.get("mscale_all_dim")
            attention = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)

        def dim_of(rotations):  # the dimension whose frequency turns `rotations` times over the original context
            old = rs["original_max_position_embeddings"]
            return hd * math.log(old / (rotations * 2 * math.pi)) / (2 * math.log(cfg.rope_theta))
        lo, hi = dim_of(rs.get("beta_fast") or 32), dim_of(rs.get("beta_slow") or 1)
        if rs.get("truncate", True):
            lo, hi = math.floor(lo), math.ceil(hi)
        lo, hi = max(lo, 0), min(hi, hd - 1)
        ramp = ((torch.arange(hd // 2, device=device, dtype=torch.float32) - lo) / ((hi - lo) or 0.001)).clamp(0, 1)
        return inv_freq / factor * ramp + inv_freq * (1 - ramp), float(attention)
    return inv_freq, 1.0


def rope_cache(cfg, device=None) -> torch.Tensor:
    """The (block_size, 2, head_dim) cos/sin table of `cfg` (a model.GPTConfig), rotate-half layout, always in FP32
    (BF16 angles lose positions); RoPE scaling (cfg.rope_scaling) by `rope_frequencies`."""
    inv_freq, attention = rope_frequencies(cfg, device)
    angles = torch.outer(torch.arange(cfg.block_size, device=device, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)  # (T, D): pair i with i + D/2, as Hugging Face Llama does
    return torch.stack([angles.cos() * attention, angles.sin() * attention], dim=1)
