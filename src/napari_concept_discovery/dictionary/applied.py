"""A dictionary as it is applied: whitening + coder + provenance, and the one batch-encode loop.

Raw activations reach a dictionary's codes in one way only, :func:`encode_batches`: a batch of
raw tokens, whitened (per group when the whitening was fitted per group), as a float32 tensor,
encoded. Training batches, the metrics after training, ``analyze`` and the explore API all go
through it, so they cannot disagree about what a token's code is (docs/architecture.md, "Dictionaries").
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from ..errors import DictionaryError
from ..progress import Cancel, Cancelled, ProgressCallback, is_cancelled, report
from .base import Codes, SparseDictionary, codes_to_csr
from .meta import DictionaryMeta
from .stains import channel_shares, stain_table
from .whiten import Whitener, group_labels


def prepare(tokens, groups=None, whitener: Whitener | None = None) -> torch.Tensor:
    """Raw tokens (B, D) as the dictionary's float32 input: whitened when there is a whitener."""
    x = np.asarray(tokens, dtype=np.float32)
    if whitener is not None:
        x = whitener.transform(x, groups)
    return torch.from_numpy(np.ascontiguousarray(x))


def _as_rows(tokens):
    """Anything with a 2-D ``shape`` and row slicing (numpy, zarr) as is; other input as numpy."""
    return tokens if hasattr(tokens, "shape") else np.asarray(tokens, dtype=np.float32)


def encode_batches(
    model: SparseDictionary,
    tokens,
    *,
    whitener: Whitener | None = None,
    groups=None,
    batch_size: int = 4096,
    progress: ProgressCallback = None,
    cancel: Cancel = None,
    stage: str = "encode",
) -> Iterator[tuple[int, int, torch.Tensor, Codes]]:
    """``(start, stop, x, codes)`` per batch of rows of ``tokens`` (N, D), in order.

    ``x`` is the batch in the dictionary's space (what ``codes`` reconstruct). ``groups`` (N,)
    gives each token's whitening group. Raises :class:`~napari_concept_discovery.progress.
    Cancelled` between batches once ``cancel`` is set; progress is reported as ``stage`` rows.
    """
    tokens = _as_rows(tokens)
    n = int(tokens.shape[0])
    g = None if groups is None else np.asarray(groups).astype(str)
    if g is not None and len(g) != n:
        raise DictionaryError(f"got {len(g)} whitening group labels for {n} tokens")
    if batch_size < 1:
        raise DictionaryError(f"batch size must be at least 1, got {batch_size}")
    was_training = model.training
    model.eval()
    try:
        report(progress, stage, 0, n)
        for start in range(0, n, batch_size):
            if is_cancelled(cancel):
                raise Cancelled(f"{stage} cancelled after {start} of {n} tokens")
            stop = min(start + batch_size, n)
            x = prepare(tokens[start:stop], None if g is None else g[start:stop], whitener)
            with torch.no_grad():
                codes = model.encode(x)
            yield start, stop, x, codes
            report(progress, stage, stop, n)
    finally:
        model.train(was_training)


def _source(model_id=None, block=None, width=None, unit=None) -> str:
    """``model 'x' block 7 (width 384, unit 'cell')``, leaving out what is not known."""
    head = [] if model_id is None else [f"model {model_id!r}"]
    if block is not None:
        head.append(f"block {block!r}")
    tail = [] if width is None else [f"width {width}"]
    if unit is not None:
        tail.append(f"unit {unit!r}")
    return (" ".join(head) or "activations") + (f" ({', '.join(tail)})" if tail else "")


