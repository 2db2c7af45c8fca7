"""Peer KV-cache quantizers, evaluated in the same harness as the kakeya codec (issue 6).

These are **not** the kakeya codec: they are re-implementations of published methods, run
through the same :data:`kakeya_py.eval.harness.Transform` hook so that they see exactly the
tensors our codec sees (one ``[tokens, kv_heads, head_dim]`` tensor per layer, stream and
sequence) and are scored on the same passages against the same reference.

Byte accounting (every method): :meth:`PeerMethod.encode` returns the arrays the method
would store (numpy, in the dtypes the method stores them: bit-packed ``uint8`` codes,
``float16`` scales / zero-points / levels, ``float32`` scales where the method keeps
them, ``int32`` outlier indices, 2-byte ``bfloat16`` bits for positions kept at full
precision). ``nbytes`` is the **sum of the ``.nbytes`` of those arrays** — measured from
the arrays, not a formula — and :meth:`PeerMethod.decode` rebuilds the tensor from those
arrays only. Positions a method keeps at full precision (KIVI's and the int-g64 cache's
recent-token window, KVQuant's attention-sink token) are stored as 2-byte values (that is
what is counted) but handed back bit-exact, as the harness does for every tensor it keeps
exact (exact tensors are counted at bf16 while the model runs in float32). Fixed
constants a method regenerates from a seed or a table (TurboQuant's rotation, the Gaussian
Lloyd–Max table) are not stored and not counted; per-tensor data that must be stored
(KVQuant's fitted levels) is counted.

K position: the harness hands K **before RoPE** (as our codec gets it) unless the run uses
``--post-rope-k``. KVQuant quantizes K pre-RoPE by design. KIVI, the HF quantized cache
(int4/int3) and vLLM's fp8 cache see **post-RoPE** K in their real deployments; the sweep
runs every method at one K position (``kakeya sweep --post-rope-k`` runs all of them,
ours included, on post-RoPE K).

Methods (``parse_method``):

- ``fp8`` — vLLM ``kv_cache_dtype="fp8_e4m3"``: every value cast to FP8 E4M3 (1 byte,
  ``torch.float8_e4m3fn``, round to nearest even, max 448). vLLM's cache by default uses
  one scale per tensor (``k_scale``/``v_scale``, 1.0 unless calibrated); here, as the
  issue asks, one dynamic **float32 scale per (token, kv-head)** = amax/448 (at least as
  accurate as per-tensor). Bytes: ``d`` + 4 per token and head.
- ``kivi-2`` / ``kivi-4`` — KIVI (Liu et al., ICML 2024, arXiv:2402.02750; code
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
- ``int4`` / ``int3`` — the HF transformers ``QuantizedCache`` (quanto backend, defaults
  ``axis_key=0, axis_value=0, q_group_size=64``): asymmetric per-token quantization in
  groups of 64 along ``head_dim``, float16 scale and zero-point per group. HF's default
  ``residual_length=128`` full-precision window is **0 here** (``int4(r=128)`` turns it
  on) so the frontier shows the quantizer itself. Bytes per group of 64: ``64·b/8 + 4``.
- ``turbo-2`` / ``turbo-3`` / ``turbo-4`` — TurboQuant-style (Zandieh et al., 2025,
  arXiv:2504.19874, the MSE variant ``TurboQuant_mse``, without the 1-bit QJL residual of
  the inner-product variant and without their outlier-channel split): a seeded random
  orthogonal rotation per (layer, stream) (QR of a Gaussian matrix, sign-corrected;
  regenerated from the seed, not stored), the vector's L2 norm in float16, and each
  coordinate of the rotated unit vector (≈ N(0, 1/d)) coded with the Gaussian Lloyd–Max
  table (``kakeya_py.gaussian_centroids(b)`` scaled by ``1/sqrt(d)``). No PCA, no
  per-block statistics. Bytes per vector: ``d·b/8 + 2``.
- ``kvquant-3`` / ``kvquant-4`` — KVQuant-style (Hooper et al., NeurIPS 2024,
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

All methods apply to every layer (none of the papers keeps boundary layers exact);
``exact_layers`` (``--exact-layers``) restricts them like our policies.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..eval.hooks import K_POSITIONS, STREAMS, parse_layers, parse_streams

FP16_MAX = 65504.0


@contextmanager
def single_thread():
    """Run torch on one thread inside: the peers' tensors are small, and on a loaded machine
    intra-op threading makes such element-wise work 10-100x slower."""
    import torch

    n = torch.get_num_threads()
    if n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


# -- bytes -------------------------------------------------------------------------------------
def pack_codes(codes, bits: int) -> np.ndarray:
    """Bit-pack integer codes ``< 2**bits`` (any shape, row-major) into ``uint8``, little-endian bits."""
    c = np.ascontiguousarray(_np(codes).reshape(-1).astype(np.uint8))
    if bits == 8:
        return c
    planes = (c[:, None] >> np.arange(bits, dtype=np.uint8)) & 1
    return np.packbits(planes.reshape(-1), bitorder="little")


def unpack_codes(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of :func:`pack_codes`: ``count`` codes as ``uint8``."""
    if bits == 8:
        return packed[:count]
    planes = np.unpackbits(packed, count=count * bits, bitorder="little").reshape(count, bits)
    return (planes << np.arange(bits, dtype=np.uint8)).sum(axis=1, dtype=np.uint8)


