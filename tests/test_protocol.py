"""The measurement protocol: provenance refusal, theory checks that can fail, and what the
vLLM plugin leaves exact (counted, not skipped silently)."""

from __future__ import annotations

import json
from pathlib import Path

import kakeya_py as kp
import numpy as np
import pytest
import torch
from conftest import save_tiny_llama
from kakeya_py.cli import main


# -- Σ_q: where theory says whitening must pay, it does -------------------------------------------
def _sigma_q_case(seed: int = 0):
    rng = np.random.default_rng(seed)
    t, d = 4096, 64
    k = rng.standard_normal((t, 1, d)).astype(np.float32)  # isotropic K
    lam = np.geomspace(100.0, 0.01, d)  # a query covariance with a wide spectrum
    q = np.linalg.qr(rng.standard_normal((d, d)))[0]
    sigma_q = (q * lam) @ q.T
    return k, sigma_q, np.linalg.cholesky(sigma_q).astype(np.float32)


def _logit_error(k, sigma_q, cfg, factor=None):
    kwargs = {} if factor is None else {"preconditioner": factor[None]}
    k_hat, nbytes = kp.roundtrip(k, cfg, **kwargs)
    e = (k_hat - k)[:, 0, :]
    return float(np.mean(np.einsum("td,de,te->t", e, sigma_q, e))), nbytes


def test_sigma_q_with_variance_allocation_lowers_the_logit_error_at_fewer_bytes():
    """E[(q·e)²] = E[eᵀ Σ_q e]. After whitening K̃ = K·L the error reaching the logits is
    ‖ẽ‖², so whitening pays only when the rate follows the whitened spectrum (reverse
    water-filling: ``allocation="variance"``), by about the spectrum's geometric / arithmetic
    mean; with the uniform allocation it cannot (docs/calibration.md)."""
    k, sigma_q, factor = _sigma_q_case()
    base = {"block_size": 4096, "share_basis": True}
    plain3, bytes_plain3 = _logit_error(k, sigma_q, kp.CodecConfig(bits=3, **base))
    white2, bytes_white2 = _logit_error(
        k, sigma_q, kp.CodecConfig(bits=2, allocation="variance", metric="inner_product", **base), factor
    )
    assert bytes_white2 < bytes_plain3  # fewer bytes, the factor L included
    assert white2 < 0.5 * plain3, (white2, plain3)  # measured: 8.0 vs 24.7
    # with the uniform allocation whitening gains nothing worth the name (theory: equal)
    plain_u, _ = _logit_error(k, sigma_q, kp.CodecConfig(bits=3, **base))
    white_u, _ = _logit_error(k, sigma_q, kp.CodecConfig(bits=3, metric="inner_product", **base), factor)
    assert 0.8 < white_u / plain_u < 1.1


# -- provenance: a policy tuned on the evaluated text is refused -----------------------------------
@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    save_tiny_llama(folder)
    return folder


def _text(tmp_path):
    rng = np.random.default_rng(0)
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"t{i}" for i in rng.integers(3, 256, size=300)) + "\n")
    return text