@dataclass
class Dictionary:
    """A trained dictionary ready to apply: the coder, its whitening and its metadata.

    ``meta`` records what the dictionary was trained on (unit, model id and source, block,
    embedding width, channels, store signature, training settings, metrics), so that it refuses
    activations of another model, block or width. A dict given as ``meta`` is read as the JSON
    form of a :class:`.DictionaryMeta`.
    """

    model: SparseDictionary
    whitener: Whitener | None = None
    meta: DictionaryMeta = field(default_factory=DictionaryMeta)
    #: The file it was read from (None for one in memory), named in refusals.
    path: Path | None = None

    def __post_init__(self) -> None:
        self.meta = DictionaryMeta.of(self.meta)

    @property
    def n_atoms(self) -> int:
        return self.model.n_atoms

    @property
    def levels(self) -> list[int] | None:
        """Nested prefix sizes (:mod:`.nested`), or None for a plain dictionary."""
        return getattr(self.model.config, "levels", None)

    def feature_levels(self) -> np.ndarray:
        """(M,) each feature's level: the size of the smallest prefix holding it."""
        from .nested import feature_levels

        return feature_levels(self.levels, self.n_atoms)

    @property
    def view_names(self) -> tuple[str, ...]:
        """The views of a dictionary in parts (:mod:`.combined`); () for one of one view."""
        return ()

    def feature_views(self) -> np.ndarray | None:
        """(M,) the view that found each feature (a dictionary in parts), else None."""
        return None

    @property
    def input_width(self) -> int:
        """Width of the raw activations this dictionary takes (before whitening)."""
        return self.whitener.n_features_in_ if self.whitener is not None else self.model.d_in

    @property
    def group_by(self) -> str | None:
        """The token-table column whose value picks each token's whitening, or None."""
        return None if self.whitener is None else self.whitener.group_by

    @property
    def unit(self) -> str:
        """The token unit it was trained on (cell, patch or crop)."""
        return self.meta.unit or "cell"

    @property
    def token_form(self) -> str:
        """The token form it was trained on: "concat" (channel tokens side by side) or "mean"."""
        return self.meta.tokens

    @property
    def token_groups(self) -> int:
        """Channel blocks side by side in its input (G = C for "concat", 1 for "mean")."""
        return self.meta.token_groups if self.token_form == "concat" else 1

    @property
    def stain_names(self) -> list[str]:
        """Names of its input's channel blocks (the store's channel names), in order."""
        names = list(self.meta.channel_names)
        if len(names) != self.token_groups:
            names = [f"channel{g}" for g in range(self.token_groups)]
        return names

    def describe(self) -> str:
        m = self.meta
        text = _source(m.model_id, m.block, self.input_width, m.unit)
        if self.token_form == "concat":
            text += f", {self.token_groups} channel tokens side by side"
        return text

    def stain_attribution(self) -> np.ndarray | None:
        """Each atom's share of norm in each channel block, (M, C); None for "mean" tokens.

        With concatenated channel tokens an atom is C blocks, one per stain, and its share of
        norm per block says which stains drive the feature. Whitening mixes the channels (its
        components span all blocks), so the blocks are read in raw token space, through the
        whitening T: an atom ``a`` (unit norm in the whitened space) makes the raw change
        ``r = T^+ a`` (:meth:`.Whitener.inverse_directions`) and its score responds to a raw
        change along ``s = T^T a``. Its unit norm splits exactly over the blocks,
        ``1 = a.a = sum_g r_g . s_g``, and ``r_g . s_g`` is channel g's share: the part of the
        atom's norm, measured against the controls' variation, that channel g carries. Negative
        terms (a channel whose part cancels another's) are clipped to 0 and the rest
        renormalised. Without whitening, or with centring only, T = I and this is the plain
        share of squared norm per block.

        Why not the raw norm ``|r_g|^2`` alone: it weighs a change by its raw size, so the small
        errors every learned atom has along the directions where controls vary most (which
        whitening damps) come back multiplied by the square root of their variance and smear
        each feature over every stain; measured on planted one-stain shifts, the raw norm put the
        best feature of a DNA-only shift on Mito (tests/dictionary/test_stains.py). With per-group whitening
        the shares are averaged over the groups, weighted by their controls. Rows sum to 1
        (docs/architecture.md, "Dictionaries").
        """
        if self.token_form != "concat":
            return None
        atoms = self.model.atoms.detach().cpu().numpy().astype(np.float64)
        g = self.token_groups
        if self.whitener is None or self.whitener.transform_ is None:
            return channel_shares(atoms, g)
        w = self.whitener
        raw = w.inverse_directions(atoms)  # (G_w, M, D): r = T^+ a
        m, width = raw.shape[1:]
        weights = np.asarray(w.n_samples_, dtype=np.float64)
        weights = weights / weights.sum()
        total = np.zeros((m, g))
        for k in range(len(w.groups_)):
            score = atoms @ w.transform_[k]  # s = T^T a
            part = (raw[k] * score).reshape(m, g, width // g).sum(2)
            part = np.clip(part, 0.0, None)
            norm = part.sum(1, keepdims=True)
            part = np.divide(part, norm, out=np.full_like(part, 1.0 / g), where=norm > 0)
            total += weights[k] * part
        return total

    def stain_table(self) -> pd.DataFrame | None:
        """``stain_<name>`` shares per feature and its ``top_stain`` (None for "mean")."""
        shares = self.stain_attribution()
        return None if shares is None else stain_table(shares, self.stain_names)

    def check_compatible(self, *, model_id=None, block=None, width: int | None = None) -> None:
        """Refuse activations of another model, block or width, naming both sides."""
        m = self.meta
        mismatch = []
        if model_id is not None and m.model_id is not None and model_id != m.model_id:
            mismatch.append("model")
        if block is not None and m.block is not None and int(block) != m.block:
            mismatch.append("block")
        if width is not None and int(width) != self.input_width:
            mismatch.append("width")
        if mismatch:
            hint = ""
            if mismatch == ["width"] and self.token_form == "concat":
                hint = (
                    f"; it reads the {self.token_groups} channel tokens side by side: "
                    "store.tokens(unit, form='concat')"
                )
            raise DictionaryError(
                f"this dictionary was trained on activations of {self.describe()}, but these "
                f"come from {_source(model_id, block, width)}; {' and '.join(mismatch)} differ"
                + hint
            )

    def check_compatible_store(self, store) -> None:
        """Refuse a store embedded with another model, block, width, channel order or model
        weights, or one that lacks the token form this dictionary reads.

        Two models may share a name (a card's) and not their weights, so the weights hashes
        are compared too when both sides record one; the refusal names both files.
        """
        if self.meta.diverged:
            name = self.path or "this dictionary"
            at = self.meta.diverged_at
            raise DictionaryError(
                f"{name} is the state of a training that diverged"
                + (f" (at step {at})" if at else "")
                + ": its features are not a result; train again with a smaller --lr (lr=)"
            )
        form = self.token_form
        where = getattr(store, "path", "this store")
        if form == "concat" and not getattr(store, "has_channel_tokens", False):
            raise DictionaryError(
                f"this dictionary was trained on concatenated per-channel tokens ({self.describe()}"
                f"), but the activation store at {where} keeps only their mean; embed the plate "
                f"again with --channel-tokens, or use a dictionary trained with --tokens mean"
            )
        groups = int(getattr(store, "token_groups", 1)) if form == "concat" else 1
        self.check_compatible(
            model_id=store.model_id, block=store.block, width=store.embed_dim * groups
        )
        mine_names = list(self.meta.channel_names)
        their_names = list(getattr(store, "channel_names", ()) or [])
        if form == "concat" and mine_names and their_names and mine_names != their_names:
            raise DictionaryError(
                f"this dictionary's channel blocks are {mine_names}, but the store at {where} has "
                f"channels {their_names}; concatenated tokens must come in the same channel order"
            )
        mine = self.meta.weights_hash
        theirs = getattr(store, "weights_hash", None)
        if mine and theirs and str(mine) != str(theirs):
            where = f"the dictionary {self.path}" if self.path is not None else "this dictionary"
            raise DictionaryError(
                f"{where} was trained on tokens of model {self.meta.model_id!r} with "
                f"weights {str(mine)[:12]} ({self.meta.model_source or 'source unknown'}), "
                f"but the store at {getattr(store, 'path', '?')} was embedded by "
                f"{store.model_id!r} with weights {str(theirs)[:12]} "
                f"({getattr(store, 'model_source', '') or 'source unknown'}); the same model "
                "name with other weights gives other tokens: model weights differ"
            )

    def groups_of(self, table) -> np.ndarray | None:
        """Each token's whitening group from ``table`` (one row per token), or None."""
        column = self.group_by
        if column is None:
            return None
        try:
            return group_labels(table, column)
        except DictionaryError:
            raise DictionaryError(
                f"this dictionary whitens per {column!r}, but the token table has no such "
                f"column; columns are {list(table.columns)}"
            ) from None

    def encode(
        self,
        tokens,
        groups=None,
        *,
        batch_size: int = 8192,
        progress: ProgressCallback = None,
        cancel: Cancel = None,
    ) -> sp.csr_matrix:
        """Codes (N, M) as CSR of raw tokens (N, D), in batches; a feature is active when non-zero.

        ``groups`` (N,) is each token's whitening group when the whitening was fitted per group.
        Raises :class:`~napari_concept_discovery.progress.Cancelled` once ``cancel`` is set.
        """
        tokens = _as_rows(tokens)
        if len(tokens.shape) != 2:
            raise DictionaryError(
                f"this dictionary takes (N, {self.input_width}) activations; got shape "
                f"{tuple(tokens.shape)}"
            )
        self.check_compatible(width=tokens.shape[1])
        parts = [
            codes_to_csr(codes, self.n_atoms)
            for *_, codes in encode_batches(
                self.model,
                tokens,
                whitener=self.whitener,
                groups=groups,
                batch_size=batch_size,
                progress=progress,
                cancel=cancel,
            )
        ]
        if not parts:
            return sp.csr_matrix((0, self.n_atoms), dtype=np.float32)
        return sp.vstack(parts, format="csr")

    def encode_table(self, tokens, table, **kwargs) -> sp.csr_matrix:
        """:meth:`encode` with the whitening groups taken from ``table`` (one row per token)."""
        if len(table) != tokens.shape[0]:
            raise DictionaryError(
                f"the token table has {len(table)} rows but there are {tokens.shape[0]} tokens"
            )
        return self.encode(tokens, self.groups_of(table), **kwargs)


DictionaryFile = Dictionary  # the name it had when it was only what load_dictionary returned
