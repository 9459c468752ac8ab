"""Cells of one site: sample their geometry, rasterise labels, paint the six stains.

Everything is whole-image numpy: cells compete for pixels by a normalised radial distance (so
neighbours touch along a shared border, as in a confluent culture), and every stain is a
per-cell lookup table indexed by the label image times a few site-wide texture fields. That
keeps a 512x512 site at a few tens of milliseconds.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy import fft as sp_fft
from scipy import ndimage as ndi

from .concepts import FORM_EFFECTS, MITOTIC_FRACTION, PERTURBATIONS, CellType, Perturbation

_HARMONICS = np.arange(2, 6)
_MAX_NUCLEUS_SCALE = max(p.effects.get("nucleus_scale", 1.0) for p in PERTURBATIONS)


@dataclass
class Cells:
    """Per-cell parameters as parallel arrays (index i is label i + 1)."""

    cy: np.ndarray
    cx: np.ndarray
    a: np.ndarray  # cell semi-axes (pixels)
    b: np.ndarray
    angle: np.ndarray
    harm_amp: np.ndarray  # (n, len(_HARMONICS)) shape harmonics
    harm_phase: np.ndarray
    ny: np.ndarray  # nucleus centre
    nx: np.ndarray
    na: np.ndarray  # nucleus semi-axes
    nb: np.ndarray
    nangle: np.ndarray
    responded: np.ndarray  # bool
    mitotic: np.ndarray  # bool

    def __len__(self) -> int:
        return len(self.cy)

    def subset(self, keep: np.ndarray) -> Cells:
        return Cells(**{k: v[keep] for k, v in self.__dict__.items()})


def sample_cells(
    rng: np.random.Generator, cell_type: CellType, perturbation: Perturbation, size: int
) -> Cells:
    """Place cells by dart throwing; territories may overlap so that neighbours touch.

    Nuclei never overlap (their centres keep a margin), which is what makes nucleus-seeded
    segmentation possible, while cell territories are split along shared borders later.
    """
    R = cell_type.radius
    n_target = int(cell_type.coverage * size * size / (np.pi * R * R)) + 1
    attempts = 40 * n_target
    # Draw every candidate's parameters at once; accept them in order.
    mitotic = rng.random(attempts) < MITOTIC_FRACTION
    responded = (rng.random(attempts) < perturbation.penetrance) & ~mitotic
    radius = R * rng.lognormal(0.0, 0.15, attempts)
    # Placement uses the interphase size and the largest nucleus any perturbation can cause, so
    # neither mitosis nor a response changes a candidate's chance of being placed, and a site
    # has the same cells under every perturbation (only their appearance changes).
    place_radius = radius.copy()
    radius[mitotic] *= 0.62
    elong = 1.0 + (cell_type.elongation - 1.0) * rng.lognormal(0.0, 0.3, attempts)
    elong[mitotic] = 1.0 + 0.05 * rng.random(mitotic.sum())
    irregular = np.where(mitotic, 0.03, cell_type.irregularity)
    harm_amp = irregular[:, None] * rng.normal(0.0, 1.0, (attempts, len(_HARMONICS)))
    harm_amp /= _HARMONICS[None, :] ** 0.7
    harm_phase = rng.uniform(0, 2 * np.pi, (attempts, len(_HARMONICS)))
    angle = rng.uniform(0, np.pi, attempts)
    a = radius * np.sqrt(elong)
    b = radius / np.sqrt(elong)

    ratio = cell_type.nucleus_ratio * rng.lognormal(0.0, 0.08, attempts)
    scale = perturbation.effects.get("nucleus_scale", 1.0)
    place_nucleus = place_radius * ratio * _MAX_NUCLEUS_SCALE * np.sqrt(cell_type.elongation)
    ratio = np.where(responded, ratio * scale, ratio)
    n_elong = 1.0 + (elong - 1.0) * 0.35 + 0.1 * rng.random(attempts)
    na = radius * ratio * np.sqrt(n_elong)
    nb = radius * ratio / np.sqrt(n_elong)
    nangle = angle + rng.normal(0.0, 0.25, attempts)
    # Mitotic chromatin: a metaphase plate (bar) or a condensed prometaphase ball.
    plate_like = rng.random(attempts) < 0.6
    mit_a = np.where(plate_like, 0.5 * radius, 0.3 * radius)
    mit_b = np.where(plate_like, 0.14 * radius, 0.26 * radius)
    na = np.where(mitotic, mit_a, na)
    nb = np.where(mitotic, mit_b, nb)
    shift = rng.uniform(-0.15, 0.15, attempts) * a * (~mitotic)
    ny_off = shift * np.sin(angle)
    nx_off = shift * np.cos(angle)

    uniform = rng.uniform(0, size, (attempts, 2))
    near = rng.random(attempts) < cell_type.clustering
    direction = rng.uniform(0, 2 * np.pi, attempts)
    pick = rng.random(attempts)

    cy = np.empty(n_target)
    cx = np.empty(n_target)
    rad = np.empty(n_target)
    nrad = np.empty(n_target)
    chosen = np.empty(n_target, dtype=int)
    n = 0
    for i in range(attempts):
        if n == n_target:
            break
        if near[i] and n > 0:
            j = int(pick[i] * n)
            dist = max(0.8 * (rad[j] + place_radius[i]), 1.2 * (nrad[j] + place_nucleus[i]))
            y = cy[j] + dist * np.sin(direction[i])
            x = cx[j] + dist * np.cos(direction[i])
            if not (0 <= y < size and 0 <= x < size):
                continue
        else:
            y, x = uniform[i]
        nr = place_nucleus[i]
        if n:
            d = np.hypot(cy[:n] - y, cx[:n] - x)
            if np.any(d < 0.72 * (rad[:n] + place_radius[i])) or np.any(d < 1.1 * (nrad[:n] + nr)):
                continue
        cy[n], cx[n], rad[n], nrad[n], chosen[n] = y, x, place_radius[i], nr, i
        n += 1
    idx = chosen[:n]
    return Cells(
        cy=cy[:n],
        cx=cx[:n],
        a=a[idx],
        b=b[idx],
        angle=angle[idx],
        harm_amp=harm_amp[idx],
        harm_phase=harm_phase[idx],
        ny=cy[:n] + ny_off[idx],
        nx=cx[:n] + nx_off[idx],
        na=na[idx],
        nb=nb[idx],
        nangle=nangle[idx],
        responded=responded[idx],
        mitotic=mitotic[idx],
    )


@dataclass
class Geometry:
    """Label images and per-pixel coordinates that the stains are painted from."""

    cells: np.ndarray  # int32 labels
    nuclei: np.ndarray  # int32, same ids as cells
    score: np.ndarray  # normalised radius in the owning cell: 0 centre, 1 edge
    nscore: np.ndarray  # same for the nucleus (>= 1 outside nuclei)
    across: np.ndarray  # coordinate across the cell's long axis (for stress fibres)
    border: np.ndarray  # float32 1.0 on pixels whose label differs from a 4-neighbour


def _shape_score(dy, dx, angle, a, b, amp=None, phase=None):
    c, s = np.cos(angle), np.sin(angle)
    u = (dx * c + dy * s) / a
    v = (-dx * s + dy * c) / b
    rho = np.hypot(u, v)
    if amp is None:
        return rho, v * b
    # cos(k phi + p) = cos(k phi) cos p - sin(k phi) sin p, with cos/sin(k phi) by recurrence
    # from cos/sin(phi) (cheaper than arctan2 and one cos per harmonic).
    inv = 1.0 / np.maximum(rho, 1e-6)
    c1, s1 = u * inv, v * inv
    ck, sk = c1 * c1 - s1 * s1, 2 * c1 * s1  # k = 2
    f = np.ones_like(rho)
    for k, A, p in zip(_HARMONICS, amp, phase, strict=True):
        if k > 2:
            ck, sk = ck * c1 - sk * s1, sk * c1 + ck * s1
        f += A * (ck * np.cos(p) - sk * np.sin(p))
    return rho / f, v * b


def _window(cy, cx, r, size):
    y0, y1 = max(int(cy - r), 0), min(int(cy + r) + 2, size)
    x0, x1 = max(int(cx - r), 0), min(int(cx + r) + 2, size)
    return y0, y1, x0, x1


def rasterise(
    cells: Cells, size: int, rng: np.random.Generator | None = None
) -> tuple[Geometry, np.ndarray]:
    """Label image by competition on normalised radius; returns geometry and the kept mask.

    Cells that lose their whole nucleus to neighbours are dropped (kept[i] is False) so that
    every truth cell has a nucleus, and labels are renumbered 1..n in the kept order.
    """
    labels = np.zeros((size, size), np.int32)
    best = np.ones((size, size), np.float32)
    # Ruffled edges: a smooth noise field nudges the normalised radius near the border.
    ruffle = 0.06 * _field(rng, size, 10.0) if rng is not None else np.zeros_like(best)
    across = np.zeros((size, size), np.float32)
    for i in range(len(cells)):
        reach = max(cells.a[i], cells.b[i]) * (1 + np.abs(cells.harm_amp[i]).sum()) + 1
        y0, y1, x0, x1 = _window(cells.cy[i], cells.cx[i], reach, size)
        dy = np.arange(y0, y1, dtype=np.float32)[:, None] - cells.cy[i]
        dx = np.arange(x0, x1, dtype=np.float32)[None, :] - cells.cx[i]
        sc, v = _shape_score(
            dy, dx, cells.angle[i], cells.a[i], cells.b[i], cells.harm_amp[i], cells.harm_phase[i]
        )
        sc = sc + ruffle[y0:y1, x0:x1] * sc * sc
        win = best[y0:y1, x0:x1]
        m = sc < win
        win[m] = sc[m]
        labels[y0:y1, x0:x1][m] = i + 1
        across[y0:y1, x0:x1][m] = v[m]

    nuclei = np.zeros((size, size), np.int32)
    nscore = np.full((size, size), 2.0, np.float32)
    for i in range(len(cells)):
        reach = max(cells.na[i], cells.nb[i]) + 1
        y0, y1, x0, x1 = _window(cells.ny[i], cells.nx[i], reach, size)
        dy = np.arange(y0, y1, dtype=np.float32)[:, None] - cells.ny[i]
        dx = np.arange(x0, x1, dtype=np.float32)[None, :] - cells.nx[i]
        sc, _ = _shape_score(dy, dx, cells.nangle[i], cells.na[i], cells.nb[i])
        m = (sc < 1) & (labels[y0:y1, x0:x1] == i + 1)
        nuclei[y0:y1, x0:x1][m] = i + 1
        nscore[y0:y1, x0:x1][m] = sc[m]

    n = len(cells)
    has_nucleus = np.bincount(nuclei.ravel(), minlength=n + 1)[1:] > 0
    has_cell = np.bincount(labels.ravel(), minlength=n + 1)[1:] > 0
    kept = has_nucleus & has_cell
    remap = np.zeros(n + 1, np.int32)
    remap[1:][kept] = np.arange(1, kept.sum() + 1, dtype=np.int32)
    labels = remap[labels]
    nuclei = remap[nuclei]
    best[labels == 0] = 1.0
    nscore[nuclei == 0] = 2.0

    # Border pixels: where the label differs from a 4-neighbour (cell-cell or cell-background).
    border = np.zeros_like(labels, dtype=bool)
    border[:-1] |= labels[:-1] != labels[1:]
    border[1:] |= labels[:-1] != labels[1:]
    border[:, :-1] |= labels[:, :-1] != labels[:, 1:]
    border[:, 1:] |= labels[:, :-1] != labels[:, 1:]
    geometry = Geometry(labels, nuclei, best, nscore, across, border.astype(np.float32))
    return geometry, kept


@lru_cache(maxsize=8)
def _freq2(size: int) -> np.ndarray:
    ky = np.fft.fftfreq(size).astype(np.float32)[:, None]
    kx = np.fft.rfftfreq(size).astype(np.float32)[None, :]
    return (ky * ky + kx * kx) * np.float32(2 * np.pi**2)


@lru_cache(maxsize=64)
def _gain(size: int, scale: float, low: float | None) -> np.ndarray:
    k2 = _freq2(size)
    gain = np.exp(-k2 * (scale / 2.5) ** 2)
    if low is not None:
        gain -= np.exp(-k2 * (low / 2.5) ** 2)
    return gain


def _field(rng: np.random.Generator, size: int, scale: float, low: float | None = None):
    """Zero-mean, unit-variance smooth noise with features about ``scale`` pixels wide.

    Synthesised in Fourier space (white spectrum times a Gaussian, one inverse FFT), which costs
    the same for any scale. With ``low`` it is band-passed (difference of Gaussians), which
    gives the sinuous zero-crossings used for tubules and reticular networks.
    """
    gain = _gain(size, scale, low)
    spec = rng.standard_normal((2, *gain.shape), dtype=np.float32)
    f = sp_fft.irfft2((spec[0] + 1j * spec[1]) * gain, s=(size, size), workers=1)
    f = f.astype(np.float32, copy=False)
    f -= f.mean()
    f /= f.std() + 1e-8
    return f


def _spots(size, ys, xs, amps, sigma):
    """Gaussian spots of one width at the given points (one filter for all of them)."""
    img = np.zeros((size, size), np.float32)
    ys = np.clip(np.round(ys).astype(int), 0, size - 1)
    xs = np.clip(np.round(xs).astype(int), 0, size - 1)
    np.add.at(img, (ys, xs), amps.astype(np.float32))
    return ndi.gaussian_filter(img, sigma) * (2 * np.pi * sigma * sigma)


def _points_in_cells(rng, cells: Cells, labels, per_cell, spread):
    """Up to ``per_cell`` points inside each cell's territory: (n, per_cell) y, x and valid."""
    n = len(cells)
    k = per_cell * 3
    r = np.sqrt(rng.random((n, k))) * spread
    t = rng.uniform(0, 2 * np.pi, (n, k))
    c, s = np.cos(cells.angle)[:, None], np.sin(cells.angle)[:, None]
    u = r * np.cos(t) * cells.a[:, None]
    v = r * np.sin(t) * cells.b[:, None]
    ys = cells.cy[:, None] + u * s + v * c
    xs = cells.cx[:, None] + u * c - v * s
    size = labels.shape[0]
    yi = np.clip(np.round(ys).astype(int), 0, size - 1)
    xi = np.clip(np.round(xs).astype(int), 0, size - 1)
    inside = labels[yi, xi] == np.arange(1, n + 1)[:, None]
    inside &= (ys >= 0) & (ys < size) & (xs >= 0) & (xs < size)
    # stable sort moves the valid points of each row to its front
    order = np.argsort(~inside, axis=1, kind="stable")[:, :per_cell]
    take = np.take_along_axis
    return take(ys, order, 1), take(xs, order, 1), take(inside, order, 1)


