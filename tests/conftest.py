"""Fixtures shared by several test files."""

import os
import tempfile

import pytest

# Runs in the tests (and the processes they start) cache prepared data and converted models
# under XDG_CACHE_HOME: a folder of this session's, never the user's ~/.cache.
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="l1ra-tests-cache-")


@pytest.fixture(scope="session")
def embedded_model_dir(tmp_path_factory):
    """The embedded default (SmolLM2-135M-Instruct) converted once per test session into a
    temporary cache folder; returns the model folder. Nothing global is changed."""
    from l1ra_lite.models import embedded_model_dir as convert

    return convert(cache_dir=tmp_path_factory.mktemp("l1ra-cache"))


# Question/answer rows for the tiny runs of test_finetune and the files that reuse its runs.
FINETUNE_ROWS = [
    {"prompt": f"Question {i}: what is {i} plus {i}?", "completion": f"Answer: {2 * i}."} for i in range(48)
]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A tiny Llama base folder and a JSONL file of FINETUNE_ROWS (files may override it)."""
    import json

    from tests.tiny import save_tiny_base

    root = tmp_path_factory.mktemp("finetune")
    save_tiny_base(root / "base")
    with open(root / "data.jsonl", "w") as f:
        for row in FINETUNE_ROWS:
            f.write(json.dumps(row) + "\n")
    return root
