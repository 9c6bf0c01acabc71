"""Fixtures shared by several test files."""

import pytest


@pytest.fixture(scope="session")
def embedded_model_dir(tmp_path_factory):
    """The embedded default (SmolLM2-135M-Instruct) converted once per test session into a
    temporary cache folder; returns the model folder. Nothing global is changed."""
    from l1ra_lite.models import embedded_model_dir as convert

    return convert(cache_dir=tmp_path_factory.mktemp("l1ra-cache"))
