"""Resuming the ``quantize`` pass after an interruption without redoing finished layers.

The pass works in units: a decoder layer (its experts, and under gptq the non-expert nodes
rounded with it), the lm_head under gptq (after the last layer), and each non-expert node
quantized on its own (under rtn and hqq all of them; under gptq the embedding table). Where the
cache is on, the pass cache (:func:`.infra.cache.run_cached`) gives the run a folder named by its
key (``quantize-<key>.partial`` beside the cache's entries: another checkpoint, allocation, option,
calibration set, seed or code gets another folder), locked while the run uses it, as for the
sensitivity pass (:mod:`.sensitivity.resume`). The pass writes each finished unit there, instead
of to the compile's scratch folder, as the one file it would spill there anyway:

* ``quantized-<unit>.safetensors`` (``L<layer>``, ``head`` or a node id): the unit's packed codes,
  scales and zero points, written atomically (a temporary file renamed into place) once the unit
  is finished, with a header entry (``__metadata__``) naming the unit, its nodes' ``group_size``
  and ``quant`` annotations, the order the pass added its tensors in, the folder it was written in,
  and a checksum (CRC-32) of the tensors' bytes;
* under gptq, ``h<l>.pt``: the full-precision residual stream entering layer ``l`` (``[S, T, H]``),
  where the calibration forward restarts, with its checksum; only the newest is kept.

The pass holds no more than before: each unit's codes leave memory when its file is written, as
they did when spilled. When the pass has finished, its files are moved into the scratch folder
(a rename on the same disk; a copy otherwise), the refs follow them, and the cache removes the
folder; an interrupted emit therefore quantizes again.

A rerun with the same key checks every file it finds (header, unit, nodes, folder, the checksum of
its bytes) and uses those that pass: a finished unit is not quantized again, its tensors are added
to the weight store from the file in the order the pass added them and its annotations set, at the
point where the pass would have made them, so the graph and the artifact are the same bit for bit.
Under gptq the calibration forward (full precision: the codes of earlier layers do not enter it)
restarts from the newest kept boundary at or before the first unfinished layer, or from the
embedding. A file that is unreadable, truncated, damaged (its bytes do not match its header's
checksum), of a unit this run does not have or written in another folder is named in a warning,
deleted and its unit redone.

Disk: the codes of the pass (about the artifact's expert and quantized non-expert weights: bits/8
bytes a weight plus 5 bytes a group) and under gptq one boundary of S x T x H x 4 bytes. Where the
cache's disk lacks that room, or the run has no scratch folder (the Python API without
``work_dir``: codes stay in memory), or the weights to quantize were written into the scratch folder
by blockwise QAT (a rerun trains them again, into new files: another key), the pass keeps nothing
and an interruption redoes it.

With an executor (``--ray``; rtn and hqq, whose layers are tasks) the state is the same, under the
same key (a ``--ray`` rerun resumes a serial run's state and the other way round): the layers it
holds are not submitted, but loaded as above; a task writes its layer's file, with the unit's
header (:func:`unit_metadata`, the checksum computed in the worker), into the scratch folder, which
every worker sees (the cache's folder need not be shared), and the driver moves it into the state
folder (:meth:`QuantizeState.keep`) as soon as the task is done, in whatever order the tasks finish,
so an interruption keeps every layer that had come back. Where the cache lies on another disk than
the scratch folder, that move is a copy, and so is the move back when the pass finishes.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import zlib
from collections.abc import Iterable
from pathlib import Path

import torch

from ..ir.annotations import decode_annotation
from ..ir.graph import QUANT_ROLES, Graph
from ..ir.stream import owned
from ..ir.weights import index_safetensors, safetensors_metadata
from .infra.partial import note_others, open_folder

log = logging.getLogger("dmpq_compile.passes.quantize")

FORMAT = 1
META = "dmpq_quantize_state"


def open_state(state_dir: Path | None, work_dir: Path | None, graph: Graph, units: dict[str, list[str]],
               group_size: int, boundary: int = 0) -> QuantizeState | None:
    """The partial state in ``state_dir`` for the pass's ``units`` (name -> node ids, in the order the
    pass finishes them), checked; None (keep nothing) without a folder, a scratch folder or units, or
    (logged) when the weights to quantize lie in the scratch folder (blockwise QAT's: a rerun makes
    new ones, under another key) or the folder's disk lacks the room. ``boundary``: bytes of one
    gptq boundary."""
    if state_dir is None or work_dir is None or not units:
        return None
    scratch = Path(work_dir).resolve()
    files = {ref.path for key in graph.weights if (ref := graph.weights.ref(key)) is not None}
    if any(Path(f).resolve().is_relative_to(scratch) for f in files):
        log.info("quantize: its input weights were written by this compile (QAT) into its scratch folder, which a "
                 "rerun replaces, so a rerun could not resume: keeping no partial state")
        return None
    nodes = [graph.node(n) for ids in units.values() for n in ids]
    folder = open_folder(state_dir, "quantize", room_needed(graph, nodes, group_size) + boundary, log)
    if folder is None:
        return None
    try:
        return QuantizeState(folder, Path(work_dir), units)
    except OSError as e:
        log.warning("quantize: cannot keep partial state in %s (%s); an interrupted run will start over", folder, e)
        return None


def room_needed(graph: Graph, nodes: Iterable, group_size: int) -> int:
    """Bytes the codes of ``nodes`` take at most: ``bits/8`` a weight (packed along K) and 5 a group of
    ``group_size`` (float32 scale, uint8 zero point), plus 5 %."""
    total = 0
    for node in nodes:
        bits = node.ann["bits"]
        for role in QUANT_ROLES[node.kind]:
            shape = graph.weights.shape(node.params[role])
            n, k = math.prod(shape[:-1]), shape[-1]
            total += n * (math.ceil(k * bits / 8) + 5 * math.ceil(k / group_size))
    return int(1.05 * total)


def _digest(named: Iterable[tuple[str, torch.Tensor]]) -> str:
    """A CRC-32 of tensors' names, dtypes, shapes and bytes (in the order given): what tells a damaged
    file from a sound one (a file of another run is told by its header's folder). CRC-32 runs at
    about 4 GB/s here, four times blake2b, so hashing a layer's codes stays small beside making them."""
    crc = 0
    for key, t in named:
        t = t.detach().contiguous()
        crc = zlib.crc32(json.dumps([key, str(t.dtype), list(t.shape)]).encode(), crc)
        if t.numel():
            crc = zlib.crc32(t.reshape(-1).view(torch.uint8).numpy(), crc)
    return f"crc32:{crc:08x}"


class QuantizeState:
    """The files of one run's partial state (module docstring). The pass asks :meth:`apply` before it
    quantizes a unit, :meth:`save` once it has, :meth:`boundary` / :meth:`keep_boundary` under gptq,
    and :meth:`finish` at the end."""

    def __init__(self, folder: Path, work_dir: Path, units: dict[str, list[str]]) -> None:
        self.folder, self.work_dir, self.units = folder, work_dir, units
        self.writable = True
        self.written: list[Path] = []  # files whose refs the graph holds (moved to work_dir by finish)
        for tmp in folder.glob(".*.tmp"):  # an interrupted write's remains
            tmp.unlink(missing_ok=True)
        codes = sorted(folder.glob("quantized-*.safetensors"))
        if not codes:
            note_others(folder, "quantize", log)
        self.ready: dict[str, tuple[dict, dict]] = {}
        for path in codes:
            name = path.name[len("quantized-"):-len(".safetensors")]
            checked = self._check(path, name)
            if checked is None:
                path.unlink(missing_ok=True)
            else:
                self.ready[name] = checked
        self.resumed = len(self.ready)
        if self.ready:
            todo = [u for u in units if u not in self.ready]
            log.info("quantize: resuming, %d of %d units (layers, and non-expert nodes quantized apart) loaded from "
                     "%s; %s", len(self.ready), len(units), folder,
                     f"quantizing from {todo[0]} on ({len(todo)} units)" if todo else "nothing left to quantize")
        else:
            log.info("quantize: keeping partial state in %s (to resume if interrupted; moved to the scratch "
                     "folder when done)", folder)

    def _path(self, name: str) -> Path:
        return self.folder / f"quantized-{name}.safetensors"

    def _check(self, path: Path, name: str) -> tuple[dict, dict] | None:
        """``(refs, header entry)`` of a unit's file that passes every check; None (warned) else."""
        try:
            if name not in self.units:
                raise ValueError("a unit this run does not have")
            refs = index_safetensors(path)
            meta = json.loads(safetensors_metadata(path).get(META, "null"))
            if not isinstance(meta, dict) or meta.get("format") != FORMAT:
                raise ValueError("no quantize state header of this version")
            if meta.get("folder") != self.folder.name:
                raise ValueError(f"written in another state folder ({meta.get('folder')}), of another run")
            if meta.get("unit") != name or list(meta.get("nodes", {})) != self.units[name]:
                raise ValueError(f"its nodes are not those of unit {name} in this run")
            if sorted(meta.get("keys", [])) != sorted(refs):
                raise ValueError("its tensors are not those its header lists")
            if _digest((k, refs[k].read()) for k in meta["keys"]) != meta.get("digest"):
                raise ValueError("its bytes do not match the checksum its header gives (damaged)")
        except Exception as e:  # noqa: BLE001 - whatever is wrong with the file, it is redone, not used
            log.warning("quantize: ignoring partial state %s (%s: %s); deleting it and quantizing that unit again",
                        path, type(e).__name__, e)
            return None
        return refs, meta

    def apply(self, name: str, graph: Graph) -> bool:
        """Whether unit ``name`` was finished before: then its tensors and annotations are now in
        ``graph`` as the pass would have put them there."""
        entry = self.ready.pop(name, None)
        if entry is None:
            return False
        refs, meta = entry
        for key in meta["keys"]:
            if key in graph.weights:  # as store_quantized replaces them
                graph.weights.remove(key)
            graph.weights.add_ref(key, refs[key])
        for node_id, anns in meta["nodes"].items():
            for key, value in anns.items():
                graph.annotate(node_id, key, decode_annotation(key, value))
        self.written.append(self._path(name))
        return True

    def save(self, name: str, graph: Graph, keys: list[str]) -> bool:
        """Write unit ``name``'s tensors ``keys`` (in memory, just made) to its file and keep refs to it;
        False when that failed (logged; the pass spills them as without state, and keeps no more)."""
        if not self.writable:
            return False
        path = self._path(name)
        nodes = {n: {k: graph.node(n).ann[k] for k in ("group_size", "quant")} for n in self.units[name]}
        try:
            graph.weights.spill(keys, path, metadata=unit_metadata(self.folder.name, name, nodes, keys, graph.weights))
        except OSError as e:
            self._stop_keeping("write", path, e)
            return False
        self.written.append(path)
        return True

    def _stop_keeping(self, verb: str, path: Path, error: OSError) -> None:
        """A unit's file could not be written or kept: keep no more state (logged)."""
        self.writable = False
        log.warning("quantize: could not %s partial state %s (%s); an interruption from here on redoes the "
                    "units after it", verb, path, error)

    def keep(self, name: str, path: Path) -> Path:
        """Keep unit ``name``'s file ``path``, written by an executor task (``--ray``:
        :func:`.infra.remote_tasks.layer_quantize`, with the unit's header, :func:`unit_metadata`) into
        the scratch folder every worker sees: moved into the state folder (a rename on the same disk, a
        copy from another), so that an interruption keeps it; returns where the file now is (the pass
        then refs its tensors there). Should the move fail (logged), the file stays where it is, as
        without state, and nothing more is kept."""
        dst = self._path(name)
        if not self.writable:
            return path
        try:
            _move(path, dst)
        except OSError as e:
            self._stop_keeping("keep", dst, e)
            return path
        self.written.append(dst)
        return dst

    def boundary(self, layer: int, shape: tuple[int, ...]) -> tuple[int, torch.Tensor] | None:
        """The newest kept residual stream entering a layer at or before ``layer`` (gptq's forward
        restarts there), as ``(its layer, the tensor)``; None: start from the embedding."""
        for path in sorted(self.folder.glob("h*.pt"), key=lambda p: -_boundary_layer(p)):
            at = _boundary_layer(path)
            if at < 0 or at > layer:
                continue
            try:
                rec = torch.load(path, weights_only=True)
                h = rec["h"]
                if rec.get("folder") != self.folder.name or rec.get("layer") != at:
                    raise ValueError("written by another run")
                if tuple(h.shape) != tuple(shape) or _digest([("h", h)]) != rec.get("digest"):
                    raise ValueError("damaged, or of another shape")
            except Exception as e:  # noqa: BLE001 - unreadable or wrong: run the forward from further back
                log.warning("quantize: ignoring partial state %s (%s: %s); deleting it", path, type(e).__name__, e)
                path.unlink(missing_ok=True)
                continue
            return at, h
        return None

    def keep_boundary(self, layer: int, h: torch.Tensor) -> None:
        """Keep the residual stream entering ``layer`` (replacing the older one)."""
        if not self.writable:
            return
        h = owned(h)
        path = self.folder / f"h{layer}.pt"
        fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=f".{path.name}.", suffix=".tmp")
        try:  # written straight to the file (no copy of the stream in memory), then renamed into place
            with os.fdopen(fd, "wb") as f:
                torch.save({"h": h, "layer": layer, "folder": self.folder.name, "digest": _digest([("h", h)])}, f)
            os.replace(tmp, path)
        except OSError as e:
            Path(tmp).unlink(missing_ok=True)
            log.warning("quantize: could not write partial state %s (%s); a rerun restarts the calibration forward "
                        "further back", path, e)
            return
        for older in self.folder.glob("h*.pt"):
            if older != path:
                older.unlink(missing_ok=True)

    def finish(self, graph: Graph) -> None:
        """Move the finished units' files into the scratch folder, the refs with them (the cache then
        removes the state folder)."""
        moves = {}
        for path in self.written:
            dst = self.work_dir / path.name
            try:
                os.replace(path, dst)
            except OSError:  # another file system
                shutil.move(path, dst)
            moves[path] = dst
        graph.weights.relocate(moves)
        self.written = []


