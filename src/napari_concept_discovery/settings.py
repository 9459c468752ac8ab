"""Settings objects: one dataclass per step, the single source of defaults, help and checks.

Each step's settings (``EmbedSettings``, ``WhitenSettings``, ``TrainSettings``,
``AnalyzeSettings``) is a dataclass that derives from :class:`Settings`. Fields carry their help
text (and, optionally, choices, the command-line flag and a short label for forms) in
``field(metadata=...)`` through :func:`option`; ``__post_init__`` checks values and raises a
:class:`SettingsError` that names the parameter. The CLI builds its options from the fields
(:func:`add_arguments`, :func:`from_args`), the demo constructs the same objects, and the widgets
build their forms from :func:`describe`. A settings object round-trips through JSON
(``to_dict``/``from_dict``), which is how a dictionary file records how it was trained.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Iterable, Sequence
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

from .errors import ConceptDiscoveryError


class SettingsError(ConceptDiscoveryError, ValueError):
    """A setting is out of range or contradicts another; the message names the setting."""


def option(
    default: Any = MISSING,
    help: str = "",
    *,
    choices: Sequence | None = None,
    flag: str | None = None,
    label: str | None = None,
    default_factory: Any = MISSING,
    cli: bool = True,
    min: float | None = None,
    max: float | None = None,
    items: dict[str, str] | None = None,
) -> Any:
    """A dataclass field with help text, optional choices, CLI flag, form label and range.

    ``flag`` defaults to ``--field-name``; ``cli=False`` keeps a field out of the command line
    (for values the CLI passes positionally or derives). ``min`` and ``max`` bound a number:
    every settings object checks them, and a form's spin box takes them as its range.
    ``items`` (name: what it means) marks a text that names a comma-separated subset of those
    names: a form shows one check box per name (the field's ``validate`` checks the text).
    """
    meta = {
        "help": help,
        "choices": tuple(choices) if choices else None,
        "items": dict(items) if items else None,
        "flag": flag,
        "label": label,
        "cli": cli,
        "min": min,
        "max": max,
    }
    if default_factory is not MISSING:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


def check(condition: bool, name: str, message: str) -> None:
    """Raise a SettingsError about ``name`` unless ``condition`` holds."""
    if not condition:
        raise SettingsError(f"{name}: {message}")


@dataclass
class Settings:
    """Base: JSON round trip and a check of ``choices`` for every field that has them."""

    def __post_init__(self) -> None:
        for f in fields(self):
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            if choices and value is not None and value not in choices:
                raise SettingsError(
                    f"{f.name}: {value!r} is not one of {', '.join(map(repr, choices))}"
                )
            lo, hi = f.metadata.get("min"), f.metadata.get("max")
            if value is not None and lo is not None:
                check(value >= lo, f.name, f"must be at least {lo}, got {value}")
            if value is not None and hi is not None:
                check(value <= hi, f.name, f"must be at most {hi}, got {value}")
        self.validate()

    def validate(self) -> None:
        """Cross-field checks of a subclass; raise :class:`SettingsError` naming the field."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        """Build from a dict; unknown keys are an error naming them (a typo must not pass)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise SettingsError(
                f"{cls.__name__}: unknown setting(s) {', '.join(unknown)}; "
                f"known: {', '.join(sorted(known))}"
            )
        return cls(**data)

    def replace(self, **changes):
        """A copy with ``changes`` applied and checked again."""
        return dataclasses.replace(self, **changes)


def _base_type(tp) -> tuple[type, bool]:
    """(type, optional) of an annotation such as ``int | None``."""
    args = typing.get_args(tp)
    optional = type(None) in args
    if args and typing.get_origin(tp) in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        tp = rest[0] if len(rest) == 1 else str
    origin = typing.get_origin(tp)
    if origin in (tuple, list):
        return str, optional
    return (tp if isinstance(tp, type) else str), optional


def describe(cls: type[Settings]) -> list[dict[str, Any]]:
    """One dict per field: name, type, optional, default, help, choices, items, label (forms)."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in fields(cls):
        tp, optional = _base_type(hints[f.name])
        default = (
            f.default
            if f.default is not MISSING
            else (f.default_factory() if f.default_factory is not MISSING else None)
        )
        out.append(
            {
                "name": f.name,
                "type": tp,
                "optional": optional,
                "default": default,
                "help": f.metadata.get("help", ""),
                "choices": f.metadata.get("choices"),
                "items": f.metadata.get("items"),
                "label": f.metadata.get("label") or f.name.replace("_", " "),
                "flag": f.metadata.get("flag") or "--" + f.name.replace("_", "-"),
                "cli": f.metadata.get("cli", True),
                "min": f.metadata.get("min"),
                "max": f.metadata.get("max"),
            }
        )
    return out


def add_arguments(
    parser: argparse.ArgumentParser,
    cls: type[Settings],
    exclude: Iterable[str] = (),
    *,
    with_defaults: bool = False,
) -> None:
    """Add one option per field of ``cls`` (defaults and help from the dataclass).

    Options not given stay out of the parsed namespace, so :func:`from_args` keeps the
    dataclass's defaults; ``with_defaults=True`` puts those defaults into the namespace instead
    (for handlers that read ``args.<field>`` directly)."""
    skip = set(exclude)
    if with_defaults:
        parser.set_defaults(
            **{d["name"]: d["default"] for d in describe(cls) if d["name"] not in skip and d["cli"]}
        )
    for d in describe(cls):
        if d["name"] in skip or not d["cli"]:
            continue
        kwargs: dict[str, Any] = {"dest": d["name"], "default": argparse.SUPPRESS}
        default = d["default"]
        shown = "" if default is None else f" (default: {default})"
        if d["type"] is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
            shown = f" (default: {'auto' if default is None else 'yes' if default else 'no'})"
        else:
            kwargs["type"] = d["type"] if d["type"] in (int, float) else str
            if d["choices"]:
                kwargs["choices"] = d["choices"]
            kwargs["metavar"] = d["name"].upper() if not d["choices"] else None
            if kwargs["metavar"] is None:
                del kwargs["metavar"]
        kwargs["help"] = d["help"] + shown
        parser.add_argument(d["flag"], **kwargs)


def from_args(cls: type[Settings], args: argparse.Namespace, **overrides):
    """Settings from parsed options: fields not given on the command line keep their default."""
    names = {f.name for f in fields(cls)}
    values = {k: v for k, v in vars(args).items() if k in names}
    values.update(overrides)
    return cls(**values)


# --- segmentation ------------------------------------------------------------------------------

#: Who segments: our CellProfiler-style pipeline, an installed Cellpose, or the watershed of
#: version 0.1 (kept to reproduce older label folders and for comparison).
SEGMENTERS = ("classical", "cellpose", "legacy")
#: Precisions of the embedding forward pass (:func:`.embed.with_precision`): here, so that the
#: settings and the compute both name them without importing each other.
PRECISIONS = ("fp32", "bf16", "int8")
#: Names the default classical segmentation in store signatures: sites segmented while
#: embedding are re-embedded when it changes.
SEGMENT_ALGORITHM = "propagation-3"
#: Global thresholds: two-class Otsu, three-class Otsu with the middle class as foreground,
#: minimum cross-entropy (Li).
THRESHOLDS = ("otsu", "otsu3", "mce")
#: Cell foreground thresholds: the stain's background plus a share of its bright level, or one
#: of CellProfiler's per-image methods.
CELL_THRESHOLDS = ("background", *THRESHOLDS)
#: Propagation images: the cell stains weighted by how far each fills its cells, or their mean.
PROPAGATION_RULES = ("reach", "mean")
#: Which object touching the image edge drops a cell (with ``drop_edge``): its nucleus
#: (CellProfiler's IdentifyPrimaryObjects) or the cell itself (IdentifySecondaryObjects).
EDGE_RULES = ("nucleus", "cell")


@dataclass
class SegmentSettings(Settings):
    """How nuclei and cells are found, with CellProfiler's methods and names.

    Nuclei: minimum cross-entropy threshold on the nuclear stain (as the JUMP production
    pipeline), split by shape, size limits relative to the image's typical nucleus (so 20x and
    40x both work unchanged). Cells: a foreground per cell stain from its own background
    (estimated from the image) plus 15% of its bright level above it, each stain judged before
    it joins the others, nuclei grown through it by CellProfiler's Propagation with
    regularisation factor 0.05 on the cell stains weighted by how far each fills its cells. No threshold lies inside a stain's background noise. To reproduce a CellProfiler pipeline, set the same channel, threshold method,
    log transform and correction factor. See docs/architecture.md, "One room per step".
    """

    segmenter: str = option(
        "classical",
        "classical: CellProfiler-style thresholds and propagation (scikit-image, no extra "
        "package); cellpose: an installed Cellpose (pip install "
        "'napari-concept-discovery[cellpose]'); legacy: the watershed of version 0.1",
        choices=SEGMENTERS,
    )
    nuclear: str = option("DNA", "nuclear stain, a channel name or index")
    cell: str | None = option(
        None,
        "channel(s) for the cell foreground and borders, comma-separated (default: every "
        "fluorescent channel besides the nuclear one; transmitted light is left out)",
    )
    nucleus_threshold: str = option(
        "mce",
        "nucleus threshold: mce (minimum cross-entropy), otsu, otsu3 (three classes, middle "
        "class as foreground)",
        choices=THRESHOLDS,
    )
    nucleus_log: bool = option(False, "threshold the log of the nuclear stain")
    nucleus_threshold_factor: float = option(
        1.0, "multiplies the nucleus threshold (CellProfiler's correction factor)"
    )
    cell_threshold: str = option(
        "background",
        "cell foreground threshold per stain: background (the stain's own background level "
        "plus --cell-fraction of its bright level above it), otsu, mce, otsu3 (three classes, "
        "middle class as foreground)",
        choices=CELL_THRESHOLDS,
    )
    cell_fraction: float = option(
        0.15,
        "with --cell-threshold background: the share of the stain's bright level (99.5th "
        "percentile, saturated pixels left out) above its background that counts as cell",
    )
    cell_log: bool = option(
        True,
        "otsu, mce, otsu3: threshold the log of the cell stains, so that the dim edge of a cell "
        "counts as cell (--no-cell-log thresholds the intensities as they are)",
    )
    noise_floor: float = option(
        4.0,
        "no threshold (nuclei or cells) lies within this many robust deviations of the stain's "
        "background (the lowest clear peak of its histogram and the spread below it, estimated "
        "per image); 0 turns it off",
    )
    judge_stains: bool = option(
        True,
        "leave out of the cell foreground a stain whose mask covers most of a sparse site or "
        "does not follow the nuclei, with a warning naming it (--no-judge-stains keeps all)",
    )
    cell_threshold_factor: float = option(
        1.0, "multiplies the cell threshold (CellProfiler's correction factor)"
    )
    smoothing: float = option(
        1.0, "Gaussian sigma in pixels applied before thresholding (CellProfiler's scale 1.35)"
    )
    regularization: float = option(
        0.05,
        "propagation's regularisation factor: 0 follows image edges only, large values divide "
        "cells by distance alone",
    )
    propagation: str = option(
        "reach",
        "the image propagation follows: reach (the cell stains weighted by how far each fills "
        "its cells, so a perinuclear or uneven stain does not move the borders) or mean (all "
        "cell stains alike)",
        choices=PROPAGATION_RULES,
    )
    min_diameter: float | None = option(
        None,
        "smallest nucleus kept, equivalent diameter in pixels (default: 0.4 x the image's "
        "typical nucleus, at least 4)",
    )
    max_diameter: float | None = option(
        None,
        "largest nucleus kept, equivalent diameter in pixels (default: 3 x the typical nucleus)",
    )
    declump: bool = option(True, "split touching nuclei by shape")
    drop_edge: bool = option(
        False,
        "drop objects cut by the image edge: by default cells whose nucleus touches it (as "
        "CellProfiler's IdentifyPrimaryObjects does; cells grown from interior nuclei are kept "
        "where they reach the edge), see --drop-edge-by",
    )
    drop_edge_by: str = option(
        "nucleus",
        "with --drop-edge, which object touching the edge drops a cell and its nucleus: "
        "nucleus, or cell (also every cell that reaches the edge, as IdentifySecondaryObjects' "
        "'discard objects touching the border' does, e.g. in the NF1 pipeline)",
        choices=EDGE_RULES,
    )
    cellpose_model: str = option(
        "auto",
        "Cellpose model for cells: auto (the installed Cellpose's own default: cpsam from "
        "version 4, cyto3 before), a built-in name (cpsam, cyto3, ...) or a model file",
    )
    cellpose_nuclei: str = option(
        "classical",
        "nuclei for Cellpose cells: classical (ours) or a Cellpose model name or file (nuclei)",
    )
    cellpose_diameter: float | None = option(
        None, "typical cell diameter in pixels for Cellpose (default: Cellpose estimates it)"
    )
    cellpose_cellprob: float = option(
        0.0,
        "Cellpose's cell probability threshold, -6 to 6 (lower: more and larger cells)",
    )
    cellpose_flow: float = option(
        0.4, "Cellpose's flow error threshold (higher: more cells kept; 0 turns the check off)"
    )
    device: str | None = option(None, "device for Cellpose: cuda | mps | cpu (default: cpu)")

    def validate(self) -> None:
        self.nuclear = str(self.nuclear).strip()  # an index given as a number
        check(bool(self.nuclear), "nuclear", "name the nuclear stain (a channel name or index)")
        if self.cell is not None:
            self.cell = str(self.cell).strip() or None
        check(
            0 <= self.cell_fraction < 1,
            "cell_fraction",
            f"must be in [0, 1), got {self.cell_fraction}",
        )
        check(self.noise_floor >= 0, "noise_floor", f"must be >= 0, got {self.noise_floor}")
        for name in ("nucleus_threshold_factor", "cell_threshold_factor"):
            value = getattr(self, name)
            check(value > 0, name, f"must be positive, got {value}")
        check(self.smoothing >= 0, "smoothing", f"must be 0 or more, got {self.smoothing}")
        check(
            self.regularization >= 0,
            "regularization",
            f"must be 0 or more, got {self.regularization}",
        )
        for name in ("min_diameter", "max_diameter", "cellpose_diameter"):
            value = getattr(self, name)
            check(value is None or value > 0, name, f"must be positive, got {value}")
        if self.min_diameter is not None and self.max_diameter is not None:
            check(
                self.max_diameter > self.min_diameter,
                "max_diameter",
                f"must exceed min_diameter ({self.min_diameter}), got {self.max_diameter}",
            )
        check(bool(self.cellpose_model.strip()), "cellpose_model", "name a Cellpose model")
        check(
            -6 <= self.cellpose_cellprob <= 6,
            "cellpose_cellprob",
            f"must be between -6 and 6, got {self.cellpose_cellprob}",
        )
        check(
            self.cellpose_flow >= 0, "cellpose_flow", f"must be 0 or more, got {self.cellpose_flow}"
        )
        check(
            bool(self.cellpose_nuclei.strip()),
            "cellpose_nuclei",
            "classical, or a Cellpose model name or file",
        )
