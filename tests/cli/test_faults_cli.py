"""One-line errors where tracebacks were, checked before the expensive work, and messages that
say what is wrong.

Each case runs the real command line and expects exit code 2, one ``error:`` line naming the
file or option, and every file it was given left byte-identical.
"""

from __future__ import annotations

import os
import pickle
import shutil

import pytest
import torch

from fault_helpers import snapshot, tiny_weights
from napari_concept_discovery.cli import main


@pytest.fixture(scope="module")
def assets(tmp_path_factory, small_plates, tiny_store_path):
    """A folder with a file, a dictionary and model folders (each case checks it is left as
    it was, so the cases can share it)."""
    from napari_concept_discovery.dictionary import TrainSettings, train_on_store
    from napari_concept_discovery.embed.store import ActivationStore

    tmp_path = tmp_path_factory.mktemp("faults_cli")
    (tmp_path / "file.csv").write_text("a,b\n1,2\n")
    dictionary = tmp_path / "d.safetensors"
    train_on_store(
        ActivationStore.open(tiny_store_path),
        TrainSettings(atoms=8, sparsity=2, n_pick=1, steps=2, batch_size=32),
        out=dictionary,
    )
    weights = tiny_weights(tmp_path / "tiny.safetensors")
    bad_config = tmp_path / "bad_config"
    bad_config.mkdir()
    shutil.copy(weights, bad_config / "model.safetensors")
    (bad_config / "config.json").write_text('{"img_size": 256,')
    string_card = tmp_path / "string_card"
    string_card.mkdir()
    shutil.copy(weights, string_card / "vit.safetensors")
    (string_card / "vit.json").write_text('{"architecture": {"embed_dim": "32", "depth": 2}}')
    bad_card = tmp_path / "bad_card"
    bad_card.mkdir()
    shutil.copy(weights, bad_card / "vit.safetensors")
    (bad_card / "vit.json").write_text('["not", "a", "card"]')
    evil = tmp_path / "evil.pth"
    with open(evil, "wb") as f:
        pickle.dump({"w": torch.ones(1), "x": _Evil()}, f)
    evil_zip = tmp_path / "evil.pt"  # torch's own zip format, naming a forbidden global
    torch.save({"w": torch.ones(1), "x": _Evil()}, evil_zip)
    return {
        "dir": tmp_path,
        "file": tmp_path / "file.csv",
        "plate": small_plates,
        "store": tiny_store_path,
        "dictionary": dictionary,
        "bad_config": bad_config,
        "bad_card": bad_card,
        "string_card": string_card,
        "evil": evil,
        "evil_zip": evil_zip,
        "truth": small_plates / "truth.csv",
    }


@pytest.fixture()
def work(assets, monkeypatch):
    """The assets, with any training or encoding during a refused command failing the test."""
    import napari_concept_discovery.dictionary.applied as applied
    import napari_concept_discovery.dictionary.pipeline as pipeline

    def never(*args, **kwargs):
        raise AssertionError("expensive work started before the refusal")

    monkeypatch.setattr(pipeline, "train", never)
    monkeypatch.setattr(applied.Dictionary, "encode", never)
    return assets


class _Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


