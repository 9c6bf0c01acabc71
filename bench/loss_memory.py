"""Memory of the loss: transformers' causal-LM loss against l1ra_lite.loss (chunked).

    python bench/loss_memory.py                  # Llama-3's 128K vocabulary, 2048 tokens
    python bench/loss_memory.py --vocab 32768    # Mistral's

A one-layer model with a large vocabulary (the loss's memory depends on the vocabulary
and the number of tokens, not on the depth) runs one forward and backward pass with each
loss, each in its own process; the figure is the process's resident high-water mark
above what the model and the batch hold (CPU) or torch's peak allocation above the same
(CUDA). Prints a table and writes JSON with --json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

GIB = 1 << 30
LOSSES = ("transformers", "chunked")


def _high_water_bytes() -> int:
    """This process's resident high-water mark (Linux VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only on the CPU)")


def measure(loss_name: str, vocab: int, hidden: int, tokens: int, labelled: float, device: str) -> int:
    """Peak bytes of one forward + backward with `loss_name`, above model and batch."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from l1ra_lite.loss import causal_lm_loss

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=1,
        num_attention_heads=max(1, hidden // 64),
        vocab_size=vocab,
        tie_word_embeddings=False,
    )
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = LlamaForCausalLM(config).to(device=device, dtype=dtype)
    model.model.embed_tokens.requires_grad_(False)
    model.lm_head.requires_grad_(False)  # frozen head, trained layer: as with adapters
    ids = torch.randint(0, vocab, (1, tokens), device=device)
    labels = ids.clone()
    labels[:, : int(tokens * (1 - labelled))] = -100  # answer-only: the prompt has no labels
    batch = {"input_ids": ids, "labels": labels}
    if device == "cuda":
        torch.cuda.synchronize()
        start = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        start = _high_water_bytes()
    with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
        loss = model(**batch).loss if loss_name == "transformers" else causal_lm_loss(model, batch)
    loss.backward()
    if device == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - start
    return _high_water_bytes() - start


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--hidden", type=int, default=256, help="width of the one layer (the head is vocab x hidden)")
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--labelled", type=float, default=1.0, help="share of the tokens that have a label")
    p.add_argument("--device", default="cuda" if _cuda() else "cpu")
    p.add_argument("--json", type=Path, help="also write the figures here")
    p.add_argument("--child", choices=LOSSES, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    settings = (args.vocab, args.hidden, args.tokens, args.labelled, args.device)
    if args.child:  # one measurement in this fresh process
        print(measure(args.child, *settings))
        return 0
    figures = {}
    for name in LOSSES:
        cmd = [
            sys.executable,
            __file__,
            "--child",
            name,
            "--vocab",
            str(args.vocab),
            "--hidden",
            str(args.hidden),
            "--tokens",
            str(args.tokens),
            "--labelled",
            str(args.labelled),
            "--device",
            args.device,
        ]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode:
            print(f"loss_memory: the {name} measurement failed:\n{out.stderr[-2000:]}", file=sys.stderr)
            return 1
        figures[name] = int(out.stdout.split()[-1])
    logits = args.tokens * args.vocab
    print(f"loss memory, vocab {args.vocab}, {args.tokens} tokens ({args.labelled:.0%} labelled), {args.device}:")
    for name, value in figures.items():
        print(f"  {name:12s} {value / GIB:6.2f} GiB  ({value / logits:5.2f} bytes a logit of the whole batch)")
    print(f"  chunked / transformers: {figures['chunked'] / figures['transformers']:.3f}")
    if args.json:
        args.json.write_text(json.dumps({"settings": vars(args), "peak_bytes": figures}, indent=1, default=str))
    return 0


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    raise SystemExit(main())
