"""A disk cache of analysis-pass results, so a second compile of the same checkpoint skips them.

Profiling and sensitivity take most of a real compile's time (OLMoE-1B-7B shape: 646 s of
819 s) and depend neither on the budget nor on the allocator, so a user sweeping
``--budget-bits`` or trying another allocator, or re-running a compile that was killed during
quantization or emission, would otherwise pay for them again. A pass opts in with
``cacheable = True``; it must change nothing but node annotations (the manager checks this and
stores nothing otherwise).

The key is a hash of everything the result can depend on:

* the pass name and options, what else its result depends on here (``Pass.environment``, e.g.
  the calibration's compute dtype that ``auto`` resolves per CPU), and the source of the code
  that computes it (every ``.py`` file
  of the installed ``dmpq_compile`` packages, plus the pass class's own file for plug-ins), so
  an upgraded or edited installation never reads an older result;
* the graph: structure, ``meta`` and every annotation present before the pass;
* the weights: for a tensor still on disk its file (resolved path, size, modification time in
  nanoseconds), offset, shape and dtype; for a tensor in memory (e.g. after QAT) a hash of its
  bytes. Above ``MAX_HASHED_BYTES`` of in-memory weights the pass is not cached (hashing would
  cost more than it saves);
* the calibration token ids, the seed, the target name and the backend's bit-widths and weight
  formats.

An entry is a small JSON file (the annotations the pass added or changed, and its stats): about
100 KB for 1024 experts. Entries are written atomically; an unreadable entry is ignored and
recomputed. The folder is ``$DMPQ_CACHE_DIR/passes`` (default ``~/.cache/dmpq-compile/passes``);
``dmpq-compile compile --no-cache`` turns the cache off, and deleting the folder empties it.

Partial state: a pass that runs for long may also resume after an interruption (a kill, Ctrl-C,
a crash, a full disk) without redoing finished work. While such a pass (``Pass.resumable``) runs,
:func:`run_cached` gives it a folder ``<name>-<key>.partial`` beside the entry it will write (``PassContext.state_dir``), keyed
by the same key, so a changed checkpoint, option, calibration set or code never resumes from
stale state; the pass keeps what it finished there, and a rerun with the same key picks it up.
The folder is removed once the pass has finished (and its result is stored); while a run uses it,
it holds a lock there (a second compile with the same key at the same time keeps no partial
state, and leaves the folder alone). The sensitivity pass
keeps its forward boundaries and each finished layer of its backward pass there
(:mod:`dmpq_compile.passes.sensitivity.resume`: about ``S x T x H x 4`` bytes a layer, 0.9 GB
for Qwen3-30B-A3B's 48 layers at 16 x 128 calibration tokens). A resumable pass need not be
cacheable: the quantize pass writes weights, so its result is never stored, but it gets a folder
keyed the same way, where it keeps each finished layer's codes
(:mod:`dmpq_compile.passes.quantize_resume`). What the resumable passes share about the folder
(the disk-space refusal, naming other keys' folders) is in :mod:`.partial`. A folder left by an
interrupted compile that is never rerun stays until deleted (the pass names such folders when it
starts); ``--no-cache`` writes none.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import importlib.util
import inspect
import json
import logging
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from functools import cache
from pathlib import Path
from typing import Any

import torch

from ...fileio import atomic_write_bytes, cache_root
from ...ir.annotations import decode_annotation
from ...ir.graph import Graph
from .base import Pass, PassContext, PassResult

log = logging.getLogger(__name__)

MAX_HASHED_BYTES = 256 * 2**20
FORMAT = 1


def default_folder() -> Path:
    return cache_root() / "passes"


@cache
def _source_digest(files: tuple[str, ...]) -> str:
    h = hashlib.blake2b(digest_size=16)
    for f in files:
        h.update(f.encode())
        h.update(Path(f).read_bytes())
    return h.hexdigest()


def code_digest(p: Pass) -> str:
    """A hash of the installed project's Python sources and of the pass's own module file."""
    roots = set()
    for package in ("dmpq_compile", "dmpq_compile.passes", "dmpq_compile.backends"):  # located, not imported
        spec = importlib.util.find_spec(package)
        roots.update(Path(p) for p in (spec.submodule_search_locations or []) if spec)
    files = sorted({str(f) for r in roots for f in r.rglob("*.py")})
    own = inspect.getsourcefile(type(p))
    if own and own not in files:
        files.append(own)
    return _source_digest(tuple(files))


def _json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=repr)


def _weights_digest(graph: Graph) -> str | None:
    """A hash identifying every weight's content, or None when too much lives only in memory."""
    store, h, hashed = graph.weights, hashlib.blake2b(digest_size=16), 0
    files: dict[str, str] = {}  # path -> its identity as JSON, one stat per file
    for key in sorted(store):
        raw = store.ref(key)
        h.update(key.encode())
        if raw is not None:
            if raw.path not in files:
                st = os.stat(raw.path)
                files[raw.path] = _json([os.path.realpath(raw.path), st.st_size, st.st_mtime_ns])
            h.update(files[raw.path].encode())
            h.update(_json([raw.offset, list(raw.shape), str(raw.dtype)]).encode())
        else:
            t = store[key].detach().contiguous().reshape(-1)
            hashed += t.numel() * t.element_size()
            if hashed > MAX_HASHED_BYTES:
                return None
            h.update(_json([list(store.shape(key)), str(t.dtype)]).encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _annotations(graph: Graph) -> dict[str, str]:
    """Each node's annotations as canonical JSON (for keys and for the change a pass made)."""
    return {n: _json(graph.node(n).ann) for n in graph.topo_order()}


def cache_key(p: Pass, graph: Graph, ctx: PassContext, annotations: dict[str, str] | None = None) -> str | None:
    """The key of ``p``'s result on ``graph`` under ``ctx``, or None where it cannot be cached;
    ``annotations``: :func:`_annotations` of ``graph`` when the caller has them already."""
    weights = _weights_digest(graph)
    if weights is None:
        return None
    backend = ctx.backend
    structure = [(n.id, n.kind, list(n.inputs), n.params, n.attrs) for n in graph.nodes()]
    calib = ctx.calibration
    parts = {
        "format": FORMAT, "pass": p.name, "class": f"{type(p).__module__}.{type(p).__qualname__}",
        "options": repr(p.options), "environment": repr(p.environment(graph)),
        "code": code_digest(p), "meta": graph.meta, "structure": structure,
        "annotations": annotations if annotations is not None else _annotations(graph), "weights": weights,
        "seed": ctx.seed, "target": ctx.target,
        "bits": getattr(backend, "supported_bits", None), "formats": repr(getattr(backend, "weight_formats", None)),
        "calibration": None if calib is None else [list(calib.shape), str(calib.dtype), hashlib.blake2b(
            calib.contiguous().numpy().tobytes(), digest_size=16).hexdigest()],
    }
    return hashlib.blake2b(_json(parts).encode(), digest_size=20).hexdigest()


class PassCache:
    """Annotation results of cacheable passes, one JSON file per key in ``folder``."""

    def __init__(self, folder: str | Path | None = None) -> None:
        self.folder = Path(folder) if folder is not None else default_folder()

    def _path(self, p: Pass, key: str) -> Path:
        return self.folder / f"{p.name}-{key}.json"

    def state_folder(self, p: Pass, key: str) -> Path:
        """Where ``p``'s run under ``key`` keeps partial state until it finishes (``PassContext.state_dir``)."""
        return self.folder / f"{p.name}-{key}.partial"

    def load(self, p: Pass, key: str, graph: Graph) -> PassResult | None:
        """Apply a stored result to ``graph``; None (graph untouched) when there is none usable."""
        path = self._path(p, key)
        try:
            entry = json.loads(path.read_text())
            changes = entry["annotations"]
            stats = entry["stats"]
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warning("pass cache: ignoring unreadable entry %s (%s); recomputing", path, e)
            return None
        if any(n not in graph for n in changes):
            log.warning("pass cache: entry %s names nodes this graph lacks; recomputing", path)
            return None
        for node_id, ann in changes.items():
            for k, v in ann.items():
                graph.annotate(node_id, k, decode_annotation(k, v))
        log.info("pass %s: reused the result cached in %s (compile with --no-cache to recompute)", p.name, path)
        return PassResult(graph, modified=bool(changes), stats={**stats, "cached": True})

    def store(self, p: Pass, key: str, before: dict[str, str], result: PassResult, versions: dict[str, int],
              meta: str) -> None:
        """Write the annotations ``p`` added or changed; nothing when it changed anything else."""
        graph = result.graph
        now = {k: graph.weights.version(k) for k in graph.weights}
        if now != versions or _json(graph.meta) != meta or set(graph.topo_order()) != set(before):
            log.info("pass cache: %s changed weights, meta or nodes; its result is not cached", p.name)
            return
        changes: dict[str, dict[str, Any]] = {}
        for node_id in graph.topo_order():
            ann = graph.node(node_id).ann
            old = json.loads(before[node_id])
            if set(old) - set(ann):
                log.info("pass cache: %s removed annotations; its result is not cached", p.name)
                return
            diff = {k: v for k, v in ann.items() if _json(v) != _json(old.get(k))}
            if diff:
                changes[node_id] = diff
        entry = {"format": FORMAT, "pass": p.name, "annotations": changes, "stats": result.stats}
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(self._path(p, key), json.dumps(entry, default=repr).encode())
        except OSError as e:  # a read-only or full cache disk must not fail the compile
            log.warning("pass cache: could not write %s (%s)", self.folder, e)


def run_cached(p: Pass, graph: Graph, ctx: PassContext, cache: PassCache | None) -> PassResult:
    """``p.call`` through ``cache`` when ``p`` is cacheable or resumable and the key can be computed
    (a resumable pass that is not cacheable, e.g. quantize, which writes weights, gets only its
    partial state folder: its result is never stored)."""
    cacheable = getattr(p, "cacheable", False)
    if cache is None or not (cacheable or getattr(p, "resumable", False)):
        return p.call(graph, ctx)
    before, meta = _annotations(graph), _json(graph.meta)
    key = cache_key(p, graph, ctx, before)
    if key is None:
        log.info("pass cache: %s not cached%s (more than %d MiB of weights live only in memory)", p.name,
                 " and keeps no partial state" if p.resumable else "", MAX_HASHED_BYTES // 2**20)
        return p.call(graph, ctx)
    hit = cache.load(p, key, graph) if cacheable else None
    if hit is not None:
        return hit
    versions = {k: graph.weights.version(k) for k in graph.weights}
    with (_locked(cache.state_folder(p, key), p.name) if p.resumable else nullcontext()) as state:
        result = p.call(graph, dataclasses.replace(ctx, state_dir=state))
        if cacheable:
            cache.store(p, key, before, result, versions, meta)
        if state is not None:  # finished: it was kept only to resume an interrupted run
            shutil.rmtree(state, ignore_errors=True)
    return result


@contextmanager
def _locked(folder: Path, name: str) -> Iterator[Path | None]:
    """``folder`` for a pass's partial state, created and locked (``flock`` on ``folder/.lock``) while
    the pass runs; None when another process holds it (a compile with the same key running at the
    same time: this one keeps nothing there, nor removes it) or it cannot be created."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder / ".lock", os.O_CREAT | os.O_RDWR, 0o644)
    except OSError as e:
        log.warning("pass cache: cannot create %s (%s); %s keeps no partial state", folder, e, name)
        yield None
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            log.info("pass cache: another process runs %s with the same key (%s is locked); this run keeps "
                     "no partial state", name, folder)
            yield None
            return
        yield folder
    finally:
        os.close(fd)  # releases the lock
