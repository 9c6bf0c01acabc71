"""Start a run from the rank layout another run ended with (`--ranks-from`).

L1RA finds where rank is needed; with this a user trains at that layout from the first
step: stock LoRA at L1RA's layout for a plain adapter, or as the control that tells
whether the layout itself helps or the moving does. The layout is read from a run
folder's ranks.json as JSON.
"""

from __future__ import annotations

import json
from pathlib import Path

from l1ra_lite.errors import UserError


def read_rank_pattern(source: str) -> dict[str, int]:
    """module path -> rank, from a run folder (its ranks.json) or a ranks.json file."""
    file = Path(source) / "ranks.json" if Path(source).is_dir() else Path(source)
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"--ranks-from: {file} not found (give a finished run folder or its ranks.json)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"--ranks-from: cannot read {file}: {err}") from None
    ranks = data.get("ranks") if isinstance(data, dict) else None
    if not isinstance(ranks, dict) or not ranks or not all(_is_rank(r) for r in ranks.values()):
        raise UserError(f"--ranks-from: {file} has no 'ranks' object of module path -> rank (a whole number >= 1)")
    return ranks


def _is_rank(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def check_rank_pattern(ranks: dict[str, int], paths: list[str], budget: int, source: str) -> None:
    """The layout must name exactly the modules this run adapts and hold its budget."""
    missing = [p for p in paths if p not in ranks]
    extra = sorted(set(ranks) - set(paths))
    if missing or extra:
        example = (missing or extra)[0]
        raise UserError(
            f"--ranks-from {source}: its modules are not the ones this run adapts ({len(missing)} missing, "
            f"{len(extra)} extra, e.g. {example}); use the --model and --target-modules of that run"
        )
    total = sum(ranks.values())
    if total != budget:
        raise UserError(
            f"--ranks-from {source} holds {total} ranks but --budget is {budget}; leave --budget out to use {total}"
        )
