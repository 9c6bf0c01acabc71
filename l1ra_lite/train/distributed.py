"""Several processes, one run: the glue for data-parallel training under `torchrun` or
`accelerate launch` (torch.distributed: NCCL on GPUs, gloo on CPUs).

Every process holds a whole copy of the model and its adapters and reads its own share
of every global batch (train.loop.step_batches). After the backward passes the adapter
gradients (and the loss) are summed over the processes in one all-reduce, so every copy
takes the same optimiser step and computes the same reallocation plan; `check_in_step`
verifies that rather than trusting it. Process 0 writes the run folder.

Why not DistributedDataParallel: L1RA physically resizes A, B and c at a reallocation,
which invalidates DDP's gradient buckets (it would have to be rebuilt after every
resize). One coalesced all-reduce of the adapter gradients per optimiser step (tens of
MB) works the same for L1RA, peft LoRA and AdaLoRA; overlapping it with backward would
save little at that size.

Without a launcher (no WORLD_SIZE > 1 in the environment) nothing here starts and every
function is a no-op: a run is exactly the single-process one.
"""

from __future__ import annotations

import os
import re
from contextlib import contextmanager
from datetime import timedelta
from typing import Callable, Iterator, Sequence, TypeVar

import torch
import torch.distributed as dist

from l1ra_lite.errors import UserError

DEFAULT_TIMEOUT_S = 600  # covers a slow model load on one process; a dead peer ends gloo at once
T = TypeVar("T")


class ProcessLost(UserError):
    """Another process of the run died or stopped answering; this one stops too.

    It ends without tearing down its process group: with a peer that hangs (stopped, not
    dead) gloo's teardown at interpreter exit can abort the process (SIGABRT, seen in CI)
    after the message, and NCCL's can wait on the peer. Every checkpoint on disk is
    already a complete file, so nothing is lost by skipping it."""

    end_at_once = True


class OutOfStep(UserError):
    """The processes' adapters or ranks differ: training on would train diverged copies."""


class WriterFailed(Exception):
    """Process 0 failed at something only it does; it reports the error, the others
    stop without repeating it."""


# ------------------------------------------------------------------ who we are


def launched() -> bool:
    """Whether a launcher (torchrun, accelerate launch) started several processes."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_writer() -> bool:
    """Process 0 writes checkpoints, metrics, ranks.json, the adapter and the dashboard."""
    return rank() == 0


def process_device(device: str) -> str:
    """`cuda` means this process's own card (LOCAL_RANK) when several share a machine."""
    if active() and device == "cuda":
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return device


@contextmanager
def processes(timeout_s: float = DEFAULT_TIMEOUT_S) -> Iterator[None]:
    """Join the launcher's process group for the duration (nothing without a launcher).
    `timeout_s` bounds every collective: a process that dies or hangs ends the others."""
    if not launched():
        yield
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        local, cards = int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()
        if local >= cards:
            raise UserError(
                f"process {local} of this machine has no GPU of its own ({cards} visible): "
                f"start at most {cards} processes a machine (--nproc-per-node / --num_processes)"
            )
        torch.cuda.set_device(local)
    try:
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    except (RuntimeError, ValueError) as err:
        raise ProcessLost(f"cannot join the other processes of the run ({_first_line(err)})") from None
    try:
        yield
    except UserError as err:
        # The group stays open (a peer may be gone or waiting on this one): end without
        # the interpreter's teardown, as ProcessLost does.
        err.end_at_once = True
        raise
    # Only after a clean end: with a peer gone, tearing down (NCCL's above all) may wait
    # on it; the process is ending anyway.
    dist.destroy_process_group()


# ------------------------------------------------------------------ collectives


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def _first_line(err: BaseException) -> str:
    """The gist of a backend's message: its first sentence, without the source location
    gloo puts in front ("[.../pair.cc:553] Connection closed by peer ...")."""
    text = (str(err).strip().splitlines() or [type(err).__name__])[0]
    text = re.sub(r"^\[[^\]]*\]\s*", "", text)
    return text.split(". ")[0][:200]


def _collective(call: Callable[..., T], *args, **kwargs) -> T:
    """A torch.distributed call whose failure (a peer gone, the timeout) ends this process
    with one line instead of a traceback from inside the backend."""
    try:
        return call(*args, **kwargs)
    except RuntimeError as err:
        if "out of memory" in str(err):
            raise
        raise ProcessLost(
            f"process {rank()} of {world_size()}: another process of the run stopped or stopped answering "
            f"({_first_line(err)})"
        ) from None


