"""The HF transformers quality harness: codec-on vs codec-off logits on real passages.

Modes (what "codec on" means):

- ``snapshot`` (deployment): the ``ctx`` context tokens are prefilled with the codec off;
  their cache is compressed once per (layer, stream) (pre-RoPE K, re-rotated exactly as
  the layer does); the ``n_eval`` evaluation tokens then run against the compressed
  prefix with their own fresh, exact K/V. The reference runs the same two steps with
  the exact cache, so an identity codec gives bit-identical logits.
- ``in-forward``: one pass over ``ctx + n_eval`` tokens with every position's K/V
  round-tripped at every selected layer (one encode per layer, stream and sequence).
- ``prefix-in-forward``: one pass, but only the ``ctx`` prefix positions round-tripped
  (each layer sees prefix K/V computed from already-perturbed earlier layers; this is
  what a single-pass engine hook produces and is offered to compare engines).

Every mode evaluates the positions ``ctx .. ctx+n_eval-1`` (targets: the next tokens)
and measures the bytes of the cache it actually produced (:class:`~kakeya_py.policy.Ledger`).

Several *variants* (the full policy, one layer at a time, K-only, noise levels ...) share
one prefill and one reference pass per passage; that is how attribution and noise sweeps
stay affordable.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..policy import Ledger, PolicyCodec
from . import metrics as M
from .corpus import Passage
from .hooks import (
    STREAMS,
    KVInterceptor,
    PositionEmbeddingRecorder,
    apply_rope_to_keys,
    find_attention_sites,
)

MODES = ("snapshot", "in-forward", "prefix-in-forward")

#: ``transform(layer, stream, x[tokens, kv_heads, head_dim]) -> (x_hat, nbytes | None)``.
#: Returning ``x`` itself means "left exact"; ``nbytes`` is None when nothing was encoded.
Transform = Callable[[int, str, Any], tuple[Any, int | None]]


@dataclass
class Variant:
    """One codec-on configuration evaluated against the shared reference."""

    name: str
    transform: Transform
    select: Callable[[int, str], bool] | None = None  # which (layer, stream) it may touch
    k_position: str | None = None  # "pre_rope" / "post_rope"; None = the runner's

    def applies(self, layer: int, stream: str) -> bool:
        return self.select is None or self.select(layer, stream)


@dataclass
class VariantResult:
    name: str
    tokens: list[M.PassageTokens] = field(default_factory=list)
    ledger: Ledger = field(default_factory=Ledger)
    seconds: float = 0.0

    def summary(self, *, seed: int = 0) -> dict[str, Any]:
        return M.summarize(self.tokens, seed=seed)


def codec_transform(codec: PolicyCodec) -> Transform:
    return codec.roundtrip


def identity_transform(layer: int, stream: str, x):
    """Leave every tensor exact (the codec-off path through the same machinery)."""
    return x, None


def noise_transform(
    sigma: float, *, seed: int, select: Callable[[int, str], bool] | None = None
) -> Transform:
    """``x + sigma * rms(x) * N(0, 1)``; ``rms`` over the whole ``[tokens, heads, dim]`` tensor.

    The noise of a call depends only on ``(seed, passage number, layer, stream, call
    number within the passage)``, so a sweep over sigma reuses the same normal draws at
    every level.
    """
    import torch

    calls: dict[tuple[int, str], int] = {}
    epoch = [0]

    def transform(layer: int, stream: str, x):
        if select is not None and not select(layer, stream):
            return x, None
        n = calls.get((layer, stream), 0)
        calls[(layer, stream)] = n + 1
        key = (((seed * 1_000_003 + epoch[0]) * 1009 + layer) * 7 + STREAMS.index(stream)) * 65_537 + n
        gen = torch.Generator().manual_seed(key % (1 << 63))
        x32 = x.float()
        rms = x32.pow(2).mean().sqrt()
        noise = torch.randn(x32.shape, generator=gen, dtype=torch.float32)
        return (x32 + sigma * rms * noise).to(x.dtype), None

    def reset() -> None:  # called by HFRunner.run before each passage
        epoch[0] += 1
        calls.clear()

    transform.reset = reset  # type: ignore[attr-defined]
    return transform


def release_freed_memory() -> None:
    """Give the C heap's free pages back to the system (glibc ``malloc_trim``; elsewhere nothing).

    Each variant allocates and frees logits and round trips of many sizes on several torch
    threads; glibc keeps what is freed in per-thread arenas, so a run over hundreds of variants
    grew to the machine's 24 GB (the turbo search of ``reports/tune/``, OOM-killed in step 1)
    while the live tensors stayed below 1 GB.
    """
    _malloc_trim()(0)


@functools.cache
def _malloc_trim() -> Callable[[int], int]:
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    fn = getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None
    return fn or (lambda _pad: 0)


def _apply_per_sequence(transform: Transform, layer: int, stream: str, x, ledger: Ledger | None):
    """Run ``transform`` on each batch element of ``x [b, s, h, d]``; None if nothing changed."""
    import torch

    outs, changed = [], False
    for b in range(x.shape[0]):
        xb = x[b].contiguous()
        out, nbytes = transform(layer, stream, xb)
        if ledger is not None:
            ledger.add(layer, stream, xb.numel(), nbytes)
        changed |= out is not xb
        outs.append(out)
    return torch.stack(outs) if changed else None


@dataclass
class PrefixState:
    """Everything the codec-off prefill of the context left behind."""

    cache: Any  # DynamicCache with the exact post-RoPE prefix
    pre_k: dict[int, Any]  # layer -> [b, ctx, h, d] pre-RoPE K
    v: dict[int, Any]  # layer -> [b, ctx, h, d] V
    rope: dict[int, tuple[Any, Any]]  # layer -> (cos, sin) of the prefix positions

    def stream(self, layer: int, stream: str, k_position: str):
        if stream == "v":
            return self.v[layer]
        if k_position == "post_rope":
            return self.cache.layers[layer].keys.transpose(1, 2)
        return self.pre_k[layer]


class HFRunner:
    """Runs a transformers causal LM in the harness modes (see the module doc)."""

    def __init__(self, model, *, k_position: str = "pre_rope"):
        self.model = model
        self.sites = find_attention_sites(model)
        self.num_layers = len(self.sites)
        self.k_position = k_position

    # -- snapshot ----------------------------------------------------------------------------
    def prefill(self, prefix_ids) -> PrefixState:
        import torch
        from transformers import DynamicCache

        pre_k: dict[int, Any] = {}
        v: dict[int, Any] = {}

        def capture(layer, stream, x):
            (pre_k if stream == "k" else v)[layer] = x.detach().clone()
            return None

        cache = DynamicCache()
        with (
            torch.inference_mode(),
            PositionEmbeddingRecorder(self.model) as rec,
            KVInterceptor(self.model, capture),
        ):
            self.model(input_ids=prefix_ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        return PrefixState(cache, pre_k, v, dict(rec.by_layer))

    def build_cache(
        self, state: PrefixState, replacements: dict[tuple[int, str], Any], k_position: str | None = None
    ):
        """A fresh cache holding the prefix, with replaced ``[b, ctx, h, d]`` tensors rotated in
        (K replacements are pre-RoPE unless ``k_position`` (default: the runner's) says post)."""
        from transformers import DynamicCache

        k_position = k_position or self.k_position

        cache = DynamicCache()
        for site in self.sites:
            layer = site.layer
            keys = state.cache.layers[layer].keys
            values = state.cache.layers[layer].values
            new_k = replacements.get((layer, "k"))
            if new_k is not None:
                if k_position == "post_rope":
                    keys = new_k.transpose(1, 2)
                else:
                    cos, sin = state.rope[layer]
                    keys = apply_rope_to_keys(site, new_k, cos, sin)
            new_v = replacements.get((layer, "v"))
            if new_v is not None:
                values = new_v.transpose(1, 2)
            cache.update(keys, values, layer)
        return cache

    def eval_logits(self, state: PrefixState, eval_ids, replacements=None, k_position: str | None = None):
        import torch

        cache = self.build_cache(state, replacements or {}, k_position)
        with torch.inference_mode():
            return self.model(input_ids=eval_ids, past_key_values=cache, use_cache=True).logits

    def snapshot_replacements(self, state: PrefixState, variant: Variant, ledger: Ledger, memo: dict):
        reps = {}
        k_position = variant.k_position or self.k_position
        for layer in range(self.num_layers):
            for stream in STREAMS:
                x = state.stream(layer, stream, k_position)
                if not variant.applies(layer, stream):
                    ledger.add(layer, stream, x.numel(), None)
                    continue
                key = (id(variant.transform), k_position, layer, stream)
                if key not in memo:
                    sub = Ledger()
                    memo[key] = (_apply_per_sequence(variant.transform, layer, stream, x, sub), sub)
                new, sub = memo[key]
                ledger.merge(sub)
                if new is not None:
                    reps[(layer, stream)] = new
        return reps

    # -- single-pass modes ---------------------------------------------------------------------
    def full_logits(
        self, ids, variant: Variant | None = None, ledger: Ledger | None = None, *, prefix: int | None = None
    ):
        """Logits of one pass over ``ids``; with a variant, K/V round-tripped in the pass
        (only the first ``prefix`` positions when given)."""
        import torch

        if variant is None:
            with torch.inference_mode():
                return self.model(input_ids=ids, use_cache=False).logits

        def fn(layer, stream, x):
            if not variant.applies(layer, stream):
                if ledger is not None:
                    ledger.add(layer, stream, x[:, :prefix].numel() if prefix else x.numel(), None)
                return None
            if prefix is None:
                return _apply_per_sequence(variant.transform, layer, stream, x, ledger)
            head = _apply_per_sequence(variant.transform, layer, stream, x[:, :prefix], ledger)
            return None if head is None else torch.cat([head, x[:, prefix:]], dim=1)

        k_position = variant.k_position or self.k_position
        with torch.inference_mode(), KVInterceptor(self.model, fn, k_position=k_position):
            return self.model(input_ids=ids, use_cache=False).logits

    # -- driver --------------------------------------------------------------------------------
    def run(
        self,
        passages: Sequence[Passage],
        variants: Sequence[Variant],
        *,
        mode: str = "snapshot",
        progress: bool = True,
        desc: str = "evaluating",
        floor_model=None,
    ) -> tuple[list[VariantResult], float]:
        """Evaluate every variant on every passage against the shared reference.

        ``floor_model`` (e.g. the model in bf16) is also run codec-off on each passage and
        appended as one more result: the noise floor a codec's numbers sit on.

        Returns:
            ``(results, reference_seconds)``: one :class:`VariantResult` per variant and
            the wall time spent on the codec-off work (prefill and reference passes).
        """
        import torch
        from tqdm.auto import tqdm

        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        results = [VariantResult(v.name) for v in variants]
        floor = VariantResult("noise floor") if floor_model is not None else None
        ref_seconds = 0.0
        total = len(passages) * (1 + len(variants) + (floor is not None))
        bar = tqdm(total=total, desc=desc, disable=not progress, unit="pass")
        for passage in passages:
            ids = torch.tensor([passage.token_ids], dtype=torch.long)
            ctx, n_eval = passage.ctx, passage.n_eval
            targets = ids[0, ctx + 1 : ctx + n_eval + 1]
            for v in variants:
                if hasattr(v.transform, "reset"):
                    v.transform.reset()
            t0 = time.perf_counter()
            if mode == "snapshot":
                state = self.prefill(ids[:, :ctx])
                ref = self.eval_logits(state, ids[:, ctx : ctx + n_eval])[0]
            else:
                ref = self.full_logits(ids[:, : ctx + n_eval])[0, ctx : ctx + n_eval]
            ref_seconds += time.perf_counter() - t0
            bar.update()
            memo: dict = {}
            for variant, res in zip(variants, results, strict=True):
                t0 = time.perf_counter()
                ledger = Ledger()
                if mode == "snapshot":
                    reps = self.snapshot_replacements(state, variant, ledger, memo)
                    alt = self.eval_logits(state, ids[:, ctx : ctx + n_eval], reps, variant.k_position)[0]
                elif mode == "in-forward":
                    alt = self.full_logits(ids[:, : ctx + n_eval], variant, ledger)[0, ctx : ctx + n_eval]
                else:
                    alt = self.full_logits(ids[:, : ctx + n_eval], variant, ledger, prefix=ctx)[
                        0, ctx : ctx + n_eval
                    ]
                res.tokens.append(M.passage_tokens_from_logits(ref.float(), alt.float(), targets))
                res.ledger.merge(ledger)
                del alt
                release_freed_memory()
                res.seconds += time.perf_counter() - t0
                bar.update()
            if floor is not None:
                t0 = time.perf_counter()
                with torch.no_grad():
                    alt = floor_model(ids[:, : ctx + n_eval]).logits[0, ctx : ctx + n_eval]
                floor.tokens.append(M.passage_tokens_from_logits(ref.float(), alt.float(), targets))
                floor.seconds += time.perf_counter() - t0
                bar.update()
        bar.close()
        return results + ([floor] if floor is not None else []), ref_seconds


# -- residual ----------------------------------------------------------------------------------
def codec_residuals(
    runner: HFRunner, passages: Sequence[Passage], transform: Transform, *, progress: bool = True
) -> tuple[list[dict[str, Any]], Ledger]:
    """Relative error ``‖x̂ − x‖_F / ‖x‖_F`` per layer and stream over the prefixes.

    Errors and norms are pooled over passages (sums of squares), in float64.
    """
    import torch
    from tqdm.auto import tqdm

    err = np.zeros((runner.num_layers, 2))
    norm = np.zeros((runner.num_layers, 2))
    ledger = Ledger()
    touched = np.zeros((runner.num_layers, 2), dtype=bool)
    for passage in tqdm(passages, desc="residuals", disable=not progress, unit="passage"):
        ids = torch.tensor([passage.token_ids[: passage.ctx]], dtype=torch.long)
        state = runner.prefill(ids)
        for layer in range(runner.num_layers):
            for j, stream in enumerate(STREAMS):
                x = state.stream(layer, stream, runner.k_position)
                new = _apply_per_sequence(transform, layer, stream, x, ledger)
                x64 = x.double()
                norm[layer, j] += float(x64.pow(2).sum())
                if new is not None:
                    touched[layer, j] = True
                    err[layer, j] += float((new.double() - x64).pow(2).sum())
    rows = []
    for layer in range(runner.num_layers):
        row: dict[str, Any] = {"layer": layer}
        for j, stream in enumerate(STREAMS):
            rel = math.sqrt(err[layer, j] / norm[layer, j]) if norm[layer, j] > 0 else 0.0
            row[f"{stream}_rel_error"] = rel if touched[layer, j] else None
            row[f"{stream}_ratio"] = ledger.ratio(stream, layer)
        rows.append(row)
    return rows, ledger


# -- attribution -----------------------------------------------------------------------------
def layer_variants(codec: PolicyCodec) -> list[Variant]:
    """One variant per layer the policy compresses: codec on that layer only."""
    transform = codec_transform(codec)
    layers = sorted({layer for layer, _ in codec.active()})
    return [
        Variant(f"layer {layer}", transform, (lambda lay: lambda la, s: la == lay)(layer)) for layer in layers
    ]


def stream_variants(codec: PolicyCodec) -> list[Variant]:
    """K only, V only, both."""
    transform = codec_transform(codec)
    return [
        Variant("k", transform, lambda la, s: s == "k"),
        Variant("v", transform, lambda la, s: s == "v"),
        Variant("kv", transform, None),
    ]


def stream_interaction(results: Sequence[VariantResult], *, seed: int = 0) -> dict[str, Any]:
    """Δppl(kv) − Δppl(k) − Δppl(v) with a paired passage bootstrap CI."""
    by = {r.name: r for r in results}
    counts = np.array([len(t) for t in by["kv"].tokens], dtype=np.float64)
    ref = np.array([-t.ref_logprob.sum() for t in by["kv"].tokens])
    alts = {name: np.array([-t.alt_logprob.sum() for t in by[name].tokens]) for name in ("k", "v", "kv")}

    def inter(idx):
        n = counts[idx].sum(-1)
        d = {name: np.expm1((a[idx].sum(-1) - ref[idx].sum(-1)) / n) for name, a in alts.items()}
        return d["kv"] - d["k"] - d["v"]

    point = float(inter(np.arange(counts.size)[None, :])[0])
    rng = np.random.default_rng(seed)
    boot = inter(rng.integers(0, counts.size, size=(M.BOOTSTRAP_SAMPLES, counts.size)))
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return {"interaction": point, "interaction_ci95": [float(lo), float(hi)]}
