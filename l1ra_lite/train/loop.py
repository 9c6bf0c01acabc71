"""The training loop, from settings to a finished run folder, in three parts:

    setup_run   settings -> data -> base model (4-bit) -> adapters (a method) -> resume
    fit         per step: optimiser step, maybe reallocate, log, maybe evaluate, maybe save
    finish      ranks.json and the finished adapter/

Everything is reported as events (l1ra_lite.events); the loop never draws anything
itself, and it never asks which method it trains: the method's hooks (l1ra_lite.methods)
do what differs.

We place the model with from_pretrained's device_map and use torch.autocast directly:
on one device that is all accelerate's wrappers would do here, and they would hide the
optimiser whose state the reallocation resizes.

Under a launcher (torchrun, accelerate launch) the same loop runs in every process, each
on its share of every global batch; l1ra_lite.train.distributed holds all that differs
(the gradient sum, the sharded evaluation, the in-step check) and process 0 alone writes.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, TextIO

import torch

from l1ra_lite import __version__
from l1ra_lite import checkpoint as ckpt
from l1ra_lite.atomic import write_json_atomic
from l1ra_lite.config import FinetuneConfig, resolve_l1_lambda
from l1ra_lite.data import DataSplits, collate, default_data_cache, epoch_order, prepare_data
from l1ra_lite.data.templates import use_chat_template
from l1ra_lite.errors import UserError
from l1ra_lite.events import (
    CheckpointSaved,
    Evaluated,
    GatesSampled,
    MemoryStats,
    Reallocated,
    Reporter,
    RunFinished,
    RunStarted,
    StepLogged,
)
from l1ra_lite.l1ra.rank_state import RankState
from l1ra_lite.methods import AdapterMethod, attach_method
from l1ra_lite.models import ModelSource, compute_dtype, default_device, load_model, load_tokenizer
from l1ra_lite.rank_pattern import read_rank_pattern
from l1ra_lite.train import distributed, run_folder
from l1ra_lite.train import step as steps
from l1ra_lite.train.measure import free_memory_note, memory_stats, reset_peak_memory, trainable_state_bytes
from l1ra_lite.train.schedule import Schedule, lr_at, plan_schedule

MAX_BAD_STEPS_IN_A_ROW = 3  # non-finite loss or gradients: skip, but stop after this many


class Interrupted(Exception):
    """The run was asked to stop (a signal); a checkpoint was written first."""

    def __init__(self, step: int, run_dir: Path):
        super().__init__(f"stopped at step {step}")
        self.step, self.run_dir = step, run_dir


class Diverged(UserError):
    """The loss or the gradients stayed non-finite; the last good checkpoint is kept."""


class OutOfMemory(Exception):
    """The device ran out of memory. `phase` is what was running ("training step",
    "reallocation", "evaluation" or "checkpoint"), `step` the optimiser step it belonged
    to, and `saved_step` the newest checkpoint on disk (written on the way out when one
    was missing and it was safe to), None if there is none."""

    def __init__(self, step: int, saved_step: Optional[int], phase: str = "training step"):
        super().__init__(f"out of memory in the {phase} of step {step}")
        self.step, self.saved_step, self.phase = step, saved_step, phase


def is_out_of_memory(err: BaseException) -> bool:
    """torch's OutOfMemoryError, and the cuBLAS / cuDNN allocation failures that reach us
    as plain RuntimeErrors when a library's workspace cannot be allocated."""
    if isinstance(err, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(err, RuntimeError) and any(
        marker in str(err) for marker in ("CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS_ALLOC_FAILED", "out of memory")
    )


def run_dtype(config: FinetuneConfig, device: str) -> torch.dtype:
    """The compute dtype: --dtype, or with auto what the hardware computes natively. A
    16-bit base on a CPU stays fp32 under auto: CPU bf16 matmuls of unquantised weights
    gain nothing there."""
    if config.dtype == "auto" and config.quant == "none" and device == "cpu":
        return torch.float32
    return compute_dtype(device, config.dtype)


# ------------------------------------------------------------------ the state of a run


@dataclass
class Progress:
    """Where the loop is; checkpointed with the tensors."""

    step: int = 0
    skipped: int = 0  # steps dropped for a non-finite loss or gradient (or an fp16 overflow)
    bad_in_a_row: int = 0


@dataclass
class Run:
    """Everything the loop works with, built once by setup_run."""

    config: FinetuneConfig
    run_dir: Path
    report: Reporter
    device: str
    source: ModelSource
    precision: steps.Precision
    scaler: Optional[torch.amp.GradScaler]
    tokenizer: object
    data: DataSplits
    schedule: Schedule
    method: AdapterMethod
    fingerprint: dict
    progress: Progress = field(default_factory=Progress)
    saved_step: Optional[int] = None  # the newest checkpoint on disk

    def order_of_epoch(self, epoch: int) -> list[int]:
        return _epoch_order(len(self.data.train), self.config.seed, epoch)


_epoch_order = functools.lru_cache(maxsize=2)(epoch_order)


def rng_states(device: str) -> dict[str, torch.Tensor]:
    states = {"rng.torch_cpu": torch.get_rng_state()}
    if device.startswith("cuda"):
        states["rng.cuda"] = torch.cuda.get_rng_state()
    return states


def checkpoint_of(run: Run, rng: dict[str, torch.Tensor]) -> ckpt.Checkpoint:
    """Everything needed to continue exactly from after `run.progress.step`."""
    method, progress = run.method, run.progress
    tensors, method_state = method.extra_state()
    state = {
        "step": progress.step,
        "skipped_steps": progress.skipped,
        "bad_in_a_row": progress.bad_in_a_row,
        "examples_seen": progress.step * run.schedule.examples_per_step,
        "processes": distributed.world_size(),
        "rank_state": method.rank_state.to_json(),
        "fingerprint": run.fingerprint,
        **method_state,
    }
    if run.scaler is not None:
        state["grad_scaler"] = run.scaler.state_dict()
    trainable = {n: p for n, p in method.model.named_parameters() if p.requires_grad}
    return ckpt.Checkpoint(trainable, method.optimizer.state_dict(), {**rng, **tensors}, state)


def restore(run: Run, checkpoint: ckpt.Checkpoint) -> None:
    """Load a checkpoint into adapters whose ranks already match it."""
    method = run.method
    with torch.no_grad():
        for name, param in method.model.named_parameters():
            if param.requires_grad:
                param.copy_(checkpoint.trainable[name])
    method.optimizer.load_state_dict(checkpoint.optimizer)
    method.rank_state = RankState.from_json(checkpoint.state["rank_state"])
    method.load_extra_state(checkpoint.extra, checkpoint.state)
    if run.scaler is not None and "grad_scaler" in checkpoint.state:
        run.scaler.load_state_dict(checkpoint.state["grad_scaler"])
    torch.set_rng_state(distributed.own_state(checkpoint.extra, "rng.torch_cpu"))
    if run.device.startswith("cuda") and "rng.cuda" in checkpoint.extra:
        torch.cuda.set_rng_state(distributed.own_state(checkpoint.extra, "rng.cuda"))
    state = checkpoint.state
    run.progress = Progress(state["step"], state["skipped_steps"], state.get("bad_in_a_row", 0))
    run.saved_step = run.progress.step


def step_batches(
    train_examples: list[dict],
    config: FinetuneConfig,
    step: int,
    order_of_epoch: Callable[[int], list[int]],
    pad_id: int,
    process: int = 0,
    processes: int = 1,
) -> list[dict]:
    """The micro-batches of optimiser step `step` for `process` of `processes`. Step s
    reads positions [s E, (s+1) E) of the concatenated per-epoch shuffles (E examples
    per step, over all processes), process k the k-th consecutive slice of them: a pure
    function of the step, so a resumed run reads exactly what the uninterrupted one
    would have, also when it splits E into other micro-batches or processes."""
    n, per_process = len(train_examples), config.batch_size * config.grad_accum
    start = step * per_process * processes + process * per_process
    if hasattr(train_examples, "take"):  # a stream (--streaming): positions in the stream, shuffled as it is read
        examples = train_examples.take(start, per_process)
    else:
        examples = [train_examples[order_of_epoch(p // n)[p % n]] for p in range(start, start + per_process)]
    return [collate(examples[k : k + config.batch_size], pad_id) for k in range(0, per_process, config.batch_size)]


# ------------------------------------------------------------------ setup


def setup_run(
    config: FinetuneConfig,
    run_dir: Path,
    report: Reporter,
    resume: bool,
    device: Optional[str],
    source: Optional[ModelSource],
) -> Run:
    from l1ra_lite.models import resolve_model

    source = source or resolve_model(config.model)
    device = device or distributed.process_device(default_device())
    precision = steps.Precision(run_dtype(config, device), device.split(":")[0])

    # Data first: a bad file should fail before minutes of model loading.
    tokenizer = load_tokenizer(source, config.trust_remote_code)
    use_chat_template(tokenizer, config.chat_template)
    data = prepare_data(
        config.data,
        tokenizer,
        config.seq_len,
        config.packing,
        config.eval_fraction,
        config.eval_max_rows,
        config.seed,
        config.skip_bad_rows,
        subset=config.data_subset,
        split=config.data_split,
        data_files=config.data_files,
        eval_data=config.eval_data,
        eval_split=config.eval_split,
        num_proc=config.num_proc,
        cache_dir=Path(config.data_cache) if config.data_cache else default_data_cache(),
        streaming=config.streaming,
        max_steps=config.max_steps,
        examples_per_step=config.batch_size * config.grad_accum * distributed.world_size(),
    )
    if not data.train:
        raise UserError("no training examples left after tokenisation (is --seq-len too short?)")
    schedule = plan_schedule(config, len(data.train), distributed.world_size())

    checkpoint_path = ckpt.latest_checkpoint(run_dir) if resume else None
    checkpoint = ckpt.load_checkpoint(checkpoint_path) if checkpoint_path else None
    saved_ranks = checkpoint.state["rank_state"]["ranks"] if checkpoint else None
    if saved_ranks is None and config.ranks_from:
        saved_ranks = read_rank_pattern(config.ranks_from)  # read before the model loads: fail fast

    torch.manual_seed(config.seed)
    method = _load_with_adapters(config, source, device, precision.dtype, schedule, saved_ranks)
    method.model.train()
    run = Run(
        config,
        run_dir,
        report,
        device,
        source,
        precision,
        precision.new_scaler(),
        tokenizer,
        data,
        schedule,
        method,
        run_folder.fingerprint(config, source, method.rank_state.budget, list(method.rank_state.ranks)),
    )
    if checkpoint is not None:
        _continue_from(run, checkpoint, checkpoint_path)
    elif distributed.is_writer():
        _start_run_folder(run)
    check_in_step(run, run.progress.step)  # every process starts from the same adapters
    return run


def check_in_step(run: Run, step: int) -> None:
    """Under several processes: stop unless every process holds the same adapters
    (gates, for L1RA, included) and ranks."""
    trainable = [(n, p) for n, p in run.method.model.named_parameters() if p.requires_grad]
    distributed.check_in_step(trainable, list(run.method.rank_state.ranks.values()), step)


def _continue_from(run: Run, checkpoint: ckpt.Checkpoint, checkpoint_path: Path) -> None:
    run_folder.check_fingerprint(checkpoint.state["fingerprint"], run.fingerprint, checkpoint_path)
    _check_global_batch(checkpoint.state, run.schedule.examples_per_step, checkpoint_path)
    restore(run, checkpoint)
    if distributed.is_writer():
        run_folder.truncate_metrics(run.run_dir / "metrics.jsonl", run.progress.step)
        now = {"processes": distributed.world_size(), "global_batch": run.schedule.examples_per_step}
        run_folder.keep_run_config_in_step(run.run_dir, run.config, now)


def _check_global_batch(state: dict, examples_per_step: int, path: Path) -> None:
    """Step s reads examples [s E, (s+1) E): a resumed run must keep E (processes x
    batch size x grad accumulation), or it would read other data from here on."""
    step, seen = state["step"], state.get("examples_seen")
    if step and seen is not None and seen != step * examples_per_step:
        saved = seen // step
        raise UserError(
            f"checkpoint {path} was written with {saved} examples a step ({state.get('processes', 1)} "
            f"process(es) x batch size x grad accumulation); this run has {examples_per_step} "
            f"({distributed.world_size()} process(es)): keep the product, e.g. with --batch-size / --grad-accum"
        )


def _start_run_folder(run: Run) -> None:
    """config.json with the values the settings resolve to for this run."""
    config, method, schedule = run.config, run.method, run.schedule
    run_folder.write_run_config(
        run.run_dir,
        config,
        {
            "budget": method.rank_state.budget,
            "alpha": method.alpha,
            "l1_lambda": resolve_l1_lambda(config, schedule.total_steps),
            "base_model_path": run.source.path,
            "model_type": method.model.config.model_type,
            "compute_dtype": str(run.precision.dtype).removeprefix("torch."),
            "total_steps": schedule.total_steps,
            "n_adapters": len(method.rank_state.ranks),
            "processes": distributed.world_size(),
            "global_batch": schedule.examples_per_step,
            "data_stats": run.data.stats.to_dict(),
            "version": __version__,
        },
    )


def _load_with_adapters(
    config: FinetuneConfig,
    source: ModelSource,
    device: str,
    dtype: torch.dtype,
    schedule: Schedule,
    saved_ranks: Optional[dict[str, int]],
) -> AdapterMethod:
    try:
        model = load_model(source, config.quant, device, dtype, config.trust_remote_code)
        return attach_method(model, config, schedule, saved_ranks)
    except RuntimeError as err:
        if not is_out_of_memory(err):
            raise
    raise UserError(
        f"out of memory while loading {source.name} on {device}{free_memory_note(device)}: the model "
        "does not fit; `l1ra-lite estimate --model ...` shows what a card needs, or use a smaller model"
    )


# ------------------------------------------------------------------ fit


def write_ranks(run: Run) -> None:
    if distributed.is_writer():
        write_json_atomic(run.run_dir / "ranks.json", run.method.rank_state.to_json())


def save(run: Run, rng: Optional[dict] = None) -> None:
    """Write a checkpoint (process 0; under several processes, after checking that they
    are in step, with every process's RNG state)."""
    check_in_step(run, run.progress.step)
    rng = distributed.gather_states(rng if rng is not None else rng_states(run.device))
    if not distributed.is_writer():
        run.saved_step = run.progress.step
        return
    snapshot = checkpoint_of(run, rng)
    try:
        path = ckpt.save_checkpoint(run.run_dir, run.progress.step, snapshot, run.config.keep_checkpoints)
    except OSError as err:
        raise UserError(
            f"cannot write the checkpoint of step {run.progress.step} in {run.run_dir}: "
            f"{err.strerror or err}; the previous checkpoint is intact"
        ) from None
    run.saved_step = run.progress.step
    run.report(CheckpointSaved(run.progress.step, str(path)))


def count_outcome(run: Run, loss: Optional[float], grad_norm: float) -> None:
    """Skipped steps, and the stop after MAX_BAD_STEPS_IN_A_ROW non-finite ones."""
    progress = run.progress
    if loss is not None:
        progress.bad_in_a_row = 0
        progress.skipped += not math.isfinite(grad_norm)  # an fp16 overflow: skipped, the scale lowered
        return
    progress.skipped += 1  # not finite: nothing reached the weights, gates or ranks
    progress.bad_in_a_row += 1
    if progress.bad_in_a_row >= MAX_BAD_STEPS_IN_A_ROW:
        raise Diverged(
            f"loss or gradients were not finite for {progress.bad_in_a_row} steps in a row "
            f"(step {progress.step}); stopped. Lower --lr (now {run.config.lr:g}) or check the data; "
            "the last good checkpoint is kept"
        )


def maybe_reallocate(run: Run) -> Optional[float]:
    """Reallocate at the scheduled steps; returns the seconds it took, None if not due."""
    step = run.progress.step
    if not (run.method.moves_rank and run.schedule.reallocates_at(step)):
        return None
    if run.config.log_gates and distributed.is_writer():
        run_folder.write_rank_snapshot(run.run_dir, step, run.method.rank_snapshot())
    report_gates(run)
    started = time.perf_counter()
    event = run.method.reallocate(step)
    seconds = time.perf_counter() - started
    check_in_step(run, step)  # the same plan in every process, or stop
    if event is not None:
        write_ranks(run)
        run.report(
            Reallocated(
                step, event.budget, event.pruned, event.added, event.ranks, run.schedule.next_update(step), seconds
            )
        )
    return seconds


def report_gates(run: Run) -> None:
    """The gates as the reallocation rule is about to see them (and at the end of the
    run), for the trackers' histograms. Read through rank_snapshot, the method hook
    --log-gates uses, so that the loop still never asks which method it trains."""
    gates = {
        key.removesuffix(".gate"): tuple(values.tolist())
        for key, values in run.method.rank_snapshot().items()
        if key.endswith(".gate")
    }
    if gates:
        run.report(GatesSampled(run.progress.step, gates))


def metrics_line(
    run: Run,
    loss: Optional[float],
    grad_norm: float,
    lr: float,
    tokens: float,
    started: tuple[float, float],
    fit_started: float,
    memory: MemoryStats,
) -> dict:
    """`tokens`: the step's input tokens over all processes."""
    now = time.perf_counter()
    line = {
        "step": run.progress.step,
        "loss": float("nan") if loss is None else loss,
        "lr": lr,
        "grad_norm": grad_norm,
        "tokens_per_s": tokens / (now - started[0]),
        "step_s": now - started[0],
        "step_cpu_s": time.process_time() - started[1],
        "mem_bytes": memory.allocated or memory.rss,
        "adapter_bytes": trainable_state_bytes(run.method),
        "rank_total": run.method.rank_state.total,
        "elapsed_s": now - fit_started,
    }
    if memory.peak:
        line["peak_bytes"] = memory.peak
    return line


def log(run: Run, metrics: Optional[TextIO], line: dict, memory: MemoryStats) -> None:
    if metrics is not None:  # None in processes other than 0
        metrics.write(json.dumps(line) + "\n")
        metrics.flush()
    run.report(
        StepLogged(
            step=line["step"],
            total_steps=run.schedule.total_steps,
            epoch=line["step"] / run.schedule.steps_per_epoch,
            loss=line["loss"],
            lr=line["lr"],
            grad_norm=line["grad_norm"],
            tokens_per_s=line["tokens_per_s"],
            elapsed_s=line["elapsed_s"],
            memory=memory,
            adapter_bytes=line["adapter_bytes"],
            rank_total=line["rank_total"],
            skipped_steps=run.progress.skipped,
        )
    )


def due(every: int, step: int) -> bool:
    return bool(every) and step % every == 0


def fit(run: Run, should_stop: Callable[[], bool]) -> None:
    """Train from run.progress.step to the end of the schedule."""
    config, schedule, progress = run.config, run.schedule, run.progress
    pad_id = run.tokenizer.pad_token_id
    reset_peak_memory(run.device)  # the peak in metrics is the training's, not the loading's
    fit_started = time.perf_counter()
    process, processes = distributed.rank(), distributed.world_size()
    eval_examples = distributed.shard(run.data.eval)
    with _metrics_file(run) as metrics:
        while progress.step < schedule.total_steps:
            started = (time.perf_counter(), time.process_time())
            rng_before = rng_states(run.device)  # an OOM checkpoint must resume from before this step
            batches = step_batches(
                run.data.train, config, progress.step, run.order_of_epoch, pad_id, process, processes
            )
            step_tokens, tokens = distributed.sum_over_processes(
                [
                    sum(steps.label_tokens(b["labels"]) for b in batches),
                    sum(int(b["attention_mask"].sum()) for b in batches),
                ]
            )
            lr = lr_at(progress.step, schedule, config.lr)
            phase, line, memory = "training step", None, None
            try:
                loss, grad_norm = steps.optimizer_step(
                    run.method,
                    batches,
                    lr,
                    config.max_grad_norm,
                    run.device,
                    run.precision.autocast,
                    progress.step + 1,
                    run.scaler,
                    int(step_tokens),
                )
                progress.step += 1
                count_outcome(run, loss, grad_norm)
                phase = "reallocation"
                realloc_s = maybe_reallocate(run)
                memory = memory_stats(run.device)
                line = metrics_line(run, loss, grad_norm, lr, tokens, started, fit_started, memory)
                if realloc_s is not None:
                    line["realloc_s"] = realloc_s
                is_last = progress.step == schedule.total_steps
                if is_last:
                    report_gates(run)
                if run.data.eval and (is_last or due(schedule.eval_every, progress.step)):
                    phase = "evaluation"
                    eval_loss = steps.evaluate(
                        run.method.model, eval_examples, config.batch_size, pad_id, run.device, run.precision.autocast
                    )
                    line.update(eval_loss=eval_loss, eval_ppl=math.exp(min(eval_loss, 50)))
                    run.report(Evaluated(progress.step, eval_loss, line["eval_ppl"]))
                # The metrics line goes first: a run killed after its checkpoint has it.
                if due(config.log_every, progress.step) or is_last or "eval_loss" in line:
                    log(run, metrics, line, memory)
                stop = distributed.any_process(should_stop()) and not is_last  # all stop at the same step
                # No periodic checkpoint right after a skipped (non-finite) step: the newest
                # checkpoints stay those of good steps.
                if stop or is_last or (due(schedule.save_every, progress.step) and not progress.bad_in_a_row):
                    phase = "checkpoint"
                    save(run)
                if stop:
                    raise Interrupted(progress.step, run.run_dir)
            except RuntimeError as err:
                if not is_out_of_memory(err):
                    raise
            else:
                continue
            # Out of memory; handled outside the except, whose traceback holds the graph.
            if phase == "evaluation":
                log(run, metrics, line, memory)  # the step itself completed
            _out_of_memory(run, phase, rng_before)


def _metrics_file(run: Run):
    """metrics.jsonl, appended to by process 0; None (nothing written) in the others."""
    if distributed.is_writer():
        return open(run.run_dir / "metrics.jsonl", "a", encoding="utf-8")
    return contextlib.nullcontext(None)


def _out_of_memory(run: Run, phase: str, rng_before: dict) -> None:
    """Free what the failed phase held, keep a checkpoint where that is safe, and raise
    OutOfMemory. A failed training step left the counter where it was (rng_before is the
    state to resume from); after a completed step the current state is. A reallocation
    cut short may have left the adapters half resized: the previous checkpoint stays."""
    run.method.optimizer.zero_grad(set_to_none=True)
    if run.device.startswith("cuda"):
        torch.cuda.empty_cache()
    progress = run.progress
    # Not under several processes: the others are inside another collective by now.
    safe_to_save = progress.step > 0 and run.saved_step != progress.step and not distributed.active()
    if phase in ("training step", "evaluation") and safe_to_save:
        save(run, rng_before if phase == "training step" else None)
    raise OutOfMemory(progress.step + 1 if phase == "training step" else progress.step, run.saved_step, phase)


# ------------------------------------------------------------------ finish


def finish(run: Run) -> Path:
    if not distributed.is_writer():
        return run.run_dir / "adapter"
    write_ranks(run)
    adapter_dir = run_folder.save_adapter(run.method, run.run_dir, run.source, run.config, run.tokenizer)
    run.report(
        RunFinished(run.progress.step, str(run.run_dir), str(adapter_dir), rank_summary=run.method.rank_summary())
    )
    return adapter_dir


def train(
    config: FinetuneConfig,
    run_dir: Path,
    report: Reporter,
    resume: bool = False,
    should_stop: Callable[[], bool] = lambda: False,
    device: Optional[str] = None,
    source: Optional[ModelSource] = None,
) -> Path:
    """Train and write the run folder; returns the adapter folder.

    With resume=True the run continues from the latest checkpoint in run_dir and ends
    exactly as an uninterrupted run would have.
    """
    run = setup_run(config, run_dir, report, resume, device, source)
    write_ranks(run)
    schedule = run.schedule
    report(
        RunStarted(
            model=run.source.name,
            method=config.method,
            output_dir=str(run_dir),
            total_steps=schedule.total_steps,
            steps_per_epoch=schedule.steps_per_epoch,
            budget=run.method.rank_state.budget,
            ranks=dict(run.method.rank_state.ranks),
            update_every=schedule.update_every if run.method.moves_rank else 0,
            next_update=schedule.next_update(run.progress.step) if run.method.moves_rank else None,
            device=run.device,
            start_step=run.progress.step,
            notes=tuple(run.data.stats.notes()),
        )
    )
    fit(run, should_stop)
    return finish(run)
