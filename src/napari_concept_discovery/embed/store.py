"""Activation store: one zarr folder per plate, model and block, with a cache signature.

Layout (zarr v3 arrays, parquet tables)::

    STORE/zarr.json            root attributes: signature and its hash, model (id, weights hash,
                               source), block, plate source, embed settings, counts, complete
    STORE/sites.parquet        one row per site: plate, well, site, site_id, height, width,
                               rows, cols (patch grid), cells (file|segment|none), labels (bool),
                               and {unit}_start, {unit}_count for cell, patch and crop
    STORE/patch/tokens         (N_patches, D) float16, row-major per site; patch/table.parquet
    STORE/cell/tokens          (N_cells, D) float32; cell/table.parquet
    STORE/crop/tokens          (N_tiles, D) float32; crop/table.parquet
    STORE/<unit>/channels      (N, G*D) float16 per-channel tokens side by side (channel g in
                               columns g*D..(g+1)*D), only with ``channel_tokens``
    STORE/labels/<site_id>     (H, W) int32 cell labels the site's cells were pooled over
                               (zstd-compressed); row i of a site's cell tokens is label
                               ``cell/table.label[i]`` in it
    STORE/parts/<site_id>/     one finished site while a plate is being embedded (resume unit)

Token forms: ``tokens(unit, form="mean")`` is the mean over a patch's G channel tokens (G = C
for a channel-agnostic model), ``tokens(unit, form="concat")`` the G channel tokens concatenated,
which keeps what is specific to one stain (docs/architecture.md, "Tokens"). Both are stored.
The mean could be derived from the concatenation, but it costs only 1/G of it on disk (patch
tokens, which dominate), a viewer that paints a mean dictionary would otherwise read G times
the bytes for every site, and deriving it from float16 channel tokens would change the mean
tokens that existing dictionaries were trained on. Activations do not compress (zstd saves
about 7% on float16 tokens), so float16 is what keeps the store small: a 1080 x 1080 site of
6 channels with a 384-wide model costs about 26 MB, 21 MB of it the per-channel patch tokens
(see docs/scale-out.md, "Store size"). Channel arrays are chunked by about 2 MiB of rows, so one cell
read for the viewer decompresses little, while training still reads whole chunks.

Every unit's rows are grouped by site in the order of ``sites.parquet``, so a site's rows are
one slice (``site_rows``). ``model_source`` is what ``load_model`` takes to rebuild the model and
``plate_source`` the ``open_plate`` arguments of the plate, so a site that is not in the store
can be embedded on demand the same way (``plate_embedding.embed_store_site``).

The signature is the full content hash (blake2b) of every image and label file of the plate,
how each site's labels were made, the metadata joined into the tables, the model id and weights
hash, the block, the tiling/pooling settings, the channels and the package version. Hashing
reads each file once, which costs far less than the forward pass it guards. A store is reused
only when its signature matches and it is marked complete (a changed metadata table alone is
joined again, the tokens kept); a store of the same plate, model, block and settings whose data
changed is rebuilt in place, keeping only finished sites whose own inputs and settings still
match (resume); a store of anything else is refused unless ``overwrite``, and then the new
store is built beside it (``.<name>.building``) and swapped in only once complete. Every file
lands atomically (site parts and units are folders swapped into place; zarr's local store
replaces metadata files atomically); the complete flag comes last. The writer holds a lock file
beside the store (:mod:`._lock`). See docs/architecture.md, "The activation store".
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd
import zarr

from .. import __version__
from .._files import atomic_dir, atomic_parquet, atomic_write_text, hash_files
from ..errors import StoreError
from ..plate import SiteKey

UNITS = ("cell", "patch", "crop")
MARKER = "napari-concept-discovery activation store"
STORE_FORMAT = 3  # 3: per-channel tokens as (N, G*D), token_groups recorded
TOKEN_SETTINGS = {
    "tiling": "reflect pad bottom/right to a multiple of the tile; patches of padding dropped",
    "patch": "mean over channel tokens",
    "crop": "mean of a tile's kept patch tokens",
    "cell": "mean of patch tokens weighted by the cell's pixel coverage of each patch",
    "channels": "per-channel tokens side by side, channel-major (G*D), pooled like the mean",
}
#: The forms ``ActivationStore.tokens`` gives: the channel mean, or the channel tokens side by side.
TOKEN_FORMS = ("mean", "concat")
#: Target bytes per chunk of the per-channel token arrays (see the module docstring).
CHANNEL_CHUNK_BYTES = 2 << 20
#: Label images are chunked in squares of this side (whole small sites in one chunk).
LABEL_CHUNK = 1024


def layout_bytes(
    height: int,
    width: int,
    channels: int,
    dim: int,
    cells: int = 0,
    *,
    channel_tokens: bool = True,
    patch: int = 16,
    tile: int = 256,
) -> dict[str, int]:
    """Bytes one site's tokens take in this layout, before compression, per unit and in total.

    Patch grid ``ceil(H/patch) x ceil(W/patch)``; tiles ``ceil(H/tile) x ceil(W/tile)``; mean
    tokens float16 (patch) or float32 (cell, crop); channel tokens float16, ``channels x dim``
    wide. Labels (int32, zstd) are left out: they compress to a small fraction. Activations
    barely compress, so this is close to the size on disk.
    """
    patches = -(-height // patch) * -(-width // patch)
    tiles = -(-height // tile) * -(-width // tile)
    chan = channels * dim * 2 if channel_tokens else 0
    out = {
        "patch": patches * (dim * 2 + chan),
        "cell": cells * (dim * 4 + chan),
        "crop": tiles * (dim * 4 + chan),
    }
    out["total"] = sum(out.values())
    return out


def site_id(index: int, key) -> str:
    """Folder-safe name of a site, unique within a store (its index comes first)."""
    return f"{index:05d}_{key.plate}_{key.well}_s{key.site}".replace("/", "-")


def _hash_json(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _rows_per_chunk(n_rows: int, row_shape, dtype, target: int = 8 << 20) -> int:
    row_bytes = max(1, int(np.prod(row_shape, dtype=np.int64)) * np.dtype(dtype).itemsize)
    return max(1, min(n_rows or 1, target // row_bytes))


def _write_array(group, name: str, data: np.ndarray, dtype, rows_per_chunk: int | None = None):
    data = np.asarray(data, dtype=dtype)
    if rows_per_chunk is None:
        rows_per_chunk = _rows_per_chunk(len(data), data.shape[1:], data.dtype)
    chunks = (max(1, rows_per_chunk), *data.shape[1:])
    arr = group.create_array(
        name, shape=data.shape, dtype=data.dtype, chunks=chunks, overwrite=True
    )
    if data.size:
        arr[...] = data
    return arr


class _RowWriter:
    """Fills an (N, width) zarr array from pieces in row order, writing whole chunks only.

    Gathering a plate's units this way holds at most one chunk plus one site's rows in memory,
    whatever the plate's size (the per-channel patch tokens of a large screen do not fit).
    """

    def __init__(self, group, name: str, n_rows: int, width: int, dtype, target: int):
        self.chunk = _rows_per_chunk(n_rows, (width,), dtype, target)
        self.arr = group.create_array(
            name, shape=(n_rows, width), dtype=dtype, chunks=(self.chunk, width), overwrite=True
        )
        self.dtype = np.dtype(dtype)
        self.pending: list[np.ndarray] = []
        self.held = 0
        self.at = 0

    def add(self, rows: np.ndarray) -> None:
        rows = np.asarray(rows, dtype=self.dtype)
        if len(rows):
            rows = rows.reshape(len(rows), self.arr.shape[1])
            self.pending.append(rows)
            self.held += len(rows)
        if self.held >= self.chunk:
            self._flush(whole_chunks=True)

    def _flush(self, whole_chunks: bool) -> None:
        if not self.held:
            return
        data = np.concatenate(self.pending) if len(self.pending) > 1 else self.pending[0]
        n = len(data) // self.chunk * self.chunk if whole_chunks else len(data)
        if n:
            self.arr[self.at : self.at + n] = data[:n]
            self.at += n
        rest = data[n:]
        self.pending = [rest] if len(rest) else []
        self.held = len(rest)

    def close(self) -> None:
        self._flush(whole_chunks=False)
        if self.at != self.arr.shape[0]:
            raise StoreError(f"wrote {self.at} of {self.arr.shape[0]} rows of {self.arr.path}")


def _write_labels(group, name: str, labels: np.ndarray):
    labels = np.asarray(labels, dtype=np.int32)
    chunks = tuple(max(1, min(n, LABEL_CHUNK)) for n in labels.shape)
    arr = group.create_array(
        name,
        shape=labels.shape,
        dtype=np.int32,
        chunks=chunks,
        compressors=zarr.codecs.ZstdCodec(level=3),
        overwrite=True,
    )
    arr[...] = labels
    return arr


def _plain(quality: dict | None) -> dict | None:
    """A quality row with plain JSON values (numpy scalars and NaN made JSON-safe)."""
    if quality is None:
        return None
    out = {}
    for k, v in quality.items():
        if isinstance(v, np.generic):
            v = v.item()
        if isinstance(v, float) and v != v:
            v = None
        out[str(k)] = v
    return out


def check_store_folder(path) -> dict | None:
    """The root attributes of the store at ``path`` (None when there is none yet); a StoreError
    for a folder that holds something else, which is never written into."""
    path = Path(path)
    attrs = StoreWriter._attrs_at(path)
    if path.exists() and attrs is None and (not path.is_dir() or any(path.iterdir())):
        raise StoreError(f"{path} exists and is not an activation store; choose another folder")
    if attrs is not None and attrs.get("marker") != MARKER:
        raise StoreError(f"{path} is a zarr folder but not an activation store")
    return attrs


def metadata_hash(plate) -> str:
    """Hash of a plate's site table (its metadata joined to its sites), as a store records it."""
    table = plate.site_table()
    text = table.to_csv(index=False) + "|" + ",".join(map(str, table.dtypes))
    return hashlib.sha256(text.encode()).hexdigest()


