"""Train, apply and analyse dictionaries on an activation store: the one path every front calls.

A store is anything with the read API of :class:`napari_concept_discovery.store.ActivationStore`
(``tokens(unit, form)``, ``table(unit)``, ``model_id``, ``block``, ``embed_dim``,
``token_groups``, ``channel_names``, ``signature``). A dictionary is trained on one token form
(``TrainSettings.tokens``, recorded as ``meta["tokens"]``): the per-channel tokens side by side
("concat", the default where the store keeps them) or their mean, and it reads that form
wherever it is applied. Tokens stay on disk (zarr) and stream through training and evaluation; only the
control tokens used to fit the whitening and the per-token table are held in memory. The CLI,
the demo and the widgets pass settings objects (:mod:`.settings`) and get the same results.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..concepts import join_truth, read_truth, require_columns, write_analysis
from ..errors import DictionaryError
from ..progress import Cancel, Cancelled, ProgressCallback, report
from .applied import Dictionary
from .io import save_dictionary
from .metrics import evaluate
from .registry import build_model
from .settings import AnalyzeSettings, TrainSettings, WhitenSettings
from .training import TrainResult, train
from .whiten import Whitener, control_mask, group_labels


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


#: Tokens whose prepared (whitened) form fits in this many bytes are prepared once, in memory,
#: rather than batch by batch at every step: a store of a few thousand cells then trains
#: several times faster, since whitening a batch costs as much as an ICFL step at C x D wide.
PREPARE_IN_MEMORY_BYTES = 512 << 20


def prepare_all(tokens, whitener: Whitener | None, groups, block: int = 16384) -> np.ndarray:
    """All tokens (N, D) in the dictionary's space, float32, prepared in blocks of rows."""
    n = int(tokens.shape[0])
    width = whitener.n_components_ if whitener is not None else int(tokens.shape[1])
    out = np.empty((n, width), dtype=np.float32)
    for start in range(0, n, block):
        stop = min(start + block, n)
        x = np.asarray(tokens[start:stop], dtype=np.float32)
        if whitener is not None:
            x = whitener.transform(x, None if groups is None else groups[start:stop])
        out[start:stop] = x
    return out


def store_signature(store) -> str | dict:
    return getattr(store, "signature_hash", None) or getattr(store, "signature", None)


def _group_labels(table: pd.DataFrame, column: str) -> np.ndarray:
    return group_labels(table, column)


def fit_whitener(tokens, table: pd.DataFrame, settings: WhitenSettings) -> Whitener:
    """Fit whitening on the control tokens that ``settings.controls`` picks, per ``settings.by``.

    With ``by``, every group of the table must have controls of its own: a group without any is
    refused here, naming it, rather than failing on its first token later.
    """
    mask = control_mask(table, *settings.control)
    if len(mask) != tokens.shape[0]:
        raise DictionaryError(
            f"the token table has {len(mask)} rows but there are {tokens.shape[0]} tokens"
        )
    rows = np.flatnonzero(mask)
    groups = None
    if settings.by is not None:
        labels = group_labels(table, settings.by)
        groups = labels[rows]
        lacking = sorted(set(labels.tolist()) - set(groups.tolist()))
        if lacking:
            column, value = settings.control
            counts = pd.Series(labels).value_counts()
            named = ", ".join(f"{g!r} ({counts[g]} tokens)" for g in lacking[:10])
            more = f" and {len(lacking) - 10} more" if len(lacking) > 10 else ""
            raise DictionaryError(
                f"whitening per {settings.by} needs controls ({column} == {value!r}) in every "
                f"group, but {settings.by} {named}{more} has none; whiten per another column, "
                f"add controls there, or train without --whiten-by"
            )
    within = None
    if settings.within is not None:
        within = group_labels(table, settings.within)[rows]
    w = Whitener(
        mode=settings.mode,
        eps=settings.eps,
        n_components=settings.n_components,
        group_by=settings.by,
        shrinkage=settings.shrinkage_value,
        within=settings.within,
    )
    return w.fit(take_rows(tokens, rows), groups, within)


def token_form(store, form: str | None = None) -> str:
    """The token form to use: ``form``, else "concat" where the store keeps channel tokens."""
    if form is not None:
        return form
    return "concat" if getattr(store, "has_channel_tokens", False) else "mean"


@dataclass
class TrainedDictionary:
    """A trained dictionary, how training went, its metrics and where it was written.

    ``cancelled`` is True when ``cancel`` stopped the training or the evaluation after it; the
    dictionary is then the one after the last complete step and ``metrics`` is empty.
    """

    dictionary: Dictionary
    result: TrainResult
    metrics: dict
    path: Path | None
    cancelled: bool = False


