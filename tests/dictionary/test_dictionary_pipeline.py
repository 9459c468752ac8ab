"""Training, encoding and analysis on a real store through settings, with progress and cancel.

Codes from every path (training metrics, encode_store, analyze_store, the CLI's analyze) come
from the one encode loop, so they must agree exactly.
"""

from __future__ import annotations

import threading

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from helpers import fvu_by_hand, small_train
from napari_concept_discovery.analysis.analyze import analyze_store
from napari_concept_discovery.analysis.encode import encode_store
from napari_concept_discovery.cli import main
from napari_concept_discovery.dictionary import (
    AnalyzeSettings,
    Dictionary,
    evaluate,
    load_dictionary,
    save_dictionary,
    train_on_store,
)
from napari_concept_discovery.embed.store import ActivationStore
from napari_concept_discovery.errors import DictionaryError
from napari_concept_discovery.progress import Cancelled, Progress

SETTINGS = small_train(checkpoint_every=8)


@pytest.fixture(scope="module")
def store(tiny_store_path):
    return ActivationStore.open(tiny_store_path)


@pytest.fixture(scope="module")
def trained(store, tmp_path_factory):
    reports: list[Progress] = []
    path = tmp_path_factory.mktemp("dict") / "d.safetensors"
    result = train_on_store(store, SETTINGS, out=path, progress=reports.append)
    return result, reports


def test_train_on_store_reports_stages_and_records_its_settings(store, trained):
    result, reports = trained
    assert all(isinstance(p, Progress) for p in reports)
    stages = [p.stage for p in reports]
    first = {s: stages.index(s) for s in ("whiten", "train", "evaluate")}
    assert first["whiten"] < first["train"] < first["evaluate"]
    train = [p for p in reports if p.stage == "train"]
    assert [p.done for p in train] == [10, 20] and {p.total for p in train} == {20}
    assert set(train[-1].info) == {"loss", "fvu", "dead_fraction", "samples"}
    assert train[-1].info["samples"] == 20 * 64
    n = store.tokens("cell").shape[0]
    assert [(p.done, p.total) for p in reports if p.stage == "evaluate"][-1] == (n, n)

    loaded = load_dictionary(result.path)
    meta = loaded.meta
    # the store keeps channel tokens (a channel-agnostic model), so the default form is concat,
    # recorded as resolved; the covariance pooled (the default), with the hint that the
    # controls mix cell types
    assert meta.train == SETTINGS.replace(tokens="concat")
    assert meta.within_chosen == (
        "pooled (--whiten-within none); the controls mix cell_type: --whiten-within auto keeps it"
    )
    assert meta.tokens == "concat" and meta.token_groups == 6
    assert loaded.input_width == 6 * store.embed_dim == store.token_width("concat")
    assert meta.steps == 20 and not meta.cancelled and not meta.checkpoint
    assert meta.metrics == result.metrics
    fvu = fvu_by_hand(loaded, store.tokens("cell", "concat"), store.table("cell"))
    assert result.metrics["fvu"] == pytest.approx(fvu, rel=1e-5) and fvu < 0.8
    assert loaded.model.config.n_iter == 2 and loaded.model.config.n_pick == 2
    assert loaded.whitener.groups_ == ("SYNTH_1", "SYNTH_2")
    assert loaded.whitener.n_components_ == 8