def store_around(path) -> Path | None:
    """The activation store that holds ``path`` (``path`` itself or a folder above it), or None:
    nothing else is written into a store, whose size and signature cover all it holds."""
    path = Path(path).expanduser().absolute()
    for folder in (path, *path.parents):
        attrs = StoreWriter._attrs_at(folder) if folder.is_dir() else None
        if attrs is not None and attrs.get("marker") == MARKER:
            return folder
    return None


def refuse_inside_store(path, what: str, error: type[Exception] = StoreError) -> None:
    """``error`` when ``path`` (an output: a report, an analysis, a dictionary) lies inside an
    activation store, whose size and contents would then count it."""
    store = store_around(Path(path).expanduser().absolute().parent)
    if store is None and Path(path).is_dir():
        store = store_around(path)
    if store is not None:
        raise error(
            f"{what} {path} is inside the activation store {store}; a store holds only its "
            "tokens, so choose a place outside it"
        )


class StoreWriter:
    """Builds (or reuses, or resumes) the store of one plate, model and block.

    ``inputs`` maps every site key to what decides its tokens besides the model (its image and
    label files and how its labels are made: ``plate_embedding.SiteInputs``, anything with
    ``files``, ``token`` and ``cells``). ``begin()`` returns the keys still to embed;
    ``write_site`` saves one finished site with its labels; ``finish()`` gathers the sites into
    the unit arrays and tables and marks the store complete.
    """

    def __init__(
        self,
        path,
        plate,
        backend,
        block: int,
        inputs: Mapping,
        *,
        settings: dict | None = None,
        overwrite: bool = False,
    ):
        if path is None:
            raise StoreError("no output folder given for the activation store")
        self.path = Path(path)
        #: Replace a store of another plate, model, block or settings (built beside, swapped in).
        self.overwrite = bool(overwrite)
        #: Where this run writes: the store itself, or a folder beside it when replacing one.
        self.root = self.path
        self.plate = plate
        self.backend = backend
        self.block = int(block)
        self.settings = dict(settings or {})
        self.channel_tokens = bool(self.settings.get("channel_tokens", False))
        self.keys = list(plate.sites)
        missing = [k for k in self.keys if k not in inputs]
        if missing:
            raise StoreError(f"no inputs given for site(s) {missing[:5]}")
        self.inputs = inputs
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
            "cells": self.settings.get("cells", "auto"),
            "channels": list(plate.channel_names),
            **self._precision_entry(self.settings.get("precision", "fp32")),
            "package_version": __version__,
            "store_format": STORE_FORMAT,
        }
        self.config_hash = _hash_json(self.config)
        self._site_hashes: dict = {}
        self.reused = False

    @staticmethod
    def _precision_entry(precision: str) -> dict:
        """The forward pass's precision as the signature holds it: fp32 stores sign as they did
        before precision was recorded (so they stay reusable), any other precision by name, so
        tokens of two precisions never share a store."""
        return {} if precision == "fp32" else {"precision": precision}

    # -- signature ---------------------------------------------------------------------------

    def site_hash(self, key) -> str:
        """Hash of a site's image and label bytes and of how its labels are made."""
        if key not in self._site_hashes:
            how = self.inputs[key]
            try:
                data = hash_files(how.files)
            except OSError as exc:
                raise StoreError(
                    f"cannot read {exc.filename} to sign the store: {exc.strerror or exc}"
                ) from exc
            self._site_hashes[key] = f"{data}:{how.token}"
        return self._site_hashes[key]

    def signature(self) -> dict:
        data = hashlib.blake2b(digest_size=20)
        for k in self.keys:
            data.update(f"{k.plate}/{k.well}/{k.site}:{self.site_hash(k)};".encode())
        return {
            **self.config,
            "data": data.hexdigest(),
            "metadata": self._metadata_hash(),
            "n_sites": len(self.keys),
            "plate_root": str(getattr(self.plate, "root", "")),
        }

    def _metadata(self) -> pd.DataFrame:
        return self.plate.site_table().set_index(["plate", "well", "site"])

    def _metadata_hash(self) -> str:
        """Hash of the metadata joined into the tables: a changed table must not stay frozen."""
        return metadata_hash(self.plate)

    # -- which store this is ------------------------------------------------------------------

    def identity(self) -> dict:
        """What makes a store this plate's store for this model, block and settings.

        A store whose identity differs is another store (another plate, model, block or token
        settings) and is never rebuilt in place without ``overwrite``; one that differs only in
        its data (image, label or metadata bytes, sites added or gone, package version) is the
        same store gone stale and is rebuilt.
        """
        skip = ("package_version", "store_format")
        return {
            **{k: v for k, v in self.config.items() if k not in skip},
            "precision": self.config.get("precision", "fp32"),
            "plate": str(self._sources()["plate_source"].get("path") or self.plate.root),
        }

    @staticmethod
    def _identity_of(attrs: dict) -> dict:
        sig = dict(attrs.get("signature", {}))
        plate = dict(attrs.get("plate_source", {})).get("path") or sig.get("plate_root", "")
        keys = (
            "model_id",
            "weights_hash",
            "block",
            "embed_dim",
            "tile_size",
            "patch_size",
            "normalisation",
            "tokens",
            "channel_tokens",
            "cells",
            "channels",
        )
        return {
            **{k: sig.get(k) for k in keys},
            # Stores signed before precision was: their settings say it (fp32 unless told).
            "precision": sig.get(
                "precision", dict(attrs.get("embed_settings", {})).get("precision", "fp32")
            ),
            "plate": str(plate),
        }

    def _differences(self, attrs: dict) -> list[str]:
        old, new = self._identity_of(attrs), self.identity()
        names = {"weights_hash": "model weights", "model_id": "model", "plate": "plate folder"}
        return [names.get(k, k.replace("_", " ")) for k in new if old.get(k) != new[k]]

    def _refusal(self, attrs: dict, differ: list[str]) -> StoreError:
        old = self._identity_of(attrs)
        state = "" if attrs.get("complete") else "unfinished "
        return StoreError(
            f"{self.path} holds the {state}activation store of plate {old['plate']} "
            f"(model {old['model_id']}, block {old['block']}); this run embeds plate "
            f"{self.identity()['plate']} (model {self.config['model_id']}, block {self.block}): "
            f"{', '.join(differ)} differ. Choose another output folder, or pass --overwrite "
            "(overwrite=True) to replace it; the old store stays whole until the new one is "
            "complete"
            + (
                f"; to keep adding to it, embed with --precision {old['precision']} (it holds "
                f"{old['precision']} tokens, this run makes {self.identity()['precision']})"
                if "precision" in differ
                else ""
            )
        )

    # -- build -------------------------------------------------------------------------------

    def _staging(self) -> Path:
        return self.path.with_name(f".{self.path.name}.building")

    def _aside(self) -> Path:
        return self.path.with_name(f".{self.path.name}.replaced")

    @staticmethod
    def _attrs_at(path: Path) -> dict | None:
        if not (path / "zarr.json").is_file():
            return None
        try:
            return dict(zarr.open_group(str(path), mode="r").attrs)
        except Exception:
            return None

    def _root_attrs(self) -> dict | None:
        return self._attrs_at(self.root)

    def begin(self) -> list:
        """Keys of the sites still to embed ([] when a matching complete store exists).

        Refuses (StoreError) a folder that is not a store, and a store of another plate, model,
        block or settings unless ``overwrite``; then the new store is built beside it and
        swapped in by :meth:`finish`, so the old one stays whole until the new one is complete.
        """
        self.sig = self.signature()
        self.sig_hash = _hash_json({k: v for k, v in self.sig.items() if k != "plate_root"})
        aside = self._aside()
        if aside.is_dir() and not self.path.exists():  # a swap cut short: put the old one back
            aside.rename(self.path)
        shutil.rmtree(aside, ignore_errors=True)
        attrs = check_store_folder(self.path)
        self.root = self.path
        if self._reusable(attrs):
            return []
        differ = self._differences(attrs) if attrs is not None else []
        if differ and not self.overwrite:
            raise self._refusal(attrs, differ)
        if differ:
            self.root = self._staging()
            staged = self._attrs_at(self.root)
            if staged is None or staged.get("marker") != MARKER or self._differences(staged):
                shutil.rmtree(self.root, ignore_errors=True)  # not this run's: start afresh
        # Stale or unfinished: drop gathered units, interrupted swaps and stale parts.
        root_path = self.root
        for u in (*UNITS, "labels"):
            shutil.rmtree(root_path / u, ignore_errors=True)
        for d in root_path.glob(".*"):
            if d.is_dir() and d.name.endswith((".tmp", ".old")):
                shutil.rmtree(d, ignore_errors=True)
        (root_path / "sites.parquet").unlink(missing_ok=True)
        root_path.mkdir(parents=True, exist_ok=True)
        root = zarr.open_group(str(root_path), mode="a")
        root.attrs.update(self._attrs(complete=False))
        parts = root_path / "parts"
        parts.mkdir(exist_ok=True)
        names = {site_id(self.index[k], k): k for k in self.keys}
        done = set()
        for d in parts.iterdir():
            if d.name.startswith("."):
                shutil.rmtree(d, ignore_errors=True)  # an interrupted write
                continue
            info = self._part_info(d)
            key = names.get(d.name)
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

    def _reusable(self, attrs: dict | None) -> bool:
        """Keep a complete store whose signature matches; re-join a changed metadata table."""
        if not attrs or not attrs.get("complete"):
            return False
        if not (
            all((self.root / u / "table.parquet").is_file() for u in UNITS)
            and (self.root / "sites.parquet").is_file()
        ):
            return False
        if attrs.get("signature_hash") != self.sig_hash:
            old = dict(attrs.get("signature", {}))
            same_tokens = {k: v for k, v in old.items() if k not in ("plate_root", "metadata")}
            now = {k: v for k, v in self.sig.items() if k not in ("plate_root", "metadata")}
            if same_tokens != now or not attrs.get("table_columns"):
                return False
            self._rejoin(attrs["table_columns"])
        self.reused = True
        # Where the plate and model are now (they may have moved); tokens are the same.
        root = zarr.open_group(str(self.root), mode="a")
        root.attrs.update(
            {**self._sources(), "signature": self.sig, "signature_hash": self.sig_hash}
        )
        return True

    def _rejoin(self, table_columns: dict) -> None:
        """Join the current metadata onto each unit's table in place of the old (tokens kept)."""
        meta = self._metadata()
        for u in UNITS:
            path = self.root / u / "table.parquet"
            table = pd.read_parquet(path)
            base = table[[c for c in table_columns[u] if c in table.columns]]
            atomic_parquet(self._join_metadata(base, meta), path)

    def _sources(self) -> dict:
        model_source = getattr(self.backend, "source", "") or self.backend.model_id
        return {
            "model_source": model_source,
            "plate_source": dict(getattr(self.plate, "source", {}) or {}),
            "embed_settings": dict(self.settings),
        }

    def _attrs(self, complete: bool) -> dict:
        return {
            "marker": MARKER,
            "complete": complete,
            "store_format": STORE_FORMAT,
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
            **self._sources(),
        }

    @staticmethod
    def _part_info(d: Path) -> dict | None:
        f = d / "part.json"
        try:
            return json.loads(f.read_text())
        except (OSError, json.JSONDecodeError):
            return None

    def write_site(self, st) -> None:
        """Save one site's tokens and labels as a part, a folder swapped into place whole."""
        key = st.key
        name = site_id(self.index[key], key)
        with atomic_dir(self.root / "parts" / name) as tmp:
            g = zarr.open_group(str(tmp), mode="w")
            grid = st.patch_grid
            _write_array(g, "patch", grid.reshape(-1, grid.shape[-1]), np.float16)
            _write_array(g, "cell", st.cell_tokens, np.float32)
            _write_array(g, "crop", st.crop_tokens, np.float32)
            if self.channel_tokens:
                for u, ch in (
                    ("patch", st.patch_channels),
                    ("cell", st.cell_channels),
                    ("crop", st.crop_channels),
                ):
                    flat = np.asarray(ch).reshape(-1, ch.shape[-2] * ch.shape[-1])
                    _write_array(g, f"{u}_channels", flat, np.float16)
            labels = getattr(st, "labels", None)
            if labels is not None:
                _write_labels(g, "labels", labels)
            st.cell_table.to_parquet(tmp / "cell.parquet", index=False)
            st.crop_table.to_parquet(tmp / "crop.parquet", index=False)
            info = {
                "config_hash": self.config_hash,
                "site_hash": self.site_hash(key),
                "grid": list(grid.shape[:2]),
                "shape": list(st.shape),
                "cells": self.inputs[key].cells,
                "labels": labels is not None,
                "quality": _plain(getattr(st, "meta", {}).get("_segment_quality")),
            }
            atomic_write_text(tmp / "part.json", json.dumps(info))

    def finish(self) -> ActivationStore:
        """Gather parts into units, labels and the site table, then mark the store complete.

        Units are written site by site in whole chunks (:class:`_RowWriter`), so memory stays
        bounded by a chunk and one site, not by the plate.
        """
        if self.reused:
            return ActivationStore.open(self.path)
        meta = self._metadata()
        parts = self.root / "parts"
        tables = {u: [] for u in UNITS}
        site_rows = []
        start = dict.fromkeys(UNITS, 0)
        opened = []
        groups = 1
        for key in self.keys:
            name = site_id(self.index[key], key)
            d = parts / name
            info = self._part_info(d)
            if info is None:
                raise StoreError(f"{self.root}: site {key} has not been embedded; run again")
            g = zarr.open_group(str(d), mode="r")
            opened.append((name, g))
            rows, cols = info["grid"]
            base = {"plate": key.plate, "well": key.well, "site": key.site}
            row = {
                **base,
                "site_id": name,
                "height": int(info["shape"][0]),
                "width": int(info["shape"][1]),
                "rows": int(rows),
                "cols": int(cols),
                "cells": info["cells"],
                "labels": bool(info["labels"]),
            }
            for k, v in (info.get("quality") or {}).items():
                row[f"qc_{k}"] = v
            for u in UNITS:
                n = int(g[u].shape[0])
                row[f"{u}_start"], row[f"{u}_count"] = start[u], n
                start[u] += n
            if self.channel_tokens:
                groups = int(g["patch_channels"].shape[1]) // self.backend.embed_dim
            site_rows.append(row)
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
        d = self.backend.embed_dim
        base_columns = {}
        for u in UNITS:
            with atomic_dir(self.root / u) as tmp:
                out = zarr.open_group(str(tmp), mode="w")
                dtype = np.float16 if u == "patch" else np.float32
                writers = [(u, _RowWriter(out, "tokens", start[u], d, dtype, 8 << 20))]
                if self.channel_tokens:
                    w = _RowWriter(
                        out, "channels", start[u], groups * d, np.float16, CHANNEL_CHUNK_BYTES
                    )
                    writers.append((f"{u}_channels", w))
                for _, g in opened:
                    for part, w in writers:
                        w.add(np.asarray(g[part]))
                for _, w in writers:
                    w.close()
                table = pd.concat(tables[u], ignore_index=True)
                base_columns[u] = [str(c) for c in table.columns]
                table = self._join_metadata(table, meta)
                atomic_parquet(table, tmp / "table.parquet")
        with atomic_dir(self.root / "labels") as tmp:
            zarr.open_group(str(tmp), mode="w")
            for row in site_rows:
                if row["labels"]:  # copied, not moved: the parts stay whole until the end
                    shutil.copytree(parts / row["site_id"] / "labels", tmp / row["site_id"])
        atomic_parquet(pd.DataFrame(site_rows), self.root / "sites.parquet")
        root = zarr.open_group(str(self.root), mode="a")
        root.attrs.update(
            {
                **self._attrs(complete=True),
                "token_groups": groups if self.channel_tokens else 1,
                "counts": {u: int(start[u]) for u in UNITS},
                "table_columns": base_columns,
            }
        )
        shutil.rmtree(parts, ignore_errors=True)
        if self.root != self.path:
            self._swap_in()
        return ActivationStore.open(self.path)

    def _swap_in(self) -> None:
        """Replace the old store by the finished one built beside it (two renames)."""
        aside = self._aside()
        shutil.rmtree(aside, ignore_errors=True)
        if self.path.exists():
            os.replace(self.path, aside)
        os.replace(self.root, self.path)
        self.root = self.path
        shutil.rmtree(aside, ignore_errors=True)

    @staticmethod
    def _join_metadata(table: pd.DataFrame, meta: pd.DataFrame) -> pd.DataFrame:
        if meta.empty or len(meta.columns) == 0:
            return table
        m = meta.reset_index()
        clash = [c for c in m.columns if c in table.columns and c not in ("plate", "well", "site")]
        m = m.rename(columns={c: f"metadata_{c}" for c in clash})
        return table.merge(m, on=["plate", "well", "site"], how="left", sort=False)


