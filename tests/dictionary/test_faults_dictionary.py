"""Faults around dictionaries: training, checkpoints, files, analysis.

Every bad input gets a clear error and leaves every existing file byte-identical; a training
killed at any point leaves the old dictionary (or none) at the output path and a checkpoint
that resumes to the dictionary an uninterrupted run gives.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import threading

import numpy as np
import pytest
import torch
import zarr

from fault_helpers import run_and_kill, snapshot
from helpers import small_train
from napari_concept_discovery.analysis import write
from napari_concept_discovery.analysis.analyze import analyze_store
from napari_concept_discovery.analysis.truth import concept_auroc, join_truth
from napari_concept_discovery.cli import main
from napari_concept_discovery.dictionary import (
    AnalyzeSettings,
    TrainSettings,
    load_dictionary,
    save_dictionary,
    train_on_store,
)
from napari_concept_discovery.dictionary.io import FORMAT_VERSION, checkpoint_path, read_header
from napari_concept_discovery.embed.store import ActivationStore
from napari_concept_discovery.errors import DictionaryError, OutputError
from napari_concept_discovery.settings import SettingsError

torch.set_num_threads(2)

SETTINGS = small_train(steps=30, checkpoint_every=10)
TRAIN = ["--atoms", "24", "--sparsity", "4", "--steps", "5", "--batch-size", "64", "--no-whiten"]


@pytest.fixture(scope="module")
def store(tiny_store_path):
    return ActivationStore.open(tiny_store_path)


@pytest.fixture(scope="module")
def trained(store, tmp_path_factory):
    """A finished dictionary of the tiny store (module-wide; tests copy it before damaging)."""
    path = tmp_path_factory.mktemp("trained") / "d.safetensors"
    return train_on_store(store, SETTINGS, out=path)


def _store_copy(tiny_store_path, tmp_path, **attrs):
    """A copy of the tiny store, with root attributes changed."""
    copy = tmp_path / "store"
    shutil.copytree(tiny_store_path, copy)
    if attrs:
        zarr.open_group(str(copy), mode="a").attrs.update(attrs)
    return copy


def _same_dictionary(a, b) -> None:
    for name, t in a.model.tensors().items():
        torch.testing.assert_close(t, b.model.tensors()[name], rtol=0, atol=0, msg=name)
    if a.whitener is not None:
        np.testing.assert_array_equal(a.whitener.transform_, b.whitener.transform_)


# --- 1. the output path ----------------------------------------------------------------------


def test_train_out_refuses_a_file_that_is_not_a_dictionary(tiny_store_path, tmp_path, capsys):
    csv = tmp_path / "results.csv"
    csv.write_text("plate,well\nP1,B02\n")
    before = snapshot(tmp_path)
    assert main(["train", str(tiny_store_path), *TRAIN, "--out", str(csv)]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"error: {csv} exists and is not a dictionary file; choose another --out, or pass "
        "--overwrite (overwrite=True) to replace it\n"
    )
    assert snapshot(tmp_path) == before
    assert main(["train", str(tiny_store_path), *TRAIN, "--out", str(csv), "--overwrite"]) == 0
    assert load_dictionary(csv).meta.steps == 5
    # a dictionary at --out is replaced by the new one without --overwrite
    assert main(["train", str(tiny_store_path), *TRAIN[:-1], "--no-whiten", "--out", str(csv)]) == 0


# --- 1. checkpoints and resume ---------------------------------------------------------------


@pytest.mark.parametrize("method", ["icfl", "topk"])
def test_resume_reaches_the_dictionary_of_an_uninterrupted_run(store, tmp_path, method):
    settings = SETTINGS.replace(checkpoint_every=5)
    if method == "topk":
        settings = settings.replace(method="topk", n_pick=None)
    ref = train_on_store(store, settings, out=tmp_path / "ref.safetensors")
    stop = threading.Event()

    def progress(p):
        if p.stage == "train" and p.done == 10:
            stop.set()

    out = tmp_path / "d.safetensors"
    first = train_on_store(store, settings, out=out, progress=progress, cancel=stop)
    assert first.cancelled and not out.exists()
    ckpt = checkpoint_path(out)
    assert first.checkpoint == ckpt and json.loads(read_header(ckpt)["meta"])["steps"] == 10
    resumed = train_on_store(store, settings, out=out, resume=True)
    assert resumed.result.steps_done == 30 and not ckpt.exists()
    _same_dictionary(load_dictionary(out), load_dictionary(ref.path))
    assert resumed.metrics == ref.metrics
    meta = load_dictionary(out).meta
    assert meta.weights_hash == store.weights_hash and meta.model_source == store.model_source
    # nothing to resume from now
    with pytest.raises(DictionaryError, match=r"no checkpoint at .*d\.ckpt\.safetensors"):
        train_on_store(store, settings, out=out, resume=True)


def test_resume_refuses_other_settings_and_checkpoints_are_not_dictionaries(
    store, tmp_path, capsys
):
    out = tmp_path / "d.safetensors"
    asked = itertools.count()
    train_on_store(store, SETTINGS, out=out, cancel=lambda: next(asked) >= 3)
    ckpt = checkpoint_path(out)
    assert ckpt.exists() and not out.exists()
    with pytest.raises(DictionaryError, match=r"other settings \(atoms, seed differ\)"):
        train_on_store(store, SETTINGS.replace(seed=4, atoms=32), out=out, resume=True)
    rc = main(["analyze", str(store.path), str(ckpt), "--out", str(tmp_path / "a")])
    assert rc == 2
    assert "is a training checkpoint (after step 3), not a finished dictionary" in (
        capsys.readouterr().err
    )


TRAIN_CHILD = """
import json, sys, time
import torch
from napari_concept_discovery.dictionary import TrainSettings, train_on_store
from napari_concept_discovery.embed.store import ActivationStore
store, out, marker, settings = sys.argv[1:]
torch.set_num_threads(2)

