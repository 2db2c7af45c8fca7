"""Peer KV-cache quantizers: re-implementations of published methods (vLLM fp8, the HF
quantized cache's int-b, KIVI, TurboQuant, KVQuant), measured in the same harness as the
kakeya codec (the method descriptions and byte accounting: :mod:`kakeya_py.peers.policy`).

Public names are re-exported here (``from kakeya_py.peers import parse_method, PeerPolicy``).
"""

from .policy import (
    FP8,
    FP16_MAX,
    KIVI,
    PEER_METHODS,
    IntGroup,
    KVQuant,
    PeerMethod,
    PeerPolicy,
    TurboQuant,
    asym_dequantize,
    asym_quantize,
    is_peer_spec,
    lloyd_1d,
    load_peer_policy,
    nearest_level,
    pack_codes,
    parse_family_specs,
    parse_method,
    parse_peer_spec,
    peer_names,
    peer_roundtrip,
    single_thread,
    stored_nbytes,
    top_fraction_mask,
    unpack_codes,
)

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
    "stored_nbytes",
    "top_fraction_mask",
    "unpack_codes",
]
