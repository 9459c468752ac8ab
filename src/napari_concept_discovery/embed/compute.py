"""Embedding compute: an image -> tiles -> tokens of one block -> patch grid, crop and cell tokens.

Pure compute: no files, no store. Reading a plate, choosing each site's cell labels and writing
the activation store live in :mod:`.plate_embedding`. See docs/architecture.md, "Tokens".

Edge rule: a site is padded at the bottom and right by reflection up to a multiple of the tile
size (256) and cut into non-overlapping tiles; the patch grid keeps only the ``ceil(H/16) x
ceil(W/16)`` patches that touch real pixels, so patches made only of padding never reach a grid,
a crop token or a cell. A crop token is the mean of a tile's kept patch tokens (the unit of the
paper). A cell token is the mean of the patch tokens weighted by how many of the cell's pixels
fall in each patch (its coverage), computed for all cells at once as one sparse matrix product.
For channel-agnostic models a patch token is the mean over its channel tokens; the per-channel
tokens are returned on request (``channel_tokens=True``).

Tiles from consecutive sites share batches, so small sites do not starve the model of work.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from ..errors import ModelError, PlateError
from ..models import Backend
from ..progress import Cancel, is_cancelled
from ..settings import PRECISIONS


@dataclass
class SiteTokens:
    """Tokens of one site. Arrays are float32; per-channel arrays are None unless asked for.

    ``labels`` is the (H, W) int32 cell label image the cell tokens were pooled over (None when
    the site was embedded without cells): row ``i`` of ``cell_tokens`` is label
    ``cell_table.label[i]`` in it.
    """

    key: Any
    patch_grid: np.ndarray  # (rows, cols, D)
    crop_tokens: np.ndarray  # (T, D)
    crop_table: pd.DataFrame  # tile_row, tile_col, y0, x0, n_patches
    cell_tokens: np.ndarray  # (N, D)
    cell_table: pd.DataFrame  # label, centroid_y, centroid_x, area
    patch_channels: np.ndarray | None = None  # (rows, cols, G, D)
    crop_channels: np.ndarray | None = None  # (T, G, D)
    cell_channels: np.ndarray | None = None  # (N, G, D)
    shape: tuple[int, int] = (0, 0)  # (H, W) of the site
    meta: dict = field(default_factory=dict)
    labels: np.ndarray | None = None  # (H, W) int32


def check_image(image: np.ndarray, where: str = "site") -> np.ndarray:
    """(C, H, W) view of an image, or a PlateError naming what is wrong with it."""
    a = np.asarray(image)
    if a.ndim == 2:
        a = a[None]
    if a.ndim != 3:
        raise PlateError(f"{where}: expected a (C, H, W) image, got shape {a.shape}")
    if a.size == 0 or 0 in a.shape:
        raise PlateError(f"{where}: empty image (shape {a.shape})")
    if a.dtype.kind == "f" and not np.isfinite(a).all():
        bad = [i for i in range(a.shape[0]) if not np.isfinite(a[i]).all()]
        raise PlateError(f"{where}: NaN or infinite values in channel(s) {bad}")
    if a.dtype.kind not in "uif":
        raise PlateError(f"{where}: unsupported pixel type {a.dtype}")
    return a


def tile_image(image01: np.ndarray, tile: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Reflect-pad (C, H, W) to multiples of ``tile`` and cut it: (T, C, tile, tile), (tr, tc)."""
    c, h, w = image01.shape
    tr, tc = math.ceil(h / tile), math.ceil(w / tile)
    ph, pw = tr * tile - h, tc * tile - w
    if ph or pw:
        mode = "reflect" if h > 1 and w > 1 else "edge"
        image01 = np.pad(image01, ((0, 0), (0, ph), (0, pw)), mode=mode)
    tiles = image01.reshape(c, tr, tile, tc, tile).transpose(1, 3, 0, 2, 4)
    return np.ascontiguousarray(tiles.reshape(tr * tc, c, tile, tile)), (tr, tc)


