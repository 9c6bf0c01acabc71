"""The bundled recipes: they parse, their keys are finetune options, every GPU recipe fits
its card with room to spare, and the CPU recipe is short yet moves rank."""

from __future__ import annotations

import json

import pytest

from l1ra_lite.config import RECIPES_DIR, build_config, read_recipe, steps_from
from l1ra_lite.estimate import estimate_for_config

RECIPES = sorted(p.stem for p in RECIPES_DIR.glob("*.toml"))
GPU_RECIPES = [name for name in RECIPES if read_recipe(name)[1].get("device") == "cuda"]


def test_the_promised_recipes_exist():
    covered = set()
    for name in GPU_RECIPES:
        values, meta = read_recipe(name)
        covered.add((values["model"], meta["memory_gib"]))
        assert f"{meta['memory_gib']}gb" in name  # the card size is in the name
    wanted = {(m, gib) for m in ("mistral-7b", "llama-3.1-8b") for gib in (8, 12, 16, 24)}
    wanted |= {("qwen2.5-7b", 12), ("qwen2.5-7b", 24)}
    assert wanted <= covered
    assert "cpu-smollm2" in RECIPES


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_builds_a_valid_config(name):
    values, meta = read_recipe(name)
    config = build_config(name, {})
    for key, value in values.items():
        assert getattr(config, key) == value
    assert meta["card"] and meta["description"] and meta["device"] in ("cuda", "cpu")
    assert config.method == "l1ra" and config.model


@pytest.fixture(scope="module")
def gpu_estimates():
    return {name: estimate_for_config(build_config(name, {})) for name in GPU_RECIPES}


@pytest.mark.parametrize("name", GPU_RECIPES)
def test_gpu_recipe_fits_its_card_with_10_percent_headroom(name, gpu_estimates):
    memory_gib = read_recipe(name)[1]["memory_gib"]
    est = gpu_estimates[name]
    assert est.headroom(memory_gib) >= 0.10, f"{name}: {est.total_gib:.2f} GiB on a {memory_gib} GiB card"


def test_bigger_cards_get_more_out_of_the_same_model(gpu_estimates):
    """Within one model, a bigger card's recipe uses more memory (tokens or rank)."""
    by_model: dict[str, list[tuple[int, float]]] = {}
    for name, est in gpu_estimates.items():
        values, meta = read_recipe(name)
        by_model.setdefault(values["model"], []).append((meta["memory_gib"], est.total_bytes))
    for model, points in by_model.items():
        totals = [total for _, total in sorted(points)]
        assert totals == sorted(totals), model


def test_cpu_recipe_is_short_and_reallocates():
    config = build_config("cpu-smollm2", {})
    assert config.model == "smollm2-135m" and config.seq_len == 256
    assert config.max_steps <= 100 and config.batch_size * config.grad_accum <= 8
    total = config.max_steps
    warmup = steps_from(config.warmup, total)
    every = steps_from(config.update_every, total)
    reallocations = [s for s in range(every, total, every) if s > warmup]
    assert len(reallocations) >= 5
    # lambda = kappa / (eta_c * steps): below 1 so that a useful gate can hold against the
    # shrink, with kappa >= 1 so that an idle gate can fall from 1 to the threshold in the run
    assert config.l1_lambda == "auto"
    lam = config.l1_kappa / (config.eta_c * total)
    assert lam < 1 and config.l1_kappa >= 1
    # an idle gate (no push from the loss) reaches the threshold within the run; at the
    # recipe's fast A/B rate the loss takes most unused gates down sooner (README: make demo)
    steps_to_prune = (1 - config.eta_c * lam) / (config.eta_c * lam)
    assert steps_to_prune <= total


def test_recipes_command_lists_every_recipe(capsys):
    from l1ra_lite.cli import main

    assert main(["recipes", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [row["name"] for row in rows] == RECIPES
    for row in rows:
        assert "error" not in row
        if row["device"] == "cuda":
            assert row["headroom"] >= 0.10 and row["estimate_gib"] < row["memory_gib"]
