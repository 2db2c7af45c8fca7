"""Intercept the K and V streams of HF transformers attention layers, removably.

The codec sees **K before RoPE** (after the per-head ``k_norm`` where the architecture
has one, e.g. Qwen3) and **V as produced** by ``v_proj``. Both are reached with
forward hooks on submodules, so no transformers file is edited:

- K (pre-RoPE): output of ``self_attn.k_norm`` if it exists, else of ``self_attn.k_proj``;
- V: output of ``self_attn.v_proj``;
- K (post-RoPE, optional, for comparison): the attention module's own
  ``apply_rotary_pos_emb`` is wrapped in its modeling module for the duration of the
  context, and a pre-hook on ``self_attn`` tells the wrapper which layer is running.

Callbacks receive and return ``[batch, seq, kv_heads, head_dim]`` tensors whatever the
module's output layout is. :class:`KVInterceptor` is a context manager; on exit every
hook is removed and the patched function restored, so the model is bit-identical to
before. Works for Llama, Mistral, Qwen2 and Qwen3 (separate ``k_proj``/``v_proj``,
GQA); fused-QKV attention is refused with a clear error.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

STREAMS = ("k", "v")
K_POSITIONS = ("pre_rope", "post_rope")

#: ``fn(layer, stream, x[batch, seq, kv_heads, head_dim]) -> replacement or None``.
StreamFn = Callable[[int, str, Any], Any]


class HookError(RuntimeError):
    """The model's attention layout is not one the hooks understand."""


@dataclass(frozen=True)
class AttentionSite:
    """Where one attention layer's K and V can be intercepted."""

    layer: int
    attn: Any  # the attention nn.Module
    k_source: Any  # module whose output is pre-RoPE K (k_norm or k_proj)
    v_source: Any  # v_proj
    num_kv_heads: int
    head_dim: int

    @property
    def modeling_module(self):
        """The Python module defining the attention class (holds ``apply_rotary_pos_emb``)."""
        return sys.modules[type(self.attn).__module__]


def find_attention_sites(model) -> list[AttentionSite]:
    """All attention layers of a decoder-only transformers model, by ``layer_idx``."""
    sites = []
    for module in model.modules():
        if not hasattr(module, "layer_idx") or not hasattr(module, "o_proj"):
            continue
        if not (hasattr(module, "k_proj") and hasattr(module, "v_proj")):
            raise HookError(
                f"{type(module).__name__} has no separate k_proj/v_proj (fused QKV is not supported by the HF hooks)"
            )
        head_dim = int(module.head_dim)
        out_features = module.k_proj.out_features
        if out_features % head_dim:
            raise HookError(
                f"k_proj of layer {module.layer_idx} has {out_features} outputs, not a multiple of {head_dim}"
            )
        k_source = getattr(module, "k_norm", None)
        if k_source is None or not callable(k_source):
            k_source = module.k_proj
        sites.append(
            AttentionSite(
                int(module.layer_idx), module, k_source, module.v_proj, out_features // head_dim, head_dim
            )
        )
    if not sites:
        raise HookError(
            f"no attention layers with k_proj/v_proj/o_proj/layer_idx found in {type(model).__name__}"
        )
    sites.sort(key=lambda s: s.layer)
    if [s.layer for s in sites] != list(range(len(sites))):
        raise HookError(f"attention layer indices are not 0..{len(sites) - 1}: {[s.layer for s in sites]}")
    return sites


def parse_layers(spec: str | Iterable[int] | None, num_layers: int) -> list[int] | None:
    """``"0-3,7,-1"`` (or a list) -> sorted layer indices; negatives count from the end; None = all."""
    if spec is None:
        return None
    if isinstance(spec, str):
        items: list[int] = []
        for part in spec.replace(" ", "").split(","):
            if not part:
                continue
            if "-" in part[1:]:
                cut = part.index("-", 1)
                lo, hi = int(part[:cut]), int(part[cut + 1 :])
                items.extend(range(lo, hi + 1))
            else:
                items.append(int(part))
    else:
        items = [int(i) for i in spec]
    out = set()
    for i in items:
        j = i + num_layers if i < 0 else i
        if not 0 <= j < num_layers:
            raise ValueError(f"layer {i} out of range for a model with {num_layers} layers")
        out.add(j)
    return sorted(out)


def parse_streams(spec: str | Iterable[str]) -> tuple[str, ...]:
    """``"kv"``, ``"k"``, ``"v"``, ``"k,v"`` or a list -> a tuple in the order (k, v)."""
    items = list(spec.replace(",", "")) if isinstance(spec, str) else [str(s) for s in spec]
    bad = [s for s in items if s not in STREAMS]
    if bad or not items:
        raise ValueError(f"streams must be chosen from {STREAMS}, got {spec!r}")
    return tuple(s for s in STREAMS if s in items)


def _as_heads(x, heads: int, head_dim: int):
    """``[b, s, h*d]`` or ``[b, s, h, d]`` -> ``[b, s, h, d]`` view."""
    return x.reshape(*x.shape[:2], heads, head_dim)


