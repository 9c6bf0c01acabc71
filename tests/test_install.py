"""Works on a fresh machine: Python 3.10 (no tomllib) reads recipes, the sources hold no
3.11+ syntax or standard-library names, and `make` turns a Python it cannot use (absent,
too old, without venv/ensurepip, a virtualenv without pip) into one line and exit 2."""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from l1ra_lite.config import read_recipe

ROOT = Path(__file__).resolve().parent.parent
FLOOR = (3, 10)  # pyproject's requires-python


# --- TOML on Python 3.10 -------------------------------------------------------------

# Run in a fresh interpreter where `import tomllib` fails, as on 3.10. tomli is in the dev
# extra (and a dependency on 3.10); where it is missing, tomllib stands in under its name.
NO_TOMLLIB = r"""
import json, sys
try:
    import tomli
except ModuleNotFoundError:
    import tomllib as tomli
    sys.modules["tomli"] = tomli
sys.modules["tomllib"] = None  # from now on `import tomllib` raises ModuleNotFoundError
from l1ra_lite import config
from l1ra_lite.errors import UserError
assert config.tomllib is tomli, config.tomllib
values, meta = config.read_recipe("cpu-smollm2")
try:
    config.read_recipe(sys.argv[1])
    bad = None
except UserError as err:
    bad = str(err)
print(json.dumps({"values": values, "meta": meta, "bad": bad}))
"""


