"""dmpq-compile check ARTIFACT: verify an artifact's files, run onnx.checker on its ONNX model, then
the checks of its own target: onnxruntime (and onnxruntime-genai) for ort-cpu, TensorRT's ONNX support
for trt-a100."""

from __future__ import annotations

import argparse
import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

NAME = "check"
TARGETS = ("ort-cpu", "trt-a100")  # the backends whose artifacts check knows
HELP = ("check an artifact against its own target: ort-cpu (onnxruntime and onnxruntime-genai load it) or "
        "trt-a100 (TensorRT 10.x's documented ONNX support)")
DESCRIPTION = """First verify every file the artifact's manifest lists (size and sha256, as loading does),
then run onnx.checker on the model file (by path, so models over 2 GB with external data work), then the
checks of the target the manifest names. ort-cpu: onnxruntime loads the model on the CPU; where the
artifact has a genai_config.json, onnxruntime-genai parses it and loads the model, the tokenizer and the
chat template (skipped with a warning when onnxruntime-genai is not installed). trt-a100: the model is
validated against TensorRT's documented ONNX support: operators and their types, per-operator
restrictions, dtypes, Q/DQ placement and quantization granularity, opset range (sources:
docs/trt-a100.md); needs neither a GPU nor TensorRT. ARTIFACT is an artifact folder or a .onnx file
(checksums are verified and the target read when its folder holds a manifest; otherwise --target says
which checks run). Exit status 1 when there is at least one error."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("artifact", metavar="ARTIFACT", help="artifact folder (manifest.json) or an .onnx file")
    p.add_argument("--target", choices=TARGETS, help="the checks for an .onnx file without a manifest beside it "
                   "(default trt-a100); an artifact's manifest names its target, which this must then match")
    p.add_argument("--trt-version", default="10.x", help="trt-a100: TensorRT release to check against (default "
                   "10.x = newest encoded table; e.g. 10.0, 10.8)")
    p.add_argument("--json", action="store_true", help="print the issues as JSON")
    p.add_argument("--max-warnings", type=int, default=20, help="warnings printed one by one before they are only "
                   "counted per rule (default 20)")
    p.add_argument("--no-verify", action="store_true", help="skip the size and sha256 check of the artifact's files")


def resolve(artifact: str | Path, verify: bool = True,
            target: str | None = None) -> tuple[Path, str, dict[str, Any] | None]:
    """``(ONNX file, target backend, manifest or None)`` of an artifact folder or an .onnx file.

    The manifest is the folder's (the file's folder for an .onnx file); with ``verify``, every file
    it lists is checked (size, sha256) first. A bare .onnx file without a manifest is checked as
    ``target`` (default ``trt-a100``).

    Raises:
        ArtifactError: the manifest is missing or invalid, or a listed file is missing or changed.
        ValueError: the manifest names a target check does not know, or another than ``target``,
            or has no ONNX model.
    """
    from ..runtime.manifest import MANIFEST_NAME, load_manifest

    path = Path(artifact)
    folder = path.parent if path.is_file() else path
    if path.is_file() and not (folder / MANIFEST_NAME).is_file():
        return path, target or "trt-a100", None
    manifest = load_manifest(folder, verify=verify)
    fields = manifest["target"]
    backend = fields.get("backend")
    if backend not in TARGETS:
        raise ValueError(f"{folder} targets {backend!r}; check knows the targets {', '.join(TARGETS)}")
    if target is not None and target != backend:
        raise ValueError(f"{folder}'s manifest names target {backend!r}, not --target {target}; leave --target out")
    if path.is_file():
        return path, backend, manifest
    if fields.get("format") != "onnx" or not fields.get("model_file"):
        raise ValueError(f"{path} targets {backend!r} without an ONNX model; nothing to check")
    return path / fields["model_file"], backend, manifest


def onnx_checker_errors(path: Path) -> list[str]:
    """onnx.checker's verdict on the file at ``path`` (by path: the external data is never loaded
    into one proto, which protobuf caps at 2 GB)."""
    import onnx

    try:
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as e:
        return [f"error: [onnx-checker] {str(e).strip().splitlines()[0]}"]
    return []


def bare_kernel_library(model_file: Path) -> str | None:
    """For a model file checked without its artifact's manifest that uses dmpq's ``ai.dmpq`` ops: the kernel
    library beside it where an artifact keeps one (``kernels/``), else the one this package builds (an absolute
    path); None for a model without those ops."""
    import onnx

    from ..backends.ort_cpu import kernels

    model = onnx.load(str(model_file), load_external_data=False)
    if not any(o.domain == kernels.DOMAIN for o in model.opset_import):
        return None
    return kernels.ARTIFACT_PATH if (model_file.parent / kernels.ARTIFACT_PATH).is_file() else str(kernels.build())


def main(args: argparse.Namespace) -> int:
    path, backend, manifest = resolve(args.artifact, verify=not args.no_verify, target=args.target)
    invalid = onnx_checker_errors(path)
    if invalid:
        print("\n".join(invalid))
        print(f"{path}: FAILS onnx.checker; re-create the artifact")
        return 1
    if backend == "ort-cpu":
        from ..runtime.check import check_ort_cpu

        if manifest is None:  # a bare model file: dmpq's kernel library where its graph uses dmpq's ops
            library = bare_kernel_library(path)
            manifest = {"target": {"custom_ops_library": library}} if library else None
        findings, checked = check_ort_cpu(path, manifest)
        return report(findings, f"ort-cpu checks ({', '.join(['onnx.checker', *checked])})", path, args)
    from ..backends.trt.compat import check_model

    return report(check_model(path, args.trt_version), f"TensorRT {args.trt_version} checks", path, args)


def report(issues: Sequence[Any], checks: str, path: Path, args: argparse.Namespace) -> int:
    """Print ``issues`` (each with ``severity``, ``rule`` and a one-line ``str``; errors first) and
    the verdict line on ``checks``; 1 when one of them is an error, else 0."""
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
    print(f"{path}: {verdict} {checks} ({len(errs)} errors, {len(warns)} warnings)")
    return 1 if errs else 0
