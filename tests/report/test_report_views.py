"""The report of a dictionary in views: its views side by side and every feature labelled."""

from __future__ import annotations

import io
import re

import pandas as pd

from helpers import small_train
from napari_concept_discovery.dictionary.pipeline import train_on_store
from napari_concept_discovery.embed.store import ActivationStore
from napari_concept_discovery.report.build import ReportSettings, write_report


def test_the_report_shows_each_view_and_labels_every_feature(tiny_store_path, tmp_path):
    store = ActivationStore.open(tiny_store_path)
    path = train_on_store(
        store, small_train(views="whitened,centred"), out=tmp_path / "both.safetensors"
    ).path
    settings = ReportSettings(labels="cell_type,perturbation", top=4, cells=3)
    html = write_report(store, [path], tmp_path / "report", settings)
    text = html.read_text()
    tables = pd.read_html(io.StringIO(text))
    comp = next(t for t in tables if t.columns[0] == "dictionary")
    assert comp["dictionary"].tolist() == ["both [whitened]", "both [centred]"]
    assert comp["atoms"].tolist() == [24, 24]
    assert comp["whitening"].tolist() == [
        "pca on well_type=negative_control per plate",
        "center on well_type=negative_control per plate",
    ]
    views = next(t for t in tables if t.columns[0] == "label")
    assert {"whitened: feature", "centred: feature"} <= set(views.columns)
    for col, view in (("whitened: feature", range(24)), ("centred: feature", range(24, 48))):
        assert all(int(f) in view for f in views[col].dropna())
    assert "id='views'" in text and "views whitened + centred" in text
    families = next((t for t in tables if list(t.columns[:2]) == ["family", "view"]), None)
    assert families is None or set(families["view"]) <= {"whitened", "centred"}
    # every feature section's title and facts name its view, as does the table of contents
    for f in range(48):
        if f"id='feature-{f}'" in text or f'id="feature-{f}"' in text:
            view = "whitened" if f < 24 else "centred"
            assert re.search(rf"<h3>Feature {f}( “[^”<]*”)? \({view}\)", text), f
            assert f"feature {f}</a> ({view})" in text


def test_the_report_names_the_within_type_view_and_its_covariance(tiny_store_path, tmp_path):
    """The default's three parts on controls that mix cell types: the within-type part's
    whitening says it estimates the covariance within the cell type, and the Views note says
    what each of the three keeps."""
    store = ActivationStore.open(tiny_store_path)
    path = train_on_store(
        store,
        small_train(views="whitened,within-type,centred", steps=5),
        out=tmp_path / "three.safetensors",
    ).path
    settings = ReportSettings(labels="cell_type,perturbation", top=2, cells=2)
    text = write_report(store, [path], tmp_path / "report", settings).read_text()
    comp = next(t for t in pd.read_html(io.StringIO(text)) if t.columns[0] == "dictionary")
    assert comp["dictionary"].tolist() == [
        "three [whitened]",
        "three [within-type]",
        "three [centred]",
    ]
    assert comp["whitening"].tolist() == [
        "pca on well_type=negative_control per plate",
        "pca on well_type=negative_control per plate, covariance within cell_type",
        "center on well_type=negative_control per plate",
    ]
    assert "views whitened + within-type + centred" in text
    assert "<i>within-type</i> (whitened on the same controls with their covariance" in text
    assert "keeps what differs between cell types) and <i>centred</i>" in text
