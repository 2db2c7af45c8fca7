"""``kakeya generate-eval``: what a user sees when generating with a compressed cache (issue 22).

Every method runs as a real transformers ``Cache`` during generation, with its own
incremental encoding (prefill, then one token per step): ``dynamic`` (``DynamicCache``,
the reference), ``kakeya:<preset>`` (:class:`kakeya_py.generation.cache.KakeyaCache`), peers as
caches (:class:`kakeya_py.generation.peer_cache.PeerCache`: ``kivi-4``, ``int4``, ``turbo-4`` ...) and
``quanto`` (transformers' ``QuantizedCache``, when ``optimum-quanto`` is importable).

Four measurements, each with 95% percentile-bootstrap CIs over prompts (2000 resamples):

1. **Trajectory** (teacher forcing along the reference). ``--prompts`` prompts of
   ``--prompt-tokens`` tokens from the text part (``make_passages``: disjoint windows spread
   over the part); the reference generates ``--gen-tokens`` greedy tokens with
   ``DynamicCache``; each method's cache is prefilled with the prompt and then fed the
   reference's tokens one at a time. Per generated position: top-1 agreement (the method's
   argmax equals the reference token) and KL(ref‖method) over the full vocabulary (float64);
   mean, rmse, p95, max, and by position.
2. **Free-running**. The method generates greedily from the same prompt with its own
   tokens: first-divergence position (``gen_tokens`` when it never diverges, counted as
   such), and the reference model's NLL per token of the method's own continuation,
   against the NLL of the reference's greedy continuation.
3. **Retrieval at length**. Synthetic pass-key retrieval (:func:`build_haystacks`): a
   haystack of the text part of exactly ``context`` tokens holds ``--needles`` needles
   ``"The special magic {label} number is: {key}."`` (five-digit keys, distinct colour
   labels) at stratified random depths; each needle is asked for in turn
   (``"What is the special magic {label} number? The special magic {label} number is:"``).
   The haystack is prefilled in one call (so the cache has encoded it), then each question
   with the key appended is one call and the cache is cropped back. A trial is correct when
   the argmax at every answer position is the key's next token, i.e. greedy decoding would
   write the key exactly. Accuracy with Wilson 95% intervals, against the ``dynamic``
   baseline on the same trials. Chance: 1/90000 for a guessed key, ``1/needles`` for
   picking one of the keys in context.
4. **RL view**. The method samples ``--gen-tokens`` tokens at temperature 1 (Gumbel-max
   with the same noise for every method); the uncompressed model scores them;
   ``log ρ = log p_ref − log p_method`` (``p_ref / p_alt``: the importance ratio of a trainer
   that samples from the compressed engine and trains the reference). Per token and per
   sequence (Σ log ρ): ESS, k3 (an estimate of KL(method‖ref)), |Δ log p| mean / max, shares
   outside [1/2, 2] and [1/5, 5], clipped / veto shares (:data:`kakeya_py.eval.metrics.CLIP_NATS`,
   :data:`~kakeya_py.eval.metrics.VETO_NATS`), share of Σ|Δ log p| in the top 1%.

The three prompt runs of a method share one prefill: the cache is prefilled with the
prompts and then repeated three times along the batch (``batch_repeat_interleave``), one
row each for teacher forcing, free running and sampling, decoded in one forward per step.

**Verdict** (:func:`generation_verdict`, :data:`GENERATION_VERDICT_RULE`): ACCEPT iff the
lower bound of teacher-forced top-1's CI is ≥ 95% and retrieval accuracy is within 5 points
of the baseline at every context length; MARGINAL iff top-1 ≥ 90% and retrieval within 10
points; REJECT otherwise.

``KakeyaCache`` runs with ``decoded_budget_bytes=None`` (each chunk decoded once and kept):
the values attention reads are the same as decoding every step (the decoder is
deterministic); only memory and speed differ, and the bytes reported leave the kept
decoded tensors out.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..eval.report import fmt_num

TF_TOP1_BOUND = 0.95
RETRIEVAL_POINTS = 0.05
MARGINAL_TOP1, MARGINAL_POINTS = 0.90, 0.10
GENERATION_VERDICT_RULE = (
    f"ACCEPT iff the lower bound of teacher-forced top-1's 95% CI >= {TF_TOP1_BOUND:.0%} and retrieval "
    f"accuracy >= baseline - {RETRIEVAL_POINTS * 100:.0f} points at every context length; MARGINAL iff "
    f"teacher-forced top-1 >= {MARGINAL_TOP1:.0%} and retrieval >= baseline - {MARGINAL_POINTS * 100:.0f} "
    "points at every length; REJECT otherwise (INCOMPLETE where either was not measured)"
)
BOOTSTRAP_SAMPLES = 2000
NEEDLE_LABELS = ("red", "blue", "green", "yellow", "purple", "orange", "white", "black")
DEFAULT_METHODS = "dynamic,kivi-4,int4,turbo-4,kakeya:recommended"
DEFAULT_CONTEXTS = "1024,2048,4096,8192"


class GenerationEvalError(ValueError):
    """An invalid request for ``generate-eval`` (methods, lengths, text too short)."""


# -- statistics ----------------------------------------------------------------------------------
def wilson_ci(correct: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """Wilson score interval of a proportion ``correct / n`` (95% by default)."""
    if n <= 0:
        raise GenerationEvalError("Wilson interval of zero trials")
    if not 0 <= correct <= n:
        raise GenerationEvalError(f"{correct} correct of {n} trials")
    p = correct / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    lo = 0.0 if correct == 0 else max(0.0, mid - half)
    hi = 1.0 if correct == n else min(1.0, mid + half)
    return lo, hi


def bootstrap_ci(
    per_prompt: Sequence[np.ndarray],
    stat,
    *,
    samples: int = BOOTSTRAP_SAMPLES,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float]:
    """Percentile bootstrap CI of ``stat(concatenated arrays)``, resampling prompts with replacement."""
    n = len(per_prompt)
    if n == 0:
        raise GenerationEvalError("bootstrap over zero prompts")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(samples, n))
    vals = np.array([stat(np.concatenate([per_prompt[i] for i in row])) for row in idx], dtype=np.float64)
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(vals, [tail, 100 - tail])
    return float(lo), float(hi)


def generation_verdict(tf_top1_ci95: Sequence[float] | None, tf_top1: float | None, retrieval_deltas) -> str:
    """ACCEPT / MARGINAL / REJECT by :data:`GENERATION_VERDICT_RULE`.

    Args:
        tf_top1_ci95: the teacher-forced top-1 CI (None: not measured, then REJECT).
        tf_top1: the point estimate.
        retrieval_deltas: accuracy − baseline accuracy at each measured context length
            (empty: no retrieval measured).

    Returns ``INCOMPLETE`` when the trajectory or the retrieval was not measured (a run of one
    part only; ``--merge`` it with the other).
    """
    deltas = list(retrieval_deltas)
    if tf_top1_ci95 is None or tf_top1 is None or not deltas:
        return "INCOMPLETE"
    values = [*tf_top1_ci95, tf_top1, *deltas]
    if not all(math.isfinite(v) for v in values):
        return "REJECT"
    worst = min(deltas)
    eps = 1e-12
    if tf_top1_ci95[0] >= TF_TOP1_BOUND and worst >= -RETRIEVAL_POINTS - eps:
        return "ACCEPT"
    if tf_top1 >= MARGINAL_TOP1 and worst >= -MARGINAL_POINTS - eps:
        return "MARGINAL"
    return "REJECT"


def rl_metrics(log_rho_rows: Sequence[np.ndarray]) -> dict[str, Any]:
    """RL mismatch metrics of ``log ρ = log p_ref − log p_alt`` per token and per sequence.

    Args:
        log_rho_rows: one array of per-token log ρ per sampled sequence.
    """
    from ..eval.metrics import CLIP_NATS, VETO_NATS, effective_sample_size, fraction_outside, k3_kl, top_mass

    rows = [np.asarray(r, np.float64) for r in log_rho_rows]
    tok = np.concatenate(rows)
    seq = np.array([float(r.sum()) for r in rows])

    def block(lr: np.ndarray) -> dict[str, float]:
        a = np.abs(lr)
        return {
            "ess": effective_sample_size(lr),
            "k3": k3_kl(lr),
            "dlogp_mean": float(a.mean()),
            "dlogp_max": float(a.max()),
            "frac_outside_2x": fraction_outside(lr, 2.0),
            "frac_outside_5x": fraction_outside(lr, 5.0),
            "frac_clipped": float(np.mean(a > CLIP_NATS)),
            "frac_veto": float(np.mean(a > VETO_NATS)),
            "top1pct_mass": top_mass(a, 0.01),
        }

    per_token = block(tok) | {"tokens": int(tok.size)}
    per_sequence = block(seq) | {
        "sequences": len(rows),
        "seq_veto": float(np.mean([bool((np.abs(r) > VETO_NATS).any()) for r in rows])),
    }
    return {
        "per_token": per_token,
        "per_sequence": per_sequence,
        "rho_orientation": "p_ref/p_alt on tokens sampled from the method's cache at temperature 1",
        "clip_nats": CLIP_NATS,
        "veto_nats": VETO_NATS,
    }


# -- methods as caches -----------------------------------------------------------------------------
@dataclass
class CacheSettings:
    """The window options every compressed cache gets (``KakeyaCache``'s meaning)."""

    residual_length: int = 64
    block_tokens: int = 128
    peer_sink_tokens: int = 0
    quanto_bits: int = 4
    threads: int | None = None
    force_model: bool = False  # apply a kakeya preset made for another model where it fits


def parse_methods(text: str) -> list[str]:
    """``dynamic`` first, then the listed methods (each checked now, not mid-run)."""
    from ..cli.sweep import split_methods
    from ..peers import parse_method
    from ..policy import load_policy

    try:
        methods = split_methods(text)
    except SystemExit as exc:
        raise GenerationEvalError(str(exc)) from None
    for m in methods:
        if m in ("dynamic", "quanto"):
            continue
        if m.startswith("kakeya:"):
            load_policy(m.split(":", 1)[1])
            continue
        try:
            parse_method(m)
        except ValueError as exc:
            raise GenerationEvalError(
                f"method {m!r}: expected dynamic, quanto, kakeya:<preset> or a peer ({exc})"
            ) from None
    return ["dynamic", *[m for m in methods if m != "dynamic"]]


def quanto_available() -> str | None:
    """None when transformers' quanto ``QuantizedCache`` can run here, else why not."""
    try:
        import optimum.quanto  # noqa: F401
    except Exception as exc:  # not installed, or broken against this torch
        return f"optimum-quanto not importable ({type(exc).__name__}: {exc})"
    return None


def make_cache(method: str, model, settings: CacheSettings):
    """A fresh cache for ``method`` (see the module doc)."""
    from transformers import DynamicCache

    if method == "dynamic":
        return DynamicCache()
    if method == "quanto":
        why = quanto_available()
        if why:
            raise GenerationEvalError(why)
        from transformers import QuantizedCache

        return QuantizedCache(
            "quanto",
            model.config,
            nbits=settings.quanto_bits,
            q_group_size=64,
            residual_length=settings.residual_length,
        )
    if method.startswith("kakeya:"):
        from .cache import KakeyaCache

        return KakeyaCache(
            method.split(":", 1)[1],
            model,
            residual_length=settings.residual_length,
            block_tokens=settings.block_tokens,
            decoded_budget_bytes=None,
            threads=settings.threads,
            force_model=settings.force_model,
        )
    from .peer_cache import PeerCache

    return PeerCache(
        method,
        model,
        residual_length=settings.residual_length,
        block_tokens=settings.block_tokens,
        sink_tokens=settings.peer_sink_tokens,
    )


def cache_bytes(cache) -> dict[str, Any] | None:
    """What a compressed cache holds (bytes it would store) vs ``DynamicCache``; None for others."""
    if not hasattr(cache, "nbytes"):
        return None
    nb = cache.nbytes()
    stored = nb["total_bytes"] - nb.get("decoded_bytes", 0)
    return {
        "stored_bytes": int(stored),
        "dynamic_cache_bytes": int(nb["dynamic_cache_bytes"]),
        "ratio_vs_dynamic": nb["dynamic_cache_bytes"] / stored if stored else None,
        "tokens": int(nb["tokens"]),
        "encoded_tokens": int(nb["encoded_tokens"]),
    }


def fills_from_reference(method: str) -> bool:
    """Whether ``method``'s cache can take the reference prefill's K/V through ``Cache.update``.

    True for ``dynamic`` and the peers (and quanto): their caches store post-RoPE K as the
    layer hands it over, and a prefill attends to its own tokens exactly, so filling them
    from the reference prefill gives the same cache as prefilling through them (tested), for
    one prefill instead of one per method. ``KakeyaCache`` captures RoPE tables during its
    own forward (pre-RoPE K), so it always prefills itself.
    """
    return not method.startswith("kakeya:")


def fill_from(cache, source) -> None:
    """``cache.update`` with every layer's K and V held by the ``DynamicCache`` ``source``."""
    for i, layer in enumerate(source.layers):
        if layer.keys is None or layer.keys.numel() == 0:
            raise GenerationEvalError(f"reference cache layer {i} is empty")
        cache.update(layer.keys, layer.values, i)


def _close(cache) -> None:
    close = getattr(cache, "close", None)
    if close is not None:
        close()


# -- trajectory, free running, RL sampling ------------------------------------------------------------
@dataclass
class PromptBatch:
    """``ids [b, P]`` and the reference's greedy continuation and logits."""

    ids: Any
    ref_tokens: Any = None  # [b, G] long
    ref_logits: Any = None  # [b, G, V] float32: the logits that predicted each ref token
    prompt_cache: Any = None  # DynamicCache holding exactly the prompts


@dataclass
class MethodBatch:
    """Per-prompt results of one method on one batch (numpy, one row per prompt)."""

    kl: np.ndarray  # [b, G]
    match: np.ndarray  # [b, G] bool
    free_tokens: np.ndarray  # [b, G]
    free_ref_logprob: np.ndarray  # [b, G]: log p_ref of the method's own greedy tokens
    sample_tokens: np.ndarray  # [b, G]
    sample_ref_logprob: np.ndarray  # [b, G]
    sample_alt_logprob: np.ndarray  # [b, G]
    bytes: dict[str, Any] | None = None
    ref_tokens: np.ndarray | None = None  # [b, G], the reference's greedy tokens


def _forward(model, ids, cache, *, last_only: bool = False):
    import torch

    with torch.no_grad():
        out = model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1 if last_only else 0)
    return out.logits


