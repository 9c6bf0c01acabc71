"""Checkpoints: everything needed to resume a run exactly, in safetensors and JSON.

A checkpoint is a folder `checkpoint-<step>/` in the run folder:

    trainable.safetensors   trainable tensors by parameter name (A, B, gates for L1RA)
    optimizer.safetensors   optimiser state tensors, keyed "<param index>.<name>"
    extra.safetensors       other tensors: RNG states, AdaLoRA's importance scores ...
    state.json              step, data position, rank state, optimiser param groups ...
    manifest.json           size and sha256 of every file above (written last)

It is written into a temporary folder, flushed, then renamed into place (l1ra_lite.atomic);
the file `latest` (replaced atomically) names the newest complete one. A process killed
at any moment leaves the previous checkpoint and pointer intact. Nothing here unpickles.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from l1ra_lite.atomic import remove_atomically, replace_dir_atomically, save_tensors, write_json_atomic
from l1ra_lite.errors import UserError

LATEST = "latest"
PREFIX = "checkpoint-"
TENSOR_FILES = ("trainable.safetensors", "optimizer.safetensors", "extra.safetensors")
REQUIRED_STATE = ("step", "skipped_steps", "rank_state", "fingerprint")


@dataclass
class Checkpoint:
    trainable: dict[str, torch.Tensor]
    optimizer: dict[str, Any]  # a torch optimizer state_dict
    extra: dict[str, torch.Tensor]
    state: dict[str, Any]  # JSON data


# ------------------------------------------------------------------ optimizer state


def _optimizer_to_files(state_dict: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split a torch optimizer state_dict into tensors and JSON (no pickle needed)."""
    tensors, scalars = {}, {}
    for index, values in state_dict["state"].items():
        for name, value in values.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{name}"] = value.detach().contiguous().cpu()
            else:
                scalars[f"{index}.{name}"] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def _optimizer_from_files(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in list(tensors.items()) + list(meta["scalars"].items()):
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


# ------------------------------------------------------------------ writing


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def save_checkpoint(run_dir: Path, step: int, checkpoint: Checkpoint, keep: int) -> Path:
    """Write checkpoint-<step>/ atomically, point `latest` at it, prune old ones."""

    def write(folder: Path) -> None:
        opt_tensors, opt_meta = _optimizer_to_files(checkpoint.optimizer)
        contents = {
            "trainable.safetensors": {k: v.detach().contiguous().cpu() for k, v in checkpoint.trainable.items()},
            "optimizer.safetensors": opt_tensors,
            "extra.safetensors": {k: v.contiguous().cpu() for k, v in checkpoint.extra.items()},
        }
        for name, tensors in contents.items():
            save_tensors(tensors, folder / name)
        (folder / "state.json").write_text(json.dumps({**checkpoint.state, "optimizer": opt_meta}, indent=1))
        files = TENSOR_FILES + ("state.json",)
        for name in files:
            _fsync(folder / name)
        manifest = {name: {"bytes": (folder / name).stat().st_size, "sha256": _sha256(folder / name)} for name in files}
        write_json_atomic(folder / "manifest.json", {"step": step, "files": manifest})

    # A checkpoint of the same step left by an interrupted earlier try is replaced.
    final = replace_dir_atomically(run_dir / f"{PREFIX}{step}", write)
    write_json_atomic(run_dir / LATEST, {"checkpoint": final.name, "step": step})
    _remove_old(run_dir, keep)
    return final


def _remove_old(run_dir: Path, keep: int) -> None:
    """Delete the oldest complete checkpoints beyond `keep` (never the latest), each
    renamed aside first so that a half-deleted one never looks complete."""
    steps = sorted(step for step, _ in list_checkpoints(run_dir))
    for step in steps[:-keep]:
        remove_atomically(run_dir / f"{PREFIX}{step}")


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    found = []
    for path in run_dir.glob(f"{PREFIX}*"):
        suffix = path.name[len(PREFIX) :]
        if path.is_dir() and suffix.isdigit() and (path / "manifest.json").exists():
            found.append((int(suffix), path))
    return sorted(found)


# ------------------------------------------------------------------ reading


def latest_checkpoint(run_dir: Path) -> Path:
    """The newest complete checkpoint: the one `latest` names, else the highest step."""
    pointer = run_dir / LATEST
    if pointer.exists():
        try:
            name = json.loads(pointer.read_text())["checkpoint"]
            if (run_dir / name / "manifest.json").exists():
                return run_dir / name
        except (ValueError, KeyError, TypeError, OSError):
            pass  # a damaged pointer: fall back to scanning
    found = list_checkpoints(run_dir)
    if not found:
        raise UserError(f"no complete checkpoint in {run_dir}: nothing to resume")
    return found[-1][1]


def load_checkpoint(path: Path) -> Checkpoint:
    """Verify sizes and checksums against the manifest, then read (safetensors + JSON)."""
    try:
        manifest = json.loads((path / "manifest.json").read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UserError(f"checkpoint {path} has no readable manifest.json ({err}); it is not a checkpoint") from None
    for name in TENSOR_FILES + ("state.json",):
        entry = files.get(name) if isinstance(files, dict) else None
        file = path / name
        if not isinstance(entry, dict) or not file.is_file():
            raise UserError(f"checkpoint {path} is incomplete: {name} is missing")
        if file.stat().st_size != entry.get("bytes") or _sha256(file) != entry.get("sha256"):
            raise UserError(f"checkpoint {path} is corrupt: {name} does not match its checksum")
    try:
        tensors = {name: load_file(str(path / name)) for name in TENSOR_FILES}
        state = json.loads((path / "state.json").read_text())
        optimizer = _optimizer_from_files(tensors["optimizer.safetensors"], state.pop("optimizer"))
    except (SafetensorError, ValueError, OSError, KeyError, TypeError, AttributeError) as err:
        raise UserError(f"checkpoint {path} cannot be read: {type(err).__name__}: {err}") from None
    missing = [key for key in REQUIRED_STATE if key not in state]
    if missing:
        raise UserError(f"checkpoint {path} is not an l1ra-lite checkpoint (state.json lacks {', '.join(missing)})")
    return Checkpoint(tensors["trainable.safetensors"], optimizer, tensors["extra.safetensors"], state)
