"""dmpq-compile inspect PATH: the per-expert table of an artifact or a saved IR folder."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HELP = ("print the per-expert table (layer, expert, freq, sensitivity, bits) of an artifact or IR, the bits "
        "of the weights outside the experts, and an artifact's stored bits per weight and chat template")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", metavar="PATH", help="artifact folder (report.json) or saved IR folder (graph.json)")
    p.add_argument("--min-routed-tokens", type=int, metavar="N",
                   help="count per layer the experts with fewer than N routed calibration tokens (default: the "
                   "compile's --min-routed-tokens, else 8)")
    p.add_argument("--json", action="store_true",
                   help='print JSON instead: {"experts": [rows], "nonexpert": [rows], "storage": stored bits per weight '
                   'or null, "rare_experts": per-layer counts}')


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


def load_nonexpert(path: Path) -> list[dict]:
    """Rows of the quantizable nodes outside the experts (bits, measured KL under --nonexpert-bits auto,
    and an artifact's stored bits per weight of each), from the report, manifest or IR; [] if none."""
    if (path / "graph.json").is_file() and not (path / "report.json").is_file():
        from ..compiler import nonexpert_table
        from ..ir import load_graph

        return nonexpert_table(load_graph(path))
    rows = json.loads((path / "report.json").read_text()).get("nonexpert", []) if (path / "report.json").is_file() \
        else []
    stored = json.loads((path / "manifest.json").read_text()).get("nonexpert", {}) \
        if (path / "manifest.json").is_file() else {}
    if not rows:  # an artifact compiled before the report had the table: the manifest's bits
        rows = [{"id": k, "kind": v["kind"], "bits": v["bits"]} for k, v in stored.items()]
    return [{**r, **({"bits_per_weight": stored[r["id"]]["bits_per_weight"]}
                     if "bits_per_weight" in stored.get(r["id"], {}) else {})} for r in rows]


def format_nonexpert(rows: list[dict]) -> str:
    kl_bits = sorted({int(b) for r in rows for b in r.get("kl", {}) if int(b) < 16})
    head = ["node", "kind", "bits", "stored bpw"] + [f"KL@{b}" for b in kl_bits]
    lines = ["weights outside the experts:", "  ".join(f"{h:>13}" for h in head)]
    for r in rows:
        kl = {int(b): v for b, v in r.get("kl", {}).items()}
        cells = [f"{r['id']:>13}", f"{r['kind']:>13}", f"{r['bits']:>13}", _num(r.get("bits_per_weight"), ".3f", 13)]
        cells += [_num(kl.get(b), ".2e", 13) for b in kl_bits]
        lines.append("  ".join(cells))
    return "\n".join(lines)


def _num(v, fmt: str = ".4f", width: int = 9) -> str:
    return f"{'-':>{width}}" if v is None else f"{v:>{width}{fmt}}"


def load_storage(path: Path) -> dict | None:
    """The artifact's stored-bits summary (``report.json`` or ``manifest.json`` ``storage``), if it has one."""
    for name in ("report.json", "manifest.json"):
        f = path / name
        if f.is_file():
            storage = json.loads(f.read_text()).get("storage")
            if storage:
                return storage
    return None


def format_storage(storage: dict) -> str:
    """Stored bits per weight (codes + scales + zero points + float tensors) in total and by part."""
    lines = [(f"stored bits per weight: {storage['bits_per_weight']:.3f} over {storage['params']:,} parameters "
              f"({storage['bytes'] / 2**20:.1f} MiB of model files)")]
    if storage.get("weights"):
        w = storage["weights"]
        lines.append(f"  weight tensors alone (what --budget-bits counts): {w['bits_per_weight']:.3f} "
                     f"({w['bytes'] / 2**20:.1f} MiB)")
    experts, other = storage.get("experts"), storage.get("other")
    if experts:
        lines.append(f"  experts: {experts['bits_per_weight']:.3f} stored, {experts['code_bits']:.3f} code bits "
                     f"({experts['params']:,} parameters, {experts['bytes'] / 2**20:.1f} MiB)")
    if other:
        lines.append(f"  everything else (attention, embeddings, norms, routers, lm_head, graph): "
                     f"{other['bits_per_weight']:.3f} ({other['params']:,} parameters, {other['bytes'] / 2**20:.1f} MiB)")
    if storage.get("nonexpert"):
        n = storage["nonexpert"]
        lines.append(f"    of which quantized outside the experts: {n['bits_per_weight']:.3f} stored, {n['code_bits']:.3f} "
                     f"code bits ({n['params']:,} parameters, {n['bytes'] / 2**20:.1f} MiB)")
    if storage.get("scales"):
        lines.append("  scales: " + ", ".join(f"{dtype} ({count} nodes)" for dtype, count in storage["scales"].items()))
    return "\n".join(lines)


def chat_template_line(path: Path) -> str | None:
    """One line on an artifact's chat template: the source checkpoint's file that held it, or that it
    had none (from the manifest's ``tokenizer.chat_template``); None for a folder without a manifest."""
    f = path / "manifest.json"
    if not f.is_file():
        return None
    tokenizer = json.loads(f.read_text()).get("tokenizer") or {}
    if "chat_template" not in tokenizer:
        return "chat template: not recorded (the artifact was compiled before dmpq-compile recorded it)"
    if tokenizer["chat_template"] is None:
        return "chat template: none in the source checkpoint (apply_chat_template will fail; pass a template yourself)"
    return f"chat template: from the source checkpoint's {tokenizer['chat_template']}"


def genai_line(path: Path) -> str | None:
    """One line on the onnxruntime-genai config of an ort-cpu artifact: its KV buffer's positions and size
    per sequence; None where the manifest records none (trt-a100, or compiled before the genai contract)."""
    f = path / "manifest.json"
    genai = json.loads(f.read_text()).get("target", {}).get("genai") if f.is_file() else None
    if not genai:
        return None
    per_token = int(genai["kv_bytes_per_token"])
    return (f"onnxruntime-genai: {genai['config']}, max_length {genai['max_length']} (KV buffer "
            f"{per_token * int(genai['max_length']) / 2**20:.1f} MiB per sequence, {per_token / 1024:.1f} KiB a "
            "position; set it with compile --max-length or the app's max_length)")


def dispatch_line(path: Path) -> str | None:
    """One line on how an ort-cpu artifact dispatches its experts (the manifest's ``target.dispatch``), with the
    custom-op library it carries where it has one; None where the manifest records no dispatch."""
    f = path / "manifest.json"
    target = json.loads(f.read_text()).get("target", {}) if f.is_file() else {}
    if not target.get("dispatch"):
        return None
    line = f"expert dispatch: {target['dispatch']}"
    if target.get("custom_ops_library"):
        line += (f" (dmpq's ai.dmpq ops: MixedMoE, PanelMatMul, GroupQueryAttention; library "
                 f"{target['custom_ops_library']} in the artifact: Linux x86-64 only)")
    return line


def min_routed_tokens(path: Path, given: int | None) -> int:
    """N of the rare-expert count: ``given``, else the compile's (report.json), else the default."""
    from ..rare_counts import DEFAULT_MIN_TOKENS

    if given is not None:
        if given < 0:
            raise ValueError(f"--min-routed-tokens must be >= 0, got {given}")
        return given
    f = path / "report.json"
    report = json.loads(f.read_text()) if f.is_file() else {}
    used = (report.get("rare_experts") or {}).get("min_routed_tokens")
    return int(DEFAULT_MIN_TOKENS if used is None else used)


def rare_lines(path: Path, rows: list[dict], given: int | None) -> str | None:
    """The per-layer count of rarely routed experts (None when the rows carry no token counts)."""
    from ..rare_counts import format_counts, rare_counts

    n = min_routed_tokens(path, given)
    counts = rare_counts(rows, n)
    return format_counts(counts, n) if counts else None


def main(args: argparse.Namespace) -> int:
    path = Path(args.path)
    rows = load_rows(path)
    nonexpert = load_nonexpert(path)
    storage = load_storage(path)
    if args.json:
        manifest = json.loads((path / "manifest.json").read_text()) if (path / "manifest.json").is_file() else {}
        extra = {"genai": manifest.get("target", {}).get("genai"),
                 "chat_template": (manifest.get("tokenizer") or {}).get("chat_template")} if manifest else {}
        from ..rare_counts import rare_counts

        n = min_routed_tokens(path, args.min_routed_tokens)
        rare = {"min_routed_tokens": n, "per_layer": {str(k): v for k, v in rare_counts(rows, n).items()}}
        print(json.dumps({"experts": rows, "nonexpert": nonexpert, "storage": storage, "rare_experts": rare, **extra},
                         indent=1))
        return 0
    print(format_table(rows))
    rare = rare_lines(path, rows, args.min_routed_tokens)
    if rare:
        print(rare)
    if any(r["bits"] < 16 for r in nonexpert):
        print(format_nonexpert(nonexpert))
    if storage:
        print(format_storage(storage))
    for line in (dispatch_line(path), genai_line(path), chat_template_line(path)):
        if line:
            print(line)
    return 0
