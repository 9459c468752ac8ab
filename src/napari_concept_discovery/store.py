"""Activation store: one zarr folder per plate, model and block, with a cache signature.

Layout (zarr v3 arrays, parquet tables)::

    STORE/zarr.json            root attributes: signature, its hash, model, block, complete flag
    STORE/patch/tokens         (N_patches, D) float16, row-major per site; patch/table.parquet
    STORE/cell/tokens          (N_cells, D) float32; cell/table.parquet
    STORE/crop/tokens          (N_tiles, D) float32; crop/table.parquet
    STORE/<unit>/channels      (N, G, D) per-channel tokens, only with ``channel_tokens=True``
    STORE/parts/<site>/        one finished site while a plate is being embedded (resume unit)

The signature is the full content hash (blake2b) of every image and label file of the plate,
the model id and weights hash, the block, the tiling/pooling settings, the channels and the
package version. Hashing reads each file once, which costs far less than the forward pass it
guards. A store is reused only when its signature matches and it is marked complete; otherwise it
is rebuilt, keeping only finished sites whose own file hash and settings still match (resume).
Every file lands atomically: site parts and units are written under a temporary name and renamed
into place; zarr's local store replaces metadata files atomically; the complete flag comes last.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import zarr

from . import __version__
from .errors import StoreError

UNITS = ("cell", "patch", "crop")
MARKER = "napari-concept-discovery activation store"
STORE_FORMAT = 1
TOKEN_SETTINGS = {
    "tiling": "reflect pad bottom/right to a multiple of the tile; patches of padding dropped",
    "patch": "mean over channel tokens",
    "crop": "mean of a tile's kept patch tokens",
    "cell": "mean of patch tokens weighted by the cell's pixel coverage of each patch",
}


def hash_files(paths, chunk: int = 1 << 22) -> str:
    """blake2b over the names' order, sizes and full contents of the given files."""
    h = hashlib.blake2b(digest_size=20)
    for p in paths:
        p = Path(p)
        try:
            size = p.stat().st_size
        except OSError as exc:
            raise StoreError(f"cannot read {p} to sign the store: {exc}") from exc
        h.update(f"{p.name}:{size};".encode())
        with open(p, "rb") as f:
            while block := f.read(chunk):
                h.update(block)
    return h.hexdigest()


def site_files(site, cells: str) -> list[Path]:
    """Files whose bytes decide a site's tokens: channel images, and labels when used."""
    files = [Path(p) for p in site.paths]
    if cells in ("auto", "file") and getattr(site, "labels_path", None):
        files.append(Path(site.labels_path))
    return files


def site_id(index: int, key) -> str:
    return f"{index:05d}_{key.plate}_{key.well}_s{key.site}".replace("/", "-")


