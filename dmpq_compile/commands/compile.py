"""dmpq-compile compile MODEL_DIR --target ... --budget-bits ... -o OUT"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HELP = "compile a Hugging Face MoE checkpoint into a mixed-precision artifact"
DESCRIPTION = """Lower MODEL_DIR into the IR, run the passes (profile, sensitivity, cost, allocate,
quantize) and emit an artifact for --target. Exactly one budget may be given; the default is
--budget-bits 4. The artifact folder is written atomically."""
ALLOCATORS = ("rl", "optimal", "gradvar", "frequency", "uniform")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_dir", metavar="MODEL_DIR", help="local Hugging Face checkpoint folder")
    p.add_argument("-o", "--out", required=True, help="artifact folder to create")
    p.add_argument("--target", default="ort-cpu", help="backend: ort-cpu | trt-a100 (default ort-cpu)")
    p.add_argument("--allocator", default="rl", choices=ALLOCATORS,
                   help="bit allocator: rl (PPO policy, default), optimal (exact optimum of the additive model), "
                   "gradvar, frequency, uniform")
    b = p.add_mutually_exclusive_group()
    b.add_argument("--budget-bits", type=float, help="average bits per expert weight (default 4)")
    b.add_argument("--budget-mb", type=float, help="total expert weight megabytes (MiB)")
    b.add_argument("--budget-ms", type=float, help="expected expert decode latency per token, ms")
    for w, default in (("acc", 1.0), ("lat", 0.0), ("mem", 0.0), ("eng", 0.0)):
        p.add_argument(f"--w-{w}", type=float, default=default, help=f"objective weight (default {default})")
    p.add_argument("--bits", help="comma-separated bit-widths to choose from (default: all the target supports)")
    p.add_argument("--group-size", type=int, default=64, help="quantization group size along K (default 64)")
    p.add_argument("--quant-method", default="rtn", choices=("rtn", "hqq", "gptq"), help="rounding (default rtn)")
    p.add_argument("--calib-corpus", default="pydoc",
                   help="calibration corpus: 'pydoc', a text file, a folder of text files (default pydoc)")
    p.add_argument("--calib-sequences", type=int, default=32, help="calibration sequences (default 32)")
    p.add_argument("--seq-len", type=int, default=128, help="calibration sequence length (default 128)")
    p.add_argument("--metric", default="kl", choices=("kl", "nll"),
                   help="accuracy model of optimal/rl: per-expert KL to FP (default) or NLL increase")
    p.add_argument("--no-sensitivity", action="store_true", help="skip the sensitivity pass when not needed")
    p.add_argument("--qat", action="store_true", help="quantization-aware fine-tuning at the assigned bits")
    p.add_argument("--qat-steps", type=int, default=200, help="QAT optimizer steps (default 200)")
    p.add_argument("--qat-time-budget", type=float, default=600.0, help="QAT wall-time limit, s (default 600)")
    p.add_argument("--codesign-rounds", type=int, default=0,
                   help="alternate allocation and QAT this many rounds before the final one (implies --qat)")
    p.add_argument("--rl-episodes", type=int, help="episodes for --allocator rl")
    p.add_argument("--config", help="TOML file with compile settings (command-line flags win)")
    p.add_argument("--dump-ir", help="save the IR after every pass into this folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def config_from_args(args: argparse.Namespace):
    from ..compiler import CompileConfig

    data = _read_toml(args.config) if args.config else {}
    kind, value = "bits", 4.0
    if args.budget_mb is not None:
        kind, value = "bytes", args.budget_mb * 2**20
    elif args.budget_ms is not None:
        kind, value = "latency", args.budget_ms
    elif args.budget_bits is not None:
        value = args.budget_bits
    if args.budget_bits is not None or args.budget_mb is not None or args.budget_ms is not None \
            or "budget" not in data:
        data.update(budget_kind=kind, budget=value)
    data.update(target=args.target, allocator=args.allocator, w_acc=args.w_acc, w_lat=args.w_lat,
                w_mem=args.w_mem, w_eng=args.w_eng, group_size=args.group_size, quant_method=args.quant_method,
                calib_corpus=args.calib_corpus, calib_sequences=args.calib_sequences, seq_len=args.seq_len,
                sensitivity=not args.no_sensitivity, seed=args.seed, metric=args.metric, qat=args.qat, qat_steps=args.qat_steps,
                qat_time_budget_s=args.qat_time_budget, codesign_rounds=args.codesign_rounds)
    if args.bits:
        data["bits"] = tuple(int(b) for b in args.bits.split(","))
    if args.rl_episodes:
        data.setdefault("allocator_options", {})["episodes"] = args.rl_episodes
    return CompileConfig.from_dict(data)


def _read_toml(path: str) -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    with open(path, "rb") as f:
        data = tomllib.load(f)
    return dict(data.get("compile", data))


def main(args: argparse.Namespace) -> int:
    from ..compiler import compile_model

    cfg = config_from_args(args)
    out = compile_model(args.model_dir, args.out, cfg, progress=not args.no_progress, overwrite=args.overwrite,
                        dump_dir=args.dump_ir)
    report = json.loads((Path(out) / "report.json").read_text())
    bits = [r["bits"] for r in report["experts"]]
    hist = {b: bits.count(b) for b in sorted(set(bits))}
    print(f"wrote {out}  (target {cfg.target}, allocator {cfg.allocator}, experts by bits {hist}, "
          f"{report['compile_seconds']:.1f}s)")
    return 0
