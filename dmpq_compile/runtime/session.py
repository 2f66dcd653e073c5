"""Running an ``ort-cpu`` artifact: logits with a KV cache, scoring and text generation.

Imports only onnxruntime, numpy, tokenizers and the standard library (onnxruntime and
tokenizers lazily), so a deployment needs neither torch nor transformers.
"""

from __future__ import annotations

import logging
import platform
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from .manifest import ArtifactError

log = logging.getLogger(__name__)

BACKEND = "ort-cpu"


@dataclass
class KVCache:
    """Per-layer attention keys/values ``[batch, kv_heads, length, head_dim]`` (fp32), layer order."""

    keys: list[np.ndarray]
    values: list[np.ndarray]

    @property
    def length(self) -> int:
        """Number of cached positions (tokens already processed)."""
        return int(self.keys[0].shape[2]) if self.keys else 0

    @property
    def batch(self) -> int:
        return int(self.keys[0].shape[0]) if self.keys else 0


@dataclass
class KVBuffer:
    """A KV cache of a fixed ``capacity`` of positions that each call's past and present share
    (onnxruntime-genai's ``past_present_share_buffer``), made by :meth:`Session.empty_cache` with a
    capacity. A decode step then writes its one new row per layer in place, where a growing
    :class:`KVCache` copies every cached position into a new ``present`` per step (at OLMoE-1B-7B's
    shape, 16 layers x 2 x 16 heads x 128 x 4 bytes = 256 KB a position: 128 MB a step at 512 cached
    positions). Memory: ``capacity`` positions, allocated once.

    ``keys[l][:, :, :length]`` (``values`` alike) are the cached positions. :meth:`Session.forward`
    returns the same buffers with ``length`` advanced: continue from what it returns, not from an
    earlier handle (its positions beyond its own length have been overwritten).
    """

    keys: list[np.ndarray]
    values: list[np.ndarray]
    length: int = 0
    ort_values: list[tuple[Any, Any]] | None = None  # OrtValues over the same memory, made on first use

    @property
    def capacity(self) -> int:
        return int(self.keys[0].shape[2]) if self.keys else 0

    @property
    def batch(self) -> int:
        return int(self.keys[0].shape[0]) if self.keys else 0

    def view(self) -> KVCache:
        """The cached positions as a :class:`KVCache` (views, not copies)."""
        return KVCache([k[:, :, :self.length] for k in self.keys], [v[:, :, :self.length] for v in self.values])


@dataclass(frozen=True)
class Score:
    """Mean next-token negative log-likelihood (nats) over ``tokens`` predictions, and its exp."""

    nll: float
    perplexity: float
    tokens: int


def register_custom_ops(options: Any, root: Path, target: Mapping[str, Any]) -> None:
    """Make onnxruntime session ``options`` load the custom-op library an artifact carries (``--dispatch
    kernel``: ``target["custom_ops_library"]``, relative to the artifact folder ``root``); nothing without one.

    Raises:
        ArtifactError: the file is missing, or onnxruntime refuses it (with its message, e.g. a forced CPU path
            this CPU lacks).
    """
    library = target.get("custom_ops_library")
    if not library:
        return
    system, machine = platform.system(), platform.machine()
    # native.build_library's rule, restated: the runtime imports nothing of the compiler (tests/test_layering.py)
    if system != "Linux" or machine.lower() not in ("x86_64", "amd64"):
        raise ArtifactError(f"this artifact runs its experts on dmpq's kernel library ({library}, dispatch "
                            f"{target.get('dispatch', 'kernel')}), built for Linux x86-64; this machine is "
                            f"{system} {machine}. "
                            "Compile it again with --dispatch fused for an artifact of stock onnxruntime ops")
    path = root / library
    if not path.is_file():
        raise ArtifactError(f"the artifact's kernel library {path} is missing; copy the whole artifact folder "
                            "(its kernels/ folder included) or compile it again")
    try:
        options.register_custom_ops_library(str(path))
    except Exception as e:  # onnxruntime raises its own types
        raise ArtifactError(f"onnxruntime cannot load the artifact's kernel library {path}: {e}") from e


