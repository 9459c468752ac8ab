"""Shared fixtures. Heavy ones are session-scoped so the suite stays well under a few minutes."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# The suite opens napari viewers (Mesa's OpenGL under Xvfb) and later imports timm ->
# torchvision -> torch._dynamo -> triton, whose LLVM segfaults when it loads after Mesa's (seen
# after the real-data reader tests). Nothing here compiles for a GPU, so the test process goes
# without triton (the plugin itself hides it only around its own first import of timm, and only
# where a driver's LLVM is loaded: models/_triton.py).
if "triton" not in sys.modules:
    sys.modules["triton"] = None  # type: ignore[assignment]

# Import torch before anything creates a Qt application (known crash when reversed).
import torch  # noqa: E402

# Real Cell Painting sites (BSD-3, see tests/data/real/README.md). A copy ships with the tests so
# that CI always runs the real-data tests; CONCEPT_DISCOVERY_REAL_DATA points them elsewhere.
REAL_DATA = Path(
    os.environ.get("CONCEPT_DISCOVERY_REAL_DATA") or Path(__file__).parent / "data" / "real"
)


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def pytest_configure(config):
    os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="session")
def real_data() -> Path:
    if not REAL_DATA.is_dir():
        # In CI a missing folder must not turn the real-data tests into quiet skips.
        message = f"real images not found at {REAL_DATA}"
        if _in_ci():
            pytest.fail(f"{message} (CI is set: real-data tests may not be skipped)")
        pytest.skip(message)
    return REAL_DATA


@pytest.fixture(scope="session")
def small_plates(tmp_path_factory) -> Path:
    """Two tiny synthetic plates (RxRx layout, with truth) shared by the whole session."""
    from napari_concept_discovery.synth import write_synthetic_plates

    out = tmp_path_factory.mktemp("synth")
    return write_synthetic_plates(out, n_plates=2, n_wells=6, n_sites=1, size=256, seed=0)


@pytest.fixture(scope="session")
def tiny_store_path(small_plates, tmp_path_factory) -> Path:
    """An activation store of ``small_plates``, written by the real embedding code.

    The model is a tiny randomly initialised channel-agnostic ViT (D=32, 2 blocks), so the tests
    that train and analyse dictionaries on it do not depend on the bundled weights and stay fast.
    """
    from napari_concept_discovery.embed.plate import EmbedSettings, embed_plate
    from napari_concept_discovery.models.backend import ChannelAgnosticBackend
    from napari_concept_discovery.models.vit import ChannelAgnosticViT

    torch.manual_seed(0)
    vit = ChannelAgnosticViT(embed_dim=32, depth=2, num_heads=2, max_channels=6)
    backend = ChannelAgnosticBackend(vit, model_id="tiny-random", weights_hash="0", default_block=1)
    out = tmp_path_factory.mktemp("store") / "store"
    # fp32 on every machine: tests compare its tokens to known answers (auto is bf16 where
    # the CPU has native bf16)
    embed_plate(small_plates, EmbedSettings(precision="fp32"), out, backend=backend)
    return out


@pytest.fixture(scope="session")
def small_train():
    """Training settings that train in seconds on the tiny store, as a factory:
    ``small_train(steps=5)`` (see ``helpers.small_train``)."""
    from helpers import small_train

    return small_train
