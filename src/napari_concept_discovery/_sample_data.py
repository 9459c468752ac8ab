"""napari sample data: a small synthetic Cell Painting plate, generated once and cached.

The plate is written to a temporary folder beside the cache entry and renamed into place, so an
interrupted or concurrent first run never leaves a half-written plate that later runs would trust.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from ._files import cache_dir

SAMPLE_NAME = "sample-plate-v1"
# Small enough to generate in seconds, big enough for a plate heatmap and a few cell types.
SAMPLE_ARGS = {"n_plates": 1, "n_wells": 8, "n_sites": 1, "size": 512, "seed": 0}


def sample_plate_path() -> Path:
    """The cached sample plate folder, written on first use."""
    final = cache_dir() / SAMPLE_NAME
    if final.is_dir():
        return final
    from .synth import write_synthetic_plates

    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{SAMPLE_NAME}-", dir=final.parent))
    try:
        write_synthetic_plates(tmp, **SAMPLE_ARGS)
        try:
            tmp.rename(final)
        except OSError:
            if not final.is_dir():  # not a lost race with another process: a real failure
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def synthetic_plate_sample() -> list[tuple]:
    """The first site of the sample plate, through the same code path as the plate reader."""
    from ._reader import site_layer_data
    from .plate import open_plate

    return site_layer_data(open_plate(sample_plate_path()))
