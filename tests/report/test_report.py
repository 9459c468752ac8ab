"""Concept profiles on hand-made wells, and the HTML report read back as a browser would."""

from __future__ import annotations

import base64
import io
import shutil
import subprocess
from html.parser import HTMLParser

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from PIL import Image

from napari_concept_discovery.analysis.profiles import concept_profiles
from napari_concept_discovery.analysis.write import write_analysis
from napari_concept_discovery.cli import main
from napari_concept_discovery.dictionary.pipeline import train_on_store
from napari_concept_discovery.dictionary.settings import TrainSettings, WhitenSettings
from napari_concept_discovery.embed.store import ActivationStore
from napari_concept_discovery.errors import DictionaryError
from napari_concept_discovery.report.build import (
    ReportSettings,
    default_labels,
    rank_features,
    write_report,
)
from napari_concept_discovery.report.html import HITS_SHOWN
from napari_concept_discovery.settings import SettingsError

# --- concept profiles -------------------------------------------------------------------------


def _wells_table(cells_per_well: int = 2) -> pd.DataFrame:
    """Plate P1: controls C1..C3, drug X in X1..X3, drug Y in Y1..Y2; plate P2: controls D1, D2
    and drug X in X4."""
    wells = [
        ("P1", "C1", "ctrl"),
        ("P1", "C2", "ctrl"),
        ("P1", "C3", "ctrl"),
        ("P1", "X1", "X"),
        ("P1", "X2", "X"),
        ("P1", "X3", "X"),
        ("P1", "Y1", "Y"),
        ("P1", "Y2", "Y"),
        ("P2", "D1", "ctrl"),
        ("P2", "D2", "ctrl"),
        ("P2", "X4", "X"),
    ]
    rows = [
        {"plate": p, "well": w, "drug": d, "kind": "neg" if d == "ctrl" else "treated"}
        for p, w, d in wells
        for _ in range(cells_per_well)
    ]
    return pd.DataFrame(rows)


def _codes(table: pd.DataFrame, per_well: dict[str, list[float]]) -> sp.csr_matrix:
    """Every cell of a well gets that well's code of each feature."""
    return sp.csr_matrix(np.array([per_well[w] for w in table["well"]], dtype=np.float64))


def test_concept_profiles_hand_computed():
    table = _wells_table()
    # feature 0: X switches it on in every well; feature 1: only Y1 (one odd well of Y);
    # feature 2: on in X1 and X2 only (a majority of X's wells, three of four)
    per_well = {
        "C1": [1.0, 0.0, 0.0],
        "C2": [2.0, 0.0, 0.0],
        "C3": [3.0, 0.0, 0.0],
        "X1": [10.0, 0.0, 5.0],
        "X2": [12.0, 0.0, 5.0],
        "X3": [11.0, 0.0, 0.0],
        "Y1": [2.0, 9.0, 0.0],
        "Y2": [2.0, 0.0, 0.0],
        "D1": [0.0, 0.0, 0.0],
        "D2": [2.0, 0.0, 0.0],
        "X4": [8.0, 0.0, 5.0],
    }
    prof = concept_profiles(_codes(table, per_well), table, "drug", "kind=neg")
    assert prof.values == ["X", "Y", "ctrl"]
    np.testing.assert_array_equal(prof.n_wells, [4, 2, 5])
    # feature 0 on P1: controls 1, 2, 3 -> mean 2, sd 1; X1 = (10 - 2) / 1 = 8
    w = prof.wells.set_index("well")
    z = pd.DataFrame(prof.well_z, index=w.index)
    assert z.loc["X1", 0] == pytest.approx(8.0)
    assert z.loc["Y1", 0] == pytest.approx(0.0)
    # on P2: controls 0, 2 -> mean 1, sd sqrt(2); X4 = 7 / sqrt(2)
    assert z.loc["X4", 0] == pytest.approx(7 / np.sqrt(2))
    # feature 1 is 0 in every control of P1: the spread is floored at 0.1 x its spread over
    # all wells of P1, so Y1 gets a large but finite z, Y2 gets 0
    spread = np.std([0, 0, 0, 0, 0, 0, 9, 0])
    assert z.loc["Y1", 1] == pytest.approx(9 / (0.1 * spread))
    assert w.loc["C1", "is_control"] and not w.loc["X1", "is_control"]
    # calibration: each of P1's three control wells against the other two (P2 has only two);
    # feature 0: C3 = 3 against (1, 2) gives z = 1.5 / sqrt(0.5) = 2.12 > 2, C1 gives -2.12,
    # C2 gives 0; features 1 and 2 are 0 in every control: 1 of 9 pairs
    assert prof.control_exceed == pytest.approx(1 / 9)
    p = 1 / 9  # a value with 4 wells needs 3 above threshold, on any of the 3 features
    assert prof.chance_hits(4) == pytest.approx(3 * (4 * p**3 * (1 - p) + p**4))
    assert np.isnan(prof.chance_hits(1))  # the hit rule needs at least two wells

    hits = prof.hits()
    pairs = set(zip(hits["value"], hits["feature"], strict=True))
    assert ("X", 0) in pairs  # every X well
    assert ("Y", 1) not in pairs  # one odd well of two is not a majority
    assert ("X", 2) in pairs  # three of four wells
    row = hits[(hits.value == "X") & (hits.feature == 2)].iloc[0]
    assert row["wells_above"] == 3 and row["n_wells"] == 4
    xi = prof.values.index("X")
    np.testing.assert_allclose(prof.median_z[xi, 0], np.median(z.loc[["X1", "X2", "X3", "X4"], 0]))
    # the controls themselves sit around zero and are never hits
    assert not prof.hit_mask()[prof.values.index("ctrl")].any()


