"""Training curves in the tools people already use: `finetune --report-to tensorboard|wandb|all`.

A tracker is one more reader of the training events (l1ra_lite.events), beside the
dashboard and the metrics file: `open_trackers` yields a `report(event)` that turns each
event into a point (reporting.curves) and hands it to each sink (one module per tool).
The sinks start on RunStarted, when the run folder's config.json holds the resolved
settings to record with the curves. Nothing here drives training.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from l1ra_lite.errors import UserError
from l1ra_lite.events import CheckpointSaved, Event, Reporter, RunStarted
from l1ra_lite.reporting.curves import point_of

REPORT_TO = ("none", "tensorboard", "wandb", "all")
# backend -> (module to import, pip extra that brings it)
PACKAGES = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb")}
RUN_FOLDER_ENTRIES = ("tensorboard", "wandb", "wandb-run.json")  # what the sinks write in a run folder


def backends(report_to: str) -> list[str]:
    if report_to not in REPORT_TO:
        raise UserError(f"--report-to must be one of {', '.join(REPORT_TO)} (got {report_to!r})")
    return ["tensorboard", "wandb"] if report_to == "all" else [] if report_to == "none" else [report_to]


def check_installed(report_to: str) -> None:
    """Before training starts: one line naming what to install for each missing tool."""
    for backend in backends(report_to):
        module, extra = PACKAGES[backend]
        if importlib.util.find_spec(module) is None:
            raise UserError(
                f"--report-to {backend} needs the {module} package: pip install 'l1ra-lite[{extra}]' "
                f"(or pip install {module})"
            )


def _open_sink(backend: str, run_dir: Path, start_step: int, config: dict):
    if backend == "tensorboard":
        from l1ra_lite.reporting.tensorboard_sink import TensorBoardSink

        return TensorBoardSink(run_dir, start_step, config)
    from l1ra_lite.reporting.wandb_sink import WandbSink

    return WandbSink(run_dir, start_step, config)


class Trackers:
    """The sinks of one run, fed from its events."""

    def __init__(self, names: list[str], run_dir: Path):
        self.names, self.run_dir, self.sinks = names, run_dir, []

    def __call__(self, event: Event) -> None:
        if isinstance(event, RunStarted):
            self._start(event.start_step)
        point = point_of(event)
        for sink in list(self.sinks):
            try:
                if point is not None:
                    sink.write(point)
                if isinstance(event, CheckpointSaved):
                    sink.flush()  # the curves on disk reach at least as far as the checkpoint
            except Exception as err:  # a tracker that fails must not cost the training run
                self.sinks.remove(sink)
                print(f"l1ra-lite: {type(sink).__name__} stopped ({err}); training goes on", file=sys.stderr)

    def _start(self, start_step: int) -> None:
        try:
            config = json.loads((self.run_dir / "config.json").read_text())
        except (OSError, ValueError):
            config = {}
        for name in self.names:
            sink = _open_sink(name, self.run_dir, start_step, config)
            self.sinks.append(sink)
            print(f"l1ra-lite: {sink.where()}", file=sys.stderr, flush=True)

    def close(self, failed: bool) -> None:
        for sink in self.sinks:
            sink.close(failed)
        self.sinks = []


@contextmanager
def open_trackers(report_to: str, run_dir: Path) -> Iterator[Reporter]:
    """Yield `report(event)` for the trackers `report_to` names (a no-op for none); their
    files are complete when the block ends, also when training stopped on an error."""
    trackers = Trackers(backends(report_to), Path(run_dir))
    failed = True
    try:
        yield trackers
        failed = False
    finally:
        trackers.close(failed)


def fan_out(*reporters: Reporter) -> Reporter:
    """One reporter that hands each event to all of `reporters`, in order."""

    def report(event: Event) -> None:
        for reporter in reporters:
            reporter(event)

    return report
