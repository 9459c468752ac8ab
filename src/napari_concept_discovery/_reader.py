"""napari reader: a plate folder opens as one site, one coloured layer per channel.

Qt-free: it returns layer-data tuples. The layers' ``metadata`` carries the plate path, site key,
channel names, layout and the layer's role (``channel`` with its ``channel`` name, or ``cells``)
so that widgets find the plate and show other sites in the same layers (:func:`read_site`).
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import PlateError
from .plate import Plate, PlateWarning, SiteKey, open_plate
from .plate.layouts import CHECK_LIMIT, looks_like_plate, walk_files
from .views.channels import channel_colormaps, contrast_limits, initially_visible


@dataclass(frozen=True)
class SiteData:
    """One site's pixels and display range, read off the GUI thread and shown on it.

    Holds what changes from site to site; colours and visibility are chosen once, when the
    layers are made (:func:`layer_tuples`), and are the user's from then on.
    """

    plate_path: str
    layout: str
    key: SiteKey
    channel_names: tuple[str, ...]
    image: np.ndarray  # (C, H, W) as stored
    contrast_limits: tuple[tuple[float, float], ...]
    labels: np.ndarray | None  # (H, W) int32 cell labels, None when the plate has none

    def metadata(self, role: str, channel: str | None = None) -> dict:
        """A layer's metadata: where it came from, so widgets can go back to the plate."""
        meta = {
            "plate_path": self.plate_path,
            "site_key": tuple(self.key),
            "channel_names": list(self.channel_names),
            "layout": self.layout,
            "role": role,
        }
        if channel is not None:
            meta["channel"] = channel
        return meta


def read_site(plate: Plate, key: SiteKey | Sequence | None = None) -> SiteData:
    """Read one site (the first by default) with its labels and display range; no Qt."""
    site = plate[key] if key is not None else next(iter(plate))
    image = site.read()
    labels = site.read_labels()
    if labels is not None and labels.shape != image.shape[1:]:
        raise PlateError(
            f"cell labels {site.labels_path} have shape {labels.shape}, "
            f"the images of {site.key} {image.shape[1:]}"
        )
    return SiteData(
        plate_path=str(plate.root),
        layout=plate.layout,
        key=site.key,
        channel_names=tuple(site.channel_names),
        image=image,
        contrast_limits=tuple(contrast_limits(plane) for plane in image),
        labels=None if labels is None else labels.astype(np.int32, copy=False),
    )


def layer_tuples(data: SiteData) -> list[tuple]:
    """Layer-data tuples for new layers: channels in Cell Painting colours, then cell labels."""
    names = list(data.channel_names)
    colours = channel_colormaps(names, data.image)
    image_kwargs = {
        "channel_axis": 0,
        "name": names,
        "colormap": colours,
        "contrast_limits": list(data.contrast_limits),
        "blending": "additive",
        "visible": initially_visible(names, colours),
        # one dict per channel: a shared dict would make every channel follow one's changes
        "metadata": [data.metadata("channel", name) for name in names],
    }
    layers: list[tuple] = [(data.image, image_kwargs, "image")]
    if data.labels is not None:
        # Hidden at first: filled labels over the stains hide what a biologist looks at.
        labels_kwargs = {
            "name": "cells",
            "opacity": 0.5,
            "visible": False,
            "metadata": data.metadata("cells"),
        }
        layers.append((data.labels, labels_kwargs, "labels"))
    return layers


def site_layer_data(plate: Plate, key: SiteKey | Sequence | None = None) -> list[tuple]:
    """Layer-data tuples for one site (the first by default): channels, then cell labels."""
    data = read_site(plate, key)
    remember_plate(plate)  # here, on the thread that opens layers, not in read_site's workers
    return layer_tuples(data)


# Plates the reader or the sample data opened, by folder, so that a widget finding their
# layers gets the same Plate (and its metadata) without scanning the folder again.
_OPENED: OrderedDict[str, Plate] = OrderedDict()
_KEEP_OPENED = 8


def remember_plate(plate: Plate) -> None:
    key = str(plate.root)
    _OPENED[key] = plate
    _OPENED.move_to_end(key)
    while len(_OPENED) > _KEEP_OPENED:
        _OPENED.popitem(last=False)


def opened_plate(path: str | Path) -> Plate:
    """The plate a layer came from: the one the reader opened, else the folder opened again."""
    plate = _OPENED.get(str(path))
    if plate is None:
        plate = open_plate(path)
        remember_plate(plate)
    return plate


#: Directory entries the reader looks at before it answers: napari asks every reader about
#: every folder dropped on it (``/usr`` included), so the answer must come at once.
PROBE_ENTRIES = 10_000


def napari_get_reader(path: str | Sequence[str]):
    """A reader when ``path`` is one folder that opens as a plate; None for anything else.

    The answer looks at no more than ``PROBE_ENTRIES`` folder entries and reads no pixels: a
    folder that small is opened (file headers are checked when the reader is used); a bigger
    one is offered when its first files are named as a plate layout names them, and opened
    when the reader is used.
    """
    if isinstance(path, (list, tuple)):
        if len(path) != 1:
            return None
        path = path[0]
    root = Path(path)
    if not root.is_dir():
        return None
    probe = walk_files(root, limit=PROBE_ENTRIES)
    plate = None
    caught: list = []
    if probe.complete:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", PlateWarning)
            try:
                plate = open_plate(root, check=False)
            except PlateError:
                return None
    elif not looks_like_plate(root, probe.files):
        return None
    # napari asks every reader whether it can read a folder; warn only once this one is used.
    messages = [str(w.message) for w in caught if issubclass(w.category, PlateWarning)]

    def read_plate(_path) -> list[tuple]:
        nonlocal plate
        with warnings.catch_warnings(record=True) as later:
            warnings.simplefilter("always", PlateWarning)
            if plate is None:
                plate = open_plate(root)
            elif len(probe.files) <= CHECK_LIMIT:
                plate.check()
        more = [str(w.message) for w in later if issubclass(w.category, PlateWarning)]
        for message in messages + more:
            warnings.warn(f"{root.name}: {message}", PlateWarning, stacklevel=2)
        return site_layer_data(plate)

    return read_plate
