"""The training loop and its parts.

loop.py        setup_run -> fit -> finish; `train` runs all three
step.py        one optimiser step and one evaluation pass
schedule.py    run length, warmup, LR, when to reallocate / evaluate / save
measure.py     memory and trainable-state bytes
run_folder.py  config.json, metrics.jsonl, the resume fingerprint, adapter/
distributed.py several processes (torchrun / accelerate launch): gradient sum, shards, in-step check
"""

from l1ra_lite.train.loop import Diverged, Interrupted, OutOfMemory, is_out_of_memory, run_dtype, train
from l1ra_lite.train.measure import free_memory_note, memory_stats, reset_peak_memory
from l1ra_lite.train.schedule import Schedule, lr_at, plan_schedule
from l1ra_lite.train.step import evaluate, optimizer_step

__all__ = [
    "Diverged",
    "Interrupted",
    "OutOfMemory",
    "Schedule",
    "evaluate",
    "free_memory_note",
    "is_out_of_memory",
    "lr_at",
    "memory_stats",
    "optimizer_step",
    "plan_schedule",
    "reset_peak_memory",
    "run_dtype",
    "train",
]