def test_policy_tuned_on_the_evaluated_text_is_refused(tiny_folder, tmp_path, capsys):
    from kakeya_py.eval.corpus import load_text_file

    text = _text(tmp_path)
    usage = load_text_file(text).split().usage("validation")
    policy = {"k": {"bits": 4}, "v": {"bits": 4}, "provenance": [{"role": "selection", **usage}]}
    pol = tmp_path / "tuned.json"
    pol.write_text(json.dumps(policy))
    argv = ["eval", "--model", str(tiny_folder), "--text-file", str(text), "--config", str(pol)]
    argv += ["--passages", "2", "--ctx", "64", "--n-eval", "16", "--no-progress", "--threads", "1"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "fitted or chosen on the text being evaluated" in err and len(err.strip().splitlines()) == 1
    out = tmp_path / "r.json"
    assert main([*argv, "--allow-overlap", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["overlap"] is True and r["policy_provenance"][0]["role"] == "selection"
    assert "**In-sample**" in capsys.readouterr().out
    # the same policy on other text is not in-sample
    other = tmp_path / "other.txt"
    other.write_text(text.read_text().replace("t3 ", "t4 "))
    out2 = tmp_path / "r2.json"
    argv2 = [a if a != str(text) else str(other) for a in argv]
    assert main([*argv2, "--json", str(out2)]) == 0
    assert json.loads(out2.read_text())["overlap"] is False


def test_presets_record_where_they_were_chosen():
    from kakeya_py.eval.corpus import CODE_TEXTS, TEST_ARTICLES, WIKITEXT_SHA256
    from kakeya_py.policy import load_policy

    shipped = sorted(p.stem for p in (Path(kp.__file__).parent / "presets").glob("*.json"))
    assert {"model-basis-layers", "model-basis-vlayers", "recommended-log8"} <= set(shipped)
    for name in ("recommended", "uniform-ec-log8", *shipped):
        prov = load_policy(name).provenance
        wiki = [r for r in prov if r["sha256"] == WIKITEXT_SHA256]
        assert wiki and all(set(r["articles"]).isdisjoint(TEST_ARTICLES) for r in wiki), name
        assert all(r["sha256"] in (WIKITEXT_SHA256, CODE_TEXTS["validation"].sha256) for r in prov), name
        assert {r["part"] for r in prov} <= {"calibration", "validation"}
    assert load_policy("identity").provenance == []
    with pytest.raises(ValueError, match="role"):
        kp.policy.Policy.from_dict({"provenance": [{"role": "x", "sha256": "", "part": "", "articles": []}]})


# -- vLLM plugin: segments left exact are counted; tensor parallelism is refused -------------------
class _FakeAttention(torch.nn.Module):
    """The attributes :func:`find_vllm_sites` reads of a vLLM attention module."""

    def __init__(self):
        super().__init__()
        self.qkv_proj = torch.nn.Identity()
        self.rotary_emb = torch.nn.Identity()
        self.attn = torch.nn.Identity()
        self.o_proj = torch.nn.Identity()
        self.num_kv_heads, self.head_dim, self.kv_size = 2, 8, 16


class _FakeModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList([torch.nn.Module() for _ in range(2)])
        for layer in self.layers:
            layer.self_attn = _FakeAttention()


def test_vllm_plugin_counts_the_tokens_it_leaves_exact():
    from kakeya_py.integrations import vllm_plugin as P

    state = P.install(_FakeModel(), policy={"k": {"bits": 4}, "v": {"bits": 4}}, mode="in-forward")
    x = torch.randn(8, 16)
    # one batch: a prefill of 5 (positions 0..4), a decode step (position 9), a continuation (20..21)
    positions = torch.tensor([0, 1, 2, 3, 4, 9, 20, 21])
    out = state._process(0, "k", x, positions)
    assert out is not None and not torch.equal(out[:5], x[:5]) and torch.equal(out[5:], x[5:])
    assert state.info()["left_exact"] == {"decode": 1, "continuation": 2}
    assert state.take_left_exact() == {"decode": 1, "continuation": 2}
    assert state.take_left_exact() == {"decode": 0, "continuation": 0}
    state.set_phase("in-forward", strict=True)
    with pytest.raises(P.VLLMHookError, match="position 9"):
        state._process(0, "k", x, positions)


def test_vllm_plugin_refuses_tensor_parallelism(monkeypatch):
    from kakeya_py.integrations import vllm_plugin as P

    monkeypatch.setattr(P, "tensor_parallel_size", lambda: 2)
    with pytest.raises(P.VLLMHookError, match="tensor_parallel_size=2"):
        P.install(_FakeModel(), policy=None)


# -- the exact recent window: a policy option, counted in the bytes, also for peers ---------------
def test_policy_window_keeps_the_last_positions_exact_and_counts_them():
    from kakeya_py.peers import PeerPolicy, parse_method
    from kakeya_py.policy import Policy, PolicyCodec

    x = torch.randn(64, 2, 16)
    base = {"k": {"bits": 3}, "v": {"bits": 3}, "sink_tokens": 1}
    plain = PolicyCodec(Policy.from_dict(base), 2)
    windowed_policy = Policy.from_dict({**base, "window_tokens": 8})
    assert Policy.from_dict(windowed_policy.to_dict()).window_tokens == 8
    windowed = PolicyCodec(windowed_policy, 2)
    y, n = windowed.roundtrip(0, "k", x)
    assert torch.equal(y[:1], x[:1]) and torch.equal(y[-8:], x[-8:]) and not torch.equal(y[1:-8], x[1:-8])
    inner, n_inner = plain.roundtrip(0, "k", x[:-8].contiguous())
    assert torch.equal(y[:-8], inner) and n == n_inner + 8 * 2 * 16 * 2
    everything, none = PolicyCodec(Policy.from_dict({**base, "window_tokens": 100}), 2).roundtrip(0, "k", x)
    assert everything is x and none is None
    with pytest.raises(ValueError, match="window_tokens"):
        Policy.from_dict({**base, "window_tokens": -1})
    # a peer gets the same option, unless it has a residual window of its own
    turbo = PeerPolicy(parse_method("turbo-4"), 2, window_tokens=8)
    assert torch.equal(turbo.roundtrip(0, "v", x)[0][-8:], x[-8:])
    kivi = PeerPolicy(parse_method("kivi-4"), 2, window_tokens=8)
    assert torch.equal(kivi.roundtrip(0, "v", x)[0], parse_method("kivi-4").roundtrip(0, "v", x)[0])
