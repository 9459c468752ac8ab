"""Embedding a plate into an activation store: settings, each site's cell labels, resume.

The compute (tiles in, token grids and pooled tokens out) is :mod:`.embed`; this module decides
what goes in (which sites, which cell labels), runs it with progress and cancel, and writes the
store (:mod:`.store`). It also embeds one site on demand exactly as a store was built, from the
plate and model the store records. See docs/architecture.md,
"One room per step" and "The activation store".

Which cell labels a site uses is one rule, :func:`site_inputs`: ``cells="none"``: none;
``"segment"``: segment the site; ``"file"``: the label file the plate gives the site (from a
label folder, see :mod:`.plate.labels`, else the layout's own), an error when it has none;
``"auto"``: that file when there is one, else segment. The same answer names the files whose
bytes sign the site in the store, so the labels used and the signature cannot disagree.

Heavy modules (torch, zarr, scikit-image) are imported where they are used, so that the CLI
can build its options from :class:`EmbedSettings` without loading them.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import warnings
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import PlateError, StoreError
from ..progress import Cancel, ProgressCallback, is_cancelled, report
from ..settings import (
    PRECISIONS,
    SEGMENT_ALGORITHM,
    SegmentSettings,
    Settings,
    check,
    option,
)

if TYPE_CHECKING:
    import numpy as np

    from ..models import Backend
    from ..plate import Plate, Site
    from .compute import SiteTokens
    from .store import ActivationStore

#: Where a site's cells come from: its label file, segmentation, the file else segmentation
#: ("auto"), or no cells.
CELL_SOURCES = ("auto", "file", "segment", "none")
CHANNEL_RULES = ("per-channel", "mean", "identity")


@dataclass
class EmbedSettings(Settings):
    """How a plate is embedded: model, block, batching, device and where cells come from."""

    model: str = option(
        "default",
        "model source: default (bundled, offline) | openphenom (= hf-hub:recursionpharma/"
        "OpenPhenom) | hf-hub:<owner>/<name>[@<revision>] | timm:<name> (cached pretrained "
        "weights) | timm:<name>:random | a model folder | a weights file; options after '?': "
        "arch=, channel_rule=, seed=; `concept-discovery models` lists what is available",
        label="model",
    )
    arch: str | None = option(
        None, "timm model name of a bare timm checkpoint file or folder (same as ?arch=)"
    )
    channel_rule: str | None = option(
        None,
        "how a plate's channels feed a fixed-channel timm model (same as ?channel_rule=; "
        "default per-channel); channel-agnostic models take every channel as it is",
        choices=CHANNEL_RULES,
    )
    block: int | None = option(
        None,
        "block index from 0, negative from the end (default: the model's recommended block)",
        min=-64,
        max=64,
    )
    batch_size: int = option(16, "tiles per forward pass")
    precision: str = option(
        "auto",
        "arithmetic of the forward pass: auto (bf16 on a GPU or a CPU with native bf16, "
        "AVX512-BF16/AMX; fp32 elsewhere) | fp32 | bf16 (weights in bfloat16; tokens at cosine "
        ">= 0.999 to fp32) | int8 (dynamically quantised Linear layers, CPU); the store records "
        "the precision used; benchmarks/bench_embed.py measures what each gives",
        choices=("auto", *PRECISIONS),
    )
    device: str | None = option(None, "cuda | mps | cpu (default: best available)")
    cells: str = option(
        "auto",
        "cell labels: the plate's label files, else segmentation (auto); only files (file); "
        "always segment (segment); no cell tokens (none)",
        choices=CELL_SOURCES,
        label="cell labels",
    )
    segment: SegmentSettings = option(
        help="how sites without label files are segmented: of these settings embedding applies "
        "the nuclear stain, the segmenter and its Cellpose model; for every other one run "
        "`concept-discovery segment` first, and embedding uses its labels",
        default_factory=SegmentSettings,
        cli=False,
    )
    channel_tokens: bool | None = option(
        None,
        "keep the per-channel tokens too, side by side (C x D), the dictionaries' default input; "
        "default: yes for models that give one token per channel (channel-agnostic ViTs, timm "
        "models with the per-channel rule) on plates of more than one channel",
    )
    labels: str | None = option(
        None,
        "folder of cell labels: as `concept-discovery segment --out` writes them "
        "(<plate>/<well>_s<site>_cells.tif), CellProfiler masks or label images and Cellpose "
        "_seg.npy/_cp_masks files named after the site's images, or a folder followed by a "
        "filename pattern (DIR/{well}_s{site}_*.png); by default <plate folder>/segmentation "
        "is used when a finished segmentation is there",
        label="label folder",
    )

    def __post_init__(self) -> None:
        if isinstance(self.segment, dict):  # from to_dict / a store's attributes
            self.segment = segment_settings(self.segment)
        super().__post_init__()

    def validate(self) -> None:
        check(bool(str(self.model).strip()), "model", "name a model (e.g. default)")
        check(self.batch_size >= 1, "batch_size", f"must be at least 1, got {self.batch_size}")
        check(
            isinstance(self.segment, SegmentSettings),
            "segment",
            f"must be SegmentSettings, got {type(self.segment).__name__}",
        )
        others = [
            f.name
            for f in dataclasses.fields(SegmentSettings)
            if f.name not in EMBED_SEGMENT_FIELDS
            and getattr(self.segment, f.name) != getattr(_SEGMENT_DEFAULTS, f.name)
        ]
        check(
            not others,
            "segment",
            f"embedding segments with {', '.join(EMBED_SEGMENT_FIELDS)} only; for "
            f"{', '.join(others)} run `concept-discovery segment` first and embed its labels",
        )


#: What of :class:`SegmentSettings` embedding applies to the sites it segments (and signs them
#: by); the rest keep their defaults.
EMBED_SEGMENT_FIELDS = ("nuclear", "segmenter", "cellpose_model")
_SEGMENT_DEFAULTS = SegmentSettings()


def segment_settings(recorded: Mapping[str, Any]) -> SegmentSettings:
    """Segmentation settings from a record, the keys this version does not know left out."""
    known = {f.name for f in dataclasses.fields(SegmentSettings)}
    return SegmentSettings.from_dict({k: v for k, v in recorded.items() if k in known})


def load_embed_model(settings: EmbedSettings) -> Backend:
    """The backend ``settings`` name, on its device."""
    from ..models import load_model

    return load_model(
        settings.model, settings.device, arch=settings.arch, channel_rule=settings.channel_rule
    )


def keeps_channels(backend: Backend, n_channels: int) -> bool:
    """Whether ``backend`` gives one token per channel for an image of ``n_channels`` channels.

    Channel-agnostic ViTs always do; a timm ViT does under the per-channel rule (its ``mean``
    and ``identity`` rules give one token per patch). One channel has nothing to keep apart.
    """
    return n_channels > 1 and getattr(backend, "channel_rule", "per-channel") == "per-channel"


def resolve_channel_tokens(settings: EmbedSettings, backend: Backend, n_channels: int) -> bool:
    """``settings.channel_tokens`` when given, else whether the model keeps channels apart."""
    if settings.channel_tokens is None:
        return keeps_channels(backend, n_channels)
    return bool(settings.channel_tokens)


def model_source(backend: Backend) -> str:
    """What ``load_model`` takes to build ``backend`` again (its id when it has no source)."""
    return getattr(backend, "source", "") or backend.model_id


# --- which labels a site uses: one rule ---------------------------------------------------


@dataclass(frozen=True)
class SiteInputs:
    """What decides a site's tokens besides the model: its image files and its cell labels.

    ``cells`` is where this site's labels come from: "file" (``labels_path``), "segment"
    (with ``nuclear``) or "none".
    """

    key: Any
    images: tuple[Path, ...]
    cells: str
    labels_path: Path | None = None
    nuclear: str | None = None
    #: the user's label files (plate.label_files): a binary mask is split by these nuclei
    split_by: Path | None = None
    user: bool = False
    #: with cells="segment": the segmenter (SEGMENTERS) and, for Cellpose, its model
    segmenter: str = "classical"
    cellpose_model: str | None = None

    @property
    def files(self) -> list[Path]:
        """Files whose bytes decide the site's tokens, in a fixed order (for the signature)."""
        labels = [p for p in (self.labels_path, self.split_by) if p is not None]
        return [*self.images, *labels]

    @property
    def token(self) -> str:
        """How the labels are made, beyond the files' bytes (for the signature)."""
        if self.cells == "file" and self.user and self.split_by is None:
            # a binary mask is split by our own nuclei of this stain
            return f"file:nuclei:{self.nuclear}:{SEGMENT_ALGORITHM}"
        if self.cells != "segment":
            return self.cells
        if self.segmenter == "cellpose":
            return f"segment:{self.nuclear}:cellpose:{self.cellpose_model}"
        if self.segmenter != "classical":
            return f"segment:{self.nuclear}:{self.segmenter}"
        return f"segment:{self.nuclear}:{SEGMENT_ALGORITHM}"

    def read_labels(self, image: np.ndarray, channel_names) -> np.ndarray | None:
        """The site's (H, W) int32 cell labels, or None for ``cells="none"``."""
        return self.read_labels_and_quality(image, channel_names)[0]

    def read_labels_and_quality(
        self, image: np.ndarray, channel_names
    ) -> tuple[np.ndarray | None, dict | None]:
        """The site's cell labels and their quality (:func:`.segment_qc.site_qc`), when its
        nuclei are known: segmented here, or read from a label folder of ours (its ``qc.csv``
        row, which also names the stains left out, else the nuclei file beside the cells)."""
        from ..segment.qc import site_qc

        if self.cells == "segment":
            from ..segment.classical import StainWarning

            segment = _segmenter(self.segmenter, self.cellpose_model, self.nuclear)
            try:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always", StainWarning)
                    nuclei, cells = segment(image, channel_names)
            except ValueError as exc:
                raise PlateError(
                    f"{self.key}: cannot segment cells: {exc}; name the nuclear stain (--nuclear), "
                    "give a label folder (--labels) or embed without cells (--cells none)"
                ) from exc
            left_out = [
                str(w.message).replace(" left out of the cell foreground", "")
                for w in caught
                if issubclass(w.category, StainWarning)
            ]
            from ..segment.site import quality_channels

            try:
                stains = quality_channels(SegmentSettings(nuclear=str(self.nuclear)), channel_names)
                channels = stains(image)
            except ValueError:
                channels = []
            return cells, site_qc(nuclei, cells, left_out, image=image, channels=channels)
        labels = self._read_labels(image, channel_names)
        quality = None
        if self.cells == "file" and not self.user and self.labels_path is not None:
            quality = _folder_quality(self.labels_path, self.key, labels)
        return labels, quality

    def _read_labels(self, image: np.ndarray, channel_names) -> np.ndarray | None:
        if self.cells == "none":
            return None
        if self.cells == "file":
            from ..plate.label_images import own_nuclei, read_user_labels

            if self.user:
                split = None
                if self.split_by is None:
                    split = own_nuclei(lambda: image, channel_names, self.nuclear)
                return read_user_labels(
                    self.labels_path, self.split_by, image.shape[-2:], nuclei_from=split
                )[0]
            from ..plate.io import read_labels

            labels = read_labels(self.labels_path)
            if labels.shape != tuple(image.shape[-2:]):
                raise PlateError(
                    f"cell labels {self.labels_path} have shape {labels.shape} but the images "
                    f"of {self.key} are {tuple(image.shape[-2:])}"
                )
            return labels
        segment = _segmenter(self.segmenter, self.cellpose_model, self.nuclear)
        try:
            return segment(image, channel_names)[1]
        except ValueError as exc:
            raise PlateError(
                f"{self.key}: cannot segment cells: {exc}; name the nuclear stain (--nuclear), "
                "give a label folder (--labels) or embed without cells (--cells none)"
            ) from exc


