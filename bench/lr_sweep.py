"""Each method at its own best learning rate: a small sweep on a validation split.

    python bench/lr_sweep.py --threads 1          # the whole grid, most informative runs first
    python bench/lr_sweep.py --threads 1 --max-runs 2
    python bench/lr_sweep.py --report             # read the run folders, write the figures, run nothing
    python bench/lr_sweep.py --dry-run            # the order and the command lines
    python bench/lr_sweep.py --threads 1 --points adalora=1e-2,lora=1e-3   # these points, in this order

For every method (lora, l1ra, adalora) and every learning rate of a log-spaced grid
(default 1e-4, 2e-4, 5e-4, 1e-3, 2e-3) one `l1ra-lite finetune` run with the bench's
full settings (bench/run.py: model, budget, steps, batch, seq len, seed), the method's own
alpha (bench/run.py's METHOD_DEFAULTS) and the candidate A/B learning rate. It is chosen
on a validation split that the final tables never see: the training rows of the bench's
standard split for the seed are written to a JSONL file, and `finetune --data` splits
that file again (same fraction, cap and seed) into the sweep's train and validation rows:
no row of the final tables' eval split is ever used by the sweep. The embedded corpus
repeats conversations (2025 rows, 898 distinct), so some standard training rows have the
content of an eval row; the bench trains on them too, so the sweep sees no conversation
that the final tables hold out unseen. --exclude-eval-content also drops those rows (the
sweep then trains on other data than the bench: half of it, for the embedded corpus).

Runs go under --sweep-dir (default bench/sweep/, git-ignored), one folder each, with a
checkpoint every --save-every steps. Started again, the sweep reads a finished run, continues
an unfinished one with `l1ra-lite finetune --resume` and starts the rest: the same command
resumes it. A stop signal (SIGTERM, Ctrl-C) is passed on to the run in progress, which
writes a checkpoint and exits. Figures: --results (default bench/lr_sweep.json) and a table.
Other options (--steps, --seq-len, --seed, --model, --data, ...) go to bench/run.py's settings.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Optional

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from bench import run  # noqa: E402
from bench.run_queue import (  # noqa: E402
    Stop,
    read_attempts,
    resume_command,
    run_state,
    take_lock,
    train_one,
    training_now,
    work_through,
)
from bench.summary import method_figures, read_final_ranks, read_metrics  # noqa: E402

DEFAULT_LRS = (1e-4, 2e-4, 5e-4, 1e-3, 2e-3)  # log-spaced, factor 2-2.5
# Where each method's sweep starts: the learning rate its own sources recommend. AdaLoRA:
# 5e-4, its authors' XSum and GLUE scripts (QingruZhang/AdaLoRA; SQuAD 8e-4 to 1e-3).
# LoRA and L1RA: 2e-4, the bench's former shared rate (QLoRA's 2e-4 for small models; the
# L1RA reference trains Mistral-7B at 1e-4).
RECOMMENDED_LR = {"adalora": 5e-4, "lora": 2e-4, "l1ra": 2e-4}
SWEEP_ORDER = ("adalora", "lora", "l1ra")  # AdaLoRA first: the method the issue is about
SAVE_EVERY = 25  # a checkpoint every 25 steps: a stopped run loses at most that much
EVAL_FRACTION = 0.05  # l1ra_lite.config.FinetuneConfig.eval_fraction (finetune's default; the bench keeps it)


# ---------------------------------------------------------------- the validation split


def row_key(row: dict) -> str:
    """A row's content (its messages or text), hashed: equal for repeated rows."""
    body = row.get("messages") if row.get("format") != "text" else row.get("text")
    return hashlib.sha256(json.dumps(body, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def sweep_rows(
    source: Optional[str], eval_fraction: float, eval_max_rows: int, seed: int, exclude_eval_content: bool = False
) -> tuple[list[dict], dict[str, int]]:
    """The rows the sweep may use: the training rows of the standard split of `source` for
    `seed` (the split `finetune` and the bench make, l1ra_lite.data.split_rows), in their
    order; with `exclude_eval_content`, less any row whose content equals a standard eval
    row. Returns (rows as finetune reads them, counts)."""
    from l1ra_lite.data import load_rows, split_rows

    rows, _ = load_rows(source, skip_bad_rows=source is None)
    train, held_out = split_rows(rows, eval_fraction, eval_max_rows, seed)
    held_keys = {row_key(r) for r in held_out}
    shared = sum(row_key(r) in held_keys for r in train)
    kept = [r for r in train if row_key(r) not in held_keys] if exclude_eval_content else train
    out = [{"text": r["text"]} if r["format"] == "text" else {"messages": r["messages"]} for r in kept]
    return out, {
        "rows": len(rows),
        "distinct_rows": len({row_key(r) for r in rows}),
        "standard_eval_rows": len(held_out),
        "standard_train_rows": len(train),
        "train_rows_with_eval_content": shared,
        "dropped_rows_with_eval_content": len(train) - len(kept),
        "sweep_rows": len(out),
    }


def write_sweep_data(
    path: Path,
    source: Optional[str],
    eval_fraction: float,
    eval_max_rows: int,
    seed: int,
    exclude_eval_content: bool = False,
) -> dict[str, Any]:
    """Write the sweep's rows as JSONL (atomically; the same content every time) and say what
    is in it: the counts, and how many rows `finetune --data` will hold out as validation."""
    from l1ra_lite.atomic import write_text_atomic
    from l1ra_lite.data import eval_row_count

    rows, counts = sweep_rows(source, eval_fraction, eval_max_rows, seed, exclude_eval_content)
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists() or path.read_text(encoding="utf-8") != text:
        write_text_atomic(path, text)
    counts["validation_rows"] = eval_row_count(len(rows), eval_fraction, eval_max_rows)
    return {
        "file": str(path),
        "source": source or "embedded",
        "seed": seed,
        "eval_fraction": eval_fraction,
        "eval_max_rows": eval_max_rows,
        "exclude_eval_content": exclude_eval_content,
        **counts,
    }


# ---------------------------------------------------------------- the grid


def run_name(method: str, lr: float) -> str:
    return f"{method}-lr{lr:g}"


def sweep_order(methods: list[str], lrs: list[float]) -> list[tuple[str, float]]:
    """(method, lr) pairs, the most informative first: every method at its recommended
    learning rate (the grid point nearest to it), then the grid's extremes (highest
    first), then the points between. Within a tier, AdaLoRA, LoRA, L1RA."""
    lrs = sorted(set(lrs))
    methods = [m for m in SWEEP_ORDER if m in methods]

    def tier(method: str, lr: float) -> tuple[int, float]:
        nearest = min(lrs, key=lambda x: abs(math.log(x / RECOMMENDED_LR[method])))
        if lr == nearest:
            return 0, 0.0
        if lr in (lrs[0], lrs[-1]):
            return 1, -lr
        return 2, abs(math.log(lr / nearest))

    pairs = [(m, lr) for m in methods for lr in lrs]
    return sorted(pairs, key=lambda p: (*tier(*p), methods.index(p[0])))


def parse_points(text: str) -> list[tuple[str, float]]:
    """ "adalora=1e-2,lora=1e-3" -> [("adalora", 0.01), ("lora", 0.001)]."""
    points = []
    for item in (x.strip() for x in text.split(",") if x.strip()):
        method, _, lr = item.partition("=")
        try:
            value = float(lr)
        except ValueError:
            value = 0.0
        if method not in run.METHODS or value <= 0:
            raise SystemExit(f"lr_sweep: --points takes METHOD=LR pairs, METHOD from lora,l1ra,adalora (got {item!r})")
        points.append((method, value))
    return points


def sweep_command(method: str, lr: float, settings: dict[str, Any], run_dir: Path, save_every: int) -> list[str]:
    """bench/run.py's finetune command for `method`, with this learning rate, the sweep's
    data (settings["data"]) and a checkpoint every `save_every` steps."""
    alpha = settings["method_settings"][method]["alpha"]
    own = {**settings, "method_settings": {method: {"lr": lr, "alpha": alpha}}}
    cmd = run.finetune_command(method, own, run_dir)
    cmd[cmd.index("--save-every") + 1] = str(save_every)
    return cmd + ["--skip-bad-rows"]  # as the embedded corpus is read in the bench (none in the rows written)


def run_record(method: str, lr: float, alpha: Optional[float], runs_dir: Path, warmup_skip: int) -> dict[str, Any]:
    """One grid point's figures from its run folder (whatever state it is in)."""
    name = run_name(method, lr)
    run_dir = runs_dir / name
    state = run_state(run_dir)
    attempts = read_attempts(runs_dir, name)
    record: dict[str, Any] = {
        "name": name,
        "method": method,
        "lr": lr,
        "alpha": alpha,
        **state,
        "val_loss": None,
        "val_curve": [],
        "last_train_loss": None,
        "train_s": None,
        "median_step_s": None,
        "median_step_cpu_s": None,
        "attempts": len(attempts),
        "wall_s": round(sum(a.get("wall_s", 0) for a in attempts), 1) if attempts else None,
        "cpu_s": round(sum(a.get("cpu_s", 0) for a in attempts), 1) if attempts else None,
        "rank_total": None,
        "ranks_by_type": None,
        "run_dir": str(run_dir),
    }
    metrics_path = run_dir / "metrics.jsonl"
    lines = read_metrics(metrics_path) if metrics_path.exists() else []
    if lines:
        record["val_curve"] = [[m["step"], m["eval_loss"]] for m in lines if "eval_loss" in m]
        record["last_train_loss"] = lines[-1].get("loss")
        record["train_s"] = round(sum(m.get("step_s", 0.0) for m in lines), 1)
        ranks_path = run_dir / "ranks.json"
        ranks = read_final_ranks(ranks_path) if ranks_path.exists() else {}
        try:
            fig = method_figures(method, lines, ranks, warmup_steps=warmup_skip)
        except ValueError:  # too few steps yet
            fig = None
        if fig is not None:
            record.update(median_step_s=fig.median_step_s, median_step_cpu_s=fig.median_step_cpu_s)
            if state["status"] == "finished":
                record.update(rank_total=fig.rank_total, ranks_by_type=fig.ranks_by_type)
    if state["status"] in ("partial", "stale"):
        pid = training_now(run_dir)
        if pid is not None:
            record.update(status="running", pid=pid)  # wall_s, cpu_s: of the attempts that ended
    if state["status"] == "finished" and record["val_curve"]:
        record["val_loss"] = record["val_curve"][-1][1]  # the evaluation after the last step
    return record


# ---------------------------------------------------------------- figures


def winners(records: list[dict[str, Any]], lrs: list[float]) -> dict[str, dict[str, Any]]:
    """Per method, the finished run with the lowest validation loss, and how far to trust
    it: how many grid points finished, and whether the best is at an edge of the grid
    (then the optimum may lie outside it) or has an unfinished neighbour."""
    lrs = sorted(lrs)
    out = {}
    for method in sorted({r["method"] for r in records}):
        mine = {r["lr"]: r for r in records if r["method"] == method}
        done = {lr: r for lr, r in mine.items() if r["status"] == "finished" and r["val_loss"] is not None}
        if not done:
            out[method] = {
                "lr": None,
                "alpha": None,
                "val_loss": None,
                "finished": 0,
                "grid": len(mine),
                "complete": False,
                "at_edge": None,
                "neighbours_finished": None,
            }
            continue
        best_lr = min(done, key=lambda lr: done[lr]["val_loss"])
        i = lrs.index(best_lr)
        neighbours = [lrs[j] for j in (i - 1, i + 1) if 0 <= j < len(lrs)]
        out[method] = {
            "lr": best_lr,
            "alpha": done[best_lr]["alpha"],
            "val_loss": done[best_lr]["val_loss"],
            "finished": len(done),
            "grid": len(mine),
            "complete": len(done) == len(mine),
            "at_edge": best_lr in (lrs[0], lrs[-1]),
            "neighbours_finished": all(lr in done for lr in neighbours),
        }
    return out


def _cell(r: Optional[dict[str, Any]]) -> str:
    if r is None:
        return ""
    if r["status"] == "finished" and r["val_loss"] is not None:
        return f"{r['val_loss']:.4f}"
    if r["val_curve"]:
        step, loss = r["val_curve"][-1]
        return f"({loss:.4f} at step {step}; {r['steps_done']}/{r['total_steps']})"
    if r["status"] in ("partial", "stale", "running"):
        return f"({r['status']} at step {r['steps_done']})"
    return "-"


def markdown_table(doc: dict[str, Any]) -> str:
    """Validation loss after the last step, one row per learning rate, one column per
    method; a run not finished shows its last evaluation in parentheses."""
    records = doc["runs"]
    methods = [m for m in SWEEP_ORDER if any(r["method"] == m for r in records)]
    lrs = sorted({r["lr"] for r in records})
    by = {(r["method"], r["lr"]): r for r in records}
    alphas = {m: next(r["alpha"] for r in records if r["method"] == m) for m in methods}
    head = (
        "| A/B learning rate | "
        + " | ".join(f"{m} (alpha {'mean rank' if alphas[m] is None else f'{alphas[m]:g}'})" for m in methods)
        + " |"
    )
    lines = [head, "| --- |" + " --- |" * len(methods)]
    for lr in lrs:
        lines.append(f"| {lr:g} | " + " | ".join(_cell(by.get((m, lr))) for m in methods) + " |")
    best = doc["winners"]
    lines.append(
        "| best so far | "
        + " | ".join(
            "-"
            if best[m]["lr"] is None
            else f"{best[m]['lr']:g} ({best[m]['finished']}/{best[m]['grid']} finished"
            + (", at the grid's edge" if best[m]["at_edge"] else "")
            + ")"
            for m in methods
        )
        + " |"
    )
    return "\n".join(lines)


def timing_table(doc: dict[str, Any]) -> str:
    lines = [
        "| run | status | steps | median step (s) | median step CPU (s) | wall (s) | process CPU (s) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in doc["runs"]:
        if r["status"] == "absent":
            continue

        def num(x, fmt="{:.2f}"):
            return "-" if x is None else fmt.format(x)

        lines.append(
            f"| {r['name']} | {r['status']} | {r['steps_done']}/{r['total_steps']} | "
            f"{num(r['median_step_s'])} | {num(r['median_step_cpu_s'])} | {num(r['wall_s'], '{:.0f}')} | "
            f"{num(r['cpu_s'], '{:.0f}')} |"
        )
    return "\n".join(lines)


def sweep_document(
    settings: dict[str, Any],
    sweep: dict[str, Any],
    machine: dict[str, Any],
    runs_dir: Path,
    order: list[tuple[str, float]],
) -> dict[str, Any]:
    records = [
        run_record(m, lr, settings["method_settings"][m]["alpha"], runs_dir, settings["warmup_skip"]) for m, lr in order
    ]
    for r in records:
        if r["status"] in ("partial", "running"):
            r["resume_command"] = " ".join(resume_command(Path(r["run_dir"]))[1:])
    return {
        "settings": settings,
        "sweep": sweep,
        "machine": machine,
        "runs": records,
        "winners": winners(records, sweep["lrs"]),
    }


# ---------------------------------------------------------------- running


def parse_args(argv: Optional[list[str]]) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        allow_abbrev=False,
        epilog="Any other option goes to bench/run.py's settings (python bench/run.py --help).",
    )
    p.add_argument("--methods", default=",".join(SWEEP_ORDER), help="comma-separated, from lora,l1ra,adalora")
    p.add_argument(
        "--lrs",
        default=",".join(f"{x:g}" for x in DEFAULT_LRS),
        help="comma-separated A/B learning rates (default %(default)s)",
    )
    p.add_argument(
        "--points",
        help="instead of --methods x --lrs, these grid points in this order, e.g. adalora=1e-2,lora=1e-3 "
        "(to extend the grid where a method's best is at its edge)",
    )
    p.add_argument(
        "--sweep-dir",
        type=Path,
        default=REPO_ROOT / "bench" / "sweep",
        help="run folders, logs and the sweep's data file (default bench/sweep)",
    )
    p.add_argument("--results", type=Path, default=REPO_ROOT / "bench" / "lr_sweep.json")
    p.add_argument("--save-every", type=int, default=SAVE_EVERY, help="checkpoint interval in steps (default 25)")
    p.add_argument(
        "--exclude-eval-content",
        action="store_true",
        help="also leave out training rows whose content equals a standard eval row (duplicates)",
    )
    p.add_argument("--max-runs", type=int, help="train at most this many grid points in this invocation")
    p.add_argument("--report", action="store_true", help="only read the run folders and write the figures")
    p.add_argument("--dry-run", action="store_true", help="print the order and the command lines, run nothing")
    p.add_argument("--timeout", type=float, default=6 * 3600, help="seconds allowed to one process (default 6 h)")
    p.add_argument("--threads", type=int, help="CPU threads of each run (bench/run.py --threads)")
    p.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="grid points trained at once (default 1; e.g. one per core with --threads 1)",
    )
    args, rest = p.parse_known_args(argv)
    if any(
        a.split("=")[0] in ("--quick", "--methods", "--results", "--runs-dir", "--lr", "--threads", "--timeout")
        for a in rest
    ):
        raise SystemExit("lr_sweep: --quick, --lr, --runs-dir and --results of bench/run.py are set by this script")
    return args, rest


def main(argv: Optional[list[str]] = None) -> int:
    args, rest = parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods or set(methods) - set(run.METHODS):
        raise SystemExit(f"lr_sweep: --methods from {', '.join(run.METHODS)} (got {args.methods!r})")
    try:
        lrs = sorted({float(x) for x in args.lrs.split(",") if x.strip()})
    except ValueError:
        raise SystemExit(f"lr_sweep: --lrs takes comma-separated numbers (got {args.lrs!r})") from None
    if not lrs or min(lrs) <= 0:
        raise SystemExit("lr_sweep: --lrs needs positive learning rates")
    points = parse_points(args.points) if args.points else None
    if points:
        methods = list(dict.fromkeys(m for m, _ in points))
        lrs = sorted({lr for _, lr in points})
    bench_args = run.parse_args(rest)

    from l1ra_lite.models import resolve_model

    resolve_model(bench_args.model)  # convert the embedded model once, before any run
    settings = run.bench_settings(bench_args, run.count_adapters(bench_args.model))
    sweep_dir = args.sweep_dir.resolve()
    runs_dir = sweep_dir / "runs"
    data_path = (
        sweep_dir
        / "data"
        / (f"sweep-rows-seed{settings['seed']}" + ("-distinct" if args.exclude_eval_content else "") + ".jsonl")
    )
    sweep = write_sweep_data(
        data_path,
        settings["data"],
        EVAL_FRACTION,
        settings["eval_max_rows"],
        settings["seed"],
        args.exclude_eval_content,
    )
    sweep.update(methods=methods, lrs=lrs, save_every=args.save_every, recommended_lr=RECOMMENDED_LR)
    settings = {**settings, "data_standard": settings["data"], "data": str(data_path)}
    order = points or sweep_order(methods, lrs)
    sweep["order"] = [run_name(m, lr) for m, lr in order]

    # A sweep's runs must share their settings: refuse to mix folders made with others.
    runs_dir.mkdir(parents=True, exist_ok=True)
    settings_path = sweep_dir / "settings.json"
    comparable = {k: v for k, v in settings.items() if k not in ("method_settings", "warmup_skip")}
    comparable["alphas"] = {m: settings["method_settings"][m]["alpha"] for m in methods}
    if settings_path.exists():
        saved = json.loads(settings_path.read_text(encoding="utf-8"))
        diff = sorted(k for k in set(saved) | set(comparable) if k != "alphas" and saved.get(k) != comparable.get(k))
        diff += [
            f"alpha of {m}"
            for m in methods
            if m in saved.get("alphas", {}) and saved["alphas"][m] != comparable["alphas"][m]
        ]
        if diff:
            raise SystemExit(
                f"lr_sweep: {sweep_dir} holds runs made with other settings ({', '.join(diff)}); "
                "use another --sweep-dir"
            )
        comparable["alphas"] = {**saved.get("alphas", {}), **comparable["alphas"]}
    settings_path.write_text(json.dumps(comparable, indent=1) + "\n", encoding="utf-8")

    machine = run.machine_info()
    machine["child_threads"] = args.threads or machine["torch_threads"]

    def write_results() -> dict[str, Any]:
        doc = sweep_document(settings, sweep, machine, runs_dir, order)
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
        return doc

    if args.dry_run:
        for m, lr in order:
            state = run_state(runs_dir / run_name(m, lr))
            cmd = (
                resume_command(runs_dir / run_name(m, lr))
                if state["status"] == "partial"
                else sweep_command(m, lr, settings, runs_dir / run_name(m, lr), args.save_every)
            )
            print(f"{run_name(m, lr)} [{state['status']}, {state['steps_done']} steps]: {' '.join(cmd[1:])}")
        return 0
    if not args.report:
        lock = take_lock(sweep_dir, "lr_sweep")
        stop = Stop("lr_sweep")
        stop.install()
        try:
            # Unfinished runs first (their steps are paid for), then the rest in order.
            states = {p: run_state(runs_dir / run_name(*p))["status"] for p in order}
            todo = [p for p in order if states[p] in ("partial", "stale")] + [p for p in order if states[p] == "absent"]
            if args.max_runs is not None:
                todo = todo[: args.max_runs]

            def trainer(method: str, lr: float):
                name = run_name(method, lr)
                cmd = sweep_command(method, lr, settings, runs_dir / name, args.save_every)
                return lambda: train_one(name, cmd, runs_dir, args.timeout, args.threads, stop, lock, "lr_sweep")

            work_through([trainer(*point) for point in todo], args.jobs, stop, write_results)
        finally:
            stop.uninstall()
            lock.unlink(missing_ok=True)
    machine["load_average_end"] = list(os.getloadavg())
    doc = write_results()
    print(markdown_table(doc))
    print()
    print(timing_table(doc))
    print(f"lr_sweep: figures written to {args.results}", file=sys.stderr)
    return 143 if not args.report and stop.requested else 0


if __name__ == "__main__":
    sys.exit(main())
