"""First contact with the command line: every bad input is one line on stderr naming the
argument, with exit status 2, found before any model or tokenizer is loaded (the loaders are
replaced by ones that fail the test); presets made for one model are refused on another;
``--force-model``, the default preset on another model, ``--debug``, ``--help`` and the
default output folder ``runs/``.

Fast: a tiny random Llama (3 layers, 512 positions) saved once per module, no real model.
"""

from __future__ import annotations

import json
import os
import time

import pytest
from conftest import save_tiny_llama
from kakeya_py.cli import args as cli_args
from kakeya_py.cli import main
from kakeya_py.models import BUILTIN_SHAPES, ModelNotFoundError, locate_model, model_shape
from kakeya_py.policy import Policy, PolicyModelError, fit_to_model, load_policy, preset_names


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_errors")
    tiny = root / "tiny"
    save_tiny_llama(tiny)
    words = root / "words.txt"
    words.write_text(" ".join(f"t{3 + (i * 37) % 250}" for i in range(3000)) + "\n")
    (root / "empty.txt").write_text("")
    (root / "blank.txt").write_text("  \n\n\t\n")
    (root / "latin1.txt").write_bytes("caf\xe9 ".encode("latin-1") * 100)
    (root / "bad.json").write_text('{"k": {"bits": 4},\n')
    (root / "over40.json").write_text(
        json.dumps({"k": {"bits": 4}, "v": {"bits": 4}, "overrides": {"40": {"v": None}}})
    )
    (root / "unknown_field.json").write_text(json.dumps({"k": {"bits": 4}, "v": None, "bogus": 1}))
    (root / "no_model").mkdir()
    config_only = root / "config_only"
    config_only.mkdir()
    (config_only / "config.json").write_text((tiny / "config.json").read_text())
    (root / "a_file").write_text("x")
    return root


