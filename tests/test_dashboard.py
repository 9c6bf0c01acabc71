"""The live dashboard and the plain log lines, driven by scripted training events."""

from __future__ import annotations

import io
import re
import threading

import pytest
from rich.console import Console

from l1ra_lite.events import (
    CheckpointSaved,
    Evaluated,
    MemoryStats,
    Reallocated,
    RunFinished,
    RunStarted,
    StepLogged,
)
from l1ra_lite.ui import dashboard
from l1ra_lite.ui.dashboard import (
    DashboardState,
    memory_colour,
    open_display,
    plain_line,
    render,
    sparkline,
)
from l1ra_lite.ui.rank_views import RankHeatMap

GIB = 1024**3
TYPES = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
]
K0 = "model.layers.0.self_attn.k_proj"
UP1 = "model.layers.1.mlp.up_proj"


def start_ranks(layers: int = 2, rank: int = 4) -> dict[str, int]:
    return {f"model.layers.{i}.{t}": rank for i in range(layers) for t in TYPES}


def cpu_memory() -> MemoryStats:
    return MemoryStats(device="cpu", rss=int(1.5 * GIB))


def step_event(step: int, memory: MemoryStats | None = None, rank_total: int = 56) -> StepLogged:
    return StepLogged(
        step=step,
        total_steps=100,
        epoch=step / 50,
        loss=3.0 - 0.1 * step,
        lr=2e-4,
        grad_norm=1.0,
        tokens_per_s=1234.5,
        elapsed_s=2.0 * step,
        memory=memory or cpu_memory(),
        adapter_bytes=5 * 1024**2,
        rank_total=rank_total,
    )


def scripted_events() -> list:
    """A run of 100 steps on a CPU-only machine over a 2-layer model (14 adapters of rank 4,
    budget 56): 5 steps, a reallocation moving 3 ranks from layer 0's k to layer 1's up,
    2 more steps, an evaluation and a checkpoint."""
    ranks = start_ranks()
    after = dict(ranks)
    after[K0], after[UP1] = 1, 7
    events = [
        RunStarted(
            model="tiny",
            method="l1ra",
            output_dir="runs/tiny",
            total_steps=100,
            steps_per_epoch=50,
            budget=56,
            ranks=ranks,
            update_every=5,
            next_update=5,
            device="cpu",
        )
    ]
    events += [step_event(s) for s in range(1, 6)]
    events.append(
        Reallocated(step=5, budget=56, pruned={K0: 3}, added={UP1: 3}, ranks=after, next_update=10, seconds=0.01)
    )
    events += [step_event(s) for s in range(6, 8)]
    events.append(Evaluated(step=7, eval_loss=2.5, eval_ppl=12.18))
    events.append(CheckpointSaved(step=7, path="runs/tiny/checkpoint-7"))
    return events


def state_after(events) -> DashboardState:
    state = DashboardState()
    for event in events:
        state.apply(event)
    return state


def draw(renderable, width: int = 120, **kwargs) -> str:
    console = Console(record=True, width=width, file=io.StringIO(), **kwargs)
    console.print(renderable)
    return console.export_text(styles=bool(kwargs))


def type_totals_shown(text: str) -> dict[str, int]:
    """Parse the per-type bar rows ('k    ━━━━━━━     5') from a rendered screen."""
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"\b(q|k|v|o|gate|up|down) +[━╸╺]+ +(\d+)", text)}


def test_screen_shows_the_numbers_of_a_cpu_run_with_a_reallocation():
    text = draw(render(state_after(scripted_events())))

    assert "7/100" in text and "(7%)" in text
    assert re.search(r"epoch\s+0\.14", text)
    assert re.search(r"ETA\s+03:06", text)  # 14 s for 7 steps, 93 to go
    assert re.search(r"tok/s\s+1,234", text)
    assert re.search(r"loss\s+2\.3000", text)  # 3.0 - 0.1 * 7
    assert re.search(r"eval loss\s+2\.5000\s+\(step 7\)", text)
    assert re.search(r"eval ppl\s+12\.18", text)
    assert re.search(r"resident\s+1\.50 GiB", text)
    assert "5.00 MiB" in text  # adapter params + grads + optimiser state
    assert "rank 56 / budget 56" in text
    assert "step 5: pruned 3, added 3" in text
    assert re.search(r"next\s+step 10", text)
    assert "1 reallocation" in text
    shown = type_totals_shown(text)
    assert shown == {"q": 8, "k": 5, "v": 8, "o": 8, "gate": 8, "up": 11, "down": 8}
    assert sum(shown.values()) == 56
    assert "runs/tiny/checkpoint-7" in text


