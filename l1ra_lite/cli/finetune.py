"""`l1ra-lite finetune`: train L1RA (or stock LoRA / AdaLoRA) adapters on a 4-bit base."""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any, Optional

from l1ra_lite.errors import UserError

HELP = "fine-tune a base model with L1RA adapters (defaults: the embedded SmolLM2 and chat corpus)"

# Settings that may change when a run is resumed; all others must match the run's.
# batch_size and grad_accum may trade against each other (same product, same data order)
# so that a run that ran out of memory can continue with smaller micro-batches.
CHANGEABLE_ON_RESUME = (
    "plain",
    "eval_every",
    "save_every",
    "keep_checkpoints",
    "log_every",
    "batch_size",
    "grad_accum",
    "num_proc",
    "data_cache",
    "report_to",
)
# What --overwrite removes; the last three are the trackers' (l1ra_lite.reporting.RUN_FOLDER_ENTRIES).
RUN_ARTEFACTS = (
    "config.json",
    "ranks.json",
    "metrics.jsonl",
    "adapter",
    "latest",
    "gates",
    "tensorboard",
    "wandb",
    "wandb-run.json",
)
DEFAULT_PROCESS_TIMEOUT_S = 600  # l1ra_lite.train.distributed.DEFAULT_TIMEOUT_S, without importing torch for --help


