"""How different are a model's experts? Spread of activation frequency and quantization sensitivity.

Runs the ``profile`` and ``sensitivity`` passes on calibration text and prints, per layer and
overall, min / max / std of expert frequency and of the per-expert KL (and NLL) increase when
only that expert is quantized at 2 and 4 bits; writes ``benchmarks/results/spread-<model>.json``.

    python benchmarks/expert_spread.py --model samples/mixtral-tiny
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from dmpq_compile.passes import make_pass

from dmpq_compile.compiler import CompileConfig, calibration_ids, run_passes
from dmpq_compile.frontend import load

RESULTS = Path(__file__).parent / "results"


def spread(values: list[float]) -> dict[str, float]:
    lo, hi = min(values), max(values)
    return {"min": lo, "max": hi, "std": statistics.pstdev(values), "mean": statistics.fmean(values),
            "max_over_min": hi / lo if lo > 0 else float("inf")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="samples/mixtral-tiny")
    ap.add_argument("--sequences", type=int, default=16)
    args = ap.parse_args()
    torch.set_num_threads(1)
    cfg = CompileConfig.from_dict({"target": None, "calibration": {"sequences": max(32, args.sequences)}})
    calib = calibration_ids(args.model, cfg.calibration.corpus, cfg.calibration.sequences, cfg.calibration.seq_len)
    time.perf_counter()
    graph, recs = run_passes(load(args.model), [make_pass("profile"), make_pass(
        "sensitivity", bits=(2, 4), max_sequences=args.sequences, gradvar=False)], args.model, cfg, None,
        progress=False, calibration=calib)
    seconds = {r.name: round(r.seconds, 1) for r in recs}
    experts = graph.experts()
    out = {"model": args.model, "experts": len(experts), "pass_seconds": seconds, "layers": {}, "overall": {}}
    groups = {"all": experts} | {f"L{layer}": [n for n in experts if n.attrs["layer"] == layer]
                                  for layer in sorted({n.attrs["layer"] for n in experts})}
    for name, nodes in groups.items():
        stats = {"freq": spread([n.ann["freq"] for n in nodes])}
        for b in (2, 4):
            stats[f"kl@{b}"] = spread([n.ann["kl"][b] for n in nodes])
            stats[f"dnll@{b}"] = spread([n.ann["sensitivity"][b] for n in nodes])
        (out["overall"] if name == "all" else out["layers"]).update({name: stats} if name != "all" else stats)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"spread-{Path(args.model).name}.json").write_text(json.dumps(out, indent=1))
    print(f"{args.model}: {len(experts)} experts, passes {seconds}")
    print(f"{'group':>6} {'freq min':>9} {'freq max':>9} {'freq std':>9} {'KL@2 min':>10} {'KL@2 max':>10} "
          f"{'max/min':>8} {'KL@4 min':>10} {'KL@4 max':>10}")
    for name, st in [("all", out["overall"])] + list(out["layers"].items()):
        f, k2, k4 = st["freq"], st["kl@2"], st["kl@4"]
        print(f"{name:>6} {f['min']:>9.4f} {f['max']:>9.4f} {f['std']:>9.4f} {k2['min']:>10.2e} {k2['max']:>10.2e} "
              f"{k2['max_over_min']:>8.1f} {k4['min']:>10.2e} {k4['max']:>10.2e}")


if __name__ == "__main__":
    main()
