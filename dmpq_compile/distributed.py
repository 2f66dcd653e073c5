"""Per-layer compile tasks on a Ray cluster (``dmpq-compile compile --ray ADDRESS``).

Two kinds of work dominate a real-width compile and split by layer once the values at each
layer boundary are known:

* **sensitivity** (``expert_scores``): every expert of a layer fake-quantized at every measured
  bit-width and run on its routed tokens, given the layer's MoE input, its routing and the
  gradient of the model's output at the layer (what the driver's backward pass yields, layer by
  layer). The driver submits a layer's task as soon as its backward step has produced those three
  tensors and goes on with the next layer down, so the workers score layers while the driver
  back-propagates;
* **quantize** (RTN and HQQ): every expert of a layer quantized and packed at its bits. Each task
  writes its layer's codes into the compile's scratch folder (the file the serial pass would
  spill to) and returns the ``quant`` annotations; the driver maps the file.

What stays in the driver: the layer-major forward and backward passes (each layer needs the
previous one), the flip probe, the non-expert measurements, profiling, allocation, GPTQ (its
Hessians stream with the forward pass) and emission.

Results are exactly the serial compile's: a task runs the same functions on the same tensors
(the graph, with its weights as references to the checkpoint's files, is sent once per pass) with
as many torch threads as the driver uses (reductions split by thread count could otherwise
round differently); ``tests/test_distributed.py`` checks that a two-worker local cluster writes an
artifact byte-identical to the serial compile.

Every worker must see the checkpoint and the output folder at the same paths as the driver (one
machine, or a shared file system) and have ``dmpq-compile`` installed (``pip install
dmpq-compile[ray]``). A graph whose weights live in memory (after QAT) is not sent: more than
``MAX_SENT_BYTES`` of in-memory weights make those passes run in the driver, logged.

Addresses: ``auto`` (the cluster this machine belongs to, Ray's own lookup), ``ray://HOST:PORT`` or
``HOST:PORT`` (a running cluster), ``local:N`` (start a cluster of N worker processes on this
machine; ``local`` is one per CPU).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)
MAX_SENT_BYTES = 64 * 2**20  # in-memory weights sent with the graph (beyond: run in the driver)


def _need_ray():
    try:
        import ray
    except ImportError:
        raise ImportError("--ray needs the ray package: pip install 'dmpq-compile[ray]' (or pip install ray)") from None
    return ray


class RayExecutor:
    """A connection to a Ray cluster that runs per-layer tasks (module docstring)."""

    def __init__(self, address: str, threads: int | None = None) -> None:
        ray = _need_ray()
        self.ray = ray
        self.threads = int(threads or torch.get_num_threads())
        self._started = False
        if not ray.is_initialized():
            if address.startswith("local"):
                n = address.partition(":")[2]
                if n and (not n.isdigit() or int(n) < 1):
                    raise ValueError(f"--ray {address}: give local:N with N >= 1 worker processes")
                cpus = int(n) if n else os.cpu_count() or 1
                ray.init(num_cpus=cpus * self.threads, include_dashboard=False, log_to_driver=False,
                         logging_level=logging.WARNING)
            else:
                ray.init(address=address, include_dashboard=False, log_to_driver=False,
                         logging_level=logging.WARNING)
            self._started = True
        self._remote = {}
        log.info("ray: connected to %s (%s CPUs; %d torch threads per task)", address,
                 ray.cluster_resources().get("CPU", "?"), self.threads)

    def remote(self, fn):
        if fn not in self._remote:
            self._remote[fn] = self.ray.remote(num_cpus=self.threads)(fn)
        return self._remote[fn]

    def submit(self, fn, *args) -> Any:
        return self.remote(fn).remote(*args, self.threads)

    def put(self, value: Any) -> Any:
        return self.ray.put(value)

    def get(self, futures: list) -> list:
        return self.ray.get(list(futures))

    def close(self) -> None:
        if self._started:
            self.ray.shutdown()
            self._started = False


def connect(address: str | None) -> RayExecutor | None:
    return RayExecutor(address) if address else None


def sendable(graph) -> bool:
    """Whether ``graph`` can go to workers: its weights on disk but at most ``MAX_SENT_BYTES``."""
    store = graph.weights
    held = sum(store.nbytes([k]) for k in store if store.ref(k) is None)
    if held > MAX_SENT_BYTES:
        log.info("ray: %.0f MB of weights live only in memory (not in the checkpoint's files); this pass runs in "
                 "the driver", held / 2**20)
        return False
    return True


# -- tasks (run in the workers; module-level so that Ray can import them) ------------------------------
def layer_expert_scores(graph, formats, layer: int, x, routing, g, bits, seq_len: int, threads: int) -> dict:
    """:func:`~dmpq_compile.passes.sensitivity_local.expert_scores` of one layer, in a worker."""
    from .ir.interpreter import Interpreter
    from .passes import sensitivity_local as local

    torch.set_num_threads(threads)
    interp = Interpreter(graph, quantize=False, formats=formats)
    with torch.no_grad():
        return local.expert_scores(graph, interp, layer, x, routing, g, bits, seq_len,
                                   graph.experts_by_layer().get(layer, []))


def layer_quantize(graph, options, node_ids: list[str], path: str, threads: int) -> dict[str, dict]:
    """Quantize the nodes ``node_ids`` (one layer's) with the quantize pass's ``options`` in a worker,
    write their codes into the safetensors file ``path`` and return each node's annotations."""
    from .passes.quantize import QuantizePass

    torch.set_num_threads(threads)
    qp = QuantizePass(options)
    keys: list[str] = []
    for node_id in node_ids:
        keys += qp._quantize_node(graph, graph.node(node_id), {})
    if keys:
        graph.weights.spill(keys, Path(path))
    return {n: {"group_size": graph.node(n).ann["group_size"], "quant": graph.node(n).ann["quant"]} for n in node_ids}
