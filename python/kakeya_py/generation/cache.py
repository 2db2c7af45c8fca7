"""A compressed KV cache for generation with HF transformers: :class:`KakeyaCache`.

``model.generate(..., past_key_values=KakeyaCache("recommended", model))`` keeps the
cache in these parts per layer and stream (K, V):

- **sink**: the first ``sink_tokens`` positions (a policy field; attention sinks), stored
  as given and never encoded;
- **encoded chunks**: older tokens, encoded with the codec (one :class:`kakeya_py.Encoded`
  per batch element and chunk, i.e. bytes);
- **exact window**: the most recent tokens, stored as given (like KIVI's residual);
- streams the policy keeps exact (``config_for`` is ``None``, e.g. boundary layers) are
  one growing exact tensor, as in ``DynamicCache``.

**Window and chunks.** With ``residual_length = R`` and ``block_tokens = B``, when the
exact window of a stream reaches ``R + B`` tokens, everything but its last ``R`` tokens
is encoded as one chunk. After a prefill of ``L >= R + B`` tokens this gives one chunk
of ``L - R`` tokens (one skeleton amortised over the prompt); during decoding, one chunk
of ``B`` tokens every ``B`` steps. The window always holds ``min(L, R) .. R + B - 1``
tokens. With ``sink_tokens = N`` the first ``N`` positions go to the sink instead, so
the window and chunks start at position ``N`` (``L`` above counts the tokens after the
sink). Tokens passed to the current ``update`` call are always attended exactly;
tokens from earlier calls that were encoded are attended as decoded.

**Attention.** By default (``attention="kernel"``) decode steps of layers whose K and V are
lossy mean-only uniform encodings attend on the codes: chunks are held as
``kakeya_py._kakeya.AttnChunk`` (parsed once), ``update`` returns only the exact tokens, and
the attention function the cache selects on the model (``kakeya_sdpa`` / ``kakeya_eager``,
:mod:`kakeya_py.generation.attention`) runs the Rust kernel over the chunks and merges it with exact
attention over the sink, window and new tokens (log-sum-exp). K of those layers is stored in
the RoPE-mean layout (``RoPE_p(x_p - mean)`` encoded per chunk; docs/cache.md).

**Decode policy (other layers, or ``attention="decode"``).** Each step decodes a layer's
chunks once, concatenates them with the window and the new tokens, and hands the tensors to
attention; nothing decoded is kept after that layer's attention (``decoded_budget_bytes=0``,
the default). Cost: one codec decode of every encoded token per layer per step (O(T), like
the attention itself); extra memory: one layer's decoded K and V at a time (reported as
``transient_peak_bytes``, not held between steps). A positive ``decoded_budget_bytes`` keeps
the decoded tensors of chunks, oldest first, until that many bytes are held (counted in
``nbytes()`` as ``decoded_bytes``): faster steps for more memory; ``None`` keeps all (no saving).

**K position.** The cache receives post-RoPE K. For a lossy K stream the cache encodes
**pre-RoPE K** (the policy's ``k_position``, default ``pre_rope``): RoPE is a rotation
(times the rope's ``attention_scaling``) of each pair ``(x_i, x_{i+D/2})``, so
``x = (y * cos - rotate_half(y) * sin) / (cos^2 + sin^2)`` undoes it given the ``cos``/``sin``
of those positions. The cache captures the ``position_embeddings`` each attention layer
receives with a forward pre-hook (transformers 5.19 passes no ``cache_kwargs`` to
``update``), keeps a table of them (half width when ``cos = cat(f, f)``, one row when all
batch rows agree, so ~128 bytes per token at f32), un-rotates at encode and re-rotates
after decode. At construction the cache checks numerically that the model's
``apply_rotary_pos_emb`` is this rotation (Llama, Mistral, Qwen2, Qwen3); if it is not,
it refuses pre-RoPE (pass a policy with ``k_position="post_rope"``). Identity-codec
streams are stored as given (post-RoPE), so the identity policy reproduces
``DynamicCache`` bit for bit; ``k_position="pre_rope"`` forces the RoPE round trip.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .. import _kakeya
from ..codec import CodecConfig, decode, encode
from ..eval.hooks import find_attention_sites
from ..policy import Policy, load_policy
from .attention import (
    PendingAttention,
    attention_name,
    capture_hook,
    ensure_registered,
    kernel_supports,
)

__all__ = ["KakeyaCache", "KakeyaLayer", "unrotate_rope", "rotate_rope"]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotate_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Llama-style RoPE of ``x [b, h, n, d]`` with ``cos``/``sin`` of shape ``[b, n, d]``."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + _rotate_half(x) * sin


def unrotate_rope(y: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`rotate_rope` (exact up to rounding; handles a rope scaling factor)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    x = y * cos - _rotate_half(y) * sin
    norm = cos * cos + sin * sin
    if not torch.allclose(norm, torch.ones_like(norm), rtol=0, atol=1e-6):
        x = x / norm
    return x


def _halves_where_finite(mean: torch.Tensor) -> torch.Tensor:
    """``mean`` (float32) rounded to float16 where that stays finite: the RoPE-mean layout's
    pre-RoPE mean, rounded *before* it is subtracted from K, so that the encoded residual, the
    decode path and the kernel all use the same mean (the keys are ``RoPE_p(mean) + decode``,
    whatever the mean) and the ``AttnChunk`` holds it at 2 bytes per value."""
    half = mean.to(torch.float16).to(torch.float32)
    return torch.where(torch.isfinite(half), half, mean)


class _RopeTable:
    """The ``cos``/``sin`` of every cached position, shared by all layers.

    Stored as segments ``(start, cos, sin, half)``; ``half`` segments keep ``d/2`` columns
    (``cos = cat(f, f)``) and a batch dimension of 1 when all batch rows agree.
    """

    def __init__(self) -> None:
        self.segments: list[tuple[int, torch.Tensor, torch.Tensor, bool]] = []
        self.length = 0

    def append(self, start: int, cos: torch.Tensor, sin: torch.Tensor) -> None:
        n = cos.shape[-2]
        if start + n <= self.length:
            return  # another layer already recorded these positions
        if start != self.length:
            raise RuntimeError(
                f"RoPE table holds {self.length} positions but a layer appends positions {start}..{start + n}"
            )
        d = cos.shape[-1]
        half = d % 2 == 0 and torch.equal(cos[..., : d // 2], cos[..., d // 2 :])
        half = half and torch.equal(sin[..., : d // 2], sin[..., d // 2 :])
        if half:
            cos, sin = cos[..., : d // 2], sin[..., : d // 2]
        if cos.shape[0] > 1 and bool((cos == cos[:1]).all()) and bool((sin == sin[:1]).all()):
            cos, sin = cos[:1], sin[:1]
        self.segments.append((start, cos.contiguous().clone(), sin.contiguous().clone(), half))
        self.length = start + n

    def slice(self, start: int, end: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``cos, sin`` of positions ``[start, end)``, shape ``[batch, end - start, d]``."""
        if end > self.length:
            raise RuntimeError(f"RoPE table holds {self.length} positions, {end} requested")
        cs, ss = [], []
        for s0, cos, sin, half in self.segments:
            e0 = s0 + cos.shape[-2]
            lo, hi = max(start, s0), min(end, e0)
            if lo >= hi:
                continue
            c, s = cos[:, lo - s0 : hi - s0], sin[:, lo - s0 : hi - s0]
            if half:
                c, s = torch.cat((c, c), dim=-1), torch.cat((s, s), dim=-1)
            cs.append(c.expand(batch, -1, -1))
            ss.append(s.expand(batch, -1, -1))
        return torch.cat(cs, dim=1), torch.cat(ss, dim=1)

    def truncate(self, length: int) -> None:
        kept = []
        for s0, cos, sin, half in self.segments:
            if s0 >= length:
                continue
            n = min(cos.shape[-2], length - s0)
            kept.append((s0, cos[:, :n], sin[:, :n], half))
        self.segments = kept
        self.length = min(self.length, length)

    def select_batch(self, fn) -> None:
        self.segments = [
            (s0, c if c.shape[0] == 1 else fn(c), s if s.shape[0] == 1 else fn(s), half)
            for s0, c, s, half in self.segments
        ]

    @property
    def nbytes(self) -> int:
        return sum(
            c.numel() * c.element_size() + s.numel() * s.element_size() for _, c, s, _ in self.segments
        )


