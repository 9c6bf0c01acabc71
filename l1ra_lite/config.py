"""The settings of a fine-tuning run, and how recipes (TOML files) supply them.

One dataclass holds every `finetune` option. Its field names are the recipe keys and,
with `-` for `_`, the command-line flags. Resolution order: defaults < recipe < flags.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser, from PyPI (a dependency there)
    import tomli as tomllib

from l1ra_lite.errors import UserError
from l1ra_lite.models import DTYPE_CHOICES, QUANT_CHOICES  # a light import: torch loads inside its functions

RECIPES_DIR = Path(__file__).parent / "recipes"


@dataclass
class FinetuneConfig:
    # what to train
    model: Optional[str] = None  # alias, hub id or folder; None: the embedded default
    data: Optional[str] = None  # file(s), folder or hub dataset, comma-separated to mix; None: the embedded default
    method: str = "l1ra"  # l1ra | lora | adalora
    quant: str = "nf4"  # nf4 | none
    dtype: str = "auto"  # auto | bf16 | fp16 | fp32; auto: bf16 where native, fp16 on older CUDA cards, else fp32
    target_modules: Optional[list[str]] = None  # None: every linear layer of the decoder blocks
    trust_remote_code: bool = False
    # rank
    budget: Optional[int] = None  # total rank; None: 8 x the number of adapters
    alpha: Optional[float] = None  # None: the mean initial rank (so the scale is 1)
    dropout: float = 0.0
    # L1RA gates
    l1_lambda: Union[str, float] = "auto"  # "auto": l1_kappa / (eta_c * total_steps)
    l1_kappa: float = 0.5  # total L1 shrink a gate can receive over the run, when auto
    eta_c: float = 2e-2  # learning rate of the gates (constant)
    update_every: float = 0.05  # reallocation interval: fraction of the run (<1) or steps
    realloc_rule: str = "paper"  # which ranks go: paper (gate below eta_c * lambda) | importance
    shrink_until: float = (
        1.0  # share of the run after which the L1 shrink and reallocations stop and the gates fold into B
    )
    ranks_from: Optional[str] = None  # a run folder (or its ranks.json) whose final ranks this run starts with
    log_gates: bool = False  # write every rank's gate, moments and age at each reallocation (gates/)
    # data
    seq_len: int = 512
    packing: bool = False
    eval_fraction: float = 0.05  # held-out share of the rows ...
    eval_max_rows: int = 200  # ... capped at this many
    skip_bad_rows: bool = False
    data_subset: Optional[str] = None  # a hub dataset's subset (configuration)
    data_files: Optional[str] = None  # files inside a hub dataset repo or dataset folder (path or glob)
    data_split: str = "train"
    eval_data: Optional[str] = None  # held-out rows from elsewhere, instead of a share of the training rows
    eval_split: str = "validation"  # the split of eval_data, when it is a hub dataset or folder
    chat_template: Optional[str] = None  # a Jinja file or a template name; None: the tokenizer's own
    streaming: bool = False  # make examples as training reads them (needs max_steps)
    num_proc: Optional[int] = None  # processes preparing the data; None: the CPU count, at most 8
    data_cache: Optional[str] = None  # prepared-data cache folder; None: $XDG_CACHE_HOME/l1ra-lite/data
    # optimisation
    max_steps: Optional[int] = None  # optimiser steps; wins over epochs
    epochs: float = 1.0
    batch_size: int = 4
    grad_accum: int = 4
    lr: float = 2e-4
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    warmup: float = 0.03  # fraction of the run (<1) or steps
    seed: int = 42
    # output
    output: Optional[str] = None  # None: runs/<model>-<date-time>
    eval_every: float = 0.25  # fraction of the run (<1) or steps; 0: only at the end
    save_every: float = 0.25  # fraction of the run (<1) or steps; 0: only at the end
    keep_checkpoints: int = 2
    log_every: int = 1
    plain: bool = False
    report_to: str = "none"  # none | tensorboard | wandb | all: trackers that also get the curves

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


METHOD_CHOICES = ("l1ra", "lora", "adalora")  # l1ra_lite.methods.METHODS has one entry each
CHOICES = {
    "method": METHOD_CHOICES,
    "quant": QUANT_CHOICES,
    "dtype": DTYPE_CHOICES,
    "realloc_rule": ("paper", "importance"),
    "report_to": ("none", "tensorboard", "wandb", "all"),  # l1ra_lite.reporting
}
FIELD_NAMES = tuple(f.name for f in dataclasses.fields(FinetuneConfig))


def steps_from(value: float, total_steps: int) -> int:
    """A fraction of the run when below 1, a count of optimiser steps otherwise."""
    if value < 0:
        raise UserError(f"a step interval cannot be negative (got {value})")
    if value == 0:
        return 0
    if value < 1:
        return max(1, round(value * total_steps))
    return int(value)


def resolve_l1_lambda(config: FinetuneConfig, total_steps: int) -> float:
    """'auto': the penalty follows the length of the shrink window (the whole run unless
    --shrink-until ends it earlier), lambda = kappa / (eta_c * steps): kappa is then the
    most the L1 shrink alone can take off a gate."""
    if config.l1_lambda == "auto":
        return config.l1_kappa / (config.eta_c * shrink_steps(config, total_steps))
    return float(config.l1_lambda)


def shrink_steps(config: FinetuneConfig, total_steps: int) -> int:
    """The optimiser steps of the shrink window (--shrink-until x the run)."""
    return max(1, round(config.shrink_until * total_steps))


def find_recipe(name_or_path: str) -> Path:
    """A path to a TOML file, or the name of one shipped in the package's recipes/."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    for candidate in (RECIPES_DIR / name_or_path, RECIPES_DIR / f"{name_or_path}.toml"):
        if candidate.is_file():
            return candidate
    known = ", ".join(sorted(p.stem for p in RECIPES_DIR.glob("*.toml"))) or "none"
    raise UserError(f"recipe {name_or_path!r} not found (a .toml path, or one of: {known})")