def _folder_quality(cells_path: Path, key, cells: np.ndarray) -> dict | None:
    """A site's row of its label folder's ``qc.csv``, else measured from the nuclei file
    beside its cells file; None without either."""
    from ..segment.qc import QC_FILE, read_qc, site_qc

    plate_folder = Path(cells_path).parent
    for folder in (plate_folder.parent, plate_folder):
        if (folder / QC_FILE).is_file():
            table = read_qc(folder)
            match = table[
                (table["plate"].astype(str) == str(key.plate))
                & (table["well"].astype(str) == str(key.well))
                & (table["site"].astype(int) == int(key.site))
            ]
            if len(match):
                row = match.iloc[0].to_dict()
                return {k: row[k] for k in row if k not in ("plate", "well", "site")}
    nuclei_path = Path(str(cells_path).replace("_cells", "_nuclei"))
    if nuclei_path != Path(cells_path) and nuclei_path.is_file():
        from ..plate.io import read_labels

        nuclei = read_labels(nuclei_path)
        if nuclei.shape == cells.shape:
            return site_qc(nuclei, cells)
    return None


@functools.lru_cache(maxsize=2)
def _segmenter(segmenter: str, cellpose_model: str | None, nuclear: str):
    """One segmenter per plate and settings, so that a Cellpose model loads once, not per site."""
    from ..segment.site import channel_ref, make_segmenter

    return make_segmenter(
        SegmentSettings(
            segmenter=segmenter,
            nuclear=str(channel_ref(nuclear)),
            cellpose_model=cellpose_model or SegmentSettings.cellpose_model,
        )
    )


