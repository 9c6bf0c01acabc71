"""The benchmark's own arithmetic and plumbing (bench/): medians, ratios, targets, the
per-child peak memory, recipe selection, and the GPU script's code path on a tiny CPU
model. No timing is asserted."""

import io
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the repository root: `bench` package

from bench import gpu_bench, gpu_checks, lr_sweep, run, run_queue, seeds, seen_unseen  # noqa: E402
from bench.summary import (  # noqa: E402
    check_targets,
    compare,
    method_figures,
    ranks_by_type,
    read_final_ranks,
    read_metrics,
    results_document,
)

RANKS = {
    "model.layers.0.self_attn.q_proj": 3,
    "model.layers.0.mlp.up_proj": 5,
    "model.layers.1.self_attn.q_proj": 2,
    "model.layers.1.mlp.up_proj": 6,
}


def metrics(step_times, realloc=None, adapter_bytes=1000, evals=None, peak=None, cpu=None):
    """Fixture metric lines: step i (1-based) took step_times[i-1] seconds (cpu times that
    in CPU seconds, where given)."""
    lines = []
    for i, s in enumerate(step_times, start=1):
        line = {
            "step": i,
            "loss": 1.0,
            "lr": 1e-4,
            "step_s": s,
            "tokens_per_s": 100 / s,
            "mem_bytes": 1000 + i,
            "adapter_bytes": adapter_bytes + i,
            "rank_total": 16,
        }
        if realloc and i in realloc:
            line["realloc_s"] = realloc[i]
        if evals and i in evals:
            line["eval_loss"] = evals[i]
            line["eval_ppl"] = 2.718 ** evals[i]
        if peak:
            line["peak_bytes"] = peak + i
        if cpu:
            line["step_cpu_s"] = cpu * s
        lines.append(line)
    return lines


def test_medians_leave_out_warmup_and_the_reallocations_own_time():
    # steps 1-2 are warm-up (slow); steps 4 and 6 reallocated (their step_s includes it)
    lines = metrics([9.0, 5.0, 1.0, 1.5, 2.0, 1.6, 3.0], realloc={4: 0.5, 6: 0.1}, evals={7: 1.25})
    f = method_figures("l1ra", lines, RANKS, child_peak_bytes=4096, warmup_steps=2, wall_s=12.0)
    assert f.timed_steps == 5  # steps 3-7
    assert f.step_times == pytest.approx({3: 1.0, 4: 1.0, 5: 2.0, 6: 1.5, 7: 3.0})
    assert f.median_step_s == pytest.approx(1.5)
    assert f.mean_step_s == pytest.approx((1.0 + 1.5 + 2.0 + 1.6 + 3.0) / 5)  # reallocations included
    assert f.median_tokens_per_s == pytest.approx(62.5)  # median of 100, 66.7, 50, 62.5, 33.3
    assert f.reallocations == 2
    assert f.median_realloc_s == pytest.approx(0.3)
    assert f.realloc_fraction == pytest.approx(0.2)
    assert f.trainable_state_bytes == 1007  # the last line
    assert (f.peak_bytes, f.peak_source) == (4096, "child_rusage")
    assert f.train_mem_max_bytes == 1007
    assert (f.eval_loss, f.eval_curve) == (1.25, [(7, 1.25)])
    assert f.rank_total == 16
    assert f.ranks_by_type == {"q_proj": 5, "up_proj": 11}


def test_cuda_peak_from_metrics_wins_over_the_process_rss():
    f = method_figures("lora", metrics([1, 1, 1, 1], peak=10_000), RANKS, child_peak_bytes=5)
    assert (f.peak_bytes, f.peak_source) == (10_004, "metrics_peak_bytes")
    assert f.median_realloc_s is None and f.realloc_fraction is None


def test_step_cpu_time_when_the_loop_logs_it():
    lines = metrics([5, 5, 2.0, 3.0, 2.5])
    for line, cpu in zip(lines, [4, 4, 1.0, 1.2, 1.1]):
        line["step_cpu_s"] = cpu
    lora = method_figures("lora", lines, RANKS, process_cpu_s=100.0)
    assert lora.median_step_cpu_s == pytest.approx(1.1)
    for line in lines:
        line["step_cpu_s"] *= 1.1
    l1ra = method_figures("l1ra", lines, RANKS, process_cpu_s=103.0)
    r = compare({"lora": lora, "l1ra": l1ra})
    assert r["step_cpu_time_l1ra_over_lora"] == pytest.approx(1.1)
    assert r["process_cpu_time_l1ra_over_lora"] == pytest.approx(1.03)
    assert method_figures("lora", metrics([1, 1, 1]), RANKS).median_step_cpu_s is None


def test_a_run_too_short_for_the_warmup_is_refused():
    with pytest.raises(ValueError, match="no step after"):
        method_figures("lora", metrics([1.0, 1.0]), RANKS, warmup_steps=2)


def test_step_time_ratio_is_paired_by_step():
    """Same batches, different lengths: the paired ratio is the per-step factor, and one
    step disturbed by another job does not move it."""
    batch_cost = [3, 3, 1.0, 4.0, 1.0, 4.0, 4.0, 1.0, 4.0]
    lora = method_figures("lora", metrics(batch_cost), RANKS)
    l1ra_times = [1.02 * t for t in batch_cost]
    l1ra_times[5] *= 10  # a hiccup on step 6
    l1ra = method_figures("l1ra", metrics(l1ra_times), RANKS)
    r = compare({"lora": lora, "l1ra": l1ra})
    assert r["step_time_l1ra_over_lora"] == pytest.approx(1.02)
    assert r["median_step_l1ra_over_lora"] == pytest.approx(1.02)
    shorter = method_figures("l1ra", metrics(l1ra_times[:5]), RANKS)  # only steps 3-5 in common
    assert compare({"lora": lora, "l1ra": shorter})["step_time_l1ra_over_lora"] == pytest.approx(1.02)


