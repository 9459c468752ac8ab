"""Train and apply dictionaries on an activation store: the one path the CLI and widgets share.

A store is anything with the read API of :class:`napari_concept_discovery.store.ActivationStore`
(``tokens(unit)``, ``table(unit)``, ``model_id``, ``block``, ``embed_dim``, ``channel_names``,
``signature``). Tokens stay on disk (zarr) and stream through training and evaluation; only the
control tokens used to fit the whitening and the per-token table are held in memory.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import DictionaryError
from .io import DictionaryFile, build_model, save_dictionary
from .metrics import evaluate
from .train import TrainProgress, TrainResult, train
from .whiten import Whitener, control_mask


def take_rows(data, rows: np.ndarray, block: int = 65536) -> np.ndarray:
    """Rows ``rows`` (sorted) of an (N, D) numpy or zarr array, as float32, read in blocks."""
    rows = np.asarray(rows)
    if isinstance(data, np.ndarray):
        return np.asarray(data[rows], dtype=np.float32)
    out = np.empty((len(rows), data.shape[1]), dtype=np.float32)
    for s in range(0, len(rows), block):
        part = rows[s : s + block]
        lo, hi = int(part[0]), int(part[-1]) + 1
        if hi - lo <= 4 * len(part):  # dense enough: one contiguous read
            out[s : s + len(part)] = np.asarray(data[lo:hi])[part - lo]
        else:
            out[s : s + len(part)] = np.asarray(data.get_orthogonal_selection((part, slice(None))))
    return out


def store_signature(store) -> str | dict:
    return getattr(store, "signature_hash", None) or getattr(store, "signature", None)


def fit_whitener(
    tokens,
    table,
    control: tuple[str, str] | None,
    *,
    by: str | None = None,
    mode: str = "pca",
    n_components: int | None = None,
    eps: float = 1e-6,
) -> Whitener:
    """Fit whitening on the control tokens (``control`` = (column, value)), per ``by`` group.

    Without ``control``, every token is a control (centring and whitening on all the data).
    """
    mask = np.ones(len(table), bool) if control is None else control_mask(table, *control)
    if len(mask) != tokens.shape[0]:
        raise DictionaryError(
            f"the token table has {len(mask)} rows but there are {tokens.shape[0]} tokens"
        )
    rows = np.flatnonzero(mask)
    groups = None
    if by is not None:
        if by not in table.columns:
            raise DictionaryError(
                f"no column {by!r} to whiten by; columns are {list(table.columns)}"
            )
        groups = table[by].astype(str).to_numpy()[rows]
    w = Whitener(mode=mode, eps=eps, n_components=n_components, group_by=by)
    return w.fit(take_rows(tokens, rows), groups)


@dataclass
class TrainedDictionary:
    dictionary: DictionaryFile
    result: TrainResult
    metrics: dict
    path: Path | None


def train_on_store(
    store,
    *,
    method: str = "icfl",
    unit: str = "cell",
    control: tuple[str, str] | None = None,
    whiten: bool = True,
    whiten_by: str | None = None,
    whiten_mode: str = "pca",
    n_components: int | None = None,
    config: dict | None = None,
    steps: int = 2000,
    batch_size: int = 1024,
    seed: int = 0,
    out: str | Path | None = None,
    progress: Callable[[TrainProgress], None] | None = None,
    cancel: threading.Event | Callable[[], bool] | None = None,
    checkpoint_every: int = 1000,
    eval_max: int = 200_000,
) -> TrainedDictionary:
    """Whiten on controls, train ``method`` on ``unit`` tokens, evaluate, and save to ``out``.

    ``whiten=False`` trains on the tokens as stored. The dictionary file's metadata records the
    unit, model, block, width, channels, store signature, whitening controls and metrics.
    """
    tokens = store.tokens(unit)
    table = store.table(unit)
    if tokens.shape[0] == 0:
        raise DictionaryError(f"the store has no {unit} tokens to train on")
    whitener = None
    groups = None
    if whiten:
        if control is None:
            raise DictionaryError(
                "choose the control tokens for whitening as COLUMN=VALUE (for example "
                "well_type=negative_control), or train without whitening"
            )
        whitener = fit_whitener(
            tokens, table, control, by=whiten_by, mode=whiten_mode, n_components=n_components
        )
        if whiten_by is not None:
            groups = table[whiten_by].astype(str).to_numpy()
    d_in = whitener.n_components_ if whitener is not None else tokens.shape[1]
    model = build_model(method, d_in, config, seed=seed)
    meta = {
        "unit": unit,
        "model_id": store.model_id,
        "block": int(store.block),
        "embed_dim": int(store.embed_dim),
        "channel_names": list(store.channel_names),
        "signature": store_signature(store),
        "whitening": {
            "controls": None if control is None or not whiten else f"{control[0]}={control[1]}",
            "by": whiten_by if whiten else None,
            "mode": whiten_mode if whiten else None,
        },
        "n_tokens": int(tokens.shape[0]),
        "seed": seed,
        "batch_size": batch_size,
    }
    result = train(
        model,
        tokens,
        steps=steps,
        batch_size=batch_size,
        seed=seed,
        whitener=whitener,
        groups=groups,
        progress=progress,
        cancel=cancel,
        checkpoint=out,
        checkpoint_every=checkpoint_every,
        checkpoint_meta=meta,
    )
    n = tokens.shape[0]
    if n > eval_max:
        rows = np.sort(np.random.default_rng(seed).choice(n, eval_max, replace=False))
        ev_tokens = take_rows(tokens, rows)
        ev_groups = None if groups is None else groups[rows]
    else:
        ev_tokens, ev_groups = tokens, groups
    metrics = evaluate(model, ev_tokens, whitener=whitener, groups=ev_groups)
    meta.update(
        steps=result.steps_done,
        samples=result.samples,
        cancelled=result.cancelled,
        diverged=result.diverged,
        metrics=metrics,
    )
    dictionary = DictionaryFile(model, whitener, meta)
    path = save_dictionary(out, model, whitener, meta) if out is not None else None
    return TrainedDictionary(dictionary, result, metrics, path)


def encode_store(store, dictionary: DictionaryFile, unit: str | None = None, batch_size=4096):
    """Codes (N, M) CSR of all ``unit`` tokens of ``store``, with the token table."""
    unit = unit or dictionary.meta.get("unit") or "cell"
    tokens = store.tokens(unit)
    table = store.table(unit)
    groups = None
    w = dictionary.whitener
    if w is not None and w.group_by is not None:
        if w.group_by not in table.columns:
            raise DictionaryError(
                f"the dictionary whitens per {w.group_by!r} but the store's {unit} table has no "
                f"such column"
            )
        groups = table[w.group_by].astype(str).to_numpy()
    codes = dictionary.encode(
        tokens, groups, batch_size=batch_size, model_id=store.model_id, block=store.block
    )
    return codes, table
