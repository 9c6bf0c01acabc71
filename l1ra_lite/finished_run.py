"""Read a finished run folder: what the base model was and where the adapter lies (for
export and generate; the training loop writes the folder, l1ra_lite.train.run_folder).

A run is finished once `adapter/` exists (see docs/CONTRACTS.md). The base is the
16-bit model the run was loaded from: a local folder, or a hub id resolved through the
local Hugging Face cache.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from l1ra_lite.errors import UserError
from l1ra_lite.models import QUANT_CHOICES  # a light import: torch loads inside its functions
from l1ra_lite.peft_adapter import ADAPTER_CONFIG


@dataclass
class RunInfo:
    run_dir: Path
    adapter_dir: Path
    base_dir: Path  # local folder holding the base's config.json and safetensors
    quant: str  # one of QUANT_CHOICES: how the base was loaded during training
    compute_dtype: str  # "bfloat16" | "float32"
    trust_remote_code: bool
    model_type: str

    @property
    def tokenizer_dir(self) -> Path:
        """Where the tokenizer and chat template of the run live (the adapter, else the base)."""
        if (self.adapter_dir / "tokenizer_config.json").is_file():
            return self.adapter_dir
        return self.base_dir


def read_run(run_dir: str | Path) -> RunInfo:
    """Check that `run_dir` is a finished run and return what export and generate need from it."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir} is not a folder (expected a finished run folder like runs/<name>)")
    config_path = run_dir / "config.json"
    adapter_dir = run_dir / "adapter"
    if not config_path.is_file():
        raise UserError(f"{run_dir} is not a run folder: it has no config.json")
    if not (adapter_dir / ADAPTER_CONFIG).is_file():
        raise UserError(
            f"{run_dir} is not a finished run: it has no adapter/ (training did not finish; "
            f"resume it with `l1ra-lite finetune --resume {run_dir}`)"
        )
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{config_path} is not valid JSON: {err}") from None
    if "base_model_path" not in config:
        raise UserError(f"{config_path} has no 'base_model_path': not a run folder written by l1ra-lite")
    quant = config.get("quant", "nf4")
    if quant not in QUANT_CHOICES:
        raise UserError(f"{config_path}: unknown quant {quant!r} (expected {' or '.join(QUANT_CHOICES)})")
    compute_dtype = config.get("compute_dtype", "bfloat16")
    if compute_dtype not in ("bfloat16", "float32", "float16"):
        raise UserError(f"{config_path}: unknown compute_dtype {compute_dtype!r}")
    trust_remote_code = bool(config.get("trust_remote_code", False))
    base_dir = resolve_base_dir(str(config["base_model_path"]))
    model_type = config.get("model_type") or _model_type_of(base_dir)
    return RunInfo(
        run_dir=run_dir,
        adapter_dir=adapter_dir,
        base_dir=base_dir,
        quant=quant,
        compute_dtype=compute_dtype,
        trust_remote_code=trust_remote_code,
        model_type=model_type,
    )


def resolve_base_dir(base_model_path: str) -> Path:
    """A local folder with the base's config.json: the path itself, or the hub cache's copy."""
    local = Path(base_model_path).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise UserError(f"the base model folder {local} has no config.json")
        return local
    try:
        from huggingface_hub import snapshot_download

        folder = snapshot_download(
            base_model_path,
            allow_patterns=["*.json", "*.safetensors", "*.jinja", "tokenizer.model", "*.txt"],
        )
    except Exception as err:  # offline, unknown repo, no access: all mean "cannot find it"
        raise UserError(
            f"cannot find the base model {base_model_path!r}: not a local folder and not "
            f"in the Hugging Face cache or hub ({type(err).__name__})"
        ) from None
    return Path(folder)


def _model_type_of(base_dir: Path) -> str:
    config = json.loads((base_dir / "config.json").read_text(encoding="utf-8"))
    return str(config.get("model_type", ""))