def test_ratios_and_targets():
    lora = method_figures(
        "lora", metrics([5, 5, 2.0, 2.0, 2.0], adapter_bytes=1000, evals={5: 1.50}), RANKS, child_peak_bytes=1000
    )
    l1ra = method_figures(
        "l1ra",
        metrics([5, 5, 2.1, 0.9 + 2.1, 2.1], realloc={4: 0.9}, adapter_bytes=1200, evals={5: 1.40}),
        RANKS,
        child_peak_bytes=1010,
    )
    adalora = method_figures(
        "adalora", metrics([5, 5, 3.0, 3.0, 3.0], adapter_bytes=2000, evals={5: 1.6}), RANKS, child_peak_bytes=1100
    )
    r = compare({"lora": lora, "l1ra": l1ra, "adalora": adalora})
    assert r["step_time_l1ra_over_lora"] == pytest.approx(1.05)
    assert r["step_time_adalora_over_lora"] == pytest.approx(1.5)
    assert r["mean_step_time_l1ra_over_lora"] == pytest.approx((2.1 + 3.0 + 2.1) / 3 / 2.0)
    assert r["realloc_over_step"] == pytest.approx(0.9 / 2.1)
    assert r["trainable_state_l1ra_over_adalora"] == pytest.approx(1205 / 2005)
    assert r["trainable_state_l1ra_over_lora"] == pytest.approx(1205 / 1005)
    assert r["peak_memory_l1ra_over_lora"] == pytest.approx(1.01)
    assert r["eval_loss_l1ra_minus_lora"] == pytest.approx(-0.10)

    full = check_targets(r, full_run=True)
    assert full["step_time_l1ra_over_lora"]["met"] is True  # 1.05 <= 1.05
    assert full["realloc_over_step"]["met"] is True
    assert full["trainable_state_l1ra_over_adalora"]["met"] is True
    assert full["peak_memory_l1ra_over_lora"]["met"] is True
    assert full["eval_loss_l1ra_minus_lora"]["met"] is True
    assert check_targets(r, full_run=False)["eval_loss_l1ra_minus_lora"]["met"] is None  # quick: not judged

    slow = compare({"lora": lora, "l1ra": method_figures("l1ra", metrics([5, 5, 2.2, 2.2, 2.2]), RANKS)})
    checks = check_targets(slow, full_run=True)
    assert checks["step_time_l1ra_over_lora"]["met"] is False
    assert checks["trainable_state_l1ra_over_adalora"]["met"] is None  # no AdaLoRA run


def test_seeds_pair_every_variant_with_lora_and_count_the_rank_moved(tmp_path):
    runs = tmp_path / "runs"
    for variant, seed, loss, cpu in (
        ("lora", 42, 1.40, 2.0),
        ("lora", 43, 1.50, 2.0),
        ("l1ra-importance", 42, 1.43, 2.1),
    ):
        write_run(runs / seeds.run_name(variant, seed), 300, checkpoint=True, adapter=True, evals={300: loss}, cpu=cpu)
    write_run(runs / "l1ra-importance-s43", 200, checkpoint=True, evals={150: 1.6})  # unfinished: not paired
    before = {"l.0.q_proj": 4, "l.0.k_proj": 4, "l.0.up_proj": 4, "l.1.up_proj": 4}
    moved = [
        {"step": 30, "pruned": {"l.0.k_proj": 2}, "added": {"l.0.up_proj": 2}},
        {"step": 200, "pruned": {"l.0.up_proj": 1, "l.0.q_proj": 1}, "added": {"l.1.up_proj": 2}},
    ]
    ranks = dict(before)
    for event in moved:  # each event records the ranks after it
        for p, n in event["pruned"].items():
            ranks[p] -= n
        for p, n in event["added"].items():
            ranks[p] += n
        event["ranks"] = dict(ranks)
    (runs / "l1ra-importance-s42" / "ranks.json").write_text(
        json.dumps({"budget": 16, "ranks": ranks, "history": moved})
    )
    records = [seeds.run_record(v, s, runs) for s in (42, 43) for v in ("lora", "l1ra-importance")]
    table = seeds.compare(records, ["lora", "l1ra-importance"], [42, 43])
    mine = table["l1ra-importance"]
    assert mine["minus_lora"] == {42: pytest.approx(0.03)} and mine["paired_seeds"] == 1
    assert mine["eval_loss"] == {42: 1.43, 43: None} and mine["at_or_below_lora"] == 0
    assert table["lora"]["mean"] == pytest.approx(1.45) and table["lora"]["minus_lora"] == {42: 0.0, 43: 0.0}
    m = records[1]["moves"]
    assert (m["cut"], m["cut_by_60pct"], m["moved"]) == (4, 2, 3)  # 60% of 300 steps: step 180
    assert m["net_by_type"] == {"k": -2, "q": -1, "up": 3} and mine["gains_in_seeds"] == {"k": 0, "q": 0, "up": 1}
    doc = {"seeds": [42, 43], "variants": ["lora", "l1ra-importance"], "compare": table, "runs": records}
    text = seeds.render(doc)
    assert "| 42 | 1.4000 | 1.4300 |" in text and "| 43 | 1.5000 | - |" in text
    assert mine["step_cpu_over_lora"] == pytest.approx(1.05) and records[1]["speed"]["median_step_s"] == 1.0
    assert "l1ra-importance - lora: +0.0300 over 1 paired seeds; at or below LoRA in 0 of 1; step CPU time" in text
    assert "seed 42: 4 ranks cut (2 by 60% of the run), 3 of 16 moved on net: k -2, q -1, up +3" in text


def test_seed_variants_are_the_bench_command_with_their_own_options(tmp_path):
    args, rest = seeds.parse_args(["--variants", "lora-at-importance-layout,l1ra-importance-half", "--steps", "5"])
    assert args.variants == ["lora", "l1ra-importance", "lora-at-importance-layout", "l1ra-importance-half"]
    assert rest == ["--steps", "5"] and args.seeds == [42, 43, 44, 45, 46]
    settings = run.bench_settings(run.parse_args([]), 210)
    half = seeds.finetune_command("l1ra-importance-half", 43, settings, tmp_path, 25)
    assert half[half.index("--output") + 1] == str(tmp_path / "l1ra-importance-half-s43")
    assert half[-2:] == ["--budget", "420"] and "--log-gates" in half and half[half.index("--seed") + 1] == "43"
    layout = seeds.finetune_command("lora-at-importance-layout", 42, settings, tmp_path, 25)
    assert layout[layout.index("--method") + 1] == "lora"
    assert layout[-2:] == ["--ranks-from", str(tmp_path / "l1ra-importance-s42")]
    frozen = seeds.finetune_command("l1ra-frozen-at-importance-layout", 42, settings, tmp_path, 25)
    assert frozen[frozen.index("--method") + 1] == "l1ra" and frozen[-2:] == layout[-2:]
    assert frozen[frozen.index("--eta-c") + 1] == "1e-9" and frozen[frozen.index("--l1-lambda") + 1] == "1e-9"
    with pytest.raises(SystemExit, match="set by this script"):
        seeds.main(["--seed", "1"])
    with pytest.raises(SystemExit, match="comma-separated integers"):
        seeds.main(["--seeds", "a,b"])
    with pytest.raises(SystemExit, match="unknown: \\['nope'\\]"):
        seeds.main(["--variants", "nope"])