def test_screen_before_any_step_and_with_reallocation_off():
    started = RunStarted(
        model="tiny",
        method="lora",
        output_dir="runs/t",
        total_steps=10,
        steps_per_epoch=10,
        budget=56,
        ranks=start_ranks(),
        update_every=0,
        next_update=None,
        device="cpu",
    )
    text = draw(render(state_after([started])))
    assert "0/10" in text
    assert "waiting for the first step" in text
    assert "reallocation off" in text
    assert "no reallocation yet" in text
    assert "rank 56 / budget 56" in text


def test_notes_about_the_data_are_on_the_screen_and_in_the_plain_lines():
    from dataclasses import replace

    note = "50 of 96 eval rows also occur in the training rows: the eval loss partly measures memorisation"
    started = replace(scripted_events()[0], notes=(note,))
    assert f"note: {note}" in " ".join(draw(render(state_after([started])), width=200).split())
    state = state_after([started])
    assert plain_line(state, started).splitlines()[1:] == [f"note: {note}"]
    assert len(plain_line(state, scripted_events()[0]).splitlines()) == 1  # no notes, one line


def test_cuda_memory_is_shown_against_the_card_and_turns_red_near_the_limit():
    near_full = MemoryStats(
        device="cuda", allocated=int(9.5 * GIB), reserved=int(11.2 * GIB), peak=int(10.9 * GIB), total=12 * GIB
    )
    state = state_after(scripted_events() + [step_event(8, near_full)])
    text = draw(render(state))
    assert "memory (cuda)" in text
    assert re.search(r"allocated\s+9\.50 GiB", text)
    assert re.search(r"reserved\s+11\.20 GiB", text)
    assert re.search(r"peak\s+10\.90 GiB", text)
    assert "11.20/12.00 GiB (93%)" in text

    ansi = draw(render(state), force_terminal=True, color_system="standard")
    assert "\x1b[31m11.20/12.00 GiB (93%)" in ansi  # red

    roomy = MemoryStats(device="cuda", allocated=2 * GIB, reserved=3 * GIB, peak=3 * GIB, total=12 * GIB)
    ansi = draw(render(state_after([step_event(1, roomy)])), force_terminal=True, color_system="standard")
    assert "\x1b[32m3.00/12.00 GiB (25%)" in ansi  # green


def test_memory_colour_thresholds():
    assert memory_colour(0.50) == "green"
    assert memory_colour(0.80) == "yellow"
    assert memory_colour(0.95) == "red"


def test_heat_map_shows_ranks_per_layer_and_falls_back_to_blocks_when_narrow():
    ranks = start_ranks()
    ranks[K0], ranks[UP1] = 1, 7
    lines = [line.rstrip() for line in draw(RankHeatMap(ranks), width=60).splitlines()]
    assert "q     4 4" in lines
    assert "k     1 4" in lines
    assert "up    4 7" in lines
    assert any("max rank 7" in line for line in lines)

    wide = start_ranks(layers=32)
    wide["model.layers.31.mlp.up_proj"] = 8
    lines = [line.rstrip() for line in draw(RankHeatMap(wide), width=50).splitlines()]
    up_row = next(line for line in lines if line.startswith("up "))
    cells = up_row.split()[1]
    assert len(cells) == 32  # one block per layer
    assert cells[-1] == "█" and set(cells[:-1]) == {"▒"}  # 4 of 8 is the second quarter


def test_sparkline_keeps_the_last_losses():
    assert sparkline([3.0, 2.0, 1.0], 10) == "█▅▁"
    assert sparkline([1.0, 1.0], 10) == "▄▄"
    assert len(sparkline(range(100), 40)) == 40
    state = state_after([step_event(s) for s in range(1, 51)])
    assert len(state.losses) == dashboard.LOSS_WINDOW == 40
    assert state.losses[0] == pytest.approx(3.0 - 0.1 * 11)


