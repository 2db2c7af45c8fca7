"""Exploratory proxy of the codec in numpy (error in the logit metric at equal estimated rate, K in the
Σ_q metric, V in the o_proj metric, ratios to the Hadamard path). Run after collect.py:
`python reports/model_basis/proxy/proxy.py 0,14,29` (layers 0, 14, 29 were used).
"""

# The per-head closures are called inside the iteration that defines them (B023 does not apply).
# ruff: noqa: B023

import json
import sys

import numpy as np


def hadamard(n):
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h


d = np.load("/tmp/exp/kv.npz")
LAYERS = [int(a) for a in sys.argv[1].split(",")] if len(sys.argv) > 1 else [0, 3, 8, 14, 20, 26, 29]
D = 64
HQ = 3
Hm = hadamard(D) / np.sqrt(D)
rng = np.random.default_rng(0)
signs = rng.choice([-1.0, 1.0], D)


def ent(q):  # empirical entropy in bits of integer array along axis 0, summed over columns
    tot = 0.0
    for c in range(q.shape[1]):
        _, cnt = np.unique(q[:, c], return_counts=True)
        p = cnt / cnt.sum()
        tot += -(cnt * np.log2(p)).sum()
    return tot


def quant_ec(y, step, pervec):
    # y [P, T, D] blocks; returns bits, yhat
    bits = 0.0
    yh = np.empty_like(y)
    for b in range(y.shape[0]):
        yb = y[b]
        s = np.sqrt((yb**2).mean(1, keepdims=True)) if pervec else np.ones((yb.shape[0], 1))
        s = np.maximum(s, 1e-12)
        if pervec:  # log8 grid 1/16 octave
            s = 2.0 ** (np.round(np.log2(s) * 16) / 16)
        q = np.round(yb / (step * s))
        yh[b] = q * step * s
        bits += (
            ent(q) + D * 8 + D * 16 + (yb.shape[0] * 5 if pervec else 0)
        )  # sigma bytes, mean, scales ~5 bits EC
    return bits, yh


def curve(fn, steps):
    pts = []
    for st in steps:
        bits, dist = fn(st)
        pts.append((bits, dist))
    return pts


def at_rate(pts, r):
    pts = sorted(pts)
    rs = np.array([p[0] for p in pts])
    ds = np.log(np.array([p[1] for p in pts]))
    if r < rs[0] or r > rs[-1]:
        return float("nan")
    return float(np.exp(np.interp(r, rs, ds)))


res = {}
for layer in LAYERS:
    Lk = d[f"L.{layer}"]
    Wo = d[f"wo.{layer}"]
    for s in ("k", "v"):
        cal = d[f"calibration.{s}.{layer}"].astype(np.float32)[:, 1:]  # drop sink
        val = d[f"validation.{s}.{layer}"].astype(np.float32)[:, 1:]
        for h in range(3):
            if s == "k":
                A = Lk[h].T
            else:
                M = sum(
                    Wo[:, g * D : (g + 1) * D].T @ Wo[:, g * D : (g + 1) * D]
                    for g in range(h * HQ, h * HQ + HQ)
                )
                A = np.linalg.cholesky(M + 1e-6 * np.trace(M) / D * np.eye(D)).T
            xc = cal[:, :, h]
            xv = val[:, :, h]
            mu_v = xv.mean(1, keepdims=True)
            ev = xv - mu_v
            n_vals = ev.shape[0] * ev.shape[1] * D
            energy = ((ev @ A.T) ** 2).sum()

            def metric(err):
                return float(((err @ A.T) ** 2).sum() / energy)

            # metric KLT
            ec = (xc - xc.mean(1, keepdims=True)).reshape(-1, D) @ A.T
            w, U = np.linalg.eigh(ec.T @ ec / len(ec))
            U = U[:, ::-1]
            ec2 = (xc - xc.mean(1, keepdims=True)).reshape(-1, D)
            w2, U2 = np.linalg.eigh(ec2.T @ ec2 / len(ec2))
            U2 = U2[:, ::-1]
            Ainv = np.linalg.inv(A)
            out = {}
            for pervec in (False, True):

                def m_klt(st):
                    y = (ev @ A.T) @ U
                    bits, yh = quant_ec(y, st, pervec)
                    return bits / n_vals, metric(((yh @ U.T) @ Ainv.T) - ev)

                def m_had(st):
                    y = (ev @ A.T) * signs @ Hm
                    bits, yh = quant_ec(y, st, pervec)
                    return bits / n_vals, metric(((yh @ Hm.T) * signs @ Ainv.T) - ev)

                def plain_klt(st):
                    y = ev @ U2
                    bits, yh = quant_ec(y, st, pervec)
                    return bits / n_vals, metric(yh @ U2.T - ev)

                def plain_had(st):
                    y = ev * signs @ Hm
                    bits, yh = quant_ec(y, st, pervec)
                    return bits / n_vals, metric((yh @ Hm.T) * signs - ev)

                sc = np.sqrt((ev**2).mean()) if not pervec else 1.0
                scm = np.sqrt(((ev @ A.T) ** 2).mean()) if not pervec else 1.0
                steps = np.geomspace(0.05, 3.0, 12)
                for name, fn, base in (
                    ("klt_metric", m_klt, scm),
                    ("had_metric", m_had, scm),
                    ("klt_plain", plain_klt, sc),
                    ("had_plain", plain_had, sc),
                ):
                    pts = curve(lambda st: fn(st * base), steps)
                    out[f"{name}{'_pv' if pervec else ''}"] = [at_rate(pts, r) for r in (2.0, 2.5, 3.0)]
            res[f"{s}{layer}h{h}"] = out
            print(s, layer, h, {k: " ".join(f"{v:.4f}" for v in vv) for k, vv in out.items()}, flush=True)
json.dump(res, open("/tmp/exp/proxy.json", "w"))
# summary: geometric mean over heads of distortion ratio vs had_plain_pv (current) at each rate
for s in ("k", "v"):
    keys = [k for k in res if k.startswith(s)]
    for m in res[keys[0]]:
        r = np.exp(
            np.nanmean([np.log(np.array(res[k][m]) / np.array(res[k]["had_plain_pv"])) for k in keys], 0)
        )
        print(s, m, " ".join(f"{v:.3f}" for v in r))
