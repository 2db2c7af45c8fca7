"""Per-model coefficient bases: decorrelate K and V in the metric that reaches the logits.

For each (layer, stream, kv-head) an invertible ``D × D`` map ``T`` takes a head vector to
coefficients that are uncorrelated on calibration text and ordered by decreasing variance,
measured in the metric through which the codec's error reaches the logits:

- K: ``e ↦ eᵀ Σ_q e`` (the RoPE-averaged query covariance, ``Σ_q = L Lᵀ``): ``A = Lᵀ``;
- V: ``e ↦ Σ_g ‖W_o,g e‖²`` over the query heads ``g`` that read this kv-head (their
  columns of ``o_proj``; static, no calibration): ``A = chol(M_V)ᵀ``;
- ``plain``: ``A = I``.

``T = Uᵀ A`` with ``U`` the eigenvectors of the calibration covariance of ``A x``, and
``T⁻¹ = A⁻¹ U``. After ``T`` a squared error is the metric's error, so one quantizer step for
every coefficient is the right allocation (reverse water-filling: with entropy coding, a
coefficient whose spread is below the step costs almost nothing); a random rotation would
spread the variance evenly and lose that (docs/codec.md, "Model basis").

The basis is stored once per model (``basis.safetensors`` and its ``basis.json`` sidecar,
with the calibration text it was fitted on). A codec config names it by the SHA-256 of the
tensors file (``CodecConfig.transform``), which every encoding's header then carries; its
size is a per-model constant, reported beside the per-sequence ratio, never inside it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

BASIS_FORMAT = "kakeya-model-basis"
BASIS_FORMAT_VERSION = 1
BASIS_FILE = "basis.safetensors"
METRICS = ("plain", "sigma_q", "o_proj")
DEFAULT_METRICS = {"k": "sigma_q", "v": "o_proj"}


class ModelBasisError(ValueError):
    """A basis file that is missing, malformed or made for another model."""


def codec_config(sha256: str, step: float, *, scales: str = "block") -> dict[str, Any]:
    """The codec config dict of coefficients in a basis: 8-bit mid-tread codes of one
    ``step`` (in units of the block's, or with ``scales="vector"`` each vector's, RMS), rANS
    per group of coordinates, values beyond 120 steps stored exactly (outliers)."""
    return {
        "bits": 8,
        "block_size": 4096,
        "share_basis": True,
        "basis": "none",
        "rotation": "none",
        "uniform_step": step,
        "entropy_coding": True,
        "scale_granularity": scales,
        "scale_format": "log8" if scales == "vector" else "float",
        "outlier_threshold": round(120 * step, 4),
        "transform": sha256,
    }


def o_proj_metric(o_proj_weight: np.ndarray, kv_head: int, group: int, head_dim: int) -> np.ndarray:
    """``M_V = Σ_g W_gᵀ W_g`` over the query heads ``g`` of ``kv_head``'s group (``[D, D]``)."""
    w = np.asarray(o_proj_weight, dtype=np.float64)
    m = np.zeros((head_dim, head_dim))
    for g in range(kv_head * group, (kv_head + 1) * group):
        cols = w[:, g * head_dim : (g + 1) * head_dim]
        m += cols.T @ cols
    return m


def metric_factor(m: np.ndarray, ridge: float = 1e-6) -> np.ndarray:
    """``A`` with ``Aᵀ A = M + ridge · tr(M)/D · I`` (upper triangular, from Cholesky)."""
    d = m.shape[0]
    reg = m + ridge * max(np.trace(m), 1e-30) / d * np.eye(d)
    return np.linalg.cholesky(reg).T


@dataclass
class CovarianceAccumulator:
    """Running ``Σ (x − μ_seq)(x − μ_seq)ᵀ`` per head, each sequence centred on its own mean
    (the codec subtracts each block's mean before the basis sees a vector)."""

    heads: int
    dim: int

    def __post_init__(self) -> None:
        self.gram = np.zeros((self.heads, self.dim, self.dim))
        self.count = 0

    def add(self, x: np.ndarray) -> None:
        """``x``: ``[T, H, D]`` of one sequence."""
        xc = np.asarray(x, dtype=np.float64)
        xc = xc - xc.mean(axis=0, keepdims=True)
        self.gram += np.einsum("thd,the->hde", xc, xc)
        self.count += xc.shape[0]

    def covariance(self) -> np.ndarray:
        if self.count < 2:
            raise ModelBasisError("a basis needs at least two calibration vectors per head")
        return self.gram / self.count