def test_concept_profiles_refuse_missing_controls():
    table = _wells_table()
    codes = sp.csr_matrix(np.ones((len(table), 2)))
    with pytest.raises(DictionaryError, match="no control wells"):
        concept_profiles(codes, table, "drug", "kind=absent")
    with pytest.raises(DictionaryError, match="'nope'"):
        concept_profiles(codes, table, "drug", "nope=1")
    # a plate without control wells is left out and named
    t2 = table[~((table.plate == "P2") & (table.kind == "neg"))].reset_index(drop=True)
    prof = concept_profiles(sp.csr_matrix(np.ones((len(t2), 2))), t2, "drug", "kind=neg")
    assert prof.skipped_plates == ["P2"]
    assert "X4" not in set(prof.wells["well"])


def test_write_analysis_profiles_parquet_and_anndata(tmp_path):
    table = _wells_table()
    rng = np.random.default_rng(0)
    codes = sp.random(len(table), 5, density=0.5, random_state=rng, format="csr")
    paths = write_analysis(tmp_path, codes, table, ["drug"], controls="kind=neg")
    long = pd.read_parquet(paths["profiles"])
    assert len(long) == 3 * 5  # values x features
    prof = concept_profiles(codes, table, "drug", "kind=neg")
    np.testing.assert_allclose(long["median_z"].to_numpy(), prof.median_z.ravel())
    adata = ad.read_h5ad(paths["h5ad"])
    varm = adata.varm["profile_drug"]
    assert list(varm.columns) == ["X", "Y", "ctrl"]
    np.testing.assert_allclose(np.asarray(varm, dtype=float), prof.median_z.T, rtol=1e-6)
    uns = adata.uns["profiles"]["drug"]
    assert uns["control"] == "kind=neg"
    assert list(uns["n_wells"]) == [4, 2, 5]
    assert len(uns["hit_feature"]) == int(prof.hit_mask().sum())


# --- the report -----------------------------------------------------------------------------


class _Page(HTMLParser):
    """Feature sections with their images, the table of contents, and every image."""

    def __init__(self):
        super().__init__()
        self.section = None
        self.sections: dict[int, list[tuple[str, str]]] = {}
        self.toc: list[int] = []
        self.in_toc = False
        self.images: list[str] = []
        self.links: list[str] = []
        self.external: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "section" and "data-feature" in a:
            self.section = int(a["data-feature"])
            self.sections[self.section] = []
        if tag == "nav":
            self.in_toc = True
        if tag == "a" and a.get("href"):
            self.links.append(a["href"])
            if self.in_toc:
                self.toc.append(int(a["href"].split("-")[-1]))
        if tag == "img":
            self.images.append(a["src"])
            if self.section is not None:
                self.sections[self.section].append((a["data-kind"], a["src"]))
        for key in ("src", "href"):
            if a.get(key, "").startswith(("http:", "https:", "//")):
                self.external.append(a[key])
        if tag in ("script", "link"):
            self.external.append(tag)

    def handle_endtag(self, tag):
        if tag == "section":
            self.section = None
        if tag == "nav":
            self.in_toc = False