CASES = {
    "synth wells": ("synth {dir}/s --wells 999", "--wells must be at most 308 (rows B..O x 22"),
    "synth size": ("synth {dir}/s --size 1000000000", "--size 1000000000 would need about "),
    "synth workers": ("synth {dir}/s --workers 0", "--workers must be at least 1, got 0"),
    "synth onto a file": ("synth {file}", "output folder {file} is a file; give a folder path"),
    "synth under a file": ("synth {file}/s", "cannot write output folder {file}/s: {file} is a"),
    "demo plates": ("demo {dir}/demo --plates 0", "--plates must be at least 1, got 0"),
    "demo onto a file": ("demo {file}", "demo output folder {file} is a file"),
    "demo steps": ("demo {dir}/demo --steps 0", "--steps must be at least 1, got 0"),
    "embed threads": ("embed {plate} --out {dir}/s --threads -3", "--threads must be at least 1"),
    "embed threads huge": (
        "embed {plate} --out {dir}/s --threads 100000",
        "--threads must be at most ",
    ),
    "train threads huge": (
        "train {store} --out {dir}/x.st --threads 100000",
        "--threads must be at",
    ),
    "embed onto a file": ("embed {plate} --out {file}", "activation store {file} is a file"),
    "embed into other files": ("embed {plate} --out {dir}", "{dir} exists and is not an activ"),
    "embed broken config": (
        "embed {plate} --out {dir}/s --model {bad_config}",
        "{bad_config}/config.json: not valid JSON",
    ),
    "embed broken card": (
        "embed {plate} --out {dir}/s --model {bad_card}",
        "{bad_card}/vit.json: a model card is a JSON object with an 'architecture' object",
    ),
    "embed card with a string width": (
        "embed {plate} --out {dir}/s --model {string_card}",
        "{string_card}/vit.json: architecture field 'embed_dim' must be a positive whole number, "
        "got '32'",
    ),
    "embed missing weights": (
        "embed {plate} --out {dir}/s --model {dir}/missing.safetensors",
        "model source '{dir}/missing.safetensors': no file or folder '{dir}/missing.safe",
    ),
    "embed pickle with code": (
        "embed {plate} --out {dir}/s --model {evil}",
        "{evil}: cannot load as a torch checkpoint with weights_only=True (weights that need",
    ),
    "embed zip pickle with a global": (
        "embed {plate} --out {dir}/s --model {evil_zip}",
        "{evil_zip}: cannot load as a torch checkpoint with weights_only=True (weights that need "
        "code to load are refused): it names the global print, which loading would "
        "import and call",
    ),
    "train missing store": (
        "train {dir}/nostore --out {dir}/d2.st",
        "no activation store at {dir}/nostore",
    ),
    "train threads": ("train {store} --out {dir}/x.st --threads -3", "--threads must be at least"),
    "train under a file": (
        "train {store} --no-whiten --atoms 8 --sparsity 4 --out {file}/d.safetensors",
        "cannot write dictionary file {file}/d.safetensors: {file} is a file, not a folder",
    ),
    "train onto a folder": (
        "train {store} --no-whiten --atoms 8 --sparsity 4 --out {plate}",
        "dictionary file {plate} is a folder; give a file path",
    ),
    "analyze onto a file": (
        "analyze {store} {dictionary} --out {file}",
        "analysis folder {file} is a file; give a folder path",
    ),
    "analyze into other files": (
        "analyze {store} {dictionary} --out {dir}",
        "{dir} exists and holds files that are not an analysis",
    ),
    "analyze inside the store": (
        "analyze {store} {dictionary} --out {store}/a",
        "analysis folder {store}/a is inside the activation store {store}; a store holds only",
    ),
    "train inside the store": (
        "train {store} --no-whiten --atoms 8 --sparsity 4 --out {store}/d.safetensors",
        "dictionary file {store}/d.safetensors is inside the activation store {store}",
    ),
    "analyze truth column": (
        "analyze {store} {dictionary} --out {dir}/a --truth nope",
        "no column 'nope' for ground truth (truth); columns are ['plate', 'well', 'site',",
    ),
    "analyze truth file": (
        "analyze {store} {dictionary} --out {dir}/a --truth-file {dir}/missing.csv",
        "no truth file at {dir}/missing.csv",
    ),
    "analyze truth column in the file": (
        "analyze {store} {dictionary} --out {dir}/a --truth-file {truth} --truth nope",
        "no column 'nope' for ground truth (truth)",
    ),
    "analyze truth file without keys": (
        "analyze {store} {dictionary} --out {dir}/a --truth-file {file}",
        "cannot join the truth file {file} onto the cell tokens on ['plate', 'well', 'site', "
        "'label']: missing ['plate', 'well', 'site', 'label']",
    ),
}


MULTILINE = {"embed missing weights"}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_and_touches_nothing(work, case, capsys):
    command, message = CASES[case]
    args = [a.format(**work) for a in command.split()]
    before = snapshot(work["dir"], work["plate"], work["store"])
    assert main(args) == 2
    err = capsys.readouterr().err
    first = err.splitlines()[0]
    assert first.startswith(f"error: {message.format(**work)}"), err
    assert "Traceback" not in err and "weights_only=False" not in err
    assert "safe_globals" not in err and "if you trust" not in err
    assert "hugging face hub" not in first.lower()
    if case in MULTILINE:  # the message goes on with the accepted forms, one a line
        assert err.count("error:") == 1 and "Accepted forms:" in first
    else:
        assert err.count("\n") == 1
    assert snapshot(work["dir"], work["plate"], work["store"]) == before


