"""dmpq-compile [compile] MODEL --target ... --budget-bits ... [-o OUT]"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

HELP = "compile a Hugging Face MoE checkpoint into a mixed-precision artifact"
DESCRIPTION = """Lower MODEL (a checkpoint folder, or a Hugging Face hub id in the local cache; nothing is
downloaded) into the IR, run the passes (profile, [sensitivity], [cost], [precision], allocate,
[qat], quantize) and emit an artifact for --target. Exactly one budget may be
given. --budget-bits is the whole model's stored bits per weight (codes, scales, zero points and
every float tensor, over all parameters: how GGUF files are compared); without a budget the
compile uses the target's default --budget-bits (about llama.cpp's Q4_K_M or smaller) with the
non-expert weights placed by the allocator (--nonexpert-bits auto; 4 bits with an allocator that
cannot place them). The artifact folder is written atomically.

Registered passes (built-in or plugins, see `dmpq-compile passes`) can be inserted with
--pass NAME[:KEY=VALUE,...], each optionally followed by --after PASS (default: allocate); e.g.
--pass pin-bits:layers=[0],bits=8 --after allocate. After allocate the bits are checked after every
pass: a pass that breaks the budget or the bit-widths is an error naming it (see
--allow-budget-overrun). docs/extending.md has a worked plugin."""


# Flags whose dest is a CompileConfig field are copied onto it when given (argparse's default is
# None for all of them), so a new setting needs only its field and its flag; the flags below
# set more than one field, or a field's part, and are translated in config_from_args.
SPECIAL_DESTS = ("budget_bits", "budget_code_bits", "budget_mb", "budget_ms", "nonexpert_bits", "rl_episodes",
                 "extra_passes")
SET_BY_SPECIAL = ("budget", "budget_kind", "nonexpert_kinds", "nonexpert_allocate", "allocator_options")
CONFIG_ONLY = ("qat_lr", "sensitivity_sequences")  # settings of the --config file without a flag


def _bits(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(b) for b in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--bits takes comma-separated integers, e.g. 2,4,8; got {text!r}") from None


def default_budgets() -> str:
    """The registered targets' default ``--budget-bits``, e.g. ``4.5 on ort-cpu, 4.8 on trt-a100``."""
    from ..backends import available_backends

    found = [(n, cls.default_budget_bits) for n, cls, _ in available_backends()
             if getattr(cls, "default_budget_bits", None) is not None]
    return ", ".join(f"{v:g} on {n}" for n, v in found) or "none"


