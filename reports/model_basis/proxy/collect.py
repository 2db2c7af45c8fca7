"""Exploratory (run before the harness measurements): `python reports/model_basis/proxy/collect.py`
then `python reports/model_basis/proxy/proxy.py 0,14,29`. Writes /tmp/exp/kv.npz.

Collect pre-RoPE K, V (calibration + validation parts) and o_proj, Σ_q L for a proxy study."""

import numpy as np
from kakeya_py.calibration.core import collect_kv, load_sigma_q_artifact
from kakeya_py.eval.corpus import load_wikitext, part_passages
from kakeya_py.models import load_model

model, tok, info = load_model("smollm2-135m", progress=False)
corpus = load_wikitext()
out = {}
for part, n in (("calibration", 6), ("validation", 4)):
    ps = part_passages(corpus, tok, part, n, 1023, 1)
    acc = {}
    for got in collect_kv(model, [p.token_ids[:1024] for p in ps], range(30), ("k", "v")):
        for (s, layer), x in got.items():
            acc.setdefault(f"{part}.{s}.{layer}", []).append(x.astype(np.float16))
    for k, v in acc.items():
        out[k] = np.stack(v)
sq = load_sigma_q_artifact("calibration/smollm2-135m/sigma_q_rope")
for layer in range(30):
    out[f"L.{layer}"] = sq.L[layer]
    out[f"wo.{layer}"] = model.model.layers[layer].self_attn.o_proj.weight.detach().numpy()
np.savez("/tmp/exp/kv.npz", **out)
print("ok", len(out))
