"""`l1ra-lite chat RUN_DIR`: an interactive chat with the run's model, the name people
look for; the same as `generate` without --prompt."""

from __future__ import annotations

import argparse

from l1ra_lite.cli import generate

HELP = "chat with the run's adapter on its base model (= generate without --prompt; an empty line ends it)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    generate.add_chat_arguments(parser)
    parser.set_defaults(prompt=None)


def run(args: argparse.Namespace) -> int:
    return generate.run(args)
