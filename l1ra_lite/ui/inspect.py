"""Where did the rank go? (`l1ra-lite inspect RUN_DIR`)

`summarize(path)` reads a run folder's `ranks.json` (budget, final ranks and the
history of reallocations; format in docs/CONTRACTS.md) or, for a bare adapter folder,
the rank of each module from the shapes of its `lora_A` tensors. The summary is a
plain JSON-ready dict; `render_summary` draws it for the terminal and `write_png`
draws the heat map, the rank-over-time plot and, for a run folder, the loss and eval
loss curves from its `metrics.jsonl` with matplotlib (the `plot` extra).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from rich.columns import Columns
from rich.console import Group, RenderableType
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from l1ra_lite.errors import UserError
from l1ra_lite.l1ra.rank_state import RankState, describe_moves, ranks_before_moves
from l1ra_lite.module_paths import module_type
from l1ra_lite.peft_adapter import ADAPTER_CONFIG, configured_rank, read_adapter_config, read_lora_ranks
from l1ra_lite.ui.rank_views import RankHeatMap, rank_by_layer, rank_by_type, type_label

RANKS_FILE = "ranks.json"
METRICS_FILE = "metrics.jsonl"


# ----------------------------------------------------------------------------------------
# Reading


def summarize(path) -> dict[str, Any]:
    """The rank summary of a run folder or an adapter folder.

    Keys: source ("run" or "adapter"), path, budget, total_rank, modules, by_type,
    by_layer (string keys, as JSON has them; "other" for modules outside numbered
    layers), ranks (module path -> rank), initial (by_type and total_rank at the start),
    history (per reallocation: step, pruned, added, total_rank, by_type), warnings."""
    folder = Path(path)
    if not folder.exists():
        raise UserError(f"{folder} does not exist")
    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder: give a run folder or an adapter folder")
    if (folder / RANKS_FILE).is_file():
        return _summary_from_ranks_file(folder)
    for candidate in (folder, folder / "adapter"):
        if (candidate / ADAPTER_CONFIG).is_file():
            return _summary_from_adapter(candidate)
    raise UserError(f"{folder} is neither a run folder (no {RANKS_FILE}) nor an adapter folder (no {ADAPTER_CONFIG})")


def _read_json(file: Path) -> Any:
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{file} is not valid JSON: {err}") from None


def _rank_map(value: Any, where: str) -> dict[str, int]:
    """Validate {module path: positive int}."""
    if not isinstance(value, dict) or not value:
        raise ValueError(f"{where} must be a non-empty object of module path -> rank")
    for name, rank in value.items():
        if not isinstance(rank, int) or isinstance(rank, bool) or rank < 0:
            raise ValueError(f"{where}[{name!r}] must be a non-negative integer, got {rank!r}")
    return dict(value)


def _count_map(value: Any, where: str) -> dict[str, int]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"{where} must be an object of module path -> count")
    for name, n in value.items():
        if not isinstance(n, int) or isinstance(n, bool):
            raise ValueError(f"{where}[{name!r}] must be an integer, got {n!r}")
    return dict(value)


def _summary_from_ranks_file(folder: Path) -> dict[str, Any]:
    file = folder / RANKS_FILE
    data = _read_json(file)
    try:
        if not isinstance(data, dict):
            raise ValueError("the top level must be an object")
        budget = data.get("budget")
        if not isinstance(budget, int) or isinstance(budget, bool) or budget <= 0:
            raise ValueError(f"'budget' must be a positive integer, got {budget!r}")
        ranks = _rank_map(data.get("ranks"), "'ranks'")
        raw_history = data.get("history", [])
        if not isinstance(raw_history, list):
            raise ValueError("'history' must be a list")
        history = []
        for i, entry in enumerate(raw_history):
            if not isinstance(entry, dict) or not isinstance(entry.get("step"), int):
                raise ValueError(f"history[{i}] must be an object with an integer 'step'")
            history.append(
                {
                    "step": entry["step"],
                    "pruned": _count_map(entry.get("pruned"), f"history[{i}].pruned"),
                    "added": _count_map(entry.get("added"), f"history[{i}].added"),
                    "ranks": _rank_map(entry.get("ranks"), f"history[{i}].ranks"),
                }
            )
    except ValueError as err:
        raise UserError(f"{file} is not a valid rank file: {err}") from None
    return build_summary("run", folder, budget, ranks, history)


def _summary_from_adapter(folder: Path) -> dict[str, Any]:
    config = read_adapter_config(folder)
    peft_type = config.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise UserError(f"{folder} holds a {peft_type} adapter; inspect reads LoRA adapters")
    ranks = read_lora_ranks(folder)
    summary = build_summary("adapter", folder, sum(ranks.values()), ranks, [])
    summary["warnings"] = config_mismatches(config, ranks)
    return summary


def config_mismatches(config: dict[str, Any], ranks: dict[str, int]) -> list[str]:
    """Modules whose tensor rank differs from what adapter_config.json says (rank_pattern,
    else r). peft matches a rank_pattern key against the end of a module path."""
    if not isinstance(config.get("rank_pattern") or {}, dict):
        return ["adapter_config.json: rank_pattern is not an object"]
    problems = []
    for path, rank in ranks.items():
        expected = configured_rank(config, path)
        if expected is not None and expected != rank:
            problems.append(f"{path}: tensors have rank {rank}, adapter_config.json says {expected}")
    return problems


def build_summary(
    source: str, folder: Path, budget: int, ranks: dict[str, int], history: list[dict[str, Any]]
) -> dict[str, Any]:
    """The summary dict from final ranks and the reallocation history."""
    before = ranks_before_moves(RankState.from_json({"budget": budget, "ranks": ranks, "history": history}))
    return {
        "source": source,
        "path": str(folder),
        "budget": budget,
        "total_rank": sum(ranks.values()),
        "modules": len(ranks),
        "by_type": rank_by_type(ranks),
        "by_layer": {("other" if k is None else str(k)): v for k, v in rank_by_layer(ranks).items()},
        "ranks": dict(ranks),
        "initial": _totals(before),
        "moves": describe_moves(before, ranks, budget),
        "history": [
            {
                "step": h["step"],
                "pruned": sum(h["pruned"].values()),
                "added": sum(h["added"].values()),
                **_totals(h["ranks"]),
            }
            for h in history
        ],
        "warnings": [],
    }


def _totals(ranks: dict[str, int]) -> dict[str, Any]:
    return {"total_rank": sum(ranks.values()), "by_type": rank_by_type(ranks)}


# ----------------------------------------------------------------------------------------
# Terminal


def render_summary(summary: dict[str, Any]) -> RenderableType:
    """Totals, rank by module type, by layer, the heat map and the allocation over time."""
    total, budget = summary["total_rank"], summary["budget"]
    colour = "green" if total == budget else "red"
    kind = "run" if summary["source"] == "run" else "adapter (no budget or history recorded: budget = total)"
    parts: list[RenderableType] = [
        Text.assemble(("l1ra-lite inspect ", "bold"), summary["path"], f"  [{kind}]"),
        Text.assemble(
            "total rank ", (f"{total}", f"bold {colour}"), f" / budget {budget}  over {summary['modules']} modules"
        ),
    ]
    if summary.get("moves"):
        parts.append(Text(summary["moves"]))
    for warning in summary.get("warnings", []):
        parts.append(Text(f"warning: {warning}", style="yellow"))
    parts += [Text(""), Text("rank by module type", style="bold"), _type_table(summary)]
    parts += [Text(""), Text("rank by layer", style="bold"), _layer_columns(summary["by_layer"])]
    parts += [Text(""), Text("heat map (module type x layer)", style="bold"), RankHeatMap(summary["ranks"])]
    parts += [Text(""), Text("allocation over time (rank per module type)", style="bold"), history_table(summary)]
    return Group(*parts)


def _type_table(summary: dict[str, Any]) -> Table:
    counts: dict[str, int] = {}
    for path in summary["ranks"]:
        mtype = module_type(path)
        counts[mtype] = counts.get(mtype, 0) + 1
    largest = max(summary["by_type"].values(), default=0)
    table = Table(box=None, padding=(0, 1), header_style="dim")
    for name, justify in (
        ("type", "left"),
        ("", "left"),
        ("rank", "right"),
        ("modules", "right"),
        ("mean", "right"),
        ("share", "right"),
    ):
        table.add_column(name, justify=justify, no_wrap=True)
    for mtype, total in summary["by_type"].items():
        n = counts[mtype]
        share = total / summary["total_rank"] if summary["total_rank"] else 0.0
        bar = ProgressBar(
            total=max(largest, 1), completed=total, width=24, complete_style="magenta", finished_style="magenta"
        )
        table.add_row(type_label(mtype), bar, str(total), str(n), f"{total / n:.2f}", f"{share:.1%}")
    return table


def _layer_columns(by_layer: dict[str, int]) -> Columns:
    cells = [Text.assemble((f"{'L' + k if k != 'other' else k:>4}", "dim"), f" {v:>4}") for k, v in by_layer.items()]
    return Columns(cells, padding=(0, 2))


def history_table(summary: dict[str, Any]) -> Table:
    """One row for the start, then one per reallocation."""
    types = list(summary["by_type"])
    table = Table(box=None, padding=(0, 1), header_style="dim")
    table.add_column("step", justify="right")
    for mtype in types:
        table.add_column(type_label(mtype), justify="right")
    table.add_column("total", justify="right")
    table.add_column("pruned", justify="right")
    table.add_column("added", justify="right")
    initial = summary["initial"]
    first = "start" if summary["history"] or summary["source"] == "run" else "now"
    table.add_row(first, *(str(initial["by_type"].get(t, 0)) for t in types), str(initial["total_rank"]), "", "")
    for h in summary["history"]:
        table.add_row(
            str(h["step"]),
            *(str(h["by_type"].get(t, 0)) for t in types),
            str(h["total_rank"]),
            str(h["pruned"]),
            str(h["added"]),
        )
    if not summary["history"]:
        table.caption = "no reallocation recorded"
    return table


# ----------------------------------------------------------------------------------------
# Picture


@dataclass
class LossCurves:
    """(step, value) points of a run's training loss and eval loss, by step."""

    train: list[tuple[int, float]] = field(default_factory=list)
    eval: list[tuple[int, float]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.train or self.eval)