@pytest.fixture(autouse=True)
def no_loading(monkeypatch):
    """Any model or tokenizer load fails the test (as a run-time error, exit status 1)."""
    import kakeya_py.models as models
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("a model or tokenizer was loaded before the arguments were checked")

    for cls in (transformers.AutoModelForCausalLM, transformers.AutoTokenizer):
        monkeypatch.setattr(cls, "from_pretrained", refuse)
    monkeypatch.setattr(models, "load_model", refuse)
    monkeypatch.setattr(models, "provision_builtin", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("KAKEYA_DEBUG", raising=False)


def run(capsys, argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def base(files, *, text=True):
    argv = ["--model", files / "tiny", "--ctx", 48, "--n-eval", 16, "--passages", 2, "--no-progress"]
    return argv + (["--text-file", files / "words.txt"] if text else [])


# (extra arguments, whether the base gives --text-file, argument named, words the message holds)
BAD = [
    (["--model", "/nonexistent/model"], True, "--model", "does not exist"),
    (["--model", "./relative/missing"], True, "--model", "does not exist"),
    (["--model", "{no_model}"], True, "--model", "lacks config.json"),
    (["--model", "{config_only}"], True, "--model", "lacks weights"),
    (["--model", "{a_file}"], True, "--model", "is a file"),
    (["--model", "someorg/some-model"], True, "--model", "--model DIR"),
    (["--model", "not a valid id!"], True, "--model", "Hugging Face id"),
    (["--text-file", "{root}/missing.txt"], False, "--text-file", "does not exist"),
    (["--text-file", "{root}"], False, "--text-file", "is a folder"),
    (["--text-file", "{empty}"], False, "--text-file", "is empty"),
    (["--text-file", "{blank}"], False, "--text-file", "is blank"),
    (["--text-file", "{latin1}"], False, "--text-file", "not UTF-8"),
    (["--passages", "500"], True, "--passages", "tokens needed"),
    (["--passages", "0"], True, "--passages", ">= 1, got 0"),
    (["--passages", "-1"], True, "--passages", ">= 1, got -1"),
    (["--ctx", "0"], True, "--ctx", ">= 1"),
    (["--n-eval", "0"], True, "--n-eval", ">= 1"),
    (["--threads", "0"], True, "--threads", ">= 1"),
    (["--dtype", "int8"], True, "--dtype", "bfloat16"),
    (["--config", "no-such-preset"], True, "--config", "recommended"),
    (["--config", "{bad}"], True, "--config", "not valid JSON"),
    (["--config", "{unknown_field}"], True, "--config", "bogus"),
    (["--config", "{over40}"], True, "--config", "[40]"),
    (["--config", "recommended"], True, "--config", "made for smollm2-135m"),
    (["--config", "uniform-ec-log8-tuned"], True, "--config", "made for smollm2-135m"),
    (["--config", "k4early-v4"], True, "--config", "--force-model"),
    (["--layers", "0-x"], True, "--layers", "'0-9,12,-1'"),
    (["--layers", "5-2"], True, "--layers", "empty"),
    (["--layers", "0-9"], True, "--layers", "has 3 layers"),
    (["--exact-layers", "-4"], True, "--exact-layers", "has 3 layers"),
    (["--sigma-q", "{root}/missing.safetensors"], True, "--sigma-q", "does not exist"),
    (["--ctx", "500", "--n-eval", "100"], True, "--ctx", "max_position_embeddings"),
    (["--wikitext", "{words}"], False, "--wikitext", "SHA-256"),
    (["--wikitext", "{root}/missing.raw"], False, "--wikitext", "not found"),
    (["--mode", "bogus"], True, "--mode", "invalid choice"),
    (["--engine", "bogus"], True, "--engine", "'vllm'"),
    (["--streams", "q"], True, "--streams", "invalid choice"),
]


def _fill(files, items):
    names = {p.stem if p.is_file() else p.name: p for p in files.iterdir()}
    return [a.format(root=files, **names) for a in items]


@pytest.mark.parametrize(("extra", "with_text", "arg", "words"), BAD, ids=[" ".join(c[0]) for c in BAD])
def test_bad_input_is_one_line_exit_2_before_loading(files, capsys, extra, with_text, arg, words):
    t0 = time.perf_counter()
    code, out, err = run(capsys, ["eval", *base(files, text=with_text), *_fill(files, extra)])
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("kakeya eval: error: "), err
    assert arg in err and words in err, err
    assert "Traceback" not in err and out == ""
    assert time.perf_counter() - t0 < 20  # no Hub retries


# Every subcommand that shares the evaluation arguments goes through the same checks.
COMMANDS = [
    ["eval"],
    ["eval", "--engine", "vllm"],
    ["attribution"],
    ["noise"],
    ["residual"],
    ["engines"],
    ["compare-engines"],
    ["sweep", "--out", "{root}/sweep"],
    ["tune", "--val-passages", "1", "--out", "{root}/tune"],
]
SHARED = [
    (["--passages", "0"], "--passages"),
    (["--dtype", "int8"], "--dtype"),
    (["--model", "/nonexistent/model"], "--model"),
    (["--text-file", "{empty}"], "--text-file"),
    (["--layers", "0-9"], "--layers"),
    (["--ctx", "500", "--n-eval", "100"], "--ctx"),
]


@pytest.mark.parametrize("command", COMMANDS, ids=[" ".join(c) for c in COMMANDS])
@pytest.mark.parametrize(("extra", "arg"), SHARED, ids=[" ".join(c[0]) for c in SHARED])
def test_every_subcommand_checks_before_loading(files, capsys, command, extra, arg):
    argv = [*_fill(files, command), *base(files, text=extra[0] != "--text-file"), *_fill(files, extra)]
    code, out, err = run(capsys, argv)
    name = " ".join(w for w in command[:1])
    assert code == 2 and err.startswith(f"kakeya {name}: error: argument {arg}"), err
    assert err.count("\n") == 1 and out == ""


CALIBRATE = [
    (["sigma-q", "--model", "/nonexistent/model"], "--model", "does not exist"),
    (["sigma-q", "--tokens", "0"], "--tokens", ">= 1"),
    (["sigma-q", "--seq-len", "600"], "--seq-len", "max_position_embeddings"),
    (["sigma-q", "--wikitext", "{words}"], "--wikitext", "SHA-256"),
    (["sigma-q", "--dtype", "int8"], "--dtype", "float32"),
    (["centroids", "--config", "recommended"], "--config", "made for smollm2-135m"),
    (["centroids", "--sigma-q", "{root}/missing.safetensors"], "--sigma-q", "does not exist"),
    (["all", "--config", "no-such-preset"], "--config", "neither a preset"),
]


@pytest.mark.parametrize(("extra", "arg", "words"), CALIBRATE, ids=[" ".join(c[0]) for c in CALIBRATE])
def test_calibrate_checks_before_loading(files, capsys, extra, arg, words):
    argv = [
        "calibrate",
        extra[0],
        "--model",
        files / "tiny",
        "--out",
        files / "cal",
        *_fill(files, extra[1:]),
    ]
    code, out, err = run(capsys, argv)
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"kakeya calibrate {extra[0]}: error: argument {arg}") and words in err, err


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["no-such-command"], "invalid choice"),
        (["calibrate", "sigma-q"], "required: --out"),
        (["eval", "--passages", "two"], "invalid int value"),
    ],
)
def test_argparse_errors_are_one_line_too(capsys, argv, words):
    code, out, err = run(capsys, argv)
    assert code == 2 and err.count("\n") == 1 and words in err and "usage:" not in err, err


