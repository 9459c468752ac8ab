"""Phenotypic activity (copairs mAP of replicate wells against controls): a clear effect is
active, a null sits at the random baseline, the robust z and the mAP match hand computations,
and bad input is refused by name."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from napari_concept_discovery.analysis.activity import (
    MAD_SCALE,
    phenotypic_activity,
    robust_z,
    well_profiles,
)
from napari_concept_discovery.errors import DictionaryError

CONTROL = "well_type=negative_control"


def _cells(seed=0, d=30, cells=20, effect=2.0, plate_offset=3.0, layout=None):
    """Two plates of 6 control wells, 4 wells of ``hit`` and 4 of ``null`` (interleaved), per
    cell d features of well noise + cell noise, plate 2 shifted by ``plate_offset`` in every
    feature; ``hit`` moves features 0-4 by ``effect`` in every cell, ``null`` changes nothing."""
    rng = np.random.default_rng(seed)
    layout = layout or ["control"] * 6 + ["hit", "null"] * 4
    rows, x = [], []
    for plate, offset in (("P1", 0.0), ("P2", plate_offset)):
        for w, pert in enumerate(layout):
            v = rng.normal(offset, 1.0, (cells, d)) + rng.normal(0, 0.3, d)
            if pert == "hit":
                v[:, :5] += effect
            x.append(v)
            rows += [
                {
                    "plate": plate,
                    "well": f"W{w:02d}",
                    "label": c + 1,
                    "perturbation": pert,
                    "well_type": "negative_control" if pert == "control" else "treatment",
                }
                for c in range(cells)
            ]
    return np.vstack(x), pd.DataFrame(rows)


def _map_by_hand(z: np.ndarray, wells: pd.DataFrame, across: bool) -> dict[str, float]:
    """mAP per value, written out: each treated well ranks the other wells of its value and
    the control wells (``across``: of other plates only) by cosine similarity; AP is the mean
    precision at each positive."""
    unit = z / np.linalg.norm(z, axis=1, keepdims=True)
    sim = unit @ unit.T
    ctrl = wells["is_control"].to_numpy()
    value = wells["value"].to_numpy()
    plate = wells["plate"].to_numpy()
    aps: dict[str, list[float]] = {}
    for i in np.flatnonzero(~ctrl):
        pos = (value == value[i]) & ~ctrl
        pos[i] = False
        other = plate != plate[i] if across else np.ones(len(plate), bool)
        pos &= other
        cand = np.flatnonzero(pos | (ctrl & other))
        order = cand[np.argsort(-sim[i, cand], kind="stable")]
        hits = pos[order]
        if not hits.any():
            continue
        precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
        aps.setdefault(value[i], []).append(float(precision[hits].mean()))
    return {v: float(np.mean(a)) for v, a in aps.items()}


def test_a_clear_effect_is_active_and_a_null_is_not():
    x, table = _cells(seed=0)
    out = phenotypic_activity(x, table, "perturbation", CONTROL, seed=0)
    assert list(out["value"]) == ["hit", "null"]
    assert list(out["n_wells"]) == [8, 8]
    hit, null = out.iloc[0], out.iloc[1]
    assert hit["mean_average_precision"] > 0.95
    assert hit["q_value"] <= 0.01 and hit["active"]
    assert null["q_value"] > 0.05 and not null["active"]
    # a random ranking of the 4 replicates on the other plate among them and its 6 controls
    from copairs.map.normalization import expected_ap

    assert hit["random_map"] == pytest.approx(expected_ap(4, 6))
    assert hit["random_map"] == pytest.approx(null["random_map"])


def _null_excess(n_controls: int, across: bool, seeds=range(6)) -> tuple[float, float]:
    """Mean null mAP minus the random baseline, and the smallest q, over ``seeds``."""
    maps, baselines, qs = [], [], []
    layout = ["control"] * n_controls + ["hit", "null"] * 4
    for seed in seeds:
        x, table = _cells(seed=seed, effect=0.0, layout=layout)  # "hit" is a null too
        out = phenotypic_activity(
            x, table, "perturbation", CONTROL, seed=seed, null_size=2000, across_plates=across
        )
        maps += list(out["mean_average_precision"])
        baselines += list(out["random_map"])
        qs += list(out["q_value"])
    return float(np.mean(maps) - np.mean(baselines)), float(min(qs))


@pytest.mark.parametrize("n_controls", [4, 16])
def test_nulls_sit_at_the_random_baseline_over_seeds(n_controls):
    """Nulls are never active, and with pairs across plates (the default on two plates) their
    mAP is the random baseline within its sampling error (12 null values: about 0.015; the
    module docstring's 24 seeds put the excess at -0.01 +- 0.01)."""
    excess, q = _null_excess(n_controls, across=True)
    assert q > 0.05
    assert abs(excess) < 0.06


def test_pairs_on_one_plate_lift_the_nulls():
    """Why the default pairs across plates: ranking same-plate wells among other-plate ones
    lifts a null's mAP above the baseline when the plates have few control wells."""
    excess, q = _null_excess(4, across=False)
    assert q > 0.05
    assert excess > 0.04


@pytest.mark.parametrize("across", [True, False])
def test_map_matches_a_hand_computation_and_the_seed_fixes_p(across):
    x, table = _cells(seed=5, effect=0.7)
    wells, z = well_profiles(x, table, "perturbation", CONTROL)
    expected = _map_by_hand(z, wells, across)
    out = phenotypic_activity(x, table, "perturbation", CONTROL, seed=1, across_plates=across)
    got = dict(zip(out["value"], out["mean_average_precision"], strict=True))
    assert got == pytest.approx(expected, abs=1e-6)
    if across:  # two plates: the default
        pd.testing.assert_frame_equal(
            phenotypic_activity(x, table, "perturbation", CONTROL, seed=1), out
        )
        out = phenotypic_activity(x, table, "perturbation", CONTROL, seed=1)
    again = phenotypic_activity(x, table, "perturbation", CONTROL, seed=1, across_plates=across)
    pd.testing.assert_frame_equal(out, again)
    # Benjamini-Hochberg over the two values: the larger p stays, the smaller is at most 2p
    p, q = out["p_value"].to_numpy(), out["q_value"].to_numpy()
    assert q[np.argmax(p)] == pytest.approx(p.max())
    assert q[np.argmin(p)] == pytest.approx(min(2 * p.min(), p.max()))


def test_robust_z_against_the_plate_controls_by_hand():
    wells = pd.DataFrame(
        {
            "plate": ["P1"] * 5 + ["P2"] * 3,
            "value": ["c", "c", "c", "a", "a", "c", "c", "a"],
            "is_control": [True, True, True, False, False, True, True, False],
        }
    )
    means = np.array(
        [[1.0, 5.0], [2.0, 5.0], [4.0, 5.0], [10.0, 5.0], [0.0, 5.0], [0, 0], [2, 0], [3, 9]]
    )
    z = robust_z(means, wells)
    # P1, feature 0: controls 1, 2, 4 -> median 2, MAD 1
    np.testing.assert_allclose(z[:5, 0], (means[:5, 0] - 2.0) / MAD_SCALE)
    # P1, feature 1 is constant over the plate: 0, not a division by zero
    np.testing.assert_array_equal(z[:5, 1], 0.0)
    # P2, feature 1: controls both 0 (MAD 0), so the spread is floored at 0.1 x the plate's
    # standard deviation of the feature
    floor = 0.1 * np.std([0.0, 0.0, 9.0])
    assert z[7, 1] == pytest.approx(9.0 / floor)
    # P2, feature 0: controls 0 and 2 -> median 1, MAD 1
    np.testing.assert_allclose(z[5:, 0], (means[5:, 0] - 1.0) / MAD_SCALE)


def test_plate_offsets_cancel():
    """Plate 2 shifted by 50 in every feature: the per-plate z makes its wells comparable, so
    a well of a plate-2 value still retrieves its plate-1 replicates."""
    x, table = _cells(seed=3, plate_offset=50.0)
    out = phenotypic_activity(x, table, "perturbation", CONTROL, seed=0)
    assert out.set_index("value").loc["hit", "mean_average_precision"] > 0.95
    assert not out.set_index("value").loc["null", "active"]


def test_sparse_codes_and_unmeasured_cells():
    x, table = _cells(seed=4)
    dense = phenotypic_activity(np.maximum(x, 0), table, "perturbation", CONTROL)
    sparse = phenotypic_activity(sp.csr_matrix(np.maximum(x, 0)), table, "perturbation", CONTROL)
    pd.testing.assert_frame_equal(dense, sparse)
    # cells without a measurement (NaN rows, as cp-measure's sampled cells leave) are left out
    # of their well's mean: the same as measuring the other cells only
    holes = x.copy()
    missing = np.zeros(len(x), bool)
    missing[::3] = True
    holes[missing] = np.nan
    wells, z = well_profiles(holes, table, "perturbation", CONTROL)
    wells_kept, z_kept = well_profiles(
        x[~missing], table[~missing].reset_index(drop=True), "perturbation", CONTROL
    )
    pd.testing.assert_frame_equal(wells.drop(columns="n_cells"), wells_kept.drop(columns="n_cells"))
    np.testing.assert_allclose(z, z_kept)
    # a feature with no value at all in one well is dropped, not turned into NaN distances
    holes[table["well"].eq("W07").to_numpy(), 2] = np.nan
    assert well_profiles(holes, table, "perturbation", CONTROL)[1].shape[1] == x.shape[1] - 1


def test_single_well_values_get_no_score():
    layout = ["control"] * 4 + ["hit", "hit", "lonely"]
    x, table = _cells(seed=1, layout=layout)
    table = table[~((table["plate"] == "P2") & (table["perturbation"] == "lonely"))]
    x = x[table.index.to_numpy()]
    out = phenotypic_activity(x, table.reset_index(drop=True), "perturbation", CONTROL)
    lonely = out.set_index("value").loc["lonely"]
    assert lonely["n_wells"] == 1
    assert np.isnan(lonely["mean_average_precision"]) and np.isnan(lonely["q_value"])
    assert not lonely["active"]


def test_bad_input_is_refused_by_name():
    x, table = _cells(seed=0)
    with pytest.raises(DictionaryError, match="nothing_here"):
        phenotypic_activity(x, table, "nothing_here", CONTROL)
    with pytest.raises(DictionaryError, match="well_type=mock"):
        phenotypic_activity(x, table, "perturbation", "well_type=mock")
    table["well_id"] = table["plate"] + "_" + table["well"]
    with pytest.raises(DictionaryError, match="'well_id'.*replicate"):
        # every well its own value: nothing has a replicate
        phenotypic_activity(x, table, "well_id", CONTROL)
    with pytest.raises(DictionaryError, match="rows"):
        phenotypic_activity(x[:-1], table, "perturbation", CONTROL)
    with pytest.raises(DictionaryError, match="COLUMN=VALUE"):
        phenotypic_activity(x, table, "perturbation", "negative_control")


def test_plates_without_controls_are_left_out_with_a_warning():
    from napari_concept_discovery.errors import DataWarning

    x, table = _cells(seed=2)
    p2 = table["plate"].eq("P2").to_numpy()
    table.loc[p2 & table["perturbation"].eq("control").to_numpy(), "well_type"] = "empty"
    with pytest.warns(DataWarning, match=r"\['P2'\]"):
        out = phenotypic_activity(x, table, "perturbation", CONTROL)
    # P2's control wells are now an "empty"-typed value of their own; P1's wells only remain
    assert list(out["value"]) == ["hit", "null"]
    assert list(out["n_wells"]) == [4, 4]


@pytest.fixture(scope="module")
def analysed(tiny_store_path, tmp_path_factory):
    """The tiny store (each cell type in two treated wells, one per plate; three control
    wells per plate) analysed with a dictionary whitened on its negative controls."""
    from helpers import small_train
    from napari_concept_discovery.analysis.analyze import analyze_store
    from napari_concept_discovery.dictionary import AnalyzeSettings, train_on_store
    from napari_concept_discovery.embed.store import ActivationStore

    store = ActivationStore.open(tiny_store_path)
    root = tmp_path_factory.mktemp("activity")
    dictionary = train_on_store(store, small_train(), out=root / "d.safetensors").dictionary
    settings = AnalyzeSettings(labels="cell_type,perturbation", describe=False)
    with pytest.warns(Warning, match="perturbation.*replicate"):
        analysis = analyze_store(store, dictionary, settings, root / "analysis")
    return store, dictionary, analysis, root


def test_analyze_writes_the_activity_of_codes_and_tokens(analysed):
    from napari_concept_discovery.analysis.encode import dictionary_tokens
    from napari_concept_discovery.analysis.measurements import cache_path

    store, dictionary, analysis, _ = analysed
    written = pd.read_parquet(analysis.paths["activity"])
    # perturbation has one well per value (refused with a warning); cell_type is scored
    assert set(written["column"]) == {"cell_type"}
    expected = {"codes", "tokens"} | ({"CellProfiler"} if cache_path(store).is_file() else set())
    assert set(written["features"]) == expected
    assert set(written["value"]) == {"HEPG2", "HUVEC", "U2OS"}
    assert (written["n_wells"] == 2).all()
    control = dictionary.meta.controls
    for name, values in (
        ("codes", analysis.codes),
        ("tokens", dictionary_tokens(store, dictionary, "cell")),
    ):
        want = phenotypic_activity(values, analysis.table, "cell_type", control)
        got = written[written["features"] == name].drop(columns=["features", "column"])
        pd.testing.assert_frame_equal(got.reset_index(drop=True), want, obj=name)


def test_the_cli_prints_the_activity(analysed, capsys):
    from napari_concept_discovery.cli import main

    store, dictionary, analysis, root = analysed
    args = ["analyze", str(store.path), str(dictionary.path), "--out", str(root / "cli")]
    assert main([*args, "--labels", "cell_type,perturbation", "--no-describe"]) == 0
    out = capsys.readouterr().out
    assert "phenotypic activity" in out and "mean average precision" in out
    written = pd.read_parquet(analysis.paths["activity"])
    row = written[(written["features"] == "codes") & (written["value"] == "U2OS")].iloc[0]
    line = next(x for x in out.splitlines() if "U2OS" in x)
    assert line.split()[:3] == ["cell_type", "U2OS", "2"]
    assert f"{row['mean_average_precision']:.2f} (q {row['q_value']:.3f})" in line
    pd.testing.assert_frame_equal(pd.read_parquet(root / "cli" / "activity.parquet"), written)


def test_cellprofiler_measurements_join_when_cached_and_are_never_measured(
    tiny_store_path, tmp_path
):
    """Without a measurements cache beside the store, activity compares codes and tokens and
    measures nothing; with one, the CellProfiler rows are the measurements' activity."""
    import shutil

    from helpers import small_train
    from napari_concept_discovery.analysis import measurements as M
    from napari_concept_discovery.analysis.analyze import store_activity
    from napari_concept_discovery.analysis.encode import encode_store
    from napari_concept_discovery.dictionary import train_on_store
    from napari_concept_discovery.embed.store import ActivationStore

    shutil.copytree(tiny_store_path, tmp_path / "store")
    store = ActivationStore.open(tmp_path / "store")
    dictionary = train_on_store(store, small_train()).dictionary
    codes, table = encode_store(store, dictionary)
    control = dictionary.meta.controls
    with pytest.warns(Warning, match="replicate"):
        bare = store_activity(
            store, dictionary, codes, table, ["cell_type", "perturbation"], control
        )
    assert set(bare["features"]) == {"codes", "tokens"}
    assert not M.cache_path(store).exists()  # nothing was measured for it
    measured = M.store_measurements(store)
    with pytest.warns(Warning, match="replicate"):
        full = store_activity(
            store, dictionary, codes, table, ["cell_type", "perturbation"], control
        )
    assert set(full["features"]) == {"codes", "tokens", "CellProfiler"}
    pd.testing.assert_frame_equal(
        full[full["features"] != "CellProfiler"].reset_index(drop=True), bare
    )
    values = measured.drop(columns=list(M.KEYS)).to_numpy(np.float32)
    want = phenotypic_activity(values, table, "cell_type", control)
    got = full[full["features"] == "CellProfiler"].drop(columns=["features", "column"])
    pd.testing.assert_frame_equal(got.reset_index(drop=True), want)
