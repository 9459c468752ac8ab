"""Settings of the dictionary steps: the CLI options come from them, checks name the setting."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from napari_concept_discovery.cli import build_parser, main
from napari_concept_discovery.dictionary.registry import METHODS
from napari_concept_discovery.dictionary.settings import (
    METHOD_NAMES,
    UNITS,
    AnalyzeSettings,
    TrainSettings,
    WhitenSettings,
)
from napari_concept_discovery.dictionary.views import ALL_VIEWS
from napari_concept_discovery.embed.store import UNITS as STORE_UNITS
from napari_concept_discovery.settings import SettingsError, describe, from_args

CONTROLS = "well_type=negative_control"


def _help(capsys, command: str) -> str:
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args([command, "--help"])
    assert e.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize(
    "command,classes",
    [("train", (TrainSettings, WhitenSettings)), ("analyze", (AnalyzeSettings,))],
)
def test_every_setting_is_an_option_with_its_default(capsys, command, classes):
    text = " ".join(_help(capsys, command).split())  # argparse wraps lines
    for cls in classes:
        for d in describe(cls):
            if not d["cli"]:
                continue
            assert d["flag"] in text, (cls.__name__, d["name"])
            if d["default"] is not None and d["type"] is not bool:
                assert f"(default: {d['default']})" in text, d["name"]
    assert "--size" not in text  # the atom count is --atoms; --size means pixels elsewhere


def test_cli_train_settings_equal_the_dataclass_with_the_same_values():
    parser = build_parser()
    args = parser.parse_args(["train", "S", "--out", "d.safetensors", "--whiten", CONTROLS])
    whiten = from_args(WhitenSettings, args)
    # nothing given: the dataclass defaults, the CLI adds none of its own
    assert from_args(TrainSettings, args, whiten=whiten) == TrainSettings(
        whiten=WhitenSettings(controls=CONTROLS)
    )
    args = parser.parse_args(
        "train S --out d --whiten well_type=negative_control --whiten-by plate --whiten-mode "
        "center --components 5 --whiten-eps 0.01 --method topk --unit patch --atoms 48 "
        "--sparsity 6 --lr 0.002 --steps 7 --batch-size 33 --seed 4 --checkpoint-every 3 "
        "--eval-max 99".split()
    )
    got = from_args(TrainSettings, args, whiten=from_args(WhitenSettings, args))
    assert got == TrainSettings(
        method="topk",
        unit="patch",
        atoms=48,
        sparsity=6,
        lr=0.002,
        steps=7,
        batch_size=33,
        seed=4,
        checkpoint_every=3,
        eval_max=99,
        whiten=WhitenSettings(CONTROLS, by="plate", mode="center", n_components=5, eps=0.01),
    )
    args = parser.parse_args(["train", "S", "--out", "d", "--no-whiten", "--J", "3", "--L", "2"])
    assert from_args(TrainSettings, args).replace(atoms=1024).method_config() == {
        "n_atoms": 1024,
        "n_iter": 3,
        "n_pick": 2,
    }
    args = parser.parse_args(
        "analyze S D --out o --labels a,b --truth c --truth-file t.csv --unit crop --top 3".split()
    )
    assert from_args(AnalyzeSettings, args) == AnalyzeSettings(
        labels=("a", "b"), truth=("c",), truth_file="t.csv", unit="crop", top_n=3
    )


def test_cli_refuses_the_old_size_option_and_contradictory_whitening(
    capsys, tmp_path, tiny_store_path
):
    with pytest.raises(SystemExit):
        main(["train", str(tmp_path), "--size", "16", "--out", "d", "--no-whiten"])
    assert "unrecognized arguments: --size" in capsys.readouterr().err
    rc = main(["train", str(tmp_path), "--out", "d", "--no-whiten", "--whiten-by", "plate"])
    assert rc == 2
    assert "--no-whiten cannot be combined with --whiten-by" in capsys.readouterr().err
    # a missing store is named first (not the whitening the user has not chosen yet)
    assert main(["train", str(tmp_path), "--out", "d"]) == 2
    assert capsys.readouterr().err == f"error: no activation store at {tmp_path}\n"
    # settings are checked before any work: the message names the setting
    out = tmp_path / "d.safetensors"
    args = ["train", str(tiny_store_path), "--out", str(out), "--no-whiten", "--steps", "0"]
    assert main(args) == 2
    assert "steps: must be at least 1, got 0" in capsys.readouterr().err
    assert not out.exists()


def test_whiten_settings_checks():
    with pytest.raises(SettingsError, match=r"^controls: .*--whiten COLUMN=VALUE.*--no-whiten"):
        WhitenSettings()
    with pytest.raises(SettingsError, match="controls must be given as COLUMN=VALUE, got 'x'"):
        WhitenSettings(controls="x")
    with pytest.raises(SettingsError, match="n_components: must be at least 1, got 0"):
        WhitenSettings(CONTROLS, n_components=0)
    with pytest.raises(SettingsError, match="mode: 'zca' is not one of 'pca', 'center'"):
        WhitenSettings(CONTROLS, mode="zca")
    with pytest.raises(SettingsError, match="eps: must not be negative"):
        WhitenSettings(CONTROLS, eps=-1.0)
    w = WhitenSettings(" well_type = negative_control ", by="plate")
    assert w.control == ("well_type", "negative_control")
    assert w.whitener().get_params() == {
        "mode": "pca",
        "eps": 1e-6,
        "n_components": None,
        "unit_norm": True,
        "group_by": "plate",
        "shrinkage": "auto",
        "within": None,  # pooled; "auto" is resolved against the token table when fitted
    }
    assert WhitenSettings(CONTROLS, within=" None ").within is None
    assert WhitenSettings(CONTROLS, within="AUTO").within == "auto"
    with pytest.raises(SettingsError, match="within: name a table column .* auto or none"):
        WhitenSettings(CONTROLS, within=" , ")


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"atoms": 0}, "atoms: must be at least 1, got 0"),
        ({"steps": 0}, "steps: must be at least 1, got 0"),
        ({"batch_size": 0}, "batch_size: must be at least 1, got 0"),
        ({"lr": 0.0}, "lr: must be positive and finite, got 0.0"),
        ({"checkpoint_every": -5}, "checkpoint_every: must not be negative"),
        ({"eval_max": 0}, "eval_max: must be at least 1"),
        ({"method": "nmf"}, "method: 'nmf' is not one of 'icfl', 'topk'"),
        ({"unit": "well"}, "unit: 'well' is not one of 'cell', 'patch', 'crop'"),
        ({"sparsity": 0}, "sparsity: must be at least 1, got 0"),
        ({"n_iter": 0}, "n_iter: J must be at least 1, got 0"),
        ({"n_pick": 0}, "n_pick: L must be at least 1, got 0"),
        ({"whiten": "well_type=negative_control"}, "whiten: must be WhitenSettings or None"),
    ],
)
def test_train_settings_checks_name_the_setting(kwargs, message):
    with pytest.raises(SettingsError, match=f"^{message}"):
        TrainSettings(**kwargs)


def test_settings_round_trip_through_json():
    t = TrainSettings(
        method="topk", atoms=64, sparsity=8, whiten=WhitenSettings(CONTROLS, by="plate")
    )
    again = TrainSettings.from_dict(json.loads(json.dumps(t.to_dict())))
    assert again == t and isinstance(again.whiten, WhitenSettings)
    assert TrainSettings.from_dict(TrainSettings().to_dict()) == TrainSettings()
    bad = t.to_dict()
    bad["whiten"]["by_plate"] = True
    with pytest.raises(SettingsError, match="unknown setting.*by_plate"):
        TrainSettings.from_dict(bad)
    a = AnalyzeSettings(labels="cell_type, perturbation,", truth=["mitotic"], truth_file=Path("t"))
    assert a.labels == ("cell_type", "perturbation") and a.truth == ("mitotic",)
    assert AnalyzeSettings.from_dict(json.loads(json.dumps(a.to_dict()))) == a
    assert AnalyzeSettings().labels == () and AnalyzeSettings().truth_file is None
    with pytest.raises(SettingsError, match="top_n: must be at least 1"):
        AnalyzeSettings(top_n=0)


def test_choices_agree_with_the_registry_and_the_store():
    assert METHOD_NAMES == tuple(METHODS)
    assert UNITS == STORE_UNITS
    forms = {d["name"]: d for d in describe(TrainSettings)}
    assert forms["whiten"]["type"] is WhitenSettings and forms["whiten"]["optional"]
    assert forms["n_iter"]["flag"] == "--J" and forms["atoms"]["label"] == "atoms (M)"
    # views: a subset of the views, one check box each in a form, checked by parse_views
    assert forms["views"]["choices"] is None and list(forms["views"]["items"]) == list(ALL_VIEWS)
    assert forms["views"]["default"] == "whitened,within-type,centred"
    with pytest.raises(SettingsError, match="^views: raw; give one or more of"):
        TrainSettings(views="whitened,raw")


def test_settings_and_the_command_line_parser_do_not_import_torch():
    code = (
        "import sys\n"
        "from napari_concept_discovery.dictionary import TrainSettings, WhitenSettings\n"
        "from napari_concept_discovery.cli import build_parser\n"
        "build_parser()\n"
        "TrainSettings(whiten=WhitenSettings('a=b'))\n"
        "print('torch' in sys.modules)\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert run.stdout.strip() == "False"