def reference_batch(model, ids, gen_tokens: int) -> PromptBatch:
    """Greedy continuation of ``ids [b, P]`` with ``DynamicCache`` and the logits of each step."""
    import copy

    import torch
    from transformers import DynamicCache

    cache = DynamicCache()
    logits = _forward(model, ids, cache, last_only=True)[:, -1].float()
    prompt_cache = copy.deepcopy(cache)
    steps, tokens = [logits], [logits.argmax(-1)]
    for _ in range(gen_tokens - 1):
        logits = _forward(model, tokens[-1][:, None], cache)[:, -1].float()
        steps.append(logits)
        tokens.append(logits.argmax(-1))
    return PromptBatch(ids, torch.stack(tokens, 1), torch.stack(steps, 1), prompt_cache)


def _score_with_reference(model, batch: PromptBatch, continuations):
    """log p_ref of each token of ``continuations [k·b, G]`` (rows grouped by prompt, k per prompt)."""
    import copy

    import torch

    b = batch.ids.shape[0]
    k = continuations.shape[0] // b
    cache = copy.deepcopy(batch.prompt_cache)
    if k > 1:
        cache.batch_repeat_interleave(k)
    first = torch.log_softmax(batch.ref_logits[:, 0].double(), -1).repeat_interleave(k, 0)
    lp0 = first.gather(1, continuations[:, :1])[:, 0]
    if continuations.shape[1] == 1:
        return lp0[:, None]
    logits = _forward(model, continuations[:, :-1], cache)
    lp = torch.log_softmax(logits.double(), -1).gather(2, continuations[:, 1:, None])[..., 0]
    return torch.cat([lp0[:, None], lp], 1)


