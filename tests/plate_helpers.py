"""Writers of tiny plate folders for the plate and reader tests (each image a few KB)."""

from __future__ import annotations

from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pandas as pd
import tifffile


def pixels(seed: int, shape=(24, 32), dtype=np.uint8) -> np.ndarray:
    """Distinct random pixels per (site, channel), so a mixed-up file shows in a comparison."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, np.iinfo(dtype).max, size=shape, dtype=dtype)


def write_rxrx(root: Path, wells=("B02", "C03"), sites=(1, 2), channels=3, plates=(1,)) -> dict:
    """RxRx folder + metadata.csv; returns {(plate_key, well, site): (C, H, W) array}."""
    truth, rows = {}, []
    for p in plates:
        folder = root / "images" / "EXP-01" / f"Plate{p}"
        folder.mkdir(parents=True, exist_ok=True)
        for w, well in enumerate(wells):
            for s in sites:
                planes = [pixels(1000 * p + 100 * w + 10 * s + c) for c in range(channels)]
                for c, plane in enumerate(planes, start=1):
                    iio.imwrite(folder / f"{well}_s{s}_w{c}.png", plane)
                truth[(f"EXP-01_{p}", well, s)] = np.stack(planes)
                rows.append(
                    {
                        "site_id": f"EXP-01_{p}_{well}_{s}",
                        "well_id": f"EXP-01_{p}_{well}",
                        "cell_type": "HUVEC",
                        "experiment": "EXP-01",
                        "plate": p,
                        "well": well,
                        "site": s,
                        "well_type": "negative_control" if w == 0 else "treatment",
                        "sirna": f"s{w}",
                    }
                )
    pd.DataFrame(rows).to_csv(root / "metadata.csv", index=False)
    return truth


def write_phenix(root: Path, wells=((1, 2), (3, 11)), fields=(1, 2), channels=(1, 2, 5)) -> dict:
    """Phenix/JUMP names, 16-bit TIFFs; returns {("<folder>", well, field): (C, H, W)}."""
    root.mkdir(parents=True, exist_ok=True)
    truth = {}
    for r, c in wells:
        for f in fields:
            planes = [pixels(100 * r + 10 * c + f + ch, dtype=np.uint16) for ch in channels]
            for ch, plane in zip(channels, planes, strict=True):
                name = f"r{r:02d}c{c:02d}f{f:02d}p01-ch{ch}sk1fk1fl1.tiff"
                tifffile.imwrite(root / name, plane, compression="zlib")
            well = f"{'ABCDEFGHIJKLMNOP'[r - 1]}{c:02d}"
            truth[(root.name, well, f)] = np.stack(planes)
    return truth
