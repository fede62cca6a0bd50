"""edgequant: convert, quantize, evaluate and serve models for edge devices.

The public API is re-exported lazily so that `import edgequant` stays fast: torch, llama.cpp and
the other engines load only when a function that needs them runs.
"""

import os
from importlib import import_module

# edgequant never downloads weights or data from a model hub: everything comes from local files
# and installed packages. Make transformers and huggingface_hub fail instead of reaching out.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

__version__ = "0.1.0"

_API = {
    "load_source": "edgequant.sources.source",
    "default_model_path": "edgequant.sources.source",
    "inspect_model": "edgequant.sources.inspection",
    "convert": "edgequant.conversion",
    "ConvertConfig": "edgequant.conversion",
    "open_artifact": "edgequant.artifact",
    "evaluate": "edgequant.measurement.evaluation",
    "evaluate_with_scores": "edgequant.measurement.evaluation",
    "EvalConfig": "edgequant.measurement.settings",
    "adapted_model": "edgequant.adaptation.merge",
    "safetensors_copy": "edgequant.sources.pickled",
    "finetune": "edgequant.adaptation.finetune",
    "FinetuneConfig": "edgequant.adaptation.finetune",
    "parse_spec": "edgequant.registry",
    "open_runner": "edgequant.registry",
    "EdgequantError": "edgequant.errors",
}

__all__ = sorted(_API) + ["__version__"]


def __getattr__(name: str):
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'edgequant' has no attribute {name!r}")
    return getattr(import_module(module), name)
