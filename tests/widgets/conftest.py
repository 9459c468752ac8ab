"""The widget tests' folder: a small synthetic plate, two tiny models, and a store with a
dictionary, made by library calls (what `concept-discovery demo` would leave), per module."""

from __future__ import annotations

import pytest

from napari_concept_discovery.dictionary.pipeline import train_on_store
from napari_concept_discovery.embed.plate import EmbedSettings, embed_plate
from widget_helpers import dictionary_settings, tiny_vit


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A demo-like folder: plates/, and two tiny models (the second of another width)."""
    from napari_concept_discovery.synth import write_synthetic_plates

    root = tmp_path_factory.mktemp("explore_gui")
    write_synthetic_plates(root / "plates", n_plates=1, n_wells=6, n_sites=1, size=160, seed=2)
    tiny_vit(root / "tiny.safetensors", 32, 0)
    tiny_vit(root / "other.safetensors", 48, 1)
    return root


@pytest.fixture(scope="module")
def demo_folder(workdir):
    """What `concept-discovery demo` leaves, made by library calls: store.zarr and a dictionary."""
    model = str(workdir / "tiny.safetensors")
    store = embed_plate(workdir / "plates", EmbedSettings(model=model), workdir / "store.zarr")
    train_on_store(store, dictionary_settings(), out=workdir / "dictionary-center.safetensors")
    return workdir


@pytest.fixture(scope="module")
def other_dictionary(workdir):
    """A dictionary trained on the activations of another model (width 48, not 32)."""
    model = str(workdir / "other.safetensors")
    store = embed_plate(workdir / "plates", EmbedSettings(model=model), workdir / "other.zarr")
    path = workdir / "other-dictionary.safetensors"
    train_on_store(store, dictionary_settings(steps=5), out=path)
    return path
