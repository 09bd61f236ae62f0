"""Typed options: dataclass fields that carry their help text, built from dicts or generated CLIs.

Every user-facing options class (compression, A/B, recovery, ...) is a dataclass whose fields are declared
with `option(default, "help text")`. From that one declaration come:
  - `from_mapping(cls, data)`: the object from a dict, refusing unknown keys with the list of known ones;
  - `add_arguments(parser, cls)`: argparse flags (`--field-name`), help and default included;
  - `from_arguments(cls, args)`: the object from the parsed namespace.
Pure Python (no torch, no vLLM): cheap to import from any CLI.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Callable

_HELP = "help"
_FLAG = "flag"
_PARSE = "parse"
_CHOICES = "choices"
_METAVAR = "metavar"
_EXCLUSIVE = "exclusive"


def option(default: Any = dataclasses.MISSING, help: str = "", *, flag: str | None = None,
           parse: Callable[[str], Any] | None = None, choices: tuple | None = None,
           metavar: str | None = None, exclusive: str | None = None) -> Any:
    """A dataclass field with its CLI help. `parse` turns one command-line string into the value;
    `flag` replaces the generated `--field-name` (a boolean `--x` also gets `--no-x`); fields with the
    same `exclusive` name cannot be given together on the command line (argparse mutually exclusive)."""
    metadata = {_HELP: help, _FLAG: flag, _PARSE: parse, _CHOICES: choices, _METAVAR: metavar,
                _EXCLUSIVE: exclusive}
    if isinstance(default, (list, dict, set)):
        value = default
        return dataclasses.field(default_factory=lambda: type(value)(value), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def help_of(cls, name: str) -> str:
    return next(f.metadata.get(_HELP, "") for f in dataclasses.fields(cls) if f.name == name)


def from_mapping(cls, data: Any, error: type[Exception] = ValueError, what: str = "option"):
    """`cls(**data)`, refusing a non-dict and unknown keys with the names that are allowed."""
    if not isinstance(data, dict):
        raise error(f"expected a mapping of {what}s, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise error(f"unknown {what}(s) {unknown}; known: {sorted(names)}")
    return cls(**data)


def _unwrap_optional(annotation: Any) -> tuple[Any, bool]:
    """`int | None` -> (int, True); anything else -> (annotation, False)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return annotation, False


def _list_parser(item: Callable[[str], Any]) -> Callable[[str], tuple]:
    def parse(text: str) -> tuple:
        try:
            return tuple(item(part) for part in text.split(",") if part.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}") from None
    return parse


def _value_parser(annotation: Any) -> Callable[[str], Any]:
    base, _ = _unwrap_optional(annotation)
    if typing.get_origin(base) in (tuple, list):
        item = typing.get_args(base)[0]
        return _list_parser(item)
    if base in (int, float, str, Path):
        return base
    raise TypeError(f"no command-line parser for {annotation!r}; give the field `parse=`")


def _flag(field: dataclasses.Field) -> str:
    return field.metadata.get(_FLAG) or "--" + field.name.replace("_", "-")


def add_arguments(parser: argparse.ArgumentParser, cls, *, skip: tuple[str, ...] = (),
                  required: tuple[str, ...] = ()) -> None:
    """One `--flag` per field of `cls` (booleans get `--x/--no-x`); `required` fields must be given."""
    hints = typing.get_type_hints(cls)
    groups: dict[str, argparse._MutuallyExclusiveGroup] = {}
    for field in dataclasses.fields(cls):
        if field.name in skip:
            continue
        meta = field.metadata
        has_default = field.default is not dataclasses.MISSING or field.default_factory is not dataclasses.MISSING
        default = (field.default if field.default is not dataclasses.MISSING
                   else field.default_factory() if has_default else None)
        shown = ",".join(map(str, default)) if isinstance(default, (tuple, list)) else default
        text = meta.get(_HELP, "")
        show = has_default and default is not None and shown != ""  # "unset" defaults say so in the help
        kwargs: dict[str, Any] = {"dest": field.name, "help": f"{text} (default: {shown})" if show else text}
        if hints[field.name] is bool:
            kwargs.update(action=argparse.BooleanOptionalAction, default=default)
        else:
            kwargs.update(type=meta.get(_PARSE) or _value_parser(hints[field.name]), default=default)
            if meta.get(_CHOICES):
                kwargs["choices"] = meta[_CHOICES]
            if meta.get(_METAVAR):
                kwargs["metavar"] = meta[_METAVAR]
        if field.name in required or not has_default:
            kwargs["required"] = True
        target = parser
        if meta.get(_EXCLUSIVE):
            if meta[_EXCLUSIVE] not in groups:
                groups[meta[_EXCLUSIVE]] = parser.add_mutually_exclusive_group()
            target = groups[meta[_EXCLUSIVE]]
        target.add_argument(_flag(field), **kwargs)


def from_arguments(cls, args: argparse.Namespace, **overrides: Any):
    """The options object from a namespace filled by `add_arguments` (fields it skipped: `overrides`)."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    values.update(overrides)
    return cls(**values)