def _hash_json(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _atomic_parquet(df: pd.DataFrame, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    df.to_parquet(tmp, index=False)
    os.replace(tmp, path)


def _write_array(group, name: str, data: np.ndarray, dtype, rows_per_chunk: int | None = None):
    data = np.asarray(data, dtype=dtype)
    if rows_per_chunk is None:
        row_bytes = max(1, int(np.prod(data.shape[1:], dtype=np.int64)) * data.dtype.itemsize)
        rows_per_chunk = max(1, min(len(data) or 1, (8 << 20) // row_bytes))
    chunks = (max(1, rows_per_chunk), *data.shape[1:])
    arr = group.create_array(
        name, shape=data.shape, dtype=data.dtype, chunks=chunks, overwrite=True
    )
    if data.size:
        arr[...] = data
    return arr


class StoreWriter:
    """Builds (or reuses, or resumes) the store of one plate, model and block.

    ``begin()`` returns the site keys still to embed; ``write_site`` saves one finished site;
    ``finish()`` gathers the sites into the unit arrays and tables and marks the store complete.
    """

    def __init__(
        self,
        path,
        plate,
        backend,
        block: int,
        *,
        channel_tokens: bool = False,
        cells: str = "auto",
        nuclear: str | int = "DNA",
    ):
        if path is None:
            raise StoreError("no output folder given for the activation store")
        self.path = Path(path)
        self.plate = plate
        self.backend = backend
        self.block = int(block)
        self.channel_tokens = bool(channel_tokens)
        self.cells = cells
        self.keys = list(plate.sites)
        self.index = {k: i for i, k in enumerate(self.keys)}
        self.config = {
            "model_id": backend.model_id,
            "weights_hash": backend.weights_hash,
            "block": self.block,
            "embed_dim": backend.embed_dim,
            "tile_size": backend.tile_size,
            "patch_size": backend.patch_size,
            "normalisation": backend.normalisation,
            "tokens": dict(TOKEN_SETTINGS),
            "channel_tokens": self.channel_tokens,
            "cells": cells,
            "nuclear": nuclear if cells in ("auto", "segment") else None,
            "channels": list(plate.channel_names),
            "package_version": __version__,
            "store_format": STORE_FORMAT,
        }
        self.config_hash = _hash_json(self.config)
        self._site_hashes: dict = {}
        self.reused = False

    # -- signature ---------------------------------------------------------------------------

    def site_hash(self, key) -> str:
        if key not in self._site_hashes:
            self._site_hashes[key] = hash_files(site_files(self.plate[key], self.cells))
        return self._site_hashes[key]

    def signature(self) -> dict:
        data = hashlib.blake2b(digest_size=20)
        for k in self.keys:
            data.update(f"{k.plate}/{k.well}/{k.site}:{self.site_hash(k)};".encode())
        return {
            **self.config,
            "data": data.hexdigest(),
            "n_sites": len(self.keys),
            "plate_root": str(getattr(self.plate, "root", "")),
        }

    # -- build -------------------------------------------------------------------------------

    def _root_attrs(self) -> dict | None:
        if not (self.path / "zarr.json").is_file():
            return None
        try:
            return dict(zarr.open_group(str(self.path), mode="r").attrs)
        except Exception:
            return None

    def begin(self) -> list:
        """Keys of the sites still to embed ([] when a matching complete store exists)."""
        self.sig = self.signature()
        self.sig_hash = _hash_json({k: v for k, v in self.sig.items() if k != "plate_root"})
        attrs = self._root_attrs()
        if self.path.exists() and attrs is None and any(self.path.iterdir()):
            raise StoreError(
                f"{self.path} exists and is not an activation store; choose another folder"
            )
        if attrs is not None and attrs.get("marker") != MARKER:
            raise StoreError(f"{self.path} is a zarr folder but not an activation store")
        if attrs and attrs.get("complete") and attrs.get("signature_hash") == self.sig_hash:
            if all((self.path / u / "table.parquet").is_file() for u in UNITS):
                self.reused = True
                return []
        # Stale or unfinished: drop gathered units and any part that no longer matches.
        for u in UNITS:
            shutil.rmtree(self.path / u, ignore_errors=True)
        self.path.mkdir(parents=True, exist_ok=True)
        root = zarr.open_group(str(self.path), mode="a")
        root.attrs.update(self._attrs(complete=False))
        parts = self.path / "parts"
        parts.mkdir(exist_ok=True)
        done = set()
        for d in parts.iterdir():
            if d.name.startswith("."):
                shutil.rmtree(d, ignore_errors=True)  # an interrupted write
                continue
            info = self._part_info(d)
            key = next((k for k in self.keys if site_id(self.index[k], k) == d.name), None)
            if (
                info is None
                or key is None
                or info.get("config_hash") != self.config_hash
                or info.get("site_hash") != self.site_hash(key)
            ):
                shutil.rmtree(d, ignore_errors=True)
                continue
            done.add(key)
        return [k for k in self.keys if k not in done]

    def _attrs(self, complete: bool) -> dict:
        return {
            "marker": MARKER,
            "complete": complete,
            "signature": self.sig,
            "signature_hash": self.sig_hash,
            "model_id": self.backend.model_id,
            "weights_hash": self.backend.weights_hash,
            "block": self.block,
            "embed_dim": self.backend.embed_dim,
            "patch_size": self.backend.patch_size,
            "tile_size": self.backend.tile_size,
            "channel_names": list(self.plate.channel_names),
            "channel_tokens": self.channel_tokens,
            "package_version": __version__,
        }

    @staticmethod
    def _part_info(d: Path) -> dict | None:
        f = d / "part.json"
        try:
            return json.loads(f.read_text())
        except (OSError, json.JSONDecodeError):
            return None

    def write_site(self, st) -> None:
        """Save one site's tokens as a part: written under a temporary name, then renamed."""
        key = st.key
        name = site_id(self.index[key], key)
        parts = self.path / "parts"
        tmp = parts / f".{name}.{uuid.uuid4().hex}"
        g = zarr.open_group(str(tmp), mode="w")
        _write_array(g, "patch", st.patch_grid.reshape(-1, st.patch_grid.shape[-1]), np.float16)
        _write_array(g, "cell", st.cell_tokens, np.float32)
        _write_array(g, "crop", st.crop_tokens, np.float32)
        if self.channel_tokens:
            pc = st.patch_channels
            _write_array(g, "patch_channels", pc.reshape(-1, *pc.shape[2:]), np.float16)
            _write_array(g, "cell_channels", st.cell_channels, np.float16)
            _write_array(g, "crop_channels", st.crop_channels, np.float16)
        st.cell_table.to_parquet(tmp / "cell.parquet", index=False)
        st.crop_table.to_parquet(tmp / "crop.parquet", index=False)
        info = {
            "config_hash": self.config_hash,
            "site_hash": self.site_hash(key),
            "grid": list(st.patch_grid.shape[:2]),
            "shape": list(st.shape),
        }
        (tmp / "part.json").write_text(json.dumps(info))
        final = parts / name
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)

    def finish(self) -> ActivationStore:
        """Gather parts into units (each renamed into place), then mark the store complete."""
        if self.reused:
            return ActivationStore.open(self.path)
        meta = self.plate.site_table().set_index(["plate", "well", "site"])
        parts = self.path / "parts"
        pieces = {u: [] for u in UNITS}
        chans = {u: [] for u in UNITS}
        tables = {u: [] for u in UNITS}
        grid_of = {}
        for key in self.keys:
            d = parts / site_id(self.index[key], key)
            info = self._part_info(d)
            if info is None:
                raise StoreError(f"{self.path}: site {key} has not been embedded; run again")
            g = zarr.open_group(str(d), mode="r")
            rows, cols = info["grid"]
            grid_of[key] = (rows, cols)
            base = {"plate": key.plate, "well": key.well, "site": key.site}
            for u in UNITS:
                pieces[u].append(np.asarray(g[u]))
                if self.channel_tokens:
                    chans[u].append(np.asarray(g[f"{u}_channels"]))
            cell = pd.read_parquet(d / "cell.parquet")
            crop = pd.read_parquet(d / "crop.parquet").rename(
                columns={"tile_row": "row", "tile_col": "col"}
            )
            rr, cc = np.divmod(np.arange(rows * cols), cols)
            patch = pd.DataFrame({"row": rr, "col": cc})
            for u, t in (("cell", cell), ("crop", crop), ("patch", patch)):
                t = t.copy()
                for i, (k, v) in enumerate(base.items()):
                    t.insert(i, k, v)
                tables[u].append(t)
        offsets = np.cumsum([0] + [len(p) for p in pieces["patch"]])
        units_tmp = self.path / f".units.{uuid.uuid4().hex}"
        units_tmp.mkdir()
        for u in UNITS:
            g = zarr.open_group(str(units_tmp / u), mode="w")
            dtype = np.float16 if u == "patch" else np.float32
            d = self.backend.embed_dim
            data = np.concatenate(pieces[u]) if pieces[u] else np.zeros((0, d), dtype)
            _write_array(g, "tokens", data, dtype)
            if self.channel_tokens:
                _write_array(g, "channels", np.concatenate(chans[u]), np.float16)
            table = pd.concat(tables[u], ignore_index=True)
            table = self._join_metadata(table, meta)
            _atomic_parquet(table, units_tmp / u / "table.parquet")
        grids = pd.DataFrame(
            [
                {
                    "plate": k.plate,
                    "well": k.well,
                    "site": k.site,
                    "rows": grid_of[k][0],
                    "cols": grid_of[k][1],
                    "offset": int(offsets[i]),
                }
                for i, k in enumerate(self.keys)
            ]
        )
        _atomic_parquet(grids, units_tmp / "patch" / "grids.parquet")
        for u in UNITS:
            shutil.rmtree(self.path / u, ignore_errors=True)
            os.replace(units_tmp / u, self.path / u)
        shutil.rmtree(units_tmp, ignore_errors=True)
        root = zarr.open_group(str(self.path), mode="a")
        root.attrs.update(
            {
                **self._attrs(complete=True),
                "counts": {u: int(sum(len(p) for p in pieces[u])) for u in UNITS},
            }
        )
        shutil.rmtree(parts, ignore_errors=True)
        return ActivationStore.open(self.path)

    @staticmethod
    def _join_metadata(table: pd.DataFrame, meta: pd.DataFrame) -> pd.DataFrame:
        if meta.empty or len(meta.columns) == 0:
            return table
        m = meta.reset_index()
        clash = [c for c in m.columns if c in table.columns and c not in ("plate", "well", "site")]
        m = m.rename(columns={c: f"metadata_{c}" for c in clash})
        return table.merge(m, on=["plate", "well", "site"], how="left", sort=False)


class ActivationStore:
    """Read side of a finished store: tokens and tables per unit, patch grids per site."""

    def __init__(self, path: Path, attrs: dict):
        self.path = Path(path)
        self.attrs = attrs
        self.signature: dict = attrs.get("signature", {})
        self.signature_hash: str = attrs.get("signature_hash", "")
        self.model_id: str = attrs["model_id"]
        self.weights_hash: str = attrs.get("weights_hash", "")
        self.block: int = int(attrs["block"])
        self.embed_dim: int = int(attrs["embed_dim"])
        self.patch_size: int = int(attrs.get("patch_size", 16))
        self.tile_size: int = int(attrs.get("tile_size", 256))
        self.channel_names: tuple[str, ...] = tuple(attrs.get("channel_names", ()))
        self.has_channel_tokens: bool = bool(attrs.get("channel_tokens", False))
        self._tables: dict[str, pd.DataFrame] = {}
        self._grids: pd.DataFrame | None = None
        self.reused = False  # set by embed_plate: True when a matching store was kept as is

    @classmethod
    def open(cls, path) -> ActivationStore:
        """Open a complete store; an unfinished or foreign folder is a StoreError."""
        path = Path(path)
        if not (path / "zarr.json").is_file():
            raise StoreError(f"no activation store at {path}")
        try:
            attrs = dict(zarr.open_group(str(path), mode="r").attrs)
        except Exception as exc:
            raise StoreError(f"cannot read the activation store at {path}: {exc}") from exc
        if attrs.get("marker") != MARKER:
            raise StoreError(f"{path} is not an activation store")
        if not attrs.get("complete"):
            raise StoreError(
                f"the activation store at {path} is unfinished (interrupted); run the embedding "
                "again to complete it"
            )
        return cls(path, attrs)

    def _unit(self, unit: str) -> str:
        if unit not in UNITS:
            raise StoreError(f"unknown token unit {unit!r}; use one of {UNITS}")
        return unit

    def tokens(self, unit: str = "cell"):
        """(N, D) zarr array of one unit's tokens (patch: float16; cell, crop: float32)."""
        return zarr.open_array(str(self.path / self._unit(unit) / "tokens"), mode="r")

    def channel_tokens(self, unit: str = "cell"):
        """(N, G, D) per-channel tokens, when the store was built with ``channel_tokens=True``."""
        if not self.has_channel_tokens:
            raise StoreError(f"{self.path} has no per-channel tokens; embed with channel_tokens")
        return zarr.open_array(str(self.path / self._unit(unit) / "channels"), mode="r")

    def table(self, unit: str = "cell") -> pd.DataFrame:
        """One row per token of ``unit``: plate, well, site, unit columns, metadata columns."""
        u = self._unit(unit)
        if u not in self._tables:
            self._tables[u] = pd.read_parquet(self.path / u / "table.parquet")
        return self._tables[u].copy()

    def sites(self) -> pd.DataFrame:
        """plate, well, site, rows, cols, offset (row of the site's first patch token)."""
        if self._grids is None:
            self._grids = pd.read_parquet(self.path / "patch" / "grids.parquet")
        return self._grids.copy()

    def patch_grid(self, key) -> np.ndarray:
        """(rows, cols, D) float16 patch tokens of one site (key: SiteKey or (plate, well, site))."""
        plate, well, site = tuple(key)
        g = self.sites()
        hit = g[(g.plate == plate) & (g.well == well) & (g.site == int(site))]
        if hit.empty:
            raise StoreError(f"site {tuple(key)} is not in the store at {self.path}")
        r = hit.iloc[0]
        n = int(r.rows) * int(r.cols)
        start = int(r.offset)
        data = self.tokens("patch")[start : start + n]
        return np.asarray(data).reshape(int(r.rows), int(r.cols), self.embed_dim)

    def __len__(self) -> int:
        return int(self.attrs.get("counts", {}).get("cell", 0))

    def __repr__(self) -> str:
        counts = self.attrs.get("counts", {})
        return (
            f"ActivationStore({str(self.path)!r}, model={self.model_id!r}, block={self.block}, "
            f"D={self.embed_dim}, {counts})"
        )
