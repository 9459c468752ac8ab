"""Sites and plates: what every later step (segment, embed, concepts) iterates over.

A :class:`Plate` only holds paths and metadata; pixels are read when a site is asked for, so a
screen of many thousand sites opens in seconds and never sits in memory at once.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd

from ..errors import DataWarning, PlateError
from . import io


class PlateWarning(DataWarning):
    """A problem in a plate folder that was worked around (a site skipped, a row unmatched)."""


_WELL_RE = re.compile(r"^\s*([A-Za-z]{1,2})\s*0*(\d{1,3})\s*$")


def row_letters(row: int) -> str:
    """1 -> "A", 26 -> "Z", 27 -> "AA": Phenix numbers rows, plate maps name them."""
    if row < 1:
        raise PlateError(f"plate row {row} is out of range (rows start at 1)")
    letters = ""
    while row > 0:
        row, rem = divmod(row - 1, 26)
        letters = chr(ord("A") + rem) + letters
    return letters


def normalize_well(well: object) -> str:
    """``"B7"``, ``"b07"`` and ``"B007"`` all become ``"B07"`` so keys from files and tables agree."""
    m = _WELL_RE.match(str(well))
    if m is None:
        raise PlateError(
            f"{well!r} is not a well name (expected a row letter and a column, e.g. B07)"
        )
    return f"{m.group(1).upper()}{int(m.group(2)):02d}"


def well_position(well: object) -> tuple[int, int]:
    """0-based (row, column) of a well name: ``"B03"`` -> (1, 2), ``"AA01"`` -> (26, 0)."""
    name = normalize_well(well)
    letters = name.rstrip("0123456789")
    row = 0
    for ch in letters:
        row = row * 26 + (ord(ch) - ord("A") + 1)
    return row - 1, int(name[len(letters) :]) - 1


def natural_key(text: str) -> list:
    """Sort key that puts ``"2"`` before ``"10"`` and ``"B2"`` before ``"B10"``."""
    return [(0, int(t), "") if t.isdigit() else (1, 0, t.lower()) for t in re.split(r"(\d+)", text)]


def well_from_row_col(row: object, col: object) -> str:
    """A well from a row (letter or 1-based number) and a 1-based column, e.g. (3, 3) -> "C03"."""
    row_s = str(row).strip()
    letters = row_letters(int(row_s)) if row_s.isdigit() else row_s.upper()
    return normalize_well(f"{letters}{int(col)}")


class SiteKey(NamedTuple):
    """Where a site is: plate key, well (letter + two digits) and 1-based site (field) number."""

    plate: str
    well: str
    site: int

    @classmethod
    def of(cls, key: SiteKey | Sequence) -> SiteKey:
        """Normalise a user-given ``(plate, well, site)`` so ``("P", "B2", "1")`` finds ``B02``."""
        if isinstance(key, SiteKey):
            return key
        if len(key) != 3:
            raise PlateError(f"a site key is (plate, well, site), got {key!r}")
        plate, well, site = key
        return cls(str(plate), normalize_well(well), int(site))

    def __str__(self) -> str:
        return f"{self.plate} {self.well} site {self.site}"


@dataclass
class Site:
    """One field of view: one file per channel (or one multi-channel file) plus its metadata row."""

    key: SiteKey
    channel_names: tuple[str, ...]
    paths: tuple[Path, ...]
    metadata: dict = field(default_factory=dict)
    labels_path: Path | None = None
    nuclei_path: Path | None = None
    #: The label files are the user's (CellProfiler, Cellpose, a pattern): binary masks are
    #: split by the nuclei and nucleus ids matched to the cells (:mod:`.label_files`).
    user_labels: bool = False

    def read(self) -> np.ndarray:
        """The (C, H, W) image as stored (uint8/uint16); PlateError names the file at fault."""
        if len(self.paths) == 1 and len(self.channel_names) != 1:
            image = io.read_multichannel(self.paths[0])
            if image.shape[0] != len(self.channel_names):
                raise PlateError(
                    f"{self.paths[0]} has {image.shape[0]} channels, the plate has "
                    f"{len(self.channel_names)} ({', '.join(self.channel_names)}) at {self.key}"
                )
            return image
        planes = [io.read_plane(p) for p in self.paths]
        shapes = {p.shape for p in planes}
        if len(shapes) > 1:
            detail = ", ".join(
                f"{name}={path.name} {img.shape}"
                for name, path, img in zip(self.channel_names, self.paths, planes, strict=True)
            )
            raise PlateError(f"channels of {self.key} have unequal shapes: {detail}")
        return np.stack(planes)

    def read_labels(self) -> np.ndarray | None:
        """Cell labels (int32, 0 = background) when the plate carries them, else None."""
        if self.labels_path is None:
            return None
        if self.user_labels:
            return self._user_labels()[0]
        return io.read_labels(self.labels_path)

    def _user_labels(self) -> tuple[np.ndarray, np.ndarray | None]:
        """The user's (cells, nuclei); a binary mask without a nuclei file is split by our own
        nuclei of the channel named like a nuclear stain (:mod:`.label_images`)."""
        from .label_images import own_nuclei, read_user_labels

        split = own_nuclei(self.read, self.channel_names) if self.nuclei_path is None else None
        return read_user_labels(self.labels_path, self.nuclei_path, nuclei_from=split)

    def read_nuclei(self) -> np.ndarray | None:
        """Nucleus labels (same ids as the cells) when the plate carries them, else None."""
        if self.nuclei_path is None:
            return None
        if self.user_labels and self.labels_path is not None:
            return self._user_labels()[1]
        return io.read_labels(self.nuclei_path)

    def check(self) -> None:
        """Decode everything the site is read from (pixels, cell and nucleus label files), as
        embedding will; PlateError names the first file that cannot be read."""
        self.read()
        self.read_labels()
        self.read_nuclei()

    def header(self) -> tuple[tuple[int, ...], np.dtype]:
        """(C, H, W) and dtype from file headers only; PlateError on unreadable or unequal files."""
        if len(self.paths) == 1 and len(self.channel_names) != 1:
            shape, dtype, _ = io.multichannel_header(self.paths[0])
            if shape[0] != len(self.channel_names):
                raise PlateError(
                    f"{self.paths[0]} has {shape[0]} channels, the plate has "
                    f"{len(self.channel_names)} at {self.key}"
                )
            return shape, dtype
        heads = [io.plane_header(p) for p in self.paths]
        shapes = {h[0] for h in heads}
        if len(shapes) > 1:
            detail = ", ".join(
                f"{path.name} {shape}" for path, (shape, _) in zip(self.paths, heads, strict=True)
            )
            raise PlateError(f"channels of {self.key} have unequal shapes: {detail}")
        dtype = np.result_type(*[h[1] for h in heads])
        return (len(self.paths), *heads[0][0]), dtype


_KEY_COLUMNS = ("plate", "well", "site")


class Plate:
    """All sites of one or more plates in a folder, keyed by :class:`SiteKey` and sorted."""

    def __init__(
        self,
        root: Path,
        layout: str,
        channel_names: Sequence[str],
        sites: dict[SiteKey, Site],
        metadata: pd.DataFrame | None = None,
        warnings: list[str] | None = None,
        source: dict | None = None,
        label_folder: Path | None = None,
    ):
        self.root = Path(root)
        #: ``open_plate`` keyword arguments that open this plate again (JSON-safe).
        self.source = dict(source) if source else {"path": str(self.root), "layout": layout}
        #: The label folder whose labels the sites carry (see ``plate.labels``), else None.
        self.label_folder = Path(label_folder) if label_folder is not None else None
        self.layout = layout
        self.channel_names = tuple(channel_names)
        self.sites = dict(sorted(sites.items()))
        self.metadata = metadata
        self.warnings = list(warnings or [])
        self._header: tuple[tuple[int, ...], np.dtype] | None = None

    def __iter__(self) -> Iterator[Site]:
        return iter(self.sites.values())

    def __len__(self) -> int:
        return len(self.sites)

    def __getitem__(self, key: SiteKey | Sequence) -> Site:
        try:
            return self.sites[SiteKey.of(key)]
        except KeyError:
            raise KeyError(f"no site {tuple(key)} in plate folder {self.root}") from None

    def __contains__(self, key: object) -> bool:
        try:
            return SiteKey.of(key) in self.sites  # type: ignore[arg-type]
        except (PlateError, TypeError, ValueError):
            return False

    def __repr__(self) -> str:
        return (
            f"Plate({str(self.root)!r}, layout={self.layout!r}, plates={len(self.plates)}, "
            f"sites={len(self)}, channels={list(self.channel_names)})"
        )

    @property
    def keys(self) -> list[SiteKey]:
        return list(self.sites)

    @property
    def plates(self) -> list[str]:
        return sorted({k.plate for k in self.sites})

    @property
    def wells(self) -> list[tuple[str, str]]:
        """(plate, well) pairs that have at least one site."""
        return sorted({(k.plate, k.well) for k in self.sites})

    def _first_header(self) -> tuple[tuple[int, ...], np.dtype]:
        if self._header is None:
            self._header = next(iter(self)).header()
        return self._header

    @property
    def image_shape(self) -> tuple[int, ...]:
        """(C, H, W) of the first site, from its file headers."""
        return self._first_header()[0]

    @property
    def dtype(self) -> np.dtype:
        return self._first_header()[1]

    def warn(self, message: str) -> None:
        """Record a problem on the plate and raise it as a Python warning."""
        self.warnings.append(message)
        warnings.warn(message, PlateWarning, stacklevel=3)

    def check(self) -> list[str]:
        """Read every file header; drop sites that cannot be read whole and warn about them.

        ``open_plate`` does this itself for folders of moderate size; call it on a big screen
        before a long run, so that a corrupt file is found now and not hours later.
        """
        bad: list[str] = []
        shapes: dict[tuple[int, ...], list[SiteKey]] = {}
        for key, site in list(self.sites.items()):
            try:
                shape, _ = site.header()
            except PlateError as exc:
                bad.append(str(exc))
                del self.sites[key]
                continue
            shapes.setdefault(shape, []).append(key)
        new: list[str] = []
        if bad:
            new.append(f"skipped {len(bad)} site(s) that cannot be read: " + _listing(bad, 5, "; "))
        if len(shapes) > 1:
            parts = [
                f"{shape} at {len(keys)} site(s), e.g. {keys[0]}" for shape, keys in shapes.items()
            ]
            new.append("sites differ in image shape: " + "; ".join(parts))
        for message in new:
            self.warn(message)
        self._header = None
        if not self.sites:
            raise PlateError(f"no readable site left in {self.root}: " + " ".join(new))
        return new

    def site_table(self) -> pd.DataFrame:
        """One row per site: plate, well, site, then every metadata column.

        Metadata columns named plate/well/site were the join keys; the key columns replace them
        (RxRx's plate number lives on in the plate key, e.g. ``SYNTH_1``).
        """
        rows = []
        for key, site in self.sites.items():
            row = {"plate": key.plate, "well": key.well, "site": key.site}
            for col, value in site.metadata.items():
                if col.lower() not in _KEY_COLUMNS:
                    row[col] = value
            rows.append(row)
        return pd.DataFrame(rows, columns=_table_columns(rows))


def _table_columns(rows: list[dict]) -> list[str]:
    cols = list(_KEY_COLUMNS)
    for row in rows:
        for col in row:
            if col not in cols:
                cols.append(col)
    return cols


def _listing(items: Sequence[object], limit: int = 5, sep: str = ", ") -> str:
    """The first few items and how many more, so that messages stay readable on big plates."""
    items = [str(i) for i in items]
    head = sep.join(items[:limit])
    return head if len(items) <= limit else f"{head}{sep}... and {len(items) - limit} more"
