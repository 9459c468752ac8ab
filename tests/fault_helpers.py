"""Helpers of the fault-injection tests: file snapshots, tiny weights files, killed children."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

SRC = Path(__file__).resolve().parents[1] / "src"


def run_cli(*argv: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m napari_concept_discovery ARGV`` as a script runs it: a fresh process with
    this checkout's ``src`` and a bare PATH, its output captured as text."""
    return subprocess.run(
        [sys.executable, "-m", "napari_concept_discovery", *argv],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(SRC), "PATH": "/usr/bin:/bin"},
        timeout=timeout,
    )


def snapshot(*roots: Path) -> dict[str, str]:
    """sha256 of every file (hidden ones too) under ``roots``, by path: equal means untouched."""
    out = {}
    for root in roots:
        root = Path(root)
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for p in files:
            out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def tiny_weights(path: Path, seed: int = 0, dim: int = 32) -> Path:
    """A small channel-agnostic ViT as a safetensors file that ``load_model(path)`` reads."""
    from safetensors.torch import save_file

    from napari_concept_discovery.models import ChannelAgnosticViT

    torch.manual_seed(seed)
    vit = ChannelAgnosticViT(embed_dim=dim, depth=2, num_heads=2, max_channels=6)
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(path))
    return path


def run_and_kill(code: str, marker: Path, *args: str, timeout: float = 300) -> int:
    """Run ``code`` in a child Python, SIGKILL it once it has written ``marker``; its pid.

    The child signals from inside its own progress callback (it writes the marker, then
    sleeps), so where it is killed depends on its work, not on time.
    """
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    child = subprocess.Popen(
        [sys.executable, "-c", code, *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + timeout
    try:
        while not marker.exists():
            if child.poll() is not None:
                raise AssertionError(
                    f"the child ended (rc {child.returncode}) before the marker: "
                    + child.stderr.read().decode()[-3000:]
                )
            if time.monotonic() > deadline:
                raise AssertionError("the child never reached the marker")
            time.sleep(0.05)
    finally:
        if child.poll() is None:
            os.kill(child.pid, signal.SIGKILL)
        child.wait()
        child.stderr.close()
    return child.pid