def test_training_metrics_encode_store_and_evaluate_give_the_same_codes(store, trained):
    result, _ = trained
    loaded = load_dictionary(result.path)
    tokens, table = store.tokens("cell", loaded.token_form), store.table("cell")
    metrics, ev_codes = evaluate(
        loaded.model,
        tokens,
        whitener=loaded.whitener,
        groups=loaded.groups_of(table),
        return_codes=True,
    )
    # same loop, same batches, same numbers; training adds the whitening check (.overfit)
    assert metrics == {k: result.metrics[k] for k in metrics}
    assert set(result.metrics) - set(metrics) <= {
        "whitened_norm_ratio",
        "whitening_controls",
        "whitening_dims",
    }
    reports = []
    codes, table_out = encode_store(store, loaded, batch_size=50, progress=reports.append)
    assert (codes != ev_codes).nnz == 0 and codes.shape == (len(table), 24)
    pd.testing.assert_frame_equal(table_out, table)
    done = [p.done for p in reports]
    assert {p.stage for p in reports} == {"encode"}
    assert done == sorted(done) and done[0] == 0 and done[-1] == len(table)
    assert len(done) == 1 + -(-len(table) // 50)
    # the in-memory dictionary of the result encodes the same
    assert (result.dictionary.encode_table(tokens, table) != codes).nnz == 0


def test_cancel_keeps_the_dictionary_after_the_last_complete_step(store, tmp_path):
    stop = threading.Event()

    def progress(p):
        if p.stage == "train" and p.done == 10:
            stop.set()

    settings = SETTINGS.replace(steps=200, checkpoint_every=0)
    path = tmp_path / "cancelled.safetensors"
    result = train_on_store(store, settings, out=path, progress=progress, cancel=stop)
    assert result.cancelled and result.result.steps_done == 10 and result.metrics == {}
    # the output path only ever holds a finished dictionary; the state went to the checkpoint
    assert not path.exists() and result.path is None
    assert result.checkpoint == tmp_path / "cancelled.ckpt.safetensors"
    with pytest.raises(DictionaryError, match=r"training checkpoint \(after step 10\).*--resume"):
        load_dictionary(result.checkpoint)
    ref = train_on_store(store, SETTINGS.replace(steps=10))
    assert not ref.cancelled
    torch.testing.assert_close(result.dictionary.model.W, ref.dictionary.model.W, rtol=0, atol=0)

    # a cancel during the evaluation after training also ends with the trained dictionary
    seen = []
    late = train_on_store(
        store,
        SETTINGS.replace(steps=5),
        progress=lambda p: seen.append(p.stage),
        cancel=lambda: "evaluate" in seen,
    )
    assert late.cancelled and late.result.steps_done == 5 and late.metrics == {}


def test_encode_is_cancellable_and_refuses_what_does_not_fit(store, trained):
    result, _ = trained
    d = load_dictionary(result.path)
    with pytest.raises(Cancelled):
        encode_store(store, d, cancel=lambda: True)
    calls = []

    def after_two_batches():
        calls.append(1)
        return len(calls) > 2

    with pytest.raises(Cancelled, match="after 100 of"):
        encode_store(store, d, batch_size=50, cancel=after_two_batches)
    other = Dictionary(d.model, d.whitener, d.meta.replace(block=0))
    with pytest.raises(DictionaryError, match=r"'tiny-random' block 0 .* block 1 .* block differ"):
        encode_store(store, other)
    table = store.table("cell").drop(columns=["plate"])
    with pytest.raises(DictionaryError, match="whitens per 'plate'.*no such column"):
        d.encode_table(store.tokens("cell", "concat"), table)
    with pytest.raises(DictionaryError, match="got 3 whitening group labels for"):
        d.encode(store.tokens("cell", "concat"), ["SYNTH_1"] * 3)
    # the channel mean is not what a concat dictionary reads; the message says what is
    with pytest.raises(DictionaryError, match=r"width 192.*width 32.*form='concat'"):
        d.encode(store.tokens("cell"), store.table("cell")["plate"])


def test_analyze_store_writes_what_the_cli_writes(store, trained, small_plates, tmp_path):
    result, _ = trained
    settings = AnalyzeSettings(
        labels="well_type,perturbation",
        truth="mitotic,cell_type",
        truth_file=small_plates / "truth.csv",
        top_n=4,
    )
    analysis = analyze_store(store, load_dictionary(result.path), settings, tmp_path / "a")
    args = ["analyze", str(store.path), str(result.path), "--out", str(tmp_path / "b")]
    args += ["--labels", "well_type,perturbation", "--truth", "mitotic,cell_type"]
    args += ["--truth-file", str(small_plates / "truth.csv"), "--top", "4"]
    assert main(args) == 0
    assert set(analysis.paths) == {
        "selectivity",
        "selectivity_counts",
        "features",
        "codes",
        "tokens",
        "concepts",
        "families",
        "h5ad",
        "profiles",  # the dictionary is whitened on controls: profiles against them
        "activity",  # copairs mAP of the treated wells (two plates) against the controls
        "well_profiles",  # pycytominer's layout, cell tokens
    }
    profiles = pd.read_parquet(analysis.paths["profiles"])
    assert set(profiles["column"]) == {"perturbation"}  # not the control column itself
    assert set(profiles["value"]) == set(store.table("cell")["perturbation"])
    for name, path in analysis.paths.items():
        if path.suffix == ".parquet":
            pd.testing.assert_frame_equal(
                pd.read_parquet(path), pd.read_parquet(tmp_path / "b" / path.name), obj=name
            )
    pd.testing.assert_frame_equal(
        pd.read_csv(analysis.paths["well_profiles"]), pd.read_csv(tmp_path / "b/well_profiles.csv")
    )
    long = pd.read_parquet(analysis.paths["codes"])
    back = sp.csr_matrix(
        (long["code"], (long["token"], long["feature"])), shape=analysis.codes.shape
    )
    assert (back != analysis.codes).nnz == 0
    assert "mitotic" in analysis.table.columns  # the truth file was joined
    np.testing.assert_array_equal(
        analysis.table["plate"].to_numpy(), store.table("cell")["plate"].to_numpy()
    )


def test_analyze_store_checks_columns_and_files_before_writing(store, trained, tmp_path):
    d = load_dictionary(trained[0].path)
    out = tmp_path / "never"
    with pytest.raises(DictionaryError, match=r"no column 'kind' for selectivity \(labels\)"):
        analyze_store(store, d, AnalyzeSettings(labels="well_type,kind"), out)
    with pytest.raises(DictionaryError, match=r"no column 'mitotic' for ground truth \(truth\)"):
        analyze_store(store, d, AnalyzeSettings(truth="mitotic"), out)
    with pytest.raises(DictionaryError, match="no truth file at .*missing.csv"):
        analyze_store(store, d, AnalyzeSettings(truth_file=tmp_path / "missing.csv"), out)
    assert not out.exists()


def test_save_dictionary_takes_a_dictionary(trained, tmp_path):
    d = trained[0].dictionary
    again = load_dictionary(save_dictionary(tmp_path / "x.safetensors", d))
    assert again.meta == d.meta and torch.equal(again.model.W, d.model.W.detach())
    np.testing.assert_array_equal(again.whitener.transform_, d.whitener.transform_)
    with pytest.raises(DictionaryError, match="either a Dictionary or a model"):
        save_dictionary(tmp_path / "y.safetensors", d, d.whitener)