def run_method_batch(
    model, method: str, batch: PromptBatch, settings: CacheSettings, *, seed: int
) -> MethodBatch:
    """Teacher forcing, free running and sampling for one method on one batch of prompts."""
    import torch

    from ..eval.metrics import kl_from_logits

    b, gen = batch.ref_tokens.shape
    cache = make_cache(method, model, settings)
    try:
        if fills_from_reference(method):
            fill_from(cache, batch.prompt_cache)
            logits = batch.ref_logits[:, 0].clone()
        else:
            logits = _forward(model, batch.ids, cache, last_only=True)[:, -1].float()
        cache.batch_repeat_interleave(3)  # rows 3i, 3i+1, 3i+2: teacher forcing, free, sampling
        logits = logits.repeat_interleave(3, 0)
        g = torch.Generator().manual_seed(seed)
        kl, match, free, samp, samp_lp = [], [], [], [], []
        for t in range(gen):
            tf, fr, sa = logits[0::3], logits[1::3], logits[2::3]
            ref = batch.ref_logits[:, t]
            kl.append(kl_from_logits(ref, tf))
            match.append(tf.argmax(-1) == batch.ref_tokens[:, t])
            free.append(fr.argmax(-1))
            gumbel = -torch.log(-torch.log(torch.rand(sa.shape, generator=g).clamp_(1e-20, 1.0)))
            s = (sa.double() + gumbel.double()).argmax(-1)
            samp.append(s)
            samp_lp.append(torch.log_softmax(sa.double(), -1).gather(1, s[:, None])[:, 0])
            if t + 1 == gen:
                break
            nxt = torch.stack([batch.ref_tokens[:, t], free[-1], s], 1).reshape(-1, 1)
            logits = _forward(model, nxt, cache)[:, -1].float()
        nbytes = cache_bytes(cache)
    finally:
        _close(cache)
    free_t, samp_t = torch.stack(free, 1), torch.stack(samp, 1)
    scored = _score_with_reference(model, batch, torch.stack([free_t, samp_t], 1).reshape(2 * b, gen))
    return MethodBatch(
        kl=torch.stack(kl, 1).numpy(),
        match=torch.stack(match, 1).numpy(),
        free_tokens=free_t.numpy(),
        free_ref_logprob=scored[0::2].numpy(),
        sample_tokens=samp_t.numpy(),
        sample_ref_logprob=scored[1::2].numpy(),
        sample_alt_logprob=torch.stack(samp_lp, 1).numpy(),
        bytes=nbytes,
    )


def first_divergence(tokens: np.ndarray, ref_tokens: np.ndarray) -> np.ndarray:
    """Per row, the first position where ``tokens`` differs from ``ref_tokens`` (length if none)."""
    diff = np.asarray(tokens) != np.asarray(ref_tokens)
    return np.where(diff.any(1), diff.argmax(1), diff.shape[1])


def summarize_trajectory(
    method: str,
    parts: Sequence[MethodBatch],
    ref_nll_rows: Sequence[np.ndarray],
    *,
    samples: int = BOOTSTRAP_SAMPLES,
    seed: int = 0,
) -> dict[str, Any]:
    """The ``trajectory`` row of one method (plus its by-position curves and free-running stats)."""
    kl = np.concatenate([p.kl for p in parts])
    match = np.concatenate([p.match for p in parts]).astype(np.float64)
    n, gen = kl.shape
    kl_rows, match_rows = list(kl), list(match)
    ref_tokens = np.concatenate([p.ref_tokens for p in parts])
    free = np.concatenate([p.free_tokens for p in parts])
    div = first_divergence(free, ref_tokens).astype(np.float64)
    own_nll = -np.concatenate([p.free_ref_logprob for p in parts]).mean(1)
    greedy_nll = np.concatenate([np.asarray(r) for r in ref_nll_rows])
    dnll = own_nll - greedy_nll
    boot = dict(samples=samples, seed=seed)
    by_pos = {
        "kl_mean": kl.mean(0).tolist(),
        "top1": match.mean(0).tolist(),
        "kl_mean_ci95": [
            list(bootstrap_ci([r[t : t + 1] for r in kl_rows], np.mean, samples=200, seed=seed))
            for t in range(gen)
        ],
    }
    return {
        "method": method,
        "prompts": int(n),
        "gen_tokens": int(gen),
        "tf_top1": float(match.mean()),
        "tf_top1_ci95": list(bootstrap_ci(match_rows, np.mean, **boot)),
        "kl_mean": float(kl.mean()),
        "kl_mean_ci95": list(bootstrap_ci(kl_rows, np.mean, **boot)),
        "kl_rmse": float(np.sqrt(np.mean(kl**2))),
        "kl_p95": float(np.percentile(kl, 95)),
        "kl_p95_ci95": list(bootstrap_ci(kl_rows, lambda a: np.percentile(a, 95), **boot)),
        "kl_max": float(kl.max()),
        "first_divergence_median": float(np.median(div)),
        "first_divergence_median_ci95": list(bootstrap_ci([d[None] for d in div], np.median, **boot)),
        "first_divergence_quartiles": [float(np.percentile(div, 25)), float(np.percentile(div, 75))],
        "never_diverged": float(np.mean(div == gen)),
        "first_divergence": div.astype(int).tolist(),
        "nll_own_continuation": float(own_nll.mean()),
        "nll_reference_greedy": float(greedy_nll.mean()),
        "dnll_own_vs_greedy": float(dnll.mean()),
        "dnll_own_vs_greedy_ci95": list(bootstrap_ci([d[None] for d in dnll], np.mean, **boot)),
        "by_position": by_pos,
        "cache_bytes": parts[-1].bytes,
    }


