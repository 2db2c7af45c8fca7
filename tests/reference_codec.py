"""Pure-numpy reference implementation of the kakeya codec and byte format, versions 1 to 3.

This module implements ``docs/codec.md`` literally, with numpy and the standard library
only. It is the test oracle for the Rust crate and the "numpy reference" of the
throughput benchmark. Clarity and agreement with the spec come before speed, but every
stage is vectorised over rows.

Public API (see each docstring):

- ``DEFAULT_CONFIG``, ``make_config(config=None, **overrides)``
- ``rng(seed, domain, a, b)`` -> ``SplitMix64``; ``rng_outputs``, ``rng_gaussians``
- ``lloyd_max_gaussian(bits)`` (1..8 bits), ``centroid_table(config)``,
  ``boundaries(centroids)``, ``quantize(z, centroids)``
- ``distortion(b)``, ``allocate(lam, budget)``, ``component_allocation(coef, bits)``
  (allocation "variance"), ``pack_widths(codes, widths)``, ``unpack_widths(...)``
- ``hadamard_signs(seed, p)``, ``fwht(a)``, ``rotate(c, seed)``, ``unrotate(y, seed, r)``
- ``fit_skeleton(rows, config, head, index)``, ``choose_rank(...)``
- ``pack_codes(codes, bits)``, ``unpack_codes(buf, count, bits)``
- ``encode(x, config=None, preconditioner=None, dtype=None) -> bytes``
- ``decode(data, dtype="f32") -> np.ndarray``
- ``parse(data) -> Parsed`` and ``body_sections(data) -> dict[str, bytes]`` to compare
  body sections (independently of record order and offsets) with another implementation
- ``bf16_to_f32``, ``f32_to_bf16``, ``compression_ratio(data)``

Choices where the spec leaves room are marked ``SPEC CHOICE`` in comments.
"""

from __future__ import annotations

import json
import math
import struct
import zlib
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import numpy as np

MAGIC = b"KAKEYA"
VERSION = 5  # newest version written and read
MIN_VERSION = 1  # oldest version read
MAX_TABLE_BITS = 8
LIBRARY = "kakeya-reference"
MAX_DIM = 4096
U64_MASK = (1 << 64) - 1
SHARED_BLOCK_INDEX = U64_MASK  # `i = 2^64 - 1` for a shared basis
F16_SCALE_MIN = 2.0**-14
F16_SCALE_MAX = 65504.0

DEFAULT_CONFIG: dict[str, Any] = {
    "bits": 3,
    "block_size": 1024,
    "pca": "exact",
    "variance_ratio": 1.0,
    "rank": None,
    "rank_cap": None,
    "share_basis": False,
    "outlier_threshold": None,
    "metric": "mse",
    "centroids": None,
    "skeleton_dtype": "f16",
    "seed": 0,
    "oversampling": 8,
    "power_iters": 2,
    "identity": False,
    "allocation": "uniform",
    "basis": "pca",
    "uniform_step": None,
    "entropy_coding": False,
    "scale_granularity": "vector",
    "scale_format": "float",
    "rotation": "hadamard",
    "transform": None,
}
# Config fields newer than version 1: a header omits them when they hold their default.
NEWER_FIELDS = (
    "allocation",
    "basis",
    "uniform_step",
    "entropy_coding",
    "scale_granularity",
    "scale_format",
    "rotation",
    "transform",
)

_NP_DTYPES = {"f32": np.dtype("<f4"), "f16": np.dtype("<f2"), "bf16": np.dtype("<u2")}
_OUTLIER_DTYPE = np.dtype([("index", "<u2"), ("value", "<f2")])

# ----------------------------------------------------------------------------- config


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _is_real(v: Any) -> bool:
    return (_is_int(v) or isinstance(v, (float, np.floating))) and math.isfinite(float(v))


def make_config(config: dict[str, Any] | None = None, **overrides: Any) -> dict[str, Any]:
    """Return a complete, validated config dict (defaults filled in, values normalised).

    Raises ValueError naming the offending field for unknown fields or bad values.
    """
    merged = dict(DEFAULT_CONFIG)
    for src in (config or {}), overrides:
        for k, v in src.items():
            if k not in DEFAULT_CONFIG:
                raise ValueError(f"unknown config field {k!r}; expected one of {sorted(DEFAULT_CONFIG)}")
            merged[k] = v
    c = merged

    def bad(name: str, expected: str) -> ValueError:
        return ValueError(f"config field {name!r} must be {expected}, got {c[name]!r}")

    # Version 6 (rotation "none", a caller's model basis named by `transform`) is specified in
    # docs/codec.md and tested against its own properties (kakeya/tests/roundtrip.rs,
    # tests/test_model_basis.py); the reference stops at version 5.
    if c["rotation"] != "hadamard" or c["transform"] is not None:
        raise ValueError("rotation 'none' and transform (format version 6) are not in the reference")
    if not _is_int(c["bits"]) or not 1 <= c["bits"] <= MAX_TABLE_BITS:
        raise bad("bits", f"an integer in 1..{MAX_TABLE_BITS}")
    if not _is_int(c["block_size"]) or c["block_size"] < 1:
        raise bad("block_size", "an integer >= 1")
    if c["pca"] not in ("exact", "randomized"):
        raise bad("pca", "'exact' or 'randomized'")
    if not _is_real(c["variance_ratio"]) or not float(c["variance_ratio"]) > 0:
        raise bad("variance_ratio", "a finite number > 0")
    for name in ("rank", "rank_cap"):
        if c[name] is not None and (not _is_int(c[name]) or c[name] < 0):
            raise bad(name, "None or an integer >= 0")
    for name in ("share_basis", "identity", "entropy_coding"):
        if not isinstance(c[name], (bool, np.bool_)):
            raise bad(name, "a bool")
    ot = c["outlier_threshold"]
    if ot is not None and (not _is_real(ot) or float(ot) < 0):
        raise bad("outlier_threshold", "None or a finite number >= 0")
    if c["metric"] not in ("mse", "inner_product"):
        raise bad("metric", "'mse' or 'inner_product'")
    if c["allocation"] not in ("uniform", "variance"):
        raise bad("allocation", "'uniform' or 'variance'")
    if c["basis"] not in ("pca", "none"):
        raise bad("basis", "'pca' or 'none'")
    if c["basis"] == "none" and (
        c["rank"] is not None
        or c["rank_cap"] is not None
        or float(c["variance_ratio"]) < 1
        or c["allocation"] == "variance"
    ):
        raise bad("basis", "'pca' when rank, rank_cap, variance_ratio < 1 or allocation 'variance' is set")
    if c["skeleton_dtype"] not in ("f16", "f32"):
        raise bad("skeleton_dtype", "'f16' or 'f32'")
    if not _is_int(c["seed"]) or not 0 <= c["seed"] <= U64_MASK:
        raise bad("seed", "an integer in 0..2^64-1")
    for name in ("oversampling", "power_iters"):
        if not _is_int(c[name]) or c[name] < 0:
            raise bad(name, "an integer >= 0")
    cents = c["centroids"]
    if cents is not None and c["allocation"] == "variance":
        raise bad("centroids", "None with allocation 'variance' (a caller's table is for 'uniform' only)")
    if cents is not None:
        try:
            arr = np.asarray(cents, dtype=np.float64).astype(np.float32)
        except (TypeError, ValueError) as e:
            raise bad("centroids", f"a list of {1 << c['bits']} numbers") from e
        if arr.ndim != 1 or arr.size != (1 << c["bits"]):
            raise bad("centroids", f"a list of exactly 2^bits = {1 << c['bits']} numbers")
        if not np.all(np.isfinite(arr)) or not np.all(np.diff(arr) > 0):
            raise bad("centroids", "finite and strictly increasing (as f32)")
        cents = [float(v) for v in arr]
    step = c["uniform_step"]
    if step is not None:
        if not _is_real(step) or not float(step) > 0:
            raise bad("uniform_step", "None or a finite number > 0")
        if cents is not None or c["allocation"] == "variance":
            raise bad("uniform_step", "None with centroids or allocation 'variance'")
        if not np.all(np.diff(uniform_table(int(c["bits"]), float(step))) > 0):
            raise bad("uniform_step", "a step giving a strictly increasing f32 table")
    if c["entropy_coding"] and c["allocation"] == "variance":
        raise bad("entropy_coding", "False with allocation 'variance'")
    if c["scale_granularity"] not in ("vector", "block"):
        raise bad("scale_granularity", "'vector' or 'block'")
    if c["scale_granularity"] == "block" and c["allocation"] == "variance":
        raise bad("scale_granularity", "'vector' with allocation 'variance'")
    if c["scale_format"] not in ("float", "log8"):
        raise bad("scale_format", "'float' or 'log8'")
    if c["scale_format"] == "log8" and c["allocation"] == "variance":
        raise bad("scale_format", "'float' with allocation 'variance'")

    return {
        "bits": int(c["bits"]),
        "block_size": int(c["block_size"]),
        "pca": c["pca"],
        "variance_ratio": float(c["variance_ratio"]),
        "rank": None if c["rank"] is None else int(c["rank"]),
        "rank_cap": None if c["rank_cap"] is None else int(c["rank_cap"]),
        "share_basis": bool(c["share_basis"]),
        "outlier_threshold": None if ot is None else float(ot),
        "metric": c["metric"],
        "centroids": cents,
        "skeleton_dtype": c["skeleton_dtype"],
        "seed": int(c["seed"]),
        "oversampling": int(c["oversampling"]),
        "power_iters": int(c["power_iters"]),
        "identity": bool(c["identity"]),
        "allocation": c["allocation"],
        "basis": c["basis"],
        "uniform_step": None if step is None else float(step),
        "entropy_coding": bool(c["entropy_coding"]),
        "scale_granularity": c["scale_granularity"],
        "scale_format": c["scale_format"],
    }