def site_inputs(
    site: Site,
    cells: str = "auto",
    nuclear: str | int = "DNA",
    segmenter: str = "classical",
    cellpose_model: str | None = None,
) -> SiteInputs:
    """The rule for a site's cell labels (module docstring), decided without reading pixels."""
    if cells not in CELL_SOURCES:
        raise PlateError(f"cells must be one of {', '.join(CELL_SOURCES)}, got {cells!r}")
    images = tuple(Path(p) for p in site.paths)
    path = getattr(site, "labels_path", None)
    if cells == "none":
        return SiteInputs(site.key, images, "none")
    if cells in ("auto", "file") and path is not None:
        if getattr(site, "user_labels", False):
            nuclei = getattr(site, "nuclei_path", None)
            split_by = Path(nuclei) if nuclei is not None else None
            return SiteInputs(
                site.key,
                images,
                "file",
                Path(path),
                nuclear=str(nuclear) if split_by is None else None,
                split_by=split_by,
                user=True,
            )
        return SiteInputs(site.key, images, "file", Path(path))
    if cells == "file":
        raise PlateError(
            f"{site.key}: no label image for this site (cells='file'); give a label folder "
            "(--labels), let the cells be segmented (--cells auto) or embed without cells "
            "(--cells none)"
        )
    return SiteInputs(
        site.key,
        images,
        "segment",
        nuclear=str(nuclear),
        segmenter=segmenter,
        cellpose_model=_cellpose_name(cellpose_model) if segmenter == "cellpose" else None,
    )


