"""Log-probability arithmetic shared by the evaluation harness and the backends' own checks
(the HTP agreement, the tokenizer IR check): one implementation of each."""

from __future__ import annotations

from typing import Sequence

import numpy as np


def log_softmax(logits: np.ndarray) -> np.ndarray:
    logits = logits.astype(np.float32, copy=False)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def kl_divergence(log_p: np.ndarray, log_q: np.ndarray) -> np.ndarray:
    """KL(p || q) per row, from log-probabilities."""
    return (np.exp(log_p) * (log_p - log_q)).sum(axis=-1)


def first_difference(got: Sequence[int], want: Sequence[int]) -> int:
    """Index of the first token where two id lists differ (the shorter length if one is a prefix)."""
    return next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
