"""Turn the run folders of a benchmark into figures, ratios and target checks.

Pure functions over what `l1ra-lite finetune` writes (metrics.jsonl, ranks.json) and
the peak memory the benchmark measured for each child process; no torch, no timing.
bench/run.py launches the runs and calls these; tests/test_bench.py checks them on
fixture metrics.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

# The targets: (figure key, bound, "max" = value must be <= bound).
TARGETS = {
    "step_time_l1ra_over_lora": 1.05,
    "realloc_over_step": 0.5,
    "trainable_state_l1ra_over_adalora": 0.85,
    "peak_memory_l1ra_over_lora": 1.02,
}


@dataclass
class MethodFigures:
    """One method's run, reduced to the figures the benchmark compares."""

    method: str
    steps: int  # optimiser steps logged
    timed_steps: int  # steps after the warm-up
    median_step_s: float  # training step (a reallocation's own time taken out), after the warm-up
    mean_step_s: float  # after the warm-up, reallocations included (the amortised cost)
    median_tokens_per_s: float
    reallocations: int
    median_realloc_s: Optional[float]
    trainable_state_bytes: int  # at the end: adapter params + grads + optimiser state (+ AdaLoRA scores)
    peak_bytes: Optional[int]  # peak RSS of the run (CPU) or max_memory_allocated (CUDA)
    peak_source: str  # "child_rusage" | "metrics_peak_bytes" | "none"
    train_mem_max_bytes: Optional[int]  # largest mem_bytes logged during training (RSS / allocated)
    eval_loss: Optional[float]  # the last evaluation
    eval_ppl: Optional[float]
    eval_curve: list[tuple[int, float]] = field(default_factory=list)  # (step, eval_loss)
    rank_total: int = 0
    ranks_by_type: dict[str, int] = field(default_factory=dict)  # module type -> total rank
    wall_s: Optional[float] = None  # the whole child process, loading included
    process_cpu_s: Optional[float] = None  # CPU time of the whole child (user + system)
    median_step_cpu_s: Optional[float] = None  # when the loop logs step_cpu_s: CPU time of a step
    step_times: dict[int, float] = field(default_factory=dict)  # step -> training step seconds (paired ratios)

    @property
    def realloc_fraction(self) -> Optional[float]:
        """One reallocation as a share of a median step."""
        if self.median_realloc_s is None:
            return None
        return ratio(self.median_realloc_s, self.median_step_s)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["realloc_fraction"] = self.realloc_fraction
        out["eval_curve"] = [list(point) for point in self.eval_curve]
        out["step_times"] = [[step, s] for step, s in sorted(self.step_times.items())]
        return out


# ---------------------------------------------------------------- reading a run folder


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The metric lines of a run, in order; lines that are not JSON objects are skipped."""
    lines = []
    for raw in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            line = json.loads(raw)
        except ValueError:
            continue
        if isinstance(line, dict) and "step" in line:
            lines.append(line)
    return lines


def read_final_ranks(path: Path) -> dict[str, int]:
    """module path -> rank at the end, from ranks.json."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    return {k: int(v) for k, v in data["ranks"].items()}


# ---------------------------------------------------------------- one method


def ranks_by_type(ranks: dict[str, int]) -> dict[str, int]:
    """Total rank per module type (the last component of the path), sorted by name."""
    totals: dict[str, int] = {}
    for path, rank in ranks.items():
        kind = path.rsplit(".", 1)[-1]
        totals[kind] = totals.get(kind, 0) + rank
    return dict(sorted(totals.items()))


def method_figures(
    method: str,
    metrics: list[dict[str, Any]],
    ranks: dict[str, int],
    child_peak_bytes: Optional[int] = None,
    warmup_steps: int = 2,
    wall_s: Optional[float] = None,
    process_cpu_s: Optional[float] = None,
) -> MethodFigures:
    """Reduce one run's metric lines to its figures.

    The first `warmup_steps` steps are left out of the step-time figures (allocator,
    autotuning and cache warm-up). A step's training time is its `step_s` less the
    reallocation it carried (`realloc_s`), so that the reallocation is measured once, on
    its own (`median_realloc_s`), and every method is timed on the same steps, hence
    the same batches (batch lengths vary: comparing medians over different steps
    would compare different work). `mean_step_s` keeps the reallocations in: the cost
    per step averaged over the run.

    `step_cpu_s` (CPU time of the step's process), where the loop logs it, gives a
    step figure that other jobs on a shared machine disturb far less than wall time.

    Peak memory: the `peak_bytes` the run logs itself wins (its resident high-water mark
    on CPU, max_memory_allocated on CUDA); otherwise the peak resident set of the child
    measured by the parent (which can include the parent's own size).
    """
    if not metrics:
        raise ValueError(f"{method}: no metric lines")
    after_warmup = [m for m in metrics if m["step"] > warmup_steps and "step_s" in m]
    if not after_warmup:
        raise ValueError(f"{method}: no step after the first {warmup_steps} (run more steps)")
    step_times = {m["step"]: m["step_s"] - m.get("realloc_s", 0.0) for m in after_warmup}
    reallocs = [m["realloc_s"] for m in metrics if "realloc_s" in m]
    evals = [(m["step"], m["eval_loss"]) for m in metrics if "eval_loss" in m]
    last_eval = next((m for m in reversed(metrics) if "eval_loss" in m), None)
    mem = [m["mem_bytes"] for m in metrics if m.get("mem_bytes")]
    logged_peaks = [m["peak_bytes"] for m in metrics if m.get("peak_bytes")]
    if logged_peaks:
        peak, source = max(logged_peaks), "metrics_peak_bytes"
    elif child_peak_bytes:
        peak, source = child_peak_bytes, "child_rusage"
    else:
        peak, source = None, "none"
    cpu_times = [m["step_cpu_s"] - m.get("realloc_s", 0.0) for m in after_warmup if "step_cpu_s" in m]
    return MethodFigures(
        method=method,
        steps=len(metrics),
        timed_steps=len(after_warmup),
        median_step_s=statistics.median(step_times.values()),
        mean_step_s=statistics.fmean(m["step_s"] for m in after_warmup),
        median_tokens_per_s=statistics.median(m["tokens_per_s"] for m in after_warmup if "tokens_per_s" in m)
        if any("tokens_per_s" in m for m in after_warmup)
        else 0.0,
        reallocations=len(reallocs),
        median_realloc_s=statistics.median(reallocs) if reallocs else None,
        trainable_state_bytes=int(metrics[-1].get("adapter_bytes", 0)),
        peak_bytes=peak,
        peak_source=source,
        train_mem_max_bytes=max(mem) if mem else None,
        eval_loss=last_eval["eval_loss"] if last_eval else None,
        eval_ppl=last_eval.get("eval_ppl") if last_eval else None,
        eval_curve=evals,
        rank_total=sum(ranks.values()),
        ranks_by_type=ranks_by_type(ranks),
        wall_s=wall_s,
        process_cpu_s=process_cpu_s,
        median_step_cpu_s=statistics.median(cpu_times) if cpu_times else None,
        step_times=step_times,
    )


