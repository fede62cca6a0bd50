"""The PyTorch runner: a Hugging Face folder run by transformers, the float32 baseline every
metric is relative to (and the runner of `pytorch:*` artifacts)."""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from edgequant.backends._shared.hf_tokenizer import HFTokenizerMixin
from edgequant.backends._shared.sampling import sample_token
from edgequant.runner import GenerateParams, Runner


class TorchRunner(HFTokenizerMixin, Runner):
    """`stored_dtype` (the checkpoint's 16-bit type, for a float32 run of a bf16 or f16 model): the
    matrices stay in it and each product upcasts its weight for that product alone, so the float32
    baseline of a 1B bf16 model holds 2 bytes per weight instead of 4; every other parameter is
    float32, so the figures are those of the model loaded in float32."""

    def __init__(self, folder: Path, *, name: str, n_ctx: int, threads: int, dtype: str = "float32",
                 stored_dtype: str | None = None):
        import torch
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(threads)
        self._torch = torch
        self.name = name
        self.n_ctx = n_ctx
        self._load_hf_tokenizer(folder)
        if dtype == "float32" and stored_dtype in ("bfloat16", "float16"):
            self.model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, stored_dtype)).eval()
            float32_compute(self.model)
        else:
            self.model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype)).eval()

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        torch = self._torch
        with torch.inference_mode():
            out = self.model(torch.tensor([list(ids)], dtype=torch.long), use_cache=False)
        return out.logits[0].float().numpy()

    def generate(self, prompt_ids: Sequence[int], params: GenerateParams) -> Iterator[int]:
        return self.bounded(prompt_ids, params, self._stream(prompt_ids, params))

    def _stream(self, prompt_ids: Sequence[int], params: GenerateParams) -> Iterator[int]:
        torch = self._torch
        rng = np.random.default_rng(params.seed)
        inputs = torch.tensor([list(prompt_ids)], dtype=torch.long)
        past = None
        while True:
            with torch.inference_mode():
                out = self.model(inputs, past_key_values=past, use_cache=True)
            past = out.past_key_values
            token = sample_token(out.logits[0, -1].float().numpy(), params, rng)
            yield token
            inputs = torch.tensor([[token]], dtype=torch.long)

    def close(self) -> None:
        self.model = None


def float32_compute(model) -> None:
    """Run a 16-bit model in float32 without a float32 copy of its matrices: every parameter and
    buffer but the Linear weights becomes float32 (embeddings included, so hidden states are float32
    from the first layer on), and each Linear multiplies by its weight upcast for that product."""
    import torch

    linear_weights = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Linear)}
    embedding_weights = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    for module in model.modules():
        for tensor in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
            keep = id(tensor) in linear_weights and id(tensor) not in embedding_weights
            if tensor.is_floating_point() and not keep:
                tensor.data = tensor.data.float()
        if isinstance(module, torch.nn.Linear):
            module.__class__ = _float32_linear()


@cache
def _float32_linear():
    import torch

    class Float32Linear(torch.nn.Linear):
        """A Linear whose 16-bit weight is upcast for each product (and let go after it)."""

        def forward(self, x):
            bias = None if self.bias is None else self.bias.float()
            return torch.nn.functional.linear(x, self.weight.float(), bias)

    return Float32Linear
