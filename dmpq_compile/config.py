"""What decides a compile: :class:`CompileConfig`, one frozen section per concern.

Every setting is declared once, as a field of its section made with :func:`setting`: its
default, its help and, where the command-line flag is not derived from the field, its flag.
The command line (``commands/compile.py``), the ``--config`` TOML file and the pipeline's pass
options (``pipeline.py``, which forwards a section's fields to the pass options of the same
name) are all built from the fields, so a new setting is a new field and nothing else:

* TOML key: the section's table and the field's name, e.g. ``[qat] steps = 300``; top-level
  settings (``target``, ``seed``, ...) are plain keys. A ``[compile]`` table may wrap all of it
  (``[compile.qat]``).
* Flag: ``metadata["flag"]`` where given, else ``--SECTION-FIELD`` (``--FIELD`` at the top
  level), underscores as hyphens; a bool that defaults to true gets ``--no-...``. A field set by
  other flags (the budget flags set ``budget`` and ``budget_kind``) names them in ``set_by``.

A key of the flat layout this replaced (``qat_steps = 300`` at the top level) is an error that
names its new place (``[qat] steps``); unknown keys are errors too.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable, Iterator, Mapping
from dataclasses import MISSING, dataclass, field
from typing import Any

from .extra_passes import PassInsertion, check_insertions
from .ir.graph import NONEXPERT_QUANTIZABLE_KINDS
from .ir.interpreter import COMPUTE_DTYPES, check_compute_dtype
from .passes.allocate.base import DEFAULT_ALLOCATOR
from .passes.precision import check_kinds, check_nonexpert_bits
from .passes.qat import MODES as QAT_MODES
from .passes.quantize import METHODS as QUANT_METHODS
from .passes.sensitivity.rare_experts import MODES as RARE_MODES
from .quant.spec import DEFAULT_GROUP_SIZE


def setting(default: Any = MISSING, help: str | Callable[[Any], str] = "", *, factory: Callable[[], Any] | None = None,
            flag: str | None = None, set_by: str | None = None, choices: tuple | Callable[[], tuple] | None = None,
            metavar: str | None = None, parse: Callable[[str], Any] | None = None) -> Any:
    """A compile setting: a dataclass field carrying what the command line needs.

    Args:
        default: The default value (``factory`` for a mutable one).
        help: The flag's help; ``{default}`` is replaced by the default. A callable gets the
            default and returns the text (for help built from a registry).
        flag: The flag, where it is not the derived ``--SECTION-FIELD``.
        set_by: For a field without a flag of its own: the flags that set it.
        choices: The flag's choices (a callable: computed when the parser is built).
        metavar: The flag's metavar.
        parse: Converts the flag's text (default: the field's type, for int, float and str).
    """
    meta = {"help": help, "flag": flag, "set_by": set_by, "choices": choices, "metavar": metavar, "parse": parse}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def parse_bits(text: str) -> tuple[int, ...]:
    """``--bits 2,4,8`` as a tuple."""
    try:
        return tuple(int(b) for b in text.split(","))
    except ValueError:
        raise ValueError(f"--bits takes comma-separated integers, e.g. 2,4,8; got {text!r}") from None


def allocator_help(default: str) -> str:
    """``--allocator``'s help, from the registered allocators' declared summaries (default first)."""
    from .passes.allocate import allocators

    found = allocators()
    order = [default, *(n for n in found if n != default)]
    parts = [f"{n} ({'default: ' if n == default else ''}{found[n].summary})" for n in order]
    return "bit allocator: " + "; ".join(parts) + ". See docs/allocators.md"


def allocator_names() -> tuple[str, ...]:
    from .passes.allocate import allocators

    return tuple(sorted(allocators()))


@dataclass(frozen=True)
class CalibrationConfig:
    """``[calibration]``: the token sequences the analysis passes (and GPTQ, QAT) run on."""

    corpus: str = setting("pydoc", "calibration text: 'pydoc' (built-in; its calib split) or your own text file or "
                          "folder of text files, read whole (default {default})", flag="--calib-corpus")
    sequences: int = setting(32, "calibration sequences (default {default})", flag="--calib-sequences")
    seq_len: int = setting(128, "calibration sequence length (default {default})", flag="--seq-len")
    dtype: str = setting("auto", "dtype of the matrix products of the calibration runs (profile, sensitivity): auto "
                         "(default) is bfloat16 where the experts are stored in bf16 and a product timed at their "
                         "widths runs at least 1.3x faster in bf16 than in float32 on this CPU, else float32; "
                         "the changes they weight stay float32",
                         flag="--calib-dtype", choices=COMPUTE_DTYPES)

    def __post_init__(self) -> None:
        for name in ("sequences", "seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"[calibration] {name} must be >= 1, got {getattr(self, name)}")
        check_compute_dtype(self.dtype, "[calibration] dtype")


@dataclass(frozen=True)
class SensitivityConfig:
    """``[sensitivity]``: the per-expert (and non-expert) sensitivity measurement."""

    enabled: bool = setting(True, "skip the sensitivity pass when not needed", flag="--no-sensitivity")
    sequences: int = setting(16, "calibration sequences the sensitivity pass measures on, the first ones of the "
                             "calibration: at most --calib-sequences (default {default})")
    flip_probe: bool = setting(True, "sensitivity without its routing-flip term: the layer-local estimate alone, as "
                               "before it existed (the probe costs about one forward of the sensitivity sequences)",
                               flag="--no-flip-probe")
    min_routed_tokens: int = setting(
        8, "rare experts: the report and inspect count per layer the experts with fewer than N routed calibration "
        "tokens, and the sensitivity pass prices those it measured on fewer than N of its own tokens by "
        "--rare-sensitivity (default {default})", flag="--min-routed-tokens", metavar="N")
    rare: str = setting("estimate", "estimate (default): price a rare expert from its weights' quantization error "
                        "and its layer's measured experts (never below its measurement), so calibration that missed "
                        "it does not send it to the fewest bits; measured: take its measurement as it is (0 for an "
                        "expert no token reached). See passes/sensitivity/rare_experts.py",
                        flag="--rare-sensitivity", choices=RARE_MODES)

    def __post_init__(self) -> None:
        if self.min_routed_tokens < 0:
            raise ValueError(f"--min-routed-tokens must be >= 0, got {self.min_routed_tokens}")
        if self.rare not in RARE_MODES:
            raise ValueError(f"--rare-sensitivity must be one of {RARE_MODES}, got {self.rare!r}")
        if self.sequences < 1:
            raise ValueError(f"[sensitivity] sequences must be >= 1, got {self.sequences}")


@dataclass(frozen=True)
class AllocateConfig:
    """``[allocate]``: the allocator, its budget and objective, and the non-expert weights' bits."""

    allocator: str = setting(DEFAULT_ALLOCATOR, allocator_help, flag="--allocator", choices=allocator_names)
    # bits (experts' code bits) | stored-bits (whole model) | bytes | latency; None: "bits" when a
    # budget is given, else the target's default budget (resolve_defaults)
    budget_kind: str | None = setting(None, set_by="--budget-bits, --budget-code-bits, --budget-mb, --budget-ms")
    budget: float | None = setting(None, set_by="--budget-bits, --budget-code-bits, --budget-mb, --budget-ms")
    w_acc: float = setting(1.0, "objective weight (default {default})", flag="--w-acc")
    w_lat: float = setting(0.0, "objective weight (default {default})", flag="--w-lat")
    w_mem: float = setting(0.0, "objective weight (default {default})", flag="--w-mem")
    w_eng: float = setting(0.0, "objective weight (default {default})", flag="--w-eng")
    bits: tuple[int, ...] | None = setting(None, "comma-separated bit-widths to choose from (default: all the target "
                                           "supports)", flag="--bits", parse=parse_bits)
    metric: str = setting("kl", "accuracy model of optimal/rl: per-expert KL to FP (default) or NLL increase",
                          flag="--metric", choices=("kl", "nll"))
    allocator_options: dict[str, Any] = setting(factory=dict, set_by="--rl-episodes (episodes)")
    # attention, shared experts, dense MLPs, lm_head (passes/precision.py); 16 = float
    nonexpert_bits: int = setting(16, set_by="--nonexpert-bits")
    nonexpert_kinds: dict[str, int] = setting(factory=dict, set_by="--nonexpert-bits")  # per-kind bits
    # --nonexpert-bits auto: the kinds not in nonexpert_kinds are allocated; None: under the default
    # budget when the allocator can place them, else not (resolve_defaults)
    nonexpert_allocate: bool | None = setting(None, set_by="--nonexpert-bits")

    def __post_init__(self) -> None:
        check_nonexpert_bits(self.nonexpert_bits)
        check_kinds(self.nonexpert_kinds)
        if self.nonexpert_allocate and self.nonexpert_bits != 16:
            raise ValueError("nonexpert_allocate places the non-expert weights; nonexpert_bits must stay 16 (give "
                             "fixed kinds in nonexpert_kinds, e.g. --nonexpert-bits auto,lm_head=8)")

    @property
    def allocated_kinds(self) -> tuple[str, ...]:
        """The non-expert kinds the allocator places with the experts (``--nonexpert-bits auto``)."""
        if not self.nonexpert_allocate:
            return ()
        return tuple(k for k in NONEXPERT_QUANTIZABLE_KINDS if k not in self.nonexpert_kinds)

    @property
    def weights_cost(self) -> bool:
        """Whether the objective weighs latency, memory or energy (not accuracy alone)."""
        return max(self.w_lat, self.w_mem, self.w_eng) > 0


