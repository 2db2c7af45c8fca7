"""Metric functions against values computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from kakeya_py.eval import metrics as M


def tokens(ref, alt, match=None, kl=None):
    ref, alt = np.asarray(ref, float), np.asarray(alt, float)
    return M.PassageTokens(ref, alt, np.ones(ref.shape, bool) if match is None else match, kl)


@pytest.mark.parametrize(
    ("dppl", "top1", "expected"),
    [
        (0.0, 1.0, "ACCEPT"),
        (0.01, 0.95, "ACCEPT"),
        (-0.01, 0.95, "ACCEPT"),
        (0.0101, 0.99, "MARGINAL"),
        (0.005, 0.949, "MARGINAL"),
        (0.03, 0.85, "MARGINAL"),
        (-0.0301, 0.99, "REJECT"),
        (0.0, 0.849, "REJECT"),
        (float("nan"), 1.0, "REJECT"),
    ],
)
def test_verdict_thresholds(dppl, top1, expected):
    assert M.verdict(dppl, top1) == expected


def test_delta_ppl_from_pooled_nll():
    # nll_ref = 1.5, nll_alt = 2.0 -> ppl ratio e^0.5
    assert M.delta_ppl([-1.0, -2.0], [-1.5, -2.5]) == pytest.approx(math.exp(0.5) - 1, rel=1e-15)


def test_delta_ppl_pools_tokens_not_passages():
    # passage A: 1 token, +1 nat; passage B: 3 tokens, +0 nats -> pooled mean +0.25
    s = M.summarize([tokens([-1.0], [-2.0]), tokens([-1.0] * 3, [-1.0] * 3)], bootstrap_samples=10)
    assert s["dppl"] == pytest.approx(math.exp(0.25) - 1, rel=1e-12)
    assert s["ppl_ref"] == pytest.approx(math.e)
    assert s["eval_tokens"] == 4 and s["passages"] == 2


def test_ess_by_hand():
    # rho = 1, 2, 3: (6)^2 / (3 * 14) = 6/7
    assert M.effective_sample_size(np.log([1.0, 2.0, 3.0])) == pytest.approx(6 / 7, rel=1e-12)
    assert M.effective_sample_size([0.0, 0.0]) == pytest.approx(1.0)


def test_ess_does_not_overflow():
    # rho = e^1000 for one of two tokens: ESS -> 1/2
    assert M.effective_sample_size([1000.0, 0.0]) == pytest.approx(0.5)


def test_band_fractions_by_hand():
    lr = np.log([0.4, 1.0, 2.5, 6.0])
    assert M.fraction_outside(lr, 2.0) == 0.75
    assert M.fraction_outside(lr, 5.0) == 0.25
    assert M.fraction_outside(np.log([0.5, 2.0]), 2.0) == 0.0  # the band is closed


def test_k3_by_hand():
    # rho = 2: 2 - ln 2 - 1; rho = 1/2: 1/2 + ln 2 - 1
    expected = ((1 - math.log(2)) + (math.log(2) - 0.5)) / 2
    assert M.k3_kl(np.log([2.0, 0.5])) == pytest.approx(expected, rel=1e-12)
    assert M.k3_kl([0.0, 0.0]) == 0.0


def test_pearson_by_hand():
    # dx = (-1, 0, 1), dy = (-7/3, -1/3, 8/3): 5 / sqrt(2 * 114/9)
    assert M.pearson([1, 2, 3], [2, 4, 7]) == pytest.approx(5 / math.sqrt(2 * 114 / 9), rel=1e-12)
    assert M.pearson([1, 1], [1, 1]) == 1.0
    assert math.isnan(M.pearson([1, 1], [1, 2]))


def test_kl_from_logits_by_hand():
    # p = (1/2, 1/2), q = (3/4, 1/4): KL = 1/2 ln(4/3)
    ref = torch.tensor([[0.0, 0.0]], dtype=torch.float64)
    alt = torch.tensor([[math.log(3.0), 0.0]], dtype=torch.float64)
    assert M.kl_from_logits(ref, alt).item() == pytest.approx(0.5 * math.log(4 / 3), rel=1e-12)
    assert M.kl_from_logits(ref, ref).item() == 0.0


def test_passage_tokens_from_logits():
    ref = torch.tensor([[0.0, 0.0, 0.0], [2.0, 0.0, 0.0]])
    alt = torch.tensor([[0.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
    t = M.passage_tokens_from_logits(ref, alt, torch.tensor([1, 0]))
    assert t.ref_logprob[0] == pytest.approx(-math.log(3))
    z = math.log(math.exp(2) + 2)
    assert t.ref_logprob[1] == pytest.approx(2 - z)
    assert t.alt_logprob[1] == pytest.approx(-z)
    assert t.top1_match.tolist() == [True, False]
    assert t.kl[0] == 0.0 and t.kl[1] > 0


def test_identical_logprobs_summarize_to_accept():
    rng = np.random.default_rng(0)
    ps = [tokens(lp, lp, kl=np.zeros(8)) for lp in -rng.random((3, 8)) * 5]
    s = M.summarize(ps)
    assert s["dppl"] == 0.0 and s["dppl_ci95"] == [0.0, 0.0]
    assert s["top1"] == 1.0 and s["ess"] == pytest.approx(1.0)
    assert s["kl_max"] == 0.0 and s["k3_kl"] == 0.0 and s["logprob_pearson"] == 1.0
    assert s["verdict"] == "ACCEPT"


def test_summary_fields_by_hand():
    ref = [-1.0, -2.0, -3.0, -1.0]
    alt = [-1.0, -1.0, -4.0, -1.0 - math.log(6)]
    s = M.summarize([tokens(ref, alt, match=np.array([1, 1, 0, 1], bool), kl=[0.0, 0.1, 0.2, 0.3])])
    assert s["top1"] == 0.75
    assert s["kl_mean"] == pytest.approx(0.15)
    assert s["kl_rmse"] == pytest.approx(math.sqrt((0.01 + 0.04 + 0.09) / 4))
    assert s["kl_p95"] == pytest.approx(0.2 + 0.85 * 0.1)  # linear interpolation at rank 2.85
    assert s["kl_max"] == pytest.approx(0.3)
    d = [0.0, 1.0, 1.0, math.log(6)]
    assert s["dlogp_mean"] == pytest.approx(sum(d) / 4)
    assert s["dlogp_max"] == pytest.approx(math.log(6))
    assert s["mean_exp_abs_dlogp"] == pytest.approx((1 + math.e + math.e + 6) / 4)
    assert s["frac_outside_2x"] == 0.75 and s["frac_outside_5x"] == 0.25


def test_kl_fields_absent_without_full_distributions():
    s = M.summarize([tokens([-1.0], [-1.5])])
    assert s["kl_mean"] is None and s["kl_max"] is None
    assert s["dppl"] == pytest.approx(math.exp(0.5) - 1)


def test_fp16_underflow_is_clamped_and_counted():
    t = tokens([-1.0, -float("inf")], [-float("inf"), -2.0])
    assert t.ref_logprob[1] == M.LOGPROB_FLOOR and t.alt_logprob[0] == M.LOGPROB_FLOOR
    s = M.summarize([t])
    assert s["underflow_ref"] == 1 and s["underflow_alt"] == 1
    assert math.isfinite(s["dppl"]) and math.isfinite(s["ess"])


def test_nan_logprobs_are_refused():
    with pytest.raises(ValueError, match="NaN"):
        tokens([float("nan")], [-1.0])


def test_empty_selection_raises():
    t = tokens([-1.0, -2.0], [-1.0, -2.0])
    with pytest.raises(M.EmptyEvaluationError):
        M.summarize([t], masks=[np.zeros(2, bool)])
    with pytest.raises(M.EmptyEvaluationError):
        M.summarize([])
    with pytest.raises(M.EmptyEvaluationError):
        M.delta_ppl([], [])


def test_mask_selects_positions():
    t = tokens([-1.0, -2.0], [-1.0, -3.0])
    s = M.summarize([t], masks=[np.array([True, False])])
    assert s["dppl"] == 0.0 and s["eval_tokens"] == 1


def test_bootstrap_is_seeded_and_brackets_the_estimate():
    rng = np.random.default_rng(1)
    ps = [tokens(-rng.random(16) * 4, -rng.random(16) * 4) for _ in range(6)]
    a = M.summarize(ps, seed=3)
    b = M.summarize(ps, seed=3)
    c = M.summarize(ps, seed=4)
    assert a["dppl_ci95"] == b["dppl_ci95"] != c["dppl_ci95"]
    lo, hi = a["dppl_ci95"]
    assert lo < a["dppl"] < hi


def test_bootstrap_single_passage_is_degenerate():
    lo, hi = M.bootstrap_dppl_ci([10.0], [11.0], [4])
    assert lo == hi == pytest.approx(math.expm1(0.25))


def test_shape_mismatch_is_refused():
    with pytest.raises(ValueError, match="one length"):
        M.PassageTokens(np.zeros(3), np.zeros(2), np.ones(3, bool))


@pytest.mark.parametrize(
    "dppl, ci, top1, top1_ci, expected",
    [
        (0.005, (0.001, 0.009), 0.97, (0.96, 0.98), "ACCEPT"),
        # the point is inside but the CI reaches past 1%: no longer ACCEPT
        (0.0088, (0.0031, 0.0156), 0.969, (0.96, 0.975), "MARGINAL"),
        (-0.005, (-0.011, 0.0), 0.97, (0.96, 0.98), "MARGINAL"),
        # top-1 above 95% but its CI's lower bound below
        (0.002, (0.0, 0.004), 0.9517, (0.947, 0.956), "MARGINAL"),
        (0.05, (0.04, 0.06), 0.99, (0.98, 1.0), "REJECT"),
        (0.002, (0.0, 0.004), 0.80, (0.78, 0.82), "REJECT"),
        (0.002, (float("nan"), 0.004), 0.97, (0.96, 0.98), "REJECT"),
    ],
)
def test_verdict_with_uncertainty(dppl, ci, top1, top1_ci, expected):
    assert M.verdict(dppl, top1, ci, top1_ci) == expected


def _passages(rng, misses, tokens=64, noise=0.01):
    out = []
    for m in misses:
        ref = -rng.gamma(2.0, 1.0, tokens)
        alt = ref + rng.normal(0, noise, tokens)
        out.append(M.PassageTokens(ref, alt, np.arange(tokens) >= m))
    return out


def test_summary_reports_top1_ci_and_both_verdicts():
    misses = [0, 6, 1, 5, 2, 4, 3, 3] * 2  # 3 of 64 on average: top-1 95.31%
    s = M.summarize(_passages(np.random.default_rng(0), misses), seed=3)
    lo, hi = s["top1_ci95"]
    assert s["top1"] == pytest.approx(1 - 3 / 64)
    assert lo < s["top1"] < hi and lo < 0.95
    # ACCEPT by the old point rule, but top-1's CI reaches below 95%
    assert s["verdict_point"] == "ACCEPT" and s["verdict"] == "MARGINAL"
    assert s["verdict"] == M.verdict(s["dppl"], s["top1"], s["dppl_ci95"], s["top1_ci95"])
    again = M.summarize(_passages(np.random.default_rng(0), misses), seed=3)
    assert again["top1_ci95"] == s["top1_ci95"]
    sure = M.summarize(_passages(np.random.default_rng(0), [0, 1] * 8), seed=3)
    assert sure["top1_ci95"][0] >= 0.95 and sure["verdict"] == "ACCEPT"


def test_top1_ci_resamples_passages_like_dppl():
    # one passage all wrong, three all right: the CI spans the passages' spread
    lo, hi = M.bootstrap_top1_ci([0, 10, 10, 10], [10, 10, 10, 10], seed=0)
    assert lo <= 0.5 and hi == 1.0
    assert M.bootstrap_top1_ci([5, 5], [10, 10]) == (0.5, 0.5)


def test_rl_mismatch_metrics_by_hand():
    ref = np.zeros(200)
    alt = np.zeros(200)
    alt[0] = -25.0  # clipped, not vetoed
    alt[1] = -35.0  # clipped and vetoed
    alt[2:100] = -0.1
    p = [
        M.PassageTokens(ref[:100], alt[:100], np.ones(100, bool)),
        M.PassageTokens(ref[100:], alt[100:], np.ones(100, bool)),
    ]
    s = M.summarize(p)
    assert s["frac_clipped"] == pytest.approx(2 / 200)
    assert s["frac_veto"] == pytest.approx(1 / 200)
    assert s["seq_veto"] == pytest.approx(0.5)
    # top 1% of 200 tokens = 2 tokens, carrying 60 of 69.8 nats
    assert s["dlogp_top1pct_mass"] == pytest.approx(60.0 / (60.0 + 98 * 0.1))
    assert s["seq_log_ratio_mean"] == pytest.approx((-60.0 - 9.8) / 2)
    assert s["seq_log_ratio_abs_max"] == pytest.approx(69.8)
    assert "p_alt/p_ref" in s["rho_orientation"]


def test_top_mass_edges():
    assert M.top_mass([0.0, 0.0]) == 0.0
    assert M.top_mass([1.0, 1.0, 1.0, 1.0], 0.5) == pytest.approx(0.5)
    with pytest.raises(M.EmptyEvaluationError):
        M.top_mass([])


def test_topk_lower_bound_is_never_the_full_kl():
    s = {"kl_mean": 0.01, "kl_rmse": 0.02, "kl_p95": 0.03, "kl_max": 0.5, "dppl": 0.0}
    out = M.as_topk_lower_bound(s)
    assert out["kl_topk_lb_mean"] == 0.01 and out["kl_topk_lb_max"] == 0.5
    assert all(out[k] is None for k in M.KL_FIELDS)


def test_per_passage_rows_name_the_passage_that_moves_the_ci():
    calm = tokens([-1.0, -1.0], [-1.0, -1.0], match=np.array([1, 1], bool), kl=[0.0, 0.0])
    hit = tokens([-1.0, -1.0], [-1.0, -3.0], match=np.array([1, 0], bool), kl=[0.0, 0.4])
    s = M.summarize([calm, hit, calm])
    rows = s["per_passage"]
    assert [r["tokens"] for r in rows] == [2, 2, 2]
    assert rows[0]["dppl"] == 0.0 and rows[2]["dppl"] == 0.0
    assert rows[1]["dppl"] == pytest.approx(math.expm1(1.0)) and rows[1]["top1"] == 0.5
    assert rows[1]["kl_mean"] == pytest.approx(0.2)
    assert M.summarize([tokens([-1.0], [-1.5])])["per_passage"][0]["kl_mean"] is None
