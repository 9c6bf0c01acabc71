"""The training loop: one readable function from settings to a finished run folder.

    settings -> base model (4-bit) -> adapters -> data -> loop -> events / checkpoints -> adapter/

Each optimiser step runs `grad_accum` micro-batches (the loss of each is weighted by
its share of the step's answer tokens, so accumulation equals one big batch), clips the
gradients, sets the scheduled LR, steps, and for L1RA reallocates rank every
`update_every` steps after warmup. Everything is reported as events (l1ra_lite.events);
the loop never draws anything itself.

We place the model with from_pretrained's device_map and use torch.autocast directly:
on one device that is all accelerate's wrappers would do here, and they would hide the
optimiser whose state the reallocation resizes.
"""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from l1ra_lite import __version__
from l1ra_lite import checkpoint as ckpt
from l1ra_lite.adapter_io import save_peft_adapter, target_names
from l1ra_lite.baselines import (
    adalora_allocator_state,
    adalora_target_rank,
    load_adalora_allocator_state,
    peft_adalora,
    peft_lora,
    peft_ranks,
)
from l1ra_lite.config import FinetuneConfig, steps_from
from l1ra_lite.data import IGNORE_INDEX, collate, epoch_order, prepare_data
from l1ra_lite.errors import UserError
from l1ra_lite.events import (
    CheckpointSaved,
    Evaluated,
    MemoryStats,
    Reallocated,
    Reporter,
    RunFinished,
    RunStarted,
    StepLogged,
)
from l1ra_lite.l1ra import L1RAOptimizer, RankState, inject_adapters, initial_ranks, reallocate
from l1ra_lite.l1ra.inject import find_targets
from l1ra_lite.loss import causal_lm_loss
from l1ra_lite.models import ModelSource, compute_dtype, default_device, load_model, load_tokenizer

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
    "evaluation" or "checkpoint"), `step` the optimiser step it belonged to, and
    `saved_step` the newest checkpoint on disk (written on the way out when one was
    missing), None if there is none."""

    def __init__(self, step: int, saved_step: Optional[int], phase: str = "training step"):
        super().__init__(f"out of memory in the {phase} of step {step}")
        self.step, self.saved_step, self.phase = step, saved_step, phase


def is_out_of_memory(err: BaseException) -> bool:
    """torch's OutOfMemoryError, and the cuBLAS / cuDNN allocation failures that reach us
    as plain RuntimeErrors when a library's workspace cannot be allocated."""
    if isinstance(err, torch.cuda.OutOfMemoryError):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and any(
        marker in text for marker in ("CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS_ALLOC_FAILED", "out of memory"))


# ------------------------------------------------------------------ schedule


