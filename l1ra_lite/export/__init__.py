"""Merge a finished run's adapter into its base model and write it out.

The finished run is read by l1ra_lite.finished_run (config.json + adapter/, the base
weights). Modules here, in the order data flows through them:
- lora: the run's peft LoRA adapter and each module's delta.
- merge: stream the base weights tensor by tensor, NF4 round trip, add the deltas.
- hf: a merged safetensors folder ("GGUF-ready", loads with transformers).
- llama_gguf: what llama.cpp expects from llama-family models (names, q/k permutation).
- gguf_lora: the adapter alone as a GGUF LoRA file (llama.cpp --lora).
- gguf_vocab, gguf_model: the whole merged model as one GGUF file.
- modelfile: the Ollama Modelfile that goes next to it.
- output: never overwrite by accident (written aside and renamed: l1ra_lite.atomic).
"""
