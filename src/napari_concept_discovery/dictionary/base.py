"""What ICFL and the TopK SAE share: configs that round-trip JSON, codes, and the module API.

Following sparsify's split, every method is an ``nn.Module`` with ``encode`` (tokens to sparse
codes), ``decode`` (codes to tokens) and ``forward`` (a named tuple with the reconstruction, the
codes and the loss terms), so that the training loop, the metrics and the file format never
branch on the method except to build the module.
"""

from __future__ import annotations

import ctypes
import mmap
from typing import ClassVar, NamedTuple

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .config import DictionaryConfig  # noqa: F401  (the config of this module's method)


class Codes(NamedTuple):
    """Sparse codes as ``values`` and ``indices`` of shape (B, slots).

    A slot whose value is zero is inactive. An index may repeat within a row (ICFL can pick an
    atom again in a later pursuit iteration); decoding and conversion to a sparse matrix sum
    repeats, so every consumer sees the same code.
    """

    values: torch.Tensor
    indices: torch.Tensor


class ForwardOutput(NamedTuple):
    """What ``forward`` returns: reconstruction, codes, the loss to minimise, and batch metrics."""

    reconstruction: torch.Tensor
    codes: Codes
    loss: torch.Tensor
    metrics: dict[str, float]


def scatter_rows(indices: torch.Tensor, weights: torch.Tensor, x: torch.Tensor, n_rows: int):
    """out[m] = sum of weights[b, s] * x[b] over the slots (b, s) with indices[b, s] == m.

    The gradient of a sparse code's atoms (or of the chosen encoder rows) has this form. A
    sparse (n_rows x B) matrix times x does it several times faster on a CPU than ``index_add``
    of B*slots scaled copies of the rows, and sums repeated indices.
    """
    b, slots = indices.shape
    rows = torch.arange(b, device=x.device).repeat_interleave(slots)
    coo = torch.sparse_coo_tensor(
        torch.stack([indices.reshape(-1), rows]),
        weights.reshape(-1).to(x.dtype),
        (n_rows, b),
        check_invariants=False,
    )
    return torch.sparse.mm(coo, x)


class _SparseDecode(torch.autograd.Function):
    """``embedding_bag`` forward; backward through :func:`scatter_rows` for the atoms."""

    @staticmethod
    def forward(ctx, values, indices, atoms):
        ctx.save_for_backward(values, indices, atoms)
        return F.embedding_bag(indices, atoms, per_sample_weights=values, mode="sum")

    @staticmethod
    def backward(ctx, grad):
        values, indices, atoms = ctx.saved_tensors
        grad_values = grad_atoms = None
        if ctx.needs_input_grad[0]:
            with torch.enable_grad():
                v = values.detach().requires_grad_()
                out = F.embedding_bag(indices, atoms.detach(), per_sample_weights=v, mode="sum")
                (grad_values,) = torch.autograd.grad(out, v, grad)
        if ctx.needs_input_grad[2]:
            grad_atoms = scatter_rows(indices, values, grad, atoms.shape[0])
        return grad_values, None, grad_atoms


def sparse_decode(codes: Codes, atoms: torch.Tensor) -> torch.Tensor:
    """Sum of the chosen atoms (rows of ``atoms``) weighted by the code values.

    ``embedding_bag`` gathers only the B x slots rows it needs, so decoding costs B*slots*D
    instead of the B*M*D of a dense code matrix times the dictionary; the backward gives the
    gradients of both the atoms and the values at the same sparse cost.
    """
    values = codes.values.to(atoms.dtype)
    if torch.is_grad_enabled() and (values.requires_grad or atoms.requires_grad):
        return _SparseDecode.apply(values, codes.indices, atoms)
    return F.embedding_bag(codes.indices, atoms, per_sample_weights=values, mode="sum")


def fired_mask(codes: Codes, n_atoms: int) -> torch.Tensor:
    """Which atoms are active (non-zero code) on at least one token of the batch."""
    hits = torch.zeros(n_atoms, dtype=torch.float32)
    hits.index_add_(0, codes.indices.reshape(-1), (codes.values != 0).reshape(-1).float())
    return hits > 0


def codes_to_csr(codes: Codes, n_atoms: int):
    """Codes as a scipy CSR matrix (tokens x atoms); repeated indices are summed, zeros dropped."""
    import scipy.sparse as sp

    values = codes.values.detach().cpu().numpy()
    indices = codes.indices.detach().cpu().numpy()
    n, slots = values.shape
    rows = np.repeat(np.arange(n), slots)
    m = sp.coo_matrix(
        (values.ravel().astype(np.float32), (rows, indices.ravel())), shape=(n, n_atoms)
    ).tocsr()
    m.sum_duplicates()
    m.eliminate_zeros()
    return m


