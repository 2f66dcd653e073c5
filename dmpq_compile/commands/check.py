"""dmpq-compile check ARTIFACT: validate an artifact's ONNX model against TensorRT's ONNX support."""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

NAME = "check"
HELP = "check an artifact's ONNX model against TensorRT 10.x's documented ONNX support"
DESCRIPTION = """Validate the ONNX model of ARTIFACT (an artifact folder or a .onnx file) against TensorRT's
documented ONNX support: operators and their types, per-operator restrictions, dtypes, Q/DQ placement
and quantization granularity, opset range (sources: docs/trt-a100.md). Needs neither a GPU nor
TensorRT. Exit status 1 when there is at least one error."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("artifact", metavar="ARTIFACT", help="artifact folder (manifest.json) or an .onnx file")
    p.add_argument("--trt-version", default="10.x", help="TensorRT release to check against (default 10.x = newest "
                   "encoded table; e.g. 10.0, 10.8)")
    p.add_argument("--json", action="store_true", help="print the issues as JSON")
    p.add_argument("--max-warnings", type=int, default=20, help="warnings printed one by one before they are only "
                   "counted per rule (default 20)")


def model_path(artifact: str | Path) -> Path:
    """The ONNX file of an artifact folder (from its manifest) or the file itself."""
    path = Path(artifact)
    if path.is_file():
        return path
    from ..runtime.manifest import read_manifest

    target = read_manifest(path)["target"]
    if target.get("format") != "onnx" or not target.get("model_file"):
        raise ValueError(f"{path} targets {target.get('backend')!r} without an ONNX model; nothing to check")
    return path / target["model_file"]


def main(args: argparse.Namespace) -> int:
    from ..backends.trt.compat import check_model

    path = model_path(args.artifact)
    issues = check_model(path, args.trt_version)
    errs = [i for i in issues if i.severity == "error"]
    warns = [i for i in issues if i.severity != "error"]
    if args.json:
        print(json.dumps([vars(i) for i in issues], indent=1))
        return 1 if errs else 0
    for issue in errs + warns[: max(0, args.max_warnings)]:
        print(issue)
    rest = warns[max(0, args.max_warnings):]
    for rule, n in sorted(Counter(i.rule for i in rest).items()):
        print(f"warning: [{rule}] {n} more")
    verdict = "FAILS" if errs else "passes"
    print(f"{path}: {verdict} TensorRT {args.trt_version} checks ({len(errs)} errors, {len(warns)} warnings)")
    return 1 if errs else 0
