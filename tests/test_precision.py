"""The compute dtype of a run (--dtype), fp16 loss scaling, host syncs per step, and the
training peak: what a GPU run depends on, checked on the CPU."""

import json

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from l1ra_lite.l1ra import L1RAOptimizer, RankState, inject_adapters
from l1ra_lite.l1ra.method import L1RAMethod
from l1ra_lite.train import memory_stats, optimizer_step, reset_peak_memory, run_dtype
from tests.test_finetune import adapter_tensors, run, run_with_a_stop, tiny_config
from tests.tiny import tiny_llama


@pytest.mark.parametrize("choice, dtype", [("fp32", "float32"), ("bf16", "bfloat16"), ("fp16", "float16")])
def test_the_dtype_asked_for_is_trained_in_and_recorded(workdir, choice, dtype):
    run_dir, adapter = run(workdir, f"dtype-{choice}", dtype=choice, max_steps=4, eval_every=0, save_every=0)
    config = json.loads((run_dir / "config.json").read_text())
    assert (config["dtype"], config["compute_dtype"]) == (choice, dtype)
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in metrics)
    assert any(t.abs().sum() > 0 for t in adapter_tensors(run_dir).values())


def test_auto_is_fp32_for_a_16_bit_base_on_the_cpu_and_follows_the_hardware_for_nf4(workdir):
    from l1ra_lite.models import compute_dtype

    assert run_dtype(tiny_config(workdir, quant="none"), "cpu") == torch.float32
    assert run_dtype(tiny_config(workdir, quant="nf4"), "cpu") == compute_dtype("cpu")
    assert run_dtype(tiny_config(workdir, quant="none", dtype="bf16"), "cpu") == torch.bfloat16


def test_fp16_runs_resume_exactly_with_their_loss_scale(workdir):
    """The loss scale is training state: a resumed fp16 run continues with the scale the
    interrupted one had, and ends where the uninterrupted run ends."""
    straight, _ = run(workdir, "fp16-straight", dtype="fp16", eval_every=0)
    resumed = run_with_a_stop(workdir, "fp16-resumed", 4, dtype="fp16", eval_every=0)
    from l1ra_lite import checkpoint as ckpt

    state = ckpt.load_checkpoint(resumed / "checkpoint-5").state
    assert state["grad_scaler"]["scale"] > 1
    a, b = adapter_tensors(straight), adapter_tensors(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_an_fp16_overflow_skips_the_step_and_lowers_the_scale_without_counting_as_a_fault():
    model = tiny_llama(0)
    adapters = inject_adapters(model, budget=14)
    trainable = L1RAMethod(model, adapters, L1RAOptimizer(adapters.values(), lr=1e-2), RankState(14, {}), 1.0, 0)
    x = torch.randint(0, 100, (2, 8))
    batch = {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x}
    autocast = {"device_type": "cpu", "dtype": torch.float16, "enabled": True}
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**60)  # overflows fp16 gradients
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    loss, grad_norm = optimizer_step(trainable, [batch], 1e-2, 1.0, "cpu", autocast, 1, scaler)
    assert loss is not None and grad_norm == float("inf")
    assert scaler.get_scale() < 2.0**60
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if p.requires_grad)


class HostReads(TorchDispatchMode):
    """Ops that, on a GPU, make the host wait for the device: reading a floating-point
    value, or gathering floats with a boolean mask (its size is data-dependent)."""

    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default and args[0].is_floating_point():
            self.reads.append(str(func))
        if (
            func is torch.ops.aten.index.Tensor
            and args[0].is_floating_point()
            and any(i is not None and i.dtype == torch.bool for i in args[1])
        ):
            self.reads.append(str(func))
        return func(*args, **(kwargs or {}))


def test_an_optimizer_step_reads_from_the_device_once_whatever_the_accumulation():
    model = tiny_llama(0)
    adapters = inject_adapters(model, budget=14)
    trainable = L1RAMethod(model, adapters, L1RAOptimizer(adapters.values(), lr=1e-2), RankState(14, {}), 1.0, 0)
    x = torch.randint(0, 100, (2, 8))
    labels = x.clone()
    labels[:, :3] = -100  # answer-only labels: the loss gathers the labelled positions
    batch = {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": labels}
    autocast = {"device_type": "cpu", "dtype": torch.bfloat16, "enabled": False}
    with HostReads() as counter:
        loss, grad_norm = optimizer_step(trainable, [batch] * 3, 1e-2, 1.0, "cpu", autocast, 1)
    # The loss and grad norm come back in one .tolist() (not dispatched as a scalar read).
    assert counter.reads == [] and loss > 0 and grad_norm > 0


def test_the_peak_in_metrics_starts_after_loading():
    """reset_peak_memory forgets the high-water mark of what came before (here a 400 MiB
    buffer standing in for loading), so the logged peak is the training's."""
    buffer = torch.ones(100 * 2**20)  # 400 MiB, touched
    held = memory_stats("cpu").peak
    del buffer
    reset_peak_memory("cpu")
    assert memory_stats("cpu").peak < held - 300 * 2**20
