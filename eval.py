"""Validation loss, perplexity and bits per byte of a checkpoint on a prepared split.

    python eval.py OUT_DIR [--data DIR] [--split val] [--max_tokens N] [--json]

Bits per byte = total nats / ln 2 / UTF-8 bytes of the text the scored tokens decode to (the EOT token
counts as zero bytes), so models with different tokenizers can be compared. A whole split scores every
token but the first of each shard, which has no context to be predicted from.
"""
import argparse
import json
import math
import os
import sys
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from loader import eval_batches, token_bytes


@torch.no_grad()
def evaluate(model, paths: list[str], block_size: int, vocab_size: int, batch_size: int, device: torch.device,
             split: str = "val", max_tokens: int | None = None, autocast=nullcontext(), rank: int = 0,
             world: int = 1) -> dict:
    """Score `split` of each dataset in `paths` sequentially (each target token once, up to max_tokens per
    dataset); returns loss (nats/token), ppl, bpb, tokens, bytes, summed over datasets and ranks."""
    model.eval()
    nats = torch.zeros((), dtype=torch.float64, device=device)
    n_tokens, n_bytes = 0, 0
    for path in paths:
        nbytes = token_bytes(path)
        for x, y in eval_batches(path, split, block_size, batch_size, max_tokens, rank, world, vocab_size):
            scored = y[y >= 0].numpy()
            n_tokens += scored.size
            n_bytes += int(nbytes[scored].sum())
            x, y = x.to(device), y.to(device)
            with autocast:
                logits = model(x)
            nats += F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=-1, reduction="sum")
    totals = torch.tensor([nats.item(), n_tokens, n_bytes], dtype=torch.float64, device=device)
    if world > 1:
        torch.distributed.all_reduce(totals)
    total_nats, n_tokens, n_bytes = totals.tolist()
    loss = total_nats / max(n_tokens, 1)
    return {"loss": loss, "ppl": math.exp(min(loss, 700)), "bpb": total_nats / math.log(2) / max(n_bytes, 1),
            "tokens": int(n_tokens), "bytes": int(n_bytes)}


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir", help="run folder (uses its latest checkpoint) or a step_NNNNNN folder")
    p.add_argument("--data", action="append", help="prepared dataset folder (repeatable); default: the run's")
    p.add_argument("--split", default="val")
    p.add_argument("--max_tokens", type=int, default=None, help="stop after this many scored tokens per dataset")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", choices=["bf16", "fp32"], default=None, help="default: the run's")
    p.add_argument("--json", action="store_true", help="print one JSON line instead of text")
    args = p.parse_args(argv)

    import checkpoint
    from loader import DataError, same_tokenizer
    from train import pick_device
    try:
        device = pick_device(args.device)
        model, cfg, path = checkpoint.load_model(args.out_dir, device)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    precision = args.precision or cfg.train.precision
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()
    datasets = args.data or cfg.data.datasets
    try:
        run_tokenizer = os.path.join(os.path.dirname(path), "tokenizer")
        for d in datasets:
            if os.path.isdir(run_tokenizer) and not same_tokenizer(run_tokenizer, d):
                raise DataError(f"{d} was tokenized differently from the data {path} was trained on")
        res = evaluate(model, datasets, cfg.model.block_size, cfg.model.vocab_size, args.batch_size, device,
                       args.split, args.max_tokens, autocast)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    res.update(checkpoint=path, data=datasets, split=args.split)
    if args.json:
        print(json.dumps(res))
    else:
        print(f"{path} on {', '.join(datasets)} [{args.split}]: loss {res['loss']:.4f} | ppl {res['ppl']:.2f} | "
              f"bits/byte {res['bpb']:.4f} | {res['tokens']:,} tokens, {res['bytes']:,} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
