"""Settings of the dictionary steps: whitening, training and analysis, checked where they are made.

The command line builds its ``train`` and ``analyze`` options from these dataclasses, the demo
constructs them, and the widgets build their forms from them, so defaults, help and the rules
between settings exist once (docs/architecture.md, "Conventions every step shares"). This
module imports neither torch nor the store, so that building the command line or a form stays
fast.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ..errors import DictionaryError
from ..settings import Settings, SettingsError, check, option
from .config import DEFAULT_ATOMS, ICFLConfig, TopKConfig
from .control import Control, check_control, parse_control
from .nested import NO_LEVELS, parse_levels
from .views import ALL_VIEWS, VIEW_MODES, VIEW_WORDS, parse_views, view_of_mode
from .whiten import MODES, Whitener, group_columns

METHOD_NAMES = ("icfl", "topk")  # the keys of registry.METHODS
UNITS = ("cell", "patch", "crop")  # the store's token units (store.UNITS)
TOKEN_FORMS = ("concat", "mean")  # the store's token forms (store.TOKEN_FORMS)
DEFAULT_TOPK_K = TopKConfig.k
DEFAULT_ICFL_L = ICFLConfig.n_pick
DEFAULT_ICFL_J = ICFLConfig.n_iter


@dataclass
class WhitenSettings(Settings):
    """Whitening fitted on control tokens before dictionary learning (see :class:`.Whitener`)."""

    controls: str | None = option(
        None,
        "control tokens to fit the whitening on, as COLUMN=VALUE (e.g. well_type=negative_control)",
        flag="--whiten",
        label="controls (COLUMN=VALUE)",
    )
    by: str | None = option(
        None,
        "fit the whitening on each group's own controls, grouped by this table column (any "
        "metadata column, e.g. plate or cell_type; several comma-separated, e.g. "
        "plate,cell_type); every group then needs controls",
        flag="--whiten-by",
        label="whiten per",
    )
    within: str | None = option(
        None,
        "estimate the controls' covariance within groups of this column, pooled, so that "
        "what differs between the groups is not taken for control variation and scaled down "
        "(centring still follows --whiten-by): a column name; auto: the cell-type column "
        "(cell_type, cell_line) where the controls hold more than one cell type, else pooled; "
        "none (the default): pooled, with the within-type view (--views) whitened within "
        "auto beside it. On issue 24's four benchmark settings auto alone found the cell "
        "types (best feature or family 0.84-0.99 AUROC against 0.68-0.85 pooled) but lost a "
        "perturbation on two and let one more null through on one "
        "(benchmarks/results/concept_recovery.txt); the choice and why are recorded in the "
        "dictionary",
        flag="--whiten-within",
        label="covariance within",
    )
    mode: str = option(
        "pca",
        "pca: PCA-whiten on the controls; center: only subtract the controls' mean",
        choices=MODES,
        flag="--whiten-mode",
        label="whitening",
    )
    n_components: int | None = option(
        None,
        "principal components kept (default: the numerical rank of the controls' covariance)",
        flag="--components",
        label="components",
    )
    eps: float = option(
        1e-6, "added to each eigenvalue before dividing by its square root", flag="--whiten-eps"
    )
    shrinkage: str = option(
        "auto",
        "shrink the controls' covariance towards a multiple of the identity before whitening: "
        "auto (Ledoit-Wolf), a number in [0, 1], or none; needed when controls are fewer than "
        "dimensions",
        flag="--whiten-shrinkage",
        label="shrinkage",
    )

    def validate(self) -> None:
        check(
            self.controls is not None,
            "controls",
            "choose the control tokens to fit the whitening on as COLUMN=VALUE "
            "(command line: --whiten COLUMN=VALUE, e.g. --whiten well_type=negative_control), "
            "or train without whitening (--no-whiten)",
        )
        check_control(self.controls)
        check(
            self.n_components is None or self.n_components >= 1,
            "n_components",
            f"must be at least 1, got {self.n_components}",
        )
        check(self.eps >= 0, "eps", f"must not be negative, got {self.eps}")
        check(
            self.by is None or bool(group_columns(self.by)),
            "by",
            f"name a table column to whiten by, got {self.by!r}",
        )
        if self.within is not None:
            self.within = str(self.within).strip()
            if self.within.lower() in ("auto", "none"):
                self.within = None if self.within.lower() == "none" else "auto"
        check(
            self.within is None or bool(group_columns(self.within)),
            "within",
            f"name a table column to estimate the covariance within, auto or none, got "
            f"{self.within!r}",
        )
        self.shrinkage = str(self.shrinkage).strip().lower()
        self.shrinkage_value  # noqa: B018  (checks the value)

    @property
    def control(self) -> Control:
        """``controls`` as (column, value)."""
        return parse_control(self.controls)

    @property
    def shrinkage_value(self) -> float | str | None:
        """``shrinkage`` as :class:`.Whitener` takes it: "auto", a float, or None."""
        if self.shrinkage in ("auto", "none"):
            return None if self.shrinkage == "none" else "auto"
        try:
            a = float(self.shrinkage)
        except ValueError:
            a = -1.0
        check(
            0.0 <= a <= 1.0,
            "shrinkage",
            f"must be auto, none or a number in [0, 1], got {self.shrinkage!r}",
        )
        return a or None

    def whitener(self) -> Whitener:
        """The (unfitted) :class:`.Whitener` these settings give (``by`` is its
        ``group_by``): how training builds it, and how a dictionary file, which records the
        whitening once as these settings, builds it again."""
        return Whitener(
            mode=self.mode,
            eps=self.eps,
            n_components=self.n_components,
            group_by=self.by,
            shrinkage=self.shrinkage_value,
            within=self.within,
        )


#: A dictionary has one atom per this many tokens, as a power of two within
#: ``FIRST_ATOMS_RANGE``, unless its atoms are given. Measured on synthetic plates (the issue
#: behind it and benchmarks/results/bench_scales.txt): with a few thousand cells a large
#: dictionary splits every concept over many features each active on a few percent of cells
#: (M = 1024 on 3,840 cells: no feature above 6 %), and 16-64 atoms found the perturbations
#: better than 256-1024. The library, the command line, the Dictionary widget (until the user
#: types a number) and the demo all use this rule.
TOKENS_PER_ATOM = 256
FIRST_ATOMS_RANGE = (16, DEFAULT_ATOMS)


def first_atoms(n_tokens: int) -> int:
    """Atoms for ``n_tokens`` tokens: ``n_tokens / TOKENS_PER_ATOM`` rounded to the nearest
    power of two (in log scale), within ``FIRST_ATOMS_RANGE``."""
    lo, hi = FIRST_ATOMS_RANGE
    want = max(int(n_tokens), 1) / TOKENS_PER_ATOM
    return int(min(max(2 ** round(math.log2(want)), lo), hi))


@dataclass
class TrainSettings(Settings):
    """What to train: method, token unit, size and sparsity, optimisation, and the whitening.

    The number of non-zeros per token (``sparsity``) is the one knob both methods share: TopK
    keeps ``k = sparsity`` latents; ICFL picks ``L`` atoms in each of ``J`` pursuit iterations,
    so ``sparsity = J * L`` (see :meth:`method_config`).
    """

    method: str = option(
        "icfl",
        "dictionary method: icfl (ICFL) or topk (TopK sparse autoencoder)",
        choices=METHOD_NAMES,
    )
    unit: str = option("cell", "token unit to train on", choices=UNITS)
    tokens: str | None = option(
        None,
        "token form: concat (the per-channel tokens side by side, C x D: keeps what is "
        "specific to one stain) or mean (over channels); default: concat when the store keeps "
        "per-channel tokens, else mean",
        choices=TOKEN_FORMS,
        label="token form",
    )
    atoms: int | None = option(
        None,
        "number of atoms (features) M (default: sized to the tokens, one atom per "
        f"{TOKENS_PER_ATOM} tokens as a power of two within {FIRST_ATOMS_RANGE[0]}-"
        f"{FIRST_ATOMS_RANGE[1]})",
        label="atoms (M)",
        min=1,
        max=1_000_000,
    )
    sparsity: int | None = option(
        None,
        f"non-zeros per token: TopK k (default {DEFAULT_TOPK_K}), or ICFL J*L "
        f"(L={DEFAULT_ICFL_L} unless --L)",
        label="non-zeros per token",
        min=1,
        max=100_000,
    )
    n_iter: int | None = option(
        None,
        f"ICFL pursuit iterations J (default {DEFAULT_ICFL_J}, or sparsity / L)",
        flag="--J",
        label="J (pursuit iterations)",
    )
    n_pick: int | None = option(
        None,
        f"ICFL atoms picked per iteration L (default {DEFAULT_ICFL_L})",
        flag="--L",
        label="L (atoms per iteration)",
    )
    levels: str = option(
        NO_LEVELS,
        "nested (Matryoshka) dictionary: prefix sizes whose first atoms must each reconstruct "
        "the tokens alone, comma-separated, M for all atoms (e.g. 16,64,256,M), so the first "
        "atoms carry broad concepts; sizes of M or more are dropped; none: a plain dictionary",
        label="nested levels",
    )
    views: str = option(
        ",".join(ALL_VIEWS),
        "views of the tokens the dictionary has a part for, comma-separated: whitened (the "
        "whitening as set, which finds perturbations), within-type (the same controls' "
        "covariance taken within each cell type, which keeps what differs between cell types; "
        "left out where the controls hold one cell type or the table names none) and centred "
        "(only centred on the controls, which keeps what controls vary in: cell type, cell "
        "cycle); each feature is labelled with its view; each part has the atoms the sizing "
        "gives (ignored with no whitening)",
        items=VIEW_WORDS,
        label="views",
    )
    lr: float | None = option(None, "learning rate (default: the method's)", label="learning rate")
    steps: int | None = option(
        None,
        "optimiser steps (default: sized to the tokens: 50 passes over them, within 50-1000 steps)",
        min=1,
        max=10_000_000,
    )
    batch_size: int = option(1024, "tokens per step", min=1, max=10_000_000)
    seed: int = option(0, "random seed (initialisation, batch order, evaluation sample)")
    checkpoint_every: int = option(
        1000,
        "steps between checkpoints (with the optimiser state) written beside the output, as "
        "<name>.ckpt.safetensors, for train --resume (0: only when training stops)",
    )
    eval_max: int = option(
        200_000,
        "tokens the metrics after training are computed on (a random sample if more)",
        min=1,
    )
    drop_nonfinite: bool = option(
        False,
        "leave out tokens holding NaN or Inf (counted in the dictionary's metadata) instead of "
        "refusing the store",
        label="drop non-finite tokens",
    )
    keep_diverged: bool = option(
        False,
        "when the training diverges, keep its last sound state at the output, marked as "
        "diverged (analyze and report refuse it), instead of writing nothing",
        label="keep a diverged dictionary",
    )
    whiten: WhitenSettings | None = option(
        None, "whitening fitted on control tokens; None trains on the tokens as stored", cli=False
    )

    def __post_init__(self) -> None:
        if isinstance(self.whiten, dict):  # from to_dict / JSON
            self.whiten = WhitenSettings.from_dict(self.whiten)
        super().__post_init__()

    def validate(self) -> None:
        check(
            self.lr is None or (self.lr > 0 and math.isfinite(self.lr)),
            "lr",
            f"must be positive and finite, got {self.lr}",
        )
        check(
            self.checkpoint_every >= 0,
            "checkpoint_every",
            f"must not be negative, got {self.checkpoint_every}",
        )
        check(
            self.whiten is None or isinstance(self.whiten, WhitenSettings),
            "whiten",
            f"must be WhitenSettings or None, got {type(self.whiten).__name__}",
        )
        try:
            parse_views(self.views)
        except DictionaryError as exc:
            raise SettingsError(str(exc)) from None
        if self.atoms is not None:
            self.method_config()
        else:  # checked now at the most atoms the tokens may give, again once they are sized
            self.replace(atoms=FIRST_ATOMS_RANGE[1])

    def view_settings(self) -> list[tuple[str, TrainSettings]]:
        """One (view, settings) per part of the dictionary these settings train.

        Without whitening there is one part, the tokens as stored (``[]``: a plain dictionary).
        Each view is the whitening with its mode (:data:`.views.VIEW_MODES`); views that come
        to the same whitening (``centred`` beside a whitening that only centres, ``within-type``
        beside a whitening already within ``auto``) are one. With one part left the dictionary
        is a plain one of that whitening. Whether ``within-type`` differs from the pooled
        whitening depends on the table: training drops it there (:func:`.pipeline.distinct_views`).
        """
        if self.whiten is None:
            return []
        parts: dict[str, TrainSettings] = {}
        for view in parse_views(self.views):
            pca = self.whiten.mode == "pca"
            if view == "within-type" and pca and str(self.whiten.within).lower() != "auto":
                name, whiten = view, self.whiten.replace(within="auto")
            else:  # within-type where the whitening is already within auto, or only centres
                mode = VIEW_MODES[view] if view == "centred" else self.whiten.mode
                name, whiten = view_of_mode(mode), self.whiten.replace(mode=mode)
            if name not in parts:
                parts[name] = self.replace(whiten=whiten, views=name)
        return list(parts.items())

    def atoms_for(self, n_tokens: int) -> tuple[int, str]:
        """(atoms, why): ``atoms`` when given, else :func:`first_atoms` for ``n_tokens``."""
        if self.atoms is not None:
            return self.atoms, "as given"
        atoms = first_atoms(n_tokens)
        lo, hi = FIRST_ATOMS_RANGE
        bound = " (the most)" if atoms == hi else " (the fewest)" if atoms == lo else ""
        return atoms, (
            f"one atom per {TOKENS_PER_ATOM} of {n_tokens} tokens, as a power of two within "
            f"{lo}-{hi}{bound}; --atoms chooses"
        )

    def steps_for(self, n_tokens: int) -> tuple[int, str]:
        """(steps, why): ``steps`` when given, else :func:`first_steps` for ``n_tokens``."""
        if self.steps is not None:
            return self.steps, "as given"
        steps = first_steps(n_tokens, self.batch_size)
        lo, hi = FIRST_STEPS
        epochs = steps * self.batch_size / max(int(n_tokens), 1)
        bound = " (the most)" if steps == hi else " (the fewest)" if steps == lo else ""
        return steps, (
            f"{FIRST_EPOCHS} passes over {n_tokens} tokens in batches of {self.batch_size}, "
            f"within {lo}-{hi} steps{bound}: {epochs:.0f} passes; --steps chooses"
        )

    def method_config(self) -> dict[str, Any]:
        """The method's config (for ``build_model``) from atoms, sparsity, J, L and lr.

        TopK takes ``k = sparsity``. ICFL takes ``L = n_pick`` and ``J = sparsity / L`` (which
        must divide evenly), or ``J = n_iter`` without a sparsity. Without a sparsity a token
        uses the method's default non-zeros, or half the atoms where that is fewer (a small
        dictionary sized to few tokens). One rule for every front; ``atoms`` must be known.
        """
        check(
            self.atoms is not None,
            "atoms",
            "not sized yet: give atoms, or size them to the tokens first (atoms_for)",
        )
        cfg: dict[str, Any] = {"n_atoms": self.atoms}
        if self.lr is not None:
            cfg["lr"] = self.lr
        try:
            levels = parse_levels(self.levels, self.atoms)
        except DictionaryError as exc:
            raise SettingsError(str(exc)) from None
        if levels is not None:
            cfg["levels"] = levels
        half = max(1, self.atoms // 2)
        if self.method == "topk":
            check(
                self.n_iter is None and self.n_pick is None,
                "n_iter/n_pick",
                "J and L (--J/--L) are ICFL settings; TopK takes only sparsity k",
            )
            k = self.sparsity if self.sparsity is not None else min(DEFAULT_TOPK_K, half)
            check(k <= self.atoms, "sparsity", f"TopK k ({k}) cannot exceed atoms ({self.atoms})")
            cfg["k"] = k
            return cfg
        n_pick = self.n_pick if self.n_pick is not None else DEFAULT_ICFL_L
        check(n_pick >= 1, "n_pick", f"L must be at least 1, got {n_pick}")
        check(n_pick <= self.atoms, "n_pick", f"L ({n_pick}) cannot exceed atoms ({self.atoms})")
        n_iter = self.n_iter
        if self.sparsity is not None:
            check(
                n_iter is None or n_iter * n_pick == self.sparsity,
                "sparsity",
                f"{self.sparsity} disagrees with J {n_iter} x L {n_pick}",
            )
            check(
                self.sparsity % n_pick == 0,
                "sparsity",
                f"ICFL sparsity {self.sparsity} must be a multiple of L ({n_pick})",
            )
            n_iter = self.sparsity // n_pick
        elif n_iter is None:
            n_iter = max(1, min(DEFAULT_ICFL_J, half // n_pick))
        check(n_iter >= 1, "n_iter", f"J must be at least 1, got {n_iter}")
        check(
            n_iter * n_pick <= self.atoms,
            "sparsity",
            f"ICFL picks J x L = {n_iter} x {n_pick} = {n_iter * n_pick} atoms per token, "
            f"more than the {self.atoms} atoms of the dictionary",
        )
        cfg.update(n_iter=n_iter, n_pick=n_pick)
        return cfg


def _columns(value) -> tuple[str, ...]:
    """Column names from a comma-separated string or a sequence, blanks dropped."""
    if value is None:
        return ()
    items = value.split(",") if isinstance(value, str) else value
    return tuple(c.strip() for c in map(str, items) if c.strip())


@dataclass
class AnalyzeSettings(Settings):
    """How a store's codes are read as concepts: selectivity labels, ground truth, top tokens."""

    labels: tuple[str, ...] | None = option(
        None, "table columns to compute feature selectivity for, comma-separated"
    )
    truth: tuple[str, ...] | None = option(
        None, "ground-truth columns for the best single-feature AUROC per concept, comma-separated"
    )
    truth_file: str | None = option(
        None,
        "per-cell truth table (csv/tsv/parquet with plate, well, site, label, ...) joined onto "
        "the cell table",
        label="truth file",
    )
    unit: str | None = option(
        None, "token unit to encode (default: the dictionary's)", choices=UNITS
    )
    top_n: int = option(10, "top tokens listed per feature", flag="--top", label="top tokens")
    controls: str | None = option(
        None,
        "control wells the concept profiles are z-scored against, as COLUMN=VALUE (default: "
        "the dictionary's whitening controls; profiles need label columns)",
        label="profile controls (COLUMN=VALUE)",
    )
    describe: bool = option(
        True,
        "describe each feature by the CellProfiler measurements (cp-measure: intensity, "
        "texture, granularity, shape, radial distribution per stain and compartment) that "
        "follow its activation; measured once per store from the plate's images and cached "
        "beside it (--no-describe skips it)",
        label="describe features",
    )

    def __post_init__(self) -> None:
        self.labels = _columns(self.labels)
        self.truth = _columns(self.truth)
        if self.truth_file is not None:
            self.truth_file = str(self.truth_file)
        super().__post_init__()

    def validate(self) -> None:
        check(self.top_n >= 1, "top_n", f"must be at least 1, got {self.top_n}")
        check_control(self.controls)


#: A dictionary trains this many passes over its tokens, within these steps, unless its steps are
#: given. On one plate's ~4,000 cells (M = 1024, batch 1024) ICFL's held-out FVU stays within 2%
#: of its best from ~30 passes on, and TopK's is best near 10 passes and then rises as it fits
#: the training tokens; on 40,000 tokens both settle within ~10 passes
#: (benchmarks/results/bench_convergence.txt, docs/images/convergence.png). So one plate trains
#: ~200 steps (about half a minute on a CPU), a sample plate (~600 cells) the 50-step floor and a
#: screen the full 1000 steps. The library, the command line and the Dictionary widget (until
#: the user types a number) all use this rule.
FIRST_EPOCHS = 50
FIRST_STEPS = (50, 1000)


def first_steps(n_tokens: int, batch_size: int) -> int:
    """Steps for ``FIRST_EPOCHS`` passes over ``n_tokens`` in batches, within ``FIRST_STEPS``."""
    lo, hi = FIRST_STEPS
    need = -(-FIRST_EPOCHS * max(int(n_tokens), 0) // max(int(batch_size), 1))
    return int(min(max(need, lo), hi))