def _decode(src: str) -> Image.Image:
    head, data = src.split(",", 1)
    assert head in ("data:image/png;base64", "data:image/jpeg;base64")
    im = Image.open(io.BytesIO(base64.b64decode(data)))
    im.load()
    return im


@pytest.fixture(scope="module")
def two_dictionaries(tiny_store_path, tmp_path_factory):
    store = ActivationStore.open(tiny_store_path)
    out = tmp_path_factory.mktemp("report-dicts")
    common = dict(unit="cell", atoms=32, steps=30, batch_size=64, seed=1)
    icfl = TrainSettings(
        method="icfl",
        sparsity=4,
        n_pick=2,
        whiten=WhitenSettings(controls="well_type=negative_control", by="plate", mode="center"),
        **common,
    )
    topk = TrainSettings(method="topk", sparsity=4, **common)
    a = train_on_store(store, icfl, out=out / "icfl-centre.safetensors").path
    b = train_on_store(store, topk, out=out / "topk-raw.safetensors").path
    return store, [a, b]


@pytest.fixture(scope="module")
def written(two_dictionaries, tmp_path_factory):
    store, paths = two_dictionaries
    out = tmp_path_factory.mktemp("report")
    settings = ReportSettings(labels="cell_type,perturbation", top=4, cells=5, threshold=0.5)
    stages = []
    html = write_report(store, paths, out, settings, progress=lambda p: stages.append(p.stage))
    assert {"encode", "report"} <= set(stages)
    return store, paths, html


def test_report_structure(written):
    store, paths, html = written
    text = html.read_text()
    page = _Page()
    page.feed(text)
    assert page.external == []  # nothing fetched from anywhere: opens from disk
    # every listed feature has a section with every figure, each a readable image
    assert page.toc == list(page.sections)
    # the four most selective, then up to two features that labels switch on most strongly
    hits = pd.read_csv(html.parent / "hits.csv")
    strongest = list(dict.fromkeys(hits.sort_values("median_z", ascending=False)["feature"]))
    extra = page.toc[4:]
    assert len(page.toc) == 4 + len(extra) and len(extra) <= 2
    assert extra == [f for f in strongest if f not in page.toc[:4]][: len(extra)]
    for f, images in page.sections.items():
        kinds = [k for k, _ in images]
        assert kinds == ["cells", "site", "plate", "selectivity"], (f, kinds)
        for _, src in images:
            im = _decode(src)
            assert im.size[0] > 100 and im.size[1] > 50
            assert np.asarray(im.convert("L")).std() > 0  # not a blank picture
    # internal links all land on an anchor of the page (or the hits file beside it)
    for href in page.links:
        assert href == "hits.csv" or f'id="{href[1:]}"' in text or f"id='{href[1:]}'" in text
    assert (html.parent / "hits.csv").is_file()
    for src in page.images:
        _decode(src)
    assert "id='quality'" in text and "Segmentation quality" in text


def test_report_tables(written):
    store, paths, html = written
    tables = pd.read_html(io.StringIO(html.read_text()))
    by_first = {t.columns[0]: t for t in tables}
    comp = by_first["dictionary"]
    assert comp["dictionary"].tolist() == ["icfl-centre", "topk-raw"]
    assert comp["method"].tolist() == ["icfl", "topk"]
    assert comp["atoms"].tolist() == [32, 32]
    assert comp["whitening"].tolist()[1] == "none"
    assert "per plate" in comp["whitening"].tolist()[0]
    assert {"FVU", "L0", "dead", "selective > 0.5", "selective > 0.2"} <= set(comp.columns)
    # one profile row per perturbation (and per cell type), with its wells counted
    cells = store.table("cell")
    wells = cells[["plate", "well", "perturbation"]].drop_duplicates()
    prof = [t for t in tables if t.columns[0] == "perturbation" and "wells" in t.columns][0]
    expected = wells.groupby("perturbation").size()
    assert prof.set_index("perturbation")["wells"].to_dict() == expected.to_dict()
    types = [t for t in tables if t.columns[0] == "cell_type" and "wells" in t.columns][0]
    assert sorted(types["cell_type"]) == sorted(cells["cell_type"].unique())
    # the hits tables agree with hits.csv
    hits = pd.read_csv(html.parent / "hits.csv")
    listed = {t.columns[0]: t for t in tables if "median z" in t.columns}
    for col in ("cell_type", "perturbation"):
        mine = hits[hits.column == col]
        if len(mine) == 0:
            assert col not in listed
            continue
        t = listed[col]
        assert len(t) == min(len(mine), HITS_SHOWN)
        top = mine.head(len(t))
        assert t[col].astype(str).tolist() == top["value"].astype(str).tolist()
        np.testing.assert_allclose(t["median z"], top["median_z"], atol=0.006)
        assert all(int(a.split("/")[0]) * 2 > int(a.split("/")[1]) for a in t["wells above"])
    assert len(hits) > 0  # cell types (four wells each) switch features on at z > 0.5
    # every profile says how many hits chance alone would give, from held-out control wells
    assert "expected by chance" in prof.columns
    assert html.read_text().count("class='note calibration'>Calibration: ") == 2


