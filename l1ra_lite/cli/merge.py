"""`l1ra-lite merge RUN_DIR`: the adapter merged into its base as a 16-bit model folder,
the name people look for; the same as `export --format hf`."""

from __future__ import annotations

import argparse

from l1ra_lite.cli import export

HELP = "merge the adapter into its base: a 16-bit model folder for transformers / vLLM (= export --format hf)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a finished run folder (with adapter/)")
    export.add_target_arguments(
        parser,
        out_help="target folder (default: RUN_DIR/export-hf/)",
        dtype_help="f32|f16|bf16 (default f16)",
    )
    parser.set_defaults(format="hf", keep_f16=False)


def run(args: argparse.Namespace) -> int:
    return export.run(args)
