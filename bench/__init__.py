"""Benchmarks of l1ra-lite against stock peft LoRA and AdaLoRA (not part of the package)."""
