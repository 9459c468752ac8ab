"""ICFL's Gram pursuit as one compiled CPU kernel: token by token, every iteration in cache.

The torch Gram pursuit (:func:`.icfl.pursuit_gram`) runs iteration by iteration over the whole
batch, so the batch x M score matrix streams through memory once per iteration and every
step (pick, solve, update, block maxima) is a separate pass. Here each token runs all J
iterations while its M scores (16 KiB at M = 4096) stay in the core's cache; the update reads
the L picked rows of the full symmetric G = W W^T (shared by all tokens, so it stays in the
last-level cache) and computes the block maxima of the updated scores in the same pass, and
the pick, the L x L Cholesky solve and the update never leave the token. Tokens are
independent, so they spread over threads with no synchronisation.

The arithmetic is the torch pursuit's (same scores, same exact block-wise top-L, same ridge in
the normal equations); only the order of the floating-point sums in the update differs, so the
codes agree to rounding (the tests compare supports and values with both torch pursuits).
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from .base import Codes, huge_empty, workspace_buffer

#: Scores per block whose maximum the pick keeps (see :func:`_pursuit_rows`).
BLOCK = 128

#: Scores held at once by default (2^25 floats, 128 MiB in float32): 8,192 tokens at M = 4096.
SCORE_BUDGET = 1 << 25

# Not "fast" math: no assumption that values are finite (a NaN token must not turn into an
# out-of-range read); reassociation and contraction are what vectorise the update and maxima.
_MATH = {"nsz", "arcp", "contract", "reassoc"}
#: The pursuit's kernels without reassociation: with it, a process that compiled them fresh
#: summed in another order than one that loaded them from numba's disk cache (its codes
#: differed in the last bits), so the first training on a machine gave another dictionary
#: than every later one with the same seed. Without it the two agree bit for bit
#: (tests/dictionary/test_pursuit_cpu.py), and the pursuit is as fast (its update is
#: elementwise; the block maxima are the intrinsic below).
_PURSUIT_MATH = _MATH - {"reassoc"}


#: ``CONCEPT_DISCOVERY_CHECKED_KERNELS=1`` (the tests set it) compiles the kernels with bounds
#: checks: an index past an array raises IndexError in the call that made it, instead of
#: writing over memory that a later, unrelated call (or another thread) finds corrupted.
CHECKED = os.environ.get("CONCEPT_DISCOVERY_CHECKED_KERNELS", "") == "1"


def _compiled(fn=None, *, math=_MATH):
    """``fn`` compiled without the GIL, cached on disk where numba finds a writable place (the
    package's folder, else the user's cache folder); where it finds none (a read-only install
    and home), compiled anew in each process rather than failing the import. With
    :data:`CHECKED`, compiled with bounds checks and never cached (the cache holds the fast
    build). ``math``: the fast-math flags (``@_compiled(math=...)``)."""
    if fn is None:
        return lambda f: _compiled(f, math=math)
    options = dict(nogil=True, fastmath=math, error_model="numpy", boundscheck=CHECKED)
    if CHECKED:
        return njit(**options)(fn)
    try:
        return njit(cache=True, **options)(fn)
    except RuntimeError:  # "cannot cache function ...: no locator available"
        return njit(**options)(fn)


#: Threads that run the kernel on runs of rows (it releases the GIL). Plain Python threads
#: rather than numba's parallel loops: numba's OpenMP layer shares the OpenMP runtime with
#: torch and changes its thread count, and its fallback layer may not be entered from two
#: threads at once, as the viewer's workers would.
_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def _pool() -> ThreadPoolExecutor:
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(os.cpu_count() or 1, thread_name_prefix="icfl-pursuit")
        return _POOL


def _forget_pool() -> None:
    """In a forked child the pool's threads do not exist; a new pool is made on first use."""
    global _POOL, _POOL_LOCK
    _POOL, _POOL_LOCK = None, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


def _runs(n: int) -> list[tuple[int, int]]:
    """``n`` rows cut into one contiguous run per torch thread (at most ``n``, at least one)."""
    cuts = np.linspace(0, n, max(1, min(torch.get_num_threads(), n)) + 1).astype(int)
    return [(int(lo), int(hi)) for lo, hi in zip(cuts[:-1], cuts[1:], strict=True)]