def version_for(config: dict[str, Any]) -> int:
    """The format version an encoding is written with: the lowest that can express it."""
    if config["scale_format"] == "log8":
        return 5
    if (
        config["entropy_coding"]
        or config["uniform_step"] is not None
        or config["scale_granularity"] == "block"
    ):
        return 4
    if config["basis"] == "none":
        return 3
    return 2 if config["allocation"] == "variance" else 1


# -------------------------------------------------------------------------- generator

_GOLDEN = 0x9E3779B97F4A7C15
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB
_DOMAIN_MUL = 0xD1B54A32D192ED03
_A_MUL = 0x8CB92BA72F3D8DD7


def rng_state(seed: int, domain: int, a: int, b: int) -> int:
    """Initial SplitMix64 state `seed ^ domain*K1 ^ a*K2 ^ b*K3` (products mod 2^64)."""
    return (
        (seed & U64_MASK)
        ^ ((domain * _DOMAIN_MUL) & U64_MASK)
        ^ ((a * _A_MUL) & U64_MASK)
        ^ ((b * _GOLDEN) & U64_MASK)
    )


class SplitMix64:
    """Scalar SplitMix64 with Python ints masked to 64 bits (the literal spec)."""

    def __init__(self, state: int) -> None:
        self.state = state & U64_MASK

    def next_u64(self) -> int:
        self.state = (self.state + _GOLDEN) & U64_MASK
        z = self.state
        z = ((z ^ (z >> 30)) * _MIX1) & U64_MASK
        z = ((z ^ (z >> 27)) * _MIX2) & U64_MASK
        return z ^ (z >> 31)

    def next_gaussian_pair(self) -> tuple[float, float]:
        o1 = self.next_u64()
        o2 = self.next_u64()
        u1 = ((o1 >> 11) + 1) * 2.0**-53
        u2 = (o2 >> 11) * 2.0**-53
        rad = math.sqrt(-2.0 * math.log(u1))
        return rad * math.cos(math.tau * u2), rad * math.sin(math.tau * u2)


def rng(seed: int, domain: int, a: int, b: int) -> SplitMix64:
    """The spec's generator `rng(seed, domain, a, b)`."""
    return SplitMix64(rng_state(seed, domain, a, b))


def rng_outputs(seed: int, domain: int, a: int, b: int, count: int) -> np.ndarray:
    """The first `count` outputs of `rng(seed, domain, a, b)`, vectorised (uint64)."""
    start = np.uint64(rng_state(seed, domain, a, b))
    with np.errstate(over="ignore"):
        z = np.arange(1, count + 1, dtype=np.uint64) * np.uint64(_GOLDEN) + start
        z = (z ^ (z >> np.uint64(30))) * np.uint64(_MIX1)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(_MIX2)
    return z ^ (z >> np.uint64(31))


def rng_gaussians(seed: int, domain: int, a: int, b: int, count: int) -> np.ndarray:
    """The first `count` Box–Muller Gaussians of `rng(seed, domain, a, b)` (f64).

    Each pair of outputs gives cos then sin; an odd count drops the last sin.
    The transcendental functions are the C library's (``math``), as Rust's f64 methods.
    """
    pairs = (count + 1) // 2
    o = rng_outputs(seed, domain, a, b, 2 * pairs)
    u1 = ((o[0::2] >> np.uint64(11)) + np.uint64(1)).astype(np.float64) * 2.0**-53
    u2 = (o[1::2] >> np.uint64(11)).astype(np.float64) * 2.0**-53
    rad = np.sqrt(-2.0 * np.fromiter(map(math.log, u1.tolist()), np.float64, pairs))
    theta = (math.tau * u2).tolist()
    out = np.empty(2 * pairs, dtype=np.float64)
    out[0::2] = rad * np.fromiter(map(math.cos, theta), np.float64, pairs)
    out[1::2] = rad * np.fromiter(map(math.sin, theta), np.float64, pairs)
    return out[:count]


# ------------------------------------------------------------------------- Lloyd–Max

_SQRT2 = math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def _pdf(x: float) -> float:
    return 0.0 if math.isinf(x) else _INV_SQRT_2PI * math.exp(-0.5 * x * x)


def _cdf(x: float) -> float:
    if math.isinf(x):
        return 0.0 if x < 0 else 1.0
    return 0.5 * (1.0 + math.erf(x / _SQRT2))


def _xpdf(x: float) -> float:
    return 0.0 if math.isinf(x) else x * _pdf(x)


@cache
def _lloyd_max(bits: int) -> tuple[tuple[float, ...], float]:
    k = 1 << bits
    c = [-2.0 + 4.0 * (i + 0.5) / k for i in range(k)]  # symmetric start
    for _ in range(100_000):
        edges = [-math.inf] + [(c[j] + c[j + 1]) / 2 for j in range(k - 1)] + [math.inf]
        new = [
            (_pdf(edges[i]) - _pdf(edges[i + 1])) / (_cdf(edges[i + 1]) - _cdf(edges[i])) for i in range(k)
        ]
        new = [(new[i] - new[k - 1 - i]) / 2 for i in range(k)]  # keep exactly symmetric
        delta = max(abs(a - b) for a, b in zip(new, c, strict=True))
        c = new
        if delta <= 1e-15:
            break
    edges = [-math.inf] + [(c[j] + c[j + 1]) / 2 for j in range(k - 1)] + [math.inf]
    mse = 0.0
    for i in range(k):
        lo, hi = edges[i], edges[i + 1]
        p = _cdf(hi) - _cdf(lo)
        ex2 = p + _xpdf(lo) - _xpdf(hi)  # ∫ x² φ
        ex = _pdf(lo) - _pdf(hi)  # ∫ x φ
        mse += ex2 - 2 * c[i] * ex + c[i] * c[i] * p
    return tuple(c), mse


def _mass(a: float, b: float) -> float:
    """N(0,1) mass of [a, b], accurate in both tails."""

    def q(x: float) -> float:
        return 0.5 * math.erfc(x / _SQRT2)

    if a >= 0:
        return q(a) - q(b)
    if b <= 0:
        return q(-b) - q(-a)
    return 1.0 - q(-a) - q(b)


@cache
def _lloyd_max_newton(bits: int) -> tuple[tuple[float, ...], float]:
    """The Lloyd–Max fixed point by Newton's method on `c = m(c)` (plain Lloyd iteration is
    too slow beyond 16 levels), from the companding start `√3 Φ⁻¹((i + ½)/K)`."""
    from statistics import NormalDist

    k = 1 << bits
    c = np.array([math.sqrt(3.0) * NormalDist().inv_cdf((i + 0.5) / k) for i in range(k)])
    for _ in range(100):
        edges = [-math.inf] + [(c[j] + c[j + 1]) / 2 for j in range(k - 1)] + [math.inf]
        jac = np.eye(k)
        f = np.empty(k)
        for i in range(k):
            a, b = edges[i], edges[i + 1]
            m = _mass(a, b)
            cen = (_pdf(a) - _pdf(b)) / m
            ga = 0.0 if math.isinf(a) else 0.5 * _pdf(a) * (cen - a) / m
            gb = 0.0 if math.isinf(b) else 0.5 * _pdf(b) * (b - cen) / m
            jac[i, i] -= ga + gb
            if i > 0:
                jac[i, i - 1] = -ga
            if i + 1 < k:
                jac[i, i + 1] = -gb
            f[i] = c[i] - cen
        step = np.linalg.solve(jac, f)
        c = c - step
        if np.max(np.abs(step)) < 1e-13:
            break
    c = (c - c[::-1]) / 2  # exactly symmetric
    edges = [-math.inf] + [(c[j] + c[j + 1]) / 2 for j in range(k - 1)] + [math.inf]
    mse = 0.0
    for i in range(k):
        lo, hi = edges[i], edges[i + 1]
        p = _mass(lo, hi)
        mse += p + _xpdf(lo) - _xpdf(hi) - 2 * c[i] * (_pdf(lo) - _pdf(hi)) + c[i] * c[i] * p
    return tuple(float(v) for v in c), mse


def lloyd_max_gaussian(bits: int) -> tuple[np.ndarray, float]:
    """Gaussian-optimal Lloyd–Max centroids (f64, ascending) for `bits` (1..8) and their MSE
    on N(0,1). 5..8 bits serve allocation "variance" only."""
    if bits not in range(1, MAX_TABLE_BITS + 1):
        raise ValueError(f"bits must be in 1..{MAX_TABLE_BITS}, got {bits!r}")
    c, mse = _lloyd_max(bits) if bits <= 4 else _lloyd_max_newton(bits)
    return np.array(c, dtype=np.float64), mse


def distortion(b: int) -> float:
    """`D(b)`: the Gaussian Lloyd–Max MSE for `b` bits, `D(0) = 1` (the mean)."""
    return 1.0 if b == 0 else lloyd_max_gaussian(b)[1]