def read_loss_curves(folder) -> LossCurves:
    """The curves in `folder`/metrics.jsonl; empty for a folder without one (a bare
    adapter). A line cut short by a kill, or a skipped step's NaN, is left out."""
    train: dict[int, float] = {}
    evals: dict[int, float] = {}
    try:
        lines = (Path(folder) / METRICS_FILE).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return LossCurves()
    for line in lines:
        try:
            entry = json.loads(line)
            step = int(entry["step"])
        except (ValueError, KeyError, TypeError):
            continue
        for key, into in (("loss", train), ("eval_loss", evals)):
            value = entry.get(key)
            if isinstance(value, (int, float)) and math.isfinite(value):
                into[step] = float(value)
    return LossCurves(sorted(train.items()), sorted(evals.items()))


def figure(summary: dict[str, Any], curves: Optional[LossCurves] = None):
    """The matplotlib Figure of `write_png`: heat map, rank over time, and the loss
    curves when there are any."""
    from matplotlib.figure import Figure

    rows = 3 if curves else 2
    fig = Figure(figsize=(11, 3.75 * rows), layout="constrained")
    axes = fig.subplots(rows, 1)
    _plot_heat_map(fig, axes[0], summary)
    _plot_history(axes[1], summary)
    if curves:
        _plot_losses(axes[2], curves, summary)
    fig.suptitle(f"{summary['path']}: total rank {summary['total_rank']} / budget {summary['budget']}")
    return fig


