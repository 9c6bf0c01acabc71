"""`l1ra-lite` command line: one module per subcommand under l1ra_lite/cli/.

Each subcommand module defines `HELP` (one line), `add_arguments(parser)` and
`run(args) -> int`. Modules import heavy libraries (torch, transformers) inside `run`,
so that `--help` and `--version` answer at once.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Optional

from l1ra_lite import __version__
from l1ra_lite.errors import UserError
from l1ra_lite.models import configure_cuda_allocator, hide_bitsandbytes_kernels_notice

# Order here is the order in `l1ra-lite --help`.
COMMANDS = [
    "finetune",
    "inspect",
    "export",
    "merge",  # = export --format hf
    "generate",
    "chat",  # = generate without --prompt
    "estimate",
    "recipes",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="l1ra-lite",
        description="Fine-tune a 4-bit base model with L1RA adapters on one GPU.",
    )
    parser.add_argument("--version", action="version", version=f"l1ra-lite {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        module = importlib.import_module(f"l1ra_lite.cli.{name}")
        command = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(command)
        command.set_defaults(run=module.run)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    # Process-wide set-up, before any subcommand imports torch or bitsandbytes: the CUDA
    # allocator reads its settings once, when it starts.
    configure_cuda_allocator()
    hide_bitsandbytes_kernels_notice()
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(args.run(args) or 0)
    except UserError as err:
        print(f"l1ra-lite {args.command}: error: {err}", file=sys.stderr)
        if err.end_at_once:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(err.exit_code)
        return err.exit_code
