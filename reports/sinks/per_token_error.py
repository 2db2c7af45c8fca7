import torch, numpy as np, kakeya_py as kp
from kakeya_py.models import load_model
from kakeya_py import corpus as C
from kakeya_py.harness import HFRunner
from kakeya_py.peers import parse_method
torch.set_num_threads(1)
model, tok, info = load_model("smollm2-135m", progress=False)
text = open(C.default_wikitext_path()).read()
ids = tok(text[20000:60000], return_tensors="pt").input_ids[:, :1024]
runner = HFRunner(model)
st = runner.prefill(ids)
turbo = parse_method("turbo-4")
cfgs = {n: kp.preset(n) for n in ("mse-4bit",)}
cfgs["mse-4bit-f32skel"] = kp.CodecConfig(bits=4, block_size=4096, share_basis=True, outlier_threshold=3.0, skeleton_dtype="f32")
cfgs["mse-4bit-noout"] = kp.CodecConfig(bits=4, block_size=4096, share_basis=True)
cfgs["identity-pca"] = kp.CodecConfig(bits=4, block_size=4096, share_basis=True, identity=False)
for layer in (2, 10, 20):
    for s in ("k", "v"):
        x = st.stream(layer, s, "pre_rope")[0].contiguous().float()
        den = x.pow(2).sum()
        row = [f"L{layer}{s}"]
        xt, nb = turbo.roundtrip(layer, s, x)
        row.append(f"turbo {((xt-x).pow(2).sum()/den).item():.5f} {x.numel()*2/nb:.2f}x")
        for n, c in cfgs.items():
            xh, nb = kp.roundtrip(x, c)
            row.append(f"{n} {((xh-x).pow(2).sum()/den).item():.5f} {x.numel()*2/nb:.2f}x")
        print(" | ".join(row), flush=True)
print("per-token relative error, tokens 0..3 and median over the rest")
for layer in (2, 10, 20):
    for s in ("k", "v"):
        x = st.stream(layer, s, "pre_rope")[0].contiguous().float()
        xt, _ = turbo.roundtrip(layer, s, x)
        xh, _ = kp.roundtrip(x, cfgs["mse-4bit"])
        def per(xx):
            e = ((xx - x).pow(2).sum(-1) / x.pow(2).sum(-1)).mean(-1)
            return " ".join(f"{v:.4f}" for v in e[:4].tolist()) + f" med {e[4:].median().item():.4f} max {e.max().item():.4f}"
        print(f"L{layer}{s} turbo {per(xt)} | ours {per(xh)}", flush=True)