def write_png(summary: dict[str, Any], file, curves: Optional[LossCurves] = None) -> None:
    """Heat map, rank per module type over time and the loss curves, as one PNG. Never
    overwrites a file."""
    try:
        import matplotlib.figure  # noqa: F401
    except ImportError:
        raise UserError("--png needs matplotlib: pip install 'l1ra-lite[plot]'") from None
    target = Path(file)
    if target.exists():
        raise UserError(f"{target} already exists; choose another file name")
    if not target.parent.is_dir():
        raise UserError(f"cannot write {target}: folder {target.parent} does not exist")

    fig = figure(summary, curves)
    # "xb": fail rather than replace a file that appeared since the check above.
    try:
        with open(target, "xb") as out:
            fig.savefig(out, format="png", dpi=100)
    except FileExistsError:
        raise UserError(f"{target} already exists; choose another file name") from None
    except BaseException:
        target.unlink(missing_ok=True)  # no half-written picture left behind
        raise


def _plot_losses(ax, curves: LossCurves, summary: dict[str, Any]) -> None:
    if curves.train:
        steps, values = zip(*curves.train)
        ax.plot(steps, values, linewidth=1, color="tab:blue", label="training loss")
    if curves.eval:
        steps, values = zip(*curves.eval)
        ax.plot(steps, values, marker="o", markersize=4, color="tab:orange", label="eval loss")
    # Where rank moved, so that a jump in the loss can be read against it.
    moved = [h["step"] for h in summary["history"] if h["pruned"] or h["added"]]
    for i, step in enumerate(moved):
        ax.axvline(step, color="grey", linestyle=":", linewidth=1, label="rank moved" if i == 0 else None)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("loss over time")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    ax.grid(True, alpha=0.3)


