"""Plate layouts on disk and ``open_plate``: from a folder of files to sites keyed by
(plate, well, site).

RxRx and Phenix/JUMP are presets of one filename-pattern mechanism; per-site multi-channel
TIFFs are either named by a pattern without a channel field or listed in a CSV (``tiff-csv``).
OME-Zarr HCS plates (``ome-zarr``) are read from their NGFF metadata (:mod:`.omezarr`).
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NamedTuple

import pandas as pd

from ..errors import PlateError
from ..settings import Settings, option
from . import io
from .label_files import named_after_others
from .labels import (
    attach_label_folder,
    found_label_folder,
    label_spec,
    marked_label_folder,
    split_label_spec,
)
from .metadata import find_column, join_metadata, load_table, row_plates, row_wells
from .model import Plate, Site, SiteKey, _listing, normalize_well, well_from_row_col
from .pattern import FilenamePattern

RXRX_CHANNELS = ("DNA", "ER", "Actin", "RNA", "Mito", "Membrane")

PRESETS: dict[str, str] = {
    "rxrx": "{experiment}/Plate{plate}/{well}_s{site}_w{channel_index}.png",
    "phenix": "r{row}c{col}f{field}p{plane}-ch{channel_index}*.tif*",
}
LAYOUTS = ("auto", "rxrx", "phenix", "jump", "tiff-csv", "pattern", "ome-zarr")
_SIDECARS = (".csv", ".tsv", ".parquet", ".xml", ".json")
_FILE_COLUMNS = ("file", "filename", "file_name", "path", "image", "image_path", "filepath")
# Checking every header costs ~1 ms a file: done at open time up to this many files.
CHECK_LIMIT = 5000
# How deep under a folder ``looks_like_plate`` looks for images (RxRx: images/EXP/Plate1/file).
PROBE_DEPTH = 4


@dataclass
class PlateOptions(Settings):
    """How a plate folder is read: the options every command that opens a plate takes."""

    layout: str = option("auto", "folder layout; auto detects it", choices=LAYOUTS)
    pattern: str | None = option(
        None,
        "filename pattern with named fields, e.g. "
        "'{well}_01_{channel_index}_{site}_{channel}_001.tif'",
    )
    metadata: str | None = option(
        None, "metadata table (csv/tsv/parquet) joined by plate/well/site"
    )
    channel_names: str | None = option(None, "comma-separated channel names in channel order")

    def open(self, path: str | os.PathLike, **kwargs) -> Plate:
        """:func:`open_plate` with these options (``kwargs``: ``check``, ``labels``)."""
        names = self.channel_names.split(",") if self.channel_names else None
        return open_plate(
            path,
            layout=self.layout,
            pattern=self.pattern,
            metadata=self.metadata,
            channel_names=names,
            **kwargs,
        )


def open_plate(
    path: str | os.PathLike,
    layout: str = "auto",
    pattern: str | None = None,
    metadata: str | os.PathLike | pd.DataFrame | None = None,
    channel_names: Sequence[str] | Mapping[int | str, str] | None = None,
    check: bool | None = None,
    labels: str | os.PathLike | None = None,
) -> Plate:
    """Open a plate folder without reading pixels.

    layout: "auto", "rxrx", "phenix" (alias "jump"), "tiff-csv", "pattern" (with ``pattern``)
        or "ome-zarr" (an NGFF plate, or a folder of them).
    metadata: a table path or DataFrame joined by plate/well(/site); RxRx's ``metadata.csv``
        is found by itself. channel_names: names in channel order, or {index: name}.
    check: read every file header now and skip sites that cannot be read whole; by default
        only for folders of up to ``CHECK_LIMIT`` files (call ``Plate.check()`` on bigger ones).
    labels: a label folder (``<plate>/<well>_s<site>_cells.tif``, as ``segment`` writes it);
        by default ``<path>/segmentation`` when a finished segmentation is there (see
        :mod:`.labels`). Its files are never read as images.

    ``Plate.source`` keeps these options, so ``open_plate(**plate.source)`` opens it again.
    """
    root = Path(path).expanduser()
    if not root.exists():
        raise PlateError(f"plate folder not found: {root}")
    if not root.is_dir():
        raise PlateError(f"{root} is a file; open_plate takes the folder that holds the images")
    if layout not in LAYOUTS:
        raise PlateError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    if layout == "jump":
        layout = "phenix"
    if pattern is not None and layout not in ("auto", "pattern"):
        raise PlateError(f"pattern= is for layout='pattern', not {layout!r}")
    if layout == "pattern" and pattern is None:
        raise PlateError(
            "layout='pattern' needs pattern=, e.g. '{well}_s{site}_w{channel_index}.tif'"
        )

    if layout == "ome-zarr" or (layout == "auto" and pattern is None and _ome_zarr_plates(root)):
        return _open_ome_zarr(root, metadata, channel_names, labels, check)

    label_folder, label_pattern = _label_folder(root, labels)
    skip = {f for f in (label_folder, marked_label_folder(root)) if f is not None}
    notes: list[str] = []
    if label_folder is not None and root.resolve().is_relative_to(label_folder):
        # labels beside the images (Cellpose writes them there): the walk keeps the folder and
        # the label files, named after the images, are kept out of the image listing
        skip.discard(label_folder)
        files = _walk(root, skip=skip, notes=notes)
        files = [f for f in files if f not in named_after_others(files)]
    else:
        files = _walk(root, skip=skip, notes=notes)
    table, table_name = _metadata_source(root, metadata)
    if layout == "auto":
        layout = "pattern" if pattern is not None else _detect(root, files, table)

    join = table
    if layout == "tiff-csv":
        listing, listing_name = table, table_name
        if listing is None or _file_column(listing) is None:
            listing, listing_name = _find_file_csv(root, files)
        else:
            join = None  # the file list is the metadata; its rows are attached already
        groups, used, notes_csv = _groups_from_csv(root, listing, listing_name)
        notes += notes_csv
        pat = None
    else:
        pat = FilenamePattern(pattern if layout == "pattern" else PRESETS[layout])
        groups, used = _groups_from_pattern(root, files, pat, notes)

    if not groups:
        raise PlateError(f"no images found in {root} for layout {layout!r}" + _seen(root, files))

    if pat is not None and pat.per_channel:
        names, sites = _per_channel_sites(groups, layout, channel_names, notes)
    else:
        names, sites = _multichannel_sites(groups, channel_names, layout)

    if layout == "rxrx":
        used |= _attach_labels(sites)
    if label_folder is not None:
        found, label_notes = attach_label_folder(
            sites, label_folder, explicit=labels is not None, pattern=label_pattern
        )
        used |= found
        notes += label_notes
    _report_stray_files(root, files, used, pat, notes)

    return _finish(
        root,
        layout,
        pattern,
        names,
        sites,
        (metadata, table, join, table_name),
        channel_names,
        (labels, label_folder, label_pattern),
        notes,
        check or (check is None and len(files) <= CHECK_LIMIT),
    )


def _finish(root, layout, pattern, names, sites, tables, channel_names, labels, notes, check):
    """The plate every layout ends in: its source (the options that open it again), its notes
    as warnings, the metadata ``join`` joined onto its sites, checked when ``check``.

    ``tables`` is (metadata as given, the table read, the table to join, its name); ``labels``
    is (labels as given, the label folder, its pattern).
    """
    metadata, table, join, table_name = tables
    given, label_folder, label_pattern = labels
    table_path = None  # a table given as a DataFrame cannot be recorded; the layout's is re-found
    if metadata is not None and not isinstance(metadata, pd.DataFrame):
        table_path = str(Path(metadata).expanduser().resolve())
    source = {
        "path": str(root.resolve()),
        "layout": layout,
        "pattern": pattern,
        "metadata": table_path,
        "channel_names": _plain_names(channel_names),
        "labels": label_spec(label_folder, label_pattern) if given is not None else None,
    }
    plate = Plate(
        root, layout, names, sites, metadata=table, source=source, label_folder=label_folder
    )
    for message in notes:
        plate.warn(message)
    if join is not None:
        for message in join_metadata(plate.sites, join, table_name)[0]:
            plate.warn(message)
    if check:
        plate.check()
    return plate


# --- OME-Zarr plates ------------------------------------------------------------------------


def _ome_zarr_plates(root: Path) -> list[Path]:
    from .omezarr import plate_roots

    return plate_roots(root)


def _open_ome_zarr(root: Path, metadata, channel_names, labels, check) -> Plate:
    """An OME-Zarr plate (or a folder of them) as a Plate; see :mod:`.omezarr`."""
    from .omezarr import find_fields

    names, fields, notes = find_fields(root)
    sites = {}
    for f in fields:
        key = SiteKey(f.plate, normalize_well(f.well), f.site)
        sites[key] = Site(key, tuple(names), (f.path,), labels_path=f.labels, nuclei_path=f.nuclei)
    if channel_names is not None:
        given = _plain_names(channel_names)
        if isinstance(given, dict):
            names = [given.get(str(i), n) for i, n in enumerate(names)]
        else:
            if len(given) != len(names):
                raise PlateError(
                    f"{len(given)} channel names given for the {len(names)} channels of {root}"
                )
            names = list(given)
        for key, site in sites.items():
            sites[key] = replace(site, channel_names=tuple(names))
    label_folder, label_pattern = _label_folder(root, labels)
    if label_folder is not None:
        _, label_notes = attach_label_folder(
            sites, label_folder, explicit=labels is not None, pattern=label_pattern
        )
        notes += label_notes
    table, table_name = _metadata_source(root, metadata)
    return _finish(
        root,
        "ome-zarr",
        None,
        names,
        sites,
        (metadata, table, table, table_name),
        channel_names,
        (labels, label_folder, label_pattern),
        notes,
        check or (check is None and len(sites) <= CHECK_LIMIT),
    )


# --- finding files -------------------------------------------------------------------------


def _plain_names(channel_names) -> list[str] | dict[str, str] | None:
    """Channel names as JSON keeps them (a mapping's keys become strings)."""
    if channel_names is None:
        return None
    if isinstance(channel_names, Mapping):
        return {str(k): str(v) for k, v in channel_names.items()}
    return [str(n) for n in channel_names]


class Walk(NamedTuple):
    """Files found under a folder; ``complete`` is False when the walk stopped at its limit."""

    files: list[Path]
    complete: bool
    entries: int  # directory entries looked at (the work done)
    #: entries that are neither folders nor regular files (a FIFO, socket or device): reading
    #: one would block or never end, so they are left out and said
    special: tuple[Path, ...] = ()


def _real_id(path: str | os.PathLike) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def walk_files(root: Path, skip: set[Path] = frozenset(), limit: int | None = None) -> Walk:
    """Every non-hidden file under root, in sorted depth-first order, links followed.

    Each real folder is entered once (by device and inode), so symbolic links that loop, or
    that point at a folder seen already, cost one entry each instead of an exponential walk.
    Folders in ``skip`` (label folders) are left out, so that label files never pass for
    images. With ``limit``, the walk stops after that many directory entries and says so
    (``complete=False``): a probe that must answer at once on any folder.
    """
    skip_ids = {i for i in map(_real_id, skip) if i is not None}
    seen: set[tuple[int, int]] = set()
    files: list[Path] = []
    special: list[Path] = []
    entries = 0
    stack = [Path(root)]
    while stack:
        folder = stack.pop()
        ident = _real_id(folder)
        if ident is None or ident in seen or ident in skip_ids:
            continue
        seen.add(ident)
        try:
            with os.scandir(folder) as it:
                listed = list(it)
        except OSError:
            continue
        dirs, names = [], []
        for entry in listed:
            entries += 1
            if entry.name.startswith("."):
                continue
            try:
                is_dir = entry.is_dir()
                is_file = is_dir or entry.is_file() or entry.is_symlink()  # a dangling link
            except OSError:
                is_dir, is_file = False, True
            if is_file:
                (dirs if is_dir else names).append(entry.name)
            else:
                special.append(folder / entry.name)
        files += [folder / n for n in sorted(names)]
        if limit is not None and entries >= limit:
            return Walk(files, False, entries, tuple(sorted(special)))
        stack += [folder / d for d in sorted(dirs, reverse=True)]
    return Walk(files, True, entries, tuple(sorted(special)))


def _label_folder(root: Path, labels) -> tuple[Path | None, str | None]:
    """(folder, pattern) of the ``labels`` argument (:func:`.labels.split_label_spec`), or the
    plate's own finished segmentation folder when none is given."""
    if labels is None:
        return found_label_folder(root), None
    folder, pattern = split_label_spec(labels)
    folder = folder.resolve()
    if not folder.is_dir():
        raise PlateError(f"label folder not found: {folder}")
    return folder, pattern


def _walk(root: Path, skip: set[Path] = frozenset(), notes: list[str] | None = None) -> list[Path]:
    """Every non-hidden file under root (see :func:`walk_files`); entries that are not regular
    files are said in ``notes``."""
    walk = walk_files(root, skip)
    if walk.special and notes is not None:
        shown = [
            str(p.relative_to(root)) if p.is_relative_to(root) else str(p) for p in walk.special
        ]
        notes.append(
            f"skipped {len(shown)} entr{'y' if len(shown) == 1 else 'ies'} of {root} that "
            f"{'is' if len(shown) == 1 else 'are'} not a regular file (a FIFO, socket or "
            "device would block the read): " + _listing(shown)
        )
    return walk.files


def looks_like_plate(root: Path, files: list[Path]) -> bool:
    """Whether some of ``files`` (a sample of a folder) are named as a preset layout names its
    images, at most ``PROBE_DEPTH`` folders down (a plate somewhere deep inside a disk does not
    make the disk a plate), or a metadata table sits at the top: enough to offer to open it."""
    root = Path(root)
    patterns = [FilenamePattern(text) for text in PRESETS.values()]
    for path in files:
        if path.parent == root and path.suffix.lower() in (".csv", ".tsv"):
            return True
        if io.is_image_file(path):
            parts = _rel_parts(root, path)
            if len(parts) <= PROBE_DEPTH and any(p.match(parts) is not None for p in patterns):
                return True
    return False


def _rel_parts(root: Path, path: Path) -> tuple[str, ...]:
    return path.relative_to(root).parts


def _seen(root: Path, files: list[Path]) -> str:
    """What the folder holds, for messages that explain why nothing matched."""
    if not files:
        return "; the folder is empty"
    suffixes = Counter(p.suffix.lower() or "(no extension)" for p in files)
    counts = ", ".join(f"{n} {s}" for s, n in suffixes.most_common())
    examples = _listing(["/".join(_rel_parts(root, p)) for p in files], 5)
    return f"; it holds {len(files)} file(s) ({counts}), e.g. {examples}"


def _metadata_source(root: Path, metadata) -> tuple[pd.DataFrame | None, str]:
    if metadata is not None:
        return load_table(metadata)
    for candidate in (root / "metadata.csv", root.parent / "metadata.csv"):
        if candidate.is_file() and (candidate.parent == root or root.name.lower() == "images"):
            return load_table(candidate)
    return None, ""


def _file_column(table: pd.DataFrame) -> str | None:
    lower = {str(c).lower(): c for c in table.columns}
    return next((lower[c] for c in _FILE_COLUMNS if c in lower), None)


def _find_file_csv(root: Path, files: list[Path]) -> tuple[pd.DataFrame, str]:
    found = []
    for path in files:
        if path.suffix.lower() in (".csv", ".tsv"):
            table, name = load_table(path)
            if _file_column(table) is not None:
                found.append((table, name))
    if len(found) != 1:
        what = "no CSV" if not found else f"{len(found)} CSVs ({', '.join(n for _, n in found)})"
        raise PlateError(
            f"layout 'tiff-csv' needs one CSV with a file column ({'/'.join(_FILE_COLUMNS)}) "
            f"and a well column in {root}, found {what}; pass it as metadata="
        )
    return found[0]


# --- layout detection ----------------------------------------------------------------------


def _detect(root: Path, files: list[Path], table: pd.DataFrame | None) -> str:
    """The preset that names the most image files, else tiff-csv when a CSV lists the files."""
    images = [_rel_parts(root, p) for p in files if io.is_image_file(p)]
    counts = {}
    for name, text in PRESETS.items():
        pat = FilenamePattern(text)
        counts[name] = sum(pat.match(parts) is not None for parts in images)
    best = max(counts, key=counts.get)
    if counts[best] > 0:
        return best
    if table is not None and _file_column(table) is not None:
        return "tiff-csv"
    try:
        _find_file_csv(root, files)
        return "tiff-csv"
    except PlateError:
        pass
    tried = "; ".join(f"{name} ({PRESETS[name]}) matched {counts[name]}" for name in PRESETS)
    raise PlateError(
        f"could not tell the layout of {root}" + _seen(root, files) + f". Tried: {tried}; "
        f"tiff-csv: no CSV with a file column ({'/'.join(_FILE_COLUMNS)}). Pass layout= or a "
        "filename pattern, e.g. pattern='{well}_s{site}_w{channel_index}.tif'"
    )


# --- grouping files into sites ---------------------------------------------------------------

# groups: SiteKey -> channel id (int index, str name, or None for a multi-channel file)
#         -> list of (plane, path, channel name or None, metadata row)
Groups = dict[SiteKey, dict[object, list[tuple[int, Path, str | None, dict]]]]


def _plate_key(fields: dict[str, str], path: Path, root: Path) -> str:
    exp, plate = fields.get("experiment"), fields.get("plate")
    if exp and plate:
        return f"{exp}_{plate}"
    if exp or plate:
        return exp or plate
    folder = path.parent
    if folder.name.lower() == "images":  # plate/images/*.tif (Phenix exports, NF1)
        folder = folder.parent
    return folder.name


def _site_key(fields: dict[str, str], path: Path, root: Path) -> SiteKey:
    well = fields.get("well")
    well = normalize_well(well) if well else well_from_row_col(fields["row"], fields["col"])
    site = fields.get("site") or fields.get("field") or 1
    return SiteKey(_plate_key(fields, path, root), well, int(site))


def _groups_from_pattern(
    root: Path, files: list[Path], pat: FilenamePattern, notes: list[str]
) -> tuple[Groups, set[Path]]:
    groups: Groups = {}
    used: set[Path] = set()
    unparsed = []
    for path in files:
        fields = pat.match(_rel_parts(root, path))
        if fields is None:
            continue
        try:
            key = _site_key(fields, path, root)
        except PlateError as exc:
            unparsed.append(f"{path.name} ({exc})")
            continue
        used.add(path)
        if fields.get("channel_index") is not None:
            channel: object = int(fields["channel_index"])
        else:
            channel = fields.get("channel")
        plane = int(fields.get("plane") or 1)
        groups.setdefault(key, {}).setdefault(channel, []).append(
            (plane, path, fields.get("channel"), {})
        )
    if unparsed:
        notes.append(f"skipped {len(unparsed)} file(s) with no usable well: {_listing(unparsed)}")
    for key, channels in groups.items():
        for channel, entries in channels.items():
            _check_unique(key, channel, entries)
    return groups, used


def _check_unique(key: SiteKey, channel: object, entries: list) -> None:
    if len(entries) == 1:
        return
    files = ", ".join(str(e[1]) for e in entries)
    what = f"channel {channel} of {key}" if channel is not None else str(key)
    if len({e[0] for e in entries}) == len(entries):
        raise PlateError(
            f"{what} has {len(entries)} z-planes ({files}); z-stacks are not supported: "
            "keep one plane or project them first"
        )
    raise PlateError(f"duplicate files for {what}: {files}")


def _groups_from_csv(
    root: Path, table: pd.DataFrame, name: str
) -> tuple[Groups, set[Path], list[str]]:
    file_col = _file_column(table)
    base = Path(name).parent if name != "the metadata table" else root
    wells = row_wells(table, name)
    plate_col = find_column(table, "plate")
    plates = row_plates(table, set()) if plate_col is not None else [root.name] * len(table)
    site_col = find_column(table, "site")
    records = table.to_dict(orient="records")
    groups: Groups = {}
    used: set[Path] = set()
    missing = []
    for i, record in enumerate(records):
        path = Path(str(record[file_col]))
        path = path if path.is_absolute() else base / path
        if not path.is_file():
            missing.append(str(path))
            continue
        site = int(record[site_col]) if site_col is not None else 1
        key = SiteKey(plates[i], wells[i], site)
        used.add(path)
        groups.setdefault(key, {}).setdefault(None, []).append((1, path, None, record))
    for key, channels in groups.items():
        _check_unique(key, None, channels[None])
    notes = []
    if missing:
        notes.append(f"{len(missing)} file(s) listed in {name} do not exist: {_listing(missing)}")
    return groups, used, notes


def _channel_order(ids: set, channel_names) -> list:
    ints = sorted(i for i in ids if isinstance(i, int))
    strs = [i for i in ids if not isinstance(i, int)]
    if isinstance(channel_names, Sequence) and not isinstance(channel_names, str):
        if strs and set(strs) <= set(channel_names):
            strs = sorted(strs, key=list(channel_names).index)
        else:
            strs = sorted(strs)
    else:
        strs = sorted(strs)
    return ints + strs


def _resolve_names(order: list, observed: dict, layout: str, channel_names) -> list[str]:
    """Names for the channels: the user's, else those in the file names, else the preset's."""
    if channel_names is not None:
        if isinstance(channel_names, Mapping):
            lookup = {str(k): v for k, v in channel_names.items()}
            unknown = [str(c) for c in order if str(c) not in lookup]
            if unknown:
                raise PlateError(
                    f"channel_names has no name for channel(s) {', '.join(unknown)}; "
                    f"the files have channels {', '.join(map(str, order))}"
                )
            return [str(lookup[str(c)]) for c in order]
        names = [str(n) for n in channel_names]
        if len(names) != len(order):
            raise PlateError(
                f"channel_names has {len(names)} names but the files have {len(order)} channels "
                f"({', '.join(map(str, order))})"
            )
        return names
    out = []
    for c in order:
        if observed.get(c):
            out.append(sorted(observed[c])[0])
        elif isinstance(c, str):
            out.append(c)
        elif layout == "rxrx" and 1 <= c <= len(RXRX_CHANNELS):
            out.append(RXRX_CHANNELS[c - 1])
        else:
            out.append(f"w{c}" if layout == "rxrx" else f"ch{c}")
    if len(set(out)) != len(out):
        out = [f"{n}_{c}" for n, c in zip(out, order, strict=True)]
    return out


def _per_channel_sites(
    groups: Groups, layout: str, channel_names, notes: list[str]
) -> tuple[list[str], dict[SiteKey, Site]]:
    observed: dict[object, set[str]] = {}
    for channels in groups.values():
        for channel, entries in channels.items():
            if isinstance(channel, int) and entries[0][2]:
                observed.setdefault(channel, set()).add(entries[0][2])
    for channel, names in observed.items():
        if len(names) > 1:
            notes.append(f"channel {channel} has several names in the file names: {sorted(names)}")
    order = _channel_order({c for channels in groups.values() for c in channels}, channel_names)
    names = _resolve_names(order, observed, layout, channel_names)
    sites, incomplete = {}, []
    for key, channels in groups.items():
        missing = [n for c, n in zip(order, names, strict=True) if c not in channels]
        if missing:
            incomplete.append(f"{key} lacks {', '.join(missing)}")
            continue
        paths = tuple(channels[c][0][1] for c in order)
        sites[key] = Site(key, tuple(names), paths)
    if incomplete:
        notes.append(
            f"skipped {len(incomplete)} site(s) missing a channel: {_listing(incomplete, sep='; ')}"
        )
    if not sites:
        raise PlateError("no site has every channel: " + _listing(incomplete, sep="; "))
    return names, sites


def _multichannel_sites(
    groups: Groups, channel_names, layout: str
) -> tuple[list[str], dict[SiteKey, Site]]:
    first = next(iter(groups.values()))[None][0][1]
    shape, _, ome_names = io.multichannel_header(first)
    order = list(range(1, shape[0] + 1))
    observed = {i: {n} for i, n in zip(order, ome_names, strict=False)}
    names = _resolve_names(order, observed, layout, channel_names)
    sites = {
        key: Site(key, tuple(names), (channels[None][0][1],), dict(channels[None][0][3]))
        for key, channels in groups.items()
    }
    return names, sites


# --- labels and stray files --------------------------------------------------------------


def _attach_labels(sites: dict[SiteKey, Site]) -> set[Path]:
    """Synthetic plates keep label images in ``labels/`` mirroring ``images/``."""
    used = set()
    for site in sites.values():
        image = site.paths[0]
        parts = image.parts
        if "images" not in parts:
            continue
        i = len(parts) - 1 - parts[::-1].index("images")
        folder = Path(*parts[:i], "labels", *parts[i + 1 : -1])
        stem = image.name.rsplit("_w", 1)[0]
        cells, nuclei = folder / f"{stem}_cells.tif", folder / f"{stem}_nuclei.tif"
        if cells.is_file():
            site.labels_path = cells
            used.add(cells)
        if nuclei.is_file():
            site.nuclei_path = nuclei
            used.add(nuclei)
    return used


def _report_stray_files(
    root: Path, files: list[Path], used: set[Path], pat: FilenamePattern | None, notes: list[str]
) -> None:
    stray_images, others = [], []
    for path in files:
        if path in used:
            continue
        if io.is_image_file(path):
            stray_images.append("/".join(_rel_parts(root, path)))
        elif path.suffix.lower() not in _SIDECARS:
            others.append("/".join(_rel_parts(root, path)))
    if stray_images:
        how = f"the pattern {pat.text!r}" if pat is not None else "the file list"
        notes.append(
            f"ignored {len(stray_images)} image file(s) that do not match {how}: "
            + _listing(stray_images)
        )
    if others:
        notes.append(f"ignored {len(others)} non-image file(s): " + _listing(others))
