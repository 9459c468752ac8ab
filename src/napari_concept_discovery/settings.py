"""Settings objects: one dataclass per step, the single source of defaults, help and checks.

Each step's settings (``EmbedSettings``, ``WhitenSettings``, ``TrainSettings``,
``AnalyzeSettings``) is a dataclass that derives from :class:`Settings`. Fields carry their help
text (and, optionally, choices, the command-line flag and a short label for forms) in
``field(metadata=...)`` through :func:`option`; ``__post_init__`` checks values and raises a
:class:`SettingsError` that names the parameter. The CLI builds its options from the fields
(:func:`add_arguments`, :func:`from_args`), the demo constructs the same objects, and the widgets
build their forms from :func:`describe`. A settings object round-trips through JSON
(``to_dict``/``from_dict``), which is how a dictionary file records how it was trained.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Iterable, Sequence
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

from .errors import ConceptDiscoveryError


class SettingsError(ConceptDiscoveryError, ValueError):
    """A setting is out of range or contradicts another; the message names the setting."""


def option(
    default: Any = MISSING,
    help: str = "",
    *,
    choices: Sequence | None = None,
    flag: str | None = None,
    label: str | None = None,
    default_factory: Any = MISSING,
    cli: bool = True,
) -> Any:
    """A dataclass field with help text, optional choices, CLI flag and form label.

    ``flag`` defaults to ``--field-name``; ``cli=False`` keeps a field out of the command line
    (for values the CLI passes positionally or derives).
    """
    meta = {
        "help": help,
        "choices": tuple(choices) if choices else None,
        "flag": flag,
        "label": label,
        "cli": cli,
    }
    if default_factory is not MISSING:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


def check(condition: bool, name: str, message: str) -> None:
    """Raise a SettingsError about ``name`` unless ``condition`` holds."""
    if not condition:
        raise SettingsError(f"{name}: {message}")


@dataclass
class Settings:
    """Base: JSON round trip and a check of ``choices`` for every field that has them."""

    def __post_init__(self) -> None:
        for f in fields(self):
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            if choices and value is not None and value not in choices:
                raise SettingsError(
                    f"{f.name}: {value!r} is not one of {', '.join(map(repr, choices))}"
                )
        self.validate()

    def validate(self) -> None:
        """Cross-field checks of a subclass; raise :class:`SettingsError` naming the field."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        """Build from a dict; unknown keys are an error naming them (a typo must not pass)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise SettingsError(
                f"{cls.__name__}: unknown setting(s) {', '.join(unknown)}; "
                f"known: {', '.join(sorted(known))}"
            )
        return cls(**data)

    def replace(self, **changes):
        """A copy with ``changes`` applied and checked again."""
        return dataclasses.replace(self, **changes)


def _base_type(tp) -> tuple[type, bool]:
    """(type, optional) of an annotation such as ``int | None``."""
    args = typing.get_args(tp)
    optional = type(None) in args
    if args and typing.get_origin(tp) in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        tp = rest[0] if len(rest) == 1 else str
    origin = typing.get_origin(tp)
    if origin in (tuple, list):
        return str, optional
    return (tp if isinstance(tp, type) else str), optional


def describe(cls: type[Settings]) -> list[dict[str, Any]]:
    """One dict per field: name, type, optional, default, help, choices, label (for forms)."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in fields(cls):
        tp, optional = _base_type(hints[f.name])
        default = (
            f.default
            if f.default is not MISSING
            else (f.default_factory() if f.default_factory is not MISSING else None)
        )
        out.append(
            {
                "name": f.name,
                "type": tp,
                "optional": optional,
                "default": default,
                "help": f.metadata.get("help", ""),
                "choices": f.metadata.get("choices"),
                "label": f.metadata.get("label") or f.name.replace("_", " "),
                "flag": f.metadata.get("flag") or "--" + f.name.replace("_", "-"),
                "cli": f.metadata.get("cli", True),
            }
        )
    return out


def add_arguments(
    parser: argparse.ArgumentParser, cls: type[Settings], exclude: Iterable[str] = ()
) -> None:
    """Add one option per field of ``cls`` (defaults and help from the dataclass)."""
    skip = set(exclude)
    for d in describe(cls):
        if d["name"] in skip or not d["cli"]:
            continue
        kwargs: dict[str, Any] = {"dest": d["name"], "default": argparse.SUPPRESS}
        default = d["default"]
        shown = "" if default is None else f" (default: {default})"
        if d["type"] is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
            shown = f" (default: {'auto' if default is None else 'yes' if default else 'no'})"
        else:
            kwargs["type"] = d["type"] if d["type"] in (int, float) else str
            if d["choices"]:
                kwargs["choices"] = d["choices"]
            kwargs["metavar"] = d["name"].upper() if not d["choices"] else None
            if kwargs["metavar"] is None:
                del kwargs["metavar"]
        kwargs["help"] = d["help"] + shown
        parser.add_argument(d["flag"], **kwargs)


def from_args(cls: type[Settings], args: argparse.Namespace, **overrides):
    """Settings from parsed options: fields not given on the command line keep their default."""
    names = {f.name for f in fields(cls)}
    values = {k: v for k, v in vars(args).items() if k in names}
    values.update(overrides)
    return cls(**values)
