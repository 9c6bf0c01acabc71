"""Curves in Weights & Biases: online where it can be reached, else an offline run in
<run folder>/wandb/ that `wandb sync` uploads later. WANDB_MODE, WANDB_PROJECT,
WANDB_ENTITY and WANDB_BASE_URL are wandb's own settings and are respected."""

from __future__ import annotations

import json
import os
import secrets
import socket
import sys
from pathlib import Path
from typing import Callable, Mapping, Optional
from urllib.parse import urlparse

from l1ra_lite.atomic import write_json_atomic
from l1ra_lite.reporting.curves import Point

STATE_FILE = "wandb-run.json"  # {"id": the W&B run id, "last_step": the newest step sent to it}
DEFAULT_PROJECT = "l1ra-lite"
PROBE_SECONDS = 2.0


def server_reachable(base_url: str) -> bool:
    """Whether a TCP connection to the W&B server opens within PROBE_SECONDS."""
    parsed = urlparse(base_url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname or "", port), timeout=PROBE_SECONDS):
            return True
    except OSError:
        return False


def choose_mode(env: Mapping[str, str], reachable: Callable[[str], bool] = server_reachable) -> Optional[str]:
    """None (wandb reads WANDB_MODE itself) when the user set it; else online when the
    server answers, offline when it does not: a run without network still keeps its curves."""
    if env.get("WANDB_MODE"):
        return None
    return "online" if reachable(env.get("WANDB_BASE_URL", "https://api.wandb.ai")) else "offline"


def read_state(run_dir: Path) -> dict:
    try:
        state = json.loads((run_dir / STATE_FILE).read_text())
        return state if isinstance(state, dict) and state.get("id") else {}
    except (OSError, ValueError):
        return {}


class WandbSink:
    def __init__(self, run_dir: Path, start_step: int, config: dict):
        import wandb

        self.run_dir = run_dir
        # A resumed run continues the same W&B run (same id, same step axis). The run
        # being resumed may have sent steps past its checkpoint before it stopped; they
        # are not sent again (the resumed run computes them exactly alike).
        state = read_state(run_dir) if start_step else {}
        self.run_id = state.get("id") or secrets.token_hex(4)
        self.sent_before = int(state.get("last_step", -1))  # steps up to this one are in W&B already
        self.last_step = self.sent_before
        settings = wandb.Settings(console="off", silent=True)  # the dashboard owns the terminal
        common = dict(
            project=os.environ.get("WANDB_PROJECT", DEFAULT_PROJECT),
            name=run_dir.name,
            id=self.run_id,
            resume="allow",
            dir=str(run_dir),
            config=config,
            allow_val_change=True,  # a resume may change the batch split or the intervals
            settings=settings,
        )
        mode = choose_mode(os.environ)
        try:
            self.run = wandb.init(mode=mode, **common)
        except Exception as err:  # not logged in, server refused: the curves still go to disk
            if mode == "offline":
                raise
            print(f"l1ra-lite: W&B online failed ({str(err).splitlines()[0]}); logging offline", file=sys.stderr)
            self.run = wandb.init(mode="offline", **common)
        self._wandb = wandb
        self._save_state()

    def _save_state(self) -> None:
        write_json_atomic(self.run_dir / STATE_FILE, {"id": self.run_id, "last_step": self.last_step})

    def write(self, point: Point) -> None:
        if point.step <= self.sent_before:
            return
        if point.step > self.last_step:
            self.last_step = point.step
            self._save_state()
        data: dict = dict(point.scalars)
        data.update({tag: self._wandb.Histogram(values) for tag, values in point.histograms.items()})
        self.run.log(data, step=point.step)

    def flush(self) -> None:
        pass  # wandb's own process writes as it receives

    def close(self, failed: bool = False) -> None:
        self.run.finish(exit_code=1 if failed else 0)

    def where(self) -> str:
        folder = Path(self.run.dir).parent
        if self.run.settings.mode == "offline":
            return f"W&B run {self.run_id} offline in {folder} (upload it with: wandb sync {folder})"
        return f"W&B run {self.run.url or self.run_id}"
