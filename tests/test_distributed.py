"""Data-parallel runs (torchrun on the CPU with gloo, tiny model): two processes with
batch b train what one process with batch 2b trains, rank moves identically, a SIGINT on
the launcher stops every process with a checkpoint, a dead process ends the others.

Tolerance: two processes add their gradients in another order than one process adds its
micro-batches' (and pad to other widths), so fp32 results differ by rounding only:
measured 1e-6 on the losses and 0 to 2e-7 on the gates and weights after 24 steps; the
bounds below are 10-100x that. Ranks and the reallocation history must be equal."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from l1ra_lite import checkpoint as ckpt
from l1ra_lite.cli import main
from l1ra_lite.config import FinetuneConfig
from l1ra_lite.train.loop import step_batches

ROOT = Path(__file__).resolve().parents[1]
STEPS = 24
# The importance rule with a shrink window: rank moves between modules within 6 steps.
FLAGS = [
    *("--quant", "none", "--budget", 28, "--grad-accum", 2, "--seq-len", 64, "--lr", 5e-3, "--eta-c", 0.05),
    *("--realloc-rule", "importance", "--shrink-until", 0.6, "--l1-lambda", "auto", "--l1-kappa", 1.5),
    *("--max-steps", STEPS, "--update-every", 2, "--warmup", 1, "--eval-every", 8, "--save-every", 4),
    *("--seed", 7, "--plain", "--keep-checkpoints", 10),
    *("--dtype", "fp32"),  # the bounds are fp32's rounding, also on CPUs that would train in bf16
]


def finetune_args(workdir, out, batch_size, *extra):
    data = ["--model", workdir / "base", "--data", workdir / "data.jsonl"]
    return [str(a) for a in ["finetune", *data, *FLAGS, "--batch-size", batch_size, "--output", out, *extra]]


def child_env(**extra):
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT), **extra}


def torchrun(args, **popen):
    """`torchrun --nproc-per-node 2 -m l1ra_lite ...` (--standalone: a free port of its own)."""
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    return subprocess.Popen([*argv, "-m", "l1ra_lite", *args], cwd=ROOT, env=child_env(), text=True, **popen)


def run_to_end(args, timeout=240):
    child = torchrun(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = child.communicate(timeout=timeout)
    assert child.returncode == 0, err[-3000:]
    return out, err


def wait_for_line(child, needle, timeout=180):
    deadline = time.time() + timeout
    for line in child.stdout:
        if needle in line:
            return
        if time.time() > deadline:
            break
    raise AssertionError(f"never printed {needle!r}")


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def ranks(run_dir):
    return json.loads((run_dir / "ranks.json").read_text())


def adapter(run_dir):
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def gates(run_dir, step):
    trainable = load_file(str(run_dir / f"checkpoint-{step}" / "trainable.safetensors"))
    return {k: v for k, v in trainable.items() if k.endswith(".gate")}


@pytest.fixture(scope="module")
def two_processes(workdir):
    out = workdir / "dp-two"
    _, err = run_to_end(finetune_args(workdir, out, 2))
    assert "2 processes x batch size 2 x grad accumulation 2 = a global batch of 8" in err
    return out


@pytest.fixture(scope="module")
def one_process(workdir):
    out = workdir / "dp-one"
    assert main(finetune_args(workdir, out, 4)) == 0
    return out


def test_two_processes_with_batch_b_train_what_one_process_with_batch_2b_trains(two_processes, one_process):
    two, one = metrics(two_processes), metrics(one_process)
    assert [m["step"] for m in two] == list(range(1, STEPS + 1))  # one writer: each line once
    for a, b in zip(one, two):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
        assert ("eval_loss" in a) == ("eval_loss" in b)
        if "eval_loss" in a:  # sharded, summed token-weighted over the processes
            assert b["eval_loss"] == pytest.approx(a["eval_loss"], abs=1e-5)
    for step in (4, 8):  # the gates during the shrink window (folded into B at its end)
        g1, g2 = gates(one_process, step), gates(two_processes, step)
        assert g1.keys() == g2.keys() and all((g1[k] - g2[k]).abs().max() <= 1e-5 for k in g1)
    a1, a2 = adapter(one_process), adapter(two_processes)
    assert a1.keys() == a2.keys() and all(torch.allclose(a1[k], a2[k], rtol=1e-4, atol=1e-5) for k in a1)
    config = json.loads((two_processes / "config.json").read_text())
    assert (config["processes"], config["global_batch"]) == (2, 8)


def test_a_reallocation_that_moves_rank_happens_identically_in_both_processes(two_processes, one_process):
    """Every process checks at each reallocation that all hold the same gates and ranks
    (a mismatch stops the run: test_processes_out_of_step_stop_with_one_line), so a run
    that finished moved rank the same way in both; and as one process would."""
    history = ranks(two_processes)["history"]
    start = {p: 2 for p in history[0]["ranks"]}
    assert ranks(two_processes)["ranks"] != start  # rank moved between modules
    assert sum(sum(e["added"].values()) for e in history) > 0
    assert ranks(two_processes) == ranks(one_process)


CHECK_SCRIPT = textwrap.dedent("""
    import torch
    from l1ra_lite.train import distributed
    with distributed.processes(timeout_s=30):
        me = distributed.rank()
        same = [("a.lora_A", torch.ones(3)), ("a.gate", torch.tensor([0.5, 0.25]))]
        distributed.check_in_step(same, [2, 2], 2)  # in step: passes
        for names, ranks, step in (
            ([("a.lora_A", torch.ones(3)), ("a.gate", torch.tensor([0.5, 0.25 + me * 1e-7]))], [2, 2], 4),
            (same, [2, 2 + me], 6),
        ):
            try:
                distributed.check_in_step(names, ranks, step)
            except distributed.OutOfStep as err:
                print(err, flush=True)
