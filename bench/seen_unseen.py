"""How much of a run's eval loss is memorisation: its held-out rows split by whether
their content also occurs in its training rows.

    python bench/seen_unseen.py bench/sweep/runs/lora-lr0.0002 bench/sweep/runs/lora-lr0.002
    python bench/seen_unseen.py --results bench/seen_unseen.json bench/sweep/runs/*-lr*

The embedded corpus repeats conversations (2025 rows, 898 distinct), so a random eval
split holds rows whose exact content the run trained on. A setting that memorises (a
higher learning rate) then looks better on the whole eval split than it would on new
data. For every finished run folder given, this re-makes the run's own split (the data
file, eval fraction, cap and seed of its config.json, as `finetune` makes it), evaluates
the finished adapter on the two parts and on the whole (the last must equal the run's
own final eval loss: printed side by side as a check), and prints one table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


def split_by_content(config: dict[str, Any]) -> tuple[list[dict], list[dict]]:
    """The run's held-out rows: (those whose content is also a training row's, the rest)."""
    from bench.lr_sweep import row_key
    from l1ra_lite.data import load_rows, split_rows

    rows, _ = load_rows(config["data"], skip_bad_rows=True)
    train, held_out = split_rows(rows, config["eval_fraction"], config["eval_max_rows"], config["seed"])
    trained_on = {row_key(r) for r in train}
    seen = [r for r in held_out if row_key(r) in trained_on]
    return seen, [r for r in held_out if row_key(r) not in trained_on]


def eval_loss(model, tokenizer, rows: list[dict], seq_len: int, batch_size: int) -> float:
    from l1ra_lite.data import encode_rows, truncate
    from l1ra_lite.train.step import evaluate

    examples, _ = encode_rows(rows, tokenizer)
    examples, _, _ = truncate(examples, seq_len)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    # Through the base model (peft put the adapters inside it): a peft AdaLoRA loaded for
    # inference cannot run its own forward with labels (it adds its training penalty).
    base = model.get_base_model()
    device = base.device.type
    return evaluate(base, examples, batch_size, pad_id, device, {"device_type": device, "enabled": False})


# Settings under which the eval rows are not the seeded share of one source's rows.
OTHER_SPLITS = ("eval_data", "data_subset", "data_files", "streaming")


def measure(run_dir: Path) -> dict[str, Any]:
    from l1ra_lite.finished_run import read_run
    from l1ra_lite.generate import load_for_generation

    config = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))
    other = [k for k in OTHER_SPLITS if config.get(k)] + (["several --data"] if "," in (config["data"] or "") else [])
    other += ["data_split"] if config.get("data_split", "train") != "train" else []
    if other:
        raise SystemExit(f"seen_unseen: {run_dir} was not split from one source's rows ({', '.join(other)})")
    seen, unseen = split_by_content(config)
    model, tokenizer = load_for_generation(read_run(run_dir))
    figures = {
        part: eval_loss(model, tokenizer, rows, config["seq_len"], config["batch_size"]) if rows else None
        for part, rows in (("all", seen + unseen), ("seen", seen), ("unseen", unseen))
    }
    metrics = (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    evals = [m["eval_loss"] for m in map(json.loads, metrics) if "eval_loss" in m]
    return {
        "run": run_dir.name,
        "method": config["method"],
        "lr": config["lr"],
        "rows_seen": len(seen),
        "rows_unseen": len(unseen),
        "eval_loss_logged": evals[-1] if evals else None,
        **{f"eval_loss_{part}": value for part, value in figures.items()},
    }


def table(records: list[dict[str, Any]]) -> str:
    lines = [
        "| run | rows seen / unseen | eval loss (logged) | all | content seen in training | content unseen |",
        "| --- | --- | --- | --- | --- | --- |",
    ]

    def num(x):
        return "-" if x is None else f"{x:.4f}"

    for r in records:
        lines.append(
            f"| {r['run']} | {r['rows_seen']} / {r['rows_unseen']} | {num(r['eval_loss_logged'])} | "
            f"{num(r['eval_loss_all'])} | {num(r['eval_loss_seen'])} | {num(r['eval_loss_unseen'])} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="finished run folders")
    parser.add_argument("--results", type=Path, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    unfinished = [str(r) for r in args.runs if not (r / "adapter").is_dir()]
    if unfinished:
        raise SystemExit(f"seen_unseen: not finished runs (no adapter/): {', '.join(unfinished)}")
    import transformers

    transformers.utils.logging.disable_progress_bar()
    records = [measure(run_dir) for run_dir in args.runs]
    print(table(records))
    if args.results:
        args.results.write_text(json.dumps(records, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