def progress(p):
    if p.stage == "train" and p.done >= 20:
        open(marker, "w").write(str(p.done))
        time.sleep(600)

train_on_store(ActivationStore.open(store), TrainSettings.from_dict(json.loads(settings)),
               out=out, progress=progress)
"""


def test_a_killed_training_keeps_the_old_dictionary_and_resumes(store, tmp_path):
    out = tmp_path / "d.safetensors"
    train_on_store(store, SETTINGS.replace(seed=9, steps=5), out=out)  # an earlier dictionary
    before = snapshot(out)
    marker = tmp_path / "marker"
    args = (str(store.path), str(out), str(marker), json.dumps(SETTINGS.to_dict()))
    run_and_kill(TRAIN_CHILD, marker, *args)
    assert snapshot(out) == before  # the final path holds the old, finished dictionary
    assert load_dictionary(out).meta.train.seed == 9
    ckpt = checkpoint_path(out)
    assert json.loads(read_header(ckpt)["meta"])["steps"] == 10
    resumed = train_on_store(store, SETTINGS, out=out, resume=True)
    ref = train_on_store(store, SETTINGS, out=tmp_path / "ref.safetensors")
    got, want = load_dictionary(out), load_dictionary(ref.path)
    for name, t in want.model.tensors().items():
        torch.testing.assert_close(got.model.tensors()[name], t, rtol=0, atol=1e-6, msg=name)
    assert resumed.result.steps_done == 30 and not ckpt.exists()


# --- Ctrl-C, a second writer, divergence ----------------------------------------


SIGINT_CHILD = """
import signal, subprocess, sys
p = subprocess.Popen(
    [sys.executable, "-m", "napari_concept_discovery.cli", *sys.argv[1:]],
    stderr=subprocess.PIPE, text=True,
    preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # as in a terminal
)
said = []
for line in p.stderr:  # Ctrl-C once the first steps are reported
    said.append(line)
    if line.startswith("train icfl: ") and not line.startswith("train icfl: 0/"):
        p.send_signal(signal.SIGINT)
        break
