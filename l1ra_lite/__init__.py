"""l1ra-lite: single-GPU QLoRA fine-tuning with L1RA adapters (arXiv 2509.04884)."""

__version__ = "0.1.0"
