"""L1RA variants and their controls against stock LoRA, paired over seeds: is an
eval-loss difference the method or the draw?

    python bench/seeds.py --threads 1 --jobs 2              # lora and l1ra, seeds 42-46, full mode
    python bench/seeds.py --variants lora,l1ra-importance,lora-at-importance-layout --seeds 42,43
    python bench/seeds.py --steps 1000 --seq-len 128 --runs-dir bench/seeds-1000   # a longer run
    python bench/seeds.py --report                          # read the run folders, run nothing

One seed fixes the adapters' initial A, the data order and the held-out split, so two
methods that start from different draws differ by as much as the draws do. Every variant
is one `l1ra-lite finetune` run per seed with the bench's settings (bench/run.py: model,
data, budget, steps, batch, the method's own lr and alpha) plus its own options (VARIANTS);
the table pairs each variant with LoRA at the same seed. Runs go under --runs-dir (default
bench/seeds/, git-ignored) as `<variant>-s<seed>/`, checkpointed every --save-every steps
and resumed by the same command (bench/run_queue.py). Figures: --results (default
bench/seeds.json) and a table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any, Callable, Optional

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from bench import run  # noqa: E402
from bench.run_queue import Stop, run_state, take_lock, train_one, work_through  # noqa: E402
from bench.summary import method_figures, read_final_ranks, read_metrics  # noqa: E402

DEFAULT_SEEDS = (42, 43, 44, 45, 46)
BASELINE = "lora"
IMPORTANCE = ["--realloc-rule", "importance", "--shrink-until", "0.6", "--l1-kappa", "1.5", "--log-gates"]
FROZEN = ["--eta-c", "1e-9", "--l1-lambda", "1e-9"]  # gates stay at 1, no penalty: LoRA through our layer


def _layout_of(variant: str) -> Callable[[Path, int], list[str]]:
    return lambda runs_dir, seed: ["--ranks-from", str(runs_dir / run_name(variant, seed))]


# variant -> (method, needs: the variant whose finished run it starts from, or None,
#             extra finetune options given the runs folder and the seed)
VARIANTS: dict[str, tuple[str, Optional[str], Callable[[Path, int], list[str]]]] = {
    "lora": ("lora", None, lambda d, s: []),  # stock peft LoRA: the baseline
    "adalora": ("adalora", None, lambda d, s: []),  # stock peft AdaLoRA at its own best rate
    "l1ra": ("l1ra", None, lambda d, s: []),  # L1RA as shipped (its default rule)
    "l1ra-frozen": ("l1ra", None, lambda d, s: FROZEN),
    # stock LoRA trained from the start at the ranks l1ra (the shipped rule) ended with
    "lora-at-l1ra-layout": ("lora", "l1ra", _layout_of("l1ra")),
    "l1ra-half": ("l1ra", None, lambda d, s: ["--budget", "HALF"]),  # the shipped rule at half the budget
    # the same gates and penalty with no reallocation: do the late moves cost L1RA its lead?
    "l1ra-no-moves": ("l1ra", None, lambda d, s: ["--update-every", "0"]),
    # the paper's rule with its penalty and moves inside the first 60% of the run, then the
    # gates folded into B: do the moves come by 60%, and does ending unthrottled pay?
    "l1ra-window": ("l1ra", None, lambda d, s: ["--realloc-rule", "paper", "--shrink-until", "0.6", "--log-gates"]),
    "l1ra-importance": ("l1ra", None, lambda d, s: IMPORTANCE),
    # the importance rule's penalty window and fold, with no reallocation: what the penalty costs
    "l1ra-importance-no-moves": ("l1ra", None, lambda d, s: [*IMPORTANCE, "--update-every", "0"]),
    # stock LoRA trained from the start at the ranks l1ra-importance ended with (same seed):
    # does the layout help, or the moving?
    "lora-at-importance-layout": ("lora", "l1ra-importance", _layout_of("l1ra-importance")),
    # the same layout through our layer with frozen gates: one scale alpha / r_mean for every
    # module, as L1RA has, where peft scales each module by alpha / r_i
    "l1ra-frozen-at-importance-layout": (
        "l1ra",
        "l1ra-importance",
        lambda d, s: [*FROZEN, *_layout_of("l1ra-importance")(d, s)],
    ),
    # the efficiency claim: L1RA at half the budget against LoRA at the full one
    "l1ra-importance-half": ("l1ra", None, lambda d, s: [*IMPORTANCE, "--budget", "HALF"]),
}


def run_name(variant: str, seed: int) -> str:
    return f"{variant}-s{seed}"


def finetune_command(variant: str, seed: int, settings: dict[str, Any], runs_dir: Path, save_every: int) -> list[str]:
    """The bench's command for the variant's method at this seed, with the variant's own
    options (a later option wins in argparse, so they override the bench's)."""
    method, _, extra = VARIANTS[variant]
    cmd = run.finetune_command(method, {**settings, "seed": seed}, runs_dir / run_name(variant, seed))
    cmd[cmd.index("--save-every") + 1] = str(save_every)
    options = [str(settings["budget"] // 2) if x == "HALF" else x for x in extra(runs_dir, seed)]
    return cmd + options


# ---------------------------------------------------------------- figures


def moves(run_dir: Path) -> Optional[dict[str, Any]]:
    """How much rank a finished run moved: ranks cut over its reallocations (all, and by
    60% of the run), and the net change per module type from its first to its last ranks."""
    from l1ra_lite.l1ra.rank_state import RankState, ranks_before_moves

    path = run_dir / "ranks.json"
    if not path.exists():
        return None
    state = RankState.from_json(json.loads(path.read_text(encoding="utf-8")))
    total = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))["total_steps"]
    before = ranks_before_moves(state)
    by_type: dict[str, int] = {}
    for p in state.ranks:
        kind = p.rsplit(".", 1)[-1].removesuffix("_proj")
        by_type[kind] = by_type.get(kind, 0) + state.ranks[p] - before[p]
    cut = [(event.step, sum(event.pruned.values())) for event in state.history]
    return {
        "cut": sum(n for _, n in cut),
        "cut_by_60pct": sum(n for step, n in cut if step <= 0.6 * total),
        "moved": sum(max(0, state.ranks[p] - before[p]) for p in state.ranks),
        "budget": state.budget,
        "net_by_type": dict(sorted(by_type.items())),
    }


def speed(variant: str, run_dir: Path, lines: list[dict[str, Any]]) -> dict[str, Any]:
    """A finished run's step time (wall and CPU, a reallocation's own time left out), one
    reallocation's time, its trainable state and peak memory: bench/summary.py's figures.
    CPU times of runs trained side by side (`--jobs 2`, one seed's pair) compare like
    bench/run.py's; next to other runs they are a rougher guide."""
    f = method_figures(variant, lines, read_final_ranks(run_dir / "ranks.json"))
    return {
        "median_step_s": f.median_step_s,
        "median_step_cpu_s": f.median_step_cpu_s,
        "median_realloc_s": f.median_realloc_s,
        "trainable_state_bytes": f.trainable_state_bytes,
        "peak_bytes": f.peak_bytes,
    }


def run_record(variant: str, seed: int, runs_dir: Path) -> dict[str, Any]:
    run_dir = runs_dir / run_name(variant, seed)
    state = run_state(run_dir)
    lines = read_metrics(run_dir / "metrics.jsonl") if (run_dir / "metrics.jsonl").exists() else []
    curve = [[m["step"], m["eval_loss"]] for m in lines if "eval_loss" in m]
    finished = state["status"] == "finished"
    return {
        "name": run_name(variant, seed),
        "variant": variant,
        "seed": seed,
        **state,
        "eval_curve": curve,
        "eval_loss": curve[-1][1] if finished and curve else None,
        "moves": moves(run_dir) if finished else None,
        "speed": speed(variant, run_dir, lines) if finished else None,
    }


def compare(records: list[dict[str, Any]], variants: list[str], seeds: list[int]) -> dict[str, Any]:
    """Per variant: eval loss by seed, and against LoRA at the same seed (seeds where both
    finished): the paired differences, their mean and sample sd, how many at or below;
    for variants that move rank, the module types that gain in how many seeds."""
    loss = {(r["variant"], r["seed"]): r["eval_loss"] for r in records}
    cpu = {(r["variant"], r["seed"]): r["speed"] and r["speed"]["median_step_cpu_s"] for r in records}
    out: dict[str, Any] = {}
    for v in variants:
        by_seed = {s: loss.get((v, s)) for s in seeds}
        paired = {
            s: by_seed[s] - loss[(BASELINE, s)]
            for s in seeds
            if by_seed[s] is not None and loss.get((BASELINE, s)) is not None
        }
        diffs = list(paired.values())
        cpu_ratios = [cpu[(v, s)] / cpu[(BASELINE, s)] for s in seeds if cpu.get((v, s)) and cpu.get((BASELINE, s))]
        gains: dict[str, int] = {}
        for r in records:
            if r["variant"] == v and r["moves"] and r["moves"]["cut"]:
                for kind, net in r["moves"]["net_by_type"].items():
                    gains[kind] = gains.get(kind, 0) + (net > 0)
        out[v] = {
            "eval_loss": by_seed,
            "finished": sum(x is not None for x in by_seed.values()),
            "mean": statistics.fmean(done) if (done := [x for x in by_seed.values() if x is not None]) else None,
            "minus_lora": paired,
            "minus_lora_mean": statistics.fmean(diffs) if diffs else None,
            "minus_lora_stdev": statistics.stdev(diffs) if len(diffs) > 1 else None,
            "at_or_below_lora": sum(d <= 0 for d in diffs),
            "paired_seeds": len(diffs),
            "gains_in_seeds": dict(sorted(gains.items())),
            "step_cpu_over_lora": statistics.median(cpu_ratios) if cpu_ratios else None,
        }
    return out


def render(doc: dict[str, Any]) -> str:
    """A markdown table: eval loss per seed and variant, then each variant against LoRA."""
    seeds, variants, table = doc["seeds"], doc["variants"], doc["compare"]
    lines = ["| seed | " + " | ".join(variants) + " |", "| --- |" + " --- |" * len(variants)]
    for s in seeds:
        cells = [table[v]["eval_loss"][s] for v in variants]
        lines.append(f"| {s} | " + " | ".join("-" if x is None else f"{x:.4f}" for x in cells) + " |")
    lines.append(
        "| mean | "
        + " | ".join("-" if table[v]["mean"] is None else f"{table[v]['mean']:.4f}" for v in variants)
        + " |"
    )
    for v in variants:
        if v == BASELINE or not table[v]["paired_seeds"]:
            continue
        t = table[v]
        sd = f", sd {t['minus_lora_stdev']:.4f}" if t["minus_lora_stdev"] is not None else ""
        lines.append(
            f"\n{v} - lora: {t['minus_lora_mean']:+.4f}{sd} over {t['paired_seeds']} paired seeds; "
            f"at or below LoRA in {t['at_or_below_lora']} of {t['paired_seeds']}"
            + (
                f"; step CPU time / LoRA's {t['step_cpu_over_lora']:.3f} (median over seeds)"
                if t["step_cpu_over_lora"]
                else ""
            )
        )
        movers = [r for r in doc["runs"] if r["variant"] == v and r["moves"] and r["moves"]["cut"]]
        for r in movers:
            m = r["moves"]
            net = ", ".join(f"{k} {n:+d}" for k, n in m["net_by_type"].items() if n)
            lines.append(
                f"  seed {r['seed']}: {m['cut']} ranks cut ({m['cut_by_60pct']} by 60% of the run), "
                f"{m['moved']} of {m['budget']} moved on net: {net}"
            )
        if movers:
            lines.append(f"  module types gaining, in how many of {len(movers)} seeds: {t['gains_in_seeds']}")
    return "\n".join(lines)


# ---------------------------------------------------------------- the command


def parse_args(argv: Optional[list[str]]) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        allow_abbrev=False,
        epilog="Any other option goes to bench/run.py's settings (python bench/run.py --help). "
        "Variants: " + ", ".join(VARIANTS),
    )
    p.add_argument("--seeds", default=",".join(map(str, DEFAULT_SEEDS)), help="comma-separated (default %(default)s)")
    p.add_argument("--variants", default="lora,l1ra", help="comma-separated, from the list below (default %(default)s)")
    p.add_argument("--runs-dir", type=Path, default=REPO_ROOT / "bench" / "seeds", help="default bench/seeds")
    p.add_argument("--results", type=Path, default=REPO_ROOT / "bench" / "seeds.json")
    p.add_argument("--save-every", type=int, default=25, help="checkpoint interval in steps (default 25)")
    p.add_argument("--jobs", type=int, default=1, help="runs trained at once (default 1)")
    p.add_argument("--threads", type=int, help="CPU threads of each run")
    p.add_argument("--timeout", type=float, default=6 * 3600, help="seconds allowed to one process (default 6 h)")
    p.add_argument("--report", action="store_true", help="only read the run folders and write the figures")
    args, rest = p.parse_known_args(argv)
    if any(a.split("=")[0] in ("--seed", "--methods") for a in rest):
        raise SystemExit("seeds: --seed and --methods of bench/run.py are set by this script")
    try:
        args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        raise SystemExit(f"seeds: --seeds takes comma-separated integers (got {args.seeds!r})") from None
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in args.variants if v not in VARIANTS]
    if not args.seeds or not args.variants or unknown:
        raise SystemExit(f"seeds: give --seeds and --variants from {', '.join(VARIANTS)} (unknown: {unknown})")
    if BASELINE not in args.variants:
        args.variants.insert(0, BASELINE)  # every figure is paired with it
    for v in list(args.variants):  # a variant that starts from another's layout needs that one
        needs = VARIANTS[v][1]
        if needs and needs not in args.variants:
            args.variants.insert(args.variants.index(v), needs)
    return args, rest


