"""The install a user gets: extras that cannot drift apart, and pins the tests pass with.

README's two set-up lines install within ``constraints.txt``; this suite runs on that set, so
every pin must be what is installed here, the pins must satisfy the project's own requirements,
and packages that must match (dask and distributed) are one requirement.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+
ROOT = Path(__file__).resolve().parents[1]


def _pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    return pins


def _extras() -> dict[str, list[str]]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return project["optional-dependencies"]


def test_dask_and_distributed_are_one_requirement_and_pinned_together():
    assert _extras()["dask"] == ["dask[distributed]>=2024.8"]
    pins = _pins()
    assert pins["dask"] == pins["distributed"]
    import distributed  # a mismatched pair fails right here (dask.base lost collections_to_dsk)

    assert distributed.__version__ == pins["distributed"]


def test_all_extra_brings_qt_dask_and_cellpose():
    extras = _extras()
    assert sorted(extras["all"]) == sorted(
        f"napari-concept-discovery[{e}]" for e in ("pyqt6", "dask", "cellpose")
    )
    assert "napari-concept-discovery[all]" in extras["test"]


def test_the_suite_runs_on_the_pinned_versions():
    """Every pinned package that is installed is at its pin (the README's install used them)."""
    off = {}
    for name, version in _pins().items():
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
        if installed.split("+")[0] != version.split("+")[0]:
            off[name] = (version, installed)
    assert not off, f"installed versions differ from constraints.txt (pin, installed): {off}"


def test_install_script_uses_the_constraints_for_every_pip_install():
    script = (ROOT / "scripts" / "install.sh").read_text()
    installs = [
        ln for ln in script.splitlines() if "pip install" in ln and "--upgrade pip" not in ln
    ]
    assert installs and all("-c constraints.txt" in ln for ln in installs), installs


@pytest.mark.slow
def test_installed_set_is_consistent():
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "check"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
