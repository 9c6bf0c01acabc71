"""The GPU check: everything the CPU machines cannot measure, in one run, figures to one
JSON file. Run it through bench/gpu.sh (which brings bitsandbytes from .whl/ and bounds
the whole run to 5 minutes).

Parts, in the order they run; each in its own process (peak memory is a high-water
mark), the JSON rewritten after each, a part that fails or runs out of time recorded
as such while the rest go on:

  pytest_cuda    the suite's tests marked `cuda`                                 (CUDA only)
  layer          one Mistral-7B-shaped NF4 layer, L1RA vs peft LoRA: time, memory, dtype casts
  l1ra           L1RA on a model of the Mistral-7B shape (random weights, NF4), seq 2048,
                 budget 512, one reallocation; then realloc_memory: allocated bytes after
                 reallocations that shrink the adapters (its figures need CUDA)
  lora           stock peft QLoRA, same model, ranks, data
  train_resume   the product's loader and train() on a small saved Llama folder: evaluation,
                 checkpoints, a resumed run equal to an uninterrupted one
  oom_step       `python -m l1ra_lite finetune` out of memory in a training step  (CUDA only)
  oom_eval       ... and in an evaluation                                         (CUDA only)
  sync           host syncs per optimiser step of train()                         (CUDA only)
  estimate-*     L1RA at two recipe settings, peak next to l1ra_lite.estimate     (CUDA only)

The model of the l1ra / lora / estimate runs has Mistral-7B's shape and random weights
(memory and speed do not depend on their values). It is built without ever holding the
whole 16-bit model: parameters start on the meta device, each decoder linear layer is
drawn in 16-bit on the GPU and quantised to NF4 at once (bitsandbytes Linear4bit, double
quantisation, as the product's loader does), and only embeddings, norms and the head are
materialised in 16-bit. The training step is the product's: gradient checkpointing, bf16
autocast, gradient clipping, then the optimiser. bench/gpu_checks.py holds the other parts.

    bench/gpu.sh                             # the real shapes on CUDA
    bench/gpu.sh --tiny --device cpu         # tiny shapes on the CPU: checks the code path
    bench/gpu.sh --parts layer,oom_step      # only these parts
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from bench import gpu_checks  # noqa: E402

GIB = 1 << 30

# Mistral-7B-v0.3's shape (the config bundled as l1ra_lite/model_configs/mistral-7b.json).
MISTRAL_7B = dict(
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    vocab_size=32768,
    max_position_embeddings=32768,
    rope_theta=1e6,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)
TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    vocab_size=256,
    max_position_embeddings=512,
    tie_word_embeddings=False,
)

# The setting for the side-by-side, and the fallback estimator settings when no
# mistral-7b recipe is found: (name, seq_len, batch_size, budget).
MAIN = {"real": (2048, 1, 512), "tiny": (64, 1, 28)}
FALLBACK_SETTINGS = {
    "real": [("fallback-seq1024-b1", 1024, 1, 448), ("fallback-seq2048-b2", 2048, 2, 896)],
    "tiny": [("tiny-a", 32, 1, 14), ("tiny-b", 64, 2, 28)],
}
ESTIMATE_TOLERANCE = 0.15  # the recipes issue's target: measured within 15% of the estimate
DEFAULT_DEADLINE = {"real": 280.0, "tiny": 1200.0}  # seconds for the whole Python side
NO_CUDA = "needs CUDA ({what}); this run is on {device}"


@dataclass
class Job:
    """One measurement, run in its own process."""

    name: str
    method: str  # "l1ra" | "lora"
    seq_len: int
    batch_size: int
    budget: int
    steps: int
    realloc_at: int  # L1RA: reallocate after this optimiser step (0: never)
    seed: int = 0
    lr: float = 2e-4
    shrink_check: bool = False  # L1RA: after the steps, the realloc_memory check


# ---------------------------------------------------------------- the model


def model_config(shape: dict[str, Any]):
    from transformers import MistralConfig

    return MistralConfig(**shape)


def build_quantised_model(config, device: str, dtype, seed: int = 0):
    """A causal LM of `config`'s shape, random weights, decoder linears in NF4, frozen,
    set up for training as l1ra_lite.models.load_model does (no KV cache, non-reentrant
    gradient checkpointing, input gradients)."""
    import torch
    from accelerate import init_empty_weights
    from torch import nn
    from transformers import AutoModelForCausalLM

    # Parameters on meta (no memory); buffers such as the rotary frequencies are
    # computed for real, on the device.
    with torch.device(device), init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    std = getattr(config, "initializer_range", 0.02)
    generator = torch.Generator(device).manual_seed(seed)
    head = model.get_output_embeddings()
    for path, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and module is not head:
            replace_submodule(
                model,
                path,
                nf4_linear(
                    module.in_features, module.out_features, device, dtype, std, generator, bias=module.bias is not None
                ),
            )
            continue
        for name, param in list(module.named_parameters(recurse=False)):
            if param.device.type != "meta":
                continue
            if param.dim() == 1:  # norms' weights (and any bias): ones / zeros
                value = (
                    torch.ones(param.shape, device=device, dtype=dtype)
                    if "weight" in name
                    else torch.zeros(param.shape, device=device, dtype=dtype)
                )
            else:  # embeddings, head
                value = torch.randn(param.shape, device=device, dtype=dtype, generator=generator) * std
            setattr(module, name, nn.Parameter(value, requires_grad=False))
    model.is_loaded_in_4bit = True  # what transformers' bnb quantiser sets; peft reads it
    model.config.use_cache = False
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    return model


def nf4_linear(in_features: int, out_features: int, device: str, dtype, std: float, generator, bias: bool = False):
    """A bitsandbytes NF4 Linear4bit (double quantisation, `dtype` compute) with random
    weights, quantised on `device` as the product's loader quantises."""
    import bitsandbytes as bnb
    import torch

    weight = torch.randn(out_features, in_features, device=device, dtype=dtype, generator=generator) * std
    layer = bnb.nn.Linear4bit(
        in_features,
        out_features,
        bias=bias,
        compute_dtype=dtype,
        compress_statistics=True,
        quant_type="nf4",
        device="meta",
    )
    # .to(device) on an unquantised Params4bit quantises it (and frees the 16-bit copy).
    layer.weight = bnb.nn.Params4bit(
        weight, requires_grad=False, compress_statistics=True, quant_type="nf4", module=layer
    ).to(device)
    if bias:
        layer.bias = torch.nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype), requires_grad=False)
    return layer


