"""`l1ra-lite estimate`: peak GPU memory of a training run, from the model config alone."""

from __future__ import annotations

import argparse
import json
from typing import Any, Optional

from l1ra_lite.models import DTYPE_CHOICES, QUANT_CHOICES  # a light import: torch loads inside its functions

HELP = "Predict the peak GPU memory of a fine-tuning run (model config only, no weights)."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="alias, hub id or local folder (default: the embedded default)")
    parser.add_argument("--recipe", help="a recipe name or .toml path; flags given here win over it")
    parser.add_argument("--budget", type=int, help="total rank (default: 8 x the number of adapters)")
    parser.add_argument("--seq-len", type=int, help="tokens a sequence")
    parser.add_argument("--batch-size", type=int, help="sequences a forward pass")
    parser.add_argument("--target-modules", help="comma-separated module names (default: every linear layer)")
    parser.add_argument("--quant", choices=QUANT_CHOICES, help="base weights in 4-bit NF4 or 16-bit")
    parser.add_argument(
        "--dtype",
        choices=DTYPE_CHOICES,
        help="compute dtype (default auto: bf16, or fp16 on cards older than Ampere; fp32 doubles activations)",
    )
    parser.add_argument("--trust-remote-code", action="store_true", default=None)
    parser.add_argument(
        "--gpu-memory", type=float, metavar="GIB", help="say whether it fits a card with this much memory"
    )
    parser.add_argument("--json", action="store_true", help="print the parts and the total as JSON")


def run(args: argparse.Namespace) -> int:
    from l1ra_lite.config import build_config, read_recipe
    from l1ra_lite.errors import UserError
    from l1ra_lite.estimate import estimate_for_config

    if args.gpu_memory is not None and not args.gpu_memory > 0:
        raise UserError(f"gpu-memory must be a positive number of GiB (got {args.gpu_memory})")
    overrides = {
        "model": args.model,
        "budget": args.budget,
        "seq_len": args.seq_len,
        "batch_size": args.batch_size,
        "target_modules": args.target_modules,
        "quant": args.quant,
        "trust_remote_code": args.trust_remote_code,
    }
    config = build_config(args.recipe, overrides)
    gpu_gib = args.gpu_memory
    if gpu_gib is None and args.recipe:
        gpu_gib = read_recipe(args.recipe)[1].get("memory_gib")
    est = estimate_for_config(config, dtype=args.dtype)
    if args.json:
        print(json.dumps(json_report(est, gpu_gib), indent=2))
    else:
        print_table(est, gpu_gib)
    return 0


def json_report(est, gpu_gib: Optional[float]) -> dict[str, Any]:
    report = est.to_dict()
    report["gpu_memory_gib"] = gpu_gib
    report["fits"] = None if gpu_gib is None else est.headroom(gpu_gib) >= 0
    report["headroom"] = None if gpu_gib is None else round(est.headroom(gpu_gib), 4)
    return report


def print_table(est, gpu_gib: Optional[float]) -> None:
    from rich.console import Console
    from rich.table import Table

    from l1ra_lite.estimate import GIB, fit_sentence, part_label

    def gib(nbytes: int) -> str:
        return f"{nbytes / GIB:.2f}"

    notes = {
        "adapters": f"rank flowed to the largest matrices; {gib(est.adapter_range[0])} spread evenly",
        "backward_peak": (
            f"larger of: loss on logits {gib(est.loss_phase_bytes)}, one layer recomputed {gib(est.layer_phase_bytes)}"
        ),
        "fragmentation": "reserved beyond allocated, "
        + ("expandable segments" if est.expandable_segments else "fixed-size segments"),
    }
    title = (
        f"{est.model}: budget {est.budget} over {est.n_adapters} adapters, seq {est.seq_len} x batch {est.batch_size}"
    )
    table = Table(title=title, title_justify="left")
    table.add_column("part", no_wrap=True)
    table.add_column("GiB", justify="right")
    table.add_column("note", style="dim")
    for key, nbytes in est.parts.items():
        table.add_row(part_label(est, key), gib(nbytes), notes.get(key, ""))
    table.add_section()
    allocated = f"torch allocates {gib(est.allocated_bytes)} of it"
    table.add_row("total (peak)", f"{est.total_gib:.2f}", allocated, style="bold")
    console = Console()
    console.print(table)
    if gpu_gib is not None:
        room = est.headroom(gpu_gib)
        style = "green" if room >= 0.10 else "yellow" if room >= 0 else "red"
        console.print(fit_sentence(est, gpu_gib), style=style)
