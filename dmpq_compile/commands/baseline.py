"""dmpq-compile baseline ort-quantizer MODEL_DIR -o OUT: a peer baseline artifact made by another tool."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HELP = "build a peer-baseline artifact (torch.onnx export + ONNX Runtime's MatMulNBits quantizer)"
DESCRIPTION = """Builds the same checkpoint with another toolchain, as an ort-cpu artifact that `run`, `eval`
and `bench` accept. `ort-quantizer`: torch.onnx (dynamo) export with a KV-cache interface and
export-friendly experts, checked against the PyTorch model on inputs other than the tracing ones,
then onnxruntime.quantization's MatMulNBitsQuantizer. Defaults match dmpq-compile's ort-cpu defaults
(block size 64, asymmetric, accuracy level 4); ORT's own defaults are block size 128, level 0."""
KINDS = ("ort-quantizer",)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..baselines.ort_quantizer import ALGOS, BLOCK_SIZES, SCOPES

    p.add_argument("kind", choices=KINDS, help="which baseline (only ort-quantizer for now)")
    p.add_argument("model_dir", metavar="MODEL_DIR", help="local Hugging Face checkpoint folder")
    p.add_argument("-o", "--out", required=True, help="artifact folder to create")
    p.add_argument("--bits", type=int, default=4, choices=(2, 4, 8, 16),
                   help="weight bits (default 4); 16 = export only, no quantization")
    p.add_argument("--block-size", type=int, default=64, choices=BLOCK_SIZES, help="quantization block (default 64)")
    p.add_argument("--symmetric", action="store_true", help="symmetric codes (no zero points)")
    p.add_argument("--accuracy-level", type=int, default=4, choices=range(5),
                   help="MatMulNBits accuracy_level (default 4: int8 activations; 0: fp32)")
    p.add_argument("--algo", default="default", choices=ALGOS, help="ORT quantization algorithm (default: default)")
    p.add_argument("--scope", default="all", choices=SCOPES,
                   help="quantize every MatMul with a constant weight (all, ORT's behaviour) or experts only")
    p.add_argument("--calib-corpus", default="pydoc",
                   help="text for the routing-frequency profile ('none': assume uniform routing)")
    p.add_argument("--calib-sequences", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--opset", type=int, default=21)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def main(args: argparse.Namespace) -> int:
    from ..baselines.ort_quantizer import OrtQuantizerConfig, build_ort_quantizer_baseline

    cfg = OrtQuantizerConfig(bits=args.bits, block_size=args.block_size, is_symmetric=args.symmetric,
                             accuracy_level=args.accuracy_level, algo=args.algo, scope=args.scope, opset=args.opset,
                             calib_corpus=None if args.calib_corpus == "none" else args.calib_corpus,
                             calib_sequences=args.calib_sequences, seq_len=args.seq_len, seed=args.seed)
    out = build_ort_quantizer_baseline(args.model_dir, args.out, cfg, overwrite=args.overwrite,
                                       progress=not args.no_progress)
    report = json.loads((Path(out) / "report.json").read_text())
    q, check = report["quantization"], report["export_check"]
    print(f"wrote {out}  (torch.onnx export checked: max|diff| {check['full']['max_abs']:.2g}; "
          f"{q['quantized_expert_matmuls']} expert + {q['quantized_other_matmuls']} other MatMuls at {cfg.bits} bits; "
          f"top-1 agreement with PyTorch {report['vs_pytorch']['full']['top1_agreement']:.3f}; "
          f"{report['compile_seconds']:.1f}s)")
    return 0
