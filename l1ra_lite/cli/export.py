"""`l1ra-lite export RUN_DIR --format hf|gguf-lora|gguf`: the fine-tuned model for other tools."""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "merge the adapter and write it for transformers / llama.cpp / Ollama (hf, gguf-lora, gguf)"

FORMATS = ("hf", "gguf-lora", "gguf")
DEFAULT_DTYPES = {"hf": "f16", "gguf-lora": "f32", "gguf": "f16"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a finished run folder (with adapter/)")
    parser.add_argument("--format", required=True, choices=FORMATS, help="what to write")
    add_target_arguments(
        parser,
        out_help="target path (default: inside the run folder: export-hf/, adapter.gguf, model-<dtype>.gguf)",
        dtype_help="hf: f32|f16|bf16 (default f16); gguf: f32|f16|bf16|q8_0 (default f16); "
        "gguf-lora: f32|f16 (default f32)",
    )


def add_target_arguments(parser: argparse.ArgumentParser, out_help: str, dtype_help: str) -> None:
    """The options `export` and its alias `merge` share."""
    parser.add_argument("--out", default=None, help=out_help)
    parser.add_argument("--dtype", default=None, help=dtype_help)
    parser.add_argument(
        "--merge-into",
        default=None,
        choices=("dequantized", "original"),
        help="merge into the dequantised NF4 weights the adapter was trained against "
        "(default for nf4 runs) or into the original 16-bit weights",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing target")


def default_out(run_dir: Path, fmt: str, dtype: str) -> Path:
    if fmt == "hf":
        return run_dir / "export-hf"
    if fmt == "gguf-lora":
        return run_dir / "adapter.gguf"
    return run_dir / f"model-{dtype}.gguf"


def run(args: argparse.Namespace) -> int:
    from l1ra_lite.errors import UserError
    from l1ra_lite.finished_run import read_run

    dtype = args.dtype or DEFAULT_DTYPES[args.format]
    run_info = read_run(args.run_dir)
    out = Path(args.out) if args.out else default_out(run_info.run_dir, args.format, dtype)
    if args.format == "gguf-lora" and args.merge_into is not None:
        raise UserError("--merge-into applies to hf and gguf; a gguf-lora file holds the adapter alone")
    if args.format == "hf":
        from l1ra_lite.export.hf import export_hf

        export_hf(run_info, out, dtype=dtype, merge_into=args.merge_into, overwrite=args.overwrite)
        print(f"wrote {out}  (load it with transformers, or: python convert_hf_to_gguf.py {out})")
    elif args.format == "gguf-lora":
        from l1ra_lite.export.gguf_lora import export_gguf_lora

        export_gguf_lora(run_info, out, dtype=dtype, overwrite=args.overwrite)
        print(f"wrote {out}  (llama-cli -m <base model>.gguf --lora {out})")
    else:
        from l1ra_lite.export.gguf_model import export_gguf

        gguf_path, modelfile = export_gguf(
            run_info, out, dtype=dtype, merge_into=args.merge_into, overwrite=args.overwrite
        )
        print(f"wrote {gguf_path}  (llama-cli -m {gguf_path})")
        print(f"wrote {modelfile}  (ollama create my-model -f {modelfile})")
    return 0
