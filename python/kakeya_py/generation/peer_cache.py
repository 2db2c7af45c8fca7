"""Peer quantizers as transformers caches: :class:`PeerCache`, for generation measurements.

:mod:`kakeya_py.peers` re-implements published KV quantizers (KIVI, the HF quantized
cache's int-g64, TurboQuant-style, FP8, KVQuant-style) as tensor round trips for the
harness. ``PeerCache`` runs one of them **as a cache during generation**, with the same
layout as :class:`kakeya_py.generation.cache.KakeyaCache`, so the generation measurements
(``kakeya generate-eval``) compare the methods through one interface:

- **sink**: the first ``sink_tokens`` positions of every stream, exact, never quantized;
- **chunks**: when a stream's exact window reaches ``residual_length + block_tokens``
  tokens, all but its last ``residual_length`` are quantized as one chunk with the peer's
  ``PeerMethod.roundtrip`` (per batch row, a ``[tokens, kv_heads, head_dim]`` tensor);
- **window**: the most recent tokens, exact.

Tokens passed to the current ``update`` call are attended exactly (as in ``KakeyaCache``
and KIVI); tokens of earlier calls come from the window (exact) or from chunks (the
peer's decoded values). Each chunk keeps the tensor the peer's ``decode`` produced (what
attention would read if it decoded every step; the peers are deterministic, so this is
the same values) and counts the **bytes the peer stores** for it
(:func:`kakeya_py.peers.stored_nbytes`, bit-packed codes, scales, outliers), so
``nbytes()`` reports what the method would hold, not what this evaluation keeps in memory.

K position: the cache receives post-RoPE K and quantizes it as given (``post_rope``):
that is how KIVI, the HF ``QuantizedCache`` and vLLM's fp8 cache are deployed. Methods
that keep positions exact inside a chunk (``exact_positions``: KIVI's K token groups that
do not fill a group of ``G``) hand those back exact and count them at 2 bytes per value.
Use a peer's own residual option 0 (``kivi-4(r=0)``, the default here, see
:func:`peer_cache_method`): the cache's window plays that role.

Example:
    >>> cache = PeerCache("turbo-4", model, residual_length=64)  # doctest: +SKIP
    >>> out = model.generate(ids, max_new_tokens=32, past_key_values=cache)  # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.cache_utils import Cache

from ..eval.hooks import find_attention_sites, parse_layers
from ..peers import PeerMethod, parse_method
from .cache import SinkChunksWindow, SinkChunksWindowLayer, check_window_sizes

__all__ = ["PeerCache", "PeerLayer", "peer_cache_method"]


def peer_cache_method(spec: str | PeerMethod) -> PeerMethod:
    """The peer method for a cache: ``spec`` parsed, with KIVI's own residual window set to 0.

    In a cache the exact recent window is the cache's ``residual_length``; KIVI's ``r``
    option (default 128 in :func:`kakeya_py.peers.parse_method`) would keep a second
    window inside every chunk. An explicit ``kivi-4(r=N)`` is kept as written.
    """
    if isinstance(spec, PeerMethod):
        return spec
    text = spec.strip()
    method = parse_method(text)
    if method.family == "kivi" and "r=" not in text:
        method = parse_method(text[:-1] + ",r=0)" if text.endswith(")") else text + "(r=0)")
    return method


@dataclass
class _PeerChunk:
    start: int
    length: int
    values: torch.Tensor  # [b, h, n, d], what the peer's decode gives, model dtype
    nbytes: list[int]  # bytes the peer stores, per batch row


@dataclass
class _PeerStream(SinkChunksWindow):
    """One layer's K or V: an exact sink, the peer's decoded chunks, then an exact window."""

    on: bool
    sink: torch.Tensor | None = None
    chunks: list[_PeerChunk] = field(default_factory=list)
    window: torch.Tensor | None = None

    @property
    def compressed(self) -> bool:
        return self.on

    def parts(self) -> list[torch.Tensor]:
        return [p for p in (self.sink, *(c.values for c in self.chunks), self.window) if p is not None]


class PeerLayer(SinkChunksWindowLayer):
    """One attention layer of a :class:`PeerCache` (K and V streams)."""

    def __init__(self, cache: PeerCache, layer_idx: int, on: bool):
        super().__init__()
        self._cache = cache
        self.layer_idx = layer_idx
        self.k = _PeerStream(on)
        self.v = _PeerStream(on)
        self.cumulative_length = 0

    def __repr__(self) -> str:
        return (
            f"PeerLayer({self.layer_idx}, {'quantized' if self.k.on else 'exact'}, "
            f"tokens={self.cumulative_length}, encoded={self.k.encoded_tokens})"
        )

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        out = []
        for name, s, new in (("k", self.k, key_states), ("v", self.v, value_states)):
            parts = s.parts()
            out.append(torch.cat([*parts, new], dim=-2) if parts else new)
            self._append(name, s, new)
        self.cumulative_length += key_states.shape[-2]
        self._mirror_windows()
        return out[0], out[1]

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if not self.is_initialized:
            return
        index = torch.as_tensor(indices, dtype=torch.long)
        if index.dtype == torch.bool:
            index = index.nonzero().flatten()
        rows = index.tolist()
        for s in (self.k, self.v):
            if s.sink is not None:
                s.sink = s.sink.index_select(0, index.to(s.sink.device))
            if s.window is not None:
                s.window = s.window.index_select(0, index.to(s.window.device))
            for c in s.chunks:
                c.values = c.values.index_select(0, index.to(c.values.device))
                c.nbytes = [c.nbytes[i] for i in rows]
        self._mirror_windows()

    def batch_size_now(self) -> int:
        return self.k.parts()[0].shape[0]

    def _chunk_values(self, s: _PeerStream, chunk: _PeerChunk) -> torch.Tensor:
        return chunk.values

    def _append(self, name: str, s: _PeerStream, new: torch.Tensor) -> None:
        cache = self._cache
        s.append_exact(new, cache.sink_tokens)
        due = s.take_due_chunk(cache.residual_length, cache.block_tokens)
        if due is None:
            return
        start, old = due
        cut = old.shape[-2]
        values, sizes = [], []
        for row in old.permute(0, 2, 1, 3):  # [n, h, d] per batch row
            x_hat, nbytes = cache.method.roundtrip(self.layer_idx, name, row.contiguous())
            values.append(x_hat.to(old.dtype))
            sizes.append(int(nbytes))
        s.chunks.append(_PeerChunk(start, cut, torch.stack(values).permute(0, 2, 1, 3).contiguous(), sizes))


class PeerCache(Cache):
    """A transformers ``Cache`` whose older tokens are quantized by a peer method.

    Args:
        method: a peer method name (``kivi-4``, ``int4``, ``turbo-4``, ``fp8``, ``kvquant-4``,
            with options, see :func:`kakeya_py.peers.parse_method`) or a ``PeerMethod``.
            KIVI's own residual window defaults to 0 here (:func:`peer_cache_method`).
        model: the transformers causal LM the cache serves (its attention layers are counted).
        residual_length: ``R``, recent tokens kept exact.
        block_tokens: ``B``, quantize when the window reaches ``R + B`` tokens.
        sink_tokens: the first positions kept exact (as a policy's ``sink_tokens``).
        exact_layers: layers kept exact (negatives count from the end), as ``--exact-layers``.

    Example:
        >>> cache = PeerCache("kivi-4", model, residual_length=64, block_tokens=128)  # doctest: +SKIP
    """

    def __init__(
        self,
        method: str | PeerMethod,
        model,
        *,
        residual_length: int = 64,
        block_tokens: int = 128,
        sink_tokens: int = 0,
        exact_layers=(),
    ):
        check_window_sizes(residual_length, block_tokens)
        if sink_tokens < 0:
            raise ValueError(f"sink_tokens must be >= 0, got {sink_tokens}")
        self.method = peer_cache_method(method)
        self.residual_length = int(residual_length)
        self.block_tokens = int(block_tokens)
        self.sink_tokens = int(sink_tokens)
        sites = find_attention_sites(model)
        self.num_layers = len(sites)
        exact = set(parse_layers(list(exact_layers), self.num_layers) or []) if exact_layers else set()
        self.exact_layers = sorted(exact)
        super().__init__(layers=[PeerLayer(self, s.layer, s.layer not in exact) for s in sites])

    def __repr__(self) -> str:
        return (
            f"PeerCache(method={self.method.name!r}, layers={self.num_layers}, sink_tokens={self.sink_tokens}, "
            f"residual_length={self.residual_length}, block_tokens={self.block_tokens}, "
            f"tokens={self.get_seq_length()})"
        )

    @property
    def name(self) -> str:
        return self.method.name

    def reorder_cache(self, beam_idx: torch.LongTensor):
        for layer in self.layers:
            layer.batch_select_indices(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor):
        for layer in self.layers:
            layer.batch_select_indices(indices)

    def nbytes(self) -> dict[str, Any]:
        """Bytes the method would hold now, by kind, and ``DynamicCache``'s for the same tokens.

        Returns:
            ``encoded_bytes`` (the peer's stored arrays), ``sink_bytes``, ``window_bytes``,
            ``exact_bytes`` (layers kept exact), ``total_bytes``, ``dynamic_cache_bytes``,
            ``ratio`` (dynamic / total), ``tokens``, ``encoded_tokens``.
        """
        out = dict.fromkeys(("encoded_bytes", "sink_bytes", "window_bytes", "exact_bytes"), 0)
        dynamic = 0
        for layer in self.layers:
            for s in (layer.k, layer.v):
                out["encoded_bytes"] += sum(sum(c.nbytes) for c in s.chunks)
                if s.sink is not None:
                    out["sink_bytes"] += s.sink.numel() * s.sink.element_size()
                if s.window is not None:
                    key = "window_bytes" if s.on else "exact_bytes"
                    out[key] += s.window.numel() * s.window.element_size()
                parts = s.parts()
                if parts and layer.cumulative_length:
                    b, h, _, d = parts[0].shape
                    dynamic += b * h * d * layer.cumulative_length * parts[0].element_size()
        out["total_bytes"] = sum(out.values())
        out["dynamic_cache_bytes"] = dynamic
        out["ratio"] = dynamic / out["total_bytes"] if out["total_bytes"] else None
        out["tokens"] = self.get_seq_length()
        out["encoded_tokens"] = max((layer.k.encoded_tokens for layer in self.layers), default=0)
        return out