said.append(p.stderr.read())
print(p.wait())
print("".join(said))
"""


def test_ctrl_c_keeps_a_checkpoint_that_resumes(store, tmp_path, capsys):
    """Ctrl-C ends the training after the step under way with exit 130, writing a final
    checkpoint; --resume then reaches the dictionary of an uninterrupted run."""
    import subprocess
    import sys

    from fault_helpers import SRC

    out = tmp_path / "d.safetensors"

    def train_args(steps: int) -> list[str]:
        return ["train", str(store.path), *TRAIN[:4], "--steps", str(steps), "--batch-size",
                "64", "--no-whiten", "--seed", "3", "--checkpoint-every", "0"]  # fmt: skip

    env = {**os.environ, "PYTHONPATH": str(SRC)}
    done = subprocess.run(
        [sys.executable, "-c", SIGINT_CHILD, *train_args(3000), "--out", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    rc, _, said = done.stdout.partition("\n")
    ckpt = checkpoint_path(out)
    assert rc == "130", done.stdout + done.stderr
    assert "interrupted: training stopped after step " in said
    assert f"checkpoint {ckpt} kept: train again with --resume" in said
    assert "Traceback" not in said and not out.exists()
    step = json.loads(read_header(ckpt)["meta"])["steps"]
    assert 0 < step < 3000
    # resumed to a nearer end: the dictionary of a run straight to that end
    assert main([*train_args(step + 5), "--out", str(out), "--resume"]) == 0
    assert main([*train_args(step + 5), "--out", str(tmp_path / "r.st")]) == 0
    got, want = load_dictionary(out), load_dictionary(tmp_path / "r.st")
    for name, t in want.model.tensors().items():
        torch.testing.assert_close(got.model.tensors()[name], t, rtol=0, atol=1e-6, msg=name)
    assert not ckpt.exists()


def test_two_trainings_to_one_file_are_refused(tiny_store_path, tmp_path, capsys):
    from napari_concept_discovery._lock import lock_path, write_lock

    out = tmp_path / "d.safetensors"
    with write_lock(out, what="dictionary file", error=OutputError):
        assert main(["train", str(tiny_store_path), *TRAIN, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(
        f"error: dictionary file {out} is being written by process {os.getpid()} since"
    ), err
    assert not out.exists() and not lock_path(out).exists()
    assert main(["train", str(tiny_store_path), *TRAIN, "--out", str(out)]) == 0
    assert out.exists() and not lock_path(out).exists()


@pytest.mark.parametrize(
    "method, lr", [("icfl", "1e30"), ("topk", "1e10")], ids=["icfl-1e30", "topk-1e10"]
)
def test_a_diverging_training_writes_no_dictionary(tiny_store_path, tmp_path, capsys, method, lr):
    out = tmp_path / "d.safetensors"
    args = ["train", str(tiny_store_path), *TRAIN, "--method", method, "--lr", lr]
    assert main([*args, "--out", str(out), "--steps", "20"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: training diverged: the loss was not finite at step "), err
    assert f"no dictionary was written to {out}; train again with a smaller --lr" in err
    assert err.count("\n") == 1 and list(tmp_path.iterdir()) == []
    # through --json too: no "ok: true"
    assert main(["--json", *args, "--out", str(out), "--steps", "20"]) == 2
    assert '"ok": false' in capsys.readouterr().out
    assert main([*args[:-2], "--lr", "inf", "--out", str(out)]) == 2
    assert "lr: must be positive and finite, got inf" in capsys.readouterr().err
    # --keep-diverged keeps the last sound state, marked, and analyze and report refuse it
    assert main([*args, "--out", str(out), "--steps", "20", "--keep-diverged"]) == 2
    err = capsys.readouterr().err
    assert f"is kept at {out}, marked as diverged (analyze and report refuse it)" in err
    assert load_dictionary(out).meta.diverged is True
    for command in (
        ["analyze", str(tiny_store_path), str(out), "--out", str(tmp_path / "a")],
        ["report", str(tiny_store_path), str(out), "--out", str(tmp_path / "r")],
    ):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert f"error: {out} is the state of a training that diverged (at step " in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.safetensors"]


# --- 2. non-finite tokens --------------------------------------------------------------------


def test_non_finite_tokens_are_refused_or_dropped_and_counted(tiny_store_path, tmp_path, capsys):
    copy = _store_copy(tiny_store_path, tmp_path)
    # the dictionary's default input: the channel tokens side by side (the store keeps them)
    assert ActivationStore.open(copy).default_token_form == "concat"
    tokens = zarr.open_array(str(copy / "cell" / "channels"), mode="r+")
    table = ActivationStore.open(copy).table("cell")
    controls = np.flatnonzero(table["well_type"] == "negative_control")
    treated = np.flatnonzero(table["well_type"] != "negative_control")
    bad = [int(controls[0]), int(controls[-1]), int(treated[-1])]
    for row, value in zip(bad, (np.nan, np.inf, np.nan), strict=True):
        data = np.asarray(tokens[row])
        data[3] = value
        tokens[row] = data
    sites = table.iloc[bad][["plate", "well", "site"]].drop_duplicates()
    out = tmp_path / "d.safetensors"
    out.write_bytes(b"")  # not even a dictionary: untouched by a refusal
    before = snapshot(tmp_path)
    with pytest.raises(DictionaryError) as err:
        train_on_store(ActivationStore.open(copy), SETTINGS, out=tmp_path / "new.safetensors")
    msg = str(err.value)
    assert msg.startswith(f"3 of {len(table)} cell tokens of the store at {copy} hold NaN or Inf")
    assert f"at {len(sites)} site(s): " in msg and "--drop-nonfinite" in msg
    first = sites.iloc[0]
    assert f"{first.plate} {first.well} {first.site}" in msg
    assert snapshot(tmp_path) == before
    args = ["train", str(copy), "--whiten", "well_type=negative_control", "--whiten-by", "plate"]
    args += ["--components", "8", "--atoms", "24", "--sparsity", "4", "--steps", "10"]
    args += ["--batch-size", "64", "--out", str(tmp_path / "new.safetensors")]
    assert main(args) == 2
    assert "hold NaN or Inf" in capsys.readouterr().err
    assert main([*args, "--drop-nonfinite"]) == 0
    assert "left out 3 non-finite tokens" in capsys.readouterr().out
    d = load_dictionary(tmp_path / "new.safetensors")
    assert d.meta.nonfinite_dropped == 3 and d.meta.n_tokens == len(table) - 3
    assert all(bool(torch.isfinite(t).all()) for t in d.model.tensors().values())
    assert np.isfinite(d.whitener.transform_).all() and d.whitener.n_components_ == 8


# --- 2. the model's weights, not only its name -----------------------------------------------


def test_another_models_weights_under_the_same_name_are_refused(
    tiny_store_path, trained, tmp_path, capsys
):
    other = _store_copy(tiny_store_path, tmp_path, weights_hash="1", model_source="/w/other.st")
    path = trained.path
    before = snapshot(tmp_path)
    assert main(["analyze", str(other), str(path), "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: the dictionary {path} was trained on tokens of model ")
    assert f"but the store at {other} was embedded by 'tiny-random' with weights 1 " in err
    assert "(/w/other.st)" in err and err.rstrip().endswith("model weights differ")
    assert snapshot(tmp_path) == before


def test_another_model_is_refused_through_the_cli(tiny_store_path, trained, tmp_path, capsys):
    other = _store_copy(tiny_store_path, tmp_path, model_id="another-vit")
    rc = main(["analyze", str(other), str(trained.path), "--out", str(tmp_path / "a")])
    err = capsys.readouterr().err
    assert rc == 2 and "model 'tiny-random' block 1" in err and "model 'another-vit'" in err
    assert err.rstrip().endswith("model differ") and not (tmp_path / "a").exists()


# --- 2. damaged dictionary files -------------------------------------------------------------


def _rewrite(path, dest, change_tensors=None, change_header=None):
    """Copy a dictionary file with its tensors or header changed (by safetensors, not bytes)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as fh:
        header = dict(fh.metadata())
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118
    if change_tensors:
        change_tensors(tensors)
    if change_header:
        change_header(header)
    save_file(tensors, str(dest), metadata=header)
    return dest