def test_a_tiny_seed_table_trains_the_layout_control_after_its_source(tmp_path):
    from tests.tiny import save_tiny_base

    save_tiny_base(tmp_path / "base")
    data = tmp_path / "data.jsonl"
    data.write_text(
        "".join(json.dumps({"prompt": f"What is {i} plus {i}?", "completion": f"{2 * i}."}) + "\n" for i in range(60))
    )
    results = tmp_path / "seeds.json"
    args = ["--runs-dir", str(tmp_path / "runs"), "--results", str(results), "--seeds", "3", "--threads", "1"]
    args += ["--variants", "lora-at-importance-layout", "--model", str(tmp_path / "base"), "--data", str(data)]
    args += ["--quant", "none", "--steps", "6", "--seq-len", "48", "--update-every", "2", "--budget", "28"]
    assert seeds.main(args) == 0
    doc = json.loads(results.read_text())
    assert [(r["name"], r["status"]) for r in doc["runs"]] == [
        ("lora-s3", "finished"),
        ("l1ra-importance-s3", "finished"),
        ("lora-at-importance-layout-s3", "finished"),
    ]
    source = json.loads((tmp_path / "runs" / "l1ra-importance-s3" / "ranks.json").read_text())["ranks"]
    control = json.loads((tmp_path / "runs" / "lora-at-importance-layout-s3" / "ranks.json").read_text())["ranks"]
    assert control == source
    assert doc["compare"]["lora-at-importance-layout"]["paired_seeds"] == 1


def test_results_document_and_table(tmp_path):
    figures = {
        m: method_figures(m, metrics([3, 3, 1.0, 1.0], evals={4: 2.0}), RANKS, child_peak_bytes=2**30)
        for m in ("lora", "l1ra", "adalora")
    }
    settings = {
        "mode": "quick",
        "steps": 4,
        "batch_size": 4,
        "seq_len": 128,
        "budget": 16,
        "n_adapters": 4,
        "quant": "nf4",
    }
    doc = results_document(settings, {"device": "cpu"}, figures, full_run=False)
    text = json.dumps(doc)  # JSON-ready
    assert json.loads(text)["ratios"]["step_time_l1ra_over_lora"] == 1.0
    assert set(doc["methods"]) == {"lora", "l1ra", "adalora"}
    assert doc["methods"]["l1ra"]["ranks_by_type"] == {"q_proj": 5, "up_proj": 11}

    from rich.console import Console

    console = Console(file=io.StringIO(), width=200)
    console.print(run.render_table(doc))
    out = console.file.getvalue()
    assert "L1RA/LoRA, paired 1.000 (<= 1.05) ok" in out
    assert "rank up_proj" in out and "1,024.0" in out  # peak memory in MiB


def test_reading_a_run_folder(tmp_path):
    lines = metrics([1.0, 2.0])
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\nnot json\n[1]\n")
    (tmp_path / "ranks.json").write_text(json.dumps({"budget": 16, "ranks": RANKS, "history": []}))
    assert read_metrics(tmp_path / "metrics.jsonl") == lines
    assert read_final_ranks(tmp_path / "ranks.json") == RANKS
    assert ranks_by_type({}) == {}


def without_own_settings(cmd):
    """A bench command less its method-specific part: --method, --lr, --alpha and their values."""
    out, skip = [], False
    for arg in cmd:
        if skip:
            skip = False
        elif arg in ("--method", "--lr", "--alpha"):
            skip = True
        else:
            out.append(arg)
    return out


def test_settings_and_commands_differ_only_in_the_method_and_its_own_lr_and_alpha(tmp_path):
    args = run.parse_args(["--quick"])
    settings = run.bench_settings(args, n_adapters=210)
    assert (settings["budget"], settings["steps"], settings["seq_len"]) == (840, 16, 128)
    cmds = {m: run.finetune_command(m, settings, tmp_path / "x") for m in run.METHODS}
    for m, cmd in cmds.items():
        assert cmd[cmd.index("--method") + 1] == m
        assert float(cmd[cmd.index("--lr") + 1]) == run.METHOD_DEFAULTS[m]["lr"]
        assert without_own_settings(cmd) == without_own_settings(cmds["lora"])
    assert "--alpha" not in cmds["lora"]  # finetune's default: the mean rank
    assert float(cmds["adalora"][cmds["adalora"].index("--alpha") + 1]) == 16.0
    assert "--budget" in cmds["l1ra"] and cmds["l1ra"][cmds["l1ra"].index("--budget") + 1] == "840"
    with pytest.raises(SystemExit, match="not a multiple"):
        run.bench_settings(run.parse_args(["--budget", "500"]), n_adapters=210)


def test_peak_memory_is_measured_per_child(tmp_path):
    """Each child's own high-water mark, not the largest of all children so far."""
    env = run.child_env(1)
    big = run.run_child(
        [sys.executable, "-c", "b = bytearray(300 * 2**20); b[::4096] = b'x' * len(b[::4096])"],
        tmp_path / "big.log",
        60,
        env,
    )
    small = run.run_child([sys.executable, "-c", "pass"], tmp_path / "small.log", 60, env)
    assert big.returncode == 0 and small.returncode == 0
    assert big.peak_rss_bytes > 300 * 2**20
    assert big.cpu_s > 0 and big.wall_s >= big.cpu_s / 2  # one thread (and a little system time)
    # ru_maxrss of a child can carry the size of a large parent (here pytest with torch
    # loaded) across exec, so the benchmark prefers the peak the child logs itself
    # (metrics' peak_bytes, VmHWM) and keeps this only as a fallback.
    assert small.peak_rss_bytes > 0
    failed = run.run_child([sys.executable, "-c", "raise SystemExit(3)"], tmp_path / "f.log", 60, env)
    assert failed.returncode == 3


def test_each_method_gets_its_own_lr_and_alpha_from_the_command_line():
    own = run.method_settings(["adalora=1e-3", "lora = 5e-4"], ["l1ra=8"])
    assert own["adalora"] == {"lr": 1e-3, "alpha": 16.0}
    assert own["lora"] == {"lr": 5e-4, "alpha": None}
    assert own["l1ra"] == {"lr": run.METHOD_DEFAULTS["l1ra"]["lr"], "alpha": 8.0}
    assert run.METHOD_DEFAULTS["adalora"]["lr"] == 1e-2  # untouched
    for bad, message in ((["dora=1e-3"], "unknown method"), (["lora=fast"], "METHOD=NUMBER"), (["lora=0"], "positive")):
        with pytest.raises(SystemExit, match=message):
            run.method_settings(bad, [])


def test_the_bench_alpha_of_adalora_is_its_authors():
    from l1ra_lite.baselines import ADALORA_ALPHA

    assert run.METHOD_DEFAULTS["adalora"]["alpha"] == ADALORA_ALPHA


# ---------------------------------------------------------------- bench/lr_sweep.py


def _keys(rows):
    return [json.dumps(r.get("messages", r.get("text")), sort_keys=True) for r in rows]


