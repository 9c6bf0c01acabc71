"""Put L1RA adapters on the linear layers of a causal LM at a total rank budget."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from l1ra_lite.errors import UserError
from l1ra_lite.l1ra.layer import L1RALinear
from l1ra_lite.module_paths import layer_index, matches_target


def _is_linear(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return True
    try:  # bitsandbytes is optional at import time (e.g. a CPU box without it)
        import bitsandbytes as bnb

        return isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))
    except ImportError:
        return False


def find_targets(model: nn.Module, target_modules: Optional[Sequence[str]] = None) -> list[str]:
    """Full paths of the linear layers to adapt, in module order.

    Default: every linear layer inside the decoder blocks (paths with a layer index,
    like `model.layers.3.mlp.up_proj`), which leaves out lm_head and embeddings.
    With names: layers whose path is a name or ends with `.name` (peft's rule).
    """
    paths = []
    for path, module in model.named_modules():
        if not _is_linear(module) or isinstance(module, L1RALinear):
            continue
        if target_modules:
            if any(matches_target(path, name) for name in target_modules):
                paths.append(path)
        elif layer_index(path) is not None:
            paths.append(path)
    if not paths:
        wanted = ", ".join(target_modules) if target_modules else "the linear layers of the decoder blocks"
        raise UserError(f"no linear layer matches the target modules ({wanted})")
    return paths


RANKS_PER_ADAPTER = 8  # the default budget, per adapter


def default_budget(n_adapters: int) -> int:
    """The total rank when the user gives none."""
    return RANKS_PER_ADAPTER * n_adapters


def even_split(budget: int, n_adapters: int) -> list[int]:
    """The budget spread evenly; the remainder goes one each to the first adapters."""
    base, extra = divmod(budget, n_adapters)
    return [base + (1 if i < extra else 0) for i in range(n_adapters)]


def initial_ranks(budget: int, n_adapters: int) -> list[int]:
    """The ranks a run starts with (`even_split`); a UserError for a budget that cannot
    give every adapter one rank."""
    if budget <= 0:
        raise UserError(f"the rank budget must be positive (got {budget})")
    if budget < n_adapters:
        raise UserError(
            f"a rank budget of {budget} is smaller than the number of adapters ({n_adapters}): "
            f"every adapter needs at least one rank, so use --budget {n_adapters} or more, "
            "or fewer --target-modules"
        )
    return even_split(budget, n_adapters)


def inject_adapters(
    model: nn.Module,
    budget: Optional[int] = None,
    target_modules: Optional[Sequence[str]] = None,
    alpha: Optional[float] = None,
    dropout: float = 0.0,
    seed: int = 0,
    ranks: Optional[dict[str, int]] = None,
) -> dict[str, L1RALinear]:
    """Freeze the model and replace each target linear layer by an L1RALinear.

    `budget` is the sum of ranks over all adapters (default: `default_budget`). The scale
    is the same for every adapter: s = alpha / r_mean, with alpha defaulting to r_mean
    (s = 1), so adapters that start at 2 and at 3 ranks are not scaled differently.
    `ranks` (path -> rank) rebuilds a saved allocation, e.g. to resume a run; the
    scale still follows the budget. Returns path -> adapter, in module order.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    paths = find_targets(model, target_modules)
    budget = default_budget(len(paths)) if budget is None else budget
    if ranks is None:
        rank_list = initial_ranks(budget, len(paths))
    else:
        missing = sorted(set(paths) ^ set(ranks))
        if missing:
            raise UserError(f"the saved ranks do not match this model's adapters (e.g. {missing[0]})")
        rank_list = [ranks[p] for p in paths]
    r_mean = budget / len(paths)
    scale = (alpha if alpha is not None else r_mean) / r_mean
    generator = torch.Generator().manual_seed(seed)
    adapters = {}
    for path, rank in zip(paths, rank_list):
        parent_path, _, name = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        adapter = L1RALinear(getattr(parent, name), rank, scale, dropout, generator)
        setattr(parent, name, adapter)
        adapters[path] = adapter
    return adapters


def adapter_parameters(adapters: dict[str, L1RALinear]) -> list[nn.Parameter]:
    return [p for a in adapters.values() for p in (a.lora_A, a.lora_B, a.gate)]