def _cellpose_name(source: str | None) -> str | None:
    from ..segment.cellpose import cellpose_model_name

    return None if source is None else cellpose_model_name(source)


def plate_inputs(plate, settings: EmbedSettings) -> dict[Any, SiteInputs]:
    """Every site's :class:`SiteInputs` under ``settings``."""
    seg = settings.segment
    return {
        k: site_inputs(s, settings.cells, seg.nuclear, seg.segmenter, seg.cellpose_model)
        for k, s in plate.sites.items()
    }


def site_labels(
    site: Site,
    image: np.ndarray,
    cells: str = "auto",
    nuclear: str | int = "DNA",
    segmenter: str = "classical",
    cellpose_model: str | None = None,
) -> tuple[np.ndarray | None, SiteInputs]:
    """A site's cell labels by the rule, and the inputs (files, how) they came from."""
    inputs = site_inputs(site, cells, nuclear, segmenter, cellpose_model)
    return inputs.read_labels(image, site.channel_names), inputs


#: Where a site's segmentation quality rides along with its metadata to the store writer.
QUALITY_KEY = "_segment_quality"


def read_sites(
    plate: Plate,
    keys: Iterable,
    inputs: Mapping[Any, SiteInputs] | None = None,
    *,
    cells: str = "auto",
    nuclear: str | int = "DNA",
    prefetch: bool = True,
) -> Iterator[tuple[Any, np.ndarray, np.ndarray | None, dict]]:
    """(key, image, labels, metadata) per site, reading the next site on a thread meanwhile.

    ``inputs`` holds each site's :class:`SiteInputs`; sites without one follow the rule with
    ``cells`` and ``nuclear``.
    """

    def load(key):
        site = plate[key]
        image = site.read()
        how = inputs.get(key) if inputs is not None else None
        how = how or site_inputs(site, cells, nuclear)
        labels, quality = how.read_labels_and_quality(image, site.channel_names)
        meta = dict(site.metadata or {})
        if quality is not None:
            meta[QUALITY_KEY] = quality
        return key, image, labels, meta

    keys = list(keys)
    if not prefetch or len(keys) < 2:
        for k in keys:
            yield load(k)
        return
    with ThreadPoolExecutor(max_workers=1) as pool:
        fut = pool.submit(load, keys[0])
        for nxt in keys[1:]:
            cur = fut.result()
            fut = pool.submit(load, nxt)
            yield cur
        yield fut.result()


