"""Peer methods by name, and a peer method applied as a policy.

:func:`parse_method` makes a method from its spec (:data:`PEER_METHODS`, options in
parentheses); :func:`peer_roundtrip` codes a tensor with one, keeping a sink and a recent
window exact; :class:`PeerPolicy` applies a method with the policy-style selections (layers,
streams, per-layer overrides of the same family) and reads and writes its JSON;
:func:`load_peer_policy` turns ``--config`` into one.

Methods (``parse_method``), one module each: ``fp8`` (:mod:`~kakeya_py.peers.fp8`),
``int2`` ... ``int8`` (:mod:`~kakeya_py.peers.int_group`), ``kivi-2`` / ``kivi-3`` / ``kivi-4``
(:mod:`~kakeya_py.peers.kivi`), ``turbo-2`` / ``turbo-3`` / ``turbo-4``
(:mod:`~kakeya_py.peers.turbo`), ``kvquant-2`` / ``kvquant-3`` / ``kvquant-4``
(:mod:`~kakeya_py.peers.kvquant`); what they share: :mod:`~kakeya_py.peers.base`.

All methods apply to every layer (none of the papers keeps boundary layers exact);
``exact_layers`` (``--exact-layers``) restricts them like our policies.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..eval.hooks import K_POSITIONS, STREAMS, parse_layers, parse_streams
from .base import PeerMethod
from .fp8 import FP8
from .int_group import IntGroup
from .kivi import KIVI
from .kvquant import KVQuant
from .turbo import TurboQuant

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


def split_methods(text: str) -> list[str]:
    """Split a comma list, keeping commas inside parentheses (``kivi-2(g=32,r=0),int4``)."""
    out, depth, cur = [], 0, ""
    for ch in text:
        if ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
            continue
        depth += (ch == "(") - (ch == ")")
        cur += ch
    out.append(cur.strip())
    methods = [m for m in out if m]
    if len(set(methods)) != len(methods):
        raise ValueError(f"--methods lists a method twice: {methods}")
    return methods


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
