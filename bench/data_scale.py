"""How long data preparation takes and how much memory it needs, at a given number of rows.

    python bench/data_scale.py --rows 20000                 # first preparation
    python bench/data_scale.py --rows 20000 --again         # and a second one (a cache hit)
    python bench/data_scale.py --rows 100000 --num-proc 2
    python bench/data_scale.py --rows 1000000 --num-proc 2 --first-step  # + finetune's 1st step on the cache, a resume
    python bench/data_scale.py --rows 20000 --stream-steps 10000        # finetune --streaming's memory

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
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

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
    # finetune's defaults for the held-out rows (5%, at most 200, seed 42): the cache written
    # here is the one `finetune --data-cache` finds (--first-step)
    splits = prepare_data(args.data, tokenizer, args.seq_len, args.packing, 0.05, 200, 42, **extra)
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


def save_tiny_model(folder: Path, tokenizer_dir: Optional[Path]) -> Path:
    """A tiny random Llama (tests/tiny.py's shape) for timing what comes before and around
    a training step, not the step: with `tokenizer_dir` (the embedded SmolLM2 folder) its
    tokenizer, so the data cache of a --rows preparation matches; else tests/tiny.py's."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from transformers import AutoTokenizer

    from tests.tiny import build_tokenizer, tiny_llama

    if (folder / "config.json").is_file():
        return folder
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir) if tokenizer_dir else build_tokenizer()
    tiny_llama(0, vocab_size=len(tokenizer), max_position_embeddings=1024).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


class Finetune:
    """`l1ra-lite finetune ... --plain` as a child process, its lines timed as they come,
    its resident memory (VmRSS) sampled every 0.2 s with the step it was at."""

    def __init__(self, arguments: list[str], env: dict, samples: Optional[Path] = None):
        import threading

        self.started = time.perf_counter()
        command = [sys.executable, "-m", "l1ra_lite", "finetune", *arguments, "--plain"]
        self.process = subprocess.Popen(
            command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
        )
        self.step, self.rss = 0, []  # (seconds, step, bytes)
        self.lines: list[tuple[float, str]] = []
        self.samples = open(samples, "w") if samples else None  # "seconds step bytes" lines, as they come
        self.sampler = threading.Thread(target=self.sample, daemon=True)
        self.sampler.start()

    def sample(self) -> None:
        while self.process.poll() is None:
            try:
                with open(f"/proc/{self.process.pid}/status") as status:
                    for line in status:
                        if line.startswith("VmRSS:"):
                            self.rss.append(
                                (time.perf_counter() - self.started, self.step, int(line.split()[1]) * 1024)
                            )
                            if self.samples:
                                self.samples.write("%.1f %d %d\n" % self.rss[-1])
                                self.samples.flush()
            except OSError:
                return
            time.sleep(0.2)

    def lines_until(self, prefix: str) -> Optional[float]:
        """Reads lines until one starts with `prefix`: the seconds since the start, or None
        if the process ended first."""
        for line in self.process.stdout:
            seconds = time.perf_counter() - self.started
            self.lines.append((seconds, line.rstrip()))
            if line.startswith("step "):
                self.step = int(line.split()[1].split("/")[0])
            if line.startswith(prefix):
                return seconds
        return None

    def finish(self) -> int:
        self.lines_until("\0")
        code = self.process.wait()
        self.sampler.join()
        if code not in (0, 130):
            print("\n".join(text for _, text in self.lines[-20:]), file=sys.stderr)
        return code