def replace_submodule(model, path: str, new) -> None:
    parent_path, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent_path) if parent_path else model, name, new)


# ---------------------------------------------------------------- adapters


@dataclass
class Attached:
    model: Any
    optimizer: Any
    params: list
    adapters: Optional[dict]  # L1RA: path -> L1RALinear
    rank_state: Any  # L1RA: RankState
    layer_type: str  # class of an adapted layer (checks that peft used its bnb 4-bit layer)
    method: Any = None  # the product's method object (l1ra_lite.methods), which the loop's step drives


def attach(method: str, model, budget: int, lr: float, seed: int) -> Attached:
    """The product's L1RA method (adapters + L1RAOptimizer), or its stock peft LoRA with the
    same ranks + torch AdamW, as l1ra_lite.methods.attach_method builds them."""
    import torch

    from l1ra_lite.baselines import PeftLoRA
    from l1ra_lite.l1ra.inject import find_targets, initial_ranks
    from l1ra_lite.l1ra.method import L1RAMethod

    paths = find_targets(model)
    alpha = budget / len(paths)
    if method == "l1ra":
        built = L1RAMethod.attach(model, paths, budget, alpha, 0.0, seed, lr, 0.0, eta_c=2e-2, l1_lambda=5e-3)
        params = [p for a in built.adapters.values() for p in (a.lora_A, a.lora_B, a.gate)]
        first = next(iter(built.adapters.values()))
        return Attached(
            built.model, built.optimizer, params, built.adapters, built.rank_state, type(first).__name__, built
        )
    torch.manual_seed(seed)
    built = PeftLoRA.attach(model, paths, initial_ranks(budget, len(paths)), alpha, 0.0, lr, 0.0)
    params = [p for p in built.model.parameters() if p.requires_grad]
    layer = built.model.get_submodule("base_model.model." + paths[0])
    return Attached(
        built.model, built.optimizer, params, None, None, f"{type(layer).__module__}.{type(layer).__name__}", built
    )


def state_tensors(attached: Attached) -> list:
    """Adapter parameters, their gradients and their optimiser state."""
    import torch

    out = []
    for p in attached.params:
        out.append(p.data)
        if p.grad is not None:
            out.append(p.grad)
        out += [v for v in attached.optimizer.state.get(p, {}).values() if torch.is_tensor(v)]
    return out


def trainable_state_bytes(attached: Attached) -> int:
    """Adapter parameters + gradients + optimiser state (as the training loop counts it)."""
    import torch

    params = attached.params
    state = [v for p in params for v in attached.optimizer.state.get(p, {}).values() if torch.is_tensor(v)]
    return 2 * sum(p.numel() * p.element_size() for p in params) + sum(t.numel() * t.element_size() for t in state)