@pytest.mark.parametrize("seed", [42, 43])
def test_the_sweep_never_uses_a_row_of_the_final_tables_eval_split(tmp_path, seed):
    """The sweep trains and validates on the training rows of the bench's standard split
    (the embedded corpus), and what it holds out as validation is again a part of those."""
    from l1ra_lite.data import load_rows, split_rows

    rows, _ = load_rows(None, skip_bad_rows=True)
    train, held_out = split_rows(rows, lr_sweep.EVAL_FRACTION, 200, seed)
    info = lr_sweep.write_sweep_data(tmp_path / "rows.jsonl", None, lr_sweep.EVAL_FRACTION, 200, seed)
    written, _ = load_rows(str(tmp_path / "rows.jsonl"))
    assert _keys(written) == _keys(train)  # exactly the training rows, in their order: no eval row
    assert info["sweep_rows"] == len(train) == len(rows) - len(held_out)
    sweep_train, validation = split_rows(written, lr_sweep.EVAL_FRACTION, 200, seed)  # what finetune --data does
    assert len(validation) == info["validation_rows"] > 0 and len(sweep_train) + len(validation) == len(train)
    # The corpus repeats conversations: a validation row may have the content of a final
    # eval row, but only content that the bench trains on as well.
    assert set(_keys(validation)) & set(_keys(held_out)) <= set(_keys(train))
    assert info["train_rows_with_eval_content"] == sum(k in set(_keys(held_out)) for k in _keys(train))


def test_the_sweep_can_leave_out_every_row_with_eval_content(tmp_path):
    source = tmp_path / "dups.jsonl"
    rows = [{"prompt": f"q{i % 30}", "completion": f"a{i % 30}"} for i in range(120)]  # each one 4 times
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    from l1ra_lite.data import load_rows, split_rows

    loaded, _ = load_rows(str(source))
    _, held_out = split_rows(loaded, 0.05, 200, 7)
    info = lr_sweep.write_sweep_data(tmp_path / "strict.jsonl", str(source), 0.05, 200, 7, exclude_eval_content=True)
    written, _ = load_rows(str(tmp_path / "strict.jsonl"))
    assert not set(_keys(written)) & set(_keys(held_out))
    assert info["dropped_rows_with_eval_content"] == info["train_rows_with_eval_content"] > 0
    assert info["sweep_rows"] == len(written) == 120 - len(held_out) - info["dropped_rows_with_eval_content"]


def test_the_sweep_order_puts_the_recommended_rates_first_then_the_extremes():
    lrs = [1e-4, 2e-4, 5e-4, 1e-3, 2e-3]
    order = lr_sweep.sweep_order(["lora", "l1ra", "adalora"], lrs)
    assert sorted(order) == sorted((m, lr) for m in ("lora", "l1ra", "adalora") for lr in lrs)  # each once
    assert order[:3] == [("adalora", 5e-4), ("lora", 2e-4), ("l1ra", 2e-4)]
    assert order[3:9] == [
        ("adalora", 2e-3),
        ("lora", 2e-3),
        ("l1ra", 2e-3),
        ("adalora", 1e-4),
        ("lora", 1e-4),
        ("l1ra", 1e-4),
    ]
    assert lr_sweep.sweep_order(["lora"], [3e-4, 1e-3])[0] == ("lora", 3e-4)  # the grid point nearest 2e-4


def test_explicit_grid_points_extend_the_grid_in_their_own_order():
    assert lr_sweep.parse_points("adalora=1e-2, lora=1e-3") == [("adalora", 0.01), ("lora", 0.001)]
    for bad in ("adalora", "nope=1e-3", "lora=x", "lora=-1"):
        with pytest.raises(SystemExit, match="METHOD=LR pairs"):
            lr_sweep.parse_points(bad)


def test_a_sweep_run_is_the_bench_command_with_its_lr_data_and_checkpoints(tmp_path):
    settings = run.bench_settings(run.parse_args([]), n_adapters=210)
    bench = run.finetune_command("adalora", settings, tmp_path / "r")
    swept = lr_sweep.sweep_command("adalora", 1e-3, {**settings, "data": "rows.jsonl"}, tmp_path / "r", 25)
    assert swept[swept.index("--lr") + 1] == "0.001" and swept[swept.index("--alpha") + 1] == "16.0"
    assert swept[swept.index("--save-every") + 1] == "25" and swept[swept.index("--data") + 1] == "rows.jsonl"
    changed = {"--lr", "--save-every", "--data", "--skip-bad-rows"}

    def shared(cmd):
        out, skip = [], False
        for arg in cmd:
            if skip:
                skip = False
            elif arg in changed:
                skip = arg != "--skip-bad-rows"
            else:
                out.append(arg)
        return out

    assert shared(swept) == shared(bench)  # steps, seq len, budget, batch, seed, eval: the bench's


def write_run(folder, steps_done, total=300, checkpoint=False, adapter=False, evals=None, cpu=None):
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"total_steps": total, "method": "lora"}))
    lines = metrics([1.0] * steps_done, evals=evals or {}, cpu=cpu)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    (folder / "ranks.json").write_text(json.dumps({"budget": 16, "ranks": RANKS, "history": []}))
    if checkpoint:
        (folder / f"checkpoint-{steps_done}").mkdir()
        (folder / "latest").write_text(json.dumps({"checkpoint": f"checkpoint-{steps_done}"}))
    if adapter:
        (folder / "adapter").mkdir()
        (folder / "adapter" / "adapter_config.json").write_text("{}")


def test_a_run_folder_is_read_resumed_or_started_again(tmp_path):
    assert run_queue.run_state(tmp_path / "none")["status"] == "absent"
    (tmp_path / "empty").mkdir()
    assert run_queue.run_state(tmp_path / "empty")["status"] == "stale"
    write_run(tmp_path / "stale", 10)
    assert run_queue.run_state(tmp_path / "stale")["status"] == "stale"  # no checkpoint: start again
    write_run(tmp_path / "partial", 30, checkpoint=True, evals={25: 2.5})
    assert run_queue.run_state(tmp_path / "partial") == {"status": "partial", "steps_done": 30, "total_steps": 300}
    write_run(tmp_path / "done", 300, checkpoint=True, adapter=True, evals={150: 2.0, 300: 1.5})
    assert run_queue.run_state(tmp_path / "done")["status"] == "finished"
    assert run_queue.resume_command(tmp_path / "partial")[-3:] == ["--resume", str(tmp_path / "partial"), "--plain"]


