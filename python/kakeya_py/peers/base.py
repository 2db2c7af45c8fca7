"""What every peer method shares: :class:`PeerMethod`, bit-packing, the measured byte count and
the quantizers more than one method uses (asymmetric min/max groups, 1-D Lloyd levels).

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
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from contextlib import contextmanager
from typing import Any

import numpy as np

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