def _plot_heat_map(fig, ax, summary: dict[str, Any]) -> None:
    heat = RankHeatMap(summary["ranks"])
    if not heat.layers:
        ax.set_axis_off()
        ax.set_title("no modules inside numbered layers")
        return
    import numpy as np

    grid = np.full((len(heat.types), len(heat.layers)), np.nan)
    for row, mtype in enumerate(heat.types):
        for col, layer in enumerate(heat.layers):
            if (mtype, layer) in heat.cells:
                grid[row, col] = heat.cells[(mtype, layer)]
    image = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_yticks(range(len(heat.types)), [type_label(t) for t in heat.types])
    ax.set_xticks(range(len(heat.layers)), [str(i) for i in heat.layers], fontsize=7 if len(heat.layers) > 24 else 9)
    ax.set_xlabel("layer")
    ax.set_title("rank per module (module type x layer)")
    fig.colorbar(image, ax=ax, label="rank")
    if len(heat.layers) <= 40:  # numbers stay readable up to about this many columns
        middle = (np.nanmin(grid) + np.nanmax(grid)) / 2
        for row in range(grid.shape[0]):
            for col in range(grid.shape[1]):
                value = grid[row, col]
                if not np.isnan(value):
                    # viridis is bright at the top: dark digits there, light ones below
                    colour = "black" if value > middle else "white"
                    ax.text(col, row, f"{value:.0f}", ha="center", va="center", fontsize=7, color=colour)


def _plot_history(ax, summary: dict[str, Any]) -> None:
    if not summary["history"]:  # one point in time: bars read better than a line
        labels = [type_label(t) for t in summary["by_type"]]
        ax.bar(labels, list(summary["by_type"].values()), color="tab:purple")
        ax.set_ylabel("total rank")
        ax.set_title("rank per module type (no reallocation recorded)")
        ax.grid(True, axis="y", alpha=0.3)
        return
    points = [(0, summary["initial"]["by_type"])] + [(h["step"], h["by_type"]) for h in summary["history"]]
    steps = [s for s, _ in points]
    for mtype in summary["by_type"]:
        values = [by_type.get(mtype, 0) for _, by_type in points]
        ax.plot(steps, values, drawstyle="steps-post", marker="o", markersize=3, label=type_label(mtype))
    ax.set_xlabel("step")
    ax.set_ylabel("total rank")
    ax.set_title("rank per module type over time")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    ax.grid(True, alpha=0.3)
