"""The checks of bench/gpu.sh besides the Mistral-7B-shaped runs: what each measures, the
pure functions that judge the results (tested on the CPU), and the bodies that run in a
child process (`bench/gpu_bench.py --child <kind>`).

  layer          one Mistral-7B-shaped NF4 layer (4096 -> 14336 and 4096 -> 4096), L1RA
                 against stock peft LoRA on the same base layer at the same rank, forward +
                 backward under bf16 autocast: time, peak memory, and every dtype cast
                 (aten::_to_copy / copy_) seen by a TorchDispatchMode
  train_resume   the product's loader and train() on a small saved Llama folder (128256-entry
                 vocabulary): evaluation, checkpoints, and a stopped + resumed run that must
                 end equal to an uninterrupted one
  sync           host syncs per optimiser step of train(), counted as the warnings of
                 torch.cuda.set_sync_debug_mode("warn"), with where they come from
  oom_step/eval  `python -m l1ra_lite finetune` with the memory fraction squeezed before a
                 training step / an evaluation: exit 2, one error line, the checkpoint intact
  pytest_cuda    the suite's tests marked `cuda`

Every check returns a dict with "status": "ok" (measured; for pass/fail checks: passed),
"failed" (measured and the expectation does not hold), "inconclusive" (see the check),
"error" (could not be measured) or "skipped" (with "reason").
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path
from typing import Any, Optional

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

# ---------------------------------------------------------------- settings

# The layer check: (in, out) of the base layers, the tokens of one sequence, the rank of
# both adapters. Tiny: dimensions that differ from the token count, so that a cast of an
# activation (leading dimensions = tokens) is never confused with one of a weight.
LAYER = {
    "real": {"shapes": [[4096, 14336], [4096, 4096]], "tokens": 2048, "rank": 16, "warmup": 3, "iters": 20},
    "tiny": {"shapes": [[64, 224], [64, 64]], "tokens": 96, "rank": 4, "warmup": 1, "iters": 3},
}

# The small Llama folder of the train / sync / OOM checks: Llama-3's vocabulary (the head
# and the loss at 128256 entries), a few narrow layers, random weights.
SMALL_LLAMA = {
    "real": dict(
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        vocab_size=128256,
        max_position_embeddings=1024,
        rope_theta=500000.0,
        tie_word_embeddings=False,
    ),
    "tiny": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=128256,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    ),
}
# Answers of about a hundred tokens: the loss then computes the head over 128256 entries
# for a few hundred labelled positions a step (and its chunks need new memory blocks,
# which is where the OOM checks' squeeze bites).
FILLER = "Adding a number to itself doubles it, so the answer is twice the number asked about. " * 2
ROWS = [
    {"prompt": f"Question {i}: what is {i} plus {i}?", "completion": f"Answer: {2 * i}. {FILLER.strip()}"}
    for i in range(64)
]

# FinetuneConfig values of the train_resume check. A strong L1 penalty (as the tests use)
# so that rank moves between the stop and the end: the resume must carry it exactly.
TRAIN_COMMON = dict(
    quant="nf4",
    warmup=1,
    lr=5e-3,
    l1_lambda=6.0,
    eta_c=0.05,
    seed=7,
    eval_fraction=0.1,
    eval_max_rows=8,
    keep_checkpoints=2,
    log_every=1,
    plain=True,
)
TRAIN = {
    "real": dict(
        seq_len=128, batch_size=4, grad_accum=2, max_steps=8, stop_at=4, eval_every=4, save_every=4, update_every=2
    ),
    "tiny": dict(
        seq_len=64, batch_size=2, grad_accum=1, max_steps=6, stop_at=3, eval_every=3, save_every=3, update_every=2
    ),
}
SYNC = dict(seq_len=128, batch_size=4, grad_accum=2, max_steps=6, update_every=3, eval_every=0, save_every=0)
RANKS_PER_ADAPTER = 4

# The OOM checks: 6 steps, a checkpoint every 2. "train:2": the memory is squeezed before
# the 3rd training forward pass (step 3; checkpoint-2 is on disk). "eval:4": before the
# first evaluation after 4 training passes (the evaluation of step 4).
OOM = {
    "oom_step": {"squeeze": "train:2", "eval_every": 0, "checkpoint_steps": [2]},
    "oom_eval": {"squeeze": "eval:4", "eval_every": 2, "checkpoint_steps": [2, 4]},
}
ERROR_PREFIX = "l1ra-lite finetune: error:"


# ---------------------------------------------------------------- the small model folder


def build_small_llama(folder: Path, tiny: bool) -> dict[str, Any]:
    """A saved Llama folder (config, bf16 safetensors, tokenizer with a chat template) and a
    prompt/completion data file; random weights. Returns where they are and the shape."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from tests.tiny import build_tokenizer  # the byte-level BPE + ChatML tokenizer the tests use

    start = time.perf_counter()
    shape = SMALL_LLAMA["tiny" if tiny else "real"]
    tokenizer = build_tokenizer()
    config = LlamaConfig(
        **shape,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model_dir = Path(folder) / "small-llama"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    data = Path(folder) / "rows.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    n_adapters = 7 * shape["num_hidden_layers"]
    return {
        "model": str(model_dir),
        "data": str(data),
        "shape": shape,
        "n_adapters": n_adapters,
        "budget": RANKS_PER_ADAPTER * n_adapters,
        "parameters": sum(p.numel() for p in model.parameters()),
        "build_s": time.perf_counter() - start,
    }


# ---------------------------------------------------------------- dtype casts


def leading_numel(shape) -> int:
    n = 1
    for d in list(shape)[:-1]:
        n *= d
    return n


class CastCounter:
    """Records every dtype-changing copy (aten._to_copy, aten.copy_) dispatched inside the
    `with` block, forward and backward, including the casts autocast inserts."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        records = self.records = []
        seen = self.seen = Counter()  # every op, cast or not: shows that the mode saw the backward

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                import torch

                out = func(*args, **(kwargs or {}))
                seen["ops"] += 1
                if func is torch.ops.aten._to_copy.default and torch.is_tensor(out) and out.dtype != args[0].dtype:
                    records.append(
                        (
                            "_to_copy",
                            str(args[0].dtype),
                            str(out.dtype),
                            tuple(out.shape),
                            out.numel() * out.element_size(),
                        )
                    )
                elif func is torch.ops.aten.copy_.default and args[0].dtype != args[1].dtype:
                    records.append(
                        (
                            "copy_",
                            str(args[1].dtype),
                            str(args[0].dtype),
                            tuple(args[0].shape),
                            args[0].numel() * args[0].element_size(),
                        )
                    )
                return out

        self.mode = Mode()

    def __enter__(self):
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self.mode.__exit__(*exc)


def summarise_casts(records: list[tuple], tokens: int, ops: int) -> dict[str, Any]:
    """Counts of the recorded casts; an activation is a tensor whose leading dimensions
    hold `tokens` positions (a weight's are its rank or its output features)."""
    activation = [r for r in records if leading_numel(r[3]) == tokens]
    grouped = Counter((op, src, dst, "x".join(map(str, shape))) for op, src, dst, shape, _ in records)
    return {
        "ops": ops,
        "casts": len(records),
        "cast_bytes": sum(r[4] for r in records),
        "activation_casts": len(activation),
        "activation_cast_bytes": sum(r[4] for r in activation),
        "activation_to_fp32": sum(1 for r in activation if r[2] == "torch.float32"),
        "list": [
            {"op": op, "from": src.removeprefix("torch."), "to": dst.removeprefix("torch."), "shape": shape, "count": n}
            for (op, src, dst, shape), n in grouped.items()
        ],
    }


# ---------------------------------------------------------------- layer check (child)


def _sync(cuda: bool) -> None:
    import torch

    if cuda:
        torch.cuda.synchronize()


def measure_layer(layer, x, grad, device: str, warmup: int, iters: int, tokens: int) -> dict[str, Any]:
    """Forward + backward of one adapted layer under bf16 autocast: median time, memory
    (CUDA), and the dtype casts of one forward and one backward."""
    import torch

    cuda = device.startswith("cuda")
    params = [p for p in layer.parameters() if p.requires_grad]
    autocast = {"device_type": device.split(":")[0], "dtype": torch.bfloat16}

    def clear():
        x.grad = None
        for p in params:
            p.grad = None

    def forward():
        with torch.autocast(**autocast):
            return layer(x)

    times = []
    for i in range(warmup + iters):
        clear()
        _sync(cuda)
        start = time.perf_counter()
        y = forward()
        torch.autograd.backward(y, grad if y.dtype == grad.dtype else grad.to(y.dtype))
        _sync(cuda)
        if i >= warmup:
            times.append(time.perf_counter() - start)
        del y
    out: dict[str, Any] = {"median_s": statistics.median(times), "min_s": min(times), "iters": iters}
    clear()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start_bytes = torch.cuda.memory_allocated()
        y = forward()
        torch.cuda.synchronize()
        # What the forward leaves allocated: the output and what autograd saved for backward.
        out["forward_held_bytes"] = torch.cuda.memory_allocated() - start_bytes
        torch.autograd.backward(y, grad if y.dtype == grad.dtype else grad.to(y.dtype))
        torch.cuda.synchronize()
        out["peak_bytes"] = torch.cuda.max_memory_allocated() - start_bytes
        del y
        clear()
    with CastCounter() as fwd:
        y = forward()
    g = grad if y.dtype == grad.dtype else grad.to(y.dtype)
    with CastCounter() as bwd:
        torch.autograd.backward(y, g)
    out["output_dtype"] = str(y.dtype).removeprefix("torch.")
    out["casts"] = {
        "forward": summarise_casts(fwd.records, tokens, fwd.seen["ops"]),
        "backward": summarise_casts(bwd.records, tokens, bwd.seen["ops"]),
    }
    clear()
    return out


def layer_check(settings: dict[str, Any], device: str) -> dict[str, Any]:
    import torch
    from peft import LoraConfig, get_peft_model

    from bench.gpu_bench import nf4_linear
    from l1ra_lite.l1ra.layer import L1RALinear

    cuda = device.startswith("cuda")
    tokens, rank = settings["tokens"], settings["rank"]
    generator = torch.Generator(device).manual_seed(0)
    result: dict[str, Any] = {
        "status": "ok",
        "tokens": tokens,
        "rank": rank,
        "autocast": "bfloat16",
        "base": "bitsandbytes Linear4bit, NF4, double quantisation, bf16 compute",
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "shapes": {},
    }
    if not cuda:
        result["memory_note"] = "peak and held bytes are CUDA figures (torch.cuda.max_memory_allocated)"
    for in_f, out_f in settings["shapes"]:
        base = nf4_linear(in_f, out_f, device, torch.bfloat16, 0.02, generator)
        x = torch.randn(1, tokens, in_f, device=device, dtype=torch.bfloat16, generator=generator).requires_grad_()
        grad = torch.randn(1, tokens, out_f, device=device, dtype=torch.bfloat16, generator=generator)
        l1ra = L1RALinear(base, rank, 1.0, generator=torch.Generator().manual_seed(0))
        # Stock peft on the same base layer, as l1ra_lite.baselines.peft_lora configures it
        # (its adapter weights in fp32); is_loaded_in_4bit makes peft pick its bnb 4-bit layer.
        holder = torch.nn.Module()
        holder.proj = base
        holder.is_loaded_in_4bit = True
        peft_model = get_peft_model(
            holder, LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, bias="none", target_modules=["proj"])
        )
        lora = peft_model.get_submodule("base_model.model.proj")
        row: dict[str, Any] = {
            "layer_types": {"l1ra": type(l1ra).__name__, "lora": f"{type(lora).__module__}.{type(lora).__name__}"}
        }
        for name, layer in (("l1ra", l1ra), ("lora", lora)):
            row[name] = measure_layer(layer, x, grad, device, settings["warmup"], settings["iters"], tokens)
        row["time_l1ra_over_lora"] = row["l1ra"]["median_s"] / row["lora"]["median_s"]
        if cuda:
            row["peak_l1ra_minus_lora_bytes"] = row["l1ra"]["peak_bytes"] - row["lora"]["peak_bytes"]
            row["held_l1ra_minus_lora_bytes"] = row["l1ra"]["forward_held_bytes"] - row["lora"]["forward_held_bytes"]
        result["shapes"][f"{in_f}x{out_f}"] = row
        del base, x, grad, l1ra, holder, peft_model, lora
        if cuda:
            torch.cuda.empty_cache()
    result["targets"] = layer_targets(result["shapes"])
    if not result["targets"]["counter_saw_backward"]:
        result["status"] = "inconclusive"
        result["note"] = "the dispatch-mode counter saw no backward op: the backward cast counts are not measured"
    return result


def layer_targets(shapes: dict[str, Any]) -> dict[str, Any]:
    def total(method: str, key: str) -> int:
        return sum(row[method]["casts"][phase][key] for row in shapes.values() for phase in ("forward", "backward"))

    fp32 = total("l1ra", "activation_to_fp32")
    saw_backward = all(row[m]["casts"]["backward"]["ops"] > 0 for row in shapes.values() for m in ("l1ra", "lora"))
    return {
        "counter_saw_backward": saw_backward,  # False: the counts of the backward are not to be trusted
        "l1ra_activation_fp32_copies": fp32,
        "lora_activation_fp32_copies": total("lora", "activation_to_fp32"),
        "l1ra_activation_cast_bytes": total("l1ra", "activation_cast_bytes"),
        "lora_activation_cast_bytes": total("lora", "activation_cast_bytes"),
        "l1ra makes no fp32 copy of the activations": fp32 == 0,
        "l1ra casts no more activation bytes than lora": total("l1ra", "activation_cast_bytes")
        <= total("lora", "activation_cast_bytes"),
    }


# ---------------------------------------------------------------- train + resume (child)


def finetune_config(fixture: dict[str, Any], values: dict[str, Any]):
    from l1ra_lite.config import FinetuneConfig

    values = {k: v for k, v in values.items() if k != "stop_at"}
    return FinetuneConfig(
        model=fixture["model"], data=fixture["data"], budget=fixture["budget"], **{**TRAIN_COMMON, **values}
    )


def compare_runs(a: Path, b: Path) -> dict[str, Any]:
    """Adapter tensors, ranks.json and the logged losses of two finished run folders."""
    import torch
    from safetensors.torch import load_file

    ta = load_file(str(a / "adapter" / "adapter_model.safetensors"))
    tb = load_file(str(b / "adapter" / "adapter_model.safetensors"))
    same_keys = ta.keys() == tb.keys()
    diff = max(
        ((ta[k].float() - tb[k].float()).abs().max().item() for k in ta if k in tb and ta[k].shape == tb[k].shape),
        default=0.0,
    )
    shapes_equal = same_keys and all(ta[k].shape == tb[k].shape for k in ta)
    tensors_equal = shapes_equal and all(torch.equal(ta[k], tb[k]) for k in ta)
    ranks_equal = json.loads((a / "ranks.json").read_text()) == json.loads((b / "ranks.json").read_text())

    def losses(run: Path) -> list:
        lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
        return [(m["step"], m.get("loss"), m.get("eval_loss")) for m in lines]

    la, lb = losses(a), losses(b)
    return {
        "equal": tensors_equal and ranks_equal and la == lb,
        "adapter_tensors_equal": tensors_equal,
        "adapter_shapes_equal": shapes_equal,
        "adapter_max_abs_diff": diff,
        "ranks_equal": ranks_equal,
        "losses_equal": la == lb,
    }


def _run_summary(run_dir: Path) -> dict[str, Any]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    ranks = json.loads((run_dir / "ranks.json").read_text())
    config = json.loads((run_dir / "config.json").read_text())
    step_times = [m["step_s"] for m in lines if "step_s" in m]
    return {
        "steps": [m["step"] for m in lines],
        "last_loss": lines[-1]["loss"] if lines else None,
        "eval_loss": [[m["step"], m["eval_loss"]] for m in lines if "eval_loss" in m],
        "median_step_s": statistics.median(step_times) if step_times else None,
        "ranks_moved": sum(sum(h["pruned"].values()) for h in ranks["history"]),
        "reallocations": len(ranks["history"]),
        "compute_dtype": config.get("compute_dtype"),
        "checkpoints": sorted(p.name for p in run_dir.glob("checkpoint-*")),
    }


def train_resume_check(payload: dict[str, Any], device: str) -> dict[str, Any]:
    import gc
    import warnings

    import torch

    from l1ra_lite.train import Interrupted, train

    cuda = device.startswith("cuda")
    if cuda:  # with CUBLAS_WORKSPACE_CONFIG from the parent; ops with no deterministic kernel warn
        torch.use_deterministic_algorithms(True, warn_only=True)
    fixture, values = payload["fixture"], payload["settings"]
    root = Path(payload["workdir"])
    nondeterministic: set[str] = set()

    def one(name: str, stop_at: Optional[int] = None, resume: bool = False) -> dict[str, Any]:
        run_dir = root / name
        run_dir.mkdir(parents=True, exist_ok=True)
        calls = {"n": 0}

        def should_stop() -> bool:
            calls["n"] += 1
            return stop_at is not None and calls["n"] >= stop_at

        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start, stopped = time.perf_counter(), None
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                train(
                    finetune_config(fixture, values),
                    run_dir,
                    lambda event: None,
                    resume=resume,
                    should_stop=should_stop,
                    device=device,
                )
            except Interrupted as stop:
                stopped = stop.step
        nondeterministic.update(str(w.message).splitlines()[0][:300] for w in caught if "determinis" in str(w.message))
        figures: dict[str, Any] = {"wall_s": time.perf_counter() - start, "stopped_at": stopped}
        if cuda:
            figures["peak_allocated_bytes"] = torch.cuda.max_memory_allocated()
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
        return figures

    result: dict[str, Any] = {
        "settings": {**TRAIN_COMMON, **values, "budget": fixture["budget"]},
        "model": {k: fixture[k] for k in ("shape", "parameters", "n_adapters")},
    }
    result["straight"] = {**one("straight"), **_run_summary(root / "straight")}
    result["stopped"] = one("resumed", stop_at=values["stop_at"])
    result["stopped"]["checkpoints"] = sorted(p.name for p in (root / "resumed").glob("checkpoint-*"))
    result["resumed"] = {**one("resumed", resume=True), **_run_summary(root / "resumed")}
    comparison = compare_runs(root / "straight", root / "resumed")
    result["resume"] = comparison
    status = "ok" if comparison["equal"] and result["stopped"]["stopped_at"] == values["stop_at"] else "failed"
    if not comparison["equal"]:
        # Is it the resume, or does this device not repeat a run bit for bit? A second
        # uninterrupted run tells them apart.
        result["control"] = {**one("straight-again"), **compare_runs(root / "straight", root / "straight-again")}
        if not result["control"]["equal"]:
            status = "inconclusive"
            result["note"] = (
                "two uninterrupted runs differ too: the device does not repeat a run bit for bit "
                "(see nondeterministic_ops); compare adapter_max_abs_diff with the control's"
            )
    result["nondeterministic_ops"] = sorted(nondeterministic)
    problems = []
    if result["stopped"]["stopped_at"] != values["stop_at"]:
        problems.append(
            f"the stop was asked at step {values['stop_at']} and happened at {result['stopped']['stopped_at']}"
        )
    if not result["straight"]["eval_loss"]:
        problems.append("no evaluation ran")
    if not result["straight"]["checkpoints"]:
        problems.append("no checkpoint was written")
    if problems:
        status = "failed"
    result["problems"] = problems
    result["status"] = status
    return result


# ---------------------------------------------------------------- host syncs (child)


def count_syncs(is_sync: list[bool], marks: list[tuple[Any, int]]) -> dict[str, Any]:
    """Host syncs before the run started, per optimiser step, and after the last step.
    `is_sync[i]`: whether warning i was a sync; `marks`: ("start", n) when the run started,
    then (step, n) when step `step` was logged, n being the number of warnings so far."""
    prefix = [0]
    for flag in is_sync:
        prefix.append(prefix[-1] + bool(flag))

    def syncs_before(n: int) -> int:
        return prefix[n]

    start = next((n for label, n in marks if label == "start"), 0)
    per_step, previous = {}, start
    for label, n in marks:
        if label == "start":
            continue
        per_step[label] = syncs_before(n) - syncs_before(previous)
        previous = n
    return {
        "setup": syncs_before(start),
        "per_step": per_step,
        "after_last_step": syncs_before(len(is_sync)) - syncs_before(previous),
    }


def short_location(filename: str, lineno: int) -> str:
    path = Path(filename)
    try:
        return f"{path.resolve().relative_to(REPO_ROOT)}:{lineno}"
    except ValueError:
        parts = path.parts
        for anchor in ("site-packages", "dist-packages"):
            if anchor in parts:
                return f"{'/'.join(parts[parts.index(anchor) + 1 :])}:{lineno}"
        return f"{path.name}:{lineno}"


def sync_check(payload: dict[str, Any], device: str) -> dict[str, Any]:
    import warnings

    import torch

    from l1ra_lite.train import train

    fixture, values = payload["fixture"], payload.get("settings", SYNC)
    run_dir = Path(payload["workdir"]) / "sync"
    run_dir.mkdir(parents=True, exist_ok=True)
    marks: list[tuple[Any, int]] = []
    reallocated: list[int] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")

        def report(event) -> None:
            kind = type(event).__name__
            if kind == "RunStarted":
                marks.append(("start", len(caught)))
            elif kind == "StepLogged":
                marks.append((event.step, len(caught)))
            elif kind == "Reallocated":
                reallocated.append(event.step)

        torch.cuda.set_sync_debug_mode("warn")
        try:
            train(finetune_config(fixture, values), run_dir, report, device=device)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        records = list(caught)
    is_sync = ["synchroniz" in str(w.message) for w in records]
    counts = count_syncs(is_sync, marks)
    steps = counts["per_step"]
    plain = [n for step, n in steps.items() if step not in reallocated and step not in (1, values["max_steps"])]
    start = next((n for label, n in marks if label == "start"), 0)
    end = marks[-1][1] if marks else len(records)
    where = Counter(short_location(w.filename, w.lineno) for w, s in zip(records[start:end], is_sync[start:end]) if s)
    return {
        "status": "ok",
        "settings": {**TRAIN_COMMON, **values, "budget": fixture["budget"]},
        "micro_batches_per_step": values["grad_accum"],
        "n_layers": fixture["shape"]["num_hidden_layers"],
        "setup": counts["setup"],
        "per_step": {str(k): v for k, v in steps.items()},
        "median_per_step": statistics.median(plain) if plain else None,
        "median_per_step_note": "steps other than the first, the last (it evaluates) and those that reallocate",
        "reallocation_steps": reallocated,
        "after_last_step": counts["after_last_step"],
        "top_locations": [{"where": k, "count": n} for k, n in where.most_common(12)],
    }


# ---------------------------------------------------------------- out of memory (CLI subprocess)

# Runs `python -m l1ra_lite ...` (argv after -c) after wrapping l1ra_lite.loss.causal_lm_loss,
# which the training step and the evaluation both call: at the chosen call the memory
# fraction is set to what the process has reserved, so the next new block fails with a
# real torch.cuda.OutOfMemoryError. L1RA_BENCH_OOM_SIMULATE=1 raises one instead (CPU).
OOM_BOOTSTRAP = r"""
import json, os, runpy, sys
import torch
import l1ra_lite.loss as _loss

_phase, _after = os.environ["L1RA_BENCH_OOM"].split(":")
_after = int(_after)
_simulate = os.environ.get("L1RA_BENCH_OOM_SIMULATE") == "1"
_real = _loss.causal_lm_loss
_seen = {"train": 0, "done": False}


def _squeeze(model):
    info = {"phase": _phase, "training_passes": _seen["train"], "simulated": _simulate}
    if _simulate:
        print("L1RA_BENCH_SQUEEZE " + json.dumps(info), flush=True)
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 64.00 MiB (simulated)")
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(0).total_memory
    limit = torch.cuda.memory_reserved()
    torch.cuda.set_per_process_memory_fraction(limit / total)
    info.update(limit_bytes=limit, allocated_bytes=torch.cuda.memory_allocated(), total_bytes=total)
    print("L1RA_BENCH_SQUEEZE " + json.dumps(info), flush=True)


def _loss_with_squeeze(model, batch, *args, **kwargs):
    if model.training:
        _seen["train"] += 1
    due = (model.training and _seen["train"] > _after) if _phase == "train" else \
        (not model.training and _seen["train"] >= _after)
    if due and not _seen["done"]:
        _seen["done"] = True
        _squeeze(model)
    return _real(model, batch, *args, **kwargs)


_loss.causal_lm_loss = _loss_with_squeeze
runpy.run_module("l1ra_lite", run_name="__main__", alter_sys=True)
"""


def judge_oom_output(returncode: int, stderr: str) -> dict[str, Any]:
    """The CLI's side of the contract: exit 2, exactly one error line that says out of
    memory, no traceback."""
    lines = stderr.splitlines()
    errors = [line for line in lines if line.startswith(ERROR_PREFIX)]
    problems = []
    if returncode != 2:
        problems.append(f"exit code {returncode}, expected 2")
    if len(errors) != 1:
        problems.append(f"{len(errors)} lines start with {ERROR_PREFIX!r}, expected 1")
    elif "out of memory" not in errors[0]:
        problems.append("the error line does not say 'out of memory'")
    if "Traceback" in stderr:
        problems.append("a traceback on stderr")
    return {"problems": problems, "error_lines": errors}


def checkpoint_on_disk(run_dir: Path) -> dict[str, Any]:
    """The newest checkpoint `latest` points to, verified against its manifest and read."""
    from l1ra_lite import checkpoint as ckpt
    from l1ra_lite.errors import UserError

    leftovers = sorted(p.name for p in run_dir.glob(".checkpoint-*"))
    try:
        path = ckpt.latest_checkpoint(run_dir)
        step = ckpt.load_checkpoint(path).state["step"]
    except UserError as err:
        return {"intact": False, "error": str(err), "temporary_leftovers": leftovers}
    return {
        "intact": True,
        "latest": path.name,
        "step": step,
        "temporary_leftovers": leftovers,
        "all": sorted(p.name for p in run_dir.glob("checkpoint-*")),
    }


def oom_command(fixture: dict[str, Any], run_dir: Path, eval_every: int, tiny: bool) -> list[str]:
    seq = TRAIN["tiny" if tiny else "real"]["seq_len"]
    args = [
        "finetune",
        "--model",
        fixture["model"],
        "--data",
        fixture["data"],
        "--quant",
        "nf4",
        "--budget",
        fixture["budget"],
        "--max-steps",
        6,
        "--batch-size",
        2,
        "--grad-accum",
        1,
        "--seq-len",
        seq,
        "--warmup",
        1,
        "--update-every",
        2,
        "--save-every",
        2,
        "--eval-every",
        eval_every,
        "--eval-fraction",
        0.1,
        "--eval-max-rows",
        8,
        "--seed",
        7,
        "--plain",
        "--output",
        run_dir,
    ]
    return [sys.executable, "-c", OOM_BOOTSTRAP, *map(str, args)]


def oom_check(
    name: str,
    fixture: dict[str, Any],
    workdir: Path,
    timeout: float,
    env: dict[str, str],
    tiny: bool = False,
    simulate: bool = False,
) -> dict[str, Any]:
    spec = OOM[name]
    run_dir = Path(workdir) / name
    env = {**env, "L1RA_BENCH_OOM": spec["squeeze"]}
    if simulate:
        env["L1RA_BENCH_OOM_SIMULATE"] = "1"
    start = time.perf_counter()
    proc = subprocess.run(
        oom_command(fixture, run_dir, spec["eval_every"], tiny),
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    squeeze = next(
        (
            json.loads(line.split(" ", 1)[1])
            for line in proc.stdout.splitlines()
            if line.startswith("L1RA_BENCH_SQUEEZE ")
        ),
        None,
    )
    verdict = judge_oom_output(proc.returncode, proc.stderr)
    problems = list(verdict["problems"])
    if squeeze is None:
        problems.insert(0, "the memory was never squeezed (the run did not reach that point)")
    elif proc.returncode == 0:
        problems.insert(0, "the squeeze caused no out-of-memory error (the rest of the run fit in what was reserved)")
    disk = checkpoint_on_disk(run_dir)
    if not disk["intact"]:
        problems.append(f"no intact checkpoint: {disk.get('error')}")
    elif disk["step"] not in spec["checkpoint_steps"]:
        problems.append(f"the latest checkpoint is of step {disk['step']}, expected one of {spec['checkpoint_steps']}")
    if disk.get("temporary_leftovers"):
        problems.append(f"temporary checkpoint folders left: {disk['temporary_leftovers']}")
    return {
        "status": "failed" if problems else "ok",
        "squeeze_at": spec["squeeze"],
        "simulated": simulate,
        "squeeze": squeeze,
        "exit_code": proc.returncode,
        "error_lines": verdict["error_lines"],
        "checkpoint": disk,
        "expected_checkpoint_steps": spec["checkpoint_steps"],
        "problems": problems,
        "stderr_tail": proc.stderr.strip().splitlines()[-12:],
        "wall_s": time.perf_counter() - start,
    }


# ---------------------------------------------------------------- pytest -m cuda (subprocess)


def cuda_test_files(tests_dir: Path = REPO_ROOT / "tests") -> list[str]:
    """The test files that hold a cuda-marked test (collecting only these keeps test modules
    that need packages the GPU machine lacks out of the run)."""
    return [
        str(p.relative_to(REPO_ROOT))
        for p in sorted(Path(tests_dir).glob("test_*.py"))
        if "mark.cuda" in p.read_text(encoding="utf-8")
    ]


def junit_counts(xml_text: str) -> dict[str, Any]:
    """Passed / failed / errors / skipped and the failing tests of a pytest junit-xml report."""
    root = ET.fromstring(xml_text)
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    totals = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    failing = []
    for case in root.iter("testcase"):
        for kind in ("failure", "error"):
            for node in case.findall(kind):
                message = (node.get("message") or node.text or "").strip().splitlines()
                failing.append(
                    {
                        "test": f"{case.get('classname', '')}::{case.get('name', '')}",
                        "kind": kind,
                        "message": message[0][:300] if message else "",
                    }
                )
    return {
        "passed": totals["tests"] - totals["failures"] - totals["errors"] - totals["skipped"],
        "failed": totals["failures"],
        "errors": totals["errors"],
        "skipped": totals["skipped"],
        "total": totals["tests"],
        "failing": failing,
    }


def pytest_cuda_check(
    workdir: Path, timeout: float, env: dict[str, str], files: Optional[list[str]] = None
) -> dict[str, Any]:
    files = cuda_test_files() if files is None else files
    if not files:
        return {"status": "error", "error": "no test file has a cuda-marked test"}
    report = Path(workdir) / "pytest-cuda.xml"
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-m",
        "cuda",
        "-p",
        "no:cacheprovider",
        "--continue-on-collection-errors",
        f"--junitxml={report}",
        "-q",
        *files,
    ]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    tail = (proc.stdout + proc.stderr).strip().splitlines()[-15:]
    result: dict[str, Any] = {"files": files, "exit_code": proc.returncode, "wall_s": time.perf_counter() - start}
    if not report.is_file():
        missing = "No module named pytest" in proc.stderr
        return {
            **result,
            "status": "error",
            "output_tail": tail,
            "error": "pytest is not installed (put its wheels in .whl/: pytest, pluggy, iniconfig)"
            if missing
            else "pytest wrote no report",
        }
    result.update(junit_counts(report.read_text(encoding="utf-8")))
    if result["failed"] or result["errors"]:
        result["status"], result["output_tail"] = "failed", tail
    elif result["passed"] == 0:
        result["status"], result["output_tail"] = "error", tail
        result["error"] = "no cuda-marked test passed (all skipped: is CUDA visible to the tests?)"
    else:
        result["status"] = "ok"
    return result