@dataclass
class _Chunk:
    """``length`` tokens starting at ``start``, encoded once per batch element."""

    start: int
    length: int
    encodings: list[Any]  # Encoded, or kakeya_py._kakeya.AttnChunk on kernel layers
    decoded: torch.Tensor | None = None  # kept decoded [b, h, n, d] (within the budget)

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.encodings)


def check_window_sizes(residual_length: int, block_tokens: int) -> None:
    """Refuses a negative exact window ``R`` or a chunk size ``B`` below 1 (``ValueError``)."""
    if residual_length < 0:
        raise ValueError(f"residual_length must be >= 0, got {residual_length}")
    if block_tokens < 1:
        raise ValueError(f"block_tokens must be >= 1, got {block_tokens}")


class SinkChunksWindow:
    """Bookkeeping of one K or V stream held as an exact sink, lossy chunks, then an exact window.

    Shared by :class:`KakeyaCache` and :class:`kakeya_py.generation.peer_cache.PeerCache` streams, which
    define ``sink`` and ``window`` (``[b, h, n, d]`` or ``None``), ``chunks`` (items with
    ``start`` and ``length``) and ``compressed`` (whether the stream gets a sink and chunks).
    """

    sink: torch.Tensor | None
    chunks: list
    window: torch.Tensor | None

    @property
    def compressed(self) -> bool:
        raise NotImplementedError

    @property
    def sink_tokens(self) -> int:
        return 0 if self.sink is None else self.sink.shape[-2]

    @property
    def encoded_tokens(self) -> int:
        return sum(c.length for c in self.chunks)

    @property
    def window_tokens(self) -> int:
        return 0 if self.window is None else self.window.shape[-2]

    def clear(self) -> None:
        """Drops every token."""
        self.sink = None
        self.chunks.clear()
        self.window = None

    def append_exact(self, new: torch.Tensor, sink_tokens: int) -> None:
        """Appends ``new`` tokens: the sink's first ``sink_tokens`` positions first, the rest to the window."""
        room = sink_tokens - self.sink_tokens if self.compressed else 0
        if room > 0:
            # clone: a view would keep the whole prefill tensor alive
            head, new = new[..., :room, :].clone(), new[..., room:, :]
            self.sink = head if self.sink is None else torch.cat([self.sink, head], dim=-2)
        self.window = new if self.window is None else torch.cat([self.window, new], dim=-2)

    def take_due_chunk(self, residual_length: int, block_tokens: int) -> tuple[int, torch.Tensor] | None:
        """``(start, tokens)`` cut from the window once it holds ``R + B`` tokens (all but its last ``R``).

        ``None`` while the window is shorter, or for a stream kept exact.
        """
        if not self.compressed or self.window_tokens < residual_length + block_tokens:
            return None
        cut = self.window_tokens - residual_length
        start = self.sink_tokens + self.encoded_tokens
        old, self.window = self.window[..., :cut, :], self.window[..., cut:, :].clone()
        return start, old

    def crop(self, keep: int, chunk_values) -> None:
        """Keeps the first ``keep`` tokens; chunks reaching past them go back into the window as
        ``chunk_values(chunk)`` (their lossy values)."""
        while self.chunks and self.chunks[-1].start + self.chunks[-1].length > keep:
            values = chunk_values(self.chunks.pop())
            self.window = values if self.window is None else torch.cat([values, self.window], dim=-2)
        if self.sink is not None:
            self.sink = self.sink[..., :keep, :]
        if self.window is not None:
            self.window = self.window[..., : max(keep - self.sink_tokens - self.encoded_tokens, 0), :]


