"""Control rows named as ``COLUMN=VALUE`` (``well_type=negative_control``): the one parser for
whitening, concept profiles, the report and the settings that name them. No numpy, no torch."""

from __future__ import annotations

from typing import NamedTuple

from ..errors import DictionaryError
from ..settings import SettingsError


class Control(NamedTuple):
    """The control rows of a table: those whose ``column`` reads ``value`` (compared as text)."""

    column: str
    value: str

    def __str__(self) -> str:
        return f"{self.column}={self.value}"


def parse_control(spec: str | tuple[str, str]) -> Control:
    """``"well_type=negative_control"`` (or a (column, value) pair) -> ``Control``."""
    if isinstance(spec, tuple):
        column, value = spec
        return Control(str(column), str(value))
    column, sep, value = str(spec).partition("=")
    if not sep or not column.strip() or not value.strip():
        raise DictionaryError(f"controls must be given as COLUMN=VALUE, got {spec!r}")
    return Control(column.strip(), value.strip())


def check_control(spec: str | None) -> None:
    """A setting's ``controls`` refused as a ``SettingsError`` when it is not COLUMN=VALUE."""
    if spec is None:
        return
    try:
        parse_control(spec)
    except DictionaryError as exc:
        raise SettingsError(str(exc)) from None