def read_recipe(name_or_path: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(finetune keys, [meta] table) of a recipe; parsed as data, never executed."""
    path = find_recipe(name_or_path)
    try:
        table = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        raise UserError(f"cannot read recipe {path}: {err}") from None
    meta = table.pop("meta", {})
    unknown = sorted(set(table) - set(FIELD_NAMES))
    if unknown:
        raise UserError(
            f"recipe {path}: unknown key(s) {', '.join(unknown)}; "
            f"valid keys are the finetune options: {', '.join(FIELD_NAMES)}"
        )
    if not isinstance(meta, dict):
        raise UserError(f"recipe {path}: [meta] must be a table")
    return table, meta


def build_config(recipe: Optional[str], overrides: dict[str, Any]) -> FinetuneConfig:
    """Defaults, then the recipe, then the flags the user gave (`overrides`)."""
    values: dict[str, Any] = {}
    if recipe:
        values.update(read_recipe(recipe)[0])
    values.update({k: v for k, v in overrides.items() if v is not None})
    config = FinetuneConfig(**values)
    validate(config)
    return config


def validate(config: FinetuneConfig) -> None:
    for key, allowed in CHOICES.items():
        if getattr(config, key) not in allowed:
            raise UserError(f"{key} must be one of {', '.join(allowed)} (got {getattr(config, key)!r})")
    if isinstance(config.l1_lambda, str):
        if config.l1_lambda != "auto":
            try:
                config.l1_lambda = float(config.l1_lambda)
            except ValueError:
                raise UserError(f"l1_lambda must be 'auto' or a number (got {config.l1_lambda!r})") from None
    positive = ("seq_len", "batch_size", "grad_accum", "lr", "eta_c", "epochs", "log_every")
    for key in positive:
        if not getattr(config, key) > 0:
            raise UserError(f"{key.replace('_', '-')} must be positive (got {getattr(config, key)})")
    non_negative = (
        "weight_decay",
        "max_grad_norm",
        "eval_max_rows",
        "warmup",
        "update_every",
        "eval_every",
        "save_every",
    )
    for key in non_negative:
        if getattr(config, key) < 0:
            raise UserError(f"{key.replace('_', '-')} cannot be negative (got {getattr(config, key)})")
    if not config.l1_kappa > 0 or (config.l1_lambda != "auto" and not config.l1_lambda > 0):
        raise UserError(f"l1-lambda and l1-kappa must be positive (got {config.l1_lambda}, {config.l1_kappa})")
    if config.max_steps is not None and config.max_steps <= 0:
        raise UserError(f"max-steps must be positive (got {config.max_steps})")
    if config.budget is not None and config.budget <= 0:
        raise UserError(f"budget must be positive (got {config.budget})")
    if not 0 <= config.dropout < 1:
        raise UserError(f"dropout must be in [0, 1) (got {config.dropout})")
    if config.keep_checkpoints < 1:
        raise UserError(f"keep-checkpoints must be at least 1 (got {config.keep_checkpoints})")
    if not 0 < config.shrink_until <= 1:
        raise UserError(f"shrink-until must be in (0, 1] (got {config.shrink_until})")
    if config.ranks_from and config.method == "adalora":
        raise UserError("ranks-from applies to --method l1ra or lora (AdaLoRA sets its own ranks)")
    if not 0 <= config.eval_fraction < 1:
        raise UserError(f"eval-fraction must be in [0, 1) (got {config.eval_fraction})")
    if isinstance(config.data, (list, tuple)):  # repeated --data, or a list in a recipe: one comma list
        config.data = ",".join(str(item) for item in config.data)
    if config.streaming and not config.max_steps:
        raise UserError("--streaming needs --max-steps: the length of a streamed dataset is not known up front")
    if config.num_proc is not None and config.num_proc < 1:
        raise UserError(f"num-proc must be at least 1 (got {config.num_proc})")
    if isinstance(config.target_modules, str):
        config.target_modules = [m.strip() for m in config.target_modules.split(",") if m.strip()]
