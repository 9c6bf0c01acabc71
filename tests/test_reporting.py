"""`finetune --report-to`: the training events as TensorBoard / W&B curves, read back from
the files those tools write, across a crash and a resume (tiny model, no network)."""

import json
import math
import struct

import pytest

from l1ra_lite.cli import main
from l1ra_lite.events import Evaluated, GatesSampled, MemoryStats, Reallocated, RunStarted, StepLogged
from l1ra_lite.reporting import fan_out, open_trackers
from l1ra_lite.reporting.curves import point_of
from l1ra_lite.reporting.wandb_sink import choose_mode
from l1ra_lite.train import train
from tests.test_finetune import tiny_config

RANKS = {"model.layers.0.self_attn.q_proj": 3, "model.layers.0.mlp.up_proj": 2, "model.layers.1.self_attn.q_proj": 1}


def test_events_become_points_rank_per_type_moves_and_gate_histograms():
    started = RunStarted("m", "l1ra", "out", 10, 5, 6, RANKS, 3, 3, "cpu")
    assert point_of(started).step == 0 and point_of(started).scalars == {"rank/q_proj": 4.0, "rank/up_proj": 2.0}
    resumed = RunStarted("m", "l1ra", "out", 10, 5, 6, RANKS, 3, 6, "cpu", start_step=5)
    assert point_of(resumed) is None  # the run it continues recorded its ranks already

    moved = {**RANKS, "model.layers.0.self_attn.q_proj": 1, "model.layers.0.mlp.up_proj": 4}
    realloc = point_of(
        Reallocated(3, 6, {"model.layers.0.self_attn.q_proj": 2}, {"model.layers.0.mlp.up_proj": 2}, moved, 6, 0.25)
    )
    assert realloc.step == 3
    assert realloc.scalars == {"rank/q_proj": 2.0, "rank/up_proj": 4.0, "rank/moved": 2.0, "rank/realloc_seconds": 0.25}

    gates = point_of(GatesSampled(3, {p: (0.5,) * r for p, r in RANKS.items()}))
    assert gates.histograms == {"gates/q_proj": [0.5] * 4, "gates/up_proj": [0.5] * 2}

    cpu = MemoryStats("cpu", rss=2 * 1024**3, peak=3 * 1024**3)
    logged = point_of(StepLogged(4, 10, 0.8, float("nan"), 1e-3, 0.5, 100.0, 2.0, cpu, 1024**3, 6))
    assert "train/loss" not in logged.scalars  # a skipped step is no point, not a NaN
    assert logged.scalars["memory/rss_gib"] == 2.0 and logged.scalars["memory/peak_gib"] == 3.0
    assert logged.scalars["memory/adapter_gib"] == 1.0 and logged.scalars["train/tokens_per_s"] == 100.0
    assert "memory/allocated_gib" not in logged.scalars
    assert point_of(Evaluated(5, 1.0, math.e)).scalars == {"eval/loss": 1.0, "eval/perplexity": math.e}


@pytest.mark.parametrize(
    "env, reachable, mode",
    [
        ({"WANDB_MODE": "disabled"}, True, None),  # wandb reads the user's own setting
        ({}, False, "offline"),
        ({}, True, "online"),
    ],
)
def test_wandb_goes_offline_without_a_server_and_respects_wandb_mode(env, reachable, mode):
    assert choose_mode(env, lambda url: reachable) == mode


class Crash(Exception):
    pass


def crash_at(step):
    """A reporter that kills the run (as a power cut would) once step `step` is logged."""

    def report(event):
        if isinstance(event, StepLogged) and event.step == step:
            raise Crash

    return report


def crash_and_resume(workdir, name, report_to):
    """10 steps, checkpoints at 5 and 10; the first attempt dies after logging step 7, so
    the trackers saw steps 6 and 7 that the resumed run computes again."""
    run_dir = workdir / name
    run_dir.mkdir()
    config = tiny_config(workdir, report_to=report_to)
    with pytest.raises(Crash), open_trackers(report_to, run_dir) as track:
        train(config, run_dir, fan_out(track, crash_at(7)), device="cpu")
    assert json.loads((run_dir / "latest").read_text())["step"] == 5
    with open_trackers(report_to, run_dir) as track:
        train(config, run_dir, track, resume=True, device="cpu")
    return run_dir


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_tensorboard_event_files_hold_the_curves_once_per_step_across_a_resume(workdir):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = crash_and_resume(workdir, "tb", "tensorboard")
    assert len(list((run_dir / "tensorboard").glob("events.out.tfevents.*"))) == 2  # one per attempt
    curves = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "histograms": 0}).Reload()
    tags = curves.Tags()

    def steps(tag):
        return [e.step for e in curves.Scalars(tag)]

    assert steps("train/loss") == list(range(1, 11))  # 6 and 7 once each: the resumed run's
    expected = {m["step"]: m["loss"] for m in metrics(run_dir)}
    assert {e.step: e.value for e in curves.Scalars("train/loss")} == pytest.approx(expected, rel=1e-6)
    for tag in ("train/lr", "train/tokens_per_s", "memory/rss_gib", "rank/total"):
        assert steps(tag) == list(range(1, 11))
    assert steps("eval/loss") == steps("eval/perplexity") == [5, 10]
    assert steps("rank/q_proj") == [0, 3, 6, 9] and steps("rank/moved") == [3, 6, 9]
    ranks = json.loads((run_dir / "ranks.json").read_text())
    q_total = sum(r for p, r in ranks["ranks"].items() if p.endswith("q_proj"))
    assert curves.Scalars("rank/q_proj")[-1].value == q_total
    moved = [sum(h["pruned"].values()) for h in ranks["history"]]
    assert [e.value for e in curves.Scalars("rank/moved")] == moved and sum(moved) > 0
    gate_tags = [t for t in tags["histograms"] if t.startswith("gates/")]
    assert sorted(gate_tags) == sorted(
        f"gates/{t}" for t in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    )
    histograms = curves.Histograms("gates/q_proj")
    assert [h.step for h in histograms] == [3, 6, 9, 10]  # before each reallocation, and at the end
    assert 0 <= histograms[-1].histogram_value.min <= histograms[-1].histogram_value.max <= 1
    assert "config/text_summary" in tags["tensors"]  # the run's resolved settings, as text


