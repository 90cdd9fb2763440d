"""Generate text from a checkpoint, streaming tokens as they come (KV cache).

    python sample.py OUT_DIR --prompt "def fib(n):" --max_new_tokens 200 [--temperature 0.8] [--top_k 200]
                     [--top_p 0.95] [--num_samples 1] [--seed 1337] [--prompt_file F]
"""
import argparse
import sys

import torch

import build
import checkpoint
from config import at_least
from tokenizer import load_tokenizer


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir", help="run folder (uses its latest checkpoint) or a step_NNNNNN folder")
    p.add_argument("--prompt", help="text to continue (default: a new line)")
    p.add_argument("--prompt_file", help="read the prompt from this file (UTF-8) instead")
    p.add_argument("--max_new_tokens", type=at_least(1), default=200)
    p.add_argument("--temperature", type=at_least(0, float), default=0.8, help="0 = greedy")
    p.add_argument("--top_k", type=at_least(1), default=200)
    p.add_argument("--top_p", type=at_least(0, float), default=0.95)
    p.add_argument("--num_samples", type=at_least(1), default=1)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--no_stop", action="store_true", help="keep generating past the end-of-text token")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
                   help="auto (default): train.py's rule for this machine (hardware.py)")
    args = p.parse_args(argv)
    if not 0 < args.top_p <= 1:
        p.error(f"argument --top_p: {args.top_p:g} is not in (0, 1]: it keeps the smallest set of tokens whose "
                f"probabilities sum to top_p (1: all of them)")
    if args.prompt is not None and args.prompt_file:
        p.error("give --prompt or --prompt_file, not both")
    try:
        if args.prompt_file:
            with open(args.prompt_file, encoding="utf-8") as f:
                args.prompt = f.read()
    except (OSError, UnicodeDecodeError) as e:
        why = f"not UTF-8 text ({e.reason} at byte {e.start})" if isinstance(e, UnicodeDecodeError) else e.strerror
        print(f"error: --prompt_file {args.prompt_file}: {why}", file=sys.stderr)
        return 2
    try:
        model, cfg, path, precision = build.load_for_inference(args.out_dir, args.device, args.precision)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    args.prompt = "\n" if args.prompt is None else args.prompt
    tok = load_tokenizer(checkpoint.tokenizer_dir(path, cfg))
    ids = tok.start_ids + tok.encode(args.prompt)  # a document start, as in training (BOS or the last EOT)
    if len(ids) >= cfg.model.block_size:
        ids = ids[-(cfg.model.block_size - 1):]
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(args.seed)
    print(f"# {path}", file=sys.stderr)
    for i in range(args.num_samples):
        if args.num_samples > 1:
            print(f"\n--- sample {i + 1} ---", flush=True)
        print(args.prompt, end="", flush=True)
        idx = torch.tensor([ids], dtype=torch.long, device=device)
        new, shown = [], ""
        with precision.autocast(device):
            for nxt in model.generate_stream(idx, args.max_new_tokens, temperature=args.temperature,
                                             top_k=args.top_k, top_p=args.top_p, generator=gen,
                                             stop_token=None if args.no_stop else tok.eot_id):
                if not args.no_stop and nxt.item() in tok.end_ids:
                    break
                new.append(nxt.item())
                text = tok.decode(new)
                if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
                    print(text[len(shown):], end="", flush=True)
                    shown = text
        print(tok.decode(new)[len(shown):], flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
