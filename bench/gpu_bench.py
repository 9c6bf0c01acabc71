"""GPU check: L1RA against stock peft QLoRA on a model of the Mistral-7B shape, and the
memory estimator against measured peaks. Run it through bench/gpu.sh.

The model has Mistral-7B's shape and random weights (memory and speed do not depend on
their values). It is built without ever holding the whole 16-bit model: parameters
start on the meta device, each decoder linear layer is drawn in 16-bit on the GPU and
quantised to NF4 at once (bitsandbytes Linear4bit, double quantisation, as the
product's loader does), and only embeddings, norms and the head are materialised in
16-bit. The training step is the product's: gradient checkpointing, bf16 autocast,
gradient clipping, then the optimiser.

Every measurement runs in its own process (peak memory is a high-water mark):
  l1ra         our adapters + L1RAOptimizer, with one reallocation in the middle
  lora         stock peft LoRA (bitsandbytes Linear4bit layers) with the same per-module
               ranks (rank_pattern) and torch AdamW
  estimate-*   L1RA at two recipe settings, peak next to l1ra_lite.estimate's figure

    python bench/gpu_bench.py                # the real shape on CUDA (bench/gpu.sh)
    python bench/gpu_bench.py --tiny         # a tiny shape on the CPU: checks the code path
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
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

GIB = 1 << 30

# Mistral-7B-v0.3's shape (the config bundled as l1ra_lite/model_configs/mistral-7b.json).
MISTRAL_7B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                  num_key_value_heads=8, head_dim=128, vocab_size=32768, max_position_embeddings=32768,
                  rope_theta=1e6, rms_norm_eps=1e-5, tie_word_embeddings=False)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, vocab_size=256, max_position_embeddings=512,
            tie_word_embeddings=False)

# The setting for the side-by-side, and the fallback estimator settings when no
# mistral-7b recipe is found: (name, seq_len, batch_size, budget).
MAIN = {"real": (2048, 1, 512), "tiny": (64, 1, 28)}
FALLBACK_SETTINGS = {
    "real": [("fallback-seq1024-b1", 1024, 1, 448), ("fallback-seq2048-b2", 2048, 2, 896)],
    "tiny": [("tiny-a", 32, 1, 14), ("tiny-b", 64, 2, 28)],
}
ESTIMATE_TOLERANCE = 0.15  # the recipes issue's target: measured within 15% of the estimate


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


# ---------------------------------------------------------------- the model


def model_config(shape: dict[str, Any]):
    from transformers import MistralConfig

    return MistralConfig(**shape)


def build_quantised_model(config, device: str, dtype, seed: int = 0):
    """A causal LM of `config`'s shape, random weights, decoder linears in NF4, frozen,
    set up for training as l1ra_lite.models.load_model does (no KV cache, non-reentrant
    gradient checkpointing, input gradients)."""
    import bitsandbytes as bnb
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
            replace_submodule(model, path, _nf4_linear(module, device, dtype, std, generator, bnb))
            continue
        for name, param in list(module.named_parameters(recurse=False)):
            if param.device.type != "meta":
                continue
            if param.dim() == 1:  # norms' weights (and any bias): ones / zeros
                value = torch.ones(param.shape, device=device, dtype=dtype) if "weight" in name else \
                    torch.zeros(param.shape, device=device, dtype=dtype)
            else:  # embeddings, head
                value = torch.randn(param.shape, device=device, dtype=dtype, generator=generator) * std
            setattr(module, name, nn.Parameter(value, requires_grad=False))
    model.is_loaded_in_4bit = True  # what transformers' bnb quantiser sets; peft reads it
    model.config.use_cache = False
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    return model


def _nf4_linear(linear, device: str, dtype, std: float, generator, bnb):
    import torch

    weight = torch.randn(linear.out_features, linear.in_features, device=device, dtype=dtype,
                         generator=generator) * std
    layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                              compute_dtype=dtype, compress_statistics=True, quant_type="nf4", device="meta")
    # .to(device) on an unquantised Params4bit quantises it (and frees the 16-bit copy).
    layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, compress_statistics=True, quant_type="nf4",
                                     module=layer).to(device)
    if linear.bias is not None:
        layer.bias = torch.nn.Parameter(torch.zeros(linear.out_features, device=device, dtype=dtype),
                                        requires_grad=False)
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


def attach(method: str, model, budget: int, lr: float, seed: int) -> Attached:
    """L1RA adapters + L1RAOptimizer, or stock peft LoRA with the same ranks + torch AdamW
    (as l1ra_lite.train.attach_adapters sets them up)."""
    import torch

    from l1ra_lite.baselines import peft_lora
    from l1ra_lite.l1ra import L1RAOptimizer, RankState, inject_adapters, initial_ranks
    from l1ra_lite.l1ra.inject import find_targets

    paths = find_targets(model)
    alpha = budget / len(paths)
    if method == "l1ra":
        adapters = inject_adapters(model, budget, None, alpha, 0.0, seed=seed)
        optimizer = L1RAOptimizer(adapters.values(), lr=lr, eta_c=2e-2, l1_lambda=5e-3)
        params = [p for a in adapters.values() for p in (a.lora_A, a.lora_B, a.gate)]
        state = RankState(budget, {p: a.rank for p, a in adapters.items()})
        first = next(iter(adapters.values()))
        return Attached(model, optimizer, params, adapters, state, type(first).__name__)
    torch.manual_seed(seed)
    model = peft_lora(model, paths, initial_ranks(budget, len(paths)), alpha, 0.0)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    layer = model.get_submodule("base_model.model." + paths[0])
    return Attached(model, optimizer, params, None, None, f"{type(layer).__module__}.{type(layer).__name__}")


def trainable_state_bytes(attached: Attached) -> int:
    """Adapter parameters + gradients + optimiser state (as the training loop counts it)."""
    import torch

    params = attached.params
    state = [v for p in params for v in attached.optimizer.state.get(p, {}).values() if torch.is_tensor(v)]
    return 2 * sum(p.numel() * p.element_size() for p in params) + sum(t.numel() * t.element_size() for t in state)


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
    record = reallocate(attached.adapters, attached.rank_state, step,
                        attached.optimizer.prune_threshold, attached.optimizer, generator)
    _sync()
    return {"realloc_s": time.perf_counter() - start, "moved": sum(record.pruned.values()),
            "rank_total": sum(record.ranks.values())}


# ---------------------------------------------------------------- one measurement


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def measure(job: Job, shape: dict[str, Any], device: str) -> dict[str, Any]:
    """Build, attach, train `job.steps` steps on random tokens; return the figures."""
    import torch

    from l1ra_lite.loss import causal_lm_loss

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
        with torch.autocast(**autocast):
            loss = causal_lm_loss(model, {"input_ids": ids, "labels": ids})  # as the training loop does
        loss.backward()
        loss_value = loss.item()
        del loss  # the graph must be gone before a resize
        torch.nn.utils.clip_grad_norm_(attached.params, 1.0)
        attached.optimizer.step()
        attached.optimizer.zero_grad(set_to_none=True)
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
    return result


# ---------------------------------------------------------------- estimator settings


def recipe_settings(recipes_dirs: list[Path], wanted: Optional[list[str]] = None) -> list[tuple[str, int, int, Optional[int]]]:
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
                found[path.stem] = (path.stem, int(keys.get("seq_len", 512)), int(keys.get("batch_size", 4)),
                                    keys.get("budget"))
    if wanted:
        missing = [w for w in wanted if w not in found]
        if missing:
            raise SystemExit(f"gpu bench: recipe(s) not found: {', '.join(missing)} (have: {', '.join(found) or 'none'})")
        return [found[w] for w in wanted]
    by_card = [next((v for k, v in found.items() if card in k), None) for card in ("12gb", "24gb")]
    if all(by_card):
        return by_card
    ordered = sorted(found.values(), key=lambda s: (s[1] * s[2], s[0]))
    return [ordered[0], ordered[-1]] if len(ordered) >= 2 else ordered


def estimate_row(name: str, shape: dict[str, Any], seq_len: int, batch_size: int, budget: Optional[int],
                 measured: Optional[dict[str, Any]]) -> dict[str, Any]:
    """The estimator's figures next to the measured ones, for one setting."""
    from l1ra_lite.estimate import estimate

    est = estimate(model_config(shape), budget=budget, seq_len=seq_len, batch_size=batch_size)
    row = {"name": name, "seq_len": seq_len, "batch_size": batch_size, "budget": est.budget,
           "estimate_allocated_bytes": est.allocated_bytes, "estimate_total_bytes": est.total_bytes,
           "estimate_total_gib": round(est.total_gib, 3), "estimate_parts": dict(est.parts)}
    if measured and "peak_allocated_bytes" in measured:
        peak = measured["peak_allocated_bytes"]
        device_peak = measured["peak_reserved_bytes"] + measured["context_bytes"]
        row.update(measured_peak_allocated_bytes=peak, measured_peak_reserved_bytes=measured["peak_reserved_bytes"],
                   measured_device_peak_bytes=device_peak,
                   allocated_over_estimate=peak / est.allocated_bytes,
                   device_over_estimate_total=device_peak / est.total_bytes)
        row["within_tolerance"] = abs(row["allocated_over_estimate"] - 1) <= ESTIMATE_TOLERANCE
    return row


