"""Command-line manners: examples in every --help, --quiet, --json, progress
lines on stderr, and exit codes that mean something.

Every command runs for real on small synthetic plates (``small_plates``, ``tiny_store_path`` in
conftest) or on a plate drawn here; ``capsys`` keeps stdout and stderr apart, and one subprocess
checks the exit code and the pipe a script would read.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
from pathlib import Path

import pytest

from fault_helpers import run_cli, tiny_weights
from napari_concept_discovery import cli
from napari_concept_discovery.cli import build_parser, main
from napari_concept_discovery.embed.store import ActivationStore

TRAIN = ["--atoms", "24", "--sparsity", "4", "--steps", "5", "--batch-size", "64", "--no-whiten"]


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def _examples(help_text: str) -> list[str]:
    return [m.strip() for m in re.findall(r"^\s+concept-discovery .*$", help_text, re.M)]


def _run_json(argv: list[str], capsys) -> dict:
    """``main(argv + --json)``: exit 0, stdout exactly one JSON object; returns it."""
    capsys.readouterr()
    assert main([*argv, "--json"]) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    assert summary["command"] == argv[0] and summary["ok"] is True
    assert summary["exit_code"] == 0 and summary["elapsed_s"] >= 0
    return summary


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    return tiny_weights(tmp_path_factory.mktemp("weights") / "tiny.safetensors")


@pytest.fixture(scope="module")
def dictionary(tiny_store_path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dict") / "dict.safetensors"
    assert main(["train", str(tiny_store_path), *TRAIN, "--out", str(out), "--quiet"]) == 0
    return out


# --- help ----------------------------------------------------------------------------------


def test_every_command_help_shows_examples_that_parse():
    parser = build_parser()
    commands = _subparsers(parser)
    assert {"synth", "info", "segment", "embed", "train", "analyze", "report", "convert"} <= set(
        commands
    )
    assert {"demo", "models", "view"} <= set(commands)
    every = []
    for name, sub in commands.items():
        found = _examples(sub.format_help())
        assert any(
            x.startswith(f"concept-discovery {name} ") or x == f"concept-discovery {name}"
            for x in found
        ), name
        every += found
    top = parser.format_help()
    story = _examples(top)
    assert [x.split()[1] for x in story[:5]] == ["synth", "embed", "train", "analyze", "report"]
    every += story
    # every example is an invocation the parser accepts (no stale option or missing argument)
    for example in every:
        args = build_parser().parse_args(shlex.split(example)[1:])
        assert callable(args.func), example
    # the story is one: the store embed writes is the one train, analyze and report read
    assert "--out store.zarr" in story[1] and "train store.zarr" in story[2]
    assert "--out dict.safetensors" in story[2] and "store.zarr dict.safetensors" in story[3]


def test_top_level_help_documents_exit_codes_and_output_options():
    text = build_parser().format_help()
    codes = text[text.index("exit codes:") :]
    for code in ("0 ", "1 ", "2 ", "130 "):
        assert re.search(rf"^\s+{code}", codes, re.M), code
    for option in ("--quiet", "--json", "--debug"):
        assert option in text
    # the command-line guide's table says the same
    guide = (Path(__file__).resolve().parents[2] / "docs" / "cli.md").read_text()
    section = guide[guide.index("## Output, progress and exit codes") :]
    for code in ("| 0 ", "| 1 ", "| 2 ", "| 130 "):
        assert code in section, code


def test_global_options_before_or_after_the_command():
    parse = build_parser().parse_args
    for argv in (["--json", "info", "p"], ["info", "p", "--json"], ["info", "--json", "p"]):
        args = parse(argv)
        assert args.json is True and args.quiet is False and args.plate == "p"
    assert parse(["-q", "models"]).quiet is True and parse(["models", "--quiet"]).quiet is True
    args = parse(["info", "p"])
    assert (args.quiet, args.json, args.debug) == (False, False, False)


# --- --json, one command at a time --------------------------------------------------------


def test_synth_json_and_progress_lines(tmp_path, capsys):
    argv = ["synth", str(tmp_path / "s"), "--plates", "2", "--wells", "3", "--sites", "1"]
    argv += ["--size", "64", "--workers", "1"]
    summary = _run_json(argv, capsys)
    assert summary["n_plates"] == 2 and summary["sites"] == 6
    assert len(summary["plates"]) == 2 and all(Path(p).is_dir() for p in summary["plates"])
    assert len(list(Path(summary["plates"][0]).glob("*_w1.png"))) == 3
    assert Path(summary["truth"]).is_file() and Path(summary["metadata"]).is_file()

    # without --json: the result line on stdout, progress as lines on stderr (not a terminal)
    assert main([*argv[:2], *argv[2:], "--seed", "1"]) == 0
    captured = capsys.readouterr()
    assert captured.out == f"wrote 6 sites to {(tmp_path / 's').resolve()}\n"
    lines = captured.err.splitlines()
    assert lines[-1].startswith("synth sites: 6/6 (100%") and "\r" not in captured.err
    assert len(lines) <= 11  # a line per tenth of the work at most


def test_info_json(small_plates, capsys):
    summary = _run_json(["info", str(small_plates), "--check"], capsys)
    assert summary["layout"] == "rxrx" and summary["sites"] == 12 and summary["wells"] == 12
    assert summary["plates"] == ["SYNTH_1", "SYNTH_2"]
    assert summary["channels"] == ["DNA", "ER", "Actin", "RNA", "Mito", "Membrane"]
    assert summary["labelled_sites"] == 12 and summary["warnings"] == []
    assert summary["checked"] == "all sites" and summary["metadata"]["rows"] == 12


def test_segment_json(small_plates, tmp_path, capsys):
    out = tmp_path / "labels"
    summary = _run_json(["segment", str(small_plates), "--out", str(out)], capsys)
    assert Path(summary["out"]) == out.resolve() and summary["sites"] == 12
    assert len(list(out.rglob("*_cells.tif"))) == 12
    assert summary["settings"]["segmenter"] == "classical"
    assert summary["settings"]["nuclear"] == "DNA"


def test_embed_json(small_plates, weights, tmp_path, capsys):
    out = tmp_path / "store.zarr"
    argv = ["embed", str(small_plates), "--model", str(weights), "--out", str(out)]
    summary = _run_json([*argv, "--batch-size", "8"], capsys)
    assert Path(summary["store"]) == out.resolve()
    store = ActivationStore.open(out)
    [one] = summary["stores"]
    assert one["cells"] == store.tokens("cell").shape[0] > 0 and one["sites"] == 12
    assert one["reused"] is False and one["bytes"] == store.nbytes()["total"]
    assert summary["model"] == "ca-vit:tiny.safetensors" and summary["block"] == store.block


def test_embed_says_what_auto_precision_chose_and_the_store_signs_it(
    small_plates, weights, tmp_path, capsys
):
    from napari_concept_discovery.embed.compute import cpu_has_bf16

    out = tmp_path / "store.zarr"
    argv = ["embed", str(small_plates), "--model", str(weights), "--out", str(out)]
    capsys.readouterr()
    assert main([*argv, "--device", "cpu", "--json"]) == 0
    captured = capsys.readouterr()
    used, why = (
        ("bf16", "this CPU has native bf16")
        if cpu_has_bf16()
        else ("fp32", "this CPU has no native bf16")
    )
    assert f"on cpu at {used} (auto: {why}); 12 sites" in captured.err
    assert f"embedded at {used}" in captured.err
    assert json.loads(captured.out)["precision"] == used
    store = ActivationStore.open(out)
    assert store.precision == used and store.embed_settings["precision"] == used
    # fp32 stores sign as before precision was recorded; any other precision by name
    assert store.signature.get("precision", "fp32") == used


def test_train_analyze_report_json(tiny_store_path, dictionary, tmp_path, capsys):
    out = tmp_path / "d.safetensors"
    summary = _run_json(["train", str(tiny_store_path), *TRAIN, "--out", str(out)], capsys)
    assert Path(summary["dictionary"]) == out.resolve() and out.is_file()
    assert summary["atoms"] == 24 and summary["steps"] == 5 and summary["method"] == "icfl"
    assert 0 <= summary["metrics"]["fvu"] and summary["metrics"]["n_atoms"] == 24
    assert summary["whitened"] is False

    n_cells = ActivationStore.open(tiny_store_path).tokens("cell").shape[0]
    argv = ["analyze", str(tiny_store_path), str(out), "--out", str(tmp_path / "a")]
    summary = _run_json(argv, capsys)
    assert summary["features"] == 24 and summary["tokens"] == n_cells
    assert 0 < summary["l0"] <= 4
    assert all(Path(p).exists() for p in summary["files"].values())
    assert "features" in summary["files"]

    argv = ["report", str(tiny_store_path), str(dictionary), str(out), "--out", str(tmp_path / "r")]
    summary = _run_json([*argv, "--top", "2", "--cells", "2"], capsys)
    assert Path(summary["report"]) == (tmp_path / "r" / "index.html").resolve()
    assert Path(summary["report"]).is_file() and len(summary["dictionaries"]) == 2


def test_convert_json(small_plates, tmp_path, capsys):
    pytest.importorskip("ome_zarr")
    out = tmp_path / "zarr"
    summary = _run_json(["convert", str(small_plates), "--out", str(out)], capsys)
    assert summary["sites"] == 12 and summary["ngff"] == "0.5" and len(summary["plates"]) == 2
    assert all(Path(p).is_dir() and Path(p).parent == out.resolve() for p in summary["plates"])


def test_models_json(capsys):
    summary = _run_json(["models"], capsys)
    assert summary["models"] and {"source", "name", "offline"} <= set(summary["models"][0])
    assert any(m["source"] == "default" for m in summary["models"])


def test_demo_json(tmp_path, weights, capsys):
    argv = ["demo", str(tmp_path / "demo"), "--plates", "1", "--wells", "6", "--size", "128"]
    argv += ["--atoms", "16", "--sparsity", "4", "--steps", "5", "--model", str(weights)]
    summary = _run_json(argv, capsys)
    for key in ("plates", "store", "dictionary", "analysis", "report"):
        assert Path(summary[key]).exists(), key
    # 16 atoms in each of the three default views (the controls mix cell types)
    assert summary["metrics"]["n_atoms"] == 48 and summary["cells"] > 0
    assert set(summary["metrics"]["views"]) == {"whitened", "within-type", "centred"}
    assert set(summary["timings_s"]) == {"synth", "embed", "train", "analyze", "report"}
    assert {c["concept"] for c in summary["concepts"]} >= {"HUVEC", "HEPG2", "U2OS"}


# --- --quiet ---------------------------------------------------------------------------------


def test_quiet_prints_nothing(tiny_store_path, tmp_path, capsys):
    capsys.readouterr()
    argv = ["synth", str(tmp_path / "s"), "--plates", "1", "--wells", "3", "--sites", "1"]
    assert main([*argv, "--size", "64", "--workers", "1", "--quiet"]) == 0
    out = tmp_path / "d.safetensors"
    assert main(["-q", "train", str(tiny_store_path), *TRAIN, "--out", str(out)]) == 0
    assert main(["info", str(tmp_path / "s"), "-q"]) == 0
    assert capsys.readouterr() == ("", "")
    assert out.is_file() and (tmp_path / "s" / "truth.csv").is_file()
    # an error is still said under --quiet
    assert main(["train", str(tmp_path / "nowhere"), "--out", str(out), "-q"]) == 2
    assert capsys.readouterr() == ("", f"error: no activation store at {tmp_path / 'nowhere'}\n")


# --- exit codes ----------------------------------------------------------------------------


def test_bad_option_exits_2_naming_it(tiny_store_path, dictionary, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["synth", str(tmp_path), "--plates", "two"])
    assert exc.value.code == 2 and "--plates" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["train", str(tiny_store_path), "--out", "d", "--no-such-option"])
    assert exc.value.code == 2 and "--no-such-option" in capsys.readouterr().err
    # a refusal by the library: exit 2, the option in the message, and under --json the same
    # message in the summary
    argv = ["synth", str(tmp_path / "s"), "--wells", "0", "--json"]
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.err == "error: --wells must be at least 1, got 0\n"
    summary = json.loads(captured.out)
    assert summary["ok"] is False and summary["exit_code"] == 2
    assert summary["error"] == "--wells must be at least 1, got 0"
    assert not (tmp_path / "s").exists()
    # an output that cannot be written is refused before the work, naming it
    (tmp_path / "taken.csv").write_text("x\n")
    argv = ["report", str(tiny_store_path), str(dictionary), "--out", str(tmp_path / "taken.csv")]
    assert main(argv) == 2
    assert capsys.readouterr().err == (
        f"error: report folder {tmp_path / 'taken.csv'} is a file; give a folder path\n"
    )


def test_subprocess_exit_codes_and_stdout(tmp_path):
    """What a script sees: the exit code, and stdout that is only the JSON summary."""
    ok = run_cli(
        "--json",
        "synth",
        str(tmp_path / "s"),
        "--plates",
        "1",
        "--wells",
        "3",
        "--sites",
        "1",
        "--size",
        "64",
        "--workers",
        "1",
    )
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["sites"] == 3 and "wrote 3 sites" in ok.stderr
    assert "synth sites" not in ok.stderr  # no progress under --json
    missing = run_cli("info", str(tmp_path / "nowhere"), "--json")
    assert missing.returncode == 2
    assert json.loads(missing.stdout)["error"] == f"plate folder not found: {tmp_path / 'nowhere'}"
    assert missing.stderr == f"error: plate folder not found: {tmp_path / 'nowhere'}\n"
    bad = run_cli("info", str(tmp_path / "s"), "--layout", "nope")
    assert bad.returncode == 2 and "--layout" in bad.stderr and bad.stdout == ""


def test_ctrl_c_exits_130(monkeypatch, tmp_path, tiny_store_path, capsys):
    import napari_concept_discovery.dictionary.pipeline as pipeline
    import napari_concept_discovery.synth as synth

    real_synth = synth.write_synthetic_plates

    def synth_then_ctrl_c(*args, progress=None, **kwargs):
        def interrupt(n):
            progress(n)
            raise KeyboardInterrupt

        return real_synth(*args, progress=interrupt, **kwargs)

    monkeypatch.setattr(synth, "write_synthetic_plates", synth_then_ctrl_c)
    argv = ["synth", str(tmp_path / "s"), "--plates", "1", "--wells", "3", "--sites", "1"]
    assert main([*argv, "--size", "64", "--workers", "1"]) == 130
    assert capsys.readouterr().err.endswith("interrupted\n")

    # inside the training loop, from its own progress report; --json still gives the summary
    real_train = pipeline.train_on_store

    def train_then_ctrl_c(*args, progress=None, **kwargs):
        def interrupt(p):
            if p.stage == "train" and p.done >= 2:
                raise KeyboardInterrupt
            progress(p)

        return real_train(*args, progress=interrupt, **kwargs)

    monkeypatch.setattr(pipeline, "train_on_store", train_then_ctrl_c)
    out = tmp_path / "d.safetensors"
    assert main(["train", str(tiny_store_path), *TRAIN, "--out", str(out), "--json"]) == 130
    summary = json.loads(capsys.readouterr().out)
    assert summary["exit_code"] == 130 and summary["error"] == "interrupted"
    assert not out.exists()  # no half-written dictionary


def test_unexpected_error_exits_1_with_one_line(monkeypatch, capsys):
    import napari_concept_discovery.models as models

    def broken():
        raise RuntimeError("the registry is broken")

    monkeypatch.setattr(models, "list_models", broken)
    assert main(["models"]) == 1
    err = capsys.readouterr().err
    assert err == (
        "error: RuntimeError: the registry is broken (rerun with --debug to see the traceback)\n"
    )
    assert main(["models", "--debug", "--json"]) == 1
    captured = capsys.readouterr()
    assert "Traceback" in captured.err and "in broken" in captured.err
    assert json.loads(captured.out)["exit_code"] == 1


def test_exit_code_table_is_the_one_main_uses():
    from napari_concept_discovery.cli.output import EXIT_CODES

    assert sorted(EXIT_CODES) == [0, 1, 2, 130]
    assert cli.EXIT_REFUSED == 2 and cli.EXIT_INTERRUPTED == 130 and cli.EXIT_FAILED == 1
