"""Cells taken to the next step (threshold, similar cells, CSV, label image), well profiles in
pycytominer's layout and feature names kept beside the dictionary: library and command line."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from fault_helpers import run_cli
from helpers import small_train
from napari_concept_discovery.analysis.analyze import analyze_store
from napari_concept_discovery.analysis.cell_selection import (
    SELECTION_MARKER,
    cells_above,
    read_selection_labels,
    selection_labels,
    similar_cells,
    with_feature,
    write_cells_csv,
    write_selection_labels,
)
from napari_concept_discovery.analysis.explore import Explorer
from napari_concept_discovery.analysis.write import feature_column, well_profiles
from napari_concept_discovery.cli import main
from napari_concept_discovery.dictionary.feature_notes import (
    dictionary_checksum,
    load_notes,
    notes_path,
    save_notes,
)
from napari_concept_discovery.dictionary.pipeline import train_on_store
from napari_concept_discovery.dictionary.settings import (
    AnalyzeSettings,
    TrainSettings,
    WhitenSettings,
)
from napari_concept_discovery.embed.store import ActivationStore
from napari_concept_discovery.errors import DictionaryError, OutputError, StoreError
from napari_concept_discovery.plate.model import SiteKey

# the columns every cells CSV opens with, spelled out here rather than imported from
# cell_selection.COLUMNS, so that the tests pin the layout users read
CSV_COLUMNS = ["plate", "well", "site", "label", "centroid_y", "centroid_x"]


def _settings(seed: int) -> TrainSettings:
    centred = WhitenSettings(controls="well_type=negative_control", mode="center")
    return small_train(unit="cell", n_pick=None, steps=30, seed=seed, whiten=centred)


@pytest.fixture(scope="module")
def explored(tiny_store_path, tmp_path_factory):
    from napari_concept_discovery.dictionary import load_dictionary

    store = ActivationStore.open(tiny_store_path)
    out = tmp_path_factory.mktemp("selection")
    path = train_on_store(store, _settings(3), out=out / "dict.safetensors").path
    other = train_on_store(store, _settings(4), out=out / "other.safetensors").path
    dictionary = load_dictionary(path)
    return store, dictionary, Explorer(store, dictionary), out, other


def _a_cell(ex) -> tuple[SiteKey, int, int]:
    """A cell with active features: (site, label, row in the store's cell table)."""
    codes, table = ex.cell_codes()
    row = int(np.flatnonzero(np.diff(codes.indptr) > 0)[3])
    t = table.iloc[row]
    return SiteKey(str(t.plate), str(t.well), int(t.site)), int(t.label), row


def test_similar_cells_are_the_exact_cosine_neighbours(explored):
    _, _, ex, _, _ = explored
    codes, table = ex.cell_codes()
    key, label, row = _a_cell(ex)
    dense = codes.toarray().astype(np.float64)
    norms = np.linalg.norm(dense, axis=1)
    want = dense @ dense[row] / np.where(norms > 0, norms * norms[row], 1.0)
    want[row] = -np.inf
    got = similar_cells(ex, key, label, n=15)
    assert len(got) == 15
    expect_rows = np.lexsort((np.arange(len(want)), -want))[:15]
    np.testing.assert_allclose(got["similarity"], want[expect_rows], rtol=1e-5)
    assert list(got["label"]) == list(table["label"].to_numpy()[expect_rows])
    # the query cell is not its own neighbour, and the best is as similar as any other cell
    same = (got.plate == key.plate) & (got.well == key.well) & (got.site == key.site)
    assert not (same & (got.label == label)).any()
    assert got["similarity"].iloc[0] == pytest.approx(np.max(want))
    assert (np.diff(got["similarity"].to_numpy()) <= 0).all()


def test_similar_cells_refuses_an_unknown_cell_by_name(explored):
    _, _, ex, _, _ = explored
    key, _, _ = _a_cell(ex)
    with pytest.raises(StoreError, match=f"site {key} has no cell with label 99999"):
        similar_cells(ex, key, 99999)
    with pytest.raises(StoreError, match="not in the activation store"):
        similar_cells(ex, ("Nope", "A01", 1), 1)


def test_similar_command_prints_the_same_cells(explored, capsys):
    store, dictionary, ex, out, _ = explored
    key, label, _ = _a_cell(ex)
    args = [
        "similar",
        str(store.path),
        str(dictionary.path),
        "--plate",
        key.plate,
        "--well",
        key.well,
        "--site",
        str(key.site),
        "--label",
        str(label),
        "--top",
        "5",
    ]
    csv = out / "similar.csv"
    assert main([*args, "--json", "--csv", str(csv)]) == 0
    summary = json.loads(capsys.readouterr().out)
    want = similar_cells(ex, key, label, n=5)
    got = pd.DataFrame(summary["cells"])
    assert list(got["label"]) == list(want["label"])
    np.testing.assert_allclose(got["similarity"], want["similarity"], rtol=1e-6)
    written = pd.read_csv(csv)
    assert list(written.columns[:6]) == CSV_COLUMNS
    assert list(written["label"]) == list(want["label"])
    assert main(args) == 0  # the table on stdout
    text = capsys.readouterr().out
    assert f"the 5 cells most like cell {label} of {key}" in text
    assert "similarity" in text.splitlines()[1]
    assert main([*args[:-2], "--top", "0"]) == 2
    assert "--top must be at least 1" in capsys.readouterr().err


def test_threshold_selection_csv_and_label_image(explored, tmp_path):
    _, _, ex, _, _ = explored
    codes, table = ex.cell_codes()
    counts = np.bincount(codes.indices, minlength=codes.shape[1])
    f = int(np.argmax(counts))
    col = codes[:, f].toarray().ravel()
    threshold = float(np.median(col[col > 0]))
    cells = cells_above(ex, f, threshold)
    assert len(cells) == int((col >= threshold).sum()) > 0
    assert (cells["value"] >= threshold).all()
    assert (np.diff(cells["value"].to_numpy()) <= 0).all()
    path = write_cells_csv(with_feature(ex, cells, f), tmp_path / "cells.csv")
    back = pd.read_csv(path)
    np.testing.assert_allclose(back[f"feature_{f}"], cells["value"], rtol=1e-6)
    assert list(back.columns[:6]) == CSV_COLUMNS
    # the label image of one site keeps exactly the selected cells of that site
    first = cells.iloc[0]
    key = SiteKey(str(first.plate), str(first.well), int(first.site))
    labels = ex.labels(key)
    kept = selection_labels(cells, key, labels)
    here = cells[(cells.plate == key.plate) & (cells.well == key.well) & (cells.site == key.site)]
    assert set(np.unique(kept)) - {0} == set(here["label"].astype(int))
    assert ((kept == 0) | (kept == labels)).all()
    with pytest.raises(StoreError, match="is not in the store"):
        with_feature(
            ex, pd.DataFrame({"plate": ["X"], "well": ["A1"], "site": [1], "label": [1]}), f
        )


def test_selection_labels_per_site_round_trip(explored, tmp_path):
    """Every site holding selected cells gets one label image with exactly those cells."""
    _, _, ex, _, _ = explored
    codes, _ = ex.cell_codes()
    f = int(np.argmax(np.bincount(codes.indices, minlength=codes.shape[1])))
    cells = cells_above(ex, f, 0.0)
    out = write_selection_labels(ex, cells, tmp_path / "sel", what=f"feature {f}")
    back = read_selection_labels(out)
    sites = {
        SiteKey(str(p), str(w), int(s))
        for p, w, s in zip(cells.plate, cells.well, cells.site, strict=True)
    }
    assert set(back) == sites and len(sites) > 1
    for key, image in back.items():
        labels = ex.labels(key)
        here = cells[
            (cells.plate == key.plate) & (cells.well == key.well) & (cells.site == key.site)
        ]
        assert image.dtype == np.int32 and image.shape == labels.shape
        assert set(np.unique(image)) - {0} == set(here["label"].astype(int))
        assert ((image == 0) | (image == labels)).all()
    marker = json.loads((out / SELECTION_MARKER).read_text())
    assert marker["cells"] == len(cells) and marker["what"] == f"feature {f}"
    # written again over its own folder; a folder holding someone else's file is refused
    write_selection_labels(ex, cells.head(1), out)
    assert len(read_selection_labels(out)) == 1
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="notes.txt"):
        write_selection_labels(ex, cells, tmp_path / "theirs")
    assert (tmp_path / "theirs" / "notes.txt").read_text() == "mine"


