"""How attention reads a :class:`~kakeya_py.generation.cache.KakeyaCache`: the compressed-domain kernel.

``KakeyaCache`` stores; this module attends. For a layer whose K and V streams the kernel
supports, ``KakeyaLayer.update`` returns only the exact tokens (sink, window, the new
tokens) and leaves a :class:`PendingAttention` for the layer; the attention function
registered here under ``kakeya_sdpa`` / ``kakeya_eager`` (transformers'
``AttentionInterface``, selected on the model by the cache) then computes:

- over the encoded chunks: ``kakeya_py._kakeya.attend_compressed`` (Rust, GIL released):
  partial softmax ``(out, max, sum)`` per query row, on the codes;
- over the exact tokens: the same partial softmax in torch (float32);
- the two merged by log-sum-exp.

When no pending state exists (prefill, layers kept exact, another cache), the function is
exactly the model's original ``sdpa`` / ``eager`` attention.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .. import _kakeya

__all__ = ["PendingAttention", "ensure_registered", "attention_name", "kernel_supports"]

_FALLBACKS = ("sdpa", "eager")
_PREFIX = "kakeya_"


def kernel_supports(config, head_dim: int) -> bool:
    """Whether the attention kernel reads encodings of ``config`` (lossy, mean-only, uniform)."""
    if config is None or config.identity:
        return False
    return (
        config.basis == "none"
        and config.allocation == "uniform"
        and config.metric == "mse"
        and head_dim >= 8
        and head_dim & (head_dim - 1) == 0
    )


def attention_name(current: str | None) -> str | None:
    """The registered name that wraps ``current`` (``None`` if it cannot be wrapped)."""
    if current is None:
        return None
    if current.startswith(_PREFIX) and current[len(_PREFIX) :] in _FALLBACKS:
        return current
    return _PREFIX + current if current in _FALLBACKS else None


def fallback_of(name: str) -> str:
    return name[len(_PREFIX) :] if name.startswith(_PREFIX) else name


_REGISTERED = False


def ensure_registered() -> None:
    """Registers ``kakeya_sdpa`` and ``kakeya_eager`` (attention and mask functions)."""
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

    for fb in _FALLBACKS:
        AttentionInterface.register(_PREFIX + fb, _make_attention(fb, ALL_ATTENTION_FUNCTIONS))
        AttentionMaskInterface.register(_PREFIX + fb, ALL_MASK_ATTENTION_FUNCTIONS[fb])
    _REGISTERED = True


def _original(name: str, registry):
    if name == "eager":
        import importlib

        # every supported architecture's eager path is the Llama one (repeat_kv + softmax)
        return importlib.import_module("transformers.models.llama.modeling_llama").eager_attention_forward
    return registry[name]


def _make_attention(fallback: str, registry):
    def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        ref = getattr(module, "_kakeya_cache", None)
        cache = ref() if ref is not None else None
        pending = cache._pending.pop(module.layer_idx, None) if cache is not None else None
        original = _original(fallback, registry)
        if pending is None:
            return original(
                module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
            )
        return pending.attend(module, query, key, value, attention_mask, scaling, original, dropout, kwargs)

    attention.__name__ = f"kakeya_{fallback}_attention"
    attention.__doc__ = (
        f"Attention over a KakeyaCache's codes merged with its exact tokens; else transformers' {fallback}."
    )
    return attention


def _allowed(mask: torch.Tensor | None) -> torch.Tensor | None:
    """A boolean ``[b, 1|h, q, kv]`` view of an sdpa (bool) or eager (additive) mask."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return mask
    return mask > torch.finfo(mask.dtype).min / 2