def test_damaged_dictionary_files_are_refused(trained, tmp_path):
    good = trained.path
    flipped = tmp_path / "flipped.safetensors"
    data = bytearray(good.read_bytes())
    data[-100] ^= 0x40  # a byte of the last tensor
    flipped.write_bytes(bytes(data))
    with pytest.raises(DictionaryError, match=r"flipped\.safetensors is damaged: its tensors do "):
        load_dictionary(flipped)

    def nan(t):
        t["atoms"][0, 0] = float("nan")

    def no_checksum(h):
        del h["checksum"]

    nan_file = _rewrite(good, tmp_path / "nan.safetensors", nan, no_checksum)
    with pytest.raises(DictionaryError, match="'atoms' holds 1 non-finite values"):
        load_dictionary(nan_file)

    def shrink(t):
        t["atoms"] = t["atoms"][:5].clone()

    short = _rewrite(good, tmp_path / "short.safetensors", shrink, no_checksum)
    with pytest.raises(DictionaryError, match=r"'atoms' has shape \(5, 8\), expected \(24, 8\)"):
        load_dictionary(short)

    def newer(h):
        h["format_version"] = str(FORMAT_VERSION + 1)

    with pytest.raises(
        DictionaryError,
        match=rf"newer version \(format {FORMAT_VERSION + 1}\); this one reads format "
        rf"{FORMAT_VERSION}",
    ):
        load_dictionary(_rewrite(good, tmp_path / "v3.safetensors", change_header=newer))

    def junk(h):
        h["config"] = "{not json"

    with pytest.raises(DictionaryError, match="junk.safetensors is damaged: JSONDecodeError"):
        load_dictionary(_rewrite(good, tmp_path / "junk.safetensors", change_header=junk))

    # a dictionary that is not finite is never written
    d = load_dictionary(good)
    with torch.no_grad():
        d.model.W[1, 2] = float("inf")
    with pytest.raises(DictionaryError, match="'atoms' holds 1 non-finite values"):
        save_dictionary(tmp_path / "inf.safetensors", d)
    assert not (tmp_path / "inf.safetensors").exists()


