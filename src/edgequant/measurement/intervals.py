"""95% intervals for the quality figures, by a seeded block bootstrap over scored tokens.

Neighbouring tokens of one text are not independent (a hard passage raises the loss of all its
tokens), so the bootstrap resamples blocks of consecutive tokens, not single tokens: each
resample draws as many blocks as were scored, with replacement, and recomputes every figure
from the drawn blocks' sums. Perplexity increase is a ratio of the artifact's and the baseline's
perplexity on the same drawn tokens, so text difficulty cancels out of it. Seeded, so the same
scores always give the same interval.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BLOCK_TOKENS = 32
RESAMPLES = 2000
SEED = 0


@dataclass(frozen=True)
class TokenScores:
    """Per-token figures of one evaluation, in scoring order (windows one after another)."""

    nll: np.ndarray  # the artifact's negative log-likelihood of the true next token
    baseline_nll: np.ndarray  # the baseline's, on the same token
    kld: np.ndarray  # KL(baseline || artifact) of the next-token distribution
    top1: np.ndarray  # 1 where both put their highest probability on the same token
    window: int  # tokens scored per window: blocks never straddle two windows


def block_sums(scores: TokenScores, block: int = BLOCK_TOKENS) -> np.ndarray:
    """(blocks, 5) sums of nll, baseline nll, kld, top1 and the token count of each block."""
    columns = np.stack([scores.nll, scores.baseline_nll, scores.kld, scores.top1, np.ones(len(scores.nll))],
                       axis=1).astype(np.float64)
    sums = []
    for start in range(0, len(columns), scores.window):
        window = columns[start:start + scores.window]
        sums.extend(window[i:i + block].sum(axis=0) for i in range(0, len(window), block))
    return np.stack(sums)


def figures(sums: np.ndarray) -> dict[str, np.ndarray]:
    """The quality figures from summed blocks; `sums` may carry leading resample axes."""
    nll, base, kld, top1, count = (sums[..., i] for i in range(5))
    return {"ppl_increase_pct": 100 * (np.exp((nll - base) / count) - 1), "kld_mean": kld / count,
            "top1_agreement": top1 / count}


def bootstrap(scores: TokenScores, resamples: int = RESAMPLES, seed: int = SEED) -> dict[str, list[float]]:
    """[low, high] 95% interval of each quality figure."""
    sums = block_sums(scores)
    picks = np.random.default_rng(seed).integers(0, len(sums), size=(resamples, len(sums)))
    drawn = figures(sums[picks].sum(axis=1))
    return {name: [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))] for name, v in drawn.items()}


def method() -> dict:
    """How the intervals were made, for manifests and reports."""
    return {"method": "block bootstrap", "block_tokens": BLOCK_TOKENS, "resamples": RESAMPLES, "seed": SEED, "level": 0.95}


def compare(a: list[float], b: list[float]) -> str:
    """'lower', 'higher' or 'not distinguishable': where interval `a` lies against interval `b`."""
    if a[1] < b[0]:
        return "lower"
    if a[0] > b[1]:
        return "higher"
    return "not distinguishable"
