"""requirements.txt, the lock that CI installs, against pyproject.toml, the one list of what the code needs: every
dependency that `pip install ".[dev]"` asks for (the base, dev and the extras dev pulls in; not gpu) is pinned
there, name==version, to a version that pyproject allows. `bash scripts/lock.sh` regenerates the lock."""
import os
import re

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

tomllib = pytest.importorskip("tomllib")  # Python 3.11+, as the lock is

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PIN = re.compile(r"([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)")


def read(name: str) -> str:
    with open(os.path.join(ROOT, name)) as f:
        return f.read()


def wanted(pyproject: dict, extras=("dev",)) -> list[Requirement]:
    """The base dependencies and those of `extras`, following the project's references to itself
    (dev's "gptrain[hf,tracking,s3,eval]")."""
    project = pyproject["project"]
    optional = project.get("optional-dependencies", {})
    todo, seen, reqs = [None, *extras], set(), []
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        seen.add(extra)
        for line in project["dependencies"] if extra is None else optional[extra]:
            req = Requirement(line)
            if canonicalize_name(req.name) == canonicalize_name(project["name"]):
                todo.extend(req.extras)
            elif req.marker is None or req.marker.evaluate({"extra": extra or ""}):
                reqs.append(req)
    return reqs


def disagreements(pyproject_text: str, lock_text: str) -> list[str]:
    """What is wrong between the two files' texts; [] when the lock satisfies pyproject."""
    problems, pins = [], {}
    for n, line in enumerate(lock_text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = PIN.fullmatch(line)
        try:
            version = Version(m[2]) if m else None
        except InvalidVersion:
            version = None
        if version is None:
            problems.append(f"requirements.txt:{n}: {line!r} is not name==version")
        elif canonicalize_name(m[1]) in pins:
            problems.append(f"requirements.txt:{n}: {m[1]} pinned twice")
        else:
            pins[canonicalize_name(m[1])] = version
    for req in wanted(tomllib.loads(pyproject_text)):
        pin = pins.get(canonicalize_name(req.name))
        if pin is None:
            problems.append(f"{req} (pyproject.toml) is not pinned in requirements.txt")
        elif not req.specifier.contains(pin, prereleases=True):
            problems.append(f"{req} (pyproject.toml) but requirements.txt pins {pin}")
    return problems


def test_lock_agrees_with_pyproject():
    problems = disagreements(read("pyproject.toml"), read("requirements.txt"))
    assert not problems, "\n".join(problems + ["regenerate it: bash scripts/lock.sh"])


def test_lock_says_how_it_is_made():
    lock = read("requirements.txt")
    header = "".join(line for line in lock.splitlines(True) if line.startswith("#"))
    assert "bash scripts/lock.sh" in header and "pyproject.toml" in header and "CI" in header
    assert os.path.exists(os.path.join(ROOT, "scripts", "lock.sh"))
    # what this test itself needs is in the lock, and torch is the build the script pins (CI's CPU wheel)
    names = {canonicalize_name(m[1]): m[2] for m in PIN.finditer(lock)}
    assert "packaging" in names and "pytest" in names
    script_torch = re.search(r"torch==(\S+)", read("scripts/lock.sh"))[1]
    assert Version(names["torch"]).public == Version(script_torch).public


def test_disagreements_are_caught():
    """The checker on edited copies: it fails on what it should and not on spelling."""
    pyproject, lock = read("pyproject.toml"), read("requirements.txt")
    numpy = re.search(r"^numpy==(\S+)$", lock, re.M)[1]
    assert disagreements(pyproject, lock) == []
    # a raised lower bound, in the base and in an extra that dev pulls in through gptrain[...]
    raised = pyproject.replace('"numpy>=1.26"', '"numpy>=999"')
    assert raised != pyproject
    assert disagreements(raised, lock) == [f"numpy>=999 (pyproject.toml) but requirements.txt pins {numpy}"]
    raised = pyproject.replace('"s3fs>=2024.2"', '"s3fs>=9999"')
    assert raised != pyproject and len(disagreements(raised, lock)) == 1
    # a new dependency, and one dropped from the lock
    added = pyproject.replace('"xxhash>=3.0",', '"xxhash>=3.0", "not-in-the-lock>=1",')
    assert disagreements(added, lock) == ["not-in-the-lock>=1 (pyproject.toml) is not pinned in requirements.txt"]
    dropped = re.sub(r"^numpy==.*\n", "", lock, flags=re.M)
    assert disagreements(pyproject, dropped) == ["numpy>=1.26 (pyproject.toml) is not pinned in requirements.txt"]
    # a line that is not name==version, and a package pinned twice
    assert "not name==version" in disagreements(pyproject, lock + "tqdm>=4.66\n")[0]
    assert "pinned twice" in disagreements(pyproject, lock + f"NumPy=={numpy}\n")[0]
    # names compare after PEP 503 normalisation; gpu's packages need not be in the lock
    respelled = lock
    for name, spelling in (("pyyaml", "pyYAML"), ("huggingface-hub", "HuggingFace.Hub")):
        respelled, n = re.subn(rf"^{name.replace('-', '[-_.]')}==", f"{spelling}==", respelled, flags=re.M | re.I)
        assert n == 1
    assert disagreements(pyproject, respelled) == []
    assert "liger-kernel" not in lock and "liger-kernel" in pyproject
