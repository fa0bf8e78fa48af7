"""Take the model with you: merged safetensors, GGUF for llama.cpp (through llama.cpp's own converter) and an
Ollama Modelfile whose template and stop tokens match the chat template the model was trained on.

Modules, one job each: converter (fetch, pin and run llama.cpp's convert_hf_to_gguf.py), merged (LoRA merged into
the base, shared with the fine-tune step), chat_template (the template without training markers, its role
wrappers and end tokens), gotemplate (the Go-template subset the Modelfile uses, rendered for verification),
modelfile, gguf (convert, quantize, verify), files (space checks, write-verify-rename, sha256), pipeline (all of
it for a list of formats), checks (llama.cpp against transformers, for tests and reports).
"""