# Long, but flat: one call an option, in the groups --help shows.
def add_arguments(p: argparse.ArgumentParser) -> None:
    from l1ra_lite.config import CHOICES

    # Every option defaults to None so that a recipe's value is kept unless a flag is given.
    # opt() and flag() add to the group opened last; opt() shows FinetuneConfig's default.
    def opt(flag: str, help: str, **kw: Any) -> None:
        group.add_argument(flag, default=None, help=with_default(flag, help), **kw)

    def flag(name: str, help: str) -> None:
        group.add_argument(name, action="store_true", default=None, help=help)

    group = p.add_argument_group("what to train")
    opt(
        "--model",
        "alias (mistral-7b, llama-3.1-8b, qwen2.5-7b, their -instruct variants, smollm2-135m), "
        "hub id or local folder; default: the embedded SmolLM2-135M-Instruct",
    )
    group.add_argument(
        "--data",
        action="append",
        default=None,
        help="a .jsonl/.json/.csv/.parquet file (fields: messages | conversations (ShareGPT) | "
        "instruction/input/output | prompt/completion | text, optional system), a hub dataset id or a "
        "folder laid out like one; several, comma-separated or with repeated --data, are mixed; "
        "default: the embedded chatterbot English corpus",
    )
    opt(
        "--recipe",
        "a recipe TOML file, or the name of one shipped with l1ra-lite (see `l1ra-lite recipes`); flags override it",
    )
    opt("--method", "l1ra, or stock peft lora / adalora at the same total rank", choices=CHOICES["method"])
    opt("--quant", "nf4 (4-bit base) or none (16-bit base)", choices=CHOICES["quant"])
    opt(
        "--dtype",
        "compute dtype: auto (bf16 where the hardware has it natively; else fp16 with "
        "loss scaling on older CUDA cards, fp32 on CPUs), bf16, fp16 or fp32",
        choices=CHOICES["dtype"],
    )
    opt("--target-modules", "comma-separated module names to adapt (default: every linear layer of the decoder blocks)")
    flag("--trust-remote-code", "allow the model's own Python code from the hub (off by default)")

    group = p.add_argument_group("rank and L1RA")
    opt("--budget", "total rank over all adapters, conserved by reallocation (default 8 x adapters)", type=int)
    opt(
        "--ranks-from",
        "start from the ranks a finished run ended with (its folder or ranks.json): e.g. stock LoRA "
        "at the layout L1RA found; the budget is that run's total",
    )
    opt("--alpha", "LoRA alpha; the scale is alpha / mean rank (default: the mean rank, scale 1)", type=float)
    opt("--dropout", "dropout on the adapter input", type=float)
    opt("--l1-lambda", "L1 penalty on the gates: a number, or auto = l1-kappa / (eta-c x steps of the shrink window)")
    opt(
        "--l1-kappa",
        "with --l1-lambda auto: the most the L1 shrink alone takes off a gate over the shrink window",
        type=float,
    )
    opt("--eta-c", "learning rate of the gates, constant", type=float)
    opt(
        "--realloc-rule",
        "which ranks go at a reallocation: paper (gates below eta-c x lambda) or "
        "importance (gate^2 x the running mean of its squared gradient, far below the median)",
        choices=CHOICES["realloc_rule"],
    )
    opt(
        "--shrink-until",
        "share of the run after which the L1 shrink and the reallocations stop and the gates "
        "are folded into B, so that no rank stays throttled (1: the whole run, no fold)",
        type=float,
    )
    flag(
        "--log-gates",
        "write every rank's gate, Adam moments and age at each reallocation into gates/ (for bench/realloc_replay.py)",
    )
    opt(
        "--update-every",
        "reallocate every N optimiser steps, or this fraction of the run when < 1",
        type=float,
    )

    group = p.add_argument_group("data")
    opt("--data-subset", "the subset (configuration) of a hub dataset or dataset folder")
    opt(
        "--data-files",
        "files inside a hub dataset repo or dataset folder to read (a path or glob, e.g. data/train-*.parquet)",
    )
    opt("--data-split", "the split of a hub dataset or dataset folder to train on")
    opt("--eval-data", "held-out rows from this file, folder or hub dataset instead of a share of --data")
    opt("--eval-split", "the split of --eval-data, when it is a hub dataset or folder")
    opt("--seq-len", "truncate examples to this many tokens", type=int)
    flag(
        "--packing",
        "pack examples into full --seq-len sequences; each example attends only to itself "
        "(position ids restart per example)",
    )
    opt("--eval-fraction", "held-out share of the rows for evaluation (without --eval-data)", type=float)
    opt("--eval-max-rows", "cap on held-out rows", type=int)
    flag("--skip-bad-rows", "count and skip malformed rows instead of stopping")
    opt("--chat-template", "a Jinja file, or a template name (chatml, or one the tokenizer carries)")
    flag(
        "--streaming",
        "read the data as training goes (a seeded shuffle buffer) instead of preparing it first; "
        "for datasets too large to download; needs --max-steps",
    )
    opt("--num-proc", "processes that prepare the data (default: the CPU count, at most 8)", type=int)
    opt("--data-cache", "folder of the prepared-data cache (default: $XDG_CACHE_HOME/l1ra-lite/data)")

    group = p.add_argument_group("optimisation (all step counts are optimiser steps)")
    opt("--max-steps", "stop after this many steps (wins over --epochs)", type=int)
    opt("--epochs", "passes over the training data", type=float)
    opt("--batch-size", "examples per micro-batch", type=int)
    opt("--grad-accum", "micro-batches per optimiser step", type=int)
    opt("--lr", "peak learning rate of A and B, cosine decay", type=float)
    opt("--weight-decay", "AdamW weight decay of A and B", type=float)
    opt("--max-grad-norm", "gradient clipping (0 turns it off)", type=float)
    opt("--warmup", "linear warmup: steps, or a fraction of the run when < 1", type=float)
    opt("--seed", "random seed: same seed, same run", type=int)

    group = p.add_argument_group("output")
    opt("--output", "run folder (default runs/<model>-<date-time>)")
    opt(
        "--eval-every",
        "evaluate every N steps, or this fraction of the run when < 1; 0: only at the end",
        type=float,
    )
    opt(
        "--save-every",
        "checkpoint every N steps, or this fraction of the run when < 1; 0: only at the end",
        type=float,
    )
    opt("--keep-checkpoints", "keep the newest N checkpoints", type=int)
    opt("--log-every", "write a metrics line every N steps", type=int)
    flag("--plain", "plain log lines instead of the live dashboard")
    opt(
        "--report-to",
        "also send the training curves to TensorBoard (event files in RUN_DIR/tensorboard), W&B "
        "(offline in RUN_DIR/wandb when the server cannot be reached; WANDB_MODE is respected), or all",
        choices=CHOICES["report_to"],
    )
    group.add_argument("--resume", metavar="RUN_DIR", help="continue that run, in place, from its latest checkpoint")
    group.add_argument("--overwrite", action="store_true", help="start afresh in an existing output folder")

    group = p.add_argument_group("several processes (under torchrun or accelerate launch: one per GPU)")
    group.add_argument(
        "--process-timeout",
        type=float,
        default=DEFAULT_PROCESS_TIMEOUT_S,
        metavar="SECONDS",
        help="how long a process waits for the others at a collective before the run stops "
        f"(default {DEFAULT_PROCESS_TIMEOUT_S})",
    )


def with_default(flag: str, help: str) -> str:
    """`help` with FinetuneConfig's default for the flag's field, so that it cannot drift."""
    import dataclasses

    from l1ra_lite.config import FinetuneConfig

    defaults = {f.name: f.default for f in dataclasses.fields(FinetuneConfig)}
    value = defaults.get(flag.removeprefix("--").replace("-", "_"))
    if value is None or isinstance(value, bool) or value is dataclasses.MISSING:
        return help
    return f"{help} (default {value:g})" if isinstance(value, float) else f"{help} (default {value})"


def overrides_from(args: argparse.Namespace) -> dict[str, Any]:
    from l1ra_lite.config import FIELD_NAMES

    return {k: v for k, v in vars(args).items() if k in FIELD_NAMES and v is not None}