def stored_nbytes(stored: Mapping[str, np.ndarray]) -> int:
    """The measured size of what a method stores: the sum of its arrays' ``.nbytes``."""
    return int(sum(a.nbytes for a in stored.values()))


def _np(x) -> np.ndarray:
    if isinstance(x, np.ndarray):
        return x
    return x.detach().cpu().numpy()


def _f16(x) -> np.ndarray:
    import torch

    return x.clamp(-FP16_MAX, FP16_MAX).to(torch.float16).numpy()


def _bf16_bits(x) -> np.ndarray:
    """Full-precision positions as they would be stored: 2-byte bfloat16 bit patterns."""
    import torch

    return x.to(torch.bfloat16).contiguous().view(torch.int16).numpy()


def _t(a: np.ndarray):
    import torch

    return torch.from_numpy(np.ascontiguousarray(a)).float()


# -- shared quantizers -------------------------------------------------------------------------
def asym_quantize(x, bits: int) -> dict[str, np.ndarray]:
    """Asymmetric min/max quantization of groups along the last axis of ``x``.

    Returns ``codes`` (uint8, unpacked, same shape), ``scale`` and ``zero`` (float16, one
    per group). Codes are computed with the float16-rounded scale and zero, the values the
    decoder will use.
    """
    import torch

    top = 2**bits - 1
    mn, mx = x.amin(-1), x.amax(-1)
    scale = torch.from_numpy(_f16((mx - mn) / top)).float()
    zero = torch.from_numpy(_f16(mn)).float()
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = torch.round((x - zero[..., None]) / safe[..., None]).clamp_(0, top)
    codes = torch.where(scale[..., None] > 0, codes, torch.zeros_like(codes))
    return {"codes": codes.to(torch.uint8).numpy(), "scale": _f16(scale), "zero": _f16(zero)}


def asym_dequantize(codes: np.ndarray, scale: np.ndarray, zero: np.ndarray):
    return _t(codes) * _t(scale)[..., None] + _t(zero)[..., None]


def _asym_with_residual(grouped, residual, bits: int) -> dict[str, np.ndarray]:
    """Stored arrays of a group-wise asymmetric quantizer plus an exact bf16 residual."""
    q = asym_quantize(grouped, bits)
    return {
        "codes": pack_codes(q["codes"], bits),
        "scale": q["scale"],
        "zero": q["zero"],
        "residual_bf16": _bf16_bits(residual),
    }


def _asym_dequantize_stored(stored, bits: int, group_shape):
    count = int(np.prod(group_shape))
    codes = unpack_codes(stored["codes"], bits, count).reshape(group_shape)
    return asym_dequantize(codes, stored["scale"], stored["zero"])


def _residual(stored):
    import torch

    return torch.from_numpy(stored["residual_bf16"]).view(torch.bfloat16).float()


def nearest_level(values, levels):
    """Index of the nearest of the sorted ``levels [G, k]`` for ``values [G, N]`` (ties go up)."""
    import torch

    mids = ((levels[:, 1:] + levels[:, :-1]) / 2).contiguous()
    return torch.searchsorted(mids, values.contiguous(), right=False)


