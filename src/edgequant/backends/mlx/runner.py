"""MLX runner through mlx-lm: one forward pass for logits, `generate_step` for decoding."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from edgequant.backends._shared.hf_tokenizer import HFTokenizerMixin
from edgequant.backends.mlx.engine import is_apple_silicon
from edgequant.runner import GenerateParams, Runner


class MLXRunner(HFTokenizerMixin, Runner):
    """`generate` runs in mlx-lm. `logits` of long windows run the same (dequantized) MLX weights
    through PyTorch off Apple silicon: mlx[cpu] has no fast matrix multiply on x86 (one 512-token
    window of a 135M model takes minutes), and the quality lost lies in the weights, which are
    identical bit for bit after `mx.dequantize`."""

    def __init__(self, folder: Path, *, name: str, n_ctx: int):
        import mlx.core as mx
        from mlx_lm import load

        self.name, self.n_ctx = name, n_ctx
        self._mx = mx
        self._folder = folder
        self._torch_model = None
        self._model, _ = load(str(folder))
        self._load_hf_tokenizer(folder)
        if not is_apple_silicon():
            _compute_in_float32(self._model)

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        if len(ids) > self.n_ctx:
            raise ValueError(f"{len(ids)} tokens exceed the context of {self.n_ctx}")
        if not is_apple_silicon():
            return self._torch_logits(ids)
        mx = self._mx
        out = self._model(mx.array([list(ids)]))  # no cache: a fresh causal pass per window
        return np.array(out[0].astype(mx.float32), dtype=np.float32, copy=True)

    def _torch_logits(self, ids: Sequence[int]) -> np.ndarray:
        import torch

        if self._torch_model is None:
            self._torch_model = _dequantized_torch_model(self._model, self._folder)
        with torch.inference_mode():
            out = self._torch_model(torch.tensor([list(ids)], dtype=torch.long), use_cache=False)
        return out.logits[0].float().numpy()

    def generate(self, prompt_ids: Sequence[int], params: GenerateParams) -> Iterator[int]:
        """A plain KV-cached decode loop on the calling thread's default stream. mlx-lm's own
        `generate_step` pins a stream created when it was imported, and MLX streams belong to the
        thread that made them, so it fails in the server's worker thread."""
        from mlx_lm.models.cache import make_prompt_cache
        from mlx_lm.sample_utils import make_sampler

        mx = self._mx
        budget = min(params.max_tokens, self.n_ctx - len(prompt_ids))
        if budget <= 0:
            return
        mx.random.seed(params.seed)
        sampler = make_sampler(temp=params.temperature, top_p=params.top_p if params.top_p < 1.0 else 0.0, top_k=params.top_k)
        cache = make_prompt_cache(self._model)
        inputs = mx.array([list(prompt_ids)])
        for _ in range(budget):
            logits = self._model(inputs, cache=cache)[:, -1, :]
            token = int(sampler(logits - mx.logsumexp(logits, keepdims=True)).item())
            yield token
            if params.stop_at_eos and token in self._eos_ids:
                return
            inputs = mx.array([[token]])

    def close(self) -> None:
        self._model = self._torch_model = None


def _compute_in_float32(model) -> None:
    """Off Apple silicon, float16 arithmetic on the CPU is emulated and many times slower: hold the
    float16 scales, biases and norms as float32 in memory (the stored weights and their quantized
    values are unchanged), so activations are computed in float32."""
    import mlx.core as mx
    from mlx.utils import tree_map

    model.update(tree_map(lambda p: p.astype(mx.float32) if p.dtype == mx.float16 else p, model.parameters()))
    mx.eval(model.parameters())


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


def _dequantized_torch_model(model, folder: Path):
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