@dataclass(frozen=True)
class QuantizeConfig:
    """``[quantize]``: how the chosen bits are rounded and stored."""

    method: str = setting("rtn", "rounding (default {default})", flag="--quant-method", choices=QUANT_METHODS)
    group_size: int = setting(DEFAULT_GROUP_SIZE, "quantization group size along K (default {default}; 128 decodes faster "
                              "on ort-cpu but had about 1.25x the KL to the float model at the same stored-bits budget "
                              "on the samples, docs/defaults.md)", flag="--group-size")
    scale_dtype: str | None = setting(
        None, "ort-cpu: how the scales of quantized weights are stored (default float16: 0.25 fewer bits per weight "
        "at group 64, the quantized products run on float16 activations; float32: fp32 activations, for models whose "
        "activations overflow float16's 65504)", flag="--scale-dtype", choices=("float16", "float32"))

    def __post_init__(self) -> None:
        if self.group_size < 1:
            raise ValueError(f"--group-size must be >= 1, got {self.group_size}")


@dataclass(frozen=True)
class QATConfig:
    """``[qat]``: quantization-aware fine-tuning at the assigned bits, and co-design rounds."""

    enabled: bool = setting(False, "quantization-aware fine-tuning at the assigned bits, for RTN's grid (so with "
                            "--quant-method rtn, the default; GPTQ/HQQ would re-round the trained weights)", flag="--qat")
    steps: int = setting(200, "QAT optimizer steps (default {default})")
    time_budget_s: float = setting(600.0, "QAT wall-time limit, s (default {default})", flag="--qat-time-budget")
    lr: float = setting(1e-4, "QAT peak AdamW learning rate (default {default})")
    mode: str = setting("auto", "whole: train the whole model at once (about 20 bytes per parameter in memory); "
                        "blockwise: distil one decoder layer at a time (one layer + one layer boundary's activations in "
                        "memory; --qat-steps per layer, the time budget shared); auto (default): whole when it fits in "
                        "80%% of the available memory, else blockwise", choices=QAT_MODES)
    codesign_rounds: int = setting(0, "alternate allocation and QAT this many rounds before the final one (implies "
                                   "--qat)", flag="--codesign-rounds")

    def __post_init__(self) -> None:
        if self.mode not in QAT_MODES:
            raise ValueError(f"--qat-mode must be one of {QAT_MODES}, got {self.mode!r}")
        if self.codesign_rounds < 0:
            raise ValueError(f"--codesign-rounds must be >= 0, got {self.codesign_rounds}")

    @property
    def runs(self) -> bool:
        """Whether the qat pass runs (``--qat``, or co-design rounds, which imply it)."""
        return bool(self.enabled or self.codesign_rounds)


