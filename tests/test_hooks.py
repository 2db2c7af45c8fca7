"""Hook placement, identity exactness, selection and removal on tiny random models.

Every architecture of ``conftest.ARCHS`` (Llama, Mistral, Qwen2, Qwen3) is built from a
config; the codec is the real ``kakeya_py`` one (the ``identity`` preset for exactness,
a 2-bit configuration for "the hook really changes something").
"""

from __future__ import annotations

import json

import kakeya_py
import pytest
import torch
from conftest import random_ids
from kakeya_py.eval.corpus import Passage
from kakeya_py.eval.harness import HFRunner, Variant, codec_residuals, codec_transform, noise_transform
from kakeya_py.eval.hooks import KVInterceptor, PositionEmbeddingRecorder, find_attention_sites, parse_layers
from kakeya_py.policy import Ledger, Policy, PolicyCodec, load_policy, preset_policy

CTX, N_EVAL = 40, 15
LOSSY = {"bits": 2, "block_size": 64}


def passage(seed: int = 1) -> Passage:
    ids = tuple(random_ids(CTX + N_EVAL + 1, seed=seed)[0].tolist())
    return Passage(0, 0, CTX, N_EVAL, ids, 0, len(ids), None, None, ())


def lossy_policy(**kw) -> Policy:
    return Policy.from_dict({"k": LOSSY, "v": LOSSY, **kw})


