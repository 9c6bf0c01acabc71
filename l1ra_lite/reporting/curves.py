"""Training events -> the points of the curves a tracker draws.

Pure and backend-free: `Curves.point(event)` turns one event of l1ra_lite.events into
the scalars and histograms to record at its step, or None. TensorBoard and W&B sinks
write the same points, so both tools show the same curves under the same names:

    train/loss  train/lr  train/grad_norm  train/epoch  train/tokens_per_s
    memory/<kind>_gib (rss on a CPU; allocated, reserved, peak on CUDA)  memory/adapter_gib
    eval/loss  eval/perplexity
    rank/<module type> (total rank, at the start and after each reallocation)
    rank/total  rank/moved (ranks moved by a reallocation)  rank/realloc_seconds
    gates/<module type> (histogram of the gates, before each reallocation and at the end)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

from l1ra_lite.events import Evaluated, Event, GatesSampled, Reallocated, RunStarted, StepLogged
from l1ra_lite.ui.rank_views import ordered_types, rank_by_type

GIB = 1024**3


@dataclass
class Point:
    step: int
    scalars: dict[str, float] = field(default_factory=dict)
    histograms: dict[str, list[float]] = field(default_factory=dict)


def gates_by_type(gates: dict[str, tuple[float, ...]]) -> dict[str, list[float]]:
    """Module path -> gates  to  module type -> all its ranks' gates, in forward order."""
    grouped: dict[str, list[float]] = {}
    for path, values in gates.items():
        grouped.setdefault(path.rsplit(".", 1)[-1], []).extend(values)
    return {t: grouped[t] for t in ordered_types(grouped)}


def _finite(scalars: dict[str, float]) -> dict[str, float]:
    # A skipped (non-finite) step is counted by the loop; a NaN point would only break
    # the plot's scale.
    return {k: v for k, v in scalars.items() if math.isfinite(v)}


def step_point(e: StepLogged) -> Point:
    scalars = {
        "train/loss": e.loss,
        "train/lr": e.lr,
        "train/grad_norm": e.grad_norm,
        "train/epoch": e.epoch,
        "train/tokens_per_s": e.tokens_per_s,
        "memory/adapter_gib": e.adapter_bytes / GIB,
        "rank/total": float(e.rank_total),
    }
    for kind in ("rss", "allocated", "reserved", "peak"):
        value = getattr(e.memory, kind)
        if value:
            scalars[f"memory/{kind}_gib"] = value / GIB
    if e.skipped_steps:
        scalars["train/skipped_steps"] = float(e.skipped_steps)
    return Point(e.step, _finite(scalars))


def ranks_point(step: int, ranks: dict[str, int]) -> Point:
    return Point(step, {f"rank/{mtype}": float(total) for mtype, total in rank_by_type(ranks).items()})


def point_of(event: Event) -> Optional[Point]:
    """The point an event adds to the curves, None for events that add none."""
    if isinstance(event, StepLogged):
        return step_point(event)
    if isinstance(event, Evaluated):
        return Point(event.step, _finite({"eval/loss": event.eval_loss, "eval/perplexity": event.eval_ppl}))
    if isinstance(event, Reallocated):
        point = ranks_point(event.step, event.ranks)
        point.scalars["rank/moved"] = float(sum(event.pruned.values()))
        point.scalars["rank/realloc_seconds"] = event.seconds
        return point
    if isinstance(event, GatesSampled):
        return Point(event.step, histograms={f"gates/{t}": v for t, v in gates_by_type(event.gates).items()})
    if isinstance(event, RunStarted) and event.start_step == 0:
        # A resumed run's ranks at its start step were recorded by the run it continues.
        return ranks_point(0, event.ranks)
    return None
