"""The PyTorch runner on the source model: the float32 baseline every metric is relative to."""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np

from edgequant.runner import GenerateParams, HFTokenizerMixin, Runner
from edgequant.source import Source


class TorchRunner(HFTokenizerMixin, Runner):
    def __init__(self, source: Source, *, n_ctx: int, threads: int):
        import torch
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(threads)
        self._torch = torch
        self.name = f"pytorch:fp32 ({source.name})"
        self.n_ctx = n_ctx
        self._load_hf_tokenizer(source.hf_dir)
        self.model = AutoModelForCausalLM.from_pretrained(source.hf_dir, dtype=torch.float32).eval()

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        torch = self._torch
        with torch.inference_mode():
            out = self.model(torch.tensor([list(ids)], dtype=torch.long), use_cache=False)
        return out.logits[0].float().numpy()

    def generate(self, prompt_ids: Sequence[int], params: GenerateParams) -> Iterator[int]:
        torch = self._torch
        generator = torch.Generator().manual_seed(params.seed)
        inputs = torch.tensor([list(prompt_ids)], dtype=torch.long)
        past = None
        budget = min(params.max_tokens, self.n_ctx - len(prompt_ids))
        with torch.inference_mode():
            for _ in range(max(budget, 0)):
                out = self.model(inputs, past_key_values=past, use_cache=True)
                past = out.past_key_values
                token = _sample(out.logits[0, -1], params, generator)
                yield token
                if params.stop_at_eos and token in self._eos_ids:
                    return
                inputs = torch.tensor([[token]], dtype=torch.long)

    def close(self) -> None:
        self.model = None


def _sample(logits, params: GenerateParams, generator) -> int:
    """Greedy at temperature 0; otherwise temperature, top-k and top-p (nucleus) sampling."""
    import torch

    if params.temperature <= 0:
        return int(torch.argmax(logits))
    logits = logits.float() / params.temperature
    if params.top_k > 0:
        kth = torch.topk(logits, min(params.top_k, logits.numel())).values[-1]
        logits = torch.where(logits < kth, torch.full_like(logits, -float("inf")), logits)
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_probs, dim=-1) - sorted_probs < params.top_p
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
        probs = probs / probs.sum()
    return int(torch.multinomial(probs, 1, generator=generator))
