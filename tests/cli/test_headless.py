"""The command line on a cluster node: embed, train and analyze with every Qt binding blocked.

The lean install (no ``[pyqt6]``/``[all]``) has napari without a Qt binding; these steps must
not need one, nor load napari at all. One fresh interpreter in which any import of a Qt binding
or of qtpy raises, running the real commands in order on a small synthetic plate.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"

BLOCKED_RUN = textwrap.dedent(
    """
    import importlib.abc, json, sys

    BLOCKED = ("PyQt5", "PyQt6", "PySide2", "PySide6", "qtpy", "sip")

    class NoQt(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"Qt is blocked here: import {name}")
            return None

    sys.meta_path.insert(0, NoQt())
    from napari_concept_discovery.cli import main

    out = sys.argv[1]
    steps = [
        ["synth", f"{out}/plates", "--plates", "1", "--wells", "4", "--sites", "1",
         "--size", "96", "--seed", "0", "--workers", "1"],
        ["embed", f"{out}/plates", "--out", f"{out}/store.zarr", "--precision", "fp32"],
        ["train", f"{out}/store.zarr", "--atoms", "64", "--steps", "5",
         "--whiten", "well_type=negative_control", "--whiten-within", "auto",
         "--out", f"{out}/d.safetensors"],
        ["analyze", f"{out}/store.zarr", f"{out}/d.safetensors", "--labels", "perturbation",
         "--out", f"{out}/analysis"],
    ]
    codes = [main(["-q", *argv]) for argv in steps]
    loaded = sorted({m.split(".")[0] for m in sys.modules} & {*BLOCKED, "napari", "vispy"})
    print(json.dumps({"codes": codes, "loaded": loaded}))
    """
)


@pytest.mark.slow
def test_embed_train_analyze_run_with_qt_blocked(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-c", BLOCKED_RUN, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=900,
        env={"PYTHONPATH": str(SRC), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["codes"] == [0, 0, 0, 0], proc.stderr[-3000:]
    assert result["loaded"] == []  # no Qt binding, and not even napari or vispy
    assert (tmp_path / "analysis" / "codes.h5ad").is_file()
    assert (tmp_path / "analysis" / "features.parquet").is_file()
    # the controls of this plate (wells B02, B04, C02) are U2OS, HUVEC and HEPG2: auto whitened
    # within cell_type, and the file says so
    from napari_concept_discovery.dictionary import load_dictionary

    meta = load_dictionary(tmp_path / "d.safetensors").meta
    assert meta.whitening.within == "cell_type"
    assert meta.within_chosen.startswith("covariance within cell_type: the controls hold 3 values")
