"""How far the whitening overfits its control cells, measured on the tokens it whitens.

PCA whitening is fitted on the control cells themselves. With fewer control cells than token
dimensions (issue 24's plates: 492 or 984 controls in 1,152 dimensions), the directions in which
those cells barely vary are estimated too small and scaled up, for every other cell and not for
the controls, which the fit has seen. Every non-control well then differs from the controls in
the same few amplified directions, so features tell any well from the controls: on the 4-plate
benchmark the well-level test called 8-9 of the default dictionary's features changed for two
null perturbations, as many as for the real ones (benchmarks/results/concept_recovery.txt).

The readout: the mean squared whitened norm (before the unit-norm step) of the non-control
tokens over that of the control tokens. It is about 1 when the controls are a fair sample of what
the whitening will see (plenty of controls, or other wells that do not differ from them), and
grows as the fit overfits them. Measured on the same benchmark: 2.9 (4 plates) and 4.5 (2
plates) with the default Ledoit-Wolf shrinkage, where null perturbations got features called
changed; 1.3 or below (shrinkage 0.5, or a quarter as many components as control cells), where
they got none; 1.6 at shrinkage 0.2, with 2 features each. Real perturbations raise it a little
too, so it is a warning to read with the centred view and the well test, not a verdict.
"""

from __future__ import annotations

import copy

import numpy as np
import pandas as pd

from .rows import take_rows
from .settings import WhitenSettings
from .whiten import Whitener, control_mask, group_labels

#: Above this ratio, ``train`` warns that the whitening overfits its controls (see the module
#: docstring for the measurements that place it).
OVERFIT_RATIO = 1.5
#: Tokens of each kind (control, other) the ratio is measured on, at most.
RATIO_ROWS = 10_000


def control_norm_ratio(
    whitener: Whitener,
    tokens,
    table: pd.DataFrame,
    settings: WhitenSettings,
    *,
    max_rows: int = RATIO_ROWS,
    seed: int = 0,
) -> dict:
    """``ratio`` (mean squared whitened norm of the non-control tokens over the controls'),
    ``n_controls`` and ``dims`` (the tokens' width); the ratio is NaN without both kinds.

    At most ``max_rows`` tokens of each kind, drawn with ``seed``.
    """
    mask = control_mask(table, *settings.control)
    n_controls = int(mask.sum())
    out = {"ratio": float("nan"), "n_controls": n_controls, "dims": int(tokens.shape[1])}
    if n_controls == 0 or n_controls == len(mask):
        return out
    rng = np.random.default_rng(seed)
    raw = copy.copy(whitener)
    raw.unit_norm = False  # the norm is what the unit-norm step would hide
    groups = None if settings.by is None else group_labels(table, settings.by)
    means = []
    for kind in (mask, ~mask):
        rows = np.flatnonzero(kind)
        if rows.size > max_rows:
            rows = np.sort(rng.choice(rows, max_rows, replace=False))
        z = raw.transform(take_rows(tokens, rows), None if groups is None else groups[rows])
        means.append(float(np.mean(np.sum(np.square(z, dtype=np.float64), axis=1))))
    out["ratio"] = means[1] / means[0] if means[0] > 0 else float("nan")
    return out


def overfits(ratio: float) -> bool:
    """Whether a :func:`control_norm_ratio` is above :data:`OVERFIT_RATIO`."""
    return bool(np.isfinite(ratio) and ratio > OVERFIT_RATIO)


def overfit_warning(ratio: float, n_controls: int, dims: int) -> str | None:
    """What ``train`` says when ``ratio`` :func:`overfits`, else None."""
    if not overfits(ratio):
        return None
    return (
        f"the whitening overfits its controls: other cells' whitened tokens are {ratio:.1f}x "
        f"as far out as the {n_controls} control cells' ({dims} dimensions), so features can "
        "tell any well from the controls; read the well-level test and the centred view, and "
        "consider more control wells, --whiten-shrinkage 0.5 or fewer --components"
    )


def check_words(metrics: dict) -> tuple[str, str | None] | None:
    """(the whitening check in words, the warning or None) for a dictionary's metrics, or
    None where they hold no check (no PCA whitening): what ``train`` and the Dictionary widget
    say after training."""
    if "whitened_norm_ratio" not in metrics:
        return None
    ratio, n = metrics["whitened_norm_ratio"], metrics["whitening_controls"]
    said = (
        f"whitening check: other cells' whitened tokens {ratio:.2f}x as far out as the {n} "
        "control cells' (near 1 where the controls are a fair sample of the other cells)"
    )
    return said, overfit_warning(ratio, n, metrics["whitening_dims"])