def allocator_help(default: str) -> str:
    """``--allocator``'s help, from the registered allocators' declared summaries (default first)."""
    from ..passes.allocate import allocators

    found = allocators()
    order = [default, *(n for n in found if n != default)]
    parts = [f"{n} ({'default: ' if n == default else ''}{found[n].summary})" for n in order]
    return "bit allocator: " + "; ".join(parts) + ". See docs/allocators.md"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..compiler import CompileConfig
    from ..extra_passes import DEFAULT_ANCHOR
    from ..passes.allocate import allocators
    from ..pipeline import STEP_NAMES

    d = CompileConfig()
    p.add_argument("model_dir", metavar="MODEL",
                   help="checkpoint folder (config.json + safetensors, single file or sharded; bf16/fp16/fp32) or a "
                   "hub id (owner/name) found in the local Hugging Face cache")
    p.add_argument("-o", "--out", help="artifact folder to create (default: ./NAME-TARGET, NAME being the "
                   "model folder's or hub id's last part)")
    p.add_argument("--target", help=f"backend: ort-cpu | trt-a100 (default {d.target})")
    p.add_argument("--allocator", choices=sorted(allocators()), help=allocator_help(d.allocator))
    b = p.add_mutually_exclusive_group()
    b.add_argument("--budget-bits", type=float,
                   help="stored bits per weight of the whole model: every weight as the target stores it (codes, "
                   "scales, zero points, float tensors) over every parameter; the compile stops early, naming the "
                   "smallest feasible value, when the weights outside the experts alone exceed it. Default, when "
                   f"no budget is given: {default_budgets()} with --nonexpert-bits auto (docs/defaults.md)")
    b.add_argument("--budget-code-bits", type=float,
                   help="average code bits per routed-expert weight, scales and the rest not counted")
    b.add_argument("--budget-mb", type=float, help="total expert weight megabytes (MiB)")
    b.add_argument("--budget-ms", type=float, help="expected expert decode latency per token, ms")
    for w in ("acc", "lat", "mem", "eng"):
        p.add_argument(f"--w-{w}", type=float, help=f"objective weight (default {getattr(d, 'w_' + w):g})")
    p.add_argument("--bits", type=_bits, help="comma-separated bit-widths to choose from (default: all the target supports)")
    p.add_argument("--group-size", type=int, help=f"quantization group size along K (default {d.group_size})")
    p.add_argument("--scale-dtype", choices=("float16", "float32"),
                   help="ort-cpu: how the scales of quantized weights are stored (default float16: 0.25 fewer bits "
                   "per weight at group 64, the quantized products run on float16 activations; float32: fp32 "
                   "activations, for models whose activations overflow float16's 65504)")
    p.add_argument("--max-length", type=int, metavar="N",
                   help="ort-cpu: positions (prompt + generated tokens) per sequence that onnxruntime-genai "
                   "preallocates its KV buffer for: search.max_length in genai_config.json (apps may lower it at "
                   "load). Default: the model's max_position_embeddings, at most 4096. The buffer takes "
                   "N x 8 x layers x kv_heads x head_dim bytes per sequence (inspect prints it)")
    p.add_argument("--dispatch", choices=("fused", "gather-if", "gather", "dense"),
                   help="ort-cpu: how tokens reach the experts. fused (default): one com.microsoft.QMoE per layer "
                   "and bit-width, 16-bit experts per expert; gather-if: each expert gathers its tokens inside an "
                   "If (2-bit experts prefill faster so on some CPUs); gather, dense: see docs/ort-cpu.md")
    p.add_argument("--nonexpert-bits", metavar="auto|N|KIND=N,...",
                   help="bit-width of the weights outside the routed experts: attention q/k/v/o, shared experts, "
                   "dense MLPs, an untied lm_head (ort-cpu: 2, 4, 8; trt-a100: 4, 8) and an untied embedding table "
                   "(ort-cpu only, 2, 4 or 8; else it stays float). 'auto': the allocator places them with the experts "
                   "by their measured sensitivity and stored bytes (needs --budget-bits and the optimal or uniform "
                   "allocator); auto,KIND=N fixes some kinds. N sets every kind; KIND=N (attention, shared_expert, "
                   "mlp, lm_head, embed) sets one, e.g. 4,lm_head=8 or attention=8,lm_head=8 (kinds not named stay "
                   "float). Routers and norms stay float. Default: auto without a budget flag (4 with an allocator "
                   f"that cannot place them), else {d.nonexpert_bits} (float)")
    p.add_argument("--quant-method", choices=("rtn", "hqq", "gptq"), help=f"rounding (default {d.quant_method})")
    p.add_argument("--calib-corpus",
                   help="calibration text: 'pydoc' (built-in; its calib split) or your own text file or folder "
                   f"of text files, read whole (default {d.calib_corpus})")
    p.add_argument("--calib-sequences", type=int, help=f"calibration sequences (default {d.calib_sequences})")
    p.add_argument("--seq-len", type=int, help=f"calibration sequence length (default {d.seq_len})")
    p.add_argument("--calib-dtype", choices=("auto", "float32", "bfloat16"),
                   help="dtype of the matrix products of the calibration runs (profile, sensitivity): auto "
                   "(default) is bfloat16 where the CPU multiplies it natively (AVX-512 BF16, AMX) and the "
                   "experts are stored in bf16, else float32; the changes it weights stay float32")
    p.add_argument("--metric", choices=("kl", "nll"),
                   help="accuracy model of optimal/rl: per-expert KL to FP (default) or NLL increase")
    p.add_argument("--no-sensitivity", dest="sensitivity", action="store_const", const=False,
                   help="skip the sensitivity pass when not needed")
    p.add_argument("--no-flip-probe", dest="flip_probe", action="store_const", const=False,
                   help="sensitivity without its routing-flip term: the layer-local estimate alone, as before it "
                   "existed (the probe costs about three forwards of the sensitivity sequences)")
    p.add_argument("--min-routed-tokens", type=int, metavar="N",
                   help=f"rare experts: the report and inspect count per layer the experts with fewer than N routed "
                   f"calibration tokens, and the sensitivity pass prices those it measured on fewer than N of its "
                   f"own tokens by --rare-sensitivity (default {d.min_routed_tokens})")
    p.add_argument("--rare-sensitivity", choices=("estimate", "measured"),
                   help="estimate (default): price a rare expert from its weights' quantization error and its layer's "
                   "measured experts (never below its measurement), so calibration that missed it does not send it "
                   "to the fewest bits; measured: take its measurement as it is (0 for an expert no token reached). "
                   "See passes/rare_experts.py")
    p.add_argument("--qat", action="store_const", const=True,
                   help="quantization-aware fine-tuning at the assigned bits, for RTN's grid (so with "
                   "--quant-method rtn, the default; GPTQ/HQQ would re-round the trained weights)")
    p.add_argument("--qat-steps", type=int, help=f"QAT optimizer steps (default {d.qat_steps})")
    p.add_argument("--qat-time-budget", dest="qat_time_budget_s", type=float,
                   help=f"QAT wall-time limit, s (default {d.qat_time_budget_s:g})")
    p.add_argument("--qat-mode", choices=("auto", "whole", "blockwise"),
                   help="whole: train the whole model at once (about 20 bytes per parameter in memory); blockwise: "
                   "distil one decoder layer at a time (one layer + one layer boundary's activations in memory; "
                   "--qat-steps per layer, the time budget shared); auto (default): whole when it fits in 80%% of "
                   "the available memory, else blockwise")
    p.add_argument("--codesign-rounds", type=int,
                   help="alternate allocation and QAT this many rounds before the final one (implies --qat)")
    p.add_argument("--rl-episodes", type=int, help="episodes for --allocator rl")
    # -- extra passes: ordered --pass/--after pairs, typed by the pass's Options -----------------------
    p.add_argument("--pass", dest="extra_passes", action=_Ordered, metavar="NAME[:KEY=VALUE,...]",
                   help="insert a registered pass (repeatable); values are converted to its option types: "
                   "numbers, true/false, none, [a,b] for tuples. Replaces the --config file's extra_passes")
    p.add_argument("--after", dest="extra_passes", action=_Ordered, metavar="PASS",
                   help="where the preceding --pass runs: right after a step of the pipeline ("
                   f"{', '.join(n + (' (default)' if n == DEFAULT_ANCHOR else '') for n in STEP_NAMES)}) "
                   "or an earlier --pass")
    p.add_argument("--allow-budget-overrun", action="store_const", const=True,
                   help="a pass after allocate that breaks the budget or the --bits choices only warns "
                   "(bits the target cannot emit are always an error)")
    # -- end extra passes ---------------------------------------------------------------------------
    p.add_argument("--ray", metavar="ADDRESS",
                   help="run the per-layer sensitivity and quantization tasks on a Ray cluster: auto (the cluster "
                   "this machine belongs to), HOST:PORT or ray://HOST:PORT, or local:N (start N worker processes "
                   "here). Workers must see the checkpoint and -o at the same paths; the artifact is the same as "
                   "without --ray. Needs pip install 'dmpq-compile[ray]'")
    p.add_argument("--config", help="TOML file with compile settings ([compile] table; flags given win)")
    p.add_argument("--dump-ir", help="save the IR after every pass into this folder")
    p.add_argument("--seed", type=int, help=f"random seed (default {d.seed})")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument("--no-cache", action="store_true",
                   help="recompute profile and sensitivity instead of reusing the results of an earlier compile of "
                   "the same checkpoint, calibration and options (cached in $DMPQ_CACHE_DIR/passes, default "
                   "~/.cache/dmpq-compile/passes)")


