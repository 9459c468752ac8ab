"""The segmentation zoo: generated sites with true masks that vary one thing at a time.

A path of its own beside :func:`~.site.generate_site`, whose defaults it leaves alone: the
cells are drawn and painted by the same code (``cells.py``), but the microscope is set by a
:class:`ZooSpec` that the zoo varies on purpose over realistic ranges: background offset, read
and shot noise, bit depth (8, 12, 16), stain brightness and a dim cytoplasm, density from
sparse to confluent, cell size (20x, 40x), uneven illumination, a stain that is empty or
missing, debris and saturated blobs, a patchy stain, touching nuclei. ``ZOO`` names the variants; each
changes one field (or one camera's coupled fields) of the ``base`` spec, but the last, which
combines the dark noisy background and dim cytoplasm of a real plate that was measured. The truth is the rasterised cell and nucleus labels,
with no debris or blob in it. Used by ``benchmarks/bench_segment.py`` to choose segmentation
defaults, and by the tests of the threshold rules.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
from scipy import ndimage as ndi

from .cells import paint, rasterise, sample_cells
from .concepts import CELL_TYPE_BY_NAME, CHANNELS, CONTROL


@dataclass(frozen=True)
class ZooSpec:
    """One microscope and sample. Intensities are in digital numbers (DN) of the stored image.

    ``brightness``: DN of a bright structure above the background, per channel (RxRx order);
    ``cytoplasm``: factor on the cytoplasm of the five cell stains (1: as painted; 0.3: a dim
    cytoplasm around bright nuclear and perinuclear signal); ``offset``: dark level in DN;
    ``read_noise``: its standard deviation in DN; ``photons_per_dn``: shot noise (variance of
    a pixel = signal / photons_per_dn), small for a noisy camera; ``vignetting``: relative drop
    from the brightest point to a corner, ``tilt``: a linear gradient across the field;
    ``radius``: cell radius in px (about 20 at 20x, 40 at 40x); ``coverage``: share of the
    site the cells aim to cover; ``nucleus_scale``: nucleus size factor after placement (above
    1.3 neighbouring nuclei meet); ``empty``: channels that carry no stain (background and
    noise only); ``missing``: channels that are all zero; ``debris``: small bright specks per
    site; ``blobs``: saturated blobs per site in the cell stains; ``patchy``: cell stains
    painted unevenly, as a transfected reporter or a clumping dye is: each cell's expression
    drawn from a wide log-normal (``patch_spread``), and within the cell the stain gathered in
    patches about half a cell radius across, dim between them (down to ``patch_floor``).
    """

    bits: int = 8
    offset: float = 3.0
    read_noise: float = 1.2
    photons_per_dn: float = 1.5
    brightness: tuple[float, ...] = (140.0, 90.0, 90.0, 80.0, 100.0, 90.0)
    cytoplasm: float = 1.0
    vignetting: float = 0.15
    tilt: float = 0.0
    cell_type: str = "HEPG2"
    radius: float = 22.0
    coverage: float = 0.45
    clustering: float = 0.3
    nucleus_scale: float = 1.0
    empty: tuple[int, ...] = ()
    missing: tuple[int, ...] = ()
    debris: int = 0
    blobs: int = 0
    patchy: tuple[int, ...] = ()
    patch_spread: float = 0.7
    patch_floor: float = 0.1
    psf: float = 1.1
    channel_names: tuple[str, ...] = field(default=CHANNELS)


def _scaled(spec: ZooSpec, factor: float) -> tuple[float, ...]:
    return tuple(b * factor for b in spec.brightness)


BASE = ZooSpec()

#: The variants: name -> spec, each one field (or one coupled group, such as a camera's bit
#: depth with its offset and noise) away from ``BASE``.
ZOO: dict[str, ZooSpec] = {
    "base": BASE,
    "offset 0 (clipped)": replace(BASE, offset=0.0),
    "offset 40": replace(BASE, offset=40.0),
    "read noise 4": replace(BASE, read_noise=4.0),
    "shot noise x4": replace(BASE, photons_per_dn=0.375),
    "12-bit": replace(
        BASE,
        bits=12,
        offset=100.0,
        read_noise=6.0,
        photons_per_dn=0.4,
        brightness=_scaled(BASE, 14),
    ),
    "16-bit": replace(
        BASE,
        bits=16,
        offset=500.0,
        read_noise=25.0,
        photons_per_dn=0.1,
        brightness=_scaled(BASE, 120),
    ),
    "dim stains (x0.3)": replace(BASE, brightness=_scaled(BASE, 0.3)),
    "bright stains (x2.5)": replace(BASE, brightness=_scaled(BASE, 2.5)),
    "dim cytoplasm (x0.3)": replace(BASE, cytoplasm=0.3),
    "sparse": replace(BASE, coverage=0.1),
    "confluent": replace(BASE, coverage=0.9, clustering=0.6),
    "40x (radius 40)": replace(BASE, radius=40.0, cell_type="U2OS"),
    "small cells (radius 13)": replace(BASE, radius=13.0),
    "uneven illumination": replace(BASE, vignetting=0.55, tilt=0.3),
    "empty stain (Mito)": replace(BASE, empty=(4,)),
    "missing stain (ER)": replace(BASE, missing=(1,)),
    "debris": replace(BASE, debris=60),
    "saturated blobs": replace(BASE, blobs=6),
    "patchy stain (Actin)": replace(BASE, patchy=(2,)),
    "touching nuclei": replace(BASE, nucleus_scale=1.45, coverage=0.75, clustering=0.8),
    # not one thing at a time: the measured real plate (8-bit, a dark background a few counts
    # above zero with read and shot noise, a dim cytoplasm, mild vignetting), as a last check
    "combined: dark noisy dim cytoplasm": replace(
        BASE, offset=2.0, read_noise=2.0, photons_per_dn=1.0, cytoplasm=0.3, vignetting=0.2
    ),
}


@dataclass
class ZooSite:
    """A generated zoo site: the image as stored, the true labels and the spec it came from."""

    image: np.ndarray  # (6, H, W) uint8 or uint16
    cells: np.ndarray  # (H, W) int32
    nuclei: np.ndarray  # (H, W) int32, same ids as cells
    spec: ZooSpec
    channel_names: tuple[str, ...] = CHANNELS


def _illumination(spec: ZooSpec, size: int, rng: np.random.Generator) -> np.ndarray:
    y = np.linspace(0.0, 1.0, size)[:, None]
    x = np.linspace(0.0, 1.0, size)[None, :]
    cy, cx = rng.uniform(0.35, 0.65, 2)
    r2 = ((y - cy) ** 2 + (x - cx) ** 2) / 0.5
    angle = rng.uniform(0, 2 * np.pi)
    tilt = spec.tilt * (np.cos(angle) * (y - 0.5) + np.sin(angle) * (x - 0.5))
    return np.clip(1.0 - spec.vignetting * r2 + tilt, 0.1, None)


def _specks(rng, size: int, count: int, radius: tuple[float, float]) -> np.ndarray:
    """``count`` round specks with soft edges, peak 1."""
    out = np.zeros((size, size))
    yy, xx = np.mgrid[0:size, 0:size]
    for _ in range(count):
        y, x = rng.uniform(0, size, 2)
        r = rng.uniform(*radius)
        w = (
            slice(max(0, int(y - 2 * r)), int(y + 2 * r) + 1),
            slice(max(0, int(x - 2 * r)), int(x + 2 * r) + 1),
        )
        d = np.hypot(yy[w] - y, xx[w] - x)
        out[w] = np.maximum(out[w], np.clip(1.5 - d / r, 0, 1))
    return out


def _patches(spec: ZooSpec, cells: np.ndarray, size: int, seed: int) -> np.ndarray:
    """Uneven expression (``ZooSpec.patchy``): a per-cell log-normal level times patches of a
    smooth random field, from a stream of its own so that the rest of the site is unchanged."""
    rng = np.random.default_rng([seed, 0x201])
    level = np.concatenate([[1.0], rng.lognormal(0.0, spec.patch_spread, int(cells.max()))])
    field = ndi.gaussian_filter(rng.standard_normal((size, size)), spec.radius / 4)
    field /= field.std() + 1e-12
    patches = np.clip(0.4 + 0.6 * field, spec.patch_floor, 2.0)
    return np.where(cells > 0, level[cells] * patches, 1.0)


def generate_zoo_site(spec: ZooSpec | str, *, size: int = 512, seed: int = 0) -> ZooSite:
    """Draw one site of ``spec`` (or a name in :data:`ZOO`), seeded by ``seed`` alone."""
    if isinstance(spec, str):
        spec = ZOO[spec]
    rng = np.random.default_rng([seed, 0x200])
    base = CELL_TYPE_BY_NAME[spec.cell_type]
    ct = replace(base, radius=spec.radius, coverage=spec.coverage, clustering=spec.clustering)
    cells = sample_cells(rng, ct, CONTROL, size)
    if spec.nucleus_scale != 1.0:
        cells = replace(cells, na=cells.na * spec.nucleus_scale, nb=cells.nb * spec.nucleus_scale)
    geometry, kept = rasterise(cells, size, rng)
    cells = cells.subset(kept)
    signal = paint(rng, cells, geometry, ct, CONTROL).astype(np.float64)
    cyto = (geometry.cells > 0) & (geometry.nuclei == 0)
    signal[1:] *= np.where(cyto, spec.cytoplasm, 1.0)
    if spec.patchy:
        signal[list(spec.patchy)] *= _patches(spec, geometry.cells, size, seed)[None]
    top = 2**spec.bits - 1
    if spec.debris:  # autofluorescent specks, in every channel, inside and outside cells
        signal += 0.8 * _specks(rng, size, spec.debris, (1.0, 2.5))[None]
    for c in range(signal.shape[0]):
        signal[c] = ndi.gaussian_filter(signal[c], spec.psf, truncate=3.0)
    signal *= np.asarray(spec.brightness, np.float64)[:, None, None]
    signal *= _illumination(spec, size, rng)[None]
    if spec.blobs:  # dye aggregates far brighter than any cell, in the cell stains
        blobs = _specks(rng, size, spec.blobs, (4.0, 10.0))
        for c in (2, 4, 5):
            signal[c] += 2.0 * top * blobs
    for c in spec.empty:
        signal[c] = 0.0
    # shot noise of the photons (Gaussian approximation of Poisson), read noise of the camera
    std = np.sqrt(np.maximum(signal, 0) / spec.photons_per_dn + spec.read_noise**2)
    dn = spec.offset + signal + std * rng.standard_normal(signal.shape)
    dtype = np.uint8 if spec.bits <= 8 else np.uint16
    image = np.clip(np.rint(dn), 0, top).astype(dtype)
    for c in spec.missing:
        image[c] = 0
    return ZooSite(image, geometry.cells, geometry.nuclei, spec, spec.channel_names)
