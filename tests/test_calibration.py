"""Offline calibration (issue 5): Σ_q factors, the codec's pre-quantization transform,
Lloyd–Max fitting, artifacts and their validation, overlap refusal."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import kakeya_py
import numpy as np
import pytest
import reference_codec as ref
import torch
from conftest import random_ids, tiny_model
from kakeya_py.calibration import core as cal
from kakeya_py.eval import corpus as C
from kakeya_py.models import describe_model
from kakeya_py.policy import Policy, load_policy


def random_cov(d: int, seed: int, spread: float = 100.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    eig = np.geomspace(1.0, 1.0 / spread, d)
    return (q * eig) @ q.T


# -- Σ_q math -------------------------------------------------------------------------------
def test_gram_cholesky_recovers_known_covariance():
    d, n = 16, 200_000
    sigma = random_cov(d, 0)
    rng = np.random.default_rng(1)
    q = rng.multivariate_normal(np.zeros(d), sigma, size=n)
    gram = q.T @ q
    fit = cal.fit_sigma_q(gram[None], n, ridge=0.0, max_cond=1e12)
    target = sigma / (np.trace(sigma) / d)  # normalised to mean eigenvalue 1
    ll = fit.L[0] @ fit.L[0].T
    assert np.allclose(ll, target, atol=0.02 * np.abs(target).max())
    assert np.allclose(np.triu(fit.L[0], 1), 0) and np.all(np.diag(fit.L[0]) > 0)
    h = fit.heads[0]
    assert h["ridge_applied"] == 0.0 and not h["cond_cap_hit"]
    assert h["cond_before"] == pytest.approx(100.0, rel=0.1)
    assert h["normaliser_trace_over_d"] == pytest.approx(np.trace(sigma) / d, rel=0.02)


def test_codec_error_metric_equals_expected_score_error():
    """‖(k̂ − k) L‖² = E_q[(q · (k̂ − k))²] for L = chol(Σ_q), Σ_q = E[qᵀq] (no ridge)."""
    d, n = 8, 5000
    rng = np.random.default_rng(2)
    q = rng.standard_normal((n, d)) @ np.linalg.cholesky(random_cov(d, 3)).T
    fit = cal.fit_sigma_q((q.T @ q)[None], n, ridge=0.0, max_cond=1e12)
    scale = fit.heads[0]["normaliser_trace_over_d"]
    e = rng.standard_normal((10, d))  # k̂ − k, row vectors
    lhs = np.sum((e @ fit.L[0]) ** 2, axis=1) * scale
    rhs = np.mean((e @ q.T) ** 2, axis=1)
    assert np.allclose(lhs, rhs, rtol=1e-9)
    # scores are preserved by the pair (q L^-T, k L)
    k = rng.standard_normal((4, d))
    assert np.allclose((q[:5] @ fit.L_inv[0].T) @ (k @ fit.L[0]).T, q[:5] @ k.T)


def test_ridge_and_condition_cap_are_applied_and_recorded():
    d = 8
    sigma = np.diag(np.geomspace(1.0, 1e-9, d))
    fit = cal.fit_sigma_q(sigma[None] * 10, 10, ridge=1e-3, max_cond=100.0)
    h = fit.heads[0]
    assert h["cond_before"] > 1e8
    assert h["cond_cap_hit"] and h["ridge_cond_cap"] > 0
    assert h["ridge_applied"] == pytest.approx(1e-3 + h["ridge_cond_cap"])
    assert h["cond_after"] == pytest.approx(100.0, rel=1e-6)
    eig = np.linalg.eigvalsh(fit.L[0] @ fit.L[0].T)
    assert eig.max() / eig.min() == pytest.approx(100.0, rel=1e-6)
    json.dumps(fit.heads)  # plain Python values, written as they are


def test_whitening_round_trip():
    d = 16
    fit = cal.fit_sigma_q(random_cov(d, 4)[None], 1)
    k = np.random.default_rng(5).standard_normal((32, 1, d))
    back = cal.whiten(cal.whiten(k, fit.L), fit.L_inv)
    assert np.allclose(back, k, atol=1e-10)
    assert np.allclose(fit.L[0] @ fit.L_inv[0], np.eye(d), atol=1e-10)


def test_rope_matrix_matches_transformers_rope_and_average_is_the_logit_error_metric():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    model = tiny_model("llama")
    inv_freq = cal.model_inv_freq(model)
    d = 2 * inv_freq.size
    rng = np.random.default_rng(0)
    q = rng.standard_normal((1, 1, 5, d))
    pos = torch.arange(5)
    cos, sin = model.model.rotary_emb(torch.zeros(1, 5, 1, dtype=torch.float64), pos[None])
    qr, _ = apply_rotary_pos_emb(torch.from_numpy(q), torch.from_numpy(q), cos.double(), sin.double())
    for m in range(5):
        assert np.allclose(qr[0, 0, m].numpy(), q[0, 0, m] @ cal.rope_matrix(inv_freq, m), atol=1e-6)
    assert np.allclose(
        cal.rope_matrix(inv_freq, 3) @ cal.rope_matrix(inv_freq, 1).T,
        cal.rope_matrix(inv_freq, 2),
        atol=1e-12,
    )
    sigma = random_cov(d, 1)
    window = 7
    avg = cal.rope_average(sigma, inv_freq, window)
    e = rng.standard_normal(d)
    direct = np.mean(
        [e @ cal.rope_matrix(inv_freq, k).T @ sigma @ cal.rope_matrix(inv_freq, k) @ e for k in range(window)]
    )
    assert e @ avg @ e == pytest.approx(direct)
    assert np.allclose(cal.rope_average(sigma[None], inv_freq, window)[0], avg)
    fit = cal.fit_sigma_q(sigma[None], 1, ridge=0.0, max_cond=1e12, rope=(inv_freq, window))
    assert np.allclose(fit.L[0] @ fit.L[0].T, avg / (np.trace(sigma) / d))


def test_derive_rope_averaged_from_a_pre_rope_artifact(tmp_path):
    inv_freq = 1.0 / 10000 ** (np.arange(0, 16, 2) / 16)
    path = write_sigma(tmp_path)
    src = cal.load_sigma_q_artifact(path)
    fits, rows = cal.derive_rope_averaged(src, inv_freq, 16)
    direct = cal.fit_sigma_q(np.stack([random_cov(16, 1), random_cov(16, 11)]), 1, rope=(inv_freq, 16))
    assert np.allclose(fits[1].L, direct.L, atol=1e-4)
    assert rows[1] == 100


def test_gqa_pooling_groups_consecutive_query_heads():
    torch.manual_seed(0)
    q = torch.randn(2, 5, 6, 4)  # [b, s, q_heads=6, D]; kv_heads=2 -> heads 0-2 | 3-5
    g = cal.pool_gram(q, 2)
    assert g.shape == (2, 4, 4)
    x = q.double().numpy()
    for kv in range(2):
        rows = x[:, :, 3 * kv : 3 * kv + 3, :].reshape(-1, 4)
        assert np.allclose(g[kv], rows.T @ rows)
    with pytest.raises(cal.CalibrationError):
        cal.pool_gram(q, 4)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_query_collector_on_tiny_model(arch):
    model = tiny_model(arch)
    sites = cal.query_sites(model)
    assert len(sites) == 3 and sites[0].num_q_heads == 4 and sites[0].num_kv_heads == 2
    if arch == "qwen3":
        assert sites[0].source is model.model.layers[0].self_attn.q_norm
    seen = {}

    def grab(_m, _i, out, layer=0):
        seen.setdefault(layer, out.detach().clone())

    h = sites[0].source.register_forward_hook(grab)
    with cal.QueryGramCollector(model) as qc, torch.no_grad():
        model(random_ids(12))
    h.remove()
    q = seen[0].reshape(1, 12, 4, sites[0].head_dim)
    assert np.allclose(qc.gram[0], cal.pool_gram(q, 2))
    assert qc.rows[0] == 12 * 2
    fits, rows = cal.fit_collected(qc)
    assert fits[2].L.shape == (2, sites[0].head_dim, sites[0].head_dim)
    # hooks are gone
    assert all(not s.source._forward_hooks for s in sites)


# -- the codec's transform ------------------------------------------------------------------
@pytest.mark.parametrize(
    "cfg",
    [
        {"bits": 3, "block_size": 4096, "share_basis": True, "outlier_threshold": 3.0},
        {"bits": 2, "block_size": 50},
        {"bits": 4, "variance_ratio": 0.9, "rank_cap": 20},
        {"bits": 3, "metric": "inner_product"},
        {"bits": 4, "block_size": 4096, "share_basis": True, "basis": "none"},
        {"bits": 3, "block_size": 50, "basis": "none"},
    ],
)
def test_pre_quantization_matches_the_real_codec(cfg):
    """Codes from our z equal the codes in the Rust codec's bytes (parsed by the reference)."""
    rng = np.random.default_rng(6)
    t, h, d = 130, 2, 48
    mix = rng.standard_normal((d, d)) * np.geomspace(3, 0.1, d)
    x = (rng.standard_normal((t, h, d)) @ mix + 0.5).astype(np.float32)
    pre = None
    if cfg.get("metric") == "inner_product":
        pre = np.stack([cal.fit_sigma_q(random_cov(d, 7 + i)[None], 1).L[0] for i in range(h)]).astype(
            np.float32
        )
    config = kakeya_py.CodecConfig.from_dict(cfg)
    zs = cal.pre_quantization(x, config, pre)
    data = kakeya_py.encode(x, config, preconditioner=pre).to_bytes()
    parsed = ref.parse(data)
    blocks = [b for row in parsed.blocks for b in row]
    assert len(zs) == len(blocks)
    cents = np.asarray(kakeya_py.gaussian_centroids(cfg["bits"]), dtype=np.float32)
    mismatch = total = 0
    for z, b in zip(zs, blocks, strict=True):
        assert z.shape == b.codes.shape
        mismatch += int(np.sum(ref.quantize(z, cents) != b.codes))
        total += z.size
    assert mismatch <= max(2, 1e-4 * total)  # f32 summation order may move a boundary value


