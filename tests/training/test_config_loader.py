"""The generic typed loader (training/config_loader.py) on dataclasses of its own: every supported annotation,
round trips, overrides, and one-line errors naming the key."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from fdpg_scale.errors import ConfigError
from fdpg_scale.training.config_loader import apply_overrides, build_section, load_dataclass, read_yaml, to_plain


@dataclass(frozen=True, kw_only=True)
class Inner:
    n: int = 1
    rate: float = 0.5

    def __post_init__(self):
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")


@dataclass(frozen=True, kw_only=True)
class Outer:
    name: str
    where: Path = Path("out")
    maybe: Path | None = None
    pair: tuple[Path, str] = (Path("a"), "b")
    seeds: tuple[int, ...] = (0,)
    tags: list[str] = field(default_factory=list)
    inner: Inner = field(default_factory=Inner)
    named: dict[str, Inner] = field(default_factory=dict)
    free: dict[str, Any] = field(default_factory=dict)
    flag: bool = False


def _load(tmp_path, raw, overrides=()):
    path = tmp_path / "f.yaml"
    path.write_text(yaml.safe_dump(raw))
    return load_dataclass(Outer, path, overrides)


def test_every_annotation_is_read_and_round_trips(tmp_path):
    raw = {"name": "x", "where": "runs/a", "maybe": "b/c", "pair": ["p.yaml", "tiny"], "seeds": [3, 4],
           "tags": ["t"], "inner": {"n": 2}, "named": {"a": {"rate": 2}, "b": None}, "free": {"k": [1, "v"]},
           "flag": True}
    obj = _load(tmp_path, raw)
    assert obj == Outer(name="x", where=Path("runs/a"), maybe=Path("b/c"), pair=(Path("p.yaml"), "tiny"),
                        seeds=(3, 4), tags=["t"], inner=Inner(n=2), named={"a": Inner(rate=2.0), "b": Inner()},
                        free={"k": [1, "v"]}, flag=True)
    assert isinstance(obj.named["a"].rate, float)                     # an int where a float is expected
    assert build_section(Outer, to_plain(obj), "") == obj
    assert _load(tmp_path, to_plain(obj)) == obj
    assert _load(tmp_path, {"name": "y", "inner": None}) == Outer(name="y")   # a null section: its defaults


def test_overrides_are_checked_against_the_fields_and_typed(tmp_path):
    obj = _load(tmp_path, {"name": "x"}, ["inner.rate=1e-3", "named.a.n=4", "free.k=v", "seeds=[1, 2]",
                                          "maybe=", "flag=true"])
    assert obj.inner.rate == 1e-3 and obj.named == {"a": Inner(n=4)} and obj.free == {"k": "v"}
    assert obj.seeds == (1, 2) and obj.maybe is None and obj.flag is True
    with pytest.raises(ConfigError, match=r"^unknown config key 'inner.nn': inner has no 'nn' \(valid: n, rate\)$"):
        apply_overrides(Outer, {}, ["inner.nn=1"])
    with pytest.raises(ConfigError, match="'name.x': name is not a section"):
        apply_overrides(Outer, {}, ["name.x=1"])
    with pytest.raises(ConfigError, match="is not of the form key=value"):
        apply_overrides(Outer, {}, ["flag"])


@pytest.mark.parametrize("raw, message", [
    ({}, "missing required config key 'name'"),
    ({"name": "x", "nme": 1}, "unknown config key 'nme' (valid in the top level: flag, free, inner, maybe, "),
    ({"name": "x", "inner": {"m": 1}}, "unknown config key 'inner.m' (valid in inner: n, rate)"),
    ({"name": "x", "inner": {"n": 0}}, "inner: n must be >= 1, got 0"),
    ({"name": "x", "named": {"a": {"n": "two"}}}, "config key 'named.a.n' must be of type int, got 'two'"),
    ({"name": "x", "pair": ["p.yaml"]}, "config key 'pair' must be a list of 2 items (Path, str)"),
    ({"name": "x", "pair": ["p.yaml", 3]}, "config key 'pair[1]' must be of type str, got 3"),
    ({"name": "x", "seeds": [1, True]}, "config key 'seeds[1]' must be of type int, got True (bool)"),
    ({"name": "x", "where": 3}, "config key 'where' must be of type Path, got 3"),
    ({"name": "x", "flag": "yes please"}, "config key 'flag' must be of type bool"),
    ({"name": "x", "inner": 3}, "inner must be a mapping, got int"),
    ({"name": "x", "inner": {"rate": float("nan")}}, "config key 'inner.rate' must be a number, got nan"),
])
def test_errors_are_one_line_and_name_the_key(tmp_path, raw, message):
    with pytest.raises(ConfigError) as err:
        _load(tmp_path, raw)
    assert message in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_files_missing_empty_or_not_a_mapping(tmp_path):
    with pytest.raises(ConfigError, match="^grid file not found: "):
        read_yaml(tmp_path / "nope.yaml", "grid")
    path = tmp_path / "f.yaml"
    path.write_text("")
    with pytest.raises(ConfigError, match="missing required config key 'name'"):   # empty: every default
        load_dataclass(Outer, path)
    path.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="the top level must be a mapping of Outer's keys, got list"):
        load_dataclass(Outer, path)
    path.write_text("a: [b\n")
    with pytest.raises(ConfigError, match=r"f\.yaml: not valid YAML \(") as err:
        load_dataclass(Outer, path)
    assert "\n" not in str(err.value)
