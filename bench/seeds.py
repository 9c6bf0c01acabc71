"""L1RA against LoRA over several seeds: is an eval-loss difference the method or the draw?

One seed decides the adapters' initial A and the data order; two methods that start from
different draws differ by as much as the draws do. This runs `bench/run.py` once a seed
(L1RA and LoRA, the full mode unless told otherwise), then sets the eval losses side by
side: per seed, their mean, and the paired difference L1RA - LoRA with its spread.

    python bench/seeds.py                         # seeds 42,43,44, full mode: ~1.5 h on 2 cores
    python bench/seeds.py --seeds 1,2 --quick     # any other option goes to bench/run.py

Writes bench/seeds.json (`--results`); each seed's own results go to
bench/seeds/seed-<n>.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any, Optional

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from bench import run  # noqa: E402

METHODS = ("lora", "l1ra")


def compare_seeds(per_seed: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Eval losses by seed (from each seed's bench/run.py results document), their means,
    and the paired differences L1RA - LoRA: mean, sample standard deviation, how many
    seeds L1RA is at or below LoRA."""
    rows = {seed: {m: doc["methods"][m]["eval_loss"] for m in METHODS} for seed, doc in sorted(per_seed.items())}
    diffs = [row["l1ra"] - row["lora"] for row in rows.values()]
    return {
        "eval_loss": rows,
        "mean": {m: statistics.fmean(row[m] for row in rows.values()) for m in METHODS},
        "l1ra_minus_lora": diffs,
        "l1ra_minus_lora_mean": statistics.fmean(diffs),
        "l1ra_minus_lora_stdev": statistics.stdev(diffs) if len(diffs) > 1 else None,
        "l1ra_at_or_below_lora": sum(d <= 0 for d in diffs),
        "seeds": len(diffs),
    }


def render(summary: dict[str, Any]) -> str:
    lines = ["seed   LoRA     L1RA     L1RA-LoRA"]
    for (seed, row), diff in zip(summary["eval_loss"].items(), summary["l1ra_minus_lora"]):
        lines.append(f"{seed:<6} {row['lora']:.4f}   {row['l1ra']:.4f}   {diff:+.4f}")
    mean, spread = summary["l1ra_minus_lora_mean"], summary["l1ra_minus_lora_stdev"]
    lines.append(
        f"mean   {summary['mean']['lora']:.4f}   {summary['mean']['l1ra']:.4f}   {mean:+.4f}"
        + (f" (sd {spread:.4f})" if spread is not None else "")
    )
    lines.append(f"L1RA at or below LoRA in {summary['l1ra_at_or_below_lora']} of {summary['seeds']} seeds")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        allow_abbrev=False,
        epilog="Any other option goes to bench/run.py (python bench/run.py --help).",
    )
    parser.add_argument("--seeds", default="42,43,44", help="comma-separated seeds (default 42,43,44)")
    parser.add_argument("--results", type=Path, default=REPO_ROOT / "bench" / "seeds.json")
    args, run_args = parser.parse_known_args(argv)
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        raise SystemExit(f"seeds: --seeds takes comma-separated integers (got {args.seeds!r})") from None
    if not seeds:
        raise SystemExit("seeds: no seed given")
    if any(a.startswith(("--seed=", "--methods", "--results")) or a == "--seed" for a in run_args):
        raise SystemExit("seeds: --seed, --methods and --results are set by this script")

    per_seed_dir = args.results.parent / "seeds"
    per_seed = {}
    for seed in seeds:
        path = per_seed_dir / f"seed-{seed}.json"
        print(f"seeds: seed {seed}", file=sys.stderr, flush=True)
        run.main([*run_args, "--seed", str(seed), "--methods", ",".join(METHODS), "--results", str(path)])
        per_seed[seed] = json.loads(path.read_text(encoding="utf-8"))
    summary = compare_seeds(per_seed)
    args.results.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    print(render(summary))
    print(f"seeds: written to {args.results}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