def test_the_next_reallocation_shown_is_the_one_the_events_name():
    resumed = RunStarted(
        model="tiny",
        method="l1ra",
        output_dir="runs/t",
        total_steps=100,
        steps_per_epoch=50,
        budget=56,
        ranks=start_ranks(),
        update_every=20,
        next_update=40,
        device="cpu",
        start_step=25,
    )
    assert state_after([resumed]).next_update == 40
    assert "step 40" in draw(render(state_after([resumed])))
    last = Reallocated(step=80, budget=56, pruned={}, added={}, ranks=start_ranks(), next_update=None, seconds=0.0)
    assert "none left" in draw(render(state_after([resumed, last])))


def test_plain_lines_when_the_console_is_not_a_terminal():
    out = io.StringIO()
    console = Console(file=out, width=80)
    assert not console.is_terminal
    events = scripted_events() + [RunFinished(step=100, output_dir="runs/tiny", adapter_dir="runs/tiny/adapter")]
    with open_display(plain=False, console=console) as report:
        for event in events:
            report(event)
    lines = out.getvalue().splitlines()

    assert lines[0].startswith("run l1ra on tiny (cpu): 100 steps, 14 adapters, budget 56")
    step_lines = [line for line in lines if line.startswith("step ")]
    assert len(step_lines) == 7  # one per logged step
    last = step_lines[-1]
    for part in (
        "step 7/100",
        "epoch 0.14",
        "loss 2.3000",
        "lr 2.00e-04",
        "tok/s 1,234",
        "rss 1.50 GiB",
        "adapter 5.00 MiB",
        "rank 56/56",
        "eta 03:06",
    ):
        assert part in last, part
    realloc = next(line for line in lines if line.startswith("realloc "))
    assert realloc.startswith(
        "realloc step 5: pruned 3, added 3, rank 56/56 (q 8 k 5 v 8 o 8 gate 8 up 11 down 8), next at step 10"
    )
    assert "eval step 7: loss 2.5000 ppl 12.18" in lines
    assert "checkpoint step 7: runs/tiny/checkpoint-7" in lines
    assert lines[-1].startswith("finished 100 steps") and "runs/tiny/adapter" in lines[-1]
    assert len(lines) == 1 + 7 + 1 + 1 + 1 + 1
    assert "╭" not in out.getvalue()  # no boxes: this is not a live screen


def test_plain_flag_wins_on_a_terminal_and_cuda_lines_show_the_card():
    out = io.StringIO()
    console = Console(file=out, width=80, force_terminal=True)
    cuda = MemoryStats(
        device="cuda", allocated=int(9.5 * GIB), reserved=int(11.2 * GIB), peak=int(10.9 * GIB), total=12 * GIB
    )
    with open_display(plain=True, console=console) as report:
        report(scripted_events()[0])
        report(step_event(1, cuda))
        report(RunFinished(step=1, output_dir="runs/tiny", adapter_dir="runs/tiny/adapter"))
    text = out.getvalue()
    assert "╭" not in text
    assert "mem 9.50 GiB alloc, 11.20 GiB reserved, peak 10.90/12.00 GiB" in text
    assert text.splitlines()[-1].startswith("finished 1 steps")


def test_live_report_only_updates_state_and_the_screen_is_drawn_elsewhere(monkeypatch):
    """report() must not render: every render on the caller's thread between the first
    and last report would slow the training loop."""
    real_render = dashboard.render
    render_threads: list[int] = []

    def counting_render(state):
        render_threads.append(threading.get_ident())
        return real_render(state)

    monkeypatch.setattr(dashboard, "render", counting_render)
    out = io.StringIO()
    console = Console(file=out, width=120, force_terminal=True)
    main = threading.get_ident()
    events = scripted_events() + [step_event(s) for s in range(8, 101)]
    events.append(RunFinished(step=100, output_dir="runs/tiny", adapter_dir="runs/tiny/adapter"))
    with open_display(plain=False, console=console) as report:
        before = render_threads.count(main)  # the first frame, drawn when the screen opens
        for event in events:
            report(event)
        after = render_threads.count(main)
    assert before >= 1
    assert after == before
    text = out.getvalue()
    assert "100/100" in text  # the last frame was drawn from the final state
    assert "rank budget" in text
    assert "finished 100 steps" in text.splitlines()[-1]
