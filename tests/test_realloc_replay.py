"""bench/realloc_replay.py: rules replayed against the evidence a run logged."""

import json

from bench import realloc_replay
from tests.test_finetune import WINDOW, run


def test_replaying_the_rule_a_run_used_gives_the_moves_it_made(workdir, capsys):
    """The first event of a logged run saw exactly the evidence the run decided on, so
    replaying the same rule there cuts exactly the ranks the run cut."""
    settings = {**WINDOW, "realloc_rule": "paper", "shrink_until": 1.0, "l1_lambda": 2.0, "l1_kappa": 0.5}
    run_dir, _ = run(workdir, "logged", **settings)
    history = json.loads((run_dir / "ranks.json").read_text())["history"]
    threshold = realloc_replay.threshold_of(run_dir)
    replay = realloc_replay.replay_run(run_dir, realloc_replay.rules(threshold, 0.05, 4, 2, 0.1))
    assert [e["step"] for e in replay["paper"]["events"]] == [e["step"] for e in history]
    assert replay["paper"]["events"][0]["cut"] == sum(history[0]["pruned"].values())
    assert replay["paper"]["budget"] == 28
    assert set(replay) == {"paper", "importance", "relative-gate"}

    assert realloc_replay.main([str(run_dir), str(run_dir), "--json", str(run_dir / "replay.json")]) == 0
    out = capsys.readouterr().out
    assert "importance" in out and "gains in n of 2 runs" in out
    doc = json.loads((run_dir / "replay.json").read_text())
    assert len(doc["replays"]) == 2 and doc["replays"][0] == doc["replays"][1]


def test_a_run_without_a_gate_log_is_refused_in_one_line(tmp_path, capsys):
    import pytest

    with pytest.raises(SystemExit) as exit_:
        realloc_replay.read_events(tmp_path)
    assert "--log-gates" in str(exit_.value)