def test_pre_quantization_refuses_what_it_cannot_follow():
    x = np.zeros((4, 1, 8), np.float32)
    with pytest.raises(cal.CalibrationError, match="identity"):
        cal.pre_quantization(x, {"identity": True})
    with pytest.raises(cal.CalibrationError, match="exact"):
        cal.pre_quantization(x, {"pca": "randomized"})
    with pytest.raises(cal.CalibrationError, match="needs the"):
        cal.pre_quantization(x, {"metric": "inner_product"})


# -- Lloyd–Max ------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_lloyd_max_on_gaussian_samples_converges_to_the_gaussian_table(bits):
    z = np.random.default_rng(bits).standard_normal(2_000_000)
    table, stats = cal.lloyd_max(z, bits, init=np.linspace(-1, 1, 1 << bits))
    g = cal.gaussian_table(bits)
    assert stats["converged"]
    assert np.max(np.abs(table - g)) < 0.02
    known = {1: 0.3634, 2: 0.1175, 3: 0.03455, 4: 0.009501}[bits]
    assert stats["mse"] == pytest.approx(known, rel=0.01)


def test_lloyd_max_beats_gaussian_on_a_non_gaussian_law():
    z = np.random.default_rng(0).laplace(size=400_000) / math.sqrt(2)  # unit variance
    ss = cal.SortedSamples(z)
    table, stats = cal.lloyd_max(ss, 3)
    assert stats["mse"] < 0.9 * ss.mse(cal.gaussian_table(3))
    assert np.all(np.diff(table.astype(np.float32)) > 0)
    kakeya_py.CodecConfig(bits=3, centroids=[float(v) for v in table])  # loadable


