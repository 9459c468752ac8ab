"""Applying a dictionary in token chunks gives the codes of the whole batch at once.

Tolerance: the same atoms, and values equal up to float32 rounding. Each token's scores are the
same dot products whatever the chunk, but the BLAS library picks its kernel (and with it the
order of the sums) by the shape of the product, so a chunk of a few rows may round differently
in the last bit from a product of thousands; on the development machine chunks of >= 128
tokens gave the same bits.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_concept_discovery.dictionary import ICFL, ICFLConfig, TopKConfig, TopKSAE, Whitener
from napari_concept_discovery.dictionary.applied import Dictionary
from napari_concept_discovery.dictionary.icfl import gram_blocks, pursuit_gram, pursuit_plain
from napari_concept_discovery.dictionary.topk import encode_chunked


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=1, keepdim=True)


@pytest.fixture
def tokens():
    g = torch.Generator().manual_seed(0)
    return _unit(torch.randn(600, 48, generator=g)) + 0.3 * torch.randn(48, generator=g)


def _trained_topk(tokens: torch.Tensor, m: int = 512) -> TopKSAE:
    """A TopK SAE whose encoder is not its initial transpose (a few steps on ``tokens``)."""
    model = TopKSAE(tokens.shape[1], TopKConfig(n_atoms=m, k=16), seed=1)
    model.init_from_data(tokens, torch.Generator().manual_seed(0))
    opt = model.make_optimizer()
    for _ in range(5):
        out = model(tokens)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    with torch.no_grad():
        model.b_enc -= 0.15  # some of the k largest pre-activations negative: ReLU cuts them
    return model.eval()


def _same_codes(got, ref) -> None:
    """Same atoms per token (in any slot order) and the same values up to float32 rounding."""
    o, r = got.indices.argsort(1), ref.indices.argsort(1)
    assert torch.equal(got.indices.gather(1, o), ref.indices.gather(1, r))
    torch.testing.assert_close(
        got.values.gather(1, o), ref.values.detach().gather(1, r), rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("chunk", [1, 7, 128, 599, 600, 5000])
def test_topk_chunked_encode_equals_the_whole_batch(tokens, chunk):
    model = _trained_topk(tokens)
    with torch.enable_grad():  # the autograd path: one (B, M) pre-activation matrix
        whole = model.encode(tokens)
    with torch.no_grad():
        got = encode_chunked(tokens, model.W_enc, model.b_enc, model.b_pre, 16, chunk)
        default = model.encode(tokens)
    _same_codes(got, whole)
    _same_codes(default, whole)
    assert (got.values >= 0).all() and (got.values == 0).any()  # ReLU applied, some cut


@pytest.mark.parametrize("chunk", [3, 33, 256, 600])
def test_icfl_gram_pursuit_chunks_give_the_same_codes(tokens, chunk):
    """Chunks of tokens (with the caller's workspace or without) change the codes only within
    rounding; and the chunked Gram pursuit still picks what the plain pursuit picks."""
    tokens = tokens[:60] if chunk < 10 else tokens
    m = 384
    atoms = _unit(torch.randn(m, tokens.shape[1], generator=torch.Generator().manual_seed(2)))
    gram = gram_blocks(atoms, 128)
    whole = pursuit_gram(tokens, atoms, 8, 4, gram, chunk=len(tokens))
    for workspace in (None, {}):
        got = pursuit_gram(tokens, atoms, 8, 4, gram, chunk=chunk, workspace=workspace)
        _same_codes(got, whole)
    plain = pursuit_plain(tokens, atoms, 8, 4)
    same = (got.indices.sort(1).values == plain.indices.sort(1).values).all(1).float().mean()
    assert same >= 0.95, f"Gram and plain pursuits agree on {float(same):.1%} of tokens"


def test_dictionary_encode_is_independent_of_batch_size(tokens):
    """The CSR codes of a whitened dictionary do not depend on how the rows are batched."""
    raw = tokens.numpy() * 2 + 1
    whitener = Whitener().fit(raw[:400])
    white = torch.from_numpy(whitener.transform(raw))
    icfl = ICFL(white.shape[1], ICFLConfig(n_atoms=256), seed=0)
    icfl.init_from_data(white, torch.Generator().manual_seed(0))
    for model in (icfl, _trained_topk(white, 256)):
        dictionary = Dictionary(model.eval(), whitener)
        ref = dictionary.encode(raw, batch_size=len(raw))
        for batch_size in (64, 300):
            got = dictionary.encode(raw, batch_size=batch_size)
            np.testing.assert_array_equal(got.indptr, ref.indptr)
            np.testing.assert_array_equal(got.indices, ref.indices)
            # atoms started on tokens drawn with replacement come in nearly collinear pairs;
            # ICFL's least squares gives such a pair large opposite coefficients that carry the
            # rounding much further than float32's, but what the codes reconstruct does not
            atoms = model.atoms.detach().numpy()
            np.testing.assert_allclose(got @ atoms, ref @ atoms, rtol=0, atol=1e-4)
