"""Typed settings read from the environment."""
from __future__ import annotations

from dataclasses import dataclass

import pytest

from services.common import settings as cfg
from services.registry.settings import PREFIX as REGISTRY_PREFIX
from services.registry.settings import RegistrySettings

PREFIX = "T_"


@dataclass(frozen=True)
class Sample:
    port: int = cfg.field(8000, "a port")
    ratio: float = cfg.field(0.5, "a ratio")
    verbose: bool = cfg.field(False, "a flag")
    name: str = cfg.field("node", "a name")
    tags: tuple[str, ...] = cfg.field((), "a list")


@dataclass(frozen=True)
class Unsupported:
    limits: dict[str, int] = cfg.field(None, "no conversion for this")


@pytest.mark.parametrize(
    ("variable", "raw", "field", "expected"),
    [
        ("T_PORT", "50051", "port", 50051),
        ("T_PORT", "-1", "port", -1),
        ("T_RATIO", "0.125", "ratio", 0.125),
        ("T_RATIO", "3", "ratio", 3.0),
        ("T_NAME", "edge-7", "name", "edge-7"),
        ("T_TAGS", "digits, digits:2:INT8,,  other ", "tags", ("digits", "digits:2:INT8", "other")),
        ("T_TAGS", "", "tags", ()),
    ],
)
def test_an_environment_variable_is_converted_to_its_field_type(variable, raw, field, expected):
    got = getattr(cfg.load(Sample, PREFIX, env={variable: raw}), field)
    assert got == expected
    assert type(got) is type(expected)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("1", True), ("true", True), ("YES", True), (" on ", True),
     ("0", False), ("false", False), ("No", False), ("off", False), ("", False)],
)
def test_boolean_settings_accept_the_usual_spellings(raw, expected):
    assert cfg.load(Sample, PREFIX, env={"T_VERBOSE": raw}).verbose is expected


@pytest.mark.parametrize(
    ("variable", "raw", "message"),
    [
        ("T_PORT", "eighty", "setting T_PORT: expected int, got 'eighty'"),
        ("T_PORT", "1.5", "setting T_PORT: expected int, got '1.5'"),
        ("T_RATIO", "half", "setting T_RATIO: expected float, got 'half'"),
        ("T_VERBOSE", "maybe", "setting T_VERBOSE: expected a boolean, got 'maybe'"),
    ],
)
def test_a_bad_value_is_rejected_naming_the_variable_and_the_value(variable, raw, message):
    with pytest.raises(ValueError) as info:
        cfg.load(Sample, PREFIX, env={variable: raw})
    assert str(info.value) == message


def test_unset_variables_keep_their_defaults_and_other_prefixes_are_ignored():
    assert cfg.load(Sample, PREFIX, env={"OTHER_PORT": "1", "PORT": "2"}) == Sample()


def test_overrides_win_over_the_environment():
    got = cfg.load(Sample, PREFIX, env={"T_PORT": "1", "T_NAME": "env"}, port=2)
    assert (got.port, got.name) == (2, "env")


def test_a_field_type_without_a_conversion_is_a_type_error():
    with pytest.raises(TypeError, match="setting T_LIMITS: unsupported type"):
        cfg.load(Unsupported, PREFIX, env={"T_LIMITS": "a=1"})


def test_describe_lists_each_variable_with_its_default_and_doc():
    rows = cfg.describe(Sample, PREFIX)
    assert rows[0] == ("T_PORT", "8000", "a port")
    assert [r[0] for r in rows] == ["T_PORT", "T_RATIO", "T_VERBOSE", "T_NAME", "T_TAGS"]


def test_a_service_settings_class_loads_from_its_own_prefix():
    env = {"CNEI_REGISTRY_PORT": "6000", "CNEI_REGISTRY_DATA_DIR": "/tmp/r", "CNEI_RUNTIME_PORT": "1"}
    got = cfg.load(RegistrySettings, REGISTRY_PREFIX, env=env)
    assert (got.port, got.data_dir, got.metrics_port) == (6000, "/tmp/r", 9101)