def test_cells_command_in_a_subprocess_round_trips_its_files(explored, tmp_path):
    """`concept-discovery cells` as a user runs it: the CSV and the label images it writes
    hold the cells above the threshold (in the given well), with the feature's value."""

    store, dictionary, ex, _, _ = explored
    codes, table = ex.cell_codes()
    f = int(np.argmax(np.bincount(codes.indices, minlength=codes.shape[1])))
    col = codes[:, f].toarray().ravel()
    threshold = float(np.median(col[col > 0]))
    base = [str(store.path), str(dictionary.path), "--feature", str(f)]
    done = run_cli(
        "--json",
        "cells",
        *base,
        "--threshold",
        str(threshold),
        "--csv",
        str(tmp_path / "cells.csv"),
        "--labels",
        str(tmp_path / "labels"),
    )
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    want = (col >= threshold) & (col > 0)
    assert summary["cells"] == int(want.sum()) > 1
    back = pd.read_csv(tmp_path / "cells.csv")
    assert list(back.columns) == [*CSV_COLUMNS, f"feature_{f}"]
    np.testing.assert_allclose(np.sort(back[f"feature_{f}"]), np.sort(col[want]), rtol=1e-6)
    got = set(
        zip(back.plate.astype(str), back.well.astype(str), back.site, back.label, strict=True)
    )
    rows = np.flatnonzero(want)
    expect = set(
        zip(
            table.plate.astype(str).to_numpy()[rows],
            table.well.astype(str).to_numpy()[rows],
            table.site.to_numpy()[rows],
            table.label.to_numpy()[rows],
            strict=True,
        )
    )
    assert got == expect
    images = read_selection_labels(tmp_path / "labels")
    from_images = {
        (k.plate, k.well, k.site, int(v)) for k, im in images.items() for v in np.unique(im) if v
    }
    assert from_images == expect
    # one well only, table on stdout
    p, w = back.plate.iloc[0], back.well.iloc[0]
    done = run_cli("cells", *base, "--threshold", str(threshold), "--plate", p, "--well", w)
    assert done.returncode == 0, done.stderr
    n = int(((back.plate == p) & (back.well == w)).sum())
    assert f"{n} cells with feature {f} >= {threshold:g} (plate {p}, well {w})" in done.stdout
    assert f"feature_{f}" in done.stdout.splitlines()[1]
    # a feature the dictionary lacks is refused by name, exit 2
    done = run_cli("cells", *base[:2], "--feature", "9999", "--threshold", "0")
    assert done.returncode == 2
    assert "--feature: feature 9999 is out of range" in done.stderr


