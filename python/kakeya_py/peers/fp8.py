"""FP8 E4M3 with a dynamic per-(token, head) scale: vLLM's fp8 KV cache (:class:`FP8`).

``fp8``: vLLM ``kv_cache_dtype="fp8_e4m3"``: every value cast to FP8 E4M3 (1 byte,
``torch.float8_e4m3fn``, round to nearest even, max 448). vLLM's cache by default uses
one scale per tensor (``k_scale``/``v_scale``, 1.0 unless calibrated); here, as the
issue asks, one dynamic **float32 scale per (token, kv-head)** = amax/448 (at least as
accurate as per-tensor). Bytes: ``d`` + 4 per token and head.
"""

from __future__ import annotations

from .base import PeerMethod, _t


class FP8(PeerMethod):
    """FP8 E4M3 with a dynamic per-(token, head) scale (vLLM ``fp8_e4m3`` cache style)."""

    family = "fp8"
    FP8_MAX = 448.0

    def __init__(self, scale_dtype: str = "float32"):
        if scale_dtype not in ("float32", "float16"):
            raise ValueError("fp8 scale_dtype must be float32 or float16")
        self.scale_dtype = scale_dtype
        self.name = "fp8" if scale_dtype == "float32" else "fp8(scale=float16)"

    def params(self):
        return {"format": "float8_e4m3fn", "scale": f"per (token, kv-head), {self.scale_dtype}, amax/448"}

    def encode(self, layer, stream, x):
        import torch

        amax = x.abs().amax(-1)
        scale = torch.where(amax > 0, amax / self.FP8_MAX, torch.ones_like(amax))
        scale = scale.to(getattr(torch, self.scale_dtype))
        y = (x / scale.float()[..., None]).clamp(-self.FP8_MAX, self.FP8_MAX)
        return {"values": y.to(torch.float8_e4m3fn).view(torch.uint8).numpy(), "scale": scale.numpy()}

    def decode(self, layer, stream, stored, shape):
        import torch

        vals = torch.from_numpy(stored["values"]).view(torch.float8_e4m3fn).float()
        return vals * _t(stored["scale"])[..., None]