def summarize_rl(method: str, parts: Sequence[MethodBatch], *, samples: int = 1000, seed: int = 0) -> dict:
    """The ``rl`` row of one method: :func:`rl_metrics` with bootstrap CIs of the per-token ones."""
    from ..eval.metrics import effective_sample_size, k3_kl

    ref = np.concatenate([p.sample_ref_logprob for p in parts])
    alt = np.concatenate([p.sample_alt_logprob for p in parts])
    rows = list(ref - alt)
    out = {"method": method, **rl_metrics(rows)}
    boot = dict(samples=samples, seed=seed)
    out["per_token"]["ess_ci95"] = list(bootstrap_ci(rows, effective_sample_size, **boot))
    out["per_token"]["k3_ci95"] = list(bootstrap_ci(rows, k3_kl, **boot))
    out["per_token"]["dlogp_mean_ci95"] = list(bootstrap_ci(rows, lambda a: np.abs(a).mean(), **boot))
    out["nll_ref_of_samples"] = float(-ref.mean())
    out["nll_alt_of_samples"] = float(-alt.mean())
    return out


# -- retrieval ---------------------------------------------------------------------------------------
@dataclass
class Needle:
    label: str
    key: int
    depth: float  # requested depth in [0, 1)
    position: int  # token index of the needle's first token in the haystack
    question: list[int] = field(repr=False, default_factory=list)
    answer: list[int] = field(repr=False, default_factory=list)


@dataclass
class Haystack:
    context: int
    index: int
    tokens: list[int] = field(repr=False)
    offset: int  # where the filler text starts in the part's token stream
    needles: list[Needle]
    seed: int = 0  # the seed that drew it (with ``index``, it names the haystack across runs)


def _encode(tok, text: str) -> list[int]:
    return list(tok(text, add_special_tokens=False)["input_ids"])


def build_haystacks(
    tok,
    stream_ids: Sequence[int],
    contexts: Sequence[int],
    per_context: int | Sequence[int],
    needles: int,
    seed: int,
) -> list[Haystack]:
    """``per_context`` haystacks per context length (one count, or one per context), each of ``context − longest question and
    answer`` tokens, with ``needles`` needles at stratified random depths: needle ``j`` of
    haystack ``h`` lies in depth stratum ``j · per_context + h`` of ``needles · per_context``
    equal strata, so the needles of one haystack are in order and all depths are covered."""
    import random

    if needles < 1 or needles > len(NEEDLE_LABELS):
        raise GenerationEvalError(f"--needles must be 1..{len(NEEDLE_LABELS)}, got {needles}")
    counts = [per_context] * len(contexts) if isinstance(per_context, int) else list(per_context)
    if len(counts) != len(contexts):
        raise GenerationEvalError(f"{len(counts)} haystack counts for {len(contexts)} context lengths")
    rng = random.Random(seed)
    out = []
    for context, per_context in zip(contexts, counts, strict=True):
        for h in range(per_context):
            labels = rng.sample(NEEDLE_LABELS, needles)
            keys = [rng.randrange(10000, 100000) for _ in labels]
            texts = [
                _encode(tok, f"\nThe special magic {lab} number is: {key}.\n")
                for lab, key in zip(labels, keys, strict=True)
            ]
            qs = [
                _encode(tok, f"\nWhat is the special magic {lab} number? The special magic {lab} number is:")
                for lab in labels
            ]
            ans = [_encode(tok, f" {key}") for key in keys]
            ask = max(len(q) + len(a) for q, a in zip(qs, ans, strict=True))
            filler = context - ask - sum(map(len, texts))
            if filler < needles:
                raise GenerationEvalError(
                    f"context {context} is too short for {needles} needles and a question"
                )
            if filler > len(stream_ids):
                raise GenerationEvalError(
                    f"context {context} needs {filler} filler tokens but the text part has {len(stream_ids)}"
                )
            offset = rng.randrange(0, len(stream_ids) - filler + 1)
            fill = list(stream_ids[offset : offset + filler])
            # stratified: needle j of haystack h in stratum j * per_context + h of needles * per_context
            strata = needles * per_context
            depths = [(j * per_context + h + rng.random()) / strata for j in range(needles)]
            cuts = [int(d * filler) for d in depths]
            seq: list[int] = []
            prev, made = 0, []
            for lab, key, d, c, text, q, a in zip(labels, keys, depths, cuts, texts, qs, ans, strict=True):
                seq += fill[prev:c]
                made.append(Needle(lab, key, d, len(seq), q, a))
                seq += text
                prev = c
            seq += fill[prev:]
            out.append(Haystack(context, h, seq, offset, made, seed))
    return out


def prefill_haystack(model, hay: Haystack):
    """The ``DynamicCache`` of the haystack (one call), for :func:`run_retrieval`'s ``source``."""
    import torch
    from transformers import DynamicCache

    cache = DynamicCache()
    _forward(model, torch.tensor([hay.tokens]), cache, last_only=True)
    return cache


def run_retrieval(
    model, method: str, hay: Haystack, settings: CacheSettings, source=None
) -> list[dict[str, Any]]:
    """Prefill the haystack into ``method``'s cache, then ask for each needle (cropping back).

    ``source``: the haystack's reference ``DynamicCache`` (:func:`prefill_haystack`); methods
    that :func:`fills_from_reference` take it instead of a prefill of their own.
    """
    import torch

    cache = make_cache(method, model, settings)
    n = len(hay.tokens)
    out = []
    try:
        if source is not None and fills_from_reference(method):
            fill_from(cache, source)
        else:
            _forward(model, torch.tensor([hay.tokens]), cache, last_only=True)
        encoded = getattr(cache, "nbytes", None)
        before = encoded()["encoded_tokens"] if encoded else None
        for nd in hay.needles:
            ids = torch.tensor([nd.question + nd.answer])
            logits = _forward(model, ids, cache)[0]
            q, a = len(nd.question), len(nd.answer)
            pred = logits[q - 1 : q - 1 + a].argmax(-1).tolist()
            lp = torch.log_softmax(logits[q - 1 : q - 1 + a].double(), -1)
            key_lp = float(lp.gather(1, torch.tensor(nd.answer)[:, None]).sum())
            if encoded and encoded()["encoded_tokens"] != before:
                raise GenerationEvalError(
                    f"{method}: a question of {q + a} tokens made the cache encode part of it; "
                    f"raise --block-tokens (now {settings.block_tokens})"
                )
            cache.crop(-(q + a))
            if cache.get_seq_length() != n:
                raise GenerationEvalError(
                    f"{method}: cache holds {cache.get_seq_length()} tokens after crop, not {n}"
                )
            out.append(
                {
                    "method": method,
                    "context": hay.context,
                    "seed": hay.seed,
                    "haystack": hay.index,
                    "label": nd.label,
                    "depth": nd.depth,
                    "position": nd.position,
                    "correct": pred == nd.answer,
                    "key_logprob": key_lp,
                }
            )
    finally:
        _close(cache)
    return out


