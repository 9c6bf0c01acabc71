"""What the user sees while `finetune` runs: a live rich screen, or plain log lines.

The training loop calls `report(event)` with the dataclasses of `l1ra_lite.events`.
Here that call only updates a `DashboardState` (cheap, no drawing); a live screen
redraws from the latest state a few times a second in rich's own refresh thread.
`render(state)` is a pure function from that state to a rich renderable, so tests
can draw it into a recording console. When the output is not a terminal (CI,
`nohup`, a pipe) or `--plain` is given, plain lines are printed instead.

The rank views (heat map, totals by type and layer) live in l1ra_lite.ui.rank_views,
shared with `l1ra-lite inspect`.
"""

from __future__ import annotations

import math
import threading
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Optional

from rich.console import Console, ConsoleOptions, Group, RenderableType, RenderResult
from rich.live import Live
from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from l1ra_lite.events import (
    CheckpointSaved,
    Evaluated,
    Event,
    MemoryStats,
    Reallocated,
    Reporter,
    RunFinished,
    RunStarted,
    StepLogged,
)
from l1ra_lite.ui.rank_views import RankHeatMap, rank_by_type, type_label

REFRESH_PER_SECOND = 4  # redraws of the live screen; the training loop never waits on them
LOSS_WINDOW = 40  # losses kept for the sparkline
GIB = 1024**3

SPARK_CHARS = "▁▂▃▄▅▆▇█"


# ----------------------------------------------------------------------------------------
# Rank by module type, compact (inspect draws a fuller table)


def type_bars(by_type: dict[str, int], bar_width: int = 16) -> Table:
    """One row per module type: label, bar scaled to the largest type, total rank."""
    grid = Table.grid(padding=(0, 1))
    grid.add_column(no_wrap=True)
    grid.add_column(no_wrap=True)
    grid.add_column(justify="right", no_wrap=True)
    largest = max(by_type.values(), default=0)
    for mtype, total in by_type.items():
        bar = ProgressBar(
            total=max(largest, 1),
            completed=total,
            width=bar_width,
            complete_style="magenta",
            finished_style="magenta",
        )
        grid.add_row(type_label(mtype), bar, str(total))
    return grid


# ----------------------------------------------------------------------------------------
# State


@dataclass
class DashboardState:
    """Everything the screen shows, updated from events by `apply`. Plain data only."""

    model: str = ""
    method: str = ""
    device: str = ""
    output_dir: str = ""
    total_steps: int = 0
    steps_per_epoch: int = 0
    start_step: int = 0
    update_every: int = 0
    notes: tuple[str, ...] = ()  # about the data (RunStarted.notes)
    # progress
    step: int = 0
    epoch: float = 0.0
    elapsed_s: float = 0.0
    tokens_per_s: float = 0.0
    skipped_steps: int = 0
    # loss
    loss: Optional[float] = None
    lr: float = 0.0
    losses: deque = field(default_factory=lambda: deque(maxlen=LOSS_WINDOW))
    eval_loss: Optional[float] = None
    eval_ppl: Optional[float] = None
    eval_step: Optional[int] = None
    # memory
    memory: Optional[MemoryStats] = None
    adapter_bytes: int = 0
    # rank
    budget: int = 0
    ranks: dict[str, int] = field(default_factory=dict)
    rank_total: int = 0
    reallocations: int = 0
    last_realloc_step: Optional[int] = None
    last_pruned: int = 0
    last_added: int = 0
    next_update: Optional[int] = None
    # milestones
    last_checkpoint: Optional[str] = None
    finished: Optional[RunFinished] = None

    def apply(self, event: Event) -> None:
        """Fold one event into the state. Never draws anything."""
        if isinstance(event, RunStarted):
            self._run_started(event)
        elif isinstance(event, StepLogged):
            self._step_logged(event)
        elif isinstance(event, Reallocated):
            self._reallocated(event)
        elif isinstance(event, Evaluated):
            self.eval_loss, self.eval_ppl, self.eval_step = event.eval_loss, event.eval_ppl, event.step
        elif isinstance(event, CheckpointSaved):
            self.last_checkpoint = event.path
        elif isinstance(event, RunFinished):
            self.finished = event
            self.step = event.step

    def _run_started(self, e: RunStarted) -> None:
        self.model, self.method, self.device, self.output_dir = e.model, e.method, e.device, e.output_dir
        self.total_steps, self.steps_per_epoch = e.total_steps, e.steps_per_epoch
        self.start_step = self.step = e.start_step
        self.update_every = e.update_every
        self.budget = e.budget
        self.ranks = dict(e.ranks)
        self.rank_total = sum(self.ranks.values())
        self.next_update = e.next_update
        self.notes = e.notes

    def _step_logged(self, e: StepLogged) -> None:
        self.step, self.total_steps, self.epoch = e.step, e.total_steps, e.epoch
        self.elapsed_s, self.tokens_per_s, self.skipped_steps = e.elapsed_s, e.tokens_per_s, e.skipped_steps
        self.loss, self.lr = e.loss, e.lr
        if math.isfinite(e.loss):
            self.losses.append(e.loss)
        self.memory, self.adapter_bytes, self.rank_total = e.memory, e.adapter_bytes, e.rank_total

    def _reallocated(self, e: Reallocated) -> None:
        self.ranks = dict(e.ranks)
        self.rank_total = sum(self.ranks.values())
        self.budget = e.budget
        self.reallocations += 1
        self.last_realloc_step = e.step
        self.last_pruned = sum(e.pruned.values())
        self.last_added = sum(e.added.values())
        self.next_update = e.next_update

    def eta_s(self) -> Optional[float]:
        """Seconds left at the pace of this process (elapsed_s counts from its start)."""
        done = self.step - self.start_step
        if done <= 0 or self.elapsed_s <= 0:
            return None
        return self.elapsed_s / done * max(0, self.total_steps - self.step)


