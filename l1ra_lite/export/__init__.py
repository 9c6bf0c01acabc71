"""Merge a finished run's adapter into its base model and write it out.

Modules, in the order data flows through them:
- run_folder: read a finished run folder (config.json + adapter/), find the base weights.
- lora: read the standard peft LoRA adapter and compute each module's delta.
- merge: stream the base weights tensor by tensor, NF4 round trip, add the deltas.
- hf: a merged safetensors folder ("GGUF-ready", loads with transformers).
- llama_gguf: what llama.cpp expects from llama-family models (names, q/k permutation).
- gguf_lora: the adapter alone as a GGUF LoRA file (llama.cpp --lora).
- gguf_vocab, gguf_model: the whole merged model as one GGUF file.
- modelfile: the Ollama Modelfile that goes next to it.
- output: write to a temporary path and rename, never overwrite by accident.
"""
