"""L1RA against stock peft LoRA and AdaLoRA on the same work: speed, memory, quality.

    python bench/run.py --quick      # a couple of minutes on 2 CPU cores
    python bench/run.py              # the full run: a few hundred steps, eval losses separate

Each method trains the same base model (4-bit by default) on the same data, seed, data
order, number of steps and total rank, in its own `l1ra-lite finetune` process (so
that peak memory, a high-water mark, belongs to one method). The figures are read back
from the run folders, printed as one table and written to bench/results.json; the
fields are described in bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

# Runnable as a script (`python bench/run.py`): make the repository root importable.
REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from bench.summary import MethodFigures, method_figures, read_final_ranks, read_metrics, results_document  # noqa: E402

METHODS = ("lora", "l1ra", "adalora")
# Each method at its own learning rate and alpha (issue 19), chosen by bench/lr_sweep.py on
# a validation split carved from the training rows (bench/README.md, "Learning rate and
# alpha per method"). alpha None: finetune's default, the mean rank (scale 1), as the L1RA
# paper and peft's LoRA defaults run it; AdaLoRA's 16 is its authors' (l1ra_lite.baselines
# .ADALORA_ALPHA, with the sources). The sweep (300 steps, seed 42, 2e-4 to 2e-2): LoRA and
# L1RA are best at 5e-3 (2e-3 and 1e-2 worse for both); AdaLoRA at 1e-2 (0.9648), level
# with 5e-3 (0.9663), worse at 2e-2 (0.9913).
METHOD_DEFAULTS: dict[str, dict[str, Optional[float]]] = {
    "lora": {"lr": 5e-3, "alpha": None},
    "l1ra": {"lr": 5e-3, "alpha": None},
    "adalora": {"lr": 1e-2, "alpha": 16.0},
}
# quick: a couple of minutes on 2 cores; full: long enough for the eval losses to separate.
MODES = {
    "quick": {"steps": 16, "seq_len": 128, "batch_size": 4, "update_every": 4, "eval_every": 0, "eval_max_rows": 48},
    "full": {"steps": 300, "seq_len": 256, "batch_size": 4, "update_every": 15, "eval_every": 75, "eval_max_rows": 200},
}


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="a short run (16 steps, seq 128): a couple of minutes")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated, from lora,l1ra,adalora")
    p.add_argument("--model", help="base model (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--data", help="training data (default: the embedded chatterbot corpus)")
    p.add_argument("--quant", default="nf4", choices=("nf4", "none"))
    p.add_argument(
        "--ranks-per-adapter",
        type=int,
        default=4,
        help="budget = this x the number of adapters, so all methods have equal totals (default 4)",
    )
    p.add_argument("--budget", type=int, help="total rank (must be a multiple of the number of adapters)")
    p.add_argument("--steps", type=int, help="optimiser steps (default: 16 quick, 300 full)")
    p.add_argument("--seq-len", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--update-every", type=int, help="L1RA reallocation interval in steps")
    p.add_argument(
        "--lr",
        action="append",
        default=[],
        metavar="METHOD=LR",
        help="a method's learning rate instead of its default (repeatable; defaults: "
        + ", ".join(f"{m} {d['lr']:g}" for m, d in METHOD_DEFAULTS.items())
        + ")",
    )
    p.add_argument(
        "--alpha",
        action="append",
        default=[],
        metavar="METHOD=ALPHA",
        help="a method's lora_alpha instead of its default (repeatable; defaults: adalora 16, others the mean rank)",
    )
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--warmup-skip", type=int, default=2, help="first steps left out of the medians (default 2)")
    p.add_argument("--results", default=str(REPO_ROOT / "bench" / "results.json"), help="where to write the JSON")
    p.add_argument("--runs-dir", help="keep the run folders here (default: a temporary folder, removed)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds allowed to each method's process")
    p.add_argument(
        "--threads",
        type=int,
        help="CPU threads of each run (OMP/MKL_NUM_THREADS; default: torch's own choice). "
        "On a machine shared with other jobs, 1 avoids OpenMP threads spinning for a "
        "descheduled partner, which can make steps many times slower",
    )
    return p.parse_args(argv)


# ---------------------------------------------------------------- settings


def count_adapters(model: Optional[str]) -> int:
    """Adapters the default injection puts on this model (its config only, no weights)."""
    from l1ra_lite.estimate import model_shape, resolve_model_config

    return len(model_shape(resolve_model_config(model)).adapted)


def method_settings(lr_args: list[str], alpha_args: list[str]) -> dict[str, dict[str, Optional[float]]]:
    """Each method's lr and alpha: METHOD_DEFAULTS with the `METHOD=VALUE` overrides."""
    out = {m: dict(d) for m, d in METHOD_DEFAULTS.items()}
    for key, given in (("lr", lr_args), ("alpha", alpha_args)):
        for item in given:
            method, _, value = item.partition("=")
            method = method.strip()
            if method not in out:
                raise SystemExit(
                    f"bench: --{key} {item!r}: unknown method {method!r}; choose from {', '.join(METHODS)}"
                )
            try:
                number = float(value)
            except ValueError:
                raise SystemExit(f"bench: --{key} takes METHOD=NUMBER (got {item!r})") from None
            if not number > 0:
                raise SystemExit(f"bench: --{key} {item!r}: must be positive")
            out[method][key] = number
    return out