def block_bytes(tensor) -> int:
    """What torch.cuda.memory_allocated counts for a tensor: its storage, rounded up to the
    caching allocator's 512-byte granule."""
    return -(-tensor.untyped_storage().nbytes() // 512) * 512


def steer_and_reallocate(attached: Attached, step: int, generator) -> dict[str, Any]:
    """One reallocation that moves rank the way the paper saw it flow: the last rank of
    every k_proj and v_proj is pruned (gate 0) and, with the other attention gates
    halved, the freed ranks go to the MLP projections. A few steps of random data do
    not prune by themselves; this exercises the real resize at a realistic size."""
    import torch

    from l1ra_lite.l1ra import reallocate

    with torch.no_grad():
        for path, adapter in attached.adapters.items():
            kind = path.rsplit(".", 1)[-1]
            if kind in ("q_proj", "k_proj", "v_proj", "o_proj"):
                adapter.gate.mul_(0.5)
            if kind in ("k_proj", "v_proj") and adapter.rank > 1:
                adapter.gate[-1] = 0.0
    _sync()
    start = time.perf_counter()
    record = reallocate(
        attached.adapters, attached.rank_state, step, attached.optimizer.prune_threshold, attached.optimizer, generator
    )
    _sync()
    return {
        "realloc_s": time.perf_counter() - start,
        "moved": sum(record.pruned.values()),
        "rank_total": sum(record.ranks.values()),
    }


def shrink_memory(attached: Attached, step: int, cuda: bool, generator) -> dict[str, Any]:
    """Allocated memory after the adapters shrink (DESIGN: physical resize, not masking):
      move   a reallocation (budget conserved) that takes the last rank of every up_proj
             and down_proj (4096 + 14336 numbers a rank) to k_proj and v_proj (4096 + 1024)
      halve  every adapter cut to half its ranks (what pruning half the gates would do)
    Each: adapter state bytes before and after (parameters, gradients, optimiser state,
    rounded as the allocator rounds), and on CUDA memory_allocated / memory_reserved."""
    import torch

    from l1ra_lite.l1ra import reallocate
    from l1ra_lite.l1ra.realloc import resize_adapter

    adapters = attached.adapters

    def snapshot() -> dict[str, int]:
        snap = {
            "state_bytes": sum(block_bytes(t) for t in state_tensors(attached)),
            "rank_total": sum(a.rank for a in adapters.values()),
        }
        if cuda:
            torch.cuda.synchronize()
            snap.update(allocated_bytes=torch.cuda.memory_allocated(), reserved_bytes=torch.cuda.memory_reserved())
        return snap

    def phase(before: dict, after: dict, **extra) -> dict[str, Any]:
        row = {
            "before": before,
            "after": after,
            "expected_drop_bytes": before["state_bytes"] - after["state_bytes"],
            **extra,
        }
        if cuda:
            row["allocated_drop_bytes"] = before["allocated_bytes"] - after["allocated_bytes"]
            row["reserved_drop_bytes"] = before["reserved_bytes"] - after["reserved_bytes"]
            expected = row["expected_drop_bytes"]
            row["drop_over_expected"] = row["allocated_drop_bytes"] / expected if expected else None
        return row

    def by_type(counts: dict[str, int]) -> dict[str, int]:
        total: Counter = Counter()
        for path, n in counts.items():
            total[path.rsplit(".", 1)[-1]] += n
        return dict(total)

    with torch.no_grad():  # k/v first among the candidates; up/down each free their last rank
        for path, adapter in adapters.items():
            kind = path.rsplit(".", 1)[-1]
            if kind in ("k_proj", "v_proj"):
                adapter.gate.fill_(1.0)
            elif kind in ("up_proj", "down_proj"):
                if adapter.rank > 1:
                    adapter.gate[-1] = 0.0
            else:
                adapter.gate.mul_(0.25)
    before = snapshot()
    start = time.perf_counter()
    record = reallocate(
        adapters, attached.rank_state, step, attached.optimizer.prune_threshold, attached.optimizer, generator
    )
    realloc_s = time.perf_counter() - start
    move = phase(
        before,
        snapshot(),
        realloc_s=realloc_s,
        moved=sum(record.pruned.values()),
        pruned_by_type=by_type(record.pruned),
        added_by_type=by_type(record.added),
    )
    before = snapshot()
    for adapter in adapters.values():
        resize_adapter(adapter, list(range((adapter.rank + 1) // 2)), 0, attached.optimizer)
    halve = phase(before, snapshot())
    result: dict[str, Any] = {"move": move, "halve": halve}
    if cuda:
        checks = [
            r["expected_drop_bytes"] > 0 and r["allocated_drop_bytes"] >= 0.9 * r["expected_drop_bytes"]
            for r in (move, halve)
        ]
        result["status"] = "ok" if all(checks) else "failed"
        result["expectation"] = "allocated bytes drop by at least 90% of the adapter state's drop"
    else:
        result["status"] = "skipped"
        result["reason"] = (
            "allocated bytes are a CUDA figure (torch.cuda.memory_allocated); on the CPU the "
            "resizes ran and only the adapter state's own bytes are reported"
        )
    return result


# ---------------------------------------------------------------- one model run


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def measure(job: Job, shape: dict[str, Any], device: str) -> dict[str, Any]:
    """Build, attach, train `job.steps` steps on random tokens; return the figures."""
    import torch

    from l1ra_lite.train import optimizer_step

    cuda = device.startswith("cuda")
    dtype = torch.bfloat16 if cuda else torch.float32
    autocast = {"device_type": device.split(":")[0], "dtype": torch.bfloat16, "enabled": cuda}
    t0 = time.perf_counter()
    model = build_quantised_model(model_config(shape), device, dtype, job.seed)
    if cuda:
        torch.cuda.empty_cache()  # drop the blocks of the transient 16-bit weights
    weights_bytes = torch.cuda.memory_allocated() if cuda else None
    build_s = time.perf_counter() - t0
    attached = attach(job.method, model, job.budget, job.lr, job.seed)
    model = attached.model
    model.train()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    ids_gen = torch.Generator().manual_seed(job.seed)
    realloc_gen = torch.Generator().manual_seed(job.seed + 1)
    steps, realloc, peak_after_first = [], None, None
    for step in range(1, job.steps + 1):
        ids = torch.randint(0, shape["vocab_size"], (job.batch_size, job.seq_len), generator=ids_gen).to(device)
        _sync()
        start = time.perf_counter()
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.cpu()}
        loss_value, _ = optimizer_step(attached.method, [batch], job.lr, 1.0, device, autocast, step)  # the loop's step
        _sync()
        steps.append(time.perf_counter() - start)
        if step == 1 and cuda:
            peak_after_first = torch.cuda.max_memory_allocated()
        if job.method == "l1ra" and step == job.realloc_at:
            realloc = steer_and_reallocate(attached, step, realloc_gen)
    timed = steps[1:] or steps  # the first step carries one-off costs (kernels, allocator)
    median = statistics.median(timed)
    result = {
        "job": asdict(job),
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "layer_type": attached.layer_type,
        "build_s": build_s,
        "step_s": steps,
        "median_step_s": median,
        "tokens_per_s": job.batch_size * job.seq_len / median,
        "last_loss": loss_value,
        "trainable_state_bytes": trainable_state_bytes(attached),
        "rank_total": sum(attached.rank_state.ranks.values()) if attached.rank_state else job.budget,
        "realloc": realloc,
    }
    if realloc:
        result["realloc_over_step"] = realloc["realloc_s"] / median
    if cuda:
        free, total = torch.cuda.mem_get_info()
        result.update(
            weights_bytes=weights_bytes,
            peak_allocated_bytes=torch.cuda.max_memory_allocated(),
            peak_reserved_bytes=torch.cuda.max_memory_reserved(),
            peak_allocated_after_first_step=peak_after_first,
            # Device memory in use now, beyond torch's reserve: the CUDA context and libraries.
            context_bytes=(total - free) - torch.cuda.memory_reserved(),
        )
    else:
        scale = 1 if sys.platform == "darwin" else 1024
        result["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
    if job.shrink_check:  # after the figures above: it must not move the peaks
        try:
            result["realloc_memory"] = shrink_memory(attached, job.steps, cuda, realloc_gen)
        except Exception as err:  # the run's own figures stand without it
            result["realloc_memory"] = {
                "status": "error",
                "error": f"{type(err).__name__}: {err}",
                "traceback": traceback.format_exc().splitlines()[-8:],
            }
    return result


# ---------------------------------------------------------------- estimator settings


def recipe_settings(
    recipes_dirs: list[Path], wanted: Optional[list[str]] = None
) -> list[tuple[str, int, int, Optional[int]]]:
    """(name, seq_len, batch_size, budget) of two mistral-7b recipes: the ones named in
    `wanted`, else those for 12 GB and 24 GB cards, else the smallest and largest."""
    from l1ra_lite.config import read_recipe
    from l1ra_lite.errors import UserError

    found = {}
    for folder in recipes_dirs:
        for path in sorted(Path(folder).glob("*.toml")):
            try:
                keys, _ = read_recipe(str(path))
            except UserError as err:  # one broken recipe must not cost the whole GPU run
                print(f"gpu bench: skipping {path}: {err}", file=sys.stderr)
                continue
            if str(keys.get("model", "")).startswith("mistral-7b") and path.stem not in found:
                found[path.stem] = (
                    path.stem,
                    int(keys.get("seq_len", 512)),
                    int(keys.get("batch_size", 4)),
                    keys.get("budget"),
                )
    if wanted:
        missing = [w for w in wanted if w not in found]
        if missing:
            raise SystemExit(
                f"gpu bench: recipe(s) not found: {', '.join(missing)} (have: {', '.join(found) or 'none'})"
            )
        return [found[w] for w in wanted]
    by_card = [next((v for k, v in found.items() if card in k), None) for card in ("12gb", "24gb")]
    if all(by_card):
        return by_card
    ordered = sorted(found.values(), key=lambda s: (s[1] * s[2], s[0]))
    return [ordered[0], ordered[-1]] if len(ordered) >= 2 else ordered


def estimate_row(
    name: str,
    shape: dict[str, Any],
    seq_len: int,
    batch_size: int,
    budget: Optional[int],
    measured: Optional[dict[str, Any]],
) -> dict[str, Any]:
    """The estimator's figures next to the measured ones, for one setting."""
    from l1ra_lite.estimate import estimate

    est = estimate(model_config(shape), budget=budget, seq_len=seq_len, batch_size=batch_size)
    row = {
        "name": name,
        "seq_len": seq_len,
        "batch_size": batch_size,
        "budget": est.budget,
        "estimate_allocated_bytes": est.allocated_bytes,
        "estimate_total_bytes": est.total_bytes,
        "estimate_total_gib": round(est.total_gib, 3),
        "estimate_parts": dict(est.parts),
    }
    if measured and "peak_allocated_bytes" in measured:
        peak = measured["peak_allocated_bytes"]
        device_peak = measured["peak_reserved_bytes"] + measured["context_bytes"]
        row.update(
            measured_peak_allocated_bytes=peak,
            measured_peak_reserved_bytes=measured["peak_reserved_bytes"],
            measured_device_peak_bytes=device_peak,
            allocated_over_estimate=peak / est.allocated_bytes,
            device_over_estimate_total=device_peak / est.total_bytes,
        )
        row["within_tolerance"] = abs(row["allocated_over_estimate"] - 1) <= ESTIMATE_TOLERANCE
    return row


# ---------------------------------------------------------------- side by side


def compare(l1ra: Optional[dict[str, Any]], lora: Optional[dict[str, Any]]) -> dict[str, Any]:
    """The issue's GPU targets: L1RA tokens/s >= peft QLoRA, peak VRAM <= peft QLoRA."""
    if not (l1ra and lora and "tokens_per_s" in l1ra and "tokens_per_s" in lora):
        return {}
    out = {
        "tokens_per_s_l1ra_over_lora": l1ra["tokens_per_s"] / lora["tokens_per_s"],
        "trainable_state_l1ra_over_lora": l1ra["trainable_state_bytes"] / lora["trainable_state_bytes"],
    }
    peak_key = "peak_allocated_bytes" if "peak_allocated_bytes" in l1ra else "peak_rss_bytes"
    out["peak_l1ra_over_lora"] = l1ra[peak_key] / lora[peak_key]
    if "peak_reserved_bytes" in l1ra:
        out["peak_reserved_l1ra_over_lora"] = l1ra["peak_reserved_bytes"] / lora["peak_reserved_bytes"]
    out["targets"] = {
        "tokens_per_s_l1ra_over_lora >= 1": out["tokens_per_s_l1ra_over_lora"] >= 1.0,
        "peak_l1ra_over_lora <= 1": out["peak_l1ra_over_lora"] <= 1.0,
    }
    return out


def plan_jobs(tiny: bool, settings: list[tuple[str, int, int, Optional[int]]], steps: int) -> list[Job]:
    seq, batch, budget = MAIN["tiny" if tiny else "real"]
    jobs = [
        Job("l1ra", "l1ra", seq, batch, budget, steps, realloc_at=steps // 2, shrink_check=True),
        Job("lora", "lora", seq, batch, budget, steps, realloc_at=0),
    ]
    for name, s, b, bud in settings:
        n_adapters = 7 * (TINY if tiny else MISTRAL_7B)["num_hidden_layers"]
        jobs.append(Job(f"estimate-{name}", "l1ra", s, b, bud or 8 * n_adapters, 4, realloc_at=2))
    return jobs


def summarise(
    results: dict[str, dict[str, Any]], shape: dict[str, Any], settings: list[tuple[str, int, int, Optional[int]]]
) -> dict[str, Any]:
    rows = []
    main = results.get("l1ra")
    if main and "tokens_per_s" in main:
        j = main["job"]
        rows.append(estimate_row("main", shape, j["seq_len"], j["batch_size"], j["budget"], main))
    for name, s, b, bud in settings:
        measured = results.get(f"estimate-{name}")
        rows.append(estimate_row(name, shape, s, b, bud, measured if measured and "tokens_per_s" in measured else None))
    return {"side_by_side": compare(results.get("l1ra"), results.get("lora")), "estimator": rows}


# ---------------------------------------------------------------- running the parts


@dataclass
class Context:
    """What the parts share: where, how, and the small model folder (built on first use)."""

    tiny: bool
    device: str
    workdir: Path
    simulate_oom: bool = False
    _fixture: Optional[dict] = None
    _fixture_error: Optional[str] = None
    _lock: Any = field(default_factory=threading.Lock)

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")

    def fixture(self) -> dict[str, Any]:
        """The small saved Llama folder and data of train_resume / sync / oom_*."""
        with self._lock:
            if self._fixture is None and self._fixture_error is None:
                try:
                    self._fixture = gpu_checks.build_small_llama(self.workdir / "fixture", self.tiny)
                except Exception as err:
                    self._fixture_error = f"{type(err).__name__}: {err}"
        if self._fixture_error:
            raise RuntimeError(f"the small model folder could not be built: {self._fixture_error}")
        return self._fixture

    def fixture_info(self) -> Optional[dict[str, Any]]:
        return self._fixture or ({"error": self._fixture_error} if self._fixture_error else None)

    def child_env(self, **extra: str) -> dict[str, str]:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **extra}
        if not self.cuda:  # a shared CPU machine: one thread a process (no spin-waiting on busy cores)
            env.setdefault("OMP_NUM_THREADS", "1")
        return env


@dataclass
class Part:
    name: str
    section: str  # "runs" (model runs, the format of before) | "checks"
    run: Callable[[Context, float], dict]  # (context, seconds it may take) -> its entry
    cuda_only: Optional[str] = None  # what needs CUDA, when the part does
    min_s: float = 10.0  # not started with less time than this left
    max_s: float = 150.0  # its own time limit
    job: Optional[Job] = None  # model runs: what they measure


def run_child(
    ctx: Context, kind: str, payload: Any, label: str, timeout: float, env: Optional[dict[str, str]] = None
) -> dict[str, Any]:
    """`kind` measured in a child process; its figures, or its error and last output lines."""
    out = ctx.workdir / f"{label}.json"
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        kind,
        "--payload",
        json.dumps(payload),
        "--child-out",
        str(out),
        "--device",
        ctx.device,
    ] + (["--tiny"] if ctx.tiny else [])
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env or ctx.child_env())
    except subprocess.TimeoutExpired as err:  # its output so far comes as bytes, whatever text= says
        tail = "".join(
            x.decode(errors="replace") if isinstance(x, bytes) else (x or "") for x in (err.stdout, err.stderr)
        )
        return {
            "status": "error",
            "error": f"timed out after {timeout:.0f} s",
            "output_tail": tail.strip().splitlines()[-15:],
        }
    wall = time.perf_counter() - start
    if proc.returncode != 0 or not out.is_file():
        lines = (proc.stdout + proc.stderr).strip().splitlines()[-15:]
        return {"status": "error", "error": f"exit {proc.returncode}", "output_tail": lines, "wall_s": wall}
    result = json.loads(out.read_text())
    result["wall_s"] = wall
    return result


def model_run_part(job: Job, shape: dict[str, Any]) -> Callable[[Context, float], dict]:
    def run(ctx: Context, timeout: float) -> dict[str, Any]:
        print(
            f"gpu bench: {job.name} ({job.method}, seq {job.seq_len} x batch {job.batch_size}, budget {job.budget})",
            file=sys.stderr,
            flush=True,
        )
        return run_child(ctx, "model", asdict(job), job.name, timeout)

    return run


def child_part(kind: str, payload: Callable[[Context], Any], env: Callable[[Context], dict] = lambda ctx: {}):
    def run(ctx: Context, timeout: float) -> dict[str, Any]:
        print(f"gpu bench: {kind}", file=sys.stderr, flush=True)
        return run_child(ctx, kind, payload(ctx), kind, timeout, ctx.child_env(**env(ctx)))

    return run


def oom_part(name: str):
    def run(ctx: Context, timeout: float) -> dict[str, Any]:
        print(f"gpu bench: {name} (python -m l1ra_lite finetune, memory squeezed)", file=sys.stderr, flush=True)
        return gpu_checks.oom_check(
            name, ctx.fixture(), ctx.workdir, timeout, ctx.child_env(), ctx.tiny, simulate=ctx.simulate_oom
        )

    return run


def pytest_part(ctx: Context, timeout: float) -> dict[str, Any]:
    print("gpu bench: pytest -m cuda", file=sys.stderr, flush=True)
    return gpu_checks.pytest_cuda_check(ctx.workdir, timeout, ctx.child_env())


def plan_parts(
    tiny: bool, settings: list[tuple[str, int, int, Optional[int]]], steps: int, simulate_oom: bool = False
) -> list[Part]:
    """Every part, in the order they run: cheap and most wanted first, so that a run that
    meets its deadline loses the least."""
    mode = "tiny" if tiny else "real"
    shape = TINY if tiny else MISTRAL_7B
    jobs = {job.name: job for job in plan_jobs(tiny, settings, steps)}

    def with_fixture(settings_key: Optional[str] = None):
        def payload(ctx: Context) -> dict[str, Any]:
            p = {"fixture": ctx.fixture(), "workdir": str(ctx.workdir / "runs")}
            if settings_key:
                p["settings"] = gpu_checks.TRAIN[mode]
            return p

        return payload

    oom_cuda = None if simulate_oom else "torch.cuda.set_per_process_memory_fraction"
    parts = [
        Part("pytest_cuda", "checks", pytest_part, cuda_only="the tests marked cuda", min_s=15, max_s=120),
        Part("layer", "checks", child_part("layer", lambda ctx: gpu_checks.LAYER[mode]), min_s=15, max_s=120),
        Part("l1ra", "runs", model_run_part(jobs["l1ra"], shape), min_s=30, max_s=150, job=jobs.pop("l1ra")),
        Part("lora", "runs", model_run_part(jobs["lora"], shape), min_s=30, max_s=150, job=jobs.pop("lora")),
        Part(
            "train_resume",
            "checks",
            child_part(
                "train_resume",
                with_fixture("train"),
                # cuBLAS repeats a result bit for bit only with a fixed workspace
                env=lambda ctx: {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"} if ctx.cuda else {},
            ),
            min_s=30,
            max_s=180,
        ),
        Part("oom_step", "checks", oom_part("oom_step"), cuda_only=oom_cuda, min_s=20, max_s=120),
        Part("oom_eval", "checks", oom_part("oom_eval"), cuda_only=oom_cuda, min_s=20, max_s=120),
        Part(
            "sync",
            "checks",
            child_part("sync", with_fixture()),
            cuda_only="torch.cuda.set_sync_debug_mode",
            min_s=20,
            max_s=120,
        ),
    ]
    for name, job in jobs.items():  # the estimator settings
        parts.append(
            Part(
                name,
                "runs",
                model_run_part(job, shape),
                min_s=30,
                max_s=150,
                job=job,
                cuda_only="the estimate is of CUDA memory (torch.cuda.max_memory_allocated)",
            )
        )
    return parts


def run_part(part: Part, ctx: Context, left: float) -> dict[str, Any]:
    """One part's entry: its result, or why it did not run or did not finish."""
    if part.cuda_only and not ctx.cuda:
        return {"status": "skipped", "reason": NO_CUDA.format(what=part.cuda_only, device=ctx.device)}
    if left < part.min_s:
        return {"status": "not_run", "reason": f"out of time ({left:.0f} s left, it needs {part.min_s:.0f} s)"}
    start = time.perf_counter()
    try:
        return part.run(ctx, min(part.max_s, left - 2))
    except subprocess.TimeoutExpired as err:
        return {"status": "error", "error": f"timed out after {err.timeout:.0f} s"}
    except Exception as err:  # one part's failure must not cost the others
        return {
            "status": "error",
            "error": f"{type(err).__name__}: {err}",
            "traceback": traceback.format_exc().splitlines()[-8:],
            "wall_s": time.perf_counter() - start,
        }


def record(doc: dict[str, Any], part: Part, entry: dict[str, Any]) -> None:
    """Put a part's entry into the document. Model runs keep the format of before: their
    figures, or {job, error, output_tail}, or {job, skipped: reason}."""
    if part.section == "checks":
        doc["checks"][part.name] = entry
        doc["status"][part.name] = entry.get("status", "error")
        return
    status = entry.pop("status", None)
    if status in ("skipped", "not_run"):
        entry = {"skipped": entry["reason"]}
    else:
        status = "error" if "error" in entry else "ok"
    if part.job is not None:
        entry.setdefault("job", asdict(part.job))
    doc["runs"][part.name] = entry
    doc["status"][part.name] = status
    if part.job is not None and part.job.shrink_check:  # the realloc_memory check rides on this run
        memory = entry.pop("realloc_memory", None) or {
            "status": status if status in ("skipped", "not_run") else "error",
            "reason": f"part of the {part.name} run, which did not complete",
        }
        doc["checks"]["realloc_memory"] = memory
        doc["status"]["realloc_memory"] = memory["status"]


def overall_ok(doc: dict[str, Any]) -> bool:
    """True when nothing failed, errored or was left out for lack of time (parts skipped
    for want of CUDA, and "inconclusive", do not count against the run)."""
    bad = {"failed", "error", "not_run"}
    return not any(s in bad for s in doc["status"].values())


def run_all(
    parts: list[Part],
    ctx: Context,
    doc: dict[str, Any],
    deadline: float,
    out: Optional[Path],
    started: float,
    shape: dict[str, Any],
    settings,
    jobs: int = 1,
) -> None:
    """Run the parts (one at a time unless `jobs` > 1), recording each as it ends."""
    order = {part.name: i for i, part in enumerate(parts)}

    def start(part: Part) -> dict[str, Any]:
        return run_part(part, ctx, deadline - (time.perf_counter() - started))

    def finish(part: Part, entry: dict[str, Any]) -> None:
        record(doc, part, entry)
        # The plan's order, whatever the order they ended in (realloc_memory follows l1ra).
        doc["status"] = dict(sorted(doc["status"].items(), key=lambda kv: order.get(kv[0], order.get("l1ra", 0) + 0.5)))
        doc["summary"] = summarise(doc["runs"], shape, settings)
        if "targets" in doc["checks"].get("layer", {}):
            doc["summary"]["layer"] = doc["checks"]["layer"]["targets"]
        doc["fixture"] = ctx.fixture_info()
        doc["wall_s"] = time.perf_counter() - started
        if out is not None:  # after every part: a late failure keeps the rest
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = out.with_name(f".{out.name}.tmp")
            tmp.write_text(json.dumps(doc, indent=2, default=str) + "\n")
            os.replace(tmp, out)

    if jobs <= 1:
        for part in parts:
            finish(part, start(part))
        return
    from concurrent.futures import ThreadPoolExecutor, as_completed

    with ThreadPoolExecutor(jobs) as pool:  # each part is a child process; threads only wait for them
        futures = {pool.submit(start, part): part for part in parts}
        for future in as_completed(futures):
            finish(futures[future], future.result())


# ---------------------------------------------------------------- the summary on screen


def print_summary(doc: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 130)
    runs = doc["runs"]
    t = Table(title=f"L1RA vs stock peft QLoRA ({doc['shape_name']}, {doc.get('device', '?')})")
    t.add_column("figure")
    for name in ("l1ra", "lora"):
        t.add_column(name, justify="right")

    def cell(name: str, key: str, fmt) -> str:
        r = runs.get(name) or {}
        if "error" in r or "skipped" in r:
            return "error" if "error" in r else "not run"
        return "-" if r.get(key) is None else fmt(r[key])

    gib = lambda v: f"{v / GIB:.2f} GiB"  # noqa: E731
    for label, key, fmt in (
        ("median step", "median_step_s", lambda v: f"{v:.3f} s"),
        ("tokens/s", "tokens_per_s", lambda v: f"{v:,.0f}"),
        ("peak allocated", "peak_allocated_bytes", gib),
        ("peak reserved", "peak_reserved_bytes", gib),
        ("peak RSS (CPU)", "peak_rss_bytes", gib),
        ("trainable state", "trainable_state_bytes", lambda v: f"{v / 2**20:.1f} MiB"),
        ("one reallocation / step", "realloc_over_step", lambda v: f"{v:.3f}"),
        ("adapted layer", "layer_type", str),
    ):
        t.add_row(label, cell("l1ra", key, fmt), cell("lora", key, fmt))
    console.print(t)
    side = dict(doc["summary"]["side_by_side"])
    targets = side.pop("targets", {})
    for key, value in side.items():
        console.print(f"  {key}: {value:.3f}")
    for target, met in targets.items():
        console.print(f"  target {target}: {'[green]ok[/]' if met else '[red]MISSED[/]'}")
    e = Table(title="peak memory (GiB): measured vs l1ra_lite.estimate")
    for col in (
        "setting",
        "seq x batch",
        "budget",
        "measured alloc",
        "estimate alloc",
        "ratio",
        "measured device",
        "estimate total",
    ):
        e.add_column(col, justify="right")
    for row in doc["summary"]["estimator"]:
        g = lambda k, row=row: f"{row[k] / GIB:.3f}" if k in row else "-"  # noqa: E731
        e.add_row(
            row["name"],
            f"{row['seq_len']} x {row['batch_size']}",
            str(row["budget"]),
            g("measured_peak_allocated_bytes"),
            g("estimate_allocated_bytes"),
            f"{row['allocated_over_estimate']:.2f}" if "allocated_over_estimate" in row else "-",
            g("measured_device_peak_bytes"),
            g("estimate_total_bytes"),
        )
    console.print(e)
    c = Table(title="checks")
    for col in ("part", "status", "figures / reason"):
        c.add_column(col)
    styles = {"ok": "green", "failed": "red", "error": "red", "not_run": "yellow", "inconclusive": "yellow"}
    for name, status in doc["status"].items():
        entry = doc["checks"].get(name) or runs.get(name) or {}
        c.add_row(name, f"[{styles.get(status, 'dim')}]{status}[/]", check_line(name, entry))
    console.print(c)
    for name, r in list(runs.items()) + list(doc["checks"].items()):
        if r and "error" in r:
            console.print(
                f"[red]{name}: {r['error']}[/]\n" + "\n".join(r.get("output_tail") or r.get("traceback") or [])
            )


def check_line(name: str, e: dict[str, Any]) -> str:
    """One line of figures for the checks table."""
    if not e:
        return ""
    if e.get("status") in ("skipped", "not_run") or "skipped" in e:
        return str(e.get("reason") or e.get("skipped"))
    if "error" in e:
        return str(e["error"])
    try:
        if name == "pytest_cuda":
            return f"{e['passed']} passed, {e['failed']} failed, {e['errors']} errors, {e['skipped']} skipped"
        if name == "layer":
            t = e["targets"]
            times = ", ".join(f"{k}: {v['time_l1ra_over_lora']:.2f}x" for k, v in e["shapes"].items())
            return (
                f"time l1ra/lora {times}; fp32 activation copies l1ra {t['l1ra_activation_fp32_copies']}, "
                f"lora {t['lora_activation_fp32_copies']}"
            )
        if name == "realloc_memory":
            m, h = e["move"], e["halve"]
            if "allocated_drop_bytes" in m:
                return (
                    f"move: -{m['allocated_drop_bytes'] / 2**20:.1f} MiB (expected "
                    f"{m['expected_drop_bytes'] / 2**20:.1f}); halve: -{h['allocated_drop_bytes'] / 2**20:.1f} "
                    f"MiB (expected {h['expected_drop_bytes'] / 2**20:.1f})"
                )
            return f"{e.get('reason', '')}"
        if name == "train_resume":
            r = e["resume"]
            return (
                f"resumed equal: {r['equal']} (max diff {r['adapter_max_abs_diff']:.3g}); eval "
                f"{e['straight']['eval_loss']}; ranks moved {e['straight']['ranks_moved']}"
            )
        if name.startswith("oom_"):
            problems = "; ".join(e["problems"]) or "exit 2, one error line, checkpoint intact"
            return f"{problems} (checkpoint {e['checkpoint'].get('latest')})"
        if name == "sync":
            return (
                f"median {e['median_per_step']} syncs a step ({e['micro_batches_per_step']} micro-batches); "
                f"top: {', '.join(x['where'] for x in e['top_locations'][:3])}"
            )
        if "tokens_per_s" in e:
            return f"{e['tokens_per_s']:,.0f} tokens/s"
    except (KeyError, TypeError):
        pass
    return ""


# ---------------------------------------------------------------- entry point


def package_versions() -> dict[str, Optional[str]]:
    """Versions of what the parts use, read without importing them."""
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, Optional[str]] = {"python": sys.version.split()[0]}
    for name in ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "safetensors", "pytest"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


CHILDREN = {
    "model": lambda payload, device, tiny: measure(Job(**payload), TINY if tiny else MISTRAL_7B, device),
    "layer": lambda payload, device, tiny: gpu_checks.layer_check(payload, device),
    "train_resume": lambda payload, device, tiny: gpu_checks.train_resume_check(payload, device),
    "sync": lambda payload, device, tiny: gpu_checks.sync_check(payload, device),
}


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(
        description="The GPU check: L1RA vs stock peft QLoRA, the estimator, and the "
        "GPU-only checks (see bench/README.md)"
    )
    p.add_argument("--tiny", action="store_true", help="tiny shapes (CPU is fine): checks the code path")
    p.add_argument("--device", help="cuda (default when present) or cpu")
    p.add_argument("--steps", type=int, default=8, help="optimiser steps of the l1ra / lora runs (default 8)")
    p.add_argument(
        "--recipes",
        help="comma-separated recipe names for the estimator comparison "
        "(default: the mistral-7b recipes for 12 GB and 24 GB cards)",
    )
    p.add_argument(
        "--parts",
        help="comma-separated parts to run (default: all): pytest_cuda, layer, l1ra, lora, "
        "train_resume, oom_step, oom_eval, sync, estimate-<recipe>",
    )
    p.add_argument("--out", help="the results file (default: $OUT/gpu_results.json, else bench/gpu_results.json)")
    p.add_argument(
        "--deadline",
        type=float,
        help=f"seconds for the whole run (default {DEFAULT_DEADLINE['real']:.0f}; --tiny: "
        f"{DEFAULT_DEADLINE['tiny']:.0f}, for slow shared CPUs)",
    )
    p.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="parts run at once (default 1; more only for --tiny code-path checks: timings and "
        "memory figures then disturb each other)",
    )
    p.add_argument("--simulate-oom", action="store_true", help=argparse.SUPPRESS)  # CPU: OOM parts with a raised error
    p.add_argument("--child", help=argparse.SUPPRESS)  # a part to measure in this process
    p.add_argument("--payload", help=argparse.SUPPRESS)
    p.add_argument("--child-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    import torch  # not CUDA: the parent never initialises it (children would count its context)

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    shape = TINY if args.tiny else MISTRAL_7B
    if args.child:
        result = CHILDREN[args.child](json.loads(args.payload), device, args.tiny)
        Path(args.child_out).write_text(json.dumps(result, default=str))
        return 0

    started = time.perf_counter()
    deadline = args.deadline or DEFAULT_DEADLINE["tiny" if args.tiny else "real"]
    out = (
        Path(args.out)
        if args.out
        else (
            Path(os.environ["OUT"]) / "gpu_results.json"
            if os.environ.get("OUT")
            else REPO_ROOT / "bench" / "gpu_results.json"
        )
    )
    from l1ra_lite.config import RECIPES_DIR

    wanted = [r.strip() for r in args.recipes.split(",")] if args.recipes else None
    settings = [] if args.tiny else recipe_settings([RECIPES_DIR, REPO_ROOT / "recipes"], wanted)
    source = "recipes" if settings else "fallback"
    settings = settings or FALLBACK_SETTINGS["tiny" if args.tiny else "real"]
    parts = plan_parts(args.tiny, settings, args.steps, args.simulate_oom)
    if args.parts:
        chosen = [x.strip() for x in args.parts.split(",") if x.strip()]
        unknown = sorted(set(chosen) - {part.name for part in parts})
        if unknown:
            raise SystemExit(
                f"gpu bench: unknown part(s) {', '.join(unknown)}; the parts are "
                f"{', '.join(part.name for part in parts)}"
            )
        parts = [part for part in parts if part.name in chosen]
    doc: dict[str, Any] = {
        "shape_name": "tiny" if args.tiny else "mistral-7b",
        "shape": shape,
        "device": device,
        "torch": torch.__version__,
        "versions": package_versions(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "jobs": args.jobs,
        "deadline_s": deadline,
        "parts": [part.name for part in parts],
        "estimator_settings_from": source,
        "status": {},
        "runs": {},
        "checks": {},
    }
    print(f"gpu bench: {device}, " + ", ".join(f"{k} {v}" for k, v in doc["versions"].items()), file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="l1ra-gpu-bench-") as workdir:
        ctx = Context(args.tiny, device, Path(workdir), simulate_oom=args.simulate_oom)
        run_all(parts, ctx, doc, deadline, out, started, shape, settings, args.jobs)
    print_summary(doc)
    print(f"gpu bench: figures written to {out} ({doc['wall_s']:.0f} s)", file=sys.stderr)
    return 0 if overall_ok(doc) else 1


if __name__ == "__main__":
    sys.exit(main())
