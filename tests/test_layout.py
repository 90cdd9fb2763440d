"""The layout the code promises (shared design): no module imports train.py, the modules' imports form no cycle
(imports inside functions included), a module imports another of ours inside a function only when that module
serves an optional feature, no module hides an installed package, a loaded config is read-only, and choosing
kernels writes no module state."""
import ast
import dataclasses
import glob
import importlib.metadata
import os

import pytest
import torch

import config
import kernel
from conftest import ROOT

CORE = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "*.py")))


# Our modules that others may import inside a function: each serves a feature the default run leaves off, so that
# a reader of that run never meets it (a lazy import is never there to hide an import circle: see the test below).
FEATURES = {
    "data": "preparing a named corpus on first use (tokenizers, datasets)",
    "diagnose": "train.profile, and the out-of-memory report",
    "hf": "train.init_from and export (safetensors)",
    "lora": "train.lora",
    "tracking": "log.wandb and log.tensorboard",
    "harness": "lm-eval tasks (eval.py --tasks, eval.tasks) and samples while training (eval.interval)",
    "pipeline": "train.pp (torch.distributed.pipelining takes half a second to import)",
    "tokenizer": "text in and out: eval.py --tasks (training and the val loss read token ids)",
}
# checkpoint brings torch, which data/prepare.py's tokenizer workers (and loader.py, which they use) need not hold
HEAVY = {("data", "checkpoint"), ("loader", "checkpoint")}


def imports(path: str, top_only: bool = False, ours: set[str] | None = None) -> set[str]:
    """The repo modules (or `ours`) `path` imports: at its top level only, or (default) anywhere, inside functions
    too."""
    tree = ast.parse(open(path).read())
    found = set()
    for node in (tree.body if top_only else ast.walk(tree)):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found & (ours or set(CORE) | {"data"})


def test_no_module_hides_an_installed_package():
    """The scripts run from the checkout, whose folder comes first on sys.path: a module named like a package that
    something imports replaces it there. (transformers 5.25 imports Hugging Face's `kernels` package when it is
    installed, as it requires it; our kernels.py stood in its place and every transformers model failed to load.)"""
    installed = {name: set(dists) - {"gptrain"} for name, dists in importlib.metadata.packages_distributions().items()}
    assert not {name: installed[name] for name in CORE + ["data", "tests", "scripts"] if installed.get(name)}


def path_of(name: str) -> str:
    return os.path.join(ROOT, "data", "prepare.py") if name == "data" else os.path.join(ROOT, f"{name}.py")


def graph(top_only: bool = False) -> dict[str, set[str]]:
    return {name: imports(path_of(name), top_only) for name in CORE + ["data"]}


def test_a_module_imports_ours_inside_a_function_only_for_a_feature():
    lazy = {n: sorted(m for m in deps - imports(path_of(n), top_only=True) if m not in FEATURES and (n, m) not in HEAVY)
            for n, deps in graph().items()}
    assert {n: deps for n, deps in lazy.items() if deps} == {}


def test_no_module_imports_train():
    scripts = glob.glob(os.path.join(ROOT, "scripts", "*.py")) + [os.path.join(ROOT, "data", "prepare.py")]
    users = [n for n, deps in graph().items() if "train" in deps] + [p for p in scripts if "train" in imports(p)]
    assert users == []


def test_the_imports_have_no_cycle():
    find_cycle(graph())  # every import, those inside functions too


def test_a_cycle_of_imports_inside_functions_is_found(tmp_path):
    """The check itself: three modules that import each other only inside functions make a cycle."""
    for name, other in (("a", "b"), ("b", "c"), ("c", "a")):
        (tmp_path / f"{name}.py").write_text(f"import os\n\n\ndef f():\n    import {other}\n    from {other} import x\n")
    g = {n: imports(str(tmp_path / f"{n}.py"), ours={"a", "b", "c"}) for n in "abc"}
    assert all(not imports(str(tmp_path / f"{n}.py"), top_only=True, ours={"a", "b", "c"}) for n in "abc")
    with pytest.raises(AssertionError, match="a -> b -> c -> a"):
        find_cycle(g)


def find_cycle(g: dict[str, set[str]]) -> None:
    done, path = set(), []

    def visit(n):
        if n in path:
            raise AssertionError(f"import cycle: {' -> '.join(path[path.index(n):] + [n])}")
        if n in done:
            return
        path.append(n)
        for m in sorted(g.get(n, ())):
            visit(m)
        path.pop()
        done.add(n)
    for n in g:
        visit(n)


def test_a_loaded_config_is_read_only():
    cfg = config.load(["configs/tiny.yaml"])
    for section, key in (("train", "precision"), ("model", "vocab_size"), ("data", "weights")):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(getattr(cfg, section), key, None)


def test_choosing_kernels_writes_no_module_state():
    before = {k: id(v) for k, v in vars(kernel).items()}
    ops = kernel.configure("auto", "compiled", "cpu", torch.bfloat16, compiled=True, logits_fit=True)
    assert ops.loss is kernel.compiled_loss and ops.fallback.loss is kernel.cpu_chunked_loss
    assert {k: id(v) for k, v in vars(kernel).items()} == before
    assert kernel.REFERENCE.loss is kernel.chunked_loss  # the default every model starts from