# ---------------------------------------------------------------- side by side


def compare(l1ra: Optional[dict[str, Any]], lora: Optional[dict[str, Any]]) -> dict[str, Any]:
    """The issue's GPU targets: L1RA tokens/s >= peft QLoRA, peak VRAM <= peft QLoRA."""
    if not (l1ra and lora and "error" not in l1ra and "error" not in lora):
        return {}
    out = {"tokens_per_s_l1ra_over_lora": l1ra["tokens_per_s"] / lora["tokens_per_s"],
           "trainable_state_l1ra_over_lora": l1ra["trainable_state_bytes"] / lora["trainable_state_bytes"]}
    peak_key = "peak_allocated_bytes" if "peak_allocated_bytes" in l1ra else "peak_rss_bytes"
    out["peak_l1ra_over_lora"] = l1ra[peak_key] / lora[peak_key]
    if "peak_reserved_bytes" in l1ra:
        out["peak_reserved_l1ra_over_lora"] = l1ra["peak_reserved_bytes"] / lora["peak_reserved_bytes"]
    out["targets"] = {"tokens_per_s_l1ra_over_lora >= 1": out["tokens_per_s_l1ra_over_lora"] >= 1.0,
                      "peak_l1ra_over_lora <= 1": out["peak_l1ra_over_lora"] <= 1.0}
    return out


