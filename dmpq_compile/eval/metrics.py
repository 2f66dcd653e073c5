"""Language-model quality metrics over a long token stream: strided perplexity, KL divergence, unigram.

Every metric takes a *logits function* ``logits_fn(input_ids: LongTensor[B, T]) -> Tensor[B, T, V]``
so that any model can be measured the same way: a transformers model (:func:`hf_logits_fn`), the
project's IR interpreter, or an exported artifact. A function on numpy arrays, wrapped in
:class:`NumpyLogits` (an artifact's ``Session.logits``), is measured in numpy: evaluating an
artifact never imports torch, which is imported only where a torch function is measured.

Windows: the stream of ``N`` tokens is cut into windows of ``context`` tokens whose starts advance by
``stride`` (a start never passes the last scored token, so with ``stride == context`` windows overlap by
one token; the last window is moved back so that it ends exactly at ``N``; all windows have the same
length and batch together). A window scores only the targets that no earlier window scored, so every
token ``1 .. N-1`` is predicted exactly once, with at least ``context - stride`` tokens of history
except in the first window.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm.auto import tqdm

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

LogitsFn = Callable[["torch.Tensor"], "torch.Tensor"]


@dataclass(frozen=True)
class NumpyLogits:
    """A logits function on numpy arrays, ``fn(int64 [B, T]) -> float [B, T, V]`` (e.g. an artifact's
    ``Session.logits``); :func:`perplexity` and :func:`kl_divergence` then compute in numpy."""

    fn: Callable[[np.ndarray], np.ndarray]

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        return self.fn(ids)


# -- the one implementation of next-token NLL and KL (sensitivity, RL measurement, QAT, eval) ------
def next_token_logprobs(logits: torch.Tensor) -> torch.Tensor:
    """Log-probabilities of the next token: ``[B, T, V]`` logits -> ``[B, T-1, V]`` (fp32)."""
    import torch

    return torch.log_softmax(logits[:, :-1].float(), dim=-1)


def token_nll(logp: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Per-position NLL ``[B, T-1]`` of the targets ``ids[:, 1:]`` under :func:`next_token_logprobs`."""
    return -logp.gather(-1, ids[:, 1:, None].to(logp.device)).squeeze(-1)


