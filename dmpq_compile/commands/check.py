"""dmpq-compile check ARTIFACT: verify an artifact's files, then validate its ONNX model (onnx.checker,
TensorRT's ONNX support)."""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

NAME = "check"
HELP = "check an artifact's ONNX model against TensorRT 10.x's documented ONNX support"
DESCRIPTION = """First verify every file the artifact's manifest lists (size and sha256, as loading does),
then run onnx.checker on the model file (by path, so models over 2 GB with external data work), then
validate it against TensorRT's documented ONNX support: operators and their types, per-operator
restrictions, dtypes, Q/DQ placement and quantization granularity, opset range (sources:
docs/trt-a100.md). ARTIFACT is an artifact folder or a .onnx file (checksums are verified when its
folder holds a manifest). Needs neither a GPU nor TensorRT. Exit status 1 when there is at least one
error."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("artifact", metavar="ARTIFACT", help="artifact folder (manifest.json) or an .onnx file")
    p.add_argument("--trt-version", default="10.x", help="TensorRT release to check against (default 10.x = newest "
                   "encoded table; e.g. 10.0, 10.8)")
    p.add_argument("--json", action="store_true", help="print the issues as JSON")
    p.add_argument("--max-warnings", type=int, default=20, help="warnings printed one by one before they are only "
                   "counted per rule (default 20)")
    p.add_argument("--no-verify", action="store_true", help="skip the size and sha256 check of the artifact's files")


def model_path(artifact: str | Path, verify: bool = True) -> Path:
    """The ONNX file of an artifact folder (from its manifest) or the file itself.

    With ``verify``, every file the manifest lists is checked (size, sha256) first; a bare .onnx
    file is verified when its folder holds a manifest.

    Raises:
        ArtifactError: the manifest is missing or invalid, or a listed file is missing or changed.
    """
    from ..runtime.manifest import MANIFEST_NAME, load_manifest

    path = Path(artifact)
    if path.is_file():
        if verify and (path.parent / MANIFEST_NAME).is_file():
            load_manifest(path.parent, verify=True)
        return path
    target = load_manifest(path, verify=verify)["target"]
    if target.get("format") != "onnx" or not target.get("model_file"):
        raise ValueError(f"{path} targets {target.get('backend')!r} without an ONNX model; nothing to check")
    return path / target["model_file"]


def onnx_checker_errors(path: Path) -> list[str]:
    """onnx.checker's verdict on the file at ``path`` (by path: the external data is never loaded
    into one proto, which protobuf caps at 2 GB)."""
    import onnx

    try:
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as e:
        return [f"error: [onnx-checker] {str(e).strip().splitlines()[0]}"]
    return []


def main(args: argparse.Namespace) -> int:
    from ..backends.trt.compat import check_model

    path = model_path(args.artifact, verify=not args.no_verify)
    invalid = onnx_checker_errors(path)
    if invalid:
        print("\n".join(invalid))
        print(f"{path}: FAILS onnx.checker; re-create the artifact")
        return 1
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
