"""``kakeya generate-eval`` and the peer caches it runs (tiny random models, fast settings)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import random_ids, save_tiny_llama, tiny_model
from kakeya_py.generation import quality as ge
from kakeya_py.generation.peer_cache import PeerCache, peer_cache_method
from kakeya_py.peers import parse_method
from transformers import DynamicCache

LOSSY_ALL = {"bits": 2, "block_size": 4096, "share_basis": True}


def _prefill(model, ids, cache):
    with torch.no_grad():
        return model(ids, past_key_values=cache, use_cache=True).logits


# -- PeerCache ---------------------------------------------------------------------------------------
def test_peer_cache_without_chunks_is_dynamic_cache_bit_for_bit():
    model = tiny_model("llama")
    ids = random_ids(40)
    ref = _prefill(model, ids, DynamicCache())
    cache = PeerCache("int4", model, residual_length=64, block_tokens=8)
    assert torch.equal(_prefill(model, ids, cache), ref)  # the prompt's own call is exact
    assert cache.nbytes()["encoded_tokens"] == 0


def test_peer_cache_chunks_hold_the_peer_round_trip_and_its_bytes():
    model = tiny_model("llama")
    ids = random_ids(50)
    dyn = DynamicCache()
    _prefill(model, ids, dyn)
    cache = PeerCache("int4", model, residual_length=10, block_tokens=8, sink_tokens=2)
    _prefill(model, ids, cache)
    method = parse_method("int4")
    layer = cache.layers[1]
    k = dyn.layers[1].keys  # [1, h, 50, d], post-RoPE
    chunk = layer.k.chunks[0]
    assert (chunk.start, chunk.length) == (2, 38)  # sink 2, window 10
    x_hat, nbytes = method.roundtrip(1, "k", k[0, :, 2:40].permute(1, 0, 2).contiguous())
    assert torch.equal(chunk.values[0], x_hat.permute(1, 0, 2))
    assert chunk.nbytes == [nbytes]
    assert torch.equal(layer.k.sink, k[..., :2, :]) and torch.equal(layer.k.window, k[..., 40:, :])
    # int4 on head_dim 16: 8 bytes of codes + 4 of scale/zero per 16 values
    nb = cache.nbytes()
    per_stream = 38 * 2 * 12
    assert nb["encoded_bytes"] == 3 * 2 * per_stream
    assert nb["sink_bytes"] + nb["window_bytes"] == 3 * 2 * 12 * 2 * 16 * 4
    assert nb["dynamic_cache_bytes"] == 3 * 2 * 50 * 2 * 16 * 4
    # the next call attends to the chunk: logits differ from DynamicCache's
    nxt = random_ids(1, seed=5)
    with torch.no_grad():
        a = model(nxt, past_key_values=cache, use_cache=True).logits
        b = model(nxt, past_key_values=dyn, use_cache=True).logits
    assert not torch.equal(a, b) and torch.allclose(a, b, atol=0.5)


def test_peer_cache_generates_decode_time_chunks_crops_and_repeats():
    model = tiny_model("qwen2")
    ids = random_ids(20, batch=2)
    cache = PeerCache("turbo-4", model, residual_length=8, block_tokens=4, exact_layers=[0])
    with torch.no_grad():
        out = model.generate(
            ids, max_new_tokens=12, min_new_tokens=12, do_sample=False, past_key_values=cache
        )
    assert out.shape == (2, 32)
    layer = cache.layers[1]
    assert [c.length for c in layer.k.chunks][:1] == [12] and len(
        layer.k.chunks
    ) >= 3  # prefill, then decode steps
    assert cache.layers[0].k.chunks == [] and cache.exact_layers == [0]
    n = cache.get_seq_length()
    cache.crop(-3)
    assert cache.get_seq_length() == n - 3
    cache.batch_repeat_interleave(2)
    assert layer.k.window.shape[0] == 4 and layer.k.chunks[0].values.shape[0] == 4
    assert len(layer.k.chunks[0].nbytes) == 4


def test_peer_cache_method_turns_off_kivis_own_window():
    assert peer_cache_method("kivi-4").residual == 0
    assert peer_cache_method("kivi-2(g=16)").residual == 0
    assert peer_cache_method("kivi-4(r=32)").residual == 32
    with pytest.raises(ValueError, match="residual_length"):
        PeerCache("int4", tiny_model("llama"), residual_length=-1)


# -- statistics and verdict ------------------------------------------------------------------------------
def test_wilson_interval_known_values():
    lo, hi = ge.wilson_ci(5, 10)
    assert lo == pytest.approx(0.2366, abs=1e-4) and hi == pytest.approx(0.7634, abs=1e-4)
    lo, hi = ge.wilson_ci(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-4)
    assert ge.wilson_ci(10, 10)[1] == 1.0
    with pytest.raises(ge.GenerationEvalError):
        ge.wilson_ci(0, 0)


def test_generation_verdict_rule():
    v = ge.generation_verdict
    assert v([0.951, 0.99], 0.97, [0.0, -0.05]) == "ACCEPT"
    assert v([0.949, 0.99], 0.97, [0.0, 0.0]) == "MARGINAL"  # CI lower bound below 95%
    assert v([0.96, 0.99], 0.97, [0.0, -0.0625]) == "MARGINAL"  # one length 6.25 points down
    assert v([0.80, 0.90], 0.85, [0.0]) == "REJECT"
    assert v([0.96, 0.99], 0.97, [-0.2]) == "REJECT"
    assert v([0.96, 0.99], 0.97, []) == "INCOMPLETE"  # no retrieval measured
    assert v(None, None, [0.0]) == "INCOMPLETE"


def test_rl_metrics_identity_and_known_values():
    same = ge.rl_metrics([np.zeros(5), np.zeros(3)])
    assert same["per_token"]["ess"] == pytest.approx(1.0) and same["per_token"]["k3"] == 0.0
    assert same["per_sequence"]["sequences"] == 2 and same["per_token"]["tokens"] == 8
    lr = [np.array([np.log(3.0), 0.0]), np.array([0.0, 0.0, -np.log(6.0)])]
    m = ge.rl_metrics(lr)
    t = m["per_token"]
    assert t["frac_outside_2x"] == pytest.approx(2 / 5) and t["frac_outside_5x"] == pytest.approx(1 / 5)
    assert t["dlogp_max"] == pytest.approx(np.log(6.0))
    rho = np.array([3.0, 1, 1, 1, 1 / 6])
    assert t["ess"] == pytest.approx(rho.sum() ** 2 / (5 * (rho**2).sum()))
    assert t["k3"] == pytest.approx(np.mean(rho - np.log(rho) - 1))
    assert t["top1pct_mass"] == pytest.approx(np.log(6) / (np.log(3) + np.log(6)))
    assert m["per_sequence"]["dlogp_max"] == pytest.approx(np.log(6.0))
    assert t["frac_clipped"] == 0.0 and m["per_sequence"]["seq_veto"] == 0.0


def test_first_divergence_and_bootstrap():
    ref = np.array([[1, 2, 3, 4], [1, 2, 3, 4]])
    assert ge.first_divergence(np.array([[1, 2, 3, 4], [1, 9, 3, 4]]), ref).tolist() == [4, 1]
    lo, hi = ge.bootstrap_ci([np.ones(3), np.zeros(3)], np.mean, samples=500, seed=0)
    assert 0.0 <= lo < 0.5 < hi <= 1.0
    assert ge.bootstrap_ci([np.ones(3)] * 4, np.mean, samples=50) == (1.0, 1.0)


def test_parse_methods_puts_dynamic_first_and_refuses_unknown():
    assert ge.parse_methods("kivi-4,kakeya:recommended") == ["dynamic", "kivi-4", "kakeya:recommended"]
    assert ge.parse_methods("int4,dynamic") == ["dynamic", "int4"]
    with pytest.raises(ge.GenerationEvalError, match="nope"):
        ge.parse_methods("nope-3")
    with pytest.raises(ge.GenerationEvalError, match="twice"):
        ge.parse_methods("int4,int4")


# -- trajectory ----------------------------------------------------------------------------------------
def test_method_batch_dynamic_reproduces_the_reference_and_lossy_does_not(tmp_path):
    policy = tmp_path / "lossy.json"
    policy.write_text(json.dumps(LOSSY_ALL))
    model = tiny_model("llama")
    ids = random_ids(24, batch=2)
    ref = ge.reference_batch(model, ids, 6)
    settings = ge.CacheSettings(residual_length=4, block_tokens=4)
    dyn = ge.run_method_batch(model, "dynamic", ref, settings, seed=0)
    assert dyn.match.all() and np.abs(dyn.kl).max() < 1e-9
    assert np.array_equal(dyn.free_tokens, ref.ref_tokens.numpy())
    # the reference scores its own samples as the sampler did: log rho = 0
    assert np.allclose(dyn.sample_ref_logprob, dyn.sample_alt_logprob, atol=1e-6)
    # free-running tokens are scored by the reference exactly as the reference logits say
    lp = torch.log_softmax(ref.ref_logits.double(), -1).gather(2, ref.ref_tokens[..., None])[..., 0]
    assert np.allclose(dyn.free_ref_logprob, lp.numpy(), atol=1e-6)
    kak = ge.run_method_batch(model, f"kakeya:{policy}", ref, settings, seed=0)
    assert kak.kl.mean() > 1e-6 and kak.bytes["encoded_tokens"] > 0
    assert kak.bytes["ratio_vs_dynamic"] > 1.0
    peer = ge.run_method_batch(model, "int2", ref, settings, seed=0)
    assert peer.kl.mean() > 1e-6
    # common random numbers: the same seed samples the same tokens where the caches agree
    assert ge.run_method_batch(model, "dynamic", ref, settings, seed=0).sample_tokens.tolist() == (
        dyn.sample_tokens.tolist()
    )


# -- retrieval -------------------------------------------------------------------------------------------
def _word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(256)}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="t0"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="t0")


def test_haystacks_have_exact_length_needles_in_place_and_stratified_depths():
    tok = _word_tokenizer()
    stream = list(range(3, 253)) * 4
    hays = ge.build_haystacks(tok, stream, [64, 128], per_context=3, needles=2, seed=1)
    assert [h.context for h in hays] == [64] * 3 + [128] * 3
    for h in hays:
        ask = max(len(n.question) + len(n.answer) for n in h.needles)
        assert len(h.tokens) == h.context - ask
        assert h.needles[0].position < h.needles[1].position
        for j, n in enumerate(h.needles):
            assert j * 3 + h.index <= n.depth * 6 < j * 3 + h.index + 1  # its stratum
            assert h.tokens[n.position] == 0  # the needle's first word is unknown to this vocabulary
    with pytest.raises(ge.GenerationEvalError, match="too short"):
        ge.build_haystacks(tok, stream, [16], per_context=1, needles=4, seed=0)


def test_retrieval_crops_back_so_each_question_sees_only_the_haystack():
    model = tiny_model("llama")
    tok = _word_tokenizer()
    hay = ge.build_haystacks(tok, list(range(3, 253)), [96], per_context=1, needles=3, seed=0)[0]
    settings = ge.CacheSettings(residual_length=8, block_tokens=32)
    rows = ge.run_retrieval(model, "int4", hay, settings)
    assert [r["label"] for r in rows] == [n.label for n in hay.needles]
    last = hay.needles[-1]
    alone = ge.Haystack(hay.context, 0, hay.tokens, 0, [last])
    assert ge.run_retrieval(model, "int4", alone, settings)[0]["key_logprob"] == pytest.approx(
        rows[-1]["key_logprob"], abs=1e-9
    )
    with pytest.raises(ge.GenerationEvalError, match="block-tokens"):
        ge.run_retrieval(model, "int4", hay, ge.CacheSettings(residual_length=0, block_tokens=1))


@pytest.mark.parametrize("method", ["dynamic", "kivi-4", "turbo-4"])
def test_filling_from_the_reference_prefill_equals_prefilling_through_the_cache(method):
    model = tiny_model("qwen2")
    tok = _word_tokenizer()
    hay = ge.build_haystacks(tok, list(range(3, 253)), [120], per_context=1, needles=2, seed=3)[0]
    settings = ge.CacheSettings(residual_length=8, block_tokens=32, peer_sink_tokens=1)
    source = ge.prefill_haystack(model, hay)
    shared = ge.run_retrieval(model, method, hay, settings, source)
    own = ge.run_retrieval(model, method, hay, settings)
    assert [r["key_logprob"] for r in shared] == [r["key_logprob"] for r in own]
    assert ge.fills_from_reference(method) and not ge.fills_from_reference("kakeya:recommended")
    # the source is left as it was (a second method can fill from it)
    assert source.get_seq_length() == len(hay.tokens)


def test_summarize_retrieval_pairs_with_the_baseline():
    trials = [
        {"method": m, "context": 64, "haystack": h, "label": "red", "correct": c, "key_logprob": -1.0}
        for m, h, c in [("dynamic", 0, True), ("dynamic", 1, True), ("x", 0, True), ("x", 1, False)]
    ]
    rows = ge.summarize_retrieval(trials, ["dynamic", "x"], [64])
    x = rows[1]
    assert x["accuracy"] == 0.5 and x["baseline_accuracy"] == 1.0 and x["delta_vs_baseline"] == -0.5
    assert x["lost_vs_baseline"] == 1 and x["gained_vs_baseline"] == 0
    assert x["accuracy_ci95"] == pytest.approx(list(ge.wilson_ci(1, 2)))


# -- the command end to end ---------------------------------------------------------------------------
def test_generate_eval_end_to_end(tmp_path, capsys):
    from kakeya_py.cli import main

    folder = tmp_path / "tiny"
    save_tiny_llama(folder)
    rng = np.random.default_rng(0)
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"t{i}" for i in rng.integers(3, 256, size=3000)) + "\n")
    out, js = tmp_path / "report", tmp_path / "gen.json"
    argv = ["generate-eval", "--model", str(folder), "--text-file", str(text), "--prompts", "4"]
    argv += ["--prompt-tokens", "40", "--gen-tokens", "5", "--batch", "2", "--contexts", "96,160"]
    argv += ["--haystacks", "2", "--needles", "1", "--residual-length", "8", "--block-tokens", "16"]
    argv += ["--methods", "kivi-4,turbo-4,kakeya:recommended,quanto", "--json", str(js), "--out", str(out)]
    argv += ["--no-progress", "--threads", "2"]
    assert main(argv) == 2  # recommended was made for SmolLM2's 30 layers
    argv += ["--force-model"]  # runs, applying what fits (its warning is silenced by --no-progress)
    assert main(argv) == 0
    r = json.loads(js.read_text())
    methods = ["dynamic", "kivi-4", "turbo-4", "kakeya:recommended"]
    assert [t["method"] for t in r["trajectory"]] == methods
    for t in r["trajectory"]:
        for key in ("tf_top1", "tf_top1_ci95", "kl_mean", "kl_p95", "first_divergence_median"):
            assert t[key] is not None, key
        assert t["prompts"] == 4 and t["gen_tokens"] == 5 and len(t["by_position"]["kl_mean"]) == 5
    dyn = r["trajectory"][0]
    assert dyn["tf_top1"] == 1.0 and dyn["kl_max"] < 1e-9 and dyn["first_divergence_median"] == 5
    assert r["trajectory"][3]["cache_bytes"]["encoded_tokens"] > 0
    assert {(x["method"], x["context"]) for x in r["retrieval"]} == {
        (m, c) for m in methods for c in (96, 160)
    }
    for x in r["retrieval"]:
        assert x["trials"] == 2 and x["baseline_accuracy"] is not None
        assert x["accuracy_ci95"][0] <= x["accuracy"] <= x["accuracy_ci95"][1]
    assert [v["method"] for v in r["verdicts"]] == methods[1:]
    assert all(v["verdict"] in ("ACCEPT", "MARGINAL", "REJECT") for v in r["verdicts"])
    assert [x["method"] for x in r["rl"]] == methods
    assert r["rl"][0]["per_token"]["dlogp_max"] < 1e-6
    assert r["command"].startswith("kakeya generate-eval --model")
    if ge.quanto_available():
        assert "quanto" in r["skipped_methods"]
    for name in ("report.md", "generation.json", "trajectory.png", "first_divergence.png", "retrieval.png"):
        assert (out / name).stat().st_size > 0, name
    assert "kakeya generate-eval" in (out / "report.md").read_text()
    assert "Generation verdict" in capsys.readouterr().out
    # a retrieval-only run merged with a trajectory-only run gives the same rows
    common = [
        "--model",
        str(folder),
        "--text-file",
        str(text),
        "--residual-length",
        "8",
        "--block-tokens",
        "16",
    ]
    common += ["--methods", "kivi-4", "--no-progress", "--threads", "2", "--needles", "1"]
    a, b, m = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "m.json"
    tr = ["--prompts", "4", "--prompt-tokens", "40", "--gen-tokens", "5", "--batch", "2", "--contexts", ""]
    assert main(["generate-eval", *common, *tr, "--json", str(a)]) == 0
    ret = ["--prompts", "0", "--contexts", "96,160", "--haystacks", "2,1"]
    assert main(["generate-eval", *common, *ret, "--json", str(b)]) == 0
    assert main(["generate-eval", "--merge", str(a), str(b), "--json", str(m), "--no-progress"]) == 0
    merged = json.loads(m.read_text())
    assert [t["method"] for t in merged["trajectory"]] == ["dynamic", "kivi-4"]
    assert merged["trajectory"][1]["tf_top1"] == r["trajectory"][1]["tf_top1"]
    assert [(x["context"], x["trials"]) for x in merged["retrieval"]] == [
        (96, 2),
        (96, 2),
        (160, 1),
        (160, 1),
    ]
    assert [v["method"] for v in merged["verdicts"]] == ["kivi-4"] and len(merged["merged_from"]) == 2
    assert merged["verdicts"][0]["verdict"] in ("ACCEPT", "MARGINAL", "REJECT")
    assert json.loads(a.read_text())["verdicts"][0]["verdict"] == "INCOMPLETE"  # trajectory only
    assert main(["generate-eval", "--merge", str(b), str(b), "--no-progress"]) != 0  # kivi-4 trials twice
    # dynamic repeats (every run measures it) are checked and kept once
    c = tmp_path / "c.json"
    other = [w if w != "kivi-4" else "turbo-4" for w in common]
    assert main(["generate-eval", *other, *tr, "--json", str(c)]) == 0
    assert main(["generate-eval", "--merge", str(a), str(c), "--json", str(m), "--no-progress"]) == 0
    merged = json.loads(m.read_text())
    assert [t["method"] for t in merged["trajectory"]] == ["dynamic", "kivi-4", "turbo-4"]
    assert [x["method"] for x in merged["rl"]] == ["dynamic", "kivi-4", "turbo-4"]
    # trajectories of other prompt lengths do not join
    d = tmp_path / "d.json"
    longer = [w if w != "40" else "48" for w in tr]
    assert main(["generate-eval", *other, *longer, "--json", str(d)]) == 0
    capsys.readouterr()
    assert main(["generate-eval", "--merge", str(a), str(d), "--no-progress"]) != 0
    assert "cannot join" in capsys.readouterr().err


def test_generate_eval_refuses_bad_requests(capsys):
    from kakeya_py.cli import main

    assert main(["generate-eval", "--contexts", "1k", "--no-progress"]) != 0
    assert "--contexts must be integers" in capsys.readouterr().err
    assert main(["generate-eval", "--methods", "zip-9", "--no-progress"]) != 0
    assert "zip-9" in capsys.readouterr().err
    with pytest.raises(ge.GenerationEvalError, match="expected dynamic"):
        ge.parse_methods("zip-9")