def token_kl(ref_logp: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """Per-position ``KL(P_ref || Q)`` in nats from log-probabilities ``[..., V]`` -> ``[...]``."""
    return (ref_logp.exp() * (ref_logp - logp)).sum(-1)


def mean_nll(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token NLL over all positions of ``[B, T, V]`` logits (scalar, differentiable)."""
    return token_nll(next_token_logprobs(logits), ids).mean()


def mean_kl(ref_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Mean over all positions of ``KL(softmax(ref) || softmax(logits))`` (scalar, differentiable)."""
    import torch

    v = logits.shape[-1]
    ref_logp = torch.log_softmax(ref_logits.reshape(-1, v).float(), dim=-1)
    return token_kl(ref_logp, torch.log_softmax(logits.reshape(-1, v).float(), dim=-1)).mean()


@dataclass(frozen=True)
class PerplexityResult:
    """Perplexity of a model on a token stream.

    Attributes:
        ppl: ``exp(nll)``.
        nll: Mean negative log-likelihood per scored token, in nats.
        n_tokens: Number of scored tokens.
    """

    ppl: float
    nll: float
    n_tokens: int


@dataclass(frozen=True)
class KLResult:
    """Mean per-token KL divergence ``KL(P_ref || Q)`` in nats.

    Attributes:
        kl: Mean over scored positions.
        max_kl: Largest per-position value.
        n_tokens: Number of scored positions.
    """

    kl: float
    max_kl: float
    n_tokens: int


@dataclass(frozen=True)
class Window:
    """One evaluation window: inputs ``ids[begin:end]``, targets ``ids[score_from:end]`` are scored."""

    begin: int
    end: int
    score_from: int


def make_windows(n_tokens: int, context: int, stride: int, max_windows: int | None = None) -> list[Window]:
    """Cut a stream of ``n_tokens`` into equal-length strided windows (see the module docstring).

    Raises:
        ValueError: Fewer than 2 tokens, or ``stride`` not in ``1 .. context``.
    """
    if n_tokens < 2:
        raise ValueError(f"need at least 2 tokens to score, got {n_tokens}")
    if context < 2 or not 1 <= stride <= context:
        raise ValueError(f"need context >= 2 and 1 <= stride <= context, got context={context} stride={stride}")
    length = min(context, n_tokens)
    windows, prev_end, start = [], 1, 0
    while prev_end < n_tokens:
        begin = min(start, prev_end - 1, n_tokens - length)  # the first new target needs >= 1 token of history
        end = begin + length
        windows.append(Window(begin, end, prev_end))
        prev_end, start = end, start + stride
        if max_windows is not None and len(windows) >= max_windows:
            break
    return windows


def _batches(windows: Sequence[Window], batch_size: int) -> Iterator[Sequence[Window]]:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for i in range(0, len(windows), batch_size):
        yield windows[i:i + batch_size]


def _as_ids(token_ids: Any) -> np.ndarray:
    ids = np.asarray(token_ids)  # lists, numpy arrays and CPU tensors alike
    if ids.ndim != 1:
        raise ValueError(f"token_ids must be a 1-D stream of token ids, got shape {tuple(ids.shape)}")
    return ids.astype(np.int64, copy=False)


def _window_batch(ids: np.ndarray, batch: Sequence[Window]) -> tuple[np.ndarray, np.ndarray]:
    """Stack a batch of windows; the mask marks positions whose next-token prediction is scored."""
    inputs = np.stack([ids[w.begin:w.end] for w in batch])
    mask = np.zeros((inputs.shape[0], inputs.shape[1] - 1), dtype=bool)
    for row, w in enumerate(batch):
        mask[row, w.score_from - w.begin - 1:] = True
    return inputs, mask


def _log_probs(logits_fn: LogitsFn | NumpyLogits, inputs: np.ndarray) -> Any:
    """Next-token log-probabilities ``[B, T-1, V]``: numpy for :class:`NumpyLogits`, else torch."""
    if isinstance(logits_fn, NumpyLogits):
        logits = np.asarray(logits_fn(inputs))
    else:
        import torch

        logits = logits_fn(torch.from_numpy(inputs))
    if logits.ndim != 3 or tuple(logits.shape[:2]) != tuple(inputs.shape):
        raise ValueError(f"logits_fn returned shape {tuple(logits.shape)} for inputs {tuple(inputs.shape)}; "
                         "expected [batch, seq, vocab]")
    if isinstance(logits, np.ndarray):
        x = logits[:, :-1].astype(np.float32)
        x = x - x.max(axis=-1, keepdims=True)
        return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))
    return next_token_logprobs(logits)


def _numpy(x: Any) -> np.ndarray:
    return x if isinstance(x, np.ndarray) else x.detach().cpu().numpy()


def _position_nll(logp: Any, inputs: np.ndarray) -> np.ndarray:
    """Per-position NLL ``[B, T-1]`` (float64) of the targets ``inputs[:, 1:]``."""
    if isinstance(logp, np.ndarray):
        return -np.take_along_axis(logp, inputs[:, 1:, None], axis=-1)[..., 0].astype(np.float64)
    import torch

    return _numpy(token_nll(logp, torch.from_numpy(inputs)).double())


def _position_kl(logp: Any, logq: Any) -> np.ndarray:
    """Per-position ``KL(P || Q)`` ``[B, T-1]`` (float64) from two log-probability arrays."""
    if logp.shape != logq.shape:
        raise ValueError(f"models disagree on vocabulary size: P gives {logp.shape[-1]}, Q gives {logq.shape[-1]}")
    if isinstance(logp, np.ndarray) or isinstance(logq, np.ndarray):
        logp, logq = _numpy(logp), _numpy(logq)
        return (np.exp(logp) * (logp - logq)).sum(axis=-1, dtype=np.float64)
    return _numpy(token_kl(logp, logq.to(logp.device)).double())


def _no_grad(*fns: Any) -> Any:
    """torch.inference_mode() when a torch function is measured; nothing to switch off for numpy ones."""
    if all(isinstance(f, NumpyLogits) for f in fns):
        import contextlib

        return contextlib.nullcontext()
    import torch

    return torch.inference_mode()


