"""GGUF through llama.cpp: its reference converter, `llama_model_quantize` and llama-cpp-python."""