def run_job(job: Job, tiny: bool, device: str, timeout_s: float, workdir: Path) -> dict[str, Any]:
    """One job in a child process; its figures, or its error and last output lines."""
    out = workdir / f"{job.name}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(asdict(job)),
           "--child-out", str(out), "--device", device] + (["--tiny"] if tiny else [])
    print(f"gpu bench: {job.name} ({job.method}, seq {job.seq_len} x batch {job.batch_size}, budget {job.budget})",
          file=sys.stderr, flush=True)
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"job": asdict(job), "error": f"timed out after {timeout_s:.0f} s"}
    wall = time.perf_counter() - start
    if proc.returncode != 0 or not out.is_file():
        lines = (proc.stdout + proc.stderr).strip().splitlines()[-15:]
        return {"job": asdict(job), "error": f"exit {proc.returncode}", "output_tail": lines, "wall_s": wall}
    result = json.loads(out.read_text())
    result["wall_s"] = wall
    return result


def plan_jobs(tiny: bool, settings: list[tuple[str, int, int, Optional[int]]], steps: int) -> list[Job]:
    seq, batch, budget = MAIN["tiny" if tiny else "real"]
    jobs = [Job("l1ra", "l1ra", seq, batch, budget, steps, realloc_at=steps // 2),
            Job("lora", "lora", seq, batch, budget, steps, realloc_at=0)]
    for name, s, b, bud in settings:
        n_adapters = 7 * (TINY if tiny else MISTRAL_7B)["num_hidden_layers"]
        jobs.append(Job(f"estimate-{name}", "l1ra", s, b, bud or 8 * n_adapters, 4, realloc_at=2))
    return jobs


def summarise(results: dict[str, dict[str, Any]], shape: dict[str, Any],
              settings: list[tuple[str, int, int, Optional[int]]]) -> dict[str, Any]:
    rows = []
    main = results.get("l1ra")
    if main and "error" not in main:
        j = main["job"]
        rows.append(estimate_row("main", shape, j["seq_len"], j["batch_size"], j["budget"], main))
    for name, s, b, bud in settings:
        measured = results.get(f"estimate-{name}")
        rows.append(estimate_row(name, shape, s, b, bud, measured if measured and "error" not in measured else None))
    return {"side_by_side": compare(results.get("l1ra"), results.get("lora")), "estimator": rows}


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
        return "error" if "error" in r else ("-" if r.get(key) is None else fmt(r[key]))

    gib = lambda v: f"{v / GIB:.2f} GiB"  # noqa: E731
    for label, key, fmt in (("median step", "median_step_s", lambda v: f"{v:.3f} s"),
                            ("tokens/s", "tokens_per_s", lambda v: f"{v:,.0f}"),
                            ("peak allocated", "peak_allocated_bytes", gib),
                            ("peak reserved", "peak_reserved_bytes", gib),
                            ("peak RSS (CPU)", "peak_rss_bytes", gib),
                            ("trainable state", "trainable_state_bytes", lambda v: f"{v / 2**20:.1f} MiB"),
                            ("one reallocation / step", "realloc_over_step", lambda v: f"{v:.3f}"),
                            ("adapted layer", "layer_type", str)):
        t.add_row(label, cell("l1ra", key, fmt), cell("lora", key, fmt))
    console.print(t)
    side = dict(doc["summary"]["side_by_side"])
    targets = side.pop("targets", {})
    for key, value in side.items():
        console.print(f"  {key}: {value:.3f}")
    for target, met in targets.items():
        console.print(f"  target {target}: {'[green]ok[/]' if met else '[red]MISSED[/]'}")
    e = Table(title="peak memory (GiB): measured vs l1ra_lite.estimate")
    for col in ("setting", "seq x batch", "budget", "measured alloc", "estimate alloc", "ratio",
                "measured device", "estimate total"):
        e.add_column(col, justify="right")
    for row in doc["summary"]["estimator"]:
        g = lambda k: f"{row[k] / GIB:.3f}" if k in row else "-"  # noqa: E731
        e.add_row(row["name"], f"{row['seq_len']} x {row['batch_size']}", str(row["budget"]),
                  g("measured_peak_allocated_bytes"), g("estimate_allocated_bytes"),
                  f"{row['allocated_over_estimate']:.2f}" if "allocated_over_estimate" in row else "-",
                  g("measured_device_peak_bytes"), g("estimate_total_bytes"))
    console.print(e)
    for name, r in runs.items():
        if "error" in r:
            console.print(f"[red]{name}: {r['error']}[/]\n" + "\n".join(r.get("output_tail", [])))


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description="GPU benchmark: L1RA vs stock peft QLoRA, and the estimator")
    p.add_argument("--tiny", action="store_true", help="a tiny shape (CPU is fine): checks the code path")
    p.add_argument("--device", help="cuda (default when present) or cpu")
    p.add_argument("--steps", type=int, default=8, help="optimiser steps of the side-by-side runs (default 8)")
    p.add_argument("--recipes", help="comma-separated recipe names for the estimator comparison "
                                     "(default: the mistral-7b recipes for 12 GB and 24 GB cards)")
    p.add_argument("--out", help="the results file (default: $OUT/gpu_results.json, else bench/gpu_results.json)")
    p.add_argument("--deadline", type=float,
                   help="seconds for the whole run (default 300; --tiny: 1200, for slow shared CPUs)")
    p.add_argument("--child", help=argparse.SUPPRESS)  # a Job as JSON: measure it in this process
    p.add_argument("--child-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    shape = TINY if args.tiny else MISTRAL_7B
    if args.child:
        result = measure(Job(**json.loads(args.child)), shape, device)
        Path(args.child_out).write_text(json.dumps(result))
        return 0

    started = time.perf_counter()
    deadline = args.deadline or (1200 if args.tiny else 300)
    out = Path(args.out) if args.out else (Path(os.environ["OUT"]) / "gpu_results.json" if os.environ.get("OUT")
                                           else REPO_ROOT / "bench" / "gpu_results.json")
    from l1ra_lite.config import RECIPES_DIR

    wanted = [r.strip() for r in args.recipes.split(",")] if args.recipes else None
    settings = [] if args.tiny else recipe_settings([RECIPES_DIR, REPO_ROOT / "recipes"], wanted)
    source = "recipes" if settings else "fallback"
    settings = settings or FALLBACK_SETTINGS["tiny" if args.tiny else "real"]
    jobs = plan_jobs(args.tiny, settings, args.steps)
    doc: dict[str, Any] = {"shape_name": "tiny" if args.tiny else "mistral-7b", "shape": shape, "device": device,
                           "torch": torch.__version__, "estimator_settings_from": source, "runs": {}}
    with tempfile.TemporaryDirectory(prefix="l1ra-gpu-bench-") as workdir:
        for job in jobs:
            left = deadline - (time.perf_counter() - started)
            if left < 20:
                doc["runs"][job.name] = {"job": asdict(job), "error": "skipped: out of time"}
                continue
            doc["runs"][job.name] = run_job(job, args.tiny, device, left, Path(workdir))
            doc["summary"] = summarise(doc["runs"], shape, settings)
            doc["wall_s"] = time.perf_counter() - started
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(doc, indent=2) + "\n")  # after every job: a late failure keeps the rest
    print_summary(doc)
    print(f"gpu bench: figures written to {out} ({doc['wall_s']:.0f} s)", file=sys.stderr)
    return 0 if all("error" not in r for r in doc["runs"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
