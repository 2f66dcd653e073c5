"""dmpq-compile eval MODEL_OR_ARTIFACT --corpus ...: perplexity (and KL to a reference)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HELP = "perplexity of a checkpoint or artifact on a corpus split (optionally KL to a reference)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", metavar="MODEL_OR_ARTIFACT", help="HF checkpoint folder or compiled artifact folder")
    p.add_argument("--corpus", default="pydoc", help="'pydoc', a text file or a folder (default pydoc)")
    p.add_argument("--split", default="test", choices=("train", "calib", "test", "all"), help="default test")
    p.add_argument("--context", type=int, default=256, help="window length (default 256)")
    p.add_argument("--stride", type=int, help="window stride (default: half the context)")
    p.add_argument("--max-tokens", type=int, default=None, help="score only the first N tokens of the split")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--reference", help="model or artifact to measure KL(reference || this) against")
    p.add_argument("--json", help="also write the result as JSON to this file")
    p.add_argument("--no-progress", action="store_true")


def model_logits_fn(path: str | Path):
    """``(logits_fn, tokenizer_dir)`` for an artifact (ONNX runtime) or a checkpoint (reference interpreter)."""
    path = Path(path)
    if (path / "manifest.json").is_file():
        import torch

        from ..runtime import load as load_artifact

        model = load_artifact(path)

        def fn(ids):
            return torch.from_numpy(model.logits(ids.numpy()))

        return fn, path
    from ..frontend import load
    from ..ir import logits_fn

    return logits_fn(load(path), quantize=False), path


def main(args: argparse.Namespace) -> int:
    from ..compiler import eos_token, load_tokenizer
    from ..eval import kl_divergence, load_corpus, perplexity, tokenize_corpus

    fn, tok_dir = model_logits_fn(args.path)
    tok = load_tokenizer(tok_dir)
    split = None if args.split == "all" else args.split
    ids = tokenize_corpus(load_corpus(args.corpus, split), tok, separator=eos_token(tok),
                          max_tokens=args.max_tokens)
    stride = args.stride or max(1, args.context // 2)
    kw = {"context": args.context, "stride": stride, "batch_size": args.batch_size, "progress": not args.no_progress}
    res = perplexity(fn, ids, **kw)
    out = {"path": str(args.path), "corpus": args.corpus, "split": args.split, "tokens": res.n_tokens,
           "ppl": res.ppl, "nll": res.nll}
    if args.reference:
        ref_fn, _ = model_logits_fn(args.reference)
        kl = kl_divergence(ref_fn, fn, ids, **kw)
        out["kl"] = kl.kl
    print("  ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in out.items()))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0
