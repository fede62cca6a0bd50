"""The MLX engine: importing it with a clear error, loading an artifact, and where its speed
means something.

An artifact is loaded with mlx itself and mlx-lm's model definitions (`mlx_lm/models/*.py`),
imported as a package of their own. Importing them as `mlx_lm.models` would first run
`mlx_lm/__init__.py`, which imports transformers and with it torch (~400 MB of RSS measured
here): a cost no MLX app pays to run a model, and one that would be counted as the model's.
The files are mlx-lm's own, unchanged; conversion still goes through `mlx_lm.convert`.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import platform
import sys
from pathlib import Path

from edgequant.errors import EdgequantError

INSTALL_HINT = "pip install 'edgequant[mlx]' (on Linux it installs mlx[cpu] and mlx-lm 0.29.1)"
_MODELS_PACKAGE = "edgequant_mlx_lm_models"


def require_mlx():
    """The mlx modules, or an error naming the extra that installs them."""
    try:
        import mlx.core as mx
        import mlx_lm
    except ImportError as exc:
        raise EdgequantError(f"the MLX engine is not installed ({getattr(exc, 'name', None) or exc} is missing)",
                             INSTALL_HINT) from None
    return mx, mlx_lm


def is_apple_silicon() -> bool:
    return platform.system() == "Darwin" and platform.machine() == "arm64"


def model_module(model_type: str):
    """mlx-lm's definition of `model_type` (e.g. llama), without importing the mlx_lm package."""
    if _MODELS_PACKAGE not in sys.modules:
        found = importlib.util.find_spec("mlx_lm")  # locates the package without running it
        if found is None or not found.submodule_search_locations:
            raise EdgequantError("the MLX engine is not installed (mlx_lm is missing)", INSTALL_HINT)
        folder = Path(next(iter(found.submodule_search_locations))) / "models"
        spec = importlib.util.spec_from_file_location(_MODELS_PACKAGE, folder / "__init__.py",
                                                      submodule_search_locations=[str(folder)])
        package = importlib.util.module_from_spec(spec)
        sys.modules[_MODELS_PACKAGE] = package
        spec.loader.exec_module(package)
    return importlib.import_module(f"{_MODELS_PACKAGE}.{model_type}")


def load_model(folder: Path, model_type: str):
    """The artifact's model, quantized layers as its config.json records them, weights loaded."""
    import mlx.core as mx
    import mlx.nn as nn

    config = json.loads((folder / "config.json").read_text())
    arch = model_module(model_type)
    model = arch.Model(arch.ModelArgs.from_dict(config))
    weights = {}
    for path in sorted(folder.glob("model*.safetensors")):
        weights.update(mx.load(str(path)))
    if hasattr(model, "sanitize"):
        weights = model.sanitize(weights)
    quantization = config.get("quantization")
    if quantization:
        def quantized(path: str, module) -> bool | dict:  # per-layer settings where the config has them
            if path in quantization:
                return quantization[path]
            return hasattr(module, "to_quantized") and f"{path}.scales" in weights

        nn.quantize(model, group_size=quantization["group_size"], bits=quantization["bits"], class_predicate=quantized)
    model.load_weights(list(weights.items()), strict=True)
    mx.eval(model.parameters())
    model.eval()
    return model
