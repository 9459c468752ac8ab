"""The compiled CPU pursuit (``pursuit_cpu``) gives the torch pursuits' codes, on any M, dtype,
thread count and thread, and ICFL on a CPU goes through it."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from napari_concept_discovery.dictionary import ICFL, ICFLConfig, train
from napari_concept_discovery.dictionary import pursuit_cpu as P
from napari_concept_discovery.dictionary.icfl import pursuit_gram, pursuit_plain


def _unit(w: torch.Tensor) -> torch.Tensor:
    return w / w.norm(dim=1, keepdim=True)


def _problem(m: int, d: int, n: int, seed: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    atoms = _unit(torch.randn(m, d, generator=g, dtype=torch.float64)).to(dtype)
    x = torch.randn(n, d, generator=g, dtype=torch.float64).to(dtype)
    return x, atoms


def _dense(codes, m: int) -> np.ndarray:
    out = np.zeros((codes.values.shape[0], m))
    rows = np.repeat(np.arange(out.shape[0]), codes.values.shape[1])
    np.add.at(out, (rows, codes.indices.numpy().ravel()), codes.values.numpy().ravel())
    return out


def _picks_per_iteration(codes, n_iter: int, n_pick: int) -> np.ndarray:
    """(B, J, L) picked atoms, sorted within each iteration (the order within one is free)."""
    return np.sort(codes.indices.numpy().reshape(-1, n_iter, n_pick), axis=2)


@pytest.mark.parametrize(
    "m,n_iter,n_pick",
    [
        (512, 8, 4),  # whole blocks
        (300, 3, 5),  # padded to 384: the padding is never picked
        (64, 8, 4),  # one block, narrower than BLOCK
        (7, 2, 3),  # fewer atoms than one block, picks from the only block
        (1024, 4, 8),  # more picks than some blocks hold candidates above the floor
    ],
)
def test_kernel_picks_what_the_plain_pursuit_picks_in_float64(m, n_iter, n_pick):
    """In float64 rounding cannot flip a pick: the kernel, the torch Gram pursuit and the plain
    pursuit (rescoring the residual every iteration) agree pick for pick, iteration by
    iteration, and the codes agree to 1e-9."""
    x, atoms = _problem(m, 24, 400, seed=m, dtype=torch.float64)
    ours = P.pursuit_rows(x, atoms, n_iter, n_pick)
    plain = pursuit_plain(x, atoms, n_iter, n_pick)
    gram = pursuit_gram(x, atoms, n_iter, n_pick)
    assert ours.values.dtype == torch.float64 and ours.indices.dtype == torch.int64
    assert int(ours.indices.max()) < m and int(ours.indices.min()) >= 0
    ours_picks = _picks_per_iteration(ours, n_iter, n_pick)
    if m < 4 * n_pick * n_iter:
        # 7 atoms: after the first fit, the picked atoms' scores are zero up to rounding and
        # may outrank the rest, so only the first iteration is defined
        np.testing.assert_array_equal(
            ours_picks[:, 0], _picks_per_iteration(plain, n_iter, n_pick)[:, 0]
        )
        return
    np.testing.assert_array_equal(ours_picks, _picks_per_iteration(plain, n_iter, n_pick))
    np.testing.assert_array_equal(ours_picks, _picks_per_iteration(gram, n_iter, n_pick))
    np.testing.assert_allclose(_dense(ours, m), _dense(plain, m), atol=1e-9)


def test_kernel_matches_the_torch_pursuit_in_float32_at_the_benchmark_size():
    """M = 4096, D = 384, 32 non-zeros in float32, as training runs: the same support on at
    least 99.5% of tokens (rounding may flip a near-tie), values within 1e-4 where it is."""
    x, atoms = _problem(4096, 384, 2000, seed=1)
    ours = P.pursuit_rows(x, atoms, 8, 4)
    ref = pursuit_gram(x, atoms, 8, 4)
    same = (ours.indices.sort(1).values == ref.indices.sort(1).values).all(1)
    assert float(same.float().mean()) >= 0.995
    d_ours, d_ref = _dense(ours, 4096)[same.numpy()], _dense(ref, 4096)[same.numpy()]
    np.testing.assert_allclose(d_ours, d_ref, atol=1e-4)


def test_runs_of_rows_and_threads_do_not_change_the_codes():
    """Tokens are independent in the kernel: any split of the rows gives the same bits, and
    pursuit_rows with two threads gives what it gives with one (the score product is the same
    per chunk, so only the kernel's split differs)."""
    x, atoms = _problem(384, 32, 301, seed=3)
    m = atoms.shape[0]
    gram = P.gram_rows(atoms)
    scores = (x @ atoms.T).numpy()
    eps, tiny = np.float32(10 * np.finfo(np.float32).eps), np.float32(np.finfo(np.float32).tiny)

    def run(parts):
        values = np.empty((len(x), 32), np.float32)
        indices = np.empty((len(x), 32), np.int64)
        s = scores.copy()
        for r in parts:
            P._pursuit_rows(s[r], gram.numpy(), 8, 4, values[r], indices[r], eps, tiny)
        return values, indices

    whole = run([slice(0, len(x))])
    for parts in ([slice(0, 150), slice(150, 301)], [slice(i, i + 1) for i in range(len(x))]):
        got = run(parts)
        np.testing.assert_array_equal(got[0], whole[0])
        np.testing.assert_array_equal(got[1], whole[1])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = P.pursuit_rows(x, atoms, 8, 4, gram)
        torch.set_num_threads(2)
        two = P.pursuit_rows(x, atoms, 8, 4, gram)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one.indices, two.indices) and torch.equal(one.values, two.values)
    assert int(one.indices.max()) < m