class Recorder:
    """Wraps the real codec and records what it was asked to encode."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, config, **kwargs):
        self.calls.append((tuple(x.shape), config.to_dict()))
        return kakeya_py.roundtrip(x, config, **kwargs)


# -- placement -----------------------------------------------------------------------------
def attention_inputs(model, ids):
    """hidden_states and (cos, sin) entering each attention layer, from a plain forward."""
    seen = {}
    handles = [
        s.attn.register_forward_pre_hook(
            (lambda layer: lambda m, a, kw: seen.__setitem__(layer, kw["hidden_states"]))(s.layer),
            with_kwargs=True,
        )
        for s in find_attention_sites(model)
    ]
    with PositionEmbeddingRecorder(model) as rec, torch.no_grad():
        model(ids)
    for h in handles:
        h.remove()
    return seen, rec.by_layer


def test_k_source_is_k_norm_only_for_qwen3(model, arch):
    sites = find_attention_sites(model)
    assert len(sites) == 3 and all(s.num_kv_heads == 2 and s.head_dim == 16 for s in sites)
    expected = "k_norm" if arch == "qwen3" else "k_proj"
    assert all(s.k_source is getattr(s.attn, expected) for s in sites)


def test_codec_sees_pre_rope_k_and_v_as_produced(model, arch):
    ids = random_ids(24, batch=2)
    hidden, rope = attention_inputs(model, ids)
    seen = {}

    def grab(layer, stream, x):
        seen[(layer, stream)] = x.clone()

    with KVInterceptor(model, grab), torch.no_grad():
        model(ids)
    with torch.no_grad():
        for site in find_attention_sites(model):
            h = hidden[site.layer]
            k = site.attn.k_proj(h).view(2, 24, 2, 16)
            if arch == "qwen3":
                k = site.attn.k_norm(k)
            v = site.attn.v_proj(h).view(2, 24, 2, 16)
            assert torch.equal(seen[(site.layer, "k")], k)
            assert torch.equal(seen[(site.layer, "v")], v)
            # and it is not the rotated K (RoPE moves every position but the first)
            cos, sin = rope[site.layer]
            _, k_rot = site.modeling_module.apply_rotary_pos_emb(
                k.transpose(1, 2), k.transpose(1, 2), cos, sin
            )
            assert not torch.allclose(k_rot.transpose(1, 2)[:, 1:], k[:, 1:])


def test_post_rope_k_is_rotated_and_patch_is_restored(model, arch):
    ids = random_ids(24)
    hidden, rope = attention_inputs(model, ids)
    site0 = find_attention_sites(model)[0]
    original = site0.modeling_module.apply_rotary_pos_emb
    seen = {}
    with KVInterceptor(model, lambda la, s, x: seen.setdefault((la, s), x.clone()), k_position="post_rope"):
        with torch.no_grad():
            model(ids)
    assert site0.modeling_module.apply_rotary_pos_emb is original
    with torch.no_grad():
        for site in find_attention_sites(model):
            k = site.attn.k_proj(hidden[site.layer]).view(1, 24, 2, 16)
            if arch == "qwen3":
                k = site.attn.k_norm(k)
            cos, sin = rope[site.layer]
            _, k_rot = original(k.transpose(1, 2), k.transpose(1, 2), cos, sin)
            assert torch.equal(seen[(site.layer, "k")], k_rot.transpose(1, 2))


def test_layer_and_stream_selection_of_the_interceptor(model):
    calls = []
    with (
        KVInterceptor(model, lambda la, s, x: calls.append((la, s)), layers=[1, 2], streams="k"),
        torch.no_grad(),
    ):
        model(random_ids(8))
    assert calls == [(1, "k"), (2, "k")]


def test_hooks_are_removed_and_model_is_unchanged(model):
    ids = random_ids(32)
    with torch.no_grad():
        before = model(ids).logits
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with KVInterceptor(model, lambda la, s, x: x * 0.5, k_position="post_rope"), torch.no_grad():
        changed = model(ids).logits
    assert not torch.equal(before, changed)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    with torch.no_grad():
        after = model(ids).logits
    assert torch.equal(before, after)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_interceptor_removes_hooks_on_error(model):
    def boom(layer, stream, x):
        raise RuntimeError("codec failed")

    with pytest.raises(RuntimeError, match="codec failed"), KVInterceptor(model, boom), torch.no_grad():
        model(random_ids(8))
    assert all(not m._forward_hooks for m in model.modules())


# -- identity exactness with the real codec ----------------------------------------------
@pytest.mark.parametrize("mode", ["snapshot", "in-forward", "prefix-in-forward"])
def test_identity_codec_reproduces_codec_off_logits_exactly(model, mode):
    p = passage()
    ids = torch.tensor([p.token_ids])
    runner = HFRunner(model)
    codec = PolicyCodec(preset_policy("identity"), runner.num_layers)
    variant = Variant("identity", codec_transform(codec))
    ledger = Ledger()
    if mode == "snapshot":
        state = runner.prefill(ids[:, :CTX])
        ref = runner.eval_logits(state, ids[:, CTX : CTX + N_EVAL])
        reps = runner.snapshot_replacements(state, variant, ledger, {})
        assert len(reps) == 2 * runner.num_layers  # every tensor went through the codec
        alt = runner.eval_logits(state, ids[:, CTX : CTX + N_EVAL], reps)
    else:
        ref = runner.full_logits(ids[:, : CTX + N_EVAL])
        prefix = CTX if mode == "prefix-in-forward" else None
        alt = runner.full_logits(ids[:, : CTX + N_EVAL], variant, ledger, prefix=prefix)
    assert torch.equal(ref, alt)
    assert all(ledger.compressed.values()) and ledger.ratio() < 1.0  # identity stores bytes + headers


def test_snapshot_reference_matches_a_plain_full_pass(model):
    p = passage()
    ids = torch.tensor([p.token_ids])
    runner = HFRunner(model)
    ref = runner.eval_logits(runner.prefill(ids[:, :CTX]), ids[:, CTX : CTX + N_EVAL])
    full = runner.full_logits(ids[:, : CTX + N_EVAL])[:, CTX:]
    torch.testing.assert_close(ref, full, rtol=1e-4, atol=1e-4)


def test_lossy_codec_changes_logits_in_every_mode(model):
    runner = HFRunner(model)
    codec = PolicyCodec(lossy_policy(), runner.num_layers)
    for mode in ("snapshot", "in-forward", "prefix-in-forward"):
        (res,), _ = runner.run(
            [passage()], [Variant("lossy", codec_transform(codec))], mode=mode, progress=False
        )
        t = res.tokens[0]
        assert (t.ref_logprob != t.alt_logprob).any(), mode
        assert res.ledger.ratio() > 1.0  # tiny tensors: headers and skeletons weigh a lot


def test_snapshot_codec_sees_only_the_prefix(model):
    rec = Recorder()
    runner = HFRunner(model)
    codec = PolicyCodec(lossy_policy(), runner.num_layers, roundtrip_fn=rec)
    runner.run([passage()], [Variant("lossy", codec_transform(codec))], mode="snapshot", progress=False)
    assert len(rec.calls) == 2 * runner.num_layers
    assert {shape for shape, _ in rec.calls} == {(CTX, 2, 16)}


def test_in_forward_codec_sees_every_position(model):
    rec = Recorder()
    runner = HFRunner(model)
    codec = PolicyCodec(lossy_policy(), runner.num_layers, roundtrip_fn=rec)
    runner.run([passage()], [Variant("lossy", codec_transform(codec))], mode="in-forward", progress=False)
    assert {shape for shape, _ in rec.calls} == {(CTX + N_EVAL, 2, 16)}


def test_batch_elements_are_encoded_separately(model):
    rec = Recorder()
    codec = PolicyCodec(lossy_policy(), 3, roundtrip_fn=rec)
    runner = HFRunner(model)
    ledger = Ledger()
    runner.full_logits(random_ids(20, batch=3), Variant("x", codec_transform(codec)), ledger)
    assert len(rec.calls) == 3 * 3 * 2 and {s for s, _ in rec.calls} == {(20, 2, 16)}
    assert ledger.raw[(0, "k")] == 3 * 20 * 2 * 16 * 2


# -- policy resolution ---------------------------------------------------------------------
def run_recorded(model, policy: Policy, mode: str = "snapshot"):
    rec = Recorder()
    runner = HFRunner(model)
    codec = PolicyCodec(policy, runner.num_layers, roundtrip_fn=rec)
    (res,), _ = runner.run([passage()], [Variant("p", codec_transform(codec))], mode=mode, progress=False)
    return rec, res


def test_exact_boundary_layers_and_k_only(model):
    rec, res = run_recorded(model, lossy_policy(exact_layers=[0, -1], streams=["k"]))
    assert len(rec.calls) == 1  # layer 1, K
    led = res.ledger
    assert led.compressed[(1, "k")] and not led.compressed[(1, "v")] and not led.compressed[(0, "k")]
    bf16 = CTX * 2 * 16 * 2
    assert led.stored[(0, "k")] == bf16 and led.stored[(2, "v")] == bf16
    assert led.raw[(1, "k")] == bf16 and led.stored[(1, "k")] < bf16
    total_raw = sum(led.raw.values())
    assert total_raw == 3 * 2 * bf16
    assert led.ratio() == pytest.approx(total_raw / (5 * bf16 + led.stored[(1, "k")]))


def test_v_only_and_layer_selection(model):
    rec, res = run_recorded(model, lossy_policy(layers=[0, 2], streams=["v"]), mode="in-forward")
    assert len(rec.calls) == 2
    assert [k for k, c in res.ledger.compressed.items() if c] == [(0, "v"), (2, "v")]


def test_per_layer_overrides(model):
    policy = lossy_policy(overrides={"1": {"k": {"bits": 4}, "v": None}, "-1": {"v": {"bits": 3}}})
    rec, res = run_recorded(model, policy)
    bits = [c["bits"] for _, c in rec.calls]
    assert sorted(bits) == [2, 2, 2, 3, 4]  # layer 0 k,v; layer 1 k (4 bits); layer 2 k, v (3 bits)
    assert not res.ledger.compressed[(1, "v")]
    assert res.ledger.ratio("k", layer=1) < res.ledger.ratio("k", layer=0)


def test_policy_json_round_trip_and_files(tmp_path):
    policy = lossy_policy(exact_layers=[0], overrides={"2": {"k": {"bits": 3}}}, streams=["k", "v"])
    again = Policy.from_dict(json.loads(json.dumps(policy.to_dict())))
    for layer in range(3):
        for s in ("k", "v"):
            a, b = policy.config_for(layer, s, 3), again.config_for(layer, s, 3)
            assert (a is None and b is None) or a.to_dict() == b.to_dict()
    f = tmp_path / "p.json"
    f.write_text(json.dumps(policy.to_dict()))
    assert load_policy(str(f)).to_dict() == policy.to_dict()
    bare = tmp_path / "bare.json"
    bare.write_text(json.dumps({"bits": 4}))
    loaded = load_policy(str(bare))
    assert loaded.config_for(0, "k", 3).bits == 4 and loaded.config_for(0, "v", 3).bits == 4


def test_invalid_policies_fail_at_load(tmp_path):
    with pytest.raises(kakeya_py.KakeyaError):
        Policy.from_dict({"k": {"bits": 9}})
    with pytest.raises(ValueError, match="unknown policy fields"):
        Policy.from_dict({"k": LOSSY, "colour": "red"})
    with pytest.raises(ValueError, match="neither a preset"):
        load_policy(str(tmp_path / "missing.json"))
    with pytest.raises(ValueError, match="Σ_q"):
        Policy.from_dict({"k": {"metric": "inner_product"}})


def test_parse_layers():
    assert parse_layers("0-2,5,-1", 10) == [0, 1, 2, 5, 9]
    assert parse_layers(None, 4) is None
    with pytest.raises(ValueError, match="out of range"):
        parse_layers("12", 10)


# -- noise and residuals -------------------------------------------------------------------
def test_zero_noise_is_exact_and_noise_is_seeded(model):
    runner = HFRunner(model)
    variants = [Variant(f"s{s}", noise_transform(s, seed=0)) for s in (0.0, 0.1)]
    results, _ = runner.run([passage()], variants, progress=False)
    zero, noisy = (r.tokens[0] for r in results)
    assert (zero.ref_logprob == zero.alt_logprob).all()
    assert (noisy.ref_logprob != noisy.alt_logprob).any()
    again, _ = runner.run([passage()], [Variant("s", noise_transform(0.1, seed=0))], progress=False)
    assert (again[0].tokens[0].alt_logprob == noisy.alt_logprob).all()


def test_residuals_identity_zero_lossy_positive(model):
    runner = HFRunner(model)
    ident = PolicyCodec(preset_policy("identity"), 3)
    rows, _ = codec_residuals(runner, [passage()], codec_transform(ident), progress=False)
    assert all(r["k_rel_error"] == 0.0 and r["v_rel_error"] == 0.0 for r in rows)
    lossy = PolicyCodec(lossy_policy(exact_layers=[0]), 3)
    rows, ledger = codec_residuals(runner, [passage()], codec_transform(lossy), progress=False)
    assert rows[0]["k_rel_error"] is None and rows[0]["k_ratio"] == 1.0
    assert all(0.0 < r[f"{s}_rel_error"] < 1.0 for r in rows[1:] for s in ("k", "v"))


def test_sink_tokens_stay_exact_and_are_counted_at_bf16():
    x = torch.randn(40, 2, 16)
    plain = PolicyCodec(lossy_policy(), 4)
    sink = PolicyCodec(lossy_policy(sink_tokens=3), 4)
    out, nbytes = sink.roundtrip(1, "k", x)
    assert torch.equal(out[:3], x[:3]) and not torch.equal(out[3:], x[3:])
    rest, rest_bytes = plain.roundtrip(1, "k", x[3:].contiguous())
    assert torch.equal(out[3:], rest) and nbytes == rest_bytes + 3 * 2 * 16 * 2
    short, short_bytes = sink.roundtrip(1, "k", x[:2])
    assert short is x[:2] or (torch.equal(short, x[:2]) and short_bytes is None)
    assert Policy.from_dict(lossy_policy(sink_tokens=3).to_dict()).sink_tokens == 3
    with pytest.raises(ValueError, match="sink_tokens"):
        lossy_policy(sink_tokens=-1)
