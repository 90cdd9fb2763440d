"""The lm-evaluation-harness adapter: its three request types on a trained tiny model, checked against plain
forward passes; and the adapter as a real lm-eval LM on a local task when lm-eval is installed."""
import json
import os
from types import SimpleNamespace

import pytest
import torch

from build import load_model
from conftest import local_task
from harness import HarnessLM
from tokenizer import load_tokenizer

TEXT = "def add(a, b):\n    return a + b\n\n\nclass Point:\n    def __init__(self, x, y):\n        self.x = x\n"


@pytest.fixture(scope="module")
def lm(trained):
    model, _, _ = load_model(trained, "cpu")
    return HarnessLM(model, load_tokenizer(os.path.join(trained, "tokenizer")), "cpu", batch_size=3)


def req(*args):
    return SimpleNamespace(args=args)


def logprob(model, ids: list[int]) -> torch.Tensor:
    """log p(ids[i] | ids[:i]) for i >= 1, from one forward pass."""
    with torch.no_grad():
        logits = model(torch.tensor([ids[:-1]]))[0, :, :model.cfg.vocab_size].float()
    return logits.log_softmax(-1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]


def test_loglikelihood_matches_a_forward_pass(lm):
    tok, eot = lm.tok, lm.tok.eot_id
    pairs = [("def add(a, b):", "\n    return a + b"), ("class Point:", " pass"), ("", "import os"),
             ("x = 1\ny =", " 2")]
    got = lm.loglikelihood([req(c, t) for c, t in pairs])  # batch of 3 + 1, mixed lengths: padding must not leak
    for (context, cont), (lp, _) in zip(pairs, got):
        stripped = context.rstrip(" ")
        ctx = tok.encode(stripped) if stripped else []
        whole = [eot] + tok.encode(context + cont)
        expected = logprob(lm.model, whole)[len(ctx):].sum().item()
        assert lp == pytest.approx(expected, abs=1e-4)
    # a continuation the model itself would write greedily is greedy; one with a changed token is not
    prompt = [eot] + tok.encode("def add(a, b):\n")
    greedy = lm.model.generate(torch.tensor([prompt]), 4, temperature=0)[0, len(prompt):].tolist()
    (lp, is_greedy), = lm._score([(prompt, greedy)])
    (lp2, is_greedy2), = lm._score([(prompt, greedy[:-1] + [(greedy[-1] + 1) % lm.vocab_size])])
    assert is_greedy and not is_greedy2 and lp > lp2


def test_loglikelihood_rolling_covers_every_token_once(lm):
    eot, bs = lm.tok.eot_id, lm.block_size
    short = "import os\n"
    (roll,) = lm.loglikelihood_rolling([req(short)])
    assert roll == pytest.approx(logprob(lm.model, [eot] + lm.tok.encode(short)).sum().item(), abs=1e-4)
    ids = lm.tok.encode(TEXT * 3)
    assert len(ids) > 2 * bs  # several windows
    tokens = [eot] + ids
    # block_size targets per window, each window as long as the context allows (the last one reaches back)
    expected = sum(logprob(lm.model, tokens[:s + bs + 1][-(bs + 1):])[-len(ids[s:s + bs]):].sum().item()
                   for s in range(0, len(ids), bs))
    (roll,) = lm.loglikelihood_rolling([req(TEXT * 3)])
    assert roll == pytest.approx(expected, rel=1e-5)


def test_generate_until_is_greedy_and_stops(lm):
    eot = lm.tok.eot_id
    context = "def add(a, b):\n"
    ids = [eot] + lm.tok.encode(context)
    full = lm.model.generate(torch.tensor([ids]), 12, temperature=0, stop_token=eot)[0, len(ids):].tolist()
    text = lm.tok.decode([t for t in full if t != eot])
    (free,) = lm.generate_until([req(context, {"max_gen_toks": 12})])
    assert free == text
    stop = text.strip()[:2]  # a stop string the greedy text contains
    (cut,) = lm.generate_until([req(context, {"until": [stop], "max_gen_toks": 12})])
    assert cut == text[:text.index(stop)]


def test_eval_cli_runs_a_local_lm_eval_task(trained, tmp_path, capsys):
    """eval.py's command line through its main(), in this process (a second interpreter costs seconds)."""
    pytest.importorskip("lm_eval")
    import eval as eval_
    tasks = local_task(tmp_path)
    capsys.readouterr()
    assert eval_.main([trained, "--tasks", "pyqa", "--include_path", tasks, "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["results"]["pyqa"]
    assert 0.0 <= res["acc,none"] <= 1.0
