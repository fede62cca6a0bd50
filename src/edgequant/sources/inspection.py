"""`inspect`: what a model is, how big it is, and how big each precision would make it."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

_EMBEDDING_MARKERS = ("embed_tokens", "wte", "word_embeddings", "lm_head", "embed_out")


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
    from edgequant.sources.source import DEFAULT_MODEL_CAVEAT, load_source
    from edgequant.sources.tasks import TEXT_GENERATION

    source = load_source(model)
    if source.kind in ("module", "onnx"):
        return _inspect_graph_model(source)
    config, tensors = source.config, source.tensors
    total = sum(t.numel for t in tensors)
    embedding = sum(t.numel for t in tensors if any(m in t.name for m in _EMBEDDING_MARKERS))
    size_on_disk = source.path.stat().st_size if source.kind == "gguf" else source.weights_bytes
    info = {
        "model": str(source.path),
        "kind": source.kind,
        "task": source.task,
        "fingerprint": source.fingerprint,
        "architecture": source.architecture,
        "model_type": config.get("model_type"),
        "layers": config.get("num_hidden_layers"),
        "hidden_size": config.get("hidden_size"),
        "heads": config.get("num_attention_heads"),
        "kv_heads": config.get("num_key_value_heads", config.get("num_attention_heads")),
        "vocab_size": config.get("vocab_size"),
        "context_length": config.get("max_position_embeddings"),
        "tied_embeddings": source.tied_embeddings,
        "parameters": total,
        "embedding_parameters": embedding,
        "dtype": source.weight_dtype,
        "size_bytes": size_on_disk,
        "tokenizer": tokenizer_kind(source.hf_dir),
        "estimated_bytes": {},
        "precisions": {},
    }
    if source.kind == "gguf":
        info["gguf_tensor_types"] = json.loads((source.hf_dir / "edgequant-import.json").read_text())["gguf_tensor_types"]
    if source.is_default_model:
        info["caveat"] = DEFAULT_MODEL_CAVEAT
    if source.task != TEXT_GENERATION:
        info["encoder"] = asdict(source.encoder)
    _estimates(info, source, tensors, info["tied_embeddings"])
    return info


def _estimates(info: dict, source, tensors, tied: bool) -> None:
    """The estimated size and class of every precision every format offers for the source's task."""
    from edgequant.registry import backends

    for fmt, backend in backends().items():
        for name in backend.precisions_for(source.task):
            precision = backend.precisions[name]
            info["estimated_bytes"][f"{fmt}:{name}"] = backend.estimated_bytes(name, tensors, tied)
            info["precisions"][f"{fmt}:{name}"] = {"class": precision.klass.value, "bpw": precision.bpw,
                                                   "needs_imatrix": precision.needs_imatrix}


def _inspect_graph_model(source) -> dict:
    """An image classifier: an .onnx file's inputs, outputs and op counts as its graph declares
    them; a module's as its description and state dict imply (nothing is exported or run). Any
    other ONNX graph is described too, with the reason no format takes it."""
    from edgequant.sources.vision import image_input_problem, weights_path

    tensors = source.tensors
    problem = image_input_problem(source.onnx_graph) if source.kind == "onnx" else None
    if problem:
        graph = source.onnx_graph
        return {"model": str(source.path), "kind": source.kind, "task": None, "not_convertible": problem,
                "fingerprint": source.fingerprint, "architecture": source.architecture, "inputs": graph.inputs,
                "outputs": graph.outputs, "ops": graph.ops, "opset": graph.opset, "parameters": sum(t.numel for t in tensors),
                "dtype": source.weight_dtype if tensors else None, "size_bytes": source.weights_bytes,
                "estimated_bytes": {}, "precisions": {}}
    info = {"model": str(source.path), "kind": source.kind, "task": source.task, "fingerprint": source.fingerprint,
            "architecture": source.architecture, "image": source.image.to_json(), "parameters": sum(t.numel for t in tensors),
            "dtype": source.weight_dtype, "estimated_bytes": {}, "precisions": {}}
    info["size_bytes"] = source.weights_bytes
    if source.kind == "onnx":
        graph = source.onnx_graph
        info.update(inputs=graph.inputs, outputs=graph.outputs, ops=graph.ops, opset=graph.opset)
    else:
        size, classes = source.image.size, next(t.shape[0] for t in reversed(tensors) if len(t.shape) == 2)
        info.update(inputs={"pixel_values": ["batch", 3, size, size]}, outputs={"logits": ["batch", classes]},
                    weights=str(weights_path(source.config, source.path)))
    _estimates(info, source, tensors, False)
    return info