@dataclass(frozen=True)
class EmitConfig:
    """``[emit]``: target-specific choices of the emitted artifact (ort-cpu)."""

    dispatch: str | None = setting(
        None, "ort-cpu: how tokens reach the experts. auto (default): kernel where some expert fits it (float16 "
        "scales, a group size that is a multiple of 64 dividing the widths), dmpq's kernel library builds here and "
        "the CPU has AVX2 or AVX-512, else fused (logged); kernel: one node per layer for all its "
        "2/4/8-bit experts, and attention's and the LM head's quantized projections, on dmpq's own onnxruntime "
        "kernels (C++, built here with g++ and copied into the artifact: it runs on Linux x86-64); fused: one "
        "com.microsoft.QMoE per layer and bit-width, 16-bit experts per expert (stock onnxruntime ops: runs "
        "anywhere onnxruntime does); gather-if: each expert gathers its tokens inside an If; gather, dense: see "
        "docs/ort-cpu.md", flag="--dispatch",
        choices=("auto", "fused", "kernel", "gather-if", "gather", "dense"))
    max_length: int | None = setting(
        None, "ort-cpu: positions (prompt + generated tokens) per sequence that onnxruntime-genai preallocates its KV "
        "buffer for: search.max_length in genai_config.json (apps may lower it at load). Default: the model's "
        "max_position_embeddings, at most 4096. The buffer takes N x 8 x layers x kv_heads x head_dim bytes per "
        "sequence (inspect prints it)", flag="--max-length", metavar="N")

    def options(self) -> dict[str, Any]:
        """The backend's emit options that were given (what ``write_artifact`` takes)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) is not None}


@dataclass(frozen=True)
class CompileConfig:
    """Everything that decides what ``compile`` produces (typed, closed: unknown keys are errors).

    Build one with keyword sections (``CompileConfig(target="trt-a100",
    allocate=AllocateConfig(budget=3.0))``), from nested dicts (:meth:`from_dict`, what the TOML
    file gives) or from another with :meth:`replace`.
    """

    target: str | None = setting("ort-cpu", "backend: ort-cpu | trt-a100 (default {default})")
    seed: int = setting(0, "random seed (default {default})")
    allow_budget_overrun: bool = setting(False, "a pass after allocate that breaks the budget or the --bits choices "
                                         "only warns (bits the target cannot emit are always an error)")
    # registered passes run after a named pass (extra_passes.py)
    extra_passes: tuple[PassInsertion, ...] = setting((), set_by="--pass, --after")
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    sensitivity: SensitivityConfig = field(default_factory=SensitivityConfig)
    allocate: AllocateConfig = field(default_factory=AllocateConfig)
    quantize: QuantizeConfig = field(default_factory=QuantizeConfig)
    qat: QATConfig = field(default_factory=QATConfig)
    emit: EmitConfig = field(default_factory=EmitConfig)

    def __post_init__(self) -> None:
        object.__setattr__(self, "extra_passes", check_insertions(self.extra_passes))
        for name, cls in sections(type(self)).items():
            if not isinstance(getattr(self, name), cls):
                raise TypeError(f"CompileConfig.{name} must be a {cls.__name__}, got {type(getattr(self, name)).__name__}"
                                f"; build it from a dict with CompileConfig.from_dict({{{name!r}: {{...}}}})")
        method = self.quantize.method
        if self.qat.runs and method != "rtn":
            raise ValueError(f"--qat trains the weights for RTN's rounding grid and --quant-method {method} "
                             "re-rounds them afterwards, which undoes most of it: QAT + GPTQ had 1.6-3.1x the KL of "
                             "QAT + RTN in all five measured cases (benchmarks/README.md, 'Rounding and QAT'); use "
                             "--quant-method rtn with --qat, or drop --qat")
        if self.quantize.scale_dtype is not None and self.target != "ort-cpu":
            raise ValueError(f"--scale-dtype chooses how ort-cpu stores its scales; target {self.target!r} has its own "
                             "format (trt-a100: float16 scales); drop --scale-dtype")
        if self.emit.dispatch is not None and self.target != "ort-cpu":
            raise ValueError(f"--dispatch chooses ort-cpu's expert dispatch; target {self.target!r} has its own; "
                             "drop --dispatch")
        if self.emit.max_length is not None and self.target != "ort-cpu":
            raise ValueError(f"--max-length sets the KV buffer of ort-cpu's onnxruntime-genai config; target "
                             f"{self.target!r} has none; drop --max-length")

    @property
    def resolved(self) -> bool:
        """Whether the budget and the non-expert placement are concrete (see ``compiler.resolve_defaults``)."""
        a = self.allocate
        return None not in (a.budget_kind, a.budget, a.nonexpert_allocate)

    def replace(self, **changes: Any) -> CompileConfig:
        """A copy with ``changes``: top-level settings by name, a section as a section or as a dict
        of the fields to change in it (``cfg.replace(allocate={"budget": 3.0})``). Checked like
        :meth:`from_dict`."""
        return _merge(self, changes)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CompileConfig:
        """The defaults with ``data`` (nested: ``{"target": ..., "qat": {"steps": 300}}``, as the
        TOML file gives it) on top.

        Raises:
            ValueError: An unknown key (naming the valid ones), a key of the flat layout (naming
                its new place), or a value of the wrong type.
        """
        return _merge(cls(), data)

    def to_dict(self) -> dict[str, Any]:
        """The nested dict :meth:`from_dict` reads back (what ``report.json`` stores)."""
        return dataclasses.asdict(self)


# -- the settings as data: what the command line and the TOML reader are built from ------------------
@dataclass(frozen=True)
class Setting:
    """One field of a section (``section`` None: a top-level field of the config)."""

    section: str | None
    field: dataclasses.Field
    hint: Any  # the field's type, resolved

    @property
    def name(self) -> str:
        return self.field.name

    @property
    def key(self) -> str:
        """Where a TOML file sets it: ``qat.steps`` (``[qat] steps``) or ``seed``."""
        return f"{self.section}.{self.name}" if self.section else self.name

    @property
    def place(self) -> str:
        """The key as a TOML file spells it, for messages: ``[qat] steps``."""
        return f"[{self.section}] {self.name}" if self.section else self.name

    @property
    def set_by(self) -> str | None:
        return self.field.metadata.get("set_by")

    @property
    def flag(self) -> str | None:
        """The command-line flag (None where other flags set the field: :attr:`set_by`)."""
        if self.set_by:
            return None
        given = self.field.metadata.get("flag")
        if given:
            return given
        stem = f"{self.section}-{self.name}" if self.section else self.name
        negated = self.scalar is bool and self.field.default is True
        return "--" + ("no-" if negated else "") + stem.replace("_", "-")

    @property
    def scalar(self) -> Any:
        """The field's type without ``None`` (``int | None`` -> ``int``)."""
        args = [a for a in typing.get_args(self.hint) if a is not type(None)]
        is_union = typing.get_origin(self.hint) in (typing.Union, types.UnionType)
        return args[0] if is_union and len(args) == 1 else self.hint

    def flat_names(self) -> set[str]:
        """The names this setting had as a key of the flat layout (for the error that redirects them)."""
        names = {self.name, f"{self.section}_{self.name}"} if self.section else set()
        flag = self.field.metadata.get("flag")
        if flag:  # --calib-corpus was calib_corpus, --no-sensitivity was sensitivity
            names.add(flag.removeprefix("--").removeprefix("no-").replace("-", "_"))
        return names