def test_sorted_samples_mse_matches_direct_quantization():
    z = np.random.default_rng(3).standard_normal(10_000)
    c = cal.gaussian_table(2)
    codes = ref.quantize(z.astype(np.float32), c.astype(np.float32))
    direct = np.mean((z - c[codes]) ** 2)
    assert cal.SortedSamples(z).mse(c) == pytest.approx(direct, rel=1e-6)


# -- artifacts ------------------------------------------------------------------------------
def fake_info(layers=3, kv=2, d=16, name="tiny", sha="a" * 64):
    return SimpleNamespace(
        to_dict=lambda: {
            "name": name,
            "path": "/x",
            "source": "test",
            "source_sha256": sha,
            "architecture": "LlamaForCausalLM",
            "num_layers": layers,
            "num_q_heads": 2 * kv,
            "num_kv_heads": kv,
            "head_dim": d,
            "dtype": "float32",
        },
        name=name,
        num_layers=layers,
        num_kv_heads=kv,
        head_dim=d,
    )


def fake_text(articles=(3, 7)):
    usage = {
        "corpus": "c",
        "sha256": "s" * 64,
        "part": "calibration",
        "rule": "r",
        "articles": list(articles),
    }
    return cal.CalibrationText([[1, 2]], usage, 2, 2)


