"""Quality metrics of a codec against the codec-off reference, for every engine.

An engine reports, per evaluated position of a passage, the log-probability of the true
next token under the reference (codec off) and the alternative (codec on), whether the
two argmax tokens agree, and optionally KL(ref‖alt) over the full distribution. These
go into :class:`PassageTokens` (directly, or from logits with
:func:`passage_tokens_from_logits`); :func:`summarize` pools them into every number
the harness prints, and :func:`verdict` turns Δppl and top-1 into ACCEPT / MARGINAL /
REJECT. All arithmetic is float64.

Conventions:
- Log-probabilities of ``-inf`` (an fp16 softmax that underflowed) or below
  :data:`LOGPROB_FLOOR` are raised to the floor and counted (``underflow_ref`` /
  ``underflow_alt``); NaN or ``+inf`` is an error.
- **Orientation of ρ.** On corpus text (teacher forcing) ``ρ = p_alt / p_ref`` of the true
  token, ``log ρ = log p_alt − log p_ref``: the weight that turns an expectation under the
  reference into one under the codec. An RL trainer that samples rollouts from a
  codec-on engine and trains the reference sees the inverse, ``p_ref / p_alt``, on tokens
  drawn from ``p_alt`` (``kakeya generate-eval`` reports that one). The symmetric metrics
  (|Δlog p|, the 2×/5× bands, clipped and veto fractions) are the same either way; ESS and
  k3 are not. Every record states ``rho_orientation``. ρ and ESS are computed in log space,
  so neither overflows.
- A selection with no tokens raises :class:`EmptyEvaluationError` rather than
  returning NaN that would look like a result.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

#: log of the smallest positive float32 (2^-149) is -103.28; anything below is "zero".
LOGPROB_FLOOR = -104.0

ACCEPT_DPPL, ACCEPT_TOP1 = 0.01, 0.95
MARGINAL_DPPL, MARGINAL_TOP1 = 0.03, 0.85
#: The verdict (one definition): ACCEPT needs the uncertainty inside the bounds, not the point.
VERDICT_RULE = (
    f"ACCEPT if the 95% CI of dppl lies within +-{ACCEPT_DPPL:.0%} and the lower bound of top-1's 95% CI "
    f">= {ACCEPT_TOP1:.0%}; MARGINAL if |dppl| <= {MARGINAL_DPPL:.0%} and top1 >= {MARGINAL_TOP1:.0%} "
    "(point estimates); REJECT otherwise. CIs: percentile bootstrap over passages"
)
#: The rule of reports before the protocol (point estimates only), kept for comparison.
VERDICT_POINT_RULE = (
    f"ACCEPT if |dppl| <= {ACCEPT_DPPL:.0%} and top1 >= {ACCEPT_TOP1:.0%}; "
    f"MARGINAL if |dppl| <= {MARGINAL_DPPL:.0%} and top1 >= {MARGINAL_TOP1:.0%}; REJECT otherwise"
)
#: RL mismatch clamps: a token whose |log ρ| exceeds CLIP_NATS is clipped by a truncated
#: importance-sampling trainer; beyond VETO_NATS its sequence is vetoed (dropped).
CLIP_NATS, VETO_NATS = 20.0, 30.0
RHO_ORIENTATION = "p_alt/p_ref on corpus tokens (teacher forcing)"

BOOTSTRAP_SAMPLES = 2000


class EmptyEvaluationError(ValueError):
    """No evaluated token is selected, so no metric is defined."""


def verdict(dppl: float, top1: float, dppl_ci95=None, top1_ci95=None) -> str:
    """ACCEPT / MARGINAL / REJECT (see :data:`VERDICT_RULE`); NaN inputs are REJECT.

    Without the two CIs this is the point-estimate rule (:data:`VERDICT_POINT_RULE`).
    """
    values = [dppl, top1, *(dppl_ci95 or ()), *(top1_ci95 or ())]
    if not all(v is not None and math.isfinite(v) for v in values):
        return "REJECT"
    if dppl_ci95 is None or top1_ci95 is None:
        accept = abs(dppl) <= ACCEPT_DPPL and top1 >= ACCEPT_TOP1
    else:
        lo, hi = dppl_ci95
        accept = -ACCEPT_DPPL <= lo and hi <= ACCEPT_DPPL and top1_ci95[0] >= ACCEPT_TOP1
    if accept:
        return "ACCEPT"
    if abs(dppl) <= MARGINAL_DPPL and top1 >= MARGINAL_TOP1:
        return "MARGINAL"
    return "REJECT"


KL_FIELDS = ("kl_mean", "kl_rmse", "kl_p95", "kl_max")


def as_topk_lower_bound(summary: dict) -> dict:
    """Rename the KL fields of a summary whose KL was lumped over the top-k tokens (vLLM's
    prompt log-probs) to ``kl_topk_lb_*`` and null the full-KL fields, so a top-k lower bound
    is never tabulated as the full-vocabulary KL."""
    out = dict(summary)
    for k in KL_FIELDS:
        out["kl_topk_lb_" + k[3:]] = out.get(k)
        out[k] = None
    return out


def clamp_logprobs(x, name: str = "log-probabilities") -> tuple[np.ndarray, int]:
    """Return ``(float64 copy with values below the floor raised to it, how many were raised)``."""
    a = np.asarray(x, dtype=np.float64).copy()
    if np.isnan(a).any() or np.isposinf(a).any():
        raise ValueError(f"{name} contain NaN or +inf")
    low = a < LOGPROB_FLOOR
    a[low] = LOGPROB_FLOOR
    return a, int(low.sum())


@dataclass
class PassageTokens:
    """Per-position results of one passage (length ``n``; all arrays 1-D).

    Attributes:
        ref_logprob: log p_ref of the true next token.
        alt_logprob: log p_alt of the true next token.
        top1_match: argmax of ref equals argmax of alt.
        kl: KL(ref‖alt) per position over the full vocabulary, or None if the engine
            cannot provide it (then the KL fields are None).

    Log-probabilities are clamped to :data:`LOGPROB_FLOOR` on construction; positions at
    the floor are reported as underflow by :func:`summarize`.
    """

    ref_logprob: np.ndarray
    alt_logprob: np.ndarray
    top1_match: np.ndarray
    kl: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.ref_logprob, _ = clamp_logprobs(self.ref_logprob, "reference log-probabilities")
        self.alt_logprob, _ = clamp_logprobs(self.alt_logprob, "codec log-probabilities")
        self.top1_match = np.asarray(self.top1_match, dtype=bool)
        n = self.ref_logprob.shape
        if self.ref_logprob.ndim != 1 or self.alt_logprob.shape != n or self.top1_match.shape != n:
            raise ValueError(
                f"per-position arrays must be 1-D of one length, got {self.ref_logprob.shape}, "
                f"{self.alt_logprob.shape}, {self.top1_match.shape}"
            )
        if self.kl is not None:
            self.kl = np.asarray(self.kl, dtype=np.float64)
            if self.kl.shape != n:
                raise ValueError(f"kl has shape {self.kl.shape}, expected {n}")
            if np.isnan(self.kl).any():
                raise ValueError("kl contains NaN")

    def __len__(self) -> int:
        return int(self.ref_logprob.shape[0])

    def select(self, mask) -> PassageTokens:
        """The positions where ``mask`` is true."""
        m = np.asarray(mask, dtype=bool)
        if m.shape != self.ref_logprob.shape:
            raise ValueError(f"mask has shape {m.shape}, expected {self.ref_logprob.shape}")
        return PassageTokens(
            self.ref_logprob[m],
            self.alt_logprob[m],
            self.top1_match[m],
            None if self.kl is None else self.kl[m],
        )


def _chunk_stats(ref_logits, alt_logits, targets):
    """log p of the targets under both, argmax agreement and KL(ref‖alt), for a few rows (float64)."""
    import torch

    lp_ref = torch.log_softmax(ref_logits.double(), dim=-1).clamp_min_(LOGPROB_FLOOR)
    lp_alt = torch.log_softmax(alt_logits.double(), dim=-1).clamp_min_(LOGPROB_FLOOR)
    kl = (lp_ref.exp() * (lp_ref - lp_alt)).sum(-1).clamp_min_(0.0)
    if targets is None:
        return None, None, None, kl
    idx = targets[:, None]
    match = ref_logits.argmax(-1) == alt_logits.argmax(-1)
    return lp_ref.gather(1, idx)[:, 0], lp_alt.gather(1, idx)[:, 0], match, kl


def kl_from_logits(ref_logits, alt_logits, chunk: int = 64):
    """KL(ref‖alt) per row of two ``[n, vocab]`` logit tensors, in float64 (torch)."""
    import torch

    out = [
        _chunk_stats(ref_logits[i : i + chunk], alt_logits[i : i + chunk], None)[3]
        for i in range(0, ref_logits.shape[0], chunk)
    ]
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


def passage_tokens_from_logits(ref_logits, alt_logits, targets, chunk: int = 64) -> PassageTokens:
    """Build :class:`PassageTokens` from ``[n, vocab]`` logits and ``[n]`` true next tokens.

    Log-softmax is taken in float64, ``chunk`` rows at a time (memory stays small).
    """
    import torch

    if ref_logits.shape != alt_logits.shape or ref_logits.ndim != 2:
        raise ValueError(
            f"logits must be [n, vocab] of one shape, got {ref_logits.shape} and {alt_logits.shape}"
        )
    targets = torch.as_tensor(targets, dtype=torch.long).reshape(-1)
    if targets.shape[0] != ref_logits.shape[0]:
        raise ValueError(f"{targets.shape[0]} targets for {ref_logits.shape[0]} positions")
    parts = [
        _chunk_stats(ref_logits[i : i + chunk], alt_logits[i : i + chunk], targets[i : i + chunk])
        for i in range(0, ref_logits.shape[0], chunk)
    ]
    if not parts:
        empty = np.zeros(0)
        return PassageTokens(empty, empty, np.zeros(0, bool), empty)
    lp_ref, lp_alt, match, kl = (torch.cat(col) for col in zip(*parts, strict=True))
    return PassageTokens(lp_ref.numpy(), lp_alt.numpy(), match.numpy(), kl.numpy())


def delta_ppl(ref_logprob, alt_logprob) -> float:
    """``ppl_alt / ppl_ref − 1`` from pooled NLL: ``exp(mean(−alt) − mean(−ref)) − 1``."""
    ref, alt = np.asarray(ref_logprob, np.float64), np.asarray(alt_logprob, np.float64)
    if ref.size == 0:
        raise EmptyEvaluationError("no tokens to compute perplexity on")
    return math.expm1(float(np.mean(ref) - np.mean(alt)))


def bootstrap_dppl_ci(
    nll_ref_sums,
    nll_alt_sums,
    counts,
    *,
    samples: int = BOOTSTRAP_SAMPLES,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float]:
    """Percentile bootstrap CI of pooled Δppl, resampling passages with replacement.

    Args:
        nll_ref_sums, nll_alt_sums: per-passage sums of −log p of the true tokens.
        counts: per-passage token counts (passages with 0 tokens are ignored).
    """
    return _pooled_bootstrap(
        lambda ref, alt, n: np.expm1((alt - ref) / n),
        (nll_ref_sums, nll_alt_sums),
        counts,
        samples=samples,
        seed=seed,
        level=level,
    )


def _pooled_bootstrap(stat, sums, counts, *, samples: int, seed: int, level: float) -> tuple[float, float]:
    """Percentile CI of ``stat(*pooled sums, pooled count)`` over passage resamples drawn with
    replacement (one seeded draw: every statistic of one summary sees the same resamples)."""
    n = np.asarray(counts, np.float64)
    keep = n > 0
    cols = [np.asarray(x, np.float64)[keep] for x in sums]
    n = n[keep]
    if n.size == 0:
        raise EmptyEvaluationError("no passage has evaluated tokens")
    idx = np.random.default_rng(seed).integers(0, n.size, size=(samples, n.size))
    boot = stat(*(c[idx].sum(1) for c in cols), n[idx].sum(1))
    tail = (1.0 - level) / 2 * 100
    lo, hi = np.percentile(boot, [tail, 100 - tail])
    return float(lo), float(hi)


def bootstrap_top1_ci(
    matches,
    counts,
    *,
    samples: int = BOOTSTRAP_SAMPLES,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float]:
    """Percentile bootstrap CI of pooled top-1 agreement, resampling passages with replacement.

    The same seed draws the same passage resamples as :func:`bootstrap_dppl_ci`.

    Args:
        matches: per-passage counts of positions whose argmax tokens agree.
        counts: per-passage token counts (passages with 0 tokens are ignored).
    """
    return _pooled_bootstrap(lambda m, n: m / n, (matches,), counts, samples=samples, seed=seed, level=level)


def top_mass(abs_values, share: float = 0.01) -> float:
    """Share of ``sum(abs_values)`` carried by the largest ``share`` of them (at least one)."""
    a = np.sort(np.asarray(abs_values, np.float64))[::-1]
    if a.size == 0:
        raise EmptyEvaluationError("mass of zero tokens")
    total = float(a.sum())
    if total == 0.0:
        return 0.0
    k = max(1, math.ceil(share * a.size))
    return float(a[:k].sum() / total)


def log_ess(log_rho) -> float:
    """log of the normalised effective sample size (Σρ)² / (N Σρ²), from log ρ."""
    lr = np.asarray(log_rho, np.float64)
    if lr.size == 0:
        raise EmptyEvaluationError("ESS of zero tokens")
    lse1 = np.logaddexp.reduce(lr)
    lse2 = np.logaddexp.reduce(2 * lr)
    return float(2 * lse1 - math.log(lr.size) - lse2)


def effective_sample_size(log_rho) -> float:
    """(Σρ)² / (N Σρ²) ∈ (0, 1]; 1 when all ρ are equal."""
    return math.exp(log_ess(log_rho))


def fraction_outside(log_rho, factor: float) -> float:
    """Share of tokens with ρ outside ``[1/factor, factor]``."""
    lr = np.asarray(log_rho, np.float64)
    if lr.size == 0:
        raise EmptyEvaluationError("band fraction of zero tokens")
    return float(np.mean(np.abs(lr) > math.log(factor)))


def k3_kl(log_rho) -> float:
    """The k3 estimator of KL: mean(ρ − log ρ − 1) = mean(expm1(log ρ) − log ρ)."""
    lr = np.asarray(log_rho, np.float64)
    if lr.size == 0:
        raise EmptyEvaluationError("k3 of zero tokens")
    with np.errstate(over="ignore"):
        return float(np.mean(np.expm1(lr) - lr))


def pearson(a, b) -> float:
    """Pearson correlation; 1.0 for identical inputs, NaN if one side is constant otherwise."""
    x, y = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if x.size == 0:
        raise EmptyEvaluationError("correlation of zero tokens")
    if np.array_equal(x, y):
        return 1.0
    xc, yc = x - x.mean(), y - y.mean()
    den = math.sqrt(float(np.dot(xc, xc)) * float(np.dot(yc, yc)))
    return float(np.dot(xc, yc) / den) if den > 0 else float("nan")


def summarize(
    passages: Sequence[PassageTokens],
    *,
    masks: Sequence | None = None,
    bootstrap_samples: int = BOOTSTRAP_SAMPLES,
    seed: int = 0,
) -> dict:
    """Every metric of the harness over a list of passages.

    Args:
        passages: one :class:`PassageTokens` per passage.
        masks: optional boolean mask per passage selecting the positions to use.
        bootstrap_samples: resamples for the Δppl confidence interval.
        seed: seed of the bootstrap.

    Returns:
        A flat dict: ``passages, eval_tokens, nll_ref, nll_alt, ppl_ref, ppl_alt, dppl,
        dppl_ci95, top1, top1_ci95, kl_mean, kl_rmse, kl_p95, kl_max, dlogp_mean, dlogp_max,
        ess, frac_outside_2x, frac_outside_5x, frac_clipped, frac_veto, seq_veto,
        dlogp_top1pct_mass, seq_log_ratio_mean, seq_log_ratio_abs_max, k3_kl,
        mean_exp_abs_dlogp, logprob_pearson, underflow_ref, underflow_alt, rho_orientation,
        verdict, verdict_rule, verdict_point, verdict_point_rule, per_passage`` (per passage:
        ``tokens, dppl, top1, kl_mean``, in passage order). ``kl_p95`` uses linear
        interpolation between order statistics. ``frac_clipped`` / ``frac_veto``: share of
        tokens with |log ρ| beyond :data:`CLIP_NATS` / :data:`VETO_NATS`; ``seq_veto``: share
        of passages holding such a token; ``seq_log_ratio_*``: Σ log ρ per passage.

    Raises:
        EmptyEvaluationError: no position is selected.
    """
    if masks is not None:
        if len(masks) != len(passages):
            raise ValueError(f"{len(masks)} masks for {len(passages)} passages")
        passages = [p.select(m) for p, m in zip(passages, masks, strict=True)]
    if not passages or sum(len(p) for p in passages) == 0:
        raise EmptyEvaluationError("no evaluated tokens selected")
    ref = np.concatenate([p.ref_logprob for p in passages])
    alt = np.concatenate([p.alt_logprob for p in passages])
    match = np.concatenate([p.top1_match for p in passages])
    log_rho = alt - ref
    abs_d = np.abs(log_rho)
    nll_ref, nll_alt = float(-ref.mean()), float(-alt.mean())
    dppl = math.expm1(nll_alt - nll_ref)
    lo, hi = bootstrap_dppl_ci(
        [-p.ref_logprob.sum() for p in passages],
        [-p.alt_logprob.sum() for p in passages],
        [len(p) for p in passages],
        samples=bootstrap_samples,
        seed=seed,
    )
    top1 = float(match.mean())
    top1_lo, top1_hi = bootstrap_top1_ci(
        [p.top1_match.sum() for p in passages], [len(p) for p in passages], samples=bootstrap_samples, seed=seed
    )
    seq_lr = np.array([float((p.alt_logprob - p.ref_logprob).sum()) for p in passages if len(p)])
    # what drives a wide CI is usually one passage: each one's share, in passage order
    per_passage = [
        {
            "tokens": len(p),
            "dppl": delta_ppl(p.ref_logprob, p.alt_logprob) if len(p) else None,
            "top1": float(p.top1_match.mean()) if len(p) else None,
            "kl_mean": float(p.kl.mean()) if len(p) and p.kl is not None else None,
        }
        for p in passages
    ]
    veto = [bool((np.abs(p.alt_logprob - p.ref_logprob) > VETO_NATS).any()) for p in passages if len(p)]
    out = {
        "passages": len(passages),
        "eval_tokens": int(ref.size),
        "nll_ref": nll_ref,
        "nll_alt": nll_alt,
        "ppl_ref": math.exp(nll_ref),
        "ppl_alt": math.exp(nll_alt),
        "dppl": dppl,
        "dppl_ci95": [lo, hi],
        "top1": top1,
        "top1_ci95": [top1_lo, top1_hi],
        "per_passage": per_passage,
    }
    if all(p.kl is not None for p in passages):
        kl = np.concatenate([p.kl for p in passages])
        out |= {
            "kl_mean": float(kl.mean()),
            "kl_rmse": float(np.sqrt(np.mean(kl**2))),
            "kl_p95": float(np.percentile(kl, 95)),
            "kl_max": float(kl.max()),
        }
    else:
        out |= {"kl_mean": None, "kl_rmse": None, "kl_p95": None, "kl_max": None}
    out |= {
        "dlogp_mean": float(abs_d.mean()),
        "dlogp_max": float(abs_d.max()),
        "ess": effective_sample_size(log_rho),
        "frac_outside_2x": fraction_outside(log_rho, 2.0),
        "frac_outside_5x": fraction_outside(log_rho, 5.0),
        "frac_clipped": float(np.mean(abs_d > CLIP_NATS)),
        "frac_veto": float(np.mean(abs_d > VETO_NATS)),
        "seq_veto": float(np.mean(veto)),
        "dlogp_top1pct_mass": top_mass(abs_d, 0.01),
        "seq_log_ratio_mean": float(seq_lr.mean()),
        "seq_log_ratio_abs_max": float(np.abs(seq_lr).max()),
        "k3_kl": k3_kl(log_rho),
        "mean_exp_abs_dlogp": float(np.mean(np.exp(abs_d))),
        "logprob_pearson": pearson(ref, alt),
        "underflow_ref": int((ref <= LOGPROB_FLOOR).sum()),
        "underflow_alt": int((alt <= LOGPROB_FLOOR).sum()),
        "rho_orientation": RHO_ORIENTATION,
        "verdict": verdict(dppl, top1, (lo, hi), (top1_lo, top1_hi)),
        "verdict_rule": VERDICT_RULE,
        "verdict_point": verdict(dppl, top1),
        "verdict_point_rule": VERDICT_POINT_RULE,
    }
    return out
