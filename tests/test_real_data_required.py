"""The real-data tests run in CI: a missing image folder fails them there and only skips elsewhere."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).parent


def test_real_data_ships_with_the_tests():
    real = TESTS / "data" / "real"
    for folder in ("jump_BR00117006", "pediatric_cancer_atlas_BR00143976", "nf1_plate2/images"):
        assert (real / folder).is_dir(), folder
    assert (real / "LICENSE-CytoDataFrame-BSD3.txt").is_file()


def _run_one_real_data_test(tmp_path, ci: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env["CONCEPT_DISCOVERY_REAL_DATA"] = str(tmp_path / "absent")
    if ci is not None:
        env["CI"] = ci
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-rsf",
            f"{TESTS / 'plate' / 'test_plate_real.py'}::test_pediatric_cancer_atlas_phenix",
        ],
        cwd=TESTS.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize("ci", ["true", "1"])
def test_missing_real_data_fails_in_ci(tmp_path, ci):
    run = _run_one_real_data_test(tmp_path, ci)
    assert run.returncode == 1, run.stdout + run.stderr
    assert "real-data tests may not be skipped" in run.stdout


def test_missing_real_data_skips_outside_ci(tmp_path):
    run = _run_one_real_data_test(tmp_path, None)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "1 skipped" in run.stdout and "real images not found" in run.stdout
