"""The PyTorch runner: a Hugging Face folder run by transformers, the float32 baseline every
metric is relative to (and the runner of `pytorch:*` artifacts)."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from edgequant.backends._shared.hf_tokenizer import HFTokenizerMixin
from edgequant.backends._shared.sampling import sample_token
from edgequant.runner import GenerateParams, Runner


class TorchRunner(HFTokenizerMixin, Runner):
    def __init__(self, folder: Path, *, name: str, n_ctx: int, threads: int, dtype: str = "float32"):
        import torch
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(threads)
        self._torch = torch
        self.name = name
        self.n_ctx = n_ctx
        self._load_hf_tokenizer(folder)
        self.model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype)).eval()

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        torch = self._torch
        with torch.inference_mode():
            out = self.model(torch.tensor([list(ids)], dtype=torch.long), use_cache=False)
        return out.logits[0].float().numpy()

    def generate(self, prompt_ids: Sequence[int], params: GenerateParams) -> Iterator[int]:
        torch = self._torch
        rng = np.random.default_rng(params.seed)
        inputs = torch.tensor([list(prompt_ids)], dtype=torch.long)
        past = None
        budget = min(params.max_tokens, self.n_ctx - len(prompt_ids))
        with torch.inference_mode():
            for _ in range(max(budget, 0)):
                out = self.model(inputs, past_key_values=past, use_cache=True)
                past = out.past_key_values
                token = sample_token(out.logits[0, -1].float().numpy(), params, rng)
                yield token
                if params.stop_at_eos and token in self._eos_ids:
                    return
                inputs = torch.tensor([[token]], dtype=torch.long)

    def close(self) -> None:
        self.model = None
