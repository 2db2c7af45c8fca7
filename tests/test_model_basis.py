"""Per-model coefficient bases (kakeya_py.calibration.model_basis) and the codec's rotation "none"."""

from __future__ import annotations

import json
from types import SimpleNamespace

import kakeya_py
import numpy as np
import pytest
import torch
from conftest import random_ids, tiny_model
from kakeya_py.calibration import model_basis as mb
from kakeya_py.models import describe_model
from kakeya_py.policy import Policy, PolicyCodec, load_policy


def correlated(n: int, d: int, seed: int) -> np.ndarray:
    """Rows with a steep, rotated spectrum (no coordinate is special)."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    return (rng.standard_normal((n, d)) * np.geomspace(4.0, 0.01, d)) @ q.T + 3.0


def test_fit_head_decorrelates_in_the_metric_and_orders_by_variance():
    d = 16
    x = correlated(20_000, d, 0)
    rng = np.random.default_rng(1)
    a = np.triu(rng.standard_normal((d, d)) * 0.3) + np.diag(1.0 + rng.random(d))
    cov = np.cov(x.T, bias=True)
    t, t_inv, lam = mb.fit_head(cov, a)
    assert np.allclose(t @ t_inv, np.eye(d), atol=1e-8)
    y = (x - x.mean(0)) @ t.T
    c = np.cov(y.T, bias=True)
    assert np.allclose(c, np.diag(lam), atol=1e-6 * lam[0])  # uncorrelated, variances λ
    assert np.all(np.diff(lam) <= 0)
    # A squared error in coefficients is the metric's error: ‖T e‖² = ‖A e‖².
    e = rng.standard_normal(d)
    assert np.isclose(np.sum((t @ e) ** 2), np.sum((a @ e) ** 2))


def test_o_proj_metric_is_the_output_error():
    d, group, hidden = 8, 3, 20
    rng = np.random.default_rng(2)
    w = rng.standard_normal((hidden, 2 * group * d))
    e = rng.standard_normal(d)
    m = mb.o_proj_metric(w, 1, group, d)
    out = sum(w[:, g * d : (g + 1) * d] @ e for g in range(group, 2 * group))
    per_head = sum(np.sum((w[:, g * d : (g + 1) * d] @ e) ** 2) for g in range(group, 2 * group))
    assert np.isclose(e @ m @ e, per_head)
    assert per_head != pytest.approx(np.sum(out**2))  # per query head, not their sum
    a = mb.metric_factor(m, ridge=0.0)
    assert np.allclose(a.T @ a, m)


def _tiny_basis(tmp_path, metrics):
    model = tiny_model("llama")
    info = describe_model(model, "tiny-llama", "tiny", "random", "0" * 64)
    seqs = [random_ids(96, seed=s)[0].tolist() for s in range(3)]
    fits = mb.fit_basis(model, info, seqs, metrics=metrics, progress=False)
    path = mb.save_basis(
        tmp_path / "basis",
        fits,
        model={"name": "tiny-llama"},
        text={"corpus": "random", "part": "calibration", "articles": []},
        metrics=metrics,
        command="test",
    )
    return model, info, path


def test_basis_artifact_round_trip_and_tamper_check(tmp_path):
    model, info, path = _tiny_basis(tmp_path, {"k": "plain", "v": "o_proj"})
    basis = mb.load_basis(path, num_kv_heads=info.num_kv_heads, head_dim=info.head_dim)
    assert basis.sha256 == json.loads(path.with_suffix(".json").read_text())["safetensors_sha256"]
    x = torch.randn(10, info.num_kv_heads, info.head_dim)
    assert torch.allclose(basis.invert(2, "v", basis.apply(2, "v", x)), x, atol=1e-4)
    with pytest.raises(mb.ModelBasisError, match="kv-heads"):
        mb.load_basis(path, num_kv_heads=info.num_kv_heads + 1)
    data = bytearray(path.read_bytes())
    data[-5] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(mb.ModelBasisError, match="SHA-256"):
        mb.load_basis(path)
    with pytest.raises(mb.ModelBasisError, match="not found"):
        mb.load_basis(tmp_path / "nowhere")


def _basis_policy(path, sha, step=0.2, sink=1):
    cfg = mb.codec_config(sha, step)
    return Policy.from_dict({"k": cfg, "v": cfg, "basis": str(path), "sink_tokens": sink})


def test_policy_codes_in_the_basis_and_names_it(tmp_path):
    model, info, path = _tiny_basis(tmp_path, {"k": "plain", "v": "plain"})
    basis = mb.load_basis(path)
    policy = _basis_policy(path, basis.sha256)
    codec = PolicyCodec(policy, info.num_layers)
    x = torch.randn(64, info.num_kv_heads, info.head_dim) * torch.linspace(3, 0.1, info.head_dim)
    out, nbytes = codec.roundtrip(1, "k", x)
    # By hand: sink exact, the rest coded in the basis and mapped back.
    cfg = policy.config_for(1, "k", info.num_layers)
    enc = kakeya_py.encode(basis.apply(1, "k", x[1:]), cfg)
    want = basis.invert(1, "k", kakeya_py.decode(enc))
    assert torch.equal(out[:1], x[:1])
    assert torch.allclose(out[1:], want, atol=1e-6)
    assert nbytes == enc.nbytes + x[:1].numel() * 2
    assert enc.config.transform == basis.sha256 and b"transform" in enc.to_bytes()[:2000]
    assert not torch.allclose(out, x)  # lossy: the test would see a codec that did nothing
    # A policy naming another basis, or none, is refused before any run.
    with pytest.raises(ValueError, match="SHA-256"):
        PolicyCodec(_basis_policy(path, "0" * 64), info.num_layers)
    with pytest.raises(ValueError, match="model basis file"):
        Policy.from_dict({"k": policy.k.to_dict()})


def test_policy_file_resolves_a_relative_basis(tmp_path):
    _, _, path = _tiny_basis(tmp_path, {"k": "plain", "v": "plain"})
    basis = mb.load_basis(path)
    d = _basis_policy(path, basis.sha256).to_dict()
    d["basis"] = "basis/basis.safetensors"
    (tmp_path / "p.json").write_text(json.dumps(d))
    assert load_policy(str(tmp_path / "p.json")).basis == str(path.resolve())


def test_basis_beats_hadamard_at_equal_bytes_on_a_steep_spectrum():
    """The reason for the basis: on correlated data with a steep spectrum, coding the
    decorrelated coefficients with one step costs far fewer bytes than the Hadamard path
    at the same error (reverse water-filling); the test fails if the two were equal."""
    d, n = 64, 2048
    x = np.stack([correlated(n, d, 10), correlated(n, d, 11)], axis=1).astype(np.float32)
    cov = [np.cov(x[:, h].T, bias=True) for h in range(2)]
    pairs = [mb.fit_head(c, np.eye(d)) for c in cov]
    t = np.stack([p[0] for p in pairs]).astype(np.float32)
    t_inv = np.stack([p[1] for p in pairs]).astype(np.float32)
    basis = mb.ModelBasis(
        path=None, sha256="a" * 64, record={}, forward={(0, "k"): t}, inverse={(0, "k"): t_inv}, variance={}
    )
    xt = torch.from_numpy(x)

    def err(y):
        return float(((y - xt) ** 2).sum() / ((xt - xt.mean(0)) ** 2).sum())

    had = kakeya_py.CodecConfig(
        bits=6, block_size=4096, share_basis=True, basis="none", uniform_step=0.1, entropy_coding=True
    )
    y_had, b_had = kakeya_py.roundtrip(xt, had)
    for step in (0.02, 0.05, 0.1, 0.2, 0.4):
        cfg = kakeya_py.CodecConfig(
            bits=8,
            block_size=4096,
            share_basis=True,
            basis="none",
            rotation="none",
            uniform_step=step,
            entropy_coding=True,
            scale_granularity="block",
            outlier_threshold=120 * step,
        )
        coded, b_none = kakeya_py.roundtrip(basis.apply(0, "k", xt), cfg)
        if err(basis.invert(0, "k", coded)) <= err(y_had):
            best = b_none
    assert best < 0.6 * b_had, (best, b_had)


def test_calibrate_basis_refuses_sigma_q_metric_without_artifact():
    model = tiny_model("llama")
    info = SimpleNamespace(num_layers=2, num_kv_heads=2, head_dim=16, num_q_heads=4)
    with pytest.raises(mb.ModelBasisError, match="Σ_q"):
        mb.fit_basis(model, info, [[1, 2, 3]], metrics={"k": "sigma_q"}, progress=False)


def test_kakeya_cache_refuses_a_basis_policy(tmp_path):
    from kakeya_py.generation.cache import KakeyaCache

    model, _, path = _tiny_basis(tmp_path, {"k": "plain", "v": "plain"})
    policy = _basis_policy(path, mb.load_basis(path).sha256)
    with pytest.raises(ValueError, match="model basis"):
        KakeyaCache(policy, model)


def test_eval_record_names_the_basis_as_a_per_model_constant(tmp_path):
    from kakeya_py.cli.harness import _model_basis_record

    _, _, path = _tiny_basis(tmp_path, {"k": "plain", "v": "plain"})
    basis = mb.load_basis(path)
    rec = _model_basis_record(_basis_policy(path, basis.sha256))
    assert rec == {"path": str(path), "sha256": basis.sha256, "bytes": path.stat().st_size}
    assert _model_basis_record(Policy()) is None


def test_model_basis_preset_names_the_shipped_basis():
    from kakeya_py.policy import preset_policy

    policy = preset_policy("model-basis")
    basis = mb.load_basis(policy.basis)
    assert policy.k.transform == basis.sha256 and policy.k.rotation == "none"
    assert policy.v.transform is None  # V stays on the Hadamard path (reports/model_basis)
    assert basis.record["text"]["part"] == "calibration"
    assert {(r["role"], r["part"]) for r in policy.provenance} == {
        ("fit", "calibration"),
        ("selection", "validation"),
    }


def test_a_basis_of_another_shape_is_refused_clearly(tmp_path):
    _, info, path = _tiny_basis(tmp_path, {"k": "plain", "v": "plain"})
    basis = mb.load_basis(path)
    with pytest.raises(mb.ModelBasisError, match="calibrate basis"):
        basis.apply(0, "k", torch.zeros(4, info.num_kv_heads + 1, info.head_dim))