def test_well_profiles_pycytominer_layout(explored, tmp_path):
    store, dictionary, ex, _, _ = explored
    codes, table = ex.cell_codes()
    prof = well_profiles(codes, table)
    assert list(prof.columns[:2]) == ["Metadata_Plate", "Metadata_Well"]
    meta = [c for c in prof.columns if c.startswith("Metadata_")]
    feats = [c for c in prof.columns if not c.startswith("Metadata_")]
    assert prof.columns.tolist() == meta + feats  # metadata first, then the features
    assert "Metadata_well_type" in meta and "Metadata_Cell_Count" in meta
    assert "Metadata_label" not in meta and "Metadata_centroid_y" not in meta
    assert feats == [feature_column(f, codes.shape[1]) for f in range(codes.shape[1])]
    dense = codes.toarray()
    for r in prof.head(3).itertuples(index=False):
        rows = (table.plate.astype(str) == r.Metadata_Plate) & (
            table.well.astype(str) == r.Metadata_Well
        )
        np.testing.assert_allclose(
            prof.loc[
                (prof.Metadata_Plate == r.Metadata_Plate) & (prof.Metadata_Well == r.Metadata_Well),
                feats,
            ].to_numpy()[0],
            dense[rows.to_numpy()].mean(0),
            rtol=1e-5,
            atol=1e-7,
        )
    assert prof["Metadata_Cell_Count"].sum() == len(table)
    a = analyze_store(store, dictionary, AnalyzeSettings(), tmp_path / "an")
    written = pd.read_csv(a.paths["well_profiles"])
    assert written.shape == prof.shape
    np.testing.assert_allclose(written[feats].to_numpy(), prof[feats].to_numpy(), rtol=1e-5)


def test_names_round_trip_and_reach_analyze(explored, tmp_path):
    store, dictionary, _, _, other = explored
    notes = load_notes(dictionary.path)
    assert notes.names == {} and notes.checksum == dictionary_checksum(dictionary.path)
    notes.set(2, name="nuclear size", note="big nuclei; mostly in B wells")
    notes.set(5, name="mito texture")
    notes.set(5, name="")  # an empty name removes it
    path = save_notes(notes, dictionary.path)
    assert path == notes_path(dictionary.path) and path.name == "dict.features.json"
    back = load_notes(dictionary.path)
    assert back.names == {2: "nuclear size"} and back.notes == {2: "big nuclei; mostly in B wells"}
    a = analyze_store(store, dictionary, AnalyzeSettings(), tmp_path / "an")
    feats = pd.read_parquet(a.paths["features"]).set_index("feature")
    assert feats.loc[2, "name"] == "nuclear size" and feats.loc[3, "name"] == ""
    adata = ad.read_h5ad(a.paths["h5ad"])
    assert adata.var.loc["f0002", "note"] == "big nuclei; mostly in B wells"
    # another dictionary's names are refused, both checksums named
    theirs = notes_path(other)
    theirs.write_text(path.read_text())
    with pytest.raises(DictionaryError, match="written for another dictionary") as err:
        load_notes(other)
    assert dictionary_checksum(dictionary.path)[:12] in str(err.value)
    assert dictionary_checksum(other)[:12] in str(err.value)
    with pytest.raises(DictionaryError, match="belong to the dictionary"):
        save_notes(back, other)
    theirs.unlink()


def test_the_report_shows_names_notes_and_descriptions(explored, tmp_path):
    from napari_concept_discovery.report.build import ReportSettings, write_report

    store, dictionary, _, _, _ = explored
    notes = load_notes(dictionary.path)
    for f in range(dictionary.n_atoms):
        notes.set(f, name=f"concept {f}", note=f"seen in {f} wells")
    save_notes(notes, dictionary.path)
    try:
        page = write_report(store, [dictionary.path], tmp_path / "rep", ReportSettings(top=2))
        text = page.read_text()
        assert "feature 0</a>" in text or "#feature-" in text
        shown = [int(x.split("'")[0]) for x in text.split("id='feature-")[1:]]
        assert shown
        for f in shown:
            assert f"concept {f}" in text and f"seen in {f} wells" in text
        assert "measurements that follow it" in text
    finally:
        notes_path(dictionary.path).unlink()