# ----------------------------------------------------------------------------------------
# Formatting helpers


def format_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'; memory figures use binary units, as nvidia-smi and torch do."""
    for unit, size in (("GiB", GIB), ("MiB", 1024**2), ("KiB", 1024)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def format_duration(seconds: Optional[float]) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "--:--"
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


def memory_fraction(mem: MemoryStats) -> Optional[float]:
    """Share of the card in use: the larger of reserved (what the allocator holds) and
    peak (what a step needed). None when the total is unknown."""
    if mem.total <= 0:
        return None
    return max(mem.reserved, mem.peak, mem.allocated) / mem.total


def memory_colour(fraction: float) -> str:
    """Green with room to spare, yellow from 75 %, red from 90 % of the card."""
    if fraction >= 0.90:
        return "red"
    if fraction >= 0.75:
        return "yellow"
    return "green"


def sparkline(values, width: int) -> str:
    """The last `width` values as block characters, scaled between their min and max."""
    vals = list(values)[-width:] if width > 0 else []
    if not vals:
        return ""
    lo, hi = min(vals), max(vals)
    top = len(SPARK_CHARS) - 1
    if hi - lo < 1e-12:
        return SPARK_CHARS[top // 2] * len(vals)
    return "".join(SPARK_CHARS[round((v - lo) / (hi - lo) * top)] for v in vals)


class Sparkline:
    """Renders the loss trend at whatever width the panel has (at most LOSS_WINDOW)."""

    def __init__(self, values):
        self.values = list(values)

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        yield Text(sparkline(self.values, options.max_width), style="cyan", no_wrap=True)


# ----------------------------------------------------------------------------------------
# Rendering (pure: state in, renderable out)


def _kv(rows: list[tuple[str, RenderableType]]) -> Table:
    grid = Table.grid(padding=(0, 1))
    grid.add_column(style="dim", no_wrap=True)
    grid.add_column()
    for key, value in rows:
        grid.add_row(key, value)
    return grid


def render_progress(state: DashboardState) -> Panel:
    total = max(state.total_steps, 1)
    pct = 100.0 * state.step / total
    rows: list[tuple[str, RenderableType]] = [
        ("step", f"{state.step}/{state.total_steps}  ({pct:.0f}%)"),
        ("", ProgressBar(total=total, completed=state.step, width=24)),
        ("epoch", f"{state.epoch:.2f}"),
        ("elapsed", format_duration(state.elapsed_s)),
        ("ETA", format_duration(state.eta_s())),
        ("tok/s", f"{state.tokens_per_s:,.0f}"),
    ]
    if state.skipped_steps:
        rows.append(("skipped", Text(f"{state.skipped_steps} non-finite steps", style="yellow")))
    return Panel(_kv(rows), title="progress", border_style="blue")


def render_loss(state: DashboardState) -> Panel:
    loss = "—" if state.loss is None else f"{state.loss:.4f}"
    rows: list[tuple[str, RenderableType]] = [
        ("loss", loss),
        ("trend", Sparkline(state.losses)),
        ("lr", f"{state.lr:.2e}"),
    ]
    if state.eval_loss is None:
        rows.append(("eval", Text("not yet", style="dim")))
    else:
        rows.append(("eval loss", f"{state.eval_loss:.4f}  (step {state.eval_step})"))
        rows.append(("eval ppl", f"{state.eval_ppl:.2f}"))
    return Panel(_kv(rows), title="loss", border_style="blue")


def render_memory(state: DashboardState) -> Panel:
    mem = state.memory
    rows: list[tuple[str, RenderableType]] = []
    if mem is None:
        rows.append(("memory", Text("waiting for the first step", style="dim")))
    elif mem.device == "cuda":
        rows += [
            ("allocated", format_bytes(mem.allocated)),
            ("reserved", format_bytes(mem.reserved)),
            ("peak", format_bytes(mem.peak)),
        ]
        fraction = memory_fraction(mem)
        if fraction is not None:
            colour = memory_colour(fraction)
            used = max(mem.reserved, mem.peak, mem.allocated)
            card = f"{used / GIB:.2f}/{mem.total / GIB:.2f} GiB ({fraction:.0%})"
            rows.append(("card", Text(card, style=colour)))
            rows.append(
                (
                    "",
                    ProgressBar(
                        total=mem.total, completed=used, width=24, complete_style=colour, finished_style=colour
                    ),
                )
            )
    else:
        rows.append(("resident", format_bytes(mem.rss)))
        if mem.total > 0:
            rows.append(("of", format_bytes(mem.total)))
    if mem is not None:
        rows.append(("adapter", f"{format_bytes(state.adapter_bytes)} w/ grads+optim"))
    device = mem.device if mem is not None else (state.device or "?")
    return Panel(_kv(rows), title=f"memory ({device})", border_style="blue")


def render_rank(state: DashboardState) -> Panel:
    on_budget = state.rank_total == state.budget
    summary: list[tuple[str, RenderableType]] = [
        ("rank", Text(f"{state.rank_total} / budget {state.budget}", style="green" if on_budget else "red")),
    ]
    if state.last_realloc_step is None:
        summary.append(("last", Text("no reallocation yet", style="dim")))
    else:
        summary.append(
            ("last", f"step {state.last_realloc_step}: pruned {state.last_pruned}, added {state.last_added}")
        )
    if state.update_every <= 0 and state.reallocations == 0:
        nxt = "reallocation off"
    elif state.next_update is None:
        nxt = "none left"
    else:
        nxt = f"step {state.next_update}"
    summary.append(("next", nxt))
    left = Group(_kv(summary), Text(""), type_bars(rank_by_type(state.ranks)))
    body = Table.grid(padding=(0, 3), expand=True)
    body.add_column(no_wrap=True)
    body.add_column(ratio=1)
    body.add_row(left, RankHeatMap(state.ranks))
    title = f"rank budget ({state.reallocations} reallocation{'s' if state.reallocations != 1 else ''})"
    return Panel(body, title=title, border_style="magenta")


def render_header(state: DashboardState) -> Text:
    status = "  [finished]" if state.finished is not None else ""
    return Text.assemble(
        ("l1ra-lite ", "bold"),
        (state.method, "bold magenta"),
        f"  {state.model}  ->  {state.output_dir}",
        (status, "bold yellow"),
    )


def render(state: DashboardState) -> RenderableType:
    """The whole screen for one state. Pure: reads `state`, changes nothing."""
    top = Table.grid(padding=(0, 0), expand=True)
    for _ in range(3):
        top.add_column(ratio=1)
    top.add_row(render_progress(state), render_loss(state), render_memory(state))
    parts: list[RenderableType] = [render_header(state), top, render_rank(state)]
    parts += [Text(f"note: {note}", style="yellow") for note in state.notes]
    if state.last_checkpoint:
        parts.append(Text(f"last checkpoint: {state.last_checkpoint}", style="dim"))
    return Group(*parts)


# ----------------------------------------------------------------------------------------
# Plain lines (not a terminal, or --plain)


def memory_text(mem: MemoryStats) -> str:
    if mem.device == "cuda":
        text = (
            f"mem {mem.allocated / GIB:.2f} GiB alloc, {mem.reserved / GIB:.2f} GiB reserved, peak {mem.peak / GIB:.2f}"
        )
        return text + (f"/{mem.total / GIB:.2f} GiB" if mem.total else " GiB")
    return f"rss {mem.rss / GIB:.2f} GiB"


def rank_summary_text(state: DashboardState) -> str:
    by_type = " ".join(f"{type_label(t)} {n}" for t, n in rank_by_type(state.ranks).items())
    return f"rank {state.rank_total}/{state.budget} ({by_type})"


def plain_line(state: DashboardState, event: Event) -> Optional[str]:
    """The log line for an event, from the state after the event was applied."""
    if isinstance(event, RunStarted):
        resumed = f", resuming at step {event.start_step}" if event.start_step else ""
        run = (
            f"run {event.method} on {event.model} ({event.device}): {event.total_steps} steps, "
            f"{len(event.ranks)} adapters, budget {event.budget}, output {event.output_dir}{resumed}"
        )
        return "\n".join([run, *(f"note: {note}" for note in event.notes)])
    if isinstance(event, StepLogged):
        line = (
            f"step {event.step}/{event.total_steps} epoch {event.epoch:.2f} loss {event.loss:.4f} "
            f"lr {event.lr:.2e} tok/s {event.tokens_per_s:,.0f} {memory_text(event.memory)} "
            f"adapter {format_bytes(event.adapter_bytes)} rank {event.rank_total}/{state.budget} "
            f"eta {format_duration(state.eta_s())}"
        )
        return line + (f" skipped {event.skipped_steps}" if event.skipped_steps else "")
    if isinstance(event, Reallocated):
        nxt = f"next at step {event.next_update}" if event.next_update is not None else "no more"
        return (
            f"realloc step {event.step}: pruned {state.last_pruned}, added {state.last_added}, "
            f"{rank_summary_text(state)}, {nxt} ({event.seconds:.2f}s)"
        )
    if isinstance(event, Evaluated):
        return f"eval step {event.step}: loss {event.eval_loss:.4f} ppl {event.eval_ppl:.2f}"
    if isinstance(event, CheckpointSaved):
        return f"checkpoint step {event.step}: {event.path}"
    if isinstance(event, RunFinished):
        return final_line(event, state)
    return None


def final_line(event: RunFinished, state: DashboardState) -> str:
    if event.interrupted:
        return f"interrupted at step {event.step}: resume with the same command; run folder {event.output_dir}"
    moves = f"; {event.rank_summary}" if event.rank_summary else ""
    return (
        f"finished {event.step} steps in {format_duration(state.elapsed_s)}, {rank_summary_text(state)}{moves}; "
        f"adapter in {event.adapter_dir}"
    )


# ----------------------------------------------------------------------------------------
# The reporter the training loop gets


@contextmanager
def open_display(plain: bool, console: Optional[Console] = None) -> Iterator[Reporter]:
    """Yield `report(event)` for the training loop.

    A live dashboard when `console` is a terminal and `plain` is false; plain lines
    otherwise. `report` only updates the state (and, in plain mode, prints a line);
    the live screen is redrawn by rich's refresh thread at REFRESH_PER_SECOND."""
    console = console if console is not None else Console()
    state = DashboardState()
    if plain or not console.is_terminal:
        yield _plain_reporter(state, console)
        return
    # The refresh thread reads the state while the training thread writes it: the lock
    # keeps each redraw consistent. It is held only while `render` builds the renderable
    # objects (no terminal output), so `report` waits at most that long.
    lock = threading.Lock()

    def report(event: Event) -> None:
        with lock:
            state.apply(event)

    def draw() -> RenderableType:
        with lock:
            return render(state)

    with Live(console=console, get_renderable=draw, refresh_per_second=REFRESH_PER_SECOND):
        yield report
    if state.finished is not None:
        console.print(final_line(state.finished, state), markup=False, highlight=False, soft_wrap=True)


def _plain_reporter(state: DashboardState, console: Console) -> Reporter:
    def report(event: Event) -> None:
        state.apply(event)
        line = plain_line(state, event)
        if line is not None:
            console.print(line, markup=False, highlight=False, soft_wrap=True)

    return report
