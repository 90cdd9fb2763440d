"""Every command in README.md and in the topic pages it links to (docs/*.md) runs as written: each launch's config
divides its batch over its world size (at the world size the command asks for), every data/prepare.py line parses,
and the quick start and the 2-process gloo line run for real on tiny settings. Every relative link of those pages
leads to a file (and heading) that exists, and the README links every topic page."""
import glob
import os
import re
import shlex
from dataclasses import replace

import pytest

import config
import memory
import plan
from conftest import ROOT, TINY, run
from test_distributed import ok, torchrun

PAGES = ["README.md", *sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))]


def page_commands(page: str) -> list[list[str]]:
    """The shell commands of one page's bash blocks, continuation lines joined and comments dropped."""
    text = open(os.path.join(ROOT, page)).read()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words:
                commands.append(words)
    return commands


def readme_commands() -> list[list[str]]:
    """The commands of README.md, then of each docs/*.md page in name order (so the quick start's come first)."""
    return [words for page in PAGES for words in page_commands(page)]


def launches() -> list[tuple[str, int, list[str]]]:
    """(the page and command, its world size, its train.py arguments) for each distinct training launch."""
    found, seen = [], set()
    for page in PAGES:
        for words in page_commands(page):
            line = shlex.join(words)
            if line in seen:
                continue
            seen.add(line)
            if words[:2] == ["python", "train.py"]:
                found.append((f"{page}: {line}", 1, words[2:]))
            elif words[0] == "torchrun":
                opts = dict(w.removeprefix("--").split("=", 1) for w in words if w.startswith("--") and "=" in w)
                world = int(opts.get("nnodes", 1)) * int(opts["nproc_per_node"])
                found.append((f"{page}: {line}", world, words[words.index("train.py") + 1:]))
            elif words[0] == "sbatch":  # scripts/slurm.sh: one torchrun of 8 GPUs per node
                nodes = int(next(w for w in words if w.startswith("--nodes=")).split("=")[1])
                found.append((f"{page}: {line}", 8 * nodes, words[words.index("scripts/slurm.sh") + 1:]))
    return found


def test_the_readme_has_the_commands_this_test_checks():
    readme = [shlex.join(w) for w in page_commands("README.md")]
    assert readme[:2] == ["pip install .", "python train.py configs/tiny.yaml"]  # the quick start, first
    lines = [shlex.join(w) for w in readme_commands()]  # README.md's and every docs/*.md page's
    assert "python train.py configs/tiny.yaml" in lines
    assert "torchrun --standalone --nproc_per_node=2 train.py configs/tiny.yaml train.parallel=fsdp" in lines
    assert {world for _, world, _ in launches()} >= {1, 2, 8, 32}


def test_the_readme_states_the_test_command():
    """.ci/run and other tooling take the test command from the README."""
    assert "`python -m pytest -q tests`" in open(os.path.join(ROOT, "README.md")).read()


def slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_relative_link_leads_somewhere():
    for page in PAGES:
        text = re.sub(r"```.*?```", "", open(os.path.join(ROOT, page)).read(), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue  # https://...
            path, _, anchor = target.partition("#")
            file = os.path.normpath(os.path.join(ROOT, os.path.dirname(page), path)) if path else os.path.join(ROOT, page)
            assert os.path.exists(file), f"{page}: {target}"
            if anchor:
                headings = re.findall(r"^#+ (.*)$", re.sub(r"```.*?```", "", open(file).read(), flags=re.S), re.M)
                assert anchor in {slug(h) for h in headings}, f"{page}: {target}"


def test_the_readme_links_every_topic_page():
    readme = open(os.path.join(ROOT, "README.md")).read()
    assert len(PAGES) > 1
    for page in PAGES[1:]:
        assert f"]({page})" in readme, page


@pytest.mark.parametrize("line,world,args", launches(), ids=[line for line, _, _ in launches()])
def test_each_launch_divides_its_batch_over_its_world_size(line, world, args):
    cfg = config.load([a for a in args if not a.startswith("train.init_from=")])  # a folder that is not here
    if cfg.model.vocab_size is None:  # from the data
        cfg = replace(cfg, model=replace(cfg.model, vocab_size=50304))
    micro = memory.micro_batch(cfg, world, 80.0)  # auto: the largest micro batch an 80 GB GPU holds
    d = config.derive(cfg, world, micro)
    assert d.micro_batch * d.grad_accum * d.dp == cfg.train.batch_size, line  # dp = world / train.tp


def test_an_explicit_micro_batch_that_cannot_divide_still_stops():
    cfg = config.load(["configs/tiny.yaml", "train.micro_batch_size=16"])
    with pytest.raises(config.ConfigError, match=r"train.batch_size \(16\) must be a multiple of "
                                                 r"train.micro_batch_size \(16\) x world size \(2\)"):
        config.derive(cfg, 2)
    with pytest.raises(config.ConfigError, match=r"train.batch_size \(16\) must be a multiple of the world size \(3\)"):
        config.derive(config.load(["configs/tiny.yaml"]), 3)


def test_auto_takes_the_largest_micro_batch_that_fits():
    cfg = config.load(["configs/500m.yaml", "train.micro_batch_size=auto", "model.vocab_size=50304"])
    assert memory.micro_batch(cfg, 8, 10_000.0) == 32  # everything fits: the whole batch of a rank, no accumulation
    fits = memory.micro_batch(cfg, 8, 80.0)
    assert 1 <= fits < 32 and 32 % fits == 0
    assert next(r for r in plan.plan(memory.with_micro(cfg, fits), 8, (80.0, 0)) if r["configured"])["fits"]
    assert not next(r for r in plan.plan(memory.with_micro(cfg, 2 * fits), 8, (80.0, 0)) if r["configured"])["fits"]
    assert memory.micro_batch(cfg, 8, 1.0) == 1  # nothing fits: the smallest, and out-of-memory advice follows


def test_every_prepare_line_parses():
    import data.prepare as prepare
    lines = [w for w in readme_commands() if w[:2] == ["python", "data/prepare.py"]]
    assert len(lines) >= 5
    for words in lines:
        try:
            prepare.main([*words[2:], "--help"])  # argparse stops at --help once every option before it parsed
        except SystemExit as e:
            assert e.code == 0, shlex.join(words)


def test_the_quick_start_runs_as_written(corpus, tmp_path):
    out = str(tmp_path / "tiny")
    short = [f"data.datasets=[{corpus}]", f"train.out_dir={out}", "train.max_steps=3", "train.eval_interval=0",
             "model.n_layer=2", "model.n_embd=64", "model.block_size=64"]
    lines = {}  # the first of each: the quick start's
    for w in readme_commands():
        if w[:1] == ["python"] and w[1] in ("train.py", "sample.py", "eval.py"):
            lines.setdefault(w[1], w)
    assert lines["train.py"][2:3] == ["configs/tiny.yaml"]
    r = run("train.py", *lines["train.py"][2:], *short)
    assert "micro batch 16 x grad accum 1 x world size 1" in r.stdout
    sample = [out if w == "out/tiny" else w for w in lines["sample.py"][2:]]
    assert "def fib(n):" in run("sample.py", *[w if w != "200" else "8" for w in sample]).stdout
    assert "bits/byte" in run("eval.py", *[out if w == "out/tiny" else w for w in lines["eval.py"][2:]]).stdout


def test_the_two_process_line_runs_as_written(corpus, tmp_path):
    line = "torchrun --standalone --nproc_per_node=2 train.py configs/tiny.yaml train.parallel=fsdp"
    assert line.split() in readme_commands()
    r = torchrun("configs/tiny.yaml", "train.parallel=fsdp", *TINY[:4], f"data.datasets=[{corpus}]",
                 f"train.out_dir={tmp_path / 'fsdp'}", "train.max_steps=2", "train.eval_interval=0")
    ok(r)
    assert "micro batch 8 x grad accum 1 x world size 2" in r.stdout  # tiny.yaml's batch of 16 over 2 ranks
