"""The lm_head + cross-entropy variants of kernel.py side by side: time of forward + backward and peak memory,
each variant in a process of its own (on CPU the peak is the process's RSS high-water mark, which only grows),
printed as a Markdown table with ratios to the eager plain loss.

    python scripts/loss_variants.py [--rows 2048] [--dim 768] [--vocab 50304] [--precision bf16] [--repeat 3]

Variants: plain (eager, full FP32 logits), compiled (the plain loss under torch.compile: train.loss auto's choice
for a compiled step whose logits fit), chunked (GPU-sized chunks), chunked (CPU cache-sized chunks), and torch's
own F.linear_cross_entropy with LinearCrossEntropyOptions() (its chunked path) where the installed torch has it.
On CUDA the peak is max_memory_allocated.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = ["plain", "compiled", "chunked", "chunked (CPU chunks)", "torch linear_cross_entropy", "none"]


def measure(variant: str, rows: int, dim: int, vocab: int, precision: str, repeat: int) -> dict:
    """In this process: one variant, 2 untimed runs (compile, allocator), then the best of `repeat`."""
    import torch
    sys.path.insert(0, ROOT)
    import kernel
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.set_flush_denormal(True)
    gen = torch.Generator(device).manual_seed(0)
    h = (torch.randn(rows, dim, device=device, generator=gen) * 0.5).requires_grad_()
    w = (torch.randn(vocab, dim, device=device, generator=gen) * 0.02).requires_grad_()
    t = torch.randint(0, vocab, (rows,), device=device, generator=gen)
    t[::7] = -1  # some ignored targets, as padding gives
    fns = {"plain": kernel.plain_loss, "compiled": kernel.compiled_loss, "chunked": kernel.chunked_loss,
           "chunked (CPU chunks)": kernel.cpu_chunked_loss, "none": lambda h, w, t: h.sum() + w.sum()}
    if hasattr(torch.nn, "LinearCrossEntropyOptions"):  # its chunked path (unchunked, it is the plain loss)
        fns["torch linear_cross_entropy"] = lambda h, w, t: torch.nn.functional.linear_cross_entropy(
            h, w, t, ignore_index=-1, options=torch.nn.LinearCrossEntropyOptions())
    if variant not in fns:
        return {"variant": variant, "missing": True}
    fn = fns[variant]
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[precision]
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def step():
        with torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
            loss = fn(h, w, t)
        loss.backward()
        h.grad = w.grad = None
        sync()
    for _ in range(2):
        step()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    return {"variant": variant, "seconds": min(times), "peak_bytes": peak, "device": device}


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=2048)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--vocab", type=int, default=50304)
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure this variant in this process
    a = p.parse_args(argv)
    if a.one:
        print(json.dumps(measure(a.one, a.rows, a.dim, a.vocab, a.precision, a.repeat)))
        return 0
    results = {}
    for v in VARIANTS:
        r = subprocess.run([sys.executable, __file__, "--one", v, *argv], capture_output=True, text=True)
        if r.returncode != 0:
            print(f"{v}: failed\n{r.stderr[-2000:]}", file=sys.stderr)
            continue
        results[v] = json.loads(r.stdout.strip().splitlines()[-1])
    base = results.pop("none", {}).get("peak_bytes", 0)  # the process itself, the inputs and their gradients
    ref = results["plain"]
    print(f"{a.rows} rows x d {a.dim} x vocab {a.vocab}, {a.precision}, forward + backward, best of {a.repeat}; "
          f"peak above a process that only makes the inputs and their gradients ({base / 2**20:.0f} MiB)")
    print("| loss | fwd+bwd | vs plain | peak above base | vs plain |\n| --- | --- | --- | --- | --- |")
    for v, r in results.items():
        if r.get("missing"):
            print(f"| {v} | not in this torch | | | |")
            continue
        extra, ref_extra = r["peak_bytes"] - base, ref["peak_bytes"] - base
        print(f"| {v} | {r['seconds']:.3f} s | {r['seconds'] / ref['seconds']:.2f}x | {extra / 2**20:.0f} MiB | "
              f"{extra / ref_extra:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
