"""How many calibration sequences the sensitivity pass needs: ``[sensitivity] sequences`` 4 / 8 / 12 / 16 / 32.

The sensitivity pass is most of a large compile's time (issue 28) and its cost is nearly
proportional to the sequences it measures on: ``ctx.calibration[:sequences]``, the first of the
``[calibration] sequences`` (default 32 of 128 tokens) that the profile pass routes in full. So 32
is the most it can use without changing the calibration, and is the "more data" control.

For each sample, every variant is the default ort-cpu compile (default allocator and budget,
``--nonexpert-bits auto``) with only ``[sensitivity] sequences`` changed:

* ``sN``: sensitivity on calibration sequences 0 .. N-1 (what ``sequences = N`` does);
* ``sN@K`` (noise floor): sensitivity on sequences K .. K+N-1 instead, with the same
  calibration set otherwise: the chosen rows are moved to the front of the calibration before the
  pipeline sees it, so the profile pass routes the same 32 sequences (in another order) and only
  the sensitivity pass's sample changes. ``s16@16`` against ``s16`` is how far the allocation and
  quality move from sampling noise alone;
* ``sN/S`` (``sN@K/S``): every S-th sequence from 0 (from K): the default's 32 sequences are
  consecutive 128-token pieces of the first few ``calib`` documents (3 with the samples'
  tokenizer), so a strided sample spreads the same count over more text.

Each artifact is scored under the evaluation protocol (docs/evaluation.md) on ``--split`` (dev for
the choice, test for the report) of both domains: perplexity, KL(float checkpoint || artifact) and
top-1 agreement, with 95 % bootstrap intervals over documents, and the paired ratios
``KL / KL(s16)`` and ``ppl / ppl(s16)`` (same windows, same resampled documents). It also counts
how many experts (and non-expert nodes) got a different bit-width from ``s16``, and the
sensitivity pass's wall time (one thread; a timing under a shared machine's load, for scale only),
and prints per size the mean KL ratio over the variants of that size (``--resummarize`` reprints
the tables of a results file).

    nice -n 10 python benchmarks/sensitivity_sequences.py --split dev \\
        --json benchmarks/results/sensitivity-sequences-dev.json
    nice -n 10 python benchmarks/sensitivity_sequences.py --split test --variants s16 s12 s8 s16/2 s8/4 --reuse \\
        --json benchmarks/results/sensitivity-sequences-test.json
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from dmpq_compile import compiler
from dmpq_compile.compiler import CompileConfig, emit, run_pipeline
from dmpq_compile.eval import DOMAINS, NumpyLogits, eval_windows, score, summarize, window_logprobs
from dmpq_compile.eval.tokens import load_tokenizer
from dmpq_compile.frontend import load
from dmpq_compile.ir import logits_fn
from dmpq_compile.runtime import load as load_artifact
from dmpq_compile.sysinfo import cpu_flags, cpu_model, git_commit, load_average

BASELINE = "s16"
DEFAULT_VARIANTS = ["s16", "s4", "s8", "s12", "s32", "s16@16", "s12@16", "s12@20", "s8@8", "s8@16", "s8@24",
                    "s4@4", "s4@16", "s16/2", "s16@1/2", "s8/4", "s8@1/4", "s8@2/4", "s8@3/4"]


def parse_variant(label: str) -> tuple[int, int, int]:
    """``sN`` -> (N, 0, 1); ``sN@K`` -> (N, K, 1); ``sN/S`` -> (N, 0, S); ``sN@K/S`` -> (N, K, S)."""
    m = re.fullmatch(r"s(\d+)(?:@(\d+))?(?:/(\d+))?", label)
    if not m or int(m.group(1)) < 1 or int(m.group(3) or 1) < 1:
        raise SystemExit(f"variant {label!r}: write sN (sequences 0..N-1), sN@K (K..K+N-1) or sN/S (every S-th "
                         "sequence, N of them), N and S >= 1")
    return int(m.group(1)), int(m.group(2) or 0), int(m.group(3) or 1)


def chosen_rows(label: str) -> list[int]:
    """The calibration rows the variant's sensitivity pass measures on."""
    n, offset, stride = parse_variant(label)
    return [offset + i * stride for i in range(n)]


