"""Evaluation with text: EleutherAI's lm-evaluation-harness over our model (`HarnessLM`: `python eval.py --tasks`,
and eval.tasks while training) and greedy samples from eval.prompt while training (`LiveEval`, eval.interval).
"""
import time
from contextlib import nullcontext

import torch

from config import ConfigError
from parallel import print0, whole_model
from step import finite
from tokenizer import load_tokenizer


class HarnessLM:
    """Our model behind the three request types of lm-evaluation-harness; each request has `.args`:
    loglikelihood (context, continuation) -> (log p(continuation | context), whether greedy decoding gives it);
    loglikelihood_rolling (text,) -> log p(text) from an empty context, in windows of block_size;
    generate_until (context, {"until": [...], "max_gen_toks": N, ...}) -> greedy text, cut at the first stop.
    A plain class, so it works and is tested without lm-eval; `harness_lm()` makes it an lm-eval `LM`."""

    def __init__(self, model, tokenizer, device, batch_size: int = 8, autocast=nullcontext()):
        self.model, self.tok, self._device = model, tokenizer, device  # _device: lm-eval's LM reads it
        self.batch_size, self.autocast = batch_size, autocast
        self.block_size, self.vocab_size = model.cfg.block_size, model.cfg.vocab_size

    def _split(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        # Tokenize the whole text, so the boundary token is the one the model saw in training; a context's
        # trailing spaces belong to the continuation (BPE attaches a space to the word after it).
        spaces = len(context) - len(context.rstrip(" "))
        context, continuation = context[:len(context) - spaces], context[len(context) - spaces:] + continuation
        ctx = self.tok.encode(context) if context else []
        whole = self.tok.encode(context + continuation)
        return self.tok.start_ids + ctx, whole[len(ctx):]  # the document start the model knows (BOS or EOT)

    @torch.no_grad()
    def _score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(context ids, continuation ids) -> (summed log-prob of the continuation, greedy?), in batches;
        a window longer than block_size keeps its last tokens."""
        out = []
        for i in range(0, len(pairs), self.batch_size):
            chunk = pairs[i:i + self.batch_size]
            windows = [(c + t)[-(self.block_size + 1):] for c, t in chunk]
            width = max(len(w) - 1 for w in windows)
            x = torch.zeros(len(windows), width, dtype=torch.long)  # right padding: causal, so it never leaks back
            for row, w in enumerate(windows):
                x[row, :len(w) - 1] = torch.tensor(w[:-1])
            with self.autocast:
                logits = self.model(x.to(self._device))
            logp = logits.float()[..., :self.vocab_size].log_softmax(-1).cpu()
            for row, (w, (_, cont)) in enumerate(zip(windows, chunk)):
                n = min(len(cont), len(w) - 1)
                target = torch.tensor(w[-n:])
                lp = logp[row, len(w) - 1 - n:len(w) - 1]  # positions that predict the continuation
                out.append((lp.gather(-1, target[:, None]).sum().item(), bool((lp.argmax(-1) == target).all())))
        return out

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        return self._score([self._split(*r.args[:2]) for r in requests])

    def loglikelihood_rolling(self, requests) -> list[float]:
        totals = []
        for r in requests:
            ids = self.tok.encode(r.args[0])
            tokens = self.tok.start_ids + ids
            # each token scored once: windows of block_size targets, each window filled with the tokens before
            pairs = [(tokens[:s + 1], ids[s:s + self.block_size]) for s in range(0, len(ids), self.block_size)]
            totals.append(sum(lp for lp, _ in self._score(pairs)))
        return totals

    @torch.no_grad()
    def generate_until(self, requests) -> list[str]:
        out = []
        for r in requests:
            context, kw = r.args
            until = kw.get("until") or []
            until = [until] if isinstance(until, str) else until
            ids = self.tok.start_ids + self.tok.encode(context)
            idx = torch.tensor([ids[-self.block_size:]], device=self._device)
            new, text = [], ""
            with self.autocast:
                for nxt in self.model.generate_stream(idx, kw.get("max_gen_toks", 256), temperature=0,
                                                      stop_token=self.tok.eot_id):
                    if nxt.item() in self.tok.end_ids:
                        break
                    new.append(nxt.item())
                    text = self.tok.decode(new)
                    if any(u in text for u in until):
                        break
            out.append(text[:min([text.index(u) for u in until if u in text], default=len(text))])
        return out


def harness_lm(*args, **kw):
    """A HarnessLM that is also an lm-eval `LM` (which keeps rank and cache hooks); needs lm-eval."""
    from lm_eval.api.model import LM

    class Adapter(HarnessLM, LM):
        def __init__(self):
            LM.__init__(self)
            HarnessLM.__init__(self, *args, **kw)
    return Adapter()


def run_tasks(lm, tasks: list[str], num_fewshot: int | None = None, limit: float | None = None,
              include_path: str | None = None, task_manager=None) -> dict:
    """Run lm-eval tasks (built-in, or YAMLs in `include_path`) on an `LM`; returns {task: {metric: value}}.
    A `task_manager` (lm-eval's index of tasks, seconds to build) can be passed in to be reused."""
    import lm_eval
    from lm_eval.tasks import TaskManager
    res = lm_eval.simple_evaluate(model=lm, tasks=tasks, num_fewshot=num_fewshot, limit=limit,
                                  task_manager=task_manager or TaskManager(include_path=include_path))
    return {task: {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
            for task, metrics in res["results"].items()}


class LiveEval:
    """eval.*: lm-eval tasks (eval.py's adapter) and a greedy sample from eval.prompt, logged as one row: numbers
    as `task/metric`, the text as `sample`. Every rank does the same work and rank 0 logs it, so no rank waits in a
    collective for a rank-0-only eval (past train.dist_timeout_s); under FSDP2 the model is first gathered whole on
    each rank (`whole_model`), so ranks that generate different numbers of tokens cannot hang each other."""

    def __init__(self, run, model):
        """Load the tokenizer and, for eval.tasks, lm-eval's task index (seconds); raises ConfigError for a task
        name it does not know, before the first step."""
        cfg = run.cfg
        self.cfg, self.model, self.device, self.mode = cfg, model, run.device, run.mode
        self.autocast = run.precision.autocast(run.device)
        self.tok = self.lm = self.tasks = None
        e = cfg.eval
        if not e.interval or not (e.tasks or e.prompt is not None):
            return
        # out_dir/tokenizer is a copy of this one, written by rank 0 alone (maybe on another node)
        self.tok = load_tokenizer(cfg.data.datasets[0])
        if e.tasks:
            from lm_eval.tasks import TaskManager
            self.tasks = TaskManager(include_path=e.include_path)
            if unknown := [name for name in e.tasks if not self.tasks.match_tasks([name])]:
                raise ConfigError(f"eval.tasks: lm-eval knows no task {', '.join(unknown)}"
                                         + (f" (nor {e.include_path})" if e.include_path else ""))
            self.lm = harness_lm(model, self.tok, run.device, cfg.train.micro_batch_size, self.autocast)

    def run(self, step: int, tokens: int, log) -> float:
        """Evaluate at `step` and write the row through `log(row)`; returns the seconds taken (kept out of the
        throughput)."""
        if self.tok is None:
            return 0.0
        e, t0, row = self.cfg.eval, time.perf_counter(), {"step": step, "tokens": tokens}
        # eager: the compiled blocks (FSDP) would recompile for every new shape
        with whole_model(self.model, self.mode, self.cfg.train.reshard_after_forward), \
                torch.compiler.set_stance("force_eager"):
            self.model.eval()
            if self.lm is not None:
                try:
                    res = run_tasks(self.lm, e.tasks, e.num_fewshot, e.limit, task_manager=self.tasks)
                    row.update({f"{task}/{name.removesuffix(',none')}": finite(float(v))
                                for task, scores in res.items() for name, v in scores.items()})
                except Exception as err:  # a benchmark's hiccup (a download, a task's bug) must not end the run
                    print0(f"step {step:>6} | warning: eval.tasks failed: {type(err).__name__}: {err}", flush=True)
            if e.prompt is not None:
                row["sample"] = self.sample(e.prompt)
            self.model.train()
        log(row)
        scores = " | ".join(f"{k} {v:.4f}" for k, v in row.items() if "/" in k and v is not None)
        print0(f"step {step:>6} | {scores + ' | ' if scores else ''}{time.perf_counter() - t0:.1f} s"
            + (f" | sample {row['sample']!r}" if "sample" in row else ""), flush=True)
        return time.perf_counter() - t0

    def sample(self, prompt: str) -> str:
        """The prompt and its greedy continuation (eval.max_new_tokens at most), cut where a document ends."""
        tok = self.tok
        idx = torch.tensor([tok.start_ids + tok.encode(prompt)], device=self.device)
        with self.autocast:
            new = self.model.generate(idx, self.cfg.eval.max_new_tokens, temperature=0, stop_token=tok.eot_id)
        new = new[0, idx.size(1):].tolist()
        ends = [i for i, t in enumerate(new) if t in tok.end_ids]
        return prompt + tok.decode(new[:ends[0]] if ends else new)
