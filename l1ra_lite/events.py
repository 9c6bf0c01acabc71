"""What the training loop reports while it runs.

The loop calls `report(event)` with one of these dataclasses; the dashboard, the plain
logger, the metrics file and the trackers (l1ra_lite.reporting) only read them. Nothing here drives training.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Union


@dataclass(frozen=True)
class MemoryStats:
    """Memory in bytes. On CUDA: allocated / reserved / peak allocated and the card's
    total; on CPU only `rss` (the process's resident set) is set."""

    device: str  # "cuda" or "cpu"
    rss: int = 0
    allocated: int = 0
    reserved: int = 0
    peak: int = 0
    total: int = 0


@dataclass(frozen=True)
class RunStarted:
    model: str  # what the user asked for (alias, hub id or folder)
    method: str  # "l1ra", "lora" or "adalora"
    output_dir: str
    total_steps: int  # optimiser steps
    steps_per_epoch: int
    budget: int  # total rank
    ranks: dict[str, int]  # full module path -> rank at the start
    update_every: int  # optimiser steps between reallocations (0: never)
    next_update: Optional[int]  # step of the first reallocation from here, None when none will happen
    device: str
    start_step: int = 0  # > 0 when resuming
    notes: tuple[str, ...] = ()  # about the data, worth the user's attention (DataStats.notes)


@dataclass(frozen=True)
class StepLogged:
    step: int  # optimiser steps done
    total_steps: int
    epoch: float
    loss: float
    lr: float
    grad_norm: float
    tokens_per_s: float
    elapsed_s: float
    memory: MemoryStats
    adapter_bytes: int  # adapter parameters + gradients + optimiser state
    rank_total: int
    skipped_steps: int = 0  # steps dropped for a non-finite loss or gradient


@dataclass(frozen=True)
class Reallocated:
    step: int
    budget: int
    pruned: dict[str, int]  # module path -> ranks removed (only modules that changed)
    added: dict[str, int]  # module path -> ranks added
    ranks: dict[str, int]  # module path -> rank after the event (all modules)
    next_update: Optional[int]  # step of the next reallocation, None when none is left
    seconds: float  # time the reallocation took


@dataclass(frozen=True)
class GatesSampled:
    """Every rank's gate value, for the trackers' histograms (methods without gates send none)."""

    step: int
    gates: dict[str, tuple[float, ...]]  # module path -> its ranks' gates


@dataclass(frozen=True)
class Evaluated:
    step: int
    eval_loss: float
    eval_ppl: float


@dataclass(frozen=True)
class CheckpointSaved:
    step: int
    path: str


@dataclass(frozen=True)
class RunFinished:
    step: int
    output_dir: str
    adapter_dir: str
    interrupted: bool = False  # True when stopped by a signal before the last step
    rank_summary: str = ""  # what moved over the run, or why nothing did


Event = Union[RunStarted, StepLogged, Reallocated, GatesSampled, Evaluated, CheckpointSaved, RunFinished]
Reporter = Callable[[Event], None]
