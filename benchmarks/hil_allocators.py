"""Hardware in the loop: allocations chosen with the measured ort-cpu table vs a bytes-only proxy.

A one-layer random checkpoint at OLMoE-1B-7B widths (hidden 2048, expert intermediate 1024;
16 experts top-4 and vocabulary 4096 to stay under 4 GB) is profiled on a small text corpus.
The ort-cpu cost rows of its expert shape are measured here, fresh (1 thread, no disk cache),
and three latency tables are built from them:

* ``measured-cold``: the cost table as the compiler uses it (cold-cache medians);
* ``measured-warm``: the warm-cache medians of the same measurement;
* ``bytes-proxy``: decode time proportional to weight bytes, scaled to the 16-bit cold median.

Random weights carry no accuracy signal, so the accuracy term uses single-expert KLs drawn from
the distribution fitted to samples/olmoe-tiny given each expert's measured routing frequency
(:func:`dmpq_compile.passes.allocate.synthetic.draw_sensitivities`). For each latency weight
``w_lat`` and table, the exact optimum of ``KL + w_lat * L`` under a 4-average-bit budget is
emitted, and every distinct artifact's decode latency is measured interleaved (1 thread,
teacher-forced on the profiling text, so the routing matches the profile). Every artifact decodes
the same tokens, so each row also gets paired ratios: the median over tokens of its time over
the control's (``w_lat = 0``) and over the bytes-proxy allocation's at the same ``w_lat``, with a
95 % bootstrap interval. The attention
projections and the lm_head are stored at ``--nonexpert-bits`` (default 4) in every artifact, so
that the experts, not fp32 attention, dominate what a decoded token reads. ``w_lat = 0`` is the
control: the accuracy term alone, the same allocation whatever the table.

    python benchmarks/hil_allocators.py --experts 64 --top-k 8 --w-lat 0,0.001,0.003,0.01,0.03,0.1
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from alloc_common import BASE, RESULTS, average_bits, digest, emit_allocation, loadavg, machine
from dmpq_compile.backends import get_backend
from dmpq_compile.backends.ort_cpu.cost import measure_shapes
from dmpq_compile.passes import make_pass
from dmpq_compile.passes.allocate import (
    AllocationProblem,
    Budget,
    ExpertCost,
    ExpertInfo,
    ObjectiveWeights,
    solve,
)
from dmpq_compile.passes.allocate.measure import energy_source
from dmpq_compile.passes.allocate.synthetic import draw_sensitivities

from dmpq_compile.compiler import calibration_ids, run_passes
from dmpq_compile.frontend import load
from dmpq_compile.runtime import load as load_artifact
from dmpq_compile.testing import make_tiny_checkpoint, write_tiny_corpus

BITS = (2, 4, 8, 16)
SHAPE = (2048, 1024)


def build_model(work: Path, experts: int, top_k: int) -> tuple[Path, Path]:
    ckpt = make_tiny_checkpoint("olmoe", work / "ckpt", hidden_size=SHAPE[0], intermediate_size=SHAPE[1],
                                num_experts=experts, num_experts_per_tok=top_k, num_hidden_layers=1,
                                num_attention_heads=16, num_key_value_heads=16, vocab_size=4096,
                                max_position_embeddings=1024)
    return ckpt, write_tiny_corpus(work / "corpus", n_files=12, sentences=120)


def cost_tables(repeats: int) -> tuple[dict[str, dict[int, ExpertCost]], dict]:
    """The three latency tables (module docstring) and the raw measurement."""
    measured = measure_shapes([SHAPE], BITS, threads=1, repeats=repeats, cache=False, progress=False)[SHAPE]
    cold = {b: ExpertCost(**dataclasses.asdict(m.row())) for b, m in measured.items()}
    warm = {b: dataclasses.replace(cold[b], decode_ms=m.decode_warm_ms) for b, m in measured.items()}
    per_byte = cold[16].decode_ms / cold[16].bytes
    proxy = {b: dataclasses.replace(cold[b], decode_ms=per_byte * cold[b].bytes) for b in BITS}
    raw = {b: {"bytes": m.bytes, "decode_cold": m.decode_cold, "decode_warm": m.decode_warm} for b, m in measured.items()}
    return {"measured-cold": cold, "measured-warm": warm, "bytes-proxy": proxy}, raw


def problem_for(graph, sens: list[dict[int, float]], table: dict[int, ExpertCost], budget: float,
                w_lat: float) -> AllocationProblem:
    experts = tuple(ExpertInfo(key=n.id, layer=n.attrs["layer"], expert=n.attrs["expert"],
                               n_params=3 * SHAPE[0] * SHAPE[1], freq=float(n.ann["freq"]), mass=0.0,
                               sensitivity=s, cost=table) for n, s in zip(graph.experts(), sens))
    return AllocationProblem(experts, BITS, Budget("bits", budget), ObjectiveWeights(w_acc=1.0, w_lat=w_lat))


def decode_ms(paths: dict[str, Path], stream: np.ndarray, rounds: int, prompt: int, steps: int) -> dict[str, list]:
    """Per-token teacher-forced decode times (ms) of every artifact, interleaved, rotated each round."""
    sessions = {k: load_artifact(p, verify=False, threads=1) for k, p in paths.items()}
    keys = list(sessions)
    times: dict[str, list[float]] = {k: [] for k in keys}
    for r in range(rounds):
        start = (r * (prompt + steps)) % (len(stream) - prompt - steps)
        window = stream[start: start + prompt + steps]
        for k in keys[r % len(keys):] + keys[: r % len(keys)]:
            s = sessions[k]
            _, past = s.forward(window[None, :prompt])
            for t in range(prompt, prompt + steps):
                t0 = time.perf_counter()
                _, past = s.forward(window[None, t: t + 1], past)
                times[k].append((time.perf_counter() - t0) * 1e3)
    return times


def paired_ratio(t: list[float], ref: list[float], seed: int, resamples: int = 2000) -> dict:
    """Median over tokens of ``t[i] / ref[i]`` (the same token of the same round, so routing and
    position cancel) with a 95 % bootstrap interval over tokens."""
    ratio = np.asarray(t) / np.asarray(ref)
    rng = np.random.default_rng(seed)
    boot = np.median(ratio[rng.integers(0, len(ratio), (resamples, len(ratio)))], axis=1)
    return {"median": float(np.median(ratio)), "ci95": [float(x) for x in np.percentile(boot, [2.5, 97.5])],
            "faster_share": float(np.mean(ratio < 1.0))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--top-k", type=int, default=4)
    ap.add_argument("--budget", type=float, default=4.0)
    ap.add_argument("--w-lat", default="0.0003,0.001,0.003,0.01")
    ap.add_argument("--repeats", type=int, default=9, help="timed runs behind each cost-table median")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--nonexpert-bits", type=int, default=4, help="attention and lm_head bits (16: float)")
    ap.add_argument("--work", default="/tmp/dmpq-hil")
    args = ap.parse_args()
    torch.set_num_threads(1)
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    meta = machine()
    ckpt, corpus = build_model(work, args.experts, args.top_k)
    cfg = BASE.replace(calibration={"corpus": str(corpus)}, allocate={"nonexpert_bits": args.nonexpert_bits})
    calib = calibration_ids(ckpt, str(corpus), 16, 128, split="train")
    graph = load(ckpt)
    graph.meta["group_size"] = cfg.quantize.group_size
    graph, _ = run_passes(graph, [make_pass("profile")], ckpt, cfg, get_backend("ort-cpu"), progress=False,
                          calibration=calib)
    freq = np.array([float(n.ann["freq"]) for n in graph.experts()])
    sens = draw_sensitivities(freq, BITS, np.random.default_rng(args.seed))
    tables, raw = cost_tables(args.repeats)
    rows, paths = [], {}
    for w_lat in (float(w) for w in args.w_lat.split(",")):
        for name, table in tables.items():
            sol = solve(problem_for(graph, sens, table, args.budget, w_lat))
            key = digest(sol.allocation)
            if key not in paths:
                paths[key] = emit_allocation(graph, str(ckpt), sol.allocation, work / "artifacts", key, cfg)
            predicted = {t: sum(n.ann["freq"] * tab[sol.allocation[n.id]].decode_ms for n in graph.experts())
                         for t, tab in tables.items()}
            rows.append({"w_lat": w_lat, "table": name, "digest": key, "avg_bits": average_bits(graph, sol.allocation),
                         "kl_proxy": sum(s[sol.allocation[n.id]] for n, s in zip(graph.experts(), sens)),
                         "bits_histogram": {b: list(sol.allocation.values()).count(b) for b in BITS},
                         "predicted_expert_ms": predicted, "allocation": sol.allocation})
            print(f"w_lat {w_lat:g} {name:>13}: {rows[-1]['bits_histogram']} avg bits {rows[-1]['avg_bits']:.2f} "
                  f"KL proxy {rows[-1]['kl_proxy']:.3g} -> {key}", flush=True)
    stream = calib.reshape(-1).numpy().astype(np.int64)
    load_before = loadavg()
    times = decode_ms(paths, stream, args.rounds, 16, args.steps)
    control = next(r["digest"] for r in rows if r["w_lat"] == min(x["w_lat"] for x in rows))
    for r in rows:
        t = times[r["digest"]]
        proxy = next(x["digest"] for x in rows if x["w_lat"] == r["w_lat"] and x["table"] == "bytes-proxy")
        r.update(decode_ms=statistics.median(t), decode_ms_iqr=float(np.subtract(*np.percentile(t, [75, 25]))),
                 vs_control=paired_ratio(t, times[control], args.seed),
                 vs_bytes_proxy=paired_ratio(t, times[proxy], args.seed))
    for r in rows:
        c, p = r["vs_control"], r["vs_bytes_proxy"]
        print(f"w_lat {r['w_lat']:g} {r['table']:>13}: measured decode {r['decode_ms']:.3f} ms/token "
              f"(IQR {r['decode_ms_iqr']:.3f}), vs control {c['median']:.4f} [{c['ci95'][0]:.4f}, {c['ci95'][1]:.4f}], "
              f"vs bytes proxy {p['median']:.4f} [{p['ci95'][0]:.4f}, {p['ci95'][1]:.4f}], KL proxy "
              f"{r['kl_proxy']:.3g}, avg bits {r['avg_bits']:.2f}")
    out = {"model": f"one-layer random OLMoE widths {SHAPE}, {args.experts} experts top-{args.top_k}, "
                    f"attention and lm_head at {args.nonexpert_bits} bits",
           "energy": f"{energy_source()} (no energy term in this objective)",
           "cost_measurement": raw, "tables": {k: {b: dataclasses.asdict(c) for b, c in t.items()}
                                               for k, t in tables.items()},
           "freq": freq.tolist(), "rows": rows, "timing_loadavg": [load_before, loadavg()], "control": control,
           "times_ms": times,
           "machine_start": meta, "machine_end": machine(), "command": "python benchmarks/hil_allocators.py " +
           " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items())}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "hil-allocators.json").write_text(json.dumps(out, indent=1))
    print(f"wrote {RESULTS / 'hil-allocators.json'}")


if __name__ == "__main__":
    main()
