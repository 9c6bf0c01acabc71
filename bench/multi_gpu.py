"""Data-parallel training on several GPUs against one: the same global batch, the same
data order, each in its own `l1ra-lite finetune` (torchrun for the N-process run).

    python bench/multi_gpu.py --processes 2                 # needs 2 CUDA GPUs (bench/gpu.sh runs it)
    python bench/multi_gpu.py --processes 2 --device cpu    # the same on the CPU with gloo

Writes multi_gpu.json (to $OUT when set, else bench/): per run the wall time, the
median step time and tokens/s, the peak memory per process, and the largest difference
of the losses, eval loss and adapter weights between the runs; whether the ranks match.
The model is a small Llama built from a config (random weights, 16-bit base: no
bitsandbytes, no network), the data question/answer rows made here.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def make_inputs(folder: Path) -> None:
    sys.path.insert(0, str(ROOT))
    from tests.tiny import save_tiny_base

    save_tiny_base(folder / "base", hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8)
    rows = [{"prompt": f"Question {i}: what is {i} plus {i}?", "completion": f"Answer: {2 * i}."} for i in range(512)]
    (folder / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def finetune_args(folder: Path, out: Path, batch_size: int, steps: int) -> list[str]:
    return [
        *("finetune", "--model", str(folder / "base"), "--data", str(folder / "data.jsonl"), "--quant", "none"),
        *("--max-steps", str(steps), "--batch-size", str(batch_size), "--grad-accum", "1", "--seq-len", "128"),
        *("--lr", "2e-3", "--update-every", "5", "--warmup", "2", "--l1-kappa", "4", "--eval-every", "0"),
        *("--save-every", "0", "--seed", "1", "--plain", "--output", str(out)),
    ]


def run(argv: list[str], env: dict, timeout: float) -> float:
    started = time.perf_counter()
    done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise SystemExit(f"multi_gpu.py: {' '.join(argv[:6])} ... failed:\n{done.stderr[-2000:]}")
    return time.perf_counter() - started


def summary(out: Path, wall_s: float) -> dict:
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    timed = lines[2:] or lines  # the first steps include warm-up
    return {
        "wall_s": round(wall_s, 1),
        "step_s_median": statistics.median(m["step_s"] for m in timed),
        "tokens_per_s_median": statistics.median(m["tokens_per_s"] for m in timed),
        "peak_bytes": max(m.get("peak_bytes", m["mem_bytes"]) for m in lines),
        "final_loss": lines[-1]["loss"],
        "eval_loss": lines[-1].get("eval_loss"),
    }


def compare(one: Path, many: Path) -> dict:
    from safetensors.torch import load_file

    la, lb = ([json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()] for d in (one, many))
    wa, wb = (load_file(str(d / "adapter" / "adapter_model.safetensors")) for d in (one, many))
    ranks = [json.loads((d / "ranks.json").read_text()) for d in (one, many)]
    return {
        "max_loss_diff": max(abs(a["loss"] - b["loss"]) for a, b in zip(la, lb)),
        "eval_loss_diff": abs(la[-1].get("eval_loss", 0) - lb[-1].get("eval_loss", 0)),
        "max_adapter_weight_diff": max(float((wa[k] - wb[k]).abs().max()) for k in wa),
        "ranks_equal": ranks[0] == ranks[1],
        "rank_moves": sum(sum(e["added"].values()) for e in ranks[1]["history"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=4, help="per process")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--timeout", type=float, default=240, help="seconds per run")
    args = parser.parse_args()

    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    results: dict = {"processes": args.processes, "batch_per_process": args.batch_size, "steps": args.steps}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        make_inputs(folder)
        one, many = folder / "one", folder / "many"
        # One process with the whole global batch, on one GPU.
        single_env = {**env, "CUDA_VISIBLE_DEVICES": "" if args.device == "cpu" else "0"}
        argv = [
            sys.executable,
            "-m",
            "l1ra_lite",
            *finetune_args(folder, one, args.processes * args.batch_size, args.steps),
        ]
        results["one_process"] = summary(one, run(argv, single_env, args.timeout))
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.processes}"]
        argv = [*launcher, "-m", "l1ra_lite", *finetune_args(folder, many, args.batch_size, args.steps)]
        results[f"{args.processes}_processes"] = summary(many, run(argv, env, args.timeout))
        results["agreement"] = compare(one, many)
    target = Path(os.environ.get("OUT") or ROOT / "bench") / "multi_gpu.json"
    target.write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