def test_the_sweep_figures_and_the_best_rate_of_each_method(tmp_path):
    runs = tmp_path / "runs"
    write_run(runs / "lora-lr0.0001", 300, checkpoint=True, adapter=True, evals={150: 2.0, 300: 1.6})
    write_run(runs / "lora-lr0.001", 300, checkpoint=True, adapter=True, evals={150: 1.9, 300: 1.4})
    write_run(runs / "lora-lr0.002", 200, checkpoint=True, evals={150: 1.3})  # partial: never a winner
    order = [("lora", 1e-4), ("lora", 1e-3), ("lora", 2e-3), ("adalora", 1e-3)]
    settings = {"warmup_skip": 2, "method_settings": {"lora": {"alpha": None}, "adalora": {"alpha": 16.0}}}
    doc = lr_sweep.sweep_document(settings, {"lrs": [1e-4, 1e-3, 2e-3]}, {}, runs, order)
    by = {r["name"]: r for r in doc["runs"]}
    assert by["lora-lr0.001"]["val_loss"] == 1.4 and by["lora-lr0.001"]["val_curve"] == [[150, 1.9], [300, 1.4]]
    assert by["lora-lr0.002"]["val_loss"] is None and by["lora-lr0.002"]["status"] == "partial"
    assert "--resume" in by["lora-lr0.002"]["resume_command"]
    assert by["adalora-lr0.001"]["status"] == "absent"
    best = doc["winners"]["lora"]
    assert (best["lr"], best["finished"], best["complete"], best["at_edge"]) == (1e-3, 2, False, False)
    assert best["neighbours_finished"] is False  # 2e-3 has not finished: the optimum may lie there
    assert doc["winners"]["adalora"]["lr"] is None
    table = lr_sweep.markdown_table(doc)
    assert "| 0.001 | - | 1.4000 |" in table and "(1.3000 at step 150; 200/300)" in table
    assert "| best so far | - | 0.001 (2/3 finished) |" in table
    json.dumps(doc)  # JSON-ready


def test_one_sweep_at_a_time_even_when_only_its_run_is_left(tmp_path):
    lock = run_queue.take_lock(tmp_path)
    assert lock.read_text().split() == [str(os.getpid())]  # our own lock: taken again
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock.write_text(f"999999999 {sleeper.pid}\n")  # a sweep gone, its run still training
        with pytest.raises(SystemExit, match=f"pid {sleeper.pid}"):
            run_queue.take_lock(tmp_path)
    finally:
        sleeper.kill()
        sleeper.wait()
    assert run_queue.take_lock(tmp_path) == lock  # both gone: a stale lock


@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="reads /proc")
def test_a_run_that_some_process_trains_is_shown_running_and_not_started_twice(tmp_path):
    run_dir = tmp_path / "runs" / "lora-lr0.001"
    write_run(run_dir, 30, checkpoint=True)
    trainer = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)", "l1ra_lite", "finetune", "--resume", str(run_dir)]
    )
    try:
        time.sleep(0.5)
        assert run_queue.training_now(run_dir) == trainer.pid
        record = lr_sweep.run_record("lora", 1e-3, None, tmp_path / "runs", 2)
        assert (record["status"], record["pid"]) == ("running", trainer.pid)
        assert run_queue.train_one("lora-lr0.001", ["never", "run"], tmp_path / "runs", 60, 1, run_queue.Stop()) is None
        assert run_queue.read_attempts(tmp_path / "runs", "lora-lr0.001") == []
    finally:
        trainer.kill()
        trainer.wait()
    assert run_queue.training_now(run_dir) is None


def test_a_tiny_sweep_runs_resumes_and_reads_finished_runs_without_rerunning(tmp_path):
    from tests.tiny import save_tiny_base

    save_tiny_base(tmp_path / "base")
    data = tmp_path / "data.jsonl"
    data.write_text(
        "".join(json.dumps({"prompt": f"What is {i} plus {i}?", "completion": f"{2 * i}."}) + "\n" for i in range(60))
    )
    sweep_dir, results = tmp_path / "sweep", tmp_path / "sweep.json"
    args = [
        "--sweep-dir",
        str(sweep_dir),
        "--results",
        str(results),
        "--methods",
        "lora",
        "--lrs",
        "1e-3,4e-3",
        "--threads",
        "1",
        "--save-every",
        "2",
        "--model",
        str(tmp_path / "base"),
        "--data",
        str(data),
        "--quant",
        "none",
        "--steps",
        "4",
        "--seq-len",
        "48",
    ]
    assert lr_sweep.main([*args, "--max-runs", "1"]) == 0
    doc = json.loads(results.read_text())
    assert [r["status"] for r in doc["runs"]] == ["finished", "absent"]  # 1e-3 is nearest to 2e-4
    first = sweep_dir / "runs" / "lora-lr0.001"
    shutil.rmtree(first / "adapter")  # as if stopped after its last checkpoint
    assert run_queue.run_state(first)["status"] == "partial"
    assert lr_sweep.main([*args, "--jobs", "2"]) == 0  # the resume and the other point at once
    doc = json.loads(results.read_text())
    assert [r["status"] for r in doc["runs"]] == ["finished", "finished"]
    attempts = run_queue.read_attempts(sweep_dir / "runs", "lora-lr0.001")
    assert [a["kind"] for a in attempts] == ["start", "resume"] and attempts[-1]["returncode"] == 0
    assert lr_sweep.main(args) == 0  # all finished: read, not rerun
    assert len(run_queue.read_attempts(sweep_dir / "runs", "lora-lr0.001")) == 2
    assert len(run_queue.read_attempts(sweep_dir / "runs", "lora-lr0.004")) == 1
    assert doc["winners"]["lora"]["complete"] is True
    with pytest.raises(SystemExit, match="other settings"):
        lr_sweep.main([*args[:-2], "--seq-len", "64"])


def test_the_eval_loss_splits_into_rows_the_run_trained_on_and_new_ones(tmp_path):
    """bench/seen_unseen.py re-makes a finished run's split and evaluates its adapter: on
    the whole split it gives the loss the run logged; every repeated row is 'seen'."""
    from l1ra_lite.cli import main
    from tests.tiny import save_tiny_base

    save_tiny_base(tmp_path / "base")
    data = tmp_path / "data.jsonl"
    rows = [{"prompt": f"What is {i} plus {i}?", "completion": f"{2 * i}."} for i in range(40)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows + rows[:20]))  # 20 rows twice
    out = tmp_path / "run"
    flags = ["--quant", "none", "--max-steps", "4", "--seq-len", "48", "--eval-fraction", "0.25", "--plain"]
    flags += ["--dtype", "fp32"]  # the 1e-6 bound is fp32's, also on CPUs that would train in bf16
    assert main(["finetune", "--model", str(tmp_path / "base"), "--data", str(data), "--output", str(out), *flags]) == 0
    config = json.loads((out / "config.json").read_text())
    seen, unseen = seen_unseen.split_by_content(config)
    assert len(seen) + len(unseen) == 15 and seen and unseen
    assert all(int(r["messages"][0]["content"].split()[2]) < 20 for r in seen)  # the repeated ones
    record = seen_unseen.measure(out)
    assert record["eval_loss_all"] == pytest.approx(record["eval_loss_logged"], abs=1e-6)
    parts = sorted([record["eval_loss_seen"], record["eval_loss_unseen"]])
    assert parts[0] < record["eval_loss_all"] < parts[1]


# ---------------------------------------------------------------- bench/gpu_bench.py


def write_recipe(folder, name, model, seq_len, batch_size, budget=None):
    lines = [f'model = "{model}"', f"seq_len = {seq_len}", f"batch_size = {batch_size}"]
    if budget:
        lines.append(f"budget = {budget}")
    (folder / f"{name}.toml").write_text("\n".join(lines) + '\n[meta]\ncard = "x"\n')


