"""What the loop writes into a run folder besides checkpoints: config.json, metrics.jsonl,
the resume fingerprint and the finished adapter/ (layout: docs/CONTRACTS.md)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from l1ra_lite.atomic import replace_dir_atomically, write_json_atomic, write_tensors_atomic, write_text_atomic
from l1ra_lite.config import FinetuneConfig
from l1ra_lite.errors import UserError
from l1ra_lite.l1ra.inject import find_targets
from l1ra_lite.models import ModelSource
from l1ra_lite.module_paths import model_path
from l1ra_lite.peft_adapter import target_names


def write_run_config(run_dir: Path, config: FinetuneConfig, extra: dict) -> None:
    write_json_atomic(run_dir / "config.json", {**config.to_dict(), **extra})


def keep_run_config_in_step(run_dir: Path, config: FinetuneConfig, now: Optional[dict] = None) -> None:
    """On resume: the settings that may change (e.g. the batch split) as given now, the
    resolved values (budget, alpha, ...) as the run first wrote them, except those in
    `now` (e.g. the number of processes)."""
    saved = json.loads((run_dir / "config.json").read_text())
    kept = {k: v for k, v in saved.items() if k not in config.to_dict()}
    write_run_config(run_dir, config, {**kept, **(now or {})})


def fingerprint(config: FinetuneConfig, source: ModelSource, budget: int, paths: list[str]) -> dict:
    """What a checkpoint must match to be resumed into this run."""
    return {
        "model": source.path,
        "method": config.method,
        "budget": budget,
        "target_modules": sorted(paths),
        "quant": config.quant,
    }


def _shown(value) -> str:
    return f"{len(value)} modules" if isinstance(value, list) else repr(value)


def check_fingerprint(saved: dict, current: dict, path: Path) -> None:
    for key, label in (
        ("model", "model"),
        ("method", "method"),
        ("budget", "budget"),
        ("target_modules", "target modules"),
        ("quant", "quantisation"),
    ):
        if saved.get(key) != current[key]:
            raise UserError(
                f"checkpoint {path} was made with a different {label} "
                f"({_shown(saved.get(key))}, this run: {_shown(current[key])}); it cannot be resumed"
            )


def truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop metric lines written after the checkpoint we continue from."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            continue
    write_text_atomic(path, "".join(line + "\n" for line in kept))


GATES_DIR = "gates"


def write_rank_snapshot(run_dir: Path, step: int, tensors: dict) -> None:
    """gates/step-<step>.safetensors: every rank's evidence before the reallocation of
    that step (--log-gates; read by bench/realloc_replay.py)."""
    if not tensors:
        return
    folder = run_dir / GATES_DIR
    folder.mkdir(exist_ok=True)
    write_tensors_atomic(folder / f"step-{step:06d}.safetensors", tensors)


def save_adapter(method, run_dir: Path, source: ModelSource, config: FinetuneConfig, tokenizer) -> Path:
    """Write adapter/ atomically: there is always either the old complete folder or the new one."""
    paths = sorted(method.rank_state.ranks)
    targets = target_names(paths, _all_decoder_linears(method.model))

    def write(folder: Path) -> None:
        method.save_adapter(folder, source.path, config.dropout, targets, tokenizer)

    return replace_dir_atomically(run_dir / "adapter", write)


def _all_decoder_linears(model) -> list[str]:
    try:
        return [model_path(p) for p in find_targets(model, None)]
    except UserError:  # no numbered blocks: the adapter config will list full paths
        return []
