"""Faults a long run meets, and what survives each: signals, SIGKILL while writing a
checkpoint, non-finite steps, out of memory, a full disk, bad or hostile files."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError

from l1ra_lite import checkpoint as ckpt
from l1ra_lite.cli import main
from l1ra_lite.config import FinetuneConfig
from l1ra_lite.errors import UserError
from l1ra_lite.train import Diverged, train
from l1ra_lite.train import loop as train_loop
from l1ra_lite.train import step as train_step
from tests.tiny import save_tiny_base

ROOT = Path(__file__).resolve().parents[1]
ROWS = [{"prompt": f"Question {i}?", "completion": f"Answer {i}."} for i in range(40)]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("reliability")
    save_tiny_base(root / "base")
    with open(root / "data.jsonl", "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in ROWS)
    return root


def config(workdir, **overrides):
    values = dict(
        model=str(workdir / "base"),
        data=str(workdir / "data.jsonl"),
        quant="none",
        budget=14,
        max_steps=6,
        batch_size=4,
        grad_accum=1,
        seq_len=48,
        lr=1e-3,
        warmup=1,
        update_every=2,
        eval_every=0,
        save_every=1,
        keep_checkpoints=2,
        seed=3,
        plain=True,
    )
    values.update(overrides)
    return FinetuneConfig(**values)


def finetune_args(workdir, out, steps):
    return [
        "finetune",
        "--model",
        workdir / "base",
        "--data",
        workdir / "data.jsonl",
        "--quant",
        "none",
        "--budget",
        14,
        "--max-steps",
        steps,
        "--batch-size",
        4,
        "--grad-accum",
        1,
        "--seq-len",
        48,
        "--save-every",
        1,
        "--eval-every",
        0,
        "--plain",
        "--output",
        out,
    ]


def start_child(args):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "l1ra_lite", *map(str, args)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for_line(child, needle, timeout=120):
    deadline = time.time() + timeout
    for line in child.stdout:
        if needle in line:
            return line
        if time.time() > deadline:
            break
    raise AssertionError(f"child never printed {needle!r}")


# ---------------------------------------------------------------- signals


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_finishes_the_step_writes_a_checkpoint_and_says_how_to_resume(workdir, signum, code):
    out = workdir / f"signal-{signum}"
    child = start_child(finetune_args(workdir, out, 400))
    wait_for_line(child, "step 2/400")
    child.send_signal(signum)
    _, err = child.communicate(timeout=120)
    assert child.returncode == code
    assert f"--resume {out}" in err
    stopped = ckpt.load_checkpoint(ckpt.latest_checkpoint(out)).state["step"]
    assert stopped >= 2
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, stopped + 1))
    # A resumed run keeps its settings (the SIGKILL test below resumes one to the end).
    assert main(["finetune", "--resume", str(out), "--max-steps", "401"]) == 2


def test_a_second_ctrl_c_exits_at_once_and_the_last_checkpoint_stays_good(workdir, monkeypatch, capsys):
    from contextlib import contextmanager

    import l1ra_lite.ui.dashboard as dashboard

    @contextmanager
    def display(plain, console=None):
        def report(event):
            if type(event).__name__ == "CheckpointSaved" and event.step == 2:
                os.kill(os.getpid(), signal.SIGINT)  # the first: finish the step, checkpoint
                os.kill(os.getpid(), signal.SIGINT)  # the second, before that: quit at once

        yield report

    monkeypatch.setattr(dashboard, "open_display", display)
    out = workdir / "sigint2"
    assert main([str(a) for a in finetune_args(workdir, out, 400)]) == 130
    err = capsys.readouterr().err
    assert "interrupted; the last complete checkpoint" in err and "stopped at step" not in err
    assert ckpt.load_checkpoint(ckpt.latest_checkpoint(out)).state["step"] == 2  # checksums verified
    assert not list(out.glob(".checkpoint-*"))  # no half-written folder left behind


KILL_WRITER = textwrap.dedent("""
    import sys, torch
    from pathlib import Path
    from l1ra_lite import checkpoint as ckpt
    run = Path(sys.argv[1])
    big = {"w": torch.randn(4_000_000)}  # ~16 MB per file: a write takes a while
    step = ckpt.list_checkpoints(run)[-1][0] if ckpt.list_checkpoints(run) else 0
    while True:
        step += 1
        state = {"step": step, "skipped_steps": 0, "rank_state": {}, "fingerprint": {}}
        ckpt.save_checkpoint(run, step, ckpt.Checkpoint(big, {"state": {}, "param_groups": []}, big, state), keep=2)
        print(step, flush=True)
