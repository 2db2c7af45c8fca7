"""The search space of ``kakeya tune``: a ladder of settings per stream, coded once per tensor.

Search space
------------
A *ladder* per stream: candidate stream configs ordered from most exact to most
compressed. The default (:data:`DEFAULT_LADDER`) is ``exact (null) -> 4-bit -> 3-bit ->
2-bit``, each one basis per head, ``block_size`` 4096, outliers beyond 3σ (the codec
settings of the ``recommended`` preset). ``--ladder FILE`` gives any other ladder as JSON,
``{"k": [null, {...}, ...], "v": [...], "description": "..."}`` or a bare list used for
both streams; a rung is a codec config dict (any field ``CodecConfig.from_dict`` accepts,
e.g. ``"allocation"``, ``"centroids"``, ``"metric": "inner_product"`` with ``--sigma-q``),
a peer method spec (below) or ``null`` (exact). Every (layer, stream) the search may touch (``--layers``,
``--streams``) sits at one rung; all start at rung 0.

Rungs that code in a per-model basis (``"rotation": "none"``, ``"transform": <SHA-256>``;
:mod:`kakeya_py.calibration.model_basis`) need the basis file: the ladder's top-level ``"basis"`` (a
path, resolved beside the ladder file, else from the repository root, as a policy's) or
``--basis PATH`` (which wins). Each such rung is coded as :class:`~kakeya_py.policy.PolicyCodec`
codes it (``T x`` encoded, ``T⁻¹`` applied to the decoded coefficients); a rung naming another
SHA-256 than the loaded basis is refused. The written policy names the basis (``basis``) and
records the text the basis was fitted on among its ``provenance`` (role ``fit``).

Peer rungs: a rung may instead be a peer method spec (any spec
:func:`kakeya_py.peers.parse_method` accepts: ``"turbo-4"``, ``"kivi-2"``, ``"kivi-2(r=0)"``), so
that a peer family gets the same search, budgets, passages and selection as ours
(``reports/tune/ladder_turbo.json``, ``ladder_kivi.json``). A ladder's rungs are all kakeya configs
or all peer specs of one family (anything else is refused). Each peer rung is coded as
:class:`~kakeya_py.peers.PeerPolicy` codes it (:func:`~kakeya_py.peers.peer_roundtrip`: the
``--sink-tokens`` positions exact and counted at bf16, unless the method keeps a sink of its own;
bytes measured from the method's stored arrays), and the written ``policy.json`` is a per-layer
:class:`~kakeya_py.peers.PeerPolicy` (``method``: the family; ``peer``: the most common rung;
``overrides``: per layer, the spec of every other (layer, stream) or null = exact), which
``kakeya eval --config`` runs. ``--sigma-q``, ``--basis`` and ``--save-preset`` do not apply.

:class:`LadderCodec` codes the (layer, stream) of a state at its rung (each round trip once per
passage, kept for every variant and round); :func:`reusing_runner` gives the ``HFRunner`` that
computes each passage's prefill and codec-off reference once.
"""

from __future__ import annotations

import copy
import json
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import policy as _policy
from ..eval.hooks import STREAMS
from ..peers import parse_family_specs, parse_peer_spec, peer_roundtrip
from ..policy import SigmaQ, codec_fn, roundtrip_after_sink

_RUNG = {"block_size": 4096, "share_basis": True, "outlier_threshold": 3.0}
DEFAULT_LADDER: dict[str, Any] = {
    "description": "exact -> 4-bit -> 3-bit -> 2-bit; one basis per head, block 4096, outliers beyond 3 sigma",
    "k": [None, {"bits": 4, **_RUNG}, {"bits": 3, **_RUNG}, {"bits": 2, **_RUNG}],
    "v": [None, {"bits": 4, **_RUNG}, {"bits": 3, **_RUNG}, {"bits": 2, **_RUNG}],
}
#: Round trips LadderCodec keeps for reuse across variants and rounds (least recently used go first).
DEFAULT_CACHE_BYTES = 6 << 30


