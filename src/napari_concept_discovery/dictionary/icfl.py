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

import threading
import warnings
from contextlib import contextmanager
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
    workspace_buffer,
)
from .config import ICFLConfig  # noqa: F401  (the config of this module's method)
from .decode_cpu import fixed_codes_loss
from .pursuit_cpu import gram_rows, pursuit_rows

GRAM_WIDTH = 128  # atoms per column block of G and of the scores (see pursuit_gram)


def _solve(gram_ss: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """Batched least squares through the L x L normal equations (B, L, L) c = (B, L).

    A Cholesky factorisation written as L^2 vector operations over the batch: for L of a few,
    this is many times faster on a CPU than LAPACK's batched solvers, whose cost is a call per
    matrix. A ridge of ~10 ulp keeps it defined when two picked atoms nearly coincide.
    """
    n = gram_ss.shape[-1]
    ridge = 10 * torch.finfo(gram_ss.dtype).eps
    tiny = torch.finfo(gram_ss.dtype).tiny
    chol = [[None] * n for _ in range(n)]
    for j in range(n):
        s = gram_ss[:, j, j] + ridge
        for k in range(j):
            s = s - chol[j][k] * chol[j][k]
        d = s.clamp_min(tiny).sqrt()
        chol[j][j] = d
        for i in range(j + 1, n):
            t = gram_ss[:, i, j]
            for k in range(j):
                t = t - chol[i][k] * chol[j][k]
            chol[i][j] = t / d
    y = [None] * n
    for i in range(n):  # chol y = rhs
        t = rhs[:, i]
        for k in range(i):
            t = t - chol[i][k] * y[k]
        y[i] = t / chol[i][i]
    x = [None] * n
    for i in reversed(range(n)):  # chol^T x = y
        t = y[i]
        for k in range(i + 1, n):
            t = t - chol[k][i] * x[k]
        x[i] = t / chol[i][i]
    return torch.stack(x, dim=1)


def top_l(scores: torch.Tensor, n_pick: int, block: int = 64):
    """Values and indices of the ``n_pick`` largest scores per row (unsorted), like ``topk``.

    For a few picks out of thousands, it is cheaper to take each block's maximum (a vectorised
    reduction), keep the ``n_pick`` best blocks, and run ``topk`` on those: the ``n_pick``
    largest scores lie in the ``n_pick`` blocks with the largest maxima, so the result is
    exact, at about half the cost of ``topk`` on the full rows.
    """
    b, m = scores.shape
    n_blocks = m // block
    if m % block or n_blocks < 4 * n_pick:
        return scores.topk(n_pick, dim=1, sorted=False)
    best = scores.view(b, n_blocks, block).amax(dim=2).topk(n_pick, dim=1, sorted=False).indices
    offsets = torch.arange(block, device=scores.device)
    cols = (best.unsqueeze(2) * block + offsets).reshape(b, n_pick * block)
    values, where = scores.gather(1, cols).topk(n_pick, dim=1, sorted=False)
    return values, cols.gather(1, where)


def gram_blocks(atoms: torch.Tensor, width: int, out: torch.Tensor | None = None):
    """G = W^T W in column blocks: ``out[k]`` (M, width) holds the columns of block k.

    ``atoms`` (M, D) with M a multiple of ``width``. The layout is what the pursuit's score
    update wants: updating one column block of every token's scores reads only that block of
    G (a few MiB, cache-resident), so G streams from memory once per pursuit iteration instead
    of once per token row. G is symmetric: block k's rows from block k on are multiplied out
    (one product per block, about half the multiply-adds of the full product), and its rows
    above come from the transposed tiles of the blocks before it (one copy per block).
    """
    m = atoms.shape[0]
    n_blocks = m // width
    if out is None:
        out = atoms.new_empty(n_blocks, m, width)
    for k in range(n_blocks):
        a = k * width
        torch.mm(atoms[a:], atoms[a : a + width].T, out=out[k, a:])
        # the diagonal tile is symmetric only up to the order of the matmul's sums: mirror it
        tile = out[k, a : a + width]
        tile.copy_(tile.triu() + tile.triu(1).T)
    for k in range(1, n_blocks):
        a = k * width
        # out[k][j-th tile] = G[block j, block k] = G[block k, block j]^T = out[j][k-th tile]^T
        out[k, :a].view(k, width, width).copy_(out[:k, a : a + width].transpose(1, 2))
    return out


class WorkspacePool:
    """Score buffers for applying a dictionary (``ICFL.encode`` outside training), lent to one
    encode at a time and kept between encodes.

    The viewer encodes site after site, and a fresh chunk x M score matrix (64 MiB for 4096
    tokens at M = 4096) costs its page faults on every call. Concurrent encodes each borrow their
    own workspace, so they never share memory. The buffers are not thread-local on purpose: a
    ``threading.local`` of a thread that Python did not start (Qt's pool threads) is freed while
    that thread's Python state is torn down, and freeing a tensor there (a view, or one holding
    a Python object) re-enters Python and deletes the thread state twice, which crashed the
    viewer (tests/dictionary/test_thread_teardown.py). Here a workspace is only ever freed by ordinary
    Python code: when more than ``keep`` are idle, or by :meth:`clear`.
    """

    def __init__(self, keep: int = 4):
        self.keep = keep
        self._idle: list[dict] = []
        self._lock = threading.Lock()

    @contextmanager
    def lease(self):
        with self._lock:
            workspace = self._idle.pop() if self._idle else {}
        try:
            yield workspace
        finally:
            with self._lock:
                if len(self._idle) < self.keep:
                    self._idle.append(workspace)

    def clear(self) -> None:
        """Free the idle workspaces (those lent out are freed when they come back)."""
        with self._lock:
            self._idle.clear()


#: The workspaces of every ICFL encode outside training.
ENCODE_WORKSPACES = WorkspacePool()


def release_encode_buffers() -> None:
    """Free the score buffers that ICFL encodes keep between calls."""
    ENCODE_WORKSPACES.clear()


def _coefficient_matrix(picked: torch.Tensor, coef: torch.Tensor, m: int) -> torch.Tensor:
    """-C as a (B, M) CSR tensor: row b holds -coef[b] at the L columns picked[b].

    The CSR product is stable in practice, but torch flags every CSR construction as beta with
    a UserWarning; it is silenced here only, not for the whole process.
    """
    n, n_pick = picked.shape
    crow = torch.arange(0, n * n_pick + 1, n_pick, device=picked.device)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta", UserWarning)
        return torch.sparse_csr_tensor(
            crow, picked.reshape(-1), -coef.reshape(-1), (n, m), check_invariants=False
        )


def _block_width(m: int, width: int = GRAM_WIDTH) -> int:
    """The column-block width the pursuit uses for M atoms: ``width``, or M when fewer."""
    return max(1, min(width, m))


def _padded_atoms(atoms: torch.Tensor, width: int) -> torch.Tensor:
    """``atoms`` with zero rows appended up to a multiple of ``width`` (no copy when none)."""
    m = atoms.shape[0]
    pad = -m % width
    if not pad:
        return atoms
    return torch.cat([atoms, atoms.new_zeros(pad, atoms.shape[1])])


def _pick_blocked(scores: torch.Tensor, block_max: torch.Tensor, n_pick: int):
    """The ``n_pick`` highest scores per token from block-layout scores (blocks, B, width).

    The ``n_pick`` largest scores of a row lie in its ``n_pick`` blocks with the largest
    maxima, so ``topk`` runs on those few blocks only (exact, as :func:`top_l`).
    Returns (values, atom indices), both (B, n_pick), unsorted.
    """
    n_blocks, b, width = scores.shape
    n_sel = min(n_pick, n_blocks)
    best = block_max.T.topk(n_sel, dim=1, sorted=False).indices  # (B, n_sel)
    rows = best * b + torch.arange(b, device=scores.device).unsqueeze(1)
    flat = scores.view(n_blocks * b, width)
    candidates = flat.index_select(0, rows.reshape(-1)).view(b, n_sel * width)
    values, where = candidates.topk(n_pick, dim=1, sorted=False)
    picked = best.gather(1, where // width) * width + where % width
    return values, picked


@torch.no_grad()
def pursuit_gram(
    residual: torch.Tensor,
    atoms: torch.Tensor,
    n_iter: int,
    n_pick: int,
    gram: torch.Tensor | None = None,
    chunk: int = 4096,
    workspace: dict | None = None,
    width: int = GRAM_WIDTH,
) -> Codes:
    """ICFL encoding through the Gram matrix G = W^T W.

    After picking S with coefficients c the scores become ``s - G[:, S] c``, and the normal
    equations use G[S, S], so an iteration costs B*M*L instead of the B*D*M of rescoring the
    residual. That update is bound by memory, not arithmetic, so scores and G are kept in
    column blocks of ``width`` atoms (:func:`gram_blocks`): the update is one sparse-dense
    product over the stacked blocks, block after block, so each block of G stays in cache while
    every token's scores in that block are updated, and G streams from memory once per
    iteration. One product rather than a call per block also matters on a shared machine: with
    several threads, every parallel call waits for a thread another process may hold. Each
    block's per-token maximum is all the next pick needs to find its candidates
    (:func:`_pick_blocked`). Tokens go through in chunks of ``chunk`` (the scores take
    chunk x M floats).

    ``gram``: G in the layout :func:`gram_blocks` returns for the padded atoms, when the caller
    has it. ``workspace``, a dict the caller keeps between calls (the training step does),
    holds G and the score buffers so that repeated calls reuse their memory.
    """
    b, m = residual.shape[0], atoms.shape[0]
    if workspace is None:
        workspace = {}  # the chunks of this call share their buffers
    width = _block_width(m, width)
    if gram is not None and gram.shape[-1] != width:
        raise ValueError(f"the Gram blocks are {gram.shape[-1]} wide, the pursuit's {width}")
    padded = _padded_atoms(atoms, width)
    mp = padded.shape[0]
    n_blocks = mp // width
    if gram is None:
        gram = gram_blocks(
            padded, width, workspace_buffer(workspace, "gram", (n_blocks, mp, width), atoms)
        )
    blocks_t = padded.view(n_blocks, width, -1).transpose(1, 2)  # (blocks, D, width)
    flat_gram = gram.view(-1)
    stacked_gram = gram.view(n_blocks * mp, width)
    block_rows = (torch.arange(n_blocks, device=atoms.device) * mp).view(n_blocks, 1, 1)
    values = residual.new_empty(b, n_iter * n_pick)
    indices = torch.empty(b, n_iter * n_pick, dtype=torch.long, device=residual.device)
    for start in range(0, b, chunk):
        rows = slice(start, start + chunk)
        n = min(chunk, b - start)
        scores = workspace_buffer(workspace, "scores", (n_blocks, n, width), residual)
        block_max = workspace_buffer(workspace, "block_max", (n_blocks, n), residual)
        torch.matmul(residual[rows], blocks_t, out=scores)
        if mp > m:
            scores[-1, :, width - (mp - m) :] = -torch.inf  # padding atoms are never picked
        torch.amax(scores, 2, out=block_max)
        for j in range(n_iter):
            rhs, picked = _pick_blocked(scores, block_max, n_pick)
            # G[S, S] per token: G[s1, s2] sits at gram[s2 // width, s1, s2 % width]
            s1, s2 = picked.unsqueeze(2), picked.unsqueeze(1)
            gss = flat_gram.take((s2 // width) * (mp * width) + s1 * width + s2 % width)
            coef = _solve(gss, rhs)
            slots = slice(j * n_pick, (j + 1) * n_pick)
            values[rows, slots] = coef
            indices[rows, slots] = picked
            if j == n_iter - 1:
                break  # the scores after the last pick are not needed
            # scores[k] -= C G[:, block k] for every block k at once: one CSR product whose row
            # (k, b) holds token b's L coefficients at rows k*M + S of the stacked blocks of G
            cols = (block_rows + picked).view(n_blocks * n, n_pick)
            update = _coefficient_matrix(cols, coef.expand(n_blocks, n, n_pick), n_blocks * mp)
            scores.view(n_blocks * n, width).addmm_(update, stacked_gram)
            torch.amax(scores, 2, out=block_max)
    return Codes(values, indices)


@torch.no_grad()
def pursuit_plain(residual: torch.Tensor, atoms: torch.Tensor, n_iter: int, n_pick: int) -> Codes:
    """The same pursuit computed directly: rescore the residual against every atom each time.

    Kept for the benchmark and as a cross-check; it costs B*D*M per iteration.
    """
    r = residual.clone()
    values, indices = [], []
    for _ in range(n_iter):
        scores = r @ atoms.T
        picked = top_l(scores, n_pick)[1]
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
            raise DictionaryError(
                f"ICFL needs J >= 1 and 1 <= L <= M; got J={config.n_iter}, "
                f"L={config.n_pick}, M={config.n_atoms}"
            )
        g = torch.Generator().manual_seed(seed)
        self.W = nn.Parameter(_unit_rows(torch.randn(config.n_atoms, d_in, generator=g)))
        self.b = nn.Parameter(torch.zeros(d_in))
        self._workspace: dict | None = {}
        self._gram_cache: tuple | None = None

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

    def encode(
        self, x: torch.Tensor, gram: torch.Tensor | None = None, workspace: dict | None = None
    ) -> Codes:
        """Codes of ``x``: the compiled kernel on a CPU, the torch Gram pursuit elsewhere.

        ``gram``, when given, must be in the layout the device's pursuit takes
        (:func:`.pursuit_cpu.gram_rows` on a CPU, :func:`gram_blocks` elsewhere).
        """
        cfg = self.config
        with torch.no_grad():
            if cfg.pursuit == "plain":
                return pursuit_plain(x - self.b, self.W, cfg.n_iter, cfg.n_pick)
            if not self.training and gram is None:
                gram = self._fixed_gram()
            if workspace is not None or self.training:
                return self._pursue(x, gram, workspace)
            with ENCODE_WORKSPACES.lease() as borrowed:
                return self._pursue(x, gram, borrowed)

    def _pursue(self, x: torch.Tensor, gram, workspace: dict | None) -> Codes:
        cfg = self.config
        if x.dtype == self.b.dtype and workspace is not None:
            r = workspace_buffer(workspace, "residual", tuple(x.shape), x)  # no fresh pages
            torch.sub(x, self.b, out=r)
        else:
            r = x - self.b
        if r.device.type == "cpu":
            return pursuit_rows(r, self.W, cfg.n_iter, cfg.n_pick, gram, workspace=workspace)
        return pursuit_gram(r, self.W, cfg.n_iter, cfg.n_pick, gram, workspace=workspace)

    def _fixed_gram(self) -> torch.Tensor:
        """G of the atoms as they are now, computed once and kept while they do not change.

        Applying a trained dictionary batch after batch (a store, a site in the viewer) would
        otherwise multiply out the same (M, M) Gram matrix for every batch. The key is the
        atoms' storage and version counter, which every in-place change (a training step,
        ``load_tensors``) bumps. The cached tensor is never written to, so concurrent encodes
        may share it.
        """
        w = self.W.detach()
        key = (w.data_ptr(), self.W._version, w.dtype, w.device, tuple(w.shape))
        cached = self._gram_cache
        if cached is None or cached[0] != key:
            if w.device.type == "cpu":
                gram = gram_rows(w)
            else:
                width = _block_width(w.shape[0])
                gram = gram_blocks(_padded_atoms(w, width), width)
            cached = self._gram_cache = (key, gram)
        return cached[1]

    def train(self, mode: bool = True):
        # training steps reuse the pursuit's (M, M) Gram and score buffers; evaluation and
        # encoding use their thread's buffers (so concurrent encodes never share memory), and
        # leaving training frees the training buffers
        if not mode:
            self._workspace = None
        elif self._workspace is None:
            self._workspace = {}
        return super().train(mode)

    def encode_prefix(self, x: torch.Tensor, width: int, workspace: dict | None = None) -> Codes:
        """Codes of ``x`` by the first ``width`` atoms alone: the same pursuit (J iterations of
        min(L, width) picks) run on that prefix as if it were the whole dictionary."""
        cfg = self.config
        if width >= self.n_atoms:
            return self.encode(x, workspace=workspace)
        atoms = self.W[:width]
        n_pick = min(cfg.n_pick, width)
        with torch.no_grad():
            r = x - self.b
            if cfg.pursuit == "plain":
                return pursuit_plain(r, atoms, cfg.n_iter, n_pick)
            if r.device.type == "cpu":
                return pursuit_rows(r, atoms, cfg.n_iter, n_pick, workspace=workspace)
            return pursuit_gram(r, atoms, cfg.n_iter, n_pick, workspace=workspace)

    def _loss(self, x: torch.Tensor, codes: Codes) -> tuple[torch.Tensor, torch.Tensor]:
        if x.device.type == "cpu" and self.W.device.type == "cpu":
            return fixed_codes_loss(x, codes, self.W, self.b)
        x_hat = self.decode(codes)
        return x_hat, (x - x_hat).pow(2).sum(1).mean()

    def forward(self, x: torch.Tensor) -> ForwardOutput:
        """Reconstruction, codes and loss with the codes held fixed.

        A nested dictionary (``config.levels``) adds, for each smaller prefix, the loss of that
        prefix's own code. ICFL has no encoder to truncate: its code is a pursuit against the
        atoms there are, so what a prefix "alone" means is the pursuit run on the prefix
        (:meth:`encode_prefix`), not the full code cut to the prefix's atoms (that would leave
        the residual that later atoms took up, which the prefix never gets to explain). Each
        prefix's pursuit costs B*m*L per iteration, so levels 16/64/256/M add about a third to
        a step's pursuit.
        """
        workspace = self._workspace if self.training else None
        codes = self.encode(x, workspace=workspace)
        x_hat, loss = self._loss(x, codes)
        metrics = {"loss": float(loss.detach())}
        for width in (self.config.levels or [])[:-1]:
            prefix_loss = self._loss(x, self.encode_prefix(x, width, workspace))[1]
            loss = loss + prefix_loss
            metrics[f"loss_{width}"] = float(prefix_loss.detach())
        metrics["loss"] = float(loss.detach())
        return ForwardOutput(x_hat, codes, loss, metrics)

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
