"""Plates on disk: open a folder of Cell Painting images as sites keyed by (plate, well, site).

``open_plate`` reads no pixels; ``Site.read()`` returns a (C, H, W) array when it is needed.
"""

from .labels import SEGMENTATION_FOLDER, default_label_folder, label_paths
from .layouts import LAYOUTS, PRESETS, RXRX_CHANNELS, open_plate
from .model import Plate, PlateWarning, Site, SiteKey, normalize_well
from .pattern import FilenamePattern

__all__ = [
    "LAYOUTS",
    "PRESETS",
    "RXRX_CHANNELS",
    "SEGMENTATION_FOLDER",
    "FilenamePattern",
    "Plate",
    "PlateWarning",
    "Site",
    "SiteKey",
    "default_label_folder",
    "label_paths",
    "normalize_well",
    "open_plate",
]
