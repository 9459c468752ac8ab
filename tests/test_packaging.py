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


# --- what a napari user installs ------------------------------------------------------------

PACKAGE = ROOT / "src" / "napari_concept_discovery"


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_manifest_lives_inside_the_package_and_validates():
    manifest = PACKAGE / "napari.yaml"
    assert manifest.is_file() and not manifest.is_symlink()
    assert not (ROOT / "napari.yaml").exists()  # no second copy, no symlink to follow
    assert _project()["entry-points"]["napari.manifest"] == {
        "napari-concept-discovery": "napari_concept_discovery:napari.yaml"
    }
    npe2 = pytest.importorskip("npe2")
    parsed = npe2.PluginManifest.from_file(manifest)
    assert parsed.name == "napari-concept-discovery"
    assert "Annotation" not in parsed.categories
    assert {w.display_name for w in parsed.contributions.widgets} == {
        "Plate navigator",
        "Embed",
        "Dictionary",
        "Concept explorer",
    }


def test_licence_citation_and_classifiers_agree():
    project = _project()
    licence = (ROOT / "LICENSE").read_text()
    assert licence.startswith("BSD 3-Clause License")
    assert "napari-concept-discovery developers" in licence
    assert project["license"] == {"text": "BSD-3-Clause"}
    import yaml

    cff = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    assert cff["license"] == "BSD-3-Clause" and cff["title"] == project["name"]
    paper = cff["preferred-citation"]
    assert "arXiv:2412.16247" in {i["value"] for i in paper["identifiers"]}
    assert paper["title"].startswith("Towards scientific discovery with dictionary learning")
    classifiers = project["classifiers"]
    assert "Framework :: napari" in classifiers
    assert "License :: OSI Approved :: BSD License" in classifiers
    assert any(c.startswith("Operating System ::") for c in classifiers)
    # the Python versions named are the ones requires-python admits, the lowest first
    low = project["requires-python"].removeprefix(">=")
    versions = [c.rsplit(" ", 1)[-1] for c in classifiers if re.search(r"Python :: 3\.\d+$", c)]
    assert versions and versions[0] == low
    assert project["urls"]["Paper"] == "https://arxiv.org/abs/2412.16247"


def test_test_extra_installs_the_neighbours_ci_tests_beside():
    extras = _extras()
    names = {re.split(r"[<>=\[ ]", r, maxsplit=1)[0] for r in extras["test"]}
    assert {"napari-ome-zarr", "napari-clusters-plotter", "scanpy"} <= names
    pins = _pins()
    assert {"napari-ome-zarr", "napari-clusters-plotter", "scanpy", "ome-zarr"} <= set(pins)
    # napari-ome-zarr and the current OME tools need ome-zarr 0.18 or newer
    ome = next(r for r in _project()["dependencies"] if r.startswith("ome-zarr"))
    assert ome == "ome-zarr>=0.18" and int(pins["ome-zarr"].split(".")[1]) >= 18


def test_base_has_napari_but_no_qt_binding_and_all_adds_one():
    """The lean base runs headless (napari imports without a binding); [all] gives `napari`
    a Qt binding to start with."""
    bindings = ("pyqt5", "pyqt6", "pyside2", "pyside6")
    base = [r.lower() for r in _project()["dependencies"]]
    assert any(r.startswith("napari>") or r == "napari" for r in base)
    assert not any(r.startswith(bindings) for r in base)
    extras = _extras()
    assert "napari-concept-discovery[pyqt6]" in extras["all"]
    assert any(r.lower().startswith("pyqt6") for r in extras["pyqt6"])


@pytest.mark.slow
def test_wheel_carries_the_manifest_licence_and_entry_points(tmp_path):
    """Build the wheel a user would install and list it (editable installs import the same
    package folder, so they find the manifest where the wheel puts it)."""
    import zipfile

    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (wheel,) = tmp_path.glob("napari_concept_discovery-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
        entry_points = zf.read(f"{info}/entry_points.txt").decode()
        meta = zf.read(f"{info}/METADATA").decode()
        manifest = zf.read("napari_concept_discovery/napari.yaml").decode()
    assert manifest == (PACKAGE / "napari.yaml").read_text()
    assert f"{info}/licenses/LICENSE" in names
    assert "napari_concept_discovery/models/weights/default.safetensors" in names
    assert "napari-concept-discovery = napari_concept_discovery:napari.yaml" in entry_points
    assert "Classifier: Framework :: napari" in meta and "Requires-Python: >=3.11" in meta
