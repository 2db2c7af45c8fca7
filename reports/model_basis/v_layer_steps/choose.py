"""Apply the rule of README.md to the validation sweeps and print the chosen policy's path.

    python reports/model_basis/v_layer_steps/choose.py

Incumbent: ``model-basis-layers``, measured on the same validation passages as
``../layer_steps/candidate_g0.35.json``. Writes ``selection.json`` (every row and the choice).
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
BUDGET = {"dppl": 0.006, "kl_mean": 0.006, "top1": 0.96}
INCUMBENT = ("model-basis-layers", HERE.parent / "layer_steps", "kakeya-candidate_g0.35.json")


def point(folder: Path, text: str, name: str) -> dict:
    return json.loads((folder / f"validation_{text}" / "points" / name).read_text())


def passes(p: dict) -> bool:
    return p["dppl"] <= BUDGET["dppl"] and p["kl_mean"] <= BUDGET["kl_mean"] and p["top1"] >= BUDGET["top1"]


def main() -> None:
    rows = [INCUMBENT] + [
        (f"reports/model_basis/v_layer_steps/{c.name}", HERE, f"kakeya-{c.stem}.json")
        for c in sorted(HERE.glob("candidate_g*.json"))
    ]
    table = []
    for policy, folder, name in rows:
        wiki, code = point(folder, "wikitext", name), point(folder, "code", name)
        table.append(
            {
                "policy": policy,
                "passes": passes(wiki) and passes(code),
                **{
                    f"{key}_{text}": p[key]
                    for text, p in (("wikitext", wiki), ("code", code))
                    for key in ("ratio_measured", "dppl", "kl_mean", "top1")
                },
            }
        )
    for r in table:
        print(
            f"{r['policy']:<60} wiki {r['ratio_measured_wikitext']:.2f}x {r['dppl_wikitext']:+.2%} "
            f"KL {r['kl_mean_wikitext']:.4f} top1 {r['top1_wikitext']:.2%} | code {r['ratio_measured_code']:.2f}x "
            f"{r['dppl_code']:+.2%} KL {r['kl_mean_code']:.4f} top1 {r['top1_code']:.2%} | "
            f"{'pass' if r['passes'] else 'fail'}"
        )
    passing = [r for r in table if r["passes"]]
    chosen = max(passing, key=lambda r: r["ratio_measured_wikitext"])["policy"] if passing else INCUMBENT[0]
    (HERE / "selection.json").write_text(
        json.dumps({"budget": BUDGET, "rows": table, "chosen": chosen}, indent=1) + "\n"
    )
    print("chosen:", chosen)


if __name__ == "__main__":
    main()