def test_dictionaries_are_written_with_an_ordinary_file_mode(trained, tmp_path):
    d = load_dictionary(trained.path)
    for umask, mode in ((0o022, 0o644), (0o027, 0o640)):
        old = os.umask(umask)
        try:
            path = save_dictionary(tmp_path / f"{mode:o}.safetensors", d)
        finally:
            os.umask(old)
        assert path.stat().st_mode & 0o777 == mode


# --- 2. settings out of range ----------------------------------------------------------------


def test_settings_out_of_range_are_refused_before_any_work(tiny_store_path, tmp_path, capsys):
    base = ["train", str(tiny_store_path), "--no-whiten", "--out", str(tmp_path / "d.st")]
    cases = [
        (
            [*base, "--atoms", "8", "--J", "4", "--L", "4"],
            "sparsity: ICFL picks J x L = 4 x 4 = 16 atoms per token, more than the 8 atoms",
        ),
        ([*base, "--atoms", "8", "--sparsity", "4", "--steps", "0"], "steps: must be at least 1"),
        (
            ["analyze", str(tiny_store_path), "x.safetensors", "--out", "a", "--top", "-1"],
            "top_n: must be at least 1, got -1",
        ),
    ]
    for args, message in cases:
        assert main(args) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {message}") and err.count("\n") == 1
    with pytest.raises(SettingsError, match="more than the 8 atoms"):
        TrainSettings(atoms=8, n_iter=4, n_pick=4)
    assert list(tmp_path.iterdir()) == []


# --- 2. analysis into a folder: all or nothing -----------------------------------------------