def summarize_retrieval(
    trials: Sequence[dict[str, Any]], methods: Sequence[str], contexts: Sequence[int]
) -> list:
    """``retrieval`` rows: accuracy, Wilson CI and the ``dynamic`` baseline per (method, context)."""
    rows = []
    for ctx in contexts:
        base = [t for t in trials if t["method"] == "dynamic" and t["context"] == ctx]
        base_acc = float(np.mean([t["correct"] for t in base])) if base else None
        base_ok = {(t.get("seed", 0), t["haystack"], t["label"]): t["correct"] for t in base}
        for m in methods:
            sel = [t for t in trials if t["method"] == m and t["context"] == ctx]
            if not sel:
                continue
            k = sum(bool(t["correct"]) for t in sel)
            acc = k / len(sel)
            paired = [(base_ok.get((t.get("seed", 0), t["haystack"], t["label"])), t["correct"]) for t in sel]
            rows.append(
                {
                    "method": m,
                    "context": ctx,
                    "trials": len(sel),
                    "correct": k,
                    "accuracy": acc,
                    "accuracy_ci95": list(wilson_ci(k, len(sel))),
                    "baseline_accuracy": base_acc,
                    "delta_vs_baseline": None if base_acc is None else acc - base_acc,
                    "lost_vs_baseline": sum(1 for b, c in paired if b and not c),
                    "gained_vs_baseline": sum(1 for b, c in paired if b is False and c),
                    "mean_key_logprob": float(np.mean([t["key_logprob"] for t in sel])),
                }
            )
    return rows


# -- the command -------------------------------------------------------------------------------------
def register(sub) -> None:
    p = sub.add_parser(
        "generate-eval",
        help="generation quality with compressed caches: trajectory, free running, retrieval, RL view",
    )
    from ..models import DEFAULT_MODEL

    g = p.add_argument_group("model and text")
    g.add_argument("--model", default=DEFAULT_MODEL, help="smollm2-135m, an HF model id or a local folder")
    g.add_argument("--dtype", default="float32", help="float32 (default), bfloat16, float16")
    g.add_argument("--text", default="wikitext", help="built-in text: wikitext (default) or code (validation and test parts)")
    g.add_argument(
        "--text-file", default=None, help="use this UTF-8 text instead (every part is the whole file)"
    )
    g.add_argument("--wikitext", default=None, help="path of wiki.test.raw")
    g.add_argument("--part", default="test", help="text part for prompts and haystacks (default test)")
    g = p.add_argument_group("methods")
    g.add_argument(
        "--methods",
        default=DEFAULT_METHODS,
        help=f"comma list; dynamic is always run first (default {DEFAULT_METHODS}); "
        "kakeya:<preset>, peers (kivi-4, int4, turbo-4, fp8, kvquant-4 ...), quanto",
    )
    g.add_argument(
        "--force-model",
        action="store_true",
        help="apply a kakeya preset made for another model where it fits (warned), instead of an error",
    )
    g.add_argument("--residual-length", type=int, default=64, help="exact recent window R of every cache")
    g.add_argument("--block-tokens", type=int, default=128, help="encode when the window reaches R + B")
    g.add_argument("--peer-sink-tokens", type=int, default=0, help="first positions peers keep exact")
    g = p.add_argument_group("trajectory, free running and RL view")
    g.add_argument("--prompts", type=int, default=32, help="number of prompts (default 32; 0 skips)")
    g.add_argument("--prompt-tokens", type=int, default=512, help="tokens per prompt (default 512)")
    g.add_argument("--gen-tokens", type=int, default=64, help="generated tokens per prompt (default 64)")
    g.add_argument("--batch", type=int, default=8, help="prompts per forward batch (default 8)")
    g = p.add_argument_group("retrieval")
    g.add_argument(
        "--contexts", default=DEFAULT_CONTEXTS, help=f"context lengths (default {DEFAULT_CONTEXTS}; '' skips)"
    )
    g.add_argument(
        "--haystacks",
        default="3",
        help="haystacks per context length: one count, or one per length ('3,3,2,1'; default 3)",
    )
    g.add_argument("--needles", type=int, default=1, help="needles (questions) per haystack (default 1)")
    g = p.add_argument_group("run")
    g.add_argument("--seed", type=int, default=0, help="seed of sampling, haystacks and bootstrap")
    g.add_argument("--threads", type=int, default=None, help="torch and codec threads")
    g.add_argument("--json", default=None, metavar="PATH", help="write the full result here")
    g.add_argument("--out", default=None, metavar="DIR", help="write report.md and plots here")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    g.add_argument(
        "--merge",
        nargs="+",
        default=None,
        metavar="JSON",
        help="measure nothing: combine records of runs of the same model and text (e.g. a trajectory run "
        "and a retrieval run) into one record, report and verdicts",
    )
    p.set_defaults(func=cmd_generate_eval)


