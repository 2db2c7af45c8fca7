"""KIVI: K per channel, V per token, a recent-token residual window (:class:`KIVI`).

``kivi-2`` / ``kivi-4``: KIVI (Liu et al., ICML 2024, arXiv:2402.02750; code
github.com/jy-yuan/KIVI, ``models/llama_kivi.py``): asymmetric min/max quantization,
**K per-channel** over groups of ``G=32`` consecutive tokens, **V per-token** in groups of
``G=32`` channels, float16 scale and minimum per group (the dtype of the model's cache in
KIVI), codes bit-packed; a **residual window of the ``R=128`` most recent tokens** kept at
full precision (2 bytes/value). K's quantized part must be whole token groups, so the
tokens before the window that do not fill a group stay full precision too (K keeps
``R + ((n − R) mod G)`` tokens exact, V keeps ``R``). KIVI's own prefill code keeps
``n mod R`` K tokens full precision (fewer: 0 when ``n`` is a multiple of 128, so
this choice is slightly generous to KIVI, and its bytes are measured); its decode
loop keeps between 0 and ``R − 1``. Snapshot mode: the window is the last ``R`` tokens
of the compressed prefix.
"""

from __future__ import annotations

from .base import PeerMethod, _asym_dequantize_stored, _asym_with_residual, _residual


class KIVI(PeerMethod):
    """KIVI: K per-channel over token groups, V per-token, recent-token residual window."""

    family = "kivi"

    def __init__(self, bits: int = 2, group: int = 32, residual: int = 128):
        if bits not in (2, 3, 4):
            raise ValueError("KIVI bits must be 2, 3 or 4")
        self.bits, self.group, self.residual = bits, group, residual
        extra = (f"g={group}" if group != 32 else "", f"r={residual}" if residual != 128 else "")
        opts = ",".join(e for e in extra if e)
        self.name = f"kivi-{bits}" + (f"({opts})" if opts else "")

    def params(self):
        return {
            "bits": self.bits,
            "group": self.group,
            "residual": self.residual,
            "k": "per-channel over groups of `group` tokens",
            "v": "per-token over groups of `group` channels",
            "scale_zero": "float16",
        }

    def n_quantized(self, stream: str, n: int) -> int:
        nq = max(0, n - self.residual)
        return nq - nq % self.group if stream == "k" else nq

    def exact_positions(self, stream, n):
        return 0, n - self.n_quantized(stream, n)

    def _vg(self, d: int) -> int:
        g = min(self.group, d)
        if d % g:
            raise ValueError(f"head_dim {d} is not a multiple of KIVI's channel group {g}")
        return g

    def encode(self, layer, stream, x):
        n, h, d = x.shape
        nq = self.n_quantized(stream, n)
        if stream == "k":  # [n/G, G, h, d] -> groups of G tokens along the last axis
            grouped = x[:nq].reshape(nq // self.group, self.group, h, d).permute(0, 2, 3, 1)
        else:
            g = self._vg(d)
            grouped = x[:nq].reshape(nq, h, d // g, g)
        return _asym_with_residual(grouped.contiguous(), x[nq:], self.bits)

    def decode(self, layer, stream, stored, shape):
        import torch

        n, h, d = shape
        nq = self.n_quantized(stream, n)
        if stream == "k":
            gshape = (nq // self.group, h, d, self.group)
        else:
            g = self._vg(d)
            gshape = (nq, h, d // g, g)
        deq = _asym_dequantize_stored(stored, self.bits, gshape)
        head = deq.permute(0, 3, 1, 2).reshape(nq, h, d) if stream == "k" else deq.reshape(nq, h, d)
        return torch.cat([head, _residual(stored)], dim=0)
