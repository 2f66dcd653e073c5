"""Project the wall time of a compile of a large MoE on 1, 8 and 64 Ray workers from measured
per-layer costs (issue 28, item 4; docs/scaling.md explains the model).

Inputs, both measured on this machine:

* the ``report.json`` of a real-width compile (default pipeline) of a few layers: per layer, the
  sensitivity pass's time outside ``expert_scores`` (the driver's forward, backward and flip probe:
  routed-token work, ``k x P_e`` per token) and inside it (what ``--ray`` sends to workers), the
  profile pass and the quantize pass;
* a ``bench_layer_hotspots.py`` result: the CPU time of one fake quantization per weight and of
  the routed-token expert run per token and weight, which split ``expert_scores`` into its part
  that grows with all the experts' weights (``E x P_e``) and its part that grows with the routed
  tokens (``k x P_e``).

Scaling: the driver's per-layer work and the routed-token part scale with ``k x P_e`` (tokens
fixed by the calibration set), the fake quantization and the quantize pass with ``E x P_e``.
Wall time on W workers: profile + forward (driver) + max(backward and flip probe (driver),
expert scores / W) + quantize / W. It assumes workers as fast as this machine's 2 cores, a shared
file system fast enough to read each layer's experts once per task, and no transfer cost::

    python benchmarks/project_scale.py --report /tmp/out/report.json --hotspots benchmarks/results/layer-hotspots-....json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

# shape: hidden, expert intermediate, experts, top-k, MoE layers, vocabulary, shared-expert intermediate
SHAPES = {
    "olmoe-1b-7b": (2048, 1024, 64, 8, 16, 50304, 0),
    "qwen3-30b-a3b": (2048, 768, 128, 8, 48, 151936, 0),
    "qwen3-235b-a22b": (4096, 1536, 128, 8, 94, 151936, 0),
    "deepseek-v3": (7168, 2048, 256, 8, 58, 129280, 2048),  # 61 layers, the first 3 dense
}
SEQS, SEQ_LEN = 16, 128  # sensitivity sequences x tokens (the defaults)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--report", required=True, help="report.json of a measured compile (default pipeline)")
    ap.add_argument("--measured-shape", default="olmoe-1b-7b", choices=sorted(SHAPES))
    ap.add_argument("--hotspots", required=True, help="bench_layer_hotspots.py results JSON (same shape)")
    ap.add_argument("--shapes", default="qwen3-30b-a3b,qwen3-235b-a22b,deepseek-v3")
    ap.add_argument("--workers", default="1,8,64")
    ap.add_argument("--cpu", action="store_true", help="use the passes' CPU time instead of wall time")
    args = ap.parse_args()
    report = json.loads(Path(args.report).read_text())
    hot = json.loads(Path(args.hotspots).read_text())
    passes = {p["name"]: p for p in report["passes"]}
    key = "cpu_seconds" if args.cpu else "seconds"
    layers = len({r["layer"] for r in report["experts"]})
    h, i, e, k, _, _v, _ = SHAPES[args.measured_shape]
    pe = 3 * h * i
    sens = passes["sensitivity"]
    scores = sens["stats"]["expert_scores_cpu_s" if args.cpu else "expert_scores_s"] / layers
    driver = (sens[key] - sens["stats"]["expert_scores_cpu_s" if args.cpu else "expert_scores_s"]) / layers
    profile = passes["profile"][key] / layers
    quant = passes["quantize"][key] / layers
    # split expert_scores: fake quantization (E x P_e x |bits| passes) vs routed-token runs (k x P_e)
    bits = len(hot["bits"])
    fq_per_weight = hot["per_round_s"]["fake_quantize after"]["cpu"] / (bits * pe)
    fq = e * pe * bits * fq_per_weight
    share = min(1.0, fq / (fq + e * (bits + 1) * hot["per_round_s"]["swiglu on routed tokens"]["cpu"]))
    fq, routed = scores * share, scores * (1 - share)
    rows = []
    for name in args.shapes.split(","):
        H, I, E, K, L, V, _S = SHAPES[name]
        PE = 3 * H * I
        dense = K * PE / (k * pe)  # routed-token work per layer relative to the measured shape
        total = E * PE / (e * pe)  # all experts' weights per layer relative to the measured shape
        d = driver * dense  # backward + flip probe (and the forward over the boundaries)
        s = fq * total + routed * dense
        q = quant * total
        p = profile * dense
        for w in (int(x) for x in args.workers.split(",")):
            wall = L * (p + max(d, s / w) + q / w) if w > 1 else L * (p + d + s + q)
            rows.append({"shape": name, "workers": w, "hours": wall / 3600, "per_layer_s": {
                "profile": p, "driver": d, "expert_scores": s, "quantize": q}})
        x_bytes = SEQS * SEQ_LEN * H * 4
        worker_mb = (3 * x_bytes + 2 * PE * 4 + E * PE // 8) / 2**20  # x, g, routing; one expert fp32 + fq; codes
        driver_mb = (V * H * 4 + 4 * SEQ_LEN * V * 4 * 3 + 6 * x_bytes + PE * 4 * 2) / 2**20
        rows[-1]["memory_mb"] = {"worker": round(worker_mb), "driver": round(driver_mb),
                                 "boundaries_on_disk_mb": round(L * x_bytes / 2**20)}
    out = {"report": args.report, "hotspots": args.hotspots, "measured_per_layer_s": {
        "profile": profile, "driver": driver, "expert_scores": scores, "fake_quant_share": share, "quantize": quant},
        "time": key, "rows": rows}
    print(f"measured ({args.measured_shape}, {layers} layers, {key}): per layer profile {profile:.1f} s, "
          f"sensitivity driver {driver:.1f} s, expert_scores {scores:.1f} s ({share:.0%} fake quantization), "
          f"quantize {quant:.1f} s")
    print("| shape | workers | hours | per layer: profile / driver / expert scores / quantize (s, one worker) |")
    print("|---|---:|---:|---|")
    for r in rows:
        pl = r["per_layer_s"]
        print(f"| {r['shape']} | {r['workers']} | {r['hours']:.2f} | {pl['profile']:.0f} / {pl['driver']:.0f} / "
              f"{pl['expert_scores']:.0f} / {pl['quantize']:.0f} |")
    for r in rows:
        if "memory_mb" in r:
            print(f"{r['shape']}: per worker ~{r['memory_mb']['worker']} MB, driver ~{r['memory_mb']['driver']} MB, "
                  f"layer boundaries on the driver's disk {r['memory_mb']['boundaries_on_disk_mb']} MB")
    path = Path(__file__).parent / "results" / f"project-scale-{Path(args.report).parent.name}.json"
    path.write_text(json.dumps(out, indent=1))
    print(f"results: {path}")


if __name__ == "__main__":
    main()