""")


@pytest.mark.parametrize("delay", [0.05, 0.3, 0.9])
def test_sigkill_while_writing_a_checkpoint_leaves_the_last_complete_one_loadable(tmp_path, delay):
    run = tmp_path / "run"
    run.mkdir()
    for _attempt in range(2):  # two kills at the same moment of successive writes
        child = subprocess.Popen(
            [sys.executable, "-c", KILL_WRITER, str(run)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        child.stdout.readline()  # at least one complete checkpoint exists
        time.sleep(delay)
        child.kill()
        child.wait()
        latest = ckpt.latest_checkpoint(run)
        loaded = ckpt.load_checkpoint(latest)
        assert loaded.state["step"] == int(latest.name.split("-")[1])
        assert torch.equal(loaded.trainable["w"], loaded.extra["w"])


def test_sigkill_of_a_training_run_then_resume_finishes_it(workdir):
    out = workdir / "killed"
    child = start_child(finetune_args(workdir, out, 8))
    wait_for_line(child, "checkpoint step 3")
    child.kill()
    child.wait()
    assert main(["finetune", "--resume", str(out)]) == 0
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9)) and (out / "adapter" / "adapter_model.safetensors").exists()


# ---------------------------------------------------------------- bad numbers


def nan_at(calls_to_poison):
    """Wrap the micro-step so that chosen calls give a NaN loss and NaN gradients."""
    real = train_step.forward_backward
    count = {"n": 0}

    def poisoned(model, batch, weight, *rest):
        count["n"] += 1
        if count["n"] in calls_to_poison:
            weight = weight * float("nan")
        return real(model, batch, weight, *rest)

    return poisoned


def test_a_nan_step_is_skipped_and_counted_and_never_reaches_the_gates(workdir, monkeypatch):
    events = []
    monkeypatch.setattr(train_step, "forward_backward", nan_at({3}))
    run_dir = workdir / "nan-once"
    run_dir.mkdir()
    train(config(workdir), run_dir, events.append, device="cpu")
    logged = [e for e in events if type(e).__name__ == "StepLogged"]
    assert [e.skipped_steps for e in logged] == [0, 0, 1, 1, 1, 1]
    assert all(torch.isfinite(torch.tensor(e.loss)) for e in logged[3:])
    from safetensors.torch import load_file

    weights = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    assert all(torch.isfinite(t).all() for t in weights.values())
    # The skipped step left the trainable state exactly as the step before it.
    before = ckpt.load_checkpoint(run_dir / "checkpoint-6")  # kept: the newest two
    assert all(torch.isfinite(t).all() for t in before.trainable.values())


def test_a_non_finite_step_changes_nothing(workdir):
    from l1ra_lite.l1ra import L1RAOptimizer, RankState, inject_adapters
    from l1ra_lite.l1ra.method import L1RAMethod
    from l1ra_lite.train import optimizer_step
    from tests.tiny import tiny_llama

    model = tiny_llama(0)
    adapters = inject_adapters(model, budget=14)
    trainable = L1RAMethod(model, adapters, L1RAOptimizer(adapters.values(), lr=1e-2), RankState(14, {}), 1.0, 0)
    x = torch.randint(0, 100, (2, 8))
    batch = {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x}
    autocast = {"device_type": "cpu", "dtype": torch.bfloat16, "enabled": False}
    assert optimizer_step(trainable, [batch], 1e-2, 1.0, "cpu", autocast, 1)[0] is not None
    before = {n: p.detach().clone() for n, p in ((n, p) for n, p in model.named_parameters() if p.requires_grad)}
    moments = {id(p): {k: v.clone() for k, v in s.items()} for p, s in trainable.optimizer.state.items()}
    poisoned = {**batch, "input_ids": x}
    real = train_step.forward_backward
    try:
        train_step.forward_backward = lambda m, b, w, *rest: real(m, b, w * float("nan"), *rest)
        loss, _ = optimizer_step(trainable, [poisoned], 1e-2, 1.0, "cpu", autocast, 2)
    finally:
        train_step.forward_backward = real
    assert loss is None
    for name, param in ((n, p) for n, p in model.named_parameters() if p.requires_grad):
        assert torch.equal(param, before[name]) and param.grad is None
    for p, s in trainable.optimizer.state.items():
        assert all(torch.equal(v, moments[id(p)][k]) for k, v in s.items())


def test_nan_steps_in_a_row_stop_the_run_and_keep_the_last_good_checkpoint(workdir, monkeypatch):
    monkeypatch.setattr(train_step, "forward_backward", nan_at(set(range(3, 100))))
    run_dir = workdir / "nan-always"
    run_dir.mkdir()
    with pytest.raises(Diverged, match="not finite for 3 steps in a row"):
        train(config(workdir), run_dir, lambda e: None, device="cpu")
    good = ckpt.load_checkpoint(ckpt.latest_checkpoint(run_dir))
    assert good.state["step"] == 2  # no checkpoint was written from a NaN step
    assert all(torch.isfinite(t).all() for t in good.trainable.values())


# ---------------------------------------------------------------- out of memory, full disk


def test_out_of_memory_says_what_to_lower_saves_a_checkpoint_and_exits_non_zero(workdir, monkeypatch, capsys):
    real = train_step.forward_backward
    calls = {"n": 0}

    def fails_on_third(*args):
        calls["n"] += 1
        if calls["n"] == 3:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(*args)

    monkeypatch.setattr(train_step, "forward_backward", fails_on_third)
    out = workdir / "oom"
    args = [str(a) for a in finetune_args(workdir, out, 6)] + ["--save-every", "10"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "out of memory in the training step of step 3" in err and "--batch-size" in err and "--seq-len" in err
    assert "estimated peak" in err and f"--resume {out}" in err and "Traceback" not in err
    assert ckpt.load_checkpoint(ckpt.latest_checkpoint(out)).state["step"] == 2
    # It resumes with smaller micro-batches (same examples per step).
    monkeypatch.setattr(train_step, "forward_backward", real)
    assert main(["finetune", "--resume", str(out), "--batch-size", "2", "--grad-accum", "2"]) == 0
    assert json.loads((out / "config.json").read_text())["batch_size"] == 2


@pytest.mark.parametrize(
    "error",
    [
        torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB"),
        RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"),
    ],
    ids=["torch-oom", "cublas-alloc"],
)
def test_out_of_memory_in_evaluation_keeps_the_step_and_its_checkpoint(workdir, monkeypatch, capsys, error):
    """The evaluation of step 4 runs out of memory: step 4 is logged and checkpointed (no
    checkpoint was due), one line says so, and the run resumes to the end."""
    real = train_step.evaluate

    def fails(*args, **kwargs):
        raise error

    monkeypatch.setattr(train_step, "evaluate", fails)
    out = workdir / f"oom-eval-{type(error).__name__}"
    args = [str(a) for a in finetune_args(workdir, out, 6)] + ["--save-every", "10", "--eval-every", "4"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("l1ra-lite finetune: error:") and "out of memory in the evaluation of step 4" in err
    assert f"--resume {out}" in err
    assert ckpt.load_checkpoint(ckpt.latest_checkpoint(out)).state["step"] == 4
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    monkeypatch.setattr(train_step, "evaluate", real)
    assert main(["finetune", "--resume", str(out)]) == 0
    assert (out / "adapter" / "adapter_model.safetensors").exists()


def test_only_allocation_failures_count_as_out_of_memory():
    assert train_loop.is_out_of_memory(torch.cuda.OutOfMemoryError("CUDA out of memory"))
    assert train_loop.is_out_of_memory(RuntimeError("CUBLAS_STATUS_ALLOC_FAILED"))
    assert not train_loop.is_out_of_memory(RuntimeError("shape mismatch"))
    assert not train_loop.is_out_of_memory(ValueError("out of memory"))


def test_out_of_memory_while_loading_is_one_line(workdir, monkeypatch, capsys):
    def no_room(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.00 GiB")

    monkeypatch.setattr(train_loop, "load_model", no_room)
    args = [str(a) for a in finetune_args(workdir, workdir / "oom-load", 2)]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("l1ra-lite finetune: error: out of memory while loading")
    assert not any("Traceback" in line for line in err)


def test_disk_full_while_saving_keeps_the_previous_checkpoint(workdir, monkeypatch):
    import safetensors.torch

    real = safetensors.torch.save_file
    calls = {"n": 0}

    def full_disk(tensors, path, *a, **k):
        calls["n"] += 1
        if calls["n"] > 3:  # the second checkpoint's first file; safetensors' own error type
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real(tensors, path, *a, **k)

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    run_dir = workdir / "disk-full"
    run_dir.mkdir()
    with pytest.raises(UserError, match="No space left on device .*; the previous checkpoint is intact"):
        train(config(workdir), run_dir, lambda e: None, device="cpu")
    assert ckpt.latest_checkpoint(run_dir).name == "checkpoint-1"
    ckpt.load_checkpoint(run_dir / "checkpoint-1")
    assert not list(run_dir.glob(".checkpoint-*"))


# ---------------------------------------------------------------- refusing to resume


@pytest.fixture(scope="module")
def finished_run(workdir):
    run_dir = workdir / "finished"
    run_dir.mkdir()
    train(config(workdir), run_dir, lambda e: None, device="cpu")
    return run_dir


def copy_run(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_resume_refuses_a_checkpoint_of_another_budget(workdir, finished_run, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    train(config(workdir, budget=28, max_steps=1), other, lambda e: None, device="cpu")
    for name in ("checkpoint-5", "checkpoint-6", "latest"):
        src = finished_run / name
        dst = other / name
        if src.is_dir():
            copy_run(src, dst)
        else:
            dst.write_bytes(src.read_bytes())
    with pytest.raises(UserError, match="different budget"):
        train(config(workdir, budget=28, max_steps=8), other, lambda e: None, resume=True, device="cpu")


def test_resume_refuses_a_truncated_file(finished_run, tmp_path, workdir):
    run = copy_run(finished_run, tmp_path / "run")
    target = run / "checkpoint-6" / "optimizer.safetensors"
    target.write_bytes(target.read_bytes()[:-100])
    with pytest.raises(UserError, match="corrupt: optimizer.safetensors does not match its checksum"):
        train(config(workdir, max_steps=8), run, lambda e: None, resume=True, device="cpu")


def test_a_pickle_disguised_as_a_checkpoint_is_refused_and_never_run(tmp_path):
    import hashlib
    import pickle

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    run = tmp_path / "run"
    ckpt.save_checkpoint(
        run if run.mkdir() is None else run,
        1,
        ckpt.Checkpoint({"w": torch.ones(2)}, {"state": {}, "param_groups": []}, {}, {"step": 1}),
        2,
    )
    bad = run / "checkpoint-1" / "trainable.safetensors"
    bad.write_bytes(pickle.dumps(Payload()))
    manifest = json.loads((run / "checkpoint-1" / "manifest.json").read_text())
    manifest["files"]["trainable.safetensors"] = {
        "bytes": bad.stat().st_size,
        "sha256": hashlib.sha256(bad.read_bytes()).hexdigest(),
    }
    (run / "checkpoint-1" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="cannot be read"):
        ckpt.load_checkpoint(run / "checkpoint-1")
    assert not marker.exists()


def test_bad_rows_stop_before_training_unless_skipped(workdir, capsys, tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text(
        '{"prompt": "a?", "completion": "b."}\n{"question": "x"}\n' + "".join(json.dumps(r) + "\n" for r in ROWS[:12])
    )
    args = [
        "finetune",
        "--model",
        str(workdir / "base"),
        "--data",
        str(data),
        "--quant",
        "none",
        "--max-steps",
        "1",
        "--budget",
        "14",
        "--plain",
    ]
    assert main(args + ["--output", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "line 2" in err and "--skip-bad-rows" in err
    assert not (tmp_path / "a" / "metrics.jsonl").exists()
    assert main(args + ["--output", str(tmp_path / "b"), "--skip-bad-rows"]) == 0
