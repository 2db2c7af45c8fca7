"""TurboQuant-style: a random rotation, the vector norm, Gaussian Lloyd–Max levels (:class:`TurboQuant`).

``turbo-2`` / ``turbo-3`` / ``turbo-4``: TurboQuant-style (Zandieh et al., 2025,
arXiv:2504.19874, the MSE variant ``TurboQuant_mse``, without the 1-bit QJL residual of
the inner-product variant and without their outlier-channel split): a seeded random
orthogonal rotation per (layer, stream) (QR of a Gaussian matrix, sign-corrected;
regenerated from the seed, not stored), the vector's L2 norm in float16, and each
coordinate of the rotated unit vector (≈ N(0, 1/d)) coded with the Gaussian Lloyd–Max
table (``kakeya_py.gaussian_centroids(b)`` scaled by ``1/sqrt(d)``). No PCA, no
per-block statistics. Bytes per vector: ``d·b/8 + 2``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..eval.hooks import STREAMS
from .base import PeerMethod, _f16, _t, nearest_level, pack_codes, unpack_codes


class TurboQuant(PeerMethod):
    """Random rotation + per-vector norm + Gaussian Lloyd–Max per coordinate (no PCA)."""

    family = "turbo"

    def __init__(self, bits: int = 3, seed: int = 0):
        if bits not in (1, 2, 3, 4):
            raise ValueError("TurboQuant bits must be 1-4")
        self.bits, self.seed = bits, seed
        self.name = f"turbo-{bits}" + (f"(seed={seed})" if seed else "")
        self._rot: dict[tuple[int, str, int], Any] = {}

    def params(self):
        return {
            "bits": self.bits,
            "seed": self.seed,
            "rotation": "QR of a seeded Gaussian d x d, one per (layer, stream), not stored",
            "norm": "float16 per vector",
            "table": "kakeya_py.gaussian_centroids(bits) / sqrt(d)",
        }

    def rotation(self, layer: int, stream: str, d: int):
        import torch

        key = (layer, stream, d)
        if key not in self._rot:
            gen = torch.Generator().manual_seed((self.seed * 1009 + layer) * 7 + STREAMS.index(stream))
            q, r = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
            q = q * torch.sign(torch.diagonal(r))[None, :]
            self._rot[key] = q.float()
        return self._rot[key]

    def _table(self, d: int):
        import torch

        from .. import gaussian_centroids

        return torch.tensor(gaussian_centroids(self.bits), dtype=torch.float32) / math.sqrt(d)

    def encode(self, layer, stream, x):
        import torch

        n, h, d = x.shape
        norm16 = torch.from_numpy(_f16(torch.linalg.vector_norm(x, dim=-1)))
        norm = norm16.float()
        unit = x / torch.where(norm > 0, norm, torch.ones_like(norm))[..., None]
        y = unit @ self.rotation(layer, stream, d)
        codes = nearest_level(y.reshape(1, -1), self._table(d)[None, :]).reshape(n, h, d)
        return {"codes": pack_codes(codes, self.bits), "norm": norm16.numpy()}

    def decode(self, layer, stream, stored, shape):
        n, h, d = shape
        codes = unpack_codes(stored["codes"], self.bits, n * h * d).astype(np.int64)
        y = self._table(d)[_t(codes).long()].reshape(n, h, d)
        return (y @ self.rotation(layer, stream, d).T) * _t(stored["norm"])[..., None]
