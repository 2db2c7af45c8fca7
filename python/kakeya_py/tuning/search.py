"""``kakeya tune``'s search: per-(layer, stream) codec settings for the highest measured ratio
within a Δppl budget, and the winner as a policy (the ladder it climbs:
:mod:`kakeya_py.tuning.ladder`; the command: :mod:`kakeya_py.cli.tune`).

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
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import policy as _policy
from ..eval.hooks import STREAMS
from ..peers import PeerPolicy
from ..policy import POLICY_PRESETS, Policy
from .ladder import Ladder, LadderCodec

COSTS = ("budget", "dppl", "kl")
COST_FLOOR = 1e-9
State = dict[tuple[int, str], int]


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
    on_sensitivity: Callable[[dict[str, Any], list[dict[str, Any]]], None] | None = None,
) -> TuneResult:
    """Steps 1 and 2 of the module doc on ``passages``; returns the winning state.

    ``previous``: the ``base`` and ``sensitivity`` of an earlier record on the same
    passages, ladder and pairs (``--reuse-sensitivity``); step 1 is then not re-run.
    ``on_sensitivity(base_row, sensitivity)`` is called once step 1 is measured (a checkpoint:
    step 1 is most of a search's time).
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
        if on_sensitivity is not None:
            on_sensitivity(base_row, sensitivity)
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
