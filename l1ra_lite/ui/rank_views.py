"""Where the rank is, drawn for the terminal: totals by module type and by layer, and a
heat map of module type x layer. Shared by the live dashboard and `l1ra-lite inspect`."""

from __future__ import annotations

import math
from typing import Optional

from rich.console import Console, ConsoleOptions, RenderResult
from rich.text import Text

from l1ra_lite.module_paths import layer_index, module_type

# Llama-family projections first, in the order of the forward pass; anything else after.
TYPE_ORDER = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# Heat-map levels, lowest rank to highest: a shade character (readable without colour)
# and a colour.
HEAT_CHARS = "░▒▓█"
HEAT_COLOURS = ("blue", "green", "yellow", "red")


def type_label(mtype: str) -> str:
    """'q_proj' -> 'q', 'gate_proj' -> 'gate'; other module types are shown as they are."""
    return mtype[: -len("_proj")] if mtype in TYPE_ORDER else mtype


def ordered_types(types) -> list[str]:
    """Known projection types in forward order, then any others sorted by name."""
    present = set(types)
    return [t for t in TYPE_ORDER if t in present] + sorted(present.difference(TYPE_ORDER))


def rank_by_type(ranks: dict[str, int]) -> dict[str, int]:
    """Module path -> rank  to  module type -> total rank, in `ordered_types` order."""
    totals: dict[str, int] = {}
    for path, rank in ranks.items():
        mtype = module_type(path)
        totals[mtype] = totals.get(mtype, 0) + rank
    return {t: totals[t] for t in ordered_types(totals)}


def rank_by_layer(ranks: dict[str, int]) -> dict[Optional[int], int]:
    """Module path -> rank  to  layer index -> total rank, sorted by layer. Modules
    outside the numbered blocks (e.g. lm_head) are summed under the key None, last."""
    totals: dict[Optional[int], int] = {}
    for path, rank in ranks.items():
        layer = layer_index(path)
        totals[layer] = totals.get(layer, 0) + rank
    numbered = sorted(k for k in totals if k is not None)
    ordered = {k: totals[k] for k in numbered}
    if None in totals:
        ordered[None] = totals[None]
    return ordered


def heat_level(rank: int, max_rank: int) -> int:
    """0..3: which quarter of the largest rank this rank falls in."""
    if max_rank <= 0:
        return 0
    return min(len(HEAT_CHARS) - 1, max(0, math.ceil(rank / max_rank * len(HEAT_CHARS)) - 1))


class RankHeatMap:
    """Module type (rows) x layer (columns) grid of ranks.

    A rich renderable that picks its cell form from the width it is given: the rank
    numbers on a coloured background when they fit, one shaded block per cell when
    they do not (a 32-layer model still fits in an 80-column panel)."""

    def __init__(self, ranks: dict[str, int]):
        self.types = ordered_types(module_type(p) for p in ranks)
        self.layers = sorted({i for p in ranks if (i := layer_index(p)) is not None})
        self.cells: dict[tuple[str, int], int] = {}
        for path, rank in ranks.items():
            layer = layer_index(path)
            if layer is not None:
                key = (module_type(path), layer)
                self.cells[key] = self.cells.get(key, 0) + rank
        self.max_rank = max(self.cells.values(), default=0)

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        if not self.cells:
            yield Text("(no modules inside numbered layers)", style="dim")
            return
        label_width = max(len(type_label(t)) for t in self.types) + 1
        digits = len(str(self.max_rank))
        numbers_fit = label_width + len(self.layers) * (digits + 1) <= options.max_width
        cell_width = digits + 1 if numbers_fit else 1
        yield self._header(label_width, cell_width)
        for mtype in self.types:
            line = Text(type_label(mtype).ljust(label_width))
            for layer in self.layers:
                rank = self.cells.get((mtype, layer))
                line.append_text(self._cell(rank, numbers_fit, digits))
            yield line
        scale = "" if numbers_fit else f", {HEAT_CHARS[0]} low .. {HEAT_CHARS[-1]} high"
        yield Text(
            f"{'':{label_width}}layers {self.layers[0]}-{self.layers[-1]}, max rank {self.max_rank}{scale}",
            style="dim",
        )

    def _header(self, label_width: int, cell_width: int) -> Text:
        # Layer numbers every few columns, so the eye can find layer 17.
        step = 5 if cell_width == 1 else 1  # tags that would touch a neighbour are skipped
        header = [" "] * (len(self.layers) * cell_width)
        for col, layer in enumerate(self.layers):
            if layer % step == 0:
                tag = str(layer)
                end = (col + 1) * cell_width
                start = max(0, end - len(tag))
                if all(c == " " for c in header[max(0, start - 1) : end]):
                    header[start:end] = list(tag)
        return Text(" " * label_width + "".join(header).rstrip(), style="dim")

    def _cell(self, rank: Optional[int], numbers: bool, digits: int) -> Text:
        if rank is None:  # this module type is not adapted in this layer
            return Text((" " * digits + "·") if numbers else "·", style="dim")
        level = heat_level(rank, self.max_rank)
        if numbers:
            return Text(" ") + Text(f"{rank:>{digits}}", style=f"bold black on {HEAT_COLOURS[level]}")
        return Text(HEAT_CHARS[level], style=HEAT_COLOURS[level])
