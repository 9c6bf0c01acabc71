"""Replay reallocation rules offline against runs logged with `finetune --log-gates`.

At each reallocation event a logged run wrote every rank's evidence (gate, Adam moments,
squared-gradient mean, age) to gates/step-<n>.safetensors. This asks each rule what it
would have done with that evidence: how many ranks it cuts, which module types lose and
which gain, and, over several runs (seeds), whether the same types gain. Rules are cheap
to compare this way before paying for training runs. The evidence is the logged run's
own trajectory: a rule's later events would have seen other gates had it really run.

    python bench/realloc_replay.py runs/a runs/b            # every rule, a table
    python bench/realloc_replay.py runs/a --json replay.json
    python bench/realloc_replay.py runs/a --ratio 0.1 --max-moves 12
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Optional

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from l1ra_lite.l1ra.optim import FISHER_BETA  # noqa: E402
from l1ra_lite.l1ra.policy import RankEvidence, importance_rule, paper_rule, plan_moves, relative_gate_rule  # noqa: E402
from l1ra_lite.module_paths import module_type  # noqa: E402


def read_events(run_dir: Path) -> list[tuple[int, list[str], list[RankEvidence]]]:
    """(step, adapter paths, evidence) for each logged event of a run, in step order."""
    from safetensors.torch import load_file

    files = sorted((run_dir / "gates").glob("step-*.safetensors"))
    if not files:
        raise SystemExit(f"realloc_replay: {run_dir} has no gates/ (train it with --log-gates)")
    events = []
    for file in files:
        tensors = load_file(str(file))
        paths = [k[: -len(".gate")] for k in tensors if k.endswith(".gate")]
        evidence = []
        for path in paths:
            gate = tensors[f"{path}.gate"]
            age = tensors.get(f"{path}.step", gate * 0)
            fisher = tensors.get(f"{path}.fisher", gate * 0) / (1 - FISHER_BETA**age).clamp_min(1e-12) * (age > 0)
            evidence.append(RankEvidence(gate.tolist(), fisher.tolist(), age.int().tolist()))
        events.append((int(file.stem.split("-")[1]), paths, evidence))
    return events


def rules(threshold: float, ratio: float, max_moves: int, grace: int, fraction: float) -> dict[str, Any]:
    return {
        "paper": lambda ev: paper_rule(ev, threshold),
        "importance": lambda ev: importance_rule(ev, threshold, ratio=ratio, max_moves=max_moves, grace=grace),
        "relative-gate": lambda ev: relative_gate_rule(ev, threshold, fraction=fraction),
    }


def replay_run(run_dir: Path, rule_set: dict[str, Any]) -> dict[str, Any]:
    """Per rule: ranks cut per event and in all, and the net change per module type."""
    out: dict[str, Any] = {}
    events = read_events(run_dir)
    for name, rule in rule_set.items():
        per_event, net = [], Counter()
        for step, paths, evidence in events:
            plan = plan_moves(rule(evidence))
            per_event.append({"step": step, "cut": sum(plan.pruned)})
            for path, pruned, added in zip(paths, plan.pruned, plan.added):
                net[module_type(path)] += added - pruned
        out[name] = {
            "events": per_event,
            "moved": sum(e["cut"] for e in per_event),
            "budget": sum(len(e.gate) for e in events[0][2]),
            "net_by_type": {k: v for k, v in sorted(net.items()) if v},
        }
    return out


def gains_across_runs(replays: list[dict[str, Any]], rule: str) -> dict[str, int]:
    """Per module type: in how many runs this rule gave it rank (net)."""
    counts: Counter = Counter()
    for replay in replays:
        for kind, change in replay[rule]["net_by_type"].items():
            counts[kind] += change > 0
    return dict(sorted(counts.items()))


def threshold_of(run_dir: Path) -> float:
    config = json.loads((run_dir / "config.json").read_text())
    return float(config["eta_c"]) * float(config["l1_lambda"]) + 1e-10


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=Path, help="run folders trained with --log-gates")
    p.add_argument("--ratio", type=float, default=0.05, help="importance: cut below ratio x the median score")
    p.add_argument("--max-moves", type=int, default=13, help="importance: most ranks cut an event")
    p.add_argument("--grace", type=int, default=15, help="importance: steps before a new rank can go")
    p.add_argument("--fraction", type=float, default=0.1, help="relative-gate: cut below this x the adapter's max")
    p.add_argument("--json", type=Path, help="write the figures here too")
    args = p.parse_args(argv)
    replays = []
    for run_dir in args.runs:
        rule_set = rules(threshold_of(run_dir), args.ratio, args.max_moves, args.grace, args.fraction)
        replays.append(replay_run(run_dir, rule_set))
    doc = {
        "runs": [str(r) for r in args.runs],
        "replays": replays,
        "gains_in_runs": {rule: gains_across_runs(replays, rule) for rule in replays[0]},
    }
    for rule in replays[0]:
        moved = ", ".join(f"{r[rule]['moved']}/{r[rule]['budget']}" for r in replays)
        print(f"{rule:14s} ranks cut over the logged events: {moved}")
        for run, replay in zip(args.runs, replays):
            net = " ".join(f"{k} {v:+d}" for k, v in replay[rule]["net_by_type"].items()) or "no change"
            print(f"{'':14s}   {run.name}: {net}")
        print(f"{'':14s}   gains in n of {len(replays)} runs: {doc['gains_in_runs'][rule]}")
    if args.json:
        args.json.write_text(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