def main(argv: Optional[list[str]] = None) -> int:
    args, rest = parse_args(argv)
    bench_args = run.parse_args(rest)
    from l1ra_lite.models import resolve_model

    resolve_model(bench_args.model)  # convert the embedded model once, before any run
    settings = run.bench_settings(bench_args, run.count_adapters(bench_args.model))
    runs_dir = args.runs_dir.resolve()
    runs_dir.mkdir(parents=True, exist_ok=True)

    # The runs of one folder must share their settings: refuse to mix.
    shared = {k: v for k, v in settings.items() if k not in ("seed", "warmup_skip")}
    settings_path = runs_dir / "settings.json"
    if settings_path.exists():
        saved = json.loads(settings_path.read_text(encoding="utf-8"))
        diff = sorted(k for k in set(saved) | set(shared) if saved.get(k) != shared.get(k))
        if diff:
            raise SystemExit(
                f"seeds: {runs_dir} holds runs made with other settings ({', '.join(diff)}); use another --runs-dir"
            )
    settings_path.write_text(json.dumps(shared, indent=1) + "\n", encoding="utf-8")

    def write_results() -> dict[str, Any]:
        records = [run_record(v, s, runs_dir) for s in args.seeds for v in args.variants]
        doc = {
            "settings": shared,
            "seeds": args.seeds,
            "variants": args.variants,
            "options": {v: VARIANTS[v][2](Path("RUNS"), 0) for v in args.variants},
            "machine": {**run.machine_info(), "child_threads": args.threads},
            "runs": records,
            "compare": compare(records, args.variants, args.seeds),
        }
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
        return doc

    stop = Stop("seeds")
    if not args.report:
        lock = take_lock(runs_dir, "seeds")
        stop.install()
        try:
            # Seed by seed, so that paired figures come early; a run that starts from another's
            # layout after all the others (its source has then had the most time to finish).
            order = [(v, s) for s in args.seeds for v in args.variants if not VARIANTS[v][1]]
            order += [(v, s) for s in args.seeds for v in args.variants if VARIANTS[v][1]]

            def trainer(variant: str, seed: int):
                def train() -> None:
                    needs = VARIANTS[variant][1]
                    if needs and run_state(runs_dir / run_name(needs, seed))["status"] != "finished":
                        print(f"seeds: {run_name(variant, seed)} waits for {run_name(needs, seed)}", file=sys.stderr)
                        return
                    cmd = finetune_command(variant, seed, settings, runs_dir, args.save_every)
                    train_one(run_name(variant, seed), cmd, runs_dir, args.timeout, args.threads, stop, lock, "seeds")

                return train

            work_through([trainer(v, s) for v, s in order], args.jobs, stop, write_results)
        finally:
            stop.uninstall()
            lock.unlink(missing_ok=True)
    doc = write_results()
    print(render(doc))
    print(f"seeds: figures written to {args.results}", file=sys.stderr)
    return 143 if stop.requested else 0


if __name__ == "__main__":
    sys.exit(main())
