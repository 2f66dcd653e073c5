"""Registered passes (built-in or plugin) inserted into the compile pipeline at a named point.

An insertion names a registered pass, the pass it runs right after (its *anchor*: a pass of the
pipeline, ``profile`` ... ``quantize``, or another inserted pass) and its options. It is the
``extra_passes`` setting of :class:`~dmpq_compile.config.CompileConfig`, ``--pass`` / ``--after``
on the command line, and ``[[extra_passes]]`` tables in a ``--config`` file.

Rules: the pass and the anchor must exist; options are checked against the pass's ``Options``
dataclass (unknown keys and values of the wrong type are errors); text values from the command
line are converted to the option's type; passes anchored at the same pass run in the order given.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .passes import PASSES, PassError, make_pass
from .pipeline import ANALYSIS_STEPS, STEP_NAMES

ANALYSIS_ANCHORS = ANALYSIS_STEPS  # passes that run before the budget is known
DEFAULT_ANCHOR = "allocate"
_ANCHOR_HINTS = {"qat": "add --qat", "sensitivity": "drop --no-sensitivity",
                 "cost": "give a --target (the cost pass needs a backend)"}
_NAME = re.compile(r"[A-Za-z0-9_.-]+")
_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


@dataclass(frozen=True)
class PassInsertion:
    """Run registered pass ``name`` with ``options`` right after the pass named ``after``."""

    name: str
    after: str = DEFAULT_ANCHOR
    options: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def coerce(cls, entry: Any) -> PassInsertion:
        """From a PassInsertion, a ``{name, after, options}`` table, or a ``(name, options)`` pair."""
        if isinstance(entry, PassInsertion):
            return entry
        if isinstance(entry, Mapping):
            unknown = sorted(set(entry) - {"name", "after", "options"})
            if unknown or "name" not in entry:
                raise ValueError(f"extra_passes entry {dict(entry)}: give 'name' and optionally 'after' and "
                                 f"'options' (unknown keys {unknown})")
            return cls(entry["name"], entry.get("after", DEFAULT_ANCHOR), dict(entry.get("options") or {}))
        if isinstance(entry, Sequence) and not isinstance(entry, str) and len(entry) == 2:
            return cls(entry[0], DEFAULT_ANCHOR, dict(entry[1] or {}))
        raise ValueError(f"extra_passes entry {entry!r}: expected a table with name/after/options")


def check_insertions(entries: Iterable[Any]) -> tuple[PassInsertion, ...]:
    """Normalise entries (see :meth:`PassInsertion.coerce`) and check passes, anchors and options.

    Raises:
        ValueError: an unknown pass or anchor, or an option the pass does not have or of the wrong type.
    """
    given = tuple(PassInsertion.coerce(e) for e in entries)
    out = []
    for k, ins in enumerate(given):
        cls = _pass_class(ins.name)
        others = {o.name for j, o in enumerate(given) if j != k}
        if ins.after not in others and (ins.after == ins.name or ins.after not in _registered()):
            raise ValueError(f"--pass {ins.name} --after {ins.after}: no other pass is named {ins.after!r}; anchor "
                             f"it after a pipeline pass ({', '.join(STEP_NAMES)}) "
                             "or another --pass")
        try:
            typed = {key: check_value(cls, key, v) for key, v in ins.options.items()}
            make_pass(ins.name, **typed)  # the pass's own checks of its options
        except (PassError, TypeError, ValueError) as e:
            raise ValueError(f"--pass {ins.name}: {e}; `dmpq-compile passes` lists its options") from None
        out.append(dataclasses.replace(ins, options=typed))
    _roots(out)  # refuses anchor cycles
    return tuple(out)


def parse_pass_spec(text: str) -> tuple[str, dict[str, Any]]:
    """``NAME[:KEY=VALUE,...]`` -> ``(name, options)``; values are converted to the option types.

    A tuple value is written in brackets (``layers=[0,1]``), None as ``none``, booleans as
    ``true``/``false``.
    """
    name, _, rest = text.partition(":")
    if not _NAME.fullmatch(name):
        raise ValueError(f"--pass {text!r}: expected NAME[:KEY=VALUE,...] with a pass name of letters, digits, "
                         "'-', '_' or '.'")
    cls = _pass_class(name)
    options: dict[str, Any] = {}
    for item in _split_top(rest) if rest.strip() else []:
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or not key:
            raise ValueError(f"--pass {text!r}: {item!r} is not KEY=VALUE")
        if key in options:
            raise ValueError(f"--pass {text!r}: option {key!r} is given twice")
        try:
            options[key] = check_value(cls, key, value.strip(), from_text=True)
        except ValueError as e:
            raise ValueError(f"--pass {text!r}: {e}; `dmpq-compile passes` lists its options") from None
    return name, options


def place_passes(base: list, insertions: Sequence[PassInsertion], analysis: bool,
                 optional: Iterable[str] = ()) -> list:
    """``base`` with the insertions of its stage placed right after their anchors.

    Args:
        base: the stage's built-in pass objects in order.
        insertions: all insertions of the compile (checked by :func:`check_insertions`).
        analysis: the stage is the analysis stage (profile, sensitivity, cost); insertions belong
            to it when their anchor chain starts at one of :data:`ANALYSIS_ANCHORS`.
        optional: anchors that may be absent here (quantize in a co-design round): their
            insertions are left out instead of refused.

    Raises:
        ValueError: an insertion's anchor chain starts at a pass this pipeline does not run.
    """
    roots = _roots(insertions)
    mine = [(ins, root) for ins, root in zip(insertions, roots) if (root in ANALYSIS_ANCHORS) == analysis]
    placed: set[int] = set()
    out: list = []

    def add(p) -> None:
        out.append(p)
        for k, (ins, _) in enumerate(mine):
            if k not in placed and ins.after == p.name:
                placed.add(k)
                add(make_pass(ins.name, **ins.options))

    for p in base:
        add(p)
    for k, (ins, root) in enumerate(mine):
        if k not in placed and root not in optional:
            hint = _ANCHOR_HINTS.get(root, "choose a pass it runs")
            raise ValueError(f"--pass {ins.name} --after {ins.after}: this compile does not run {root!r} "
                             f"(its {'analysis' if analysis else 'allocation'} passes: "
                             f"{', '.join(p.name for p in base)}); {hint}")
    return out


def check_value(pass_cls: type, key: str, value: Any, from_text: bool = False) -> Any:
    """``value`` of option ``key`` of ``pass_cls``, converted (text) or checked against the option's type."""
    hints = _option_types(pass_cls)
    if key not in hints:
        raise ValueError(f"pass {pass_cls.name!r} has no option {key!r}; its options: "
                         f"{', '.join(sorted(hints)) or 'none'}")
    try:
        return _convert(hints[key], value, from_text)
    except (TypeError, ValueError) as e:
        raise ValueError(f"pass {pass_cls.name!r} option {key}={value!r}: expected {_type_name(hints[key])} "
                         f"({e})") from None


