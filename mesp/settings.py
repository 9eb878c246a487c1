"""Settings dataclasses as the one source of a command's options (mlx-lm's habit).

A settings class declares each option once, as a dataclass field made with :func:`setting`: its default, its
help text, its choices and how the command line spells it. From that one declaration come the command's flags
(:func:`add_arguments`), the values a user actually gave (:func:`given`) and the reading of a TOML settings
file (:func:`read_toml`), so a default, a choice list or a help line is never written twice.

    @dataclass
    class Settings:
        rank: int = setting(8, "LoRA rank")
        method: str = setting("mesp", "gradient method", choices=("mesp", "mebp"))
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tomllib
import types
import typing
from pathlib import Path

from .errors import MespError

_MISSING = dataclasses.MISSING


PATH_KINDS = ("file", "file_or_name")


def setting(default=_MISSING, help: str = "", *, factory=None, choices=None, metavar: str | None = None,
            default_text: str | None = None, negatable: bool = False, flag: bool = True, path: str | None = None):
    """A dataclass field that also describes its command-line flag.

    help: the flag's help text; "(default X)" is appended from the default unless `default_text` says it
    differently ("" to say nothing). choices: the allowed values (checked by argparse; validation beyond
    that belongs to whatever consumes the setting). negatable: a bool flag that also has --no-NAME.
    flag=False: a setting that has no flag (API and TOML only). path: "file" for a file or directory path,
    "file_or_name" for a path or a name (a model preset); a relative path in a TOML file is read relative to
    that file (see read_toml)."""
    if path not in (None, *PATH_KINDS):
        raise ValueError(f"path: {path!r} is not one of {PATH_KINDS}")
    meta = {"help": help, "choices": tuple(choices) if choices is not None else None, "metavar": metavar,
            "default_text": default_text, "negatable": negatable, "flag": flag, "path": path}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def comma_list(kind=str):
    """argparse type for comma-separated values of `kind` ("a,b" -> ["a", "b"])."""
    def parse(text: str):
        try:
            return [kind(x.strip()) for x in text.split(",") if x.strip()]
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}") from e
    return parse


def field_types(cls) -> dict[str, tuple[type, ...]]:
    """Field name -> the plain types its annotation allows (None dropped; list[int] -> list)."""
    out = {}
    for name, hint in typing.get_type_hints(cls).items():
        args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
        out[name] = tuple(typing.get_origin(t) or t for t in args if t is not type(None))
    return out


def _item_type(cls, name: str) -> type:
    """The element type of a list-typed field (list[int] -> int), str when unannotated."""
    hint = typing.get_type_hints(cls)[name]
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    for t in typing.get_args(hint) if union else (hint,):
        if typing.get_origin(t) is list:
            return (typing.get_args(t) or (str,))[0]
    return str


def _default(f: dataclasses.Field):
    """The field's default value (a fresh one from its factory)."""
    return f.default_factory() if f.default is _MISSING and f.default_factory is not _MISSING else f.default


def _default_text(f: dataclasses.Field) -> str:
    if f.metadata.get("default_text") is not None:
        return f.metadata["default_text"]
    value = _default(f)
    if value is None or value is _MISSING or value is False:
        return ""
    if isinstance(value, list):
        value = ",".join(map(str, value))
    return f"default {value}"


def add_arguments(parser: argparse.ArgumentParser, cls, *, defaults_to_none: bool = False) -> None:
    """One flag per field of `cls` made with setting(flag=True), in declaration order.

    defaults_to_none: every flag defaults to None, so a caller can tell which flags were given (and let a
    settings file or a saved run fill the rest); the real defaults stay the dataclass's."""
    types_ = field_types(cls)
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if not meta.get("flag", False):
            continue
        names = ["--" + f.name.replace("_", "-")]
        note = _default_text(f)
        help_text = f"{meta['help']} ({note})" if note else meta["help"]
        kw = {"help": help_text, "dest": f.name}
        allowed = types_[f.name]
        if bool in allowed:
            kw["action"] = argparse.BooleanOptionalAction if meta["negatable"] else "store_true"
            kw["default"] = None if (defaults_to_none or meta["negatable"]) else f.default
        else:
            if list in allowed:
                kw["type"] = comma_list(_item_type(cls, f.name))
            elif allowed and allowed[0] in (int, float):
                kw["type"] = allowed[0]
            if meta["choices"] is not None:
                kw["choices"] = meta["choices"]
            if meta["metavar"]:
                kw["metavar"] = meta["metavar"]
            if not defaults_to_none:
                kw["default"] = _default(f)
        parser.add_argument(*names, **kw)


def given(cls, args: argparse.Namespace) -> dict:
    """The fields of `cls` the command line set (flags added with defaults_to_none=True)."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)
            if getattr(args, f.name, None) is not None}


def resolve_path(value: str, base: Path, kind: str) -> str:
    """A path written in a settings file, relative to the file's directory `base` (as a user reads the file).
    A "file_or_name" value that is not a path there and does not look like one (no separator, no .gguf) stays a
    name."""
    expanded = Path(value).expanduser()
    candidate = expanded if expanded.is_absolute() else base / expanded
    if kind == "file_or_name" and not candidate.exists() and "/" not in value and os.sep not in value \
            and not value.lower().endswith(".gguf"):
        return value
    return str(candidate)


def read_toml(cls, path) -> dict:
    """Settings of `cls` from a TOML file: keys are field names (dashes or underscores), each value checked
    against the field's type; relative paths of path settings are relative to the file's directory (see
    resolve_path). Raises MespError naming the file and the key."""
    p = Path(path)
    if p.suffix.lower() in (".yaml", ".yml"):
        raise MespError(f"{path}: YAML is not supported; write the settings as TOML (key = value)")
    try:
        raw = tomllib.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise MespError(f"{path}: no such file") from e
    except (OSError, UnicodeDecodeError) as e:
        raise MespError(f"{path}: unreadable ({e})") from e
    except tomllib.TOMLDecodeError as e:
        raise MespError(f"{path}: invalid TOML ({e})") from e
    types_ = field_types(cls)
    path_kinds = {f.name: f.metadata.get("path") for f in dataclasses.fields(cls)}
    base = p.resolve().parent
    settings = {}
    for key, value in raw.items():
        name = key.replace("-", "_")
        if name not in types_:
            raise MespError(f"{path}: unknown setting {key!r}")
        allowed = types_[name]
        ok = isinstance(value, allowed) and not (isinstance(value, bool) and bool not in allowed)
        if not ok and not (float in allowed and isinstance(value, int) and not isinstance(value, bool)):
            raise MespError(f"{path}: {key} = {value!r} has the wrong type "
                            f"(expected {' or '.join(t.__name__ for t in allowed)})")
        if path_kinds[name] and isinstance(value, str) and value:
            value = resolve_path(value, base, path_kinds[name])
        settings[name] = value
    return settings