def coverage_matrix(labels: np.ndarray, patch: int, rows: int, cols: int):
    """Sparse (n_cells, rows*cols) pixel counts per cell and patch; cell ids; pixel coords.

    Returns ``(matrix, ids, ys, xs, inverse)`` where ``inverse`` maps each labelled pixel to its
    row in ``ids``.

    One ``np.bincount`` over (cell, patch) pairs of the labelled pixels; no per-cell loop.
    """
    lab = np.asarray(labels)
    h, w = lab.shape
    ys, xs = np.nonzero(lab)
    if ys.size == 0:
        empty = np.zeros(0, np.int64)
        return sp.csr_matrix((0, rows * cols), dtype=np.float64), empty, ys, xs, empty
    ids, inv = np.unique(lab[ys, xs], return_inverse=True)
    pidx = (ys // patch) * cols + (xs // patch)
    n = ids.size
    pair = inv.astype(np.int64) * (rows * cols) + pidx
    counts = np.bincount(pair, minlength=n * rows * cols)
    nz = np.flatnonzero(counts)
    mat = sp.csr_matrix(
        (counts[nz].astype(np.float64), (nz // (rows * cols), nz % (rows * cols))),
        shape=(n, rows * cols),
    )
    return mat, ids.astype(np.int64), ys, xs, inv


def pool_cells(
    labels: np.ndarray,
    patch_flat: np.ndarray,
    patch: int,
    rows: int,
    cols: int,
    channel_flat: np.ndarray | None = None,
):
    """Cell tokens (N, D), their table, and optional per-channel cell tokens (N, G, D)."""
    mat, ids, ys, xs, inv = coverage_matrix(labels, patch, rows, cols)
    if ids.size == 0:
        d = patch_flat.shape[1]
        empty = pd.DataFrame(
            {
                "label": np.zeros(0, np.int64),
                "centroid_y": np.zeros(0),
                "centroid_x": np.zeros(0),
                "area": np.zeros(0, np.int64),
            }
        )
        ch = None
        if channel_flat is not None:
            ch = np.zeros((0, *channel_flat.shape[1:]), np.float32)
        return np.zeros((0, d), np.float32), empty, ch
    area = np.bincount(inv, minlength=ids.size)
    cy = np.bincount(inv, weights=ys, minlength=ids.size) / area
    cx = np.bincount(inv, weights=xs, minlength=ids.size) / area
    weights = sp.diags(1.0 / area) @ mat  # rows sum to 1: each patch weighted by its coverage
    tokens = np.asarray(weights @ patch_flat.astype(np.float64), dtype=np.float32)
    ch = None
    if channel_flat is not None:
        g, d = channel_flat.shape[1:]
        ch = np.asarray(
            weights @ channel_flat.reshape(-1, g * d).astype(np.float64), dtype=np.float32
        ).reshape(-1, g, d)
    table = pd.DataFrame({"label": ids, "centroid_y": cy, "centroid_x": cx, "area": area})
    return tokens, table, ch


# Precision of the forward pass (PRECISIONS): full float32; bfloat16 (the weights cast once to
# bf16, so every matrix product and the attention run in bf16 without per-call casts; the
# input is standardised in fp32 first and the tokens come back as fp32), for CPUs with native
# bf16 (AVX512-BF16 / AMX) and GPUs; or the Linear layers' weights quantised to int8 with
# per-batch dynamic activation scales (CPU). "auto" picks bf16 where it is native, else fp32
# (resolve_precision). benchmarks/bench_embed.py measures tiles/s and token cosine.


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (oneDNN's check: AVX512-BF16 or AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """The precision a run uses: ``auto`` is bf16 on a GPU or a CPU with native bf16, else fp32.

    Apple MPS stays at fp32 (its bf16 support varies by OS version). Any other value is
    returned as given (``check_precision`` judges it).
    """
    if precision != "auto":
        return precision
    dev = torch.device(device)
    if dev.type == "cuda" or (dev.type == "cpu" and cpu_has_bf16()):
        return "bf16"
    return "fp32"


def auto_precision_reason(device: torch.device | str) -> str:
    """Why ``auto`` resolves as it does on ``device``, for a person ("this CPU has native
    bf16"): the Embed widget's precision choice and ``embed``'s output say it beside the
    resolved precision, so a user knows which arithmetic made their tokens."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return "a GPU"
    if dev.type == "cpu":
        return "this CPU has native bf16" if cpu_has_bf16() else "this CPU has no native bf16"
    return f"{dev.type}: its bf16 support varies"


def check_precision(precision: str, device: torch.device) -> None:
    """Raise ModelError when ``precision`` is unknown or cannot run (fast) on ``device``."""
    if precision not in PRECISIONS:
        raise ModelError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    if precision == "bf16" and device.type == "cpu" and not cpu_has_bf16():
        raise ModelError(
            "precision bf16: this CPU has no native bfloat16 arithmetic (AVX512-BF16 or AMX), "
            "where bf16 is slower than fp32; use precision fp32"
        )
    if precision == "int8" and device.type != "cpu":
        raise ModelError(f"precision int8 (dynamic quantisation) runs on the CPU, not {device}")


def with_precision(backend: Backend, precision: str) -> Backend:
    """``backend`` as it runs at ``precision``: itself for fp32; otherwise a shallow copy whose
    module is a converted deep copy (bf16 weights, or int8-quantised Linear layers), so the
    caller's backend keeps its float32 weights."""
    check_precision(precision, backend.device)
    if precision == "fp32":
        return backend
    import copy

    converted = copy.copy(backend)
    if precision == "bf16":
        converted.model = copy.deepcopy(backend.module).to(torch.bfloat16)
        return converted
    import warnings

    from torch.ao.quantization import quantize_dynamic

    with warnings.catch_warnings():  # torch marks its quantised tensor types as deprecated
        warnings.filterwarnings("ignore", ".*quantize_per_tensor.*deprecated", UserWarning)
        warnings.filterwarnings("ignore", ".*torch.ao.quantization.*deprecated", DeprecationWarning)
        converted.model = quantize_dynamic(
            copy.deepcopy(backend.module), {torch.nn.Linear}, dtype=torch.qint8
        )
    return converted


@dataclass
class _Pending:
    key: Any
    shape: tuple[int, int]
    layout: tuple[int, int]
    labels: np.ndarray | None
    meta: dict
    n_tiles: int
    outputs: list = field(default_factory=list)  # per tile: (G, N, D) or (N, D)


class Embedder:
    """Runs a backend over sites: tiling, batching across sites, device, pooling.

    ``Embedder(backend, block).embed(image, labels)`` for one site; ``iter_sites`` for many.
    """

    def __init__(
        self,
        backend: Backend,
        block: int | None = None,
        batch_size: int = 16,
        channel_tokens: bool = False,
        precision: str = "fp32",
    ):
        precision = resolve_precision(precision, backend.device)
        self.backend = with_precision(backend, precision)
        self.precision = precision
        self.block = backend.resolve_block(block)
        self.batch_size = max(1, int(batch_size))
        self.channel_tokens = bool(channel_tokens)
        self.tiles_done = 0

    # -- core --------------------------------------------------------------------------------

    def run_tiles(self, tiles: np.ndarray) -> torch.Tensor:
        """Tokens (T, G, N, D) float32 on CPU for a stack of [0, 1] tiles, in batches."""
        dev = self.backend.device
        outs = []
        with torch.inference_mode():
            for i in range(0, len(tiles), self.batch_size):
                x = torch.from_numpy(tiles[i : i + self.batch_size]).to(dev, non_blocking=True)
                outs.append(self.backend.tokens(x, self.block).float().cpu())
        self.tiles_done += len(tiles)
        return torch.cat(outs) if outs else torch.zeros(0)

    def prepare(self, image: np.ndarray, where: str = "site") -> tuple[np.ndarray, tuple]:
        a = check_image(image, where)
        try:
            self.backend.check_channels(a.shape[0])
        except ModelError as exc:
            raise ModelError(f"{where}: {exc}") from exc
        unit = self.backend.scale_to_unit(a)
        tiles, layout = tile_image(unit, self.backend.tile_size)
        return tiles, layout

    def finish(
        self, key, shape, layout, tile_tokens: torch.Tensor, labels, meta=None
    ) -> SiteTokens:
        """Assemble grids, crops and cells of one site from its tiles' tokens (T, G, N, D)."""
        p, tile = self.backend.patch_size, self.backend.tile_size
        side = tile // p
        h, w = shape
        rows, cols = math.ceil(h / p), math.ceil(w / p)
        tr, tc = layout
        t, g, n, d = tile_tokens.shape
        mean = tile_tokens.mean(dim=1).numpy()  # (T, N, D)
        grid = mean.reshape(tr, tc, side, side, d).transpose(0, 2, 1, 3, 4)
        grid = grid.reshape(tr * side, tc * side, d)[:rows, :cols]
        chan_grid = None
        if self.channel_tokens:
            cg = tile_tokens.numpy().reshape(tr, tc, g, side, side, d).transpose(0, 3, 1, 4, 2, 5)
            chan_grid = np.ascontiguousarray(cg.reshape(tr * side, tc * side, g, d)[:rows, :cols])

        crop_rows, crop_tok, crop_ch = [], [], []
        for i in range(tr):
            for j in range(tc):
                r0, c0 = i * side, j * side
                sub = grid[r0 : r0 + side, c0 : c0 + side]
                crop_tok.append(sub.reshape(-1, d).mean(0))
                if chan_grid is not None:
                    crop_ch.append(
                        chan_grid[r0 : r0 + side, c0 : c0 + side].reshape(-1, g, d).mean(0)
                    )
                crop_rows.append(
                    {
                        "tile_row": i,
                        "tile_col": j,
                        "y0": i * tile,
                        "x0": j * tile,
                        "n_patches": int(sub.shape[0] * sub.shape[1]),
                    }
                )
        crop_table = pd.DataFrame(crop_rows)

        flat = np.ascontiguousarray(grid.reshape(-1, d))
        lab = None
        if labels is not None:
            lab = np.asarray(labels, dtype=np.int32)
            if lab.shape != (h, w):
                raise PlateError(f"{key}: labels of shape {lab.shape} do not match image {(h, w)}")
            ch_flat = chan_grid.reshape(-1, g, d) if chan_grid is not None else None
            cells, cell_table, cell_ch = pool_cells(lab, flat, p, rows, cols, ch_flat)
        else:
            cells = np.zeros((0, d), np.float32)
            cell_table = pd.DataFrame(
                {
                    "label": np.zeros(0, np.int64),
                    "centroid_y": [],
                    "centroid_x": [],
                    "area": np.zeros(0, np.int64),
                }
            )
            cell_ch = np.zeros((0, g, d), np.float32) if chan_grid is not None else None
        return SiteTokens(
            key=key,
            patch_grid=np.ascontiguousarray(grid, dtype=np.float32),
            crop_tokens=np.stack(crop_tok).astype(np.float32),
            crop_table=crop_table,
            cell_tokens=cells,
            cell_table=cell_table,
            patch_channels=chan_grid,
            crop_channels=np.stack(crop_ch).astype(np.float32) if crop_ch else None,
            cell_channels=cell_ch,
            shape=(h, w),
            meta=meta or {},
            labels=lab,
        )

    # -- public ------------------------------------------------------------------------------

    def embed(
        self, image: np.ndarray, labels: np.ndarray | None = None, key: Any = None
    ) -> SiteTokens:
        """Tokens of one site (C, H, W) with optional cell labels (H, W)."""
        tiles, layout = self.prepare(image, str(key or "site"))
        out = self.run_tiles(tiles)
        return self.finish(key, image.shape[-2:], layout, out, labels)

    def iter_sites(
        self,
        items: Iterable[tuple[Any, np.ndarray, np.ndarray | None, dict]],
        cancel: Cancel = None,
    ) -> Iterator[SiteTokens]:
        """Embed (key, image, labels, meta) items in order; tiles of neighbours share batches."""
        pending: deque[_Pending] = deque()
        queue: list[tuple[_Pending, np.ndarray]] = []  # (site, tiles not yet run)
        queued = 0

        def run_batch(limit: int) -> None:
            nonlocal queued
            take, count = [], 0
            while queue and count < limit:
                site, tiles = queue[0]
                k = min(len(tiles), limit - count)
                take.append((site, tiles[:k]))
                count += k
                if k == len(tiles):
                    queue.pop(0)
                else:
                    queue[0] = (site, tiles[k:])
            stacked = np.concatenate([t for _, t in take]) if len(take) > 1 else take[0][1]
            out = self.run_tiles(stacked)
            i = 0
            for site, t in take:
                site.outputs.append(out[i : i + len(t)])
                i += len(t)
            queued -= count

        def ready() -> Iterator[SiteTokens]:
            while pending and sum(len(o) for o in pending[0].outputs) == pending[0].n_tiles:
                s = pending.popleft()
                yield self.finish(s.key, s.shape, s.layout, torch.cat(s.outputs), s.labels, s.meta)

        for key, image, labels, meta in items:
            if is_cancelled(cancel):
                return
            tiles, layout = self.prepare(image, str(key))
            site = _Pending(key, tuple(image.shape[-2:]), layout, labels, meta, len(tiles))
            pending.append(site)
            queue.append((site, tiles))
            queued += len(tiles)
            while queued >= self.batch_size:
                run_batch(self.batch_size)
                yield from ready()
        while queued:
            if is_cancelled(cancel):
                return
            run_batch(self.batch_size)
            yield from ready()


def embed_site(
    image: np.ndarray,
    backend: Backend,
    block: int | None = None,
    labels: np.ndarray | None = None,
    batch_size: int = 16,
    channel_tokens: bool = False,
    precision: str = "fp32",
) -> SiteTokens:
    """Tokens of one (C, H, W) site; see the module docstring for the edge and pooling rules."""
    return Embedder(backend, block, batch_size, channel_tokens, precision).embed(image, labels)