# -- ladder ------------------------------------------------------------------------------------
@dataclass
class Ladder:
    """Per stream, the rungs (codec config dicts, or peer method specs such as ``"turbo-4"``,
    or None = exact), most exact first; ``basis``: the model basis file of rungs with
    ``transform`` (module doc). ``peer``: the peer family of a peer ladder, else None."""

    rungs: dict[str, list[dict[str, Any] | str | None]]
    description: str = ""
    basis: str | None = None
    configs: dict[str, list[Any]] = field(default_factory=dict, repr=False)
    peer: str | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        import kakeya_py

        kinds = set()
        for s in STREAMS:
            rungs = self.rungs.get(s)
            if not rungs:
                raise ValueError(f"ladder: stream {s!r} needs at least one rung")
            for i, r in enumerate(rungs):
                if r is not None and not isinstance(r, Mapping | str):
                    raise ValueError(
                        f"ladder: rung {i} of {s!r} must be a config object, a peer method spec or null"
                    )
                if r is not None:
                    kinds.add("peer" if isinstance(r, str) else "kakeya")
        if len(kinds) > 1:
            raise ValueError(
                "ladder: kakeya configs and peer method specs in one ladder are not supported; "
                "give a ladder of one kind"
            )
        if "peer" in kinds:
            if self.basis is not None:
                raise ValueError("ladder: 'basis' is for kakeya rungs; a peer ladder has none")
            for s in STREAMS:
                self.configs[s] = [
                    None if r is None else parse_peer_spec(r, f"ladder: rung {i} of {s!r}")
                    for i, r in enumerate(self.rungs[s])
                ]
            specs = [r for s in STREAMS for r in self.rungs[s] if r is not None]
            self.peer = next(iter(parse_family_specs(specs, "ladder").values())).family
            return
        for s in STREAMS:
            self.configs[s] = [
                None if r is None else kakeya_py.CodecConfig.from_dict(dict(r))  # validates
                for r in self.rungs[s]
            ]

    @classmethod
    def from_dict(cls, d: Any) -> Ladder:
        if isinstance(d, list):
            d = {"k": d, "v": d}
        if not isinstance(d, Mapping):
            raise ValueError("a ladder is a JSON list of rungs or an object with 'k' and 'v' lists")
        unknown = set(d) - {"k", "v", "description", "basis"}
        if unknown:
            raise ValueError(f"ladder: unknown fields {sorted(unknown)}")
        if d.get("basis") is not None and not isinstance(d["basis"], str):
            raise ValueError("ladder: 'basis' must be the path of a model basis file")
        rungs = {s: copy.deepcopy(list(d.get(s, [None]))) for s in STREAMS}
        return cls(rungs, d.get("description", ""), d.get("basis"))

    @classmethod
    def load(cls, spec: str | None) -> Ladder:
        """``None``: :data:`DEFAULT_LADDER`; else a JSON file (a relative ``basis`` is resolved
        beside it, else from the repository root)."""
        if spec is None:
            return cls.from_dict(copy.deepcopy(DEFAULT_LADDER))
        path = Path(spec).expanduser()
        if not path.is_file():
            raise ValueError(f"--ladder {spec!r}: no such file")
        ladder = cls.from_dict(json.loads(path.read_text()))
        if ladder.basis is not None and not Path(ladder.basis).is_absolute():
            ladder.basis = _policy._resolve_artifact(ladder.basis, path.parent)
        return ladder

    def depth(self, stream: str) -> int:
        return len(self.rungs[stream])

    def to_dict(self) -> dict[str, Any]:
        d = {"description": self.description, **{s: copy.deepcopy(self.rungs[s]) for s in STREAMS}}
        if self.basis is not None:
            d["basis"] = artifact_ref(self.basis)
        return d

    def needs_sigma_q(self) -> bool:
        return any(
            c is not None and getattr(c, "metric", "mse") == "inner_product" for c in self.configs["k"]
        )

    def transforms(self) -> set[str]:
        """The model bases (SHA-256) the rungs are coded in."""
        return {
            c.transform
            for s in STREAMS
            for c in self.configs[s]
            if c is not None and getattr(c, "transform", None)
        }