def front(ids: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """``ids`` with ``rows`` first (in that order), the others after them in their order: the sensitivity
    pass reads the first rows, the profile pass all of them."""
    chosen = set(rows)
    return ids[rows + [i for i in range(len(ids)) if i not in chosen]]


def compile_variant(model: str, label: str, out: Path, calib_sequences: int) -> dict:
    """Compile ``model`` with the variant's sensitivity sample; the artifact goes to ``out``."""
    rows = chosen_rows(label)
    n = len(rows)
    if rows[-1] >= calib_sequences:
        raise SystemExit(f"variant {label}: sequence {rows[-1]} needs [calibration] sequences >= {rows[-1] + 1}, "
                         f"have {calib_sequences}")
    cfg = CompileConfig.from_dict({"target": "ort-cpu", "calibration": {"sequences": calib_sequences},
                                   "sensitivity": {"sequences": n}})
    original = compiler.calibration_ids

    def reordered(*args, **kwargs):
        ids = original(*args, **kwargs)
        if len(ids) < calib_sequences:
            raise SystemExit(f"{model}: the calibration split holds only {len(ids)} sequences, {label} needs "
                             f"{calib_sequences}")
        return front(ids, rows)

    graph = load(model)
    work = Path(tempfile.mkdtemp(prefix="sens-seqs-"))
    compiler.calibration_ids = reordered
    t0 = time.perf_counter()
    try:
        graph, records = run_pipeline(graph, model, cfg, progress=False, work_dir=work, cache=None)
        emit(graph, cfg, out, records, time.perf_counter() - t0, overwrite=True)
    finally:
        compiler.calibration_ids = original
        shutil.rmtree(work, ignore_errors=True)
    return {"compile_s": round(time.perf_counter() - t0, 1), "pass_s": {r.name: round(r.seconds, 2) for r in records},
            "sensitivity_tokens": next((r.stats.get("tokens") for r in records if r.name == "sensitivity"), None)}


def allocation(art: Path) -> dict:
    report = json.loads((art / "report.json").read_text())
    return {"experts": {r["id"]: r["bits"] for r in report["experts"]},
            "nonexpert": {r["id"]: r["bits"] for r in report["nonexpert"]},
            "freq": {r["id"]: r.get("freq") for r in report["experts"]},
            "stored_bpw": report["storage"]["bits_per_weight"]}


def differ(a: dict, b: dict) -> int:
    return sum(1 for k in a if a[k] != b[k])


def size_summary(rows: list[dict]) -> dict:
    """Per (size, contiguous|strided): the variants (the baseline among them, at ratio 1), the mean of their
    paired KL ratios to the baseline per set, and how many experts each gave a different bit-width from it."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        kind = "strided" if "/" in r["variant"] else "contiguous"
        groups.setdefault(f"{r['sequences']} {kind}", []).append(r)

    def ratio(r: dict, s: str) -> float:
        return 1.0 if r["variant"] == BASELINE else r["quality"][s]["kl_ratio"]["value"]

    return {key: {"variants": [r["variant"] for r in rs], "experts_differ": [r["experts_differ"] for r in rs],
                  "mean_kl_ratio": {s: float(np.mean([ratio(r, s) for r in rs])) for s in rs[0]["quality"]}}
            for key, rs in sorted(groups.items(), key=lambda kv: (int(kv[0].split()[0]), kv[0]))}


def print_tables(result: dict, split: str) -> None:
    """One sample's table (markdown) and its per-size summary."""
    name, rows, sets = Path(result["model"]).name, result["rows"], list(result["sets"])
    print(f"\n{name} ({split}); KL(float || artifact) and paired ratios to {BASELINE}, 95 % intervals over documents")
    print("| variant | sensitivity s | experts differing | non-experts differing | stored bpw | "
          + " | ".join(f"{s} KL | {s} KL/KL(s16) | {s} ppl/ppl(s16)" for s in sets) + " |")
    print("|---|---:|---:|---:|---:|" + "---:|---:|---:|" * len(sets))
    for r in rows:
        cells = []
        for s in sets:
            q = r["quality"][s]
            cells.append(f"{q['kl']['value']:.5f} [{q['kl']['lo']:.5f}, {q['kl']['hi']:.5f}]")
            for key in ("kl_ratio", "ppl_ratio"):
                c = q.get(key)
                cells.append(f"{c['value']:.4f} [{c['lo']:.4f}, {c['hi']:.4f}]" if c else "1")
        sens = r.get("timing", {}).get("pass_s", {}).get("sensitivity")
        print(f"| {r['variant']} | {'-' if sens is None else sens} | {r['experts_differ']}/{r['experts']} | "
              f"{r['nonexpert_differ']}/{r['nonexpert']} | {r['stored_bpw']:.3f} | " + " | ".join(cells) + " |",
              flush=True)
    print(f"\n{name}: mean over the variants of each size and kind (contiguous: sN, sN@K; strided: sN/S) of "
          f"the paired KL / KL({BASELINE}) ({BASELINE} itself counted as 1)")
    for key, d in result["by_size"].items():
        print(f"  {key}: " + ", ".join(f"{s} {v:.3f}" for s, v in d["mean_kl_ratio"].items())
              + f" (variants {' '.join(d['variants'])}; experts differing {d['experts_differ']})")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["samples/mixtral-tiny", "samples/olmoe-tiny"])
    p.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS,
                   help=f"sN or sN@K (default {' '.join(DEFAULT_VARIANTS)}); {BASELINE} is always included")
    p.add_argument("--calib-sequences", type=int, default=32, help="[calibration] sequences (default 32, the default)")
    p.add_argument("--split", default="dev", choices=("dev", "test"))
    p.add_argument("--windows", type=int, default=64, help="at most this many windows per set (default 64)")
    p.add_argument("--out", default="out/sensitivity-sequences", help="artifact folder")
    p.add_argument("--reuse", action="store_true", help="score artifacts already in --out instead of compiling")
    p.add_argument("--json")
    p.add_argument("--resummarize", action="store_true",
                   help="reprint the tables of the --json file (its per-size summary recomputed) and rewrite it")
    a = p.parse_args()
    if a.resummarize:
        data = json.loads(Path(a.json).read_text())
        for result in data["results"]:
            result["by_size"] = size_summary(result["rows"])
            print_tables(result, data["split"])
        Path(a.json).write_text(json.dumps(data, indent=1))
        return 0
    torch.set_num_threads(1)
    variants = [BASELINE] + [v for v in a.variants if v != BASELINE]
    for v in variants:
        parse_variant(v)
    meta = {"command": " ".join(["python", *sys.argv]), "commit": git_commit(), "cpu": cpu_model(),
            "cpu_flags": cpu_flags(), "load_start": load_average(), "split": a.split, "torch_threads": 1}
    results = []
    for model in a.models:
        name = Path(model).name
        arts = {v: Path(a.out) / name / v for v in variants}
        timing = {}
        for v, art in arts.items():
            if a.reuse and (art / "report.json").is_file():
                continue
            timing[v] = compile_variant(model, v, art, a.calib_sequences)
            print(f"{name} {v}: compiled in {timing[v]['compile_s']} s {timing[v]['pass_s']}", flush=True)
        allocs = {v: allocation(art) for v, art in arts.items()}
        base = allocs[BASELINE]
        tok = load_tokenizer(model)
        ref_fn = logits_fn(load(model), quantize=False)
        sets = {}
        for domain in DOMAINS:
            w = eval_windows(domain, a.split, tok, max_windows=a.windows)
            ref = window_logprobs(ref_fn, w)
            scores = {v: score(NumpyLogits(load_artifact(art, verify=False, threads=1).logits), w, reference=ref)
                      for v, art in arts.items()}
            summary = summarize(w, scores, baseline=BASELINE)
            sets[w.name] = {"windows": w.record(), "summary": summary,
                            "mean_abs_window_kl_diff": {v: float(np.abs(scores[v].kl.mean(1) - scores[BASELINE].kl
                                                                        .mean(1)).mean()) for v in scores}}
        rows = []
        for v in variants:
            al = allocs[v]
            rows.append({"variant": v, "sequences": parse_variant(v)[0], "rows": chosen_rows(v),
                         "experts_differ": differ(al["experts"], base["experts"]), "experts": len(base["experts"]),
                         "nonexpert_differ": differ(al["nonexpert"], base["nonexpert"]),
                         "nonexpert": len(base["nonexpert"]), "freq_identical": al["freq"] == base["freq"],
                         "stored_bpw": al["stored_bpw"],
                         "bits_hist": {str(b): list(al["experts"].values()).count(b)
                                       for b in sorted(set(al["experts"].values()))},
                         **({"timing": timing[v]} if v in timing else {}),
                         "quality": {s: d["summary"][v] for s, d in sets.items()}})
        results.append({"model": model, "rows": rows, "sets": {s: {"windows": d["windows"],
                        "mean_abs_window_kl_diff": d["mean_abs_window_kl_diff"]} for s, d in sets.items()}})
        results[-1]["by_size"] = size_summary(rows)
        print_tables(results[-1], a.split)
    meta["load_end"] = load_average()
    if a.json:
        Path(a.json).write_text(json.dumps({**meta, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