def sections(cls: type = CompileConfig) -> dict[str, type]:
    """The config's section names and their dataclasses, in declaration order."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if dataclasses.is_dataclass(hints[f.name])}


def settings(cls: type = CompileConfig) -> Iterator[Setting]:
    """Every setting of ``cls``: the top-level fields, then each section's fields."""
    hints = typing.get_type_hints(cls)
    nested = sections(cls)
    for f in dataclasses.fields(cls):
        if f.name not in nested:
            yield Setting(None, f, hints[f.name])
    for name, section in nested.items():
        inner = typing.get_type_hints(section)
        for f in dataclasses.fields(section):
            yield Setting(name, f, inner[f.name])


def _check_type(s: Setting, value: Any) -> Any:
    """``value`` for setting ``s`` (lists as tuples where the type is a tuple), or ``ValueError``."""
    hint, scalar = s.hint, s.scalar
    if value is None:
        if type(None) in typing.get_args(hint):
            return value
        raise ValueError(f"{s.place} cannot be empty")
    origin = typing.get_origin(scalar)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{s.place} takes a list, got {value!r}")
        return tuple(value)
    if origin is dict or scalar is dict:
        if not isinstance(value, Mapping):
            raise ValueError(f"{s.place} takes a table, got {value!r}")
        return dict(value)
    ok = {bool: lambda v: isinstance(v, bool),
          int: lambda v: isinstance(v, int) and not isinstance(v, bool),
          float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
          str: lambda v: isinstance(v, str)}.get(scalar)
    if ok is not None and not ok(value):
        raise ValueError(f"{s.place} takes {getattr(scalar, '__name__', scalar)}, got {value!r}")
    return value


