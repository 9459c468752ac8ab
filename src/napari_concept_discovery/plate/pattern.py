"""Filename patterns with named fields, the one mechanism behind every file-per-channel layout.

Syntax: ``{field}`` captures a named part, ``*`` matches anything within one path component,
``/`` separates folders, everything else is literal (matched case-insensitively). A pattern
is matched against the last components of a file's path, so it works from any parent folder.
``{row:02}``-style format specs are accepted and ignored, to read like the documentation of
the instrument that wrote the files.

Example (NF1): ``{well}_01_{channel_index}_{site}_{channel}_001.tif``.
"""

from __future__ import annotations

import re

from ..errors import PlateError

FIELDS: dict[str, str] = {
    "experiment": r"[^/]+?",
    "plate": r"[^/]+?",
    "well": r"[A-Za-z]{1,2}\d{1,3}",
    "row": r"[A-Za-z]{1,2}|\d{1,3}",
    "col": r"\d{1,3}",
    "site": r"\d+",
    "field": r"\d+",
    "plane": r"\d+",
    "channel_index": r"\d+",
    "channel": r"[^/]+?",
}
FIELD_HELP = (
    "{plate} {experiment} {well} (or {row} and {col}) {site} or {field} "
    "{channel} (a name) and/or {channel_index} (a number), {plane}"
)


class FilenamePattern:
    """A compiled filename pattern; ``match(parts)`` returns the named fields or None."""

    def __init__(self, text: str):
        self.text = text
        pieces = re.split(r"(\{[^{}]*\})", text)
        regex, seen = [], []
        for piece in pieces:
            if piece.startswith("{") and piece.endswith("}"):
                name = piece[1:-1].split(":", 1)[0].strip()
                if name == "column":
                    name = "col"
                if name not in FIELDS:
                    raise PlateError(
                        f"unknown field {piece} in pattern {text!r}; known fields: {FIELD_HELP}"
                    )
                if name in seen:
                    regex.append(f"(?P={name})")
                else:
                    seen.append(name)
                    regex.append(f"(?P<{name}>{FIELDS[name]})")
            elif piece:
                regex.append("[^/]*?".join(map(re.escape, piece.split("*"))))
        self.fields = frozenset(seen)
        if "well" not in self.fields and not {"row", "col"} <= self.fields:
            raise PlateError(f"pattern {text!r} needs {{well}} or both {{row}} and {{col}}")
        if "site" in self.fields and "field" in self.fields:
            raise PlateError(f"pattern {text!r} has both {{site}} and {{field}}; use one")
        self.depth = text.strip("/").count("/") + 1
        self._regex = re.compile("".join(regex), re.IGNORECASE)

    @property
    def per_channel(self) -> bool:
        """True when each file holds one channel; False for one multi-channel file per site."""
        return bool({"channel", "channel_index"} & self.fields)

    def match(self, parts: tuple[str, ...]) -> dict[str, str] | None:
        if len(parts) < self.depth:
            return None
        m = self._regex.fullmatch("/".join(parts[-self.depth :]))
        return None if m is None else m.groupdict()

    def literal_text(self, parts: tuple[str, ...]) -> str | None:
        """The matched name with each field's text blanked (what the literal parts and ``*``
        matched), or None when it does not match."""
        if len(parts) < self.depth:
            return None
        text = "/".join(parts[-self.depth :])
        m = self._regex.fullmatch(text)
        if m is None:
            return None
        out = list(text)
        for name in self.fields:
            start, end = m.span(name)
            out[start:end] = [" "] * (end - start)
        return "".join(out)

    def __repr__(self) -> str:
        return f"FilenamePattern({self.text!r})"
