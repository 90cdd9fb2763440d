"""Validation loss, perplexity and bits per byte of a checkpoint on a prepared split; or benchmark tasks
through EleutherAI's lm-evaluation-harness (the eval extra: `pip install ".[eval]"`).

    python eval.py OUT_DIR [--data DIR] [--split val] [--max_tokens N] [--json]
    python eval.py OUT_DIR --tasks hellaswag,arc_easy [--num_fewshot 0] [--limit 100]

Bits per byte = total nats / ln 2 / UTF-8 bytes of the text the scored tokens decode to (the EOT token
counts as zero bytes), so models with different tokenizers can be compared. A whole split scores every
token but the first of each shard, which has no context to be predicted from.
"""
import argparse
import json
import os
import sys

import build
import checkpoint
from config import at_least
from loader import DataError, same_tokenizer
from step import evaluate


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir", help="run folder (uses its latest checkpoint) or a step_NNNNNN folder")
    p.add_argument("--data", action="append", help="prepared dataset folder (repeatable); default: the run's")
    p.add_argument("--split", default="val")
    p.add_argument("--max_tokens", type=at_least(1), default=None,
                   help="stop after this many scored tokens per dataset")
    p.add_argument("--batch_size", type=at_least(1), default=8)
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
                   help="auto (default): train.py's rule for this machine (hardware.py)")
    p.add_argument("--json", action="store_true", help="print one JSON line instead of text")
    p.add_argument("--tasks", help="lm-evaluation-harness tasks, comma-separated (needs: pip install \".[eval]\")")
    p.add_argument("--num_fewshot", type=at_least(0), default=None)
    p.add_argument("--limit", type=at_least(0, float), default=None, help="examples per task (a fraction when < 1)")
    p.add_argument("--include_path", help="folder of extra lm-eval task YAMLs (e.g. on local data)")
    args = p.parse_args(argv)
    if args.tasks:
        import importlib.util
        if importlib.util.find_spec("lm_eval") is None:
            print("error: --tasks needs EleutherAI's lm-evaluation-harness: pip install \".[eval]\"", file=sys.stderr)
            return 2

    try:
        model, cfg, path, precision = build.load_for_inference(args.out_dir, args.device, args.precision)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    device = next(model.parameters()).device
    autocast = precision.autocast(device)
    if args.tasks:
        from harness import harness_lm, run_tasks  # lm-eval
        from tokenizer import load_tokenizer
        tok = load_tokenizer(checkpoint.tokenizer_dir(path, cfg))
        lm = harness_lm(model, tok, device, args.batch_size, autocast)
        res = run_tasks(lm, args.tasks.split(","), args.num_fewshot, args.limit, args.include_path)
        print(json.dumps({"checkpoint": path, "results": res}, indent=None if args.json else 1))
        return 0
    datasets = args.data or cfg.data.datasets
    try:
        run_tokenizer = checkpoint.tokenizer_dir(path, cfg)
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