def _merge(cfg: CompileConfig, data: Mapping[str, Any]) -> CompileConfig:
    cls = type(cfg)
    nested = sections(cls)
    by_key = {s.key: s for s in settings(cls)}
    moved: dict[str, list[Setting]] = {}
    for s in by_key.values():
        if s.section:
            for old in s.flat_names():
                moved.setdefault(old, []).append(s)

    def refuse(key: str) -> ValueError:
        if key in moved:
            places = " or ".join(s.place for s in moved[key])
            return ValueError(f"compile setting {key!r} has moved: write it as {places} (settings are grouped by "
                              f"section, e.g. [qat] steps = 300; see docs/using.md)")
        top = sorted(s.name for s in by_key.values() if not s.section)
        return ValueError(f"unknown compile setting {key!r}; top-level settings: {top}; sections: "
                          f"{[f'[{n}]' for n in nested]}")

    top: dict[str, Any] = {}
    for key, value in data.items():
        if key in nested:
            section = nested[key]
            if isinstance(value, section):
                top[key] = value
                continue
            if not isinstance(value, Mapping):
                raise refuse(key) if key in moved else ValueError(f"[{key}] must be a table, got {value!r}")
            changes = {}
            for name, v in value.items():
                s = by_key.get(f"{key}.{name}")
                if s is None:
                    valid = sorted(f.name for f in dataclasses.fields(section))
                    raise ValueError(f"unknown setting {name!r} in [{key}]; valid: {valid}")
                changes[name] = _check_type(s, v)
            top[key] = dataclasses.replace(getattr(cfg, key), **changes)
        elif key in by_key:
            top[key] = _check_type(by_key[key], value)
        else:
            raise refuse(key)
    return dataclasses.replace(cfg, **top)
