"""Generation with a compressed KV cache: transformers ``Cache`` classes and their measurement.

``cache`` holds :class:`~kakeya_py.generation.cache.KakeyaCache` (older tokens kept as
encoded chunks, a sink and a recent window exact), ``attention`` the attention that reads
those chunks directly (the compressed-domain kernel), ``peer_cache`` the peer quantizers of
:mod:`kakeya_py.peers` as caches of the same layout (``PeerCache``), and ``quality`` the
generation measurements (teacher forcing, free running, RL sampling, needle retrieval;
``kakeya generate-eval``). ``KakeyaCache`` and ``PeerCache`` are re-exported here, imported on
first use (they need torch and transformers).
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {"KakeyaCache": ".cache", "PeerCache": ".peer_cache"}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