# --- a plate into a store ------------------------------------------------------------------


def _as_plate(plate, labels: str | None) -> Plate:
    """An open plate whose sites carry the labels of ``labels`` (a folder) when given."""
    from ..plate import Plate, open_plate
    from ..plate.labels import with_label_folder

    if not isinstance(plate, Plate):
        return open_plate(plate, labels=labels)
    if labels is None:
        return plate
    folder = Path(labels).expanduser().resolve()
    current = plate.label_folder.resolve() if plate.label_folder is not None else None
    return plate if current == folder else with_label_folder(plate, folder)


def embed_plate(
    plate,
    settings: EmbedSettings | None = None,
    out: str | os.PathLike | None = None,
    *,
    backend: Backend | None = None,
    progress: ProgressCallback = None,
    cancel: Cancel = None,
    overwrite: bool = False,
) -> ActivationStore | None:
    """Embed every site of a plate (a :class:`Plate` or its folder) into a store at ``out``.

    Returns the store, or None when ``cancel`` stopped it (the finished sites are kept, and the
    next call continues with the rest). A store whose signature matches is reused as is
    (``store.reused``); a stale one of the same plate, model, block and settings is rebuilt;
    a store of anything else is refused unless ``overwrite`` (then the new one is built beside
    it and replaces it once complete). A lock file beside ``out`` keeps a second writer out.
    Tokens that are not finite stop the run with an error naming the model and the site.
    ``backend`` is a model already loaded (else ``settings.model`` is loaded). Progress: stage
    "embed", done/total sites, info ``site``.
    """
    if settings is not None and not isinstance(settings, EmbedSettings):
        raise TypeError(
            f"embed_plate() takes EmbedSettings (a loaded model goes in backend=), got "
            f"{type(settings).__name__}"
        )
    settings = settings if settings is not None else EmbedSettings()
    if out is None:
        raise StoreError("no output folder given for the activation store")
    from .._files import check_output
    from .._lock import write_lock
    from .store import check_store_folder

    out = check_output(out, folder=True, what="activation store")
    check_store_folder(out)
    plate = _as_plate(plate, settings.labels)
    # Decided before the model loads, so a site without the labels asked for fails at once.
    inputs = plate_inputs(plate, settings)
    backend = backend if backend is not None else load_embed_model(settings)
    with write_lock(out, what="store", error=StoreError):
        fresh = not out.exists()
        try:
            return _embed_locked(plate, settings, out, inputs, backend, progress, cancel, overwrite)
        except BaseException:
            if fresh:
                _drop_if_empty(out)
            raise


