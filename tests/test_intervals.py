"""The block bootstrap behind every quality interval, on hand-made per-token scores."""

import numpy as np
import pytest

from edgequant.measurement.evaluation import quality_figures
from edgequant.measurement.intervals import TokenScores, block_sums, bootstrap, compare

pytestmark = pytest.mark.unit


def scores(n_windows=4, window=127, seed=1, shift=0.0, kld_scale=0.05):
    rng = np.random.default_rng(seed)
    base = rng.gamma(2.0, 1.5, n_windows * window)
    nll = base + shift + rng.normal(0, 0.1, base.size)
    kld = rng.exponential(kld_scale, base.size)
    top1 = rng.random(base.size) < 0.9
    return TokenScores(nll, base, kld, top1, window)


def test_blocks_cover_every_token_once_and_never_straddle_windows():
    s = scores(n_windows=3, window=70)
    sums = block_sums(s, block=32)
    assert len(sums) == 3 * 3  # 32 + 32 + 6 tokens per window
    assert sums[:, 4].sum() == 3 * 70 and sorted(set(sums[:, 4])) == [6, 32]
    assert sums[:, 0].sum() == pytest.approx(s.nll.sum()) and sums[:, 3].sum() == s.top1.sum()


def test_interval_holds_the_point_estimate_and_is_reproducible():
    s = scores()
    figures = quality_figures(s)
    for name in ("ppl_increase_pct", "kld_mean", "top1_agreement"):
        low, high = figures["ci95"][name]
        assert low < figures[name] < high, name
    assert bootstrap(s) == bootstrap(s)  # seeded


def test_identical_scores_give_a_zero_width_ppl_interval():
    s = scores(shift=0.0)
    same = TokenScores(s.baseline_nll, s.baseline_nll, np.zeros_like(s.kld), np.ones_like(s.top1), s.window)
    ci = bootstrap(same)
    assert ci["ppl_increase_pct"] == [0.0, 0.0] and ci["kld_mean"] == [0.0, 0.0] and ci["top1_agreement"] == [1.0, 1.0]


def test_more_tokens_narrow_the_interval():
    narrow = bootstrap(scores(n_windows=16))["kld_mean"]
    wide = bootstrap(scores(n_windows=2))["kld_mean"]
    assert narrow[1] - narrow[0] < wide[1] - wide[0]


def test_a_real_difference_is_told_apart_and_noise_is_not():
    a, b = bootstrap(scores(seed=1, kld_scale=0.05)), bootstrap(scores(seed=2, kld_scale=0.05))
    c = bootstrap(scores(seed=3, kld_scale=0.10))
    assert compare(a["kld_mean"], b["kld_mean"]) == "not distinguishable"
    assert compare(a["kld_mean"], c["kld_mean"]) == "lower" and compare(c["kld_mean"], a["kld_mean"]) == "higher"


def test_negative_kld_rounding_is_clipped_before_averaging():
    s = scores()
    noisy = TokenScores(s.nll, s.baseline_nll, np.full_like(s.kld, -1e-7), s.top1, s.window)
    assert quality_figures(noisy)["kld_mean"] == 0.0
