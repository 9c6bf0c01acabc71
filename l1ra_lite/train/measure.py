"""What a step costs: memory now and at its peak, and the bytes of trainable state."""

from __future__ import annotations

import sys

import torch

from l1ra_lite.events import MemoryStats


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


def free_memory_note(device: str) -> str:
    """ ", 1.2 of 8.0 GiB free" on CUDA (for out-of-memory messages), else ""."""
    if not device.startswith("cuda"):
        return ""
    try:
        free, total = torch.cuda.mem_get_info(torch.device(device).index or 0)
    except RuntimeError:
        return ""
    return f", {free / 2**30:.1f} of {total / 2**30:.1f} GiB free"


def trainable_state_bytes(method) -> int:
    """Adapter parameters + their gradients (held during each step) + optimiser state
    + the method's own state (AdaLoRA's importance scores)."""
    params = [p for p in method.model.parameters() if p.requires_grad]
    state = [v for p in params for v in method.optimizer.state.get(p, {}).values() if torch.is_tensor(v)]
    return (
        2 * sum(p.numel() * p.element_size() for p in params)
        + sum(t.numel() * t.element_size() for t in state)
        + method.extra_state_bytes()
    )