def resumed_config(run_dir: Path, overrides: dict[str, Any], processes: int = 1):
    """The run's saved settings; flags may only change what does not alter the training.
    `processes`: how many processes this resume runs in (the global batch must stay)."""
    import dataclasses

    from l1ra_lite.config import FIELD_NAMES, FinetuneConfig, validate

    try:
        saved = json.loads((run_dir / "config.json").read_text())
        config = FinetuneConfig(**{k: v for k, v in saved.items() if k in FIELD_NAMES})
    except FileNotFoundError:
        raise UserError(f"{run_dir} is not a run folder (no config.json): nothing to resume") from None
    except (OSError, ValueError, TypeError) as err:
        raise UserError(f"cannot read {run_dir / 'config.json'}: {err}") from None
    validate(config)
    # Compare like with like: the flags go through the same normalisation as the saved values.
    asked = dataclasses.replace(config, **overrides)
    validate(asked)
    for key in overrides:
        if key not in CHANGEABLE_ON_RESUME and getattr(asked, key) != getattr(config, key):
            raise UserError(
                f"--{key.replace('_', '-')} differs from the run being resumed "
                f"({getattr(config, key)!r}); a resumed run keeps its settings"
            )
    saved_processes = saved.get("processes", 1)
    global_batch = saved_processes * config.batch_size * config.grad_accum
    if processes * asked.batch_size * asked.grad_accum != global_batch:
        if processes == saved_processes:
            raise UserError(
                f"on resume, --batch-size x --grad-accum must stay "
                f"{config.batch_size * config.grad_accum} (got {asked.batch_size} x {asked.grad_accum})"
            )
        raise UserError(
            f"the run was trained by {saved_processes} process(es) with a global batch of {global_batch} "
            f"examples a step; with {processes} process(es) keep it: processes x --batch-size x --grad-accum "
            f"= {global_batch} (got {processes} x {asked.batch_size} x {asked.grad_accum})"
        )
    return asked


def prepare_output(config, overwrite: bool) -> Path:
    if config.output:
        run_dir = Path(config.output)
    else:
        name = Path((config.model or "smollm2-135m").rstrip("/")).name
        run_dir = Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"output {run_dir} exists and is a file")
    if run_dir.exists() and any(run_dir.iterdir()):
        if not overwrite:
            raise UserError(
                f"output folder {run_dir} already exists; use --resume {run_dir} to continue it, "
                "--overwrite to start afresh, or another --output"
            )
        for entry in run_dir.iterdir():  # remove only what a run writes; leave the user's own files
            if entry.name in RUN_ARTEFACTS or entry.name.startswith("checkpoint-"):
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create output folder {run_dir}: {err.strerror}") from None
    return run_dir


class StopOnSignal:
    """First SIGINT/SIGTERM: finish the step, checkpoint, exit. Second: stop at once
    (checkpoints are written aside and renamed, so the last good one survives)."""

    def __init__(self, announce: bool = True):
        self.signal: Optional[int] = None
        self.announce = announce  # False in processes other than 0: one message is enough

    def __enter__(self):
        self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def handle(self, signum, frame):
        if self.signal is not None:
            raise KeyboardInterrupt
        self.signal = signum
        if not self.announce:
            return
        print(
            "\nl1ra-lite: stopping after this step and writing a checkpoint (press Ctrl-C again to quit at once)",
            file=sys.stderr,
            flush=True,
        )

    def __call__(self) -> bool:
        return self.signal is not None

    @property
    def exit_code(self) -> int:
        return 128 + (self.signal or signal.SIGINT)  # the shell's convention: 130 for SIGINT, 143 for SIGTERM


def run(args: argparse.Namespace) -> int:
    """Train; under torchrun / accelerate launch this runs in every process (see
    l1ra_lite.train.distributed): process 0 writes and reports, the others stay quiet
    except for their own errors."""
    from l1ra_lite.train import distributed

    with distributed.processes(args.process_timeout):
        process, processes = distributed.rank(), distributed.world_size()
        try:
            return run_in_process(args)
        except distributed.WriterFailed:
            return 2  # process 0 failed at something only it does, and said so
        except UserError as err:
            if process:  # the user sees every process's error, and whose it is
                raise type(err)(f"(process {process} of {processes}) {err}") from None
            raise