def config_from_args(args: argparse.Namespace):
    """CompileConfig from its defaults, then the --config file, then the flags actually given."""
    from ..compiler import CompileConfig

    data = _read_toml(args.config) if args.config else {}
    if args.budget_mb is not None:
        data.update(budget_kind="bytes", budget=args.budget_mb * 2**20)
    elif args.budget_ms is not None:
        data.update(budget_kind="latency", budget=args.budget_ms)
    elif args.budget_bits is not None:
        data.update(budget_kind="stored-bits", budget=args.budget_bits)
    elif args.budget_code_bits is not None:
        data.update(budget_kind="bits", budget=args.budget_code_bits)
    data.update({f.name: getattr(args, f.name) for f in dataclasses.fields(CompileConfig)
                 if f.name not in SPECIAL_DESTS and getattr(args, f.name, None) is not None})
    if args.nonexpert_bits is not None:
        from ..passes.precision import parse_policy, split_auto

        data["nonexpert_allocate"], policy = split_auto(args.nonexpert_bits)
        data["nonexpert_bits"], data["nonexpert_kinds"] = parse_policy(policy)
    if args.rl_episodes:
        data.setdefault("allocator_options", {})["episodes"] = args.rl_episodes
    if args.extra_passes:
        data["extra_passes"] = pass_insertions(args.extra_passes)
    return CompileConfig.from_dict(data)