class Session:
    """A loaded artifact. Create it with :func:`dmpq_compile.runtime.load`.

    Token-id API (no tokenizer needed): :meth:`forward`, :meth:`logits`, :meth:`score_ids`,
    :meth:`generate_ids`. Text API (needs the artifact's ``tokenizer.json``): :meth:`generate`,
    :meth:`score`, :meth:`encode`, :meth:`decode`.

    Context length: no call runs positions beyond the model's ``max_position_embeddings``
    (:attr:`max_positions`), where the model was never trained and its text silently degrades.
    Such calls raise ``ValueError``; only :meth:`generate` / :meth:`generate_ids` with
    ``truncate=True`` shorten the prompt instead (dropping its oldest tokens, with a warning).
    """

    def __init__(self, root: Path, manifest: dict[str, Any], threads: int | None = None,
                 max_length: int | None = None) -> None:
        target = manifest["target"]
        if target.get("backend") != BACKEND or target.get("format") != "onnx":
            raise ArtifactError(f"{root} targets {target.get('backend')!r}; this runtime runs {BACKEND!r} artifacts "
                                f"(compile with --target {BACKEND})")
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # ORT warns at load that the optional ``logits_to_keep`` input (an initializer holding its default) is not
        # folded as a constant, which is its purpose; its load-time warnings are for model authors (-vv shows them)
        options.log_severity_level = 2 if log.isEnabledFor(logging.DEBUG) else 3
        if threads:
            options.intra_op_num_threads = int(threads)
        self.root, self.manifest = root, manifest
        register_custom_ops(options, root, target)  # dmpq's kernel library, where the artifact carries one
        try:
            self._sess = ort.InferenceSession(str(root / target["model_file"]), options,
                                              providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own exception types
            raise ArtifactError(f"onnxruntime cannot load {root / target['model_file']}: {e}") from e
        io = target["io"]
        self._ids_name, self._logits_name, self._kv = io["input_ids"], io["logits"], io["kv_cache"]
        self._keep_name: str | None = io.get("logits_to_keep")  # artifacts before it compute every position
        self._mask_name: str | None = io.get("attention_mask")  # the genai contract; older artifacts have none
        self._outputs = [self._logits_name] + [n for kv in self._kv for n in (kv["present_key"], kv["present_value"])]
        self.vocab_size = int(manifest["model"]["vocab_size"])
        limit = manifest["model"].get("max_position_embeddings")
        self.max_positions: int | None = int(limit) if limit else None  # None: the manifest records no limit
        self.max_length = max_length  # a caller's bound on positions, hence on the KV cache's memory
        if max_length is not None:
            if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
                raise ValueError(f"max_length must be an int >= 2, got {max_length!r}")
            self.max_positions = min(max_length, self.max_positions or max_length)
        tok = manifest.get("tokenizer", {})
        self.eos_token_ids = frozenset(int(i) for i in tok.get("eos_token_ids", []))
        self._tokenizer_file = tok.get("tokenizer_file")
        self._tokenizer: Any = None

    # -- token-id API --------------------------------------------------------------------------
    def empty_cache(self, batch: int = 1, capacity: int | None = None) -> KVCache | KVBuffer:
        """A KV cache holding no positions, for ``batch`` sequences: a growing :class:`KVCache`, or with
        ``capacity`` a :class:`KVBuffer` of that many positions (prompt plus new tokens), whose decode
        steps write in place (artifacts that take an ``attention_mask``; for older ones it works the
        same, without the gain)."""
        if capacity is not None:
            if isinstance(capacity, bool) or not isinstance(capacity, (int, np.integer)) or capacity < 1:
                raise ValueError(f"capacity must be an int >= 1 (positions of prompt plus new tokens), got {capacity!r}")
            if self.max_positions and capacity > self.max_positions:
                raise ValueError(f"capacity {capacity} exceeds the {self.max_positions} positions this session runs "
                                 "(max_position_embeddings, or max_length given to load()); ask for fewer")
        shapes = [(batch, kv["num_kv_heads"], int(capacity or 0), kv["head_dim"]) for kv in self._kv]
        keys, values = ([np.zeros(s, np.float32) for s in shapes] for _ in range(2))
        return KVCache(keys, values) if capacity is None else KVBuffer(keys, values)

    @property
    def keeps_logits(self) -> bool:
        """Whether the artifact itself skips the positions ``logits_to_keep`` drops (compiled since that input
        exists); older artifacts compute every position's logits and :meth:`forward` slices them."""
        return self._keep_name is not None

    @property
    def takes_mask(self) -> bool:
        """Whether the artifact takes an ``attention_mask`` (compiled with onnxruntime-genai's contract), so
        that rows of a batch may carry padding (see :meth:`forward`)."""
        return self._mask_name is not None

    def forward(self, ids: Any, past: KVCache | KVBuffer | None = None, logits_to_keep: int = 0,
                attention_mask: Any = None) -> tuple[np.ndarray, KVCache | KVBuffer]:
        """Run new tokens ``ids`` (``[T]`` or ``[B, T]``) after the cached ``past`` positions.

        ``past`` may be a :class:`KVBuffer` (:meth:`empty_cache` with a capacity): the call then returns
        it, advanced. A one-token step of an artifact that takes an ``attention_mask`` binds the
        buffer as both past and present (onnxruntime's I/O binding), so the kernel writes the new row in
        place; other calls run as with a :class:`KVCache` on the buffer's positions and copy the new
        ones in.

        ``logits_to_keep``: return the logits of the last N new positions only (0: all of them). A
        prefill that only samples the next token passes 1, and the artifact skips the other
        positions' vocabulary projection (see :attr:`keeps_logits`). With an ``attention_mask``, 1 keeps
        each row's last real new token instead (the last new column its mask marks 1).

        ``attention_mask``: ``[B, past + T]`` of 0/1 (or ``[past + T]`` for 1-D ``ids``): 0 marks padding
        in either cached or new columns, which no row attends and which does not advance a row's
        positions, so a padded row computes what it would alone (left or right padding). None: no padding.
        Only artifacts that take a mask (:attr:`takes_mask`) accept one.

        Returns:
            ``(logits, present)``: float32 logits ``[B, T', V]`` (``[T', V]`` for 1-D ``ids``), ``T' = T``
            or ``min(logits_to_keep, T)``, and the cache extended by all new tokens (pass it as ``past``
            to continue).
        """
        if isinstance(logits_to_keep, bool) or not isinstance(logits_to_keep, (int, np.integer)) \
                or logits_to_keep < 0:
            raise ValueError(f"logits_to_keep must be an int >= 0 (0: every position), got {logits_to_keep!r}")
        arr, squeeze = self._check_ids(ids)
        past = past if past is not None else self.empty_cache(arr.shape[0])
        if isinstance(past, KVBuffer) and past.length + arr.shape[1] > past.capacity:
            raise ValueError(f"{past.length} cached + {arr.shape[1]} new positions exceed the KV buffer's capacity "
                             f"{past.capacity}; make it with empty_cache(capacity=...) for the prompt plus every new token")
        if len(past.keys) != len(self._kv) or past.batch != arr.shape[0]:
            raise ValueError(f"past holds {len(past.keys)} layers for batch {past.batch}, but this model has "
                             f"{len(self._kv)} layers and ids have batch {arr.shape[0]}; pass the cache this "
                             "session returned for the same sequences")
        total = past.length + arr.shape[1]
        if self.max_length is not None and total > self.max_length:
            raise ValueError(f"{total} positions ({past.length} cached + {arr.shape[1]} new) exceed max_length "
                             f"{self.max_length} given to load(), which bounds this session's KV cache; load the "
                             "artifact with a larger max_length (at most the model's max_position_embeddings)")
        if self.max_positions and total > self.max_positions:
            raise ValueError(f"{total} positions ({past.length} cached + {arr.shape[1]} new) exceed this model's "
                             f"max_position_embeddings {self.max_positions}: it was not trained that far and its "
                             "output would silently degrade; feed at most that many tokens (generate(..., "
                             "truncate=True) keeps the newest prompt tokens; perplexity uses shorter windows)")
        feed = {self._ids_name: arr}
        if attention_mask is not None or self._mask_name is not None:
            feed.update(self._mask_feed(attention_mask, arr.shape[0], total))
        if isinstance(past, KVBuffer) and arr.shape[1] == 1 and self._mask_name is not None:
            # one new position: logits_to_keep changes nothing (the default -1 keeps the only column,
            # and it is an initializer, which I/O binding cannot bind)
            logits = self._step_in_place(feed, past)
            present: KVCache | KVBuffer = replace(past, length=total)
        else:
            if self._keep_name is not None:
                feed[self._keep_name] = np.array(logits_to_keep, np.int64)
            cache = past.view() if isinstance(past, KVBuffer) else past
            for kv, k, v in zip(self._kv, cache.keys, cache.values):
                feed[kv["past_key"]], feed[kv["past_value"]] = k, v
            out = self._sess.run(self._outputs, feed)
            present = KVCache(out[1::2], out[2::2])
            logits = out[0] if self._keep_name is not None or not logits_to_keep else out[0][:, -logits_to_keep:]
            if isinstance(past, KVBuffer):  # the new positions into the buffer
                for buf, new in zip((*past.keys, *past.values), (*present.keys, *present.values)):
                    buf[:, :, past.length:total] = new[:, :, past.length:total]
                present = replace(past, length=total)
        if not np.isfinite(logits.sum()):  # one pass, no [B, T, V] mask: NaN and inf carry into the sum
            raise FloatingPointError(
                "the artifact computed non-finite logits (inf or NaN). ort-cpu runs its quantized products on "
                "float16 activations (largest value 65504), as fp16 GPU kernels do: if the source checkpoint gives "
                "finite logits for these tokens, an activation overflowed float16 here: compile again with "
                "--scale-dtype float32, which keeps fp32 activations")
        return (logits[0] if squeeze else logits), present

    def _step_in_place(self, feed: dict[str, np.ndarray], past: KVBuffer) -> np.ndarray:
        """Run ``feed`` with ``past``'s buffers bound as both past and present; the logits."""
        import onnxruntime as ort

        if past.ort_values is None:  # OrtValues over the numpy buffers' memory (no copy)
            past.ort_values = [(ort.OrtValue.ortvalue_from_numpy(k), ort.OrtValue.ortvalue_from_numpy(v))
                               for k, v in zip(past.keys, past.values)]
        binding = self._sess.io_binding()
        for name, value in feed.items():
            binding.bind_cpu_input(name, value)
        binding.bind_output(self._logits_name)
        for kv, (k, v) in zip(self._kv, past.ort_values):
            binding.bind_ortvalue_input(kv["past_key"], k)
            binding.bind_ortvalue_input(kv["past_value"], v)
            binding.bind_ortvalue_output(kv["present_key"], k)
            binding.bind_ortvalue_output(kv["present_value"], v)
        self._sess.run_with_iobinding(binding)
        return binding.get_outputs()[0].numpy()  # the logits alone (copy_outputs_to_cpu copies the whole cache)

    def logits(self, ids: Any, past: KVCache | None = None) -> np.ndarray:
        """Logits of ``ids`` (``[T]`` -> ``[T, V]``, ``[B, T]`` -> ``[B, T, V]``), optionally after ``past``."""
        return self.forward(ids, past)[0]

    def score_ids(self, ids: Sequence[int], chunk: int = 512) -> Score:
        """Mean NLL of predicting ``ids[1:]`` from their prefixes, evaluated ``chunk`` tokens at a time."""
        arr, _ = self._check_ids(ids)
        if arr.shape[0] != 1 or arr.shape[1] < 2:
            raise ValueError(f"score needs one sequence of at least 2 tokens, got shape {arr.shape}")
        if self.max_positions and arr.shape[1] > self.max_positions:
            raise ValueError(f"score needs the text to fit in the model's max_position_embeddings "
                             f"{self.max_positions}, got {arr.shape[1]} tokens; score a shorter text, or use "
                             "dmpq_compile.eval.perplexity (strided windows) for long texts")
        past, total, count = None, 0.0, 0
        for start in range(0, arr.shape[1] - 1, chunk):
            piece = arr[:, start:start + chunk]
            logits, past = self.forward(piece, past)
            targets = arr[0, start + 1:start + 1 + piece.shape[1]]
            lp = _log_softmax(logits[0, :len(targets)].astype(np.float64))
            total -= float(lp[np.arange(len(targets)), targets].sum())
            count += len(targets)
        nll = total / count
        return Score(nll, float(np.exp(nll)), count)

    def generate_ids(self, prompt_ids: Sequence[int], max_new_tokens: int = 64, temperature: float = 0.0,
                     top_p: float = 1.0, seed: int | None = None, truncate: bool = False) -> Iterator[int]:
        """Yield up to ``max_new_tokens`` new token ids, stopping after an EOS token (not yielded).

        Greedy when ``temperature == 0``; otherwise nucleus (top-p) sampling at ``temperature``.
        The prompt plus ``max_new_tokens`` must fit in :attr:`max_positions`; otherwise this raises
        ``ValueError`` (before generating anything), or with ``truncate=True`` drops the oldest
        prompt tokens to make them fit and logs a warning saying how many.
        """
        _check_sampling(max_new_tokens, temperature, top_p)
        prompt_ids = self.fit_prompt(prompt_ids, max_new_tokens, truncate)
        rng = np.random.default_rng(seed)
        past = self.empty_cache(1, capacity=len(prompt_ids) + max_new_tokens)  # decode steps write in place
        logits, past = self.forward(np.asarray(prompt_ids, dtype=np.int64)[None, :], past, logits_to_keep=1)
        for _ in range(max_new_tokens):
            token = sample(logits[0, -1], temperature, top_p, rng)
            if token in self.eos_token_ids:
                return
            yield token
            logits, past = self.forward(np.array([[token]], dtype=np.int64), past)

    def fit_prompt(self, prompt_ids: Sequence[int], max_new_tokens: int, truncate: bool = False) -> list[int]:
        """``prompt_ids`` if it and ``max_new_tokens`` fit in :attr:`max_positions`, else its newest part
        (``truncate=True``, with a warning) or a ``ValueError`` saying what to change."""
        ids, limit = list(prompt_ids), self.max_positions
        if not limit or len(ids) + max_new_tokens <= limit:
            return ids
        what = f"max_length {limit} given to load()" if self.max_length == limit else \
            f"this model's max_position_embeddings {limit}"
        if max_new_tokens >= limit:
            raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for the prompt in {what}; ask for fewer "
                             "new tokens")
        drop = len(ids) + max_new_tokens - limit
        if not truncate:
            raise ValueError(f"the prompt has {len(ids)} tokens and max_new_tokens={max_new_tokens}: together "
                             f"more than {what}; shorten the prompt, lower "
                             f"max_new_tokens, or truncate (truncate=True, `run --truncate`) to drop the oldest "
                             f"{drop} prompt tokens")
        log.warning("the prompt has %d tokens: dropped the oldest %d so that it and max_new_tokens=%d fit in the "
                    "model's %d positions", len(ids), drop, max_new_tokens, limit)
        return ids[drop:]

    # -- text API ------------------------------------------------------------------------------
    @property
    def tokenizer(self) -> Any:
        """The artifact's ``tokenizers.Tokenizer`` (loaded on first use)."""
        if self._tokenizer is None:
            if not self._tokenizer_file or not (self.root / self._tokenizer_file).is_file():
                raise ArtifactError(f"{self.root} has no tokenizer.json (its source model had none); use the "
                                    "token-id methods (logits, score_ids, generate_ids) instead")
            from tokenizers import Tokenizer

            self._tokenizer = Tokenizer.from_file(str(self.root / self._tokenizer_file))
        return self._tokenizer

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"expected text as str, got {type(text).__name__}")
        return list(self.tokenizer.encode(text).ids)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def score(self, text: str, chunk: int = 512) -> Score:
        """Mean NLL / perplexity of ``text`` under the model (see :meth:`score_ids`)."""
        return self.score_ids(self.encode(text), chunk=chunk)

    def generate(self, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int | None = None, stream: bool = False, truncate: bool = False) -> str | Iterator[str]:
        """Continue ``prompt``; returns the new text, or with ``stream=True`` an iterator of text pieces.

        A prompt too long for the model raises ``ValueError`` right here (also with ``stream=True``),
        unless ``truncate=True`` (see :meth:`generate_ids`).
        """
        ids = self.encode(prompt)
        if not ids:
            raise ValueError("the prompt encodes to no tokens; give a non-empty prompt")
        _check_sampling(max_new_tokens, temperature, top_p)
        ids = self.fit_prompt(ids, max_new_tokens, truncate)
        pieces = self._stream(ids, max_new_tokens, temperature, top_p, seed)
        return pieces if stream else "".join(pieces)

    def _stream(self, ids: list[int], *args: Any) -> Iterator[str]:
        new: list[int] = []
        shown = ""
        for token in self.generate_ids(ids, *args):
            new.append(token)
            text = self.decode(new)
            if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
                continue
            if len(text) > len(shown) and text.startswith(shown):
                yield text[len(shown):]
            shown = text

    # -- checks --------------------------------------------------------------------------------
    def _mask_feed(self, mask: Any, batch: int, total: int) -> dict[str, np.ndarray]:
        if self._mask_name is None:
            raise ValueError(f"{self.root} takes no attention_mask (compiled before ort-cpu artifacts followed "
                             "onnxruntime-genai's contract): its rows cannot carry padding; compile it again")
        if mask is None:
            return {self._mask_name: np.ones((batch, total), np.int64)}
        arr = np.asarray(mask)
        arr = arr[None, :] if arr.ndim == 1 else arr
        if arr.shape != (batch, total) or arr.dtype.kind not in "iub" or not np.isin(arr, (0, 1)).all():
            raise ValueError(f"attention_mask must be 0/1 integers of shape [batch, past + new] = [{batch}, {total}], "
                             f"got dtype {arr.dtype} shape {arr.shape}")
        return {self._mask_name: arr.astype(np.int64, copy=False)}

    def _check_ids(self, ids: Any) -> tuple[np.ndarray, bool]:
        arr = np.asarray(ids)
        if arr.ndim not in (1, 2) or arr.size == 0 or (arr.dtype.kind not in "iu"):
            raise ValueError(f"ids must be a non-empty integer array [T] or [B, T], got dtype {arr.dtype} "
                             f"shape {arr.shape}")
        if arr.min() < 0 or arr.max() >= self.vocab_size:
            raise ValueError(f"token ids must lie in [0, {self.vocab_size}), got range [{arr.min()}, {arr.max()}]")
        return (arr[None, :] if arr.ndim == 1 else arr).astype(np.int64, copy=False), arr.ndim == 1


def sample(logits: np.ndarray, temperature: float, top_p: float, rng: np.random.Generator) -> int:
    """Next token from a logits row: argmax at temperature 0, else top-p sampling."""
    if temperature == 0:
        return int(np.argmax(logits))
    probs = np.exp(_log_softmax(logits.astype(np.float64) / temperature))
    order = np.argsort(-probs, kind="stable")
    cum = np.cumsum(probs[order])
    keep = order[: int(np.searchsorted(cum, top_p, side="left")) + 1]  # smallest prefix with mass >= top_p
    p = probs[keep] / probs[keep].sum()
    return int(keep[rng.choice(len(keep), p=p)])


def _log_softmax(x: np.ndarray) -> np.ndarray:
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def _check_sampling(max_new_tokens: int, temperature: float, top_p: float) -> None:
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature!r}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