""")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_processes(argv, n=2):
    """`n` processes as a launcher would start them (RANK, WORLD_SIZE, MASTER_*)."""
    port = str(free_port())
    return [
        subprocess.Popen(
            argv,
            cwd=ROOT,
            env=child_env(RANK=str(k), LOCAL_RANK=str(k), WORLD_SIZE=str(n), MASTER_ADDR="127.0.0.1", MASTER_PORT=port),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for k in range(n)
    ]


def test_processes_out_of_step_stop_with_one_line():
    outs = [p.communicate(timeout=120) for p in start_processes([sys.executable, "-c", CHECK_SCRIPT])]
    for out, err in outs:
        lines = out.strip().splitlines()
        assert len(lines) == 2, err
        assert lines[0].startswith("the processes are out of step at step 4: a.gate differs between them")
        assert lines[1].startswith("the processes are out of step at step 6: the ranks (1 modules) differ")


def test_each_process_reads_its_slice_of_the_global_batch():
    """Process k of n reads the k-th slice of the step's global batch: together the
    processes read what one process with n times the batch reads, step by step."""
    examples = [{"input_ids": [i + 1] * (1 + i % 5), "labels": [i + 1] * (1 + i % 5)} for i in range(21)]
    order = lambda epoch: list(reversed(range(21))) if epoch % 2 else list(range(21))  # noqa: E731
    one = FinetuneConfig(batch_size=4, grad_accum=2)
    two = FinetuneConfig(batch_size=2, grad_accum=2)

    def firsts(batches):
        return [int(row[0]) for b in batches for row in b["input_ids"]]

    for step in range(6):  # crosses epochs (21 examples, 8 a step)
        whole = firsts(step_batches(examples, one, step, order, 0))
        parts = [firsts(step_batches(examples, two, step, order, 0, k, 2)) for k in range(2)]
        assert parts[0] + parts[1] == whole


# ---------------------------------------------------------------- signals, resume, faults


@pytest.fixture(scope="module")
def stopped(workdir):
    """A two-process run stopped by SIGINT on the launcher after a few steps."""
    out = workdir / "dp-stopped"
    child = torchrun(finetune_args(workdir, out, 2), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_for_line(child, f"step 2/{STEPS}")
    child.send_signal(signal.SIGINT)  # to the launcher only, as Ctrl-C in its terminal
    _, err = child.communicate(timeout=120)
    assert "stopped at step" in err and f"--resume {out}" in err
    assert err.count("stopping after this step") == 1  # process 0 speaks for both
    step = ckpt.load_checkpoint(ckpt.latest_checkpoint(out)).state["step"]
    assert 2 <= step < STEPS
    return out, step


def test_sigint_on_the_launcher_stops_all_with_a_checkpoint_and_resume_ends_as_uninterrupted(
    stopped, two_processes, workdir
):
    out = workdir / "dp-resumed"
    shutil.copytree(stopped[0], out)
    run_to_end(["finetune", "--resume", str(out)])
    assert [m["step"] for m in metrics(out)] == list(range(1, STEPS + 1))
    a, b = adapter(two_processes), adapter(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert ranks(out) == ranks(two_processes)


def test_a_run_resumes_in_another_number_of_processes_only_at_the_same_global_batch(
    stopped, two_processes, workdir, capsys
):
    out = workdir / "dp-resumed-alone"
    shutil.copytree(stopped[0], out)
    assert main(["finetune", "--resume", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "trained by 2 process(es) with a global batch of 8 examples a step" in err[-1]
    assert "processes x --batch-size x --grad-accum = 8 (got 1 x 2 x 2)" in err[-1]
    assert main(["finetune", "--resume", str(out), "--batch-size", "4"]) == 0  # one process, batch 2b
    config = json.loads((out / "config.json").read_text())
    assert (config["processes"], config["batch_size"], config["global_batch"]) == (1, 4, 8)  # for the next resume
    a, b = adapter(two_processes), adapter(out)
    assert all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-5) for k in a)
    assert ranks(out) == ranks(two_processes)


def test_a_lost_process_ends_after_its_message_without_the_interpreters_teardown(monkeypatch, capsys):
    """gloo's teardown of a group whose peer hangs can abort the process (SIGABRT, about
    one exit in eight here, always after the message): ProcessLost ends with os._exit."""
    from l1ra_lite.errors import UserError
    from l1ra_lite.train.distributed import ProcessLost

    def finetune_raising(err):
        def run(args):
            raise err

        monkeypatch.setattr("l1ra_lite.cli.finetune.run", run)

    ended = []
    monkeypatch.setattr(os, "_exit", ended.append)
    finetune_raising(ProcessLost("process 0 of 2: another process of the run stopped"))
    assert main(["finetune", "--data", "x.jsonl"]) == 2 and ended == [2]
    assert capsys.readouterr().err == "l1ra-lite finetune: error: process 0 of 2: another process of the run stopped\n"
    ended.clear()
    finetune_raising(UserError("x.jsonl not found"))
    assert main(["finetune", "--data", "x.jsonl"]) == 2 and ended == []  # other errors end as usual


def test_any_error_that_leaves_a_process_group_open_ends_without_its_teardown(monkeypatch):
    from l1ra_lite.errors import UserError
    from l1ra_lite.train import distributed

    torn_down = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda *a, **k: None)
    monkeypatch.setattr(distributed.dist, "destroy_process_group", lambda: torn_down.append(True))
    with pytest.raises(UserError) as raised:
        with distributed.processes(5):
            raise UserError("out of memory on this card")
    assert raised.value.end_at_once and torn_down == []
    with distributed.processes(5):
        pass
    assert torn_down == [True]  # a clean end tears the group down
    monkeypatch.delenv("WORLD_SIZE")
    with pytest.raises(UserError) as raised:
        with distributed.processes(5):  # no launcher: no group, nothing special
            raise UserError("x.jsonl not found")
    assert not raised.value.end_at_once


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGSTOP], ids=["killed", "hung"])
def test_killing_one_process_ends_the_other_within_the_timeout_with_one_clear_line(workdir, signum):
    """A dead process is noticed at once (gloo: its connection closes); a hung one when a
    collective has waited --process-timeout seconds."""
    out = workdir / f"dp-{signum.name}"
    argv = [sys.executable, "-m", "l1ra_lite", *finetune_args(workdir, out, 2, "--process-timeout", 10)]
    argv[argv.index("--max-steps") + 1] = "400"
    first, second = start_processes(argv)
    try:
        wait_for_line(first, "checkpoint step 4")
        second.send_signal(signum)
        stopped_at = time.time()
        _, err = first.communicate(timeout=60)
        assert time.time() - stopped_at < 10 + 15
    finally:
        second.kill()
        second.wait()
    lines = err.strip().splitlines()
    assert first.returncode == 2 and "Traceback" not in err, err[-3000:]
    assert lines[-1].startswith("l1ra-lite finetune: error: process 0 of 2: another process of the run stopped")
    assert f"the last complete checkpoint in {out} is intact: l1ra-lite finetune --resume {out}" in lines[-1]
    assert ckpt.load_checkpoint(ckpt.latest_checkpoint(out)).state["step"] >= 4


def test_stock_adalora_trains_data_parallel_as_in_one_process(workdir):
    """The baselines run data-parallel too (like with like in the bench): AdaLoRA's
    importance scores come from the summed gradients, so its masks agree as well."""
    flags = ["--method", "adalora", "--max-steps", 8, "--update-every", 2, "--eval-every", 0, "--save-every", 0]
    two, one = workdir / "dp-adalora-two", workdir / "dp-adalora-one"
    run_to_end(finetune_args(workdir, two, 2, *flags))
    assert main(finetune_args(workdir, one, 4, *flags)) == 0
    for a, b in zip(metrics(one), metrics(two)):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-5) and b["rank_total"] == a["rank_total"]
    assert ranks(one) == ranks(two)
    a1, a2 = adapter(one), adapter(two)
    assert all(torch.allclose(a1[k], a2[k], rtol=1e-4, atol=1e-5) for k in a1)
