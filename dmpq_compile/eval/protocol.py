"""The evaluation protocol every quality figure of the project uses (``eval``, ``bench``, benchmarks/).

One protocol, described for users in docs/evaluation.md:

* **Sets.** A *set* is one split (``dev`` for choices, ``test`` for reports) of one domain
  (``pydoc``: the Python documentation, prose; ``pystdlib``: the standard library's ``.py`` files,
  code), or of a user's corpus. ``dev`` and ``test`` are disjoint by document from each other and
  from ``train`` and ``calib`` (:mod:`dmpq_compile.eval.corpus` splits by the sha256 of each
  document's path).
* **Windows.** Every document of the set is tokenized on its own. A *window* is ``context``
  tokens: one separator token (``"\\n"``) followed by ``context - 1`` consecutive tokens of one
  document. Windows are scored as llama.cpp's ``llama-perplexity`` scores its chunks: the logits at
  positions ``context // 2 .. context - 2`` predict the tokens at ``context // 2 + 1 .. context - 1``,
  so each window scores ``context // 2 - 1`` tokens, every one with at least ``context // 2`` tokens of
  history from its own document. The windows of one document never score a token twice.
* **Balance.** Windows are drawn across every document of the set: each document long enough for a
  window gets some (when the set has more such documents than ``max_windows``, one window each for
  ``max_windows`` documents spread evenly over the set's key order, the others recorded as
  ``undrawn``), spread evenly over the document, and no document gets more than ``max_share``
  (15 %) of the windows, hence of the scored tokens (every window scores as many). The number of
  windows is the largest ``<= max_windows`` that allows this; a set where it is impossible (fewer
  than ``1 / max_share`` usable documents) is an error.
* **Text.** The windows also exist as one text (``"\\n" + piece`` per window) that byte-level BPE
  tokenizers (the samples', GPT-2-style) turn back into exactly the windows' ids, checked when the
  windows are made (``text_exact``): llama.cpp reads that file and scores the same tokens at the same
  positions (:func:`scored_positions`).
* **Intervals.** 95 % percentile bootstrap over documents (:class:`DocBootstrap`): documents are
  resampled with replacement (``n_boot`` = 2000 times, numpy, seed 0), each statistic recomputed as a
  token-weighted mean from the per-document sums; a ratio between two models is resampled *paired*
  (the same documents, the same windows for both).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .corpus import CorpusError, Document, is_builtin, load_documents, split_documents

DOMAINS = ("pydoc", "pystdlib")  # the built-in held-out domains every quality table reports
EVAL_SPLITS = ("dev", "test")
DEFAULT_CONTEXT = 256
DEFAULT_MAX_WINDOWS = 64
DEFAULT_MAX_SHARE = 0.15
DEFAULT_BOOT = 2000
DEFAULT_SEED = 0
SEPARATOR_TEXT = "\n"


class ProtocolError(ValueError):
    """The evaluation set cannot be built as the protocol demands; the message says why and what to do."""


@dataclass(frozen=True)
class EvalWindows:
    """The windows of one evaluation set.

    Attributes:
        name: ``DOMAIN/SPLIT`` (e.g. ``pydoc/test``).
        context: Window length in tokens.
        ids: ``int64 [K, context]`` token ids; position 0 is the separator.
        doc_of_window: ``[K]`` index into ``doc_keys`` of each window's document.
        starts: ``[K]`` offset of each window's first document token in its document's own tokenization.
        doc_keys: Keys (relative paths) of the set's documents that hold windows, in key order.
        skipped: Keys of the set's documents too short for one window.
        text: Text that tokenizes to ``ids.reshape(-1)`` (checked: ``text_exact``).
        text_exact: Whether ``text`` tokenizes back to exactly the windows' ids.
        source: Where the documents came from (corpus spec, Python version for ``pystdlib``).
    """

    name: str
    context: int
    ids: np.ndarray
    doc_of_window: np.ndarray
    starts: np.ndarray
    doc_keys: tuple[str, ...]
    skipped: tuple[str, ...]
    text: str
    text_exact: bool
    source: str = ""
    max_share: float = DEFAULT_MAX_SHARE
    undrawn: tuple[str, ...] = ()

    @property
    def first(self) -> int:
        """First scored logit position (llama.cpp's ``first = n_ctx / 2``)."""
        return self.context // 2

    @property
    def scored_per_window(self) -> int:
        return self.context - 1 - self.first

    @property
    def targets(self) -> np.ndarray:
        """``[K, scored_per_window]`` the scored tokens."""
        return self.ids[:, self.first + 1:]

    @property
    def n_scored(self) -> int:
        return int(self.ids.shape[0] * self.scored_per_window)

    def doc_shares(self) -> dict[str, float]:
        """Fraction of the scored tokens each document holds."""
        counts = np.bincount(self.doc_of_window, minlength=len(self.doc_keys))
        return {k: float(c) / len(self.doc_of_window) for k, c in zip(self.doc_keys, counts)}

    def with_first_token(self, token_id: int) -> EvalWindows:
        """The same windows with position 0 replaced (llama.cpp puts BOS there when its vocabulary adds one)."""
        ids = self.ids.copy()
        ids[:, 0] = token_id
        return EvalWindows(self.name, self.context, ids, self.doc_of_window, self.starts, self.doc_keys, self.skipped,
                           self.text, self.text_exact, self.source, self.max_share, self.undrawn)

    def record(self) -> dict:
        """What a results file records about the set (enough to rebuild and audit it)."""
        shares = self.doc_shares()
        return {"set": self.name, "source": self.source, "context": self.context, "windows": int(self.ids.shape[0]),
                "scored_per_window": self.scored_per_window, "scored_tokens": self.n_scored,
                "documents": len(self.doc_keys), "skipped_short_documents": list(self.skipped),
                "undrawn_documents": len(self.undrawn),
                "max_doc_share": max(shares.values()), "max_share_allowed": self.max_share,
                "windows_per_document": {k: round(v * len(self.doc_of_window)) for k, v in shares.items()},
                "ids_sha256": hashlib.sha256(np.ascontiguousarray(self.ids).tobytes()).hexdigest()[:16],
                "text_exact": self.text_exact, "protocol": "docs/evaluation.md"}


def scored_positions(context: int) -> tuple[np.ndarray, np.ndarray]:
    """``(logit positions, target positions)`` one window scores; llama.cpp's rule for a chunk of ``n_ctx``:
    ``first = n_ctx / 2``, logits ``first .. n_ctx - 2`` predict tokens ``first + 1 .. n_ctx - 1``."""
    first = context // 2
    logits = np.arange(first, context - 1)
    return logits, logits + 1


# ---------------------------------------------------------------------------------------- building
def eval_documents(spec: str, split: str | None) -> list[Document]:
    """The documents of a set: ``spec`` a built-in domain or a corpus path, ``split`` dev/test/None (all)."""
    return split_documents(load_documents(spec), split)


def build_windows(docs: Sequence[Document], tokenizer: Any, name: str, context: int = DEFAULT_CONTEXT,
                  max_windows: int = DEFAULT_MAX_WINDOWS, max_share: float = DEFAULT_MAX_SHARE,
                  source: str = "") -> EvalWindows:
    """Draw the protocol's windows from ``docs`` (see the module docstring).

    Args:
        docs: The set's documents (any order: they are sorted by key).
        tokenizer: A ``tokenizers.Tokenizer`` (or a transformers fast tokenizer).
        name: The set's name for messages and records.
        context: Window length (even, >= 8).
        max_windows: Upper bound on the number of windows.
        max_share: Largest fraction of the windows one document may hold.
        source: Provenance recorded with the set.

    Raises:
        ProtocolError: No way to give every usable document windows within ``max_share``, or no
            document is as long as a window.
    """
    tok = getattr(tokenizer, "backend_tokenizer", tokenizer)
    if context < 8 or context % 2:
        raise ProtocolError(f"context must be an even number >= 8, got {context}")
    if not 0 < max_share <= 1:
        raise ProtocolError(f"max_share must be in (0, 1], got {max_share}")
    sep = tok.encode(SEPARATOR_TEXT, add_special_tokens=False).ids
    sep_id = sep[0] if len(sep) == 1 else None
    docs = sorted(docs, key=lambda d: d.key)
    piece = context - 1
    step = context - 1 - context // 2  # scored tokens per window: windows this far apart never score a token twice
    places: list[list[tuple[int, str]]] = []
    usable: list[Document] = []
    skipped: list[str] = []
    exact = sep_id is not None
    encodings = tok.encode_batch([d.text for d in docs], add_special_tokens=False)
    token_ids: list[np.ndarray] = []
    for doc, enc in zip(docs, encodings):
        ids = np.asarray(enc.ids, dtype=np.int64)
        if ids.size < piece:
            skipped.append(doc.key)
            continue
        found = _exact_places(tok, doc.text, enc, piece, step) if exact else []
        if not found:  # this tokenizer cannot cut exact text pieces here: plain token windows
            exact = False
        usable.append(doc)
        token_ids.append(ids)
        places.append(found)
    if not exact:  # one rule for the whole set: every window at plain token offsets
        places = [[(s, "") for s in range(0, ids.size - piece + 1, step)] for ids in token_ids]
    if not usable:
        raise ProtocolError(f"{name}: none of its {len(docs)} documents holds the {piece} tokens of one window; "
                            "use a shorter --context or a corpus of longer documents")
    undrawn: list[str] = []
    if len(usable) > max_windows:  # more documents than windows: one window each for documents spread over the set
        keep = set(_spread(len(usable), max_windows))
        undrawn = [d.key for i, d in enumerate(usable) if i not in keep]
        usable, token_ids, places = ([x for i, x in enumerate(seq) if i in keep] for seq in (usable, token_ids, places))
    counts = allocate_windows([len(p) for p in places], max_windows, max_share, name)
    rows, doc_of, starts, pieces = [], [], [], []
    sep_token = sep_id if sep_id is not None else _eos_id(tok)
    for d, (k, doc_places, ids) in enumerate(zip(counts, places, token_ids)):
        for j in _spread(len(doc_places), k):
            s, text = doc_places[j]
            rows.append(np.concatenate([[sep_token], ids[s:s + piece]]))
            doc_of.append(d)
            starts.append(s)
            pieces.append(SEPARATOR_TEXT + text)
    windows = np.stack(rows).astype(np.int64)
    text = "".join(pieces) if exact else ""
    if exact:
        back = tok.encode(text, add_special_tokens=False).ids
        exact = len(back) == windows.size and bool(np.array_equal(np.asarray(back), windows.reshape(-1)))
        text = text if exact else ""
    return EvalWindows(name, context, windows, np.asarray(doc_of, dtype=np.int64), np.asarray(starts, dtype=np.int64),
                       tuple(d.key for d in usable), tuple(skipped), text, exact, source, max_share, tuple(undrawn))


def _eos_id(tok: Any) -> int:
    from .tokens import eos_token

    try:
        return int(tok.token_to_id(eos_token(tok)))
    except ValueError:
        return 0


def _exact_places(tok: Any, text: str, enc: Any, piece: int, step: int) -> list[tuple[int, str]]:
    """Starts ``s`` (in token order, at least ``step`` apart) whose ``piece`` tokens come from a text span that
    starts and ends with a non-space character and tokenizes to exactly those tokens on its own."""
    offsets, ids = enc.offsets, enc.ids
    out: list[tuple[int, str]] = []
    s = 0
    while s + piece <= len(ids):
        a, b = offsets[s][0], offsets[s + piece - 1][1]
        span = text[a:b]
        if span and not span[0].isspace() and not span[-1].isspace() and (a == 0 or offsets[s - 1][1] <= a) \
                and tok.encode(span, add_special_tokens=False).ids == ids[s:s + piece]:
            out.append((s, span))
            s += step
        else:
            s += 1
    return out


def allocate_windows(available: Sequence[int], max_windows: int, max_share: float, name: str = "set") -> list[int]:
    """Windows per document: the largest total ``K <= max_windows`` with every document ``<= max_share * K``
    and at least one window for each, filled as evenly as each document's ``available`` allows.

    Raises:
        ProtocolError: No such ``K`` (too few documents for ``max_share``).
    """
    if max_windows < 1:
        raise ProtocolError(f"max_windows must be >= 1, got {max_windows}")
    n = len(available)
    for total in range(max_windows, n - 1, -1):
        cap = math.floor(max_share * total + 1e-9)
        if cap < 1 or sum(min(a, cap) for a in available) < total:
            continue
        counts = [0] * n
        level = 0
        while sum(counts) < total:  # water-filling: raise every document that can still take a window
            level += 1
            for i, a in enumerate(available):
                if sum(counts) < total and counts[i] < min(a, cap, level):
                    counts[i] += 1
        return counts
    raise ProtocolError(f"{name}: {n} document(s) long enough for a window cannot hold windows with none above "
                        f"{max_share:.0%} of them (that needs at least {math.ceil(1 / max_share)} documents, and "
                        f"enough windows in each); use a larger corpus or a larger max share (--max-doc-share)")


def _spread(available: int, k: int) -> list[int]:
    """``k`` of ``range(available)`` spread evenly over it (first and last included when ``k > 1``)."""
    if k <= 0:
        return []
    if k == 1:
        return [available // 2]
    return sorted({round(i * (available - 1) / (k - 1)) for i in range(k)})


def eval_windows(spec: str, split: str | None, tokenizer: Any, context: int = DEFAULT_CONTEXT,
                 max_windows: int = DEFAULT_MAX_WINDOWS, max_share: float = DEFAULT_MAX_SHARE) -> EvalWindows:
    """The protocol's windows of one set: ``spec`` (``pydoc``, ``pystdlib`` or a corpus path), ``split``
    (``dev``, ``test``, or None for the whole of a user's corpus). The entry point callers use."""
    from .corpus import pystdlib_version

    if split is not None and split not in ("dev", "test") and is_builtin(spec):
        raise ProtocolError(f"the built-in corpora are scored on 'dev' or 'test', not {split!r}: train and calib "
                            "were used to train and calibrate")
    docs = eval_documents(spec, split)
    if not docs:
        raise CorpusError(f"{spec} has no document in split {split!r}")
    name = f"{spec}/{split or 'all'}"
    source = f"{spec} ({pystdlib_version()})" if str(spec) == "pystdlib" else str(spec)
    return build_windows(docs, tokenizer, name, context, max_windows, max_share, source)


# ---------------------------------------------------------------------------------------- scoring
@dataclass
class Scores:
    """Per scored token values of one model on one :class:`EvalWindows`: arrays ``[K, scored_per_window]``.

    Attributes:
        nll: Negative log-likelihood of each target (nats).
        kl: ``KL(reference || model)`` at each scored position, when a reference was given.
        top1: Whether the model's top token equals the reference's, when a reference was given.
        ref_nll: The reference's own NLL at the same positions, when a reference was given.
    """

    nll: np.ndarray
    kl: np.ndarray | None = None
    top1: np.ndarray | None = None
    ref_nll: np.ndarray | None = None

    def reference_scores(self) -> Scores:
        """The reference's scores (NLL only), for paired ratios against it."""
        if self.ref_nll is None:
            raise ValueError("scored without a reference")
        return Scores(self.ref_nll)


def window_logprobs(logits_fn: Any, windows: EvalWindows, batch_size: int = 4) -> np.ndarray:
    """Log-probabilities ``float32 [K, scored_per_window, V]`` at the scored positions (what
    ``llama-perplexity --kl-divergence-base`` stores for a chunk). ``logits_fn`` as :func:`score`."""
    out = []
    for lp in _iter_logprobs(logits_fn, windows, batch_size):
        out.append(lp.astype(np.float32))
    return np.concatenate(out)


def _iter_logprobs(logits_fn: Any, windows: EvalWindows, batch_size: int):
    from .metrics import _log_probs, _no_grad, _numpy

    first = windows.first
    with _no_grad(logits_fn):
        for i in range(0, windows.ids.shape[0], batch_size):
            lp = _log_probs(logits_fn, windows.ids[i:i + batch_size])  # [B, C-1, V]: position t predicts t+1
            yield _numpy(lp[:, first:]).astype(np.float64)


def score(logits_fn: Any, windows: EvalWindows, reference: Any = None, batch_size: int = 4,
          progress: bool = False) -> Scores:
    """Score a model on the windows: per-token NLL, and KL / top-1 agreement to ``reference``.

    Args:
        logits_fn: ``torch [B, T] -> [B, T, V]`` function or :class:`~dmpq_compile.eval.metrics.NumpyLogits`.
        windows: The set's windows.
        reference: None, a logits function like ``logits_fn``, or the reference's log-probabilities
            from :func:`window_logprobs` (scored once, reused for many models).
        batch_size: Windows per call.
        progress: Show a progress bar.

    Raises:
        ValueError: The model and the reference disagree on the vocabulary or the windows.
    """
    from tqdm.auto import tqdm

    n = windows.ids.shape[0]
    targets = windows.targets
    nll = np.empty(targets.shape, dtype=np.float64)
    kl = np.empty(targets.shape, dtype=np.float64) if reference is not None else None
    top1 = np.empty(targets.shape, dtype=bool) if reference is not None else None
    ref_nll = np.empty(targets.shape, dtype=np.float64) if reference is not None else None
    ref_iter = None
    if reference is not None and not isinstance(reference, np.ndarray):
        ref_iter = _iter_logprobs(reference, windows, batch_size)
    elif isinstance(reference, np.ndarray) and reference.shape[:2] != targets.shape:
        raise ValueError(f"reference log-probabilities have shape {reference.shape}, the windows score "
                         f"{targets.shape}: they were computed on other windows")
    bar = tqdm(total=n, desc=f"score {windows.name}", unit="win", disable=not progress, leave=False)
    for i, lp in zip(range(0, n, batch_size), _iter_logprobs(logits_fn, windows, batch_size)):
        rows = slice(i, i + lp.shape[0])
        nll[rows] = -np.take_along_axis(lp, targets[rows, :, None], axis=-1)[..., 0]
        if reference is not None:
            ref = next(ref_iter) if ref_iter is not None else reference[rows].astype(np.float64)
            if ref.shape != lp.shape:
                raise ValueError(f"the models disagree on vocabulary size: reference {ref.shape[-1]}, model {lp.shape[-1]}")
            kl[rows] = (np.exp(ref) * (ref - lp)).sum(-1)
            ref_nll[rows] = -np.take_along_axis(ref, targets[rows, :, None], axis=-1)[..., 0]
            top1[rows] = ref.argmax(-1) == lp.argmax(-1)
        bar.update(lp.shape[0])
    bar.close()
    return Scores(nll, kl, top1, ref_nll)


# ---------------------------------------------------------------------------------------- intervals
@dataclass(frozen=True)
class Interval:
    """A point estimate and its 95 % bootstrap interval."""

    value: float
    lo: float
    hi: float

    def as_dict(self) -> dict[str, float]:
        return {"value": self.value, "lo": self.lo, "hi": self.hi}

    def format(self, fmt: str = "{:.4g}") -> str:
        return f"{fmt.format(self.value)} [{fmt.format(self.lo)}, {fmt.format(self.hi)}]"


@dataclass
class DocBootstrap:
    """Percentile bootstrap over documents for token-weighted means on one set of windows.

    Each replicate draws the set's documents with replacement (``weights[b, d]``: how often document
    ``d`` was drawn); a statistic is recomputed from per-document sums and token counts. Values of
    two models on the same windows use the same replicates: intervals of their ratios are paired.

    Args:
        doc_of_window: ``[K]`` document index of each window (or an :class:`EvalWindows`).
        n_boot: Replicates (default 2000).
        seed: numpy ``default_rng`` seed (default 0).
        level: Coverage of the interval (default 0.95).
    """

    doc_of_window: Any
    n_boot: int = DEFAULT_BOOT
    seed: int = DEFAULT_SEED
    level: float = 0.95
    weights: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.doc_of_window, EvalWindows):
            self.doc_of_window = self.doc_of_window.doc_of_window
        self.doc_of_window = np.asarray(self.doc_of_window, dtype=np.int64)
        self.n_docs = int(self.doc_of_window.max()) + 1 if self.doc_of_window.size else 0
        if self.n_docs < 2:
            raise ValueError(f"a bootstrap over documents needs at least 2 documents, got {self.n_docs}")
        rng = np.random.default_rng(self.seed)
        draws = rng.integers(0, self.n_docs, size=(self.n_boot, self.n_docs))
        self.weights = np.stack([np.bincount(row, minlength=self.n_docs) for row in draws]).astype(np.float64)

    def _doc_sums(self, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        values = np.asarray(values, dtype=np.float64)
        if values.ndim == 1:
            values = values[:, None]
        if values.shape[0] != self.doc_of_window.size:
            raise ValueError(f"values have {values.shape[0]} windows, the set has {self.doc_of_window.size}")
        sums = np.bincount(self.doc_of_window, weights=values.sum(1), minlength=self.n_docs)
        counts = np.bincount(self.doc_of_window, minlength=self.n_docs) * float(values.shape[1])
        return sums, counts

    def replicates(self, values: np.ndarray) -> tuple[float, np.ndarray]:
        """(token-weighted mean, its ``n_boot`` replicates) of per-token ``values [K, n]``."""
        sums, counts = self._doc_sums(values)
        return float(sums.sum() / counts.sum()), (self.weights @ sums) / (self.weights @ counts)

    def _interval(self, value: float, reps: np.ndarray) -> Interval:
        a = (1 - self.level) / 2
        lo, hi = np.quantile(reps, [a, 1 - a])
        return Interval(float(value), float(lo), float(hi))

    def mean(self, values: np.ndarray) -> Interval:
        """Token-weighted mean (e.g. KL) with its interval."""
        return self._interval(*self.replicates(values))

    def ppl(self, nll: np.ndarray) -> Interval:
        """Perplexity ``exp(mean NLL)`` with its interval."""
        m, reps = self.replicates(nll)
        return self._interval(math.exp(m), np.exp(reps))

    def ratio(self, a: np.ndarray, b: np.ndarray) -> Interval:
        """``mean(a) / mean(b)`` (e.g. the KL of two models), paired."""
        ma, ra = self.replicates(a)
        mb, rb = self.replicates(b)
        return self._interval(ma / mb, ra / rb)

    def ppl_ratio(self, nll_a: np.ndarray, nll_b: np.ndarray) -> Interval:
        """``ppl(a) / ppl(b) = exp(mean nll_a - mean nll_b)``, paired."""
        ma, ra = self.replicates(nll_a)
        mb, rb = self.replicates(nll_b)
        return self._interval(math.exp(ma - mb), np.exp(ra - rb))

    def record(self) -> dict:
        return {"method": "percentile bootstrap over documents, paired across models", "n_boot": self.n_boot,
                "seed": self.seed, "level": self.level, "documents": self.n_docs}


def summarize(windows: EvalWindows, scores: Mapping[str, Scores], baseline: str | None = None,
              boot: DocBootstrap | None = None) -> dict[str, dict]:
    """Per model: ppl (and KL, top-1 when scored against a reference) with intervals; with ``baseline``,
    the paired ratios ``ppl / ppl(baseline)`` and ``KL / KL(baseline)`` too. JSON-ready."""
    boot = boot or DocBootstrap(windows)
    out: dict[str, dict] = {}
    base = scores.get(baseline) if baseline is not None else None
    for label, s in scores.items():
        row: dict[str, Any] = {"ppl": boot.ppl(s.nll).as_dict(), "nll": float(s.nll.mean())}
        if s.kl is not None:
            row["kl"] = boot.mean(s.kl).as_dict()
            row["top1"] = boot.mean(s.top1.astype(np.float64)).as_dict()
        if base is not None and label != baseline:
            row["ppl_ratio"] = boot.ppl_ratio(s.nll, base.nll).as_dict()
            if s.kl is not None and base.kl is not None and float(base.kl.mean()) > 0:
                row["kl_ratio"] = boot.ratio(s.kl, base.kl).as_dict()
        out[label] = row
    return out


def format_interval(d: Mapping[str, float], fmt: str = "{:.4g}") -> str:
    """``value [lo, hi]`` of an :meth:`Interval.as_dict`."""
    return Interval(d["value"], d["lo"], d["hi"]).format(fmt)




def format_quality(quality: Mapping[str, Mapping]) -> str:
    """One line for a ``{set name: summary}`` mapping (every set: ppl, and KL / ratios where present) with
    95% intervals: what the benchmark scripts print per row, so that every domain is reported."""
    parts = []
    for name, q in quality.items():
        cells = [f"{name} ppl {format_interval(q['ppl'], '{:.4f}')}"]
        if "kl" in q:
            cells.append(f"KL {format_interval(q['kl'], '{:.3e}')}")
        if "ppl_ratio" in q:
            cells.append(f"ppl ratio {format_interval(q['ppl_ratio'], '{:.4f}')}")
        parts.append(" ".join(cells))
    return "; ".join(parts)


def flatten_eval(result: Mapping) -> dict:
    """The ``dmpq-compile eval --json`` result as one row: the first set's ``ppl`` / ``kl`` / ``tokens``, the
    others' suffixed with their domain (``ppl_pystdlib``), and every set's summary under ``quality``."""
    row: dict[str, Any] = {"quality": {}}
    for i, s in enumerate(result["sets"]):
        suffix = "" if i == 0 else "_" + s["set"].split("/")[0]
        row["ppl" + suffix] = s["ppl"]["value"]
        if "kl" in s:
            row["kl" + suffix] = s["kl"]["value"]
        row["tokens" + suffix] = s["scored_tokens"]
        row["quality"][s["set"]] = {k: s[k] for k in ("ppl", "kl", "top1", "ppl_ratio", "documents", "windows")
                                    if k in s}
    return row
