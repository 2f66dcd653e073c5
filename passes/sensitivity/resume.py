"""Resuming the ``local`` sensitivity pass after an interruption without redoing finished layers.

The pass is the long part of a compile (about 31 s a layer at Qwen3-30B-A3B's shape, 25 minutes
for its 48 layers), and the pass cache (:mod:`..infra.cache`) stores only finished results. So
where the cache is on, the pass keeps its partial state in ``PassContext.state_dir``, a folder
the cache names by the run's cache key (``sensitivity-<key>.partial`` beside the entry): a
changed checkpoint, option, calibration set, seed or code gets another folder and never resumes
from stale state. The cache removes the folder once the pass has finished and its result is
stored; ``--no-cache`` keeps nothing (the boundaries then go to a temporary folder as before).

What the folder holds, one file each, written atomically (a temporary file renamed into place):

* ``h{l}.pt``: the residual stream entering layer ``l`` (the forward boundaries the backward
  pass and the flip probe read back), ``[S, T, H]``; ``h_last.pt``, the last layer's output,
  written last, marks the forward complete;
* ``b{s}-{l}.pt``: layer ``l`` of label sample ``s``'s backward pass, finished: what its expert
  scores gave (``expert_scores`` after the flip probe's entries left them), the non-expert nodes'
  scores of the layer, and in the first sample the routing the flip probe replays and the
  probe's input (the experts' changes summed over the probed tokens, ``probes[l]``), plus the
  random generator's state after the sample's labels were drawn;
* ``g{s}-{l}.pt``: the gradient ``g`` carried from layer ``l`` to the layer below (``[S, T, H]``),
  where the backward restarts; only the newest two are kept (a lost newest record is redone
  from the one before), none once a label sample is finished.

Sizes, per layer at S x T calibration tokens and width H in fp32: a boundary S x T x H x 4 bytes
(16 x 128 x 2048 x 4 = 16 MB at OLMoE's and Qwen3's width); a record's routing, at most
S x T x (4 E + 12 k) bytes (fp32 logits and weights, int64 indices: 1.2 MB for Qwen3's 128
experts, top-8), and probe input (probed sequences) x T x H x 4 bytes (1 MB for one sequence), its
scores a few KB; plus at most two gradients of S x T x H x 4 bytes. For Qwen3-30B-A3B's 48 layers
about 0.9 GB on the cache's disk (the boundaries, 0.8 GB of it, went to a temporary folder
before), freed when the pass finishes. Where that disk lacks the room (:func:`room_needed`) the
pass logs it and keeps nothing; a second run with the same key at the same time finds the
folder locked (:func:`..infra.cache.run_cached`) and keeps nothing either.

A rerun with the same key loads what is there: it skips the forward if it is complete (else
resumes it at the first missing boundary), replays the finished layers' records in the order the
backward produced them, and restarts the backward at the first layer whose record is missing,
from the stored gradient (or, at a label sample's first layer, a head gradient drawn from the
generator in the state the previous sample left it), then runs the flip probe and the measured
KLs as usual (and, where the allocator needs them, the router-gradient features: two more passes
over the layers, not kept). Every stored value is the very tensor or float an uninterrupted run computes, so
the annotations are the same, bit for bit. A file that is missing, truncated or unreadable
counts as not written: that layer and every later one (in the backward's order) are redone; when
the gradient it started from is gone too (an older record lost), its label sample starts over.

With an executor (``--ray``) the state is the same, under the same key (a ``--ray`` rerun resumes
a serial run's state and the other way round), but a layer's expert scores come from a worker
while the driver back-propagates further down: the driver writes the gradient ``g{s}-{l}`` when
it has carried it below layer ``l``, and holds the layer's record until the task's scores have come
back (``layer_done(wait=True)``, then :meth:`PartialState.deliver`); records are written in the
backward's order, each once its scores and those of every layer before it are in (the driver takes
the scores in the order it submitted the tasks, as soon as each is done), and the gradient rule
above applies when a record is written, so the gradients of the layers whose scores are still out
stay on disk meanwhile: at most one per layer and label sample (:func:`room_needed` counts them). A
rerun restarts the backward at the first layer without a record and submits the layers from there
on: an interruption loses the scores still out, and the layers the driver had back-propagated past
them are back-propagated again.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable
from pathlib import Path

import torch

from ...fileio import atomic_write_bytes
from ...ir import ops
from ...ir.graph import Graph
from ...ir.interpreter import Interpreter, RunOptions
from ...ir.stream import embed, layer_outputs, owned, run_layer
from ..infra.partial import note_others, open_folder

log = logging.getLogger(__name__)

FORMAT = 1


def open_state(state_dir: Path | None, graph: Graph, label_samples: int, ids: torch.Tensor,
               remote: bool = False) -> PartialState | None:
    """The partial state in ``state_dir`` (None: keep nothing), scanned. None also, logged, when the
    folder cannot be created or its disk lacks the room (:func:`room_needed`; ``remote``: the expert
    scores come from executor tasks, so up to every layer's gradient waits on disk): the pass then
    keeps its boundaries in a temporary folder as without a cache, and an interruption redoes it."""
    if state_dir is None:
        return None
    n_layers = len(layer_outputs(graph))
    state_dir = open_folder(state_dir, "sensitivity",
                            room_needed(n_layers, tuple(ids.shape), int(graph.meta.get("hidden_size") or 0),
                                        label_samples * n_layers if remote else 2), log)
    if state_dir is None:
        return None
    try:
        return PartialState(state_dir, n_layers, label_samples, tuple(ids.shape))
    except OSError as e:
        log.warning("sensitivity: cannot keep partial state in %s (%s); an interrupted run will start over",
                    state_dir, e)
        return None


def room_needed(n_layers: int, tokens: tuple[int, int], hidden: int, gradients: int = 2) -> int:
    """Bytes the partial state of ``n_layers`` layers over ``tokens`` (S, T) calibration tokens of
    width ``hidden`` takes at most: a boundary per layer and the last output, ``gradients`` gradients
    (the newest two; with an executor, one per layer whose scores are still out), and the records
    (routing and probe input, a small part: counted as 15 %)."""
    return int(1.15 * (n_layers + 1 + gradients) * tokens[0] * tokens[1] * hidden * 4)


class PartialState:
    """The files of one run's partial state (module docstring); the pass calls, in order,
    :meth:`forward`, :meth:`replay`, then per label sample :meth:`begin` and per finished layer
    :meth:`note` and :meth:`layer_done`."""

    def __init__(self, folder: Path, n_layers: int, label_samples: int, tokens: tuple[int, int]) -> None:
        self.folder, self.n_layers, self.label_samples, self.tokens = folder, n_layers, label_samples, tokens
        if not any(folder.glob("*.pt")):
            note_others(folder, "sensitivity", log)
        self.writable = True
        self.record: dict = {}
        self.queue: list[dict] = []  # finished layers' records not written yet (waiting for an executor's scores)
        self.sample, self.gen = 0, torch.Generator()
        # the forward: boundaries 0..k-1 readable; complete when every one and h_last are
        k = 0
        while k < n_layers and self._boundary(self._h(k)) is not None:
            k += 1
        self.forward_complete = k == n_layers and self._boundary(self.folder / "h_last.pt") is not None
        self._readable = k
        # the backward: records in the order it writes them, up to the first missing one
        self.records: list[tuple[int, int, dict]] = []
        order = [(s, layer) for s in range(label_samples) for layer in reversed(range(n_layers))]
        for s, layer in order:
            rec = self._load(self._b(s, layer))
            if not (isinstance(rec, dict) and rec.get("format") == FORMAT and rec.get("sample") == s
                    and rec.get("layer") == layer):
                break
            self.records.append((s, layer, rec))
        point = order[len(self.records)] if len(self.records) < len(order) else (label_samples, n_layers - 1)
        self.g = None
        if point[1] < n_layers - 1:  # mid-sample: the gradient the last finished layer carried down
            self.g = self._boundary(self._g(point[0], point[1] + 1), load=True)
            if self.g is None:  # restart the sample from its first layer
                self.records = [r for r in self.records if r[0] < point[0]]
                point = (point[0], n_layers - 1)
        self.point = point
        # the generator as the resumed sample's labels leave it (mid-sample) or as the sample
        # before left it (at its first layer; the first sample: as the pass seeded it)
        if point[1] < n_layers - 1:
            self.gen_state = self.records[-1][2]["gen"]
        else:
            self.gen_state = self.records[-1][2]["gen"] if self.records else None
        forward_done = n_layers if self.forward_complete else max(self._readable - 1, 0)
        # layer steps not run again (replay() empties records, so the count is kept)
        self.resumed_forward, self.resumed_backward = forward_done, len(self.records)
        if self.resumed:
            where = (f"the backward at layer {point[1]} of {n_layers}" if point[0] < label_samples
                     else "after the backward")
            if label_samples > 1 and point[0] < label_samples:
                where += f" (label sample {point[0] + 1} of {label_samples})"
            if not self.forward_complete:
                where = f"the forward at layer {forward_done} of {n_layers}"
            log.info("sensitivity: resuming %s, %d layers loaded from %s (forward %s, %d backward layers)",
                     where, self.resumed, folder, "complete" if self.forward_complete else f"{forward_done} layers",
                     len(self.records))
        else:
            log.info("sensitivity: keeping partial state in %s (to resume if interrupted; removed when done)",
                     folder)

    # file names
    def _h(self, layer: int) -> Path:
        return self.folder / f"h{layer}.pt"

    def _b(self, sample: int, layer: int) -> Path:
        return self.folder / f"b{sample}-{layer}.pt"

    def _g(self, sample: int, layer: int) -> Path:
        return self.folder / f"g{sample}-{layer}.pt"

    def _load(self, path: Path, mmap: bool = False):
        """The object in ``path``, or None when it is missing or unreadable."""
        if not path.is_file():
            return None
        try:
            return torch.load(path, weights_only=True, mmap=mmap)
        except Exception as e:  # noqa: BLE001 - torch.load raises many types; truncated or corrupt: redo it
            log.warning("sensitivity: ignoring unreadable partial state %s (%s: %s); redoing it", path,
                        type(e).__name__, e)
            return None

    def _boundary(self, path: Path, load: bool = False) -> torch.Tensor | None:
        """A residual stream or gradient ``[S, T, H]`` of the calibration tokens in ``path`` (mapped,
        not read, unless ``load``), or None."""
        t = self._load(path, mmap=not load)
        if isinstance(t, torch.Tensor) and t.dim() == 3 and tuple(t.shape[:2]) == self.tokens:
            return t
        if t is not None:
            log.warning("sensitivity: ignoring partial state %s of another shape; redoing it", path)
        return None

    def _save(self, obj, path: Path, required: bool = False) -> None:
        """Write atomically; a failure to keep optional state (records, gradients) only stops keeping it."""
        if not self.writable and not required:
            return
        buf = io.BytesIO()
        torch.save(obj, buf)
        try:
            atomic_write_bytes(path, buf.getbuffer())
        except OSError as e:
            if required:
                raise
            self.writable = False
            log.warning("sensitivity: could not write partial state %s (%s); an interruption from here on "
                        "redoes the layers after it", path, e)

    @property
    def resumed(self) -> int:
        """Layer steps loaded instead of run: finished forward layers and backward layers."""
        return self.resumed_forward + self.resumed_backward

    # the forward
    def forward(self, interp: Interpreter, ids: torch.Tensor, opts: RunOptions,
                tick: Callable[[], None], shared: tuple | None = None) -> tuple[Boundaries, torch.Tensor]:
        """What :func:`.local.forward_boundaries` returns, the boundaries kept in the folder: loaded
        when complete, else run from the last boundary written, or copied from ``shared`` (the
        same forward recorded by an earlier pass: ``(store, last output)``, closed here)."""
        store = Boundaries(self)
        try:
            if self.forward_complete:
                return store, torch.load(self.folder / "h_last.pt", weights_only=True)
            n = self.n_layers
            with torch.no_grad():
                if shared is not None:
                    start, h = 0, None
                elif self._readable == 0:
                    h, start = embed(interp, ids, opts), 0
                    store.put(0, h)
                else:
                    start = self._readable - 1
                    h = store.get(start)
                for layer in range(start, n):
                    if shared is not None:
                        store.put(layer, shared[0].get(layer))
                        h = shared[1] if layer + 1 == n else None
                    else:
                        h = run_layer(interp, layer, h, opts)
                        if layer + 1 < n:
                            store.put(layer + 1, h)
                    if layer + 1 == n:  # written last: the forward is complete
                        self._save(_compact(h), self.folder / "h_last.pt", required=True)
                    tick()
            return store, h
        finally:
            if shared is not None:
                shared[0].close()

    # the backward
    def replay(self, add: Callable[[int, dict], None], routes: dict, probes: dict, nonexpert: dict) -> None:
        """Give the pass the finished layers' results in the order the backward produced them."""
        for _, layer, rec in self.records:
            if rec.get("route") is not None:
                routes[layer] = ops.Routing(**rec["route"])
            if rec.get("probe") is not None:
                probes[layer] = (rec["probe"]["change"], rec["probe"]["norm"])
            if rec.get("experts") is not None:
                add(layer, rec["experts"])
            for node_id, score in rec.get("nonexpert", {}).items():
                nonexpert.setdefault(node_id, []).append(score)
        self.records = []

    def begin(self, sample: int, gen: torch.Generator) -> tuple[int, torch.Tensor | None] | None:
        """Where label sample ``sample``'s backward starts: None when it was loaded whole, else the
        layer and the gradient of its output (None: draw the head gradient from ``gen``, which is
        set as the interrupted run had it)."""
        self.sample, self.record, self.gen = sample, {}, gen
        s, layer = self.point
        if sample < s:
            return None
        if sample > s:
            return self.n_layers - 1, None
        if self.gen_state is not None:
            gen.set_state(self.gen_state)
        g, self.g = self.g, None
        return layer, g

    def note(self, experts: dict | None = None, route: ops.Routing | None = None,
             probe: tuple[torch.Tensor, float] | None = None, node: tuple[str, dict] | None = None) -> None:
        """What the layer being scored found (kept with it by :meth:`layer_done`)."""
        if experts is not None:
            self.record["experts"] = experts
        if route is not None:
            self.record["route"] = {"weights": route.weights, "indices": route.indices, "logits": route.logits,
                                    "shape": tuple(int(d) for d in route.shape)}
        if probe is not None:
            self.record["probe"] = {"change": probe[0], "norm": probe[1]}
        if node is not None:
            self.record.setdefault("nonexpert", {})[node[0]] = node[1]

    def layer_done(self, layer: int, g_in: torch.Tensor | None, wait: bool = False) -> None:
        """Keep layer ``layer`` of the current label sample, finished, the gradient ``g_in`` it
        carried to the layer below and the generator's state (``backward_layers(done=...)``).

        ``wait``: its expert scores come later, from an executor task (``--ray``), by :meth:`deliver`;
        the gradient is written now (a rerun restarts below the layer from it), the record once the
        scores are there and every record before it in the backward's order is written."""
        s, rec = self.sample, self.record
        self.record = {}
        if layer > 0 and g_in is not None:
            self._save(_compact(g_in), self._g(s, layer))
        self.queue.append({"sample": s, "layer": layer, "wait": wait,
                           "rec": _compact({"format": FORMAT, "sample": s, "layer": layer, **rec,
                                            "gen": self.gen.get_state()})})
        self._flush()

    def deliver(self, sample: int, layer: int, experts: dict, probe: tuple[torch.Tensor, float] | None) -> None:
        """The expert scores (and flip-probe input) of layer ``layer`` of label sample ``sample``,
        which :meth:`layer_done` kept waiting: its record, and those after it that wait no more, are
        written."""
        entry = next(e for e in self.queue if e["sample"] == sample and e["layer"] == layer and e["wait"])
        entry["rec"]["experts"] = _compact(experts)
        if probe is not None:
            entry["rec"]["probe"] = _compact({"change": probe[0], "norm": probe[1]})
        entry["wait"] = False
        self._flush()

    def _flush(self) -> None:
        """Write the queued records, in the backward's order, up to the first that waits for its scores."""
        while self.queue and not self.queue[0]["wait"]:
            entry = self.queue.pop(0)
            s, layer = entry["sample"], entry["layer"]
            self._save(entry["rec"], self._b(s, layer))
            if self.writable:  # keep the newest two gradients (the older redoes this layer if its record is lost)
                for older in ((layer + 2,) if layer > 0 else (1, 2)):  # a finished sample needs none
                    self._g(s, older).unlink(missing_ok=True)


class Boundaries:
    """:class:`~dmpq_compile.ir.stream.SpilledBoundaries` kept in the partial state's folder (the cache removes it)."""

    def __init__(self, state: PartialState) -> None:
        self.state = state

    def put(self, layer: int, h: torch.Tensor) -> None:
        self.state._save(_compact(h), self.state._h(layer), required=True)

    def get(self, layer: int) -> torch.Tensor:
        return torch.load(self.state._h(layer), weights_only=True)

    def close(self) -> None:
        pass


def _compact(obj):
    """``obj`` with every tensor detached and owning just its elements (a view would save its
    whole storage)."""
    if isinstance(obj, torch.Tensor):
        return owned(obj)
    if isinstance(obj, dict):
        return {k: _compact(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_compact(v) for v in obj)
    return obj
