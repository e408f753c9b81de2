"""modlabel.stats against known cases, the evaluation's intervals and paired tests on
hand-made measures, and ``localize --models`` end to end with the same model twice."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from typer.testing import CliRunner

from modlabel import stats
from modlabel.cli import app
from modlabel.cli.explain import spread_option
from modlabel.evaluation import comparison_sentences
from modlabel.evaluation.significance import (
    StatisticsSettings,
    image_statistics,
    model_comparisons,
    pooled_statistics,
)

# --------------------------------------------------------------- known cases


def test_identical_inputs_give_no_difference_and_p_one():
    a = np.random.default_rng(3).normal(size=40)
    test = stats.paired_bootstrap(a, a.copy(), resamples=300)
    assert (test.difference, test.low, test.high, test.p_value) == (0.0, 0.0, 0.0, 1.0)
    hits = np.random.default_rng(4).random(40) < 0.6
    same = stats.mcnemar(hits, hits.copy())
    assert same.difference == 0.0 and same.p_value == 1.0 and same.pairs == 40
    groups = [a[:10], a[10:25], a[25:]]
    pooled = stats.hierarchical_paired_bootstrap(groups, groups, resamples=300)
    assert (pooled.difference, pooled.low, pooled.high, pooled.p_value) == (0.0, 0.0, 0.0, 1.0)


def test_mcnemar_is_the_exact_binomial_of_the_discordant_pairs(monkeypatch):
    # 2 pairs only A hits, 8 only B, 5 both, 3 neither: n = 10 discordant pairs,
    # p = 2 P(X <= 2), X ~ Bin(10, 1/2) = 2 (1 + 10 + 45) / 1024.
    a = np.array([1] * 2 + [0] * 8 + [1] * 5 + [0] * 3)
    b = np.array([0] * 2 + [1] * 8 + [1] * 5 + [0] * 3)
    test = stats.mcnemar(a, b)
    assert test.p_value == pytest.approx(112 / 1024, abs=1e-15)
    assert test.difference == pytest.approx((2 - 8) / 18)
    assert test.low < test.difference < test.high
    # Balanced discordance: 2 P(X <= 3), X ~ Bin(6, 1/2) = 84 / 64, clipped to 1.
    assert stats.mcnemar_p_value(3, 3) == 1.0
    assert stats.mcnemar_p_value(0, 0) == 1.0  # no discordant pair
    assert stats.mcnemar_p_value(0, 6) == pytest.approx(2 / 64)
    # Past the exact limit the log-space tail agrees with the integer sum.
    exact = sum(math.comb(400, i) for i in range(181)) / 2**400
    monkeypatch.setattr(stats, "EXACT_BINOMIAL_LIMIT", 100)
    assert stats.binomial_half_tail(180, 400) == pytest.approx(exact, rel=1e-9)


def test_wilson_matches_the_textbook():
    # Newcombe (1998), Stat. Med. 17:857, Table I, method 3 (score, no continuity correction).
    for (k, n), (low, high) in {
        (81, 263): (0.2553, 0.3662),
        (15, 148): (0.0624, 0.1605),
        (0, 20): (0.0, 0.1611),
        (1, 29): (0.0061, 0.1718),
    }.items():
        interval = stats.wilson_interval(k, n)
        assert interval.estimate == k / n
        assert (round(interval.low, 4), round(interval.high, 4)) == (low, high)
    with pytest.raises(ValueError):
        stats.wilson_interval(3, 2)


def test_newcombe_paired_interval_is_symmetric_under_swapping():
    low, high = stats.newcombe_paired_interval(5, 2, 8, 3)
    swapped = stats.newcombe_paired_interval(5, 8, 2, 3)
    assert (low, high) == pytest.approx((-swapped[1], -swapped[0]))


def test_the_interval_of_a_constant_is_the_constant():
    interval = stats.bootstrap_interval(np.full(9, 0.375), resamples=200)
    assert (interval.estimate, interval.low, interval.high) == (0.375, 0.375, 0.375)
    assert stats.hierarchical_bootstrap([np.full(4, 2.0), np.full(7, 2.0)]).low == 2.0
    assert interval.text() == "0.38 [0.38, 0.38]"


def test_bootstrap_intervals_cover_the_true_mean():
    rng = np.random.default_rng(0)
    covered = 0
    for i in range(200):
        sample = rng.normal(1.0, 2.0, size=30)
        interval = stats.bootstrap_interval(sample, resamples=400, seed=i)
        covered += interval.low <= 1.0 <= interval.high
    assert covered >= 180  # >= 90% of 200 (the nominal level is 95%)


def test_column_means_resample_as_the_generic_bootstrap_does():
    values = np.random.default_rng(5).random((50, 3))
    values[::4, 1] = np.nan  # undefined for some images
    distribution = stats.bootstrap_column_means(values, resamples=300, seed=9)
    generic = stats.bootstrap_distribution(values[:, 0], resamples=300, seed=9)
    assert distribution[:, 0] == pytest.approx(generic)  # the same draws
    assert stats.column_means(values)[1] == pytest.approx(np.nanmean(values[:, 1]))


def test_models_widen_the_interval_when_they_disagree():
    rng = np.random.default_rng(6)
    groups = [rng.normal(shift, 0.1, size=60) for shift in (0.0, 0.5, 1.0)]
    pooled = stats.hierarchical_bootstrap(groups, resamples=500)
    images_only = stats.bootstrap_interval(np.concatenate(groups), resamples=500)
    assert pooled.estimate == pytest.approx(0.5, abs=0.05)
    assert pooled.high - pooled.low > 2 * (images_only.high - images_only.low)


def test_holm_steps_down():
    assert stats.holm([0.01, 0.04, 0.03, 0.5]) == pytest.approx([0.04, 0.09, 0.09, 0.5])
    assert math.isnan(stats.holm([0.2, math.nan])[1]) and stats.holm([0.2, math.nan])[0] == 0.2


def test_a_statistic_that_does_not_reduce_is_refused():
    with pytest.raises(ValueError, match="one number"):
        stats.bootstrap_interval(np.ones((5, 2)))
    ratio = stats.bootstrap_interval(
        np.array([[1, 2], [3, 4], [2, 2]]),
        lambda x, axis: x[..., 0].sum(axis) / x[..., 1].sum(axis),
        resamples=200,
    )
    assert ratio.estimate == pytest.approx(6 / 8)


# --------------------------------------------------------------- the evaluation's tests

METRICS = ("pointing", "energy")
SETTINGS = StatisticsSettings(resamples=300)


def _measures(seed: int, n: int = 40) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    hits = (rng.random(n) < 0.5).astype(float)
    energy = rng.random(n)
    better = np.column_stack([np.maximum(hits, rng.random(n) < 0.6), energy + 0.2])
    return {"cam": np.column_stack([hits, energy]), "crm": better}


def test_method_pairs_get_mcnemar_and_bootstrap_with_holm():
    values = _measures(0)
    intervals, comparisons = image_statistics(
        values, METRICS, {"all": np.arange(40)}, tested=METRICS, settings=SETTINGS
    )
    assert {(i.method, i.metric) for i in intervals} == {(m, k) for m in values for k in METRICS}
    pointing, energy = comparisons
    assert pointing.test == "McNemar exact" and energy.test == "paired bootstrap"
    assert (pointing.first, pointing.second) == ("crm", "cam")
    assert energy.difference == pytest.approx(0.2) and energy.significant
    sentences = comparison_sentences(comparisons)
    assert len(sentences) == 1 and sentences[0].startswith("CRM vs CAM: pointing game +")
    # Every resample on one side: p = 2 / (300 + 1), the smallest a 300-resample test gives.
    assert energy.p_value == pytest.approx(2 / 301)
    assert "energy +0.20 [0.20, 0.20], p = 0.007, significant" in sentences[0]


def test_the_same_model_twice_compares_equal_and_pools():
    values = _measures(1)
    keys = np.arange(40)
    between = model_comparisons(
        ["a", "a again"], [keys, keys], [values, values], METRICS, tested=METRICS,
        settings=SETTINGS,
    )  # fmt: skip
    assert between and all(c.difference == 0.0 and c.p_value == 1.0 for c in between)
    intervals, comparisons = pooled_statistics(
        [values, _measures(2)], METRICS, tested=METRICS, settings=SETTINGS
    )
    assert all(c.test == "hierarchical paired bootstrap" for c in comparisons)
    assert all(i.low <= i.estimate <= i.high for i in intervals)


# --------------------------------------------------------------- localize --models

runner = CliRunner()


def test_models_take_every_word_after_them():
    words = ["archive", "--models", "a.onnx", "b.onnx", "--limit", "3"]
    assert spread_option(words, "--models") == [
        "archive", "--models", "a.onnx", "--models", "b.onnx", "--limit", "3",
    ]  # fmt: skip


def test_localize_pools_the_same_model_twice(tiny_archive, tiny_onnx, tmp_path):
    out = tmp_path / "pooled.json"
    args = ["localize", str(tiny_archive), "--models", str(tiny_onnx), str(tiny_onnx)]
    result = runner.invoke(app, [*args, "--limit", "21", "--resamples", "200", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "Pooled over 2 models" in result.output
    assert "vs CAM: pointing game" in result.output
    report = json.loads(out.read_text())
    first, second = report["models"]
    assert first["intervals"] == second["intervals"]  # the same model, the same figures
    pooled = report["pooled"]
    assert pooled["statistics"]["resamples"] == 200
    # Model against model: identical inputs, so every difference is 0 and every p is 1.
    assert pooled["model_comparisons"]
    for c in pooled["model_comparisons"]:
        assert c["difference"] in (0.0, None) and c["p_value"] in (1.0, None), c
        assert not c["significant"]
    for c in first["comparisons"]:
        assert 0 <= c["p_value"] <= c["p_holm"] <= 1 or c["p_value"] is None, c
    for i in pooled["intervals"]:
        if i["estimate"] is not None:
            assert i["low"] <= i["estimate"] + 1e-12 and i["estimate"] <= i["high"] + 1e-12


def test_a_bootstrap_too_coarse_for_holm_says_so_and_how_many_resamples_it_needs():
    from modlabel.evaluation.significance import StatisticsSettings
    from modlabel.evaluation.tables import resolution_note

    # The smallest bootstrap p is 2 / (B + 1); Holm over m pairs multiplies it by m.
    assert stats.bootstrap_p_values(np.full((2000, 1), 1.0))[0] == 2 / 2001
    coarse = resolution_note(StatisticsSettings(resamples=2000), 78)  # 13 methods
    assert "below 0.08" in coarse and "--resamples 3120" in coarse
    assert resolution_note(StatisticsSettings(resamples=3120), 78) == ""
    assert resolution_note(StatisticsSettings(resamples=2000), 10) == ""  # 5 methods
    assert resolution_note(StatisticsSettings(resamples=2000), 1) == ""
    # localize's default: enough for its pairs (11 closed-form methods: 55 pairs).
    from modlabel.evaluation.significance import resamples_for

    assert resamples_for(10) == 2000
    assert resamples_for(55) == 4400
    assert resolution_note(StatisticsSettings(resamples=resamples_for(78)), 78) == ""