def test_gram_rows_is_the_exactly_symmetric_zero_padded_gram_matrix():
    _, atoms = _problem(300, 20, 1, seed=4, dtype=torch.float64)
    g = P.gram_rows(atoms, width=64)
    assert g.shape == (384, 384) == (P.padded_size(300),) * 2
    torch.testing.assert_close(g[:300, :300], atoms @ atoms.T, rtol=0, atol=1e-12)
    assert torch.equal(g, g.T)
    assert not g[300:].any() and not g[:, 300:].any()
    with pytest.raises(ValueError, match=r"gram_rows gives \(384, 384\) for 300 atoms"):
        P.pursuit_rows(torch.zeros(2, 20, dtype=torch.float64), atoms, 2, 2, g[:300, :300])


def test_a_nan_token_leaves_the_other_tokens_codes_alone():
    x, atoms = _problem(256, 16, 50, seed=5)
    clean = P.pursuit_rows(x, atoms, 4, 4)
    x[7] = float("nan")
    got = P.pursuit_rows(x, atoms, 4, 4)
    keep = torch.arange(50) != 7
    assert torch.equal(got.indices[keep], clean.indices[keep])
    assert torch.equal(got.values[keep], clean.values[keep])
    assert int(got.indices.max()) < 256  # every index is a real atom, even for the NaN token
    assert torch.isnan(got.values[7]).all()


def test_icfl_on_a_cpu_encodes_and_trains_through_the_kernel():
    """ICFL.encode on CPU tensors gives the kernel's codes (the cached G is gram_rows' layout);
    training with the same seed twice gives the same atoms bit for bit."""
    x, _ = _problem(1, 48, 600, seed=6)
    model = ICFL(48, ICFLConfig(n_atoms=200, n_iter=4, n_pick=2), seed=0)
    model.init_from_data(x, torch.Generator().manual_seed(0))
    model.eval()
    codes = model.encode(x)
    ref = P.pursuit_rows(x - model.b.detach(), model.W.detach(), 4, 2)
    assert torch.equal(codes.indices, ref.indices) and torch.equal(codes.values, ref.values)
    assert model._fixed_gram().shape == (256, 256)

    def trained(steps: int):
        m = ICFL(48, ICFLConfig(n_atoms=200, n_iter=4, n_pick=2), seed=0)
        train(m, x, steps=steps, batch_size=600, seed=0)  # the library's training loop
        m.train()
        return m.W.detach().clone(), float(m(x).loss.detach())

    (w1, loss1), (w2, loss2) = trained(5), trained(5)
    assert torch.equal(w1, w2) and loss1 == loss2
    assert loss1 < trained(0)[1]  # the steps learned something


