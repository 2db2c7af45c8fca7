"""``kakeya tune``: search per-(layer, stream) codec settings for the highest measured ratio
within a Δppl budget, and write the winner as a policy (and optionally a preset).

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

Algorithm (every measurement: snapshot mode, pooled-NLL Δppl, top-1, KL and the bytes of
the :class:`~kakeya_py.policy.Ledger`, against **one** codec-off reference per passage;
the prefill and reference pass of each passage are computed once and reused by every
:meth:`HFRunner.run` of the search, and each (layer, stream, rung) round trip is encoded
once per passage)

1. **Sensitivity.** One run with one variant per (layer, stream, rung ≥ 1): that
   (layer, stream) at that rung, everything else at rung 0, plus the all-rung-0 base.
   This gives, per (layer, stream, rung), Δppl ``d``, top-1 ``t``, mean KL ``κ`` and the
   stored bytes ``b`` (measured; in snapshot mode the bytes of one (layer, stream) do not
   depend on the others, so the bytes of any combination are the sum).
2. **Greedy.** A *step* moves one (layer, stream) from rung ``r`` to the nearest lower
   rung ``r'`` that stores fewer bytes and that passes the budget on its own
   (``|d| ≤ budget``, or ``d ≤ budget`` with ``--one-sided``, and ``t ≥ min_top1``; a
   (layer, stream) with no such rung stays where it is). Its gain is ``b_r − b_r'``, its cost (``--cost``):

   - ``dppl``: ``max(d_r' − d_r, κ_r' − κ_r)``, the Δppl increase, or the KL increase
     when larger (KL(ref‖alt) is the expected NLL increase under the model's own
     distribution: a steadier estimate of what a step costs than the Δppl of a few tokens);
   - ``budget`` (default): the larger of that cost divided by the budget and the top-1
     drop ``t_r − t_r'`` divided by the top-1 slack ``1 − min_top1`` (the share of the
     tightest constraint the step uses; top-1 is the binding constraint on SmolLM2);
   - ``kl``: ``κ_r' − κ_r``.

   ``--budget-kl K`` adds a bound on the mean KL to "passes the budget" (for single
   steps, whole policies and the selection of step 4), and with ``--cost budget`` the KL
   increase over ``K`` joins the shares. KL is far steadier than the Δppl of a few
   thousand tokens: along one search path on SmolLM2 the KL of each state on the search
   and on the validation passages agreed within 20% (and within 10% on the evaluation
   text for the two states measured there), while Δppl differed by up to 2 points.

   Costs are floored at 1e-9. Steps are taken by decreasing gain/cost (ties: smaller KL
   increase, then layer, then stream). Δppl is not additive, so every
   ``--check-every`` steps the *whole* candidate policy is re-measured: the cumulative
   policies after 1, 2, …, ``check_every`` further steps are variants of one run; the
   longest prefix whose policy passes the budget (``|Δppl| ≤ budget`` and top-1 ≥
   ``min_top1``) is kept, and the (layer, stream) of the first step after it is frozen
   at its current rung (back-off). The search ends when no step is left, after
   ``--patience`` rounds in a row that kept nothing, or after ``--max-rounds`` rounds.
3. **Held-out validation.** The search passages are windows of the *calibration* part
   and the validation passages windows of the *validation* part (:mod:`kakeya_py.eval.corpus`;
   the test part is never read): with ``M`` disjoint windows of ``ctx + n_eval + 1`` tokens
   in a part, ``numpy.random.default_rng(seed).choice(M, n, replace=False)`` picks them
   (sorted). A single ``--text-file`` is every part: then one draw picks ``passages +
   val_passages`` windows, the first for the search and the rest for validation, so the two
   sets never share a token. The written policy records both as its ``provenance`` (roles
   ``fit`` and ``selection``), and ``kakeya eval`` refuses to report it on those articles. The winner (built as a :class:`~kakeya_py.policy.Policy` and applied
   through :class:`~kakeya_py.policy.PolicyCodec`, i.e. exactly what ``policy.json``
   says) is measured on the search passages and on the validation passages, next to the
   ``--compare`` policies (default ``recommended``) on the same validation reference;
   both are recorded with Δppl, its 95% bootstrap CI, top-1, KL, measured ratio and verdict.
4. **Selection** (``--select validation``, the default when there are validation
   passages; it runs before the measurements of step 3, which then describe the written
   policy). The greedy search walks up to the edge of its budget on a few thousand
   tokens and so partly fits their noise: on SmolLM2 its endpoint has passed on the
   search passages and failed on the validation ones. Every state the search passed
   through (the base, then the state after each round that kept a step; the ratio rises
   along this path) is measured on the validation passages, and the most compressed one
   that passes the budget there is written. The validation passages then took part in
   the choice: the record says so, and the honest figure is ``kakeya eval`` on other
   text. ``--select greedy`` writes the endpoint. ``--reuse-search TUNE_JSON`` takes
   steps 1 and 2 from an earlier record (same model, passages, ladder and settings;
   checked) and redoes only steps 4 and 3.

Everything is deterministic given ``--seed`` (passages, bootstrap, codec seeds in the
configs, tie-breaking).

Outputs (``--out DIR``): ``policy.json`` (complete policy; ``kakeya eval --config
DIR/policy.json``; the description records the budget and the command), ``tune.json``
(settings, passages, sensitivity, every round's candidates with their measurements,
final and validation results, the path and the selection), ``tune.md`` (summary and
command), ``tune_path.png`` (Δppl, top-1 and KL along the path on both passage sets). ``--save-preset NAME``
also writes ``kakeya_py/presets/NAME.json``, which ``load_policy(NAME)`` resolves.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import shlex
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import policy as _policy
from ..eval.hooks import STREAMS, parse_layers
from ..peers import PeerPolicy, parse_family_specs, parse_peer_spec, peer_roundtrip
from ..policy import (
    POLICY_PRESETS,
    Policy,
    PolicyCodec,
    SigmaQ,
    codec_fn,
    load_policy,
    roundtrip_after_sink,
)

_RUNG = {"block_size": 4096, "share_basis": True, "outlier_threshold": 3.0}
DEFAULT_LADDER: dict[str, Any] = {
    "description": "exact -> 4-bit -> 3-bit -> 2-bit; one basis per head, block 4096, outliers beyond 3 sigma",
    "k": [None, {"bits": 4, **_RUNG}, {"bits": 3, **_RUNG}, {"bits": 2, **_RUNG}],
    "v": [None, {"bits": 4, **_RUNG}, {"bits": 3, **_RUNG}, {"bits": 2, **_RUNG}],
}
COSTS = ("budget", "dppl", "kl")
COST_FLOOR = 1e-9
DEFAULT_OUT = "reports/tune"
#: Round trips LadderCodec keeps for reuse across variants and rounds (least recently used go first).
DEFAULT_CACHE_BYTES = 6 << 30

State = dict[tuple[int, str], int]


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


# -- measurement -------------------------------------------------------------------------------
def _summary(res, seed: int) -> dict[str, Any]:
    s = res.summary(seed=seed)
    keep = ("dppl", "dppl_ci95", "top1", "kl_mean", "kl_p95", "eval_tokens", "verdict")
    out = {k: s[k] for k in keep}
    out["ratio"] = res.ledger.ratio()
    out["bytes_stored"] = sum(res.ledger.stored.values())
    out["bytes_bf16"] = sum(res.ledger.raw.values())
    return out


def measure(runner, passages, variants, *, seed: int, progress: bool, desc: str):
    """``(rows, results)``: :func:`_summary` of every variant, and the raw results."""
    results, _ = runner.run(passages, variants, mode="snapshot", progress=progress, desc=desc)
    return [_summary(r, seed) for r in results], results


def passes(row: Mapping[str, Any], budget: float, min_top1: float, *, two_sided: bool = True) -> bool:
    """``|Δppl| ≤ budget`` (``Δppl ≤ budget`` when one-sided) and ``top-1 ≥ min_top1``."""
    d = abs(row["dppl"]) if two_sided else row["dppl"]
    return d <= budget and row["top1"] >= min_top1


# -- search ------------------------------------------------------------------------------------
@dataclass
class TuneSettings:
    budget_dppl: float = 0.01
    min_top1: float = 0.95
    cost: str = "budget"
    check_every: int = 8
    max_rounds: int = 50
    patience: int = 3
    seed: int = 0
    two_sided: bool = True  # False: a lower perplexity does not count against the budget
    budget_kl: float | None = None  # also a bound on the mean KL(ref || codec)

    def ok(self, row: Mapping[str, Any]) -> bool:
        if self.budget_kl is not None and not (row.get("kl_mean") or 0.0) <= self.budget_kl:
            return False
        return passes(row, self.budget_dppl, self.min_top1, two_sided=self.two_sided)

    @classmethod
    def from_record(cls, d: Mapping[str, Any]) -> TuneSettings:
        """The settings of a ``tune.json`` (fields it predates take their defaults)."""
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})

    def __post_init__(self) -> None:
        if self.cost not in COSTS:
            raise ValueError(f"cost must be one of {COSTS}, got {self.cost!r}")
        if self.budget_dppl < 0 or not 0 <= self.min_top1 <= 1:
            raise ValueError("budget_dppl must be >= 0 and min_top1 in [0, 1]")
        if self.budget_kl is not None and not self.budget_kl >= 0:
            raise ValueError("budget_kl must be >= 0")
        if self.check_every < 1 or self.max_rounds < 0 or self.patience < 1:
            raise ValueError("check_every and patience must be >= 1, max_rounds >= 0")


@dataclass
class TuneResult:
    state: State
    pairs: list[tuple[int, str]]
    base: dict[str, Any]
    sensitivity: list[dict[str, Any]]
    rounds: list[dict[str, Any]]
    search: dict[str, Any]  # measurement of the winner on the search passages (greedy)
    stop_reason: str
    encodes: int
    seconds: float

    def rungs(self) -> dict[str, dict[str, int]]:
        return _rungs(self.state)


def _rungs(state: State) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {s: {} for s in STREAMS}
    for (layer, s), r in sorted(state.items()):
        out[s][str(layer)] = r
    return out


def _state_name(state: State, base: State) -> str:
    moved = [f"{s.upper()}{la}@{r}" for (la, s), r in sorted(state.items()) if r != base.get((la, s), 0)]
    return ",".join(moved) or "base"


class _Table:
    """Sensitivity per (layer, stream, rung): d, t, κ, bytes."""

    def __init__(self, base_row, base_bytes):
        self.base = base_row
        self.base_bytes = base_bytes  # (layer, stream) -> bytes at rung 0
        self.rows: dict[tuple[int, str, int], dict[str, Any]] = {}

    def get(self, layer: int, stream: str, rung: int) -> dict[str, Any]:
        if rung == 0:
            return {**self.base, "bytes": self.base_bytes[(layer, stream)]}
        return self.rows[(layer, stream, rung)]


def _step_for(table: _Table, ladder: Ladder, layer: int, stream: str, rung: int, st: TuneSettings):
    """The best next step of (layer, stream) from ``rung`` (see the module doc), or None."""
    here = table.get(layer, stream, rung)
    for r in range(rung + 1, ladder.depth(stream)):
        there = table.get(layer, stream, r)
        gain = here["bytes"] - there["bytes"]
        if gain <= 0 or not st.ok(there):
            continue
        d_inc = there["dppl"] - here["dppl"]
        kl_inc = (there["kl_mean"] or 0.0) - (here["kl_mean"] or 0.0)
        if st.cost == "kl":
            cost = kl_inc
        else:
            cost = max(d_inc, kl_inc)
            if st.cost == "budget":
                cost = cost / max(st.budget_dppl, COST_FLOOR)
                if st.budget_kl is not None:
                    cost = max(cost, kl_inc / max(st.budget_kl, COST_FLOOR))
                if st.min_top1 > 0:
                    cost = max(cost, (here["top1"] - there["top1"]) / max(1.0 - st.min_top1, COST_FLOOR))
        cost = max(cost, COST_FLOOR)
        return {
            "layer": layer,
            "stream": stream,
            "from": rung,
            "to": r,
            "gain_bytes": int(gain),
            "cost": float(cost),
            "priority": gain / cost,
            "kl_inc": float(kl_inc),
            "dppl_inc": float(d_inc),
        }
    return None


def _best_step(table, ladder, state: State, frozen: set, st: TuneSettings):
    best, best_key = None, None
    for (layer, stream), rung in sorted(state.items()):
        if (layer, stream) in frozen:
            continue
        step = _step_for(table, ladder, layer, stream, rung, st)
        if step is None:
            continue
        key = (-step["priority"], step["kl_inc"], layer, STREAMS.index(stream))
        if best_key is None or key < best_key:
            best, best_key = step, key
    return best


def search(
    runner,
    passages: Sequence[Any],
    ladder: Ladder,
    codec: LadderCodec,
    settings: TuneSettings,
    *,
    layers: Sequence[int] | None = None,
    streams: Sequence[str] = STREAMS,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    previous: Mapping[str, Any] | None = None,
) -> TuneResult:
    """Steps 1 and 2 of the module doc on ``passages``; returns the winning state.

    ``previous``: the ``base`` and ``sensitivity`` of an earlier record on the same
    passages, ladder and pairs (``--reuse-sensitivity``); step 1 is then not re-run.
    """
    from ..eval.harness import Variant

    t0 = time.perf_counter()
    st = settings
    num_layers = runner.num_layers
    layers = list(range(num_layers)) if layers is None else sorted(set(layers))
    pairs = [(la, s) for la in layers for s in STREAMS if s in streams]
    base: State = {p: 0 for p in pairs}
    say = log or (lambda msg: None)

    # 1. sensitivity
    names, states = ["base"], [dict(base)]
    for la, s in pairs:
        for r in range(1, ladder.depth(s)):
            names.append(f"{s.upper()}{la}@{r}")
            states.append({**base, (la, s): r})
    if previous is not None:
        base_row, sensitivity, base_bytes = _reuse(previous, names[1:], pairs)
        table = _Table(base_row, base_bytes)
        for e in sensitivity:
            table.rows[(e["layer"], e["stream"], e["rung"])] = e
    else:
        variants = [Variant(n, codec.transform(x)) for n, x in zip(names, states, strict=True)]
        rows, results = measure(
            runner, passages, variants, seed=st.seed, progress=progress, desc="sensitivity"
        )
        base_row = rows[0]
        table = _Table(base_row, {p: results[0].ledger.stored[p] for p in pairs})
        sensitivity = []
        for name, x, row, res in zip(names[1:], states[1:], rows[1:], results[1:], strict=True):
            (la, s), r = next((p, x[p]) for p in pairs if x[p] != 0)
            entry = {**row, "layer": la, "stream": s, "rung": r, "name": name}
            entry["bytes"] = res.ledger.stored[(la, s)]
            table.rows[(la, s, r)] = entry
            sensitivity.append(entry)
    say(f"sensitivity: {len(sensitivity)} variants; base Δppl {base_row['dppl']:+.4%}")

    # 2. greedy
    state = dict(base)
    current = dict(base_row)
    frozen: set[tuple[int, str]] = set()
    rounds: list[dict[str, Any]] = []
    idle = 0
    stop = "no step left"
    if not st.ok(base_row):
        stop = "the base (rung 0 everywhere) does not pass the budget"
    else:
        for round_no in range(st.max_rounds + 1):
            if round_no == st.max_rounds:
                stop = f"max rounds ({st.max_rounds})"
                break
            sim, batch = dict(state), []
            for _ in range(st.check_every):
                step = _best_step(table, ladder, sim, frozen, st)
                if step is None:
                    break
                sim[(step["layer"], step["stream"])] = step["to"]
                batch.append((step, dict(sim)))
            if not batch:
                stop = "no step left"
                break
            variants = [
                Variant(f"round {round_no} step {i + 1}", codec.transform(x))
                for i, (_, x) in enumerate(batch)
            ]
            brows, _ = measure(
                runner, passages, variants, seed=st.seed, progress=progress, desc=f"round {round_no}"
            )
            ok = [st.ok(r) for r in brows]
            keep = max((i + 1 for i, good in enumerate(ok) if good), default=0)
            entries = []
            for i, ((step, x), row) in enumerate(zip(batch, brows, strict=True)):
                entries.append(
                    {
                        "step": step,
                        "policy": _state_name(x, base),
                        **row,
                        "passes": ok[i],
                        "kept": i < keep,
                    }
                )
            blocked = None
            if keep:
                state = batch[keep - 1][1]
                current = brows[keep - 1]
                idle = 0
            else:
                idle += 1
            if keep < len(batch):
                bad = batch[keep][0]
                blocked = [bad["layer"], bad["stream"]]
                frozen.add((bad["layer"], bad["stream"]))
            rounds.append({"round": round_no, "candidates": entries, "kept": keep, "frozen": blocked})
            say(
                f"round {round_no}: kept {keep}/{len(batch)}; Δppl {current['dppl']:+.4%} top-1 "
                f"{current['top1']:.2%} ratio {current['ratio']:.3f}x"
                + (f"; froze {blocked}" if blocked else "")
            )
            if idle >= st.patience:
                stop = f"{st.patience} rounds in a row kept nothing"
                break
    return TuneResult(
        state=state,
        pairs=pairs,
        base=base_row,
        sensitivity=sensitivity,
        rounds=rounds,
        search=current,
        stop_reason=stop,
        encodes=codec.encodes,
        seconds=time.perf_counter() - t0,
    )


def greedy_path(result: TuneResult) -> list[dict[str, Any]]:
    """The states the greedy search passed through: the base, then the state after every
    round that kept a step, each with its whole-policy measurement on the search passages.
    Bytes only fall along the path, so the ratio rises with it; the last entry is the winner."""
    state: State = {p: 0 for p in result.pairs}
    path = [{"round": None, "state": dict(state), "search": dict(result.base)}]
    for rd in result.rounds:
        kept = [c for c in rd["candidates"] if c["kept"]]
        for c in kept:
            state[(c["step"]["layer"], c["step"]["stream"])] = c["step"]["to"]
        if kept:
            row = {k: v for k, v in kept[-1].items() if k not in ("step", "policy", "passes", "kept")}
            path.append({"round": rd["round"], "state": dict(state), "search": row})
    if path[-1]["state"] != result.state:
        raise ValueError("the rounds of this search do not lead to its final state")
    return path


def select_on_validation(
    runner,
    passages: Sequence[Any],
    codec: LadderCodec,
    path: list[dict[str, Any]],
    settings: TuneSettings,
    *,
    progress: bool = True,
) -> int:
    """Step 4: measure every state of ``path`` on ``passages`` (one run, one variant each;
    the rows land in ``path[i]["validation"]``) and return the index of the most
    compressed state that passes the budget there, or 0 (the base) when none does."""
    from ..eval.harness import Variant

    variants = [
        Variant("base" if e["round"] is None else f"after round {e['round']}", codec.transform(e["state"]))
        for e in path
    ]
    rows, _ = measure(runner, passages, variants, seed=settings.seed, progress=progress, desc="path")
    for e, row in zip(path, rows, strict=True):
        e["validation"] = row
    return max((i for i, row in enumerate(rows) if settings.ok(row)), default=0)


def replay(previous: Mapping[str, Any]) -> TuneResult:
    """The :class:`TuneResult` an earlier record (``tune.json``) describes, without
    measuring anything (``--reuse-search``)."""
    state: State = {(int(la), s): r for s in STREAMS for la, r in previous["rungs"][s].items()}
    result = TuneResult(
        state=state,
        pairs=sorted(state, key=lambda p: (p[0], STREAMS.index(p[1]))),
        base=dict(previous["base"]),
        sensitivity=[dict(e) for e in previous["sensitivity"]],
        rounds=[dict(rd) for rd in previous["rounds"]],
        search={},
        stop_reason=previous["stop_reason"],
        encodes=0,
        seconds=0.0,
    )
    # the path checks that the rounds lead to the recorded rungs; its end is the search result
    result.search = greedy_path(result)[-1]["search"]
    return result


def _reuse(previous: Mapping[str, Any], names: Sequence[str], pairs):
    """``(base_row, sensitivity, base_bytes)`` from an earlier record (see :func:`search`)."""
    sens = [dict(e) for e in previous["sensitivity"]]
    if [e["name"] for e in sens] != list(names):
        raise ValueError("the reused sensitivity was measured on other (layer, stream, rung) variants")
    base_row = dict(previous["base"])
    base_bytes = {}
    for e in sens:  # bytes of the pair at rung 0 = base total - (this variant's total - its pair's bytes)
        base_bytes.setdefault(
            (e["layer"], e["stream"]), base_row["bytes_stored"] - (e["bytes_stored"] - e["bytes"])
        )
    if set(base_bytes) != set(pairs):
        raise ValueError("the reused sensitivity covers other (layer, stream) pairs")
    return base_row, sens, base_bytes


# -- the winner as a policy --------------------------------------------------------------------
def state_policy(
    state: State,
    ladder: Ladder,
    num_layers: int,
    *,
    name: str = "tuned",
    description: str = "",
    sigma_q: str | None = None,
    k_position: str = "pre_rope",
    sink_tokens: int = 0,
    basis: str | None = None,
) -> Policy | PeerPolicy:
    """A :class:`Policy` that gives every (layer, stream) its rung's config (layers and
    streams absent from ``state`` stay exact). Per stream, the most common compressed rung
    is the stream's config and the other layers get overrides (partial dicts, or null).
    ``basis`` (default: the ladder's) is the model basis file of rungs with ``transform``.
    A peer ladder gives a :class:`~kakeya_py.peers.PeerPolicy` (:func:`state_peer_policy`)."""
    if ladder.peer is not None:
        if sigma_q is not None or basis is not None:
            raise ValueError("a peer ladder takes no Σ_q and no model basis")
        return state_peer_policy(
            state,
            ladder,
            num_layers,
            name=name,
            description=description,
            k_position=k_position,
            sink_tokens=sink_tokens,
        )
    full = {s: [None if c is None else c.to_dict() for c in ladder.configs[s]] for s in STREAMS}
    rung_of = {(la, s): state.get((la, s), 0) for la in range(num_layers) for s in STREAMS}
    # a (layer, stream) outside the search is exact, whatever rung 0 is
    exact = {p for p in rung_of if p not in state}
    d: dict[str, Any] = {"name": name, "description": description, "overrides": {}, "k_position": k_position}
    d["sigma_q"] = sigma_q
    d["sink_tokens"] = sink_tokens
    basis = ladder.basis if basis is None else basis
    if basis is not None:
        d["basis"] = basis
    base_rung: dict[str, int | None] = {}
    for s in STREAMS:
        counts = Counter(
            r
            for (la, st), r in rung_of.items()
            if st == s and (la, st) not in exact and full[s][r] is not None
        )
        base_rung[s] = min(counts, key=lambda r: (-counts[r], r)) if counts else None
        d[s] = None if base_rung[s] is None else ladder.rungs[s][base_rung[s]]
    for la in range(num_layers):
        per: dict[str, Any] = {}
        for s in STREAMS:
            r = rung_of[(la, s)]
            want = None if (la, s) in exact else full[s][r]
            if base_rung[s] is not None and r == base_rung[s] and (la, s) not in exact:
                continue
            if want is None:
                if base_rung[s] is not None:
                    per[s] = None
                continue
            if base_rung[s] is None:
                per[s] = copy.deepcopy(ladder.rungs[s][r])
            else:
                ref = full[s][base_rung[s]]
                per[s] = {k: v for k, v in want.items() if ref.get(k) != v}
        if per:
            d["overrides"][str(la)] = per
    if not d["overrides"]:
        d.pop("overrides")
    policy = Policy.from_dict(d, name=name)
    for (la, s), r in rung_of.items():  # the policy must say exactly what the state says
        got = policy.config_for(la, s, num_layers)
        want = None if (la, s) in exact or full[s][r] is None else full[s][r]
        got_d = None if got is None else got.to_dict()
        if got_d != want:
            raise AssertionError(f"policy for layer {la} {s} is {got_d}, expected {want}")
    return policy


def state_peer_policy(
    state: State,
    ladder: Ladder,
    num_layers: int,
    *,
    name: str = "tuned",
    description: str = "",
    k_position: str = "pre_rope",
    sink_tokens: int = 0,
) -> PeerPolicy:
    """The :class:`~kakeya_py.peers.PeerPolicy` of a state of a peer ladder: the most common
    compressed rung (over both streams; ties: the first in the ladder) is the method, every other
    (layer, stream) of ``state`` an override (its rung's spec, or null = exact); the layers and
    streams outside ``state`` are left out (``layers``, ``streams``: exact)."""
    spec = {
        (la, s): None if ladder.rungs[s][r] is None else ladder.configs[s][r].name
        for (la, s), r in state.items()
    }
    order = [c.name for s in STREAMS for c in ladder.configs[s] if c is not None]
    counts = Counter(v for v in spec.values() if v is not None)
    base = min(counts, key=lambda v: (-counts[v], order.index(v))) if counts else order[0]
    method = next(c for s in STREAMS for c in ladder.configs[s] if c is not None and c.name == base)
    overrides: dict[int, dict[str, str | None]] = {}
    for (la, s), v in sorted(spec.items()):
        if v != base:
            overrides.setdefault(la, {})[s] = v
    policy = PeerPolicy(
        method,
        num_layers,
        layers=sorted({la for la, _ in state}),
        streams=tuple(s for s in STREAMS if any(st == s for _, st in state)) or STREAMS,
        k_position=k_position,
        sink_tokens=sink_tokens,
        overrides=overrides,
        label=name,
        description=description,
    )
    for la in range(num_layers):  # the policy must say exactly what the state says
        for s in STREAMS:
            got = policy.method_for(la, s)
            want = spec.get((la, s))
            if (None if got is None else got.name) != want:
                raise AssertionError(f"peer policy for layer {la} {s} is {got}, expected {want}")
    return policy


def basis_provenance(basis) -> dict[str, Any]:
    """The ``fit`` provenance record of a loaded model basis: the text its sidecar records."""
    return {"role": "fit", **{k: v for k, v in basis.record["text"].items() if k != "role"}}


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


def save_preset(policy: Policy, name: str, *, presets_dir: Path | None = None) -> Path:
    """Write ``policy`` as ``presets/NAME.json`` (built-in names are refused)."""
    if name in POLICY_PRESETS:
        raise ValueError(f"{name!r} is a built-in preset; choose another name")
    if not name or any(c not in "abcdefghijklmnopqrstuvwxyz0123456789-_." for c in name.lower()):
        raise ValueError(f"preset name {name!r}: use letters, digits, '-', '_' and '.'")
    folder = Path(presets_dir) if presets_dir is not None else _policy.PRESETS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    d = policy.to_dict()
    d["name"] = name
    path = folder / f"{name}.json"
    path.write_text(json.dumps(d, indent=2) + "\n")
    return path


# -- passages ----------------------------------------------------------------------------------
def split_passages(
    stream, n_search: int, n_val: int, ctx: int, n_eval: int, seed: int, val_n_eval: int | None = None
):
    """``(search, validation)``: disjoint windows of the evaluation stream (module doc, step 3).

    With ``val_n_eval`` the validation passages evaluate that many positions; windows are
    then ``ctx + max(n_eval, val_n_eval) + 1`` tokens and each passage uses its first
    ``ctx + n + 1``.
    """
    import numpy as np

    from ..eval.corpus import CorpusError, make_passages

    val_n_eval = n_eval if val_n_eval is None else val_n_eval
    width = ctx + max(n_eval, val_n_eval) + 1
    available = len(stream.ids) // width
    if n_search < 1 or n_val < 0 or n_search + n_val > available:
        raise CorpusError(
            f"{n_search} search + {n_val} validation passages of {width} tokens requested; the evaluation "
            f"text has {available} windows"
        )
    every = make_passages(stream, available, ctx, width - ctx - 1)

    def cut(p, index: int, n: int):
        keep = ctx + n + 1
        return dataclasses.replace(
            p, index=index, n_eval=n, token_ids=p.token_ids[:keep], token_end=p.token_start + keep
        )

    pick = np.random.default_rng(seed).choice(available, n_search + n_val, replace=False)
    search_w = sorted(int(w) for w in pick[:n_search])
    val_w = sorted(int(w) for w in pick[n_search:])
    search_p = [cut(every[w], i, n_eval) for i, w in enumerate(search_w)]
    val_p = [cut(every[w], i, val_n_eval) for i, w in enumerate(val_w)]
    return search_p, val_p


# -- command -----------------------------------------------------------------------------------
def register(sub) -> None:
    from ..cli.harness import DEFAULT_DTYPE
    from ..models import DEFAULT_MODEL

    p = sub.add_parser(
        "tune", help="search per-layer codec settings for the highest measured ratio within a Δppl budget"
    )
    g = p.add_argument_group("model and text")
    g.add_argument("--model", default=DEFAULT_MODEL, help="smollm2-135m, an HF model id or a local folder")
    g.add_argument("--dtype", default=DEFAULT_DTYPE, help="float32 (default), bfloat16, float16")
    g.add_argument("--text-file", default=None, help="UTF-8 text instead of WikiText-2")
    g.add_argument("--wikitext", default=None, help="path of wiki.test.raw")
    g.add_argument(
        "--passages", type=int, default=16, help="search passages, from the calibration part (default 16)"
    )
    g.add_argument(
        "--val-passages",
        type=int,
        default=16,
        help="selection passages, from the validation part (default 16; selections use >= 16)",
    )
    g.add_argument("--ctx", type=int, default=512, help="context tokens per passage (default 512)")
    g.add_argument("--n-eval", type=int, default=128, help="evaluated positions per passage (default 128)")
    g.add_argument(
        "--val-n-eval",
        type=int,
        default=None,
        help="evaluated positions per validation passage (default --n-eval)",
    )
    g = p.add_argument_group("search")
    g.add_argument("--budget-dppl", type=float, default=0.01, help="|Δppl| budget (default 0.01 = 1%%)")
    g.add_argument("--min-top1", type=float, default=0.95, help="top-1 floor (default 0.95)")
    g.add_argument(
        "--budget-kl",
        type=float,
        default=None,
        help="also bound the mean KL(ref||codec): steadier than the Δppl of a few thousand tokens",
    )
    g.add_argument(
        "--one-sided",
        action="store_true",
        help="budget on Δppl only from above (a lower perplexity does not count; default: |Δppl|)",
    )
    g.add_argument("--ladder", default=None, help="ladder JSON (default: exact -> 4 -> 3 -> 2 bits)")
    g.add_argument("--cost", default="budget", choices=COSTS, help="cost of a step (module doc)")
    g.add_argument("--check-every", type=int, default=8, help="steps per re-measurement (default 8)")
    g.add_argument("--max-rounds", type=int, default=50, help="re-measurement rounds at most (default 50)")
    g.add_argument("--patience", type=int, default=3, help="stop after this many rounds keeping nothing")
    g.add_argument("--layers", default=None, help="layers the search may touch (default all; others exact)")
    g.add_argument(
        "--reuse-sensitivity",
        default=None,
        metavar="TUNE_JSON",
        help="take step 1 from an earlier tune.json (same model, passages, ladder, layers; checked)",
    )
    g.add_argument(
        "--reuse-search",
        default=None,
        metavar="TUNE_JSON",
        help="take steps 1 and 2 from an earlier tune.json (also the same settings; checked) and redo "
        "only the selection and the final measurements",
    )
    g.add_argument(
        "--select",
        default="validation",
        choices=["validation", "greedy"],
        help="which state of the greedy path is written: the most compressed one that also passes on "
        "the validation passages (default), or the end of the path",
    )
    g.add_argument("--streams", default="kv", choices=["k", "v", "kv"], help="streams the search may touch")
    g.add_argument("--post-rope-k", action="store_true", help="compress K after RoPE (comparison only)")
    g.add_argument("--sigma-q", default=None, help="sigma_q.safetensors for rungs with metric=inner_product")
    g.add_argument(
        "--basis",
        default=None,
        help="model basis (basis.safetensors, `kakeya calibrate basis`) for rungs with 'transform' "
        "(default: the ladder's 'basis')",
    )
    g.add_argument(
        "--sink-tokens",
        type=int,
        default=0,
        help="leading positions of each sequence kept exact in every variant and in the policy",
    )
    g.add_argument(
        "--compare",
        default="recommended",
        help="comma list of policies measured next to the winner on the validation passages ('' = none)",
    )
    g = p.add_argument_group("output")
    g.add_argument("--out", default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    g.add_argument("--name", default=None, help="policy name (default: tuned-dppl<budget>)")
    g.add_argument("--save-preset", default=None, metavar="NAME", help="also save as preset NAME")
    g.add_argument("--seed", type=int, default=0, help="passage choice and bootstrap seed")
    g.add_argument("--threads", type=int, default=None, help="torch and codec threads")
    g.add_argument(
        "--cache-gib",
        type=float,
        default=DEFAULT_CACHE_BYTES / (1 << 30),
        help="memory for reused round trips, GiB (default %(default)g; least recently used go first)",
    )
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_tune)


def _usage(split, part: str, passages) -> dict[str, Any]:
    return split.usage(part, sorted({a["index"] for p in passages for a in p.articles}))


def tune_passages(corpus, tok, args):
    """``(search, validation, usage)``: search passages from the calibration part and validation
    passages from the validation part (a single ``--text-file`` is every part: disjoint windows
    of it, as :func:`split_passages` draws them)."""
    from ..eval.corpus import tokenize_articles

    split = corpus.split()
    if corpus.layout == "single":
        stream = tokenize_articles(tok, corpus.part("calibration"))
        search_p, val_p = split_passages(
            stream, args.passages, args.val_passages, args.ctx, args.n_eval, args.seed, args.val_n_eval
        )
    else:
        search_p, _ = split_passages(
            tokenize_articles(tok, corpus.part("calibration")),
            args.passages,
            0,
            args.ctx,
            args.n_eval,
            args.seed,
        )
        val_p = []
        if args.val_passages:
            val_n = args.val_n_eval or args.n_eval
            val_p, _ = split_passages(
                tokenize_articles(tok, corpus.part("validation")),
                args.val_passages,
                0,
                args.ctx,
                val_n,
                args.seed,
            )
    usage = {
        "search": _usage(split, "calibration", search_p),
        "validation": _usage(split, "validation", val_p),
    }
    return search_p, val_p, usage


def cmd_tune(args) -> int:
    import sys

    from ..calibration.model_basis import load_basis
    from ..cli.harness import _finite, emit, kakeya_version, load_hf, policy_codec, set_threads, versions
    from ..eval.corpus import check_disjoint, load_corpus
    from ..eval.harness import Variant, codec_transform
    from ..policy import load_sigma_q

    t0 = time.perf_counter()
    settings = TuneSettings(
        budget_dppl=args.budget_dppl,
        min_top1=args.min_top1,
        cost=args.cost,
        check_every=args.check_every,
        max_rounds=args.max_rounds,
        patience=args.patience,
        seed=args.seed,
        two_sided=not args.one_sided,
        budget_kl=args.budget_kl,
    )
    ladder = Ladder.load(args.ladder)
    if ladder.peer is not None:
        given = [f for f in ("sigma_q", "basis", "save_preset") if getattr(args, f, None)]
        if given:
            flags = ", ".join("--" + f.replace("_", "-") for f in given)
            raise SystemExit(
                f"{flags}: not for a peer ladder ({ladder.peer}); its policy is evaluated with "
                "`kakeya eval --config OUT/policy.json`"
            )
    if getattr(args, "basis", None):
        ladder.basis = str(Path(args.basis).expanduser().resolve())
    compare = [c for c in (args.compare or "").split(",") if c]
    compare_policies = [load_policy(c) for c in compare]
    command = shlex.join(getattr(args, "argv", ["kakeya", "tune"]))
    progress = not args.no_progress

    set_threads(args)
    model, tok, info = load_hf(args)
    corpus = load_corpus(args.text_file, args.wikitext)
    split = corpus.split()
    search_p, val_p, usage = tune_passages(corpus, tok, args)
    sigma = None
    if args.sigma_q:
        sigma = load_sigma_q(
            args.sigma_q, num_layers=info.num_layers, num_kv_heads=info.num_kv_heads, head_dim=info.head_dim
        )
        if sigma.text is None:
            raise SystemExit(f"{sigma.path}: no calibration text recorded; cannot prove it is disjoint")
        check_disjoint(sigma.text, usage["validation"])  # fits may share the search's calibration text
    basis = None
    if ladder.transforms():
        if ladder.basis is None:
            raise SystemExit(
                "the ladder has rungs with 'transform': give the model basis (--basis or its 'basis')"
            )
        basis = load_basis(ladder.basis, num_kv_heads=info.num_kv_heads, head_dim=info.head_dim)
        if not basis.record.get("text"):
            raise SystemExit(f"{basis.path}: no calibration text recorded; cannot prove it is disjoint")
        check_disjoint(basis.record["text"], usage["validation"])
    k_position = "post_rope" if args.post_rope_k else "pre_rope"
    runner = reusing_runner(model, k_position=k_position)
    codec = LadderCodec(
        ladder,
        sigma_q=sigma,
        basis=basis,
        threads=args.threads,
        sink_tokens=args.sink_tokens,
        max_cache_bytes=int(args.cache_gib * (1 << 30)),
    )
    layers = parse_layers(args.layers, info.num_layers) if args.layers else None
    streams = tuple(STREAMS if args.streams == "kv" else (args.streams,))

    def log(msg: str) -> None:
        sys.stderr.write(f"[tune] {msg}\n")
        sys.stderr.flush()

    previous = None
    reused = args.reuse_search or args.reuse_sensitivity
    if args.reuse_search and args.reuse_sensitivity:
        raise SystemExit("--reuse-search already reuses the sensitivity; give one of the two")
    if reused:
        previous = json.loads(Path(reused).read_text())
        same = {
            "model": previous["model"]["path"] == info.path and previous["dtype"] == args.dtype,
            "passages": previous["passages_provenance"]["search"]
            == json.loads(json.dumps([p.provenance() for p in search_p])),
            "ladder": previous["ladder"] == json.loads(json.dumps(ladder.to_dict())),
            "k_position": previous["policy"]["k_position"] == k_position,
            "sink_tokens": previous["policy"].get("sink_tokens", 0) == args.sink_tokens,
            "seed": previous["settings"]["seed"] == args.seed,
        }
        if args.reuse_search:
            same["settings"] = TuneSettings.from_record(previous["settings"]) == settings
            same["layers"] = previous["layers"] == (None if layers is None else list(layers))
            same["streams"] = previous["streams"] == list(streams)
        if not all(same.values()):
            flag = "--reuse-search" if args.reuse_search else "--reuse-sensitivity"
            raise SystemExit(f"{flag} {reused}: differs in {[k for k, v in same.items() if not v]}")
    if args.reuse_search:
        result = replay(previous)
        log(f"search taken from {args.reuse_search}: {len(result.rounds)} rounds")
    else:
        result = search(
            runner,
            search_p,
            ladder,
            codec,
            settings,
            layers=layers,
            streams=streams,
            progress=progress,
            log=log,
            previous=previous,
        )

    # 4. selection along the greedy path (before the final measurements, which then describe
    # exactly the written policy)
    path = greedy_path(result)
    chosen = len(path) - 1
    select = args.select if val_p else "greedy"
    if select == "validation":
        codec.clear()
        runner.forget()
        chosen = select_on_validation(runner, val_p, codec, path, settings, progress=progress)
        log(f"selected on validation: state {chosen} of {len(path) - 1} (round {path[chosen]['round']})")
    state = path[chosen]["state"]

    name = args.name or args.save_preset or f"tuned-dppl{args.budget_dppl:g}"
    description = (
        f"kakeya tune: per-(layer, stream) ladder search"
        f"{'' if ladder.peer is None else f' over peer family {ladder.peer}'} on {info.name}, |dppl| budget "
        f"{args.budget_dppl:g}{'' if args.budget_kl is None else f', KL budget {args.budget_kl:g}'}, "
        f"top-1 >= {args.min_top1:g}, {args.passages} search passages x (ctx "
        f"{args.ctx} + {args.n_eval}), seed {args.seed}, {args.sink_tokens} sink tokens exact, "
        f"selected: {select}; command: {command}"
    )
    policy = state_policy(
        state,
        ladder,
        info.num_layers,
        name=name,
        description=description,
        sigma_q=args.sigma_q,
        k_position=k_position,
        sink_tokens=args.sink_tokens,
    )
    policy.model = _policy.model_record(info)  # its per-layer steps fit this model only
    policy.provenance = [{"role": "fit", **usage["search"]}, {"role": "selection", **usage["validation"]}]
    if basis is not None:  # the text the basis was fitted on, as calibrated_policy records Σ_q's
        policy.provenance.append(basis_provenance(basis))

    # 3. the written policy, through PolicyCodec (a peer policy: its own codec), on the search and
    # the held-out passages
    codec.clear()
    winner_codec = policy_codec(policy, info.num_layers, sigma_q=sigma, threads=args.threads)
    winner = Variant(name, codec_transform(winner_codec))
    val_variants = [winner]
    for c, pol in zip(compare, compare_policies, strict=True):
        s_c = sigma if pol.sigma_q is None else None
        if pol.sigma_q is not None:
            s_c = load_sigma_q(
                pol.sigma_q,
                num_layers=info.num_layers,
                num_kv_heads=info.num_kv_heads,
                head_dim=info.head_dim,
            )
        pc = PolicyCodec(pol, info.num_layers, sigma_q=s_c, threads=args.threads)
        val_variants.append(Variant(c, codec_transform(pc), k_position=pol.k_position))

    def final(passages, variants, desc: str) -> list[dict[str, Any]]:
        rows, _ = measure(runner, passages, variants, seed=args.seed, progress=progress, desc=desc)
        runner.forget()
        return rows

    # the runner still holds the prefills of the passages it measured last (validation after
    # a selection, search otherwise): measure those first so that none is computed twice
    vrows: list[dict[str, Any]] = []
    if select == "validation":
        vrows = final(val_p, val_variants, "validation")
    (search_row,) = final(search_p, [winner], "final (search passages)")
    if select != "validation" and val_p:
        vrows = final(val_p, val_variants, "validation")
    validation = [{"policy": v.name, **r} for v, r in zip(val_variants, vrows, strict=True)] if vrows else []
    written = policy  # a peer policy names no artifact
    if ladder.peer is None:
        written = dataclasses.replace(policy, basis=artifact_ref(policy.basis))  # portable path in the files

    record = {
        "command": command,
        "argv": list(getattr(args, "argv", ["kakeya", "tune"])),
        "version": kakeya_version(),
        "versions": versions(),
        "model": info.to_dict(),
        "mode": "snapshot",
        "dtype": args.dtype,
        "ctx": args.ctx,
        "n_eval": args.n_eval,
        "val_n_eval": args.val_n_eval or args.n_eval,
        "settings": dataclasses.asdict(settings),
        "layers": None if layers is None else list(layers),
        "streams": list(streams),
        "ladder": ladder.to_dict(),
        "corpus": {
            "name": corpus.name,
            "source": corpus.source,
            "sha256": corpus.sha256,
            "split": split.to_dict(),
        },
        "text_usage": usage,
        "passages_provenance": {
            "search": [p.provenance() for p in search_p],
            "validation": [p.provenance() for p in val_p],
        },
        "base": result.base,
        "sensitivity": result.sensitivity,
        "sensitivity_from": args.reuse_sensitivity,
        "rounds": result.rounds,
        "stop_reason": result.stop_reason,
        "rungs": result.rungs(),  # the end of the greedy path
        "search_from": args.reuse_search,
        "path": [{k: v for k, v in e.items() if k != "state"} for e in path],
        "selected": {"by": select, "index": chosen, "round": path[chosen]["round"], "rungs": _rungs(state)},
        "policy": written.to_dict(),
        "search_result": search_row,
        "validation": validation,
        "encodes": result.encodes,
        "seconds_search": result.seconds,
        "seconds": time.perf_counter() - t0,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "policy.json").write_text(json.dumps(written.to_dict(), indent=2) + "\n")
    (out / "tune.json").write_text(json.dumps(_finite(record), indent=2, allow_nan=False) + "\n")
    md = tune_markdown(record)
    (out / "tune.md").write_text(md)
    if select == "validation":
        plot_path(record, out / "tune_path.png")
    if args.save_preset:
        path = save_preset(written, args.save_preset)
        md += f"\nPreset written to {path} (`--config {args.save_preset}`)\n"
    emit(record, md + f"\nWritten: {out / 'policy.json'}, {out / 'tune.json'}, {out / 'tune.md'}\n", None)
    return 0


# -- report ------------------------------------------------------------------------------------
def _pct(x) -> str:
    return "n/a" if x is None else f"{x * 100:+.2f}%"


def _row_md(label: str, r: Mapping[str, Any]) -> str:
    ci = r.get("dppl_ci95") or [None, None]
    ratio = "n/a" if r.get("ratio") is None else f"{r['ratio']:.3f}x"
    kl = "n/a" if r.get("kl_mean") is None else f"{r['kl_mean']:.4f}"
    return (
        f"| {label} | {_pct(r['dppl'])} | [{_pct(ci[0])}, {_pct(ci[1])}] | {r['top1'] * 100:.2f}% | {kl} "
        f"| {ratio} | {r['eval_tokens']} | {r['verdict']} |"
    )


def tune_markdown(r: Mapping[str, Any]) -> str:
    st = r["settings"]
    nsearch = len(r["passages_provenance"]["search"])
    nval = len(r["passages_provenance"]["validation"])
    lines = [
        f"## kakeya tune: {r['policy']['name']} on {r['model']['name']} (snapshot, {r['dtype']})",
        "",
        f"command: `{r['command']}`",
        "",
        f"Budget {'|Δppl|' if st.get('two_sided', True) else 'Δppl'} ≤ {st['budget_dppl']:g}"
        + ("" if st.get("budget_kl") is None else f", mean KL ≤ {st['budget_kl']:g}")
        + f", top-1 ≥ {st['min_top1']:g}; cost `{st['cost']}`, "
        f"re-measured every {st['check_every']} steps. Search: {nsearch} passages x (ctx {r['ctx']} + "
        f"{r['n_eval']} evaluated), validation (held out): {nval} passages x (ctx {r['ctx']} + "
        f"{r.get('val_n_eval', r['n_eval'])}), from {r['corpus']['name']} "
        f"(evaluation split; windows drawn with seed {st['seed']}). kakeya {r['version']}; "
        f"{r['seconds']:.0f} s ({len(r['sensitivity'])} sensitivity variants, {len(r['rounds'])} rounds, "
        f"stopped: {r['stop_reason']}).",
        "",
        "| policy | Δppl | 95% CI | top-1 | KL mean | ratio (measured) | tokens | verdict |",
        "|---|---|---|---|---|---|---|---|",
        _row_md("base (rung 0 everywhere), search", r["base"]),
        _row_md(f"**{r['policy']['name']}**, search", r["search_result"]),
    ]
    selected = r.get("selected") or {"by": "greedy", "rungs": r["rungs"]}
    on_val = selected["by"] == "validation"
    for v in r["validation"]:
        label = f"**{v['policy']}**" if v["policy"] == r["policy"]["name"] else f"`{v['policy']}`"
        chose = on_val and v["policy"] == r["policy"]["name"]
        lines.append(_row_md(f"{label}, validation{' (selected on)' if chose else ''}", v))
    if on_val:
        lines += [
            "",
            f"Written: the most compressed state of the greedy path that also passes on the validation "
            f"passages (state {selected['index']} of {len(r['path']) - 1}, round {selected['round']}); "
            "the validation passages chose it, so they are no longer held out: measure it on other text "
            "(`kakeya eval --config policy.json`) before trusting it.",
        ]
    lines += ["", "Rungs chosen (0 = first rung of the ladder):", ""]
    rungs = selected["rungs"]
    layers = sorted({int(k) for s in STREAMS for k in rungs[s]})
    lines.append("| stream | " + " | ".join(str(la) for la in layers) + " |")
    lines.append("|---|" + "---|" * len(layers))
    for s in STREAMS:
        lines.append(
            f"| {s.upper()} | " + " | ".join(str(rungs[s].get(str(la), "-")) for la in layers) + " |"
        )
    lines += ["", "Ladder: " + (r["ladder"].get("description") or "")]
    for s in STREAMS:
        lines.append(f"- {s.upper()}: " + " → ".join(json.dumps(x) for x in r["ladder"][s]))
    lines += [
        "",
        "Rounds (kept steps / candidates, measured whole-policy numbers on the search passages):",
        "",
    ]
    lines += ["| round | kept | last kept: Δppl | top-1 | ratio | froze |", "|---|---|---|---|---|---|"]
    for rd in r["rounds"]:
        kept = [c for c in rd["candidates"] if c["kept"]]
        last = kept[-1] if kept else None
        lines.append(
            f"| {rd['round']} | {rd['kept']}/{len(rd['candidates'])} | "
            + (
                f"{_pct(last['dppl'])} | {last['top1'] * 100:.2f}% | {last['ratio']:.3f}x"
                if last
                else "- | - | -"
            )
            + f" | {'' if not rd['frozen'] else str(rd['frozen'][1]).upper() + str(rd['frozen'][0])} |"
        )
    if on_val:
        lines += [
            "",
            "Greedy path (every state measured on the search and on the validation passages):",
            "",
            "| state | after round | ratio | search Δppl | top-1 | KL | validation Δppl | top-1 | KL | passes there |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for i, e in enumerate(r["path"]):
            a, v = e["search"], e["validation"]
            mark = "**" if i == selected["index"] else ""
            ok = TuneSettings.from_record(st).ok(v)
            lines.append(
                f"| {mark}{i}{mark} | {'base' if e['round'] is None else e['round']} | {v['ratio']:.3f}x | "
                f"{_pct(a['dppl'])} | {a['top1'] * 100:.2f}% | {a['kl_mean']:.4f} | {_pct(v['dppl'])} | "
                f"{v['top1'] * 100:.2f}% | {v['kl_mean']:.4f} | {'yes' if ok else 'no'} |"
            )
        lines += ["", "![greedy path](tune_path.png)"]
    return "\n".join(lines) + "\n"


def plot_path(r: Mapping[str, Any], path: Path) -> None:
    """Δppl, top-1 and mean KL along the greedy path, on the search and the validation passages."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    st = r["settings"]
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(17, 4.6))
    x = [e["validation"]["ratio"] for e in r["path"]]
    for key, label, marker in (
        ("search", "search passages", "o"),
        ("validation", "validation passages", "s"),
    ):
        rows = [e[key] for e in r["path"]]
        ax1.plot(x, [row["dppl"] * 100 for row in rows], marker=marker, label=label)
        ax2.plot(x, [row["top1"] * 100 for row in rows], marker=marker, label=label)
        ax3.plot(x, [row["kl_mean"] for row in rows], marker=marker, label=label)
    chosen = r["selected"]["index"]
    for ax in (ax1, ax2, ax3):
        ax.axvline(x[chosen], color="black", linestyle="--", linewidth=1, label="written policy")
        ax.set_xlabel("compression ratio (measured, vs bf16)")
        ax.grid(alpha=0.3)
    b = st["budget_dppl"] * 100
    ax1.axhspan(
        -b if st.get("two_sided", True) else ax1.get_ylim()[0],
        b,
        color="tab:green",
        alpha=0.15,
        label="budget",
    )
    ax2.axhspan(st["min_top1"] * 100, 100, color="tab:green", alpha=0.15, label="top-1 floor")
    if st.get("budget_kl") is not None:
        ax3.axhspan(0, st["budget_kl"], color="tab:green", alpha=0.15, label="KL budget")
    ax3.set_ylabel("mean KL(ref ‖ codec)")
    ax3.legend(fontsize=8)
    ax1.set_ylabel("Δppl (%)")
    ax2.set_ylabel("top-1 agreement with codec off (%)")
    ax1.legend(fontsize=8)
    ax2.legend(fontsize=8)
    fig.suptitle(f"kakeya tune greedy path: {r['policy']['name']} on {r['model']['name']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