def lloyd_1d(values, weights, k: int, iters: int = 20):
    """Weighted 1-D k-means (Lloyd) per row: ``values, weights [G, N]`` -> sorted ``levels [G, k]``.

    Initialised at the ``(i + 1/2)/k`` weighted quantiles of each row; an empty cluster
    keeps its previous level.
    """
    import torch

    # Each row is sorted once; a cluster is then a contiguous run of the sorted values, so an
    # iteration costs O(k log N) per row through prefix sums (float64).
    sv, order = torch.sort(values, dim=1)
    sw = torch.gather(weights, 1, order).double()
    zero = torch.zeros(values.shape[0], 1, dtype=torch.float64)
    cw = torch.cat([zero, torch.cumsum(sw, 1)], 1)
    cwv = torch.cat([zero, torch.cumsum(sw * sv.double(), 1)], 1)
    total = cw[:, -1:]
    target = total * (torch.arange(k, dtype=torch.float64) + 0.5) / k  # weighted quantiles
    at = torch.searchsorted(cw[:, 1:].contiguous(), target.contiguous()).clamp_(max=values.shape[1] - 1)
    levels = sv.gather(1, at)
    levels = torch.where(total > 0, levels, values.mean(dim=1, keepdim=True))
    n = values.shape[1]
    for _ in range(iters):
        mids = ((levels[:, 1:] + levels[:, :-1]) / 2).contiguous()
        ends = torch.searchsorted(sv, mids, right=True)  # values <= mid go to the lower level
        ends = torch.cat([ends, torch.full_like(ends[:, :1], n)], 1)
        starts = torch.cat([torch.zeros_like(ends[:, :1]), ends[:, :-1]], 1)
        cnt = cw.gather(1, ends) - cw.gather(1, starts)
        sums = cwv.gather(1, ends) - cwv.gather(1, starts)
        new = torch.where(cnt > 0, sums / cnt.clamp_min(1e-300), levels.double()).float()
        new, _ = torch.sort(new, dim=1)
        if torch.equal(new, levels):
            break
        levels = new
    return levels


def top_fraction_mask(score, fraction: float):
    """Boolean mask of the ``ceil(fraction · numel)`` largest entries of ``score``."""
    import torch

    flat = score.reshape(-1)
    count = min(flat.numel(), math.ceil(fraction * flat.numel())) if fraction > 0 else 0
    mask = torch.zeros(flat.numel(), dtype=torch.bool)
    if count:
        mask[torch.topk(flat, count).indices] = True
    return mask.reshape(score.shape)


# -- methods -----------------------------------------------------------------------------------
class PeerMethod:
    """A peer quantizer. Subclasses define :meth:`encode` and :meth:`decode`.

    ``encode(layer, stream, x[n, h, d] float32) -> {name: np.ndarray}`` (what is stored);
    ``decode(layer, stream, stored, shape) -> float32 tensor``. Positions kept at full
    precision are listed by :meth:`exact_positions` and handed back bit-exact by
    :meth:`roundtrip`.
    """

    family = "peer"
    name = "peer"

    def params(self) -> dict[str, Any]:
        return {}

    def encode(self, layer: int, stream: str, x) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def decode(self, layer: int, stream: str, stored: Mapping[str, np.ndarray], shape) -> Any:
        raise NotImplementedError

    def exact_positions(self, stream: str, n: int) -> tuple[int, int]:
        """``(head, tail)``: how many leading / trailing token positions stay full precision."""
        return 0, 0

    def roundtrip(self, layer: int, stream: str, x) -> tuple[Any, int]:
        """``(x_hat, nbytes)``: decoded from the stored arrays; ``nbytes`` measured from them."""
        with single_thread():
            return self._roundtrip(layer, stream, x)

    def _roundtrip(self, layer: int, stream: str, x) -> tuple[Any, int]:
        x32 = x.detach().float().contiguous()
        stored = self.encode(layer, stream, x32)
        out = self.decode(layer, stream, stored, tuple(x32.shape))
        head, tail = self.exact_positions(stream, x32.shape[0])
        if head:
            out[:head] = x32[:head]
        if tail:
            out[x32.shape[0] - tail :] = x32[x32.shape[0] - tail :]
        return out.to(x.dtype), stored_nbytes(stored)

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.name, "family": self.family, **self.params()}


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


# -- method specs ------------------------------------------------------------------------------
#: The peer method names ``parse_method`` understands (options in parentheses, e.g. ``kivi-2(r=0)``).
PEER_METHODS = (
    "fp8",
    "int2",
    "int3",
    "int4",
    "int8",
    "kivi-2",
    "kivi-3",
    "kivi-4",
    "turbo-2",
    "turbo-3",
    "turbo-4",
    "kvquant-2",
    "kvquant-3",
    "kvquant-4",
)