def _contexts(text: str) -> list[int]:
    try:
        out = [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise GenerationEvalError(f"--contexts must be integers, got {text!r}") from None
    if any(c < 16 for c in out):
        raise GenerationEvalError(f"context lengths must be >= 16, got {out}")
    return out


def _haystack_counts(text: str, contexts: Sequence[int]) -> list[int]:
    try:
        counts = [int(x) for x in str(text).replace(" ", "").split(",") if x]
    except ValueError:
        raise GenerationEvalError(f"--haystacks must be integers, got {text!r}") from None
    if len(counts) == 1:
        counts = counts * len(contexts)
    if len(counts) != len(contexts) or any(c < 0 for c in counts):
        raise GenerationEvalError(
            f"--haystacks needs one count >= 0, or one per context length ({len(contexts)}), got {text!r}"
        )
    return counts


def _load_text(args, tok):
    from ..eval.corpus import load_corpus, tokenize_articles

    corpus = load_corpus(args.text_file, args.wikitext, args.text, args.part)
    arts = corpus.part(args.part)
    return corpus, tokenize_articles(tok, arts)


def cmd_generate_eval(args) -> int:
    import torch
    from tqdm.auto import tqdm

    from ..cli.harness import kakeya_version, versions
    from ..models import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.merge:
        return merge_records(args)
    if args.prompts < 0:
        raise GenerationEvalError("--prompts must be >= 0")
    if args.gen_tokens < 1 or args.prompt_tokens < 1 or args.batch < 1:
        raise GenerationEvalError("--gen-tokens, --prompt-tokens and --batch must be >= 1")
    methods = parse_methods(args.methods)
    contexts = _contexts(args.contexts)
    counts = _haystack_counts(args.haystacks, contexts)
    settings = CacheSettings(
        args.residual_length,
        args.block_tokens,
        args.peer_sink_tokens,
        threads=args.threads,
        force_model=args.force_model,
    )
    skipped = {}
    if "quanto" in methods and (why := quanto_available()):
        skipped["quanto"] = why
        methods = [m for m in methods if m != "quanto"]
    t0 = time.time()
    model, tok, info = load_model(args.model, args.dtype, progress=not args.no_progress)
    corpus, stream = _load_text(args, tok)
    max_ctx = getattr(model.config, "max_position_embeddings", None)
    if max_ctx and contexts and max(contexts) > max_ctx:
        raise GenerationEvalError(f"context {max(contexts)} exceeds the model's {max_ctx} positions")
    quiet = args.no_progress
    record: dict[str, Any] = {
        "command": shlex.join(getattr(args, "argv", ["kakeya", "generate-eval"])),
        "argv": list(getattr(args, "argv", ["kakeya", "generate-eval"])),
        "version": kakeya_version(),
        "versions": versions(),
        "model": info.to_dict(),
        "dtype": args.dtype,
        "methods": methods,
        "skipped_methods": skipped,
        "settings": {
            "residual_length": settings.residual_length,
            "block_tokens": settings.block_tokens,
            "peer_sink_tokens": settings.peer_sink_tokens,
            "kakeya_decoded_budget_bytes": None,
            "peer_k_position": "post_rope",
            "prompts": args.prompts,
            "prompt_tokens": args.prompt_tokens,
            "gen_tokens": args.gen_tokens,
            "batch": args.batch,
            "contexts": contexts,
            "haystacks_per_context": counts,
            "needles_per_haystack": args.needles,
            "seed": args.seed,
            "threads": args.threads,
            "bootstrap_samples": BOOTSTRAP_SAMPLES,
        },
        "corpus": {"name": corpus.name, "source": corpus.source, "sha256": corpus.sha256, "part": args.part},
        "verdict_rule": GENERATION_VERDICT_RULE,
    }
    trajectory, rl = [], []
    if args.prompts:
        from ..eval.corpus import make_passages

        passages = make_passages(stream, args.prompts, args.prompt_tokens, 1)
        record["text_usage"] = corpus.split().usage(
            args.part, sorted({a["index"] for p in passages for a in p.articles})
        )
        record["prompts_provenance"] = [p.provenance() for p in passages]
        parts: dict[str, list[MethodBatch]] = {m: [] for m in methods}
        ref_nll: list[np.ndarray] = []
        batches = [passages[i : i + args.batch] for i in range(0, len(passages), args.batch)]
        bar = tqdm(total=len(batches) * (len(methods) + 1), desc="trajectory", disable=quiet)
        for bi, chunk in enumerate(batches):
            ids = torch.tensor([list(p.token_ids[: args.prompt_tokens]) for p in chunk])
            bar.set_postfix_str("reference")
            ref = reference_batch(model, ids, args.gen_tokens)
            lp = torch.log_softmax(ref.ref_logits.double(), -1).gather(2, ref.ref_tokens[..., None])[..., 0]
            ref_nll.append((-lp.mean(1)).numpy())
            bar.update()
            for m in methods:
                bar.set_postfix_str(m)
                mb = run_method_batch(model, m, ref, settings, seed=args.seed * 1_000_003 + bi)
                mb.ref_tokens = ref.ref_tokens.numpy()
                parts[m].append(mb)
                bar.update()
        bar.close()
        for m in methods:
            trajectory.append(summarize_trajectory(m, parts[m], ref_nll, seed=args.seed))
            rl.append(summarize_rl(m, parts[m], seed=args.seed))
    record["trajectory"] = trajectory
    record["rl"] = rl
    retrieval_trials = []
    if contexts and any(counts):
        hays = build_haystacks(tok, stream.ids, contexts, counts, args.needles, args.seed)
        record["retrieval_task"] = {
            "needle": "\\nThe special magic {label} number is: {key}.\\n",
            "question": "\\nWhat is the special magic {label} number? The special magic {label} number is:",
            "answer": " {key} (five digits, 10000-99999); correct iff greedy decoding writes the key exactly",
            "labels": list(NEEDLE_LABELS),
            "chance_guess": 1 / 90000,
            "chance_pick_in_context": 1 / args.needles,
            "haystacks": [
                {
                    "context": h.context,
                    "index": h.index,
                    "tokens": len(h.tokens),
                    "offset": h.offset,
                    "needles": [
                        {"label": n.label, "key": n.key, "depth": n.depth, "position": n.position}
                        for n in h.needles
                    ],
                }
                for h in hays
            ],
        }
        bar = tqdm(total=len(hays) * len(methods), desc="retrieval", disable=quiet)
        for h in hays:
            bar.set_postfix_str(f"{h.context} prefill")
            source = prefill_haystack(model, h)
            for m in methods:
                bar.set_postfix_str(f"{h.context} {m}")
                retrieval_trials += run_retrieval(model, m, h, settings, source)
                bar.update()
            del source
        bar.close()
    record["retrieval"] = summarize_retrieval(retrieval_trials, methods, contexts)
    record["retrieval_trials"] = retrieval_trials
    record["verdicts"] = verdicts(record)
    record["seconds"] = time.time() - t0
    _emit(record, args)
    return 0


def merge_records(args) -> int:
    """``--merge``: one record from several runs (their trajectories, RL rows and retrieval trials).

    The runs must share the model, dtype, text part and cache settings; a method may have
    its trajectory in one run only, and a retrieval trial (method, context, haystack,
    needle) may appear once, except for ``dynamic``, which every run measures: its repeats
    must agree (first-divergence positions, correctness of each trial) and the first is kept.
    """
    recs = [json.loads(Path(p).read_text()) for p in args.merge]
    keys = ("residual_length", "block_tokens", "peer_sink_tokens")
    first = recs[0]
    for path, r in zip(args.merge, recs, strict=True):
        for what, a, b in (
            ("model", r["model"]["path"], first["model"]["path"]),
            ("dtype", r["dtype"], first["dtype"]),
            (
                "text",
                (r["corpus"]["sha256"], r["corpus"]["part"]),
                (first["corpus"]["sha256"], first["corpus"]["part"]),
            ),
            ("cache settings", [r["settings"][k] for k in keys], [first["settings"][k] for k in keys]),
        ):
            if a != b:
                raise GenerationEvalError(f"{path}: {what} {a!r} differs from {args.merge[0]}'s {b!r}")
    traj_keys = ("prompts", "prompt_tokens", "gen_tokens")
    with_rows = [(p, r) for p, r in zip(args.merge, recs, strict=True) if r["trajectory"]]
    for path, r in with_rows[1:]:
        a = [r["settings"][k] for k in traj_keys]
        b = [with_rows[0][1]["settings"][k] for k in traj_keys]
        if a != b:
            raise GenerationEvalError(
                f"{path}: trajectory of {dict(zip(traj_keys, a, strict=True))} cannot join "
                f"{with_rows[0][0]}'s {dict(zip(traj_keys, b, strict=True))}"
            )
    methods = list(dict.fromkeys(m for r in recs for m in r["methods"]))
    trajectory, rl, trials, seen = [], [], [], set()
    for path, r in zip(args.merge, recs, strict=True):
        for row, rl_row in zip(r["trajectory"], r["rl"], strict=True):
            prev = next((t for t in trajectory if t["method"] == row["method"]), None)
            if prev is not None:
                _check_repeat(path, row["method"], prev["first_divergence"], row["first_divergence"])
                continue
            trajectory.append(row)
            rl.append(rl_row)
        for t in r.get("retrieval_trials", []):
            key = (t["method"], t["context"], t.get("seed", 0), t["haystack"], t["label"])
            if key in seen:
                prev = next(
                    x
                    for x in trials
                    if (x["method"], x["context"], x.get("seed", 0), x["haystack"], x["label"]) == key
                )
                _check_repeat(path, f"retrieval trial {key}", prev["correct"], t["correct"])
                continue
            seen.add(key)
            trials.append(t)
    order = {m: i for i, m in enumerate(methods)}
    trajectory.sort(key=lambda t: order[t["method"]])
    rl.sort(key=lambda t: order[t["method"]])
    contexts = sorted({t["context"] for t in trials})
    with_traj = next((r for r in recs if r["trajectory"]), first)
    with_ret = next((r for r in recs if r.get("retrieval_trials")), None)
    settings = dict(with_traj["settings"])
    if with_ret is not None:
        for k in ("contexts", "haystacks_per_context", "needles_per_haystack"):
            settings[k] = with_ret["settings"][k]
    record = {
        **{
            k: v
            for k, v in with_traj.items()
            if k not in ("trajectory", "rl", "retrieval", "retrieval_trials")
        },
        "command": shlex.join(getattr(args, "argv", ["kakeya", "generate-eval"])),
        "argv": list(getattr(args, "argv", ["kakeya", "generate-eval"])),
        "merged_from": [
            {"path": p, "command": r["command"], "seconds": r.get("seconds"), "methods": r["methods"]}
            for p, r in zip(args.merge, recs, strict=True)
        ],
        "methods": methods,
        "skipped_methods": {k: v for r in recs for k, v in r.get("skipped_methods", {}).items()},
        "settings": settings,
        "trajectory": trajectory,
        "rl": rl,
        "retrieval": summarize_retrieval(trials, methods, contexts),
        "retrieval_trials": trials,
        "seconds": sum(r.get("seconds") or 0 for r in recs),
    }
    if with_ret is not None:
        task = dict(with_ret["retrieval_task"])
        hays, names = [], set()
        for r in recs:
            seed = r["settings"]["seed"]
            for h in r.get("retrieval_task", {}).get("haystacks", []):
                name = (seed, h["context"], h["index"])
                if name not in names:
                    names.add(name)
                    hays.append({"seed": seed, **h})
        task["haystacks"] = hays
        record["retrieval_task"] = task
        counts = {c: sum(1 for h in hays if h["context"] == c) for c in contexts}
        settings["contexts"], settings["haystacks_per_context"] = contexts, [counts[c] for c in contexts]
    record["verdicts"] = verdicts(record)
    _emit(record, args)
    return 0


def _check_repeat(path, what: str, first, again) -> None:
    """A method measured twice (the reference ``dynamic`` in every run) must give the same result."""
    if not str(what).startswith(("dynamic", "retrieval trial ('dynamic'")):
        raise GenerationEvalError(f"{path}: {what} was measured in two runs (only dynamic may repeat)")
    if first != again:
        raise GenerationEvalError(f"{path}: {what} differs between runs ({first!r} vs {again!r})")


def _emit(record: dict[str, Any], args) -> None:
    print(generation_markdown(record))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(record, indent=2) + "\n")
    if args.out:
        write_report(record, Path(args.out))


