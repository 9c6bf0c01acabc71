"""`l1ra-lite recipes`: the recipes shipped with the package, with their estimated peak."""

from __future__ import annotations

import argparse
import json
from typing import Any

HELP = "List the bundled recipes with their card, model and estimated peak GPU memory."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the list as JSON")


def run(args: argparse.Namespace) -> int:
    rows = recipe_rows()
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print_rows(rows)
    return 0


def recipe_rows() -> list[dict[str, Any]]:
    """One row a bundled recipe: name, card, memory, model, shape and estimate (or error)."""
    from l1ra_lite.config import RECIPES_DIR, build_config, read_recipe
    from l1ra_lite.errors import UserError
    from l1ra_lite.estimate import estimate_for_config

    rows = []
    for path in sorted(RECIPES_DIR.glob("*.toml")):
        row: dict[str, Any] = {"name": path.stem}
        try:
            _, meta = read_recipe(str(path))
            config = build_config(str(path), {})
            est = estimate_for_config(config)
        except UserError as err:
            row["error"] = str(err)
            rows.append(row)
            continue
        memory = meta.get("memory_gib")
        row.update(
            card=meta.get("card", ""),
            device=meta.get("device", "cuda"),
            memory_gib=memory,
            model=config.model,
            seq_len=config.seq_len,
            batch_size=config.batch_size,
            budget=est.budget,
            estimate_gib=round(est.total_gib, 2),
            headroom=round(est.headroom(memory), 3) if memory else None,
            description=meta.get("description", ""),
        )
        rows.append(row)
    return rows


def print_rows(rows: list[dict[str, Any]]) -> None:
    from rich import box
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title="recipes: l1ra-lite finetune --recipe NAME",
        title_justify="left",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        padding=(0, 1),
    )
    for column in ("recipe", "card", "model", "seq", "batch", "budget", "peak", "free"):
        table.add_column(column, justify="left" if column in ("recipe", "model") else "right", no_wrap=True)
    for row in rows:
        if "error" in row:
            table.add_row(row["name"], "[red]error[/red]", row["error"], "", "", "", "", "")
            continue
        card = f"{row['memory_gib']:g}G" if row["memory_gib"] else row["device"]
        free = f"{row['headroom']:.0%}" if row["headroom"] is not None else "-"
        table.add_row(
            row["name"],
            card,
            row["model"],
            str(row["seq_len"]),
            str(row["batch_size"]),
            str(row["budget"]),
            f"{row['estimate_gib']:.2f}G",
            free,
        )
    console = Console()
    if not console.is_terminal:  # piped: do not squeeze the table into 80 columns
        console = Console(width=120)
    console.print(table)
    legend = "card: GPU memory (GiB); peak: estimated peak (`l1ra-lite estimate --recipe NAME` for its parts)"
    console.print(legend, style="dim")