_SPEC = re.compile(r"^(?P<base>[a-z0-9\-]+)(?:\((?P<opts>[^()]*)\))?$")


def _options(text: str | None) -> dict[str, str]:
    if not text:
        return {}
    out = {}
    for part in text.split(","):
        key, eq, value = part.partition("=")
        if not eq:
            raise ValueError(f"option {part!r} must be key=value")
        out[key.strip()] = value.strip()
    return out


def parse_method(spec: str) -> PeerMethod:
    """A peer method from its name: ``kivi-2``, ``int4``, ``fp8``, ``turbo-3``, ``kvquant-4``.

    Options in parentheses: ``kivi-2(g=32,r=128)``, ``int4(g=64,r=128)``,
    ``turbo-3(seed=1)``, ``kvquant-4(o=0.01,sink=1)``, ``fp8(scale=float16)``.
    """
    m = _SPEC.match(spec.strip())
    if not m:
        raise ValueError(f"cannot parse method {spec!r}")
    base, opts = m["base"], _options(m["opts"])

    def take(key: str, default, cast=int):
        return cast(opts.pop(key)) if key in opts else default

    if base == "fp8":
        method: PeerMethod = FP8(scale_dtype=take("scale", "float32", str))
    elif re.fullmatch(r"int\d", base):
        method = IntGroup(int(base[3:]), group=take("g", 64), residual=take("r", 0))
    elif re.fullmatch(r"kivi-\d", base):
        method = KIVI(int(base[5:]), group=take("g", 32), residual=take("r", 128))
    elif re.fullmatch(r"turbo-\d", base):
        method = TurboQuant(int(base[6:]), seed=take("seed", 0))
    elif re.fullmatch(r"kvquant-\d", base):
        method = KVQuant(int(base[8:]), outliers=take("o", 0.01, float), sink=take("sink", 1))
    else:
        raise ValueError(f"unknown peer method {spec!r}; known: {', '.join(PEER_METHODS)}")
    if opts:
        raise ValueError(f"method {spec!r}: unknown options {sorted(opts)}")
    return method


# -- applying a method to a cache ----------------------------------------------------------------
def peer_roundtrip(
    method: PeerMethod, layer: int, stream: str, x, sink_tokens: int = 0, window_tokens: int = 0
) -> tuple[Any, int | None]:
    """``method``'s round trip of ``x`` with ``sink_tokens`` leading and ``window_tokens`` trailing
    positions kept exact and counted at bf16 (:func:`kakeya_py.policy.roundtrip_after_sink`); a
    method with a sink of its own (KVQuant's ``sink=``) or a residual window of its own (KIVI's /
    int's ``r=``) keeps that one instead. :class:`PeerPolicy` and ``kakeya tune``'s ``LadderCodec``
    both code a peer this way."""
    sink = 0 if hasattr(method, "sink") else sink_tokens
    window = 0 if getattr(method, "residual", 0) else window_tokens
    if sink == 0 and window == 0:
        return method.roundtrip(layer, stream, x)
    from ..policy import roundtrip_after_sink

    return roundtrip_after_sink(x, sink, lambda rest: method.roundtrip(layer, stream, rest), window)


def parse_peer_spec(spec: Any, where: str = "peer") -> PeerMethod:
    """:func:`parse_method` with a one-line :class:`ValueError` that names ``where``."""
    if not isinstance(spec, str):
        raise ValueError(f"{where}: {spec!r} is not a peer method spec (e.g. 'turbo-4', 'kivi-2')")
    try:
        return parse_method(spec)
    except ValueError as e:
        raise ValueError(f"{where}: {e}" if repr(spec) in str(e) else f"{where}: {spec!r}: {e}") from None


def parse_family_specs(specs: Iterable[str], where: str = "peer") -> dict[str, PeerMethod]:
    """``{name: method}`` of peer method specs that must all be of one family (a per-layer peer
    policy records one ``method``); a spec that does not parse or another family is a one-line
    :class:`ValueError` naming ``where``."""
    out: dict[str, PeerMethod] = {}
    for spec in specs:
        method = parse_peer_spec(spec, where)
        out.setdefault(method.name, method)
    families = sorted({m.family for m in out.values()})
    if len(families) > 1:
        raise ValueError(f"{where}: one peer family only, got {families} ({sorted(out)})")
    return out