def test_recipe_selection(tmp_path):
    write_recipe(tmp_path, "rtx3060-12gb-mistral7b", "mistral-7b", 1024, 1, 448)
    write_recipe(tmp_path, "rtx4090-24gb-mistral7b", "mistral-7b", 2048, 2)
    write_recipe(tmp_path, "rtx4060-8gb-mistral7b", "mistral-7b", 512, 1, 224)
    write_recipe(tmp_path, "rtx3060-12gb-llama", "llama-3.1-8b", 1024, 1)
    assert gpu_bench.recipe_settings([tmp_path]) == [
        ("rtx3060-12gb-mistral7b", 1024, 1, 448),
        ("rtx4090-24gb-mistral7b", 2048, 2, None),
    ]
    assert gpu_bench.recipe_settings([tmp_path], ["rtx4060-8gb-mistral7b"]) == [("rtx4060-8gb-mistral7b", 512, 1, 224)]
    with pytest.raises(SystemExit, match="not found"):
        gpu_bench.recipe_settings([tmp_path], ["nope"])
    (tmp_path / "rtx4090-24gb-mistral7b.toml").unlink()  # no 24 GB one: smallest and largest
    assert [s[0] for s in gpu_bench.recipe_settings([tmp_path])] == ["rtx4060-8gb-mistral7b", "rtx3060-12gb-mistral7b"]


def test_gpu_comparison_and_estimate_rows():
    l1ra = {
        "tokens_per_s": 1100.0,
        "trainable_state_bytes": 90,
        "peak_allocated_bytes": 990,
        "peak_reserved_bytes": 1200,
    }
    lora = {
        "tokens_per_s": 1000.0,
        "trainable_state_bytes": 100,
        "peak_allocated_bytes": 1000,
        "peak_reserved_bytes": 1000,
    }
    c = gpu_bench.compare(l1ra, lora)
    assert c["tokens_per_s_l1ra_over_lora"] == pytest.approx(1.1)
    assert c["peak_l1ra_over_lora"] == pytest.approx(0.99)
    assert c["peak_reserved_l1ra_over_lora"] == pytest.approx(1.2)
    assert c["targets"] == {"tokens_per_s_l1ra_over_lora >= 1": True, "peak_l1ra_over_lora <= 1": True}
    assert gpu_bench.compare(l1ra, {"error": "exit 1"}) == {}

    row = gpu_bench.estimate_row("x", gpu_bench.TINY, 64, 1, 28, None)
    assert row["budget"] == 28 and row["estimate_total_bytes"] > row["estimate_allocated_bytes"] > 0
    measured = {
        "peak_allocated_bytes": int(row["estimate_allocated_bytes"] * 1.1),
        "peak_reserved_bytes": 100,
        "context_bytes": 50,
    }
    row = gpu_bench.estimate_row("x", gpu_bench.TINY, 64, 1, 28, measured)
    assert row["allocated_over_estimate"] == pytest.approx(1.1, rel=1e-4)
    assert row["within_tolerance"] is True and row["measured_device_peak_bytes"] == 150


def test_gpu_script_cpu_path_runs_what_the_cpu_can_and_skips_the_rest(tmp_path):
    """bench/gpu.sh --tiny --device cpu: the code paths of the H200 run on tiny shapes.
    Model runs (an NF4 model built in place, L1RA with a steered reallocation, stock peft
    QLoRA on bitsandbytes layers), the layer comparison and the product's train + resume
    run; the CUDA-only parts are recorded as skipped with the reason."""
    out = tmp_path / "gpu.json"
    env = {**os.environ, "PYTHON": sys.executable}
    env.pop("OUT", None)
    proc = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu.sh"), "--tiny", "--device", "cpu", "--jobs", "2", "--out", str(out)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert list(doc["status"]) == [
        "pytest_cuda",
        "layer",
        "l1ra",
        "realloc_memory",
        "lora",
        "train_resume",
        "oom_step",
        "oom_eval",
        "sync",
        "estimate-tiny-a",
        "estimate-tiny-b",
    ]
    ran = {k: v for k, v in doc["status"].items() if v != "skipped"}
    assert ran == {"layer": "ok", "l1ra": "ok", "lora": "ok", "train_resume": "ok"}
    for name in ("pytest_cuda", "oom_step", "oom_eval", "sync"):
        assert doc["checks"][name]["reason"].startswith("needs CUDA")
    for name in ("estimate-tiny-a", "estimate-tiny-b"):
        assert doc["runs"][name]["skipped"].startswith("needs CUDA") and doc["runs"][name]["job"]["method"] == "l1ra"
    assert doc["versions"]["torch"] and doc["wall_s"] > 0

    l1ra, lora = doc["runs"]["l1ra"], doc["runs"]["lora"]
    assert l1ra["layer_type"] == "L1RALinear"
    assert l1ra["realloc"]["moved"] == 4  # the last rank of k_proj and v_proj in 2 layers
    assert l1ra["rank_total"] == 28 and l1ra["realloc"]["rank_total"] == 28
    assert len(l1ra["step_s"]) == 8 and l1ra["tokens_per_s"] > 0 and l1ra["peak_rss_bytes"] > 0
    assert l1ra["last_loss"] == pytest.approx(5.55, abs=0.2)  # ln(256): random weights
    assert lora["layer_type"] == "peft.tuners.lora.bnb.Linear4bit"  # peft's QLoRA layer, not its plain one
    assert lora["realloc"] is None and lora["rank_total"] == 28
    # Rank moved to the larger MLP matrices, and L1RA keeps gates and per-rank step counts.
    assert l1ra["trainable_state_bytes"] > lora["trainable_state_bytes"]
    assert set(doc["summary"]["side_by_side"]) >= {"tokens_per_s_l1ra_over_lora", "peak_l1ra_over_lora"}
    assert [row["name"] for row in doc["summary"]["estimator"]] == ["main", "tiny-a", "tiny-b"]

    memory = doc["checks"]["realloc_memory"]  # the resizes ran; the allocated bytes need CUDA
    assert memory["status"] == "skipped" and "CUDA" in memory["reason"]
    move, halve = memory["move"], memory["halve"]
    assert move["moved"] == 4 and move["pruned_by_type"] == {"up_proj": 2, "down_proj": 2}
    assert move["added_by_type"] == {"k_proj": 2, "v_proj": 2}
    assert move["before"]["rank_total"] == move["after"]["rank_total"] == 28  # the budget is conserved
    assert move["expected_drop_bytes"] > 0 and "allocated_drop_bytes" not in move
    assert halve["after"]["rank_total"] < halve["before"]["rank_total"] and halve["expected_drop_bytes"] > 0

    layer = doc["checks"]["layer"]
    assert set(layer["shapes"]) == {"64x224", "64x64"} and layer["tokens"] == 96
    for row in layer["shapes"].values():
        assert row["layer_types"]["lora"] == "peft.tuners.lora.bnb.Linear4bit"
        for method in ("l1ra", "lora"):
            assert row[method]["median_s"] > 0 and row[method]["output_dtype"] == "bfloat16"
            for phase in ("forward", "backward"):
                casts = row[method]["casts"][phase]
                assert casts["ops"] > 0 and casts["casts"] >= casts["activation_casts"] >= casts["activation_to_fp32"]
        assert row["time_l1ra_over_lora"] > 0
    assert layer["targets"]["counter_saw_backward"] is True
    assert isinstance(layer["targets"]["l1ra makes no fp32 copy of the activations"], bool)
    assert doc["summary"]["layer"] == layer["targets"]

    train = doc["checks"]["train_resume"]
    assert train["resume"]["equal"] is True and train["resume"]["adapter_max_abs_diff"] == 0.0
    assert train["stopped"]["stopped_at"] == 3 and train["stopped"]["checkpoints"] == ["checkpoint-3"]
    assert [s for s, _ in train["straight"]["eval_loss"]] == [3, 6]
    assert train["straight"]["ranks_moved"] > 0  # the resume carried moving ranks
    assert train["straight"]["checkpoints"] == ["checkpoint-3", "checkpoint-6"]
    assert train["model"]["shape"]["vocab_size"] == 128256 and "control" not in train
    assert doc["fixture"]["n_adapters"] == 14


