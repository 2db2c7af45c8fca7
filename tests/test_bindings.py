"""CodecConfig fields of the PyO3 bindings: ``rotation`` and ``transform`` (the model basis, issue 23)."""

from __future__ import annotations

import json
import pickle

import kakeya_py as kp
import pytest

SHA = "0123456789abcdef" * 4


def basis_config(**kw) -> kp.CodecConfig:
    return kp.CodecConfig(bits=8, basis="none", rotation="none", uniform_step=0.3, entropy_coding=True, **kw)


def test_rotation_and_transform_defaults():
    c = kp.CodecConfig()
    assert c.rotation == "hadamard" and c.transform is None
    d = c.to_dict()
    assert d["rotation"] == "hadamard" and d["transform"] is None


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"rotation": "bogus"}, "rotation"),
        ({"transform": "xyz"}, "transform"),
        ({"transform": SHA.upper()}, "transform"),  # lowercase hex only
        ({"transform": SHA[:-1]}, "transform"),  # 64 digits
    ],
)
def test_invalid_rotation_or_transform_names_the_field(kwargs, field):
    with pytest.raises(kp.ConfigError, match=field):
        kp.CodecConfig(**kwargs)
    with pytest.raises(kp.ConfigError, match=field):
        kp.CodecConfig.from_dict({**kp.CodecConfig().to_dict(), **kwargs})


def test_dict_json_and_pickle_round_trips_keep_rotation_and_transform():
    for c in (basis_config(), basis_config(transform=SHA), kp.CodecConfig(transform=SHA)):
        d = c.to_dict()
        assert (d["rotation"], d["transform"]) == (c.rotation, c.transform)
        again = kp.CodecConfig.from_dict(json.loads(json.dumps(d)))
        assert again == c and again.rotation == c.rotation and again.transform == c.transform
        assert kp.CodecConfig.from_json(c.to_json()) == c
        assert pickle.loads(pickle.dumps(c)) == c
    a, b = basis_config(transform=SHA), basis_config(transform="f" * 64)
    assert a != b and a != basis_config() and len({a, kp.CodecConfig.from_dict(a.to_dict())}) == 1
    assert basis_config().rotation == "none" and basis_config().to_dict()["rotation"] == "none"
