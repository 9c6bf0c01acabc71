"""`--format gguf-lora`: the adapter alone as a GGUF LoRA file for llama.cpp's `--lora`.

Per module: `<gguf weight name>.lora_a` = A (r_i x in) and `.lora_b` = B (out x r_i),
B of q/k permuted like the q/k weights. One global `adapter.lora.alpha`: llama.cpp
computes the scale alpha / r_i per tensor from lora_a's rank, which is peft's scale.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from l1ra_lite.errors import UserError
from l1ra_lite.export.llama_gguf import GGUF_LORA_ARCHS, layout_for
from l1ra_lite.export.lora import read_adapter
from l1ra_lite.export.output import atomic_path
from l1ra_lite.finished_run import RunInfo

LORA_DTYPES = {"f32": np.float32, "f16": np.float16}


def export_gguf_lora(run: RunInfo, out: Path, dtype: str = "f32", overwrite: bool = False) -> Path:
    """Write the run's adapter as a GGUF LoRA file at `out` and return it."""
    import gguf

    if dtype not in LORA_DTYPES:
        raise UserError(f"--dtype for --format gguf-lora must be one of {', '.join(LORA_DTYPES)} (got {dtype!r})")
    base_config = json.loads((run.base_dir / "config.json").read_text(encoding="utf-8"))
    layout = layout_for(base_config, run.model_type, GGUF_LORA_ARCHS)
    adapter = read_adapter(run.adapter_dir)
    with atomic_path(out, overwrite) as temp:
        writer = gguf.GGUFWriter(str(temp), layout.arch)
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, adapter.alpha)
        writer.add_name(f"{run.run_dir.name} (l1ra-lite LoRA)")
        for module in sorted(adapter.A, key=_module_order):
            name = layout.tensor_name(f"{module}.weight")
            a = adapter.A[module].float().numpy()
            b = layout.to_gguf_rows(module, adapter.B[module].float().numpy())
            writer.add_tensor(f"{name}.lora_a", np.ascontiguousarray(a, dtype=LORA_DTYPES[dtype]))
            writer.add_tensor(f"{name}.lora_b", np.ascontiguousarray(b, dtype=LORA_DTYPES[dtype]))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return out


def _module_order(module: str):
    """Layer by layer, then by name, so the file reads in model order."""
    parts = module.split(".")
    layer = next((int(p) for p in parts if p.isdigit()), -1)
    return layer, module