def test_recipes_read_without_tomllib(tmp_path):
    broken = tmp_path / "broken.toml"
    broken.write_text("seq_len = [1, 2\n", encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", NO_TOMLLIB, str(broken)],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout.strip().splitlines()[-1])
    values, meta = read_recipe("cpu-smollm2")  # this interpreter's own parser
    assert got["values"] == values and got["meta"] == meta
    assert got["values"]["max_steps"] == 60 and got["values"]["lr"] == 5e-3
    # a malformed recipe is still a UserError (tomli's TOMLDecodeError is caught), one line
    assert got["bad"] and got["bad"].startswith(f"cannot read recipe {broken}")
    assert "\n" not in got["bad"]


# --- nothing newer than the floor in the sources ---------------------------------------

# Standard-library names that appeared after 3.10. An import of one is fine only inside a
# `try` whose handler catches ImportError (as config.py does for tomllib).
NEWER_MODULES = {"tomllib": (3, 11), "wsgiref.types": (3, 11)}
NEWER_NAMES = {
    ("datetime", "UTC"): (3, 11),
    ("enum", "StrEnum"): (3, 11),
    ("enum", "ReprEnum"): (3, 11),
    ("enum", "verify"): (3, 11),
    ("enum", "member"): (3, 11),
    ("enum", "nonmember"): (3, 11),
    ("typing", "Self"): (3, 11),
    ("typing", "LiteralString"): (3, 11),
    ("typing", "Never"): (3, 11),
    ("typing", "assert_never"): (3, 11),
    ("typing", "assert_type"): (3, 11),
    ("typing", "reveal_type"): (3, 11),
    ("typing", "Required"): (3, 11),
    ("typing", "NotRequired"): (3, 11),
    ("typing", "TypeVarTuple"): (3, 11),
    ("typing", "Unpack"): (3, 11),
    ("typing", "dataclass_transform"): (3, 11),
    ("typing", "override"): (3, 12),
    ("typing", "TypeAliasType"): (3, 12),
    ("asyncio", "TaskGroup"): (3, 11),
    ("asyncio", "timeout"): (3, 11),
    ("asyncio", "Runner"): (3, 11),
    ("contextlib", "chdir"): (3, 11),
    ("hashlib", "file_digest"): (3, 11),
    ("operator", "call"): (3, 11),
    ("math", "cbrt"): (3, 11),
    ("math", "exp2"): (3, 11),
    ("math", "sumprod"): (3, 12),
    ("itertools", "batched"): (3, 12),
    ("warnings", "deprecated"): (3, 13),
    ("copy", "replace"): (3, 13),
}
NEWER_BUILTINS = {"ExceptionGroup": (3, 11), "BaseExceptionGroup": (3, 11)}


def _guarded(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    """Inside the body of a `try` with an ImportError / ModuleNotFoundError handler."""
    child, parent = node, parents.get(node)
    while parent is not None:
        if isinstance(parent, ast.Try) and child in parent.body:
            caught = {
                n.id
                for h in parent.handlers
                for n in ast.walk(h.type or ast.Name("BaseException"))
                if isinstance(n, ast.Name)
            }
            if caught & {"ImportError", "ModuleNotFoundError", "Exception", "BaseException"}:
                return True
        child, parent = parent, parents.get(parent)
    return False


def newer_than_floor(source: str, filename: str) -> list[str]:
    """What in `source` needs a Python newer than FLOOR: syntax, or standard-library names."""
    try:
        tree = ast.parse(source, filename, feature_version=FLOOR)
    except SyntaxError as err:
        return [f"{filename}:{err.lineno}: syntax newer than {FLOOR}: {err.msg}"]
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    found = []
    for node in ast.walk(tree):
        names: list[tuple[str, str | None]] = []
        if isinstance(node, ast.Import):
            names = [(a.name, None) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [(node.module, None)] + [(node.module, a.name) for a in node.names]
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            names = [(node.value.id, node.attr)]
        elif isinstance(node, ast.Name) and node.id in NEWER_BUILTINS:
            found.append(f"{filename}:{node.lineno}: {node.id} (Python {NEWER_BUILTINS[node.id]})")
        for module, name in names:
            since = NEWER_MODULES.get(module) if name is None else NEWER_NAMES.get((module, name))
            if since and since > FLOOR and not _guarded(node, parents):
                what = module if name is None else f"{module}.{name}"
                found.append(f"{filename}:{node.lineno}: {what} (Python {'.'.join(map(str, since))})")
    return found


def test_the_check_finds_what_3_10_lacks():
    assert newer_than_floor("import tomllib\n", "x.py")
    assert newer_than_floor("from datetime import UTC\n", "x.py")
    assert newer_than_floor("import typing\nx: typing.Self\n", "x.py")
    assert newer_than_floor("from enum import StrEnum\n", "x.py")
    assert newer_than_floor("try:\n    pass\nexcept* ValueError:\n    pass\n", "x.py")
    assert newer_than_floor("raise ExceptionGroup('x', [])\n", "x.py")
    assert newer_than_floor("try:\n    import tomllib\nexcept KeyError:\n    pass\n", "x.py")
    guarded = "try:\n    import tomllib\nexcept ModuleNotFoundError:\n    import tomli as tomllib\n"
    assert newer_than_floor(guarded, "x.py") == []
    assert newer_than_floor("match 1:\n    case 1:\n        pass\nx: int | None = None\n", "x.py") == []


def test_sources_run_on_the_oldest_supported_python():
    floor = re.search(r'requires-python = ">=(\d+)\.(\d+)"', (ROOT / "pyproject.toml").read_text())
    assert floor and tuple(map(int, floor.groups())) == FLOOR
    found = []
    for folder in ("l1ra_lite", "bench", "tests"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            found += newer_than_floor(path.read_text(encoding="utf-8"), str(path.relative_to(ROOT)))
    assert found == []


# --- make, given a Python it cannot use --------------------------------------------------

needs_make = pytest.mark.skipif(shutil.which("make") is None, reason="needs make")


def _make_install(python: str, venv: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    return subprocess.run(
        ["make", "install", f"PYTHON={python}", f"VENV={venv}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _one_line(done: subprocess.CompletedProcess) -> str:
    """The recipe's own message: stderr less make's '*** ... Error 2' line."""
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)
    lines = [line for line in done.stderr.splitlines() if not re.match(r"make(\[\d+\])?: \*\*\*", line)]
    assert len(lines) == 1, done.stderr
    return lines[0]


def _script(path: Path, body: str) -> Path:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return path


@needs_make
def test_make_without_python(tmp_path):
    line = _one_line(_make_install(str(tmp_path / "no-such-python3"), tmp_path / "venv"))
    assert "no-such-python3" in line and "3.10" in line
    assert not (tmp_path / "venv").exists()


@needs_make
def test_make_with_an_old_python(tmp_path):
    old = _script(tmp_path / "python3.9", 'case "$1" in -V) echo "Python 3.9.18";; *) exit 1;; esac\n')
    line = _one_line(_make_install(str(old), tmp_path / "venv"))
    assert "needs Python 3.10 or newer" in line and "Python 3.9.18" in line
    assert not (tmp_path / "venv").exists()


@needs_make
def test_make_with_a_python_without_venv(tmp_path):
    # Debian/Ubuntu's python3 before `apt install python3-venv`: no ensurepip module
    shadow = tmp_path / "shadow" / "ensurepip"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'ensurepip'\")\n")
    python = _script(tmp_path / "python3", f'PYTHONPATH="{shadow.parent}" exec "{sys.executable}" "$@"\n')
    line = _one_line(_make_install(str(python), tmp_path / "venv"))
    assert "cannot make a virtualenv" in line
    assert f"apt install python{sys.version_info.major}.{sys.version_info.minor}-venv" in line
    assert not (tmp_path / "venv").exists()


@needs_make
def test_make_with_a_virtualenv_without_pip(tmp_path):
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    _script(venv / "bin" / "python", 'echo "No module named pip" >&2; exit 1\n')
    line = _one_line(_make_install(sys.executable, venv))
    assert f"{venv} has no pip" in line and f"rm -r {venv}" in line
    assert not (venv / ".l1ra-lite-installed").exists()