def perplexity(logits_fn: LogitsFn | NumpyLogits, token_ids: Any, context: int = 256, stride: int = 128,
               batch_size: int = 8, max_windows: int | None = None, progress: bool = True) -> PerplexityResult:
    """Strided sliding-window perplexity of a model on a token stream.

    Args:
        logits_fn: Maps ``LongTensor[B, T]`` to logits ``[B, T, V]``, or a :class:`NumpyLogits`.
        token_ids: 1-D token ids (list, numpy array or tensor).
        context: Window length in tokens.
        stride: Distance between window starts; each window scores at most ``stride`` new tokens.
        batch_size: Windows per ``logits_fn`` call.
        max_windows: Score only the first windows (a quick estimate).
        progress: Show a tqdm progress bar.

    Returns:
        The perplexity, mean NLL and number of scored tokens.
    """
    ids = _as_ids(token_ids)
    windows = make_windows(ids.size, context, stride, max_windows)
    nll_sum, count = 0.0, 0
    bar = tqdm(total=len(windows), desc="perplexity", unit="win", disable=not progress)
    with _no_grad(logits_fn):
        for batch in _batches(windows, batch_size):
            inputs, mask = _window_batch(ids, batch)
            nll_sum += float(_position_nll(_log_probs(logits_fn, inputs), inputs)[mask].sum())
            count += int(mask.sum())
            bar.update(len(batch))
    bar.close()
    nll = nll_sum / count
    log.info("perplexity %.3f (nll %.4f) over %d tokens in %d windows", math.exp(nll), nll, count, len(windows))
    return PerplexityResult(ppl=math.exp(nll), nll=nll, n_tokens=count)


def kl_divergence(logits_fn_p: LogitsFn | NumpyLogits, logits_fn_q: LogitsFn | NumpyLogits, token_ids: Any,
                  context: int = 256, stride: int = 128, batch_size: int = 8, max_windows: int | None = None,
                  progress: bool = True) -> KLResult:
    """Mean per-token ``KL(P || Q)`` between a reference model P and a model Q over strided windows.

    The positions are the same as those :func:`perplexity` scores with the same arguments.

    Args:
        logits_fn_p: Reference model (e.g. the fp32 original).
        logits_fn_q: Compared model (e.g. the quantized artifact); same vocabulary size.
        token_ids: 1-D token ids.
        context: Window length in tokens.
        stride: Distance between window starts.
        batch_size: Windows per call of each logits function.
        max_windows: Use only the first windows.
        progress: Show a tqdm progress bar.

    Raises:
        ValueError: The two models' vocabulary sizes differ.
    """
    ids = _as_ids(token_ids)
    windows = make_windows(ids.size, context, stride, max_windows)
    kl_sum, kl_max, count = 0.0, 0.0, 0
    bar = tqdm(total=len(windows), desc="kl", unit="win", disable=not progress)
    with _no_grad(logits_fn_p, logits_fn_q):
        for batch in _batches(windows, batch_size):
            inputs, mask = _window_batch(ids, batch)
            kl = _position_kl(_log_probs(logits_fn_p, inputs), _log_probs(logits_fn_q, inputs))[mask]
            kl_sum += float(kl.sum())
            kl_max = max(kl_max, float(kl.max())) if kl.size else kl_max
            count += int(mask.sum())
            bar.update(len(batch))
    bar.close()
    return KLResult(kl=kl_sum / count, max_kl=kl_max, n_tokens=count)


def hf_logits_fn(model: Any) -> LogitsFn:
    """Wrap a transformers causal LM as a logits function (eval mode, no KV cache, inputs moved to its device).

    Args:
        model: A ``transformers`` ``*ForCausalLM`` model.
    """
    import torch

    model.eval()
    device = next(model.parameters()).device

    def logits_fn(input_ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model(input_ids=input_ids.to(device), use_cache=False).logits

    return logits_fn


def unigram_perplexity(train_ids: Any, test_ids: Any, vocab_size: int) -> PerplexityResult:
    """Perplexity of an add-one (Laplace) smoothed unigram model fitted on ``train_ids``: the baseline.

    Raises:
        ValueError: A token id falls outside ``0 .. vocab_size - 1`` or ``test_ids`` is empty.
    """
    train, test = np.asarray(train_ids, dtype=np.int64), np.asarray(test_ids, dtype=np.int64)
    for name, arr in (("train_ids", train), ("test_ids", test)):
        if arr.size and (arr.min() < 0 or arr.max() >= vocab_size):
            raise ValueError(f"{name} holds ids outside 0..{vocab_size - 1}: check vocab_size")
    if test.size == 0:
        raise ValueError("test_ids is empty")
    counts = np.bincount(train, minlength=vocab_size).astype(np.float64) + 1.0
    logp = np.log(counts) - math.log(train.size + vocab_size)
    nll = float(-logp[test].mean())
    return PerplexityResult(ppl=math.exp(nll), nll=nll, n_tokens=int(test.size))
