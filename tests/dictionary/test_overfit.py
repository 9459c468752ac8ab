"""How far the whitening overfits its controls: the ratio against its known value on Gaussian
tokens, recorded by training for PCA whitening only, and said (with a warning) by ``train``."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from napari_concept_discovery.dictionary.overfit import (
    OVERFIT_RATIO,
    control_norm_ratio,
    overfit_warning,
)
from napari_concept_discovery.dictionary.pipeline import fit_whitener, train_on_store
from napari_concept_discovery.dictionary.settings import WhitenSettings
from napari_concept_discovery.embed.store import ActivationStore

CONTROLS = "well_type=negative_control"


def _gaussian(n_controls: int, d: int = 40, n_other: int = 4000, seed: int = 0):
    """Controls and other cells from one Gaussian with unequal variances (no effect at all)."""
    rng = np.random.default_rng(seed)
    scale = np.geomspace(3.0, 0.1, d)
    tokens = rng.normal(size=(n_controls + n_other, d)) * scale
    kind = ["negative_control"] * n_controls + ["treatment"] * n_other
    return tokens.astype(np.float32), pd.DataFrame({"well_type": kind})


@pytest.mark.parametrize("n_controls", [60, 200, 2000])
def test_ratio_matches_the_out_of_sample_inflation_of_unshrunk_whitening(n_controls):
    # whitening fitted on n controls (no shrinkage) leaves them a mean squared norm of
    # d (n - 1) / n; a new cell of the same law gets d (n - 1) / (n - d - 2) (inverse Wishart),
    # so the ratio is n / (n - d - 2), whatever the variances
    d = 40
    tokens, table = _gaussian(n_controls, d)
    settings = WhitenSettings(CONTROLS, shrinkage="none")
    w = fit_whitener(tokens, table, settings)
    got = control_norm_ratio(w, tokens, table, settings, seed=1)
    want = n_controls / (n_controls - d - 2)
    assert got["n_controls"] == n_controls and got["dims"] == d
    assert got["ratio"] == pytest.approx(want, rel=0.12)
    # the warning follows the ratio: 60 controls in 40 dimensions overfit (3.3x), 2000 do not
    assert (overfit_warning(got["ratio"], n_controls, d) is not None) == (want > OVERFIT_RATIO)


def test_shrinkage_lowers_the_ratio_and_sampling_is_seeded():
    tokens, table = _gaussian(60)
    ratios = []
    for shrinkage in ("none", "auto", "0.5"):
        s = WhitenSettings(CONTROLS, shrinkage=shrinkage)
        ratios.append(control_norm_ratio(fit_whitener(tokens, table, s), tokens, table, s)["ratio"])
    assert ratios[0] > ratios[1] > ratios[2] >= 1.0
    s = WhitenSettings(CONTROLS, shrinkage="none")
    w = fit_whitener(tokens, table, s)
    a = control_norm_ratio(w, tokens, table, s, max_rows=500, seed=7)["ratio"]
    b = control_norm_ratio(w, tokens, table, s, max_rows=500, seed=7)["ratio"]
    assert a == b
    assert w.unit_norm  # the check leaves the whitener as it was


def test_ratio_needs_both_kinds_of_cell():
    tokens, table = _gaussian(60, n_other=0)
    s = WhitenSettings(CONTROLS)
    got = control_norm_ratio(fit_whitener(tokens, table, s), tokens, table, s)
    assert np.isnan(got["ratio"]) and overfit_warning(got["ratio"], 60, 40) is None


def test_training_records_it_for_pca_whitening_only(tiny_store_path, small_train):
    store = ActivationStore.open(tiny_store_path)
    pca = train_on_store(store, small_train(steps=5))
    m = pca.metrics
    assert m["whitening_controls"] == int(
        (store.table("cell")["well_type"].astype(str) == "negative_control").sum()
    )
    tokens = store.tokens("cell", pca.dictionary.meta.tokens)
    assert m["whitening_dims"] == tokens.shape[1]
    again = control_norm_ratio(
        pca.dictionary.whitener,
        tokens,
        store.table("cell"),
        pca.dictionary.meta.train.whiten,
        seed=small_train().seed,
    )
    assert m["whitened_norm_ratio"] == pytest.approx(again["ratio"])
    both = train_on_store(store, small_train(steps=5, views="whitened,centred"))
    assert "whitened_norm_ratio" in both.metrics["views"]["whitened"]
    assert "whitened_norm_ratio" not in both.metrics["views"]["centred"]
    assert (
        both.metrics["whitened_norm_ratio"]
        == both.metrics["views"]["whitened"]["whitened_norm_ratio"]
    )


def test_train_says_the_check(tiny_store_path, tmp_path):
    out = tmp_path / "d.safetensors"
    cmd = [sys.executable, "-m", "napari_concept_discovery", "--json", "train",
           str(tiny_store_path), "--out", str(out), "--atoms", "16", "--steps", "5",
           "--views", "whitened", "--whiten", CONTROLS]  # fmt: skip
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    summary = json.loads(run.stdout)
    ratio = summary["metrics"]["whitened_norm_ratio"]
    assert f"whitening check: other cells' whitened tokens {ratio:.2f}x" in run.stderr
    warned = "the whitening overfits its controls" in run.stderr
    assert warned == (ratio > OVERFIT_RATIO)