# -- extra passes ---------------------------------------------------------------------------------
class _Ordered(argparse.Action):
    """Keeps --pass and --after in the order given, as (flag, value) pairs in one list."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, [*(getattr(namespace, self.dest) or []), (option_string, values)])


def pass_insertions(flags: list[tuple[str, str]]) -> list:
    """PassInsertions from the ordered ``(--pass|--after, value)`` pairs of the command line.

    Raises:
        ValueError: --after without a --pass before it, or twice for one --pass; and everything
            :func:`~dmpq_compile.extra_passes.parse_pass_spec` refuses.
    """
    from ..extra_passes import PassInsertion, parse_pass_spec

    out: list[PassInsertion] = []
    anchored: set[int] = set()
    for flag, value in flags:
        if flag == "--pass":
            name, options = parse_pass_spec(value)
            out.append(PassInsertion(name, options=options))
        elif not out:
            raise ValueError(f"--after {value}: give it after the --pass it places (--pass NAME --after {value})")
        elif len(out) - 1 in anchored:
            raise ValueError(f"--pass {out[-1].name} has two --after; give one --after per --pass")
        else:
            anchored.add(len(out) - 1)
            out[-1] = PassInsertion(out[-1].name, value, out[-1].options)
    return out
# -- end extra passes ----------------------------------------------------------------------------


def _read_toml(path: str) -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    with open(path, "rb") as f:
        data = tomllib.load(f)
    return dict(data.get("compile", data))


def default_out(model: str, target: str) -> Path:
    """``./NAME-TARGET`` for MODEL ``path/to/NAME`` or hub id ``owner/NAME``."""
    return Path(f"{Path(str(model).rstrip('/')).name}-{target}")


def main(args: argparse.Namespace) -> int:
    from ..compiler import compile_model

    cfg = config_from_args(args)
    out = args.out or default_out(args.model_dir, cfg.target)
    out = compile_model(args.model_dir, out, cfg, progress=not args.no_progress, overwrite=args.overwrite,
                        dump_dir=args.dump_ir, cache=not args.no_cache, ray=args.ray)
    report = json.loads((Path(out) / "report.json").read_text())
    bits = [r["bits"] for r in report["experts"]]
    hist = {b: bits.count(b) for b in sorted(set(bits))}
    storage = report.get("storage") or {}
    stored = f", {storage['bits_per_weight']:.2f} stored bits per weight" if storage.get("bits_per_weight") else ""
    if stored and storage.get("weights"):
        stored += f" ({storage['weights']['bits_per_weight']:.2f} in the weight tensors)"
    print(f"wrote {out}  (target {cfg.target}, allocator {cfg.allocator}, experts by bits {hist}{stored}, "
          f"{report['compile_seconds']:.1f}s)")
    return 0