def verdicts(record: dict[str, Any]) -> list[dict[str, Any]]:
    """One verdict per compressed method (``dynamic`` is the reference)."""
    out = []
    traj = {r["method"]: r for r in record["trajectory"]}
    for m in record["methods"]:
        if m == "dynamic":
            continue
        t = traj.get(m)
        deltas = [r["delta_vs_baseline"] for r in record["retrieval"] if r["method"] == m]
        out.append(
            {
                "method": m,
                "verdict": generation_verdict(
                    t["tf_top1_ci95"] if t else None,
                    t["tf_top1"] if t else None,
                    [d for d in deltas if d is not None],
                ),
                "tf_top1": t["tf_top1"] if t else None,
                "tf_top1_ci95": t["tf_top1_ci95"] if t else None,
                "worst_retrieval_delta": min(deltas) if deltas else None,
            }
        )
    return out


# -- report ------------------------------------------------------------------------------------------
def _pct(x, d: int = 1) -> str:
    return "n/a" if x is None else f"{x * 100:.{d}f}%"


def _ci_pct(ci, d: int = 1) -> str:
    return "n/a" if not ci else f"[{ci[0] * 100:.{d}f}, {ci[1] * 100:.{d}f}]"


def _num(x, d: int = 4) -> str:
    """:func:`kakeya_py.eval.report.fmt_num`, but in scientific notation from 1e4 (not 1e5) on."""
    if x is not None and abs(x) >= 1e4:
        return f"{x:.{d - 1}e}"
    return fmt_num(x, d)


def _with_ci(x, ci, fmt=_num) -> str:
    """``x [lo, hi]``, each formatted by ``fmt``."""
    return f"{fmt(x)} [{fmt(ci[0])}, {fmt(ci[1])}]"


def _points(x) -> str:
    """A difference of fractions in signed percentage points (``+1.5``), ``n/a`` for ``None``."""
    return "n/a" if x is None else f"{x * 100:+.1f}"