def test_gpu_script_parts_degrade_to_recorded_errors(tmp_path):
    """A part that raises, one out of time and a CUDA-only one on the CPU are recorded as
    such; the others run, and the file is rewritten after each part."""
    seen = []

    def good(ctx, timeout):
        seen.append(json.loads(out.read_text())["status"] if out.exists() else None)
        return {"status": "ok", "figure": 1}

    def broken(ctx, timeout):
        raise RuntimeError("the GPU caught fire")

    parts = [
        gpu_bench.Part("first", "checks", good),
        gpu_bench.Part("broken", "checks", broken),
        gpu_bench.Part("cuda", "checks", good, cuda_only="a GPU"),
        gpu_bench.Part("slow", "checks", good, min_s=1e6),
        gpu_bench.Part("last", "checks", good),
    ]
    out = tmp_path / "r.json"
    doc = {"status": {}, "runs": {}, "checks": {}}
    ctx = gpu_bench.Context(tiny=True, device="cpu", workdir=tmp_path)
    gpu_bench.run_all(
        parts, ctx, doc, deadline=100.0, out=out, started=time.perf_counter(), shape=gpu_bench.TINY, settings=[]
    )
    assert doc["status"] == {"first": "ok", "broken": "error", "cuda": "skipped", "slow": "not_run", "last": "ok"}
    assert "the GPU caught fire" in doc["checks"]["broken"]["error"] and doc["checks"]["broken"]["traceback"]
    assert "needs CUDA (a GPU)" in doc["checks"]["cuda"]["reason"]
    assert "out of time" in doc["checks"]["slow"]["reason"]
    assert seen == [None, {"first": "ok", "broken": "error", "cuda": "skipped", "slow": "not_run"}]
    assert json.loads(out.read_text())["status"] == doc["status"] and not gpu_bench.overall_ok(doc)
    # A model run that did not run keeps the runs' format: {job, skipped}.
    job = gpu_bench.Job("estimate-x", "l1ra", 8, 1, 14, 2, realloc_at=1)
    gpu_bench.record(doc, gpu_bench.Part("estimate-x", "runs", good, job=job), {"status": "not_run", "reason": "late"})
    assert doc["runs"]["estimate-x"] == {"skipped": "late", "job": asdict(job)}


def test_cast_counts_tell_activations_from_weights():
    records = [
        ("_to_copy", "torch.bfloat16", "torch.float32", (1, 96, 64), 96 * 64 * 4),
        ("_to_copy", "torch.float32", "torch.bfloat16", (1, 96, 64), 96 * 64 * 2),
        ("_to_copy", "torch.float32", "torch.bfloat16", (4, 64), 512),
        ("_to_copy", "torch.float32", "torch.bfloat16", (4, 64), 512),
        ("copy_", "torch.bfloat16", "torch.float32", (96, 224), 96 * 224 * 4),
    ]
    s = gpu_checks.summarise_casts(records, tokens=96, ops=40)
    assert (s["ops"], s["casts"], s["activation_casts"], s["activation_to_fp32"]) == (40, 5, 3, 2)
    assert s["activation_cast_bytes"] == 96 * 64 * 6 + 96 * 224 * 4
    assert {"op": "_to_copy", "from": "float32", "to": "bfloat16", "shape": "4x64", "count": 2} in s["list"]


def test_cast_counter_sees_forward_backward_and_autocast():
    import torch

    layer = torch.nn.Linear(8, 5)  # fp32 weights, bf16 input: autocast casts the weight
    x = torch.randn(3, 8, dtype=torch.bfloat16, requires_grad=True)
    with gpu_checks.CastCounter() as fwd:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(x.float())  # an explicit fp32 copy of the activation, cast back by autocast
    with gpu_checks.CastCounter() as bwd:
        y.sum().backward()
    f = gpu_checks.summarise_casts(fwd.records, tokens=3, ops=fwd.seen["ops"])
    b = gpu_checks.summarise_casts(bwd.records, tokens=3, ops=bwd.seen["ops"])
    assert f["activation_to_fp32"] == 1 and f["activation_casts"] == 2 and f["casts"] >= 3
    assert b["ops"] > 0 and b["activation_to_fp32"] >= 1


def test_sync_counts_per_step():
    # 2 syncs while loading, then steps 1-3 with 3, 0 and 2 syncs, 1 after the last step;
    # non-sync warnings in between do not count.
    flags = [True, True, False] + [True, True, True] + [False] + [True, False, True] + [True]
    marks = [("start", 3), (1, 6), (2, 7), (3, 10)]
    assert gpu_checks.count_syncs(flags, marks) == {"setup": 2, "per_step": {1: 3, 2: 0, 3: 2}, "after_last_step": 1}
    assert gpu_checks.short_location(str(ROOT / "l1ra_lite" / "train.py"), 12) == "l1ra_lite/train.py:12"
    assert (
        gpu_checks.short_location("/x/site-packages/torch/nn/utils/clip_grad.py", 3) == "torch/nn/utils/clip_grad.py:3"
    )


def test_oom_contract_is_judged_on_the_cli_output():
    good = (
        "l1ra-lite: starting l1ra run in x\n"
        "l1ra-lite finetune: error: CUDA out of memory at step 3 with batch size 2 ...; "
        "checkpoint of step 2 kept\n"
    )
    assert gpu_checks.judge_oom_output(2, good)["problems"] == []
    traceback_run = "Traceback (most recent call last):\n  ...\ntorch.OutOfMemoryError: CUDA out of memory.\n"
    problems = gpu_checks.judge_oom_output(1, traceback_run)["problems"]
    assert problems == [
        "exit code 1, expected 2",
        "0 lines start with 'l1ra-lite finetune: error:', expected 1",
        "a traceback on stderr",
    ]
    other = gpu_checks.judge_oom_output(2, "l1ra-lite finetune: error: cannot write to x\n")["problems"]
    assert other == ["the error line does not say 'out of memory'"]