@dataclass
class PeerPolicy:
    """A peer method with the policy-style selections (which layers and streams it touches).

    Duck-types the parts of :class:`kakeya_py.policy.Policy` / ``PolicyCodec`` the harness,
    the records and the vLLM plugin use: ``name``, ``k_position``, ``to_dict()``,
    ``roundtrip(layer, stream, x)``, ``active()``, ``provenance``, ``model``.

    ``overrides`` (per layer, as a policy's): ``{layer: {stream: spec | None}}``, another setting
    of the same family for that (layer, stream) (``"turbo-2"``), or ``None`` = exact; what
    ``kakeya tune`` over a peer ladder writes. JSON: :meth:`to_dict`, with ``method`` = the family.
    """

    method: PeerMethod
    num_layers: int
    exact_layers: list[int] = field(default_factory=list)
    layers: list[int] | None = None
    streams: tuple[str, ...] = STREAMS
    k_position: str = "pre_rope"
    #: leading positions kept exact (bf16 bytes), the option kakeya's presets get; a method
    #: with a sink of its own (KVQuant's ``sink=``) keeps that one instead
    sink_tokens: int = 0
    #: the last positions kept exact, as a policy's ``window_tokens``; a method with a
    #: residual window of its own (KIVI's / int's ``r=``) keeps that one instead
    window_tokens: int = 0
    #: per layer: ``{stream: peer spec of the same family, or None = exact}``
    overrides: dict[int, dict[str, str | None]] = field(default_factory=dict)
    #: the policy's name when it is not the method's (a tuned policy's)
    label: str | None = None
    description: str = ""
    #: as :attr:`kakeya_py.policy.Policy.model` and ``provenance``
    model: dict[str, Any] | None = None
    provenance: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        from ..policy import check_model_record, check_provenance

        self.streams = parse_streams(self.streams)
        for name in ("sink_tokens", "window_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
        if self.k_position not in K_POSITIONS:
            raise ValueError(f"k_position must be one of {K_POSITIONS}, got {self.k_position!r}")
        self.model = check_model_record(self.model)
        self.provenance = [check_provenance(r) for r in self.provenance]
        specs = [self.method.name]
        overrides: dict[int, dict[str, str | None]] = {}
        for layer, per in self.overrides.items():
            if not isinstance(per, Mapping) or set(per) - set(STREAMS):
                raise ValueError(
                    f"peer override of layer {layer}: an object with streams 'k' / 'v', got {per!r}"
                )
            overrides[int(layer)] = dict(per)
            specs += [spec for spec in per.values() if spec is not None]
        self._methods = parse_family_specs(specs, "peer policy overrides")
        self._methods[self.method.name] = self.method
        # names as the methods spell them, so that to_dict round-trips
        self.overrides = {
            layer: {s: None if spec is None else parse_method(spec).name for s, spec in per.items()}
            for layer, per in overrides.items()
        }
        exact = set(parse_layers(self.exact_layers, self.num_layers) or [])
        allowed = parse_layers(self.layers, self.num_layers) if self.layers is not None else None
        self._on = {
            (layer, s)
            for layer in range(self.num_layers)
            for s in self.streams
            if layer not in exact and (allowed is None or layer in allowed)
        }

    peer = True  # tells the vLLM plugin this is not a kakeya Policy
    sigma_q = None
    basis = None

    @property
    def name(self) -> str:
        return self.label or self.method.name

    @name.setter
    def name(self, value: str) -> None:
        self.label = None if value == self.method.name else value

    @property
    def family(self) -> str:
        return self.method.family

    def method_for(self, layer: int, stream: str) -> PeerMethod | None:
        """The method coding ``(layer, stream)``, or ``None`` when it stays exact (rules in the
        order of :meth:`kakeya_py.policy.Policy.config_for`)."""
        if (layer, stream) not in self._on:
            return None
        per = self.overrides.get(layer)
        if per is None:  # overrides may also be keyed by negative indices
            per = self.overrides.get(layer - self.num_layers)
        if per is not None and stream in per:
            return None if per[stream] is None else self._methods[per[stream]]
        return self.method

    def applies(self, layer: int, stream: str) -> bool:
        return self.method_for(layer, stream) is not None

    def active(self) -> list[tuple[int, str]]:
        return [p for p in sorted(self._on) if self.method_for(*p) is not None]

    def roundtrip(self, layer: int, stream: str, x) -> tuple[Any, int | None]:
        method = self.method_for(layer, stream)
        if method is None:
            return x, None
        return peer_roundtrip(method, layer, stream, x, self.sink_tokens, self.window_tokens)

    def with_changes(
        self,
        *,
        layers=None,
        streams=None,
        exact_layers=None,
        k_position: str | None = None,
        sigma_q: str | None = None,
    ) -> PeerPolicy:
        """A copy with command-line selections applied (``None`` keeps a field): what
        :meth:`kakeya_py.policy.Policy.with_changes` does to the same fields (it is applied to this
        object: a deep copy, the fields set, ``__post_init__`` again); a peer has no Σ_q."""
        from ..policy import Policy

        if sigma_q is not None:
            raise ValueError(f"peer policy {self.name!r} takes no Σ_q (--sigma-q)")
        return Policy.with_changes(
            self, layers=layers, streams=streams, exact_layers=exact_layers, k_position=k_position
        )

    def to_dict(self) -> dict[str, Any]:
        import copy

        return {
            "name": self.name,
            "method": self.family,
            "description": self.description,
            "peer": self.method.to_dict(),
            "num_layers": self.num_layers,
            "exact_layers": list(self.exact_layers),
            "overrides": {str(k): dict(v) for k, v in sorted(self.overrides.items())},
            "layers": None if self.layers is None else list(self.layers),
            "streams": list(self.streams),
            "k_position": self.k_position,
            "sink_tokens": self.sink_tokens,
            "window_tokens": self.window_tokens,
            "model": copy.deepcopy(self.model),
            "provenance": copy.deepcopy(self.provenance),
        }

    FIELDS = frozenset(
        {"name", "method", "description", "peer", "num_layers", "exact_layers", "overrides", "layers"}
        | {"streams", "k_position", "sink_tokens", "window_tokens", "model", "provenance"}
    )

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, num_layers: int | None = None) -> PeerPolicy:
        """The inverse of :meth:`to_dict` (``num_layers`` replaces the recorded one); the base
        method is ``peer.method`` (else ``name``, as older records have it)."""
        unknown = set(d) - cls.FIELDS
        if unknown:
            raise ValueError(
                f"unknown peer policy fields {sorted(unknown)}; expected some of {sorted(cls.FIELDS)}"
            )
        spec = (d.get("peer") or {}).get("method") or d.get("name")
        if not spec:
            raise ValueError("a peer policy names its method: 'peer': {'method': SPEC} or 'name'")
        method = parse_method(spec)
        if d.get("method") is not None and d["method"] != method.family:
            raise ValueError(
                f"peer policy: 'method' {d['method']!r} is not the family of {spec!r} ({method.family})"
            )
        return cls(
            method,
            int(d["num_layers"] if num_layers is None else num_layers),
            exact_layers=list(d.get("exact_layers") or []),
            layers=d.get("layers"),
            streams=tuple(d.get("streams") or STREAMS),
            k_position=d.get("k_position", "pre_rope"),
            sink_tokens=int(d.get("sink_tokens", 0)),
            window_tokens=int(d.get("window_tokens", 0)),
            overrides={int(k): v for k, v in (d.get("overrides") or {}).items()},
            label=None if d.get("name") in (None, method.name) else d["name"],
            description=d.get("description", ""),
            model=d.get("model"),
            provenance=list(d.get("provenance") or []),
        )