def _table(columns: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    """A Markdown table's lines: the header, its rule, then one line per row of cells."""

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(cells) + " |"

    return [line(columns), "|" + "---|" * len(columns), *map(line, rows)]


_TRAJECTORY_COLUMNS = (
    "method | ratio | tf top-1 | 95% CI | KL mean [CI] | KL rmse | KL p95 | KL max | first div. median [CI] "
    "| never div. | NLL own − greedy [CI]"
).split(" | ")


def _trajectory_cells(t: dict[str, Any]) -> list[str]:
    ratio = (t.get("cache_bytes") or {}).get("ratio_vs_dynamic")
    return [
        t["method"],
        "—" if ratio is None else f"{ratio:.2f}×",
        _pct(t["tf_top1"], 2),
        _ci_pct(t["tf_top1_ci95"], 2),
        _with_ci(t["kl_mean"], t["kl_mean_ci95"]),
        _num(t["kl_rmse"]),
        _num(t["kl_p95"]),
        _num(t["kl_max"]),
        _with_ci(t["first_divergence_median"], t["first_divergence_median_ci95"], "{:.1f}".format),
        _pct(t["never_diverged"], 0),
        _with_ci(t["dnll_own_vs_greedy"], t["dnll_own_vs_greedy_ci95"], "{:+.3f}".format),
    ]


_RL_COLUMNS = (
    "method | per token: ESS [CI] | k3 [CI] | \\|Δlog p\\| mean / max | outside 2× / 5× | clipped / veto "
    "| top-1% mass | per seq: ESS | k3 | \\|Σ Δlog p\\| mean / max | outside 2× / 5× | veto"
).split(" | ")


def _rl_cells(x: dict[str, Any]) -> list[str]:
    a, q = x["per_token"], x["per_sequence"]
    return [
        x["method"],
        _with_ci(a["ess"], a["ess_ci95"]),
        _with_ci(a["k3"], a["k3_ci95"]),
        f"{_num(a['dlogp_mean'])} / {_num(a['dlogp_max'])}",
        f"{_pct(a['frac_outside_2x'], 2)} / {_pct(a['frac_outside_5x'], 2)}",
        f"{_pct(a['frac_clipped'], 2)} / {_pct(a['frac_veto'], 2)}",
        _pct(a["top1pct_mass"]),
        _num(q["ess"]),
        _num(q["k3"]),
        f"{_num(q['dlogp_mean'])} / {_num(q['dlogp_max'])}",
        f"{_pct(q['frac_outside_2x'])} / {_pct(q['frac_outside_5x'])}",
        _pct(q["seq_veto"]),
    ]


_RETRIEVAL_COLUMNS = (
    "method | context | correct / trials | accuracy | Wilson 95% CI | baseline | Δ vs baseline (points) "
    "| lost / gained"
).split(" | ")


def _retrieval_cells(x: dict[str, Any]) -> list[str]:
    return [
        x["method"],
        f"{x['context']}",
        f"{x['correct']} / {x['trials']}",
        _pct(x["accuracy"]),
        _ci_pct(x["accuracy_ci95"]),
        _pct(x["baseline_accuracy"]),
        _points(x["delta_vs_baseline"]),
        f"{x['lost_vs_baseline']} / {x['gained_vs_baseline']}",
    ]


_VERDICT_COLUMNS = ("method", "verdict", "tf top-1 CI", "worst retrieval Δ")


def _verdict_cells(v: dict[str, Any]) -> list[str]:
    return [
        v["method"],
        f"**{v['verdict']}**",
        _ci_pct(v["tf_top1_ci95"], 2),
        _points(v["worst_retrieval_delta"]),
    ]


def _as_list(counts, settings) -> list[int]:
    return [counts] * len(settings["contexts"]) if isinstance(counts, int) else list(counts)


def generation_markdown(r: dict[str, Any]) -> str:
    """The Markdown summary (stdout; also the body of the report)."""
    s = r["settings"]
    lines = [
        f"## kakeya generate-eval on {r['model']['name']} ({r['dtype']}), {r['corpus']['name']} part {r['corpus']['part']}",
        "",
        f"command: `{r['command']}`",
        "",
        f"kakeya {r['version']}; {r.get('seconds', 0):.0f} s; caches: R = {s['residual_length']}, "
        f"B = {s['block_tokens']}, peer sink {s['peer_sink_tokens']}, peers on post-RoPE K",
        "",
    ]
    for part in r.get("merged_from", []):
        lines += [f"- merged from `{part['path']}` ({part['seconds'] or 0:.0f} s): `{part['command']}`"]
    if r.get("merged_from"):
        lines += [""]
    if r["skipped_methods"]:
        lines += [f"Skipped: {m}: {why}" for m, why in r["skipped_methods"].items()] + [""]
    if r["trajectory"]:
        t0 = r["trajectory"][0]
        lines += [
            f"### Trajectory and free running ({t0['prompts']} prompts × {s['prompt_tokens']} tokens, "
            f"{t0['gen_tokens']} generated)",
            "",
            *_table(_TRAJECTORY_COLUMNS, map(_trajectory_cells, r["trajectory"])),
            "",
            "ratio: DynamicCache bytes / bytes the method stores at the end of the teacher-forced run "
            "(both in the model's dtype; the window and sink count as stored). NLL: the reference model's "
            "mean NLL per token of the method's own greedy continuation minus that of the reference's.",
            "",
        ]
    if r["rl"]:
        lines += [
            f"### RL view (temperature-1 samples from each cache, {s['gen_tokens']} tokens, scored by the "
            "uncompressed model; ρ = p_ref / p_alt)",
            "",
            *_table(_RL_COLUMNS, map(_rl_cells, r["rl"])),
            "",
        ]
    if r["retrieval"]:
        task = r.get("retrieval_task", {})
        lines += [
            "### Retrieval (haystacks per context "
            + ", ".join(
                f"{c}: {h}"
                for c, h in zip(s["contexts"], _as_list(s["haystacks_per_context"], s), strict=True)
            )
            + f"; {s['needles_per_haystack']} needle(s) each)",
            "",
            f"Chance: {task.get('chance_guess', 0):.1e} per trial for a guessed key"
            + (
                f", {_pct(task.get('chance_pick_in_context'), 0)} for picking one of the keys in context."
                if s["needles_per_haystack"] > 1
                else " (one needle per haystack)."
            ),
            "",
            *_table(_RETRIEVAL_COLUMNS, map(_retrieval_cells, r["retrieval"])),
            "",
        ]
    if r["verdicts"]:
        lines += [
            "### Generation verdict",
            "",
            *_table(_VERDICT_COLUMNS, map(_verdict_cells, r["verdicts"])),
            "",
            f"Rule: {r['verdict_rule']}.",
        ]
    return "\n".join(lines) + "\n"


def write_report(record: dict[str, Any], out: Path) -> None:
    """``out/report.md``, ``out/generation.json`` and the plots (``trajectory.png``, ``first_divergence.png``,
    ``retrieval.png``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    (out / "generation.json").write_text(json.dumps(record, indent=2) + "\n")
    plots = []
    if record["trajectory"]:
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
        for t in record["trajectory"]:
            bp = t["by_position"]
            x = np.arange(1, len(bp["kl_mean"]) + 1)
            lo = [c[0] for c in bp["kl_mean_ci95"]]
            hi = [c[1] for c in bp["kl_mean_ci95"]]
            (line,) = ax1.plot(x, bp["kl_mean"], label=t["method"])
            ax1.fill_between(x, lo, hi, color=line.get_color(), alpha=0.15)
            top1 = np.array(bp["top1"]) * 100
            w = max(1, len(top1) // 8)  # bins of w positions: one position holds only one token per prompt
            edges = np.arange(0, len(top1), w)
            ax2.plot(
                edges + (w + 1) / 2, [top1[e : e + w].mean() for e in edges], marker=".", label=t["method"]
            )
        ax1.set(xlabel="generated position", ylabel="KL(ref‖method), mean over prompts", yscale="symlog")
        ax1.set_yscale("symlog", linthresh=1e-3)
        ax2.set(xlabel="generated position (bins)", ylabel="teacher-forced top-1 agreement (%), binned")
        ax2.axhline(TF_TOP1_BOUND * 100, color="grey", ls=":", lw=1)
        ax1.legend(fontsize=7)
        fig.suptitle("Along the reference trajectory (teacher forcing), 95% bootstrap band over prompts")
        fig.tight_layout()
        fig.savefig(out / "trajectory.png", dpi=120)
        plt.close(fig)
        plots.append("trajectory.png")
        fig, ax = plt.subplots(figsize=(6, 4))
        for t in record["trajectory"]:
            d = np.sort(np.array(t["first_divergence"]))
            gen = t["gen_tokens"]
            xs = np.arange(0, gen)  # a prompt that never diverged (d = gen) stays counted to the end
            ax.step(xs, [(d > x).mean() * 100 for x in xs], where="post", label=t["method"])
        ax.set(
            xlabel="generated position", ylabel="prompts not yet diverged (%)", title="Free running, greedy"
        )
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "first_divergence.png", dpi=120)
        plt.close(fig)
        plots.append("first_divergence.png")
    if record["retrieval"]:
        fig, ax = plt.subplots(figsize=(6, 4))
        methods = list(dict.fromkeys(x["method"] for x in record["retrieval"]))
        for i, m in enumerate(methods):
            rows = [x for x in record["retrieval"] if x["method"] == m]
            xs = np.array([x["context"] for x in rows], dtype=float) * (1 + 0.03 * (i - len(methods) / 2))
            acc = np.array([x["accuracy"] for x in rows]) * 100
            err = np.array(
                [
                    [a - x["accuracy_ci95"][0] * 100, x["accuracy_ci95"][1] * 100 - a]
                    for a, x in zip(acc, rows, strict=True)
                ]
            ).T
            ax.errorbar(xs, acc, yerr=err, marker="o", capsize=3, label=m)
        ax.set(xscale="log", xlabel="context (tokens)", ylabel="retrieval accuracy (%)", ylim=(-3, 103))
        ax.set_title("Pass-key retrieval, Wilson 95% CI")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "retrieval.png", dpi=120)
        plt.close(fig)
        plots.append("retrieval.png")
    body = generation_markdown(record)
    body += "\n" + "\n".join(f"![{p}]({p})" for p in plots) + "\n"
    (out / "report.md").write_text(body)


def main(argv: Sequence[str] | None = None) -> int:  # python -m kakeya_py.generation.quality
    parser = argparse.ArgumentParser(prog="kakeya")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["generate-eval", *(argv or [])])
    args.argv = ["kakeya", "generate-eval", *(argv or [])]
    return args.func(args)
