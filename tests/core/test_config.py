"""Frozen configs: validation on construction, JSON round trip, unknown keys and versions rejected."""

import dataclasses
import json

import pytest

from caldera.config import SUPPORTED_BITS, ConfigError, DecomposeConfig, FinetuneConfig, Method, QuantConfig, Rounding

CONFIGS = [
    QuantConfig(),
    QuantConfig(bits=3, group_size=48, zero_point=True, rounding=Rounding.STOCHASTIC, pow2_scales=True, seed=9),
    DecomposeConfig(),
    DecomposeConfig.for_method("gptq", bq=4, damping=0.05, block_size=64),
    DecomposeConfig.for_method("ldlq-had", bq=3, zero_point=True),
    DecomposeConfig.for_method("rtn", bq=8, group_size=128),
    DecomposeConfig(bq=3, bl=16, br=8, rank=32, iters=3, lr_iters=0, randomized_svd=True, clip_search=False, seed=4),
    DecomposeConfig(rank=8, protect=1e-4),
    FinetuneConfig(steps=5, lr=1e-3, micro_batch=2, norms=False),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: type(c).__name__)
def test_json_round_trip(cfg):
    s = cfg.to_json()
    d = json.loads(s)
    assert d["version"] == type(cfg).version
    optional = {"protect"} if getattr(cfg, "protect", None) == 0 else set()  # omitted when off (older run specs)
    assert set(d) == {"version"} | {f.name for f in dataclasses.fields(cfg)} - optional
    assert all(isinstance(v, (bool, int, float, str)) for v in d.values())  # enums stored as their values
    back = type(cfg).from_json(s)
    assert back == cfg and back.to_json() == s
    assert type(cfg).from_dict(cfg.to_dict()) == cfg


def test_enums_coerced_from_strings():
    cfg = DecomposeConfig(method="gptq", rank=0)
    assert cfg.method is Method.GPTQ
    assert QuantConfig(rounding="stochastic").rounding is Rounding.STOCHASTIC
    assert DecomposeConfig.from_dict({"method": "ldlq-had", "rank": 0}).method is Method.LDLQ_HAD


@pytest.mark.parametrize("cls", [QuantConfig, DecomposeConfig])
def test_unknown_keys_named(cls):
    d = cls().to_dict()
    d["groupsize"] = 32
    with pytest.raises(ConfigError, match="groupsize"):
        cls.from_dict(d)
    d["zz_extra"] = 1
    with pytest.raises(ConfigError, match="groupsize, zz_extra"):
        cls.from_json(json.dumps(d))


@pytest.mark.parametrize("cls", [QuantConfig, DecomposeConfig])
def test_other_version_rejected(cls):
    d = cls().to_dict()
    d["version"] = cls.version + 1
    with pytest.raises(ConfigError, match="version"):
        cls.from_dict(d)
    del d["version"]
    assert cls.from_dict(d) == cls()  # no version: the current one


def test_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        QuantConfig().bits = 4  # type: ignore[misc]


@pytest.mark.parametrize(
    ("cls", "kw", "field"),
    [
        (QuantConfig, {"bits": 5}, "bits"),
        (QuantConfig, {"bits": 1}, "bits"),
        (QuantConfig, {"group_size": 0}, "group_size"),
        (DecomposeConfig, {"bq": 16}, "bq"),
        (DecomposeConfig, {"bl": 6}, "bl"),
        (DecomposeConfig, {"rank": -1}, "rank"),
        (DecomposeConfig, {"method": "rtn", "rank": 4}, "method"),
        (DecomposeConfig, {"iters": 0}, "iters"),
        (DecomposeConfig, {"lr_iters": -1}, "lr_iters"),
        (DecomposeConfig, {"block_size": 0}, "block_size"),
        (DecomposeConfig, {"lr_group_size": 0}, "lr_group_size"),
        (DecomposeConfig, {"damping": 0.0}, "damping"),
        (DecomposeConfig, {"damping": 1.0}, "damping"),
    ],
)
def test_validation_names_the_field(cls, kw, field):
    with pytest.raises(ConfigError, match=field):
        cls(**kw)
    d = cls().to_dict() | kw
    with pytest.raises(ConfigError, match=field):
        cls.from_dict(d)


def test_supported_bits_accepted():
    for bits in SUPPORTED_BITS:
        assert QuantConfig(bits=bits).is_float == (bits == 16)
    assert DecomposeConfig(bl=16, br=16).l_quant().is_float


def test_for_method():
    assert DecomposeConfig.for_method("gptq", rank=64).rank == 0
    assert not DecomposeConfig.for_method("gptq").incoherence
    assert DecomposeConfig.for_method(Method.LDLQ_HAD).incoherence
    assert not DecomposeConfig.for_method("rtn").incoherence
    assert DecomposeConfig.for_method("caldera").incoherence
    assert not DecomposeConfig.for_method("caldera", incoherence=False).incoherence


def test_quant_configs_follow_the_decompose_config():
    cfg = DecomposeConfig(bq=3, bl=4, br=8, group_size=32, lr_group_size=16, zero_point=True, clip_search=False, seed=7)
    assert cfg.q_quant() == QuantConfig(3, 32, True, clip_search=False, seed=7)
    assert cfg.l_quant() == QuantConfig(4, 16, True, clip_search=False)
    assert cfg.r_quant() == QuantConfig(8, 16, True, clip_search=False)


@pytest.mark.parametrize(
    ("cls", "kw", "field"),
    [(DecomposeConfig, {"method": "bogus"}, "method"), (QuantConfig, {"rounding": "up"}, "rounding")],
)
def test_invalid_enum_value_names_the_field(cls, kw, field):
    with pytest.raises(ConfigError, match=field):
        cls(**kw)