class SinkChunksWindowLayer(CacheLayerMixin):
    """The transformers layer interface shared by :class:`KakeyaLayer` and ``PeerLayer``.

    Subclasses hold two :class:`SinkChunksWindow` streams ``k`` and ``v`` and define ``update``,
    ``batch_select_indices``, ``batch_size_now`` and ``_chunk_values`` (a chunk's lossy values).
    """

    is_compileable = False
    is_croppable = True
    is_sliding = False

    k: SinkChunksWindow
    v: SinkChunksWindow
    cumulative_length: int

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        for s in (self.k, self.v):
            s.clear()
        self.keys = self.values = None
        self.is_initialized = False
        self.cumulative_length = 0

    def crop(self, tokens_to_remove: int) -> None:
        """Drop tokens from the end (negative: that many; positive: keep that many, legacy).

        Chunks reaching into the removed range go back into the window as their decoded
        values (those tokens stay lossy); a sink longer than what is kept is cut.
        """
        length = self.cumulative_length
        keep = tokens_to_remove if tokens_to_remove > 0 else length + tokens_to_remove
        if keep >= length or not self.is_initialized:
            return
        keep = max(keep, 0)
        for s in (self.k, self.v):
            s.crop(keep, lambda chunk, s=s: self._chunk_values(s, chunk))
        self.cumulative_length = keep
        self._mirror_windows()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.batch_select_indices(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if not self.is_initialized:
            return
        self.batch_select_indices(torch.arange(self.batch_size_now()).repeat_interleave(repeats))

    def offload(self):  # nothing offloadable beyond the window; keep it where it is
        return

    def prefetch(self):
        return

    def _mirror_windows(self) -> None:
        """``keys``/``values`` mirror the exact windows (read by generic transformers code paths)."""
        self.keys, self.values = self.k.window, self.v.window

    def _chunk_values(self, s: SinkChunksWindow, chunk) -> torch.Tensor:
        raise NotImplementedError


@dataclass
class _Stream(SinkChunksWindow):
    """One layer's K or V: an exact sink, encoded chunks, then an exact window."""

    config: CodecConfig | None
    rope: bool  # encode pre-RoPE (K only)
    rope_mean: bool = False  # RoPE-mean layout (K on kernel layers): encode RoPE_p(x - mean_pre)
    kernel: bool = False  # chunks held as AttnChunk for the attention kernel
    sink: torch.Tensor | None = None  # [b, h, n, d], exact, the first positions
    chunks: list[_Chunk] = field(default_factory=list)
    window: torch.Tensor | None = None  # [b, h, n, d], exact

    @property
    def compressed(self) -> bool:
        return self.config is not None


class KakeyaLayer(SinkChunksWindowLayer):
    """One attention layer of a :class:`KakeyaCache` (K and V streams)."""

    def __init__(
        self,
        cache: KakeyaCache,
        layer_idx: int,
        k_config,
        v_config,
        k_rope: bool,
        kernel: bool = False,
        k_rope_mean: bool = False,
    ):
        super().__init__()
        self._cache = weakref.proxy(cache)
        self.layer_idx = layer_idx
        self.kernel = kernel
        self.k = _Stream(k_config, k_rope and not kernel, rope_mean=kernel and k_rope_mean, kernel=kernel)
        self.v = _Stream(v_config, False, kernel=kernel)
        self.cumulative_length = 0

    def __repr__(self) -> str:
        def cfg(s: _Stream) -> str:
            if s.config is None:
                return "exact"
            c = s.config
            layout = " pre-RoPE" if s.rope else " RoPE-mean" if s.rope_mean else ""
            return "identity" if c.identity else f"{c.bits}-bit" + layout

        return (
            f"KakeyaLayer({self.layer_idx}, k={cfg(self.k)}, v={cfg(self.v)}, kernel={self.kernel}, "
            f"tokens={self.cumulative_length}, encoded={self.k.encoded_tokens})"
        )

    # -- transformers interface --------------------------------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start = self.cumulative_length
        n = key_states.shape[-2]
        cache = self._cache
        if self.k.rope or self.k.rope_mean:
            cos, sin = cache._take_rope(self.layer_idx, n)
            if self.k.rope:
                cache._rope.append(start, cos, sin)
            else:
                cache._append_rope_half(start, cos, sin)
        if self.kernel and self.k.chunks:
            # exact parts only; the attention function reads the chunks through the kernel
            if cache._pending.get(self.layer_idx) is not None:
                raise RuntimeError(
                    f"layer {self.layer_idx}: the previous step's compressed attention was never run; the "
                    "model's attention implementation must be the one KakeyaCache selected "
                    f"(model.config._attn_implementation = {cache._attn_name!r})"
                )
            batch = key_states.shape[0]
            cache._pending[self.layer_idx] = PendingAttention(
                layer=self,
                k_chunks=[[c.encodings[b] for c in self.k.chunks] for b in range(batch)],
                v_chunks=[[c.encodings[b] for c in self.v.chunks] for b in range(batch)],
                n_sink=self.k.sink_tokens,
                n_compressed=self.k.encoded_tokens,
                rope=cache._rope_half if self.k.rope_mean else None,
                threads=cache.threads,
                k_snapshot=list(self.k.chunks),
                v_snapshot=list(self.v.chunks),
            )
            keys = self._exact(self.k, key_states)
            values = self._exact(self.v, value_states)
        else:
            keys = self._materialize(self.k, key_states)
            values = self._materialize(self.v, value_states)
        self.cumulative_length += n
        for stream, new in ((self.k, key_states), (self.v, value_states)):
            self._append(stream, new)
        self._mirror_windows()
        return keys, values

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if not self.is_initialized:
            return
        idx = indices.tolist() if isinstance(indices, torch.Tensor) else list(indices)
        if idx and isinstance(idx[0], bool):
            idx = [i for i, keep in enumerate(idx) if keep]
        index = torch.tensor(idx, dtype=torch.long)
        for s in (self.k, self.v):
            if s.sink is not None:
                s.sink = s.sink.index_select(0, index.to(s.sink.device))
            for c in s.chunks:
                c.encodings = [c.encodings[i] for i in idx]
                if c.decoded is not None:
                    c.decoded = c.decoded.index_select(0, index.to(c.decoded.device))
            if s.window is not None:
                s.window = s.window.index_select(0, index.to(s.window.device))
        self._mirror_windows()

    def batch_size_now(self) -> int:
        s = self.k
        for exact in (s.window, s.sink):
            if exact is not None:
                return exact.shape[0]
        return len(s.chunks[0].encodings) if s.chunks else 0

    # -- internals ---------------------------------------------------------------------
    def _exact(self, s: _Stream, new: torch.Tensor) -> torch.Tensor:
        parts = [p for p in (s.sink, s.window, new) if p is not None]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-2)

    def _materialize(self, s: _Stream, new: torch.Tensor) -> torch.Tensor:
        decoded = [self._decoded(s, c) for c in s.chunks]
        parts = [p for p in (s.sink, *decoded, s.window) if p is not None]
        if not parts:
            return new
        parts.append(new)
        out = torch.cat(parts, dim=-2)
        transient = sum(
            p.numel() * p.element_size() for c, p in zip(s.chunks, decoded, strict=True) if c.decoded is None
        )
        self._cache._note_transient(self.layer_idx, s is self.k, transient)
        return out

    def _append(self, s: _Stream, new: torch.Tensor) -> None:
        s.append_exact(new, self._cache.sink_tokens)
        self._maybe_flush(s)

    def _chunk_values(self, s: _Stream, chunk: _Chunk) -> torch.Tensor:
        return self._decoded(s, chunk)

    def _decoded(self, s: _Stream, chunk: _Chunk) -> torch.Tensor:
        if chunk.decoded is not None:
            return chunk.decoded
        cache = self._cache
        if s.kernel:
            rows = [torch.from_numpy(e.decode()) for e in chunk.encodings]  # each [n, h, d] f32
        else:
            rows = [decode(e, threads=cache.threads) for e in chunk.encodings]  # each [n, h, d]
        x = torch.stack(rows).permute(0, 2, 1, 3)  # [b, h, n, d]
        if x.device != self.device:
            x = x.to(self.device)
        if s.rope_mean:
            cos, sin = cache._rope_half_slice(chunk.start, chunk.start + chunk.length, x.shape[0])
            mean = torch.stack([torch.from_numpy(e.rope_mean) for e in chunk.encodings]).to(x.device)
            x = x + rotate_rope(mean[:, :, None, :].expand_as(x), cos.to(x.device), sin.to(x.device))
        if s.rope:
            cos, sin = cache._rope.slice(chunk.start, chunk.start + chunk.length, x.shape[0])
            x = rotate_rope(x, cos.to(x.dtype), sin.to(x.dtype))
        return x.to(self.dtype).contiguous()

    def _maybe_flush(self, s: _Stream) -> None:
        cache = self._cache
        due = s.take_due_chunk(cache.residual_length, cache.block_tokens)
        if due is None:
            return
        start, old = due
        cut = old.shape[-2]
        means = None
        if s.rope:
            cos, sin = cache._rope.slice(start, start + cut, old.shape[0])
            old = unrotate_rope(old, cos.to(old.dtype), sin.to(old.dtype))
        elif s.rope_mean:
            # RoPE-mean layout: e_p = RoPE_p(x_p - mean) = k_p - RoPE_p(mean), mean over pre-RoPE x
            cos, sin = cache._rope_half_slice(start, start + cut, old.shape[0])
            cos, sin = cos.to(old.device), sin.to(old.device)
            k = old.to(torch.float32)
            means = _halves_where_finite(unrotate_rope(k, cos, sin).mean(dim=-2))  # [b, h, d]
            old = k - rotate_rope(means[:, :, None, :].expand_as(k), cos, sin)
        rows = old.permute(0, 2, 1, 3)  # [b, n, h, d]
        encodings = [
            encode(rows[b].contiguous(), s.config, threads=cache.threads) for b in range(rows.shape[0])
        ]
        if s.kernel:
            encodings = [
                _kakeya.AttnChunk(
                    e._inner if hasattr(e, "_inner") else e,
                    start,
                    None if means is None else np.ascontiguousarray(means[b].cpu().numpy()),
                )
                for b, e in enumerate(encodings)
            ]
        chunk = _Chunk(start, cut, encodings)
        s.chunks.append(chunk)
        cache._maybe_keep_decoded(self, s, chunk)


