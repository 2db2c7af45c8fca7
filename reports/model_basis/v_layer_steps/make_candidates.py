"""Per-layer V steps Δ_l = c / √s_l from the calibration-part attribution (README.md here).

    python reports/model_basis/v_layer_steps/make_candidates.py

reads ``attribution_v0.95.json`` and writes ``candidate_g{0.65,0.72,0.80}.json``: the
``model-basis-layers`` preset with V's step and bits set per layer.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from kakeya_py.tuning.layer_steps import sensitivities, steps_for, with_layer_settings

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
PROBE_STEP = 0.95
GEOMEANS = (0.65, 0.72, 0.80)
STEP_RANGE = (0.25, 1.6)
REACH = 5.0  # per-vector scales the outermost level must reach: 2^(bits-1)·Δ ≥ REACH


def bits_for(step: float) -> int:
    """The fewest bits (≥ 4) whose mid-tread levels reach ``REACH`` scales at this step."""
    return max(4, 1 + math.ceil(math.log2(REACH / step) - 1e-9))


def main() -> None:
    record = json.loads((HERE / "attribution_v0.95.json").read_text())
    sens = sensitivities(record, PROBE_STEP)
    base = json.loads((ROOT / "python" / "kakeya_py" / "presets" / "model-basis-layers.json").read_text())
    for g in GEOMEANS:
        steps = steps_for(sens, g, STEP_RANGE)
        pol = with_layer_settings(
            base,
            "v",
            {la: {"bits": bits_for(st), "uniform_step": st} for la, st in steps.items()},
            record,
            name=f"model-basis-vlayers-g{g:.2f}",
            description=(
                f"model-basis-layers with per-layer V steps c/sqrt(s_l), geometric mean {g:.2f}, s_l from "
                "reports/model_basis/v_layer_steps/attribution_v0.95.json (calibration part); candidate"
            ),
        )
        out = HERE / f"candidate_g{g:.2f}.json"
        out.write_text(json.dumps(pol, indent=1) + "\n")
        print(out.name, " ".join(f"{la}:{s:.2f}/{bits_for(s)}" for la, s in steps.items()))


if __name__ == "__main__":
    main()
