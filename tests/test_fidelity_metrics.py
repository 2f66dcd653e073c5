"""eval.metrics measures a numpy logits function (an artifact) exactly like a torch one, without torch."""

import numpy as np
import pytest
import torch

from dmpq_compile.eval import NumpyLogits, kl_divergence, perplexity

V = 7


def _table(seed):
    return np.random.default_rng(seed).normal(size=(V, V)).astype(np.float32)  # logits of next | current


@pytest.mark.parametrize("context, stride, batch", [(8, 4, 3), (5, 5, 1), (16, 3, 8)])
def test_numpy_and_torch_logits_functions_agree(context, stride, batch):
    p, q = _table(0), _table(1)
    ids = np.random.default_rng(2).integers(0, V, 60)
    torch_p, torch_q = (lambda x, t=t: torch.from_numpy(t)[x] for t in (p, q))
    numpy_p, numpy_q = (NumpyLogits(lambda x, t=t: t[x]) for t in (p, q))
    kw = {"context": context, "stride": stride, "batch_size": batch, "progress": False}
    a, b = perplexity(torch_p, ids, **kw), perplexity(numpy_p, ids, **kw)
    assert a.n_tokens == b.n_tokens == 59 and a.nll == pytest.approx(b.nll, rel=1e-6)
    for fp, fq in ((torch_p, torch_q), (numpy_p, numpy_q), (torch_p, numpy_q)):
        kl = kl_divergence(fp, fq, ids, **kw)
        ref = kl_divergence(torch_p, torch_q, ids, **kw)
        assert kl.kl == pytest.approx(ref.kl, rel=1e-5) and kl.max_kl == pytest.approx(ref.max_kl, rel=1e-5)


def test_numpy_logits_of_the_wrong_shape_are_named():
    with pytest.raises(ValueError, match="expected \\[batch, seq, vocab\\]"):
        perplexity(NumpyLogits(lambda x: np.zeros((x.shape[0], V))), list(range(10)), context=4, stride=2,
                   progress=False)