def write_sigma(tmp_path, info=None, text=None):
    info = info or fake_info()
    fits = {i: cal.fit_sigma_q(np.stack([random_cov(16, i), random_cov(16, 10 + i)]), 1) for i in range(3)}
    rows = dict.fromkeys(range(3), 100)
    return cal.save_sigma_q(
        tmp_path, fits, rows, info=info, text=text or fake_text(), command="test", ridge=1e-3, max_cond=1e4
    )


def test_sigma_q_artifact_round_trip_and_policy_loader(tmp_path):
    from kakeya_py.policy import load_sigma_q

    path = write_sigma(tmp_path)
    art = cal.load_sigma_q_artifact(tmp_path, fake_info())
    assert len(art.L) == 3 and art.L[0].shape == (2, 16, 16) and art.text["articles"] == [3, 7]
    side = json.loads((tmp_path / "sigma_q.json").read_text())
    assert side["layers"][0]["heads"][0]["cond_after"] <= 1e4 * (1 + 1e-9)
    assert side["kakeya_version"] == kakeya_py.__version__ and side["command"] == "test"
    # the harness's loader reads the same file
    sq = load_sigma_q(path, num_layers=3, num_kv_heads=2, head_dim=16)
    assert sq.text == art.text and torch.allclose(sq.factors[1], torch.from_numpy(art.L[1]))
    # and the codec takes L as its pre-conditioner
    x = np.random.default_rng(0).standard_normal((64, 2, 16)).astype(np.float32)
    out, _ = kakeya_py.roundtrip(
        x, kakeya_py.CodecConfig(bits=4, metric="inner_product"), preconditioner=art.L[0]
    )
    assert out.shape == x.shape


