"""Quality figures of models of other tasks, each with a 95% interval.

A sentence encoder's embeddings are compared with the float baseline's on the same texts: cosine
similarity per text (its mean and 1st percentile), and the accuracy of a linear polarity probe
trained on its own embeddings by 10-fold cross-validation, beside the same probe on the baseline's.
An image classifier's class scores are compared with the float baseline's on the same images: top-1
agreement (the same class first), top-5 agreement (the baseline's first class among the target's
five), and the KL divergence of the target's class probabilities from the baseline's.
Intervals come from a seeded bootstrap over inputs: texts are independent of each other; the views
of one photo are not, so an image classifier's bootstrap draws whole photos (all their views together).
"""

from __future__ import annotations

import numpy as np

from edgequant.measurement.logprobs import kl_divergence, log_softmax

RESAMPLES = 2000
SEED = 0
PROBE_FOLDS = 10
PROBE_RIDGE = 1.0  # L2 penalty of the probe's least-squares fit on unit-length embeddings


def embedding_figures(outputs: np.ndarray, reference: np.ndarray, labels: np.ndarray) -> dict:
    """Figures of `outputs` against `reference` (rows are texts; the first len(labels) are labelled)."""
    cosine = row_cosines(outputs, reference)
    correct = probe_correct(outputs[:len(labels)], labels)
    baseline_correct = probe_correct(reference[:len(labels)], labels)
    ci = _bootstrap({"cosine_mean": (cosine, np.mean), "cosine_p1": (cosine, lambda c: np.percentile(c, 1)),
                     "probe_accuracy": (correct, np.mean)})
    return {
        "cosine_mean": round(float(cosine.mean()), 6),
        "cosine_p1": round(float(np.percentile(cosine, 1)), 6),
        "cosine_min": round(float(cosine.min()), 6),
        "probe_accuracy": round(float(correct.mean()), 4),
        "baseline_probe_accuracy": round(float(baseline_correct.mean()), 4),
        "inputs_scored": int(len(cosine)),
        "ci95": {k: [round(v, 6) for v in interval] for k, interval in ci.items()},
        "ci_method": method(),
    }


def classification_figures(outputs: np.ndarray, reference: np.ndarray, groups: np.ndarray | None = None) -> dict:
    """Figures of class scores `outputs` against `reference` (rows are images; `groups` numbers the
    photo each row was cut from, resampled together)."""
    first = reference.argmax(-1)
    top1 = (outputs.argmax(-1) == first).astype(np.float64)
    top5 = (np.argsort(-outputs, axis=-1)[:, :5] == first[:, None]).any(-1).astype(np.float64)
    kld = np.maximum(kl_divergence(log_softmax(reference.astype(np.float64)), log_softmax(outputs.astype(np.float64))), 0.0)
    ci = _bootstrap({"top1_agreement": (top1, np.mean), "top5_agreement": (top5, np.mean), "kld_mean": (kld, np.mean)},
                    groups)
    return {
        "top1_agreement": round(float(top1.mean()), 4),
        "top5_agreement": round(float(top5.mean()), 4),
        "kld_mean": round(float(kld.mean()), 6),
        "inputs_scored": int(len(top1)),
        "ci95": {k: [round(v, 6) for v in interval] for k, interval in ci.items()},
        "ci_method": {"method": "bootstrap over inputs", "resamples": RESAMPLES, "seed": SEED, "level": 0.95,
                      **({"method": "bootstrap over photos (each photo's views drawn together)",
                          "photos": int(len(np.unique(groups)))} if groups is not None else {})},
    }


def probe_correct(embeddings: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """1 where a ridge-regression probe (targets -1/+1) trained on the other folds labels the text
    right: out-of-fold predictions over seeded, stratified folds."""
    folds = _stratified_folds(labels)
    x = np.hstack([embeddings.astype(np.float64), np.ones((len(labels), 1))])
    y = np.where(labels == 1, 1.0, -1.0)
    predicted = np.empty(len(labels))
    for fold in range(PROBE_FOLDS):
        test, train = folds == fold, folds != fold
        a = x[train]
        weights = np.linalg.solve(a.T @ a + PROBE_RIDGE * np.eye(a.shape[1]), a.T @ y[train])
        predicted[test] = x[test] @ weights
    return (np.sign(predicted) == y).astype(np.float64)


def method() -> dict:
    return {"method": "bootstrap over inputs", "resamples": RESAMPLES, "seed": SEED, "level": 0.95,
            "probe": f"ridge least squares (alpha {PROBE_RIDGE}), {PROBE_FOLDS}-fold stratified cross-validation"}


def row_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The cosine similarity of each row of `a` to the same row of `b` (float64)."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(-1) / np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-12)


def _stratified_folds(labels: np.ndarray) -> np.ndarray:
    """The fold of each labelled text: each class shuffled (seeded) and dealt round the folds."""
    folds = np.empty(len(labels), dtype=np.int64)
    rng = np.random.default_rng(SEED)
    for value in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == value))
        folds[members] = np.arange(len(members)) % PROBE_FOLDS
    return folds


def _bootstrap(figures: dict, groups: np.ndarray | None = None) -> dict[str, list[float]]:
    """[low, high] of each figure, recomputed on resamples of its own per-input values; with
    `groups`, each resample draws whole groups (with replacement), every member of a drawn group."""
    rng = np.random.default_rng(SEED)
    out = {}
    for name, (values, statistic) in figures.items():
        picks = _resamples(rng, len(values), groups)
        drawn = np.array([statistic(values[p]) for p in picks])
        out[name] = [float(np.percentile(drawn, 2.5)), float(np.percentile(drawn, 97.5))]
    return out


def _resamples(rng, count: int, groups: np.ndarray | None) -> list[np.ndarray]:
    if groups is None:
        return list(rng.integers(0, count, size=(RESAMPLES, count)))
    members = [np.flatnonzero(groups == g) for g in np.unique(groups)]
    draws = rng.integers(0, len(members), size=(RESAMPLES, len(members)))
    return [np.concatenate([members[j] for j in draw]) for draw in draws]
