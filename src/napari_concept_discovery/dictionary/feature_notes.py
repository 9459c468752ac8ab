"""Names and notes a person gives a dictionary's features, kept beside the dictionary.

A dictionary of hundreds of features is only useful once someone can say what each one is and
keep what they learnt. Names and notes live in ``<dictionary stem>.features.json`` next to the
dictionary file, keyed by the dictionary's checksum (the one its header carries): a notes file
written for another dictionary (retrained under the same name, say) is refused with both
checksums named, never shown against the wrong features. Qt-free and torch-free: the checksum
is read from the safetensors header directly.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from .._files import atomic_write_text
from ..errors import DictionaryError

SUFFIX = ".features.json"
FORMAT = "napari-concept-discovery/feature-notes"


def notes_path(dictionary_path: str | Path) -> Path:
    """``<stem>.features.json`` beside the dictionary file."""
    path = Path(dictionary_path)
    stem = path.name[: -len(".safetensors")] if path.name.endswith(".safetensors") else path.stem
    return path.with_name(stem + SUFFIX)


def dictionary_checksum(dictionary_path: str | Path) -> str:
    """The checksum a dictionary file's header carries (sha256 of its tensors)."""
    path = Path(dictionary_path)
    try:
        with open(path, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        checksum = header.get("__metadata__", {}).get("checksum")
    except (OSError, ValueError, struct.error) as exc:
        raise DictionaryError(f"cannot read the header of the dictionary {path}: {exc}") from exc
    if not checksum:
        raise DictionaryError(f"the dictionary {path} has no checksum in its header")
    return str(checksum)


@dataclass
class FeatureNotes:
    """Names and notes of one dictionary's features (feature number -> text)."""

    checksum: str
    names: dict[int, str] = field(default_factory=dict)
    notes: dict[int, str] = field(default_factory=dict)

    def set(self, feature: int, name: str | None = None, note: str | None = None) -> None:
        """Name and/or annotate ``feature``; an empty string removes it."""
        f = int(feature)
        for text, into in ((name, self.names), (note, self.notes)):
            if text is None:
                continue
            text = text.strip()
            if text:
                into[f] = text
            else:
                into.pop(f, None)

    def name(self, feature: int) -> str:
        return self.names.get(int(feature), "")

    def note(self, feature: int) -> str:
        return self.notes.get(int(feature), "")

    def frame(self) -> pd.DataFrame:
        """One row per feature with a name or a note: ``feature``, ``name``, ``note``."""
        feats = sorted(set(self.names) | set(self.notes))
        return pd.DataFrame(
            {
                "feature": pd.Series(feats, dtype="int64"),
                "name": pd.Series([self.name(f) for f in feats], dtype=object),
                "note": pd.Series([self.note(f) for f in feats], dtype=object),
            }
        )

    def to_json(self) -> str:
        return json.dumps(
            {
                "format": FORMAT,
                "checksum": self.checksum,
                "names": {str(k): v for k, v in sorted(self.names.items())},
                "notes": {str(k): v for k, v in sorted(self.notes.items())},
            },
            indent=1,
            ensure_ascii=False,
        )


def load_notes(dictionary_path: str | Path) -> FeatureNotes:
    """The names and notes saved beside ``dictionary_path`` (empty when there are none).

    A notes file written for another dictionary is refused, naming both checksums.
    """
    checksum = dictionary_checksum(dictionary_path)
    path = notes_path(dictionary_path)
    if not path.is_file():
        return FeatureNotes(checksum)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("format") != FORMAT:
            raise ValueError(f"format {data.get('format')!r}, expected {FORMAT!r}")
        names = {int(k): str(v) for k, v in data.get("names", {}).items()}
        notes = {int(k): str(v) for k, v in data.get("notes", {}).items()}
        theirs = str(data["checksum"])
    except (OSError, ValueError, KeyError, AttributeError, TypeError) as exc:
        raise DictionaryError(f"cannot read the feature names in {path}: {exc}") from exc
    if theirs != checksum:
        raise DictionaryError(
            f"the feature names in {path} were written for another dictionary (checksum "
            f"{theirs[:12]}…), not {dictionary_path} (checksum {checksum[:12]}…); move or "
            "delete that file to start new names"
        )
    return FeatureNotes(checksum, names, notes)


def save_notes(notes: FeatureNotes, dictionary_path: str | Path) -> Path:
    """Write ``notes`` beside ``dictionary_path`` (atomically); refuses another dictionary's."""
    checksum = dictionary_checksum(dictionary_path)
    if checksum != notes.checksum:
        raise DictionaryError(
            f"these feature names belong to the dictionary with checksum {notes.checksum[:12]}…, "
            f"not {dictionary_path} (checksum {checksum[:12]}…)"
        )
    return atomic_write_text(notes_path(dictionary_path), notes.to_json() + "\n")


def notes_for(dictionary) -> FeatureNotes | None:
    """The saved names of a loaded dictionary (None for one that was never written to a file)."""
    path = getattr(dictionary, "path", None)
    return None if path is None else load_notes(path)


__all__ = ["FeatureNotes", "dictionary_checksum", "load_notes", "notes_path", "save_notes"]