@dataclass(frozen=True)
class Schedule:
    total_steps: int
    steps_per_epoch: int
    examples_per_step: int  # batch_size x grad_accum
    warmup_steps: int
    update_every: int  # steps between reallocations (L1RA) or AdaLoRA's deltaT; 0: none
    eval_every: int  # 0: only at the end
    save_every: int  # 0: only at the end

    @property
    def first_update(self) -> int:
        """The first step at which a reallocation may happen (after warmup, never step 0)."""
        if not self.update_every:
            return 0
        return (self.warmup_steps // self.update_every + 1) * self.update_every

    def reallocates_at(self, step: int) -> bool:
        return bool(self.update_every) and step >= self.first_update and step % self.update_every == 0 \
            and step < self.total_steps

    def next_update(self, step: int) -> Optional[int]:
        if not self.update_every:
            return None
        nxt = max(self.first_update, (step // self.update_every + 1) * self.update_every)
        return nxt if nxt < self.total_steps else None


def plan_schedule(config: FinetuneConfig, n_train_examples: int) -> Schedule:
    per_step = config.batch_size * config.grad_accum
    total = config.max_steps or max(1, math.ceil(config.epochs * n_train_examples / per_step))
    return Schedule(
        total_steps=total,
        steps_per_epoch=max(1, math.ceil(n_train_examples / per_step)),
        examples_per_step=per_step,
        warmup_steps=steps_from(config.warmup, total),
        update_every=steps_from(config.update_every, total) if config.method != "lora" else 0,
        eval_every=steps_from(config.eval_every, total),
        save_every=steps_from(config.save_every, total),
    )


def lr_at(step: int, schedule: Schedule, peak: float) -> float:
    """Linear warmup to `peak`, then cosine decay to 0; `step` counts steps already taken."""
    if step < schedule.warmup_steps:
        return peak * (step + 1) / schedule.warmup_steps
    progress = (step - schedule.warmup_steps) / max(1, schedule.total_steps - schedule.warmup_steps)
    return peak * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


# ------------------------------------------------------------------ adapters


@dataclass
class Trainable:
    """What the loop trains: the model with adapters, its optimiser, the rank record."""

    method: str
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    rank_state: RankState
    adapters: Optional[dict]  # L1RA: path -> L1RALinear; None for peft methods
    alpha: float

    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def named_trainable(self) -> dict[str, torch.Tensor]:
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    def current_ranks(self) -> dict[str, int]:
        if self.adapters is not None:
            return {p: a.rank for p, a in self.adapters.items()}
        return peft_ranks(self.model, self.method)


def run_dtype(config: FinetuneConfig, device: str) -> torch.dtype:
    """The compute dtype: --dtype, or with auto what the hardware computes natively. A
    16-bit base on a CPU stays fp32 under auto: CPU bf16 matmuls of unquantised weights
    gain nothing there."""
    if config.dtype == "auto" and config.quant == "none" and device == "cpu":
        return torch.float32
    return compute_dtype(device, config.dtype)


def free_memory_note(device: str) -> str:
    """", 1.2 of 8.0 GiB free" on CUDA (for out-of-memory messages), else ""."""
    if not device.startswith("cuda"):
        return ""
    try:
        free, total = torch.cuda.mem_get_info(torch.device(device).index or 0)
    except RuntimeError:
        return ""
    return f", {free / 2**30:.1f} of {total / 2**30:.1f} GiB free"


def resolve_l1_lambda(config: FinetuneConfig, total_steps: int) -> float:
    """'auto': the penalty follows the run length, lambda = kappa / (eta_c * steps)."""
    if config.l1_lambda == "auto":
        return config.l1_kappa / (config.eta_c * total_steps)
    return float(config.l1_lambda)


def attach_adapters(model, config: FinetuneConfig, schedule: Schedule,
                    saved_ranks: Optional[dict[str, int]] = None) -> Trainable:
    paths = find_targets(model, config.target_modules)
    budget = config.budget if config.budget is not None else 8 * len(paths)
    ranks = initial_ranks(budget, len(paths))
    alpha = config.alpha if config.alpha is not None else budget / len(paths)
    if config.method == "l1ra":
        adapters = inject_adapters(model, budget, config.target_modules, alpha, config.dropout,
                                   seed=config.seed, ranks=saved_ranks)
        optimizer = L1RAOptimizer(adapters.values(), lr=config.lr, weight_decay=config.weight_decay,
                                  eta_c=config.eta_c, l1_lambda=resolve_l1_lambda(config, schedule.total_steps))
        state = RankState(budget, {p: a.rank for p, a in adapters.items()})
        return Trainable("l1ra", model, optimizer, state, adapters, alpha)
    torch.manual_seed(config.seed)  # peft draws its init from the global generator
    if config.method == "lora":
        model = peft_lora(model, paths, ranks, alpha, config.dropout)
    else:
        model = peft_adalora(model, paths, budget, alpha, config.dropout, schedule.total_steps,
                             schedule.warmup_steps, max(1, schedule.update_every))
        budget = adalora_target_rank(budget, len(paths)) * len(paths)  # the total AdaLoRA ends at
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    trainable = Trainable(config.method, model, optimizer, RankState(budget, {}), None, alpha)
    trainable.rank_state.ranks = trainable.current_ranks()
    return trainable


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """The scheduled LR for every group except L1RA's gates (constant eta_c)."""
    for group in optimizer.param_groups:
        if group.get("kind") != "gate":
            group["lr"] = lr


def trainable_state_bytes(trainable: Trainable) -> int:
    """Adapter parameters + their gradients (held during each step) + optimiser state
    (+ AdaLoRA's importance scores, which it keeps for every parameter)."""
    params = trainable.parameters()
    tensors = [v for p in params for v in trainable.optimizer.state.get(p, {}).values() if torch.is_tensor(v)]
    if trainable.method == "adalora":
        tensors += list(adalora_allocator_state(trainable.model).values())
    return 2 * sum(p.numel() * p.element_size() for p in params) + \
        sum(t.numel() * t.element_size() for t in tensors)


# ------------------------------------------------------------------ measuring


def memory_stats(device: str) -> MemoryStats:
    if device.startswith("cuda"):
        index = torch.device(device).index or 0
        return MemoryStats(
            device="cuda",
            allocated=torch.cuda.memory_allocated(index),
            reserved=torch.cuda.memory_reserved(index),
            peak=torch.cuda.max_memory_allocated(index),
            total=torch.cuda.get_device_properties(index).total_memory,
        )
    import psutil

    return MemoryStats(device="cpu", rss=psutil.Process().memory_info().rss, peak=_peak_rss())


def reset_peak_memory(device: str) -> None:
    """Start the peak-memory count afresh (after loading), so that the peak in metrics is
    the training's: on CUDA torch's counter, on Linux the process's VmHWM (writing 5 to
    /proc/self/clear_refs resets it)."""
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(torch.device(device).index or 0)
        return
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:  # not Linux, or not allowed: the peak then includes loading
        pass


def _peak_rss() -> int:
    """This process's resident high-water mark (Linux VmHWM; it starts afresh at exec,
    unlike getrusage's ru_maxrss, which can carry the parent's size into a child)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def _label_tokens(labels: torch.Tensor) -> int:
    return int((labels[:, 1:] != IGNORE_INDEX).sum())  # the first label is never predicted


def to_device(batch: dict, device: str) -> dict:
    """The batch for the model on `device`; labels stay where they are (on the CPU), so the
    loss finds the labelled positions without making the host wait for the GPU."""
    return {k: v if k == "labels" else v.to(device, non_blocking=True) for k, v in batch.items()}


def _forward_backward(model, batch, weight: float, autocast: dict,
                      scaler: Optional[torch.amp.GradScaler] = None) -> torch.Tensor:
    """Loss of one micro-batch (a tensor on the device: reading it would wait for the GPU),
    backward with its weight; the graph dies with this frame (a live graph would pin the
    old shapes of resized parameters)."""
    with torch.autocast(**autocast):
        loss = causal_lm_loss(model, batch) * weight
    (scaler.scale(loss) if scaler is not None else loss).backward()
    return loss.detach()


def _optimizer_step(trainable: Trainable, batches: list[dict], lr: float, max_grad_norm: float,
                    device: str, autocast: dict, step_number: int,
                    scaler: Optional[torch.amp.GradScaler] = None) -> tuple[Optional[float], float]:
    """Forward/backward over the micro-batches, clip, step. Each micro-batch's loss is
    weighted by its share of the step's answer tokens, so accumulation equals one big
    batch. The loss and the gradient norm are read once, together: the step's one wait
    for the device. Returns (loss, grad norm); loss is None when the loss or the
    gradients were not finite, and then nothing was updated. With fp16 loss scaling
    (`scaler`), gradients that overflow are not a fault: the step is skipped, the scale
    lowered, and the loss returned with an infinite grad norm."""
    step_tokens = sum(_label_tokens(b["labels"]) for b in batches)
    loss = torch.zeros((), device=device)
    for batch in batches:
        weight = _label_tokens(batch["labels"]) / max(1, step_tokens)
        loss += _forward_backward(trainable.model, to_device(batch, device), weight, autocast, scaler)
    if scaler is not None:
        scaler.unscale_(trainable.optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(trainable.parameters(), max_grad_norm or float("inf"))
    loss, grad_norm = torch.stack([loss.float(), grad_norm.float().to(loss.device)]).tolist()
    finite = math.isfinite(loss) and math.isfinite(grad_norm)
    if finite:
        set_lr(trainable.optimizer, lr)
        trainable.optimizer.step()
        if trainable.method == "adalora":  # peft: after the step, before zeroing the gradients
            trainable.model.base_model.update_and_allocate(step_number)
    if scaler is not None:
        scaler.update()  # grows the scale after a run of good steps, lowers it after an overflow
    trainable.optimizer.zero_grad(set_to_none=True)
    if not finite and scaler is not None and math.isfinite(loss):
        return loss, float("inf")
    return (loss if finite else None), grad_norm


@torch.no_grad()
def evaluate(model, examples: list[dict], batch_size: int, pad_id: int, device: str, autocast: dict) -> float:
    """Token-weighted mean loss over the held-out examples."""
    was_training = model.training
    model.eval()
    total_loss, total_tokens = torch.zeros((), dtype=torch.float64, device=device), 0
    for start in range(0, len(examples), batch_size):
        batch = collate(examples[start:start + batch_size], pad_id)
        tokens = _label_tokens(batch["labels"])
        if tokens:
            with torch.autocast(**autocast):
                total_loss += causal_lm_loss(model, to_device(batch, device)).double() * tokens
            total_tokens += tokens
    model.train(was_training)
    return float(total_loss) / max(1, total_tokens)  # read once, at the end


# ------------------------------------------------------------------ run folder


def write_run_config(run_dir: Path, config: FinetuneConfig, extra: dict) -> None:
    ckpt.write_json_atomic(run_dir / "config.json", {**config.to_dict(), **extra})


def _fingerprint(config: FinetuneConfig, source: ModelSource, trainable: Trainable) -> dict:
    """What a checkpoint must match to be resumed into this run."""
    return {
        "model": source.path,
        "method": config.method,
        "budget": trainable.rank_state.budget,
        "target_modules": sorted(trainable.rank_state.ranks),
        "quant": config.quant,
    }


def _check_fingerprint(saved: dict, current: dict, path: Path) -> None:
    for key, label in (("model", "model"), ("method", "method"), ("budget", "budget"),
                       ("target_modules", "target modules"), ("quant", "quantisation")):
        if saved.get(key) != current[key]:
            shown = (lambda v: f"{len(v)} modules" if isinstance(v, list) else repr(v))
            raise UserError(f"checkpoint {path} was made with a different {label} "
                            f"({shown(saved.get(key))}, this run: {shown(current[key])}); it cannot be resumed")


def _all_decoder_linears(model) -> list[str]:
    try:
        return find_targets(model, None)
    except UserError:  # no numbered blocks: the adapter config will list full paths
        return []


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop metric lines written after the checkpoint we continue from."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            continue
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


def _save_adapter(trainable: Trainable, run_dir: Path, source: ModelSource, config: FinetuneConfig,
                  tokenizer, all_linear: list[str]) -> Path:
    """Write adapter/ atomically: into a temporary folder, then renamed into place."""
    final, tmp = run_dir / "adapter", run_dir / f".adapter.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    if trainable.adapters is not None:
        paths = list(trainable.adapters)
        save_peft_adapter(trainable.adapters, tmp, source.path, lora_alpha=max(1, round(trainable.alpha)),
                          dropout=config.dropout, target_modules=target_names(paths, all_linear),
                          tokenizer=tokenizer)
    else:
        trainable.model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
    if final.exists():  # move the old one aside first: there is always a complete adapter/
        old = run_dir / f".adapter.old-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    return final


def rng_states(device: str) -> dict[str, torch.Tensor]:
    states = {"rng.torch_cpu": torch.get_rng_state()}
    if device.startswith("cuda"):
        states["rng.cuda"] = torch.cuda.get_rng_state()
    return states


@dataclass
class Progress:
    """Where the loop is; checkpointed with the tensors."""

    step: int = 0
    skipped: int = 0  # steps dropped for a non-finite loss or gradient
    bad_in_a_row: int = 0


def checkpoint_of(trainable: Trainable, progress: Progress, fingerprint: dict, examples_per_step: int,
                  rng: dict[str, torch.Tensor]) -> ckpt.Checkpoint:
    """Everything needed to continue exactly from after `progress.step`."""
    extra = dict(rng)
    state = {"step": progress.step, "skipped_steps": progress.skipped, "bad_in_a_row": progress.bad_in_a_row,
             "examples_seen": progress.step * examples_per_step,
             "rank_state": trainable.rank_state.to_json(), "fingerprint": fingerprint}
    if trainable.method == "adalora":
        extra.update(adalora_allocator_state(trainable.model))
        state["adalora_rank_pattern"] = trainable.model.peft_config["default"].rank_pattern
    return ckpt.Checkpoint(trainable.named_trainable(), trainable.optimizer.state_dict(), extra, state)


def restore(trainable: Trainable, checkpoint: ckpt.Checkpoint, device: str) -> Progress:
    """Load a checkpoint into adapters whose ranks already match it."""
    with torch.no_grad():
        for name, param in trainable.named_trainable().items():
            param.copy_(checkpoint.trainable[name])
    trainable.optimizer.load_state_dict(checkpoint.optimizer)
    trainable.rank_state = RankState.from_json(checkpoint.state["rank_state"])
    if trainable.method == "adalora":
        load_adalora_allocator_state(trainable.model, checkpoint.extra)
        trainable.model.peft_config["default"].rank_pattern = checkpoint.state.get("adalora_rank_pattern")
    torch.set_rng_state(checkpoint.extra["rng.torch_cpu"])
    if device.startswith("cuda") and "rng.cuda" in checkpoint.extra:
        torch.cuda.set_rng_state(checkpoint.extra["rng.cuda"])
    state = checkpoint.state
    return Progress(state["step"], state["skipped_steps"], state.get("bad_in_a_row", 0))


def step_batches(train_examples: list[dict], config: FinetuneConfig, step: int,
                 order_of_epoch: Callable[[int], list[int]], pad_id: int) -> list[dict]:
    """The micro-batches of optimiser step `step`. Step s reads positions
    [s E, (s+1) E) of the concatenated per-epoch shuffles (E examples per step): a pure
    function of the step, so a resumed run reads exactly what the uninterrupted one
    would have, also when it splits E into other micro-batches."""
    n, per_step = len(train_examples), config.batch_size * config.grad_accum
    chosen = [order_of_epoch(p // n)[p % n] for p in range(step * per_step, (step + 1) * per_step)]
    return [collate([train_examples[i] for i in chosen[k:k + config.batch_size]], pad_id)
            for k in range(0, per_step, config.batch_size)]


# ------------------------------------------------------------------ the loop


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
    from l1ra_lite.models import resolve_model

    source = source or resolve_model(config.model)
    device = device or default_device()
    dtype = run_dtype(config, device)
    autocast = {"device_type": device.split(":")[0], "dtype": dtype,
                "enabled": dtype in (torch.bfloat16, torch.float16)}
    # fp16 (cards without bf16) needs loss scaling; bf16 has fp32's range and does not.
    scaler = torch.amp.GradScaler(device.split(":")[0]) if dtype == torch.float16 else None

    # Data first: a bad file should fail before minutes of model loading.
    tokenizer = load_tokenizer(source, config.trust_remote_code)
    data = prepare_data(config.data, tokenizer, config.seq_len, config.packing, config.eval_fraction,
                        config.eval_max_rows, config.seed, config.skip_bad_rows)
    if not data.train:
        raise UserError("no training examples left after tokenisation (is --seq-len too short?)")
    schedule = plan_schedule(config, len(data.train))

    checkpoint = None
    if resume:
        checkpoint_path = ckpt.latest_checkpoint(run_dir)
        checkpoint = ckpt.load_checkpoint(checkpoint_path)

    torch.manual_seed(config.seed)
    saved_ranks = checkpoint.state["rank_state"]["ranks"] if checkpoint and config.method == "l1ra" else None
    try:
        model = load_model(source, config.quant, device, dtype, config.trust_remote_code)
        all_linear = _all_decoder_linears(model)
        trainable = attach_adapters(model, config, schedule, saved_ranks)
    except RuntimeError as err:
        if not is_out_of_memory(err):
            raise
        raise UserError(f"out of memory while loading {source.name} on {device}{free_memory_note(device)}: "
                        "the model does not fit; see l1ra-lite estimate --model ... for what a card needs, "
                        "or use a smaller model") from None
    model = trainable.model
    model.train()
    fingerprint = _fingerprint(config, source, trainable)

    progress = Progress()
    saved_step: Optional[int] = None  # the newest checkpoint on disk
    if checkpoint is not None:
        _check_fingerprint(checkpoint.state["fingerprint"], fingerprint, checkpoint_path)
        progress = restore(trainable, checkpoint, device)
        if scaler is not None and "grad_scaler" in checkpoint.state:
            scaler.load_state_dict(checkpoint.state["grad_scaler"])
        saved_step = progress.step
        del checkpoint  # torch's load_state_dict may alias its tensors: let them go
        _truncate_metrics(run_dir / "metrics.jsonl", progress.step)
        # Keep config.json in step with what may change on resume (e.g. the batch split).
        saved_config = json.loads((run_dir / "config.json").read_text())
        write_run_config(run_dir, config, {k: v for k, v in saved_config.items() if k not in config.to_dict()})
    else:
        write_run_config(run_dir, config, {
            "budget": trainable.rank_state.budget,
            "alpha": trainable.alpha,
            "l1_lambda": resolve_l1_lambda(config, schedule.total_steps),
            "base_model_path": source.path,
            "model_type": model.config.model_type,
            "compute_dtype": str(dtype).removeprefix("torch."),
            "total_steps": schedule.total_steps,
            "n_adapters": len(trainable.rank_state.ranks),
            "data_stats": data.stats.to_dict(),
            "version": __version__,
        })

    def save(rng: Optional[dict] = None) -> None:
        nonlocal saved_step
        snapshot = checkpoint_of(trainable, progress, fingerprint, schedule.examples_per_step,
                                 rng if rng is not None else rng_states(device))
        if scaler is not None:
            snapshot.state["grad_scaler"] = scaler.state_dict()
        try:
            path = ckpt.save_checkpoint(run_dir, progress.step, snapshot, config.keep_checkpoints)
        except OSError as err:
            raise UserError(f"cannot write the checkpoint of step {progress.step} in {run_dir}: "
                            f"{err.strerror or err}; the previous checkpoint is intact") from None
        saved_step = progress.step
        report(CheckpointSaved(progress.step, str(path)))

    def write_ranks() -> None:
        ckpt.write_json_atomic(run_dir / "ranks.json", trainable.rank_state.to_json())

    write_ranks()
    report(RunStarted(
        model=source.name, method=config.method, output_dir=str(run_dir), total_steps=schedule.total_steps,
        steps_per_epoch=schedule.steps_per_epoch, budget=trainable.rank_state.budget,
        ranks=dict(trainable.rank_state.ranks), update_every=schedule.update_every,
        first_update=schedule.first_update, device=device, start_step=progress.step,
    ))

    pad_id = tokenizer.pad_token_id
    order_of_epoch = functools.lru_cache(maxsize=2)(lambda epoch: epoch_order(len(data.train), config.seed, epoch))
    def log(line: dict, memory: MemoryStats) -> None:
        metrics.write(json.dumps(line) + "\n")
        metrics.flush()
        report(StepLogged(
            step=line["step"], total_steps=schedule.total_steps, epoch=line["step"] / schedule.steps_per_epoch,
            loss=line["loss"], lr=line["lr"], grad_norm=line["grad_norm"], tokens_per_s=line["tokens_per_s"],
            elapsed_s=line["elapsed_s"], memory=memory, adapter_bytes=line["adapter_bytes"],
            rank_total=line["rank_total"], skipped_steps=progress.skipped,
        ))

    reset_peak_memory(device)  # the peak in metrics is the training's, not the loading's
    started = time.perf_counter()
    metrics = open(run_dir / "metrics.jsonl", "a", encoding="utf-8")
    try:
        while progress.step < schedule.total_steps:
            step_start, step_cpu_start = time.perf_counter(), time.process_time()
            rng_before = rng_states(device)  # an OOM checkpoint must resume from before this step
            batches = step_batches(data.train, config, progress.step, order_of_epoch, pad_id)
            lr = lr_at(progress.step, schedule, config.lr)
            phase, out_of_memory = "training step", False
            try:
                loss, grad_norm = _optimizer_step(trainable, batches, lr, config.max_grad_norm, device, autocast,
                                                  progress.step + 1, scaler)
                progress.step += 1
                step = progress.step
                if loss is None:  # not finite: nothing reached the weights, gates or ranks
                    progress.skipped += 1
                    progress.bad_in_a_row += 1
                    if progress.bad_in_a_row >= MAX_BAD_STEPS_IN_A_ROW:
                        raise Diverged(
                            f"loss or gradients were not finite for {progress.bad_in_a_row} steps in a row "
                            f"(step {step}); stopped. Lower --lr (now {config.lr:g}) or check the data; "
                            "the last good checkpoint is kept")
                else:
                    progress.bad_in_a_row = 0
                    if not math.isfinite(grad_norm):  # fp16 overflow: skipped, the scale lowered
                        progress.skipped += 1
                if config.method == "adalora":
                    trainable.rank_state.ranks = trainable.current_ranks()

                realloc_s = None
                if config.method == "l1ra" and schedule.reallocates_at(step):
                    phase = "reallocation"
                    t0 = time.perf_counter()
                    gen = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
                    event = reallocate(trainable.adapters, trainable.rank_state, step,
                                       trainable.optimizer.prune_threshold, trainable.optimizer, gen)
                    realloc_s = time.perf_counter() - t0
                    write_ranks()
                    report(Reallocated(step, event.budget, event.pruned, event.added, event.ranks,
                                       schedule.next_update(step), realloc_s))

                now = time.perf_counter()
                tokens = sum(int(b["attention_mask"].sum()) for b in batches)
                memory = memory_stats(device)
                adapter_bytes = trainable_state_bytes(trainable)
                shown_loss = float("nan") if loss is None else loss
                line = {"step": step, "loss": shown_loss, "lr": lr, "grad_norm": grad_norm,
                        "tokens_per_s": tokens / (now - step_start), "step_s": now - step_start,
                        "step_cpu_s": time.process_time() - step_cpu_start,
                        "mem_bytes": memory.allocated or memory.rss, "adapter_bytes": adapter_bytes,
                        "rank_total": trainable.rank_state.total, "elapsed_s": now - started}
                if realloc_s is not None:
                    line["realloc_s"] = realloc_s
                if memory.peak:
                    line["peak_bytes"] = memory.peak
                is_last = step == schedule.total_steps
                if data.eval and (is_last or (schedule.eval_every and step % schedule.eval_every == 0)):
                    phase = "evaluation"
                    eval_loss = evaluate(model, data.eval, config.batch_size, pad_id, device, autocast)
                    line.update(eval_loss=eval_loss, eval_ppl=math.exp(min(eval_loss, 50)))
                    report(Evaluated(step, eval_loss, line["eval_ppl"]))
                # The metrics line goes first: a run killed after its checkpoint has it.
                if step % config.log_every == 0 or is_last or "eval_loss" in line:
                    log(line, memory)
                stop = should_stop() and not is_last
                # No periodic checkpoint right after a skipped (non-finite) step: the newest
                # checkpoints stay those of good steps.
                periodic = schedule.save_every and step % schedule.save_every == 0 and not progress.bad_in_a_row
                if stop or is_last or periodic:
                    phase = "checkpoint"
                    save()
                if stop:
                    raise Interrupted(step, run_dir)
            except RuntimeError as err:
                if not is_out_of_memory(err):
                    raise
                out_of_memory = True  # handled outside the except: its traceback holds the graph
            if out_of_memory and phase == "evaluation":
                log(line, memory)  # the step itself completed
            if out_of_memory:
                trainable.optimizer.zero_grad(set_to_none=True)
                if device.startswith("cuda"):
                    torch.cuda.empty_cache()
                # A step that failed left the counter where it was (rng_before is then the
                # state to resume from); after a completed step the current state is. A
                # reallocation cut short may have left the adapters half resized: then the
                # previous checkpoint is the one to keep.
                safe_to_save = phase in ("training step", "evaluation")
                if safe_to_save and progress.step > 0 and saved_step != progress.step:
                    save(rng_before if phase == "training step" else None)
                failed_step = progress.step + 1 if phase == "training step" else progress.step
                raise OutOfMemory(failed_step, saved_step, phase)
    finally:
        metrics.close()

    write_ranks()
    adapter_dir = _save_adapter(trainable, run_dir, source, config, tokenizer, all_linear)
    report(RunFinished(progress.step, str(run_dir), str(adapter_dir)))
    return adapter_dir