class ActivationStore:
    """Read side of a finished store: tokens and tables per unit, each site's rows and labels.

    ``key`` is a ``SiteKey`` or a ``(plate, well, site)`` tuple everywhere.
    """

    def __init__(self, path: Path, attrs: dict):
        self.path = Path(path)
        self.attrs = attrs
        self.signature: dict = attrs.get("signature", {})
        self.signature_hash: str = attrs.get("signature_hash", "")
        self.model_id: str = attrs["model_id"]
        self.weights_hash: str = attrs.get("weights_hash", "")
        #: What ``models.load_model`` takes to build the same backend again.
        self.model_source: str = attrs.get("model_source", "") or self.model_id
        #: ``open_plate`` keyword arguments of the plate the store was embedded from.
        self.plate_source: dict = dict(attrs.get("plate_source", {}))
        #: The ``EmbedSettings`` it was embedded with (as a dict; ``model`` is the source).
        self.embed_settings: dict = dict(attrs.get("embed_settings", {}))
        #: Arithmetic of the forward pass that made the tokens (stores before it was recorded
        #: were all fp32).
        self.precision: str = str(self.embed_settings.get("precision", "fp32"))
        self.block: int = int(attrs["block"])
        self.embed_dim: int = int(attrs["embed_dim"])
        self.patch_size: int = int(attrs.get("patch_size", 16))
        self.tile_size: int = int(attrs.get("tile_size", 256))
        self.channel_names: tuple[str, ...] = tuple(attrs.get("channel_names", ()))
        self.has_channel_tokens: bool = bool(attrs.get("channel_tokens", False))
        #: Token groups per patch kept side by side (G = C channels), 1 without channel tokens.
        self.token_groups: int = int(attrs.get("token_groups", 1)) if self.has_channel_tokens else 1
        self._tables: dict[str, pd.DataFrame] = {}
        self._sites: pd.DataFrame | None = None
        self._site_index: dict[SiteKey, int] | None = None
        self.reused = False  # set by embed_plate: True when a matching store was kept as is

    @classmethod
    def open(cls, path) -> ActivationStore:
        """Open a complete store; an unfinished, old or foreign folder is a StoreError."""
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
                f"the activation store at {path} is unfinished (its embedding was interrupted or stopped by an error); run the embedding "
                "again to complete it"
            )
        fmt = attrs.get("store_format", attrs.get("signature", {}).get("store_format"))
        if fmt != STORE_FORMAT:
            raise StoreError(
                f"the activation store at {path} has format {fmt}, this version reads format "
                f"{STORE_FORMAT}; run the embedding again to rebuild it"
            )
        return cls(path, attrs)

    def stale_labels(self) -> str | None:
        """What to tell a user when the plate's metadata has changed since the embedding: the
        labels in this store's tables are those of embedding time. None when it is the same,
        or when the plate cannot be opened from where it was (moved, another machine)."""
        import warnings

        from ..plate import open_plate

        recorded = self.signature.get("metadata")
        where = self.plate_source.get("path")
        if not recorded or not where or not Path(where).exists():
            return None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                plate = open_plate(**self.plate_source)
            if metadata_hash(plate) == recorded:
                return None
        except Exception:  # noqa: BLE001 - a plate that no longer opens is not this note's case
            return None
        table = self.plate_source.get("metadata") or f"the metadata table of {where}"
        return (
            f"{table} has changed since the activation store {self.path} was embedded; its "
            "labels (well_type, perturbation, ...) are still the old ones: run `concept-discovery "
            "embed` again (embed_plate) to take the new ones; it joins them again without "
            "running the model on unchanged sites"
        )

    def _unit(self, unit: str) -> str:
        if unit not in UNITS:
            raise StoreError(f"unknown token unit {unit!r}; use one of {UNITS}")
        return unit

    @property
    def token_forms(self) -> tuple[str, ...]:
        """The token forms this store holds: ("mean", "concat") with channel tokens, else ("mean",)."""
        return TOKEN_FORMS if self.has_channel_tokens else TOKEN_FORMS[:1]

    @property
    def default_token_form(self) -> str:
        """The form a dictionary trains on by default: "concat" where channel tokens are kept."""
        return "concat" if self.has_channel_tokens else "mean"

    def token_width(self, form: str = "mean") -> int:
        """Width of ``tokens(unit, form)``: D for the mean, G*D for the concatenation."""
        return self.embed_dim * (self.token_groups if self._form(form) == "concat" else 1)

    def _form(self, form: str) -> str:
        if form not in TOKEN_FORMS:
            raise StoreError(f"unknown token form {form!r}; use one of {TOKEN_FORMS}")
        if form == "concat" and not self.has_channel_tokens:
            raise StoreError(
                f"the activation store at {self.path} has no per-channel tokens, only their mean "
                f"(embedded with channel_tokens off, or with a model that gives one token per "
                f"patch); embed again with --channel-tokens to use concatenated tokens"
            )
        return form

    def tokens(self, unit: str = "cell", form: str = "mean"):
        """(N, width) zarr array of one unit's tokens in one form.

        ``form="mean"``: (N, D), the mean over channel tokens (patch: float16; cell, crop:
        float32). ``form="concat"``: (N, G*D) float16, the G channel tokens side by side
        (channel g in columns g*D:(g+1)*D), only in a store with channel tokens. Both support
        ``[a:b]`` row slices, ``.shape`` and ``get_orthogonal_selection``.
        """
        name = "channels" if self._form(form) == "concat" else "tokens"
        return zarr.open_array(str(self.path / self._unit(unit) / name), mode="r")

    def channel_tokens(self, unit: str = "cell"):
        """(N, G*D) per-channel tokens side by side: ``tokens(unit, "concat")``."""
        return self.tokens(unit, "concat")

    def table(self, unit: str = "cell") -> pd.DataFrame:
        """One row per token of ``unit``: plate, well, site, unit columns, metadata columns."""
        u = self._unit(unit)
        if u not in self._tables:
            self._tables[u] = pd.read_parquet(self.path / u / "table.parquet")
        return self._tables[u].copy()

    # -- per site ----------------------------------------------------------------------------

    def sites(self) -> pd.DataFrame:
        """One row per site, in row order: plate, well, site, site_id, height, width, rows, cols
        (patch grid), cells (where its labels came from), labels (kept or not), and
        ``{unit}_start``, ``{unit}_count`` (its rows in that unit's tokens and table)."""
        if self._sites is None:
            self._sites = pd.read_parquet(self.path / "sites.parquet")
        return self._sites.copy()

    def _site(self, key) -> pd.Series:
        if self._site_index is None:
            s = self.sites()
            self._site_index = {
                SiteKey(p, w, int(i)): n
                for n, (p, w, i) in enumerate(zip(s.plate, s.well, s.site, strict=True))
            }
        try:
            k = SiteKey.of(key)
        except Exception as exc:
            raise StoreError(f"{key!r} is not a site key (plate, well, site): {exc}") from exc
        if k not in self._site_index:
            raise StoreError(f"site {tuple(k)} is not in the store at {self.path}")
        return self._sites.iloc[self._site_index[k]]

    def __contains__(self, key) -> bool:
        try:
            self._site(key)
        except StoreError:
            return False
        return True

    def site_rows(self, unit: str, key) -> slice:
        """The rows of one site in ``tokens(unit)`` and ``table(unit)``."""
        r = self._site(key)
        u = self._unit(unit)
        start = int(r[f"{u}_start"])
        return slice(start, start + int(r[f"{u}_count"]))

    def site_tokens(self, unit: str, key, form: str = "mean") -> np.ndarray:
        """(n, width) tokens of one site and unit in one form, read from the store."""
        return np.asarray(self.tokens(unit, form)[self.site_rows(unit, key)])

    def patch_grid(self, key, form: str = "mean") -> np.ndarray:
        """(rows, cols, width) float16 patch tokens of one site (width: ``token_width(form)``)."""
        r = self._site(key)
        data = self.site_tokens("patch", key, form)
        return data.reshape(int(r.rows), int(r.cols), self.token_width(form))

    def quality(self) -> pd.DataFrame | None:
        """The segmentation quality table (:mod:`.segment_qc`): one row per site with plate,
        well, site and the measures, flag and reason; None when no site's was known (labels
        given as files without nuclei, or no cells)."""
        sites = self.sites()
        cols = [c for c in sites.columns if c.startswith("qc_")]
        if not cols:
            return None
        table = sites[["plate", "well", "site", *cols]].rename(
            columns=lambda c: c.removeprefix("qc_")
        )
        table = table[sites[cols].notna().any(axis=1)].reset_index(drop=True)
        if "flag" in table:
            table["flag"] = table["flag"].fillna(False).astype(bool)
        for c in ("reason", "stains_left_out"):
            if c in table:
                table[c] = table[c].fillna("").astype(str)
        return table

    def describe(self) -> list[str]:
        """Lines for a person (``concept-discovery info STORE``): where it came from, what it
        holds, and its segmentation quality with the flagged sites."""
        from ..segment.qc import summary

        sites = self.sites()
        counts = self.attrs.get("counts", {})
        plate = self.plate_source.get("path") or self.signature.get("plate_root", "?")
        held = ", ".join(f"{counts.get(u, 0)} {u} tokens" for u in UNITS)
        precision = self.signature.get("precision")
        lines = [
            f"store:    {self.path}",
            f"plate:    {plate}",
            f"model:    {self.model_id} (block {self.block}, width {self.embed_dim}"
            + (f", {precision}" if precision else "")
            + ")",
            f"sites:    {len(sites)} in {sites['plate'].nunique()} plate(s), "
            f"{sites[['plate', 'well']].drop_duplicates().shape[0]} wells",
            f"tokens:   {held}",
            f"channels: {', '.join(self.channel_names) or '?'}"
            + (f" ({self.token_groups} stain tokens per cell)" if self.token_groups > 1 else ""),
            f"cells:    {self.embed_settings.get('cells', '?')}",
            f"size:     {self.nbytes()['total'] / 1e6:.1f} MB",
        ]
        quality = self.quality()
        lines += (
            summary(quality)
            if quality is not None
            else ["quality:  no table (cells from label files without nuclei)"]
        )
        return lines

    def nbytes(self) -> dict[str, int]:
        """Bytes on disk per part of the store: each unit, labels, and ``total``."""
        sizes = {}
        for part in (*UNITS, "labels"):
            folder = self.path / part
            sizes[part] = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
        sizes["total"] = sum(f.stat().st_size for f in self.path.rglob("*") if f.is_file())
        return sizes

    def size_per_site(self) -> float:
        """Mean bytes on disk per site."""
        return self.nbytes()["total"] / max(1, len(self.sites()))

    def has_site_labels(self, key) -> bool:
        """Whether the store keeps cell labels for this site (not when embedded without cells)."""
        return bool(self._site(key)["labels"])

    def site_labels(self, key) -> np.ndarray:
        """(H, W) int32 cell labels the site's cell tokens were pooled over."""
        r = self._site(key)
        if not r["labels"]:
            raise StoreError(
                f"site {tuple(SiteKey.of(key))} of the store at {self.path} has no cell labels "
                f"(embedded with cells={self.embed_settings.get('cells', 'none')!r})"
            )
        path = self.path / "labels" / r["site_id"]
        return np.asarray(zarr.open_array(str(path), mode="r")[...])

    def __len__(self) -> int:
        return int(self.attrs.get("counts", {}).get("cell", 0))

    def __repr__(self) -> str:
        counts = self.attrs.get("counts", {})
        return (
            f"ActivationStore({str(self.path)!r}, model={self.model_id!r}, block={self.block}, "
            f"D={self.embed_dim}, {counts})"
        )