def test_a_failed_analysis_leaves_the_old_one_whole(store, trained, tmp_path, monkeypatch):
    d = load_dictionary(trained.path)
    out = tmp_path / "analysis"
    labelled = AnalyzeSettings(labels="well_type,perturbation")
    analyze_store(store, d, labelled, out)
    before = snapshot(out)

    def full_disk(*args, **kwargs):
        raise OSError("disk full")

    with monkeypatch.context() as m:
        m.setattr(write, "codes_anndata", full_disk)
        with pytest.raises(OSError, match="disk full"):
            analyze_store(store, d, AnalyzeSettings(top_n=3), out)
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["analysis"]
    # a finished run replaces the folder whole: no selectivity tables of the old one are left
    analyze_store(store, d, AnalyzeSettings(top_n=3), out)
    assert not (out / "selectivity.parquet").exists() and (out / "features.parquet").exists()

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    with pytest.raises(OutputError, match=r"mine exists and holds files that are not an analysis"):
        analyze_store(store, d, AnalyzeSettings(), mine)
    assert (mine / "notes.txt").read_text() == "keep" and len(list(mine.iterdir())) == 1
    # a file the user put into an analysis folder is not the analysis's to delete
    (out / "notes.txt").write_text("keep")
    before = snapshot(out)
    with pytest.raises(OutputError, match=r"holds files that are not an analysis \(notes.txt\)"):
        analyze_store(store, d, AnalyzeSettings(), out)
    assert snapshot(out) == before


def test_a_cell_dictionary_on_patch_tokens_is_said_and_done(store, trained, tmp_path, capsys):
    out = tmp_path / "a"
    rc = main(["analyze", str(store.path), str(trained.path), "--out", str(out), "--unit", "patch"])
    captured = capsys.readouterr()
    assert rc == 0
    assert (
        f"note: {trained.path} was trained on cell tokens; encoding the store's patch tokens"
        in (captured.err)
    )
    assert f"encoded {store.tokens('patch').shape[0]} tokens" in captured.out


def test_whitening_refuses_non_finite_controls():
    from napari_concept_discovery.dictionary import Whitener

    x = np.random.default_rng(0).standard_normal((50, 4))
    x[[3, 7], 1] = np.nan
    with pytest.raises(DictionaryError, match="2 of 50 control tokens hold NaN or Inf"):
        Whitener().fit(x)


