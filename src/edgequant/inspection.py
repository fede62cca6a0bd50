"""`inspect`: what a model is, how big it is, and how big each precision would make it."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from edgequant.safetensors_info import TensorInfo, read_header

_EMBEDDING_MARKERS = ("embed_tokens", "wte", "word_embeddings", "lm_head", "embed_out")


def weight_tensors(hf_dir: Path) -> list[TensorInfo]:
    return [t for f in sorted(hf_dir.glob("*.safetensors")) for t in read_header(f)]


def weight_dtype(hf_dir: Path) -> str:
    """The dtype holding most parameters (safetensors names: F32, BF16, F16, ...)."""
    counts = Counter()
    for tensor in weight_tensors(hf_dir):
        counts[tensor.dtype] += tensor.numel
    return counts.most_common(1)[0][0]


def tokenizer_kind(hf_dir: Path) -> str:
    tokenizer_json = hf_dir / "tokenizer.json"
    if tokenizer_json.is_file():
        model = json.loads(tokenizer_json.read_text()).get("model", {})
        kind = model.get("type", "unknown")
        return f"{kind} (tokenizers){' + sentencepiece model' if (hf_dir / 'tokenizer.model').is_file() else ''}"
    if (hf_dir / "tokenizer.model").is_file():
        return "sentencepiece"
    return "none"


def inspect_model(model: str | Path | None = None) -> dict:
    """Describe a source model; the estimated sizes cover every precision of every backend."""
    from edgequant.backends import format_names, get_backend
    from edgequant.source import DEFAULT_MODEL_CAVEAT, load_source

    source = load_source(model)
    config, tensors = source.config, weight_tensors(source.hf_dir)
    total = sum(t.numel for t in tensors)
    embedding = sum(t.numel for t in tensors if any(m in t.name for m in _EMBEDDING_MARKERS))
    size_on_disk = source.path.stat().st_size if source.kind == "gguf" else sum(f.stat().st_size for f in source.hf_dir.glob("*.safetensors"))
    info = {
        "model": str(source.path),
        "kind": source.kind,
        "fingerprint": source.fingerprint,
        "architecture": (config.get("architectures") or [config.get("model_type")])[0],
        "model_type": config.get("model_type"),
        "layers": config.get("num_hidden_layers"),
        "hidden_size": config.get("hidden_size"),
        "heads": config.get("num_attention_heads"),
        "kv_heads": config.get("num_key_value_heads", config.get("num_attention_heads")),
        "vocab_size": config.get("vocab_size"),
        "context_length": config.get("max_position_embeddings"),
        "tied_embeddings": bool(config.get("tie_word_embeddings", False)),
        "parameters": total,
        "embedding_parameters": embedding,
        "dtype": weight_dtype(source.hf_dir),
        "size_bytes": size_on_disk,
        "tokenizer": tokenizer_kind(source.hf_dir),
        "estimated_bytes": {},
    }
    if source.kind == "gguf":
        info["gguf_tensor_types"] = json.loads((source.hf_dir / "edgequant-import.json").read_text())["gguf_tensor_types"]
    if source.is_default_model:
        info["caveat"] = DEFAULT_MODEL_CAVEAT
    for fmt in format_names():
        backend = get_backend(fmt)
        for name in backend.precisions:
            info["estimated_bytes"][f"{fmt}:{name}"] = backend.estimated_bytes(name, tensors, info["tied_embeddings"])
    return info