def sum_over_processes(values: Sequence[float]) -> list[float]:
    """Each value summed over the processes (float64: token counts stay exact)."""
    if not active():
        return [float(v) for v in values]
    tensor = torch.tensor([float(v) for v in values], dtype=torch.float64, device=_device())
    _collective(dist.all_reduce, tensor)
    return tensor.tolist()


def any_process(flag: bool) -> bool:
    """True on every process if it is true on any (e.g. a stop signal reached one)."""
    return bool(sum_over_processes([float(flag)])[0]) if active() else flag


def sum_gradients(params: Sequence[torch.Tensor], loss: torch.Tensor) -> torch.Tensor:
    """Sum the gradients of `params` and `loss` over the processes, in one all-reduce.

    Each process weighted its micro-batch losses by their share of the *global* step's
    answer tokens, so the sum is the gradient of the global batch's mean loss: the same
    as one process with the whole batch. Every process then holds identical gradients
    (an all-reduce hands each the same bits) and takes the same optimiser step."""
    if not active():
        return loss
    grads = [p.grad for p in params if p.grad is not None]
    flat = torch.cat([loss.detach().reshape(1).float()] + [g.reshape(-1).float() for g in grads])
    _collective(dist.all_reduce, flat)
    offset = 1
    for grad in grads:
        grad.copy_(flat[offset : offset + grad.numel()].view_as(grad))
        offset += grad.numel()
    return flat[0].to(loss.dtype)


def shard(items: Sequence[T]) -> list[T]:
    """This process's share of `items` (every world_size-th one)."""
    return list(items[rank() :: world_size()])


def gather_states(states: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every process's copy of `states` (e.g. RNG states): process 0's under their own
    names, process k's as `<name>.process<k>`. A collective: all processes call it."""
    if not active():
        return states
    gathered = dict(states)
    for name, tensor in states.items():
        local = tensor.to(_device())
        copies = [torch.empty_like(local) for _ in range(world_size())]
        _collective(dist.all_gather, copies, local)
        gathered.update({f"{name}.process{k}": copies[k].cpu() for k in range(1, world_size())})
    return gathered


def own_state(states: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """This process's copy of a state saved by gather_states (process 0's if there is none
    for it: a run resumed with more processes than wrote the checkpoint)."""
    return states.get(f"{name}.process{rank()}", states[name]) if rank() else states[name]


def from_writer(make: Callable[[], str]) -> str:
    """`make()` on process 0 only; every process gets its text (e.g. the run folder's name,
    which holds the time). If it fails on process 0, that one raises the error and the
    others raise WriterFailed."""
    if not active():
        return make()
    width = 4096
    buffer = torch.zeros(width + 1, dtype=torch.uint8, device=_device())
    failure = None
    if is_writer():
        try:
            data = make().encode()[:width]
            buffer[0] = 1
            buffer[1 : 1 + len(data)] = torch.tensor(list(data), dtype=torch.uint8)
        except BaseException as err:  # noqa: BLE001 - re-raised below, after the others are told
            failure = err
    _collective(dist.broadcast, buffer, src=0)
    if failure is not None:
        raise failure
    if not buffer[0]:
        raise WriterFailed()
    return bytes(buffer[1:].cpu().tolist()).rstrip(b"\0").decode()


def check_in_step(named: Sequence[tuple[str, torch.Tensor]], ranks: Sequence[int], step: int) -> None:
    """Stop if the processes' adapters (the gates with them) or ranks differ.

    With summed gradients every process should hold the same bits; a reallocation plan
    made from different gates would give each copy another layout and the runs would
    silently drift apart. One all-reduce of a small checksum per tensor (the max of
    [x, -x] gives both the max and the min over the processes): equal iff max == min."""
    if not active():
        return
    with torch.no_grad():
        sums = [t.detach().double().sum() for _, t in named]
        squares = [t.detach().double().square().sum() for _, t in named]
        local = torch.stack(sums + squares).to(_device()) if named else torch.zeros(0, device=_device())
    local = torch.cat([local.double(), torch.tensor([float(r) for r in ranks], dtype=torch.float64).to(local.device)])
    both = torch.cat([local, -local])
    _collective(dist.all_reduce, both, op=dist.ReduceOp.MAX)
    highest, lowest = both[: len(local)], -both[len(local) :]
    differ = (highest != lowest).nonzero().flatten().tolist()
    if not differ:
        return
    n = len(named)
    first = differ[0]
    what = f"the ranks ({len([d for d in differ if d >= 2 * n])} modules)" if first >= 2 * n else named[first % n][0]
    raise OutOfStep(
        f"the processes are out of step at step {step}: {what} differs between them; stopped rather "
        "than train diverged copies"
    )