@pytest.mark.parametrize(
    ("command", "arg"),
    [
        (["eval", "--config", "recommended"], "--config"),
        (["compare-engines", "--config", "uniform-ec"], "--config"),
        (["attribution", "--config", "k4early-v4"], "--config"),
        (["sweep", "--methods", "kakeya:recommended,int4", "--out", "{root}/sweep"], "--methods"),
        (["tune", "--val-passages", "1", "--compare", "uniform-ec-log8", "--out", "{root}/t"], "--compare"),
    ],
)
def test_preset_made_for_smollm2_is_refused_on_a_3_layer_model(files, capsys, command, arg):
    code, _, err = run(capsys, [*_fill(files, command), *base(files)])
    assert code == 2 and f"argument {arg}" in err, err
    assert "made for smollm2-135m (30 layers, 3 kv heads, head_dim 64)" in err
    assert "has 3 layers, 2 kv heads, head_dim 16" in err and "--force-model" in err


def test_preset_made_for_one_depth_refused_on_another():
    four = Policy.from_dict(
        {
            "k": {"bits": 4},
            "v": {"bits": 4},
            "overrides": {"3": {"v": {"bits": 3}}},
            "model": {"name": "four", "num_layers": 4, "num_kv_heads": 2, "head_dim": 32},
        },
        name="made-for-four",
    )

    class Shape:
        name, num_layers, num_kv_heads, head_dim = "six", 6, 2, 32

    with pytest.raises(PolicyModelError, match=r"made for four \(4 layers.*six has 6 layers"):
        fit_to_model(four, Shape())
    kept, dropped = fit_to_model(four, Shape(), force=True)
    assert kept.overrides == four.overrides and "chosen for four" in dropped[0]
    Shape.num_layers = 4
    assert fit_to_model(four, Shape()) == (four, [])  # its own shape: unchanged
    Shape.num_layers = 2  # shallower: layer 3 does not exist
    with pytest.raises(PolicyModelError, match=r"overrides name layers \[3\]"):
        fit_to_model(four, Shape())
    kept, dropped = fit_to_model(four, Shape(), force=True)
    assert kept.overrides == {} and dropped[0] == "overrides for layers [3]"
    assert "--force-model onto six" in kept.description
    # the record round-trips, and a malformed one is refused
    assert Policy.from_dict(four.to_dict()).model == four.model
    with pytest.raises(ValueError, match="num_layers must be an integer >= 1"):
        Policy.from_dict(
            {"k": None, "model": {"name": "x", "num_layers": 0, "num_kv_heads": 1, "head_dim": 8}}
        )


def test_presets_with_layer_indices_record_their_model():
    for name in preset_names():
        p = load_policy(name)
        if p.overrides or p.layers:
            assert p.model == {"name": "smollm2-135m", "num_layers": 30, "num_kv_heads": 3, "head_dim": 64}, (
                name
            )
    assert load_policy("identity").model is None and load_policy("k4v4-sink1-nobasis").model is None


def test_debug_flag_and_env_show_the_traceback(files, capsys, monkeypatch):
    argv = ["eval", *base(files), "--passages", "0"]
    with pytest.raises(cli_args.UsageError, match="--passages"):
        main([str(a) for a in argv] + ["--debug"])
    monkeypatch.setenv("KAKEYA_DEBUG", "1")
    with pytest.raises(cli_args.UsageError):
        main([str(a) for a in argv])


def test_run_time_failure_is_one_line_exit_1(files, capsys, monkeypatch):
    import kakeya_py.cli.harness as H

    def boom(args):
        raise RuntimeError("the engine fell over\nwith a second line")

    monkeypatch.setattr(H, "run_hf_eval", boom)
    code, _, err = run(capsys, ["eval", *base(files), "--config", "identity", "--json", files / "x.json"])
    assert code == 1 and err.count("\n") == 1
    assert "RuntimeError: the engine fell over with a second line" in err and "--debug" in err


def test_hub_id_offline_fails_at_once(monkeypatch):
    t0 = time.perf_counter()
    with pytest.raises(ModelNotFoundError, match="--local-dir DIR"):
        locate_model("someorg/some-model")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr("kakeya_py.models.HUB_HOST", "unreachable.invalid")
    with pytest.raises(ModelNotFoundError, match="no network"):
        locate_model("someorg/some-model")
    assert time.perf_counter() - t0 < 10