@dataclass
class PendingAttention:
    """What one layer's attention needs beyond the exact keys/values ``update`` returned."""

    layer: Any  # KakeyaLayer (weak proxy semantics via the cache)
    k_chunks: list[list[Any]]  # per batch row: AttnChunk of every K chunk
    v_chunks: list[list[Any]]
    n_sink: int  # exact sink tokens at the front of the exact keys
    n_compressed: int  # encoded tokens between the sink and the window
    rope: Any  # kakeya_py._kakeya.RopeTable or None
    threads: int | None
    k_snapshot: list[Any]  # the layer's K and V _Chunk lists when update ran
    v_snapshot: list[Any]

    def _skips(self, allowed: torch.Tensor | None, b: int, q_len: int) -> list[int] | None:
        """Per row, the leading compressed tokens the mask hides; None if not a prefix pattern."""
        if allowed is None:
            return [0] * b
        n0, n = self.n_sink, self.n_compressed
        part = allowed[:, :, :, n0 : n0 + n]
        if part.shape[1] != 1:
            if not bool((part == part[:, :1]).all()):
                return None
            part = part[:, :1]
        part = part[:, 0].expand(b, q_len, n)
        hidden = n - part[:, 0].sum(-1)
        want = torch.arange(n, device=part.device)[None, :] >= hidden[:, None]
        if not bool((part == want[:, None, :]).all()):
            return None
        return [int(h) for h in hidden.tolist()]

    def materialize(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The decoded chunks as ``[b, h, n, d]`` K and V (for masks the kernel does not take)."""
        layer = self.layer
        k = torch.cat([layer._decoded(layer.k, c) for c in self.k_snapshot], dim=-2)
        v = torch.cat([layer._decoded(layer.v, c) for c in self.v_snapshot], dim=-2)
        return k, v

    def attend(self, module, query, key, value, attention_mask, scaling, original, dropout, kwargs):
        b, hq, q_len, d = query.shape
        hkv = key.shape[1]
        groups = hq // hkv
        scale = float(scaling) if scaling is not None else d**-0.5
        allowed = _allowed(attention_mask)
        skips = None if self.layer._cache._decode_attention_check else self._skips(allowed, b, q_len)
        if skips is None:  # not a left-padding mask over the chunks: decode and attend exactly
            k_dec, v_dec = self.materialize()
            n0 = self.n_sink
            key = torch.cat([key[:, :, :n0], k_dec.to(key.dtype), key[:, :, n0:]], dim=2)
            value = torch.cat([value[:, :, :n0], v_dec.to(value.dtype), value[:, :, n0:]], dim=2)
            return original(
                module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
            )
        # [b, hq, q, d] -> [b, hkv, groups * q, d]: the rows of each kv head (query heads are kv-major)
        q_rows = query.detach().to(torch.float32).reshape(b, hkv, groups * q_len, d)
        q_np = np.ascontiguousarray(q_rows.cpu().numpy())
        out_c, max_c, sum_c = _kakeya.attend_compressed(
            q_np, self.k_chunks, self.v_chunks, skips, scale, self.rope, self.threads
        )
        out_c = torch.from_numpy(out_c).to(query.device)
        max_c = torch.from_numpy(max_c).to(query.device)
        sum_c = torch.from_numpy(sum_c).to(query.device)
        # exact part: sink + window + new tokens
        n_exact = key.shape[2]
        ke, ve = key.to(torch.float32), value.to(torch.float32)
        scores = torch.matmul(q_rows, ke.transpose(-1, -2)) * scale  # [b, hkv, g*q, ne]
        masked = allowed is not None or q_len > 1
        if allowed is not None:
            n0, n = self.n_sink, self.n_compressed
            cols = torch.cat([allowed[..., :n0], allowed[..., n0 + n :]], dim=-1)  # [b, 1|h, q, ne]
            if cols.shape[1] == 1:
                cols = cols[:, :, None]
            else:
                cols = cols.view(b, hkv, groups, q_len, n_exact)
            scores = scores.view(b, hkv, groups, q_len, n_exact).masked_fill(~cols, float("-inf"))
        elif q_len > 1:
            # no mask given: causal over the exact tokens (queries are the last q positions)
            rest = n_exact - self.n_sink
            total = self.n_sink + self.n_compressed + rest
            kpos = torch.cat(
                [
                    torch.arange(self.n_sink, device=scores.device),
                    torch.arange(total - rest, total, device=scores.device),
                ]
            )
            qpos = torch.arange(total - q_len, total, device=scores.device)
            scores = scores.view(b, hkv, groups, q_len, n_exact)
            scores = scores.masked_fill(kpos[None, :] > qpos[:, None], float("-inf"))
        scores = scores.reshape(b, hkv, groups * q_len, n_exact)
        m = torch.maximum(max_c, scores.amax(-1))
        if masked:  # a row may see no token at all: keep the arithmetic finite
            m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        p = torch.exp(scores - m[..., None])  # exact weights relative to the common max
        w_c = sum_c * torch.exp(max_c - m)
        total_w = p.sum(-1) + w_c
        out = (torch.matmul(p, ve) + w_c[..., None] * out_c) / total_w.clamp_min(1e-30)[..., None]
        out = out.view(b, hkv, groups, q_len, d).reshape(b, hq, q_len, d)
        return out.transpose(1, 2).contiguous().to(query.dtype), None


def capture_hook(cache) -> Any:
    """Forward pre-hook marking an attention module with the cache it is called with."""
    ref = weakref.ref(cache)

    def hook(module, args, kwargs):
        c = ref()
        module._kakeya_cache = ref if (c is not None and kwargs.get("past_key_values") is c) else None
        return None

    return hook
