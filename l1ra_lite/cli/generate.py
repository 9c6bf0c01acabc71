"""`l1ra-lite generate RUN_DIR [--prompt ...]`: try the fine-tuned adapter before exporting."""

from __future__ import annotations

import argparse

HELP = "answer a prompt (or chat) with the run's adapter on its base model, through the chat template"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a finished run folder (with adapter/)")
    parser.add_argument(
        "--prompt", default=None, help="one user message; without it, an interactive chat (empty line or EOF ends it)"
    )
    parser.add_argument("--max-new-tokens", type=int, default=256, help="answer length limit in tokens (default 256)")
    parser.add_argument("--temperature", type=float, default=0.7, help="sampling temperature; 0 = greedy (default 0.7)")


def run(args: argparse.Namespace) -> int:
    import sys

    from l1ra_lite.finished_run import read_run
    from l1ra_lite.generate import chat_loop, generate_reply, load_for_generation

    run_info = read_run(args.run_dir)
    model, tokenizer = load_for_generation(run_info)

    def answer(messages):
        return generate_reply(model, tokenizer, messages, args.max_new_tokens, args.temperature)

    if args.prompt is not None:
        print(answer([{"role": "user", "content": args.prompt}]).text)
    else:
        chat_loop(answer, sys.stdin, sys.stdout)
    return 0
