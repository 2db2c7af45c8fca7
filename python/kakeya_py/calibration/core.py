"""Offline calibration (issue 5): Σ_q pre-conditioning factors and Lloyd–Max centroids.

Both calibrations read only the **calibration part** of the corpus (WikiText-2 articles
``i % 4 == 3``, :mod:`kakeya_py.eval.corpus`) and record the articles they used, so the
harness can refuse evaluation text that overlaps them.

Σ_q (``kakeya calibrate sigma-q``)
    Pre-RoPE queries (the output of ``q_norm`` where the model has one, else of
    ``q_proj``) are captured on every layer. Query head ``j`` attends with kv-head
    ``j // n_rep`` (``n_rep = q_heads / kv_heads``, as ``repeat_kv`` does), so the
    queries of each GQA group are pooled into one Gram matrix per (layer, kv-head),
    accumulated in float64: ``G = Σ qᵀq`` over tokens and the group's query heads.
    ``Σ_q = G / n`` is normalised to a mean eigenvalue of 1 (``trace / D``; the factor
    is recorded), a ridge ``ρ·I`` is added, and if the condition number still exceeds
    ``max_cond`` a further ``δ·I`` with ``(λ_max + δ) / (λ_min + δ) = max_cond``. Then
    ``L = chol(Σ_q)`` (lower), so that ``L Lᵀ = Σ_q``.

    Why lower and why ``L`` (not ``L⁻ᵀ``): the codec multiplies row vectors,
    ``k̃ = k L``, and spends its error in that space, ``‖(k̂ − k) L‖² =
    (k̂ − k) L Lᵀ (k̂ − k)ᵀ = (k̂ − k) Σ_q (k̂ − k)ᵀ = E_q[(q · (k̂ − k))²]`` with
    ``Σ_q = E[qᵀq]``: exactly the mean squared error of the attention logits (up to the
    normalisation). Scores are preserved, ``q · k = (q L⁻ᵀ) · (k L)``.

    Files: ``sigma_q.safetensors`` with ``layers.{i}.L`` and ``layers.{i}.L_inv``
    (``[kv_heads, D, D]`` float32, the format :func:`kakeya_py.policy.load_sigma_q`
    reads) and ``sigma_q.json`` (``"text"``: the calibration text usage record;
    per-head diagnostics; model identity; kakeya version; command).

    Caveat: the queries are taken before RoPE, as the codec sees K. The score error of
    a key at relative distance ``δ`` is weighted by ``R_δᵀ Σ_q R_δ`` rather than
    ``Σ_q``; for the fast-rotating frequency pairs this averages away the off-diagonal
    structure of ``Σ_q``. The ablation in ``reports/calibration`` measures what the
    pre-RoPE Σ_q buys as it is.

Centroids (``kakeya calibrate centroids``)
    K (pre-RoPE, whitened by ``L̂`` when a Σ_q is given) and V are captured on calibration
    sequences of ``seq_len`` tokens; each (layer, stream) tensor goes through the codec's
    stages up to the quantizer exactly as ``docs/codec.md`` specifies (mean, exact PCA,
    rank rule, sign rule, skeleton rounding, randomized Hadamard rotation, per-vector
    scale; :func:`pre_quantization`). Lloyd–Max tables are fitted on the resulting ``z``
    samples per stream and bit width (pooled over layers, optionally per layer); with an
    outlier threshold ``T`` only ``|z| ≤ T`` is fitted (larger values are stored exactly).
    The MSE in ``z`` against the Gaussian table is measured on held-out sequences, and
    the real codec's relative error ``‖x̂ − x‖² / ‖x‖²`` too.

    Files: ``{stream}_{bits}bit.f32`` (``2^bits`` little-endian f32, ascending), with
    ``--per-layer`` also ``{stream}_{bits}bit_per_layer.f32`` (``[num_layers, 2^bits]``;
    rows of layers that were not fitted repeat the pooled table), and ``centroids.json``.

Using the results
    ``CodecConfig(bits=3, centroids=load_centroids(DIR).table("k", 3))``, or a policy
    written by :func:`calibrated_policy` / ``kakeya calibrate policy`` (the tables are
    inlined as ``"centroids"`` in the stream configs and, per layer, in ``overrides``;
    ``sigma_q`` and ``metric="inner_product"`` are set for K when a Σ_q is given).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shlex
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..cli.harness import _finite

SIGMA_Q_FILE = "sigma_q.safetensors"
SIGMA_Q_JSON = "sigma_q.json"
SIGMA_Q_FORMAT = "kakeya-sigma-q"
CENTROIDS_JSON = "centroids.json"
CENTROIDS_FORMAT = "kakeya-centroids"
FORMAT_VERSION = 1

DEFAULT_RIDGE = 1e-3
DEFAULT_MAX_COND = 1e4
F16_SCALE_MIN = 2.0**-14
F16_SCALE_MAX = 65504.0
_GOLDEN = 0x9E3779B97F4A7C15
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB
_DOMAIN_MUL = 0xD1B54A32D192ED03
_A_MUL = 0x8CB92BA72F3D8DD7
_U64 = (1 << 64) - 1

#: Model fields that must agree between an artifact and the model it is used with.
IDENTITY_FIELDS = ("architecture", "num_layers", "num_q_heads", "num_kv_heads", "head_dim")


class CalibrationError(ValueError):
    """A calibration artifact is missing, malformed, or does not fit the model or codec."""


# -- small helpers -----------------------------------------------------------------------
def kakeya_version() -> str:
    import kakeya_py

    return kakeya_py.__version__


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _sha256_file(path: Path) -> str:
    return _sha256_bytes(path.read_bytes())


def read_sidecar(
    path: str | os.PathLike, default_file: str, error: type[Exception], what: str, records: str, hint: str = ""
) -> tuple[Path, dict[str, Any], str]:
    """``(tensors file, sidecar record, its SHA-256)`` of a calibration artifact (``what``): the
    file (or ``default_file`` in the folder ``path``) and the JSON beside it, which holds
    ``records``; ``hint`` ends the message for a missing file. Raises ``error``."""
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / default_file
    if not p.is_file():
        raise error(f"{what} {p} not found{hint}")
    side = p.with_suffix(".json")
    if not side.is_file():
        raise error(f"{p}: sidecar {side.name} not found (it records {records})")
    try:
        record = json.loads(side.read_text())
    except json.JSONDecodeError as exc:
        raise error(f"{side}: not valid JSON ({exc})") from exc
    return p, record, _sha256_file(p)


def _model_dict(info: Any) -> dict[str, Any]:
    return info.to_dict() if hasattr(info, "to_dict") else dict(info)


def check_model_identity(recorded: Mapping[str, Any], info: Any, what: str) -> None:
    """Refuse an artifact fitted on another model (shape fields, then the weights' hash)."""
    cur = _model_dict(info)
    for key in IDENTITY_FIELDS:
        if key in recorded and key in cur and recorded[key] != cur[key]:
            raise CalibrationError(
                f"{what} was fitted on a model with {key}={recorded[key]!r}, "
                f"but the model in use has {key}={cur[key]!r}"
            )
    a, b = recorded.get("source_sha256"), cur.get("source_sha256")
    if a and b and a != b:
        raise CalibrationError(
            f"{what} was fitted on weights with SHA-256 {a[:16]}…, the model in use has {b[:16]}… "
            f"({recorded.get('name')!r} vs {cur.get('name')!r})"
        )
    if not (a and b) and recorded.get("name") and cur.get("name") and recorded["name"] != cur["name"]:
        raise CalibrationError(
            f"{what} was fitted on model {recorded['name']!r}, the model in use is {cur['name']!r}"
        )


def check_version(meta: Mapping[str, Any], fmt: str, what: str, *, strict_version: bool = True) -> None:
    """Artifact format and version: the format version must match; the kakeya major.minor too."""
    if meta.get("format") != fmt:
        raise CalibrationError(f"{what}: format is {meta.get('format')!r}, expected {fmt!r}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CalibrationError(
            f"{what}: format_version {meta.get('format_version')!r} is not supported (expected {FORMAT_VERSION})"
        )
    made = str(meta.get("kakeya_version", ""))
    if strict_version and made.split(".")[:2] != kakeya_version().split(".")[:2]:
        raise CalibrationError(
            f"{what} was written by kakeya {made or '(unknown)'}, this is kakeya {kakeya_version()}; "
            "recalibrate (or pass strict_version=False)"
        )


def check_text_disjoint(
    artifact_text: Mapping[str, Any] | None, evaluation_usage: Mapping[str, Any], what: str
):
    """Raise unless the artifact records its calibration text and it is disjoint from ``evaluation_usage``."""
    from ..eval.corpus import CorpusError, check_disjoint

    if artifact_text is None:
        raise CorpusError(
            f"{what}: no calibration text recorded; cannot prove it is disjoint from the evaluation text"
        )
    check_disjoint(artifact_text, evaluation_usage)


# -- calibration text --------------------------------------------------------------------
@dataclass(frozen=True)
class CalibrationText:
    """Calibration sequences and the usage record of the articles they came from."""

    sequences: list[list[int]]
    usage: dict[str, Any]
    tokens: int
    seq_len: int


def calibration_text(corpus, tokenizer, *, tokens: int, seq_len: int) -> CalibrationText:
    """``tokens // seq_len`` sequences of ``seq_len`` tokens spread over the calibration part.

    The calibration articles are tokenized one by one and concatenated
    (:func:`kakeya_py.eval.corpus.calibration_tokens`); of its ``M`` disjoint windows of
    ``seq_len`` tokens, sequence ``j`` of ``n`` is window ``floor(j·M/n)`` (as evaluation
    passages are cut), so the sample covers every article, not just the first ones. Only
    the calibration part is ever read; a corpus without one (``--text-file``) is refused.
    """
    from ..eval.corpus import CorpusError, calibration_tokens

    if seq_len < 2 or tokens < seq_len:
        raise CalibrationError(f"need tokens >= seq_len >= 2, got tokens={tokens}, seq_len={seq_len}")
    stream = calibration_tokens(corpus, tokenizer)
    available = len(stream.ids) // seq_len
    n = min(tokens // seq_len, available)
    if n == 0:
        raise CorpusError(f"calibration part has {len(stream.ids)} tokens, fewer than seq_len={seq_len}")
    windows = [(j * available) // n for j in range(n)]
    seqs = [list(stream.ids[w * seq_len : (w + 1) * seq_len]) for w in windows]
    arts = sorted(
        {
            stream.articles[k].index
            for w in windows
            for k in stream.article_range(w * seq_len, (w + 1) * seq_len)
        }
    )
    split = corpus.split()
    bad = sorted(set(arts) - set(split.calibration))
    if bad:  # cannot happen through calibration_tokens; kept as the rule's guard
        raise CorpusError(f"articles {bad} are not calibration text")
    return CalibrationText(seqs, split.usage("calibration", arts), n * seq_len, seq_len)


# -- Σ_q ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class QuerySite:
    layer: int
    source: Any  # q_norm or q_proj module
    num_q_heads: int
    num_kv_heads: int
    head_dim: int


def query_sites(model) -> list[QuerySite]:
    """Where each attention layer's pre-RoPE queries come out (``q_norm`` if any, else ``q_proj``)."""
    from ..eval.hooks import HookError, find_attention_sites

    out = []
    for site in find_attention_sites(model):
        attn = site.attn
        if not hasattr(attn, "q_proj"):
            raise HookError(f"layer {site.layer}: attention has no q_proj")
        q_out = attn.q_proj.out_features
        if q_out % site.head_dim:
            raise HookError(
                f"layer {site.layer}: q_proj has {q_out} outputs, not a multiple of {site.head_dim}"
            )
        nq = q_out // site.head_dim
        if nq % site.num_kv_heads:
            raise HookError(
                f"layer {site.layer}: {nq} query heads do not split into {site.num_kv_heads} groups"
            )
        src = getattr(attn, "q_norm", None)
        if src is None or not callable(src):
            src = attn.q_proj
        out.append(QuerySite(site.layer, src, nq, site.num_kv_heads, site.head_dim))
    return out


def pool_gram(q, num_kv_heads: int) -> np.ndarray:
    """Gram matrices ``[kv_heads, D, D]`` (float64) of queries ``[..., q_heads, D]`` pooled per GQA group.

    Query head ``j`` belongs to kv-head ``j // (q_heads / kv_heads)`` (``repeat_kv``).
    """
    import torch

    x = q.detach().to(torch.float64)
    nq, d = x.shape[-2], x.shape[-1]
    if nq % num_kv_heads:
        raise CalibrationError(f"{nq} query heads do not split into {num_kv_heads} kv groups")
    x = x.reshape(-1, num_kv_heads, nq // num_kv_heads, d)
    return torch.einsum("tgrd,tgre->gde", x, x).cpu().numpy()


class QueryGramCollector:
    """Context manager accumulating pooled float64 Gram matrices of pre-RoPE queries per layer."""

    def __init__(self, model):
        self.sites = query_sites(model)
        self.gram = {s.layer: np.zeros((s.num_kv_heads, s.head_dim, s.head_dim)) for s in self.sites}
        self.rows = {s.layer: 0 for s in self.sites}  # query vectors per kv-head (tokens x n_rep)
        self._handles: list[Any] = []

    def __enter__(self) -> QueryGramCollector:
        for s in self.sites:
            self._handles.append(s.source.register_forward_hook(self._hook(s)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _hook(self, s: QuerySite):
        def hook(_module, _inputs, output):
            q = output.reshape(*output.shape[:2], s.num_q_heads, s.head_dim)
            self.gram[s.layer] += pool_gram(q, s.num_kv_heads)
            self.rows[s.layer] += q.shape[0] * q.shape[1] * (s.num_q_heads // s.num_kv_heads)

        return hook


@dataclass
class SigmaQFit:
    """``L``, ``L⁻¹`` (``[kv_heads, D, D]`` float64) and per-head diagnostics of one layer."""

    L: np.ndarray
    L_inv: np.ndarray
    heads: list[dict[str, Any]]


def _cond(eig: np.ndarray) -> float:
    lo, hi = float(eig.min()), float(eig.max())
    return math.inf if lo <= 0 else hi / lo


def fit_sigma_q(
    gram: np.ndarray,
    rows: int,
    *,
    ridge: float = DEFAULT_RIDGE,
    max_cond: float = DEFAULT_MAX_COND,
    rope: tuple[np.ndarray, int] | None = None,
) -> SigmaQFit:
    """Cholesky factors of the normalised, regularised query covariance (see the module doc).

    Args:
        gram: ``[kv_heads, D, D]`` float64 sums ``Σ qᵀq``.
        rows: number of query vectors summed per kv-head.
        ridge: ``ρ`` added to the diagonal after normalising to mean eigenvalue 1.
        max_cond: cap on the condition number (a further ridge is added to reach it).
        rope: ``(inv_freq, window)``: replace the normalised Σ_q by its RoPE average
            (:func:`rope_average`) before the ridge; ``None`` keeps the pre-RoPE Σ_q.
    """
    gram = np.asarray(gram, dtype=np.float64)
    if gram.ndim != 3 or gram.shape[1] != gram.shape[2]:
        raise CalibrationError(f"gram must have shape [H, D, D], got {gram.shape}")
    if rows < 1:
        raise CalibrationError("no query vectors were captured")
    if not ridge >= 0 or not max_cond > 1:
        raise CalibrationError(f"need ridge >= 0 and max_cond > 1, got {ridge}, {max_cond}")
    h, d, _ = gram.shape
    eye = np.eye(d)
    ls, linvs, heads = [], [], []
    for g in range(h):
        sigma = gram[g] / rows
        sigma = (sigma + sigma.T) / 2
        scale = float(np.trace(sigma)) / d
        if not scale > 0 or not math.isfinite(scale):
            raise CalibrationError(f"kv-head {g}: query covariance has trace {scale * d} (all-zero queries?)")
        sigma = sigma / scale
        if rope is not None:
            sigma = rope_average(sigma, rope[0], rope[1])
        eig0 = np.linalg.eigvalsh(sigma)
        sigma = sigma + ridge * eye
        eig1 = eig0 + ridge
        extra = 0.0
        if _cond(eig1) > max_cond:
            extra = max(0.0, float((eig1.max() - max_cond * eig1.min()) / (max_cond - 1)))
            sigma = sigma + extra * eye
        eig2 = np.linalg.eigvalsh(sigma)
        try:
            lower = np.linalg.cholesky(sigma)
        except np.linalg.LinAlgError as exc:
            raise CalibrationError(f"kv-head {g}: Σ_q is not positive definite after regularisation") from exc
        inv = np.linalg.solve(lower, eye)
        ls.append(lower)
        linvs.append(np.tril(inv))
        heads.append(
            {
                "kv_head": g,
                "normaliser_trace_over_d": scale,
                "eig_min_before": float(eig0.min()),
                "eig_max_before": float(eig0.max()),
                "cond_before": _cond(eig0),
                "ridge": ridge,
                "ridge_cond_cap": extra,
                "ridge_applied": ridge + extra,
                "cond_after": _cond(eig2),
                "cond_cap_hit": bool(extra > 0),
            }
        )
    return SigmaQFit(np.stack(ls), np.stack(linvs), heads)


def rope_matrix(inv_freq: np.ndarray, delta: float) -> np.ndarray:
    """``M(δ)`` with ``rope(q, m) = q · M(m)`` for row vectors (rotate-half layout: dim ``i``
    pairs with ``i + D/2`` at frequency ``inv_freq[i]``); ``M(m) M(n)ᵀ = M(m − n)``."""
    f = np.asarray(inv_freq, dtype=np.float64)
    half = f.size
    c, s = np.cos(delta * f), np.sin(delta * f)
    m = np.zeros((2 * half, 2 * half))
    i = np.arange(half)
    m[i, i] = c
    m[i + half, i + half] = c
    m[i, i + half] = s
    m[i + half, i] = -s
    return m


def rope_average(sigma: np.ndarray, inv_freq: np.ndarray, window: int) -> np.ndarray:
    """``mean_{δ < window} M(δ)ᵀ Σ M(δ)``: the logit-error metric of a key ``δ`` positions back.

    After RoPE the score is ``q M(δ) kᵀ``, so the error ``e`` of a pre-RoPE key costs
    ``E[(q M(δ) eᵀ)²] = e M(δ)ᵀ Σ_q M(δ) eᵀ``; averaging over distances ``0 … window−1``
    (uniformly) gives the metric the codec should whiten by.
    """
    sigma = np.asarray(sigma, dtype=np.float64)
    if window < 1:
        raise CalibrationError(f"rope window must be >= 1, got {window}")
    if sigma.shape[-1] != 2 * np.asarray(inv_freq).size:
        raise CalibrationError(
            f"Σ_q of dim {sigma.shape[-1]} does not match {np.asarray(inv_freq).size} RoPE pairs"
        )
    acc = np.zeros_like(sigma)
    for delta in range(window):
        m = rope_matrix(inv_freq, delta)
        acc += (
            np.swapaxes(m, -1, -2) @ sigma @ m
            if sigma.ndim == 2
            else np.einsum("ji,hjk,kl->hil", m, sigma, m)
        )
    return acc / window


def model_inv_freq(model) -> np.ndarray:
    """RoPE inverse frequencies of a transformers model (its ``rotary_emb.inv_freq``)."""
    base = getattr(model, "model", model)
    rot = getattr(base, "rotary_emb", None)
    if rot is None or not hasattr(rot, "inv_freq"):
        raise CalibrationError(f"{type(model).__name__} has no rotary_emb.inv_freq; cannot RoPE-average Σ_q")
    if getattr(rot, "rope_type", "default") != "default":
        raise CalibrationError(
            f"RoPE type {rot.rope_type!r} is not supported by rope averaging (default only)"
        )
    return rot.inv_freq.detach().double().cpu().numpy()


def whiten(x: np.ndarray, lower: np.ndarray) -> np.ndarray:
    """``X̃ = X · L`` per head for ``x [T, H, D]`` and ``lower [H, D, D]`` (float64 math)."""
    return np.einsum("thd,hde->the", np.asarray(x, np.float64), np.asarray(lower, np.float64))


def run_sigma_q(
    model,
    info,
    text: CalibrationText,
    *,
    ridge: float = DEFAULT_RIDGE,
    max_cond: float = DEFAULT_MAX_COND,
    rope: tuple[np.ndarray, int] | None = None,
    progress: bool = False,
) -> tuple[dict[int, SigmaQFit], dict[int, int]]:
    """Capture queries on ``text`` and fit one :class:`SigmaQFit` per layer."""
    import torch
    from tqdm.auto import tqdm

    base = getattr(model, "model", model)
    with QueryGramCollector(model) as qc, torch.no_grad():
        for seq in tqdm(text.sequences, desc="Σ_q: queries", disable=not progress):
            base(input_ids=torch.tensor([seq]), use_cache=False)
    return fit_collected(qc, ridge=ridge, max_cond=max_cond, rope=rope)


def fit_collected(
    qc: QueryGramCollector,
    *,
    ridge: float = DEFAULT_RIDGE,
    max_cond: float = DEFAULT_MAX_COND,
    rope: tuple[np.ndarray, int] | None = None,
) -> tuple[dict[int, SigmaQFit], dict[int, int]]:
    """Fit the Gram matrices a :class:`QueryGramCollector` accumulated."""
    fits = {
        layer: fit_sigma_q(qc.gram[layer], qc.rows[layer], ridge=ridge, max_cond=max_cond, rope=rope)
        for layer in qc.gram
    }
    return fits, dict(qc.rows)


def save_sigma_q(
    out_dir: str | os.PathLike,
    fits: Mapping[int, SigmaQFit],
    rows: Mapping[int, int],
    *,
    info,
    text: CalibrationText,
    command: str,
    ridge: float,
    max_cond: float,
    rope_window: int | None = None,
    derived_from: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``sigma_q.safetensors`` (``layers.{i}.L``, ``layers.{i}.L_inv``) and ``sigma_q.json``."""
    from safetensors.numpy import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for layer, fit in sorted(fits.items()):
        tensors[f"layers.{layer}.L"] = np.ascontiguousarray(fit.L, dtype=np.float32)
        tensors[f"layers.{layer}.L_inv"] = np.ascontiguousarray(fit.L_inv, dtype=np.float32)
    model = _model_dict(info)
    meta = {
        "format": SIGMA_Q_FORMAT,
        "format_version": str(FORMAT_VERSION),
        "kakeya_version": kakeya_version(),
        "model": model["name"],
        "source_sha256": str(model.get("source_sha256") or ""),
    }
    path = out / SIGMA_Q_FILE
    save_file(tensors, str(path), metadata=meta)
    record = {
        "format": SIGMA_Q_FORMAT,
        "format_version": FORMAT_VERSION,
        "kakeya_version": kakeya_version(),
        "command": command,
        "model": model,
        "text": text.usage,
        "tokens": text.tokens,
        "seq_len": text.seq_len,
        "sequences": len(text.sequences),
        "query_source": "q_norm output if present, else q_proj output (pre-RoPE)",
        "pooling": "query head j -> kv-head j // (q_heads / kv_heads); Gram summed over the group",
        "normalisation": "Σ_q = Σ qᵀq / n, divided by trace/D (mean eigenvalue 1)",
        "ridge": ridge,
        "max_cond": max_cond,
        "rope_average": None
        if not rope_window
        else {
            "window": rope_window,
            "rule": "Σ_q replaced by mean over δ = 0..window-1 of M(δ)ᵀ Σ_q M(δ) (M: RoPE rotation) before the ridge",
        },
        "derived_from": None if derived_from is None else dict(derived_from),
        "factor": "L = chol(Σ_q), lower, L Lᵀ = Σ_q; codec: k̃ = k·L; layers.{i}.L_inv = L⁻¹",
        "safetensors_sha256": _sha256_file(path),
        "layers": [
            {"layer": layer, "query_vectors_per_kv_head": int(rows[layer]), "heads": fit.heads}
            for layer, fit in sorted(fits.items())
        ],
    }
    (out / SIGMA_Q_JSON).write_text(json.dumps(_finite(record), indent=1) + "\n")
    return path


def derive_rope_averaged(
    src: SigmaQArtifact,
    inv_freq: np.ndarray,
    window: int,
    *,
    ridge: float | None = None,
    max_cond: float | None = None,
) -> tuple[dict[int, SigmaQFit], dict[int, int]]:
    """RoPE-averaged fits from a pre-RoPE artifact, without capturing queries again.

    The normalised Σ_q of each head is recovered as ``L Lᵀ − ridge_applied·I`` (float32 ``L``),
    scaled back by its recorded normaliser, averaged (:func:`rope_average`) and refitted
    with the same (or the given) ridge and condition cap.
    """
    if src.record.get("rope_average"):
        raise CalibrationError(f"{src.path} is already RoPE-averaged")
    ridge = src.record["ridge"] if ridge is None else ridge
    max_cond = src.record["max_cond"] if max_cond is None else max_cond
    fits, rows = {}, {}
    for layer_rec in src.record["layers"]:
        layer = layer_rec["layer"]
        lower = src.L[layer].astype(np.float64)
        grams = []
        for h, head in enumerate(layer_rec["heads"]):
            sig = lower[h] @ lower[h].T - head["ridge_applied"] * np.eye(lower.shape[-1])
            grams.append(sig * head["normaliser_trace_over_d"])
        fits[layer] = fit_sigma_q(np.stack(grams), 1, ridge=ridge, max_cond=max_cond, rope=(inv_freq, window))
        rows[layer] = layer_rec["query_vectors_per_kv_head"]
    return fits, rows


@dataclass
class SigmaQArtifact:
    """A validated Σ_q artifact: float32 ``L`` and ``L⁻¹`` per layer and its JSON record."""

    path: Path
    L: dict[int, np.ndarray]
    L_inv: dict[int, np.ndarray]
    record: dict[str, Any]

    @property
    def text(self) -> dict[str, Any]:
        return self.record["text"]

    def factors(self) -> dict[int, Any]:
        """``{layer: torch.float32 [H, D, D]}``, as :class:`kakeya_py.policy.PolicyCodec` uses them."""
        import torch

        return {layer: torch.from_numpy(m.copy()) for layer, m in self.L.items()}

    def __repr__(self) -> str:
        any_l = next(iter(self.L.values()))
        return f"SigmaQArtifact(path='{self.path}', layers={len(self.L)}, shape={tuple(any_l.shape)})"


def load_sigma_q_artifact(
    path: str | os.PathLike,
    info: Any | None = None,
    *,
    strict_version: bool = True,
    tolerance: float = 1e-3,
) -> SigmaQArtifact:
    """Load and validate ``sigma_q.safetensors`` (or its folder) with its ``sigma_q.json``.

    Checks: both files exist; format, format version and kakeya version; the hash of the
    tensors file; model identity against ``info`` (a :class:`~kakeya_py.models.ModelInfo`
    or dict); one ``L`` and ``L_inv`` per layer of shape ``[kv_heads, D, D]``; ``L`` finite,
    lower triangular with a positive diagonal; ``L · L_inv ≈ I``; a recorded calibration text.
    """
    from safetensors.numpy import load_file

    p, record, digest = read_sidecar(
        path, SIGMA_Q_FILE, CalibrationError, "Σ_q file", "the calibration text and model"
    )
    check_version(record, SIGMA_Q_FORMAT, str(p), strict_version=strict_version)
    side = p.with_suffix(".json")
    for key in ("text", "model"):
        if not record.get(key):
            raise CalibrationError(f"{side}: missing {key!r}")
    if record.get("safetensors_sha256") not in (None, digest):
        raise CalibrationError(f"{p}: SHA-256 {digest[:16]}… does not match the one in {side.name}")
    model = record["model"]
    if info is not None:
        check_model_identity(model, info, str(p))
        model = {**model, **{k: _model_dict(info)[k] for k in IDENTITY_FIELDS}}
    n_layers, h, d = model["num_layers"], model["num_kv_heads"], model["head_dim"]
    tensors = load_file(str(p))
    lower, inv = {}, {}
    for layer in range(n_layers):
        for name, store in (("L", lower), ("L_inv", inv)):
            key = f"layers.{layer}.{name}"
            if key not in tensors:
                raise CalibrationError(
                    f"{p} has no tensor {key!r} (expected L and L_inv for {n_layers} layers)"
                )
            t = tensors[key]
            if t.shape != (h, d, d) or t.dtype != np.float32:
                raise CalibrationError(f"{p}: {key} is {t.dtype} {t.shape}, expected float32 {(h, d, d)}")
            if not np.all(np.isfinite(t)):
                raise CalibrationError(f"{p}: {key} has non-finite values")
            store[layer] = t
        m = lower[layer]
        if np.any(np.triu(m, 1) != 0):
            raise CalibrationError(f"{p}: layers.{layer}.L is not lower triangular")
        if not np.all(np.diagonal(m, axis1=1, axis2=2) > 0):
            raise CalibrationError(f"{p}: layers.{layer}.L needs a positive diagonal")
        err = np.abs(m.astype(np.float64) @ inv[layer].astype(np.float64) - np.eye(d)).max()
        if err > tolerance:
            raise CalibrationError(
                f"{p}: layers.{layer}: L · L_inv differs from I by {err:.2e} (> {tolerance})"
            )
    return SigmaQArtifact(p, lower, inv, record)


# -- the codec's stages up to the quantizer (docs/codec.md) --------------------------------
def _round_to(x: np.ndarray, dtype: str) -> np.ndarray:
    target = np.float16 if dtype == "f16" else np.float32
    with np.errstate(over="ignore"):
        return np.asarray(x).astype(target).astype(np.float32)


def _next_pow2(r: int) -> int:
    return 0 if r == 0 else 1 << (r - 1).bit_length()


def hadamard_signs(seed: int, p: int) -> np.ndarray:
    """``σ_j``: +1 if bit 63 of output ``j`` of ``rng(seed, 1, P, 0)`` is 0, else −1."""
    start = np.uint64(
        (seed & _U64) ^ ((1 * _DOMAIN_MUL) & _U64) ^ ((p * _A_MUL) & _U64) ^ ((0 * _GOLDEN) & _U64)
    )
    with np.errstate(over="ignore"):
        z = np.arange(1, p + 1, dtype=np.uint64) * np.uint64(_GOLDEN) + start
        z = (z ^ (z >> np.uint64(30))) * np.uint64(_MIX1)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(_MIX2)
    z = z ^ (z >> np.uint64(31))
    return np.where((z >> np.uint64(63)) == 0, np.float32(1), np.float32(-1)).astype(np.float32)


def _fwht(a: np.ndarray) -> np.ndarray:
    y = np.array(a, copy=True)
    p = y.shape[-1]
    h = 1
    while h < p:
        v = y.reshape(*y.shape[:-1], p // (2 * h), 2, h)
        s = v[..., 0, :] + v[..., 1, :]
        dd = v[..., 0, :] - v[..., 1, :]
        v[..., 0, :] = s
        v[..., 1, :] = dd
        h *= 2
    return y


def _rank(lam: np.ndarray, tau: float, d: int, n: int, cfg: Mapping[str, Any]) -> int:
    cap = min(d, n, cfg["rank_cap"] if cfg["rank_cap"] is not None else d)
    if cfg["rank"] is not None:
        return min(cfg["rank"], cap)
    if cfg["variance_ratio"] >= 1:
        return cap
    if tau == 0:
        return 0
    cum = np.cumsum(lam)
    hits = np.nonzero(cum >= cfg["variance_ratio"] * tau)[0]
    r = int(hits[0]) + 1 if hits.size else int(cum.size)
    return min(r, cap)


def _skeleton(rows: np.ndarray, cfg: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    n, d = rows.shape
    sk = cfg["skeleton_dtype"]
    mu_hat = _round_to(rows.astype(np.float64).mean(axis=0), sk)
    if cfg.get("basis") == "none":  # mean only: the basis is the identity
        return mu_hat, np.eye(d, dtype=np.float32)
    a = rows.astype(np.float64) - mu_hat.astype(np.float64)
    tau = float(np.sum(a * a))
    w, v = np.linalg.eigh(a.T @ a)
    order = np.argsort(-w, kind="stable")
    lam, vecs = w[order], v[:, order]
    r = _rank(lam, tau, d, n, cfg)
    u = vecs[:, :r]
    if r:
        idx = np.argmax(np.abs(u), axis=0)
        u = u * np.where(u[idx, np.arange(r)] < 0, -1.0, 1.0)
    return mu_hat, _round_to(u, sk).reshape(d, r)


def _config_dict(config: Any) -> dict[str, Any]:
    d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    import kakeya_py

    return kakeya_py.CodecConfig.from_dict(d).to_dict()  # validated, every field present


def pre_quantization(
    x: np.ndarray, config: Any, preconditioner: np.ndarray | None = None
) -> list[np.ndarray]:
    """The codec's scaled, rotated coefficients ``z`` (before Lloyd–Max), per (head, block).

    Follows ``docs/codec.md`` stages 1–3 for ``x [T, H, D]`` (float32): with
    ``metric="inner_product"`` the rows are first whitened by ``L̂`` (``preconditioner``
    rounded to the skeleton dtype); then mean and exact-PCA basis (identity for
    ``basis="none"``) per block (or shared),
    ``c = (x − μ̂) Û``, ``y = H_P(σ ⊙ c)/√P``, ``z = y / ŝ``. Returns the ``[n, P]`` float32
    arrays head-major, block by block. Randomized PCA and identity are refused.
    """
    cfg = _config_dict(config)
    if cfg["identity"]:
        raise CalibrationError("identity config has no quantizer to calibrate")
    if cfg["pca"] != "exact":
        raise CalibrationError("the calibration transform implements pca='exact' only")
    x32 = np.asarray(x, dtype=np.float32)
    if x32.ndim != 3:
        raise CalibrationError(f"x must have shape [T, H, D], got {x32.shape}")
    t, nh, d = x32.shape
    if cfg["metric"] == "inner_product":
        if preconditioner is None:
            raise CalibrationError("metric 'inner_product' needs the Σ_q factor L")
        l_hat = _round_to(np.asarray(preconditioner, np.float64), cfg["skeleton_dtype"])
        if l_hat.shape != (nh, d, d):
            raise CalibrationError(f"preconditioner has shape {l_hat.shape}, expected {(nh, d, d)}")
        x32 = whiten(x32, l_hat).astype(np.float32)
    elif preconditioner is not None:
        raise CalibrationError("a preconditioner was given but the config's metric is 'mse'")
    bsz, seed = cfg["block_size"], cfg["seed"]
    ys: list[np.ndarray] = []
    scales: list[np.ndarray] = []
    for h in range(nh):
        xh = x32[:, h, :]
        shared = _skeleton(xh, cfg) if cfg["share_basis"] and t > 0 else None
        for start in range(0, t, bsz):
            rows = xh[start : start + bsz]
            mu, basis = shared if shared is not None else _skeleton(rows, cfg)
            c = ((rows.astype(np.float64) - mu.astype(np.float64)) @ basis.astype(np.float64)).astype(
                np.float32
            )
            r = c.shape[1]
            p = _next_pow2(r)
            if p == 0:
                continue
            padded = np.zeros((c.shape[0], p), dtype=np.float32)
            padded[:, :r] = c
            y = (_fwht(padded * hadamard_signs(seed, p)) / np.float32(math.sqrt(p))).astype(np.float32)
            y64 = y.astype(np.float64)
            ys.append(y)
            scales.append(np.sqrt(np.mean(y64 * y64, axis=1)))
    alls = np.concatenate(scales) if scales else np.zeros(0)
    nz = alls[alls != 0]
    scale_dtype = "f32" if np.any((nz < F16_SCALE_MIN) | (nz > F16_SCALE_MAX)) else "f16"
    out = []
    for y, s in zip(ys, scales, strict=True):
        s_hat = _round_to(s, scale_dtype)[:, None]
        z = np.zeros_like(y)
        np.divide(y, s_hat, out=z, where=s_hat != 0)
        out.append(z)
    return out


# -- Lloyd–Max on samples ------------------------------------------------------------------
def gaussian_table(bits: int) -> np.ndarray:
    import kakeya_py

    return np.asarray(kakeya_py.gaussian_centroids(bits), dtype=np.float64)


@dataclass
class SortedSamples:
    """Sorted float64 samples with prefix sums, for exact 1-D quantizer arithmetic."""

    x: np.ndarray
    s1: np.ndarray = field(init=False)
    s2: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.x = np.sort(np.asarray(self.x, dtype=np.float64).ravel())
        self.s1 = np.concatenate([[0.0], np.cumsum(self.x)])
        self.s2 = np.concatenate([[0.0], np.cumsum(self.x * self.x)])

    def __len__(self) -> int:
        return self.x.size

    def cells(self, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Counts, sums, sums of squares of each centroid's cell (codes ``#{j : z > β_j}``)."""
        c = np.asarray(centroids, dtype=np.float64)
        beta = (c[:-1] + c[1:]) / 2
        edges = np.concatenate([[0], np.searchsorted(self.x, beta, side="right"), [self.x.size]])
        return np.diff(edges), np.diff(self.s1[edges]), np.diff(self.s2[edges])

    def mse(self, centroids: np.ndarray) -> float:
        """Mean squared quantization error of the samples with this table."""
        if not self.x.size:
            return math.nan
        c = np.asarray(centroids, dtype=np.float64)
        n, s1, s2 = self.cells(c)
        return float(np.sum(s2 - 2 * c * s1 + c * c * n) / self.x.size)


def lloyd_max(
    samples: np.ndarray | SortedSamples,
    bits: int,
    *,
    init: np.ndarray | None = None,
    max_iter: int = 2000,
    tol: float = 1e-9,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Lloyd–Max (1-D k-means) table of ``2^bits`` centroids fitted exactly on ``samples``.

    Starts from the Gaussian table (or ``init``); an empty cell keeps its centroid.
    Returns the float32-representable, strictly increasing table (float64 array) and
    ``{"iterations", "converged", "mse"}``.
    """
    ss = samples if isinstance(samples, SortedSamples) else SortedSamples(samples)
    if len(ss) < (1 << bits):
        raise CalibrationError(f"{len(ss)} samples cannot fit a {bits}-bit table")
    c = gaussian_table(bits) if init is None else np.asarray(init, dtype=np.float64)
    converged, it = False, 0
    while it < max_iter:
        it += 1
        n, s1, _ = ss.cells(c)
        new = np.where(n > 0, s1 / np.maximum(n, 1), c)
        delta = float(np.max(np.abs(new - c)))
        c = new
        if delta <= tol:
            converged = True
            break
    c32 = c.astype(np.float32)
    for j in range(1, c32.size):  # the codec wants strictly increasing f32 values
        if c32[j] <= c32[j - 1]:
            c32[j] = np.nextafter(c32[j - 1], np.float32(np.inf))
    c = c32.astype(np.float64)
    return c, {"iterations": it, "converged": converged, "mse": ss.mse(c)}


# -- centroid calibration ------------------------------------------------------------------
def _keep(rng: np.random.Generator, z: np.ndarray, fraction: float) -> np.ndarray:
    flat = z.ravel()
    if fraction >= 1:
        return flat.copy()
    return flat[rng.random(flat.size) < fraction]


@dataclass
class CentroidRun:
    """Samples collected for one variant (plain, or K whitened by a Σ_q)."""

    name: str
    sigma_q: SigmaQArtifact | None
    fit: dict[tuple[str, int], list[np.ndarray]] = field(default_factory=dict)  # (stream, layer) -> z
    held: dict[tuple[str, int], list[np.ndarray]] = field(default_factory=dict)


def collect_kv(model, sequences: Sequence[Sequence[int]], layers: Iterable[int], streams: Sequence[str]):
    """Yield ``{(stream, layer): float32 [T, H, D]}`` (pre-RoPE K, V) for each sequence."""
    import torch

    from ..eval.hooks import KVInterceptor

    base = getattr(model, "model", model)
    for seq in sequences:
        got: dict[tuple[str, int], np.ndarray] = {}

        def grab(layer, stream, x, got=got):
            got[(stream, layer)] = x[0].detach().float().cpu().numpy().copy()
            return None

        with KVInterceptor(model, grab, layers=list(layers), streams=streams), torch.no_grad():
            base(input_ids=torch.tensor([list(seq)]), use_cache=False)
        yield got


def resolve_configs(policy, num_layers: int, streams: Sequence[str]) -> dict[tuple[str, int], Any]:
    """``{(stream, layer): CodecConfig}`` for every compressed (layer, stream) of ``policy``."""
    out = {}
    for layer in range(num_layers):
        for s in streams:
            cfg = policy.config_for(layer, s, num_layers)
            if cfg is not None and not cfg.identity:
                out[(s, layer)] = cfg
    if not out:
        raise CalibrationError(f"the policy compresses none of the streams {list(streams)}")
    return out


def _stream_config(cfg: Any, stream: str, sigma: SigmaQArtifact | None) -> dict[str, Any]:
    d = cfg.to_dict()
    d["metric"] = "inner_product" if (stream == "k" and sigma is not None) else "mse"
    d["centroids"] = None
    return d


def run_centroids(
    model,
    info,
    text: CalibrationText,
    policy,
    *,
    streams: Sequence[str] = ("k", "v"),
    bits: Sequence[int] = (2, 3, 4),
    variants: Mapping[str, SigmaQArtifact | None] | None = None,
    held_out: int = 2,
    max_samples_per_layer: int = 400_000,
    per_layer: bool = False,
    seed: int = 0,
    threads: int | None = None,
    progress: bool = False,
    captured: Sequence[Mapping[tuple[str, int], np.ndarray]] | None = None,
) -> dict[str, dict[str, Any]]:
    """Fit Lloyd–Max tables on the codec's ``z`` and measure them on held-out sequences.

    Args:
        policy: a :class:`~kakeya_py.policy.Policy`; its resolved per-layer configs fix
            the transform (block size, shared basis, rank, outlier threshold); its bit
            widths are ignored (``bits`` says which tables to fit).
        variants: ``{name: Σ_q artifact or None}``; K is whitened by the artifact's ``L``
            in that variant (default ``{"plain": None}``).
        held_out: the last ``held_out`` sequences are kept out of the fit.
        captured: K/V already captured from ``text.sequences`` (one dict per sequence, as
            :func:`collect_kv` yields); ``None`` runs the model.

    Returns:
        ``{variant: {"tables": [...], "held_out": ..., ...}}``, the content of each
        variant's ``centroids.json`` apart from provenance (see :func:`save_centroids`).
    """
    from tqdm.auto import tqdm

    import kakeya_py

    variants = dict(variants or {"plain": None})
    n_layers = info.num_layers
    configs = resolve_configs(policy, n_layers, streams)
    seqs = text.sequences
    if len(seqs) <= held_out:
        raise CalibrationError(f"{len(seqs)} sequences: need more than held_out={held_out}")
    fit_seqs, held_seqs = seqs[: len(seqs) - held_out], seqs[len(seqs) - held_out :]
    h, d = info.num_kv_heads, info.head_dim
    per_seq = text.seq_len * h * _next_pow2(d)
    fraction = min(1.0, max_samples_per_layer / (per_seq * len(fit_seqs)))
    held_fraction = min(1.0, max_samples_per_layer / (per_seq * max(1, len(held_seqs))))
    rng = np.random.default_rng(seed)
    runs = {name: CentroidRun(name, sig) for name, sig in variants.items()}
    held_kv: list[dict[tuple[str, int], np.ndarray]] = []
    layers = sorted({layer for _, layer in configs})
    it = collect_kv(model, seqs, layers, streams) if captured is None else iter(captured)
    for i, got in enumerate(tqdm(it, total=len(seqs), desc="centroids: K/V", disable=not progress)):
        is_held = i >= len(fit_seqs)
        if is_held:
            held_kv.append(got)
        for run in runs.values():
            store = run.held if is_held else run.fit
            frac = held_fraction if is_held else fraction
            for key, cfg in configs.items():
                stream, layer = key
                pre = run.sigma_q.L[layer] if (stream == "k" and run.sigma_q is not None) else None
                zs = pre_quantization(got[key], _stream_config(cfg, stream, run.sigma_q), pre)
                store.setdefault(key, []).append(_keep(rng, np.concatenate([z.ravel() for z in zs]), frac))
    results = {}
    for name, run in runs.items():
        tables = []
        for stream in streams:
            keys = [k for k in configs if k[0] == stream]
            if not keys:
                continue
            t_out = configs[keys[0]].outlier_threshold
            if any(configs[k].outlier_threshold != t_out for k in keys):
                raise CalibrationError(f"stream {stream}: layers use different outlier thresholds")

            pooled = SortedSamples(np.concatenate([_inliers(run.fit[k], t_out) for k in keys]))
            pooled_held, pooled_held_all = _heldout(run, keys, t_out)
            per_layer_fit = (
                {k[1]: SortedSamples(_inliers(run.fit[k], t_out)) for k in keys} if per_layer else {}
            )
            for b in bits:
                table, stats = lloyd_max(pooled, b)
                g = gaussian_table(b)
                # outliers are stored exactly: they add samples but no error
                w = len(pooled_held) / max(1, pooled_held_all)
                entry = {
                    "stream": stream,
                    "bits": b,
                    "layer": None,
                    "values": [float(v) for v in table],
                    "fit_samples": len(pooled),
                    "iterations": stats["iterations"],
                    "converged": stats["converged"],
                    "fit_mse": stats["mse"],
                    "fit_mse_gaussian": pooled.mse(g),
                    "heldout_samples": pooled_held_all,
                    "heldout_mse": pooled_held.mse(table) * w,
                    "heldout_mse_gaussian": pooled_held.mse(g) * w,
                }
                entry["heldout_mse_ratio"] = entry["heldout_mse"] / entry["heldout_mse_gaussian"]
                entry["codec_rel_err"] = _codec_rel_err(
                    kakeya_py, held_kv, configs, stream, b, table, run.sigma_q, threads
                )
                if per_layer:
                    rows = []
                    for k in keys:
                        lt, ls = lloyd_max(per_layer_fit[k[1]], b, init=table)
                        hs, hs_all = _heldout(run, [k], t_out)
                        wl = len(hs) / max(1, hs_all)
                        rows.append(
                            {
                                "layer": k[1],
                                "values": [float(v) for v in lt],
                                "fit_samples": len(per_layer_fit[k[1]]),
                                "converged": ls["converged"],
                                "heldout_mse": hs.mse(lt) * wl,
                                "heldout_mse_pooled": hs.mse(table) * wl,
                                "heldout_mse_gaussian": hs.mse(g) * wl,
                            }
                        )
                    entry["per_layer"] = rows
                tables.append(entry)
        results[name] = {
            "tables": tables,
            "streams": list(streams),
            "bits": list(bits),
            "layers_fitted": {s: sorted(k[1] for k in configs if k[0] == s) for s in streams},
            "transform_configs": {
                s: _stream_config(configs[next(k for k in configs if k[0] == s)], s, run.sigma_q)
                for s in streams
                if any(k[0] == s for k in configs)
            },
            "fit_sequences": len(fit_seqs),
            "heldout_sequences": len(held_seqs),
            "sample_fraction": fraction,
            "heldout_sample_fraction": held_fraction,
            "seed": seed,
        }
    return results


def _inliers(zs: list[np.ndarray], t_out: float | None) -> np.ndarray:
    z = np.concatenate(zs)
    return z if t_out is None else z[np.abs(z) <= t_out]


def _heldout(run: CentroidRun, keys: list[tuple[str, int]], t_out: float | None) -> tuple[SortedSamples, int]:
    """Held-out inlier samples and the count of all held-out samples (outliers included)."""
    z = np.concatenate([np.concatenate(run.held[k]) for k in keys])
    return SortedSamples(z if t_out is None else z[np.abs(z) <= t_out]), z.size


def _codec_rel_err(kakeya_py, held_kv, configs, stream, bits, table, sigma, threads) -> dict[str, float]:
    """Real codec on the held-out tensors: Σ‖x̂ − x‖² / Σ‖x‖² with Gaussian and fitted tables.

    For whitened K the error is measured in the whitened space (the metric the codec
    minimises, ``‖(k̂ − k)L‖²``).
    """
    out = {}
    for label, cents in (("gaussian", None), ("calibrated", [float(v) for v in table])):
        num = den = 0.0
        for got in held_kv:
            for key, cfg in configs.items():
                if key[0] != stream:
                    continue
                d = _stream_config(cfg, stream, sigma)
                d.update(bits=bits, centroids=cents)
                c = kakeya_py.CodecConfig.from_dict(d)
                x = np.ascontiguousarray(got[key], dtype=np.float32)
                kw: dict[str, Any] = {} if threads is None else {"threads": threads}
                if d["metric"] == "inner_product":
                    lower = sigma.L[key[1]]
                    kw["preconditioner"] = lower
                    xh, _ = kakeya_py.roundtrip(x, c, **kw)
                    e, ref = whiten(xh - x, lower), whiten(x, lower)
                else:
                    xh, _ = kakeya_py.roundtrip(x, c, **kw)
                    e, ref = xh.astype(np.float64) - x, x.astype(np.float64)
                num += float(np.sum(e * e))
                den += float(np.sum(ref * ref))
        out[label] = num / den if den else math.nan
    return out


def save_centroids(
    out_dir: str | os.PathLike,
    result: Mapping[str, Any],
    *,
    info,
    text: CalibrationText,
    command: str,
    sigma_q: SigmaQArtifact | None,
    policy_name: str,
) -> Path:
    """Write ``{stream}_{bits}bit.f32`` (and ``_per_layer.f32``) tables and ``centroids.json``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n_layers = info.num_layers
    tables = []
    for entry in result["tables"]:
        e = dict(entry)
        stem = f"{e['stream']}_{e['bits']}bit"
        data = np.asarray(e["values"], dtype="<f4").tobytes()
        (out / f"{stem}.f32").write_bytes(data)
        e["file"] = f"{stem}.f32"
        e["sha256"] = _sha256_bytes(data)
        if "per_layer" in e:
            mat = np.tile(np.asarray(e["values"], dtype="<f4"), (n_layers, 1))
            for row in e["per_layer"]:
                mat[row["layer"]] = row["values"]
            pdata = mat.astype("<f4").tobytes()
            (out / f"{stem}_per_layer.f32").write_bytes(pdata)
            e["per_layer_file"] = f"{stem}_per_layer.f32"
            e["per_layer_sha256"] = _sha256_bytes(pdata)
        tables.append(e)
    record = {
        "format": CENTROIDS_FORMAT,
        "format_version": FORMAT_VERSION,
        "kakeya_version": kakeya_version(),
        "command": command,
        "model": _model_dict(info),
        "text": text.usage,
        "tokens": text.tokens,
        "seq_len": text.seq_len,
        "policy": policy_name,
        "whitened_k": sigma_q is not None,
        "sigma_q": None
        if sigma_q is None
        else {"file": str(sigma_q.path), "sha256": sigma_q.record.get("safetensors_sha256")},
        "mse_note": "MSE per coordinate of z (the codec's scaled rotated coefficients); with an outlier "
        "threshold T, |z| > T is stored exactly and counts as zero error",
        **{k: v for k, v in result.items() if k != "tables"},
        "tables": tables,
    }
    path = out / CENTROIDS_JSON
    path.write_text(json.dumps(_finite(record), indent=1) + "\n")
    return path


@dataclass
class CentroidSet:
    """Validated centroid tables: ``table(stream, bits, layer=None)``."""

    path: Path
    record: dict[str, Any]
    pooled: dict[tuple[str, int], list[float]]
    per_layer: dict[tuple[str, int], np.ndarray]  # [num_layers, 2^bits]

    @property
    def text(self) -> dict[str, Any]:
        return self.record["text"]

    @property
    def whitened_k(self) -> bool:
        return bool(self.record.get("whitened_k"))

    def table(self, stream: str, bits: int, layer: int | None = None) -> list[float]:
        """The table for ``stream`` at ``bits`` (per layer if fitted, else pooled), as floats."""
        if layer is not None and (stream, bits) in self.per_layer:
            return [float(v) for v in self.per_layer[(stream, bits)][layer]]
        if (stream, bits) not in self.pooled:
            have = sorted(self.pooled)
            raise CalibrationError(f"{self.path}: no {bits}-bit table for stream {stream!r}; have {have}")
        return list(self.pooled[(stream, bits)])

    def __repr__(self) -> str:
        return f"CentroidSet(path='{self.path}', tables={sorted(self.pooled)}, whitened_k={self.whitened_k})"


def _read_table(path: Path, count: int, sha: str | None, what: str) -> np.ndarray:
    if not path.is_file():
        raise CalibrationError(f"{what}: table file {path} not found")
    data = path.read_bytes()
    if len(data) != 4 * count:
        raise CalibrationError(
            f"{what}: {path.name} has {len(data)} bytes, expected {4 * count} ({count} f32)"
        )
    if sha is not None and _sha256_bytes(data) != sha:
        raise CalibrationError(f"{what}: {path.name} does not match its SHA-256 in {CENTROIDS_JSON}")
    return np.frombuffer(data, dtype="<f4").astype(np.float32)


def _check_table(v: np.ndarray, bits: int, what: str) -> None:
    if v.shape[-1] != 1 << bits:
        raise CalibrationError(f"{what}: {v.shape[-1]} centroids, expected 2^{bits} = {1 << bits}")
    if not np.all(np.isfinite(v)) or not np.all(np.diff(v, axis=-1) > 0):
        raise CalibrationError(f"{what}: centroids must be finite and strictly increasing")


def load_centroids(
    path: str | os.PathLike, info: Any | None = None, *, strict_version: bool = True
) -> CentroidSet:
    """Load and validate a centroid folder (or its ``centroids.json``).

    Checks format and versions, model identity against ``info``, every table file's size
    (``2^bits`` f32, or ``[num_layers, 2^bits]``), hash, order and agreement with the JSON.
    """
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / CENTROIDS_JSON
    if not p.is_file():
        raise CalibrationError(f"centroid file {p} not found")
    try:
        record = json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise CalibrationError(f"{p}: not valid JSON ({exc})") from exc
    check_version(record, CENTROIDS_FORMAT, str(p), strict_version=strict_version)
    for key in ("text", "model", "tables"):
        if not record.get(key):
            raise CalibrationError(f"{p}: missing {key!r}")
    if info is not None:
        check_model_identity(record["model"], info, str(p))
    n_layers = record["model"]["num_layers"]
    pooled, per_layer = {}, {}
    for e in record["tables"]:
        stream, bits = e.get("stream"), e.get("bits")
        if stream not in ("k", "v") or bits not in (1, 2, 3, 4):
            raise CalibrationError(f"{p}: bad table entry stream={stream!r} bits={bits!r}")
        what = f"{p} {stream} {bits}-bit"
        v = _read_table(p.parent / e["file"], 1 << bits, e.get("sha256"), what)
        _check_table(v, bits, what)
        if not np.array_equal(v, np.asarray(e["values"], dtype=np.float32)):
            raise CalibrationError(f"{what}: {e['file']} differs from the values in the JSON")
        pooled[(stream, bits)] = [float(x) for x in v]
        if e.get("per_layer_file"):
            m = _read_table(p.parent / e["per_layer_file"], n_layers << bits, e.get("per_layer_sha256"), what)
            m = m.reshape(n_layers, 1 << bits)
            _check_table(m, bits, what + " per layer")
            per_layer[(stream, bits)] = m
    return CentroidSet(p, record, pooled, per_layer)


# -- a policy with the calibration applied --------------------------------------------------
def calibrated_policy(
    policy,
    *,
    centroids: CentroidSet | None = None,
    sigma_q: str | os.PathLike | None = None,
    per_layer: bool = False,
    num_layers: int | None = None,
) -> dict[str, Any]:
    """A policy dict with fitted centroids inlined and, for K, Σ_q pre-conditioning.

    Every stream config gets the table for its own bit width (and every per-layer
    override that changes ``bits`` gets its own); with ``per_layer`` the per-layer tables
    go into ``overrides``. A Σ_q sets K's metric to ``inner_product`` and ``sigma_q``.
    K tables fitted on whitened K are refused without a Σ_q, and plain ones with it.
    """
    d = policy.to_dict() if hasattr(policy, "to_dict") else json.loads(json.dumps(policy))
    if sigma_q is not None:
        if d.get("k") is None:
            raise CalibrationError("a Σ_q was given but the policy keeps K exact")
        d["k"]["metric"] = "inner_product"
        d["sigma_q"] = str(Path(sigma_q).expanduser().resolve())
    k_ip = d.get("k") is not None and d["k"].get("metric") == "inner_product"
    if centroids is not None:
        if (
            "k" in centroids.record.get("streams", [])
            and d.get("k") is not None
            and centroids.whitened_k != k_ip
        ):
            raise CalibrationError(
                f"{centroids.path}: K tables were fitted on {'whitened' if centroids.whitened_k else 'plain'} K "
                f"but the policy's K metric is {d['k'].get('metric', 'mse')!r}"
            )
        if centroids.whitened_k and d.get("sigma_q"):
            rec = centroids.record.get("sigma_q") or {}
            try:
                art = json.loads(Path(d["sigma_q"]).with_suffix(".json").read_text())
            except OSError:
                art = {}
            if (
                rec.get("sha256")
                and art.get("safetensors_sha256")
                and rec["sha256"] != art["safetensors_sha256"]
            ):
                raise CalibrationError(f"{centroids.path}: K tables were fitted with a different Σ_q file")
        available = {s for s, _ in centroids.pooled}
        for s in ("k", "v"):
            if d.get(s) is not None and s in available:
                d[s]["centroids"] = centroids.table(s, int(d[s].get("bits", 3)))
        overrides = d.get("overrides") or {}
        for _, per in overrides.items():
            for s, partial in per.items():
                if partial is not None and "bits" in partial and s in available:
                    partial["centroids"] = centroids.table(s, int(partial["bits"]))
        if per_layer:
            if num_layers is None:
                num_layers = centroids.record["model"]["num_layers"]
            from ..policy import Policy

            pol = Policy.from_dict(d)
            for layer in range(num_layers):
                for s in ("k", "v"):
                    cfg = pol.config_for(layer, s, num_layers)
                    if (
                        cfg is None
                        or cfg.identity
                        or s not in available
                        or (s, cfg.bits) not in centroids.per_layer
                    ):
                        continue
                    per = overrides.setdefault(str(layer), {})
                    entry = per.get(s) or {}
                    entry["centroids"] = centroids.table(s, cfg.bits, layer)
                    per[s] = entry
            d["overrides"] = overrides
        note = f"centroids from {centroids.path}" + (" (per layer)" if per_layer else "")
        d["description"] = (d.get("description") or "") + ("; " if d.get("description") else "") + note
    if sigma_q is not None:
        d["description"] = (d.get("description") or "") + f"; K whitened by Σ_q {d['sigma_q']}"
    fits = [centroids.record["text"]] if centroids is not None else []
    if sigma_q is not None:
        try:
            fits.append(json.loads(Path(sigma_q).with_suffix(".json").read_text())["text"])
        except (OSError, KeyError, ValueError):
            pass  # a Σ_q without a sidecar is refused where it is loaded (load_sigma_q)
    d["provenance"] = list(d.get("provenance") or []) + [
        {"role": "fit", **{k: v for k, v in t.items() if k != "role"}} for t in fits
    ]
    from ..policy import Policy

    Policy.from_dict(d)  # validate now
    return d


def command_line(argv: Sequence[str] | None) -> str:
    return shlex.join(list(argv or ["kakeya"]))