def test_info_says_what_it_checked_and_check_decodes_every_site(tmp_path, capsys):
    from plate_helpers import write_rxrx

    write_rxrx(tmp_path)
    bad = tmp_path / "images" / "EXP-01" / "Plate1" / "C03_s1_w1.png"
    bad.write_bytes(bad.read_bytes()[:60])  # its header reads; its pixels do not
    assert main(["info", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "pixels of the first site only (--check decodes every site)" in out
    assert "warnings: 0" in out
    assert main(["info", str(tmp_path), "--check"]) == 0
    out = capsys.readouterr().out
    assert "checked:  file headers, pixels and label files of all 4 sites" in out
    assert "warnings: 1" in out and "1 of 4 decoded site(s) cannot be read" in out
    assert str(bad) in out


def test_plate_warnings_are_printed_without_python_source_lines(small_plates, tmp_path, capsys):
    plate = tmp_path / "plate"
    shutil.copytree(small_plates, plate)
    (plate / "notes.txt").write_text("x")
    weights = tiny_weights(tmp_path / "tiny.safetensors")
    args = ["embed", str(plate), "--out", str(tmp_path / "s"), "--model", str(weights)]
    assert main([*args, "--cells", "none", "--batch-size", "8"]) == 0
    err = capsys.readouterr().err
    assert "warning: ignored 1 non-image file(s): notes.txt\n" in err
    assert ".py:" not in err and "warnings.warn" not in err and "PlateWarning" not in err


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_an_unwritable_folder_is_named(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        assert main(["synth", str(locked / "s")]) == 2
        err = capsys.readouterr().err
        assert (
            err
            == f"error: cannot write output folder {locked}/s: no write permission in {locked}\n"
        )
    finally:
        locked.chmod(0o755)


def test_a_folder_without_write_permission_is_named(tmp_path, capsys, monkeypatch):
    """The same check as above where the tests run as root: permission as os.access reports it."""
    locked = tmp_path / "locked"
    locked.mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: real(p, mode) and str(p) != str(locked))
    assert main(["synth", str(locked / "s")]) == 2
    err = capsys.readouterr().err
    assert err == f"error: cannot write output folder {locked}/s: no write permission in {locked}\n"
    assert list(locked.iterdir()) == []


def test_info_check_reads_label_files_and_a_refused_embed_leaves_nothing(
    small_plates, tmp_path, capsys, caplog
):
    """A truncated label TIFF passed `info --check` and was refused only by embed,
    which then left a store skeleton that train called 'unfinished (interrupted)'."""
    plate = tmp_path / "plate"
    shutil.copytree(small_plates, plate)
    bad = sorted(plate.rglob("*_cells.tif"))[0]
    bad.write_bytes(bad.read_bytes()[:200])
    assert main(["info", str(plate), "--check"]) == 0
    out = capsys.readouterr().out
    assert "warnings: 1" in out and "1 of 12 decoded site(s) cannot be read" in out
    assert str(bad) in out
    weights = tiny_weights(tmp_path / "tiny.safetensors")
    store = tmp_path / "store"
    assert main(["embed", str(plate), "--out", str(store), "--model", str(weights)]) == 2
    err = capsys.readouterr().err
    assert f"error: cannot read image {bad}: " in err
    assert "TiffTag" not in err and err.count("error:") == 1
    # tifffile's own "<TiffTag.fromfile> raised ..." lines are held back: said once, above
    assert not [r for r in caplog.records if r.name.startswith("tifffile")]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plate", "tiny.safetensors"]


def test_a_fifo_named_like_an_image_is_skipped_with_a_warning(small_plates, tmp_path):
    """A FIFO named like a channel image blocked `info --check` and the napari reader
    forever in the header read; it is now left out and said (run with timeouts, so that the
    old behaviour fails instead of hanging)."""
    import subprocess
    import sys
    import threading

    from fault_helpers import SRC
    from napari_concept_discovery._reader import napari_get_reader

    plate = tmp_path / "plate"
    shutil.copytree(small_plates, plate)
    image = sorted(plate.rglob("*_w2.png"))[0]
    image.unlink()
    os.mkfifo(image)
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    done = subprocess.run(
        [sys.executable, "-m", "napari_concept_discovery.cli", "info", str(plate), "--check"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    rel = image.relative_to(plate)
    assert (
        f"skipped 1 entry of {plate} that is not a regular file (a FIFO, socket or device would "
        f"block the read): {rel}" in done.stdout
    )
    layers = []
    reader = threading.Thread(
        target=lambda: layers.append(napari_get_reader(str(plate))(str(plate))), daemon=True
    )
    reader.start()
    reader.join(120)
    assert not reader.is_alive(), "the napari reader blocks on the FIFO"
    assert layers and layers[0]


@pytest.mark.parametrize("shape", [(1, 1), (1, 700), (700, 1)])
def test_thin_images_keep_their_two_dimensions(tmp_path, shape):
    """A 1 x 1 or 1 x N image was read as shape () or (N,) and refused, while info
    showed (C, 1, 1) from its header; its pixels now read as the header says."""
    import imageio.v3 as iio
    import numpy as np

    from napari_concept_discovery.plate import open_plate
    from plate_helpers import write_rxrx

    write_rxrx(tmp_path)
    for f in tmp_path.rglob("*.png"):
        iio.imwrite(f, np.full(shape, 7, np.uint8))
    plate = open_plate(tmp_path)
    assert plate.image_shape == (3, *shape)
    for site in plate:
        assert site.read().shape == (3, *shape)


def test_segment_says_which_sites_gave_no_cell_and_why(small_plates, tmp_path, capsys):
    """Segment on all-zero images wrote 0 cells on every site with exit 0 and no word."""
    import imageio.v3 as iio
    import numpy as np

    from napari_concept_discovery.plate import open_plate

    plate = tmp_path / "plate"
    shutil.copytree(small_plates, plate)
    site = open_plate(plate).sites[open_plate(plate).keys[0]]
    for path in site.paths:
        iio.imwrite(path, np.zeros_like(iio.imread(path)))
    assert main(["segment", str(plate), "--out", str(tmp_path / "labels")]) == 0
    err = capsys.readouterr().err
    assert (
        f"warning: 1 of 12 site(s) gave no cell: {site.key}; the DNA image of 1 of them holds "
        "a single value (all zero or constant), so there is nothing to segment: check those "
        "files\n" in err
    ), err


def test_segment_never_replaces_label_files_it_did_not_write(small_plates, tmp_path, capsys):
    """Segment --out onto a folder of the user's own label files (a
    Cellpose run, say) replaced them; it now refuses, and replaces only its own."""
    from napari_concept_discovery.plate import open_plate
    from napari_concept_discovery.plate.labels import label_paths

    plate = open_plate(small_plates)
    mine = tmp_path / "mine"
    theirs = label_paths(mine, plate.keys[0])[0]
    theirs.parent.mkdir(parents=True)
    theirs.write_bytes(b"my cellpose masks")
    rel = theirs.relative_to(mine).as_posix()
    assert main(["segment", str(small_plates), "--out", str(mine)]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"error: {mine} exists and holds files that are not labels written by segment ({rel}); "
        "labels written by segment would replace them, so choose another output folder (or move "
        "those files away)\n"
    )
    assert theirs.read_bytes() == b"my cellpose masks" and len(list(mine.rglob("*"))) == 2
    ours = tmp_path / "ours"
    assert main(["segment", str(small_plates), "--out", str(ours)]) == 0
    assert main(["segment", str(small_plates), "--out", str(ours)]) == 0  # its own: replaced


def test_synth_never_replaces_a_metadata_table_it_did_not_write(tmp_path, capsys):
    """The one rule, a case of our own: synth into a folder holding the user's
    metadata.csv replaced it in silence; it now refuses, and rewrites only its own plates."""
    out = tmp_path / "screen"
    out.mkdir()
    (out / "metadata.csv").write_text("plate,well,compound\n1,B02,mine\n")
    before = snapshot(out)
    args = ["synth", str(out), "--plates", "1", "--wells", "2", "--sites", "1", "--size", "64"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(
        f"error: {out} exists and holds files that are not a synthetic plate (metadata.csv); "
    ), err
    assert snapshot(out) == before
    ours = tmp_path / "ours"
    assert main([*args[:1], str(ours), *args[2:]]) == 0
    assert main([*args[:1], str(ours), *args[2:]]) == 0


def test_nan_pixels_are_blamed_on_their_file_not_the_model(tmp_path, capsys):
    """A case of our own: a float TIFF with NaN pixels reached the model and the refusal said
    its weights file might be damaged; the image file is now named."""
    import numpy as np
    import tifffile

    from plate_helpers import write_phenix

    plate = tmp_path / "plate"
    write_phenix(plate)
    bad = sorted(plate.glob("*.tiff"))[0]
    image = tifffile.imread(bad).astype(np.float32)
    image[3:5, 3:5] = np.nan
    tifffile.imwrite(bad, image)
    weights = tiny_weights(tmp_path / "tiny.safetensors")
    args = ["embed", str(plate), "--out", str(tmp_path / "s"), "--model", str(weights)]
    assert main([*args, "--cells", "none"]) == 2
    err = capsys.readouterr().err
    assert f"{bad} holds 4 NaN or Inf pixels of " in err and "weights" not in err, err
