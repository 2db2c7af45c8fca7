"""Per-layer quantizer steps by reverse water-filling across layers.

If layer l's share of the KL grows as ``s_l · Δ_l²`` (high-rate regime, layers' errors adding)
and its bytes as ``−log₂ Δ_l`` per coefficient, the bytes at a given total KL are least when
every layer has the same slope, i.e. ``Δ_l = c / √s_l``. ``s_l`` comes from a ``kakeya
attribution --by layer --rank-by kl`` record in which one stream of one layer at a time was
coded at a probe step; ``c`` is set by the geometric mean of the steps, which fixes the bytes
to first order.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping


def sensitivities(record: dict, probe_step: float) -> dict[int, float]:
    """``s_l = KL_l / Δ²`` from an attribution record whose layers were coded alone at ``probe_step``."""
    if not probe_step > 0:
        raise ValueError(f"probe_step must be > 0, got {probe_step}")
    rows = record.get("layers")
    if not rows:
        raise ValueError("the attribution record has no 'layers' (run `kakeya attribution --by layer`)")
    return {int(r["layer"]): max(float(r["kl_mean"]), 1e-12) / probe_step**2 for r in rows}


def steps_for(sens: dict[int, float], geomean: float, step_range: tuple[float, float]) -> dict[int, float]:
    """Steps ``Δ_l ∝ 1/√s_l`` clipped to ``step_range``, whose geometric mean is ``geomean``.

    ``c`` is found by bisection on the clipped steps, so clipping moves the other layers' steps
    and the bytes stay those of the geometric mean.
    """
    lo_step, hi_step = step_range
    if not 0 < lo_step <= geomean <= hi_step:
        raise ValueError(f"need 0 < {lo_step} <= geomean {geomean} <= {hi_step}")
    if not sens:
        raise ValueError("no layer sensitivities")
    lo, hi = 1e-9, 1e9
    steps: dict[int, float] = {}
    for _ in range(200):
        c = math.sqrt(lo * hi)
        steps = {la: min(max(c / math.sqrt(s), lo_step), hi_step) for la, s in sens.items()}
        g = math.exp(sum(math.log(x) for x in steps.values()) / len(steps))
        lo, hi = (c, hi) if g < geomean else (lo, c)
    return {la: round(x, 4) for la, x in sorted(steps.items())}


def with_layer_settings(
    base: Mapping,
    stream: str,
    settings: Mapping[int, Mapping],
    record: Mapping,
    *,
    name: str,
    description: str,
) -> dict:
    """A copy of the policy dict ``base`` with ``settings[l]`` as layer l's override of ``stream``.

    Its provenance keeps ``base``'s fits and adds the text of the attribution ``record`` the
    steps were fitted on; the selection is the caller's to record once it is made.
    """
    pol = copy.deepcopy(dict(base))
    pol["name"], pol["description"] = name, description
    for layer, cfg in settings.items():
        pol.setdefault("overrides", {}).setdefault(str(layer), {})[stream] = dict(cfg)
    pol["provenance"] = [p for p in base.get("provenance", []) if p.get("role") == "fit"] + [
        {"role": "fit", **record["text_usage"]}
    ]
    return pol
