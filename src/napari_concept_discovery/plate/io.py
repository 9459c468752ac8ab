"""Reading image files and their headers.

Every reader error is turned into a PlateError that names the file, so a corrupt image in a
screen of thousands says which one it is instead of ending in a traceback from a codec.
"""

from __future__ import annotations

import logging
import xml.etree.ElementTree as ET
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from ..errors import PlateError

TIFF_SUFFIXES = (".tif", ".tiff")
IMAGE_SUFFIXES = (*TIFF_SUFFIXES, ".png", ".jpg", ".jpeg", ".bmp")


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES


def _is_zarr(path: Path) -> bool:
    """An OME-Zarr field (a folder), read through :mod:`.omezarr`."""
    return Path(path).is_dir()


def _omezarr():
    from . import omezarr

    return omezarr


def _is_tiff(path: Path) -> bool:
    return path.suffix.lower() in TIFF_SUFFIXES


class _Silence(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return False


_SILENCE = _Silence()


@contextmanager
def open_tiff(path: Path):
    """``tifffile.TiffFile(path)`` with tifffile's own log lines held back ("<TiffTag.fromfile>
    raised ..." on a damaged file): a file that cannot be read is said once, by the PlateError
    that names it."""
    import tifffile

    log = logging.getLogger("tifffile")
    log.addFilter(_SILENCE)
    try:
        with tifffile.TiffFile(path) as tif:
            yield tif
    finally:
        log.removeFilter(_SILENCE)


def _wrap(path: Path, exc: Exception) -> PlateError:
    if isinstance(exc, PlateError):
        return exc
    if isinstance(exc, FileNotFoundError):
        return PlateError(f"image file not found: {path}")
    return PlateError(f"cannot read image {path}: {type(exc).__name__}: {exc}")


def _pil_header(path: Path) -> tuple[tuple[int, ...], np.dtype]:
    from PIL import Image

    with Image.open(path) as im:
        width, height = im.size
        mode = im.mode
    dtypes = {"1": np.bool_, "L": np.uint8, "P": np.uint8, "RGB": np.uint8, "RGBA": np.uint8}
    if mode.startswith("I;16"):
        dtype = np.dtype(np.uint16)
    elif mode in dtypes:
        dtype = np.dtype(dtypes[mode])
    elif mode == "I":
        dtype = np.dtype(np.int32)
    elif mode == "F":
        dtype = np.dtype(np.float32)
    else:
        raise PlateError(f"unsupported image mode {mode!r} in {path}")
    return (height, width), dtype


def _tiff_axes(path: Path) -> tuple[tuple[int, ...], str, np.dtype, list[str]]:
    """Shape, axes, dtype and OME channel names of the first series, without reading pixels."""
    with open_tiff(path) as tif:
        series = _first_series(tif, path)
        names = _ome_channel_names(tif.ome_metadata) if tif.is_ome else []
        return tuple(series.shape), series.axes, np.dtype(series.dtype), names


def _first_series(tif, path: Path):
    if not tif.series or not tif.series[0].shape or 0 in tif.series[0].shape:
        raise PlateError(f"cannot read image {path}: no image data (corrupt, or not a TIFF)")
    return tif.series[0]


def _ome_channel_names(ome_xml: str | None) -> list[str]:
    if not ome_xml:
        return []
    try:
        root = ET.fromstring(ome_xml)
    except ET.ParseError:
        return []
    for image in root.iter():
        if image.tag.endswith("}Pixels") or image.tag == "Pixels":
            return [
                ch.get("Name", "")
                for ch in image
                if ch.tag.endswith("}Channel") or ch.tag == "Channel"
            ]
    return []


def _channel_first_order(shape: tuple[int, ...], axes: str, path: Path) -> tuple[list[int], int]:
    """Axis order that turns a TIFF series into (C, Y, X), and C; drops singleton axes."""
    if "Y" not in axes or "X" not in axes:
        raise PlateError(f"{path} has axes {axes!r} with no Y and X image plane")
    extra = [i for i, a in enumerate(axes) if a not in "YX" and shape[i] > 1]
    if len(extra) > 1:
        described = ", ".join(f"{axes[i]}={shape[i]}" for i in extra)
        raise PlateError(
            f"{path} has more than one non-spatial axis ({described}); only one channel axis is "
            "supported (project z-stacks and split time series first)"
        )
    return extra, (shape[extra[0]] if extra else 1)


def plane_header(path: Path) -> tuple[tuple[int, int], np.dtype]:
    """(H, W) and dtype of a single-channel image file."""
    path = Path(path)
    if _is_zarr(path):
        (c, h, w), dtype = _omezarr().image_header(path)
        return (h, w), dtype
    try:
        if _is_tiff(path):
            shape, axes, dtype, _ = _tiff_axes(path)
            extra, n = _channel_first_order(shape, axes, path)
            if n > 1 and not (axes[extra[0]] == "S" and n in (3, 4)):
                raise PlateError(f"{path} holds {n} planes ({axes}={shape}); expected one channel")
            return (shape[axes.index("Y")], shape[axes.index("X")]), dtype
        return _pil_header(path)
    except Exception as exc:
        raise _wrap(path, exc) from exc


def _to_plane(image: np.ndarray, path: Path) -> np.ndarray:
    # drop length-1 axes around the plane, never the plane's own: a 1 x 1 or 1 x N image
    # stays 2-D, as its header says
    while image.ndim > 2 and image.shape[0] == 1:
        image = image[0]
    while image.ndim > 2 and image.shape[-1] == 1:
        image = image[..., 0]
    if image.ndim == 3 and image.shape[-1] in (3, 4):
        rgb = image[..., :3]
        if not (
            np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2])
        ):
            raise PlateError(f"{path} is a colour image; expected one grey channel per file")
        image = rgb[..., 0]
    if image.ndim != 2:
        raise PlateError(f"{path} has shape {image.shape}; expected one 2-D channel")
    return _real_pixels(image, path)


