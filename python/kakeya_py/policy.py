"""Which codec configuration each (layer, stream) gets, and what the cache costs.

A :class:`Policy` is the JSON-serialisable answer to "how is the KV cache compressed":

```json
{
  "name": "recommended",
  "k": {"bits": 4, ...},            // CodecConfig dict for K, or null = K kept exact
  "v": {"bits": 3, ...},            // CodecConfig dict for V, or null
  "exact_layers": [0, -1],          // boundary layers kept exact (negatives count from the end)
  "overrides": {"3": {"k": {"bits": 4}, "v": null}},  // per layer: partial dict merged onto
                                    // the stream's config, or null = exact on that layer
  "layers": null,                   // layers the codec may touch (null = all)
  "streams": ["k", "v"],            // streams the codec may touch
  "k_position": "pre_rope",         // or "post_rope" (comparison only)
  "sigma_q": null,                  // path to sigma_q.safetensors (K metric inner_product)
  "model": {"name": "smollm2-135m", "num_layers": 30, "num_kv_heads": 3, "head_dim": 64}
                                    // the model per-layer settings were made for, or null
}
```

A policy that records its ``model`` is refused on a model of another shape, and any policy
naming layers the model lacks is refused (:func:`fit_to_model`; ``--force-model`` keeps what
fits). The presets with per-layer settings record SmolLM2-135M; ``identity``,
``k4v4-sink1`` and ``k4v4-sink1-nobasis`` are model-agnostic (:func:`agnostic_presets`).

:meth:`Policy.config_for` resolves the rules in this order: stream not selected, layer
not selected, layer in ``exact_layers`` -> exact; then the per-layer override; then the
stream's config. Policy presets (:data:`POLICY_PRESETS`) include ``identity`` (every
codec stage bypassed), ``recommended`` (measured; see ``docs/harness.md``) and
``uniform-ec`` (the highest measured ratio at ACCEPT; ``reports/entropy/README.md``).

:class:`PolicyCodec` applies a policy with the real codec (``kakeya_py.roundtrip``)
and :class:`Ledger` counts the bytes of the cache actually produced: exact tensors at
bf16 (2 bytes per value), compressed ones at their serialized size, headers and
skeletons included.

Σ_q files (``sigma_q.safetensors``, issue 5) hold one lower-triangular Cholesky factor
per layer under the key ``layers.{i}.L`` with shape ``[kv_heads, head_dim, head_dim]``
(float32). A sidecar ``sigma_q.json`` next to it must record the calibration text
under ``"text"`` (a :meth:`kakeya_py.eval.corpus.CorpusSplit.usage` record) so the harness
can refuse evaluation text that overlaps it.
"""

from __future__ import annotations

import copy
import json
import os
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .eval.hooks import K_POSITIONS, STREAMS, parse_layers, parse_streams

BF16_BYTES = 2


def _codec():
    import kakeya_py

    return kakeya_py


def _codec_config(d: Mapping[str, Any] | None):
    return None if d is None else _codec().CodecConfig.from_dict(dict(d))


_SHARED_4BIT = {"bits": 4, "block_size": 4096, "share_basis": True, "outlier_threshold": 3.0}

#: Saved policy presets, ``NAME.json`` (package data; ``kakeya tune --save-preset NAME``).
#: ``load_policy(NAME)`` resolves them after the built-in :data:`POLICY_PRESETS`.
PRESETS_DIR = Path(__file__).resolve().parent / "presets"

