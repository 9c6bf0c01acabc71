"""How long data preparation takes and how much memory it needs, at a given number of rows.

    python bench/data_scale.py --rows 20000                 # first preparation
    python bench/data_scale.py --rows 20000 --again         # and a second one (a cache hit)
    python bench/data_scale.py --rows 100000 --num-proc 2

Writes synthetic chat rows (~150 tokens each with the SmolLM2 tokenizer) to a JSONL file
once, then prepares them in a fresh process per measurement (peak memory is a high-water
mark): the embedded SmolLM2-135M-Instruct tokenizer, seq-len 256, one thread. Prints one
JSON line per measurement: seconds, peak resident memory of the process and of its worker
processes, and the resident memory after loading the tokenizer (the baseline the data
adds to). Runs against whatever l1ra_lite is on the path, so the same script measures an
older checkout (its prepare_data takes fewer arguments: only those it knows are passed).
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = (
    "the model learns answer question data token river mountain history science music garden "
    "language computer energy water light city people world time number system method result "
    "change value small large quick slow bright dark early late simple complex open close "
    "follow explain describe compare measure build write read listen travel remember"
).split()


def write_rows(path: Path, n_rows: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as out:
        for i in range(n_rows):
            question = " ".join(rng.choices(WORDS, k=rng.randint(25, 45))) + "?"
            answer = " ".join(rng.choices(WORDS, k=rng.randint(70, 100))) + "."
            row = {
                "messages": [{"role": "user", "content": f"{i}: {question}"}, {"role": "assistant", "content": answer}]
            }
            out.write(json.dumps(row) + "\n")


def vm_hwm() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def vm_rss() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class AnonSampler:
    """The peak of this process's anonymous resident memory (RssAnon), sampled every 50 ms."""

    def __init__(self):
        import threading

        self.start = self.peak = rss_anon()
        self.running = True
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        while self.running:
            self.peak = max(self.peak, rss_anon())
            time.sleep(0.05)

    def stop(self):
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, rss_anon())


def rss_anon() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


def cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def tokenizer_baseline(args: argparse.Namespace) -> None:
    """The tokenizer alone on the rows' text, in batches of 1000, one thread: the
    throughput a preparation is measured against."""
    from l1ra_lite.models import ModelSource, embedded_model_dir, load_tokenizer

    tokenizer = load_tokenizer(ModelSource(name="smollm2", path=str(embedded_model_dir())))
    with open(args.data, encoding="utf-8") as handle:
        texts = ["\n".join(m["content"] for m in json.loads(line)["messages"]) for line in handle]
    started, cpu_started = time.perf_counter(), cpu_seconds()
    tokens = 0
    for i in range(0, len(texts), 1000):
        tokens += sum(len(ids) for ids in tokenizer(texts[i : i + 1000], add_special_tokens=False)["input_ids"])
    seconds, cpu = time.perf_counter() - started, cpu_seconds() - cpu_started
    print(
        json.dumps(
            {
                "rows": args.rows,
                "tokenizer_only_seconds": round(seconds, 2),
                "cpu_seconds": round(cpu, 2),
                "tokens": tokens,
            }
        ),
        flush=True,
    )


def measure(args: argparse.Namespace) -> None:
    """One preparation in this process; prints its figures as a JSON line."""
    from l1ra_lite.data import prepare_data
    from l1ra_lite.models import ModelSource, embedded_model_dir, load_tokenizer

    tokenizer = load_tokenizer(ModelSource(name="smollm2", path=str(embedded_model_dir())))
    tokenizer("warm up")
    baseline = vm_rss()
    with open("/proc/self/clear_refs", "w") as clear_refs:  # the peak from here on
        clear_refs.write("5")
    wanted = dict(num_proc=args.num_proc, cache_dir=args.cache_dir)
    accepted = inspect.signature(prepare_data).parameters
    extra = {k: v for k, v in wanted.items() if k in accepted}
    sampler = AnonSampler()
    started, cpu_started = time.perf_counter(), cpu_seconds()
    splits = prepare_data(args.data, tokenizer, args.seq_len, args.packing, 0.0, 0, 42, **extra)
    first = splits.train[0]["input_ids"][:4]  # read one example: the data is usable
    seconds = time.perf_counter() - started
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    cpu = cpu_seconds() - cpu_started
    sampler.stop()
    print(
        json.dumps(
            {
                "rows": args.rows,
                "num_proc": extra.get("num_proc", 1),
                "packing": args.packing,
                "seconds": round(seconds, 2),
                "cpu_seconds": round(cpu, 2),  # this process and its workers: steadier than wall time on a busy machine
                "peak_rss_gib": round(vm_hwm() / 2**30, 3),
                "peak_above_tokenizer_gib": round((vm_hwm() - baseline) / 2**30, 3),
                "tokenizer_rss_gib": round(baseline / 2**30, 3),
                # RSS counts the pages of the memory-mapped Arrow files read so far (the
                # kernel drops them at will); the process's own memory is the anonymous part
                "peak_anon_above_start_gib": round((sampler.peak - sampler.start) / 2**30, 3),
                "worker_peak_rss_gib": round(children / 2**30, 3),
                "train_examples": len(splits.train),
                "first_ids": list(first),
            }
        ),
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=20000)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--packing", action="store_true")
    parser.add_argument("--num-proc", type=int, default=1)
    parser.add_argument(
        "--workdir", default=None, help="where the JSONL file and the cache go (default: a temp folder)"
    )
    parser.add_argument("--again", action="store_true", help="prepare a second time (the cached start)")
    parser.add_argument("--baseline", action="store_true", help="time the tokenizer alone on the same text")
    parser.add_argument("--_measure", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--cache-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._measure:
        tokenizer_baseline(args) if args.baseline else measure(args)
        return
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="data-scale-"))
    workdir.mkdir(parents=True, exist_ok=True)
    data = workdir / f"chat-{args.rows}.jsonl"
    if not data.exists():
        write_rows(data, args.rows)
    cache = workdir / "cache"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAYON_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, __file__, "--_measure", "--rows", str(args.rows), "--seq-len", str(args.seq_len)]
    command += ["--num-proc", str(args.num_proc), "--data", str(data), "--cache-dir", str(cache)]
    command += ["--packing"] * args.packing + ["--baseline"] * args.baseline
    for _ in range(2 if args.again and not args.baseline else 1):
        subprocess.run(command, env=env, check=True)


if __name__ == "__main__":
    main()
