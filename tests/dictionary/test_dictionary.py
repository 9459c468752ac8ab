"""Dictionary learning: whitening, ICFL (fast pursuit vs a plain reference), TopK, training."""

from __future__ import annotations

import threading

import numpy as np
import pandas as pd
import pytest
import torch

from napari_concept_discovery.dictionary import (
    ICFL,
    Codes,
    ICFLConfig,
    TopKConfig,
    TopKSAE,
    Whitener,
    control_mask,
    evaluate,
    parse_control,
    train,
)
from napari_concept_discovery.dictionary.base import scatter_rows, sparse_decode
from napari_concept_discovery.dictionary.icfl import pursuit_gram, pursuit_plain
from napari_concept_discovery.errors import DictionaryError


def planted(n=20000, d=64, m=256, k=5, noise=0.01, seed=0):
    """Tokens x = z W + noise from a random unit-norm dictionary W (M, D) and k-sparse z >= 0."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((m, d))
    w /= np.linalg.norm(w, axis=1, keepdims=True)
    idx = np.argsort(rng.random((n, m)), axis=1)[:, :k]
    z = np.zeros((n, m))
    np.put_along_axis(z, idx, rng.uniform(0.5, 1.5, (n, k)), 1)
    x = z @ w + noise * rng.standard_normal((n, d))
    return x.astype(np.float32), w


def recovery(true_atoms: np.ndarray, learned: np.ndarray) -> float:
    """Mean over true atoms of the best cosine to any learned atom."""
    learned = learned / np.linalg.norm(learned, axis=1, keepdims=True)
    return float((true_atoms @ learned.T).max(1).mean())


# --- whitening -------------------------------------------------------------------------------


def test_whitening_maps_controls_to_zero_mean_identity_covariance():
    rng = np.random.default_rng(0)
    mix = rng.standard_normal((16, 16)) * np.linspace(0.1, 5, 16)
    controls = rng.standard_normal((2000, 16)) @ mix + 3.0
    w = Whitener(eps=1e-9, unit_norm=False).fit(controls)
    y = w.transform(controls)
    assert y.shape == (2000, 16)
    np.testing.assert_allclose(y.mean(0), 0, atol=1e-4)
    np.testing.assert_allclose(np.cov(y, rowvar=False), np.eye(16), atol=1e-3)
    assert w.mean_.shape == (1, 16) and w.transform_.shape == (1, 16, 16)


def test_whitening_unit_norm_center_mode_and_components():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((500, 8)) * 4 + 1
    y = Whitener(n_components=3).fit(x).transform(x)
    assert y.shape == (500, 3)
    np.testing.assert_allclose(np.linalg.norm(y, axis=1), 1, atol=1e-5)
    c = Whitener(mode="center", unit_norm=False).fit(x)
    np.testing.assert_allclose(c.transform(x), x - x.mean(0), atol=1e-5)


def test_whitening_per_group_removes_each_plates_offset():
    rng = np.random.default_rng(2)
    a = rng.standard_normal((300, 4)) + 10
    b = rng.standard_normal((300, 4)) * 3 - 5
    x = np.vstack([a, b])
    g = np.array(["P1"] * 300 + ["P2"] * 300)
    w = Whitener(unit_norm=False, group_by="plate", eps=1e-9).fit(x, g)
    y = w.transform(x, g)
    for name in ("P1", "P2"):
        part = y[g == name]
        np.testing.assert_allclose(part.mean(0), 0, atol=1e-4)
        np.testing.assert_allclose(np.cov(part, rowvar=False), np.eye(4), atol=1e-3)
    with pytest.raises(DictionaryError, match="no whitening fitted for plate 'P3'"):
        w.transform(x[:2], ["P1", "P3"])


def test_whitening_refuses_too_few_or_no_controls():
    x = np.random.default_rng(0).standard_normal((10, 32))
    with pytest.raises(DictionaryError, match=r"10 control tokens; whitening needs at least 33"):
        Whitener().fit(x)
    with pytest.raises(DictionaryError, match=r"0 control tokens; whitening needs at least 33"):
        Whitener().fit(np.zeros((0, 32)))
    g = np.array(["A"] * 9 + ["B"])
    with pytest.raises(DictionaryError, match=r"1 control tokens in plate 'B'; .* at least 6"):
        Whitener(group_by="plate", n_components=5).fit(x, g)


def test_control_mask_names_column_and_values_present():
    table = pd.DataFrame({"well_type": ["treatment", "negative_control", "treatment"]})
    np.testing.assert_array_equal(
        control_mask(table, *parse_control("well_type=negative_control")), [False, True, False]
    )
    with pytest.raises(DictionaryError, match=r"well_type == 'control'.*'negative_control'"):
        control_mask(table, "well_type", "control")
    with pytest.raises(DictionaryError, match=r"no column 'kind'.*'well_type'"):
        control_mask(table, "kind", "x")
    with pytest.raises(DictionaryError, match="COLUMN=VALUE"):
        parse_control("well_type")


# --- ICFL pursuit ----------------------------------------------------------------------------


def reference_pursuit(x, atoms, bias, n_iter, n_pick):
    """ICFL encoding as the paper states it, one token at a time, with numpy least squares."""
    values = np.zeros((len(x), n_iter * n_pick))
    indices = np.zeros((len(x), n_iter * n_pick), dtype=np.int64)
    for t, xt in enumerate(x):
        r = xt - bias
        for j in range(n_iter):
            scores = atoms @ r
            picked = np.argsort(-scores, kind="stable")[:n_pick]
            coef, *_ = np.linalg.lstsq(atoms[picked].T, r, rcond=None)
            r = r - atoms[picked].T @ coef
            values[t, j * n_pick : (j + 1) * n_pick] = coef
            indices[t, j * n_pick : (j + 1) * n_pick] = picked
    return values, indices


def _dense(values, indices, m):
    out = np.zeros((len(values), m))
    np.add.at(out, (np.arange(len(values))[:, None], indices), values)
    return out


@pytest.mark.parametrize(
    "n_iter,n_pick,m,n", [(3, 2, 48, 40), (5, 1, 48, 40), (2, 4, 48, 40), (3, 4, 1024, 12)]
)
def test_gram_pursuit_matches_plain_reference(n_iter, n_pick, m, n):
    rng = np.random.default_rng(3)
    d = 16
    atoms = rng.standard_normal((m, d))
    atoms /= np.linalg.norm(atoms, axis=1, keepdims=True)
    x = rng.standard_normal((n, d))
    bias = rng.standard_normal(d) * 0.1
    ref_v, ref_i = reference_pursuit(x, atoms, bias, n_iter, n_pick)
    model = ICFL(d, ICFLConfig(n_atoms=m, n_iter=n_iter, n_pick=n_pick)).double()
    with torch.no_grad():
        model.W.copy_(torch.from_numpy(atoms))
        model.b.copy_(torch.from_numpy(bias))
    codes = model.encode(torch.from_numpy(x))
    got = _dense(codes.values.numpy(), codes.indices.numpy(), m)
    np.testing.assert_allclose(got, _dense(ref_v, ref_i, m), atol=1e-6)
    # same picks, iteration by iteration (order within an iteration may differ)
    for j in range(n_iter):
        sl = slice(j * n_pick, (j + 1) * n_pick)
        np.testing.assert_array_equal(
            np.sort(codes.indices[:, sl].numpy(), 1), np.sort(ref_i[:, sl], 1)
        )
    plain = pursuit_plain(torch.from_numpy(x - bias), torch.from_numpy(atoms), n_iter, n_pick)
    np.testing.assert_allclose(
        _dense(plain.values.numpy(), plain.indices.numpy(), m), got, atol=1e-6
    )
    # float32, as used in training: same codes up to rounding
    r32 = torch.from_numpy((x - bias).astype(np.float32))
    fast32 = pursuit_gram(r32, torch.from_numpy(atoms.astype(np.float32)), n_iter, n_pick)
    np.testing.assert_allclose(
        _dense(fast32.values.numpy(), fast32.indices.numpy(), m), got, atol=2e-3
    )


def test_gram_blocks_hold_the_full_symmetric_gram_matrix():
    from napari_concept_discovery.dictionary.icfl import gram_blocks

    atoms = torch.randn(96, 20, dtype=torch.float64)
    blocks = gram_blocks(atoms, 32)  # (3, 96, 32): column block k of G
    full = torch.cat(list(blocks), dim=1)
    torch.testing.assert_close(full, atoms @ atoms.T, rtol=0, atol=1e-12)
    assert torch.equal(full, full.T)  # the lower tiles are copies of the upper ones


@pytest.mark.parametrize("m,width", [(48, 32), (300, 128), (64, 128), (512, 128)])
def test_gram_pursuit_column_blocks_match_plain_pursuit(m, width):
    """Padding to whole blocks (48 -> 64, 300 -> 384), fewer blocks than picks (2 < 4) and a
    dictionary narrower than one block give the plain pursuit's codes, pick for pick."""
    g = torch.Generator().manual_seed(m)
    d, n, n_iter, n_pick = 24, 300, 8, 4
    atoms = torch.randn(m, d, generator=g, dtype=torch.float64)
    atoms /= atoms.norm(dim=1, keepdim=True)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    fast = pursuit_gram(x, atoms, n_iter, n_pick, chunk=128, width=width)
    plain = pursuit_plain(x, atoms, n_iter, n_pick)
    for j in range(n_iter):
        sl = slice(j * n_pick, (j + 1) * n_pick)
        torch.testing.assert_close(
            fast.indices[:, sl].sort(1).values, plain.indices[:, sl].sort(1).values, rtol=0, atol=0
        )
    np.testing.assert_allclose(
        _dense(fast.values.numpy(), fast.indices.numpy(), m),
        _dense(plain.values.numpy(), plain.indices.numpy(), m),
        atol=1e-9,
    )


