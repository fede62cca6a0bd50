"""Token sampling for runners whose engine returns logits and leaves the choice to us."""

from __future__ import annotations

import numpy as np

from edgequant.runner import GenerateParams


def sample_token(logits: np.ndarray, params: GenerateParams, rng: np.random.Generator) -> int:
    """Greedy at temperature 0; otherwise temperature, top-k and top-p (nucleus) sampling."""
    if params.temperature <= 0:
        return int(logits.argmax())
    scaled = logits.astype(np.float64) / params.temperature
    order = np.argsort(-scaled)
    if params.top_k:
        order = order[: params.top_k]
    probs = np.exp(scaled[order] - scaled[order].max())
    probs /= probs.sum()
    keep = int(np.searchsorted(np.cumsum(probs), params.top_p)) + 1
    order, probs = order[:keep], probs[:keep] / probs[:keep].sum()
    return int(rng.choice(order, p=probs))