def bench_settings(args: argparse.Namespace, n_adapters: int) -> dict[str, Any]:
    mode = "quick" if args.quick else "full"
    defaults = MODES[mode]
    budget = args.budget if args.budget is not None else args.ranks_per_adapter * n_adapters
    if budget % n_adapters:
        raise SystemExit(
            f"bench: budget {budget} is not a multiple of the {n_adapters} adapters; "
            f"the methods would not get equal totals (try {n_adapters * max(1, budget // n_adapters)})"
        )
    return {
        "mode": mode,
        "model": args.model,
        "data": args.data,
        "quant": args.quant,
        "budget": budget,
        "n_adapters": n_adapters,
        "steps": args.steps or defaults["steps"],
        "seq_len": args.seq_len or defaults["seq_len"],
        "batch_size": args.batch_size or defaults["batch_size"],
        "grad_accum": 1,
        "update_every": args.update_every or defaults["update_every"],
        "eval_every": defaults["eval_every"],
        "eval_max_rows": defaults["eval_max_rows"],
        "seed": args.seed,
        "warmup_skip": args.warmup_skip,
        "method_settings": method_settings(getattr(args, "lr", []), getattr(args, "alpha", [])),
    }


def finetune_command(method: str, settings: dict[str, Any], run_dir: Path) -> list[str]:
    """The `l1ra-lite finetune` command line of one method; everything but the method and its
    own learning rate and alpha is shared."""
    cmd = [
        sys.executable,
        "-m",
        "l1ra_lite",
        "finetune",
        "--method",
        method,
        "--quant",
        settings["quant"],
        "--budget",
        str(settings["budget"]),
        "--max-steps",
        str(settings["steps"]),
        "--seq-len",
        str(settings["seq_len"]),
        "--batch-size",
        str(settings["batch_size"]),
        "--grad-accum",
        str(settings["grad_accum"]),
        "--update-every",
        str(settings["update_every"]),
        "--eval-every",
        str(settings["eval_every"]),
        "--eval-max-rows",
        str(settings["eval_max_rows"]),
        "--save-every",
        "0",  # one checkpoint at the end: no disk writes inside the timed part
        "--keep-checkpoints",
        "1",
        "--seed",
        str(settings["seed"]),
        "--plain",
        "--output",
        str(run_dir),
    ]
    for key in ("model", "data"):
        if settings[key]:
            cmd += [f"--{key}", settings[key]]
    own = settings.get("method_settings", {}).get(method, {})
    for key in ("lr", "alpha"):
        if own.get(key) is not None:
            cmd += [f"--{key}", repr(float(own[key]))]
    return cmd


# ---------------------------------------------------------------- child processes


@dataclass
class ChildResult:
    returncode: int
    peak_rss_bytes: int  # the child's own high-water mark (getrusage via wait4)
    wall_s: float
    cpu_s: float  # the child's user + system CPU time