def first_step(args: argparse.Namespace, data: Path, cache: Path, env: dict) -> None:
    """From the command to the end of the first training step, on the cache a preparation of
    the same rows left (run the --rows preparation first), then the same for a --resume.
    The model is tiny, so what is timed is the start: imports, model loading, the data."""
    from l1ra_lite.models import embedded_model_dir

    model = save_tiny_model(Path(args.workdir_path) / "tiny-smollm2-tokenizer", embedded_model_dir())
    run = Path(args.workdir_path) / "first-step-run"
    shutil.rmtree(run, ignore_errors=True)
    common = ["--quant", "none", "--seq-len", str(args.seq_len), "--batch-size", "1", "--grad-accum", "1"]
    common += ["--data-cache", str(cache), "--eval-every", "0", "--seed", "42"]
    common += ["--packing"] * args.packing
    started = Finetune(
        [
            "--model",
            str(model),
            "--data",
            str(data),
            "--output",
            str(run),
            "--max-steps",
            "3",
            "--save-every",
            "1",
            "--keep-checkpoints",
            "3",
        ]
        + common,
        env,
    )
    to_first_step = started.lines_until("step 1/")
    to_checkpoint = started.lines_until("checkpoint step 1")
    started.finish()
    config = json.loads((run / "config.json").read_text()) if (run / "config.json").is_file() else {}
    # a tiny model's steps outrun a stop signal: the resume starts from step 1's checkpoint,
    # as it would after a stop there (3 steps: the resumed step 2 is not the last, which evaluates)
    for later in ("checkpoint-2", "checkpoint-3"):
        shutil.rmtree(run / later, ignore_errors=True)
    (run / "latest").write_text(json.dumps({"checkpoint": "checkpoint-1", "step": 1}))
    resumed = Finetune(["--resume", str(run)], env)
    to_resumed_step = resumed.lines_until("step 2/")
    resumed.finish()
    with open(Path(args.workdir_path) / "first-step.log", "w") as log:  # every line, with its time
        for name, child in (("first", started), ("resume", resumed)):
            log.writelines(f"{name} {seconds:8.2f} {text}\n" for seconds, text in child.lines)
    stats = config.get("data_stats", {})
    print(
        json.dumps(
            {
                "rows": args.rows,
                "cache_hit": stats.get("cache_hit"),
                "prepare_s": stats.get("prepare_s") and round(stats["prepare_s"], 2),
                "seconds_to_first_step": to_first_step and round(to_first_step, 2),
                "seconds_to_first_checkpoint": to_checkpoint and round(to_checkpoint, 2),
                "resume_seconds_to_first_step": to_resumed_step and round(to_resumed_step, 2),
                "peak_rss_gib": round(max(b for _, _, b in started.rss) / 2**30, 3) if started.rss else None,
                "resume_peak_rss_gib": round(max(b for _, _, b in resumed.rss) / 2**30, 3) if resumed.rss else None,
            }
        ),
        flush=True,
    )


def streaming_memory(args: argparse.Namespace, data: Path, env: dict) -> None:
    """`finetune --streaming` on tests/tiny.py's model and tokenizer for --stream-steps
    steps over the rows file: its resident memory from the first step to the last."""
    model = save_tiny_model(Path(args.workdir_path) / "tiny", None)
    run = Path(args.workdir_path) / "streaming-run"
    shutil.rmtree(run, ignore_errors=True)
    arguments = ["--model", str(model), "--data", str(data), "--output", str(run), "--streaming"]
    arguments += ["--max-steps", str(args.stream_steps), "--quant", "none", "--seq-len", str(args.seq_len)]
    arguments += ["--batch-size", "1", "--grad-accum", "1", "--eval-every", "0", "--save-every", "0"]
    arguments += ["--log-every", "10", "--eval-max-rows", "20"]
    run_ = Finetune(arguments, env, Path(args.workdir_path) / "streaming-rss.txt")
    run_.lines_until(f"step {args.stream_steps}/")
    code = run_.finish()
    in_steps = [(s, step, b) for s, step, b in run_.rss if step >= 1]
    if not in_steps:
        raise SystemExit(f"no step reached (exit {code})")
    at = {}
    for _, step, b in in_steps:
        at.setdefault(step, b)
    marks = sorted(at)
    print(
        json.dumps(
            {
                "streaming_steps": args.stream_steps,
                "seconds": round(in_steps[-1][0], 1),
                "rss_first_step_gib": round(in_steps[0][2] / 2**30, 3),
                "rss_last_step_gib": round(in_steps[-1][2] / 2**30, 3),
                "rss_peak_gib": round(max(b for _, _, b in in_steps) / 2**30, 3),
                "rss_min_gib": round(min(b for _, _, b in in_steps) / 2**30, 3),
                # the first sample at each logged step (every --log-every steps)
                "rss_by_step_gib": {str(m): round(at[m] / 2**30, 3) for m in marks[:: max(1, len(marks) // 10)]},
                "exit": code,
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
    parser.add_argument(
        "--first-step",
        action="store_true",
        help="then time `finetune` on a tiny model to its first step on the cache, and its --resume",
    )
    parser.add_argument("--skip-prepare", action="store_true", help="no preparation (the cache is there already)")
    parser.add_argument(
        "--stream-steps",
        type=int,
        default=0,
        help="only: `finetune --streaming` on tests/tiny.py's model for this many steps, its memory over them",
    )
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
    args.workdir_path = workdir
    if args.stream_steps:
        streaming_memory(args, data, env)
        return
    if not args.skip_prepare:
        for _ in range(2 if args.again and not args.baseline else 1):
            subprocess.run(command, env=env, check=True)
    if args.first_step and not args.baseline:
        first_step(args, data, cache, env)


if __name__ == "__main__":
    main()
