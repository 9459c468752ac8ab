"""Training steps default to passes over the tokens (first_steps); given steps win."""

from __future__ import annotations

import numpy as np
import pytest

from napari_concept_discovery.dictionary import (
    ICFL,
    ICFLConfig,
    TrainSettings,
    WhitenSettings,
    train,
    train_on_store,
)
from napari_concept_discovery.dictionary.settings import (
    FIRST_ATOMS_RANGE,
    FIRST_EPOCHS,
    FIRST_STEPS,
    TOKENS_PER_ATOM,
    first_atoms,
    first_steps,
)
from napari_concept_discovery.embed.store import ActivationStore
from napari_concept_discovery.settings import SettingsError


def test_steps_default_counts_passes_over_the_tokens():
    settings = TrainSettings()
    assert settings.steps is None
    steps, why = settings.steps_for(4000)
    assert steps == first_steps(4000, 1024) == -(-FIRST_EPOCHS * 4000 // 1024) == 196
    assert f"{FIRST_EPOCHS} passes over 4000 tokens" in why and "--steps" in why
    assert settings.steps_for(10**6)[0] == FIRST_STEPS[1]
    assert "(the most)" in settings.steps_for(10**6)[1]
    assert settings.steps_for(10)[0] == FIRST_STEPS[0]
    assert TrainSettings(steps=7).steps_for(4000) == (7, "as given")
    with pytest.raises(SettingsError, match="steps"):
        TrainSettings(steps=0)


def test_library_train_without_steps_runs_first_steps():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 8)).astype(np.float32)
    model = ICFL(8, ICFLConfig(n_atoms=16, n_iter=2, n_pick=2), seed=0)
    result = train(model, x, batch_size=16)
    assert (
        result.steps_done == first_steps(40, 16) == max(FIRST_STEPS[0], -(-FIRST_EPOCHS * 40 // 16))
    )
    assert result.samples == 16 * result.steps_done


def test_train_on_store_sizes_steps_to_its_tokens_and_records_why(
    tiny_store_path, tmp_path, small_train
):
    store = ActivationStore.open(tiny_store_path)
    settings = small_train(
        atoms=16,
        steps=None,
        batch_size=256,
        seed=0,
        whiten=WhitenSettings("well_type=negative_control", n_components=8),
    )
    trained = train_on_store(store, settings, out=tmp_path / "d.safetensors")
    n = trained.dictionary.meta.n_tokens
    expected = first_steps(n, 256)
    assert trained.result.steps_done == expected
    meta = trained.dictionary.meta
    assert meta.train.steps == expected  # the file says what was run
    assert meta.steps_chosen.startswith(f"{expected} steps: {FIRST_EPOCHS} passes over {n}")
    given = train_on_store(store, settings.replace(steps=3), out=tmp_path / "e.safetensors")
    assert given.result.steps_done == 3
    assert given.dictionary.meta.steps_chosen == "3 steps: as given"


def test_the_steps_help_states_the_rule_in_numbers():
    from napari_concept_discovery.dictionary.settings import (
        FIRST_EPOCHS,
        FIRST_STEPS,
        TrainSettings,
    )
    from napari_concept_discovery.settings import describe

    text = next(d["help"] for d in describe(TrainSettings) if d["name"] == "steps")
    lo, hi = FIRST_STEPS
    assert f"{FIRST_EPOCHS} passes" in text and f"{lo}-{hi} steps" in text


def test_atoms_default_is_sized_to_the_tokens():
    settings = TrainSettings()
    assert settings.atoms is None
    lo, hi = FIRST_ATOMS_RANGE
    assert first_atoms(3840) == 16 == lo  # 3840 / 256 = 15: the nearest power of two, 16
    assert first_atoms(13_888) == 64  # 54 -> 64
    assert first_atoms(40_000) == 128  # 156 -> 128
    assert first_atoms(10**7) == hi and first_atoms(1) == lo
    atoms, why = settings.atoms_for(13_888)
    assert atoms == 64 and f"one atom per {TOKENS_PER_ATOM} of 13888 tokens" in why
    assert TrainSettings(method="topk", atoms=7, sparsity=2).atoms_for(13_888) == (7, "as given")
    # without a sparsity a small dictionary uses at most half its atoms per token
    assert settings.replace(atoms=16).method_config() == {"n_atoms": 16, "n_iter": 2, "n_pick": 4}
    assert settings.replace(atoms=16, method="topk").method_config()["k"] == 8
    assert settings.replace(atoms=1024).method_config()["n_iter"] == 8  # the default 32
    with pytest.raises(SettingsError, match="levels"):
        TrainSettings(levels="8,4")  # checked before the atoms are known


def test_train_on_store_sizes_atoms_to_its_tokens(tiny_store_path, tmp_path, small_train):
    store = ActivationStore.open(tiny_store_path)
    trained = train_on_store(store, small_train(atoms=None, sparsity=None, steps=5))
    n = trained.dictionary.meta.n_tokens
    assert trained.dictionary.n_atoms == first_atoms(n)
    assert trained.dictionary.meta.train.atoms == first_atoms(n)