class SparseDictionary(nn.Module):
    """A dictionary of ``n_atoms`` unit-norm atoms in a ``d_in``-dimensional token space.

    Subclasses provide ``encode``, ``forward`` and the hooks the training loop calls around the
    optimiser step. ``atoms`` is (M, D): one row per atom, the transpose of the W in x ~ W z + b
    (docs/architecture.md, "Dictionaries").
    """

    method: ClassVar[str] = ""
    config: DictionaryConfig

    def __init__(self, d_in: int, config: DictionaryConfig):
        super().__init__()
        self.d_in = int(d_in)
        self.config = config

    @property
    def n_atoms(self) -> int:
        return int(self.config.n_atoms)

    @property
    def atoms(self) -> torch.Tensor:
        raise NotImplementedError

    @property
    def bias(self) -> torch.Tensor:
        raise NotImplementedError

    def encode(self, x: torch.Tensor) -> Codes:
        raise NotImplementedError

    def decode(self, codes: Codes) -> torch.Tensor:
        return sparse_decode(codes, self.atoms) + self.bias

    def init_from_data(self, sample: torch.Tensor, generator: torch.Generator) -> None:
        """Set data-dependent initial values (bias at the data median) before training."""

    def before_step(self) -> None:
        """Called after ``backward`` and before the optimiser step."""

    def after_step(self, step: int, optimizer: torch.optim.Optimizer) -> None:
        """Called after the optimiser step (renormalise atoms, redraw duplicates...)."""

    def make_optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.config.lr)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The learned tensors under the names the dictionary file uses."""
        raise NotImplementedError

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError


#: Size of a transparent huge page on x86-64 and arm64 Linux (2 MiB).
HUGE_PAGE = 1 << 21


def _libc_madvise():
    """libc's ``madvise`` through ctypes, or None where there is none (not Linux/glibc)."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    fn.restype = ctypes.c_int
    return fn


_MADVISE = _libc_madvise()


def huge_empty(n: int, like: torch.Tensor) -> torch.Tensor:
    """An uninitialised 1-D CPU tensor of ``n`` elements like ``like``, its whole 2 MiB pages
    advised onto transparent huge pages where the system offers them on request (Linux's
    ``madvise`` mode).

    ICFL's CPU pursuit reads random rows of the (M, M) Gram matrix, 64 MiB at M = 4096. On 4 KiB
    pages each row spans four pages, every read of G[S, S] is a TLB miss, and the hardware
    prefetchers stop at each page boundary; on 2 MiB pages the kernel ran 10-20% faster here
    (benchmarks/profile_icfl.py).

    The memory is torch's own allocation (one huge page larger, so an aligned run fits inside
    it); only advice is added. It must never be a Python object seen through the tensor
    (``torch.frombuffer`` over an ``mmap``, ``torch.from_numpy``): such a tensor's deleter
    re-enters Python, and when the last reference goes while a thread's Python state is torn
    down (a per-thread workspace of a Qt pool thread), that deletes the thread state twice and
    crashes the process (tests/dictionary/test_thread_teardown.py).
    """
    size = like.element_size()
    advise = getattr(mmap, "MADV_HUGEPAGE", None)
    if like.device.type != "cpu" or n * size < HUGE_PAGE or advise is None or _MADVISE is None:
        return like.new_empty(n)
    raw = like.new_empty(n + HUGE_PAGE // size)
    skip = (-raw.data_ptr()) % HUGE_PAGE  # huge pages need 2 MiB-aligned addresses
    out = raw[skip // size : skip // size + n]
    whole = (n * size) // HUGE_PAGE * HUGE_PAGE
    _MADVISE(out.data_ptr(), whole, advise)  # advice only: a refusal leaves ordinary pages
    return out


def workspace_buffer(
    workspace: dict | None, name: str, shape, like: torch.Tensor, huge: bool = False
):
    """An uninitialised tensor of ``shape`` like ``like``, reused from ``workspace`` (a dict the
    caller keeps between calls) when one fits; fresh when there is no workspace. ``huge``: on
    huge pages where possible (:func:`huge_empty`), for large buffers read at random."""
    n = 1
    for s in shape:
        n *= s
    if workspace is None:
        return (huge_empty(n, like) if huge else like.new_empty(n)).view(shape)
    buf = workspace.get(name)
    if buf is None or buf.dtype != like.dtype or buf.device != like.device or buf.numel() < n:
        buf = workspace[name] = huge_empty(n, like) if huge else like.new_empty(n)
    return buf[:n].view(shape)


def coordinate_median(x: torch.Tensor) -> torch.Tensor:
    """Per-dimension median: where tokens sit when no atom is active, if codes are sparse."""
    return x.median(dim=0).values


def batch_fvu(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """FVU on one batch, as in :mod:`.metrics` but centred on the batch mean."""
    with torch.no_grad():
        err = (x - x_hat).pow(2).sum()
        var = (x - x.mean(0)).pow(2).sum().clamp_min(1e-30)
        return float(err / var)