def run_in_process(args: argparse.Namespace) -> int:
    from l1ra_lite.config import build_config
    from l1ra_lite.reporting import check_installed, fan_out, open_trackers
    from l1ra_lite.train import distributed

    overrides = overrides_from(args)
    processes = distributed.world_size()
    if args.resume:
        if args.overwrite or args.recipe:
            raise UserError("--resume continues a run with its own settings: drop --overwrite / --recipe")
        run_dir = Path(args.resume)
        config = resumed_config(run_dir, overrides, processes)
        check_installed(config.report_to)  # before minutes of loading, not after
    else:
        config = build_config(args.recipe, overrides)
        check_installed(config.report_to)
        # The writer prepares the folder; the others take its name (it holds the time).
        run_dir = Path(distributed.from_writer(lambda: str(prepare_output(config, args.overwrite))))

    from l1ra_lite.train import Interrupted, OutOfMemory, train

    writer = distributed.is_writer()
    if writer:
        print(
            f"l1ra-lite: {'resuming' if args.resume else 'starting'} {config.method} run in {run_dir}",
            file=sys.stderr,
            flush=True,
        )
        announce_embedded_conversion(config.model)
        if processes > 1:
            print(
                f"l1ra-lite: {processes} processes x batch size {config.batch_size} x grad accumulation "
                f"{config.grad_accum} = a global batch of {processes * config.batch_size * config.grad_accum} "
                "examples a step",
                file=sys.stderr,
                flush=True,
            )
    else:
        import transformers

        transformers.utils.logging.disable_progress_bar()  # one loading bar, process 0's
    stop = StopOnSignal(announce=writer)
    try:
        trackers = config.report_to if writer else "none"  # one writer of the curves too
        with stop, open_display(config.plain) if writer else quiet() as show, open_trackers(trackers, run_dir) as track:
            adapter_dir = train(config, run_dir, fan_out(show, track), resume=bool(args.resume), should_stop=stop)
    except Interrupted as err:
        if writer:
            print(
                f"l1ra-lite: stopped at step {err.step}; continue with: l1ra-lite finetune --resume {run_dir}",
                file=sys.stderr,
            )
        return stop.exit_code
    except (distributed.ProcessLost, distributed.OutOfStep) as err:
        raise type(err)(f"{err}; {last_checkpoint_note(run_dir)} (under the same launcher)") from None
    except KeyboardInterrupt:
        if writer:
            print(f"l1ra-lite: interrupted; {last_checkpoint_note(run_dir)}", file=sys.stderr)
        return stop.exit_code
    except OutOfMemory as err:
        raise UserError(out_of_memory_advice(config, err, run_dir)) from None
    except OSError as err:  # disk full, folder not writable: say so, keep the traceback out
        raise UserError(f"cannot write to {run_dir}: {err.strerror or err}") from None
    if writer:
        print(f"l1ra-lite: adapter written to {adapter_dir} (a standard peft LoRA folder)", file=sys.stderr)
    return 0


def open_display(plain: bool):
    from l1ra_lite.ui.dashboard import open_display as display

    return display(plain=plain)


@contextlib.contextmanager
def quiet():
    """The reporter of processes other than 0: they train, process 0 shows it."""
    yield lambda event: None


def last_checkpoint_note(run_dir: Path) -> str:
    from l1ra_lite.checkpoint import list_checkpoints

    if list_checkpoints(run_dir):
        return f"the last complete checkpoint in {run_dir} is intact: l1ra-lite finetune --resume {run_dir}"
    return "there was no checkpoint yet; start again to train"


def announce_embedded_conversion(model: Optional[str]) -> None:
    """The first run on the embedded default converts it (half a minute): say so."""
    from l1ra_lite.aliases import EMBEDDED_ALIASES
    from l1ra_lite.models import EMBEDDED_FOLDER, default_cache_dir

    folder = default_cache_dir() / EMBEDDED_FOLDER
    if (model is None or model in EMBEDDED_ALIASES) and not folder.exists():
        print(
            f"l1ra-lite: preparing the embedded SmolLM2-135M-Instruct in {folder} (once, about a minute)",
            file=sys.stderr,
            flush=True,
        )


def out_of_memory_advice(config, err, run_dir: Path) -> str:
    """One line: what ran out, the estimate for these settings, what to lower, how to resume."""
    from l1ra_lite.models import default_device
    from l1ra_lite.train import free_memory_note

    try:
        from l1ra_lite.estimate import estimate_for_config

        estimated = f"estimated peak {estimate_for_config(config).total_gib:.1f} GiB; "
    except Exception:  # the advice must not fail because the estimate could not be made
        estimated = ""
    free = free_memory_note(default_device())
    lower = (
        "lower --batch-size (raise --grad-accum to keep the effective batch), --seq-len or --budget, "
        "or use a smaller recipe: l1ra-lite recipes"
    )
    if err.saved_step:
        resume = (
            f"checkpoint of step {err.saved_step} kept: continue with l1ra-lite finetune --resume {run_dir} "
            "--batch-size N --grad-accum M (same product; only the batch split and the eval/save/log "
            "intervals can change on resume)"
        )
    else:
        resume = "no checkpoint was due yet: start again with lower settings"
    return (
        f"out of memory in the {err.phase} of step {err.step}{free} with batch size {config.batch_size}, "
        f"seq len {config.seq_len}, budget {config.budget} ({estimated}{lower}); {resume}"
    )
