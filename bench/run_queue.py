"""Resumable benchmark runs, one `l1ra-lite finetune` process each, worked through by a
small queue (bench/lr_sweep.py and bench/paired.py).

A run folder is finished (adapter written after the last step), partial (a checkpoint to
resume from), stale (started, no checkpoint: start again) or absent. Started again, a
queue skips finished runs, resumes partial ones with `finetune --resume` and starts the
rest; `--jobs N` runs N at once. A stop signal (SIGTERM, Ctrl-C) is passed on to the runs
in progress, which write a checkpoint and exit. Each attempt (start / resume / restart,
steps, exit code, wall and CPU time, load) goes to `<name>.attempts.json` beside the run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

from bench import run
from bench.summary import read_metrics

# ---------------------------------------------------------------- a run folder


def resume_command(run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "l1ra_lite", "finetune", "--resume", str(run_dir), "--plain"]


def run_state(run_dir: Path) -> dict[str, Any]:
    """What a run folder holds: status "finished" (adapter written after the last step),
    "partial" (a checkpoint to resume from), "stale" (started, no checkpoint: start
    again) or "absent"; the steps done and the total."""
    config_path = run_dir / "config.json"
    if not config_path.exists():
        return {"status": "absent" if not run_dir.exists() else "stale", "steps_done": 0, "total_steps": None}
    config = json.loads(config_path.read_text(encoding="utf-8"))
    total = config.get("total_steps")
    metrics_path = run_dir / "metrics.jsonl"
    lines = read_metrics(metrics_path) if metrics_path.exists() else []
    done = lines[-1]["step"] if lines else 0
    if total and done >= total and (run_dir / "adapter" / "adapter_config.json").exists():
        status = "finished"
    elif (run_dir / "latest").exists() or any(run_dir.glob("checkpoint-*")):
        status = "partial"
    else:
        status = "stale"
    return {"status": status, "steps_done": done, "total_steps": total}


def training_now(run_dir: Path) -> Optional[int]:
    """The pid of a live `l1ra_lite finetune` process that trains `run_dir` (Linux: read
    from /proc; elsewhere None)."""
    target = str(run_dir)
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if "l1ra_lite" in args and "finetune" in args and target in args:
            return int(cmdline.parent.name)
    return None


def _attempts_path(runs_dir: Path, name: str) -> Path:
    return runs_dir / f"{name}.attempts.json"


def read_attempts(runs_dir: Path, name: str) -> list[dict[str, Any]]:
    path = _attempts_path(runs_dir, name)
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else []


# ---------------------------------------------------------------- the queue


class Stop:
    """SIGTERM / SIGINT: pass it on to the runs in progress (each checkpoints and exits),
    then stop the sweep."""

    def __init__(self, tag: str = "bench"):
        self.tag = tag
        self.requested = False
        self.children: set[subprocess.Popen] = set()

    def install(self) -> None:
        self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}

    def uninstall(self) -> None:
        for s, handler in getattr(self, "previous", {}).items():
            signal.signal(s, handler)

    def handle(self, signum, frame) -> None:
        self.requested = True
        for child in list(self.children):
            if child.returncode is None:
                try:
                    child.send_signal(signal.SIGTERM)
                except ProcessLookupError:
                    pass
        print(f"{self.tag}: stopping; the runs in progress write a checkpoint", file=sys.stderr, flush=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def take_lock(folder: Path, tag: str = "bench") -> Path:
    """One queue at a time per folder: two would train the same run folder at once. The
    lock holds the queue's pid and its runs' (a run outlives a queue killed with SIGKILL)."""
    lock = folder / "lock"
    if lock.exists():
        try:
            pids = [int(x) for x in lock.read_text().split()]
        except ValueError:
            pids = []
        busy = [pid for pid in pids if pid != os.getpid() and _alive(pid)]
        if busy:
            raise SystemExit(
                f"{tag}: another queue or its run (pid {', '.join(map(str, busy))}) works in "
                f"{folder}; wait for it or stop it (kill {busy[0]}: a run writes a checkpoint)"
            )
    write_lock(lock)
    return lock


def write_lock(lock: Path, children: tuple[int, ...] = ()) -> None:
    lock.write_text(" ".join(str(pid) for pid in (os.getpid(), *children)) + "\n")


def train_one(
    name: str,
    start_command: list[str],
    runs_dir: Path,
    timeout_s: float,
    threads: Optional[int],
    stop: Stop,
    lock: Optional[Path] = None,
    tag: str = "bench",
) -> Optional[int]:
    """Bring the run `runs_dir / name` to the end: nothing if finished, resume it if it has
    a checkpoint, else start it with `start_command` (which must write into that folder).
    Returns the child's exit code (None if nothing ran). `tag` starts every line printed."""
    run_dir = runs_dir / name
    state = run_state(run_dir)
    if state["status"] == "finished":
        return None
    busy = training_now(run_dir)
    if busy is not None:  # e.g. the run of a sweep that was killed with SIGKILL
        print(f"{tag}: {name}: process {busy} trains it already; skipped", file=sys.stderr, flush=True)
        return None
    if state["status"] == "partial":
        cmd, kind = resume_command(run_dir), "resume"
    else:
        cmd, kind = list(start_command), "start"
        if state["status"] == "stale":
            cmd.append("--overwrite")
            kind = "restart"
    attempts = read_attempts(runs_dir, name)
    log_path = runs_dir / (f"{name}.log" if not attempts else f"{name}.{len(attempts)}.log")
    print(f"{tag}: {name}: {kind} at step {state['steps_done']}: {' '.join(cmd[1:])}", file=sys.stderr, flush=True)

    started_proc: list[subprocess.Popen] = []

    def started(proc: subprocess.Popen) -> None:
        started_proc.append(proc)
        stop.children.add(proc)
        if lock is not None:
            write_lock(lock, tuple(c.pid for c in stop.children))

    date = time.strftime("%Y-%m-%d %H:%M:%S")
    child = run.run_child(cmd, log_path, timeout_s, run.child_env(threads), on_start=started)
    stop.children.difference_update(started_proc)
    after = run_state(run_dir)
    attempts.append(
        {
            "date": date,
            "kind": kind,
            "from_step": state["steps_done"],
            "to_step": after["steps_done"],
            "returncode": child.returncode,
            "wall_s": round(child.wall_s, 1),
            "cpu_s": round(child.cpu_s, 1),
            "threads": threads,
            "load_average_end": list(os.getloadavg()),
            "log": log_path.name,
        }
    )
    _attempts_path(runs_dir, name).write_text(json.dumps(attempts, indent=1) + "\n", encoding="utf-8")
    print(
        f"{tag}: {name}: exit {child.returncode} at step {after['steps_done']}/{after['total_steps']} "
        f"({child.wall_s:.0f} s, {child.cpu_s:.0f} s CPU)",
        file=sys.stderr,
        flush=True,
    )
    if child.returncode != 0 and not stop.requested:
        print(f"{tag}: {name} failed; last lines of {log_path}:\n{run.tail(log_path)}", file=sys.stderr, flush=True)
    return child.returncode


def work_through(
    runs: Iterable[Callable[[], Any]], jobs: int, stop: Stop, after_each: Callable[[], Any] = lambda: None
) -> None:
    """Call each of `runs` (each trains one run folder), `jobs` at a time, until all are
    done or a stop is requested; `after_each` (e.g. write the figures) runs after every one,
    never two at once."""
    pending = iter(runs)
    take_next = threading.Lock()

    def worker() -> None:
        while not stop.requested:
            with take_next:
                train = next(pending, None)
            if train is None:
                return
            train()
            with take_next:
                after_each()

    workers = [threading.Thread(target=worker) for _ in range(max(1, jobs))]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