def test_report_opens_in_headless_chromium(written, tmp_path):
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.skip("chromium is not installed (scripts/install.sh --test installs it)")
    _, _, html = written
    cmd = [
        exe,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--enable-logging=stderr",
        "--v=0",
        "--dump-dom",
        html.as_uri(),
    ]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr[-2000:]
    page = _Page()
    page.feed(run.stdout)
    assert len(page.sections) >= 4  # the browser parsed every feature section
    assert list(page.sections) == page.toc
    problems = [
        line
        for line in run.stderr.splitlines()
        if "CONSOLE" in line or "Uncaught" in line or "Failed to load resource" in line
    ]
    assert problems == []


def test_report_cli_and_errors(two_dictionaries, tmp_path, capsys):
    store, paths = two_dictionaries
    out = tmp_path / "r"
    argv = ["report", str(store.path), str(paths[1]), "--out", str(out), "--top", "2"]
    argv += ["--cells", "3", "--labels", "cell_type", "--controls", "well_type=negative_control"]
    assert main(argv) == 0
    assert f"wrote {out / 'index.html'}" in capsys.readouterr().out
    page = _Page()
    page.feed((out / "index.html").read_text())
    assert len(page.sections) >= 2 and list(page.sections) == page.toc
    assert main([*argv[:5], "--labels", "no_such_column"]) == 2
    assert "no_such_column" in capsys.readouterr().err
    with pytest.raises(SettingsError, match="controls"):
        ReportSettings(controls="well_type")


def test_report_never_replaces_files_it_did_not_write(two_dictionaries, tmp_path, capsys):
    """A report refuses an index.html or hits.csv that it did not write (as analyze
    and train refuse theirs), goes on replacing its own, and stays out of a store."""
    from fault_helpers import snapshot
    from napari_concept_discovery._files import owned_files
    from napari_concept_discovery.errors import OutputError
    from napari_concept_discovery.report.build import REPORT_MARKER

    store, paths = two_dictionaries
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "index.html").write_text("<p>my lab notebook</p>")
    (mine / "hits.csv").write_text("mine\n")
    (mine / "notes.txt").write_text("kept")
    before = snapshot(mine)
    argv = ["report", str(store.path), str(paths[1]), "--top", "1", "--cells", "2"]
    argv += ["--labels", "cell_type", "--controls", "well_type=negative_control"]
    assert main([*argv, "--out", str(mine)]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"error: {mine} exists and holds files that are not a report (hits.csv, index.html); a "
        "report would replace them, so choose another output folder (or move those files "
        "away)\n"
    )
    with pytest.raises(OutputError, match="not a report"):
        write_report(store, paths[1:], mine)
    assert snapshot(mine) == before
    # only the hits.csv is foreign: still refused
    (mine / "index.html").unlink()
    assert main([*argv, "--out", str(mine)]) == 2
    assert "(hits.csv)" in capsys.readouterr().err
    # its own folder is replaced run after run; a folder beside other files is fine
    (mine / "hits.csv").unlink()
    assert main([*argv, "--out", str(mine)]) == 0
    assert main([*argv, "--out", str(mine)]) == 0
    assert (mine / "notes.txt").read_text() == "kept"
    assert owned_files(mine, REPORT_MARKER) >= {"index.html", REPORT_MARKER}
    # a report inside a store would count in its size
    capsys.readouterr()
    assert main([*argv, "--out", str(store.path / "report")]) == 2
    assert f"is inside the activation store {store.path}" in capsys.readouterr().err
    assert not (store.path / "report").exists()


