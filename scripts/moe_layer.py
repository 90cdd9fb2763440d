"""Time one MoE layer against the dense MLP of the same active FLOPs, and the grouped GEMM against the per-expert
loop (BENCHMARKS.md, "Mixture of Experts"): forward + backward of one micro-batch, the minimum of interleaved
repeats, in FP32 and under BF16 autocast.

    python scripts/moe_layer.py [--width 256] [--experts 8] [--top_k 2] [--tokens 4096] [--repeats 25]
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import kernel  # noqa: E402
from model import GPTConfig, MoEConfig, build  # noqa: E402


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top_k", type=int, default=2)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=25)
    a = p.parse_args(argv)
    torch.set_flush_denormal(True)
    shape = dict(vocab_size=256, block_size=a.tokens, n_layer=1, n_head=4, n_embd=a.width)
    dense = build(GPTConfig(**shape), "cpu").layers[0].mlp
    moe = build(GPTConfig(**shape, moe=MoEConfig(num_experts=a.experts, top_k=a.top_k)), "cpu").layers[0].mlp
    x = torch.randn(1, a.tokens, a.width)
    grad = torch.randn_like(x)
    cases = {"dense MLP": (dense, None), "MoE, grouped_mm": (moe, kernel.configure("auto", "auto", "cpu")),
             "MoE, per-expert loop": (moe, kernel.REFERENCE)}
    for half in (False, True):
        best = dict.fromkeys(cases, float("inf"))
        for _ in range(a.repeats):
            for name, (layer, ops) in cases.items():
                if ops is not None:
                    layer.ops = ops
                xi = x.clone().requires_grad_()
                t0 = time.perf_counter()
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=half):
                    layer(xi).backward(grad)
                best[name] = min(best[name], time.perf_counter() - t0)
        times = ", ".join(f"{name} {s * 1e3:.1f} ms" for name, s in best.items())
        print(f"{'BF16' if half else 'FP32'}: {times}; MoE / dense {best['MoE, grouped_mm'] / best['dense MLP']:.2f}x, "
              f"loop / grouped {best['MoE, per-expert loop'] / best['MoE, grouped_mm']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