def fit_head(cov: np.ndarray, a: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(T, T⁻¹, variances)`` of one head: ``T = Uᵀ A``, ``U`` the eigenvectors of ``A Σ Aᵀ``
    in decreasing order of their eigenvalues (the coefficient variances)."""
    c = a @ cov @ a.T
    lam, u = np.linalg.eigh((c + c.T) / 2)
    order = np.argsort(lam)[::-1]
    lam, u = np.clip(lam[order], 0.0, None), u[:, order]
    u *= np.where(
        u[np.abs(u).argmax(axis=0), np.arange(u.shape[1])] < 0, -1.0, 1.0
    )  # sign: largest entry > 0
    t = u.T @ a
    t_inv = np.linalg.solve(a, u)
    return t, t_inv, lam


@dataclass
class ModelBasis:
    """A loaded basis: ``T``, ``T⁻¹`` (float32 ``[H, D, D]``) and variances per (layer, stream)."""

    path: Path
    sha256: str
    record: dict[str, Any]
    forward: dict[tuple[int, str], np.ndarray]
    inverse: dict[tuple[int, str], np.ndarray]
    variance: dict[tuple[int, str], np.ndarray]
    _torch: dict[tuple[int, str], Any] = field(default_factory=dict, repr=False)

    @property
    def nbytes(self) -> int:
        """Size of the tensors file: the per-model constant beside the per-sequence ratio."""
        return self.path.stat().st_size

    def torch_pair(self, layer: int, stream: str):
        """``(T, T⁻¹)`` as float32 torch tensors, cached."""
        import torch

        key = (layer, stream)
        if key not in self._torch:
            if key not in self.forward:
                raise ModelBasisError(f"{self.path} has no basis for layer {layer} stream {stream!r}")
            self._torch[key] = (torch.from_numpy(self.forward[key]), torch.from_numpy(self.inverse[key]))
        return self._torch[key]

    def apply(self, layer: int, stream: str, x):
        """Coefficients ``y = T x`` of ``x [T, H, D]`` (float32 torch)."""
        import torch

        t, _ = self.torch_pair(layer, stream)
        if tuple(x.shape[-2:]) != tuple(t.shape[:2]):
            raise ModelBasisError(
                f"{self.path}: the basis is for {t.shape[0]} kv-heads of {t.shape[1]}, the model's K/V are "
                f"{tuple(x.shape[-2:])}: fit one for this model with `kakeya calibrate basis`"
            )
        return torch.einsum("thd,hed->the", x.float(), t).contiguous()

    def invert(self, layer: int, stream: str, y):
        """``x = T⁻¹ y`` of coefficients ``y [T, H, D]``."""
        import torch

        _, t_inv = self.torch_pair(layer, stream)
        return torch.einsum("the,hde->thd", y.float(), t_inv).contiguous()


def save_basis(
    out: str | Path,
    fits: dict[tuple[int, str], tuple[np.ndarray, np.ndarray, np.ndarray]],
    *,
    model: dict[str, Any],
    text: dict[str, Any],
    metrics: dict[str, str],
    command: str,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``out/basis.safetensors`` and ``out/basis.json``; returns the tensors path."""
    from safetensors.numpy import save_file

    from .core import _sha256_file, kakeya_version

    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for (layer, stream), (t, t_inv, lam) in sorted(fits.items()):
        tensors[f"layers.{layer}.{stream}.T"] = np.ascontiguousarray(t, dtype=np.float32)
        tensors[f"layers.{layer}.{stream}.T_inv"] = np.ascontiguousarray(t_inv, dtype=np.float32)
        tensors[f"layers.{layer}.{stream}.variance"] = np.ascontiguousarray(lam, dtype=np.float32)
    path = folder / BASIS_FILE
    save_file(tensors, str(path))
    record = {
        "format": BASIS_FORMAT,
        "format_version": BASIS_FORMAT_VERSION,
        "kakeya_version": kakeya_version(),
        "command": command,
        "model": model,
        "text": text,
        "metrics": metrics,
        "streams": sorted({s for _, s in fits}),
        "layers": sorted({layer for layer, _ in fits}),
        "safetensors_sha256": _sha256_file(path),
        "bytes": path.stat().st_size,
        **(extra or {}),
    }
    path.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
    return path


def read_basis_sidecar(path: str | Path) -> tuple[Path, dict[str, Any], str]:
    """``(tensors file, sidecar record, its SHA-256)`` of a basis (the file or its folder),
    without loading the tensors."""
    from .core import read_sidecar

    return read_sidecar(
        path,
        BASIS_FILE,
        ModelBasisError,
        "model basis",
        "the model and the text",
        " (make one with `kakeya calibrate basis`)",
    )


def load_basis(
    path: str | Path, *, num_kv_heads: int | None = None, head_dim: int | None = None
) -> ModelBasis:
    """Load and check a basis (the safetensors file or its folder) with its sidecar."""
    from safetensors.numpy import load_file

    p, record, digest = read_basis_sidecar(path)
    side = p.with_suffix(".json")
    if record.get("format") != BASIS_FORMAT or record.get("format_version") != BASIS_FORMAT_VERSION:
        raise ModelBasisError(
            f"{side}: format {record.get('format')!r} v{record.get('format_version')}, "
            f"expected {BASIS_FORMAT!r} v{BASIS_FORMAT_VERSION}"
        )
    if record.get("safetensors_sha256") != digest:
        raise ModelBasisError(f"{p}: SHA-256 {digest[:16]}… does not match the one in {side.name}")
    tensors = load_file(str(p))
    fwd, inv, var = {}, {}, {}
    for name, arr in tensors.items():
        parts = name.split(".")
        if (
            len(parts) != 4
            or parts[0] != "layers"
            or parts[2] not in ("k", "v")
            or parts[3] not in ("T", "T_inv", "variance")
        ):
            raise ModelBasisError(f"{p}: unexpected tensor {name!r}")
        key = (int(parts[1]), parts[2])
        {"T": fwd, "T_inv": inv, "variance": var}[parts[3]][key] = arr
    for key, t in fwd.items():
        h, d, d2 = t.shape
        if d != d2 or key not in inv or inv[key].shape != t.shape:
            raise ModelBasisError(f"{p}: layer {key[0]} stream {key[1]}: T and T_inv must be [H, D, D]")
        if (num_kv_heads is not None and h != num_kv_heads) or (head_dim is not None and d != head_dim):
            raise ModelBasisError(
                f"{p}: basis of layer {key[0]} is [{h}, {d}, {d}], the model has "
                f"{num_kv_heads} kv-heads of {head_dim}"
            )
        err = np.abs(t.astype(np.float64) @ inv[key].astype(np.float64) - np.eye(d)).max()
        if not np.isfinite(err) or err > 1e-2:
            raise ModelBasisError(
                f"{p}: layer {key[0]} stream {key[1]}: T · T_inv differs from I by {err:.2e}"
            )
    return ModelBasis(p, digest, record, fwd, inv, var)


def fit_basis(
    model,
    info,
    sequences: Sequence[Sequence[int]],
    *,
    streams: Iterable[str] = ("k", "v"),
    metrics: dict[str, str] | None = None,
    sigma_q=None,
    sink_tokens: int = 1,
    progress: bool = True,
) -> dict[tuple[int, str], tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Fit ``(T, T⁻¹, variances)`` per (layer, stream) on ``sequences`` (calibration text).

    ``sigma_q``: a :class:`~kakeya_py.calibration.core.SigmaQArtifact` (K metric ``sigma_q``).
    The first ``sink_tokens`` positions of each sequence are left out, as the codec never sees them.
    """
    from .core import collect_kv

    metrics = {**DEFAULT_METRICS, **(metrics or {})}
    streams = tuple(streams)
    for s in streams:
        if metrics[s] not in METRICS:
            raise ModelBasisError(f"metric of {s} must be one of {METRICS}, got {metrics[s]!r}")
    if metrics.get("k") == "sigma_q" and "k" in streams and sigma_q is None:
        raise ModelBasisError("K metric 'sigma_q' needs a Σ_q artifact (--sigma-q)")
    if metrics.get("v") == "o_proj" and "v" in streams and not hasattr(model, "model"):
        raise ModelBasisError("V metric 'o_proj' needs a decoder model with model.layers[i].self_attn.o_proj")
    layers = range(info.num_layers)
    acc = {
        (layer, s): CovarianceAccumulator(info.num_kv_heads, info.head_dim)
        for layer in layers
        for s in streams
    }
    it = collect_kv(model, sequences, layers, streams)
    if progress:
        from tqdm import tqdm

        it = tqdm(it, total=len(sequences), desc="basis: K/V of calibration text", unit="seq")
    for got in it:
        for key, x in got.items():
            acc[(key[1], key[0])].add(x[sink_tokens:])
    group = info.num_q_heads // info.num_kv_heads
    fits = {}
    for (layer, s), a in acc.items():
        cov = a.covariance()
        t = np.empty_like(cov)
        t_inv = np.empty_like(cov)
        lam = np.empty(cov.shape[:2])
        w_o = None
        if metrics[s] == "o_proj":
            w_o = model.model.layers[layer].self_attn.o_proj.weight.detach().float().cpu().numpy()
        for h in range(info.num_kv_heads):
            if metrics[s] == "sigma_q":
                fac = sigma_q.L[layer][h].astype(np.float64).T
            elif metrics[s] == "o_proj":
                fac = metric_factor(o_proj_metric(w_o, h, group, info.head_dim))
            else:
                fac = np.eye(info.head_dim)
            fac = fac / np.sqrt(np.mean(np.diag(fac @ fac.T)))  # scale-free: the codec's step is relative
            t[h], t_inv[h], lam[h] = fit_head(cov[h], fac)
        fits[(layer, s)] = (t, t_inv, lam)
    return fits
