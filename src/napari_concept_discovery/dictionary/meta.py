"""What a dictionary was trained on and how: one typed, frozen record, written into its file.

Every reader of a dictionary's provenance (the applied dictionary's checks, resume, analyze,
the report, the widgets, the CLI) reads these fields instead of string keys. The whitening is
recorded once, as the :class:`.WhitenSettings` inside :attr:`DictionaryMeta.train`; the fitted
whitening state (groups, mean, transform) stays with the tensors (:mod:`.io`).

Files written before this record held the whitening three times (``meta["whitening"]`` without
``eps``, ``train_settings.whiten``, and the whitener's own parameters with ``by`` named
``group_by``) and repeated ``seed`` and ``batch_size`` beside the training settings; they read
to the same record (:data:`LEGACY_KEYS`). Keys a newer version wrote that this one does not
know, at the top level or in the training settings, are kept in :attr:`DictionaryMeta.extra`
and written back unchanged, so reading and saving a file loses nothing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from ..errors import DictionaryError
from .settings import TrainSettings, WhitenSettings

#: Keys of older files that this record derives from ``train`` (whitening, seed, batch size).
LEGACY_KEYS = ("whitening", "seed", "batch_size")
#: The JSON key of :attr:`DictionaryMeta.train` (the name older files use).
TRAIN_KEY = "train_settings"
#: Where unknown keys of the training settings are kept inside :attr:`DictionaryMeta.extra`.
EXTRA_TRAIN_KEY = "train_settings"


@dataclass(frozen=True)
class DictionaryMeta:
    """A dictionary's provenance: token unit and form, the model and block its tokens came
    from, the store, the training settings used (with the whitening) and how training went.

    ``model_id``, ``block`` and ``embed_dim`` let a dictionary refuse activations of another
    model, block or width; ``weights_hash`` tells two models of one name apart; ``signature``
    is the store's, so a resumed training continues on the same tokens.
    """

    unit: str = "cell"
    #: "concat" (channel tokens side by side) or "mean"
    tokens: str = "mean"
    #: channel blocks side by side in the input ("concat"), else 1
    token_groups: int = 1
    model_id: str | None = None
    model_source: str | None = None
    weights_hash: str | None = None
    block: int | None = None
    embed_dim: int | None = None
    channel_names: tuple[str, ...] = ()
    signature: Any = None
    #: the settings it was trained with, whitening included (None for a dictionary built by hand)
    train: TrainSettings | None = None
    n_tokens: int | None = None
    nonfinite_dropped: int = 0
    steps: int | None = None
    steps_chosen: str | None = None
    #: how the whitening's ``within`` was resolved and why (``within.resolve_within``)
    within_chosen: str | None = None
    samples: int | None = None
    cancelled: bool = False
    diverged: bool = False
    diverged_at: int | None = None
    metrics: Mapping[str, Any] = field(default_factory=dict)
    #: True in a training checkpoint's copy
    checkpoint: bool = False
    #: the views of a dictionary in parts (:mod:`.combined`), in feature order; () for one view
    views: tuple[str, ...] = ()
    #: keys this version does not know, as read (top level; the training settings' under
    #: ``"train_settings"``), written back unchanged
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "channel_names", tuple(str(c) for c in self.channel_names))
        object.__setattr__(self, "views", tuple(str(v) for v in self.views or ()))
        if isinstance(self.train, dict):
            object.__setattr__(self, "train", TrainSettings.from_dict(self.train))

    @property
    def whitening(self) -> WhitenSettings | None:
        """The whitening it was trained with (None: trained on the tokens as stored)."""
        return None if self.train is None else self.train.whiten

    @property
    def controls(self) -> str | None:
        """The whitening's controls as COLUMN=VALUE, or None."""
        w = self.whitening
        return None if w is None else w.controls

    @property
    def method(self) -> str | None:
        return None if self.train is None else self.train.method

    def replace(self, **changes) -> DictionaryMeta:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form written into the file (``train`` under ``"train_settings"``)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            if f.name in ("extra", "train"):
                continue
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        if not self.checkpoint:
            del out["checkpoint"]
        if not self.views:
            del out["views"]
        out["metrics"] = dict(self.metrics)
        extra = dict(self.extra)
        extra_train = extra.pop(EXTRA_TRAIN_KEY, None) or {}
        if self.train is not None:
            out[TRAIN_KEY] = {**extra_train, **self.train.to_dict()}
        for key, value in extra.items():
            out.setdefault(key, value)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> DictionaryMeta:
        """Read the JSON form of this or an older version; unknown keys go to ``extra``."""
        data = dict(data or {})
        known = {f.name for f in fields(cls)} - {"extra", "train"}
        values = {k: data.pop(k) for k in list(data) if k in known}
        extra: dict[str, Any] = {}
        train = data.pop(TRAIN_KEY, None)
        if train is not None:
            train = dict(train)
            if isinstance(train.get("whiten"), dict):  # written before "within": pooled
                train["whiten"] = {"within": None, **train["whiten"]}
            names = {f.name for f in fields(TrainSettings)}
            unknown = {k: train.pop(k) for k in list(train) if k not in names}
            if unknown:
                extra[EXTRA_TRAIN_KEY] = unknown
            try:
                values["train"] = TrainSettings.from_dict(train)
            except (TypeError, ValueError) as exc:
                raise DictionaryError(f"its training settings do not read: {exc}") from exc
            for key in LEGACY_KEYS:
                data.pop(key, None)
        extra.update(data)
        for f in fields(cls):  # a null where the record has a default means "not recorded"
            if values.get(f.name, 0) is None and f.default is not None:
                del values[f.name]
        if values.get("block") is not None:
            values["block"] = int(values["block"])
        for key in ("token_groups", "nonfinite_dropped"):
            if values.get(key) is not None:
                values[key] = int(values[key])
        values["channel_names"] = values.get("channel_names") or ()
        values["metrics"] = dict(values.get("metrics") or {})
        return cls(**values, extra=extra)

    @classmethod
    def of(cls, meta: DictionaryMeta | Mapping[str, Any] | None) -> DictionaryMeta:
        """``meta`` as a record: a record as it is, a dict (the JSON form) read."""
        return meta if isinstance(meta, DictionaryMeta) else cls.from_dict(meta)