class KVInterceptor:
    """Context manager calling ``fn`` on K and/or V of the selected layers in every forward.

    Args:
        model: a transformers causal LM.
        fn: ``fn(layer, stream, x) -> replacement | None`` with ``x`` of shape
            ``[batch, seq, kv_heads, head_dim]``; the replacement must have that shape and
            dtype (``None`` keeps the tensor).
        layers: layer indices (None = all).
        streams: subset of ``("k", "v")``.
        k_position: ``"pre_rope"`` (default) or ``"post_rope"`` for K.

    Example:
        >>> seen = []
        >>> with KVInterceptor(model, lambda l, s, x: seen.append((l, s, tuple(x.shape)))):  # doctest: +SKIP
        ...     model(input_ids)
    """

    def __init__(
        self,
        model,
        fn: StreamFn,
        *,
        layers: Iterable[int] | None = None,
        streams: Iterable[str] = STREAMS,
        k_position: str = "pre_rope",
    ):
        if k_position not in K_POSITIONS:
            raise ValueError(f"k_position must be one of {K_POSITIONS}, got {k_position!r}")
        self.model = model
        self.fn = fn
        self.sites = find_attention_sites(model)
        self.layers = set(range(len(self.sites)) if layers is None else layers)
        self.streams = parse_streams(tuple(streams))
        self.k_position = k_position
        self._handles: list[Any] = []
        self._patched: list[tuple[Any, Any]] = []
        self._local = threading.local()

    # -- installation -------------------------------------------------------------------
    def __enter__(self) -> KVInterceptor:
        if self._handles or self._patched:
            raise HookError("KVInterceptor is already active")
        try:
            for site in self.sites:
                if site.layer not in self.layers:
                    continue
                if "k" in self.streams and self.k_position == "pre_rope":
                    self._handles.append(site.k_source.register_forward_hook(self._output_hook(site, "k")))
                if "v" in self.streams:
                    self._handles.append(site.v_source.register_forward_hook(self._output_hook(site, "v")))
            if "k" in self.streams and self.k_position == "post_rope":
                self._install_post_rope()
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def remove(self) -> None:
        """Remove every hook and restore patched functions (idempotent)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for module, original in reversed(self._patched):
            module.apply_rotary_pos_emb = original
        self._patched.clear()

    def _output_hook(self, site: AttentionSite, stream: str):
        def hook(_module, _inputs, output):
            x = _as_heads(output, site.num_kv_heads, site.head_dim)
            new = self.fn(site.layer, stream, x)
            if new is None:
                return None
            if new.shape != x.shape or new.dtype != x.dtype:
                raise HookError(
                    f"layer {site.layer} {stream}: replacement has shape {tuple(new.shape)} {new.dtype}, "
                    f"expected {tuple(x.shape)} {x.dtype}"
                )
            return new.reshape(output.shape)

        return hook

    def _install_post_rope(self) -> None:
        modules = {}
        for site in self.sites:
            mod = site.modeling_module
            if not hasattr(mod, "apply_rotary_pos_emb"):
                raise HookError(f"{mod.__name__} has no apply_rotary_pos_emb; post-RoPE K is unavailable")
            modules[id(mod)] = mod
            if site.layer in self.layers:
                self._handles.append(site.attn.register_forward_pre_hook(self._enter_layer(site.layer)))
                self._handles.append(site.attn.register_forward_hook(self._leave_layer))
        sites = {s.layer: s for s in self.sites}
        for mod in modules.values():
            original = mod.apply_rotary_pos_emb

            def patched(q, k, cos, sin, *args, _original=original, **kwargs):
                q_out, k_out = _original(q, k, cos, sin, *args, **kwargs)
                layer = getattr(self._local, "layer", None)
                if layer is None:
                    return q_out, k_out
                site = sites[layer]
                x = k_out.transpose(1, 2)  # [b, h, s, d] -> [b, s, h, d]
                new = self.fn(layer, "k", x)
                if new is None:
                    return q_out, k_out
                if new.shape != x.shape or new.dtype != x.dtype:
                    raise HookError(
                        f"layer {site.layer} post-RoPE k: replacement has shape {tuple(new.shape)}"
                    )
                return q_out, new.transpose(1, 2)

            self._patched.append((mod, original))
            mod.apply_rotary_pos_emb = patched

    def _enter_layer(self, layer: int):
        def pre_hook(_module, _args):
            self._local.layer = layer

        return pre_hook

    def _leave_layer(self, _module, _inputs, _output):
        self._local.layer = None


class PositionEmbeddingRecorder:
    """Context manager recording the ``(cos, sin)`` each attention layer receives."""

    def __init__(self, model):
        self.sites = find_attention_sites(model)
        self.by_layer: dict[int, tuple[Any, Any]] = {}
        self._handles: list[Any] = []

    def __enter__(self) -> PositionEmbeddingRecorder:
        for site in self.sites:
            self._handles.append(
                site.attn.register_forward_pre_hook(self._hook(site.layer), with_kwargs=True)
            )
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, layer: int):
        def hook(_module, args, kwargs):
            pe = kwargs.get("position_embeddings")
            if pe is None and len(args) > 1:
                pe = args[1]
            if pe is None:
                raise HookError(f"layer {layer}: attention called without position_embeddings")
            self.by_layer[layer] = (pe[0], pe[1])

        return hook


def apply_rope_to_keys(site: AttentionSite, keys, cos, sin):
    """Rotate pre-RoPE keys ``[b, s, h, d]`` exactly as the layer does; returns ``[b, h, s, d]``."""
    k = keys.transpose(1, 2)
    _, k_rot = site.modeling_module.apply_rotary_pos_emb(k, k, cos, sin)
    return k_rot
