"""Scoring MLX artifacts off Apple silicon: the artifact's own weights, dequantized by MLX
(`mx.dequantize`, bit for bit what its quantized kernels use), run through PyTorch in float32.

mlx[cpu] has no BLAS on x86: one float32 matmul of the default model's size ran 19x slower than
numpy here, and one 512-token window took 47 s in MLX against under a second in PyTorch. MLX's
own float32 pass gives the same logits (tests/test_mlx.py checks it); neither carries the float16
activations MLX computes in on Apple silicon, which the runner's `arithmetic()` says.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _dequantized_weights(model) -> dict[str, np.ndarray]:
    """Every parameter as float32 numpy, quantized layers expanded with `mx.dequantize`."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    weights = {k: v for k, v in tree_flatten(model.parameters()) if not k.endswith((".scales", ".biases"))}
    for path, module in model.named_modules():
        if isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            weights[f"{path}.weight"] = mx.dequantize(module.weight, module.scales, module.get("biases"),
                                                      group_size=module.group_size, bits=module.bits)
    return {k: np.array(v.astype(mx.float32)) for k, v in weights.items()}


def dequantized_torch_model(model, folder: Path):
    import json

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = json.loads((folder / "config.json").read_text())
    for key in ("quantization", "quantization_config"):
        config.pop(key, None)
    hf_config = AutoConfig.for_model(**config)
    torch_model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32).eval()
    state = {k: torch.from_numpy(v) for k, v in _dequantized_weights(model).items()}
    missing, unexpected = torch_model.load_state_dict(state, strict=False)
    real_missing = [k for k in missing if not (k == "lm_head.weight" and hf_config.tie_word_embeddings)]
    if real_missing or unexpected:
        from edgequant.errors import EdgequantError

        raise EdgequantError(f"MLX weights do not map onto {config.get('model_type')}: missing {real_missing[:3]}, "
                             f"unexpected {unexpected[:3]}", "report this model; MLX generation still works")
    torch_model.tie_weights()
    return torch_model
