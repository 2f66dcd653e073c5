"""Shared pieces of the per-target cost tables: expert shapes, weight bytes, energy, disk cache.

A cost table (see :meth:`dmpq_compile.backends.base.Backend.cost_table`) gives, for every
expert and every bit-width a target supports, the latency of one decoded token through the
expert's three projections, the per-token prefill latency, the weight bytes and an energy
estimate. The target modules (``backends/ort_cpu/cost.py`` measures, ``backends/trt/cost.py``
computes) share what is here:

* :func:`expert_shapes` / :func:`distinct_shapes`: the ``(H, I)`` shape of each expert (gate and
  up project ``H -> I``, down projects ``I -> H``).
* :func:`matmulnbits_layout` / :func:`matmulnbits_bytes`: the exact initializer shapes and bytes
  of one ONNX Runtime ``com.microsoft.MatMulNBits`` weight, and :func:`expert_bytes` for three.
* :class:`EnergyModel` / :func:`energy_mj`: energy = bytes moved x pJ/byte + ops x pJ/op, with
  the per-access and per-op figures of Horowitz (ISSCC 2014).
* :class:`CostCache`: measured results on disk (JSON), keyed by everything that changes them.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..fileio import CACHE_ENV, atomic_write_bytes, cache_root  # noqa: F401 (CACHE_ENV: re-exported)
from ..sysinfo import available_cpus, cpu_flags, cpu_model  # noqa: F401 (re-exported; their home is sysinfo)

if TYPE_CHECKING:  # `bench` uses the energy model on artifacts without torch (ir/ imports it)
    from ..ir.graph import Graph

log = logging.getLogger(__name__)


class CostError(ValueError):
    """A cost table cannot be built; the message says why and what to change."""


# -- expert shapes ----------------------------------------------------------------------------
def expert_shapes(graph: Graph) -> dict[str, tuple[int, int]]:
    """``{expert node id: (H, I)}`` from the weight shapes of every expert node.

    Weights are stored ``[out, in]``: gate and up are ``[I, H]``, down is ``[H, I]``.

    Raises:
        CostError: If the graph has no experts, or an expert's three weights disagree.
    """
    shapes: dict[str, tuple[int, int]] = {}
    for node in graph.experts():
        shapes[node.id] = _one_expert_shape(graph, node.id, node.params)
    if not shapes:
        raise CostError("the graph has no expert nodes; a cost table needs a Mixture-of-Experts model")
    return shapes


def _one_expert_shape(graph: Graph, node_id: str, params: Mapping[str, str]) -> tuple[int, int]:
    """``(H, I)`` of one expert, checking that gate, up and down agree."""
    dims = {}
    for role in ("gate", "up", "down"):
        if role not in params:
            raise CostError(f"expert {node_id!r} has no {role!r} weight")
        shape = graph.weights.shape(params[role])  # metadata only: nothing is read
        if len(shape) != 2:
            raise CostError(f"expert {node_id!r}: {role} weight has shape {shape}, expected 2-D [out, in]")
        dims[role] = (int(shape[0]), int(shape[1]))
    i, h = dims["gate"]
    if dims["up"] != (i, h) or dims["down"] != (h, i):
        raise CostError(f"expert {node_id!r}: inconsistent weight shapes gate={dims['gate']} up={dims['up']} "
                        f"down={dims['down']}; expected gate=up=[I, H] and down=[H, I]")
    return h, i


def distinct_shapes(graph_or_shapes: Graph | Mapping[str, tuple[int, int]]) -> list[tuple[int, int]]:
    """The de-duplicated, sorted list of expert shapes ``(H, I)`` (what needs measuring)."""
    shapes = graph_or_shapes if isinstance(graph_or_shapes, Mapping) else expert_shapes(graph_or_shapes)
    return sorted(set(shapes.values()))


def expert_projections(h: int, i: int) -> tuple[tuple[str, int, int], ...]:
    """The three projections of an expert as ``(role, N, K)`` = (role, out features, in features)."""
    return (("gate", i, h), ("up", i, h), ("down", h, i))


# -- weight bytes -----------------------------------------------------------------------------
def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _check_quant_args(n: int, k: int, bits: int, block_size: int) -> None:
    """Validate MatMulNBits arguments (ORT allows bits 2..8 and power-of-two blocks >= 16)."""
    if n < 1 or k < 1:
        raise CostError(f"matrix shape must be positive, got N={n}, K={k}")
    if not 2 <= bits <= 8:
        raise CostError(f"MatMulNBits takes bits 2..8, got {bits}")
    if block_size < 16 or block_size & (block_size - 1):
        raise CostError(f"MatMulNBits block_size must be a power of two >= 16, got {block_size}")


def matmulnbits_layout(n: int, k: int, bits: int, block_size: int, scale_dtype: str = "float32"
                       ) -> dict[str, tuple[tuple[int, ...], str]]:
    """Initializer shapes and dtypes of one ``com.microsoft.MatMulNBits`` weight.

    Per the ONNX Runtime contrib-operator spec (``docs/ContribOperators.md``,
    ``com.microsoft.MatMulNBits``, inputs ``B``, ``scales``, ``zero_points``):
    ``B`` is uint8 ``[N, k_blocks, blob_size]`` with ``k_blocks = ceil(K / block_size)`` and
    ``blob_size = block_size * bits / 8``; ``scales`` has the dtype of A (``scale_dtype``:
    float32, or float16 when the activations are cast to float16) and shape ``[N, k_blocks]``;
    packed uint8 ``zero_points`` are ``[N, ceil(k_blocks * bits / 8)]``.

    Returns:
        ``{"B": (shape, "uint8"), "scales": (shape, scale_dtype), "zero_points": (shape, "uint8")}``.
    """
    _check_quant_args(n, k, bits, block_size)
    if scale_dtype not in ("float32", "float16"):  # quant.spec.VALID_SCALE_DTYPES (quant/ imports torch)
        raise CostError(f"MatMulNBits scales are float32 or float16, not {scale_dtype!r}")
    k_blocks = _ceil_div(k, block_size)
    return {
        "B": ((n, k_blocks, block_size * bits // 8), "uint8"),
        "scales": ((n, k_blocks), scale_dtype),
        "zero_points": ((n, _ceil_div(k_blocks * bits, 8)), "uint8"),
    }


_DTYPE_BYTES = {"uint8": 1, "int8": 1, "float16": 2, "bfloat16": 2, "float32": 4}


def layout_bytes(layout: Mapping[str, tuple[tuple[int, ...], str]]) -> int:
    """Total bytes of a ``{name: (shape, dtype)}`` layout."""
    total = 0
    for shape, dtype in layout.values():
        count = 1
        for d in shape:
            count *= d
        total += count * _DTYPE_BYTES[dtype]
    return total


def matmulnbits_bytes(n: int, k: int, bits: int, block_size: int, scale_dtype: str = "float32") -> int:
    """Bytes stored for one MatMulNBits weight: packed codes + scales + packed uint8 zero points."""
    return layout_bytes(matmulnbits_layout(n, k, bits, block_size, scale_dtype))


def expert_bytes(h: int, i: int, proj_bytes: Callable[[int, int], int]) -> int:
    """Weight bytes of one expert: ``proj_bytes(N, K)`` summed over gate, up and down."""
    return sum(proj_bytes(n, k) for _, n, k in expert_projections(h, i))


# -- energy -----------------------------------------------------------------------------------
# Horowitz, "Computing's energy problem (and what we can do about it)", ISSCC 2014, paper 1.1,
# Figure 1.1.9 ("rough energy costs for various operations in 45nm 0.9V"). Values in pJ per op.
HOROWITZ_45NM_OP_PJ: dict[str, float] = {
    "int8_add": 0.03,
    "int32_add": 0.1,
    "fp16_add": 0.4,
    "fp32_add": 0.9,
    "int8_mul": 0.2,
    "int32_mul": 3.1,
    "fp16_mul": 1.1,
    "fp32_mul": 3.7,
}
# Same figure: a 64-bit DRAM access costs 1.3-2.6 nJ. We take the low end, 1.3 nJ / 8 bytes
# = 162.5 pJ per byte (the optimistic DRAM figure, so energy estimates are a lower bound).
HOROWITZ_45NM_DRAM_PJ_PER_BYTE: float = 1300.0 / 8
# Same figure: a 64-bit access to an 8 KB SRAM costs 10 pJ -> 1.25 pJ per byte.
HOROWITZ_45NM_SRAM_8KB_PJ_PER_BYTE: float = 10.0 / 8


@dataclass(frozen=True)
class EnergyModel:
    """Per-byte memory and per-op compute energy (pJ) of a target.

    Attributes:
        name: What the figures describe (shown in reports).
        dram_pj_per_byte: Energy of moving one byte from off-chip memory.
        op_pj: Energy per arithmetic op, keyed like :data:`HOROWITZ_45NM_OP_PJ`.
    """

    name: str
    dram_pj_per_byte: float
    op_pj: Mapping[str, float] = field(default_factory=lambda: dict(HOROWITZ_45NM_OP_PJ))


HOROWITZ_45NM = EnergyModel("Horowitz ISSCC 2014, 45 nm / 0.9 V (DRAM low end)", HOROWITZ_45NM_DRAM_PJ_PER_BYTE)
"""The default energy model. It is a 45 nm-era model: absolute values overstate a modern chip's
compute energy and (for HBM) its memory energy, but the ratios between bit-widths, which is what
the allocator trades, follow from bytes and op mix."""


def energy_mj(bytes_moved: float, ops: Mapping[str, float], model: EnergyModel = HOROWITZ_45NM) -> float:
    """Energy in millijoules: ``bytes_moved * dram_pj_per_byte + sum(count * op_pj[kind])``.

    Raises:
        CostError: For an op kind the model has no figure for.
    """
    unknown = set(ops) - set(model.op_pj)
    if unknown:
        raise CostError(f"energy model {model.name!r} has no figure for ops {sorted(unknown)}; "
                        f"known: {sorted(model.op_pj)}")
    pj = bytes_moved * model.dram_pj_per_byte + sum(count * model.op_pj[kind] for kind, count in ops.items())
    return pj * 1e-9


def mac_ops(macs: float, mul: str, add: str) -> dict[str, float]:
    """Op counts of ``macs`` multiply-accumulates as ``{mul: macs, add: macs}``."""
    return {mul: float(macs), add: float(macs)} if mul != add else {mul: 2.0 * macs}


def merge_ops(*parts: Mapping[str, float]) -> dict[str, float]:
    """Sum op-count dictionaries."""
    out: dict[str, float] = {}
    for part in parts:
        for kind, count in part.items():
            out[kind] = out.get(kind, 0.0) + count
    return out


# -- machine identity -------------------------------------------------------------------------
# -- disk cache -------------------------------------------------------------------------------
def cost_cache_dir() -> Path:
    """``$DMPQ_CACHE_DIR/cost`` if set, else ``~/.cache/dmpq-compile/cost``."""
    return cache_root() / "cost"


class CostCache:
    """Measured cost entries as small JSON files, one per key.

    A key is a flat dict of JSON scalars (target, CPU model, threads, runtime version, group
    size, shape, bits, ...). Its canonical JSON is hashed into the file name and stored in the
    file, and a read checks it, so a hash collision or a hand-edited file never returns a wrong
    entry. Writes go through a temporary file and ``os.replace``, so concurrent writers never
    leave a half-written entry.
    """

    def __init__(self, root: Path | None = None) -> None:
        self.root = Path(root) if root is not None else cost_cache_dir()

    @staticmethod
    def _canonical(key: Mapping[str, Any]) -> str:
        return json.dumps(dict(key), sort_keys=True, separators=(",", ":"))

    def path(self, key: Mapping[str, Any]) -> Path:
        """File that holds (or would hold) the entry for ``key``."""
        digest = hashlib.sha256(self._canonical(key).encode()).hexdigest()[:24]
        target = str(key.get("target", "any")).replace("/", "_")
        return self.root / target / f"{digest}.json"

    def get(self, key: Mapping[str, Any]) -> dict[str, Any] | None:
        """The stored value for ``key``, or None (missing, unreadable or for another key)."""
        path = self.path(key)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, json.JSONDecodeError) as e:
            log.warning("ignoring unreadable cost cache entry %s: %s", path, e)
            return None
        if self._canonical(data.get("key", {})) != self._canonical(key):
            log.warning("cost cache entry %s belongs to another key; ignoring it", path)
            return None
        return data.get("value")

    def put(self, key: Mapping[str, Any], value: Mapping[str, Any]) -> Path:
        """Store ``value`` for ``key`` atomically and return the file path."""
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = json.dumps({"key": dict(key), "value": dict(value)}, indent=1, sort_keys=True)
        return atomic_write_bytes(path, payload.encode())


def rows_for_graph(shapes: Mapping[str, tuple[int, int]], per_shape: Mapping[tuple[int, int], Mapping[int, Any]],
                   bits: Iterable[int]) -> dict[str, dict[int, Any]]:
    """Expand per-shape results to ``{node id: {bits: row}}`` for every expert and every bit-width.

    Raises:
        CostError: If a shape or bit-width is missing from ``per_shape``.
    """
    bits = tuple(bits)
    table: dict[str, dict[int, Any]] = {}
    for node_id, shape in shapes.items():
        row = per_shape.get(shape)
        if row is None or any(b not in row for b in bits):
            raise CostError(f"no cost for expert {node_id!r} shape {shape} at bits {bits}")
        table[node_id] = {b: row[b] for b in bits}
    return table
