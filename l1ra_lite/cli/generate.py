"""`l1ra-lite generate RUN_DIR [--prompt ...] [--system ...]`: try the fine-tuned adapter before exporting."""

from __future__ import annotations

import argparse

HELP = "answer a prompt (or chat) with the run's adapter on its base model, through the chat template"


def add_chat_arguments(parser: argparse.ArgumentParser) -> None:
    """The options `generate` and its alias `chat` share."""
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a finished run folder (with adapter/)")
    parser.add_argument(
        "--system", default=None, help="a system message put before the conversation (default: the template's own)"
    )
    parser.add_argument("--max-new-tokens", type=int, default=256, help="answer length limit in tokens (default 256)")
    parser.add_argument("--temperature", type=float, default=0.7, help="sampling temperature; 0 = greedy (default 0.7)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_chat_arguments(parser)
    parser.add_argument(
        "--prompt", default=None, help="one user message; without it, an interactive chat (empty line or EOF ends it)"
    )


def run(args: argparse.Namespace) -> int:
    import sys

    from l1ra_lite.finished_run import read_run
    from l1ra_lite.generate import chat_loop, check_system_message, generate_reply, load_for_generation

    run_info = read_run(args.run_dir)
    model, tokenizer = load_for_generation(run_info)
    opening = [{"role": "system", "content": args.system}] if args.system is not None else []
    check_system_message(tokenizer, opening)  # a template that refuses it says so before the chat starts

    def answer(messages):
        return generate_reply(model, tokenizer, messages, args.max_new_tokens, args.temperature)

    if args.prompt is not None:
        print(answer(opening + [{"role": "user", "content": args.prompt}]).text)
    else:
        chat_loop(answer, sys.stdin, sys.stdout, opening)
    return 0