def test_concurrent_encodes_from_threads_give_the_serial_codes():
    """The viewer encodes sites from worker threads at once: each gets its serial codes."""
    x, _ = _problem(1, 32, 900, seed=7)
    model = ICFL(32, ICFLConfig(n_atoms=384, n_iter=8, n_pick=4), seed=1).eval()
    parts = [x[i * 300 : (i + 1) * 300] for i in range(3)]
    serial = [model.encode(p) for p in parts]
    got: dict[int, object] = {}

    def work(i):
        for _ in range(3):
            got[i] = model.encode(parts[i])

    workers = [threading.Thread(target=work, args=(i,)) for i in range(3)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    for i in range(3):
        assert torch.equal(got[i].indices, serial[i].indices)
        assert torch.equal(got[i].values, serial[i].values)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_vector_block_maximum_is_the_maximum_of_each_block(dtype):
    """The LLVM-vector block maximum equals numpy's, block by block, and skips a NaN."""
    from numba import njit

    @njit
    def maxima(row):
        out = np.empty(row.shape[0] // P.BLOCK, row.dtype)
        for k in range(out.shape[0]):
            out[k] = P._block_max(row, k * P.BLOCK)
        return out

    rng = np.random.default_rng(0)
    row = rng.standard_normal(P.BLOCK * 5).astype(dtype)
    row[3 * P.BLOCK - 1] = 50.0  # the last value of a block
    row[P.BLOCK] = 40.0  # the first of one
    np.testing.assert_array_equal(maxima(row), row.reshape(5, P.BLOCK).max(1))
    row[2 * P.BLOCK + 7] = np.nan
    got = maxima(row)
    np.testing.assert_array_equal(got[2], np.nanmax(row[2 * P.BLOCK : 3 * P.BLOCK]))


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs fork")
def test_a_forked_child_does_not_inherit_the_kernel_threads():
    """A forked child (multiprocessing's default on Linux) has none of its parent's threads:
    it starts without the parent's pool and makes its own on first use, instead of queueing
    runs for threads that do not exist. (torch's own OpenMP threads hang in such a child when
    the parent used them, so the child here runs the kernel on one thread.)"""
    import multiprocessing as mp

    P._pool()  # the parent's pool exists
    x, atoms = _problem(384, 32, 300, seed=8)
    serial = P.pursuit_rows(x, atoms, 8, 4)
    with mp.get_context("fork").Pool(1) as pool:
        had_pool, made_pool, indices = pool.apply(_in_child, (x, atoms))
    assert not had_pool and made_pool
    assert torch.equal(indices, serial.indices)


def _in_child(x, atoms):
    had = P._POOL is not None
    torch.set_num_threads(1)
    codes = P.pursuit_rows(x, atoms, 8, 4)
    P._pool()
    return had, P._POOL is not None, codes.indices


def test_the_kernel_imports_and_runs_where_numba_cannot_cache():
    """A read-only install and home (numba finds no folder to cache in) compiles the kernel in
    the process instead of failing the import. Run in a child, with numba's cache locators
    made to find nothing (as root, file permissions cannot show it)."""
    import subprocess
    import sys

    code = (
        "import numba.core.caching as c\n"
        "for k in c.CacheImpl._locator_classes:\n"
        "    k.from_function = classmethod(lambda cls, f, s: None)\n"
        "import torch\n"
        "from napari_concept_discovery.dictionary import pursuit_cpu as P\n"
        "from napari_concept_discovery.dictionary.icfl import pursuit_plain\n"
        "x = torch.randn(20, 16, dtype=torch.float64)\n"
        "a = torch.randn(300, 16, dtype=torch.float64)\n"
        "a = a / a.norm(dim=1, keepdim=True)\n"
        "got, ref = P.pursuit_rows(x, a, 3, 2), pursuit_plain(x, a, 3, 2)\n"
        "assert torch.equal(got.indices.sort(1).values, ref.indices.sort(1).values)\n"
        "print('ok')\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-2000:]


_CODES_SCRIPT = """
import hashlib, torch
torch.set_num_threads(1)
from napari_concept_discovery.dictionary.pursuit_cpu import pursuit_rows
g = torch.Generator().manual_seed(0)
atoms = torch.randn(64, 96, generator=g)
atoms /= atoms.norm(dim=1, keepdim=True)
codes = pursuit_rows(torch.randn(500, 96, generator=g), atoms, 2, 4)
print(hashlib.sha256(codes.values.numpy().tobytes() + codes.indices.numpy().tobytes()).hexdigest())
"""


def test_a_fresh_compile_and_the_disk_cache_give_the_same_codes(tmp_path):
    """The first process on a machine compiles the kernels, later ones load them from numba's
    cache: both must code alike, bit for bit, or the first training with a seed gives another
    dictionary than the next (the pursuit once reassociated its sums differently in the two)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "numba")}
    env.pop("CONCEPT_DISCOVERY_CHECKED_KERNELS", None)  # bounds-checked kernels are not cached

    def codes_hash() -> str:
        run = subprocess.run(
            [sys.executable, "-c", _CODES_SCRIPT], env=env, capture_output=True, text=True
        )
        assert run.returncode == 0, run.stderr
        return run.stdout.strip().splitlines()[-1]

    fresh = codes_hash()
    assert any((tmp_path / "numba").rglob("*.nbi")), "the first process left no cache"
    assert codes_hash() == fresh
