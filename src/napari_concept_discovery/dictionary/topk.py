"""TopK sparse autoencoder after Gao et al. 2024 ("Scaling and evaluating sparse autoencoders").

z = TopK(ReLU(W_enc (x - b_pre) + b_enc)), x_hat = W_dec z + b_pre. The decoder starts as the
encoder's transpose with unit-norm atoms; before each step the gradient component parallel to
each atom is removed and after it the atoms are renormalised; b_pre starts at the data's
per-dimension median; an auxiliary loss (AuxK, coefficient 1/32) reconstructs the residual from
the top pre-activations of latents that have been dead for ``dead_tokens`` tokens; Adam.

Speed on a CPU: the encoder matmul (B*M*D) is the one dense cost. Everything after it touches
only the k chosen latents: decoding is a gather (``embedding_bag``), and the encoder's backward
is written by hand to scatter into the k chosen rows of W_enc instead of multiplying a mostly
zero (B, M) gradient by the batch, which is what autograd through a dense ``linear`` would do
(twice, once for W_enc and once for the input because b_pre is learned).
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import DictionaryError
from .base import (
    Codes,
    ForwardOutput,
    SparseDictionary,
    coordinate_median,
    fired_mask,
    scatter_rows,
    sparse_decode,
)
from .config import TopKConfig  # noqa: F401  (the config of this module's method)

#: Tokens per block of the encoder's scores when applying a dictionary: 1024 x M floats (16 MiB
#: at M = 4096) are reused block after block instead of a fresh (N, M) matrix; measured on a
#: 2-core Xeon, smaller blocks pay more per call than they save (benchmarks/bench_encode.py).
ENCODE_CHUNK = 1024


@torch.no_grad()
def encode_chunked(
    x: torch.Tensor,
    w_enc: torch.Tensor,
    b_enc: torch.Tensor,
    b_pre: torch.Tensor,
    k: int,
    chunk: int = ENCODE_CHUNK,
) -> Codes:
    """TopK codes of ``x`` (B, D) without a (B, M) pre-activation matrix, for applying a model.

    Applying a dictionary is bound by memory traffic over the B x M scores, not by the matmul's
    arithmetic: a fresh (B, M) matrix costs its allocation (page faults) and a pass to write it
    before ``topk`` reads it again. Here the scores of ``chunk`` tokens at a time go into one
    reused buffer and ``topk`` writes straight into the preallocated codes. Each token's scores
    are the same dot products as in the unchunked product (row blocks of one matmul), so the
    codes are the same; tests/dictionary/test_encode_chunked.py checks them bit for bit.
    """
    b, m = x.shape[0], w_enc.shape[0]
    values = x.new_empty(b, k)
    indices = torch.empty(b, k, dtype=torch.long, device=x.device)
    chunk = max(1, min(chunk, b))
    buf = x.new_empty(chunk, m)
    xc = x.new_empty(chunk, x.shape[1])
    w_t = w_enc.detach().T
    for start in range(0, b, chunk):
        n = min(chunk, b - start)
        rows = slice(start, start + n)
        torch.sub(x[rows], b_pre.detach(), out=xc[:n])
        pre = torch.addmm(b_enc.detach(), xc[:n], w_t, out=buf[:n])
        torch.topk(pre, k, dim=1, sorted=False, out=(values[rows], indices[rows]))
    values.clamp_(min=0)  # F.relu on the chosen pre-activations
    return Codes(values, indices)


class _GatheredLinear(torch.autograd.Function):
    """Pre-activations of chosen latents, with a backward that touches only those latents.

    Forward takes the values already read off the dense pre-activations (no recomputation);
    backward scatters into the chosen rows of W_enc and b_enc, and gives the input gradient as
    a weighted sum of k encoder rows.
    """

    @staticmethod
    def forward(ctx, x, w_enc, b_enc, indices, values):
        ctx.save_for_backward(x, w_enc, indices)
        ctx.n_atoms = w_enc.shape[0]
        return values

    @staticmethod
    def backward(ctx, grad):
        x, w_enc, indices = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        flat_idx = indices.reshape(-1)
        if ctx.needs_input_grad[0]:
            grad_x = F.embedding_bag(indices, w_enc, per_sample_weights=grad, mode="sum")
        if ctx.needs_input_grad[1]:
            grad_w = scatter_rows(indices, grad, x, ctx.n_atoms)
        if ctx.needs_input_grad[2]:
            grad_b = torch.zeros(ctx.n_atoms, dtype=grad.dtype).index_add_(
                0, flat_idx, grad.reshape(-1)
            )
        return grad_x, grad_w, grad_b, None, None


class TopKSAE(SparseDictionary):
    """TopK SAE with encoder ``W_enc`` (M, D), ``b_enc`` (M,), atoms ``W_dec`` (M, D), ``b_pre``."""

    method: ClassVar[str] = "topk"
    config: TopKConfig

    def __init__(self, d_in: int, config: TopKConfig | None = None, *, seed: int = 0):
        config = config or TopKConfig()
        super().__init__(d_in, config)
        if not 1 <= config.k <= config.n_atoms:
            raise DictionaryError(f"TopK needs 1 <= k <= M; got k={config.k}, M={config.n_atoms}")
        # as in OpenAI's reference code: the encoder keeps nn.Linear's default scale (rows of
        # norm ~ 1/sqrt(3)), the decoder starts as its transpose with each atom at unit norm
        g = torch.Generator().manual_seed(seed)
        bound = 1 / math.sqrt(d_in)
        w = torch.empty(config.n_atoms, d_in).uniform_(-bound, bound, generator=g)
        self.W_enc = nn.Parameter(w.clone())
        self.W_dec = nn.Parameter(w / w.norm(dim=1, keepdim=True))
        self.b_enc = nn.Parameter(torch.zeros(config.n_atoms))
        self.b_pre = nn.Parameter(torch.zeros(d_in))
        # tokens seen since each latent last fired, for AuxK; saved with the dictionary
        self.register_buffer("tokens_since_fired", torch.zeros(config.n_atoms, dtype=torch.long))

    @property
    def atoms(self) -> torch.Tensor:
        return self.W_dec

    @property
    def bias(self) -> torch.Tensor:
        return self.b_pre

    def make_optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.config.learning_rate(), eps=6.25e-10)

    @torch.no_grad()
    def init_from_data(self, sample: torch.Tensor, generator: torch.Generator) -> None:
        self.b_pre.copy_(coordinate_median(sample))

    def _pre(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        xc = x - self.b_pre
        with torch.no_grad():
            pre = torch.addmm(self.b_enc, xc, self.W_enc.T)
        return xc, pre

    def _select(self, xc, pre, k, mask=None, width: int | None = None) -> Codes:
        """TopK codes from the pre-activations; ``width``: among the first ``width`` latents
        only (a nested prefix), ``mask``: among the latents it marks only."""
        source = pre if mask is None else pre.masked_fill(~mask, -torch.inf)
        if width is not None and width < source.shape[1]:
            source = source[:, :width]
            k = min(k, width)
        top = source.topk(k, dim=1, sorted=False)
        vals = _GatheredLinear.apply(xc, self.W_enc, self.b_enc, top.indices, top.values)
        return Codes(F.relu(vals), top.indices)

    def encode(self, x: torch.Tensor, chunk: int = ENCODE_CHUNK) -> Codes:
        """Codes of ``x``; without autograd, in chunks of ``chunk`` tokens (:func:`encode_chunked`)."""
        if torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters()):
            xc, pre = self._pre(x)
            return self._select(xc, pre, self.config.k)
        return encode_chunked(x, self.W_enc, self.b_enc, self.b_pre, self.config.k, chunk)

    def encode_prefix(self, x: torch.Tensor, width: int) -> Codes:
        """Codes of ``x`` by the first ``width`` atoms alone: the top min(k, width) of their
        pre-activations (what the prefix would give were it the whole dictionary)."""
        with torch.no_grad():
            xc, pre = self._pre(x)
            return self._select(xc, pre, self.config.k, width=width)

    def forward(self, x: torch.Tensor) -> ForwardOutput:
        """Reconstruction, codes and loss. A nested dictionary (``config.levels``) adds, for
        each smaller prefix, the FVU of its own TopK code (the top-k taken within the prefix,
        decoded by the prefix's atoms): the loss is the sum over the prefixes."""
        cfg = self.config
        xc, pre = self._pre(x)
        codes = self._select(xc, pre, cfg.k)
        x_hat = sparse_decode(codes, self.W_dec) + self.b_pre
        err = x - x_hat
        var = (x - x.mean(0)).pow(2).sum().clamp_min(1e-12)
        fvu = err.pow(2).sum() / var
        loss = fvu
        metrics = {"fvu": float(fvu.detach())}
        for width in (cfg.levels or [])[:-1]:
            prefix = self._select(xc, pre, cfg.k, width=width)
            prefix_hat = sparse_decode(prefix, self.W_dec) + self.b_pre
            prefix_fvu = (x - prefix_hat).pow(2).sum() / var
            loss = loss + prefix_fvu
            metrics[f"fvu_{width}"] = float(prefix_fvu.detach())
        if self.training:
            self._count_firing(codes, x.shape[0])
            dead = self.tokens_since_fired >= cfg.dead_tokens
            n_dead = int(dead.sum())
            if n_dead and cfg.auxk_coef > 0:
                k_aux = min(cfg.auxk or x.shape[1] // 2, n_dead)
                aux = self._select(xc, pre, k_aux, dead.unsqueeze(0))
                e = err.detach()
                e_hat = sparse_decode(aux, self.W_dec)
                aux_fvu = (e - e_hat).pow(2).sum() / (e - e.mean(0)).pow(2).sum().clamp_min(1e-12)
                loss = loss + cfg.auxk_coef * aux_fvu.nan_to_num(0.0)
                metrics["auxk"] = float(aux_fvu.detach())
        metrics["loss"] = float(loss.detach())
        return ForwardOutput(x_hat, codes, loss, metrics)

    @torch.no_grad()
    def _count_firing(self, codes: Codes, n_tokens: int) -> None:
        fired = fired_mask(codes, self.n_atoms)
        self.tokens_since_fired += n_tokens
        self.tokens_since_fired[fired] = 0

    @torch.no_grad()
    def before_step(self) -> None:
        """Drop the gradient component along each atom, so the step cannot change its norm."""
        g = self.W_dec.grad
        if g is not None:
            w = self.W_dec
            g -= (g * w).sum(1, keepdim=True) * w

    @torch.no_grad()
    def after_step(self, step: int, optimizer: torch.optim.Optimizer) -> None:
        self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {
            "atoms": self.W_dec.detach(),
            "bias": self.b_pre.detach(),
            "encoder": self.W_enc.detach(),
            "encoder_bias": self.b_enc.detach(),
            "tokens_since_fired": self.tokens_since_fired,
        }

    @torch.no_grad()
    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.W_dec.copy_(tensors["atoms"])
        self.b_pre.copy_(tensors["bias"])
        self.W_enc.copy_(tensors["encoder"])
        self.b_enc.copy_(tensors["encoder_bias"])
        if "tokens_since_fired" in tensors:
            self.tokens_since_fired.copy_(tensors["tokens_since_fired"])