def _threaded(kernel, runs, *args) -> list:
    """``kernel(*args, lo, hi)`` for every run: the first on this thread, the others in the
    pool meanwhile. Returns the results in the order of the runs."""
    jobs = [_pool().submit(kernel, *args, lo, hi) for lo, hi in runs[1:]]
    first = kernel(*args, *runs[0])
    return [first] + [job.result() for job in jobs]


@_compiled(math=_PURSUIT_MATH)
def _solve_into(gss, rhs, out, ridge, tiny):
    """Solve gss out = rhs by Cholesky (gss overwritten), as ``icfl._solve`` does."""
    n = gss.shape[0]
    for j in range(n):
        s = gss[j, j] + ridge
        for k in range(j):
            s -= gss[j, k] * gss[j, k]
        if s < tiny:  # clamp_min; a NaN stays NaN
            s = tiny
        d = np.sqrt(s)
        gss[j, j] = d
        for i in range(j + 1, n):
            t = gss[i, j]
            for k in range(j):
                t -= gss[i, k] * gss[j, k]
            gss[i, j] = t / d
    for i in range(n):
        t = rhs[i]
        for k in range(i):
            t -= gss[i, k] * out[k]
        out[i] = t / gss[i, i]
    for i in range(n - 1, -1, -1):
        t = out[i]
        for k in range(i + 1, n):
            t -= gss[k, i] * out[k]
        out[i] = t / gss[i, i]


@intrinsic
def _block_max(typingctx, row, start):
    """max(row[start : start + BLOCK]) of a contiguous float32/float64 row, in 256-bit vectors.

    Written as LLVM vector compares and selects because numba's loops (and LLVM's vectoriser
    on them) keep this reduction scalar, a chain of compares that cost the kernel a fifth of
    its time. A compare with NaN is false, so a NaN never wins a block. ``row`` must hold
    ``start + BLOCK`` values (the kernel's blocks are whole; the caller pads).
    """
    if not (
        isinstance(row, types.Array)
        and row.ndim == 1
        and row.layout == "C"
        and row.dtype in (types.float32, types.float64)
    ):
        return None
    lanes = 8 if row.dtype == types.float32 else 4
    n_vectors = BLOCK // lanes

    def codegen(context, builder, signature, args):
        data = context.make_array(signature.args[0])(context, builder, args[0]).data
        vector = ir.VectorType(context.get_value_type(signature.args[0].dtype), lanes)
        first = builder.bitcast(builder.gep(data, [args[1]]), vector.as_pointer())

        def load(i):
            return builder.load(builder.gep(first, [ir.Constant(ir.IntType(64), i)]), align=4)

        def larger(x, y):
            return builder.select(builder.fcmp_ordered(">", x, y), x, y)

        acc = [load(i) for i in range(4)]  # four independent chains
        for i in range(4, n_vectors, 4):
            acc = [larger(load(i + j), acc[j]) for j in range(4)]
        top = larger(larger(acc[1], acc[0]), larger(acc[3], acc[2]))
        best = builder.extract_element(top, ir.Constant(ir.IntType(32), 0))
        for i in range(1, lanes):
            best = larger(builder.extract_element(top, ir.Constant(ir.IntType(32), i)), best)
        return best

    return row.dtype(row, types.intp), codegen


@_compiled(math=_PURSUIT_MATH)
def _pursuit_rows(scores, gram, n_iter, n_pick, values, indices, ridge, tiny):
    """Run the pursuit on every row of ``scores`` (B, M) in place, writing the codes.

    M is a multiple of BLOCK (the caller pads). The pick: the ``n_pick`` largest scores of a
    row lie in its ``n_pick`` blocks with the largest maxima, so only those blocks are
    searched (exact, as ``icfl.top_l``). Fixed-width blocks are what let the update and the
    maxima vectorise. Runs without the GIL: the caller's threads each take a run of rows.
    """
    n, m = scores.shape
    # the block maxima read whole blocks through raw vector loads, which no bounds check sees
    if m % BLOCK != 0 or gram.shape[0] < m or gram.shape[1] < m:
        raise ValueError("ICFL kernel: scores and G must have whole blocks of columns")
    if values.shape[0] < n or values.shape[1] < n_iter * n_pick or indices.shape != values.shape:
        raise ValueError("ICFL kernel: the code arrays are smaller than J x L per row")
    nb = m // BLOCK
    nsel = min(n_pick, nb)
    bmax = np.empty(nb, scores.dtype)
    best = np.empty(nsel, np.int64)
    bestv = np.empty(nsel, scores.dtype)
    topv = np.empty(n_pick, scores.dtype)
    topi = np.empty(n_pick, np.int64)
    gss = np.empty((n_pick, n_pick), scores.dtype)
    coef = np.empty(n_pick, scores.dtype)
    for b in range(n):
        _pursue_row(
            scores[b],
            gram,
            n_iter,
            values[b],
            indices[b],
            ridge,
            tiny,
            bmax,
            best,
            bestv,
            topv,
            topi,
            gss,
            coef,
        )


