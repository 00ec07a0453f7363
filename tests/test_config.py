"""Typed configs: YAML + CLI overrides, strict where the schema is known."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from rootflow import config as cfglib


@dataclasses.dataclass(frozen=True)
class Inner:
    size: int = 4
    pair: tuple[int, int] = (1, 2)


@dataclasses.dataclass(frozen=True)
class Outer:
    name: str = "a"
    rate: float = 1e-4
    inner: Inner = dataclasses.field(default_factory=Inner)
    model: dict[str, Any] = dataclasses.field(default_factory=dict)
    maybe: str | None = None


def test_overrides_nested_and_free_form(tmp_path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("name: b\ninner:\n  size: 8\nmodel:\n  variant: test\n")
    cfg = cfglib.load(Outer, str(path), ["inner.pair=[3, 4]", "rate=0.5", "model.tile=512",
                                         "maybe=x"])
    assert cfg == Outer(name="b", rate=0.5, inner=Inner(size=8, pair=(3, 4)),
                        model={"variant": "test", "tile": 512}, maybe="x")
    assert cfglib.from_dict(Outer, cfglib.to_dict(cfg)) == cfg  # round trip via YAML-safe data
    assert "variant: test" in cfglib.dump(cfg)


@pytest.mark.parametrize("bad", ["nope=1", "inner.nope=1", "name", "missing.key=1"])
def test_unknown_keys_are_named(bad: str) -> None:
    with pytest.raises(ValueError, match="unknown|key=value"):
        cfglib.override(Outer(), [bad])


def test_unknown_yaml_key_lists_valid_ones() -> None:
    with pytest.raises(ValueError, match="valid: .*'inner'"):
        cfglib.from_dict(Outer, {"inneer": {}})
