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
        dtype_help="hf: f32|f16|bf16 (default f16); gguf: f32|f16|bf16|q8_0 (default f16), or "
        "q4_k_m|q5_k_m|q6_k|q4_0|q5_0 through llama.cpp's quantiser (needs pip install 'l1ra-lite[gguf]'); "
        "gguf-lora: f32|f16 (default f32)",
    )
    parser.add_argument(
        "--keep-f16",
        action="store_true",
        help="with a llama.cpp-quantised --dtype: also keep the f16 GGUF it is made from "
        "(model-f16.gguf, or <--out name>-f16.gguf)",
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
    from l1ra_lite.export.gguf_quantize import LLAMA_CPP_DTYPES, require_llama_cpp
    from l1ra_lite.finished_run import read_run

    dtype = args.dtype or DEFAULT_DTYPES[args.format]
    quantized = args.format == "gguf" and dtype in LLAMA_CPP_DTYPES
    keep_f16 = args.keep_f16
    if keep_f16 and not quantized:
        raise UserError(f"--keep-f16 goes with --format gguf --dtype {'|'.join(LLAMA_CPP_DTYPES)}")
    if quantized:
        require_llama_cpp(dtype)  # before reading anything
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
    elif quantized:
        from l1ra_lite.export.gguf_quantize import export_quantized_gguf, f16_path_for

        f16 = f16_path_for(out, default_name=not args.out) if keep_f16 else None
        done = export_quantized_gguf(run_info, out, dtype, args.merge_into, args.overwrite, keep_f16=f16)
        size = f"{mib(done.bytes)}, {done.bytes / done.f16_bytes:.2f} x the f16 GGUF's {mib(done.f16_bytes)}"
        print(f"wrote {done.path}  ({size}; llama-cli -m {done.path})")
        print("  tensor types: " + ", ".join(f"{n} {name}" for name, n in done.types.items()))
        if done.f16_path:
            print(f"wrote {done.f16_path}  (the f16 GGUF it was quantised from)")
        print(f"wrote {done.modelfile}  (ollama create my-model -f {done.modelfile})")
    else:
        from l1ra_lite.export.gguf_model import export_gguf

        gguf_path, modelfile = export_gguf(
            run_info, out, dtype=dtype, merge_into=args.merge_into, overwrite=args.overwrite
        )
        print(f"wrote {gguf_path}  ({mib(gguf_path.stat().st_size)}; llama-cli -m {gguf_path})")
        print(f"wrote {modelfile}  (ollama create my-model -f {modelfile})")
    return 0


def mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"