def train_on_store(
    store,
    settings: TrainSettings,
    *,
    out: str | Path | None = None,
    progress: ProgressCallback = None,
    cancel: Cancel = None,
) -> TrainedDictionary:
    """Whiten on controls, train on ``settings.unit`` tokens, evaluate, and save to ``out``.

    Tokens whose whitened form fits in ``PREPARE_IN_MEMORY_BYTES`` are whitened once and
    shuffled in memory; larger stores stream from disk and are whitened batch by batch.
    Progress comes as stages ``"whiten"``, ``"train"`` (with loss, FVU, dead fraction and
    samples) and ``"evaluate"``. Checkpoints go to ``out`` every ``settings.checkpoint_every``
    steps. The file's metadata records the unit, model, block, width, channels, store
    signature, whitening, the settings themselves and the metrics.
    """
    unit = settings.unit
    form = token_form(store, settings.tokens)
    settings = settings.replace(tokens=form)
    tokens = store.tokens(unit, form)
    table = store.table(unit)
    if tokens.shape[0] == 0:
        raise DictionaryError(f"the store has no {unit} tokens to train on")
    whitener = groups = None
    if settings.whiten is not None:
        report(progress, "whiten", 0, 1)
        whitener = fit_whitener(tokens, table, settings.whiten)
        report(progress, "whiten", 1, 1)
        if settings.whiten.by is not None:
            groups = group_labels(table, settings.whiten.by)
    d_in = whitener.n_components_ if whitener is not None else tokens.shape[1]
    model = build_model(settings.method, d_in, settings.method_config(), seed=settings.seed)
    groups_per_token = int(getattr(store, "token_groups", 1)) if form == "concat" else 1
    meta = {
        "unit": unit,
        "tokens": form,
        "token_groups": groups_per_token,
        "model_id": store.model_id,
        "model_source": getattr(store, "model_source", None),
        "block": int(store.block),
        "embed_dim": int(store.embed_dim),
        "channel_names": list(store.channel_names),
        "signature": store_signature(store),
        "whitening": (
            settings.whiten.describe_meta()
            if settings.whiten is not None
            else {"controls": None, "by": None, "mode": None}
        ),
        "train_settings": settings.to_dict(),
        "n_tokens": int(tokens.shape[0]),
        "seed": settings.seed,
        "batch_size": settings.batch_size,
    }

    def checkpoint(m, step: int) -> None:
        save_dictionary(out, m, whitener, {**meta, "steps": step, "checkpoint": True})

    data, train_whitener, train_groups = tokens, whitener, groups
    if tokens.shape[0] * d_in * 4 <= PREPARE_IN_MEMORY_BYTES:
        data, train_whitener, train_groups = prepare_all(tokens, whitener, groups), None, None
    result = train(
        model,
        data,
        steps=settings.steps,
        batch_size=settings.batch_size,
        seed=settings.seed,
        whitener=train_whitener,
        groups=train_groups,
        progress=progress,
        cancel=cancel,
        on_checkpoint=None if out is None else checkpoint,
        checkpoint_every=settings.checkpoint_every,
    )
    cancelled = result.cancelled
    metrics: dict = {}
    if not cancelled:
        n = tokens.shape[0]
        if n > settings.eval_max:
            rng = np.random.default_rng(settings.seed)
            rows = np.sort(rng.choice(n, settings.eval_max, replace=False))
            ev_tokens = take_rows(tokens, rows)
            ev_groups = None if groups is None else groups[rows]
        else:
            ev_tokens, ev_groups = tokens, groups
        try:
            metrics = evaluate(
                model,
                ev_tokens,
                whitener=whitener,
                groups=ev_groups,
                progress=progress,
                cancel=cancel,
            )
        except Cancelled:
            cancelled = True
    meta.update(
        steps=result.steps_done,
        samples=result.samples,
        cancelled=cancelled,
        diverged=result.diverged,
        metrics=metrics,
    )
    dictionary = Dictionary(model, whitener, meta)
    path = save_dictionary(out, dictionary) if out is not None else None
    return TrainedDictionary(dictionary, result, metrics, path, cancelled)


def encode_store(
    store,
    dictionary: Dictionary,
    unit: str | None = None,
    *,
    batch_size: int = 4096,
    progress: ProgressCallback = None,
    cancel: Cancel = None,
) -> tuple[sp.csr_matrix, pd.DataFrame]:
    """Codes (N, M) CSR of all ``unit`` tokens of ``store`` (default: the dictionary's unit),
    with the token table. Refuses a store of another model, block or width."""
    unit = unit or dictionary.meta.get("unit") or "cell"
    dictionary.check_compatible_store(store)
    tokens = store.tokens(unit, dictionary.token_form)
    table = store.table(unit)
    codes = dictionary.encode_table(
        tokens, table, batch_size=batch_size, progress=progress, cancel=cancel
    )
    return codes, table


@dataclass
class Analysis:
    """Codes, the token table they index (with the truth joined) and the files written."""

    codes: sp.csr_matrix
    table: pd.DataFrame
    paths: dict[str, Path]


def encode_for_analysis(
    store,
    dictionary: Dictionary,
    settings: AnalyzeSettings,
    *,
    progress: ProgressCallback = None,
    cancel: Cancel = None,
) -> tuple[sp.csr_matrix, pd.DataFrame]:
    """:func:`encode_store` with ``settings.truth_file`` joined onto the token table."""
    codes, table = encode_store(store, dictionary, settings.unit, progress=progress, cancel=cancel)
    if settings.truth_file is not None:
        table = join_truth(table, read_truth(settings.truth_file))
    return codes, table


def analyze_store(
    store,
    dictionary: Dictionary,
    settings: AnalyzeSettings,
    out: str | Path,
    *,
    progress: ProgressCallback = None,
    cancel: Cancel = None,
) -> Analysis:
    """Encode ``store`` and write the feature, selectivity, concept and code tables to ``out``.

    Label and truth columns are checked against the token table before anything is written.
    """
    codes, table = encode_for_analysis(
        store, dictionary, settings, progress=progress, cancel=cancel
    )
    require_columns(table, settings.labels, "selectivity (labels)")
    require_columns(table, settings.truth, "ground truth (truth)")
    paths = write_analysis(
        out,
        codes,
        table,
        settings.labels,
        meta=dictionary.meta,
        truth_columns=settings.truth,
        top_n=settings.top_n,
        stains=dictionary.stain_table(),
    )
    return Analysis(codes, table, paths)