def paint(
    rng: np.random.Generator,
    cells: Cells,
    geometry: Geometry,
    cell_type: CellType,
    perturbation: Perturbation,
) -> np.ndarray:
    """Noise-free stain intensities (6, H, W), float32, about 1.0 for a bright structure."""
    size = geometry.cells.shape[0]
    lab = geometry.cells
    n = len(cells)
    inside = lab > 0
    in_nuc = geometry.nuclei > 0
    cyto = inside & ~in_nuc
    mit = np.concatenate([[False], cells.mitotic])[lab]
    resp = np.concatenate([[False], cells.responded])
    effects = perturbation.effects

    def per_cell(values, background=0.0):
        return np.concatenate([[background], values]).astype(np.float32)[lab]

    # Cell-to-cell expression variation per stain, times the cell type's stain brightness.
    level = cell_type.brightness * rng.lognormal(0.0, 0.18, (n, 6))
    level[cells.mitotic] *= 1.3
    lv = [per_cell(level[:, c]) for c in range(6)]

    thick = np.clip(1.0 - geometry.score, 0.0, 1.0) ** 0.8  # cells thin out towards the edge
    # Perinuclear weight, in the cell's own normalised radius so it follows the cell's shape.
    nuc_edge = per_cell(np.sqrt(cells.na * cells.nb / (cells.a * cells.b)), 1.0)
    near_nuc = np.exp(-np.clip(geometry.score - nuc_edge, 0.0, None) / 0.22)
    # Membrane rim and actin cortex: the border map blurred (cheaper than a distance map).
    rim = np.clip(ndi.gaussian_filter(geometry.border, 0.8, truncate=3.0) * 2.0, 0, 1) * inside
    cortex = np.clip(ndi.gaussian_filter(geometry.border, 2.0, truncate=3.0) * 3.0, 0, 1) * inside
    envelope = np.exp(-0.5 * ((geometry.nscore - 1.0) * 6.0) ** 2) * inside

    fine = _field(rng, size, 2.0)
    out = np.empty((6, size, size), np.float32)

    # DNA: domed nucleus, mottled chromatin, dark nucleoli; condensed bright mitotic chromatin.
    nuc_dome = np.sqrt(np.clip(1.0 - geometry.nscore**2, 0.0, 1.0))
    chroma = _field(rng, size, 3.0)
    dna = (0.55 + 0.45 * nuc_dome) * (1.0 + 0.15 * chroma + 0.08 * fine) * in_nuc
    dna = np.where(mit, 2.0 * dna * (1.0 + 0.2 * chroma), dna)
    if "nucleus_scale" in effects:  # the same DNA spread over a larger nucleus
        dna *= np.where(resp[geometry.nuclei], 0.8, 1.0)

    # Nucleoli (RNA bright, DNA dark): 1-4 per interphase nucleus.
    lo, hi = cell_type.nucleoli
    counts = rng.integers(lo, hi + 1, n) * (~cells.mitotic)
    nl_owner = np.repeat(np.arange(n), counts)
    r = np.sqrt(rng.random(nl_owner.size)) * 0.5
    t = rng.uniform(0, 2 * np.pi, nl_owner.size)
    nl_y = cells.ny[nl_owner] + r * np.sin(t) * cells.na[nl_owner]
    nl_x = cells.nx[nl_owner] + r * np.cos(t) * cells.nb[nl_owner]
    nsig = float(np.median(0.11 * np.sqrt(cells.na * cells.nb))) if n else 1.0
    nucleoli = _spots(size, nl_y, nl_x, np.ones(nl_owner.size), nsig) * in_nuc
    out[0] = lv[0] * dna * (1.0 - 0.45 * np.clip(nucleoli, 0, 1))

    # From here each stain draws from its own stream, so a perturbation that changes one stain
    # leaves the others bit-identical to the control's at the same site coordinates.
    r_er, r_actin, r_rna, r_mito, r_memb = rng.spawn(5)
    # The "forms" variant's effects draw from one more stream, spawned only when a form effect
    # is present, so the default generator's sites stay bit-identical. ``form(key)`` is a
    # responder's mixing weight towards its altered stain: amplitude x graded response, <= 1.
    forms = FORM_EFFECTS.intersection(effects)
    if forms:
        (r_form,) = rng.spawn(1)
        grade = np.zeros(n, np.float32)
        grade[cells.responded] = r_form.uniform(0.4, 1.6, int(cells.responded.sum()))

    def form(key: str) -> np.ndarray:
        return np.clip(per_cell(grade * effects[key]), 0.0, 1.0)

    if "chromatin_condensation" in effects:  # responders: clumped, mottled chromatin
        w = form("chromatin_condensation")
        clumps = np.clip(1.0 + 1.2 * _field(r_form, size, 1.5), 0.0, None)
        out[0] = (1 - w) * out[0] + w * out[0] * clumps

    # ER: perinuclear reticular network plus nuclear envelope; aggregates when perturbed.
    g = _field(r_er, size, cell_type.er_scale, low=cell_type.er_scale * 3)
    network = np.exp(-((g / 0.45) ** 2))
    er = (0.2 * thick + 0.8 * network * near_nuc) * cyto + 0.6 * envelope
    if "er_aggregation" in effects:
        blobs = np.clip(_field(r_er, size, 4.0) - 1.0, 0, None) * 1.6
        agg = per_cell(resp[1:] * effects["er_aggregation"])
        er = np.where(
            agg > 0, (1 - agg) * er + agg * (0.15 * thick + blobs * near_nuc) * cyto * 1.2, er
        )
    if "er_peripheral" in effects:  # responders: the network at the cell edge, not the nucleus
        w = form("er_peripheral")
        er = (1 - w) * er + w * (
            (0.2 * thick + 0.8 * network * (1.0 - near_nuc)) * cyto + 0.6 * envelope
        )
    er = np.where(mit, (0.6 * thick) * inside, er)
    out[1] = lv[1] * er

    # Actin: cortical rim plus stress fibres along the long axis of the cell.
    fibre_amp = np.full(n, cell_type.actin_fibres)
    fibre_amp[cells.responded] += effects.get("actin_fibres", 0.0)
    fibre_amp[cells.mitotic] = 0.0
    offset = per_cell(r_actin.uniform(0, 64, n))
    warp = _field(r_actin, size, 24.0)
    period = 6.0
    pos = (geometry.across + 2.5 * warp) / period + offset
    # Each fibre (one period across the long axis) gets its own brightness; many are absent.
    fibre_level = np.clip(r_actin.normal(0.2, 0.6, 256), 0, None).astype(np.float32)
    fib = fibre_level[np.floor(pos).astype(np.int64) % 256]
    fib *= np.exp(-((((pos % 1.0) - 0.5) / 0.12) ** 2))
    fib *= np.clip(_field(r_actin, size, 14.0) + 0.7, 0, 1.5)
    actin = (0.25 * thick + 0.5 * cortex) * inside + per_cell(fibre_amp) * fib * (
        geometry.score < 0.92
    )
    if "actin_cortical" in effects:  # responders: no stress fibres, a brighter cortex
        w = form("actin_cortical")
        actin = (1 - w) * actin + w * (0.25 * thick + 1.1 * cortex) * inside
    actin = np.where(mit, (0.5 * thick + 1.2 * cortex) * inside, actin)
    out[2] = lv[2] * actin

    # RNA: nucleoli, dimmer nucleoplasm, granular cytoplasm.
    granular = 1.0 + 0.35 * fine
    rna = (0.35 * thick * granular + 0.12 * near_nuc) * cyto + 0.25 * in_nuc + 0.9 * nucleoli
    if "nucleolar_rna" in effects:  # responders: bigger, brighter nucleoli, less cytoplasmic RNA
        big = resp[nl_owner + 1]
        y, x, m = nl_y[big], nl_x[big], big.sum()
        grown = _spots(size, y, x, np.full(m, effects["nucleolar_rna"]), nsig * 1.5)
        rna += 0.9 * (grown - _spots(size, y, x, np.ones(m), nsig)) * in_nuc
        rna = np.where(per_cell(resp[1:].astype(float)) > 0, rna * np.where(cyto, 0.8, 1.0), rna)
    if "rna_granules" in effects:  # responders: cytoplasmic RNA gathered in coarse granules
        w = form("rna_granules")
        granules = 1.0 + 2.5 * np.clip(_field(r_form, size, 2.5) - 0.8, 0.0, None) - 0.35
        rna = (1 - w) * rna + w * (rna + 0.35 * thick * (granules - granular) * cyto)
    rna = np.where(mit, 0.45 * thick * granular * inside, rna)
    out[3] = lv[3] * rna

    # Mito: sinuous tubules concentrated around the nucleus; puncta when fragmented.
    g = _field(r_mito, size, cell_type.mito_scale, low=cell_type.mito_scale * 2.5)
    breaks = _field(r_mito, size, cell_type.mito_scale * 1.5) > -0.4
    tubules = np.exp(-((g / 0.3) ** 2)) * breaks
    frag = per_cell(resp[1:] * effects.get("mito_fragmentation", 0.0))
    puncta = np.clip(_field(r_mito, size, 2.2) - 1.4, 0, None) * 2.0
    mito_w = np.clip(0.15 + near_nuc, 0, 1) * cyto
    mito = mito_w * ((1 - frag) * tubules + frag * puncta) + 0.08 * thick * cyto
    if "mito_perinuclear" in effects:  # responders: the tubules pulled tight to the nucleus
        w = form("mito_perinuclear")
        tight = np.clip(1.6 * near_nuc**3, 0, 1) * cyto
        mito = (1 - w) * mito + w * (tight * tubules + 0.08 * thick * cyto)
    mito = np.where(mit, (0.35 * thick + 0.3 * puncta) * inside, mito)
    out[4] = lv[4] * mito

    # Membrane (WGA): plasma-membrane rim, Golgi next to the nucleus, scattered vesicles.
    golgi_dir = r_memb.uniform(0, 2 * np.pi, n)
    k = 10
    owner = np.repeat(np.arange(n), k)
    disp = np.zeros(n)
    disp[cells.responded] = effects.get("golgi_dispersal", 0.0)
    dispersed = (r_memb.random(owner.size) < disp[owner]) | cells.mitotic[owner]
    reach = np.sqrt(cells.na * cells.nb)[owner] + 3.0
    ang = golgi_dir[owner] + r_memb.normal(0, 0.45, owner.size)
    ys = cells.ny[owner] + reach * np.sin(ang) + r_memb.normal(0, 1.8, owner.size)
    xs = cells.nx[owner] + reach * np.cos(ang) + r_memb.normal(0, 1.8, owner.size)
    sy, sx, valid = _points_in_cells(r_memb, cells, lab, k, 0.8)
    swap = dispersed & valid.ravel()  # a dispersed element moves anywhere in its cell
    ys[swap] = sy.ravel()[swap]
    xs[swap] = sx.ravel()[swap]
    golgi = _spots(size, ys, xs, np.full(owner.size, 0.6), 1.3)
    golgi *= inside
    vesicles = np.clip(_field(r_memb, size, 2.0) - 1.6, 0, None)
    memb = 0.45 * rim + (0.22 * thick + 0.35 * vesicles) * inside + golgi + 0.15 * envelope
    if "membrane_vesicles" in effects:  # responders: fewer, coarser vesicles
        w = form("membrane_vesicles")
        coarse = np.clip(_field(r_form, size, 4.5) - 1.3, 0, None) * 1.5
        memb = memb + w * 0.35 * (coarse - vesicles) * inside
    memb = np.where(mit, (0.4 * thick + 1.2 * rim) * inside, memb)
    out[5] = lv[5] * memb
    return out