# Policy presets: plain dicts, turned into Policy objects by ``preset_policy``. Measured on
# SmolLM2-135M (30 layers), snapshot mode, 16 passages x (1024 + 256) tokens of WikiText-2,
# float32 (reports/basis/README.md). ``recommended`` is the highest measured ratio that
# earned ACCEPT: mean-only skeletons (``basis="none"``: at full rank a PCA basis before the
# random rotation is one more rotation, and its 64x64 values cost ~1 bit per coordinate of
# a 1024-token prefix), the attention-sink position exact, K 4-bit everywhere, V 3-bit
# except on the 7 layers where 3-bit V costs most KL (``kakeya attribution --streams v
# --rank-by kl``, reports/basis/attribution_v3.md).
_V4_LAYERS = (4, 5, 7, 8, 18, 20, 23)
#: The model a preset with per-layer settings was made for (``Policy.model``): using it on a
#: model of another shape is refused unless ``--force-model`` (:func:`fit_to_model`).
SMOLLM2_135M = {"name": "smollm2-135m", "num_layers": 30, "num_kv_heads": 3, "head_dim": 64}
#: The preset ``kakeya eval`` uses on a model other than the one ``recommended`` was made for.
DEFAULT_AGNOSTIC_PRESET = "k4v4-sink1-nobasis"
_MEAN_ONLY = {"block_size": 4096, "share_basis": True, "outlier_threshold": 3.0, "basis": "none"}
# ``uniform-ec``: the same per-layer budget, each Lloyd-Max table replaced by the uniform step of
# equal Gaussian MSE (step^2/12 = 0.009497 at 4 bits, 0.03454 at 3 bits) and the codes
# entropy-coded: a uniform quantizer needs ~0.25 bit less than entropy-coded Lloyd-Max codes
# at equal MSE (docs/codec.md). The tables reach +-4.8 sigma, so outliers start at 4.5.
LLOYD_MAX_4BIT_STEP = 0.3376
LLOYD_MAX_3BIT_STEP = 0.6438
_ENTROPY_CODED = {**_MEAN_ONLY, "outlier_threshold": 4.5, "entropy_coding": True}


def _uniform_ec(stream: dict[str, Any]) -> dict[str, Any]:
    """The streams, layer overrides and sink of ``uniform-ec``, each stream with ``stream``'s fields."""
    return {
        "k": {"bits": 5, "uniform_step": LLOYD_MAX_4BIT_STEP, **stream},
        "v": {"bits": 4, "uniform_step": LLOYD_MAX_3BIT_STEP, **stream},
        "overrides": {
            str(layer): {"v": {"bits": 5, "uniform_step": LLOYD_MAX_4BIT_STEP}} for layer in _V4_LAYERS
        },
        "model": dict(SMOLLM2_135M),
        "sink_tokens": 1,
    }


def _chosen_on_validation() -> list[dict[str, Any]]:
    """Provenance of the hand-made presets: every choice (sink, basis, bits, the 4-bit V layers)
    was made on passages of what is now the WikiText-2 validation part (corpus module doc)."""
    from .eval.corpus import wikitext_usage

    return [wikitext_usage("validation", "selection")]


POLICY_PRESETS: dict[str, dict[str, Any]] = {
    "identity": {
        "description": "codec stages bypassed on every layer and stream (exact round trip)",
        "k": {"identity": True},
        "v": {"identity": True},
    },
    "recommended": {
        "description": "K 4-bit on every layer; V 3-bit, 4-bit on layers 4, 5, 7, 8, 18, 20, 23; "
        "mean only per head over the prefix (no basis), outliers beyond 3 sigma stored exactly, "
        "the first position (attention sink) exact (reports/basis)",
        "k": {"bits": 4, **_MEAN_ONLY},
        "v": {"bits": 3, **_MEAN_ONLY},
        "overrides": {str(layer): {"v": {"bits": 4}} for layer in _V4_LAYERS},
        "model": dict(SMOLLM2_135M),
        "sink_tokens": 1,
    },
    "uniform-ec": {
        "description": "recommended's budget as uniform-quantizer steps of equal MSE, codes entropy-coded "
        "(rANS): K step 0.3376 (5-bit alphabet); V step 0.6438 (4-bit), 0.3376 on layers 4, 5, 7, 8, 18, "
        "20, 23; outliers beyond 4.5 sigma exact, the first position exact (reports/entropy)",
        **_uniform_ec(_ENTROPY_CODED),
    },
    "uniform-ec-log8": {
        "description": "uniform-ec with each scale stored as one byte on a 1/16-octave grid, "
        "the bytes rANS-coded (scale_format='log8'; reports/entropy)",
        **_uniform_ec({**_ENTROPY_CODED, "scale_format": "log8"}),
    },
    "k4v4-sink1-nobasis": {
        "description": "K and V 4-bit on every layer, mean only per head (no basis), the first "
        "position exact, outliers beyond 3 sigma stored exactly (reports/basis)",
        "k": {"bits": 4, **_MEAN_ONLY},
        "v": {"bits": 4, **_MEAN_ONLY},
        "sink_tokens": 1,
    },
    "k4v4-sink1": {
        "description": "K and V 4-bit on every layer, the first position (attention sink) exact; "
        "one basis per head over the prefix, outliers beyond 3 sigma stored exactly (reports/sinks)",
        "k": dict(_SHARED_4BIT),
        "v": dict(_SHARED_4BIT),
        "sink_tokens": 1,
    },
    "k4early-v4": {
        "description": "the first recommended preset (reports/eval_k4early_v4.md): V 4-bit on every "
        "layer, K 4-bit on layers 0-11 (K exact from layer 12 on); one basis per head over the "
        "prefix, outliers beyond 3 sigma stored exactly",
        "k": dict(_SHARED_4BIT),
        "v": dict(_SHARED_4BIT),
        "overrides": {str(layer): {"k": None} for layer in range(12, 30)},
        "model": dict(SMOLLM2_135M),
    },
}


