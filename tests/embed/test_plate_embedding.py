"""The one rule for a site's cell labels, and EmbedSettings as the CLI's single source."""

from __future__ import annotations

import argparse

import numpy as np
import pytest

from napari_concept_discovery.cli import build_parser
from napari_concept_discovery.cli.embed import embed_settings
from napari_concept_discovery.embed.plate import (
    EMBED_SEGMENT_FIELDS,
    EmbedSettings,
    site_inputs,
    site_labels,
    store_settings,
)
from napari_concept_discovery.errors import PlateError
from napari_concept_discovery.plate import open_plate
from napari_concept_discovery.settings import (
    SEGMENT_ALGORITHM,
    SegmentSettings,
    SettingsError,
    add_arguments,
    describe,
    from_args,
)


def test_one_rule_gives_labels_and_the_files_behind_them(small_plates, monkeypatch):
    plate = open_plate(small_plates)
    site = next(iter(plate))
    image = site.read()

    labels, how = site_labels(site, image, "auto")
    assert how.cells == "file" and how.token == "file"
    assert how.files == [*site.paths, site.labels_path]
    assert np.array_equal(labels, site.read_labels())
    assert site_inputs(site, "file") == how

    labels, how = site_labels(site, image, "segment", nuclear="DNA")
    assert (
        how.cells == "segment"
        and how.token == f"segment:DNA:{SEGMENT_ALGORITHM}"
        and how.labels_path is None
    )
    assert how.files == list(site.paths)  # the plate's label file does not sign these tokens
    from napari_concept_discovery.segment.site import segment_site

    assert np.array_equal(labels, segment_site(image, site.channel_names, "DNA")[1])
    assert site_inputs(site, "segment", nuclear=0).token == f"segment:0:{SEGMENT_ALGORITHM}"

    labels, how = site_labels(site, image, "none")
    assert labels is None and how.files == list(site.paths) and how.token == "none"

    site.labels_path = None  # a site without a label file
    assert site_inputs(site, "auto", "Mito").token == f"segment:Mito:{SEGMENT_ALGORITHM}"
    with pytest.raises(PlateError, match=r"no label image for this site \(cells='file'\)"):
        site_inputs(site, "file")
    with pytest.raises(PlateError, match="cannot segment cells.*DAPI.*--nuclear"):
        site_labels(site, image, "auto", nuclear="DAPI")
    with pytest.raises(PlateError, match="cells must be one of"):
        site_inputs(site, "cellpose")


def test_embed_settings_checks_and_round_trip():
    s = EmbedSettings(block=-1, segment=SegmentSettings(nuclear=4))
    assert s.segment.nuclear == "4" and EmbedSettings.from_dict(s.to_dict()) == s
    with pytest.raises(SettingsError, match="block: must be at most 64, got 65"):
        EmbedSettings(block=65)
    with pytest.raises(SettingsError, match="batch_size: must be at least 1"):
        EmbedSettings(batch_size=0)
    with pytest.raises(SettingsError, match="cells: 'cellpose' is not one of"):
        EmbedSettings(cells="cellpose")
    with pytest.raises(SettingsError, match="unknown setting"):
        EmbedSettings.from_dict({"batchsize": 4})


def test_cli_embed_options_are_the_settings_fields():
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    embed = sub.choices["embed"]
    flags = {o for a in embed._actions for o in a.option_strings}
    for d in describe(EmbedSettings):
        assert d["flag"] in flags or not d["cli"], d["flag"]
    for name in EMBED_SEGMENT_FIELDS:  # the nested segmentation settings embedding applies
        assert "--" + name.replace("_", "-") in flags, name
    args = parser.parse_args(
        ["embed", "plates", "--out", "s", "--block", "2", "--cells", "none", "--channel-tokens"]
    )
    s = from_args(EmbedSettings, args)
    assert s == EmbedSettings(block=2, cells="none", channel_tokens=True)
    args = parser.parse_args(["embed", "plates", "--out", "s", "--nuclear", "3", "--device", "cpu"])
    s = embed_settings(args)
    assert s.segment == SegmentSettings(nuclear="3") and s.device == "cpu"
    # Defaults come from the dataclass, not from the parser.
    plain = argparse.ArgumentParser()
    add_arguments(plain, EmbedSettings)
    assert from_args(EmbedSettings, plain.parse_args([])) == EmbedSettings()


def test_store_settings_read_back_nested_and_from_an_older_store(tiny_store_path, tmp_path):
    """A store records its EmbedSettings with the segmentation nested; one written before
    that (``nuclear``, ``segmenter``, ``cellpose_model`` beside the others) reads the same."""
    import shutil

    import zarr

    from napari_concept_discovery.embed.store import ActivationStore

    store = ActivationStore.open(tiny_store_path)
    assert store.embed_settings["segment"]["nuclear"] == "DNA"
    now = store_settings(store)
    assert now.segment == SegmentSettings() and now.precision == "fp32" and now.block == 1
    old = tmp_path / "old.zarr"
    shutil.copytree(tiny_store_path, old)
    group = zarr.open_group(str(old), mode="r+")
    flat = {k: v for k, v in group.attrs["embed_settings"].items() if k != "segment"}
    flat.update(nuclear="Mito", segmenter="legacy", cellpose_model="auto")
    group.attrs["embed_settings"] = flat
    back = store_settings(ActivationStore.open(old))
    assert back.segment == SegmentSettings(nuclear="Mito", segmenter="legacy")
    assert back.replace(segment=SegmentSettings()) == now
