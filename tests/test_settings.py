"""mesp.settings: one dataclass declaration gives the flags, their help and defaults, and the TOML reading."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import pytest

from mesp.errors import MespError
from mesp.settings import add_arguments, given, read_toml, setting


@dataclass
class Example:
    model: str | None = setting(None, "model path", metavar="DIR")
    rank: int = setting(8, "LoRA rank")
    lr: float | None = setting(None, "learning rate", default_text="default by optimizer")
    method: str = setting("mesp", "gradient method", choices=("mesp", "mebp"))
    sizes: list[int] = setting(factory=lambda: [1, 2], help="sizes")
    fast: bool = setting(False, "go fast")
    per_layer: bool | None = setting(None, "per-layer updates", negatable=True)
    hidden: int = setting(3, "no flag", flag=False)


def parser(**kw):
    p = argparse.ArgumentParser()
    add_arguments(p, Example, **kw)
    return p


def test_flags_carry_defaults_types_choices_and_help():
    args = parser().parse_args(["--rank", "4", "--sizes", "3,4", "--fast", "--no-per-layer"])
    assert (args.rank, args.sizes, args.fast, args.per_layer, args.method, args.lr) == (4, [3, 4], True, False,
                                                                                        "mesp", None)
    assert not hasattr(args, "hidden")
    text = parser().format_help()
    assert "LoRA rank (default 8)" in text and "learning rate (default by optimizer)" in text
    assert "sizes (default 1,2)" in text and "{mesp,mebp}" in text and "DIR" in text
    with pytest.raises(SystemExit):
        parser().parse_args(["--method", "other"])


def test_given_reports_only_what_the_command_line_set():
    args = parser(defaults_to_none=True).parse_args(["--rank", "2", "--fast"])
    assert given(Example, args) == {"rank": 2, "fast": True}


def test_toml_keys_and_types_are_checked(tmp_path):
    f = tmp_path / "s.toml"
    f.write_text('rank = 4\nlr = 1\nsizes = [5]\nper-layer = true\n')
    assert read_toml(Example, f) == {"rank": 4, "lr": 1, "sizes": [5], "per_layer": True}
    f.write_text('rank = "4"\n')
    with pytest.raises(MespError, match=r"s.toml: rank = '4' has the wrong type \(expected int\)"):
        read_toml(Example, f)
    f.write_text('nope = 1\n')
    with pytest.raises(MespError, match="unknown setting 'nope'"):
        read_toml(Example, f)
    with pytest.raises(MespError, match="YAML"):
        read_toml(Example, tmp_path / "s.yaml")
