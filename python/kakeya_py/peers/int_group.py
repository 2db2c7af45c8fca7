"""Per-token asymmetric int-b in groups along head_dim: the HF quantized cache (:class:`IntGroup`).

``int4`` / ``int3``: the HF transformers ``QuantizedCache`` (quanto backend, defaults
``axis_key=0, axis_value=0, q_group_size=64``): asymmetric per-token quantization in
groups of 64 along ``head_dim``, float16 scale and zero-point per group. HF's default
``residual_length=128`` full-precision window is **0 here** (``int4(r=128)`` turns it
on) so the frontier shows the quantizer itself. Bytes per group of 64: ``64·b/8 + 4``.
"""

from __future__ import annotations

from .base import PeerMethod, _asym_dequantize_stored, _asym_with_residual, _residual


class IntGroup(PeerMethod):
    """Per-token asymmetric int-b in groups along head_dim (HF ``QuantizedCache``, quanto)."""

    family = "int-g64"

    def __init__(self, bits: int = 4, group: int = 64, residual: int = 0):
        if bits not in (2, 3, 4, 8):
            raise ValueError("int bits must be 2, 3, 4 or 8")
        self.bits, self.group, self.residual = bits, group, residual
        opts = ",".join(
            e for e in (f"g={group}" if group != 64 else "", f"r={residual}" if residual else "") if e
        )
        self.name = f"int{bits}" + (f"({opts})" if opts else "")

    def params(self):
        return {"bits": self.bits, "group": self.group, "residual": self.residual, "scale_zero": "float16"}

    def _g(self, d: int) -> int:
        g = min(self.group, d)
        if d % g:
            raise ValueError(f"head_dim {d} is not a multiple of the group size {g}")
        return g

    def exact_positions(self, stream, n):
        return 0, min(self.residual, n)

    def encode(self, layer, stream, x):
        n, h, d = x.shape
        g = self._g(d)
        nq = max(0, n - self.residual)
        return _asym_with_residual(x[:nq].reshape(nq, h, d // g, g), x[nq:], self.bits)

    def decode(self, layer, stream, stored, shape):
        import torch

        n, h, d = shape
        g = self._g(d)
        nq = max(0, n - self.residual)
        head = _asym_dequantize_stored(stored, self.bits, (nq, h, d // g, g)).reshape(nq, h, d)
        return torch.cat([head, _residual(stored)], dim=0)