def unit_metadata(folder: str, name: str, nodes: dict[str, dict], keys: list[str], weights) -> dict[str, str]:
    """The header entry of unit ``name``'s file in the state folder named ``folder``: its nodes'
    ``group_size`` and ``quant`` annotations (``nodes``, in the unit's order), the order its tensors
    ``keys`` were added in, and their checksum (the tensors as ``weights`` holds them, in memory)."""
    meta = {"format": FORMAT, "unit": name, "folder": folder, "keys": keys, "nodes": nodes,
            "digest": _digest((k, weights[k]) for k in keys)}
    return {META: json.dumps(meta)}  # annotations are JSON


def _move(src: Path, dst: Path) -> None:
    """Move the file ``src`` to ``dst``: a rename, or from another file system a copy made under a
    temporary name and renamed into place (an interrupted copy leaves no ``dst``)."""
    try:
        os.replace(src, dst)
        return
    except OSError:
        if Path(dst).parent.stat().st_dev == Path(src).stat().st_dev:
            raise
    fd, tmp = tempfile.mkstemp(dir=Path(dst).parent, prefix=f".{Path(dst).name}.", suffix=".tmp")
    os.close(fd)
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    Path(src).unlink()


def _boundary_layer(path: Path) -> int:
    try:
        return int(path.stem[1:])
    except ValueError:
        return -1
