"""When things happen in a run: its length, warmup, the learning rate, and the steps at
which rank is reallocated, the model evaluated and a checkpoint written. All step counts
are optimiser steps (after gradient accumulation)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from l1ra_lite.config import FinetuneConfig, shrink_steps, steps_from


@dataclass(frozen=True)
class Schedule:
    total_steps: int
    steps_per_epoch: int
    examples_per_step: int  # processes x batch_size x grad_accum: the global batch
    warmup_steps: int
    update_every: int  # steps between reallocations (L1RA) or AdaLoRA's deltaT; 0: none
    eval_every: int  # 0: only at the end
    save_every: int  # 0: only at the end
    update_until: int = 0  # reallocations happen before this step (the shrink window's end); 0: the run's end

    @property
    def last_update_bound(self) -> int:
        return self.update_until or self.total_steps

    @property
    def first_update(self) -> int:
        """The first step at which a reallocation may happen (after warmup, never step 0)."""
        if not self.update_every:
            return 0
        return (self.warmup_steps // self.update_every + 1) * self.update_every

    def reallocates_at(self, step: int) -> bool:
        return (
            bool(self.update_every)
            and step >= self.first_update
            and step % self.update_every == 0
            and step < self.last_update_bound
        )

    def next_update(self, step: int) -> Optional[int]:
        if not self.update_every:
            return None
        nxt = max(self.first_update, (step // self.update_every + 1) * self.update_every)
        return nxt if nxt < self.last_update_bound else None


def plan_schedule(config: FinetuneConfig, n_train_examples: int, processes: int = 1) -> Schedule:
    per_step = processes * config.batch_size * config.grad_accum
    total = config.max_steps or max(1, math.ceil(config.epochs * n_train_examples / per_step))
    return Schedule(
        total_steps=total,
        steps_per_epoch=max(1, math.ceil(n_train_examples / per_step)),
        examples_per_step=per_step,
        warmup_steps=steps_from(config.warmup, total),
        update_every=steps_from(config.update_every, total),
        eval_every=steps_from(config.eval_every, total),
        save_every=steps_from(config.save_every, total),
        update_until=shrink_steps(config, total) if config.shrink_until < 1 else 0,
    )


def lr_at(step: int, schedule: Schedule, peak: float) -> float:
    """Linear warmup to `peak`, then cosine decay to 0; `step` counts steps already taken."""
    if step < schedule.warmup_steps:
        return peak * (step + 1) / schedule.warmup_steps
    progress = (step - schedule.warmup_steps) / max(1, schedule.total_steps - schedule.warmup_steps)
    return peak * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