# ---------------------------------------------------------------- side by side


def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    if a is None or b is None or b == 0:
        return None
    return a / b


def paired_ratio(a: Optional[MethodFigures], b: Optional[MethodFigures]) -> Optional[float]:
    """Median over the steps both runs timed of a's step time / b's: the same batch in
    each pair, so batch lengths and slow drifts of the machine cancel out."""
    if a is None or b is None:
        return None
    common = sorted(set(a.step_times) & set(b.step_times))
    ratios = [a.step_times[s] / b.step_times[s] for s in common if b.step_times[s] > 0]
    return statistics.median(ratios) if ratios else None


def compare(figures: dict[str, MethodFigures]) -> dict[str, Optional[float]]:
    """The ratios the issue asks for (None where a method is missing). Step time: the
    paired median ratio (see paired_ratio); the ratio of the medians is kept beside it."""
    l1ra, lora, adalora = (figures.get(m) for m in ("l1ra", "lora", "adalora"))

    def get(f: Optional[MethodFigures], name: str) -> Optional[float]:
        return None if f is None else getattr(f, name)

    return {
        "step_time_l1ra_over_lora": paired_ratio(l1ra, lora),
        "step_time_adalora_over_lora": paired_ratio(adalora, lora),
        "median_step_l1ra_over_lora": ratio(get(l1ra, "median_step_s"), get(lora, "median_step_s")),
        "median_step_adalora_over_lora": ratio(get(adalora, "median_step_s"), get(lora, "median_step_s")),
        "mean_step_time_l1ra_over_lora": ratio(get(l1ra, "mean_step_s"), get(lora, "mean_step_s")),
        "step_cpu_time_l1ra_over_lora": ratio(get(l1ra, "median_step_cpu_s"), get(lora, "median_step_cpu_s")),
        "process_cpu_time_l1ra_over_lora": ratio(get(l1ra, "process_cpu_s"), get(lora, "process_cpu_s")),
        "realloc_over_step": get(l1ra, "realloc_fraction"),
        "trainable_state_l1ra_over_adalora": ratio(
            get(l1ra, "trainable_state_bytes"), get(adalora, "trainable_state_bytes")
        ),
        "trainable_state_l1ra_over_lora": ratio(get(l1ra, "trainable_state_bytes"), get(lora, "trainable_state_bytes")),
        "peak_memory_l1ra_over_lora": ratio(get(l1ra, "peak_bytes"), get(lora, "peak_bytes")),
        "train_memory_l1ra_over_lora": ratio(get(l1ra, "train_mem_max_bytes"), get(lora, "train_mem_max_bytes")),
        "eval_loss_l1ra_minus_lora": None
        if get(l1ra, "eval_loss") is None or get(lora, "eval_loss") is None
        else l1ra.eval_loss - lora.eval_loss,
    }


def check_targets(ratios: dict[str, Optional[float]], full_run: bool) -> dict[str, dict[str, Any]]:
    """Each target: its value, its bound and whether it is met (None: not measured).

    The eval-loss target (L1RA <= LoRA) is judged on the full run only: a quick run is
    too short for the losses to separate.
    """
    checks = {}
    for key, bound in TARGETS.items():
        value = ratios.get(key)
        checks[key] = {"value": value, "max": bound, "met": None if value is None else value <= bound}
    diff = ratios.get("eval_loss_l1ra_minus_lora")
    checks["eval_loss_l1ra_minus_lora"] = {
        "value": diff,
        "max": 0.0,
        "met": None if diff is None or not full_run else diff <= 0.0,
    }
    return checks


def results_document(
    settings: dict[str, Any], machine: dict[str, Any], figures: dict[str, MethodFigures], full_run: bool
) -> dict[str, Any]:
    """Everything bench/results.json holds (see bench/README.md)."""
    ratios = compare(figures)
    return {
        "settings": settings,
        "machine": machine,
        "methods": {m: f.to_dict() for m, f in figures.items()},
        "ratios": ratios,
        "targets": check_targets(ratios, full_run),
    }
