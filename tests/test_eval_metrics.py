"""Hand-checked tiny cases for dmpq_compile.eval.metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dmpq_compile.eval import (
    KLResult,
    PerplexityResult,
    hf_logits_fn,
    kl_divergence,
    make_windows,
    perplexity,
    unigram_perplexity,
)

V = 11


def uniform_fn(ids: torch.Tensor) -> torch.Tensor:
    return torch.zeros(*ids.shape, V)


def bigram_fn(table: torch.Tensor):
    """A model whose logits depend only on the current token: logits[b, t] = table[ids[b, t]]."""
    return lambda ids: table[ids]


@pytest.mark.parametrize("n,context,stride", [(2, 4, 2), (10, 4, 1), (10, 4, 2), (10, 4, 4), (37, 8, 3),
                                              (37, 8, 8), (5, 16, 4), (100, 10, 7)])
def test_windows_score_every_token_exactly_once(n, context, stride):
    windows = make_windows(n, context, stride)
    scored = [t for w in windows for t in range(w.score_from, w.end)]
    assert sorted(scored) == list(range(1, n))
    assert len({w.end - w.begin for w in windows}) == 1, "all windows have the same length"
    for w in windows:
        assert 0 <= w.begin < w.score_from <= w.end <= n
        assert w.end - w.begin == min(context, n)


def test_windows_history_is_at_least_context_minus_stride():
    for w in make_windows(50, 8, 3)[1:]:
        assert w.score_from - w.begin >= 8 - 3


def test_windows_reject_bad_arguments():
    with pytest.raises(ValueError, match="at least 2 tokens"):
        make_windows(1, 4, 2)
    with pytest.raises(ValueError, match="stride"):
        make_windows(10, 4, 5)
    with pytest.raises(ValueError, match="stride"):
        make_windows(10, 4, 0)


@pytest.mark.parametrize("context,stride,batch", [(4, 2, 1), (8, 3, 4), (16, 16, 2), (64, 8, 3)])
def test_uniform_logits_give_vocab_size_perplexity(context, stride, batch):
    ids = np.random.default_rng(0).integers(0, V, size=40)
    res = perplexity(uniform_fn, ids, context=context, stride=stride, batch_size=batch, progress=False)
    assert isinstance(res, PerplexityResult)
    assert res.ppl == pytest.approx(V, rel=1e-6)
    assert res.nll == pytest.approx(math.log(V), rel=1e-6)
    assert res.n_tokens == 39


def test_perplexity_matches_hand_computed_value():
    # the model predicts the next token = current + 1 (mod V) with probability p, the rest uniformly.
    p = 0.7
    table = torch.full((V, V), math.log((1 - p) / (V - 1)))
    for i in range(V):
        table[i, (i + 1) % V] = math.log(p)
    ids = [0, 1, 2, 3, 5, 6, 7, 0, 1]  # transitions: hits, hits, hits, miss, hit, hit, miss, hit
    hits, misses = 6, 2
    expected_nll = -(hits * math.log(p) + misses * math.log((1 - p) / (V - 1))) / 8
    for context, stride in [(3, 1), (4, 2), (9, 9), (5, 5)]:
        res = perplexity(bigram_fn(table), ids, context=context, stride=stride, batch_size=2, progress=False)
        assert res.n_tokens == 8
        assert res.nll == pytest.approx(expected_nll, rel=1e-6)
        assert res.ppl == pytest.approx(math.exp(expected_nll), rel=1e-6)


def test_perplexity_counts_history_only_inside_window():
    """A model that sees its window start must be scored on exactly the tokens it was asked for."""
    seen = []

    def recording_fn(ids):
        seen.append(ids.clone())
        return torch.zeros(*ids.shape, V)

    perplexity(recording_fn, list(range(10)), context=4, stride=2, batch_size=1, progress=False)
    assert [s.tolist()[0][0] for s in seen] == [0, 2, 4, 6]


def test_max_windows_limits_scored_tokens():
    ids = list(range(10)) * 5
    res = perplexity(uniform_fn, ids, context=8, stride=4, max_windows=2, progress=False)
    assert res.n_tokens == 7 + 4


def test_perplexity_rejects_bad_logits_shape():
    with pytest.raises(ValueError, match=r"\[batch, seq, vocab\]"):
        perplexity(lambda ids: torch.zeros(ids.shape[0], V), list(range(10)), context=4, stride=2,
                   progress=False)
    with pytest.raises(ValueError, match="1-D"):
        perplexity(uniform_fn, np.zeros((2, 5), dtype=np.int64), context=4, stride=2, progress=False)


def test_kl_of_model_with_itself_is_zero_and_positive_otherwise():
    gen = torch.Generator().manual_seed(0)
    table_p, table_q = torch.randn(V, V, generator=gen), torch.randn(V, V, generator=gen)
    ids = torch.randint(0, V, (60,), generator=gen)
    same = kl_divergence(bigram_fn(table_p), bigram_fn(table_p), ids, context=8, stride=4, progress=False)
    assert isinstance(same, KLResult)
    assert same.kl == pytest.approx(0.0, abs=1e-6) and same.n_tokens == 59
    diff = kl_divergence(bigram_fn(table_p), bigram_fn(table_q), ids, context=8, stride=4, progress=False)
    assert diff.kl > 0.01 and diff.max_kl >= diff.kl


def test_kl_matches_closed_form():
    table_p = torch.zeros(V, V)  # uniform P
    table_q = torch.zeros(V, V)
    table_q[:, 0] = math.log(2.0)  # Q puts twice the weight on token 0
    q = torch.ones(V)
    q[0] = 2.0
    q = q / q.sum()
    expected = float((torch.full((V,), 1.0 / V) * (torch.log(torch.tensor(1.0 / V)) - q.log())).sum())
    res = kl_divergence(bigram_fn(table_p), bigram_fn(table_q), list(range(V)), context=5, stride=2,
                        batch_size=3, progress=False)
    assert res.kl == pytest.approx(expected, rel=1e-5)


def test_kl_rejects_vocab_mismatch():
    with pytest.raises(ValueError, match="vocabulary size"):
        kl_divergence(uniform_fn, lambda ids: torch.zeros(*ids.shape, V + 1), list(range(10)), context=4,
                      stride=2, progress=False)


def test_unigram_perplexity_laplace():
    train, test = [0, 0, 0, 1], [0, 1, 2]
    # counts+1 = [4, 2, 1], total = 4 + 3 = 7
    expected_nll = -(math.log(4 / 7) + math.log(2 / 7) + math.log(1 / 7)) / 3
    res = unigram_perplexity(train, test, vocab_size=3)
    assert res.nll == pytest.approx(expected_nll)
    assert res.ppl == pytest.approx(math.exp(expected_nll))
    assert res.n_tokens == 3
    assert unigram_perplexity([], [0, 1], vocab_size=5).ppl == pytest.approx(5.0)


def test_unigram_perplexity_rejects_out_of_range_ids():
    with pytest.raises(ValueError, match="vocab_size"):
        unigram_perplexity([0, 7], [0], vocab_size=5)
    with pytest.raises(ValueError, match="empty"):
        unigram_perplexity([0], [], vocab_size=5)


def test_hf_logits_fn_wraps_a_causal_lm():
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    cfg = MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2,
                        max_position_embeddings=64, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    model = MixtralForCausalLM(cfg)
    fn = hf_logits_fn(model)
    ids = torch.randint(0, 64, (2, 10))
    logits = fn(ids)
    assert logits.shape == (2, 10, 64) and torch.isfinite(logits).all()
    res = perplexity(fn, ids.flatten(), context=8, stride=4, progress=False)
    assert 1.0 < res.ppl < 1000.0
