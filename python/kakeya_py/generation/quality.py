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

import json
import math
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
    from ..peers import parse_method, split_methods
    from ..policy import load_policy

    try:
        methods = split_methods(text)
    except ValueError as exc:
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
