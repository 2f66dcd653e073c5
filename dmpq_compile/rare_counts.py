"""Per-layer counts of the experts a calibration set rarely or never routed tokens to, from the
per-expert rows of a compile report (what ``dmpq-compile inspect`` and the report print;
standard library only, so that ``inspect`` runs without torch). The estimator that prices such
experts is :mod:`dmpq_compile.passes.sensitivity.rare_experts`."""

from __future__ import annotations

DEFAULT_MIN_TOKENS = 8


def rare_counts(rows: list[dict], min_tokens: int) -> dict[int, dict[str, int]]:
    """Per layer, from expert rows with the profile's ``tokens``: the experts with fewer than
    ``min_tokens`` routed calibration tokens (``rare``), those with none (``unrouted``) and those
    whose sensitivity was estimated (``estimated``). Layers without ``tokens`` are left out."""
    out: dict[int, dict[str, int]] = {}
    for r in rows:
        if "tokens" not in r:
            continue
        row = out.setdefault(int(r["layer"]), {"experts": 0, "rare": 0, "unrouted": 0, "estimated": 0})
        row["experts"] += 1
        row["rare"] += int(r["tokens"] < min_tokens)
        row["unrouted"] += int(r["tokens"] == 0)
        row["estimated"] += int(bool(r.get("sensitivity_estimated")))
    return dict(sorted(out.items()))


def format_counts(counts: dict[int, dict[str, int]], min_tokens: int) -> str:
    """``inspect``'s lines: per layer, rare / unrouted / estimated experts (only layers with any)."""
    total = {k: sum(c[k] for c in counts.values()) for k in ("rare", "unrouted", "estimated")}
    lines = [(f"experts with fewer than {min_tokens} routed calibration tokens: {total['rare']} "
              f"({total['unrouted']} never routed); sensitivity estimated from the weights (the sensitivity pass "
              f"saw too few of its tokens routed to them): {total['estimated']}")]
    for layer, c in counts.items():
        if c["rare"] or c["estimated"]:
            lines.append(f"  layer {layer}: {c['rare']} of {c['experts']} rare, {c['unrouted']} never routed, "
                         f"{c['estimated']} estimated")
    return "\n".join(lines)