def test_sigma_q_validation_errors(tmp_path):
    from safetensors.numpy import load_file, save_file

    path = write_sigma(tmp_path)
    with pytest.raises(cal.CalibrationError, match="model with num_q_heads=4"):
        cal.load_sigma_q_artifact(path, fake_info(kv=3))
    with pytest.raises(cal.CalibrationError, match="SHA-256"):
        cal.load_sigma_q_artifact(path, fake_info(sha="b" * 64))
    side = tmp_path / "sigma_q.json"
    rec = json.loads(side.read_text())
    side.write_text(json.dumps({**rec, "kakeya_version": "9.9.0"}))
    with pytest.raises(cal.CalibrationError, match="kakeya 9.9.0"):
        cal.load_sigma_q_artifact(path)
    assert cal.load_sigma_q_artifact(path, strict_version=False)
    side.write_text(json.dumps({**rec, "format_version": 2}))
    with pytest.raises(cal.CalibrationError, match="format_version"):
        cal.load_sigma_q_artifact(path)
    tensors = load_file(str(path))
    tensors["layers.1.L"] = tensors["layers.1.L"].transpose(0, 2, 1).copy()  # upper triangular
    save_file(tensors, str(path))
    side.write_text(json.dumps(rec))
    with pytest.raises(cal.CalibrationError, match="does not match"):
        cal.load_sigma_q_artifact(path)
    side.write_text(json.dumps({**rec, "safetensors_sha256": None}))
    with pytest.raises(cal.CalibrationError, match="lower triangular"):
        cal.load_sigma_q_artifact(path)
    wrong = dict(tensors, **{"layers.0.L_inv": tensors["layers.0.L_inv"][:1]})
    save_file(wrong, str(path))
    with pytest.raises(cal.CalibrationError, match=r"expected float32 \(2, 16, 16\)"):
        cal.load_sigma_q_artifact(path)
    del tensors["layers.2.L_inv"]
    tensors["layers.1.L"] = tensors["layers.1.L"].transpose(0, 2, 1).copy()
    save_file(tensors, str(path))
    with pytest.raises(cal.CalibrationError, match="layers.2.L_inv"):
        cal.load_sigma_q_artifact(path)
    side.unlink()
    with pytest.raises(cal.CalibrationError, match="sidecar"):
        cal.load_sigma_q_artifact(path)


def centroid_result(streams=("k", "v"), bits=(2, 3), layers=3, per_layer=True):
    tables = []
    for s in streams:
        for b in bits:
            g = cal.gaussian_table(b) * 0.95
            e = {"stream": s, "bits": b, "layer": None, "values": [float(v) for v in g.astype(np.float32)]}
            if per_layer:
                e["per_layer"] = [
                    {"layer": i, "values": [float(v) for v in (g * (1 + 0.01 * i)).astype(np.float32)]}
                    for i in range(layers)
                ]
            tables.append(e)
    return {"tables": tables, "streams": list(streams), "bits": list(bits)}


def test_centroid_artifacts_load_into_codec_and_policy(tmp_path):
    info = fake_info()
    cal.save_centroids(
        tmp_path, centroid_result(), info=info, text=fake_text(), command="t", sigma_q=None, policy_name="p"
    )
    raw = (tmp_path / "k_3bit.f32").read_bytes()
    assert len(raw) == 32 and np.frombuffer(raw, "<f4")[0] < 0
    cs = cal.load_centroids(tmp_path, info)
    t = cs.table("k", 3)
    assert kakeya_py.CodecConfig(bits=3, centroids=t).centroids == pytest.approx(t)
    assert cs.table("v", 2, layer=2) != cs.table("v", 2)
    shared = {"block_size": 4096, "share_basis": True, "outlier_threshold": 3.0}
    pol = {"k": {"bits": 3, **shared}, "v": {"bits": 2, **shared}, "exact_layers": [0, -1]}
    d = cal.calibrated_policy(Policy.from_dict(pol), centroids=cs)
    p = Policy.from_dict(d)
    assert p.k.centroids == pytest.approx(t) and p.v.centroids == pytest.approx(cs.table("v", 2))
    d2 = cal.calibrated_policy(Policy.from_dict(pol), centroids=cs, per_layer=True)
    p2 = Policy.from_dict(d2)
    assert p2.config_for(1, "v", 3).centroids == pytest.approx(cs.table("v", 2, layer=1))
    assert p2.config_for(0, "k", 3) is None  # exact layer stays exact
    # whitened K tables need a Σ_q and plain ones refuse it
    with pytest.raises(cal.CalibrationError, match="plain K"):
        cal.calibrated_policy(Policy.from_dict(pol), centroids=cs, sigma_q=write_sigma(tmp_path / "s"))
    with pytest.raises(cal.CalibrationError, match="no 4-bit table"):
        cs.table("k", 4)