def _as_policy(spec: Any) -> Policy:
    if isinstance(spec, Policy):
        return spec
    if isinstance(spec, str):
        return load_policy(spec)
    if isinstance(spec, CodecConfig):
        return Policy(name="codec-config", k=spec, v=spec)
    if isinstance(spec, Mapping):
        d = dict(spec)
        if not ({"k", "v", "exact_layers", "overrides", "streams"} & set(d)):
            cfg = CodecConfig.from_dict(d)
            return Policy(name="codec-config", k=cfg, v=cfg)
        return Policy.from_dict(d)
    raise TypeError(
        f"expected a Policy, a policy preset/file name, a CodecConfig or a dict, got {type(spec).__name__}"
    )


def _fit_policy(policy: Policy, model, sites, force: bool) -> Policy:
    """``policy`` checked against the model's shape (:func:`~kakeya_py.policy.fit_to_model`): a
    preset made for another model is refused, or with ``force`` applied where it fits (warned)."""
    import warnings
    from types import SimpleNamespace

    from ..policy import fit_to_model

    shape = SimpleNamespace(
        name=str(getattr(model.config, "name_or_path", "") or type(model).__name__),
        num_layers=len(sites),
        num_kv_heads=sites[0].num_kv_heads,
        head_dim=sites[0].head_dim,
    )
    fitted, dropped = fit_to_model(policy, shape, force=force)
    if dropped:
        warnings.warn(f"policy {policy.name!r} applied where it fits: {'; '.join(dropped)}", stacklevel=3)
    return fitted


