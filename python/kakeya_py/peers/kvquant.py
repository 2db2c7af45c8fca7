"""KVQuant-style: non-uniform levels, dense-and-sparse outliers, an exact sink (:class:`KVQuant`).

``kvquant-3`` / ``kvquant-4``: KVQuant-style (Hooper et al., NeurIPS 2024,
arXiv:2401.18079; code github.com/SqueezeAILab/KVQuant): K quantized **per channel,
pre-RoPE**, V per token, **non-uniform** levels, **dense-and-sparse** outliers (1% of
the values, stored as ``(int32 flat index, float16 value)`` pairs) and the first token
(attention sink) kept at full precision. KVQuant fits its non-uniform datatype offline
(sensitivity-weighted k-means on calibration activations) and its K outlier thresholds
offline per channel; here both are fitted **on the tensor being compressed** (no
calibration set, no Fisher weighting), which favours the peer: K gets ``2^b`` levels per
channel from a 1-D Lloyd/k-means over that channel's non-outlier values (initialised at
quantiles), stored float16; V is normalised per (token, head) by the min/max of its
non-outlier values (float16 scale and minimum) and coded with ``2^b`` levels per head
fitted by k-means on the normalised values (float16). Outliers: the 1% of values with
the largest per-channel (K) / per-token (V) z-score ``|x − mean| / std``.
"""

from __future__ import annotations

import numpy as np

from .base import (
    PeerMethod,
    _bf16_bits,
    _f16,
    _t,
    lloyd_1d,
    nearest_level,
    pack_codes,
    top_fraction_mask,
    unpack_codes,
)


class KVQuant(PeerMethod):
    """Per-channel pre-RoPE K / per-token V, non-uniform levels, 1% sparse outliers, fp16 sink."""

    family = "kvquant"

    def __init__(self, bits: int = 4, outliers: float = 0.01, sink: int = 1, iters: int = 20):
        if bits not in (2, 3, 4):
            raise ValueError("KVQuant bits must be 2, 3 or 4")
        self.bits, self.outliers, self.sink, self.iters = bits, outliers, sink, iters
        extra = (f"o={outliers:g}" if outliers != 0.01 else "", f"sink={sink}" if sink != 1 else "")
        opts = ",".join(e for e in extra if e)
        self.name = f"kvquant-{bits}" + (f"({opts})" if opts else "")

    def params(self):
        return {
            "bits": self.bits,
            "outlier_fraction": self.outliers,
            "sink_tokens": self.sink,
            "k": "per-channel Lloyd levels (2^b float16 per channel) fitted on the tensor",
            "v": "per-(token, head) float16 min/scale, 2^b float16 levels per head fitted on the tensor",
            "outlier_storage": "(int32 flat index, float16 value)",
            "lloyd_iters": self.iters,
        }

    def exact_positions(self, stream, n):
        return min(self.sink, n), 0

    def encode(self, layer, stream, x):
        import torch

        n, h, d = x.shape
        s = min(self.sink, n)
        body = x[s:]
        m = body.shape[0]
        k = 2**self.bits
        out: dict[str, np.ndarray] = {"sink_bf16": _bf16_bits(x[:s])}
        if m == 0:
            return out
        red = 0 if stream == "k" else -1  # per-channel statistics over tokens (K) / per token (V)
        mu = body.mean(red, keepdim=True)
        sd = body.std(red, keepdim=True, unbiased=False)
        score = (body - mu).abs() / torch.where(sd > 0, sd, torch.ones_like(sd))
        mask = top_fraction_mask(score, self.outliers)
        idx = torch.nonzero(mask.reshape(-1)).reshape(-1)
        out["outlier_index"] = idx.to(torch.int32).numpy()
        out["outlier_value"] = _f16(body.reshape(-1)[idx])
        w = (~mask).float()
        if stream == "k":
            vals = body.reshape(m, h * d).T.contiguous()  # [channels, tokens]
            levels = torch.from_numpy(_f16(lloyd_1d(vals, w.reshape(m, h * d).T.contiguous(), k, self.iters)))
            codes = nearest_level(vals, levels.float())  # [channels, tokens]
            out["levels"] = levels.numpy()
            out["codes"] = pack_codes(codes.T.contiguous(), self.bits)
            return out
        big = torch.full_like(body, float("inf"))
        lo = torch.where(mask, big, body).amin(-1)
        hi = torch.where(mask, -big, body).amax(-1)
        lo = torch.where(torch.isfinite(lo), lo, torch.zeros_like(lo))
        hi = torch.where(torch.isfinite(hi), hi, lo)
        zero16 = torch.from_numpy(_f16(lo))
        scale16 = torch.from_numpy(_f16(hi - lo))
        sc = torch.where(scale16.float() > 0, scale16.float(), torch.ones_like(lo))
        u = ((body - zero16.float()[..., None]) / sc[..., None]).clamp(0, 1)  # [m, h, d]
        uh = u.permute(1, 0, 2).reshape(h, m * d).contiguous()
        wh = w.permute(1, 0, 2).reshape(h, m * d).contiguous()
        levels = torch.from_numpy(_f16(lloyd_1d(uh, wh, k, self.iters)))
        codes = nearest_level(uh, levels.float()).reshape(h, m, d).permute(1, 0, 2)
        out.update(
            {
                "levels": levels.numpy(),
                "codes": pack_codes(codes.contiguous(), self.bits),
                "scale": scale16.numpy(),
                "zero": zero16.numpy(),
            }
        )
        return out

    def decode(self, layer, stream, stored, shape):
        import torch

        n, h, d = shape
        s = min(self.sink, n)
        m = n - s
        head = torch.from_numpy(stored["sink_bf16"]).view(torch.bfloat16).float()
        if m == 0:
            return head
        codes = torch.from_numpy(unpack_codes(stored["codes"], self.bits, m * h * d).astype(np.int64))
        levels = _t(stored["levels"])
        if stream == "k":
            codes = codes.reshape(m, h * d)
            body = torch.gather(levels.T, 0, codes).reshape(m, h, d)  # levels.T [k, C]
        else:
            codes = codes.reshape(m, h, d)
            lv = levels[torch.arange(h)[None, :, None], codes]  # [m, h, d]
            body = lv * _t(stored["scale"])[..., None] + _t(stored["zero"])[..., None]
        flat = body.reshape(-1)
        flat[torch.from_numpy(stored["outlier_index"]).long()] = _t(stored["outlier_value"])
        return torch.cat([head, flat.reshape(m, h, d)], dim=0)
