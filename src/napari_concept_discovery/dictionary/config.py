"""The methods' configs, without torch: what ICFL and the TopK SAE are built from, and the
defaults that the training settings, the widget, the demo and the command line read.

A config is plain fields that round-trip JSON unchanged (a dictionary file records it).
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, ClassVar, Literal

from ..errors import DictionaryError
from .nested import check_levels

#: Atoms of a dictionary when nothing says otherwise (both methods, and ``TrainSettings``).
DEFAULT_ATOMS = 1024
#: Atoms of a first dictionary in the viewer: one that trains in about a minute on a CPU.
FIRST_ATOMS = 256


@dataclasses.dataclass
class DictionaryConfig:
    """Base for method configs: plain fields that survive ``to_json``/``from_json`` unchanged."""

    method: ClassVar[str] = ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]):
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise DictionaryError(
                f"unknown {cls.method} config field(s) {unknown}; known: {sorted(names)}"
            )
        return cls(**d)

    @classmethod
    def from_json(cls, s: str):
        return cls.from_dict(json.loads(s))


@dataclasses.dataclass
class ICFLConfig(DictionaryConfig):
    """ICFL settings, sized for a CPU.

    The paper used M = 8192, J = 20, L = 5, batch 8192 and learning rate 5e-5 for 300k steps on
    a GPU. On a CPU one can afford thousands of steps, not hundreds of thousands, so the
    defaults use fewer atoms (1024), J = 8 and L = 4 (32 non-zeros, the same L0 as the TopK
    default, so the two compare at equal sparsity; a pursuit step costs B*M*L per iteration)
    and a larger Adam learning rate (1e-3) that converges in that many steps on unit-norm
    whitened tokens.
    """

    method: ClassVar[str] = "icfl"
    n_atoms: int = DEFAULT_ATOMS
    n_iter: int = 8  # J
    n_pick: int = 4  # L
    lr: float = 1e-3
    redraw_every: int = 100
    redraw_cosine: float = 0.9
    pursuit: Literal["gram", "plain"] = "gram"
    init: Literal["data", "random"] = "data"
    #: nested prefix sizes ending at ``n_atoms`` (:mod:`.nested`), or None for a plain dictionary
    levels: list[int] | None = None

    def __post_init__(self) -> None:
        self.levels = check_levels(self.levels, self.n_atoms)

    @property
    def max_nonzeros(self) -> int:
        return self.n_iter * self.n_pick


@dataclasses.dataclass
class TopKConfig(DictionaryConfig):
    """TopK SAE settings.

    ``lr=None`` uses Gao et al.'s scaling 2e-4 / sqrt(M / 2^14) (also sparsify's default).
    ``auxk=None`` uses D / 2 latents for the auxiliary loss, as in the paper. ``dead_tokens``
    is 10M in the paper; CPU runs see far fewer tokens, so the default counts a latent dead
    after 1M tokens without firing.
    """

    method: ClassVar[str] = "topk"
    n_atoms: int = DEFAULT_ATOMS
    k: int = 32
    lr: float | None = None
    auxk: int | None = None
    auxk_coef: float = 1 / 32
    dead_tokens: int = 1_000_000
    #: nested prefix sizes ending at ``n_atoms`` (:mod:`.nested`), or None for a plain dictionary
    levels: list[int] | None = None

    def __post_init__(self) -> None:
        self.levels = check_levels(self.levels, self.n_atoms)

    @property
    def max_nonzeros(self) -> int:
        return self.k

    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else 2e-4 / math.sqrt(self.n_atoms / 2**14)
