"""Per-layer K steps Δ_l = c / √s_l from the calibration-part attribution (README.md here).

    python reports/model_basis/layer_steps/make_candidates.py

reads ``attribution_k0.5.json`` and writes ``candidate_g{0.35,0.40,0.45}.json``: the
``model-basis`` preset with a K step override per layer.
"""

from __future__ import annotations

import json
from pathlib import Path

from kakeya_py.tuning.layer_steps import sensitivities, steps_for, with_layer_settings

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
PROBE_STEP = 0.5
GEOMEANS = (0.35, 0.40, 0.45)
STEP_RANGE = (0.2, 0.8)
OUTLIER_PER_STEP = 120.0  # the preset's threshold / step (42 / 0.35)


def main() -> None:
    record = json.loads((HERE / "attribution_k0.5.json").read_text())
    sens = sensitivities(record, PROBE_STEP)
    base = json.loads((ROOT / "python" / "kakeya_py" / "presets" / "model-basis.json").read_text())
    for g in GEOMEANS:
        steps = steps_for(sens, g, STEP_RANGE)
        pol = with_layer_settings(
            base,
            "k",
            {
                la: {"uniform_step": st, "outlier_threshold": round(OUTLIER_PER_STEP * st, 3)}
                for la, st in steps.items()
            },
            record,
            name=f"model-basis-layersteps-g{g:.2f}",
            description=(
                f"model-basis with per-layer K steps c/sqrt(s_l), geometric mean {g:.2f}, s_l from "
                "reports/model_basis/layer_steps/attribution_k0.5.json (calibration part); candidate"
            ),
        )
        out = HERE / f"candidate_g{g:.2f}.json"
        out.write_text(json.dumps(pol, indent=1) + "\n")
        print(out.name, " ".join(f"{la}:{s:.2f}" for la, s in steps.items()))


if __name__ == "__main__":
    main()