def _drop_if_empty(out: Path) -> None:
    """Remove a store folder this run created when the run failed before any site was done:
    a refused embedding leaves nothing behind (a store with finished sites stays, to resume)."""
    import shutil

    parts = out / "parts"
    done = parts.is_dir() and any(
        (p / "part.json").is_file() for p in parts.iterdir() if not p.name.startswith(".")
    )
    if not done:
        shutil.rmtree(out, ignore_errors=True)


def store_writer(plate, settings: EmbedSettings, out, backend, inputs, overwrite: bool = False):
    """(StoreWriter, Embedder) for ``plate``: the settings resolved (channel tokens, block, model
    source) and recorded as the store signs them. One place, so a single process and a cluster's
    client and workers sign a store alike."""
    from .compute import Embedder
    from .store import StoreWriter

    channels = resolve_channel_tokens(settings, backend, len(plate.channel_names))
    embedder = Embedder(backend, settings.block, settings.batch_size, channels, settings.precision)
    record = settings.replace(
        model=model_source(backend),
        block=embedder.block,
        channel_tokens=channels,
        precision=embedder.precision,
    )
    writer = StoreWriter(
        out, plate, backend, embedder.block, inputs, settings=record.to_dict(), overwrite=overwrite
    )
    return writer, embedder


def _embed_locked(plate, settings, out, inputs, backend, progress, cancel, overwrite):
    """The body of :func:`embed_plate`, run while the store's lock is held."""
    writer, embedder = store_writer(plate, settings, out, backend, inputs, overwrite)
    todo = writer.begin()
    total = len(plate)
    done = total - len(todo)
    report(progress, "embed", done, total)
    items = read_sites(plate, todo, inputs)
    for st in embedder.iter_sites(items, cancel=cancel):
        check_finite(st, backend)
        writer.write_site(st)
        done += 1
        report(progress, "embed", done, total, site=str(st.key))
    if is_cancelled(cancel):
        return None
    store = writer.finish()
    store.reused = writer.reused
    return store


def model_file(backend: Backend) -> str:
    """The weights file (or source) a backend came from, for messages about its output."""
    source = model_source(backend)
    if source == "default":
        from ..models.loading import WEIGHTS_DIR

        return str(WEIGHTS_DIR / "default.safetensors")
    return source


def check_finite(st: SiteTokens, backend: Backend) -> None:
    """Refuse a site whose tokens hold NaN or Inf: damaged weights must not fill a store."""
    import numpy as np

    arrays = {
        "patch": st.patch_grid,
        "cell": st.cell_tokens,
        "crop": st.crop_tokens,
    }
    bad = {u: int(np.size(a) - np.isfinite(a).sum()) for u, a in arrays.items() if np.size(a)}
    bad = {u: n for u, n in bad.items() if n}
    if bad:
        counts = ", ".join(f"{n} of {np.size(arrays[u])} {u} values" for u, n in bad.items())
        raise StoreError(
            f"model {backend.model_id} ({model_file(backend)}) gave non-finite tokens (NaN or "
            f"Inf) at site {st.key}: {counts}; its weights file may be damaged, nothing of this "
            "site was stored"
        )


