"""Peer KV-cache quantizers, evaluated in the same harness as the kakeya codec (issue 6).

These are **not** the kakeya codec: they are re-implementations of published methods, run
through the same :data:`kakeya_py.eval.harness.Transform` hook so that they see exactly the
tensors our codec sees (one ``[tokens, kv_heads, head_dim]`` tensor per layer, stream and
sequence) and are scored on the same passages against the same reference. One module per
method (``fp8``, ``int_group``, ``kivi``, ``turbo``, ``kvquant``: the method, its source and
its bytes), ``base`` for what they share (:class:`PeerMethod`, bit-packing, byte accounting)
and ``policy`` for methods by name and as policies (``parse_method``, ``PeerPolicy``). The
public names are re-exported here (``from kakeya_py.peers import parse_method, PeerPolicy``).
"""

from .base import (
    FP16_MAX,
    PeerMethod,
    asym_dequantize,
    asym_quantize,
    lloyd_1d,
    nearest_level,
    pack_codes,
    single_thread,
    stored_nbytes,
    top_fraction_mask,
    unpack_codes,
)
from .fp8 import FP8
from .int_group import IntGroup
from .kivi import KIVI
from .kvquant import KVQuant
from .policy import (
    PEER_METHODS,
    PeerPolicy,
    is_peer_spec,
    load_peer_policy,
    parse_family_specs,
    parse_method,
    parse_peer_spec,
    peer_names,
    peer_roundtrip,
    split_methods,
)
from .turbo import TurboQuant

__all__ = [
    "FP8",
    "FP16_MAX",
    "KIVI",
    "PEER_METHODS",
    "IntGroup",
    "KVQuant",
    "PeerMethod",
    "PeerPolicy",
    "TurboQuant",
    "asym_dequantize",
    "asym_quantize",
    "is_peer_spec",
    "lloyd_1d",
    "load_peer_policy",
    "nearest_level",
    "pack_codes",
    "parse_family_specs",
    "parse_method",
    "parse_peer_spec",
    "peer_names",
    "peer_roundtrip",
    "single_thread",
    "split_methods",
    "stored_nbytes",
    "top_fraction_mask",
    "unpack_codes",
]