class LadderCodec:
    """Transforms for states of the ladder; each (layer, stream, rung) of a tensor is encoded once.

    The cache holds the input tensor itself next to its result, so a hit (same storage,
    shape, strides, dtype) is always the same data: the search reuses each passage's
    prefill (:class:`ReusingRunner`), so round trips are shared by every variant and round.

    Rungs with ``transform`` are coded in the model basis (``basis``, a loaded
    :class:`~kakeya_py.calibration.model_basis.ModelBasis`, else loaded from ``ladder.basis``), as
    :class:`~kakeya_py.policy.PolicyCodec` codes them. Peer rungs are coded as
    :class:`~kakeya_py.peers.PeerPolicy` codes them (:func:`~kakeya_py.peers.peer_roundtrip`:
    the sink kept exact and counted at bf16 unless the method keeps a sink of its own).
    """

    def __init__(
        self,
        ladder: Ladder,
        *,
        sigma_q: SigmaQ | None = None,
        basis=None,
        threads: int | None = None,
        roundtrip_fn: Callable[..., tuple[Any, int]] | None = None,
        sink_tokens: int = 0,
        max_cache_bytes: int = DEFAULT_CACHE_BYTES,
    ):
        import kakeya_py

        if ladder.needs_sigma_q() and sigma_q is None:
            raise ValueError("the ladder uses metric='inner_product' for K, which needs --sigma-q")
        hashes = ladder.transforms()
        if hashes and basis is None:
            if ladder.basis is None:
                raise ValueError(
                    "the ladder has rungs coded in a model basis ('transform'), which need the basis file "
                    "(the ladder's 'basis' or --basis)"
                )
            from ..calibration.model_basis import load_basis

            basis = load_basis(ladder.basis)
        if hashes and hashes != {basis.sha256}:
            raise ValueError(
                f"the ladder's rungs name model basis {sorted(h[:16] for h in hashes)}, but "
                f"{basis.path} has SHA-256 {basis.sha256[:16]}…"
            )
        self.basis = basis if hashes else None
        self.ladder = ladder
        self.sigma_q = sigma_q
        self.threads = threads
        self._roundtrip = roundtrip_fn if roundtrip_fn is not None else kakeya_py.roundtrip
        self.sink_tokens = sink_tokens
        # least recently used first; bounded because a 16-passage search at ctx 1024 kept
        # every round trip and outgrew a 24 GB machine
        self._cache: OrderedDict[tuple, tuple[Any, Any, int]] = OrderedDict()
        self._cache_bytes = 0
        self.max_cache_bytes = int(max_cache_bytes)
        self.encodes = 0

    def clear(self) -> None:
        self._cache.clear()
        self._cache_bytes = 0

    def roundtrip(self, layer: int, stream: str, rung: int, x):
        cfg = self.ladder.configs[stream][rung]
        if cfg is None:
            return x, None
        key = (layer, stream, rung, x.data_ptr(), tuple(x.shape), tuple(x.stride()), str(x.dtype))
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit[1], hit[2]
        if self.ladder.peer is not None:
            out, nbytes = peer_roundtrip(cfg, layer, stream, x, self.sink_tokens)
        else:
            out, nbytes = roundtrip_after_sink(
                x,
                self.sink_tokens,
                codec_fn(
                    self._roundtrip,
                    cfg,
                    layer,
                    stream,
                    sigma_q=self.sigma_q,
                    basis=self.basis,
                    threads=self.threads,
                ),
            )
        self.encodes += 1
        if nbytes is None:  # every position is a sink: stored exact
            return x, None
        self._cache[key] = (x, out, int(nbytes))
        self._cache_bytes += out.numel() * out.element_size()
        while self._cache_bytes > self.max_cache_bytes and len(self._cache) > 1:
            _, (_, old, _) = self._cache.popitem(last=False)
            self._cache_bytes -= old.numel() * old.element_size()
        return out, int(nbytes)

    def transform(self, state: Mapping[tuple[int, str], int]):
        state = dict(state)

        def fn(layer: int, stream: str, x):
            rung = state.get((layer, stream))
            return (x, None) if rung is None else self.roundtrip(layer, stream, rung, x)

        return fn


def _reusing_runner_class():
    from ..eval.harness import HFRunner

    class ReusingRunner(HFRunner):
        """An :class:`HFRunner` that computes each passage's prefill and codec-off reference once.

        ``run`` calls ``prefill`` and the reference ``eval_logits`` for every passage of
        every call; the search makes many calls on the same passages, so both are memoized
        (by token ids). The prefix state is never modified by a variant (``build_cache``
        makes a fresh cache), which is what lets ``run`` share it between variants too.
        """

        def __init__(self, model, *, k_position: str = "pre_rope"):
            super().__init__(model, k_position=k_position)
            self._states: dict[tuple[int, ...], Any] = {}
            self._refs: dict[tuple[int, tuple[int, ...]], Any] = {}

        def prefill(self, prefix_ids):
            key = tuple(prefix_ids.reshape(-1).tolist())
            if key not in self._states:
                self._states[key] = super().prefill(prefix_ids)
            return self._states[key]

        def eval_logits(self, state, eval_ids, replacements=None, k_position=None):
            if replacements:
                return super().eval_logits(state, eval_ids, replacements, k_position)
            key = (id(state), tuple(eval_ids.reshape(-1).tolist()))
            if key not in self._refs:
                self._refs[key] = super().eval_logits(state, eval_ids)
            return self._refs[key]

        def forget(self) -> None:
            self._states.clear()
            self._refs.clear()

    return ReusingRunner


def reusing_runner(model, *, k_position: str = "pre_rope"):
    """A runner that memoizes prefills and references (see the ``ReusingRunner`` class doc)."""
    return _reusing_runner_class()(model, k_position=k_position)


def artifact_ref(path: str | None) -> str | None:
    """An artifact path as a written policy names it: relative to the repository root when it
    lies inside it (``load_policy`` resolves such paths from there), else unchanged."""
    if path is None:
        return None
    root = Path(_policy.__file__).resolve().parents[2]
    try:
        return str(Path(path).resolve().relative_to(root))
    except ValueError:
        return path