def test_checkpoint_on_disk_verifies_the_latest(tmp_path):
    import torch

    from l1ra_lite import checkpoint as ckpt

    assert gpu_checks.checkpoint_on_disk(tmp_path)["intact"] is False
    state = {"step": 2, "skipped_steps": 0, "rank_state": {}, "fingerprint": {}}
    saved = ckpt.Checkpoint({"a": torch.ones(2)}, {"state": {}, "param_groups": []}, {}, state)
    ckpt.save_checkpoint(tmp_path, 2, saved, keep=2)
    assert gpu_checks.checkpoint_on_disk(tmp_path) == {
        "intact": True,
        "latest": "checkpoint-2",
        "step": 2,
        "temporary_leftovers": [],
        "all": ["checkpoint-2"],
    }
    with open(tmp_path / "checkpoint-2" / "trainable.safetensors", "r+b") as f:  # one flipped byte
        f.seek(-1, 2)
        last = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([last[0] ^ 1]))
    broken = gpu_checks.checkpoint_on_disk(tmp_path)
    assert broken["intact"] is False and "corrupt" in broken["error"]


@pytest.fixture(scope="module")
def small_llama(tmp_path_factory):
    """The saved Llama folder (128256-entry vocabulary, tiny width) and data of the GPU checks."""
    return gpu_checks.build_small_llama(tmp_path_factory.mktemp("small-llama"), tiny=True)


def test_oom_check_plumbing_with_a_simulated_oom(small_llama, tmp_path):
    """The OOM part's subprocess (bootstrap, `python -m l1ra_lite finetune`, the judge, the
    checkpoint check) on the CPU, with the bootstrap raising the OOM it would provoke on CUDA."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = gpu_checks.oom_check("oom_step", small_llama, tmp_path, 300, env, tiny=True, simulate=True)
    assert result["status"] == "ok", result
    assert result["squeeze"] == {"phase": "train", "training_passes": 3, "simulated": True}
    assert result["exit_code"] == 2 and len(result["error_lines"]) == 1
    assert result["checkpoint"]["latest"] == "checkpoint-2" and result["checkpoint"]["step"] == 2


def test_sync_check_counts_per_step_with_the_debug_mode_emulated(small_llama, tmp_path, monkeypatch):
    """sync's body on the CPU: every loss computation warns as a sync would under
    set_sync_debug_mode("warn") (twice a micro-batch); the counts land on their steps."""
    import warnings

    import torch

    from l1ra_lite import loss
    from l1ra_lite.train import step as train_step

    real = loss.causal_lm_loss

    def syncing_loss(model, batch, *args, **kwargs):
        warnings.warn("called a synchronizing CUDA operation", stacklevel=1)  # located here
        out = real(model, batch, *args, **kwargs)
        warnings.warn("called a synchronizing CUDA operation", stacklevel=1)  # located here
        return out

    monkeypatch.setattr(loss, "causal_lm_loss", syncing_loss)
    monkeypatch.setattr(train_step, "causal_lm_loss", syncing_loss)
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", lambda mode: None)
    settings = {**gpu_checks.SYNC, "seq_len": 64, "batch_size": 2, "max_steps": 4, "update_every": 2}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a shared machine: no spin-waiting for a busy second core
    try:
        r = gpu_checks.sync_check({"fixture": small_llama, "workdir": str(tmp_path), "settings": settings}, "cpu")
    finally:
        torch.set_num_threads(threads)
    assert r["status"] == "ok" and r["reallocation_steps"] == [2] and r["setup"] == 0
    evaluation = r["per_step"]["4"] - 4  # the last step also evaluates: 2 warnings a batch of 2 held-out rows
    assert r["per_step"] == {"1": 4, "2": 4, "3": 4, "4": 4 + evaluation} and evaluation >= 2
    assert r["median_per_step"] == 4 and r["after_last_step"] == 0
    assert [x["count"] for x in r["top_locations"]] == [8 + evaluation // 2] * 2
    assert all(x["where"].startswith("tests/test_bench.py:") for x in r["top_locations"])


def test_pytest_cuda_part_runs_pytest_and_reads_its_report(tmp_path):
    tests = tmp_path / "test_marked.py"
    tests.write_text(
        "import pytest\n\n@pytest.mark.cuda\ndef test_passes():\n    pass\n\n"
        "@pytest.mark.cuda\ndef test_fails():\n    assert 1 == 2\n\ndef test_unmarked():\n    pass\n"
    )
    r = gpu_checks.pytest_cuda_check(tmp_path, 120, dict(os.environ), files=[str(tests)])
    assert r["status"] == "failed" and (r["passed"], r["failed"], r["total"]) == (1, 1, 2)
    assert r["failing"][0]["test"].endswith("::test_fails") and r["output_tail"]


def test_pytest_junit_counts_and_the_cuda_test_files():
    report = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" errors="1"
      failures="1" skipped="1" tests="5"><testcase classname="tests.test_loss" name="test_a"/>
      <testcase classname="tests.test_loss" name="test_b">
        <failure message="assert 1 == 2">long text</failure></testcase>
      <testcase classname="tests.test_l1ra_nf4" name="test_c"><skipped message="needs a CUDA GPU"/></testcase>
      <testcase classname="tests.test_x" name="test_d"><error message="collection failure&#10;more"/></testcase>
      <testcase classname="tests.test_x" name="test_e"/></testsuite></testsuites>"""
    counts = gpu_checks.junit_counts(report)
    assert (counts["passed"], counts["failed"], counts["errors"], counts["skipped"], counts["total"]) == (2, 1, 1, 1, 5)
    assert counts["failing"] == [
        {"test": "tests.test_loss::test_b", "kind": "failure", "message": "assert 1 == 2"},
        {"test": "tests.test_x::test_d", "kind": "error", "message": "collection failure"},
    ]
    assert {"tests/test_l1ra_nf4.py", "tests/test_loss.py"} <= set(gpu_checks.cuda_test_files())


def test_loss_memory_script_measures_both_losses(tmp_path, capsys):
    from bench import loss_memory

    out = tmp_path / "loss.json"
    assert (
        loss_memory.main(
            ["--vocab", "2048", "--hidden", "32", "--tokens", "128", "--device", "cpu", "--json", str(out)]
        )
        == 0
    )
    figures = json.loads(out.read_text())["peak_bytes"]
    assert set(figures) == {"transformers", "chunked"} and all(v >= 0 for v in figures.values())
    assert "chunked / transformers" in capsys.readouterr().out
