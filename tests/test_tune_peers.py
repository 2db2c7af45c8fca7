"""``kakeya tune`` over a peer ladder (issue 19, item 5): a peer family gets the same search.

On the tiny random Llama of ``test_tune.py``: a peer rung round-trips exactly as the peer's
own :class:`~kakeya_py.peers.PeerPolicy` (tensors and bytes, sink at bf16), the written
per-layer peer policy reproduces the search's measurements through ``kakeya eval``'s policy
loading, and bad ladders are one-line errors.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import save_tiny_llama
from kakeya_py.cli.harness import policy_codec, prepare_policy
from kakeya_py.eval.harness import HFRunner, Variant
from kakeya_py.peers import PeerPolicy, load_peer_policy, parse_method
from kakeya_py.policy import model_record
from kakeya_py.tuning import Ladder, LadderCodec, TuneSettings, reusing_runner, search, state_policy
from test_tune import REPO, llama, passages  # noqa: F401 - the fixture and the passages are shared

TURBO = [None, "turbo-4", "turbo-3", "turbo-2"]


@pytest.mark.parametrize("spec", ["turbo-3", "kivi-2(r=16)", "int4", "kvquant-3", "fp8"])
@pytest.mark.parametrize("sink", [0, 2])
def test_a_peer_rung_round_trips_as_the_peer_itself(spec, sink):
    x = torch.randn(96, 2, 32, generator=torch.Generator().manual_seed(3)) * 2
    codec = LadderCodec(Ladder.from_dict([None, spec]), sink_tokens=sink)
    own = PeerPolicy(parse_method(spec), 3, sink_tokens=sink)
    for layer, stream in ((0, "k"), (2, "v")):
        y, nbytes = codec.roundtrip(layer, stream, 1, x)
        y_own, n_own = own.roundtrip(layer, stream, x)
        assert torch.equal(y, y_own) and nbytes == n_own
        assert codec.roundtrip(layer, stream, 1, x) == (y, nbytes)  # cached: the same result
    method = parse_method(spec)
    if sink and not hasattr(method, "sink"):  # the sink: exact, and counted at bf16
        assert torch.equal(y[:sink], x[:sink])
        assert nbytes == method.roundtrip(2, "v", x[sink:].contiguous())[1] + sink * 2 * 32 * 2
    assert codec.roundtrip(0, "k", 0, x) == (x, None)  # rung 0 = exact


@pytest.mark.parametrize(
    "rungs, match",
    [
        ([None, "turbo-9"], r"ladder: rung 1 of 'k': 'turbo-9': TurboQuant bits must be 1-4"),
        ([None, "awq-4"], r"ladder: rung 1 of 'k': unknown peer method 'awq-4'"),
        ([None, "turbo-4(q=1)"], r"unknown options \['q'\]"),
        ([None, "turbo-4", {"bits": 4}], "kakeya configs and peer method specs in one ladder"),
        ([None, "turbo-4", "kivi-2"], r"one peer family only, got \['kivi', 'turbo'\]"),
        ([None, 4], "must be a config object, a peer method spec or null"),
    ],
)
def test_bad_peer_rungs_are_one_line_errors(rungs, match):
    with pytest.raises(ValueError, match=match) as e:
        Ladder.from_dict(rungs)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="'basis' is for kakeya rungs"):
        Ladder.from_dict({"k": TURBO, "v": TURBO, "basis": "b.safetensors"})


def test_the_shipped_peer_ladders_go_from_finest_to_coarsest():
    for name, family, specs in (
        ("turbo", "turbo", ["turbo-4", "turbo-3", "turbo-2"]),
        ("kivi", "kivi", ["kivi-4", "kivi-3", "kivi-2"]),
    ):
        ladder = Ladder.load(str(REPO / f"reports/tune/ladder_{name}.json"))
        assert ladder.peer == family and ladder.description
        for s in ("k", "v"):
            assert ladder.configs[s][0] is None and [c.name for c in ladder.configs[s][1:]] == specs


def test_a_per_layer_peer_policy_says_what_the_state_says_and_round_trips_as_json(tmp_path):
    ladder = Ladder.from_dict(TURBO)
    state = {(0, "k"): 1, (0, "v"): 2, (1, "k"): 2, (1, "v"): 0, (2, "k"): 3, (2, "v"): 2}
    pol = state_policy(state, ladder, 4, name="t", sink_tokens=1)  # layer 3: outside the search
    assert isinstance(pol, PeerPolicy) and pol.name == "t" and pol.method.name == "turbo-3"
    want = {(la, s): (None if r == 0 else TURBO[r]) for (la, s), r in state.items()}
    got = {(la, s): getattr(pol.method_for(la, s), "name", None) for la in range(4) for s in "kv"}
    assert got == {**want, (3, "k"): None, (3, "v"): None}
    d = json.loads(json.dumps(pol.to_dict()))
    assert d["method"] == "turbo" and d["peer"]["method"] == "turbo-3" and d["sink_tokens"] == 1
    assert d["overrides"] == {"0": {"k": "turbo-4"}, "1": {"v": None}, "2": {"k": "turbo-2"}}
    (tmp_path / "p.json").write_text(json.dumps(d))
    again = load_peer_policy(str(tmp_path / "p.json"), 4)
    assert again.to_dict() == pol.to_dict()
    with pytest.raises(ValueError, match="one peer family only"):
        PeerPolicy(parse_method("turbo-3"), 4, overrides={0: {"k": "kivi-2"}})
    with pytest.raises(ValueError, match="'method' 'kivi' is not the family"):
        PeerPolicy.from_dict({**d, "method": "kivi"})
    with pytest.raises(ValueError, match="unknown peer policy fields"):
        PeerPolicy.from_dict({**d, "bits": 4})
    assert load_peer_policy("turbo-4", 4).method.name == "turbo-4"
    assert load_peer_policy("recommended", 4) is None


def _measure(model, transform):
    (res,), _ = HFRunner(model).run(passages(), [Variant("p", transform)], progress=False)
    return res.summary(), res.ledger


def test_the_tuned_peer_policy_reproduces_the_search_through_eval_loading(llama, tmp_path):  # noqa: F811
    ladder = Ladder.from_dict(TURBO)
    codec = LadderCodec(ladder, sink_tokens=1)
    settings = TuneSettings(budget_dppl=0.05, min_top1=0.85, check_every=3)
    result = search(reusing_runner(llama), passages(), ladder, codec, settings, progress=False)
    assert any(r > 0 for r in result.state.values()) and result.search["ratio"] > 1
    policy = state_policy(result.state, ladder, 3, name="tuned-turbo", sink_tokens=1)
    policy.model = model_record(SimpleNamespace(name="tiny", num_layers=3, num_kv_heads=2, head_dim=16))
    path = tmp_path / "policy.json"
    path.write_text(json.dumps(policy.to_dict()))
    # kakeya eval's policy loading: --config FILE plus the selection flags (none given)
    args = SimpleNamespace(
        config=str(path), layers=None, streams=None, exact_layers=None, post_rope_k=False, sigma_q=None
    )
    info = SimpleNamespace(name="tiny", num_layers=3, num_kv_heads=2, head_dim=16)
    loaded, sigma = prepare_policy(args, info)
    assert isinstance(loaded, PeerPolicy) and sigma is None and loaded.to_dict() == policy.to_dict()
    summary, ledger = _measure(llama, policy_codec(loaded, 3).roundtrip)
    row = result.search
    assert summary["dppl"] == pytest.approx(row["dppl"], abs=1e-12) and summary["top1"] == row["top1"]
    assert sum(ledger.stored.values()) == row["bytes_stored"] and ledger.ratio() == pytest.approx(
        row["ratio"]
    )
    # and the bytes of the whole are the per-(layer, stream) bytes the sensitivity measured
    table = {(e["layer"], e["stream"], e["rung"]): e["bytes"] for e in result.sensitivity}
    assert sum(table[(la, s, r)] if r else ledger.raw[(la, s)] for (la, s), r in result.state.items()) == sum(
        ledger.stored.values()
    )


def _tiny_tune_argv(tmp_path, ladder_path, out):
    folder = tmp_path / "tiny"
    save_tiny_llama(folder)
    text = tmp_path / "text.txt"
    rng = np.random.default_rng(0)
    text.write_text(" ".join(f"t{i}" for i in rng.integers(3, 256, size=1200)) + "\n")
    argv = ["tune", "--model", str(folder), "--text-file", str(text), "--passages", "2"]
    argv += ["--val-passages", "2", "--ctx", "192", "--n-eval", "24", "--budget-dppl", "0.05"]
    argv += ["--min-top1", "0.85", "--check-every", "3", "--sink-tokens", "1", "--compare", ""]
    argv += ["--ladder", str(ladder_path), "--out", str(out), "--no-progress", "--threads", "2"]
    return argv, folder, text


def test_tune_over_a_peer_ladder_writes_a_policy_that_eval_runs(tmp_path):
    from kakeya_py.cli import main

    ladder_path = tmp_path / "ladder.json"
    ladder_path.write_text(json.dumps({"description": "turbo", "k": TURBO, "v": TURBO}))
    out = tmp_path / "out"
    argv, folder, text = _tiny_tune_argv(tmp_path, ladder_path, out)
    with pytest.raises(SystemExit, match=r"--save-preset: not for a peer ladder \(turbo\)"):
        main([*argv, "--save-preset", "x"])  # a peer policy is no kakeya preset
    assert main(argv) == 0
    policy = json.loads((out / "policy.json").read_text())
    record = json.loads((out / "tune.json").read_text())
    assert policy["method"] == "turbo" and policy["sink_tokens"] == 1 and "peer" in policy
    assert "over peer family turbo" in policy["description"]
    assert [r["role"] for r in policy["provenance"]] == ["fit", "selection"]
    assert record["ladder"]["k"] == TURBO and record["policy"] == policy
    # the written policy, measured through its own codec on the search passages, is the state
    # the search measured (the selected one of the greedy path)
    chosen = record["path"][record["selected"]["index"]]["search"]
    for key in ("dppl", "top1", "kl_mean", "bytes_stored", "ratio"):
        assert record["search_result"][key] == pytest.approx(chosen[key], abs=1e-12)
    ev = ["eval", "--model", str(folder), "--text-file", str(text), "--passages", "2", "--ctx", "192"]
    ev += ["--n-eval", "24", "--config", str(out / "policy.json"), "--no-progress", "--threads", "2"]
    ev += ["--json", str(tmp_path / "eval.json")]
    assert main(ev) == 2  # tuned and selected on this file: in-sample, refused by default
    assert main([*ev, "--allow-overlap"]) == 0
    r = json.loads((tmp_path / "eval.json").read_text())
    assert r["config"]["method"] == "turbo" and r["config"]["overrides"] == policy["overrides"]
    assert r["overlap"] is True and r["ratio_measured"] >= 1
    from kakeya_py.cli.sweep import family_of

    assert family_of(f"kakeya:{out / 'policy.json'}") == "turbo"  # a sweep labels it by its family


def test_a_bad_rung_in_a_ladder_file_is_a_one_line_cli_error(tmp_path, capsys):
    from kakeya_py.cli import main

    ladder_path = tmp_path / "bad.json"
    ladder_path.write_text(json.dumps([None, "turbo-4", "turbo-7"]))
    argv, _, _ = _tiny_tune_argv(tmp_path, ladder_path, tmp_path / "out")
    assert main(argv) != 0
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("kakeya tune: error: ladder: rung 2 of 'k': 'turbo-7': TurboQuant bits must be 1-4")