def test_icfl_encode_keeps_its_gram_matrix_only_while_the_atoms_stay():
    d, m = 16, 200
    model = ICFL(d, ICFLConfig(n_atoms=m, n_iter=3, n_pick=2), seed=0).double().eval()
    x = torch.randn(50, d, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    first = model.encode(x)
    gram = model._gram_cache[1]
    assert model.encode(x).indices.equal(first.indices) and model._gram_cache[1] is gram
    other = ICFL(d, ICFLConfig(n_atoms=m, n_iter=3, n_pick=2), seed=5).double()
    model.load_tensors(other.tensors())  # new atoms in the same storage
    codes = model.encode(x)
    assert model._gram_cache[1] is not gram
    plain = pursuit_plain(x - model.b.detach(), model.W.detach(), 3, 2)
    np.testing.assert_allclose(
        _dense(codes.values.numpy(), codes.indices.numpy(), m),
        _dense(plain.values.numpy(), plain.indices.numpy(), m),
        atol=1e-9,
    )


def test_blocked_top_l_equals_topk():
    from napari_concept_discovery.dictionary.icfl import top_l

    scores = torch.randn(50, 4096)
    for n_pick in (1, 4, 7):
        v, i = top_l(scores, n_pick)
        ref = scores.topk(n_pick, dim=1)
        torch.testing.assert_close(v.sort(1).values, ref.values.sort(1).values, rtol=0, atol=0)
        torch.testing.assert_close(i.sort(1).values, ref.indices.sort(1).values, rtol=0, atol=0)
        torch.testing.assert_close(scores.gather(1, i), v, rtol=0, atol=0)


def test_icfl_redraws_one_atom_of_each_duplicate_pair():
    model = ICFL(8, ICFLConfig(n_atoms=6))
    with torch.no_grad():
        model.W[1] = model.W[0] * 0.99 + 0.01 * model.W[2]
        model.W[1] /= model.W[1].norm()
    before = model.W.detach().clone()
    redrawn = model.redraw_duplicates(generator=torch.Generator().manual_seed(0))
    assert len(redrawn) == 1 and int(redrawn[0]) in (0, 1)
    changed = (model.W.detach() != before).any(1)
    assert changed.sum() == 1 and changed[int(redrawn[0])]
    cos = model.W.detach() @ model.W.detach().T
    assert (cos - torch.eye(6)).max() < 0.9


# --- TopK --------------------------------------------------------------------------------------


def test_topk_sparse_gradients_match_dense_autograd():
    torch.manual_seed(0)
    d, m, k = 12, 40, 5
    model = TopKSAE(d, TopKConfig(n_atoms=m, k=k, dead_tokens=50)).double()
    with torch.no_grad():
        model.b_pre.normal_()
        model.b_enc.normal_()
        model.W_enc.add_(0.3 * torch.randn_like(model.W_enc))
    model.tokens_since_fired[:10] = 100  # up to ten dead latents, so AuxK contributes
    x = torch.randn(30, d, dtype=torch.float64)
    out = model(x)
    out.loss.backward()
    fast = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    # dense reference: the same loss through plain autograd
    xc = x - model.b_pre
    pre = torch.relu(xc @ model.W_enc.T + model.b_enc)
    top = pre.topk(k, dim=1)
    z = torch.zeros_like(pre).scatter(1, top.indices, top.values)
    x_hat = z @ model.W_dec + model.b_pre
    err = x - x_hat
    loss = err.pow(2).sum() / (x - x.mean(0)).pow(2).sum()
    dead = model.tokens_since_fired >= 50  # those of the ten that did not fire in this batch
    assert 0 < int(dead.sum()) <= 10
    pre_dead = (xc @ model.W_enc.T + model.b_enc).masked_fill(~dead, -torch.inf)
    aux = pre_dead.topk(min(d // 2, int(dead.sum())), dim=1)
    za = torch.zeros_like(pre).scatter(1, aux.indices, torch.relu(aux.values))
    e = err.detach()
    aux_fvu = (e - za @ model.W_dec).pow(2).sum() / (e - e.mean(0)).pow(2).sum()
    (loss + aux_fvu / 32).backward()
    assert float(out.loss.detach()) == pytest.approx(
        float((loss + aux_fvu / 32).detach()), rel=1e-10
    )
    for name, p in model.named_parameters():
        torch.testing.assert_close(fast[name], p.grad, rtol=1e-8, atol=1e-10, msg=name)


def test_scatter_rows_sums_repeated_indices():
    idx = torch.tensor([[0, 0, 2], [2, 1, 1]])
    w = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    x = torch.tensor([[1.0, 10.0], [100.0, 1000.0]])
    ref = torch.zeros(3, 2).index_add_(
        0, idx.reshape(-1), (w[..., None] * x[:, None]).reshape(-1, 2)
    )
    torch.testing.assert_close(scatter_rows(idx, w, x, 3), ref)
    atoms = torch.randn(3, 2, requires_grad=True)
    vals = w.clone().requires_grad_()
    sparse_decode(Codes(vals, idx), atoms).sum().backward()
    dense = torch.zeros(2, 3).scatter_add(1, idx, w)
    torch.testing.assert_close(atoms.grad, dense.T @ torch.ones(2, 2))
    torch.testing.assert_close(vals.grad, atoms.detach().sum(1)[idx])


def test_topk_decoder_atoms_stay_unit_norm():
    x, _ = planted(n=2000, d=16, m=32, k=3)
    model = TopKSAE(16, TopKConfig(n_atoms=32, k=3))
    # the gradient is projected off each atom's direction before the step (without it, the
    # renormalisation after the step would hide a step that fights the unit norm)
    model(torch.from_numpy(x[:256])).loss.backward()
    w, g = model.W_dec.detach().clone(), model.W_dec.grad.clone()
    radial = (g * w).sum(1)
    assert radial.abs().max() > 1e-3  # there is something to project away
    model.before_step()
    projected = model.W_dec.grad
    torch.testing.assert_close((projected * w).sum(1), torch.zeros(32), rtol=0, atol=1e-6)
    torch.testing.assert_close(projected, g - radial[:, None] * w)
    model.zero_grad()
    train(model, x, steps=20, batch_size=128)
    np.testing.assert_allclose(model.W_dec.detach().norm(dim=1).numpy(), 1, atol=1e-5)


# --- training on planted data ----------------------------------------------------------------


@pytest.fixture(scope="module")
def planted_data():
    return planted()


def test_icfl_recovers_planted_dictionary(planted_data):
    x, w = planted_data
    torch.set_num_threads(1)
    model = ICFL(64, ICFLConfig(n_atoms=256, n_iter=5, n_pick=1, lr=3e-3), seed=0)
    result = train(model, x, steps=500, batch_size=256, seed=0, progress_every=50)
    fvus = [p.info["fvu"] for p in result.history]
    score = recovery(w, model.atoms.detach().numpy())
    print(f"ICFL recovery {score:.4f}, FVU {fvus[0]:.3f} -> {fvus[-1]:.3f}")
    assert score >= 0.95
    assert fvus[-1] < 0.5 * fvus[0]
    ev = evaluate(model, x[:4000])
    assert ev["fvu"] < 0.1 and ev["l0"] <= 5 and ev["dead_fraction"] < 0.05


def test_topk_trains_on_planted_dictionary(planted_data):
    x, w = planted_data
    model = TopKSAE(64, TopKConfig(n_atoms=256, k=5), seed=0)
    result = train(model, x, steps=600, batch_size=256, seed=0, progress_every=50)
    fvus = [p.info["fvu"] for p in result.history]
    score = recovery(w, model.atoms.detach().numpy())
    print(f"TopK recovery {score:.4f}, FVU {fvus[0]:.3f} -> {fvus[-1]:.3f}")
    assert fvus[-1] < 0.6 * fvus[0]
    assert score > 0.8  # reported, not a bar; well above chance (~0.35 for random atoms)


def test_cancellation_returns_the_dictionary_after_the_last_complete_step():
    x, _ = planted(n=3000, d=16, m=32, k=3)
    seen = []
    stop = threading.Event()

    def progress(p):
        seen.append(p.done)
        if p.done == 6:
            stop.set()

    a = ICFL(16, ICFLConfig(n_atoms=32, n_iter=3, n_pick=1))
    ra = train(
        a, x, steps=100, batch_size=64, seed=5, progress=progress, progress_every=3, cancel=stop
    )
    assert ra.cancelled and ra.steps_done == 6 and seen == [3, 6]
    b = ICFL(16, ICFLConfig(n_atoms=32, n_iter=3, n_pick=1))
    rb = train(b, x, steps=6, batch_size=64, seed=5)
    assert not rb.cancelled
    torch.testing.assert_close(a.W, b.W, rtol=0, atol=0)
    torch.testing.assert_close(a.b, b.b, rtol=0, atol=0)
    # a callable works too, and a cancel before the first step returns the untrained model
    c = ICFL(16, ICFLConfig(n_atoms=32))
    rc = train(c, x, steps=10, batch_size=64, cancel=lambda: True)
    assert rc.cancelled and rc.steps_done == 0


def test_divergence_restores_last_good_state():
    x, _ = planted(n=1000, d=8, m=16, k=2)

    class Poisoned(np.ndarray):
        """Batches turn NaN ``after`` reads once armed: steps 6 and 7 run, step 8 diverges."""

        after = None

        def __getitem__(self, index):
            out = np.asarray(super().__getitem__(index))
            if Poisoned.after is not None:
                Poisoned.after -= 1
                if Poisoned.after < 0:
                    out = np.full_like(out, np.nan)
            return out

    model = ICFL(8, ICFLConfig(n_atoms=16, n_iter=2, n_pick=1))
    at_five = {}

    def arm(p):
        if p.done == 5:  # the state after step 5, the last one reported before the NaN
            at_five.update({k: v.detach().clone() for k, v in model.state_dict().items()})
            Poisoned.after = 2

    data = x.view(Poisoned)
    r = train(model, data, steps=200, batch_size=64, seed=0, progress=arm, progress_every=5)
    assert r.diverged and r.steps_done == 5
    # the model is the one after step 5 exactly, not the one steps 6 and 7 made
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, at_five[name], rtol=0, atol=0, msg=name)


def test_streams_zarr_in_chunks_with_whitening(tmp_path):
    zarr = pytest.importorskip("zarr")
    x, _ = planted(n=3000, d=16, m=32, k=3)
    raw = x * 3 + 1
    z = zarr.open_array(
        tmp_path / "t.zarr", mode="w", shape=raw.shape, chunks=(256, 16), dtype="f4"
    )
    z[:] = raw
    w = Whitener(n_components=12).fit(raw[:1000])
    model = TopKSAE(12, TopKConfig(n_atoms=32, k=3))
    r = train(model, z, steps=30, batch_size=200, whitener=w)
    assert r.steps_done == 30 and r.samples == 6000
    ev = evaluate(model, z, whitener=w, batch_size=700)
    assert ev["n_tokens"] == 3000 and 0 < ev["fvu"] < 1
    with pytest.raises(DictionaryError, match="16-dimensional"):
        train(TopKSAE(16, TopKConfig(n_atoms=32, k=3)), z, steps=1, whitener=w)


# --- no process-wide warning filters, no torch warnings for users ----------------------------


def test_training_and_encoding_warn_nothing_and_change_no_warning_filter():
    """In a fresh interpreter (torch warns some things once per process) with warnings as errors."""
    import subprocess
    import sys

    code = """
import warnings
warnings.simplefilter("error")
import numpy as np, pandas, scipy.sparse, torch  # these add filters of their own
before = list(warnings.filters)
from napari_concept_discovery.dictionary import (
    ICFL, ICFLConfig, TopKConfig, TopKSAE, Dictionary, train
)
import napari_concept_discovery.dictionary.pipeline
assert warnings.filters == before, "importing the dictionary changed the warning filters"
x = np.random.default_rng(0).standard_normal((300, 8)).astype(np.float32)
for model in (ICFL(8, ICFLConfig(n_atoms=16, n_iter=2, n_pick=2)),
              TopKSAE(8, TopKConfig(n_atoms=16, k=3, dead_tokens=10))):
    train(model, x, steps=6, batch_size=50, progress_every=2)
    Dictionary(model).encode(x)
silencing = [f for f in warnings.filters if f[1] is not None and "CSR" in f[1].pattern]
assert not silencing, "training or encoding left a warning filter behind"
print("ok")
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-2000:]


def test_training_whitens_once_and_reaches_the_dictionary_of_prewhitened_tokens():
    """Raw tokens with a (per-group) whitener train batch for batch like tokens whitened by hand
    beforehand; above the memory limit the set streams and is whitened per batch instead."""
    from napari_concept_discovery.dictionary.training import whiten_once

    rng = np.random.default_rng(4)
    raw = (rng.standard_normal((1500, 12)) @ rng.standard_normal((12, 12)) + 2).astype(np.float32)
    groups = np.array(["P1", "P2"] * 750)
    w = Whitener(group_by="plate").fit(raw, groups)
    cfg = ICFLConfig(n_atoms=32, n_iter=2, n_pick=2)
    a = train(ICFL(12, cfg, seed=1), raw, steps=12, batch_size=256, whitener=w, groups=groups)
    white = w.transform(raw, groups)
    b = train(ICFL(12, cfg, seed=1), white, steps=12, batch_size=256)
    torch.testing.assert_close(a.model.W, b.model.W, rtol=0, atol=0)
    torch.testing.assert_close(a.model.b, b.model.b, rtol=0, atol=0)
    once, none_w, none_g = whiten_once(raw, w, groups)
    np.testing.assert_array_equal(once, white)
    assert none_w is None and none_g is None
    kept = whiten_once(raw, w, groups, limit=1000)
    assert kept[0] is raw and kept[1] is w and kept[2] is groups