def test_hub_id_in_the_local_cache_resolves_offline_to_its_snapshot(files, monkeypatch, tmp_path):
    import shutil

    import huggingface_hub.constants

    snapshot = tmp_path / "models--someorg--tiny" / "snapshots" / ("0" * 40)
    shutil.copytree(files / "tiny", snapshot)
    (tmp_path / "models--someorg--tiny" / "refs").mkdir()
    (tmp_path / "models--someorg--tiny" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    src = locate_model("someorg/tiny")
    assert (src.kind, src.path) == ("hf-cache", str(snapshot))
    assert model_shape("someorg/tiny").num_layers == 3


def test_model_shape_reads_config_only(files):
    shape = model_shape(str(files / "tiny"))
    assert (shape.num_layers, shape.num_kv_heads, shape.head_dim, shape.max_positions) == (3, 2, 16, 512)


def test_builtin_shape_matches_the_converted_model():
    from kakeya_py.models import cache_dir

    folder = cache_dir() / "models" / "smollm2-135m"
    if not (folder / "config.json").is_file():
        pytest.skip("SmolLM2 not converted yet (the first kakeya eval converts it)")
    shape = model_shape(str(folder))
    want = BUILTIN_SHAPES["smollm2-135m"]
    got = {k: getattr(shape, k) for k in ("num_layers", "num_kv_heads", "head_dim", "max_positions")}
    assert got == {k: want[k] for k in got}


def test_help_lists_presets_and_engines(capsys):
    assert main(["eval", "--help"]) == 0
    out = capsys.readouterr().out
    for name in preset_names():
        assert f"\n  {name} " in out
    lines = {line.split()[0]: line for line in out.splitlines() if line.startswith("  ") and line.split()}
    assert "[smollm2-135m only]" in lines["recommended"] and "only]" not in lines["identity"]
    assert "hf" in lines and "vllm" in lines and "--force-model" in out and "--debug" in out


def test_quiet_third_party_restores_the_environment(monkeypatch):
    monkeypatch.delenv("VLLM_LOGGING_LEVEL", raising=False)
    monkeypatch.setenv("TQDM_DISABLE", "0")
    with cli_args.quiet_third_party():
        assert os.environ["VLLM_LOGGING_LEVEL"] == "ERROR" and os.environ["TQDM_DISABLE"] == "1"
        assert os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"
    assert "VLLM_LOGGING_LEVEL" not in os.environ and os.environ["TQDM_DISABLE"] == "0"
    with cli_args.quiet_third_party(logs=False):  # --verbose: bars off, logs on
        assert "VLLM_LOGGING_LEVEL" not in os.environ and os.environ["TQDM_DISABLE"] == "1"


def test_run_path_is_under_runs():
    path = cli_args.run_path("eval", "policies/my policy.json", "vllm", now=0)
    assert path.startswith("runs/eval_my_policy_vllm_") and path.endswith(".json")


# -- with the model loaded (tiny, seconds) -----------------------------------------------------------
@pytest.fixture
def loading(monkeypatch):
    monkeypatch.undo()  # the real loaders
    monkeypatch.delenv("KAKEYA_DEBUG", raising=False)


def test_default_config_on_another_model_is_model_agnostic_and_json_goes_to_runs(
    files, capsys, monkeypatch, loading, tmp_path
):
    monkeypatch.chdir(tmp_path)
    code, out, err = run(capsys, ["eval", *base(files), "--threads", 2])
    assert code == 0, err
    assert "note: the default --config recommended was made for smollm2-135m" in err
    written = list((tmp_path / "runs").glob("eval_k4v4-sink1-nobasis_hf_*.json"))
    assert len(written) == 1 and f"JSON written to runs/{written[0].name}" in out
    record = json.loads(written[0].read_text())
    assert record["config"]["name"] == "k4v4-sink1-nobasis" and record["config"]["model"] is None


def test_force_model_applies_what_fits_with_a_warning(files, capsys, loading, tmp_path):
    out_json = tmp_path / "forced.json"
    argv = [
        "eval",
        *base(files),
        "--config",
        "k4early-v4",
        "--force-model",
        "--json",
        out_json,
        "--threads",
        2,
    ]
    code, _, err = run(capsys, argv)
    assert code == 0, err
    assert err.startswith("warning: --force-model: k4early-v4") and "overrides for layers [12," in err
    record = json.loads(out_json.read_text())
    assert record["config"]["overrides"] == {}  # layers 12-29 do not exist here
    assert "--force-model onto" in record["config"]["description"]
    assert record["cache"]["per_layer"][0]["k"]["compressed"]


def test_identity_on_float32_says_it_stores_the_model_dtype(files, capsys, loading, tmp_path):
    code, out, err = run(
        capsys, ["eval", *base(files), "--config", "identity", "--json", tmp_path / "i.json", "--threads", 2]
    )
    assert code == 0, err
    assert "identity stores the model's dtype (float32, 4 bytes per value) verbatim: at most 0.50x" in out