@_compiled(math=_PURSUIT_MATH)
def _pursue_row(
    row, gram, n_iter, values, indices, ridge, tiny, bmax, best, bestv, topv, topi, gss, coef
):
    """The pursuit for one token: ``row`` (its M scores) is updated in place.

    The remaining arguments are scratch arrays, allocated once per call of the kernel.
    """
    nb, nsel, n_pick = bmax.shape[0], best.shape[0], topv.shape[0]
    for k in range(nb):
        bmax[k] = _block_max(row, k * BLOCK)
    for j in range(n_iter):
        # the nsel blocks with the largest maxima (insertion into a short sorted list; this and
        # the scan below are written out: a shared helper, even inlined, made the kernel 15%
        # slower)
        cnt = 0
        for k in range(nb):
            v = bmax[k]
            if cnt < nsel:
                pos = cnt
                cnt += 1
            elif v > bestv[nsel - 1]:
                pos = nsel - 1
            else:
                continue
            while pos > 0 and bestv[pos - 1] < v:
                bestv[pos] = bestv[pos - 1]
                best[pos] = best[pos - 1]
                pos -= 1
            bestv[pos] = v
            best[pos] = k
        # the n_pick largest scores within them: none is below the smallest of those maxima
        floor = bestv[nsel - 1] if nsel == n_pick else -np.inf
        cnt = 0
        for q in range(nsel):
            o = best[q] * BLOCK
            for t in range(BLOCK):
                v = row[o + t]
                if v < floor:
                    continue
                if cnt < n_pick:
                    pos = cnt
                    cnt += 1
                elif v > topv[n_pick - 1]:
                    pos = n_pick - 1
                else:
                    continue
                while pos > 0 and topv[pos - 1] < v:
                    topv[pos] = topv[pos - 1]
                    topi[pos] = topi[pos - 1]
                    pos -= 1
                topv[pos] = v
                topi[pos] = o + t
        for p in range(n_pick):
            for q in range(n_pick):
                gss[p, q] = gram[topi[p], topi[q]]
        _solve_into(gss, topv, coef, ridge, tiny)
        for p in range(n_pick):
            values[j * n_pick + p] = coef[p]
            indices[j * n_pick + p] = topi[p]
        if j == n_iter - 1:
            break
        # scores -= G[:, S] c, block by block so each block is updated and reduced in cache
        for k in range(nb):
            o = k * BLOCK
            p = 0
            while p + 4 <= n_pick:  # four rows of G per pass over the block
                c0, c1, c2, c3 = coef[p], coef[p + 1], coef[p + 2], coef[p + 3]
                g0, g1, g2, g3 = (
                    gram[topi[p]],
                    gram[topi[p + 1]],
                    gram[topi[p + 2]],
                    gram[topi[p + 3]],
                )
                for t in range(BLOCK):
                    row[o + t] -= c0 * g0[o + t] + c1 * g1[o + t] + c2 * g2[o + t] + c3 * g3[o + t]
                p += 4
            while p < n_pick:
                c = coef[p]
                g = gram[topi[p]]
                for t in range(BLOCK):
                    row[o + t] -= c * g[o + t]
                p += 1
            bmax[k] = _block_max(row, o)


def _pursue_run(scores, gram, n_iter, n_pick, values, indices, ridge, tiny, lo, hi):
    """The kernel on rows lo:hi (one thread's run)."""
    rows = slice(lo, hi)
    _pursuit_rows(scores[rows], gram, n_iter, n_pick, values[rows], indices[rows], ridge, tiny)