def test_centroid_validation_errors(tmp_path):
    info = fake_info()
    cal.save_centroids(
        tmp_path, centroid_result(), info=info, text=fake_text(), command="t", sigma_q=None, policy_name="p"
    )
    with pytest.raises(cal.CalibrationError, match="num_layers"):
        cal.load_centroids(tmp_path, fake_info(layers=4))
    f = tmp_path / "v_2bit.f32"
    good = f.read_bytes()
    f.write_bytes(good[:-4])
    with pytest.raises(cal.CalibrationError, match="12 bytes, expected 16"):
        cal.load_centroids(tmp_path)
    f.write_bytes(np.asarray([1, 0, 2, 3], "<f4").tobytes())
    with pytest.raises(cal.CalibrationError, match="SHA-256"):
        cal.load_centroids(tmp_path)
    rec = json.loads((tmp_path / "centroids.json").read_text())
    for e in rec["tables"]:
        e["sha256"] = None
    (tmp_path / "centroids.json").write_text(json.dumps(rec))
    with pytest.raises(cal.CalibrationError, match="strictly increasing"):
        cal.load_centroids(tmp_path)
    f.write_bytes(good)
    (tmp_path / "centroids.json").write_text(json.dumps({**rec, "format": "other"}))
    with pytest.raises(cal.CalibrationError, match="format"):
        cal.load_centroids(tmp_path)
    with pytest.raises(cal.CalibrationError, match="not found"):
        cal.load_centroids(tmp_path / "nope")


# -- text: calibration only, overlap refused ------------------------------------------------
def small_corpus(n=8):
    text = "".join(f" = Article {i} = \n word{i} " + "alpha beta gamma delta " * 40 + "\n" for i in range(n))
    return C.Corpus("toy", "mem", "f" * 64, C.articles_from_text(text))


class CharTokenizer:
    is_fast = False

    def __call__(self, text, add_special_tokens=False, return_offsets_mapping=False):
        return {"input_ids": [ord(c) % 256 for c in text]}


def test_calibration_text_reads_only_calibration_articles():
    corpus = small_corpus()
    text = cal.calibration_text(corpus, CharTokenizer(), tokens=2000, seq_len=256)
    split = corpus.split()
    assert text.usage["part"] == "calibration"
    assert set(text.usage["articles"]) <= set(split.calibration) and text.usage["articles"]
    assert all(len(s) == 256 for s in text.sequences) and text.tokens == 256 * len(text.sequences)
    single = C.Corpus("f", "x", "e" * 64, (C.Article(0, "x", "abc " * 1000),))
    with pytest.raises(C.CorpusError, match="no calibration part"):
        cal.calibration_text(single, CharTokenizer(), tokens=512, seq_len=256)


def test_overlap_with_evaluation_text_is_refused(tmp_path):
    from kakeya_py.cli.harness import prepare_policy

    corpus = small_corpus()
    split = corpus.split()
    ok = split.usage("test", [1, 4])
    bad = split.usage("validation", [3, 5])  # article 3 is calibration text
    calib = split.usage("calibration", [3, 7])
    cal.check_text_disjoint(calib, ok, "x")
    with pytest.raises(C.CorpusOverlapError):
        cal.check_text_disjoint(calib, bad, "x")
    with pytest.raises(C.CorpusError, match="no calibration text"):
        cal.check_text_disjoint(None, ok, "x")
    # the harness refuses a Σ_q whose recorded text overlaps the evaluation text
    info = fake_info()
    path = write_sigma(tmp_path, info, cal.CalibrationText([[1]], calib, 1, 1))
    pol = tmp_path / "p.json"
    pol.write_text(json.dumps({"k": {"bits": 3, "metric": "inner_product"}, "v": None, "sigma_q": str(path)}))
    args = SimpleNamespace(
        config=str(pol), layers=None, streams=None, exact_layers=None, post_rope_k=False, sigma_q=None
    )
    prepare_policy(args, info, {"usage": ok})
    with pytest.raises(C.CorpusOverlapError):
        prepare_policy(args, info, {"usage": bad})