def read_plane(path: Path) -> np.ndarray:
    """A 2-D single-channel image as stored."""
    path = Path(path)
    if _is_zarr(path):
        return _to_plane(_omezarr().read_image(path), path)
    try:
        if _is_tiff(path):
            with open_tiff(path) as tif:
                image = _first_series(tif, path).asarray()
        else:
            import imageio.v3 as iio

            image = iio.imread(path)
        return _to_plane(np.asarray(image), path)
    except Exception as exc:
        raise _wrap(path, exc) from exc


def multichannel_header(path: Path) -> tuple[tuple[int, int, int], np.dtype, list[str]]:
    """(C, H, W), dtype and channel names (from OME-XML, else empty) of a per-site file."""
    path = Path(path)
    if _is_zarr(path):
        shape, dtype = _omezarr().image_header(path)
        return shape, dtype, []
    try:
        if not _is_tiff(path):
            (h, w), dtype = _pil_header(path)
            return (1, h, w), dtype, []
        shape, axes, dtype, names = _tiff_axes(path)
        _, n = _channel_first_order(shape, axes, path)
        names = names if len(names) == n and all(names) else []
        return (n, shape[axes.index("Y")], shape[axes.index("X")]), dtype, names
    except Exception as exc:
        raise _wrap(path, exc) from exc


def read_multichannel(path: Path) -> np.ndarray:
    """A (C, H, W) array from a per-site multi-channel TIFF / OME-TIFF (or a grey image)."""
    path = Path(path)
    if _is_zarr(path):
        return _omezarr().read_image(path)
    try:
        if not _is_tiff(path):
            return read_plane(path)[None]
        with open_tiff(path) as tif:
            series = _first_series(tif, path)
            shape, axes = tuple(series.shape), series.axes
            extra, _ = _channel_first_order(shape, axes, path)
            data = series.asarray()
        order = extra + [axes.index("Y"), axes.index("X")]
        drop = [i for i in range(len(axes)) if i not in order]
        data = np.transpose(data, order + drop).reshape(
            [shape[i] for i in order] if extra else [1, shape[order[0]], shape[order[1]]]
        )
        return _real_pixels(np.ascontiguousarray(data), path)
    except Exception as exc:
        raise _wrap(path, exc) from exc


def _real_pixels(image: np.ndarray, path: Path) -> np.ndarray:
    """Refuse pixels that are not real numbers (complex, NaN or Inf), naming the file: they
    would reach the model as NaN tokens and be blamed on its weights."""
    if image.dtype.kind == "c":
        raise PlateError(f"{path} holds {image.dtype} pixels; expected integers or floats")
    if image.dtype.kind == "f" and not np.isfinite(image).all():
        bad = int(image.size - np.isfinite(image).sum())
        raise PlateError(
            f"{path} holds {bad} NaN or Inf pixels of {image.size}; a pixel must be a number"
        )
    return image


def read_labels(path: Path) -> np.ndarray:
    """An int32 (H, W) label image, 0 = background."""
    image = read_plane(path)
    if not np.issubdtype(image.dtype, np.integer):
        raise PlateError(f"label image {path} has dtype {image.dtype}; expected integers")
    return image.astype(np.int32, copy=False)
