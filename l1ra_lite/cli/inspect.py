"""`l1ra-lite inspect RUN_DIR`: where did the rank go?"""

from __future__ import annotations

import argparse
import json
import sys

HELP = "Show where the rank went in a run (or an adapter folder): totals, by type and layer, heat map, history."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a run folder (with ranks.json) or a LoRA adapter folder")
    parser.add_argument(
        "--png",
        metavar="FILE",
        help="also write the heat map, the rank-over-time plot and the loss / eval loss curves as a PNG "
        "(needs matplotlib: pip install 'l1ra-lite[plot]'); never overwrites FILE",
    )
    parser.add_argument("--json", action="store_true", help="print the summary as JSON instead of tables")


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from l1ra_lite.ui.inspect import read_loss_curves, render_summary, summarize, write_png

    summary = summarize(args.run_dir)
    if args.png:
        write_png(summary, args.png, read_loss_curves(args.run_dir))
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        Console().print(render_summary(summary))
    if args.png:
        # On stderr, so that `--json` output stays parseable.
        print(f"wrote {args.png}", file=sys.stderr)
    return 0