# -- helpers -------------------------------------------------------------------------------------
def _registered() -> set[str]:
    return {name for name, _, _ in PASSES.items()}


def _pass_class(name: str) -> type:
    try:
        return PASSES.get(name)
    except KeyError as e:
        raise ValueError(f"--pass {name}: {e.args[0]}; install the plugin that provides it "
                         "(`dmpq-compile passes` lists what is registered)") from None


def _roots(insertions: Sequence[PassInsertion]) -> list[str]:
    """Per insertion, the first pipeline pass of its anchor chain; refuses cycles.

    An anchor naming an inserted pass refers to the nearest earlier insertion of that name (so
    ``--pass a --pass a --after a`` runs the second right after the first), else to a later one.
    """
    def anchor(k: int) -> int | None:
        same = [j for j, o in enumerate(insertions) if o.name == insertions[k].after and j != k]
        earlier = [j for j in same if j < k]
        return earlier[-1] if earlier else same[0] if same else None

    roots = []
    for k in range(len(insertions)):
        seen, cur = [k], anchor(k)
        while cur is not None:
            if cur in seen:
                chain = " -> ".join(f"{insertions[j].name} (after {insertions[j].after})" for j in seen)
                raise ValueError(f"--pass anchors form a cycle: {chain}")
            seen.append(cur)
            cur = anchor(cur)
        roots.append(insertions[seen[-1]].after)
    return roots


def _option_types(pass_cls: type) -> dict[str, Any]:
    opts = pass_cls.Options
    try:
        hints = typing.get_type_hints(opts)
    except (NameError, TypeError, AttributeError) as e:  # a plugin's annotations may name unimported types
        raise ValueError(f"cannot read the option types of pass {pass_cls.name!r} ({opts.__name__}): "
                         f"{type(e).__name__}: {e}") from None
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(opts)}


def _split_top(text: str) -> list[str]:
    """Split at commas outside brackets."""
    parts, depth, cur = [], 0, []
    for ch in text:
        depth += (ch == "[") - (ch == "]")
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return parts


def _convert(tp: Any, value: Any, text: bool) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and (value is None or (text and str(value).lower() == "none")):
            return None
        errors = []
        for arm in (a for a in args if a is not type(None)):
            try:
                return _convert(arm, value, text)
            except (TypeError, ValueError) as e:
                errors.append(str(e))
        raise ValueError("; ".join(errors))
    if origin is typing.Literal:
        if value not in args:
            raise ValueError(f"one of {list(args)}")
        return value
    if origin in (tuple, list) or tp in (tuple, list):
        items = _split_top(value.strip()[1:-1]) if text and value.strip().startswith("[") else \
            ([value] if text else value)
        if text and items == [""]:
            items = []
        if not isinstance(items, (list, tuple)):
            raise TypeError(f"got {type(value).__name__}")
        elem = args[0] if args else Any
        return (tuple if (origin or tp) is tuple else list)(_convert(elem, v.strip() if text else v, text)
                                                             for v in items)
    if tp is bool:
        if text and value.lower() in _TRUE + _FALSE:
            return value.lower() in _TRUE
        if not text and isinstance(value, bool):
            return value
        raise ValueError("true or false")
    if tp in (int, float):
        if text:
            number = tp(value)
        elif isinstance(value, bool) or not isinstance(value, (int, float)) or (tp is int and isinstance(value, float)):
            raise TypeError(f"got {type(value).__name__}")
        else:
            number = tp(value)
        if tp is float and not math.isfinite(number):
            raise ValueError("a finite number")
        return number
    if tp is str:
        if not isinstance(value, str):
            raise TypeError(f"got {type(value).__name__}")
        return value
    if text:
        raise ValueError("a value that cannot be written on the command line: set it in a --config TOML file "
                         "([[extra_passes]] options)")
    check = origin or tp
    if isinstance(check, type) and not isinstance(value, check):
        raise TypeError(f"got {type(value).__name__}")
    return value


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) if typing.get_origin(tp) is None and tp is not Any else str(tp)