def test_default_labels_and_ranking():
    table = pd.DataFrame(
        {
            "plate": ["1"] * 4 + ["2"] * 4,
            "well": ["A1", "A1", "A2", "A2"] * 2,
            "site": [1] * 8,
            "well_id": ["1A1", "1A1", "1A2", "1A2", "2A1", "2A1", "2A2", "2A2"],
            "drug": ["x", "x", "y", "y", "x", "x", "ctrl", "ctrl"],
            "experiment": ["E"] * 8,
            "dose": [0.1, 0.1, 1, 1, 0.1, 0.1, 0, 0],
        }
    )
    assert default_labels(table) == ["drug"]  # not ids, constants or numbers
    features = pd.DataFrame(
        {
            "feature": [0, 1, 2, 3, 4],
            "n_active": [5, 5, 5, 0, 5],
            "frequency": [0.1] * 5,
            "top_column": ["drug"] * 5,
            "top_label": ["x", "x", "y", "y", "z"],
            "selectivity_avg": [0.9, 0.8, 0.3, 0.95, 0.1],
        }
    )
    # the best of each label first (z's best is too weak to lead), then the rest; 3 never fires
    assert rank_features(features, 5) == [0, 2, 1, 4]


# --- what the report claims, shown ------------------------------------------------------------


def _section_text(text: str, f: int) -> str:
    start = text.index(f"id='feature-{f}'")
    return text[start : text.index("</section>", start)]


def test_report_shows_the_stain_shares_of_every_feature(written):
    from napari_concept_discovery.dictionary import load_dictionary
    from napari_concept_discovery.report.html import stain_shares

    store, paths, html = written
    text = html.read_text()
    assert "stains " + ", ".join(store.channel_names) in text  # the header names them
    shares = load_dictionary(paths[0]).stain_table()
    assert shares is not None  # per-channel tokens: every atom has a share per stain
    page = _Page()
    page.feed(text)
    for f in page.sections:
        row = shares.iloc[f]
        said = stain_shares(row, [f"stain_{n}" for n in store.channel_names])
        assert f"<b>stains</b> {said}" in _section_text(text, f)
        top = row["top_stain"]
        assert said.split(": ")[-1].startswith(f"{top} {row[f'stain_{top}']:.0%}")


def test_top_cells_come_from_several_wells_and_the_report_says_how_many(written):
    from napari_concept_discovery.analysis.explore import Explorer
    from napari_concept_discovery.dictionary import load_dictionary

    store, paths, html = written
    ex = Explorer(store, load_dictionary(paths[0]))
    codes, table = ex.cell_codes()
    text = html.read_text()
    page = _Page()
    page.feed(text)
    for f in page.sections:
        capped = ex.top_cells(f, 5, per_well=1)
        wells = capped[["plate", "well"]].astype(str).apply(tuple, axis=1)
        assert wells.is_unique  # one cell per well at most
        # each is its well's strongest cell, the wells taken strongest first
        v = codes[:, f].toarray().ravel()
        frame = table[["plate", "well"]].astype(str).assign(v=v)
        best = frame[frame.v > 0].groupby(["plate", "well"]).v.max().sort_values(ascending=False)
        np.testing.assert_allclose(capped["value"], best.head(5).to_numpy(), rtol=1e-6)
        # the page's gallery keeps at most the setting's share of one well, and says so
        shown = ex.top_cells(f, 5, per_well=ReportSettings().per_well)
        n_wells = shown[["plate", "well"]].drop_duplicates().shape[0]
        assert shown.groupby(["plate", "well"]).size().max() <= ReportSettings().per_well
        assert f"<b>top cells</b> {len(shown)} from {n_wells} well" in _section_text(text, f)
    plain = ex.top_cells(page.toc[0], 5)
    np.testing.assert_array_equal(plain["value"], np.sort(plain["value"])[::-1])


def test_profile_heatmap_row_labels_overlap_nothing():
    from napari_concept_discovery.report.figures import profile_figure

    table = _wells_table(cells_per_well=3)
    table["drug"] = table["drug"].map(
        {"ctrl": "ctrl", "X": "a_very_long_perturbation_name", "Y": "Y"}
    )
    rng = np.random.default_rng(0)
    codes = sp.csr_matrix(rng.random((len(table), 12)) * (rng.random((len(table), 12)) > 0.5))
    prof = concept_profiles(codes, table, "drug", "kind=neg", threshold=0.5)
    fig = profile_figure(prof, list(range(12)))
    renderer = fig.canvas.get_renderer()
    fig.canvas.draw()
    heat = [ax for ax in fig.axes if ax.images][0]
    others = [ax.get_window_extent(renderer) for ax in fig.axes if ax is not heat]
    labels = [t.get_window_extent(renderer) for t in heat.get_yticklabels() if t.get_text()]
    labels.append(heat.yaxis.label.get_window_extent(renderer))
    assert len(labels) == len(prof.values) + 1
    for box in labels:
        assert heat.get_window_extent(renderer).x1 <= box.x0  # right of the heatmap
        for other in others:  # the dendrograms and the colour bar
            assert not box.overlaps(other), (box, other)
    for a, b in zip(labels, labels[1:], strict=False):
        assert not a.overlaps(b)