# The .wandb file: LevelDB-log records (32 KiB blocks, 7-byte chunk headers) after a 7-byte
# file header, each a wandb Record protobuf. Read here without wandb's reader, which
# current wandb keeps in its Go core only.
BLOCK = 32 * 1024


def wandb_records(path):
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:  # block trailer: padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if length == 0 and kind == 0:
            pos += left
            continue
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a whole record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def test_wandb_offline_run_holds_the_curves_and_config_and_a_resume_continues_it(workdir, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = crash_and_resume(workdir, "wb", "wandb")
    files = sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 2  # one per attempt, under one run id
    run_ids, config, rows = set(), {}, []
    for path in files:
        for record in wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run_ids.add(record.run.run_id)
                config.update({item.key: json.loads(item.value_json) for item in record.run.config.update})
            elif kind == "history":
                rows.append(
                    {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
                )
    assert len(run_ids) == 1 and run_ids == {json.loads((run_dir / "wandb-run.json").read_text())["id"]}
    assert config["budget"] == 28 and config["total_steps"] == 10 and config["report_to"] == "wandb"
    steps = [row["_step"] for row in rows]
    assert steps == sorted(set(steps)) == list(range(0, 11))  # no step twice across the two attempts
    by_step = {row["_step"]: row for row in rows}
    assert {s: by_step[s]["train/loss"] for s in range(1, 11)} == pytest.approx(
        {m["step"]: m["loss"] for m in metrics(run_dir)}, rel=1e-6
    )
    assert "eval/loss" in by_step[5] and "eval/perplexity" in by_step[10] and "eval/loss" not in by_step[4]
    assert all(f"rank/{t}" in by_step[0] for t in ("q_proj", "down_proj"))
    assert [s for s in by_step if "rank/moved" in by_step[s]] == [3, 6, 9]
    assert [s for s in by_step if "gates/q_proj/_type" in by_step[s]] == [3, 6, 9, 10]
    assert by_step[3]["gates/q_proj/_type"] == "histogram"
    for key in ("train/lr", "train/tokens_per_s", "memory/rss_gib"):
        assert all(key in by_step[s] for s in range(1, 11))


def test_report_to_without_the_package_says_what_to_install(workdir, monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    out = workdir / "no-wandb"
    code = main(
        [
            "finetune",
            "--model",
            str(workdir / "base"),
            "--data",
            str(workdir / "data.jsonl"),
            "--output",
            str(out),
            "--report-to",
            "wandb",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "pip install 'l1ra-lite[wandb]'" in err[0] and "Traceback" not in err[0]
    assert not out.exists()  # refused before anything was made


def test_finetune_report_to_tensorboard_from_the_command_line(workdir, capsys):
    pytest.importorskip("tensorboard")
    out = workdir / "cli-tb"
    args = ["finetune", "--model", str(workdir / "base"), "--data", str(workdir / "data.jsonl"), "--output", str(out)]
    args += ["--quant", "none", "--max-steps", "2", "--seq-len", "64", "--batch-size", "2", "--grad-accum", "1"]
    assert main(args + ["--plain", "--report-to", "tensorboard"]) == 0
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert f"TensorBoard curves in {out / 'tensorboard'}" in capsys.readouterr().err


def test_a_tracker_that_fails_is_dropped_and_training_goes_on(tmp_path, capsys):
    from l1ra_lite.reporting import Trackers

    class Broken:
        def write(self, point):
            raise OSError("disk full")

    class Kept:
        points = []

        def write(self, point):
            self.points.append(point.step)

    trackers = Trackers([], tmp_path)
    trackers.sinks = [Broken(), Kept()]
    for step in (1, 2):
        trackers(Evaluated(step, 1.0, math.e))
    assert Kept.points == [1, 2] and len(trackers.sinks) == 1
    assert "Broken stopped (disk full); training goes on" in capsys.readouterr().err