# --- one site on demand, as a store was built ----------------------------------------------


def reopen_plate(store: ActivationStore) -> Plate:
    """The plate a store was embedded from, opened with the same options."""
    from ..plate import open_plate

    source = dict(store.plate_source)
    if not source.get("path"):
        raise StoreError(f"the store at {store.path} does not record its plate folder")
    try:
        return open_plate(**source)
    except PlateError as exc:
        raise StoreError(
            f"cannot open the plate of the store at {store.path} again: {exc}"
        ) from exc


def store_settings(store: ActivationStore) -> EmbedSettings:
    """The :class:`EmbedSettings` a store was embedded with, read back from its attributes:
    what a store of an older version did not record takes today's default, and what this
    version no longer knows is left out. Stores written before the segmentation settings were
    nested record ``nuclear``, ``segmenter`` and ``cellpose_model`` beside the others."""
    recorded = dict(store.embed_settings)
    segment = dict(recorded.pop("segment", None) or {})
    for name in EMBED_SEGMENT_FIELDS:
        if name in recorded:
            segment.setdefault(name, recorded.pop(name))
    known = {f.name for f in dataclasses.fields(EmbedSettings)}
    values = {k: v for k, v in recorded.items() if k in known}
    return EmbedSettings.from_dict({**values, "segment": segment_settings(segment)})


def reload_model(store: ActivationStore, device=None) -> Backend:
    """The store's model, loaded from its recorded source; refused if the weights differ."""
    from ..models import load_model

    recorded = store_settings(store)
    kwargs = {}
    if recorded.arch:
        kwargs = {"arch": recorded.arch, "channel_rule": recorded.channel_rule or "per-channel"}
    backend = load_model(store.model_source, device, **kwargs)
    _check_same_model(store, backend)
    return backend


def _check_same_model(store: ActivationStore, backend: Backend) -> None:
    if backend.weights_hash != store.weights_hash or backend.embed_dim != store.embed_dim:
        raise StoreError(
            f"model {backend.model_id} (weights {backend.weights_hash[:12]}, D="
            f"{backend.embed_dim}) is not the model of the store at {store.path} "
            f"({store.model_id}, weights {store.weights_hash[:12]}, D={store.embed_dim})"
        )


def embed_store_site(
    store: ActivationStore,
    key,
    *,
    plate: Plate | None = None,
    backend: Backend | None = None,
    device=None,
) -> SiteTokens:
    """Tokens of one site embedded exactly as the store was built (model, block, cells).

    For a site the store holds, its stored labels are pooled over; for any other site of the
    plate (reopened from ``store.plate_source`` unless given), the labels follow the store's
    cell rule. ``backend`` is reloaded from ``store.model_source`` unless given; either way it
    must have the store's weights.
    """
    from ..plate import SiteKey
    from .compute import Embedder

    key = SiteKey.of(key)
    plate = plate if plate is not None else reopen_plate(store)
    if tuple(plate.channel_names) != tuple(store.channel_names):
        raise StoreError(
            f"plate {plate.root} has channels {list(plate.channel_names)}, the store at "
            f"{store.path} {list(store.channel_names)}"
        )
    if backend is None:
        backend = reload_model(store, device)
    else:
        _check_same_model(store, backend)
    recorded = store_settings(store)
    site = plate[key]
    image = site.read()
    if key in store:
        labels = store.site_labels(key) if store.has_site_labels(key) else None
    else:
        labels, _ = site_labels(
            site,
            image,
            recorded.cells,
            recorded.segment.nuclear,
            recorded.segment.segmenter,
            recorded.segment.cellpose_model,
        )
    embedder = Embedder(
        backend, store.block, recorded.batch_size, store.has_channel_tokens, recorded.precision
    )
    return embedder.embed(image, labels, key=key)