def test_a_sentence_where_selectivity_and_profiles_disagree():
    """Cells of drug X mostly fire weakly (the most selective label), a few cells of drug Y fire
    strongly (its wells' means stand out from the controls): the feature says both, plainly."""
    from napari_concept_discovery.analysis.concepts import feature_table, selectivity
    from napari_concept_discovery.report.html import disagreement

    table = _wells_table(cells_per_well=20)
    rng = np.random.default_rng(1)
    v = np.zeros(len(table))
    for idx in table.groupby("well").groups.values():
        idx = np.asarray(idx)
        if table.loc[idx[0], "drug"] == "ctrl":
            hit = rng.choice(idx, 2, replace=False)
            v[hit] = rng.uniform(0.1, 0.2, 2)
        elif table.loc[idx[0], "drug"] == "X":
            v[idx[:18]] = 0.005
        else:
            v[idx[:3]] = 5.0
    codes = sp.csr_matrix(v[:, None])
    sels = {"drug": selectivity(codes, table["drug"].to_numpy(), "drug")}
    row = feature_table(codes, table, ["drug"], selectivities=sels).iloc[0]
    assert (row["top_column"], row["top_label"]) == ("drug", "X")
    prof = concept_profiles(codes, table, "drug", "kind=neg")
    assert prof.hits()["value"].tolist() == ["Y"]
    sentence = disagreement(row, 0, [prof], sels)
    assert "most selective for drug = X (active in 90% of its cells" in sentence
    assert "single out drug = Y" in sentence
    # a feature whose label is its only hit needs no sentence
    agree = row.copy()
    agree["top_label"] = "Y"
    assert disagreement(agree, 0, [prof], sels) == ""
    # hits beyond the label are said with "also"
    both = concept_profiles(codes, table, "drug", "kind=neg", threshold=-50.0)
    assert {"X", "Y"} <= set(both.hits()["value"])
    said = disagreement(row, 0, [both], sels)
    assert "profiles also single out" in said and "drug = Y" in said and "= X," not in said
    assert disagreement(row, 0, [], sels) == ""


def test_report_shows_the_phenotypic_activity_of_codes_and_tokens(written):
    """The activity section: what mAP means, and per cell type (two treated wells each) the
    mAP of the codes and the raw tokens as phenotypic_activity computes them."""
    from napari_concept_discovery.analysis.activity import phenotypic_activity
    from napari_concept_discovery.analysis.encode import dictionary_tokens, encode_store
    from napari_concept_discovery.dictionary.io import load_dictionary

    store, paths, html = written
    text = html.read_text()
    assert "<h2 id='activity'>Phenotypic activity (mAP)</h2>" in text
    assert "href='#activity'" in text  # listed in the contents
    assert "mean average precision" in text and "random ranking" in text
    # perturbations have one well each here: the page says why they are missing
    assert "no value has replicate wells" in text
    tables = pd.read_html(io.StringIO(text))
    (table,) = [t for t in tables if "codes mAP" in t.columns]
    assert list(table.columns[:3]) == ["column", "value", "wells"]
    assert {"tokens mAP", "random mAP"} <= set(table.columns)
    assert set(table["column"]) == {"cell_type"}
    dictionary = load_dictionary(paths[0])
    codes, cells = encode_store(store, dictionary)
    control = dictionary.meta.controls
    for name, values in (
        ("codes", codes),
        ("tokens", dictionary_tokens(store, dictionary, "cell")),
    ):
        want = phenotypic_activity(values, cells, "cell_type", control).set_index("value")
        for value, shown in zip(table["value"], table[f"{name} mAP"], strict=True):
            m = want.loc[value]
            assert shown == f"{m['mean_average_precision']:.2f} (q {m['q_value']:.3f})"
