"""``dmpq-compile cost``: build and print a target's expert cost table.

One row per distinct expert shape and bit-width: decode latency (cold and warm), prefill
latency per token, weight bytes, the bandwidth that decode achieves and the energy estimate.
On ort-cpu the latencies are of one expert under per-expert dispatch; ``idle`` is what that
dispatch costs a token that does not pick the expert, ``fused`` the expert's cost inside the
fused MoE op (4/8 bits) and ``fixed`` that op's per-token fixed part, paid once per layer and
width: the numbers the lowering and the allocator use to choose between the two layouts. ``kernel``
is the expert's cost inside ``--dispatch kernel``'s one ``ai.dmpq.MixedMoE`` per layer (2/4/8 bits)
and ``kfixed`` that node's fixed part, paid once per layer whatever widths it holds (measured where
dmpq's kernel library builds: a C++ compiler on Linux x86-64; ``-`` and a note otherwise). ``bytes`` are
the weights as MatMulNBits stores them; a ``--dispatch kernel`` artifact keeps one zero point a group
unpacked (half a byte a group more at 2 and 4 bits), and a compile for it prices that layout.
``--shape H,I`` costs a shape without a model (e.g. ``4096,14336`` for a Mixtral-8x7B expert,
``2048,1024`` for OLMoE-1B-7B). Measurements are cached per CPU, threads, group size and runtime and
kept for good; ``--remeasure`` replaces them (compiles read the same cache).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

NAME = "cost"
HELP = "build and print a target's per-expert cost table (latency, bytes, energy per bit-width)"
DESCRIPTION = __doc__
TARGETS = ("ort-cpu", "trt-a100")


def _shape(text: str) -> tuple[int, int]:
    """Parse ``H,I`` into two positive ints."""
    try:
        h, i = (int(p) for p in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shape wants H,I (two integers, e.g. 4096,14336), got {text!r}") from None
    if h < 1 or i < 1:
        raise argparse.ArgumentTypeError(f"--shape sizes must be positive, got {text!r}")
    return h, i


def _bits(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(p) for p in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--bits wants a comma-separated list such as 4,16, got {text!r}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_dir", nargs="?", type=Path, metavar="MODEL_DIR",
                        help="Hugging Face MoE checkpoint folder (optional with --shape)")
    parser.add_argument("--target", required=True, choices=TARGETS, help="compilation target to cost")
    parser.add_argument("--shape", type=_shape, action="append", default=[], metavar="H,I",
                        help="cost this expert shape (hidden, intermediate); repeatable")
    parser.add_argument("--bits", type=_bits, default=None, help="bit-widths to cost (default: all the target runs)")
    parser.add_argument("--group-size", type=int, default=None,
                        help="quantization group size (default 64 for ort-cpu, 128 for trt-a100)")
    parser.add_argument("--threads", type=int, default=None, help="ort-cpu: intra-op threads (default: all CPUs)")
    parser.add_argument("--repeats", type=int, default=5, help="ort-cpu: timed runs per median (default 5)")
    parser.add_argument("--evict-mb", type=int, default=None,
                        help="ort-cpu: cache-flush buffer in MiB for cold runs (default: twice the last-level cache)")
    cache = parser.add_mutually_exclusive_group()
    cache.add_argument("--no-cache", action="store_true", help="ort-cpu: measure again; do not read or write the cache")
    cache.add_argument("--remeasure", action="store_true",
                       help="ort-cpu: measure again and replace the cached entries, which later compiles with the same "
                            "threads and group size then use (cached entries are otherwise kept for good; use it when "
                            "a row looks wrong, e.g. after the table warned that 4 bits measured slower than 8)")
    parser.add_argument("--variant", default="sxm4-80gb", help="trt-a100: A100 variant (sxm4-80gb, sxm4-40gb)")
    parser.add_argument("--json", type=Path, default=None, metavar="OUT", help="also write the table as JSON")


def _shapes_and_experts(args: argparse.Namespace) -> tuple[list[tuple[int, int]], dict[str, tuple[int, int]]]:
    """Shapes to cost, and ``{node id: shape}`` when a model was given."""
    from ..backends.cost import expert_shapes

    if args.model_dir is None and not args.shape:
        raise ValueError("give a MODEL_DIR or at least one --shape H,I")
    experts: dict[str, tuple[int, int]] = {}
    if args.model_dir is not None:
        from ..frontend.hf import load

        experts = expert_shapes(load(args.model_dir))
    return sorted(set(experts.values()) | set(args.shape)), experts


def _ort_rows(args: argparse.Namespace, shapes: list[tuple[int, int]]) -> list[dict[str, Any]]:
    from ..backends.ort_cpu import cost as oc

    group = args.group_size or oc.DEFAULT_GROUP_SIZE
    measured = oc.measure_shapes(shapes, args.bits or oc.ORT_CPU_BITS, group, args.threads, args.repeats,
                                 cache=not args.no_cache, refresh=args.remeasure, progress=True,
                                 evict_bytes=(args.evict_mb << 20) if args.evict_mb else None)
    rows = []
    for (h, i), per_bits in measured.items():
        for b, m in sorted(per_bits.items()):
            row = m.row()
            rows.append({"h": h, "i": i, "bits": b, "group_size": group, "threads": m.threads,
                         "decode_ms_cold": m.decode_ms, "decode_ms_warm": m.decode_warm_ms,
                         "prefill_ms_cold": m.prefill_ms, "prefill_ms_warm": m.prefill_warm_ms,
                         "idle_decode_ms": row.idle_decode_ms, "fused_decode_ms": row.fused_decode_ms,
                         "group_decode_ms": row.group_decode_ms if row.fused_decode_ms is not None else None,
                         "fused_prefill_ms": row.fused_prefill_ms, "kernel_decode_ms": row.kernel_decode_ms,
                         "kernel_fixed_decode_ms": row.kernel_fixed_decode_ms if row.kernel_decode_ms is not None
                         else None, "kernel_prefill_ms": row.kernel_prefill_ms,
                         "kernel_fixed_prefill_ms": row.kernel_fixed_prefill_ms if row.kernel_prefill_ms is not None
                         else None,
                         "bytes": m.bytes, "bandwidth_gbs": m.bandwidth_gbs, "energy_mj": m.energy_mj,
                         "decode_spread": m.spread("decode_cold"), "samples": m.to_dict()})
    return rows


def _trt_rows(args: argparse.Namespace, shapes: list[tuple[int, int]]) -> list[dict[str, Any]]:
    from ..backends.trt import cost as tc

    group = args.group_size or tc.DEFAULT_GROUP_SIZE
    costs = tc.trt_shape_costs(shapes, args.bits or tc.TRT_BITS, group, args.variant)
    rows = []
    for (h, i), per_bits in costs.items():
        for b, c in sorted(per_bits.items()):
            rows.append({"h": h, "i": i, "bits": b, "group_size": group, "variant": args.variant,
                         "decode_ms_cold": c.decode_ms, "decode_ms_warm": None, "prefill_ms_cold": c.prefill_ms,
                         "prefill_ms_warm": None, "bytes": c.bytes, "bandwidth_gbs": c.bandwidth_gbs,
                         "energy_mj": c.energy_mj, "decode_spread": None, "decode_bound": c.decode_bound})
    return rows


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_table(rows: list[dict[str, Any]]) -> str:
    """The rows as an aligned text table."""
    head = ("shape", "bits", "decode ms cold", "warm", "spread", "idle", "fused", "fixed", "kernel", "kfixed",
            "prefill ms/tok", "warm", "fused", "kernel", "MiB", "GB/s", "mJ/token")
    lines = [head]
    for r in rows:
        spread = None if r["decode_spread"] is None else 100 * r["decode_spread"]
        lines.append((f"{r['h']}x{r['i']}", str(r["bits"]), _fmt(r["decode_ms_cold"], ".4g"),
                      _fmt(r["decode_ms_warm"], ".4g"), "-" if spread is None else f"{spread:.0f}%",
                      _fmt(r.get("idle_decode_ms"), ".3g"), _fmt(r.get("fused_decode_ms"), ".4g"),
                      _fmt(r.get("group_decode_ms"), ".3g"), _fmt(r.get("kernel_decode_ms"), ".4g"),
                      _fmt(r.get("kernel_fixed_decode_ms"), ".3g"),
                      _fmt(r["prefill_ms_cold"], ".4g"), _fmt(r["prefill_ms_warm"], ".4g"),
                      _fmt(r.get("fused_prefill_ms"), ".4g"), _fmt(r.get("kernel_prefill_ms"), ".4g"),
                      f"{r['bytes'] / 2**20:.2f}", f"{r['bandwidth_gbs']:.1f}", f"{r['energy_mj']:.4g}"))
    widths = [max(len(line[c]) for line in lines) for c in range(len(head))]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(line, widths)) for line in lines)


def _header(args: argparse.Namespace) -> str:
    if args.target == "trt-a100":
        from ..backends.trt.cost import A100_VARIANTS

        return f"trt-a100 (analytical roofline, {A100_VARIANTS[args.variant].source})"
    import onnxruntime

    from ..backends.ort_cpu.cost import kernel_library
    from ..sysinfo import available_cpus, cpu_model

    _, kernel = kernel_library()
    note = f"kernel rows: dmpq's MixedMoE build {kernel['build']}, {kernel['path']} path" if "build" in kernel \
        else f"no kernel rows: {kernel['error']}"
    return (f"ort-cpu (measured: {cpu_model()}, {args.threads or available_cpus()} threads, "
            f"onnxruntime {onnxruntime.__version__}; table decode/prefill = cold medians; {note})")


def main(args: argparse.Namespace) -> int:
    if args.target == "trt-a100":
        from ..backends.trt.cost import A100_VARIANTS

        if args.variant not in A100_VARIANTS:
            raise ValueError(f"unknown --variant {args.variant!r}; choose from {sorted(A100_VARIANTS)}")
    shapes, experts = _shapes_and_experts(args)
    rows = (_ort_rows if args.target == "ort-cpu" else _trt_rows)(args, shapes)
    print(_header(args))
    print(format_table(rows))
    if experts:
        print(f"{len(experts)} experts in {len(set(experts.values()))} distinct shape(s)")
    if args.json:
        payload = {"target": args.target, "header": _header(args), "rows": rows,
                   "experts": {node: list(shape) for node, shape in experts.items()}}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=1))
        print(f"wrote {args.json}")
    return 0
