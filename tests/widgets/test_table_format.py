"""How the widgets' tables write their values: what a person reads in a cell."""

from __future__ import annotations

import numpy as np
import pytest

from napari_concept_discovery.widgets._table import format_value


@pytest.mark.parametrize(
    ("column", "value", "text"),
    [
        ("family", np.int64(-1), ""),  # in no family: blank, not "-1"
        ("family", np.int64(0), "0"),
        ("family", 3, "3"),
        ("feature", np.int64(-1), "-1"),  # only "none" columns hide negatives
        ("frequency", 0.19, "19%"),
        ("frequency", 0.031, "3.1%"),
        ("mean_activation", 0.14159, "0.142"),
        ("mean_activation", float("nan"), ""),
        ("significant", np.bool_(True), "yes"),
        ("description", "ER: up", "ER: up"),
    ],
)
def test_values_as_shown(column, value, text):
    assert format_value(column, value) == text