def load_peer_policy(spec: str, num_layers: int | None = None) -> PeerPolicy | None:
    """``--config`` as a peer: a JSON file holding a :class:`PeerPolicy` (it has ``peer``), or a
    peer method spec that names no preset and no file (``turbo-4``: that method on every layer);
    ``None`` for anything else (a kakeya policy). ``num_layers``: the model's (None, to check
    arguments before a model is loaded: the file's record; a bare spec then covers no layer)."""
    import json
    from pathlib import Path

    from ..policy import POLICY_PRESETS, PRESETS_DIR

    path = Path(spec).expanduser()
    if path.is_file():
        try:
            d = json.loads(path.read_text())
        except ValueError:
            return None
        if not (isinstance(d, Mapping) and "peer" in d):
            return None
        return PeerPolicy.from_dict({"name": path.stem, **d}, num_layers=num_layers)
    if spec in POLICY_PRESETS or ("/" not in spec and (PRESETS_DIR / f"{spec}.json").is_file()):
        return None
    return PeerPolicy(parse_method(spec), num_layers or 0) if is_peer_spec(spec) else None


def is_peer_spec(spec: str) -> bool:
    try:
        parse_method(spec)
    except ValueError:
        return False
    return True


def peer_names(specs: Iterable[str]) -> list[str]:
    return [parse_method(s).name for s in specs]
