"""bench/stats.py against values worked out by hand (in the comments), not against another library."""

from __future__ import annotations

import math

import pytest

from bench.stats import median_iqr, paired_outcomes, separation, sign_test, wilcoxon_signed_rank


def test_median_and_interquartile_range_interpolate_between_order_statistics():
    # 1..10: the first quartile sits at position 9 * 0.25 = 2.25 (0-based) -> 3 + 0.25 = 3.25; the third
    # at 6.75 -> 7 + 0.75 = 7.75; the median between 5 and 6.
    assert median_iqr(list(range(10, 0, -1))) == {"median": 5.5, "q1": 3.25, "q3": 7.75, "iqr": 4.5, "n": 10}
    # [0.90, 0.95, 0.97, 0.99, 1.00]: positions 1 and 3 exactly -> 0.95 and 0.99.
    spread = median_iqr([0.97, 1.0, 0.9, 0.99, 0.95])
    assert (spread["median"], spread["q1"], spread["q3"]) == (0.97, 0.95, 0.99)
    assert spread["iqr"] == pytest.approx(0.04)
    # a diverged run (None, nan) is left out, not counted as a value
    assert median_iqr([2.0, None, math.nan, 4.0]) == {"median": 3.0, "q1": 2.5, "q3": 3.5, "iqr": 1.0, "n": 2}
    assert median_iqr([7.0])["iqr"] == 0.0
    assert median_iqr([None])["n"] == 0


def test_paired_outcomes_follow_the_metric_direction_and_count_failures_as_losses():
    ours, theirs = [0.9, 0.5, 0.7, None, 0.3, None], [0.8, 0.6, 0.7, 0.1, math.nan, None]
    assert paired_outcomes(ours, theirs, higher_is_better=True) == {"wins": 2, "ties": 2, "losses": 2}
    # perplexity: lower is better
    assert paired_outcomes([10.0, 12.0, 5.0], [11.0, 11.0, 6.0], higher_is_better=False) == {
        "wins": 2, "ties": 0, "losses": 1}
    # within a relative tolerance of 1e-6 two values tie
    assert paired_outcomes([1.0], [1.0 + 1e-9], higher_is_better=True, tolerance=1e-6)["ties"] == 1
    assert paired_outcomes([1.0], [1.0 + 1e-3], higher_is_better=True, tolerance=1e-6)["losses"] == 1


def test_sign_test_is_the_exact_two_sided_binomial():
    assert sign_test(10, 0) == pytest.approx(2 / 1024)  # 2 * (1/2)^10
    assert sign_test(0, 10) == pytest.approx(2 / 1024)
    assert sign_test(8, 2) == pytest.approx(2 * (1 + 10 + 45) / 1024)  # 2 * P(X <= 2), n = 10: 0.109375
    assert sign_test(7, 3) == pytest.approx(2 * (1 + 10 + 45 + 120) / 1024)  # 0.34375
    assert sign_test(9, 1) == pytest.approx(2 * 11 / 1024)  # 0.021484375
    assert sign_test(5, 5) == 1.0  # 2 * 638/1024 > 1: capped
    assert sign_test(0, 0) == 1.0


def test_wilcoxon_signed_rank_without_ties():
    # five positive differences: T- = 0; only 1 of the 32 sign assignments is as extreme on each side
    assert wilcoxon_signed_rank([0.5, 0.1, 0.3, 0.2, 0.4]) == {"n": 5, "w_plus": 15.0, "w_minus": 0.0,
                                                             "p": pytest.approx(2 / 32)}
    # ranks 1..6, the difference of rank 2 negative: T- = 2; subsets of {1..6} with sum <= 2 are {}, {1}, {2}
    result = wilcoxon_signed_rank([1.0, -2.0, 3.0, 4.0, 5.0, 6.0])
    assert (result["w_plus"], result["w_minus"]) == (19.0, 2.0)
    assert result["p"] == pytest.approx(6 / 64)  # 0.09375
    # a zero difference is dropped (n = 6, as above)
    assert wilcoxon_signed_rank([0.0, 1.0, -2.0, 3.0, 4.0, 5.0, 6.0])["p"] == pytest.approx(6 / 64)


def test_wilcoxon_signed_rank_with_tied_magnitudes_uses_average_ranks():
    # |d| = 1, 1, 2, 3 -> ranks 1.5, 1.5, 3, 4; the negative one has rank 3: T+ = 7, T- = 3. Of the 16 subsets
    # of {1.5, 1.5, 3, 4}, sums <= 3 are {}, {1.5}, {1.5}, {1.5, 1.5}, {3}: P(T- <= 3) = 5/16; two-sided 10/16.
    result = wilcoxon_signed_rank([1.0, 1.0, -2.0, 3.0])
    assert (result["w_plus"], result["w_minus"]) == (7.0, 3.0)
    assert result["p"] == pytest.approx(10 / 16)
    assert wilcoxon_signed_rank([]) == {"n": 0, "w_plus": 0.0, "w_minus": 0.0, "p": 1.0}


def test_wilcoxon_signed_rank_agrees_with_scipy_where_scipy_is_exact():
    scipy_stats = pytest.importorskip("scipy.stats")
    differences = [0.31, -0.12, 0.05, 0.44, -0.02, 0.27, 0.19, 0.08, -0.36, 0.15]
    expected = scipy_stats.wilcoxon(differences, method="exact").pvalue
    assert wilcoxon_signed_rank(differences)["p"] == pytest.approx(expected)


def test_separation_compares_the_spread_of_configurations_with_seed_noise():
    # random configurations 1..10 (IQR 4.5) against seed noise [5.0, 5.2, 5.4, 5.6, 5.8] (IQR 0.4):
    # ratio 11.25 >= 3, the task separates
    result = separation(list(range(1, 11)), [5.0, 5.2, 5.4, 5.6, 5.8])
    assert result["iqr_ratio"] == pytest.approx(4.5 / 0.4)
    assert result["random_configurations"]["range"] == 9.0
    assert result["seed_noise"]["range"] == pytest.approx(0.8)
    assert result["separates"]
    # seed noise as wide as the configurations' spread (ratio 1): it does not
    assert not separation([1.0, 2.0, 3.0, 4.0, 5.0], [1.0, 2.0, 3.0, 4.0, 5.0])["separates"]
    # a saturated task: every configuration at the ceiling
    saturated = separation([0.992] * 16, [0.992] * 16)
    assert not saturated["separates"] and math.isnan(saturated["iqr_ratio"])