def _rope_matches(site) -> bool:
    """Whether the layer's ``apply_rotary_pos_emb`` is the rotate-half RoPE we invert."""
    fn = getattr(site.modeling_module, "apply_rotary_pos_emb", None)
    if fn is None:
        return False
    g = torch.Generator().manual_seed(0)
    d = site.head_dim
    k = torch.randn(1, 2, 3, d, generator=g)
    theta = torch.rand(1, 3, d // 2, generator=g) * 6
    cos, sin = torch.cos(theta).repeat(1, 1, 2), torch.sin(theta).repeat(1, 1, 2)
    try:
        _, got = fn(k, k, cos, sin)
    except Exception:
        return False
    return torch.allclose(got, rotate_rope(k, cos, sin), atol=1e-5)


class KakeyaCache(Cache):
    """A transformers ``Cache`` holding old tokens encoded by the kakeya codec.

    Args:
        policy: a :class:`~kakeya_py.policy.Policy`, a policy preset or JSON file name
            (``"recommended"``, ``"identity"``, ...), a :class:`CodecConfig` (both streams,
            every layer) or a dict of either. Its ``sink_tokens`` first positions of each
            sequence stay exact in every compressed stream and are never encoded.
        model: the transformers causal LM the cache serves (layer count, RoPE capture).
        residual_length: ``R``, tokens always kept exact at the end of each stream.
        block_tokens: ``B``, encode when the window reaches ``R + B`` tokens.
        decoded_budget_bytes: bytes of decoded chunks kept between steps (0: decode every
            step, keep nothing; ``None``: keep every chunk decoded, no memory saving).
        k_position: override of the policy's ``k_position`` for lossy K (``None``: the
            policy's); ``"pre_rope"`` here also routes identity K through the RoPE round trip.
        threads: codec threads (``None``: the codec's default, every core).
        attention: ``"kernel"`` (default): decode steps of layers whose K and V are both
            lossy mean-only uniform encodings run attention on the codes (Rust kernel; K stored
            in the RoPE-mean layout when the policy's K is pre-RoPE); other layers decode.
            ``"decode"``: every layer decodes its chunks each step (the pre-kernel behaviour).
            The kernel path selects the model's attention implementation ``kakeya_sdpa`` (or
            ``kakeya_eager``), which is the original one wherever no compressed chunk is read.
        force_model: apply a policy made for another model where it fits (a warning lists what
            was dropped) instead of raising :class:`~kakeya_py.policy.PolicyModelError`.

    Example:
        >>> cache = KakeyaCache("recommended", model, residual_length=64)  # doctest: +SKIP
        >>> out = model.generate(ids, max_new_tokens=32, past_key_values=cache)  # doctest: +SKIP
        >>> cache.nbytes()["total_bytes"] < cache.nbytes()["dynamic_cache_bytes"]  # doctest: +SKIP
        True
    """

    def __init__(
        self,
        policy: Any,
        model,
        *,
        residual_length: int = 64,
        block_tokens: int = 128,
        decoded_budget_bytes: int | None = 0,
        k_position: str | None = None,
        threads: int | None = None,
        attention: str = "kernel",
        force_model: bool = False,
    ):
        check_window_sizes(residual_length, block_tokens)
        if decoded_budget_bytes is not None and decoded_budget_bytes < 0:
            raise ValueError(f"decoded_budget_bytes must be >= 0 or None, got {decoded_budget_bytes}")
        if k_position not in (None, "pre_rope", "post_rope"):
            raise ValueError(f"k_position must be None, 'pre_rope' or 'post_rope', got {k_position!r}")
        if attention not in ("kernel", "decode"):
            raise ValueError(f"attention must be 'kernel' or 'decode', got {attention!r}")
        self.policy = _as_policy(policy)
        if self.policy.sigma_q is not None:
            raise ValueError(
                "KakeyaCache does not load Σ_q pre-conditioners yet (policy names a sigma_q file)"
            )
        if self.policy.basis is not None:
            raise ValueError(
                "KakeyaCache does not code in a model basis yet (the policy names a basis file); "
                "model-basis policies run in kakeya eval (HF snapshot and vLLM)"
            )
        self.residual_length = int(residual_length)
        self.sink_tokens = self.policy.sink_tokens
        self.block_tokens = int(block_tokens)
        self.decoded_budget_bytes = decoded_budget_bytes
        self.threads = threads
        self.attention = attention
        sites = find_attention_sites(model)
        self.num_layers = len(sites)
        self.policy = _fit_policy(self.policy, model, sites, force_model)
        self._rope = _RopeTable()
        self._rope_half = None  # kakeya_py._kakeya.RopeTable (RoPE-mean K layout), made on first use
        self._pending: dict[int, PendingAttention] = {}
        self._attn_name: str | None = None
        # tests: attend kernel layers by decoding their chunks (same bytes, reference path)
        self._decode_attention_check = False
        self._rope_pending: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._decoded_bytes = 0
        self._transient: dict[int, list[int]] = {}
        self.transient_peak_bytes = 0
        layers = []
        rope_layers = []
        for site in sites:
            kc = self.policy.config_for(site.layer, "k", self.num_layers)
            vc = self.policy.config_for(site.layer, "v", self.num_layers)
            want = k_position or self.policy.k_position
            rope = kc is not None and want == "pre_rope" and (not kc.identity or k_position == "pre_rope")
            if rope and not _rope_matches(site):
                raise ValueError(
                    f"layer {site.layer} ({type(site.attn).__name__}) does not use rotate-half RoPE, so pre-RoPE K "
                    "cannot be recovered exactly; use a policy with k_position='post_rope'"
                )
            kernel = (
                attention == "kernel"
                and kernel_supports(kc, site.head_dim)
                and kernel_supports(vc, site.head_dim)
            )
            if rope:
                rope_layers.append(site)
            layers.append(KakeyaLayer(self, site.layer, kc, vc, rope, kernel=kernel, k_rope_mean=rope))
        super().__init__(layers=layers)
        self._handles = [
            site.attn.register_forward_pre_hook(_rope_hook(self, site.layer), with_kwargs=True)
            for site in rope_layers
        ]
        restore = None
        if any(layer.kernel for layer in layers):
            restore = self._select_attention(model, sites)
        self._finalizer = weakref.finalize(self, _remove_handles, self._handles, restore)

    def _select_attention(self, model, sites):
        """Selects ``kakeya_<original>`` on the model and marks each attention module per call."""
        ensure_registered()
        current = getattr(model.config, "_attn_implementation", None)
        name = attention_name(current)
        if name is None:
            raise ValueError(
                f"the attention kernel wraps 'sdpa' or 'eager' attention, the model uses {current!r}; "
                "load the model with attn_implementation='sdpa' or pass attention='decode'"
            )
        self._attn_name = name
        if current != name:
            model.set_attn_implementation(name)
        users = getattr(model, "_kakeya_attention_users", 0) + 1
        model._kakeya_attention_users = users
        for site in sites:
            self._handles.append(
                site.attn.register_forward_pre_hook(capture_hook(self), with_kwargs=True)
            )
        from .attention import fallback_of

        return (weakref.ref(model), fallback_of(current))

    def __repr__(self) -> str:
        return (
            f"KakeyaCache(policy={self.policy.name!r}, layers={self.num_layers}, "
            f"sink_tokens={self.sink_tokens}, residual_length={self.residual_length}, "
            f"block_tokens={self.block_tokens}, decoded_budget_bytes={self.decoded_budget_bytes}, "
            f"tokens={self.get_seq_length()})"
        )

    def close(self) -> None:
        """Remove the RoPE capture hooks from the model (also done when the cache is collected)."""
        self._finalizer()

    def __enter__(self) -> KakeyaCache:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def reset(self):
        super().reset()
        self._rope = _RopeTable()
        self._rope_half = None
        self._pending.clear()
        self._rope_pending.clear()
        self._decoded_bytes = 0

    def crop(self, tokens_to_remove: int) -> None:
        super().crop(tokens_to_remove)
        self._rope.truncate(self.get_seq_length())
        if self._rope_half is not None:
            self._rope_half.truncate(self.get_seq_length())
        self._decoded_bytes = self._count_decoded()

    def batch_select_indices(self, indices: torch.Tensor):
        super().batch_select_indices(indices)
        self._rope.select_batch(lambda t: t.index_select(0, torch.as_tensor(indices, device=t.device).long()))
        if self._rope_half is not None:
            idx = indices.tolist() if isinstance(indices, torch.Tensor) else list(indices)
            if idx and isinstance(idx[0], bool):
                idx = [i for i, keep in enumerate(idx) if keep]
            self._rope_half.select([int(i) for i in idx])
        self._decoded_bytes = self._count_decoded()

    def reorder_cache(self, beam_idx: torch.LongTensor):
        self.batch_select_indices(beam_idx)

    def batch_repeat_interleave(self, repeats: int):
        b = max((layer.batch_size_now() for layer in self.layers), default=0)
        self.batch_select_indices(torch.arange(b).repeat_interleave(repeats))

    # -- internals used by the layers --------------------------------------------------
    def _take_rope(self, layer: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        pe = self._rope_pending.pop(layer, None)
        if pe is None:
            raise RuntimeError(
                f"layer {layer}: no position embeddings were captured for this update; pre-RoPE K needs the "
                "model this cache was built with (KakeyaCache(policy, model))"
            )
        cos, sin = pe
        if cos.dim() == 2:
            cos, sin = cos.unsqueeze(0), sin.unsqueeze(0)
        if cos.shape[-2] != n:
            raise RuntimeError(
                f"layer {layer}: captured cos/sin for {cos.shape[-2]} positions, update has {n}"
            )
        return cos, sin

    def _append_rope_half(self, start: int, cos: torch.Tensor, sin: torch.Tensor) -> None:
        """Records positions for the RoPE-mean K layout (half width: ``cos = cat(f, f)``)."""
        if self._rope_half is not None and start + cos.shape[-2] <= len(self._rope_half):
            return  # another layer already recorded these positions
        d = cos.shape[-1]
        half = d // 2
        if d % 2 or not (torch.equal(cos[..., :half], cos[..., half:]) and torch.equal(sin[..., :half], sin[..., half:])):
            raise RuntimeError(
                "the RoPE-mean K layout needs rotate-half RoPE with cos = cat(f, f); use attention='decode'"
            )
        c = cos[..., :half].to(torch.float32)
        s = sin[..., :half].to(torch.float32)
        if c.shape[0] > 1 and bool((c == c[:1]).all()) and bool((s == s[:1]).all()):
            c, s = c[:1], s[:1]
        if self._rope_half is None:
            self._rope_half = _kakeya.RopeTable(half)
        self._rope_half.append(
            start, np.ascontiguousarray(c.cpu().numpy()), np.ascontiguousarray(s.cpu().numpy())
        )

    def _rope_half_slice(self, start: int, end: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Full-width ``cos, sin`` ``[batch, end - start, d]`` from the RoPE-mean table."""
        table = self._rope_half
        cs, ss = [], []
        for b in range(batch):
            c, s = table.slice(start, end, 0 if table.rows == 1 else b)
            cs.append(torch.from_numpy(c))
            ss.append(torch.from_numpy(s))
        c, s = torch.stack(cs), torch.stack(ss)
        return torch.cat((c, c), dim=-1), torch.cat((s, s), dim=-1)

    def _note_transient(self, layer: int, is_k: bool, nbytes: int) -> None:
        per = self._transient.setdefault(layer, [0, 0])
        per[0 if is_k else 1] = nbytes
        self.transient_peak_bytes = max(self.transient_peak_bytes, sum(per))

    def _maybe_keep_decoded(self, layer: KakeyaLayer, s: _Stream, chunk: _Chunk) -> None:
        if self.decoded_budget_bytes == 0 or s.kernel:
            return
        n, h, d = chunk.encodings[0].shape
        size = len(chunk.encodings) * n * h * d * torch.empty((), dtype=layer.dtype).element_size()
        if self.decoded_budget_bytes is None or self._decoded_bytes + size <= self.decoded_budget_bytes:
            chunk.decoded = layer._decoded(s, chunk)
            self._decoded_bytes += size

    def _count_decoded(self) -> int:
        return sum(
            c.decoded.numel() * c.decoded.element_size()
            for layer in self.layers
            for s in (layer.k, layer.v)
            for c in s.chunks
            if c.decoded is not None
        )

    # -- accounting --------------------------------------------------------------------
    def nbytes(self) -> dict[str, Any]:
        """Bytes held now, by kind, and what ``DynamicCache`` would hold for the same tokens.

        Returns:
            ``encoded_bytes`` (codec output, headers and skeletons included),
            ``sink_bytes`` (the exact first ``sink_tokens`` positions of compressed streams),
            ``window_bytes`` (exact recent tokens of compressed streams), ``exact_bytes``
            (streams the policy keeps exact), ``rope_table_bytes``, ``decoded_bytes`` (decoded
            chunks kept by the budget), ``total_bytes`` (their sum), ``transient_peak_bytes``
            (largest decoded buffer of one layer during a step, freed after it; not in the
            total), ``dynamic_cache_bytes``, ``ratio`` (dynamic / total), ``tokens``,
            ``encoded_tokens``, and ``per_layer``.
        """
        kinds = ("encoded_bytes", "sink_bytes", "window_bytes", "exact_bytes", "decoded_bytes")
        out = dict.fromkeys((*kinds, "dynamic_cache_bytes"), 0)
        per_layer = []
        for layer in self.layers:
            row = {"layer": layer.layer_idx}
            for name, s in (("k", layer.k), ("v", layer.v)):
                enc = sum(c.nbytes for c in s.chunks)
                sink = 0 if s.sink is None else s.sink.numel() * s.sink.element_size()
                win = 0 if s.window is None else s.window.numel() * s.window.element_size()
                dec = sum(
                    c.decoded.numel() * c.decoded.element_size() for c in s.chunks if c.decoded is not None
                )
                dyn = _dynamic_bytes(layer, s)
                out["encoded_bytes"] += enc
                out["sink_bytes"] += sink
                out["window_bytes" if s.config is not None else "exact_bytes"] += win
                out["decoded_bytes"] += dec
                out["dynamic_cache_bytes"] += dyn
                row[name] = {
                    "encoded_bytes": enc,
                    "sink_bytes": sink,
                    "exact_bytes": win,
                    "decoded_bytes": dec,
                    "dynamic_cache_bytes": dyn,
                    "sink_tokens": s.sink_tokens,
                    "encoded_tokens": s.encoded_tokens,
                    "window_tokens": s.window_tokens,
                    "compressed": s.config is not None,
                }
            per_layer.append(row)
        out["rope_table_bytes"] = self._rope.nbytes + (0 if self._rope_half is None else self._rope_half.nbytes)
        out["total_bytes"] = sum(out[k] for k in (*kinds, "rope_table_bytes"))
        out["transient_peak_bytes"] = self.transient_peak_bytes
        out["ratio"] = out["dynamic_cache_bytes"] / out["total_bytes"] if out["total_bytes"] else None
        out["tokens"] = self.get_seq_length()
        out["encoded_tokens"] = max((layer.k.encoded_tokens for layer in self.layers), default=0)
        out["per_layer"] = per_layer
        return out


def _dynamic_bytes(layer: KakeyaLayer, s: _Stream) -> int:
    """What ``DynamicCache`` holds for this stream's tokens (model dtype, no compression)."""
    exact = s.window if s.window is not None else s.sink
    if exact is not None:
        b, h, _, d = exact.shape
        size = exact.element_size()
    elif s.chunks:
        b = len(s.chunks[0].encodings)
        _, h, d = s.chunks[0].encodings[0].shape
        size = torch.empty((), dtype=layer.dtype).element_size()
    else:
        return 0
    return b * h * d * layer.cumulative_length * size


def _rope_hook(cache: KakeyaCache, layer: int):
    ref = weakref.ref(cache)

    def hook(_module, args, kwargs):
        c = ref()
        if c is None or kwargs.get("past_key_values") is not c:
            return None
        pe = kwargs.get("position_embeddings")
        if pe is None and len(args) > 1:
            pe = args[1]
        if pe is not None:
            c._rope_pending[layer] = (pe[0], pe[1])
        return None

    return hook


def _remove_handles(handles: list, restore=None) -> None:
    for h in handles:
        h.remove()
    handles.clear()
    if restore is not None:
        ref, original = restore
        model = ref()
        if model is None:
            return
        users = getattr(model, "_kakeya_attention_users", 1) - 1
        model._kakeya_attention_users = users
        if users <= 0 and original != model.config._attn_implementation:
            model.set_attn_implementation(original)
