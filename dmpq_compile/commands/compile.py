"""dmpq-compile [compile] MODEL --target ... --budget-bits ... [-o OUT]"""

from __future__ import annotations

import argparse
import json
import os
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


# The settings' flags are built from CompileConfig's fields (dmpq_compile/config.py: each field
# carries its help and, where not derived, its flag), so a new setting needs only its field. The
# flags below set more than one field, or a field's part, and are translated in config_from_args.


def default_budgets() -> str:
    """The registered targets' default ``--budget-bits``, e.g. ``4.5 on ort-cpu, 4.8 on trt-a100``."""
    from ..backends import available_backends

    found = [(n, cls.default_budget_bits) for n, cls, _ in available_backends()
             if getattr(cls, "default_budget_bits", None) is not None]
    return ", ".join(f"{v:g} on {n}" for n, v in found) or "none"


def _shown(value: object) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _argparse_type(parse):
    """``parse`` with its ``ValueError`` as argparse's usage error."""
    def convert(text: str):
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    convert.__name__ = getattr(parse, "__name__", "value")
    return convert


def dest(s) -> str:
    """The argparse ``dest`` of setting ``s`` (``qat.steps``; a top-level one by its name)."""
    return s.key


def add_setting_arguments(p: argparse.ArgumentParser, cls=None) -> None:
    """One flag per setting of ``cls`` (default CompileConfig) that has one, built from its field."""
    from ..config import CompileConfig, settings

    for s in settings(cls or CompileConfig):
        if s.flag is None:
            continue
        meta = s.field.metadata
        default = s.field.default
        text = meta.get("help") or ""
        text = text(default) if callable(text) else text.replace("{default}", _shown(default))
        kwargs = {"dest": dest(s), "help": text}
        if s.scalar is bool:
            kwargs.update(action="store_const", const=not default)
        else:
            parse = meta.get("parse") or (s.scalar if s.scalar in (int, float, str) else None)
            if parse is None:
                raise TypeError(f"setting {s.place} ({s.hint}) needs parse= in its setting() to have a flag")
            kwargs["type"] = parse if parse in (int, float, str) else _argparse_type(parse)
            choices = meta.get("choices")
            if choices is not None:
                kwargs["choices"] = choices() if callable(choices) else choices
            if meta.get("metavar") or "choices" not in kwargs:  # choices show themselves
                kwargs["metavar"] = meta.get("metavar") or s.flag.removeprefix("--").upper().replace("-", "_")
        p.add_argument(s.flag, **kwargs)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..extra_passes import DEFAULT_ANCHOR
    from ..pipeline import STEP_NAMES

    p.add_argument("model_dir", metavar="MODEL",
                   help="checkpoint folder (config.json + safetensors, single file or sharded; bf16/fp16/fp32) or a "
                   "hub id (owner/name) found in the local Hugging Face cache")
    p.add_argument("-o", "--out", help="artifact folder to create (default: ./NAME-TARGET, NAME being the "
                   "model folder's or hub id's last part)")
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
    p.add_argument("--nonexpert-bits", metavar="auto|N|KIND=N,...",
                   help="bit-width of the weights outside the routed experts: attention q/k/v/o, shared experts, "
                   "dense MLPs, an untied lm_head (ort-cpu: 2, 4, 8; trt-a100: 4, 8) and an untied embedding table "
                   "(ort-cpu only, 2, 4 or 8; else it stays float). 'auto': the allocator places them with the experts "
                   "by their measured sensitivity and stored bytes (needs --budget-bits and the optimal or uniform "
                   "allocator); auto,KIND=N fixes some kinds. N sets every kind; KIND=N (attention, shared_expert, "
                   "mlp, lm_head, embed) sets one, e.g. 4,lm_head=8 or attention=8,lm_head=8 (kinds not named stay "
                   "float). Routers and norms stay float. Default: auto without a budget flag (4 with an allocator "
                   "that cannot place them), else 16 (float)")
    p.add_argument("--rl-episodes", type=int, help="episodes for --allocator rl")
    add_setting_arguments(p)
    # -- extra passes: ordered --pass/--after pairs, typed by the pass's Options -----------------------
    p.add_argument("--pass", dest="extra_passes", action=_Ordered, metavar="NAME[:KEY=VALUE,...]",
                   help="insert a registered pass (repeatable); values are converted to its option types: "
                   "numbers, true/false, none, [a,b] for tuples. Replaces the --config file's extra_passes")
    p.add_argument("--after", dest="extra_passes", action=_Ordered, metavar="PASS",
                   help="where the preceding --pass runs: right after a step of the pipeline ("
                   f"{', '.join(n + (' (default)' if n == DEFAULT_ANCHOR else '') for n in STEP_NAMES)}) "
                   "or an earlier --pass")
    # -- end extra passes ---------------------------------------------------------------------------
    p.add_argument("--ray", metavar="ADDRESS",
                   help="run the per-layer sensitivity and quantization tasks on a Ray cluster: auto (the cluster "
                   "this machine belongs to), HOST:PORT or ray://HOST:PORT, or local:N (start N worker processes "
                   "here). Workers must see the checkpoint and -o at the same paths; the artifact is the same as "
                   "without --ray, and an interrupted compile resumes as without it (see --no-cache). Needs pip "
                   "install 'dmpq-compile[ray]'")
    p.add_argument("--config", help="TOML file with compile settings: top-level keys and one table per section, "
                   "e.g. [qat] steps = 300 (optionally all inside a [compile] table); flags given win. "
                   "docs/using.md lists them")
    p.add_argument("--dump-ir", help="save the IR after every pass into this folder")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument("--no-cache", action="store_true",
                   help="recompute profile and sensitivity instead of reusing the results of an earlier compile of "
                   "the same checkpoint, calibration and options (cached in $DMPQ_CACHE_DIR/passes, default "
                   "~/.cache/dmpq-compile/passes), and keep no partial state: without it, an interrupted compile "
                   "resumes the sensitivity and quantize passes at their first unfinished layer when rerun")