def allocate(lam: np.ndarray, budget: int) -> np.ndarray:
    """Greedy allocation, literally: `budget` times, give one bit to the component (λ > 0,
    fewer than 8 bits) with the largest `λ_i (D(b_i) − D(b_i + 1))`, lower index on ties."""
    lam = np.asarray(lam, dtype=np.float64)
    bits = np.zeros(lam.size, dtype=np.uint8)
    dd = np.array([distortion(b) - distortion(b + 1) for b in range(MAX_TABLE_BITS)] + [0.0])
    for _ in range(budget):
        gains = np.where((lam > 0) & (bits < MAX_TABLE_BITS), lam * dd[bits], -1.0)
        best = int(np.argmax(gains))  # first maximum: the lower index on ties
        if gains[best] < 0:
            break
        bits[best] += 1
    return bits


def component_allocation(coef: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """`(b, σ)` of one skeleton from all its coefficient rows (f32 [N, r]): `λ_i = Σ c² / N`
    (f64, rows summed in order), `b = allocate(λ, bits·r)` with components whose f32 `√λ`
    is 0 counted as λ = 0, and `σ_i = f32(√λ_i)` where `b_i > 0`, else 0."""
    c64 = np.asarray(coef, dtype=np.float32).astype(np.float64)
    n, r = c64.shape
    lam = np.sum(c64 * c64, axis=0) / max(n, 1)  # axis 0: sequential over rows
    lam = np.where(np.sqrt(lam).astype(np.float32) > 0, lam, 0.0)
    b = allocate(lam, bits * r)
    sigma = np.where(b > 0, np.sqrt(lam).astype(np.float32), np.float32(0)).astype(np.float32)
    return b, sigma


def centroid_table(config: dict[str, Any]) -> np.ndarray:
    """The f32 centroid table an encoding uses: the caller's, the uniform or the Gaussian one."""
    if config["centroids"] is not None:
        return np.asarray(config["centroids"], dtype=np.float64).astype(np.float32)
    if config["uniform_step"] is not None:
        return uniform_table(config["bits"], config["uniform_step"])
    return lloyd_max_gaussian(config["bits"])[0].astype(np.float32)


def uniform_table(bits: int, step: float) -> np.ndarray:
    """`c_i = (i − (2^bits − 1)/2)·step` in f64 (step as f32), rounded to f32 once."""
    levels = 1 << bits
    step64 = float(np.float32(step))
    return ((np.arange(levels, dtype=np.float64) - (levels - 1) / 2) * step64).astype(np.float32)


def boundaries(centroids: np.ndarray) -> np.ndarray:
    """`β_j = (c_j + c_{j+1}) / 2` in f32 (SPEC CHOICE: f32 arithmetic, f32 comparison)."""
    c = np.asarray(centroids, dtype=np.float32)
    return ((c[:-1] + c[1:]) / np.float32(2)).astype(np.float32)


def quantize(z: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Codes `#{j : z > β_j}` (uint8) of the f32 values `z`."""
    beta = boundaries(centroids)
    return np.searchsorted(beta, np.asarray(z, dtype=np.float32), side="left").astype(np.uint8)


# -------------------------------------------------------------------------- Hadamard


def next_pow2(r: int) -> int:
    """`P = next_pow2(r)`, with `P = 0` for `r = 0`."""
    return 0 if r == 0 else 1 << (r - 1).bit_length()


def hadamard_signs(seed: int, p: int) -> np.ndarray:
    """`σ_j = +1` if bit 63 of the j-th output of `rng(seed, 1, P, 0)` is 0, else −1 (f32)."""
    o = rng_outputs(seed, 1, p, 0, p)
    return np.where((o >> np.uint64(63)) == 0, np.float32(1), np.float32(-1)).astype(np.float32)


def fwht(a: np.ndarray) -> np.ndarray:
    """Unnormalised Walsh–Hadamard transform along the last axis (returns a new array).

    The in-place butterfly `(a, b) -> (a + b, a - b)` over strides 1, 2, 4, …, in the
    array's own dtype, so f32 results equal a scalar f32 butterfly bit for bit.
    """
    y = np.array(a, copy=True)
    p = y.shape[-1]
    if p & (p - 1):
        raise ValueError(f"length must be a power of two, got {p}")
    lead = y.shape[:-1]
    h = 1
    while h < p:
        v = y.reshape(*lead, p // (2 * h), 2, h)
        s = v[..., 0, :] + v[..., 1, :]
        d = v[..., 0, :] - v[..., 1, :]
        v[..., 0, :] = s
        v[..., 1, :] = d
        h *= 2
    return y


def _sqrt_p(p: int) -> np.float32:
    # SPEC CHOICE: `/ √P` is a division by √P rounded to f32 (exact for P a power of 4).
    return np.float32(math.sqrt(p))


def rotate(c: np.ndarray, seed: int) -> np.ndarray:
    """`y = H_P (σ ⊙ c) / √P` on rows of `c` (f32 [n, r]), zero-padded to P = next_pow2(r)."""
    c = np.asarray(c, dtype=np.float32)
    n, r = c.shape
    p = next_pow2(r)
    if p == 0:
        return np.zeros((n, 0), dtype=np.float32)
    padded = np.zeros((n, p), dtype=np.float32)
    padded[:, :r] = c
    return (fwht(padded * hadamard_signs(seed, p)) / _sqrt_p(p)).astype(np.float32)


def unrotate(y: np.ndarray, seed: int, r: int) -> np.ndarray:
    """`c = σ ⊙ (H_P y) / √P`, truncated to the first `r` coordinates (f32)."""
    y = np.asarray(y, dtype=np.float32)
    p = y.shape[1]
    if p == 0:
        return np.zeros((y.shape[0], 0), dtype=np.float32)
    return ((fwht(y) / _sqrt_p(p)) * hadamard_signs(seed, p))[:, :r].astype(np.float32)


# ------------------------------------------------------------------------ conversions


def bf16_to_f32(u: np.ndarray) -> np.ndarray:
    """bf16 bits (uint16) to f32: `u << 16` viewed as f32."""
    return (np.asarray(u, dtype=np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)


def f32_to_bf16(x: np.ndarray) -> np.ndarray:
    """f32 to bf16 bits (uint16), round to nearest even (NaN stays NaN)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    u = x.view(np.uint32)
    rounded = ((u + (((u >> np.uint32(16)) & np.uint32(1)) + np.uint32(0x7FFF))) >> np.uint32(16)).astype(
        np.uint16
    )
    nan = np.isnan(x)
    if nan.any():
        rounded[nan] = ((u[nan] >> np.uint32(16)) | np.uint32(0x40)).astype(np.uint16)
    return rounded


def _round_to(x: np.ndarray, dtype: str) -> np.ndarray:
    """Round (f64 or f32) values to `f16`/`f32` directly (RNE); return them as f32."""
    target = np.float16 if dtype == "f16" else np.float32
    with np.errstate(over="ignore"):
        return np.asarray(x).astype(target).astype(np.float32)


def _to_f32_input(x: np.ndarray, dtype: str | None) -> tuple[np.ndarray, str]:
    x = np.asarray(x)
    if dtype is None:
        if x.dtype == np.float32:
            dtype = "f32"
        elif x.dtype == np.float16:
            dtype = "f16"
        elif x.dtype == np.uint16:
            raise ValueError("uint16 input needs dtype='bf16' (bf16 bits)")
        else:
            raise ValueError(f"input dtype must be float32, float16 or bf16 (uint16), got {x.dtype}")
    if dtype not in _NP_DTYPES:
        raise ValueError(f"dtype must be 'f32', 'f16' or 'bf16', got {dtype!r}")
    expected = {"f32": np.float32, "f16": np.float16, "bf16": np.uint16}[dtype]
    if x.dtype != expected:
        raise ValueError(f"dtype={dtype!r} needs a {np.dtype(expected)} array, got {x.dtype}")
    if x.ndim != 3:
        raise ValueError(f"input must have shape [T, H, D], got shape {x.shape}")
    t, h, d = x.shape
    if h < 1 or not 1 <= d <= MAX_DIM:
        raise ValueError(f"input shape [T, H, D] needs H >= 1 and 1 <= D <= {MAX_DIM}, got {x.shape}")
    x32 = bf16_to_f32(x) if dtype == "bf16" else x.astype(np.float32)
    if not np.all(np.isfinite(x32)):
        raise ValueError("input contains non-finite values")
    return x32, dtype


# ---------------------------------------------------------------------------- skeleton


def choose_rank(
    eigenvalues: np.ndarray,
    tau: float,
    d: int,
    config: dict[str, Any],
    computed: int | None = None,
    n: int | None = None,
) -> int:
    """The spec's rank rule. `eigenvalues` descending; `n` = rows fitted (the cap is
    `min(D, n, rank_cap or D)`); `computed` = randomized component count."""
    cap = min(d, config["rank_cap"] if config["rank_cap"] is not None else d)
    if n is not None:
        cap = min(cap, n)
    if computed is not None:
        cap = min(cap, computed)
    if config["rank"] is not None:
        return min(config["rank"], cap)
    vr = config["variance_ratio"]
    if vr >= 1:
        return cap
    if tau == 0:
        return 0
    cum = np.cumsum(np.asarray(eigenvalues, dtype=np.float64))
    hits = np.nonzero(cum >= vr * tau)[0]
    # SPEC CHOICE: when the computed spectrum never reaches the share, keep all of it.
    r = int(hits[0]) + 1 if hits.size else int(cum.size)
    return min(r, cap)


def _orth(m: np.ndarray) -> np.ndarray:
    return np.linalg.qr(m, mode="reduced")[0]


def _canonical_signs(v: np.ndarray) -> np.ndarray:
    """Negate each column whose entry of largest magnitude (first on ties) is negative."""
    if v.shape[1] == 0:
        return v
    idx = np.argmax(np.abs(v), axis=0)
    sign = np.where(v[idx, np.arange(v.shape[1])] < 0, -1.0, 1.0)
    return v * sign


def fit_skeleton(
    rows: np.ndarray, config: dict[str, Any], head: int, index: int
) -> tuple[np.ndarray, np.ndarray]:
    """Mean and basis of `rows` (f32 [n, D]): returns `μ̂` (f32 [D]) and `Û` (f32 [D, r]),
    both holding skeleton-dtype values. `index` is the block index (2^64−1 when shared).
    Basis "none": `Û = I` (stored as no values)."""
    rows = np.asarray(rows, dtype=np.float32)
    n, d = rows.shape
    sk = config["skeleton_dtype"]
    # The mean of zero rows is 0 (not reached by encode: T = 0 has no skeleton records).
    mu = rows.astype(np.float64).mean(axis=0) if n else np.zeros(d)
    mu_hat = _round_to(mu, sk)
    if config["basis"] == "none":
        return mu_hat, np.eye(d, dtype=np.float32)
    a = rows.astype(np.float64) - mu_hat.astype(np.float64)
    tau = float(np.sum(a * a))
    if config["pca"] == "exact":
        w, v = np.linalg.eigh(a.T @ a)
        order = np.argsort(-w, kind="stable")
        lam, vecs = w[order], v[:, order]
        r = choose_rank(lam, tau, d, config, n=n)
    else:
        t = config["rank"] if config["rank"] is not None else config["rank_cap"]
        t = d if t is None else t
        k = min(d, t + config["oversampling"])
        m = min(n, k)
        if m == 0:
            lam, vecs = np.zeros(0), np.zeros((d, 0))
        else:
            omega = rng_gaussians(config["seed"], 2, head, index, d * k).reshape(d, k)
            q = _orth(a @ omega)
            for _ in range(config["power_iters"]):
                z = _orth(a.T @ q)
                q = _orth(a @ z)
            bm = q.T @ a
            _, sig, vt = np.linalg.svd(bm, full_matrices=False)
            lam = (sig * sig)[:m]
            vecs = vt[:m].T
        # The computed components: the min(n, k) right singular vectors of Bm.
        r = choose_rank(lam, tau, d, config, computed=lam.size, n=n)
    u = _canonical_signs(vecs[:, :r])
    return mu_hat, _round_to(u, sk).reshape(d, r)


# ---------------------------------------------------------------------------- packing


def pack_codes(codes: np.ndarray, bits: int) -> bytes:
    """Pack codes (row-major) in `bits` bits each, least-significant bit first."""
    c = np.asarray(codes, dtype=np.uint8).ravel()
    if c.size == 0:
        return b""
    planes = (c[:, None] >> np.arange(bits, dtype=np.uint8)) & np.uint8(1)
    return np.packbits(planes.ravel(), bitorder="little").tobytes()


def unpack_codes(buf: bytes, count: int, bits: int) -> np.ndarray:
    """Inverse of `pack_codes`: `count` codes (uint8)."""
    if count == 0:
        return np.zeros(0, dtype=np.uint8)
    planes = np.unpackbits(np.frombuffer(buf, dtype=np.uint8), count=count * bits, bitorder="little")
    weights = (1 << np.arange(bits)).astype(np.uint8)
    return (planes.reshape(count, bits) * weights).sum(axis=1).astype(np.uint8)


def pack_widths(codes: np.ndarray, widths: np.ndarray) -> bytes:
    """Pack codes [n, r] (code j in `widths[j]` bits; width 0 takes none) row by row,
    components in order, least-significant bit first, as one bit stream."""
    codes = np.asarray(codes, dtype=np.uint8)
    cols = [
        (codes[:, j : j + 1] >> np.arange(w, dtype=np.uint8)) & np.uint8(1) for j, w in enumerate(widths) if w
    ]
    if not cols or codes.shape[0] == 0:
        return b""
    return np.packbits(np.concatenate(cols, axis=1).ravel(), bitorder="little").tobytes()


def unpack_widths(buf: bytes, rows: int, widths: np.ndarray) -> np.ndarray:
    """Inverse of `pack_widths`: codes [rows, r] (0 for width-0 components)."""
    widths = [int(w) for w in widths]
    total = sum(widths)
    out = np.zeros((rows, len(widths)), dtype=np.uint8)
    if total == 0 or rows == 0:
        return out
    planes = np.unpackbits(np.frombuffer(buf, dtype=np.uint8), count=rows * total, bitorder="little")
    planes = planes.reshape(rows, total)
    pos = 0
    for j, w in enumerate(widths):
        weights = (1 << np.arange(w)).astype(np.uint16)
        out[:, j] = (planes[:, pos : pos + w] * weights).sum(axis=1).astype(np.uint8)
        pos += w
    return out


def segment_rows(p: int) -> int:
    """Rows per outlier segment `S = max(1, 65536 / P)` (SPEC CHOICE: P = 0 counts as 1)."""
    return max(1, 65536 // max(p, 1))


# --------------------------------------------------------------------------- entropy

PROB_BITS = 14
PROB_TOTAL = 1 << PROB_BITS
RANS_LOW = 1 << 23
RANS_LANES = 4
CODES_PACKED, CODES_RANS = 0, 1


def frequency_table(codes: np.ndarray, alphabet: int) -> tuple[int, list[int]]:
    """`(first, f)`: counts scaled to 2^14 by floor (1 for any symbol present), the
    difference given to or taken one by one from the largest frequency (lowest symbol first)."""
    counts = np.bincount(np.asarray(codes, np.int64).reshape(-1), minlength=alphabet)
    present = np.flatnonzero(counts)
    first, last = (int(present[0]), int(present[-1])) if present.size else (0, 0)
    total = max(int(counts.sum()), 1)
    freq = [0 if c == 0 else max(1, c * PROB_TOTAL // total) for c in map(int, counts[first : last + 1])]
    diff = PROB_TOTAL - sum(freq)
    if diff > 0:
        freq[freq.index(max(freq))] += diff
    for _ in range(-diff):
        freq[freq.index(max(freq))] -= 1
    return first, freq


def _rans_encode_lane(codes: list[int], first: int, freq: list[int]) -> bytes:
    cum = np.concatenate([[0], np.cumsum(freq)]).tolist()
    out = bytearray()
    x = RANS_LOW
    for s in reversed(codes):
        f, c = freq[s - first], cum[s - first]
        x_max = ((RANS_LOW >> PROB_BITS) << 8) * f
        while x >= x_max:
            out.append(x & 0xFF)
            x >>= 8
        x = (x // f << PROB_BITS) + x % f + c
    out += struct.pack("<I", x)
    out.reverse()
    return bytes(out)


def rans_encode(codes: np.ndarray, first: int, freq: list[int]) -> bytes:
    """For each of the `RANS_LANES` lanes (code `t` in lane `t mod RANS_LANES`): `u32` length,
    then the lane's stream (big-endian final state, renormalisation bytes in decoding order)."""
    flat = np.asarray(codes, np.int64).reshape(-1).tolist()
    out = b""
    for lane in range(RANS_LANES):
        stream = _rans_encode_lane(flat[lane::RANS_LANES], first, freq)
        out += struct.pack("<I", len(stream)) + stream
    return out


def rans_decode(coded: bytes, first: int, freq: list[int], count: int) -> np.ndarray:
    cum = np.concatenate([[0], np.cumsum(freq)]).astype(np.int64).tolist()
    slot_symbol = np.repeat(np.arange(len(freq)), freq).tolist()
    rd = _Reader(coded, 0, "entropy-coded codes")
    states, streams, cursors = [], [], []
    for _ in range(RANS_LANES):
        (length,) = struct.unpack("<I", rd.take(4, "rANS lane length"))
        lane = rd.take(length, "rANS lane")
        if len(lane) < 4:
            raise ValueError("entropy-coded codes: lane shorter than its 4-byte state")
        states.append(struct.unpack(">I", lane[:4])[0])
        streams.append(lane)
        cursors.append(4)
    if rd.pos != len(coded):
        raise ValueError("entropy-coded codes: bytes after the last lane")
    out = np.empty(count, dtype=np.uint8)
    for k in range(count):
        lane = k % RANS_LANES
        x = states[lane]
        slot = x & (PROB_TOTAL - 1)
        i = slot_symbol[slot]
        out[k] = first + i
        x = freq[i] * (x >> PROB_BITS) + slot - cum[i]
        while x < RANS_LOW:
            if cursors[lane] >= len(streams[lane]):
                raise ValueError("entropy-coded codes: a lane ends before its symbols")
            x = (x << 8) | streams[lane][cursors[lane]]
            cursors[lane] += 1
        states[lane] = x
    if any(x != RANS_LOW for x in states) or any(
        c != len(st) for c, st in zip(cursors, streams, strict=True)
    ):
        raise ValueError("entropy-coded codes: a lane does not end where its symbols do")
    return out


def _code_section(codes: np.ndarray, bits: int, entropy_coding: bool) -> bytes:
    """Packed codes; with entropy coding a mode byte and the shorter of packed and rANS."""
    packed = pack_codes(codes, bits)
    if not entropy_coding:
        return packed
    first, freq = frequency_table(codes, 1 << bits)
    stream = rans_encode(codes, first, freq)
    table = struct.pack("<BH", first, len(freq)) + struct.pack(f"<{len(freq)}H", *freq)
    if len(table) + 4 + len(stream) < len(packed):
        return bytes([CODES_RANS]) + table + struct.pack("<I", len(stream)) + stream
    return bytes([CODES_PACKED]) + packed


def _read_code_section(br: _Reader, count: int, bits: int, entropy_coding: bool) -> tuple[np.ndarray, int]:
    """The codes (uint8, `count`) and the section's length in bytes."""
    start = br.pos
    packed_len = -(-count * bits // 8)
    mode = CODES_PACKED
    if entropy_coding:
        (mode,) = br.take(1, "code mode")
    if mode == CODES_PACKED:
        codes = unpack_codes(br.take(packed_len, "codes"), count, bits)
    elif mode == CODES_RANS:
        first, n_sym = struct.unpack("<BH", br.take(3, "frequency table"))
        if n_sym == 0 or first + n_sym > 1 << bits:
            raise ValueError(f"frequency table of symbols {first}..{first + n_sym} outside 2^{bits}")
        freq = [int(f) for f in br.array(n_sym, np.dtype("<u2"), "frequency table")]
        if sum(freq) != PROB_TOTAL:
            raise ValueError(f"frequencies sum to {sum(freq)}, expected {PROB_TOTAL}")
        (length,) = struct.unpack("<I", br.take(4, "code stream length"))
        codes = rans_decode(br.take(length, "code stream"), first, freq, count)
    else:
        raise ValueError(f"code mode {mode}, expected {CODES_PACKED} (packed) or {CODES_RANS} (rANS)")
    return codes, br.pos - start


# ------------------------------------------------------------------------- log scales

LOG_PER_OCTAVE = 16
LOG_TOP = 254  # largest byte: levels base .. base + 253
LOG_LOWEST = -126 * LOG_PER_OCTAVE  # levels whose values are normal f32
LOG_HIGHEST = 128 * LOG_PER_OCTAVE - 1
# SPEC CHOICE: 2^(j/16) rounded to f32; a level's value is that times 2^(k div 16), exactly.
_LOG_FRACTIONS = (2.0 ** (np.arange(LOG_PER_OCTAVE) / LOG_PER_OCTAVE)).astype(np.float32)


def _log_level_values(k: np.ndarray) -> np.ndarray:
    k = np.asarray(k, dtype=np.int64)
    return np.ldexp(_LOG_FRACTIONS[k % LOG_PER_OCTAVE], (k // LOG_PER_OCTAVE).astype(np.int32)).astype(
        np.float32
    )


def log_scales(s: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
    """`scale_format = "log8"`: the base level, the bytes (0 = zero scale, c = level base + c − 1)
    and the values of scales `s` (>= 0): level `round_half_even(16 log2 s)`, kept to the normal
    range and to 254 levels below the largest."""
    s = np.asarray(s, dtype=np.float32)
    live = s > 0
    levels = np.zeros(s.shape, dtype=np.int64)
    with np.errstate(divide="ignore"):
        levels[live] = np.rint(LOG_PER_OCTAVE * np.log2(s[live].astype(np.float64))).astype(np.int64)
    levels = np.clip(levels, LOG_LOWEST, LOG_HIGHEST)
    if not live.any():
        return 0, np.zeros(s.shape, dtype=np.uint8), np.zeros(s.shape, dtype=np.float32)
    base = max(int(levels[live].max()) - LOG_TOP, LOG_LOWEST)
    levels = np.maximum(levels, base)
    codes = np.where(live, levels - base + 1, 0).astype(np.uint8)
    return base, codes, np.where(live, _log_level_values(levels), 0).astype(np.float32)


def log_scale_values(base: int, codes: np.ndarray) -> np.ndarray:
    """The scales of log-scale `codes` above level `base` (ValueError outside the normal range)."""
    if not LOG_LOWEST <= base <= LOG_HIGHEST:
        raise ValueError(f"log scale base {base} outside [{LOG_LOWEST}, {LOG_HIGHEST}]")
    levels = base + codes.astype(np.int64) - 1
    if np.any((codes > 0) & (levels > LOG_HIGHEST)):
        raise ValueError(f"log scale level above {LOG_HIGHEST}")
    return np.where(codes > 0, _log_level_values(np.maximum(levels, LOG_LOWEST)), 0).astype(np.float32)


# ---------------------------------------------------------------------------- encoder


@dataclass
class _Block:
    head: int
    index: int
    mu: np.ndarray
    basis: np.ndarray
    y: np.ndarray
    s: np.ndarray  # f64 scales before rounding


def _skeleton_bytes(mu: np.ndarray, basis: np.ndarray, sk: str, store_basis: bool = True) -> bytes:
    """Rank, mean, then the basis values unless `store_basis` is False (basis "none")."""
    dt = _NP_DTYPES[sk]
    values = np.ascontiguousarray(basis.T).astype(dt).tobytes() if store_basis else b""
    return struct.pack("<H", basis.shape[1]) + mu.astype(dt).tobytes() + values


def _check_preconditioner(l_mat: Any, h: int, d: int, sk: str) -> np.ndarray:
    l64 = np.asarray(l_mat, dtype=np.float64)
    if l64.shape != (h, d, d):
        raise ValueError(f"preconditioner must have shape [H, D, D] = {[h, d, d]}, got {list(l64.shape)}")
    if not np.all(np.isfinite(l64)):
        raise ValueError("preconditioner contains non-finite values")
    if np.any(np.triu(l64, 1) != 0):
        raise ValueError("preconditioner must be lower triangular")
    l_hat = _round_to(l64, sk)
    if not np.all(np.isfinite(l_hat)):
        raise ValueError(f"preconditioner overflows the skeleton dtype {sk}")
    if not np.all(np.diagonal(l_hat, axis1=1, axis2=2) > 0):
        raise ValueError(f"preconditioner needs a positive diagonal (after rounding to {sk})")
    return l_hat


def encode(
    x: np.ndarray,
    config: dict[str, Any] | None = None,
    preconditioner: np.ndarray | None = None,
    dtype: str | None = None,
) -> bytes:
    """Encode `x` ([T, H, D] float32/float16, or uint16 bf16 bits with `dtype="bf16"`).

    `config` is a (partial) dict of the spec's fields; `preconditioner` is `L` [H, D, D]
    for `metric="inner_product"`. Returns the complete serialized encoding.
    """
    cfg = make_config(config)
    x32, in_dtype = _to_f32_input(x, dtype)
    t, nh, d = x32.shape
    bsz = cfg["block_size"]
    nblocks = -(-t // bsz)
    header: dict[str, Any] = {
        "shape": [t, nh, d],
        "dtype": in_dtype,
        "config": cfg,
        "scale_dtype": "log8" if cfg["scale_format"] == "log8" else "f16",
        "preconditioner": False,
        "blocks_per_head": nblocks,
        "library": LIBRARY,
    }
    if cfg["identity"]:
        # SPEC CHOICE: identity bypasses the pre-conditioner too (it is ignored if given).
        raw = np.ascontiguousarray(x).astype(_NP_DTYPES[in_dtype]).tobytes()
        return _serialize(header, raw)

    sk = cfg["skeleton_dtype"]
    seed = cfg["seed"]
    pre = b""
    l_hat = None
    if cfg["metric"] == "inner_product":
        if preconditioner is None:
            raise ValueError("metric 'inner_product' requires a preconditioner L of shape [H, D, D]")
        l_hat = _check_preconditioner(preconditioner, nh, d, sk)
        tri = np.tril_indices(d)
        pre = b"".join(l_hat[h][tri].astype(_NP_DTYPES[sk]).tobytes() for h in range(nh))
        header["preconditioner"] = True
        # SPEC CHOICE: X̃ = X · L̂ is computed in f64 and rounded to f32.
        x32 = np.einsum("thd,hde->the", x32.astype(np.float64), l_hat.astype(np.float64)).astype(np.float32)
    elif preconditioner is not None:
        raise ValueError("a preconditioner was given but metric is 'mse' (use metric='inner_product')")

    # Pass 1: skeletons, rotated coefficients and raw scales for every block.
    shared: list[tuple[np.ndarray, np.ndarray]] = []
    blocks: list[list[_Block]] = []
    for h in range(nh):
        xh = x32[:, h, :]
        if cfg["share_basis"] and t > 0:  # T = 0: no shared skeleton (and no offsets table)
            shared.append(fit_skeleton(xh, cfg, h, SHARED_BLOCK_INDEX))
        row: list[_Block] = []
        for i in range(nblocks):
            rows = xh[i * bsz : min((i + 1) * bsz, t)]
            mu, basis = shared[h] if cfg["share_basis"] else fit_skeleton(rows, cfg, h, i)
            # SPEC CHOICE: c = (x − μ̂) Û is computed in f64 and rounded to f32.
            c = ((rows.astype(np.float64) - mu.astype(np.float64)) @ basis.astype(np.float64)).astype(
                np.float32
            )
            if cfg["allocation"] == "variance":  # no rotation; scales once allocated
                row.append(_Block(h, i, mu, basis, c, np.zeros(rows.shape[0])))
                continue
            y = rotate(c, seed)
            y64 = y.astype(np.float64)
            s = np.sqrt(np.mean(y64 * y64, axis=1)) if y.shape[1] else np.zeros(rows.shape[0])
            if cfg["scale_granularity"] == "block" and y.shape[1]:
                # SPEC CHOICE: the row powers summed in row order, in f64.
                power = 0.0
                for row_power in np.sum(y64 * y64, axis=1).tolist():
                    power += row_power
                s = np.full(rows.shape[0], math.sqrt(power / y.size))
            row.append(_Block(h, i, mu, basis, y, s))
        blocks.append(row)

    if cfg["allocation"] == "variance":
        return _encode_variance(header, cfg, pre, shared, blocks)

    all_s = np.concatenate([b.s for row in blocks for b in row]) if nblocks else np.zeros(0)
    nz = all_s[all_s != 0]
    scale_dtype = "f32" if np.any((nz < F16_SCALE_MIN) | (nz > F16_SCALE_MAX)) else "f16"
    if cfg["scale_format"] == "log8":
        scale_dtype = "log8"
    header["scale_dtype"] = scale_dtype

    # Pass 2: quantize and serialize records.
    cents = centroid_table(cfg)
    bits = cfg["bits"]
    t_out = cfg["outlier_threshold"]
    store_basis = cfg["basis"] == "pca"
    shared_recs = [_skeleton_bytes(mu, basis, sk, store_basis) for mu, basis in shared]
    block_recs: list[list[bytes]] = []
    for row in blocks:
        recs = []
        for b in row:
            block_scale = cfg["scale_granularity"] == "block"
            if scale_dtype == "log8":
                base, scale_bytes, s_hat = log_scales(b.s[:1] if block_scale else b.s)
                s_hat = np.repeat(s_hat, b.s.size) if block_scale else s_hat
                stored_scales = struct.pack("<i", base) + _code_section(scale_bytes, 8, cfg["entropy_coding"])
            else:
                s_hat = _round_to(b.s, scale_dtype)
                stored_scales = (
                    (s_hat[:1] if block_scale else s_hat).astype(_NP_DTYPES[scale_dtype]).tobytes()
                )
            z = np.zeros_like(b.y)
            np.divide(b.y, s_hat[:, None], out=z, where=s_hat[:, None] != 0)
            codes = quantize(z, cents)
            parts = [] if cfg["share_basis"] else [_skeleton_bytes(b.mu, b.basis, sk, store_basis)]
            if b.y.shape[1]:  # rank 0: the record is the skeleton alone
                parts.append(stored_scales)
                parts.append(_code_section(codes, bits, cfg["entropy_coding"]))
                if t_out is not None:
                    parts.append(_outlier_bytes(z, t_out))
            recs.append(b"".join(parts))
        block_recs.append(recs)
    return _serialize(header, _assemble_body(pre, shared_recs, block_recs))


def _variance_scales(c: np.ndarray, b: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """`s_t = sqrt(mean over b_i > 0 of (c_{t,i} / σ_i)²)` (f64, components summed in order)."""
    live = np.nonzero(b)[0]
    acc = np.zeros(c.shape[0])
    for j in live:
        u = c[:, j].astype(np.float64) / np.float64(sigma[j])
        acc = acc + u * u
    return np.sqrt(acc / live.size) if live.size else acc


def _allocation_bytes(b: np.ndarray, sigma_hat: np.ndarray, scale_dtype: str) -> bytes:
    return np.asarray(b, dtype=np.uint8).tobytes() + sigma_hat.astype(_NP_DTYPES[scale_dtype]).tobytes()


def _encode_variance(
    header: dict[str, Any],
    cfg: dict[str, Any],
    pre: bytes,
    shared: list[tuple[np.ndarray, np.ndarray]],
    blocks: list[list[_Block]],
) -> bytes:
    """Allocation "variance": per skeleton (per head when shared) bits and σ from the
    variance of the coefficients, per-row scales, variable-width codes; `_Block.y` holds
    the plain coefficients."""
    sk, bits, t_out = cfg["skeleton_dtype"], cfg["bits"], cfg["outlier_threshold"]
    # One allocation per skeleton: allocs[h] (shared) or allocs[(h, i)].
    allocs: dict[Any, tuple[np.ndarray, np.ndarray]] = {}
    for h, row in enumerate(blocks):
        if shared:
            coef = (
                np.concatenate([b.y for b in row])
                if row
                else np.zeros((0, shared[h][1].shape[1]), np.float32)
            )
            allocs[h] = component_allocation(coef, bits)
        else:
            for b in row:
                allocs[(h, b.index)] = component_allocation(b.y, bits)

    def alloc_of(b: _Block) -> tuple[np.ndarray, np.ndarray]:
        return allocs[b.head] if shared else allocs[(b.head, b.index)]

    for row in blocks:
        for b in row:
            b.s = _variance_scales(b.y, *alloc_of(b))
    values = [b.s for row in blocks for b in row] + [sig for _, sig in allocs.values()]
    allv = np.concatenate(values) if values else np.zeros(0)
    nz = allv[allv != 0]
    scale_dtype = "f32" if np.any((nz < F16_SCALE_MIN) | (nz > F16_SCALE_MAX)) else "f16"
    header["scale_dtype"] = scale_dtype
    sigma_hat = {key: _round_to(sig, scale_dtype) for key, (_, sig) in allocs.items()}

    shared_recs = [
        _skeleton_bytes(mu, basis, sk) + _allocation_bytes(allocs[h][0], sigma_hat[h], scale_dtype)
        for h, (mu, basis) in enumerate(shared)
    ]
    block_recs: list[list[bytes]] = []
    for row in blocks:
        recs = []
        for blk in row:
            key = blk.head if shared else (blk.head, blk.index)
            b, sig = allocs[key][0], sigma_hat[key]
            parts = []
            if not shared:
                parts.append(_skeleton_bytes(blk.mu, blk.basis, sk) + _allocation_bytes(b, sig, scale_dtype))
            live = np.nonzero(b)[0]
            if live.size:  # no component with bits: nothing but the skeleton
                s_hat = _round_to(blk.s, scale_dtype)
                n, r = blk.y.shape
                z = np.zeros((n, r), dtype=np.float32)
                codes = np.zeros((n, r), dtype=np.uint8)
                nonzero = s_hat != 0
                for j in live:
                    zj = blk.y[:, j] / sig[j]  # f32 ÷ f32
                    zj = np.divide(zj, s_hat, out=np.zeros_like(zj), where=nonzero)
                    z[:, j] = zj
                    codes[:, j] = quantize(zj, lloyd_max_gaussian(int(b[j]))[0].astype(np.float32))
                parts.append(s_hat.astype(_NP_DTYPES[scale_dtype]).tobytes())
                parts.append(pack_widths(codes, b))
                if t_out is not None:
                    parts.append(_outlier_bytes(z, t_out))
            recs.append(b"".join(parts))
        block_recs.append(recs)
    return _serialize(header, _assemble_body(pre, shared_recs, block_recs))


def _outlier_bytes(z: np.ndarray, t_out: float) -> bytes:
    """Outlier segments; with allocation "variance" `z` is [n, r], 0 where `b_i = 0`."""
    n, p = z.shape
    seg = segment_rows(p)
    mask = np.abs(z.astype(np.float64)) > t_out
    out = []
    for start in range(0, n, seg):
        rr, jj = np.nonzero(mask[start : start + seg])
        pairs = np.empty(rr.size, dtype=_OUTLIER_DTYPE)
        pairs["index"] = rr * p + jj
        pairs["value"] = z[start + rr, jj].astype(np.float16)
        out.append(struct.pack("<I", rr.size) + pairs.tobytes())
    return b"".join(out)


def _assemble_body(pre: bytes, shared_recs: list[bytes], block_recs: list[list[bytes]]) -> bytes:
    # SPEC CHOICE: records are laid out head-major: head h's shared skeleton (if any),
    # then its blocks 0..N-1. Readers must only rely on the offsets.
    nh = len(block_recs)
    nblocks = len(block_recs[0]) if nh else 0
    table_len = 8 * (len(shared_recs) + nh * nblocks)
    pos = len(pre) + table_len
    shared_off, block_off, records = [], [], []
    for h in range(nh):
        if shared_recs:
            shared_off.append(pos)
            records.append(shared_recs[h])
            pos += len(shared_recs[h])
        for rec in block_recs[h]:
            block_off.append(pos)
            records.append(rec)
            pos += len(rec)
    tables = struct.pack(f"<{len(shared_off)}Q", *shared_off) + struct.pack(f"<{len(block_off)}Q", *block_off)
    return pre + tables + b"".join(records)


def _serialize(header: dict[str, Any], body: bytes) -> bytes:
    version = version_for(header["config"])
    config = {k: v for k, v in header["config"].items() if k not in NEWER_FIELDS or DEFAULT_CONFIG[k] != v}
    header = {**header, "config": config}
    hjson = json.dumps(header, separators=(",", ":")).encode("utf-8")
    head = MAGIC + struct.pack("<HI", version, len(hjson)) + hjson
    out = head + body
    return out + struct.pack("<I", zlib.crc32(out) & 0xFFFFFFFF)


# ----------------------------------------------------------------------------- parser


@dataclass
class SkeletonRecord:
    """A parsed skeleton record: `rank`, `mean` (f32 [D]), `basis_t` (f32 [r, D]), raw bytes;
    with allocation "variance" also `bits` (uint8 [r]) and `sigma` (σ̂, f32 [r])."""

    rank: int
    mean: np.ndarray
    basis_t: np.ndarray
    raw: bytes
    bits: np.ndarray | None = None
    sigma: np.ndarray | None = None


@dataclass
class BlockRecord:
    """A parsed block record of head `head`, block `index` with `rows` rows and `padded`
    codes per row (`P`; `r` with allocation "variance", 0 when no component has bits)."""

    head: int
    index: int
    rows: int
    padded: int
    skeleton: SkeletonRecord | None  # None with share_basis
    scales: np.ndarray  # f32 [n]
    codes: np.ndarray  # uint8 [n, P]
    outliers: list[np.ndarray] | None  # per segment, structured (index u16, value f16)
    raw: bytes
    code_bytes: int = 0  # length of the code section
    scale_bytes: int = 0  # length of the scales


@dataclass
class Parsed:
    """Everything in an encoding, section by section."""

    header: dict[str, Any]
    config: dict[str, Any]
    body: bytes
    identity_data: np.ndarray | None = None  # [T, H, D] in the input dtype (identity only)
    preconditioner: np.ndarray | None = None  # L̂ [H, D, D] f32
    preconditioner_raw: bytes = b""
    shared_offsets: list[int] = field(default_factory=list)
    block_offsets: list[list[int]] = field(default_factory=list)
    shared: list[SkeletonRecord] = field(default_factory=list)
    blocks: list[list[BlockRecord]] = field(default_factory=list)


class _Reader:
    def __init__(self, buf: bytes, pos: int, what: str) -> None:
        self.buf, self.pos, self.what = buf, pos, what

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or self.pos + n > len(self.buf):
            raise ValueError(
                f"truncated {self.what}: {what} needs {n} bytes at body offset {self.pos}, "
                f"body has {len(self.buf)}"
            )
        out = self.buf[self.pos : self.pos + n]
        self.pos += n
        return out

    def array(self, count: int, dtype: np.dtype, what: str) -> np.ndarray:
        return np.frombuffer(self.take(count * dtype.itemsize, what), dtype=dtype)


def _parse_skeleton(
    rd: _Reader, d: int, sk: str, alloc: tuple[int, str] | None = None, basis: str = "pca"
) -> SkeletonRecord:
    """`alloc = (bits, scale_dtype)` reads the allocation that follows (allocation "variance");
    basis "none" stores no basis values (`Û = I`, rank D)."""
    start = rd.pos
    (r,) = struct.unpack("<H", rd.take(2, "rank"))
    if r > d:
        raise ValueError(f"skeleton rank {r} exceeds head dim {d}")
    if basis == "none" and r != d:
        raise ValueError(f"basis 'none' needs rank {d}, the skeleton says {r}")
    dt = _NP_DTYPES[sk]
    mean = rd.array(d, dt, "mean").astype(np.float32)
    if basis == "none":
        basis_t = np.eye(d, dtype=np.float32)
    else:
        basis_t = rd.array(r * d, dt, "basis").astype(np.float32).reshape(r, d)
    if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(basis_t))):
        raise ValueError("skeleton record holds non-finite values")
    rec = SkeletonRecord(r, mean, basis_t, b"")
    if alloc is not None:
        budget, scale_dtype = alloc
        rec.bits = rd.array(r, np.dtype("u1"), "bit allocation").copy()
        rec.sigma = rd.array(r, _NP_DTYPES[scale_dtype], "component scales").astype(np.float32)
        if not np.all(np.isfinite(rec.sigma)) or np.any(rec.sigma < 0):
            raise ValueError("component scales must be finite and >= 0")
        if np.any(rec.bits > MAX_TABLE_BITS) or np.any((rec.bits > 0) != (rec.sigma > 0)):
            raise ValueError("bit allocation: bits must be 0..8 and σ > 0 exactly where bits > 0")
        if int(rec.bits.astype(np.int64).sum()) > budget * r:
            raise ValueError(f"bit allocation spends more than bits·r = {budget * r} bits")
    rec.raw = rd.buf[start : rd.pos]
    return rec


def _header_int(header: dict[str, Any], key: str) -> int:
    v = header.get(key)
    if not _is_int(v):
        raise ValueError(f"header field {key!r} must be an integer, got {v!r}")
    return int(v)


def parse(data: bytes) -> Parsed:
    """Check and split an encoding into its sections. Raises ValueError on any fault."""
    try:
        return _parse(bytes(data))
    except ValueError:
        raise
    except (struct.error, IndexError, KeyError, TypeError, OverflowError, MemoryError) as e:
        raise ValueError(f"malformed encoding: {e}") from e


def _parse(data: bytes) -> Parsed:
    fixed = len(MAGIC) + 2 + 4
    if len(data) < fixed + 4:
        raise ValueError(f"encoding too short: {len(data)} bytes, at least {fixed + 4} expected")
    if data[: len(MAGIC)] != MAGIC:
        raise ValueError(f"bad magic: expected {MAGIC!r}, got {data[: len(MAGIC)]!r}")
    version, hlen = struct.unpack_from("<HI", data, len(MAGIC))
    if not MIN_VERSION <= version <= VERSION:
        raise ValueError(
            f"unknown format version {version}; this reader knows versions {MIN_VERSION} to {VERSION}"
        )
    if fixed + hlen + 4 > len(data):
        raise ValueError(f"truncated encoding: header of {hlen} bytes does not fit in {len(data)} bytes")
    (crc,) = struct.unpack_from("<I", data, len(data) - 4)
    actual = zlib.crc32(data[:-4]) & 0xFFFFFFFF
    if crc != actual:
        raise ValueError(f"checksum mismatch: stored CRC-32 {crc:#010x}, computed {actual:#010x}")
    try:
        header = json.loads(data[fixed : fixed + hlen].decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"header is not UTF-8: {e}") from e
    if not isinstance(header, dict):
        raise ValueError("header must be a JSON object")
    for key in ("shape", "dtype", "config", "scale_dtype", "preconditioner", "blocks_per_head"):
        if key not in header:
            raise ValueError(f"header lacks the field {key!r}")
    if not isinstance(header["config"], dict):
        raise ValueError("header field 'config' must be an object")
    # SPEC CHOICE: every field is required except those newer than version 1, which are
    # absent when they hold their default.
    missing = sorted(set(DEFAULT_CONFIG) - set(header["config"]) - set(NEWER_FIELDS))
    if missing:
        raise ValueError(f"header config lacks the fields {missing}")
    cfg = make_config({k: header["config"][k] for k in DEFAULT_CONFIG if k in header["config"]})
    if version < version_for(cfg):
        raise ValueError(
            f"allocation {cfg['allocation']!r}, basis {cfg['basis']!r}, uniform_step "
            f"{cfg['uniform_step']!r}, entropy_coding {cfg['entropy_coding']}, scale_granularity "
            f"{cfg['scale_granularity']!r} and scale_format {cfg['scale_format']!r} need format version "
            f"{version_for(cfg)}, got {version}"
        )
    shape = header["shape"]
    if not (isinstance(shape, list) and len(shape) == 3 and all(_is_int(v) for v in shape)):
        raise ValueError(f"header shape must be [T, H, D], got {shape!r}")
    t, nh, d = (int(v) for v in shape)
    if t < 0 or nh < 1 or not 1 <= d <= MAX_DIM:
        raise ValueError(f"header shape {shape} needs T >= 0, H >= 1, 1 <= D <= {MAX_DIM}")
    if header["dtype"] not in _NP_DTYPES:
        raise ValueError(f"header dtype must be 'f32', 'f16' or 'bf16', got {header['dtype']!r}")
    if header["scale_dtype"] not in ("f16", "f32", "log8"):
        raise ValueError(f"header scale_dtype must be 'f16', 'f32' or 'log8', got {header['scale_dtype']!r}")
    if (header["scale_dtype"] == "log8") != (cfg["scale_format"] == "log8"):
        raise ValueError(
            f"scale_dtype {header['scale_dtype']!r} does not match scale_format {cfg['scale_format']!r}"
        )
    if not isinstance(header["preconditioner"], bool):
        raise ValueError("header field 'preconditioner' must be a bool")
    nblocks = _header_int(header, "blocks_per_head")
    body = data[fixed + hlen : -4]
    parsed = Parsed(header=header, config=cfg, body=body)

    if cfg["identity"]:
        dt = _NP_DTYPES[header["dtype"]]
        expected = t * nh * d * dt.itemsize
        if len(body) != expected:
            raise ValueError(f"identity body has {len(body)} bytes, expected {expected} for shape {shape}")
        parsed.identity_data = np.frombuffer(body, dtype=dt).reshape(t, nh, d)
        return parsed

    bsz = cfg["block_size"]
    if nblocks != -(-t // bsz):
        raise ValueError(f"blocks_per_head is {nblocks}, expected ceil({t} / {bsz}) = {-(-t // bsz)}")
    if header["preconditioner"] != (cfg["metric"] == "inner_product"):
        raise ValueError("header preconditioner flag disagrees with the metric")
    sk = cfg["skeleton_dtype"]
    skb = _NP_DTYPES[sk].itemsize
    rd = _Reader(body, 0, "body")
    if header["preconditioner"]:
        ntri = d * (d + 1) // 2
        raw = rd.take(nh * ntri * skb, "pre-conditioner")
        vals = np.frombuffer(raw, dtype=_NP_DTYPES[sk]).astype(np.float32).reshape(nh, ntri)
        l_hat = np.zeros((nh, d, d), dtype=np.float32)
        tri = np.tril_indices(d)
        for h in range(nh):
            l_hat[h][tri] = vals[h]
        if not np.all(np.isfinite(l_hat)) or not np.all(np.diagonal(l_hat, axis1=1, axis2=2) > 0):
            raise ValueError("stored pre-conditioner is not finite with a positive diagonal")
        parsed.preconditioner, parsed.preconditioner_raw = l_hat, raw
    if cfg["share_basis"] and t > 0:
        parsed.shared_offsets = [int(v) for v in rd.array(nh, np.dtype("<u8"), "shared offsets")]
    flat = rd.array(nh * nblocks, np.dtype("<u8"), "block offsets")
    parsed.block_offsets = [[int(v) for v in flat[h * nblocks : (h + 1) * nblocks]] for h in range(nh)]
    tables_end = rd.pos

    def reader_at(off: int, what: str) -> _Reader:
        if not tables_end <= off <= len(body):
            raise ValueError(f"{what} offset {off} outside the records area [{tables_end}, {len(body)}]")
        return _Reader(body, off, what)

    bits = cfg["bits"]
    variance = cfg["allocation"] == "variance"
    alloc = (bits, header["scale_dtype"]) if variance else None
    for h, off in enumerate(parsed.shared_offsets):
        parsed.shared.append(
            _parse_skeleton(reader_at(off, f"skeleton record of head {h}"), d, sk, alloc, cfg["basis"])
        )

    log8 = header["scale_dtype"] == "log8"
    sc_dt = None if log8 else _NP_DTYPES[header["scale_dtype"]]
    outliers_on = cfg["outlier_threshold"] is not None
    for h in range(nh):
        row = []
        for i, off in enumerate(parsed.block_offsets[h]):
            what = f"block record (head {h}, block {i})"
            br = reader_at(off, what)
            n = min(bsz, t - i * bsz)
            skel = None if cfg["share_basis"] else _parse_skeleton(br, d, sk, alloc, cfg["basis"])
            owner = parsed.shared[h] if skel is None else skel
            r = owner.rank
            if variance:  # r codes per row, none at all when no component has bits
                widths = owner.bits
                p = r if int(np.count_nonzero(widths)) else 0
                code_bytes = -(-n * int(widths.astype(np.int64).sum()) // 8)
            else:
                p = next_pow2(r)
            if p == 0:  # rank 0 (or no bits): the record is the skeleton alone
                empty = np.zeros((n, 0), dtype=np.uint8)
                segs0 = [] if outliers_on else None
                row.append(
                    BlockRecord(h, i, n, p, skel, np.zeros(n, np.float32), empty, segs0, body[off : br.pos])
                )
                continue
            block_scale = cfg["scale_granularity"] == "block" and not variance
            scales_at = br.pos
            stored = 1 if block_scale else n
            if log8:
                (base,) = struct.unpack("<i", br.take(4, "log scale base"))
                scale_bytes, _ = _read_code_section(br, stored, 8, cfg["entropy_coding"])
                scales = log_scale_values(base, scale_bytes)
            else:
                scales = br.array(stored, sc_dt, "scales").astype(np.float32)
            scale_len = br.pos - scales_at
            scales = np.repeat(scales, n) if block_scale else scales
            if not np.all(np.isfinite(scales)) or np.any(scales < 0):
                raise ValueError(f"{what} holds negative or non-finite scales")
            if variance:
                codes = unpack_widths(br.take(code_bytes, "codes"), n, owner.bits)
            else:
                flat, code_bytes = _read_code_section(br, n * p, bits, cfg["entropy_coding"])
                codes = flat.reshape(n, p)
            segs = None
            if outliers_on:
                segs = []
                srows = segment_rows(p)
                for sidx, start in enumerate(range(0, n, srows)):
                    (cnt,) = struct.unpack("<I", br.take(4, "outlier count"))
                    pairs = br.array(cnt, _OUTLIER_DTYPE, "outliers")
                    limit = min(srows, n - start) * p
                    if cnt and int(pairs["index"].max()) >= limit:
                        raise ValueError(f"{what}: outlier index out of range in segment {sidx}")
                    if cnt and not np.all(np.isfinite(pairs["value"])):
                        raise ValueError(f"{what}: non-finite outlier value in segment {sidx}")
                    if cnt > 1 and not np.all(np.diff(pairs["index"].astype(np.int64)) > 0):
                        raise ValueError(f"{what}: outlier indices not strictly increasing in segment {sidx}")
                    if cnt and variance and np.any(owner.bits[pairs["index"].astype(np.intp) % p] == 0):
                        raise ValueError(f"{what}: outlier on a component without bits in segment {sidx}")
                    segs.append(pairs)
            row.append(
                BlockRecord(h, i, n, p, skel, scales, codes, segs, body[off : br.pos], code_bytes, scale_len)
            )
        parsed.blocks.append(row)
    return parsed


def body_sections(data: bytes) -> dict[str, bytes]:
    """The body split into named sections, independent of record order and offsets:
    ``"preconditioner"``, ``"skeleton/{h}"`` (share_basis), ``"block/{h}/{i}"`` (whole
    record), plus ``"block/{h}/{i}/skeleton|scales|codes|outliers"`` sub-sections."""
    ps = parse(data)
    out: dict[str, bytes] = {}
    if ps.identity_data is not None:
        out["identity"] = ps.body
        return out
    out["preconditioner"] = ps.preconditioner_raw
    for h, s in enumerate(ps.shared):
        out[f"skeleton/{h}"] = s.raw
    for row in ps.blocks:
        for b in row:
            key = f"block/{b.head}/{b.index}"
            out[key] = b.raw
            pos = 0
            if b.skeleton is not None:
                out[key + "/skeleton"] = b.skeleton.raw
                pos = len(b.skeleton.raw)
            ncodes = b.code_bytes if b.padded else 0
            out[key + "/scales"] = b.raw[pos : pos + b.scale_bytes]
            pos += b.scale_bytes
            out[key + "/codes"] = b.raw[pos : pos + ncodes]
            out[key + "/outliers"] = b.raw[pos + ncodes :]
    return out


# ----------------------------------------------------------------------------- decoder


def decode(data: bytes, dtype: str | None = "f32") -> np.ndarray:
    """Decode an encoding to a [T, H, D] array: f32 by default; `dtype=None` gives the
    input's dtype (float16, or uint16 bf16 bits, rounded to nearest even)."""
    ps = parse(data)
    in_dtype = ps.header["dtype"]
    if dtype not in (None, "f32", "f16", "bf16"):
        raise ValueError(f"dtype must be None, 'f32', 'f16' or 'bf16', got {dtype!r}")
    out_dtype = in_dtype if dtype is None else dtype
    if ps.identity_data is not None:
        if out_dtype == in_dtype:
            return ps.identity_data.copy()
        x32 = bf16_to_f32(ps.identity_data) if in_dtype == "bf16" else ps.identity_data.astype(np.float32)
        return _from_f32(x32, out_dtype)

    cfg = ps.config
    t, nh, d = ps.header["shape"]
    bsz, seed = cfg["block_size"], cfg["seed"]
    cents = centroid_table(cfg)
    out = np.empty((t, nh, d), dtype=np.float32)
    for h in range(nh):
        for b in ps.blocks[h]:
            skel = b.skeleton if b.skeleton is not None else ps.shared[h]
            start = b.index * bsz
            if cfg["allocation"] == "variance":
                out[start : start + b.rows, h, :] = skel.mean + _dequantize_variance(b, skel) @ skel.basis_t
                continue
            z_hat = cents[b.codes.astype(np.intp)]
            if b.outliers is not None:
                flat = z_hat.reshape(-1)
                srows = segment_rows(b.padded)
                for sidx, pairs in enumerate(b.outliers):
                    base = sidx * srows * b.padded
                    flat[base + pairs["index"].astype(np.intp)] = pairs["value"].astype(np.float32)
            y_hat = (b.scales[:, None] * z_hat).astype(np.float32)
            c = unrotate(y_hat, seed, skel.rank)
            out[start : start + b.rows, h, :] = skel.mean + c @ skel.basis_t
    if ps.preconditioner is not None:
        for h in range(nh):
            l64 = ps.preconditioner[h].astype(np.float64)
            # x̂ ← x̂ L̂⁻¹, i.e. solve L̂ᵀ yᵀ = x̂ᵀ.
            out[:, h, :] = np.linalg.solve(l64.T, out[:, h, :].astype(np.float64).T).T.astype(np.float32)
    return _from_f32(out, out_dtype)


def _dequantize_variance(b: BlockRecord, skel: SkeletonRecord) -> np.ndarray:
    """`c = (ẑ · ŝ_t) · σ̂_i` (f32) for components with bits, 0 for the others."""
    assert skel.bits is not None and skel.sigma is not None
    c = np.zeros((b.rows, skel.rank), dtype=np.float32)
    if b.padded == 0:
        return c
    z_hat = np.zeros((b.rows, skel.rank), dtype=np.float32)
    for j in np.nonzero(skel.bits)[0]:
        table = lloyd_max_gaussian(int(skel.bits[j]))[0].astype(np.float32)
        z_hat[:, j] = table[b.codes[:, j].astype(np.intp)]
    if b.outliers is not None:
        flat = z_hat.reshape(-1)
        srows = segment_rows(b.padded)
        for sidx, pairs in enumerate(b.outliers):
            flat[sidx * srows * b.padded + pairs["index"].astype(np.intp)] = pairs["value"].astype(np.float32)
    live = skel.bits > 0
    c[:, live] = (z_hat[:, live] * b.scales[:, None]).astype(np.float32) * skel.sigma[live]
    return c


def _from_f32(x32: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "f32":
        return x32
    if dtype == "f16":
        with np.errstate(over="ignore"):
            return x32.astype(np.float16)
    return f32_to_bf16(x32)


def compression_ratio(data: bytes) -> float:
    """`T·H·D·2 / len(bytes)`: the input's size at bf16 over the whole encoding."""
    t, h, d = parse(data).header["shape"]
    return t * h * d * 2 / len(data)