def test_a_partial_truth_file_is_said_and_its_gaps_left_out(
    store, trained, small_plates, tmp_path, capsys
):
    """A truth file covering half the cells warns, naming the file and the count,
    and the cells without truth make no 'mitotic=nan' concept of their own."""
    import pandas as pd

    truth = pd.read_csv(small_plates / "truth.csv")
    half = tmp_path / "half.csv"
    truth.iloc[: len(truth) // 2].to_csv(half, index=False)
    cells = len(store.table("cell"))
    joined = join_truth(store.table("cell"), pd.read_csv(half))
    missing = int(joined["mitotic"].isna().sum())
    assert 0 < missing < cells
    out = tmp_path / "a"
    args = ["analyze", str(store.path), str(trained.path), "--out", str(out)]
    assert main([*args, "--truth", "mitotic,cell_type", "--truth-file", str(half)]) == 0
    err = capsys.readouterr().err
    assert (
        f"warning: {half} gives no 'mitotic' for {missing} of {cells} tokens; they are left out "
        "of the mitotic concepts\n" in err
    )
    table = pd.read_parquet(out / "concepts.parquet")
    assert not table["concept"].str.contains("nan").any(), table
    mitotic = table[table["concept"] == "mitotic"].iloc[0]
    assert mitotic["n_judged"] == cells - missing
    # the same concepts as an analysis of only the cells with truth
    known = np.flatnonzero(joined["mitotic"].notna().to_numpy())
    codes = pd.read_parquet(out / "codes.parquet")
    import scipy.sparse as sp

    csr = sp.csr_matrix(
        (codes["code"], (codes["token"], codes["feature"])),
        shape=(cells, trained.dictionary.model.n_atoms),
    )
    alone = concept_auroc(csr[known], joined.iloc[known].astype({"mitotic": bool}), ["mitotic"])
    assert alone["auroc"].iloc[0] == pytest.approx(mitotic["auroc"])


def test_a_full_disk_ends_in_one_line_and_a_clean_folder(
    store, trained, tmp_path, capsys, monkeypatch
):
    """Analyze onto a full disk printed hundreds of h5py tracebacks and died of a
    segmentation fault; the codes.h5ad write is not started without room for it, and a full
    disk in any other write is one line, exit 1, with nothing left behind."""
    import errno
    from collections import namedtuple

    import napari_concept_discovery._files as files

    usage = namedtuple("usage", "total used free")
    out = tmp_path / "a"
    args = ["analyze", str(store.path), str(trained.path), "--out", str(out)]
    with monkeypatch.context() as m:
        m.setattr(files.shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 50_000, 50_000))
        assert main(args) == 1
    err = capsys.readouterr().err.splitlines()
    said = [line for line in err if line.startswith("error:")]
    assert said == [
        f"error: the disk is full writing {out}: not enough free space to write "
        f"{out}/codes.h5ad: it needs about {said[0].split('about ')[1].split(' MB')[0]} MB, "
        "0.1 MB are free on that disk; free some space or choose another output folder"
    ], err
    assert "Traceback" not in "\n".join(err) and sorted(tmp_path.iterdir()) == []

    def no_room(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(write, "atomic_parquet", no_room)
        assert main(args) == 1
    err = capsys.readouterr().err
    assert f"error: the disk is full writing {out}: No space left on device\n" in err
    assert "Traceback" not in err and sorted(tmp_path.iterdir()) == []


ANALYZE_CHILD = """
import sys, time
import napari_concept_discovery.analysis.write as write
from napari_concept_discovery.dictionary import AnalyzeSettings, load_dictionary
from napari_concept_discovery.analysis.analyze import analyze_store
from napari_concept_discovery.embed.store import ActivationStore
store, dictionary, out, marker = sys.argv[1:]
real = write.codes_anndata

def stall(*args, **kwargs):  # killed while the folder beside --out is half-written
    open(marker, "w").write("x")
    time.sleep(600)

write.codes_anndata = stall
analyze_store(ActivationStore.open(store), load_dictionary(dictionary), AnalyzeSettings(), out)
"""


def test_folders_left_by_a_killed_analysis_are_cleaned_up(store, trained, tmp_path):
    """The `.analysis.<hex>.tmp` folder of an analysis killed with kill -9 stayed
    forever; the next write to the same folder removes it (a live writer's is left alone)."""
    out = tmp_path / "analysis"
    marker = tmp_path / "marker"
    args = (str(store.path), str(trained.path), str(out), str(marker))
    pid = run_and_kill(ANALYZE_CHILD, marker, *args)
    left = [p for p in tmp_path.iterdir() if p.name.startswith(".analysis.")]
    assert len(left) == 1 and f"-{pid}-" in left[0].name and left[0].name.endswith(".tmp")
    live = tmp_path / f"{left[0].name.split(f'-{pid}-')[0]}-{os.getpid()}-{'0' * 32}.tmp"
    live.mkdir()  # as a writer still running in this process would hold it
    analyze_store(store, load_dictionary(trained.path), AnalyzeSettings(top_n=3), out)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["analysis", "marker", live.name])


@pytest.mark.parametrize("method", ["icfl", "topk"])
def test_too_many_atoms_for_the_memory_are_refused_with_what_fits(
    tiny_store_path, tmp_path, capsys, monkeypatch, method
):
    """Train --atoms 100000 ended in torch's raw allocator error; it now says the
    memory it would need and the most atoms that fit, before allocating anything."""
    import napari_concept_discovery._files as files
    from napari_concept_discovery.dictionary.training import training_memory

    monkeypatch.setattr(files, "physical_memory", lambda: 10**9)
    out = tmp_path / "d.safetensors"
    args = ["train", str(tiny_store_path), "--no-whiten", "--method", method, "--atoms"]
    assert main([*args, "200000", "--sparsity", "4", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: atoms: 200000 atoms would need about "), err
    assert "this machine has 1 GB. Use --atoms " in err and err.count("\n") == 1
    most = int(err.split("Use --atoms ")[1].split()[0])
    width = ActivationStore.open(tiny_store_path).token_width("concat")  # the default form
    assert f"({method} on {width}-wide tokens, batch 1024)" in err
    assert training_memory(method, most, width, 1024) <= 10**9
    assert training_memory(method, most + 1, width, 1024) > 10**9
    assert list(tmp_path.iterdir()) == []
