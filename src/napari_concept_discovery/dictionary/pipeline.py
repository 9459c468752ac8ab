"""Train, apply and analyse dictionaries on an activation store: the one path every front calls.

A store is anything with the read API of :class:`napari_concept_discovery.embed.store.ActivationStore`
(``tokens(unit, form)``, ``table(unit)``, ``model_id``, ``block``, ``embed_dim``,
``token_groups``, ``channel_names``, ``signature``). A dictionary is trained on one token form
(``TrainSettings.tokens``, recorded as ``DictionaryMeta.tokens``): the per-channel tokens side by side
("concat", the default where the store keeps them) or their mean, and it reads that form
wherever it is applied. Tokens stay on disk (zarr) and stream through training and evaluation; only the
control tokens used to fit the whitening and the per-token table are held in memory. The CLI,
the demo and the widgets pass settings objects (:mod:`.settings`) and get the same results.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd

from .._files import check_output
from .._lock import write_lock
from ..errors import DictionaryError, OutputError
from ..progress import Cancel, Cancelled, ProgressCallback, report
from .applied import Dictionary
from .io import (
    checkpoint_path,
    is_dictionary_file,
    load_checkpoint,
    save_checkpoint,
    save_dictionary,
)
from .meta import DictionaryMeta
from .metrics import evaluate
from .overfit import control_norm_ratio
from .registry import build_model
from .rows import RowSubset, nonfinite_rows, take_rows, where_rows
from .settings import TrainSettings, WhitenSettings
from .training import TrainResult, TrainState, check_training_memory, train
from .whiten import Whitener, control_mask, group_labels
from .within import resolved_whitening, without_hints


def finite_tokens(tokens, table: pd.DataFrame, unit: str, drop: bool, where: str):
    """(tokens, table, dropped) with the non-finite tokens refused, or dropped and counted."""
    bad = nonfinite_rows(tokens)
    n_bad = int(bad.sum())
    if not n_bad:
        return tokens, table, 0
    text = (
        f"{n_bad} of {len(bad)} {unit} tokens of {where} hold NaN or Inf, {where_rows(table, bad)}"
    )
    if not drop:
        raise DictionaryError(
            f"{text}. Whitening and training on them would give NaN; embed again with sound "
            "weights, or leave them out with --drop-nonfinite (drop_nonfinite=True; the count "
            "is recorded in the dictionary)"
        )
    if n_bad == len(bad):
        raise DictionaryError(f"{text}: no finite token is left to train on")
    keep = np.flatnonzero(~bad)
    return RowSubset(tokens, keep), table.iloc[keep].reset_index(drop=True), n_bad


def check_dictionary_out(out: str | Path, overwrite: bool = False) -> Path:
    """Refuse, before training, an output path that cannot be written, or that holds a file
    that is not a dictionary (unless ``overwrite``): training must not cost the user a file."""
    from ..embed.store import refuse_inside_store

    out = check_output(out, folder=False, what="dictionary file")
    refuse_inside_store(out, "dictionary file", OutputError)
    if out.exists() and not overwrite and not is_dictionary_file(out):
        raise OutputError(
            f"{out} exists and is not a dictionary file; choose another --out, or pass "
            "--overwrite (overwrite=True) to replace it"
        )
    return out


def store_signature(store) -> str | dict:
    return getattr(store, "signature_hash", None) or getattr(store, "signature", None)


def fit_whitener(tokens, table: pd.DataFrame, settings: WhitenSettings) -> Whitener:
    """Fit whitening on the control tokens that ``settings.controls`` picks, per ``settings.by``,
    with the covariance within ``settings.within`` (``"auto"`` resolved on ``table``).

    With ``by``, every group of the table must have controls of its own: a group without any is
    refused here, naming it, rather than failing on its first token later.
    """
    settings = resolved_whitening(settings, table)[0]
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
    w = settings.whitener()
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
    #: The checkpoint to resume from (``train_on_store(..., resume=True)``) when the training
    #: was cancelled; the output path is written only for a finished dictionary.
    checkpoint: Path | None = None


#: Settings a resumed training may change: they do not change the dictionary's path to a step.
#: ``views`` names the part a checkpoint belongs to, which its whitening (compared) already
#: fixes; a checkpoint written before views reads it as the default.
RESUMABLE_CHANGES = ("steps", "checkpoint_every", "eval_max", "keep_diverged", "views")


def _resume_state(store, settings: TrainSettings, ckpt: Path):
    """(dictionary, TrainState, meta) from a checkpoint that this store and these settings
    continue; anything else is refused, naming what differs."""
    if not ckpt.is_file():
        raise DictionaryError(
            f"no checkpoint at {ckpt} to resume from; train without --resume to start afresh"
        )
    dictionary, tensors, state_meta = load_checkpoint(ckpt)
    meta = dictionary.meta
    recorded = meta.train.to_dict() if meta.train is not None else {}
    wanted = settings.to_dict()
    differ = sorted(
        k
        for k in set(recorded) | set(wanted)
        if k not in RESUMABLE_CHANGES and recorded.get(k) != wanted.get(k)
    )
    if differ:
        raise DictionaryError(
            f"the checkpoint {ckpt} was trained with other settings ({', '.join(differ)} "
            "differ); resume with the settings it was started with, or train afresh"
        )
    if meta.signature != store_signature(store):
        raise DictionaryError(
            f"the checkpoint {ckpt} was trained on another store (or one embedded again) "
            f"than {getattr(store, 'path', 'this store')}; train afresh"
        )
    state = TrainState.from_tensors(tensors, state_meta)
    if state.step > settings.steps:
        raise DictionaryError(
            f"the checkpoint {ckpt} is at step {state.step}, past --steps {settings.steps}"
        )
    return dictionary, state, meta


def train_on_store(
    store,
    settings: TrainSettings,
    *,
    out: str | Path | None = None,
    progress: ProgressCallback = None,
    cancel: Cancel = None,
    overwrite: bool = False,
    resume: bool = False,
) -> TrainedDictionary:
    """Whiten on controls, train on ``settings.unit`` tokens, evaluate, and save to ``out``.

    Tokens whose whitened form fits in memory are whitened once (``training.whiten_once``);
    larger stores stream from disk and are whitened batch by batch.
    Progress comes as stages ``"whiten"``, ``"train"`` (with loss, FVU, dead fraction and
    samples) and ``"evaluate"``. ``out`` is checked before any work: an existing file that is
    not a dictionary is refused unless ``overwrite``. Checkpoints (with the optimiser state)
    go beside it, to ``io.checkpoint_path(out)``, every ``settings.checkpoint_every`` steps and
    when the training stops; ``out`` itself is written only once the dictionary is finished
    (trained and evaluated), and the checkpoint is then removed. ``resume`` goes on from that
    checkpoint and reaches the dictionary an uninterrupted run would have. Tokens holding NaN
    or Inf are refused, or left out and counted with ``settings.drop_nonfinite``. The file's
    metadata records the unit, model (id, source, weights hash), block, width, channels, store
    signature, whitening, the settings themselves and the metrics.
    """
    if out is not None:
        out = check_dictionary_out(out, overwrite)
    elif resume:
        raise DictionaryError("resume needs the output path whose checkpoint to go on from")
    parts = settings.view_settings()
    if len(parts) > 1:
        parts = distinct_views(parts, store.table(settings.unit))
    if len(parts) == 1:  # one view: a plain dictionary of that whitening
        settings = parts[0][1]
    train_views = partial(_train_views, views=parts) if len(parts) > 1 else _train_on_store
    if out is None:
        return train_views(store, settings, None, progress, cancel, resume)
    # the lock embed takes on its store: a second training to the same file is refused
    with write_lock(out, what="dictionary file", error=OutputError):
        return train_views(store, settings, out, progress, cancel, resume)


def distinct_views(
    parts: list[tuple[str, TrainSettings]], table: pd.DataFrame
) -> list[tuple[str, TrainSettings]]:
    """``parts`` less those whose whitening, resolved on ``table``, is an earlier part's: the
    ``within-type`` view is the pooled whitening where the controls hold one cell type or the
    table names none, and a second part of it would only train the same dictionary twice."""
    kept, seen = [], []
    for view, part in parts:
        resolved = resolved_whitening(part.whiten, table)[0]
        if resolved not in seen:
            seen.append(resolved)
            kept.append((view, part))
    return kept


def view_checkpoint_path(out: str | Path, view: str) -> Path:
    """Where the checkpoints of one view's part of a training into ``out`` go:
    ``<stem>.<view>.ckpt.safetensors`` beside it."""
    out = Path(out)
    stem = out.name[: -len(".safetensors")] if out.name.endswith(".safetensors") else out.name
    return checkpoint_path(out.with_name(f"{stem}.{view}.safetensors"))


def _combined_metrics(parts: list[tuple[str, dict]]) -> dict:
    """The whole's metrics: atoms, dead features and non-zeros per token summed over the parts,
    FVU and cosine their mean (each in its own view's space), and each part's under ``views``."""
    if any(not m for _, m in parts):
        return {}
    out: dict = {}
    for key in ("n_atoms", "n_dead", "l0"):
        if all(key in m for _, m in parts):
            out[key] = sum(m[key] for _, m in parts)
    for key in ("fvu", "mean_cosine"):
        if all(key in m for _, m in parts):
            out[key] = float(np.mean([m[key] for _, m in parts]))
    ratios = [(m["whitened_norm_ratio"], m) for _, m in parts if "whitened_norm_ratio" in m]
    if ratios:  # the whitened part's check (:mod:`.overfit`), the worst where several
        ratio, m = max(ratios, key=lambda r: r[0])  # recorded only where finite
        out["whitened_norm_ratio"] = ratio
        out["whitening_controls"] = m["whitening_controls"]
        out["whitening_dims"] = m["whitening_dims"]
    if "n_dead" in out and out.get("n_atoms"):
        out["dead_fraction"] = out["n_dead"] / out["n_atoms"]
    out["views"] = {name: dict(m) for name, m in parts}
    return out


def _steps_on(progress: ProgressCallback, part: int, parts: int) -> ProgressCallback:
    """``progress`` with the training steps of part ``part`` of ``parts`` counted on from the
    parts before it, so that one bar and one curve cover the whole training."""
    if progress is None:
        return None

    def forward(p) -> None:
        if p.stage == "train":
            p = p._replace(done=p.done + part * p.total, total=p.total * parts)
        progress(p)

    return forward


def _train_views(store, settings, out, progress, cancel, resume, views) -> TrainedDictionary:
    """One part per view (``views``: :meth:`.TrainSettings.view_settings`, distinct on the
    table), trained one after the other with the same seed, each as it would be alone, then
    written as one file."""
    from .combined import CombinedDictionary

    ckpts = {v: view_checkpoint_path(out, v) if out is not None else None for v, _ in views}
    if resume and not any(c.is_file() for c in ckpts.values()):
        raise DictionaryError(
            f"no checkpoint at {', '.join(map(str, ckpts.values()))} to resume from; train "
            "without --resume to start afresh"
        )
    done: list[tuple[str, TrainedDictionary]] = []
    for i, (view, part_settings) in enumerate(views):
        part_resume = resume and ckpts[view].is_file()
        trained = _train_on_store(
            store,
            part_settings,
            None,
            _steps_on(progress, i, len(views)),
            cancel,
            part_resume,
            ckpt=ckpts[view],
        )
        done.append((view, trained))
        if trained.cancelled:
            break
    first = done[0][1]
    cancelled = any(t.cancelled for _, t in done) or len(done) < len(views)
    parts = [(view, t.dictionary) for view, t in done]
    metrics = _combined_metrics([(view, t.metrics) for view, t in done])
    part_meta = first.dictionary.meta
    # the whitening as the part with the user's mode resolved it (the centred part has none)
    wmeta = next(
        (
            m
            for m in (t.dictionary.meta for _, t in done)
            if m.whitening.mode == settings.whiten.mode
        ),
        part_meta,
    )
    meta = part_meta.replace(
        train=settings.replace(
            tokens=part_meta.train.tokens,
            atoms=part_meta.train.atoms,
            steps=part_meta.train.steps,
            whiten=settings.whiten.replace(within=wmeta.whitening.within),
        ),
        within_chosen=_within_words(done, wmeta),
        views=tuple(v for v, _ in done),
        cancelled=cancelled,
        metrics=metrics,
    )
    seconds = sum(t.result.seconds for _, t in done)
    result = replace(done[-1][1].result, seconds=seconds)
    if len(parts) < 2:
        kept = ckpts[views[0][0]] if out is not None else None
        return TrainedDictionary(first.dictionary, result, {}, None, True, kept)
    dictionary = CombinedDictionary.of(parts, meta)
    path = None
    if out is not None and not cancelled:
        path = save_dictionary(out, dictionary)
        dictionary.path = path
        for ckpt in ckpts.values():
            ckpt.unlink(missing_ok=True)
    kept = next((c for c in ckpts.values() if c is not None and c.is_file()), None)
    return TrainedDictionary(dictionary, result, metrics, path, cancelled, kept)


def _within_words(done: list[tuple[str, TrainedDictionary]], wmeta: DictionaryMeta) -> str:
    """How the whitening estimated its covariance, with the within-type view's beside it."""
    typed = next((t.dictionary.meta for v, t in done if v == "within-type"), None)
    if typed is None or typed is wmeta:
        return wmeta.within_chosen
    pooled, own = without_hints(wmeta.within_chosen), without_hints(typed.within_chosen)
    return f"{pooled}; within-type view: {own}"


def _train_on_store(
    store, settings, out, progress, cancel, resume, ckpt: Path | None = None
) -> TrainedDictionary:
    """Train one dictionary; checkpoints go to ``ckpt`` (default: beside ``out``), the
    dictionary itself to ``out`` once finished."""
    unit = settings.unit
    if out is not None:
        ckpt = checkpoint_path(out)
    form = token_form(store, settings.tokens)
    settings = settings.replace(tokens=form)
    tokens = store.tokens(unit, form)
    table = store.table(unit)
    if tokens.shape[0] == 0:
        raise DictionaryError(f"the store has no {unit} tokens to train on")
    if len(table) != tokens.shape[0]:
        raise DictionaryError(
            f"the token table has {len(table)} rows but there are {tokens.shape[0]} tokens"
        )
    where = f"the store at {getattr(store, 'path', '?')}"
    tokens, table, dropped = finite_tokens(tokens, table, unit, settings.drop_nonfinite, where)
    within_why = None
    if settings.whiten is not None:  # "auto" resolved once, against this table, and recorded
        whiten, within_why = resolved_whitening(settings.whiten, table)
        settings = settings.replace(whiten=whiten)
    atoms = settings.atoms_for(tokens.shape[0])[0]
    steps, steps_why = settings.steps_for(tokens.shape[0])
    settings = settings.replace(atoms=atoms, steps=steps)
    state = whitener = None
    if resume:
        restored, state, meta = _resume_state(store, settings, ckpt)
        model, whitener = restored.model, restored.whitener
        meta = meta.replace(train=settings, checkpoint=False)
    groups = None
    if settings.whiten is not None:
        if not resume:
            report(progress, "whiten", 0, 1)
            whitener = fit_whitener(tokens, table, settings.whiten)
            report(progress, "whiten", 1, 1)
        if settings.whiten.by is not None:
            groups = group_labels(table, settings.whiten.by)
    d_in = whitener.n_components_ if whitener is not None else tokens.shape[1]
    if not resume:
        check_training_memory(
            settings.method,
            settings.atoms,
            d_in,
            settings.batch_size,
            settings.method_config().get("pursuit", "gram"),
        )
        model = build_model(settings.method, d_in, settings.method_config(), seed=settings.seed)
        groups_per_token = int(getattr(store, "token_groups", 1)) if form == "concat" else 1
        meta = DictionaryMeta(
            unit=unit,
            tokens=form,
            token_groups=groups_per_token,
            model_id=store.model_id,
            model_source=getattr(store, "model_source", None),
            weights_hash=getattr(store, "weights_hash", None),
            block=int(store.block),
            embed_dim=int(store.embed_dim),
            channel_names=tuple(store.channel_names),
            signature=store_signature(store),
            train=settings,
            n_tokens=int(tokens.shape[0]),
            nonfinite_dropped=dropped,
            within_chosen=within_why,
        )

    def checkpoint(m, step: int, st: TrainState) -> None:
        tensors, state_meta = st.tensors()
        save_checkpoint(ckpt, m, whitener, meta.replace(steps=step), tensors, state_meta)

    try:
        result = train(
            model,
            tokens,
            steps=settings.steps,
            batch_size=settings.batch_size,
            seed=settings.seed,
            whitener=whitener,
            groups=groups,
            progress=progress,
            cancel=cancel,
            on_checkpoint=None if ckpt is None else checkpoint,
            checkpoint_every=settings.checkpoint_every,
            resume=state,
        )
    except KeyboardInterrupt as exc:
        if ckpt is not None and ckpt.is_file():
            told = f"{exc}; " if str(exc) else ""
            raise KeyboardInterrupt(
                f"{told}checkpoint {ckpt} kept: train again with --resume (resume=True) to go on"
            ) from None
        raise
    if result.diverged:
        if ckpt is not None:  # the state before the blow-up would only blow up again
            ckpt.unlink(missing_ok=True)
        lr = getattr(getattr(model, "config", None), "lr", settings.lr)
        told = (
            f"training diverged: the loss was not finite at step {result.diverged_at} of "
            f"{settings.steps} (learning rate {lr})"
        )
        if out is not None and settings.keep_diverged:
            meta = meta.replace(
                steps=result.steps_done,
                samples=result.samples,
                cancelled=False,
                diverged=True,
                diverged_at=result.diverged_at,
                metrics={},
            )
            save_dictionary(out, Dictionary(model, whitener, meta))
            raise DictionaryError(
                f"{told}; its state after step {result.steps_done} is kept at {out}, marked as "
                "diverged (analyze and report refuse it); train again with a smaller --lr (lr=)"
            )
        raise DictionaryError(
            f"{told}; no dictionary was written"
            + (f" to {out}" if out is not None else "")
            + "; train again with a smaller --lr (lr=)"
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
    if not cancelled and whitener is not None and whitener.transform_ is not None:
        # PCA whitening (not centring alone): how far it overfits its controls (:mod:`.overfit`)
        fit = control_norm_ratio(whitener, tokens, table, settings.whiten, seed=settings.seed)
        if np.isfinite(fit["ratio"]):  # NaN: no cells besides the controls, or no controls
            metrics["whitened_norm_ratio"] = fit["ratio"]
            metrics["whitening_controls"] = fit["n_controls"]
            metrics["whitening_dims"] = fit["dims"]
    meta = meta.replace(
        steps=result.steps_done,
        steps_chosen=f"{steps} steps: {steps_why}",
        samples=result.samples,
        cancelled=cancelled,
        diverged=result.diverged,
        metrics=metrics,
    )
    dictionary = Dictionary(model, whitener, meta)
    path = None
    if out is not None and not cancelled:
        path = save_dictionary(out, dictionary)
        dictionary.path = path
        ckpt.unlink(missing_ok=True)
    kept = ckpt if ckpt is not None and ckpt.is_file() else None
    return TrainedDictionary(dictionary, result, metrics, path, cancelled, kept)