def config_from_args(args: argparse.Namespace, cls=None):
    """CompileConfig (or ``cls``) from its defaults, then the --config file, then the flags actually given."""
    from ..config import CompileConfig, settings

    cls = cls or CompileConfig
    cfg = cls.from_dict(_read_toml(args.config) if getattr(args, "config", None) else {})
    changes: dict = {}

    def put(section: str | None, name: str, value) -> None:
        (changes.setdefault(section, {}) if section else changes)[name] = value

    for s in settings(cls):
        value = getattr(args, dest(s), None) if s.flag else None
        if value is not None:
            put(s.section, s.name, value)
    budget = next(((kind, scale * v) for kind, scale, v in (
        ("bytes", 2**20, getattr(args, "budget_mb", None)), ("latency", 1, getattr(args, "budget_ms", None)),
        ("stored-bits", 1, getattr(args, "budget_bits", None)), ("bits", 1, getattr(args, "budget_code_bits", None)))
        if v is not None), None)
    if budget is not None:
        put("allocate", "budget_kind", budget[0])
        put("allocate", "budget", budget[1])
    if getattr(args, "nonexpert_bits", None) is not None:
        from ..passes.precision import parse_policy, split_auto

        allocate, policy = split_auto(args.nonexpert_bits)
        bits, kinds = parse_policy(policy)
        put("allocate", "nonexpert_allocate", allocate)
        put("allocate", "nonexpert_bits", bits)
        put("allocate", "nonexpert_kinds", kinds)
    if getattr(args, "rl_episodes", None):
        put("allocate", "allocator_options", {**cfg.allocate.allocator_options, "episodes": args.rl_episodes})
    if getattr(args, "extra_passes", None):
        changes["extra_passes"] = pass_insertions(args.extra_passes)
    return cfg.replace(**changes)


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
    if "compile" in data and len(data) > 1:
        raise ValueError(f"{path}: put every setting inside the [compile] table or none ([compile.qat], not [qat] "
                         f"beside [compile]); found {sorted(k for k in data if k != 'compile')} outside it")
    return dict(data.get("compile", data))


def default_out(model: str, target: str) -> Path:
    """``./NAME-TARGET`` for MODEL ``path/to/NAME`` or hub id ``owner/NAME``."""
    return Path(f"{Path(str(model).rstrip('/')).name}-{target}")


def main(args: argparse.Namespace) -> int:
    from ..compiler import compile_model
    from ..sysinfo import bound_onednn_cache, keep_freed_heap

    bound_onednn_cache()  # bf16 products' primitives: a bounded cache, not one per shape seen (docs/scaling.md)
    if os.environ.get("DMPQ_KEEP_FREED_HEAP") == "1":  # opt-in: no wall-clock gain at 16 OLMoE layers (docs/scaling.md)
        keep_freed_heap()  # freed tensors' pages reused, not mapped afresh (same values)
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
    dispatch = report["config"].get("emit", {}).get("dispatch")  # as the compile resolved it
    via = f", dispatch {dispatch}" if dispatch else ""
    if (Path(out) / "kernels").is_dir():  # the artifact carries dmpq's kernel library (docs/ort-cpu.md)
        via += " (Linux x86-64 only: --dispatch fused for any OS)"
    print(f"wrote {out}  (target {cfg.target}{via}, allocator {cfg.allocate.allocator}, experts by bits {hist}{stored}, "
          f"{report['compile_seconds']:.1f}s)")
    return 0
