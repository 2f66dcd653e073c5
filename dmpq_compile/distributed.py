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
``passes.infra.remote_tasks.MAX_SENT_BYTES`` of in-memory weights make those passes run in the driver, logged.

An interrupted ``--ray`` compile resumes as a serial one does (the pass cache's partial state, kept
and read by the driver alone): the layers whose scores or codes came back before the interruption
are not submitted again (``passes/sensitivity/resume.py``, ``passes/quantize_resume.py``).

Addresses: ``auto`` (the cluster this machine belongs to, Ray's own lookup), ``ray://HOST:PORT`` or
``HOST:PORT`` (a running cluster), ``local:N`` (start a cluster of N worker processes on this
machine; ``local`` is one per CPU).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

log = logging.getLogger(__name__)


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
        """Run ``fn(*args, threads)`` as a task (``fn``: a module-level function, e.g. of
        ``dmpq_compile.passes.infra.remote_tasks``); returns its future."""
        return self.remote(fn).remote(*args, self.threads)

    def put(self, value: Any) -> Any:
        return self.ray.put(value)

    def get(self, futures: list) -> list:
        return self.ray.get(list(futures))

    def done(self, futures: list, block: bool = False) -> list[int]:
        """The indices of ``futures`` whose tasks have finished (``block``: wait until one has)."""
        futures = list(futures)
        if not futures:
            return []
        if block:
            self.ray.wait(futures, num_returns=1)
        ready = set(self.ray.wait(futures, num_returns=len(futures), timeout=0)[0])
        return [i for i, f in enumerate(futures) if f in ready]

    def close(self) -> None:
        if self._started:
            self.ray.shutdown()
            self._started = False


def connect(address: str | None) -> RayExecutor | None:
    return RayExecutor(address) if address else None