def padded_size(m: int) -> int:
    """M rounded up to whole blocks: the kernel's scores and G carry that many columns."""
    return -(-m // BLOCK) * BLOCK


def gram_rows(atoms: torch.Tensor, out: torch.Tensor | None = None, width: int = 256):
    """G = W W^T, row-major, zero-padded to (M', M') with M' = :func:`padded_size` (M).

    Row block k is multiplied out from its diagonal on (about half the multiply-adds of the
    full product), and the part below the diagonal is copied from the transposed part above,
    so G is exactly symmetric. The zero padding leaves padded scores unchanged by
    every update.
    """
    m = atoms.shape[0]
    mp = padded_size(m)
    if out is None:
        out = huge_empty(mp * mp, atoms).view(mp, mp)
    for a in range(0, m, width):
        e = min(a + width, m)
        torch.mm(atoms[a:e], atoms[a:].T, out=out[a:e, a:m])
    for a in range(0, m, width):
        e = min(a + width, m)
        out[e:m, a:e].copy_(out[a:e, e:m].T)
        # a diagonal block's product is symmetric only up to the order of its sums, which the
        # matmul kernel may choose per tile: mirror its upper triangle too
        block = out[a:e, a:e]
        block.copy_(block.triu() + block.triu(1).T)
    if mp > m:
        out[m:].zero_()
        out[:m, m:].zero_()
    return out


@torch.no_grad()
def pursuit_rows(
    residual: torch.Tensor,
    atoms: torch.Tensor,
    n_iter: int,
    n_pick: int,
    gram: torch.Tensor | None = None,
    chunk: int | None = None,
    workspace: dict | None = None,
) -> Codes:
    """ICFL encoding of CPU tensors through the compiled kernel (same codes as ``pursuit_gram``).

    ``gram``: :func:`gram_rows` of ``atoms`` when the caller has it. ``workspace``, a dict the
    caller keeps between calls, holds G and the score buffer so repeated calls reuse their
    memory. Tokens go through in chunks of ``chunk`` (the scores take chunk x M floats; by
    default as many tokens as fit :data:`SCORE_BUDGET`, so that a viewer's site is one product
    and one kernel call). Uses as many threads as torch is set to.
    """
    if residual.device.type != "cpu" or atoms.device.type != "cpu":
        raise ValueError("pursuit_rows runs on CPU tensors; use icfl.pursuit_gram on a GPU")
    b, m = residual.shape[0], atoms.shape[0]
    mp = padded_size(m)
    chunk = max(1, SCORE_BUDGET // mp) if chunk is None else chunk
    atoms = atoms.detach()
    residual = residual.detach().to(atoms.dtype)
    if gram is None:
        gram = gram_rows(
            atoms, workspace_buffer(workspace, "gram_rows", (mp, mp), atoms, huge=True)
        )
    if gram.shape != (mp, mp):
        raise ValueError(f"G is {tuple(gram.shape)}; gram_rows gives ({mp}, {mp}) for {m} atoms")
    g = gram.numpy()
    # torch owns the codes' memory and the kernel writes through numpy views of it: a tensor
    # made by from_numpy would hold a Python object, which is not safe to free in every thread
    # (see base.huge_empty)
    codes = Codes(
        torch.empty((b, n_iter * n_pick), dtype=atoms.dtype),
        torch.empty((b, n_iter * n_pick), dtype=torch.int64),
    )
    values, indices = codes.values.numpy(), codes.indices.numpy()
    finfo = torch.finfo(atoms.dtype)
    ridge, tiny = g.dtype.type(10 * finfo.eps), g.dtype.type(finfo.tiny)
    for start in range(0, b, chunk):
        n = min(chunk, b - start)
        scores = workspace_buffer(workspace, "scores_rows", (n, mp), atoms, huge=True)
        torch.mm(residual[start : start + n], atoms.T, out=scores[:, :m])
        if mp > m:
            scores[:, m:] = finfo.min  # padding atoms are never picked
        s, v, i = scores.numpy(), values[start : start + n], indices[start : start + n]
        _threaded(_pursue_run, _runs(n), s, g, n_iter, n_pick, v, i, ridge, tiny)
    if b and int(indices.max()) >= m:  # only when scores were NaN: no real atom compared higher
        raise ValueError("ICFL pursuit: tokens or atoms hold NaN or infinite values")
    return codes
