"""ICFL, iterative codebook feature learning (Donhauser et al., arXiv 2412.16247).

The model is x ~ W z + b with no learned encoder: codes come from a pursuit against the current
dictionary (J iterations; each scores every atom against the residual, keeps the L highest
scores, fits their coefficients by least squares, and subtracts the fit), and training takes a
gradient step on W and b with the codes held fixed. Every ``redraw_every`` steps, one atom of
each pair with cosine above ``redraw_cosine`` is redrawn on the unit sphere, which is what keeps
ICFL free of the dead and duplicated features a TopK SAE accumulates.

"Highest score" is taken literally (the signed score W^T r, not its absolute value), so a
feature has one "on" direction; least squares may still give a picked atom a negative weight.

Atoms are kept at unit norm after every step: the scores compare atoms only when they share a
norm, and the least-squares coefficients absorb any scale, so nothing is lost.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Literal

import torch
from torch import nn
from torch.nn import functional as F

from .base import Codes, DictionaryConfig, ForwardOutput, SparseDictionary, coordinate_median


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
    n_atoms: int = 1024
    n_iter: int = 8  # J
    n_pick: int = 4  # L
    lr: float = 1e-3
    redraw_every: int = 100
    redraw_cosine: float = 0.9
    pursuit: Literal["gram", "plain"] = "gram"
    init: Literal["data", "random"] = "data"

    @property
    def max_nonzeros(self) -> int:
        return self.n_iter * self.n_pick


def _solve(gram_ss: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """Batched least squares through the L x L normal equations."""
    # a ridge of ~10 ulp keeps the system solvable when two picked atoms nearly coincide
    ridge = 10 * torch.finfo(gram_ss.dtype).eps
    eye = torch.eye(gram_ss.shape[-1], dtype=gram_ss.dtype, device=gram_ss.device)
    return torch.linalg.solve(gram_ss + ridge * eye, rhs.unsqueeze(-1)).squeeze(-1)


@torch.no_grad()
def pursuit_gram(
    residual: torch.Tensor,
    atoms: torch.Tensor,
    n_iter: int,
    n_pick: int,
    gram: torch.Tensor | None = None,
) -> Codes:
    """ICFL encoding through the Gram matrix G = W^T W.

    After picking S with coefficients c the scores become ``s - G[:, S] c`` (a weighted sum of
    L rows of G, done by ``embedding_bag``), and the normal equations use G[S, S], so an
    iteration costs B*M*L instead of the B*D*M of rescoring the residual.
    """
    if gram is None:
        gram = atoms @ atoms.T
    scores = residual @ atoms.T
    values, indices = [], []
    for _ in range(n_iter):
        picked = scores.topk(n_pick, dim=1, sorted=False).indices
        rhs = scores.gather(1, picked)
        coef = _solve(gram[picked.unsqueeze(2), picked.unsqueeze(1)], rhs)
        scores.sub_(F.embedding_bag(picked, gram, per_sample_weights=coef, mode="sum"))
        values.append(coef)
        indices.append(picked)
    return Codes(torch.cat(values, 1), torch.cat(indices, 1))


@torch.no_grad()
def pursuit_plain(residual: torch.Tensor, atoms: torch.Tensor, n_iter: int, n_pick: int) -> Codes:
    """The same pursuit computed directly: rescore the residual against every atom each time.

    Kept for the benchmark and as a cross-check; it costs B*D*M per iteration.
    """
    r = residual.clone()
    values, indices = [], []
    for _ in range(n_iter):
        scores = r @ atoms.T
        picked = scores.topk(n_pick, dim=1, sorted=False).indices
        chosen = atoms[picked]  # (B, L, D)
        coef = _solve(chosen @ chosen.transpose(1, 2), scores.gather(1, picked))
        r = r - F.embedding_bag(picked, atoms, per_sample_weights=coef, mode="sum")
        values.append(coef)
        indices.append(picked)
    return Codes(torch.cat(values, 1), torch.cat(indices, 1))


def _unit_rows(w: torch.Tensor) -> torch.Tensor:
    return w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)


class ICFL(SparseDictionary):
    """ICFL dictionary: ``atoms`` (M, D) at unit norm and a bias ``b`` (D,)."""

    method: ClassVar[str] = "icfl"
    config: ICFLConfig

    def __init__(self, d_in: int, config: ICFLConfig | None = None, *, seed: int = 0):
        config = config or ICFLConfig()
        super().__init__(d_in, config)
        if config.n_iter < 1 or config.n_pick < 1 or config.n_pick > config.n_atoms:
            from ..errors import DictionaryError

            raise DictionaryError(
                f"ICFL needs J >= 1 and 1 <= L <= M; got J={config.n_iter}, "
                f"L={config.n_pick}, M={config.n_atoms}"
            )
        g = torch.Generator().manual_seed(seed)
        self.W = nn.Parameter(_unit_rows(torch.randn(config.n_atoms, d_in, generator=g)))
        self.b = nn.Parameter(torch.zeros(d_in))

    @property
    def atoms(self) -> torch.Tensor:
        return self.W

    @property
    def bias(self) -> torch.Tensor:
        return self.b

    @torch.no_grad()
    def init_from_data(self, sample: torch.Tensor, generator: torch.Generator) -> None:
        """Bias at the per-dimension median; with ``init="data"``, atoms on random tokens.

        Starting atoms on (centred) tokens puts them where the data are, so fewer need the
        redraw to find work; the median is the point tokens sit at when no atom is active.
        """
        self.b.copy_(coordinate_median(sample))
        if self.config.init == "data":
            n = sample.shape[0]
            idx = torch.randint(n, (self.n_atoms,), generator=generator)
            w = sample[idx] - self.b
            w = w + 1e-3 * torch.randn(w.shape, generator=generator) * w.norm(dim=1, keepdim=True)
            self.W.copy_(_unit_rows(w))

    def encode(self, x: torch.Tensor, gram: torch.Tensor | None = None) -> Codes:
        cfg = self.config
        with torch.no_grad():
            r = x - self.b
            if cfg.pursuit == "plain":
                return pursuit_plain(r, self.W, cfg.n_iter, cfg.n_pick)
            return pursuit_gram(r, self.W, cfg.n_iter, cfg.n_pick, gram)

    def forward(self, x: torch.Tensor) -> ForwardOutput:
        codes = self.encode(x)
        x_hat = self.decode(codes)
        loss = (x - x_hat).pow(2).sum(1).mean()
        return ForwardOutput(x_hat, codes, loss, {"loss": float(loss.detach())})

    @torch.no_grad()
    def after_step(self, step: int, optimizer: torch.optim.Optimizer) -> None:
        self.W.copy_(_unit_rows(self.W))
        every = self.config.redraw_every
        if every and step % every == 0:
            self.redraw_duplicates(optimizer)

    @torch.no_grad()
    def redraw_duplicates(
        self, optimizer: torch.optim.Optimizer | None = None, generator=None
    ) -> torch.Tensor:
        """Redraw one atom, chosen at random, of every pair with cosine above the threshold.

        Returns the indices redrawn. Adam's moments for those atoms are reset so the new atoms
        start without the old ones' momentum.
        """
        w = self.W
        cos = w @ w.T
        cos.fill_diagonal_(0)
        i, j = torch.nonzero(torch.triu(cos > self.config.redraw_cosine, diagonal=1), as_tuple=True)
        if i.numel() == 0:
            return i
        coin = torch.rand(i.shape, generator=generator) < 0.5
        chosen = torch.unique(torch.where(coin, i, j))
        fresh = torch.randn(len(chosen), self.d_in, generator=generator, dtype=w.dtype)
        w[chosen] = _unit_rows(fresh)
        if optimizer is not None:
            state = optimizer.state.get(self.W, {})
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    state[key][chosen] = 0
        return chosen

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"atoms": self.W.detach(), "bias": self.b.detach()}

    @torch.no_grad()
    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.W.copy_(tensors["atoms"])
        self.b.copy_(tensors["bias"])
