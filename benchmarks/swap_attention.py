"""A copy of an ort-cpu artifact whose ``com.microsoft.GroupQueryAttention`` nodes are dmpq's
``ai.dmpq.GroupQueryAttention`` instead, with what it needs: for an A/B of the attention op on an artifact compiled
before the kernel dispatch took it, without compiling the checkpoint again (a 24-layer Qwen3-30B-A3B-shaped compile
takes 10 minutes). The rewrite is what the lowering emits under the kernel dispatch: the same query, key, value,
past and bias inputs, the int64 total length the int32 one was cast from, the same outputs.

The weights are hard-linked (no copy); ``model.onnx`` is rewritten, the kernel library replaced by this tree's build
and the manifest's checksums of both updated. Only artifacts that carry the kernel library (``--dispatch kernel``)
are taken.

    python benchmarks/swap_attention.py OLD_ARTIFACT NEW_FOLDER
    dmpq-compile bench OLD_ARTIFACT NEW_FOLDER --corpus none --prefill-tokens 512
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import onnx
from dmpq_compile.backends.ort_cpu import MODEL_FILE, kernels
from onnx import helper


def swap(src: Path, dst: Path) -> int:
    """Write the copy; returns the number of attention nodes swapped."""
    manifest = json.loads((src / "manifest.json").read_text())
    if manifest.get("target", {}).get("custom_ops_library") != kernels.ARTIFACT_PATH:
        raise SystemExit(f"{src} does not carry dmpq's kernel library (compiled with --dispatch fused?): "
                         "only kernel-dispatch artifacts are taken")
    if dst.exists():
        raise SystemExit(f"{dst} exists; give a new folder")
    tmp = dst.with_name(dst.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    for f in sorted(src.rglob("*")):
        rel = f.relative_to(src)
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        if f.is_dir():
            (tmp / rel).mkdir(exist_ok=True)
        elif rel.as_posix() in (MODEL_FILE, "manifest.json", kernels.ARTIFACT_PATH):
            shutil.copyfile(f, tmp / rel)
        else:
            os.link(f, tmp / rel)
    model = onnx.load(str(tmp / MODEL_FILE), load_external_data=False)
    producer = {o: n for n in model.graph.node for o in n.output}
    swapped = 0
    for node in model.graph.node:
        if node.op_type != "GroupQueryAttention" or node.domain != "com.microsoft":
            continue
        cast = producer.get(node.input[6])  # total_sequence_length: a Cast of the int64 total
        if cast is None or cast.op_type != "Cast" or len(node.input) < 11 or not node.input[10]:
            raise SystemExit(f"{node.name}: not the lowering's GroupQueryAttention (total from a Cast, a bias)")
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        node.CopyFrom(helper.make_node("GroupQueryAttention", [*node.input[:5], cast.input[0], node.input[10]],
                                       list(node.output), name=node.name, domain=kernels.DOMAIN,
                                       num_heads=attrs["num_heads"], kv_num_heads=attrs["kv_num_heads"]))
        swapped += 1
    if not any(o.domain == kernels.DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(kernels.DOMAIN, 1))
    onnx.save(model, str(tmp / MODEL_FILE))
    shutil.copyfile(kernels.build(), tmp / kernels.ARTIFACT_PATH)
    for rel in (MODEL_FILE, kernels.ARTIFACT_PATH):
        data = (tmp / rel).read_bytes()
        manifest["files"][rel] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
    tmp.rename(dst)
    return swapped


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("artifact", type=Path, help="a kernel-dispatch ort-cpu artifact with onnxruntime's attention")
    p.add_argument("out", type=Path, help="the new folder (must not exist)")
    args = p.parse_args(argv)
    print(f"swapped {swap(args.artifact, args.out)} attention nodes into {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
