"""Evaluation: text corpora, language-model metrics (perplexity, KL, unigram baseline), routing stats."""

from .corpus import (
    DEFAULT_SEPARATOR,
    PYDOC_ENV,
    SPLITS,
    CorpusError,
    Document,
    assign_splits,
    load_corpus,
    load_documents,
    pydoc_dir,
    split_documents,
    split_of,
    tokenize_corpus,
)
from .metrics import (
    KLResult,
    PerplexityResult,
    Window,
    hf_logits_fn,
    kl_divergence,
    make_windows,
    perplexity,
    unigram_perplexity,
)
from .routing import LayerRouting, expert_frequencies

__all__ = [
    "DEFAULT_SEPARATOR",
    "PYDOC_ENV",
    "SPLITS",
    "CorpusError",
    "Document",
    "KLResult",
    "LayerRouting",
    "PerplexityResult",
    "Window",
    "assign_splits",
    "expert_frequencies",
    "hf_logits_fn",
    "kl_divergence",
    "load_corpus",
    "load_documents",
    "make_windows",
    "perplexity",
    "pydoc_dir",
    "split_documents",
    "split_of",
    "tokenize_corpus",
    "unigram_perplexity",
]
