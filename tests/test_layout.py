"""The layout the code promises (shared design): no module imports train.py, the modules' imports form no cycle,
no module hides an installed package, a loaded config is read-only, and choosing kernels writes no module state."""
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


def imports(path: str) -> set[str]:
    """The repo modules `path` imports at its top level (imports inside functions are deliberate: lazy)."""
    tree = ast.parse(open(path).read())
    found = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found & (set(CORE) | {"data"})


def test_no_module_hides_an_installed_package():
    """The scripts run from the checkout, whose folder comes first on sys.path: a module named like a package that
    something imports replaces it there. (transformers 5.25 imports Hugging Face's `kernels` package when it is
    installed, as it requires it; our kernels.py stood in its place and every transformers model failed to load.)"""
    installed = {name: set(dists) - {"gptrain"} for name, dists in importlib.metadata.packages_distributions().items()}
    assert not {name: installed[name] for name in CORE + ["data", "tests", "scripts"] if installed.get(name)}


def graph() -> dict[str, set[str]]:
    g = {name: imports(os.path.join(ROOT, f"{name}.py")) for name in CORE}
    g["data"] = imports(os.path.join(ROOT, "data", "prepare.py"))
    return g


def test_no_module_imports_train():
    scripts = glob.glob(os.path.join(ROOT, "scripts", "*.py")) + [os.path.join(ROOT, "data", "prepare.py")]
    users = [n for n, deps in graph().items() if "train" in deps] + [p for p in scripts if "train" in imports(p)]
    assert users == []


def test_the_imports_have_no_cycle():
    g, done, path = graph(), set(), []

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