PROVENANCE_ROLES = ("fit", "selection")


def check_provenance(record: Mapping[str, Any]) -> dict[str, Any]:
    """A validated copy of one provenance record (the text a policy was fitted or chosen on)."""
    if not isinstance(record, Mapping):
        raise ValueError(f"a provenance record must be an object, got {type(record).__name__}")
    missing = {"role", "sha256", "part", "articles"} - set(record)
    if missing:
        raise ValueError(f"provenance record lacks {sorted(missing)}; it has {sorted(record)}")
    if record["role"] not in PROVENANCE_ROLES:
        raise ValueError(f"provenance role must be one of {PROVENANCE_ROLES}, got {record['role']!r}")
    if not all(isinstance(a, int) for a in record["articles"]):
        raise ValueError(f"provenance articles must be integers, got {record['articles']!r}")
    return dict(copy.deepcopy(record))


def provenance_overlap(policy: Policy, usage: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The provenance records of ``policy`` that share articles of the same text with ``usage``."""
    out = []
    for rec in policy.provenance:
        if rec["sha256"] == usage["sha256"]:
            shared = sorted(set(rec["articles"]) & set(usage["articles"]))
            if shared:
                out.append({"role": rec["role"], "part": rec["part"], "articles": shared})
    return out


@dataclass
class Policy:
    """Per-layer, per-stream codec configuration (see the module doc for the JSON form)."""

    name: str = "custom"
    k: Any = None  # CodecConfig or None (exact)
    v: Any = None
    exact_layers: list[int] = field(default_factory=list)
    overrides: dict[int, dict[str, Any]] = field(default_factory=dict)  # layer -> {stream: partial dict|None}
    layers: list[int] | None = None
    streams: tuple[str, ...] = STREAMS
    k_position: str = "pre_rope"
    sigma_q: str | None = None
    #: per-model coefficient basis (``basis.safetensors``, :mod:`kakeya_py.calibration.model_basis`) that
    #: configs with ``transform`` set are coded in; the configs name it by its SHA-256
    basis: str | None = None
    description: str = ""
    sink_tokens: int = 0  # leading positions of each sequence kept exact (attention sinks)
    #: the last positions of what the codec is given kept exact (bf16 bytes, counted): in
    #: snapshot mode the most recent prefix positions, as KakeyaCache's exact recent window
    window_tokens: int = 0
    #: the model its per-layer settings were made for: ``{name, num_layers, num_kv_heads,
    #: head_dim}`` or None (model-agnostic); see :func:`fit_to_model`
    model: dict[str, Any] | None = None
    #: the text this policy was fitted or chosen on: ``{"role": "fit" | "selection", corpus,
    #: sha256, part, articles}`` records (:meth:`~kakeya_py.eval.corpus.CorpusSplit.usage` plus a role)
    provenance: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.streams = parse_streams(self.streams)
        self.model = check_model_record(self.model)
        self.provenance = [check_provenance(r) for r in self.provenance]
        for name in ("sink_tokens", "window_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
        if self.k_position not in K_POSITIONS:
            raise ValueError(f"k_position must be one of {K_POSITIONS}, got {self.k_position!r}")
        self.overrides = {int(layer): dict(per) for layer, per in self.overrides.items()}
        for layer, per in self.overrides.items():
            bad = set(per) - set(STREAMS)
            if bad:
                raise ValueError(f"override of layer {layer} has unknown streams {sorted(bad)}")
            for stream, value in per.items():
                if value is not None:
                    self._merged(stream, value)  # validate now, not deep inside a run
        k_ip = self.k is not None and getattr(self.k, "metric", "mse") == "inner_product"
        if k_ip and self.sigma_q is None:
            raise ValueError("K uses metric='inner_product', which needs a Σ_q file (policy 'sigma_q')")
        uses_basis = any(getattr(c, "transform", None) for c in (self.k, self.v) if c is not None) or any(
            isinstance(part, Mapping) and part.get("transform")
            for per in self.overrides.values()
            for part in per.values()
        )
        if uses_basis and self.basis is None:
            raise ValueError("a config sets 'transform', which needs a model basis file (policy 'basis')")

    # -- (de)serialisation ----------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, name: str | None = None) -> Policy:
        known = {"name", "description", "k", "v", "exact_layers", "overrides", "layers", "streams"}
        known |= {"k_position", "sigma_q", "sink_tokens", "window_tokens", "provenance"}
        known |= {"model", "basis"}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown policy fields {sorted(unknown)}; expected some of {sorted(known)}")
        return cls(
            name=name or d.get("name", "custom"),
            description=d.get("description", ""),
            k=_codec_config(d.get("k")),
            v=_codec_config(d.get("v")),
            exact_layers=[int(i) for i in d.get("exact_layers", [])],
            overrides={int(k): v for k, v in (d.get("overrides") or {}).items()},
            layers=None if d.get("layers") is None else [int(i) for i in d["layers"]],
            streams=tuple(d.get("streams", STREAMS)),
            k_position=d.get("k_position", "pre_rope"),
            sigma_q=d.get("sigma_q"),
            basis=d.get("basis"),
            sink_tokens=d.get("sink_tokens", 0),
            window_tokens=d.get("window_tokens", 0),
            model=d.get("model"),
            provenance=list(d.get("provenance") or []),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "k": None if self.k is None else self.k.to_dict(),
            "v": None if self.v is None else self.v.to_dict(),
            "exact_layers": list(self.exact_layers),
            "overrides": {str(k): copy.deepcopy(v) for k, v in sorted(self.overrides.items())},
            "layers": None if self.layers is None else list(self.layers),
            "streams": list(self.streams),
            "k_position": self.k_position,
            "sigma_q": self.sigma_q,
            "basis": self.basis,
            "sink_tokens": self.sink_tokens,
            "window_tokens": self.window_tokens,
            "model": copy.deepcopy(self.model),
            "provenance": copy.deepcopy(self.provenance),
        }

    def with_changes(
        self,
        *,
        layers: str | Iterable[int] | None = None,
        streams: str | Iterable[str] | None = None,
        exact_layers: str | Iterable[int] | None = None,
        k_position: str | None = None,
        sigma_q: str | None = None,
    ) -> Policy:
        """A copy with command-line selections applied (``None`` keeps a field)."""
        new = copy.deepcopy(self)
        if layers is not None:
            new.layers = _layer_list(layers)
        if streams is not None:
            new.streams = parse_streams(streams)
        if exact_layers is not None:
            new.exact_layers = _layer_list(exact_layers)
        if k_position is not None:
            new.k_position = k_position
        if sigma_q is not None:
            new.sigma_q = sigma_q
        new.__post_init__()
        return new

    # -- resolution ------------------------------------------------------------------------
    def _merged(self, stream: str, partial: Mapping[str, Any]):
        base = getattr(self, stream)
        d = base.to_dict() if base is not None else {}
        d.update(partial)
        return _codec().CodecConfig.from_dict(d)

    def config_for(self, layer: int, stream: str, num_layers: int):
        """The CodecConfig for ``(layer, stream)``, or ``None`` when that tensor stays exact."""
        if stream not in self.streams:
            return None
        if self.layers is not None and layer not in parse_layers(self.layers, num_layers):
            return None
        if layer in (parse_layers(self.exact_layers, num_layers) or []):
            return None
        per = self.overrides.get(layer)
        if per is None:  # overrides may also be keyed by negative indices
            per = self.overrides.get(layer - num_layers)
        if per is not None and stream in per:
            return None if per[stream] is None else self._merged(stream, per[stream])
        return getattr(self, stream)

    def active(self, num_layers: int) -> list[tuple[int, str]]:
        """Every ``(layer, stream)`` the codec compresses."""
        return [
            (layer, s)
            for layer in range(num_layers)
            for s in STREAMS
            if self.config_for(layer, s, num_layers) is not None
        ]


# -- the model a policy was made for ------------------------------------------------------
MODEL_FIELDS = ("name", "num_layers", "num_kv_heads", "head_dim")


class PolicyModelError(ValueError):
    """A policy's per-layer settings do not fit the model (``--force-model`` applies what fits)."""


def check_model_record(record: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """A validated copy of a policy's ``model`` record (None stays None)."""
    if record is None:
        return None
    if not isinstance(record, Mapping):
        raise ValueError(f"policy 'model' must be an object with {list(MODEL_FIELDS)}, got {record!r}")
    if set(record) != set(MODEL_FIELDS):
        raise ValueError(
            f"policy 'model' must have exactly the keys {list(MODEL_FIELDS)}, got {sorted(record)}"
        )
    for key in MODEL_FIELDS[1:]:
        if not isinstance(record[key], int) or isinstance(record[key], bool) or record[key] < 1:
            raise ValueError(f"policy 'model'.{key} must be an integer >= 1, got {record[key]!r}")
    return {key: record[key] for key in MODEL_FIELDS}


def model_record(model: Any) -> dict[str, Any]:
    """The ``model`` record of a :class:`~kakeya_py.models.ModelInfo` or ``ModelShape``."""
    return {"name": str(model.name), **{key: int(getattr(model, key)) for key in MODEL_FIELDS[1:]}}


def _shape_text(rec: Mapping[str, Any]) -> str:
    return f"{rec['num_layers']} layers, {rec['num_kv_heads']} kv heads, head_dim {rec['head_dim']}"


def fit_to_model(policy: Policy, model: Any, *, force: bool = False) -> tuple[Policy, list[str]]:
    """``(policy, dropped)``: ``policy`` checked against ``model`` (anything with ``name``,
    ``num_layers``, ``num_kv_heads``, ``head_dim``).

    It does not fit when it records another model shape (``Policy.model``) or names layers
    outside ``[-num_layers, num_layers)`` in ``overrides``, ``layers`` or ``exact_layers``.
    Then :class:`PolicyModelError` names the mismatch, unless ``force``: the settings that
    fit are kept, the others dropped, and ``dropped`` says what was dropped or mismatched
    (for a warning; the policy's description records it too).
    """
    n = int(model.num_layers)
    here = model_record(model)
    made = policy.model
    diffs = [key for key in MODEL_FIELDS[1:] if made is not None and made[key] != here[key]]
    outside = {
        "overrides": sorted(k for k in policy.overrides if not -n <= k < n),
        "layers": sorted(i for i in (policy.layers or []) if not -n <= i < n),
        "exact_layers": sorted(i for i in policy.exact_layers if not -n <= i < n),
    }
    outside = {k: v for k, v in outside.items() if v}
    if not diffs and not outside:
        return policy, []
    problems = []
    if diffs:
        problems.append(
            f"it was made for {made['name']} ({_shape_text(made)}); {here['name']} has {_shape_text(here)}"
        )
    problems += [f"its {key} name layers {idx} outside the model's {n}" for key, idx in outside.items()]
    if not force:
        raise PolicyModelError(
            f"policy {policy.name!r} does not fit model {here['name']!r}: {'; '.join(problems)}. Use a "
            f"model-agnostic preset ({', '.join(agnostic_presets())}) or --force-model to apply what fits"
        )
    new = copy.deepcopy(policy)
    new.overrides = {k: v for k, v in new.overrides.items() if -n <= k < n}
    if new.layers is not None:
        new.layers = [i for i in new.layers if -n <= i < n]
    new.exact_layers = [i for i in new.exact_layers if -n <= i < n]
    dropped = [f"{key} for layers {idx}" for key, idx in outside.items()]
    if diffs:
        dropped.append(
            f"nothing else, but the kept settings were chosen for {made['name']} ({_shape_text(made)})"
        )
    note = f"--force-model onto {here['name']} ({_shape_text(here)}): dropped {'; '.join(dropped)}"
    new.description = f"{new.description} [{note}]".strip()
    return new, dropped


def _layer_list(spec: str | Iterable[int]) -> list[int]:
    if isinstance(spec, str):
        spec = spec.strip()
        if spec in ("", "none"):
            return []
        return [int(x) for x in _expand(spec)]
    return [int(x) for x in spec]


def _expand(spec: str) -> list[int]:
    out = []
    for part in spec.replace(" ", "").split(","):
        if "-" in part[1:]:
            cut = part.index("-", 1)
            out.extend(range(int(part[:cut]), int(part[cut + 1 :]) + 1))
        elif part:
            out.append(int(part))
    return out


def preset_names() -> list[str]:
    """Built-in presets and the saved ones in :data:`PRESETS_DIR`."""
    saved = {p.stem for p in PRESETS_DIR.glob("*.json")} if PRESETS_DIR.is_dir() else set()
    return sorted(set(POLICY_PRESETS) | saved)


#: One line per built-in preset for ``--help`` (saved presets use their description).
PRESET_SUMMARIES = {
    "identity": "every codec stage bypassed: exact; stores the model's dtype (0.5x on float32)",
    "recommended": "K 4-bit, V 3-bit (4-bit on 7 layers), mean only, sink exact: 4.03x ACCEPT on test",
    "uniform-ec": "recommended's budget as uniform steps, codes entropy-coded: 4.47x (validation part)",
    "uniform-ec-log8": "uniform-ec with one-byte log scales: 4.70x, MARGINAL on test (CI to +1.02%)",
    "k4v4-sink1-nobasis": "K and V 4-bit on every layer, mean only, sink exact: 3.67x ACCEPT",
    "k4v4-sink1": "K and V 4-bit on every layer, one PCA basis per head, sink exact: 3.00x",
    "k4early-v4": "the first recommended: V 4-bit, K 4-bit on layers 0-11 only: 1.88x",
    "uniform-ec-log8-tuned": "uniform-ec-log8 with per-layer steps from kakeya tune: 5.15x, MARGINAL on test",
    "model-basis": "K in the per-model basis (Σ_q metric, one step), V log8 per-layer steps: 6.14x ACCEPT on test",
}


def preset_info(name: str) -> tuple[str, dict[str, Any] | None]:
    """``(one-line summary, model record or None)`` of a preset, without building it."""
    if name in POLICY_PRESETS:
        d = POLICY_PRESETS[name]
    else:
        d = json.loads((PRESETS_DIR / f"{name}.json").read_text())
    summary = PRESET_SUMMARIES.get(name) or str(d.get("description", "")).split(". ")[0]
    return (summary if len(summary) <= 90 else summary[:87] + "..."), d.get("model")


def agnostic_presets() -> list[str]:
    """Presets without per-layer settings for one model: usable on any model."""
    return [name for name in preset_names() if preset_info(name)[1] is None]


def presets_help() -> str:
    """The preset list of ``--help``: one line each, the model-specific ones marked."""
    lines = []
    for name in preset_names():
        summary, model = preset_info(name)
        only = f" [{model['name']} only]" if model else ""
        lines.append(f"  {name:<21} {summary}{only}")
    return "\n".join(lines)


def preset_policy(name: str) -> Policy:
    """A named policy preset: built in (``identity``, ``recommended``) or saved as
    ``presets/NAME.json`` (e.g. by ``kakeya tune --save-preset NAME``)."""
    if name in POLICY_PRESETS:
        d = dict(POLICY_PRESETS[name])
        if name != "identity":  # identity chooses nothing
            d["provenance"] = _chosen_on_validation()
        return Policy.from_dict(d, name=name)
    path = PRESETS_DIR / f"{name}.json"
    if "/" not in name and path.is_file():
        return load_policy(str(path))
    raise ValueError(f"unknown policy preset {name!r}; known: {preset_names()}")


def load_policy(spec: str) -> Policy:
    """``--config``: a preset name, or a JSON file holding a policy.

    A JSON file holding a bare codec config (keys such as ``bits``) is accepted too and
    applied to both streams on every layer.
    """
    if spec in POLICY_PRESETS or ("/" not in spec and (PRESETS_DIR / f"{spec}.json").is_file()):
        return preset_policy(spec)
    path = Path(spec).expanduser()
    if not path.is_file():
        raise ValueError(f"--config {spec!r} is neither a preset ({preset_names()}) nor a file")
    d = json.loads(path.read_text())
    if not isinstance(d, dict):
        raise ValueError(f"{path} must hold a JSON object")
    if not ({"k", "v", "exact_layers", "overrides", "streams"} & set(d)):
        d = {"k": d, "v": d}
    policy = Policy.from_dict(d, name=d.get("name", path.stem))
    for name in ("sigma_q", "basis"):
        value = getattr(policy, name)
        if value is not None and not os.path.isabs(value):
            setattr(policy, name, _resolve_artifact(value, path.parent))
    return policy


def _resolve_artifact(value: str, folder: Path) -> str:
    """A relative artifact path of a policy file: beside the file, else from the repository root
    (presets name ``calibration/<model>/...``)."""
    here = folder / value
    if here.exists():
        return str(here.resolve())
    root = Path(__file__).resolve().parents[2] / value
    return str(root.resolve()) if root.exists() else str(here.resolve())


# -- Σ_q ---------------------------------------------------------------------------------
@dataclass
class SigmaQ:
    """Per-layer Cholesky factors ``L [kv_heads, D, D]`` and the text they were fitted on."""

    path: str
    factors: dict[int, Any]  # layer -> float32 tensor
    text: dict[str, Any] | None
    meta: dict[str, Any]


def load_sigma_q(path: str | os.PathLike, *, num_layers: int, num_kv_heads: int, head_dim: int) -> SigmaQ:
    """Load and validate a ``sigma_q.safetensors`` file (see the module doc)."""
    from safetensors import safe_open

    p = Path(path).expanduser()
    if not p.is_file():
        raise ValueError(f"Σ_q file {p} not found")
    factors = {}
    with safe_open(str(p), framework="pt") as f:
        meta = dict(f.metadata() or {})
        keys = set(f.keys())
        for layer in range(num_layers):
            key = f"layers.{layer}.L"
            if key not in keys:
                raise ValueError(f"{p} has no tensor {key!r} (expected one per layer, {num_layers} layers)")
            t = f.get_tensor(key).float().contiguous()
            if tuple(t.shape) != (num_kv_heads, head_dim, head_dim):
                raise ValueError(
                    f"{p}: {key} has shape {tuple(t.shape)}, expected {(num_kv_heads, head_dim, head_dim)}"
                )
            factors[layer] = t
    sidecar = p.with_suffix(".json")
    text = None
    if sidecar.is_file():
        side = json.loads(sidecar.read_text())
        text = side.get("text")
        meta = {**meta, **{k: v for k, v in side.items() if k != "text"}}
    return SigmaQ(str(p), factors, text, meta)


# -- applying a policy -------------------------------------------------------------------
RoundtripFn = Callable[..., tuple[Any, int]]


class PolicyCodec:
    """Round-trips ``[tokens, kv_heads, head_dim]`` tensors as a policy says.

    Args:
        policy: the :class:`Policy`.
        num_layers: layers of the model (resolves negative indices).
        sigma_q: loaded :class:`SigmaQ` when the policy names one.
        threads: codec threads (None = the codec's default).
        roundtrip_fn: the codec; ``kakeya_py.roundtrip`` unless a test passes a stand-in.
    """

    def __init__(
        self,
        policy: Policy,
        num_layers: int,
        *,
        sigma_q: SigmaQ | None = None,
        threads: int | None = None,
        roundtrip_fn: RoundtripFn | None = None,
    ):
        self.policy = policy
        self.num_layers = num_layers
        self.sigma_q = sigma_q
        self.threads = threads
        self._roundtrip = roundtrip_fn if roundtrip_fn is not None else _codec().roundtrip
        self._configs = {
            (layer, s): policy.config_for(layer, s, num_layers)
            for layer in range(num_layers)
            for s in STREAMS
        }
        needs_sigma = any(
            c is not None and s == "k" and getattr(c, "metric", "mse") == "inner_product"
            for (_, s), c in self._configs.items()
        )
        if needs_sigma and sigma_q is None:
            raise ValueError("the policy uses metric='inner_product' for K but no Σ_q was loaded")
        self.basis = None
        hashes = {c.transform for c in self._configs.values() if c is not None and c.transform}
        if hashes:
            from .calibration.model_basis import load_basis

            self.basis = load_basis(policy.basis)
            if hashes != {self.basis.sha256}:
                raise ValueError(
                    f"the policy's configs name model basis {sorted(h[:16] for h in hashes)}, but "
                    f"{policy.basis} has SHA-256 {self.basis.sha256[:16]}…"
                )

    def config(self, layer: int, stream: str):
        return self._configs[(layer, stream)]

    def active(self) -> list[tuple[int, str]]:
        return [key for key, c in self._configs.items() if c is not None]

    def roundtrip(self, layer: int, stream: str, x) -> tuple[Any, int | None]:
        """``(decoded, nbytes)``; ``(x, None)`` when the policy keeps this tensor exact."""
        cfg = self._configs[(layer, stream)]
        if cfg is None:
            return x, None
        fn = codec_fn(
            self._roundtrip, cfg, layer, stream, sigma_q=self.sigma_q, basis=self.basis, threads=self.threads
        )
        return roundtrip_after_sink(x, self.policy.sink_tokens, fn, self.policy.window_tokens)


def codec_fn(
    roundtrip: RoundtripFn,
    cfg,
    layer: int,
    stream: str,
    *,
    sigma_q=None,
    basis=None,
    threads: int | None = None,
) -> Callable[[Any], tuple[Any, int]]:
    """The codec's round trip of one (layer, stream) tensor under ``cfg``: with K's Σ_q
    pre-conditioner where the metric asks for it, in the model basis where ``cfg`` names one
    (``PolicyCodec`` and ``kakeya tune``'s ``LadderCodec``)."""
    kwargs: dict[str, Any] = {}
    if stream == "k" and getattr(cfg, "metric", "mse") == "inner_product":
        kwargs["preconditioner"] = sigma_q.factors[layer]
    if threads is not None:
        kwargs["threads"] = threads
    fn = lambda rest: roundtrip(rest, cfg, **kwargs)  # noqa: E731
    return in_basis(basis, layer, stream, fn) if cfg.transform else fn


def in_basis(basis, layer: int, stream: str, fn: Callable[[Any], tuple[Any, int]]):
    """``fn`` applied to the coefficients ``T x`` of a :class:`~kakeya_py.calibration.model_basis.ModelBasis`
    and the result mapped back by ``T⁻¹`` (``PolicyCodec`` and ``kakeya tune``'s ``LadderCodec``)."""

    def roundtrip(rest):
        coded, nbytes = fn(basis.apply(layer, stream, rest))
        return basis.invert(layer, stream, coded).to(rest.dtype), nbytes

    return roundtrip


def roundtrip_after_sink(
    x, sink_tokens: int, roundtrip: Callable[[Any], tuple[Any, int]], window_tokens: int = 0
) -> tuple[Any, int | None]:
    """``roundtrip`` of ``x[sink_tokens : T - window_tokens]`` (``[T, H, D]``) with the leading
    (sink) and trailing (recent window) positions kept exact, their bytes counted at bf16;
    ``(x, None)`` when every position is exact."""
    sink = min(sink_tokens, x.shape[0])
    window = min(window_tokens, x.shape[0] - sink)
    if sink == 0 and window == 0:
        return roundtrip(x.contiguous())
    if sink + window == x.shape[0]:
        return x, None
    import torch

    end = x.shape[0] - window
    rest, nbytes = roundtrip(x[sink:end].contiguous())
    exact_bytes = (x[:sink].numel() + x[end:].numel()) * BF16_BYTES
    return torch.cat([x[:sink], rest.to(x.dtype), x[end:]]), nbytes + exact_bytes


class Ledger:
    """Byte accounting of the cache actually produced, per (layer, stream)."""

    def __init__(self):
        self.raw = defaultdict(int)  # bf16 bytes of the tensor
        self.stored = defaultdict(int)  # bytes held: encoded size, or bf16 size if exact
        self.compressed = defaultdict(bool)

    def add(self, layer: int, stream: str, numel: int, nbytes: int | None) -> None:
        key = (layer, stream)
        self.raw[key] += numel * BF16_BYTES
        self.stored[key] += numel * BF16_BYTES if nbytes is None else int(nbytes)
        self.compressed[key] |= nbytes is not None

    def merge(self, other: Ledger) -> None:
        for key in other.raw:
            self.raw[key] += other.raw[key]
            self.stored[key] += other.stored[key]
            self.compressed[key] |= other.compressed[key]

    @staticmethod
    def _ratio(raw: int, stored: int) -> float | None:
        return raw / stored if stored else None

    def ratio(self, stream: str | None = None, layer: int | None = None) -> float | None:
        keys = [
            k for k in self.raw if (stream is None or k[1] == stream) and (layer is None or k[0] == layer)
        ]
        return self._ratio(sum(self.raw[k] for k in keys), sum(self.stored[k] for k in keys))

    def to_dict(self) -> dict[str, Any]:
        layers = sorted({k[0] for k in self.raw})
        return {
            "ratio_measured": self.ratio(),
            "ratio_k": self.ratio("k"),
            "ratio_v": self.ratio("v"),
            "bytes_bf16": sum(self.raw.values()),
            "bytes_stored": sum(self.stored.values()),
            "per_layer": [
                {
                    "layer": layer,
                    **{
                        f"{s}": {
                            "compressed": self.compressed[(layer, s)],
                            "bytes_bf16": self.raw[(layer, s)],
                            "bytes_stored": self.stored[(layer, s)],
                            "ratio": self._ratio(self.raw[(layer, s)], self.stored[(layer, s)]),
                        }
                        for s in STREAMS
                        if (layer, s) in self.raw
                    },
                }
                for layer in layers
            ],
        }
