"""`--format gguf --dtype q4_k_m` (q5_k_m, q6_k, q4_0, q5_0): the file people run on a
consumer card, in one command.

The gguf package quantises only the legacy types, and its Q4_0 / Q5_0 are not the
k-quants people ask for; llama.cpp's own quantiser (`llama_model_quantize`, reached
through llama-cpp-python, the optional `gguf` extra) writes them all, with its mixes
(Q4_K_M keeps some tensors at Q6_K) and its fallbacks for rows that are not whole
256-value blocks. So: write the f16 GGUF as for `--dtype f16`, quantise it, and keep
the f16 file only when asked (--keep-f16).
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import sys
import tempfile
from collections import Counter
from contextlib import contextmanager, redirect_stderr
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

from l1ra_lite.errors import UserError

# --dtype -> llama.cpp's llama_ftype constant (names in llama_cpp)
LLAMA_CPP_FTYPES = {
    "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
    "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
    "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K",
    "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
    "q5_0": "LLAMA_FTYPE_MOSTLY_Q5_0",
}
LLAMA_CPP_DTYPES = tuple(LLAMA_CPP_FTYPES)
INSTALL_HINT = "pip install 'l1ra-lite[gguf]' (or: make install-gguf; it compiles llama.cpp, a few minutes)"


@dataclass
class QuantizedExport:
    path: Path
    modelfile: Path
    bytes: int
    f16_bytes: int  # the f16 GGUF it was made from
    f16_path: Optional[Path]  # where that file was kept (--keep-f16), else None
    types: dict[str, int]  # tensor type -> how many tensors have it


def require_llama_cpp(dtype: str) -> None:
    """Before any work: one line saying what to install when llama-cpp-python is missing."""
    if importlib.util.find_spec("llama_cpp") is None:
        raise UserError(f"--dtype {dtype} is quantised by llama.cpp, through llama-cpp-python: {INSTALL_HINT}")


def quantize(src: Path, dst: Path, dtype: str) -> None:
    """llama.cpp's quantiser, on all cores, from the f16 GGUF `src` to `dst`."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, LLAMA_CPP_FTYPES[dtype])
    params.nthread = os.cpu_count() or 1
    # llama.cpp writes a few lines per tensor to the process's stderr, from C: they go to a
    # file, shown only if the quantiser fails. What they would tell (the fallbacks to other
    # types) is in tensor_types(dst).
    with tempfile.TemporaryFile() as log, _stderr_to(log):
        status = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
        log.seek(0)
        lines = log.read().decode(errors="replace").strip().splitlines()
    if status != 0:
        last = lines[-1] if lines else "no message"
        # Most causes lie outside l1ra-lite (disk full, a folder not writable): one line.
        raise UserError(f"llama.cpp could not quantise the f16 GGUF to {dtype} (status {status}): {last}")


@contextmanager
def _stderr_to(file) -> Iterator[None]:
    """Send stderr to `file` for the block: file descriptor 2, which C code writes to, and
    sys.stderr, which llama-cpp-python's log callback prints to (they differ under pytest
    or in a notebook)."""
    sys.stderr.flush()
    saved = os.dup(2)
    text = open(file.fileno(), "w", closefd=False)
    try:
        os.dup2(file.fileno(), 2)
        with redirect_stderr(text):
            yield
    finally:
        text.flush()
        os.dup2(saved, 2)
        os.close(saved)


def tensor_types(path: Path) -> dict[str, int]:
    """How many tensors of each type a GGUF file holds, most first. llama.cpp falls back to
    other types where a row is not a whole number of blocks (k-quants: 256 values)."""
    import gguf

    counts = Counter(t.tensor_type.name for t in gguf.GGUFReader(path).tensors)
    return dict(counts.most_common())


def f16_path_for(out: Path, default_name: bool) -> Path:
    """Where --keep-f16 keeps the f16 file: model-f16.gguf next to a default-named target
    (what `--dtype f16` writes), else <target name>-f16.gguf next to it."""
    return out.with_name("model-f16.gguf") if default_name else out.with_name(f"{out.stem}-f16.gguf")


def export_quantized_gguf(
    run,
    out: Path,
    dtype: str,
    merge_into: Optional[str] = None,
    overwrite: bool = False,
    keep_f16: Optional[Path] = None,
) -> QuantizedExport:
    """The merged model quantised by llama.cpp to `out`, with its Modelfile; the f16 GGUF
    it is made from is kept at `keep_f16` when given, else removed."""
    from l1ra_lite.export.gguf_model import modelfile_path, write_gguf
    from l1ra_lite.export.modelfile import write_modelfile
    from l1ra_lite.export.output import atomic_path, check_target

    require_llama_cpp(dtype)
    modelfile = modelfile_path(out)
    for target in (out, modelfile) + ((keep_f16,) if keep_f16 else ()):
        check_target(target, overwrite)
    # Without --keep-f16 the f16 file is a hidden sibling of the target, removed at the end.
    f16 = keep_f16 or out.with_name(f".{out.stem}.f16-{os.getpid()}.gguf")
    try:
        write_gguf(run, f16, "f16", merge_into, overwrite=overwrite or keep_f16 is None)
        f16_bytes = f16.stat().st_size
        with atomic_path(out, overwrite) as temp:
            quantize(f16, temp, dtype)
    finally:
        if keep_f16 is None:
            f16.unlink(missing_ok=True)
    write_modelfile(modelfile, out.name, run.tokenizer_dir, overwrite)
    return QuantizedExport(out, modelfile, out.stat().st_size, f16_bytes, keep_f16, tensor_types(out))
