"""Where a viewer session's files are: stores beside plates, a demo's outputs, one-site plates.

The embed widget and ``concept-discovery view`` decide the same paths here, Qt-free, so a store
made in the viewer is found again by ``view`` and by the next session (see
docs/architecture.md, "The viewer").
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConceptDiscoveryError, PlateError
from ..plate import Plate, SiteKey

STORE_SUFFIX = ".zarr"
DICTIONARY_SUFFIX = ".safetensors"
DEMO_PLATES = "plates"  # what `concept-discovery demo` writes: plates/, store.zarr, dictionary-*
DEMO_STORE = "store.zarr"


def _slug(text: str) -> str:
    """A file-name-safe short form of a model source or key (``hf-hub:a/b`` -> ``hf-hub-a-b``)."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", str(text)).strip("-.")
    return slug[:60] or "model"


def default_store_path(
    plate_root: str | Path,
    model: str,
    block: int | None = None,
    site: SiteKey | tuple | None = None,
) -> Path:
    """``<plate folder>-<model>[-b<block>][-<site>].zarr`` beside the plate folder.

    Beside, not inside: a plate folder may be read-only, and a store inside it would be found
    by layouts that scan for images. The model and block are in the name so that embedding
    with another model does not replace (rebuild) the store of the first; a one-site store
    gets the site in its name so it never replaces the whole plate's.
    """
    root = Path(plate_root).expanduser().resolve()
    parts = [root.name, _slug(Path(model).name if Path(model).exists() else model)]
    if block is not None:
        parts.append(f"b{int(block)}")
    if site is not None:
        key = SiteKey.of(site)
        parts.append(_slug(f"{key.plate}_{key.well}_s{key.site}"))
    return root.parent / ("-".join(parts) + STORE_SUFFIX)


def one_site_plate(plate: Plate, key: SiteKey | tuple) -> Plate:
    """The plate restricted to one site, reopening to the same folder and options.

    Embedding it writes a store of that site only; the store still records how to reopen the
    whole plate (``Plate.source``), so a later site can be embedded on demand with it.
    """
    site = plate[key]
    return Plate(
        plate.root,
        plate.layout,
        plate.channel_names,
        {site.key: site},
        metadata=plate.metadata,
        source=plate.source,
        label_folder=plate.label_folder,
    )


@dataclass(frozen=True)
class ViewInputs:
    """What ``concept-discovery view`` opens: a plate folder, and a store and dictionary if any."""

    plate: Path
    store: Path | None = None
    dictionary: Path | None = None


def _is_store(path: Path) -> bool:
    return path.is_dir() and (path / "zarr.json").is_file()


def _demo_dictionary(folder: Path) -> Path | None:
    """The demo's analysed dictionary (its first preparation, ``dictionary-controls``), else
    the first by name."""
    found = sorted(folder.glob(f"dictionary-*{DICTIONARY_SUFFIX}"))
    preferred = [p for p in found if p.stem == "dictionary-controls"]
    return (preferred or found or [None])[0]


def find_view_inputs(
    path: str | Path,
    store: str | Path | None = None,
    dictionary: str | Path | None = None,
) -> ViewInputs:
    """The plate, store and dictionary to open for ``path``.

    ``path`` is a plate folder, or the output folder of ``concept-discovery demo`` (plates/,
    store.zarr, dictionary-*.safetensors), where all three are found. For a plate folder
    without ``store``, a single store beside it named as :func:`default_store_path` names
    them is taken. Paths given explicitly win; a given path that does not exist is an error
    naming it.
    """
    root = Path(path).expanduser()
    if not root.is_dir():
        raise PlateError(f"plate folder not found: {root}")
    for given, what in ((store, "activation store"), (dictionary, "dictionary file")):
        if given is not None and not Path(given).expanduser().exists():
            raise ConceptDiscoveryError(f"{what} not found: {given}")
    store_path = Path(store).expanduser() if store is not None else None
    dict_path = Path(dictionary).expanduser() if dictionary is not None else None
    if (root / DEMO_PLATES).is_dir() and _is_store(root / DEMO_STORE):
        plate = root / DEMO_PLATES
        store_path = store_path or root / DEMO_STORE
        dict_path = dict_path or _demo_dictionary(root)
        return ViewInputs(plate, store_path, dict_path)
    if store_path is None:
        resolved = root.resolve()
        beside = [
            p for p in resolved.parent.glob(f"{resolved.name}-*{STORE_SUFFIX}") if _is_store(p)
        ]
        if len(beside) == 1:
            store_path = beside[0]
    return ViewInputs(root, store_path, dict_path)
