"""kakeya: a KV-cache codec with an honest quality harness.

The codec (``encode``, ``decode``, ``roundtrip``, ``CodecConfig``) is the Rust crate
``kakeya`` behind a thin PyO3 module; the rest is Python, one folder per role: policies
(``policy``) and models (``models``) at the top, the quality harness in ``eval`` (``hooks``,
``harness``, ``metrics``, ``corpus``, ``report``), caches for generation in ``generation``,
peer quantizers in ``peers``, ``kakeya tune`` in ``tuning``, offline calibration in
``calibration``, the vLLM plugin in ``integrations`` and the ``kakeya`` CLI in ``cli``.
"""

from ._kakeya import (
    FORMAT_VERSION,
    CodecConfig,
    ConfigError,
    CorruptDataError,
    DTypeError,
    KakeyaError,
    NonFiniteError,
    NumericalError,
    PreconditionerError,
    ShapeError,
    UnsupportedVersionError,
    gaussian_centroids,
    set_simd,
    simd_level,
)
from ._kakeya import __version__ as __version__
from .codec import PRESETS, Encoded, decode, encode, preset, roundtrip

__all__ = [
    "FORMAT_VERSION",
    "PRESETS",
    "CodecConfig",
    "ConfigError",
    "CorruptDataError",
    "DTypeError",
    "Encoded",
    "KakeyaError",
    "NonFiniteError",
    "NumericalError",
    "PreconditionerError",
    "ShapeError",
    "UnsupportedVersionError",
    "__version__",
    "decode",
    "set_simd",
    "simd_level",
    "encode",
    "gaussian_centroids",
    "preset",
    "roundtrip",
]