def child_env(threads: Optional[int]) -> dict[str, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return env


def run_child(
    cmd: list[str],
    log_path: Path,
    timeout_s: float,
    env: dict[str, str],
    on_start: Optional[Callable[[subprocess.Popen], None]] = None,
) -> ChildResult:
    """Run one method's process, its output into `log_path`; measure its peak RSS.

    os.wait4 gives the resource usage of that one child (RUSAGE_CHILDREN would give the
    largest of all children so far, hiding a smaller second run). `on_start` gets the
    process once it runs (bench/lr_sweep.py passes a stop signal on to it).
    """
    start = time.perf_counter()
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=str(REPO_ROOT), env=env)
        if on_start is not None:
            on_start(proc)
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() - start > timeout_s:
                proc.kill()
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.2)
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait again
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return ChildResult(
        proc.returncode, usage.ru_maxrss * scale, time.perf_counter() - start, usage.ru_utime + usage.ru_stime
    )


def machine_info() -> dict[str, Any]:
    import torch

    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "torch_threads": torch.get_num_threads(),
        "load_average_start": list(os.getloadavg()),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def run_method(
    method: str, settings: dict[str, Any], runs_dir: Path, timeout_s: float, threads: Optional[int]
) -> MethodFigures:
    run_dir = runs_dir / method
    log_path = runs_dir / f"{method}.log"
    cmd = finetune_command(method, settings, run_dir)
    print(f"bench: {method}: {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
    child = run_child(cmd, log_path, timeout_s, child_env(threads))
    if child.returncode != 0:
        raise SystemExit(
            f"bench: {method} failed (exit {child.returncode}); last lines of {log_path}:\n{tail(log_path)}"
        )
    figures = method_figures(
        method,
        read_metrics(run_dir / "metrics.jsonl"),
        read_final_ranks(run_dir / "ranks.json"),
        child_peak_bytes=child.peak_rss_bytes,
        warmup_steps=settings["warmup_skip"],
        wall_s=child.wall_s,
        process_cpu_s=child.cpu_s,
    )
    print(
        f"bench: {method}: done in {child.wall_s:.0f} s, median step {figures.median_step_s:.3f} s",
        file=sys.stderr,
        flush=True,
    )
    return figures


# ---------------------------------------------------------------- the table


def _mib(n: Optional[float]) -> str:
    return "-" if n is None else f"{n / 2**20:,.1f}"


def _num(x: Optional[float], fmt: str = "{:.3f}") -> str:
    return "-" if x is None else fmt.format(x)


def _verdict(check: dict[str, Any]) -> str:
    if check["met"] is None:
        return ""
    return " [green]ok[/]" if check["met"] else " [red]MISSED[/]"


def render_table(doc: dict[str, Any]):
    """One rich table: a row per figure, a column per method, and the ratio with its target."""
    from rich.table import Table

    methods = doc["methods"]
    names = [m for m in METHODS if m in methods]
    ratios, targets = doc["ratios"], doc["targets"]
    s = doc["settings"]
    table = Table(
        title=f"l1ra-lite bench ({s['mode']}): {s['steps']} steps, batch {s['batch_size']} x "
        f"{s['seq_len']} tokens, budget {s['budget']} over {s['n_adapters']} adapters, "
        f"{s['quant']}, {doc['machine']['device']}"
    )
    table.add_column("figure")
    for name in names:
        table.add_column(name, justify="right")
    table.add_column("ratio (target)")

    def row(label: str, key: str, fmt, ratio_text: str = "") -> None:
        table.add_row(label, *[fmt(methods[n].get(key)) for n in names], ratio_text)

    def ratio_text(key: str, label: str) -> str:
        value = ratios.get(key)
        if value is None:
            return ""
        check = targets.get(key)
        bound = f" (<= {check['max']:g})" if check else ""
        return f"{label} {value:.3f}{bound}{_verdict(check) if check else ''}"

    row(
        "median step (s)",
        "median_step_s",
        _num,
        ratio_text("step_time_l1ra_over_lora", "L1RA/LoRA, paired")
        + "\n"
        + ratio_text("step_time_adalora_over_lora", "AdaLoRA/LoRA, paired")
        + "\n"
        + ratio_text("median_step_l1ra_over_lora", "ratio of medians L1RA/LoRA"),
    )
    if any(methods[n].get("median_step_cpu_s") is not None for n in names):
        row(
            "median step, CPU time (s)",
            "median_step_cpu_s",
            _num,
            ratio_text("step_cpu_time_l1ra_over_lora", "L1RA/LoRA"),
        )
    row("mean step incl. realloc (s)", "mean_step_s", _num, ratio_text("mean_step_time_l1ra_over_lora", "L1RA/LoRA"))
    row("tokens/s (median)", "median_tokens_per_s", lambda x: _num(x, "{:,.0f}"))
    row("reallocations", "reallocations", lambda x: _num(x, "{:d}"))
    row("one reallocation (s)", "median_realloc_s", _num, ratio_text("realloc_over_step", "of a step"))
    row(
        "trainable state (MiB)",
        "trainable_state_bytes",
        _mib,
        ratio_text("trainable_state_l1ra_over_adalora", "L1RA/AdaLoRA")
        + "\n"
        + ratio_text("trainable_state_l1ra_over_lora", "L1RA/LoRA"),
    )
    row("peak memory (MiB)", "peak_bytes", _mib, ratio_text("peak_memory_l1ra_over_lora", "L1RA/LoRA"))
    row(
        "memory while training, max (MiB)",
        "train_mem_max_bytes",
        _mib,
        ratio_text("train_memory_l1ra_over_lora", "L1RA/LoRA"),
    )
    diff = ratios.get("eval_loss_l1ra_minus_lora")
    check = targets["eval_loss_l1ra_minus_lora"]
    row(
        "eval loss (end)",
        "eval_loss",
        lambda x: _num(x, "{:.4f}"),
        "" if diff is None else f"L1RA-LoRA {diff:+.4f} (<= 0){_verdict(check)}",
    )
    row("total rank (end)", "rank_total", lambda x: _num(x, "{:d}"))
    kinds = sorted({k for n in names for k in methods[n]["ranks_by_type"]})
    for kind in kinds:
        table.add_row(f"  rank {kind}", *[str(methods[n]["ranks_by_type"].get(kind, "-")) for n in names], "")
    row("process wall time (s)", "wall_s", lambda x: _num(x, "{:.0f}"))
    row(
        "process CPU time (s)",
        "process_cpu_s",
        lambda x: _num(x, "{:.0f}"),
        ratio_text("process_cpu_time_l1ra_over_lora", "L1RA/LoRA"),
    )
    return table


# ---------------------------------------------------------------- main


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown or not methods:
        raise SystemExit(f"bench: unknown method(s) {', '.join(unknown) or '(none)'}; choose from {', '.join(METHODS)}")

    from l1ra_lite.models import resolve_model

    # Convert the embedded model into the cache now, so no child pays (or measures) it.
    resolve_model(args.model)
    settings = bench_settings(args, count_adapters(args.model))
    machine = machine_info()
    machine["child_threads"] = args.threads or machine["torch_threads"]

    runs_dir = Path(args.runs_dir) if args.runs_dir else Path(tempfile.mkdtemp(prefix="l1ra-bench-"))
    runs_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    try:
        figures = {m: run_method(m, settings, runs_dir, args.timeout, args.threads) for m in methods}
    finally:
        if not args.runs_dir:
            shutil.rmtree(runs_dir, ignore_errors=True)
    machine["load_average_end"] = list(os.getloadavg())
    machine["bench_wall_s"] = round(time.perf_counter() - started, 1)

    doc = results_document(settings, machine, figures, full_run=settings["mode"] == "full")
    results = Path(args.results)
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")

    from rich.console import Console

    # A pipe or a log file gets a wide table rather than rich's 80 columns.
    Console(width=None if sys.stdout.isatty() else 150).print(render_table(doc))
    print(f"bench: figures written to {results} ({machine['bench_wall_s']:.0f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