# -- end to end on a tiny model -------------------------------------------------------------
def test_centroid_run_on_tiny_model(tmp_path):
    model = tiny_model("llama")
    info = describe_model(model, "tiny-llama", "/x", "test", None)
    seqs = [list(map(int, random_ids(96, seed=s)[0])) for s in range(5)]
    usage = {"corpus": "c", "sha256": "s" * 64, "part": "calibration", "rule": "r", "articles": [3]}
    text = cal.CalibrationText(seqs, usage, 96 * 5, 96)
    with cal.QueryGramCollector(model) as qc:
        captured = list(cal.collect_kv(model, seqs, range(3), ("k", "v")))
    fits, rows = cal.fit_collected(qc)
    path = cal.save_sigma_q(
        tmp_path / "sq", fits, rows, info=info, text=text, command="t", ridge=1e-3, max_cond=1e4
    )
    sigma = cal.load_sigma_q_artifact(path, info)
    policy = load_policy("recommended").with_changes(exact_layers="none")
    res = cal.run_centroids(
        model,
        info,
        text,
        policy,
        bits=(3, 4),
        variants={"plain": None, "sigma_q": sigma},
        held_out=1,
        per_layer=True,
        captured=captured,
    )
    for name, r in res.items():
        assert len(r["tables"]) == 4
        for e in r["tables"]:
            assert e["fit_mse"] <= e["fit_mse_gaussian"] + 1e-12
            assert e["heldout_mse"] > 0 and set(e["codec_rel_err"]) == {"gaussian", "calibrated"}
            assert len(e["per_layer"]) == 3
        out = cal.save_centroids(
            tmp_path / name,
            r,
            info=info,
            text=text,
            command="t",
            sigma_q=sigma if name == "sigma_q" else None,
            policy_name="recommended",
        )
        cs = cal.load_centroids(out, info)
        assert cs.whitened_k == (name == "sigma_q")
    cs = cal.load_centroids(tmp_path / "sigma_q", info)
    d = cal.calibrated_policy(policy, centroids=cs, sigma_q=path)
    assert d["k"]["metric"] == "inner_product" and d["k"]["centroids"] == cs.table("k", d["k"]["bits"])


# -- the real model (slow) ------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.skipif(not C.default_wikitext_path().is_file(), reason="WikiText-2 not available")
def test_real_model_calibration_cli_on_a_little_text(tmp_path):
    from kakeya_py.cli import main
    from kakeya_py.models import load_model
    from kakeya_py.policy import load_sigma_q

    _, _, info = load_model("smollm2-135m", progress=False)
    small = ["--tokens", "256", "--seq-len", "128", "--threads", "2", "--no-progress"]
    assert main(["calibrate", "sigma-q", "--out", str(tmp_path / "sq"), *small]) == 0
    art = cal.load_sigma_q_artifact(tmp_path / "sq", info)
    assert len(art.L) == 30 and art.L[0].shape == (3, 64, 64)
    assert set(art.text["articles"]) <= set(C.load_wikitext().split().calibration)
    rec = art.record
    assert rec["tokens"] == 256 and rec["command"].startswith("kakeya calibrate sigma-q")
    assert all(h["cond_after"] <= 1e4 * (1 + 1e-6) for layer in rec["layers"] for h in layer["heads"])
    assert load_sigma_q(art.path, num_layers=30, num_kv_heads=3, head_dim=64).text == art.text
    small = ["--tokens", "384", "--seq-len", "128", "--held-out", "1", "--threads", "2", "--no-progress"]
    args = ["calibrate", "centroids", "--bits", "3", "--stream", "k", "--sigma-q", str(art.path)]
    assert main([*args, "--out", str(tmp_path / "c"), *small]) == 0
    cs = cal.load_centroids(tmp_path / "c", info)
    e = cs.record["tables"][0]
    assert cs.whitened_k and e["fit_samples"] > 10_000 and e["heldout_mse"] > 0
    pol = tmp_path / "p.json"
    args = ["calibrate", "policy", "--bits", "3", "--streams", "k", "--centroids", str(tmp_path / "c")]
    assert main([*args, "--sigma-q", str(art.path), "--out", str(pol)]) == 0
    p = load_policy(str(pol))
    assert p.k.metric == "inner_product" and p.k.centroids == pytest.approx(cs.table("k", 3))
