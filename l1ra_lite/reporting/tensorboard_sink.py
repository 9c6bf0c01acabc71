"""Curves as TensorBoard event files in <run folder>/tensorboard/ (`tensorboard --logdir runs/x`)."""

from __future__ import annotations

import json
from pathlib import Path

from l1ra_lite.reporting.curves import Point

LOG_DIR = "tensorboard"
FLUSH_SECONDS = 10  # a live curve without a file write on every step


class TensorBoardSink:
    def __init__(self, run_dir: Path, start_step: int, config: dict):
        import numpy as np
        from torch.utils.tensorboard import SummaryWriter

        self._np = np
        # A resumed run logs again the steps after its checkpoint, which the interrupted
        # run may have logged already. purge_step makes TensorBoard's readers drop
        # everything the earlier files hold from that step on: one point per step.
        self.writer = SummaryWriter(
            str(run_dir / LOG_DIR), purge_step=start_step + 1 if start_step else None, flush_secs=FLUSH_SECONDS
        )
        self.log_dir = run_dir / LOG_DIR
        if not start_step:
            self.writer.add_text("config", "```\n" + json.dumps(config, indent=1) + "\n```", 0)

    def write(self, point: Point) -> None:
        for tag, value in point.scalars.items():
            self.writer.add_scalar(tag, value, point.step)
        for tag, values in point.histograms.items():
            self.writer.add_histogram(tag, self._np.asarray(values, dtype=self._np.float32), point.step)

    def flush(self) -> None:
        self.writer.flush()

    def close(self, failed: bool = False) -> None:
        self.writer.close()

    def where(self) -> str:
        return f"TensorBoard curves in {self.log_dir} (tensorboard --logdir {self.log_dir})"
