"""dmpq-compile inspect PATH: the per-expert table of an artifact or a saved IR folder."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HELP = "print the per-expert table (layer, expert, freq, sensitivity, bits) of an artifact or IR"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", metavar="PATH", help="artifact folder (report.json) or saved IR folder (graph.json)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def load_rows(path: Path) -> list[dict]:
    """Per-expert rows of an artifact (its compile report, else its manifest's bits) or an IR folder."""
    if (path / "report.json").is_file():
        report = json.loads((path / "report.json").read_text())
        if "experts" in report:
            return report["experts"]
        if (path / "manifest.json").is_file():  # written without a compile report: bits only
            experts = json.loads((path / "manifest.json").read_text()).get("experts", {})
            return [{"id": k, "layer": v["layer"], "expert": v["expert"], "bits": v["bits"]} for k, v in experts.items()]
        raise ValueError(f"{path / 'report.json'} has no per-expert table and {path} no manifest.json; "
                         "re-create the artifact with `dmpq-compile compile`")
    if (path / "graph.json").is_file():
        from ..compiler import expert_table
        from ..ir import load_graph

        return expert_table(load_graph(path))
    raise FileNotFoundError(f"{path} has neither report.json (artifact) nor graph.json (IR folder)")


def format_table(rows: list[dict]) -> str:
    sens_bits = sorted({int(b) for r in rows for b in r.get("sensitivity", {}) if int(b) < 16})
    head = ["layer", "expert", "freq", "mass"] + [f"dNLL@{b}" for b in sens_bits] + ["bits"]
    lines = ["  ".join(f"{h:>9}" for h in head)]
    for r in rows:
        sens = {int(b): v for b, v in r.get("sensitivity", {}).items()}
        cells = [f"{r['layer']:>9d}", f"{r['expert']:>9d}", _num(r.get("freq")), _num(r.get("mass"))]
        cells += [_num(sens.get(b), ".2e") for b in sens_bits]
        cells.append(f"{r.get('bits', '-'):>9}")
        lines.append("  ".join(cells))
    return "\n".join(lines)


def _num(v, fmt: str = ".4f") -> str:
    return f"{'-':>9}" if v is None else f"{v:>9{fmt}}"


def main(args: argparse.Namespace) -> int:
    rows = load_rows(Path(args.path))
    print(json.dumps(rows, indent=1) if args.json else format_table(rows))
    return 0
