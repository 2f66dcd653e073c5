"""Run compiled artifacts with onnxruntime, numpy and tokenizers only (no torch, no transformers).

Example::

    from dmpq_compile import runtime

    model = runtime.load("out/olmoe-mixed")           # verifies manifest + every file's sha256
    print(model.generate("The capital of France is", max_new_tokens=20))
    for piece in model.generate("Once upon a time", temperature=0.8, top_p=0.9, seed=0, stream=True):
        ...
    model.score("some text").perplexity
    model.generate(long_text, truncate=True)          # past max_position_embeddings: drop the oldest
                                                      # prompt tokens (warns); without truncate: ValueError

    logits, past = model.forward([[1, 2, 3]])          # prefill: logits [1, 3, V] + KV cache
    logits, past = model.forward([[4]], past)          # one decode step after the cached tokens
    model.logits([1, 2, 3, 4])                         # [4, V], one full pass (no cache)
"""

from __future__ import annotations

import logging
from pathlib import Path

from .manifest import ArtifactError, load_manifest
from .session import KVBuffer, KVCache, Score, Session, sample

log = logging.getLogger(__name__)

__all__ = ["ArtifactError", "KVBuffer", "KVCache", "Score", "Session", "load", "sample"]


def load(path: str | Path, *, verify: bool = True, threads: int | None = None,
         max_length: int | None = None) -> Session:
    """Open the artifact folder at ``path``.

    Args:
        path: a folder written by :func:`dmpq_compile.artifact.write_artifact`.
        verify: check every listed file's size and sha256 first (recommended; costs one read
            of the weights).
        threads: onnxruntime intra-op threads (None: onnxruntime's default).
        max_length: the most positions (cached + new) any call may run, which bounds the KV cache this
            runtime grows (``8 x layers x kv_heads x head_dim`` bytes per position and sequence); None:
            the model's ``max_position_embeddings``. onnxruntime-genai preallocates its own buffer for
            ``search.max_length`` of ``genai_config.json`` (``--max-length`` at compile,
            ``GeneratorParams.set_search_options(max_length=...)`` in an app).

    Raises:
        ArtifactError: the folder is not an artifact, a file is missing, truncated or
            modified, or the artifact targets another backend.
    """
    root = Path(path)
    manifest = load_manifest(root, verify=verify)
    log.info("loading %s (%s, target %s)", root, manifest["model"].get("family"), manifest["target"].get("backend"))
    return Session(root, manifest, threads=threads, max_length=max_length)
